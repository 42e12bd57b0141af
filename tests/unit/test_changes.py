"""The change listener's reconnect loop, without a database (issue 15's hot loop).

On a hot standby the connection succeeds and LISTEN is refused ("cannot execute LISTEN during
recovery").  The delay used to reset on every successful connect, so the loop retried ten
times a second and logged each time; the refusal is now a failure like a refused connection:
one log line that says what it means, and a growing delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg
import pytest

from maplookup.db import changes


class RefusingConnection:
    """A connection to a standby: connects, but LISTEN fails as PostgreSQL makes it fail."""

    terminated = 0

    async def add_listener(self, channel: str, callback: Any) -> None:
        raise asyncpg.ReadOnlySQLTransactionError("cannot execute LISTEN during recovery")

    def terminate(self) -> None:
        RefusingConnection.terminated += 1


def test_a_refused_listen_backs_off_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[float] = []

    async def connect(*args: object, **kwargs: object) -> RefusingConnection:
        attempts.append(asyncio.get_running_loop().time())
        return RefusingConnection()

    monkeypatch.setattr(changes.asyncpg, "connect", connect)
    listener = changes.ChangeListener(
        changes.ListenerSettings(dsn="postgresql://standby", reconnect_min_s=0.01,
                                 reconnect_max_s=0.32),
        invalidate=lambda domains: None,
        flush=lambda: None,
        set_live=lambda live: None,
    )  # fmt: skip

    async def run_for_a_second() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(listener._listen_forever(), timeout=1.0)

    with caplog.at_level(logging.INFO, logger="maplookup.db.changes"):
        asyncio.run(run_for_a_second())
    # Delays 0.01, 0.02, 0.04 ... 0.32 s: about 7 attempts in a second (a slow machine makes
    # fewer, never more); resetting the delay at each connect made about a hundred.
    assert 3 <= len(attempts) <= 12, len(attempts)
    assert RefusingConnection.terminated == len(attempts)
    refusals = [r.getMessage() for r in caplog.records if "LISTEN refused" in r.getMessage()]
    assert len(refusals) == 1, refusals
    assert "hot standby" in refusals[0]
    assert "nothing is served from the cache" in refusals[0]
    assert not listener.live
    assert listener.counters.connects == 0
