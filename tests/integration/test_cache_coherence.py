"""The cache against a real PostgreSQL: NOTIFY coherence, races, lost notifications, outages.

The service runs in-process (``maplookup.service.serve``) on a loopback port and is asked over
socketmap, exactly as Postfix asks.  Every wait is on a condition with a deadline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from maplookup.config import Settings
from maplookup.config_load import load_settings
from maplookup.db.changes import APPLICATION_NAME, ChangeFeed, FeedSettings
from maplookup.db.database import PoolSettings, open_database
from maplookup.embedded import EmbeddedPostgres
from maplookup.lookup.answer import DatabaseSource
from maplookup.lookup.cache import AnswerCache, CacheSettings, CachingSource
from maplookup.maps import LookupSettings, MapName
from maplookup.protocol import Reply
from maplookup.serve.service import Running, serve
from maplookup.testing import TrioClient
from tests.helpers import run_sql

SCHEMA_DATA = [
    "INSERT INTO maplookup.domains (name, kind, default_uid, default_gid)"
    " VALUES ('example.com', 'mailbox', 5000, 5000)",
    "INSERT INTO maplookup.domains (name, kind, alias_of)"
    " VALUES ('example.org', 'alias', 'example.com')",
    "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
    " VALUES ('example.com', 'user', 'example.com/user/')",
]


def settings_for(dsn: str, **cache: float) -> Settings:
    return load_settings(
        overrides={
            "listen": {"socketmap": ["127.0.0.1:0"]},
            "database": {"dsn": dsn, "connect_timeout_s": 1.0, "query_timeout_s": 2.0},
            "cache": {"change_feed_poll_interval_s": 0.2, **cache},
        },
        environ={},
    )


@asynccontextmanager
async def running(settings: Settings, dsn: str) -> AsyncIterator[Running]:
    async with trio.open_nursery() as nursery:
        service: Running = await nursery.start(serve, settings, dsn)
        try:
            yield service
        finally:
            service.server.drain()


class Client(TrioClient):
    """One persistent socketmap connection to the in-process service, as a Postfix process holds."""

    @classmethod
    async def to(cls, service: Running) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", service.listeners[0].tcp_port()))

    async def wait_for(
        self, map_name: str, key: str, expected: Reply, timeout_s: float = 5
    ) -> float:
        """Ask until the answer is ``expected``; returns how long it took."""
        start = trio.current_time()
        with trio.fail_after(timeout_s):
            while await self.ask(map_name, key) != expected:  # noqa: ASYNC110
                await trio.sleep(0.002)
        return trio.current_time() - start


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    with trio.fail_after(timeout_s):
        while not condition():  # noqa: ASYNC110 - polling service counters, bounded
            await trio.sleep(0.005)


@pytest.fixture
def dsn(make_database: Callable[[], str]) -> str:
    dsn = make_database()
    run_sql(dsn, *SCHEMA_DATA)
    return dsn


async def test_changes_are_seen_by_the_next_lookups(dsn: str) -> None:
    async with running(settings_for(dsn), dsn) as service:
        assert service.cache is not None
        await wait_until(lambda: service.cache is not None and service.cache.live)
        client = await Client.to(service)
        # Cache a negative and a positive answer, and a mirror-domain answer.
        assert await client.ask("vmailbox", "new@example.com") == Reply.notfound()
        assert await client.ask("vmailbox", "user@example.com") == Reply.ok("example.com/user/")
        assert await client.ask("virtual", "new@example.org") == Reply.notfound()
        assert await client.ask("vmailbox", "new@example.com") == Reply.notfound()
        assert service.cache.counters.negative_hits >= 1

        run_sql(
            dsn,
            "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
            " VALUES ('example.com', 'new', 'example.com/new/')",
        )
        await client.wait_for("vmailbox", "new@example.com", Reply.ok("example.com/new/"))
        # A change in the target domain reaches the mirror domain's cached answers too.
        await client.wait_for("virtual", "new@example.org", Reply.ok("new@example.com"))

        run_sql(dsn, "UPDATE maplookup.mailboxes SET enabled = false WHERE local_part = 'user'")
        await client.wait_for("vmailbox", "user@example.com", Reply.notfound())
        run_sql(dsn, "UPDATE maplookup.domains SET enabled = false WHERE name = 'example.com'")
        await client.wait_for("vmailbox", "new@example.com", Reply.notfound())
        await client.stream.aclose()


async def test_changes_in_other_domains_reach_the_cross_domain_maps(dsn: str) -> None:
    """sender_login follows alias targets into other domains, transport and relay_domains
    match parent domains and '*': a change anywhere must reach their cached answers."""
    run_sql(
        dsn,
        "INSERT INTO maplookup.domains (name, kind) VALUES ('lists.test', 'alias')",
        "INSERT INTO maplookup.aliases (domain, local_part, targets)"
        " VALUES ('lists.test', 'info', ARRAY['user@example.com'])",
    )
    async with running(settings_for(dsn), dsn) as service:
        assert service.cache is not None
        await wait_until(lambda: service.cache is not None and service.cache.live)
        client = await Client.to(service)
        owners = Reply.ok("user@example.com")
        assert await client.ask("sender_login", "info@lists.test") == owners
        assert await client.ask("sender_login", "info@lists.test") == owners
        assert await client.ask("transport", "x@sub.example.net") == Reply.notfound()
        assert await client.ask("transport", "*") == Reply.notfound()
        assert await client.ask("relay_domains", "mx.example.net") == Reply.notfound()
        hits = service.cache.counters.hits
        assert hits >= 1

        # The alias's target is a mailbox of another domain: disabling it changes the owners.
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
        await client.stream.aclose()


async def test_bulk_change_is_coalesced(dsn: str) -> None:
    async with running(settings_for(dsn), dsn) as service:
        assert service.cache is not None
        assert service.listener is not None
        await wait_until(lambda: service.cache is not None and service.cache.live)
        client = await Client.to(service)
        assert await client.ask("vmailbox", "bulk9999@example.com") == Reply.notfound()
        before = service.listener.counters.notifications
        run_sql(
            dsn,
            "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
            " SELECT 'example.com', 'bulk' || g, 'example.com/bulk' || g || '/'"
            " FROM generate_series(1, 10000) g",
        )
        await client.wait_for("vmailbox", "bulk9999@example.com", Reply.ok("example.com/bulk9999/"))
        # One statement of 10,000 rows: one notification, one invalidation per domain.
        assert service.listener.counters.notifications - before == 1
        await client.stream.aclose()


async def test_truncate_flushes_everything(dsn: str) -> None:
    async with running(settings_for(dsn), dsn) as service:
        assert service.cache is not None
        await wait_until(lambda: service.cache is not None and service.cache.live)
        client = await Client.to(service)
        assert await client.ask("vmailbox", "user@example.com") == Reply.ok("example.com/user/")
        run_sql(dsn, "TRUNCATE maplookup.mailboxes")
        await client.wait_for("vmailbox", "user@example.com", Reply.notfound())
        await client.stream.aclose()


async def test_lost_listen_connection_flushes_and_never_serves_stale(dsn: str) -> None:
    """pg_terminate_backend the change feed's connection, change a row while it is down."""
    async with open_database(PoolSettings(dsn=dsn)) as database:
        cache = AnswerCache(CacheSettings())
        source = CachingSource(DatabaseSource(database, LookupSettings()), cache)
        # Reconnect after a full second, so that the change below lands while nobody listens.
        listener = ChangeFeed(
            FeedSettings(dsn=dsn, reconnect_min_s=1.0),
            invalidate=cache.invalidate_domains,
            flush=cache.flush,
            set_live=cache.set_live,
        )
        key = "user@example.com"
        async with trio.open_nursery() as nursery:
            await nursery.start(listener.run, database.bridge)
            await wait_until(lambda: cache.live)
            assert await source.fetch(MapName.VMAILBOX, key) == "example.com/user/"
            assert await source.fetch(MapName.VMAILBOX, key) == "example.com/user/"
            assert cache.counters.hits == 1
            flushes = cache.counters.flushes

            run_sql(
                dsn,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                f" WHERE application_name = '{APPLICATION_NAME}'",
            )
            await wait_until(lambda: listener.counters.connection_losses == 1 and not cache.live)
            # Nobody follows the log now: the reconnected feed flushes and starts at the head.
            run_sql(
                dsn,
                "UPDATE maplookup.mailboxes SET path = 'example.com/moved/'"
                " WHERE local_part = 'user'",
            )
            assert await source.fetch(MapName.VMAILBOX, key) == "example.com/moved/"
            assert cache.counters.hits == 1  # not live: nothing was served from the cache
            await wait_until(lambda: cache.live and cache.counters.flushes > flushes)
            assert await source.fetch(MapName.VMAILBOX, key) == "example.com/moved/"
            assert await source.fetch(MapName.VMAILBOX, key) == "example.com/moved/"
            assert cache.counters.hits == 2  # cached again once LISTEN is back
            assert listener.counters.connects == 2
            nursery.cancel_scope.cancel()


async def test_in_flight_miss_during_a_change_is_not_stored(dsn: str) -> None:
    """Hold a miss's query after it read the old row, commit a change, then release it."""
    async with running(settings_for(dsn), dsn) as service:
        cache = service.cache
        assert cache is not None
        await wait_until(lambda: cache.live)
        caching_source = service.lookup._source  # the CachingSource in front of the database
        inner = caching_source._inner  # type: ignore[attr-defined]
        release = trio.Event()
        read_old = trio.Event()
        real_fetch = inner.fetch

        async def held_fetch(map_name: MapName, key: str) -> str | None:
            value: str | None = await real_fetch(map_name, key)
            read_old.set()
            await release.wait()
            return value

        inner.fetch = held_fetch
        client = await Client.to(service)
        replies: list[Reply] = []
        async with trio.open_nursery() as nursery:

            async def first_lookup() -> None:
                replies.append(await client.ask("vmailbox", "user@example.com"))

            nursery.start_soon(first_lookup)
            await read_old.wait()
            invalidations = cache.counters.invalidations
            run_sql(
                dsn,
                "UPDATE maplookup.mailboxes SET path = 'example.com/v2/' WHERE local_part = 'user'",
            )
            await wait_until(lambda: cache.counters.invalidations > invalidations)
            release.set()
        inner.fetch = real_fetch
        assert replies == [Reply.ok("example.com/user/")]
        assert cache.counters.stores_skipped == 1
        assert await client.ask("vmailbox", "user@example.com") == Reply.ok("example.com/v2/")
        await client.stream.aclose()


async def test_no_cache_is_a_pass_through(dsn: str) -> None:
    async with running(settings_for(dsn, max_entries=0), dsn) as service:
        assert service.cache is None
        assert service.listener is None
        client = await Client.to(service)
        assert await client.ask("vmailbox", "user@example.com") == Reply.ok("example.com/user/")
        run_sql(dsn, "DELETE FROM maplookup.mailboxes")
        assert await client.ask("vmailbox", "user@example.com") == Reply.notfound()
        await client.stream.aclose()


# -- outage: a cluster of its own, stopped and started under the running service ---------------


async def test_outage_serves_cache_answers_temp_and_recovers(
    own_cluster: EmbeddedPostgres,
) -> None:
    from maplookup.db import admin
    from tests.helpers import run_async

    dsn = own_cluster.tcp_dsn
    run_async(admin.init_schema, dsn)
    run_sql(dsn, *SCHEMA_DATA)
    async with running(settings_for(dsn, positive_ttl_s=0.01, negative_ttl_s=0.01), dsn) as service:
        cache = service.cache
        assert cache is not None
        await wait_until(lambda: cache.live)
        client = await Client.to(service)
        assert await client.ask("vmailbox", "user@example.com") == Reply.ok("example.com/user/")
        assert await client.ask("vmailbox", "nobody@example.com") == Reply.notfound()

        await trio.to_thread.run_sync(lambda: own_cluster.stop(mode="fast"))
        await wait_until(lambda: not cache.live)
        # TTLs have long passed: these are stale answers, served because the database is away.
        assert await client.ask("vmailbox", "user@example.com") == Reply.ok("example.com/user/")
        assert await client.ask("vmailbox", "nobody@example.com") == Reply.notfound()
        uncached = await client.ask("vmailbox", "other@example.com")
        assert uncached.status.value == "TEMP"
        assert cache.counters.stale_served >= 2

        await trio.to_thread.run_sync(own_cluster.start)
        await wait_until(lambda: cache.live, timeout_s=30)
        assert await client.ask("vmailbox", "other@example.com") == Reply.notfound()
        run_sql(
            dsn,
            "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
            " VALUES ('example.com', 'other', 'example.com/other/')",
        )
        await client.wait_for("vmailbox", "other@example.com", Reply.ok("example.com/other/"))
        await client.stream.aclose()
