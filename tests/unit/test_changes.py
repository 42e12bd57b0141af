"""The change feed's reader without a database: standby, primary, lost connections.

A fake connection plays PostgreSQL: it answers the head position and "changes after P" from a
list, refuses LISTEN like a hot standby ("cannot execute LISTEN during recovery") or accepts it
like a primary, and can be terminated.  The feed runs on a plain asyncio loop; what it hands
the cache is collected by ``_post_step``/``_post_live`` (no trio thread here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg
import pytest

from maplookup.db import changes
from maplookup.db.changes import ChangeFeed, FeedSettings
from maplookup.db.feed import Change, FeedStep


class FakeConnection:
    """One connection to a fake database holding ``log`` (shared by all connections)."""

    # True: no standby, yet LISTEN is refused (as a transaction-mode pooler might).
    refuse_only = False

    def __init__(self, log: list[Change], *, standby: bool) -> None:
        self.log = log
        self.standby = standby
        self.listeners: list[Callable[..., None]] = []
        self.on_terminate: list[Callable[[object], None]] = []
        self.terminated = False
        self.reads = 0
        self.listen_attempts = 0

    async def add_listener(self, channel: str, callback: Callable[..., None]) -> None:
        self.listen_attempts += 1
        if self.standby:
            raise asyncpg.ReadOnlySQLTransactionError("cannot execute LISTEN during recovery")
        self.listeners.append(callback)

    def add_termination_listener(self, callback: Callable[[object], None]) -> None:
        self.on_terminate.append(callback)

    async def fetchval(self, query: str, *args: object) -> object:
        if "pg_is_in_recovery" in query:
            return self.standby and not self.refuse_only
        assert "change_log_head" in query
        return max((c.position for c in self.log), default=0)

    async def fetchrow(self, query: str, *args: object) -> tuple[object, ...]:
        """The server's role (servers.role_of) or its status (status.read_status)."""
        standby = self.standby and not self.refuse_only
        if "pg_stat_wal_receiver" in query:
            return (standby, 0.0, 0, 1.0, True) if standby else (False, None, None, None, None)
        assert "default_transaction_read_only" in query
        return (standby, standby)

    async def fetch(self, query: str, *args: Any) -> list[tuple[int, list[str]]]:
        assert "changes_after" in query
        self.reads += 1
        after, limit = args
        rows = [c for c in self.log if c.position > after][:limit]
        return [(c.position, list(c.domains)) for c in rows]

    def notify(self) -> None:
        for callback in self.listeners:
            callback(self, 1, changes.CHANNEL, "example.com")

    def kill(self) -> None:
        for callback in self.on_terminate:
            callback(self)

    def terminate(self) -> None:
        self.terminated = True


class Harness:
    """A ChangeFeed on fake connections, recording what it would hand the cache."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, *, standby: bool, **settings: float
    ) -> None:
        self.log: list[Change] = []
        self.connections: list[FakeConnection] = []
        self.steps: list[FeedStep] = []
        self.live: list[tuple[bool, int | None]] = []
        self.standby = standby

        async def connect(*args: object, **kwargs: object) -> FakeConnection:
            conn = FakeConnection(self.log, standby=self.standby)
            self.connections.append(conn)
            return conn

        monkeypatch.setattr(asyncpg, "connect", connect)
        self.feed = ChangeFeed(
            FeedSettings(dsn="postgresql://fake", **settings),
            invalidate=lambda domains: None,
            flush=lambda: None,
            set_live=lambda live: None,
        )
        monkeypatch.setattr(self.feed, "_post_step", self.steps.append)
        real_post_live = self.feed._post_live

        def post_live(live: bool, position: int | None = None) -> None:
            if self.feed.live != live:
                self.live.append((live, position))
            real_post_live(live, position)

        monkeypatch.setattr(self.feed, "_post_live", post_live)

    def run(self, scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
        async def main() -> None:
            task = asyncio.create_task(self.feed.follow_forever())
            try:
                await scenario()
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        asyncio.run(main())

    def domains(self) -> set[str]:
        return {d for step in self.steps for d in step.domains}


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - polling a fake, bounded
            await asyncio.sleep(0.001)


def test_a_standby_is_followed_by_polling_and_its_refusal_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(monkeypatch, standby=True, poll_interval_s=0.01, listen_retry_s=0.02)
    h.log.append(Change(3, ("old.example",)))

    async def scenario() -> None:
        await until(lambda: h.feed.live)
        assert h.live == [(True, 3)]  # starts at the head: what came before is flushed
        h.log.append(Change(5, ("example.com",)))
        h.log.append(Change(9, ("example.org", "example.com")))
        await until(lambda: bool(h.steps) and h.steps[-1].position == 9)
        reads = h.connections[0].reads
        await until(lambda: h.connections[0].reads >= reads + 10)  # it keeps polling

    with caplog.at_level(logging.INFO, logger="maplookup.db.changes"):
        h.run(scenario)
    assert h.domains() == {"example.com", "example.org"}
    assert not any(step.flush for step in h.steps)
    assert len(h.connections) == 1
    assert not h.feed.listening
    assert h.feed.in_recovery
    # Checked again every 0.02 s here, a standby each time: said once, and never sent a
    # LISTEN it would refuse (an ERROR in PostgreSQL's log each time).
    assert h.feed.counters.listen_refusals >= 3
    assert h.connections[0].listen_attempts == 0
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "no LISTEN (the database is a hot standby)" in lines[0]


def test_a_promoted_standby_gets_listen_back_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(monkeypatch, standby=True, poll_interval_s=0.01, listen_retry_s=0.02)

    async def scenario() -> None:
        await until(lambda: h.feed.live)
        assert not h.feed.listening
        h.connections[0].standby = False  # pg_ctl promote: the session lives on
        await until(lambda: h.feed.listening)

    with caplog.at_level(logging.INFO, logger="maplookup.db.changes"):
        h.run(scenario)
    assert not h.feed.in_recovery
    assert len(h.connections) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "LISTEN in place again" in lines[1]


def test_a_refused_listen_on_a_primary_is_said_once_and_polling_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # No standby, yet LISTEN refused (a transaction-mode pooler may do worse: accept it and
    # never deliver, which polling covers the same way).
    h = Harness(monkeypatch, standby=True, poll_interval_s=0.01, listen_retry_s=0.02)
    monkeypatch.setattr(FakeConnection, "refuse_only", True)

    async def scenario() -> None:
        await until(lambda: h.feed.live)
        h.log.append(Change(1, ("example.com",)))
        await until(lambda: bool(h.steps))
        await until(lambda: h.connections[0].listen_attempts >= 3)

    with caplog.at_level(logging.INFO, logger="maplookup.db.changes"):
        h.run(scenario)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "LISTEN refused: cannot execute LISTEN during recovery" in lines[0]


def test_on_a_primary_a_notification_wakes_the_reader_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A poll interval far beyond the test's own timeout: only NOTIFY can wake the reader.
    h = Harness(monkeypatch, standby=False, poll_interval_s=60.0)

    async def scenario() -> None:
        await until(lambda: h.feed.live)
        assert h.feed.listening
        h.log.append(Change(1, ("example.com",)))
        h.connections[0].notify()
        await until(lambda: bool(h.steps), timeout_s=2.0)

    h.run(scenario)
    assert h.steps == [FeedStep(1, False, frozenset({"example.com"}), 1)]
    assert h.feed.counters.notifications == 1


def test_a_lost_connection_goes_down_and_restarts_from_the_head(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = Harness(monkeypatch, standby=True, poll_interval_s=0.01, reconnect_min_s=0.01)

    async def scenario() -> None:
        await until(lambda: h.feed.live)
        h.connections[0].kill()
        await until(lambda: len(h.connections) == 2 and h.feed.live)
        # Written while nobody followed: not read as a change, flushed by going live again.
        h.log.append(Change(4, ("missed.example",)))
        h.connections[1].kill()
        await until(lambda: len(h.connections) == 3 and h.feed.live)

    h.run(scenario)
    # (and down once more when the test cancels it)
    assert h.live == [(True, 0), (False, None), (True, 0), (False, None), (True, 4), (False, None)]
    assert h.feed.counters.connection_losses == 2
    assert h.feed.counters.connects == 3
    assert all(conn.terminated for conn in h.connections[:2])


def test_a_full_read_is_followed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(changes, "MAX_CHANGES_PER_READ", 2)
    h = Harness(monkeypatch, standby=False, poll_interval_s=60.0)

    async def scenario() -> None:
        await until(lambda: h.feed.live)
        h.log.extend(Change(p, (f"d{p}.example",)) for p in range(1, 6))
        h.connections[0].notify()  # one wake-up; the poll interval is far away
        await until(lambda: bool(h.steps) and h.steps[-1].position == 5, timeout_s=2.0)

    h.run(scenario)
    assert [step.position for step in h.steps] == [2, 4, 5]
    assert h.domains() == {f"d{p}.example" for p in range(1, 6)}


def test_refused_connections_back_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[float] = []

    async def connect(*args: object, **kwargs: object) -> FakeConnection:
        attempts.append(asyncio.get_running_loop().time())
        raise OSError("connection refused")

    monkeypatch.setattr(asyncpg, "connect", connect)
    feed = ChangeFeed(
        FeedSettings(dsn="postgresql://down", reconnect_min_s=0.01, reconnect_max_s=0.32),
        invalidate=lambda domains: None,
        flush=lambda: None,
        set_live=lambda live: None,
    )

    async def run_for_a_second() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(feed.follow_forever(), timeout=1.0)

    with caplog.at_level(logging.INFO, logger="maplookup.db.changes"):
        asyncio.run(run_for_a_second())
    # Delays 0.01, 0.02, 0.04 ... 0.32 s: about 7 attempts in a second (fewer on a slow
    # machine, never many more).
    assert 3 <= len(attempts) <= 12, len(attempts)
    assert len(caplog.records) == 1
    assert not feed.live
