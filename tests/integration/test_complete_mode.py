"""``cache.mode = "complete"`` against a real PostgreSQL: load, coherence, rebuilds, outages,
the memory bound, readiness.

The service runs in-process on a loopback port and is asked over socketmap, as Postfix asks
(the helpers of test_cache_coherence.py).  Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import trio

from maplookup.config import Settings
from maplookup.embedded import EmbeddedPostgres
from maplookup.protocol import Reply, Status
from maplookup.serve.service import Running
from tests.helpers import run_sql

from .test_cache_coherence import SCHEMA_DATA, Client, running, settings_for, wait_until


def complete_settings(dsn: str, **cache: float | str) -> Settings:
    return settings_for(dsn, mode="complete", **cache)  # type: ignore[arg-type]


@pytest.fixture
def dsn(make_database: Callable[[], str]) -> str:
    dsn = make_database()
    run_sql(dsn, *SCHEMA_DATA)
    return dsn


def _copy(service: Running):  # type: ignore[no-untyped-def]
    assert service.copy is not None
    return service.copy


async def test_started_means_loaded_and_every_key_comes_from_the_copy(dsn: str) -> None:
    async with running(complete_settings(dsn), dsn) as service:
        copy = _copy(service)
        # serve() reports started (and sd_notify READY) only once the copy is in.
        assert copy.copy is not None and copy.settled.is_set()
        healthy, details = await service.service.health()
        assert healthy, details
        assert details["complete_copy"]["state"] == "current"  # type: ignore[index]
        client = await Client.to(service)
        assert await client.ask("vmailbox", "user@example.com") == Reply.ok("example.com/user/")
        assert await client.ask("vmailbox", "nobody@example.com") == Reply.notfound()
        assert await client.ask("virtual", "user@example.org") == Reply.ok("user@example.com")
        assert copy.counters.answers == 3
        assert copy.counters.fallbacks == 0
        assert service.database_stats.queries == 0
        await client.stream.aclose()
