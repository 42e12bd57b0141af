"""``cache.mode = "complete"`` against a real PostgreSQL: load, coherence, rebuilds, outages,
the memory bound, readiness.

The service runs in-process on a loopback port and is asked over socketmap, as Postfix asks
(the helpers of test_cache_coherence.py).  Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import cast

import asyncpg
import pytest
import trio

from maplookup.config import Settings
from maplookup.config_load import load_settings
from maplookup.db.changes import APPLICATION_NAME
from maplookup.embedded import EmbeddedPostgres
from maplookup.lookup.complete.source import CompleteSource
from maplookup.metrics import render
from maplookup.protocol import Reply, Status
from maplookup.serve.sdnotify import SystemdNotifier
from maplookup.serve.service import Running, serve
from tests.helpers import run_sql, run_with_connection

from .test_cache_coherence import SCHEMA_DATA, Client, running, settings_for, wait_until


def complete_settings(dsn: str, **cache: float | str) -> Settings:
    return settings_for(dsn, mode="complete", **cache)  # type: ignore[arg-type]


@pytest.fixture
def dsn(make_database: Callable[[], str]) -> str:
    dsn = make_database()
    run_sql(dsn, *SCHEMA_DATA)
    return dsn


class Recorder(SystemdNotifier):
    """Counts READY notifications."""

    def __init__(self) -> None:
        super().__init__(environ={})
        self.readies = 0

    def ready(self, status: str | None = None) -> bool:
        self.readies += 1
        return True


def _copy(service: Running) -> CompleteSource:
    assert service.copy is not None
    return service.copy


async def test_started_means_loaded_and_every_key_comes_from_the_copy(dsn: str) -> None:
    async with running(complete_settings(dsn), dsn) as service:
        copy = _copy(service)
        # serve() reports started (and sd_notify READY) only once the copy is in.
        assert copy.copy is not None
        assert copy.settled.is_set()
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
        text = render(service.collector).decode()
        assert "maplookup_copy_loaded 1.0" in text
        assert "maplookup_copy_answers_total 3.0" in text
        await client.stream.aclose()


async def test_reload_applies_max_stale_s_and_leaves_the_mode_to_a_restart(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """max_stale_s applies to the copy at once; the mode and the memory bound need a
    restart (said in the log); new lookup settings need no reload of the copy."""
    newer = [
        complete_settings(dsn, max_stale_s=5.0),
        settings_for(dsn, mode="lru", complete_max_bytes=1000),  # type: ignore[arg-type]
    ]
    settings = complete_settings(dsn)
    async with trio.open_nursery() as nursery:
        service: Running = await nursery.start(
            lambda task_status: serve(
                settings, dsn, reload_settings=lambda: newer.pop(0), task_status=task_status
            )
        )
        copy = _copy(service)
        assert await service.service.reload()
        assert copy.max_stale_s == 5.0
        assert await service.service.reload()
        assert "'cache.mode', 'complete_max_bytes'" in caplog.text
        assert service.copy is copy
        assert copy.copy is not None
        service.server.drain()


async def test_changes_are_applied_in_order_within_the_lru_bound(dsn: str) -> None:
    """The same bound as LRU mode's coherence tests (Client.wait_for: 5 s; NOTIFY makes it
    milliseconds on a primary): present, absent, mirror and cross-domain answers alike."""
    run_sql(
        dsn,
        "INSERT INTO maplookup.domains (name, kind) VALUES ('lists.test', 'alias')",
        "INSERT INTO maplookup.aliases (domain, local_part, targets)"
        " VALUES ('lists.test', 'info', ARRAY['user@example.com'])",
    )
    async with running(complete_settings(dsn), dsn) as service:
        copy = _copy(service)
        client = await Client.to(service)
        assert await client.ask("vmailbox", "new@example.com") == Reply.notfound()
        assert await client.ask("sender_login", "info@lists.test") == Reply.ok("user@example.com")
        run_sql(
            dsn,
            "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
            " VALUES ('example.com', 'new', 'example.com/new/')",
        )
        took = await client.wait_for("vmailbox", "new@example.com", Reply.ok("example.com/new/"))
        assert took < 1.0
        # The mirror domain's answer changes with the domain it mirrors.
        await client.wait_for("virtual", "new@example.org", Reply.ok("new@example.com"))
        # A change in one domain reaches an answer of another (sender_login follows aliases).
        run_sql(dsn, "UPDATE maplookup.mailboxes SET enabled = false WHERE local_part = 'user'")
        await client.wait_for("sender_login", "info@lists.test", Reply.notfound())
        run_sql(
            dsn,
            "INSERT INTO maplookup.transports (domain, transport)"
            " VALUES ('.example.net', 'smtp:[parent]'), ('*', 'smtp:[smarthost]')",
            "INSERT INTO maplookup.domains (name, kind) VALUES ('example.net', 'relay')",
        )
        await client.wait_for("transport", "x@sub.example.net", Reply.ok("smtp:[parent]"))
        await client.wait_for("transport", "*", Reply.ok("smtp:[smarthost]"))
        await client.wait_for("relay_domains", "mx.example.net", Reply.ok("example.net"))
        run_sql(dsn, "UPDATE maplookup.domains SET enabled = false WHERE name = 'example.com'")
        await client.wait_for("vmailbox", "new@example.com", Reply.notfound())
        assert copy.counters.partition_updates >= 3
        # No reload: the wildcard transport's row (domain '*', which flushes the LRU cache) is
        # re-read alone, as the record changes are (schema version 6: the change log names
        # their rows); the domain rows' changes replaced their partitions.
        assert copy.counters.loads == 1
        assert copy.counters.records_replaced == 4  # a mailbox added, one disabled, 2 transports
        assert copy.counters.partitions_replaced >= 2
        assert copy.counters.fallbacks == 0
        assert service.database_stats.queries == 0
        await client.stream.aclose()


async def test_truncate_reloads_in_the_background_and_swaps(dsn: str) -> None:
    async with running(complete_settings(dsn), dsn) as service:
        copy = _copy(service)
        client = await Client.to(service)
        old = copy.copy
        assert await client.ask("vmailbox", "user@example.com") == Reply.ok("example.com/user/")
        run_sql(dsn, "TRUNCATE maplookup.mailboxes")
        await client.wait_for("vmailbox", "user@example.com", Reply.notfound())
        assert copy.counters.loads == 2
        assert copy.copy is not old  # a fresh copy, swapped in whole
        assert copy.counters.fallbacks == 0
        await client.stream.aclose()


async def test_a_change_committed_during_the_initial_load_is_not_lost(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The change commits while the snapshot streams (inside its REPEATABLE READ
    transaction, so the snapshot cannot see it): the feed follows from the snapshot's
    position and applies it."""
    import threading

    from maplookup.db import copy_load
    from maplookup.lookup.complete.store import CopyBuilder

    committed: list[bool] = []

    class ChangeMidLoad(CopyBuilder):
        __slots__ = ()

        def add(self, table: str, rows: object) -> None:
            if table == "mailboxes" and not committed:
                committed.append(True)
                # run_sql runs its own event loop: not in this (the asyncio) thread.
                writer = threading.Thread(
                    target=run_sql,
                    args=(
                        dsn,
                        "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
                        " VALUES ('example.com', 'during', 'example.com/during/')",
                    ),
                )
                writer.start()
                writer.join()
            super().add(table, rows)  # type: ignore[arg-type]

    monkeypatch.setattr(copy_load, "CopyBuilder", ChangeMidLoad)
    async with running(complete_settings(dsn), dsn) as service:
        copy = _copy(service)
        assert committed
        assert copy.copy is not None
        assert "during@example.com" not in copy.copy.mailboxes
        client = await Client.to(service)
        await client.wait_for("vmailbox", "during@example.com", Reply.ok("example.com/during/"))
        assert copy.counters.loads == 1
        await client.stream.aclose()


async def test_a_copy_past_the_memory_bound_falls_back_to_lru_with_one_log_line(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running(complete_settings(dsn, complete_max_bytes=200), dsn) as service:
        copy = _copy(service)
        assert copy.copy is None
        assert copy.refused is not None
        refusals = [r for r in caplog.records if "complete copy refused" in r.getMessage()]
        assert len(refusals) == 1
        message = refusals[0].getMessage()
        assert "cache.complete_max_bytes = 200" in message
        assert "raise" in message
        healthy, details = await service.service.health()
        assert healthy, details
        client = await Client.to(service)
        # LRU mode: answers from the database, cached, kept coherent by the same feed.
        assert service.cache is not None
        await wait_until(lambda: service.cache is not None and service.cache.live)
        assert await client.ask("vmailbox", "user@example.com") == Reply.ok("example.com/user/")
        assert await client.ask("vmailbox", "user@example.com") == Reply.ok("example.com/user/")
        assert service.cache.counters.hits == 1
        run_sql(dsn, "UPDATE maplookup.mailboxes SET path = 'example.com/v2/'")
        await client.wait_for("vmailbox", "user@example.com", Reply.ok("example.com/v2/"))
        await client.stream.aclose()


async def test_ready_and_healthy_only_once_the_copy_is_loaded(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lookups are answered while the snapshot loads (by the database), but neither
    sd_notify READY nor /healthz says ready before the copy is in."""
    import asyncio

    from maplookup.db import copy_follow, copy_load
    from maplookup.serve.service import Service

    gate = asyncio.Event()
    real_load = copy_load.load_snapshot

    async def held_load(*args: object, **kwargs: object) -> object:
        await gate.wait()
        return await real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(copy_follow, "load_snapshot", held_load)
    notifier = Recorder()
    settings = complete_settings(dsn)
    service = Service(settings, dsn, notifier=notifier)
    listening: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: service.run(on_ready=lambda bound: listening.append(bound[0].tcp_port()))
        )
        await wait_until(lambda: service._running is not None)
        running_ = service._running
        assert running_ is not None
        # The feed has connected: the load is under way (held).
        await wait_until(
            lambda: running_.listener is not None and running_.listener.server is not None
        )
        assert notifier.readies == 0
        assert not listening
        healthy, details = await service.health()
        assert not healthy
        assert "not loaded yet" in str(details["problems"])
        port = running_.listeners[0].tcp_port()
        client = Client(await trio.open_tcp_stream("127.0.0.1", port))
        assert await client.ask("vmailbox", "user@example.com") == Reply.ok("example.com/user/")
        assert running_.copy is not None
        assert running_.copy.counters.fallbacks == 1
        # Release the load (in the asyncio thread, where the event lives).
        loop = running_.service._database.bridge._loop
        loop.call_soon_threadsafe(gate.set)
        await wait_until(lambda: notifier.readies == 1)
        assert listening == [port]
        healthy, details = await service.health()
        assert healthy, details
        assert await client.ask("vmailbox", "user@example.com") == Reply.ok("example.com/user/")
        assert running_.copy.counters.answers == 1
        await client.stream.aclose()
        service.drain()


async def test_ready_at_the_latest_after_complete_ready_timeout_s(
    dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A copy that does not load (PostgreSQL down at boot, here a load that never ends) must
    not keep the server from READY past the bound: systemd would kill it."""
    from maplookup.db import copy_follow

    async def stuck(*_args: object, **_kwargs: object) -> object:
        import asyncio

        await asyncio.Event().wait()
        raise AssertionError

    monkeypatch.setattr(copy_follow, "load_snapshot", stuck)
    notifier = Recorder()
    settings = complete_settings(dsn, complete_ready_timeout_s=0.5)
    async with trio.open_nursery() as nursery:
        service: Running = await nursery.start(
            lambda task_status: serve(settings, dsn, notifier=notifier, task_status=task_status)
        )
        assert notifier.readies == 1
        assert "reporting ready anyway" in caplog.text
        healthy, details = await service.service.health()
        assert not healthy
        assert "not loaded yet" in str(details["problems"])
        client = await Client.to(service)
        assert await client.ask("vmailbox", "user@example.com") == Reply.ok("example.com/user/")
        await client.stream.aclose()
        service.server.drain()


# -- outage: a cluster of its own, stopped under the running service --------------------------


async def test_outage_answers_every_key_from_the_copy_then_temp_after_max_stale_s(
    own_cluster: EmbeddedPostgres,
) -> None:
    from maplookup.db import admin
    from tests.helpers import run_async

    dsn = own_cluster.tcp_dsn
    run_async(admin.init_schema, dsn)
    run_sql(dsn, *SCHEMA_DATA)
    async with running(complete_settings(dsn, max_stale_s=3.0), dsn) as service:
        copy = _copy(service)
        client = await Client.to(service)
        await trio.to_thread.run_sync(lambda: own_cluster.stop(mode="fast"))
        assert service.listener is not None
        await wait_until(lambda: service.listener is not None and not service.listener.live)
        keys = [f"nobody{i}@example.com" for i in range(50)] + ["user@example.com"]
        replies = [await client.ask("vmailbox", key) for key in keys]
        assert [r.status for r in replies].count(Status.TEMP) == 0
        assert replies[-1] == Reply.ok("example.com/user/")
        assert await client.ask("virtual", "user@example.org") == Reply.ok("user@example.com")
        assert await client.ask("domains", "unknown.test") == Reply.notfound()
        age = copy.age()
        assert age is not None
        assert age > 0
        # Beyond max_stale_s the copy no longer answers: TEMP (never NOTFOUND) for both.
        await wait_until(lambda: not copy.current(), timeout_s=10)
        for key in ("user@example.com", "nobody@example.com"):
            assert (await client.ask("vmailbox", key)).status is Status.TEMP
        healthy, details = await service.service.health()
        assert not healthy
        assert "not confirmed current" in str(details["problems"])

        await trio.to_thread.run_sync(own_cluster.start)
        await wait_until(copy.current, timeout_s=30)
        # Back on the same server with the log where it was: followed on, not reloaded.
        assert copy.counters.loads == 1
        await client.wait_for("vmailbox", "user@example.com", Reply.ok("example.com/user/"))
        run_sql(
            dsn,
            "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
            " VALUES ('example.com', 'nobody', 'example.com/nobody/')",
        )
        await client.wait_for("vmailbox", "nobody@example.com", Reply.ok("example.com/nobody/"))
        await client.stream.aclose()


def _feed_backends(dsn: str) -> int:
    """The change feed's backends waiting on a lock."""

    async def count(conn: asyncpg.Connection) -> int:
        found: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = $1 AND wait_event_type = 'Lock'",
            APPLICATION_NAME,
        )
        return found

    return cast(int, run_with_connection(dsn, count))


async def test_a_lock_on_a_map_table_delays_the_copy_and_leaves_no_backends_behind(
    dsn: str,
) -> None:
    """An ACCESS EXCLUSIVE lock on a map table (ALTER TABLE, VACUUM FULL, TRUNCATE in an open
    transaction) blocks the copy's read of a change: it times out, and the server ends the
    blocked statement itself (statement_timeout on the feed's connection), so the retries do
    not pile up waiting backends until PostgreSQL refuses connections.  Idle polls read only
    the change log; once the lock goes, the change is applied (a reload)."""
    settings = load_settings(
        overrides={
            "listen": {"socketmap": ["127.0.0.1:0"]},
            "database": {"dsn": dsn, "connect_timeout_s": 1.0, "query_timeout_s": 0.5},
            "cache": {"change_feed_poll_interval_s": 0.1, "mode": "complete"},
        },
        environ={},
    )
    async with running(settings, dsn) as service:
        client = await Client.to(service)
        most = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                trio.to_thread.run_sync,
                run_sql,
                dsn,
                "BEGIN; LOCK TABLE maplookup.sender_grants IN ACCESS EXCLUSIVE MODE;"
                " SELECT pg_sleep(6); COMMIT",
            )
            await trio.sleep(0.5)
            await trio.to_thread.run_sync(
                run_sql,
                dsn,
                "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
                " VALUES ('example.com', 'during', 'example.com/during/')",
            )
            for _ in range(20):
                await trio.sleep(0.25)
                most = max(most, await trio.to_thread.run_sync(_feed_backends, dsn))
        # At most the feed's current connection waits on the lock; without the server-side
        # timeout, every retry left one more backend waiting there until the lock went.
        assert most <= 1
        await client.wait_for("vmailbox", "during@example.com", Reply.ok("example.com/during/"))
        assert await client.ask("vmailbox", "user@example.com") == Reply.ok("example.com/user/")
        await client.stream.aclose()
