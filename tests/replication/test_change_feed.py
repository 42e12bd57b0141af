"""The change feed against a real primary and a real streaming hot standby (issue 15).

Two maplookup services run in-process, as two MX hosts would: one reads the primary (where
LISTEN works), one reads the standby (where it is refused).  They are asked over socketmap, as
Postfix asks.  Writes go to the primary, as the admin CLI's do.  Every wait is on a condition
with a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import re

import asyncpg
import pytest
import trio
import trio.lowlevel

from maplookup.db.changes import FeedSettings
from maplookup.db.servers import ServerPin
from maplookup.protocol import Reply, Status
from maplookup.serve import service as service_module
from maplookup.serve.service import Running
from tests.helpers import run_sql
from tests.integration.test_cache_coherence import (
    SCHEMA_DATA,
    Client,
    running,
    settings_for,
    wait_until,
)
from tests.replication.pair import ReplicatedPair

KEY = "user@example.com"


@pytest.fixture
def dsns(databases: tuple[str, str], pair: ReplicatedPair) -> tuple[str, str]:
    primary, _standby = databases
    run_sql(primary, *SCHEMA_DATA)
    pair.wait_until_replayed()
    return databases


async def live(service: Running) -> None:
    await wait_until(lambda: service.cache is not None and service.cache.live, timeout_s=20)


async def test_a_change_on_the_primary_is_seen_on_both_hosts(dsns: tuple[str, str]) -> None:
    primary, standby = dsns
    async with (
        running(settings_for(primary), primary) as on_primary,
        running(settings_for(standby), standby) as on_standby,
    ):
        await live(on_primary)
        await live(on_standby)
        assert on_primary.listener is not None
        assert on_standby.listener is not None
        assert on_primary.listener.listening  # a primary: NOTIFY wakes its feed
        assert not on_standby.listener.listening  # a standby: it polls
        first, second = await Client.to(on_primary), await Client.to(on_standby)
        for client in (first, second):
            # Cached on both hosts: a negative and a positive answer.
            assert await client.ask("vmailbox", "new@example.com") == Reply.notfound()
            assert await client.ask("vmailbox", KEY) == Reply.ok("example.com/user/")
        assert on_standby.cache is not None
        hits = on_standby.cache.counters.hits
        assert await second.ask("vmailbox", KEY) == Reply.ok("example.com/user/")
        assert on_standby.cache.counters.hits == hits + 1  # the standby host caches

        run_sql(
            primary,
            "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
            " VALUES ('example.com', 'new', 'example.com/new/')",
        )
        for client in (first, second):
            await client.wait_for("vmailbox", "new@example.com", Reply.ok("example.com/new/"))
        # The mirror domain's cached answer follows its target's change, on the standby too.
        await second.wait_for("virtual", "new@example.org", Reply.ok("new@example.com"))
        for client in (first, second):
            await client.stream.aclose()


def _version(reply: Reply) -> int:
    assert reply.status is Status.OK, reply
    match = re.fullmatch(r"example\.com/v(\d+)/", reply.value)
    assert match is not None, reply
    return int(match.group(1))


@pytest.mark.parametrize("feed_reads", ["standby", "primary", "standby-complete"])
async def test_the_standby_host_never_serves_a_stale_answer_after_the_invalidation(
    dsns: tuple[str, str],
    pair: ReplicatedPair,
    monkeypatch: pytest.MonkeyPatch,
    feed_reads: str,
) -> None:
    """Hammer one key on the standby host while its mailbox path changes on the primary.

    The standby replays each commit 150 ms late (recovery_min_apply_delay), so a notification
    from the primary always arrives before the standby has the change (the lag race, observed
    below).  Before each request a client notes the feed position the cache has applied; the
    answer must be at least the version committed at that position.

    ``feed_reads="primary"`` is the control: the feed follows the primary while the lookups
    read the standby (what LISTEN on the primary and lookups on a standby amount to; the pin
    that would point the lookups at the feed's server is disabled).  The same hammering must
    then catch stale answers, or this test could not tell.

    ``feed_reads="standby-complete"``: cache.mode = "complete" on the standby host; the copy
    reads its partitions on the feed's connection to the standby, after the standby has
    replayed the change the log names, so it must never go back either.
    """
    primary, standby = dsns
    complete = feed_reads == "standby-complete"
    if feed_reads == "primary":
        monkeypatch.setattr(
            service_module,
            "FeedSettings",
            lambda **kwargs: FeedSettings(**{**kwargs, "dsn": primary}),
        )

        async def no_pin(_self: ServerPin, _reached: object) -> None:
            return None

        monkeypatch.setattr(ServerPin, "pin", no_pin)
    run_sql(primary, "UPDATE maplookup.mailboxes SET path = 'example.com/v0/'")
    pair.wait_until_replayed()
    changes = 12
    versions: dict[int, int] = {}  # change-log position -> version committed at it
    stale: list[str] = []
    lag_seen = 0
    answers = 0
    run_sql(
        standby, "ALTER SYSTEM SET recovery_min_apply_delay = '150ms'", "SELECT pg_reload_conf()"
    )
    try:
        extra = {"mode": "complete"} if complete else {}
        settings = settings_for(standby, change_feed_poll_interval_s=0.02, **extra)  # type: ignore[arg-type]
        async with running(settings, standby) as service:
            await live(service)
            cache, feed = service.cache, service.listener
            assert cache is not None
            assert feed is not None

            def from_memory() -> int:
                """Answers not read from the database: cache hits, or the copy's answers."""
                if service.copy is not None:
                    return service.copy.counters.answers
                assert cache is not None
                return cache.counters.hits

            hits_before = from_memory()

            async def hammer(client: Client, stop: trio.Event) -> None:
                nonlocal answers
                while not stop.is_set():
                    applied = feed.position or 0
                    required = max((v for p, v in versions.items() if p <= applied), default=0)
                    version = _version(await client.ask("vmailbox", KEY))
                    if version < required:
                        stale.append(f"v{version} after the feed applied {applied} (v{required})")
                    answers += 1
                    await trio.lowlevel.checkpoint()

            async def change(n: int) -> None:
                nonlocal lag_seen
                position, standby_path = await trio.to_thread.run_sync(
                    lambda: asyncio.run(_commit_version(primary, standby, n))
                )
                versions[position] = n
                if standby_path != f"example.com/v{n}/":
                    lag_seen += 1

            clients = [await Client.to(service) for _ in range(4)]
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                for client in clients:
                    nursery.start_soon(hammer, client, stop)
                for n in range(1, changes + 1):
                    await change(n)
                    await trio.sleep(0.05)  # spread the changes over the hammering
                await trio.to_thread.run_sync(pair.wait_until_replayed)
                await wait_until(lambda: (feed.position or 0) >= max(versions))
                await trio.sleep(0.3)  # keep hammering once everything is replayed and read
                stop.set()
            final = await clients[0].ask("vmailbox", KEY)
            for client in clients:
                await client.stream.aclose()
            hits = from_memory() - hits_before
            if complete:
                assert service.copy is not None
                assert service.copy.counters.fallbacks == 0
    finally:
        run_sql(standby, "ALTER SYSTEM RESET recovery_min_apply_delay", "SELECT pg_reload_conf()")
    # The race was there to lose: the primary had committed (and notified) before the standby
    # could answer the new path.
    assert lag_seen > 0
    assert answers > changes
    assert hits > 0  # answered from the cache meanwhile: the cache was live on the standby
    if feed_reads != "primary":
        assert stale == []
        assert final == Reply.ok(f"example.com/v{changes}/")
    else:
        assert stale, "the control should have caught stale answers cached as fresh"
    print(
        f"\n{feed_reads}: {answers} answers, {hits} hits, {len(stale)} stale, lag seen {lag_seen}"
    )


async def _commit_version(primary: str, standby: str, n: int) -> tuple[int, str | None]:
    """Commit version ``n`` on the primary; its change-log position, and what the standby
    answers right after the commit returned."""
    conn = await asyncpg.connect(primary)
    try:
        async with conn.transaction():
            await conn.execute("UPDATE maplookup.mailboxes SET path = $1", f"example.com/v{n}/")
            # The writer holds the change-log lock until it commits: the head is its own row.
            position: int = await conn.fetchval("SELECT maplookup.change_log_head()")
    finally:
        await conn.close()
    conn = await asyncpg.connect(standby)
    try:
        path: str | None = await conn.fetchval("SELECT maplookup.vmailbox($1)", KEY)
    finally:
        await conn.close()
    return position, path


async def test_the_feed_survives_a_standby_restart(
    dsns: tuple[str, str], pair: ReplicatedPair
) -> None:
    primary, standby = dsns
    async with running(settings_for(standby), standby) as service:
        await live(service)
        cache, feed = service.cache, service.listener
        assert cache is not None
        assert feed is not None
        client = await Client.to(service)
        assert await client.ask("vmailbox", KEY) == Reply.ok("example.com/user/")
        assert await client.ask("vmailbox", "nobody@example.com") == Reply.notfound()
        try:
            await trio.to_thread.run_sync(lambda: pair.standby.stop(mode="fast"))
            await wait_until(lambda: not cache.live)
            # Down: cached answers (positive and negative) still served, a miss is TEMP:
            # never NOTFOUND because of an error.
            assert await client.ask("vmailbox", KEY) == Reply.ok("example.com/user/")
            assert await client.ask("vmailbox", "nobody@example.com") == Reply.notfound()
            assert (await client.ask("vmailbox", "other@example.com")).status is Status.TEMP
            # Changed while the standby is down: it replays this after its restart.
            run_sql(
                primary,
                "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
                " VALUES ('example.com', 'nobody', 'example.com/nobody/')",
            )
        finally:
            await trio.to_thread.run_sync(pair.standby.start)
        await wait_until(lambda: cache.live and feed.counters.connects == 2, timeout_s=30)
        await client.wait_for(
            "vmailbox", "nobody@example.com", Reply.ok("example.com/nobody/"), timeout_s=10
        )
        # And it follows changes made after the restart.
        run_sql(primary, "UPDATE maplookup.mailboxes SET path = 'example.com/moved/'")
        await client.wait_for("vmailbox", KEY, Reply.ok("example.com/moved/"), timeout_s=10)
        assert feed.counters.connection_losses == 1
        await client.stream.aclose()


async def test_the_standby_host_caches_and_does_not_fill_the_log(
    dsns: tuple[str, str], pair: ReplicatedPair, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's first symptom: on a standby the cache never went live, every lookup ran a
    statement, and the log got about nine LISTEN lines a second (and PostgreSQL's log as many
    ERRORs)."""
    _primary, standby = dsns
    refusals_before = _listen_errors(pair)
    settings = settings_for(standby, change_feed_poll_interval_s=0.01)
    with caplog.at_level(logging.INFO, logger="maplookup.db.changes"):
        async with running(settings, standby) as service:
            await live(service)
            assert service.listener is not None
            feed = service.listener
            reads = feed.counters.reads
            await wait_until(lambda: feed.counters.reads >= reads + 100)  # a second or so
            client = await Client.to(service)
            for _ in range(5):
                assert await client.ask("vmailbox", KEY) == Reply.ok("example.com/user/")
            assert service.cache is not None
            assert service.cache.counters.hits == 4
            assert service.cache.counters.misses == 1
            await client.stream.aclose()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1, lines
    assert "no LISTEN (the database is a hot standby)" in lines[0]
    assert _listen_errors(pair) == refusals_before  # never sent a LISTEN it would refuse


def _listen_errors(pair: ReplicatedPair) -> int:
    """LISTEN refusals in the standby's server log so far."""
    text = pair.standby.log_file.read_text(errors="replace")
    return text.count("cannot execute LISTEN during recovery")
