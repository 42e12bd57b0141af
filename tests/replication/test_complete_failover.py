"""The complete copy (cache.mode = "complete") through a failover and a promotion, against a
real primary and a real standby.

The copy rides on the change feed's connection, so it reads exactly the server the feed reads:
when the feed moves to another server of the host list, the copy is loaded afresh there (a
position on one server says nothing about another's), while lookups keep coming from the old
copy: never TEMP, never a wrong answer.
"""

from __future__ import annotations

import trio

from maplookup.protocol import Reply, Status
from tests.helpers import run_sql
from tests.integration.test_cache_coherence import SCHEMA_DATA, Client, running, settings_for
from tests.replication.pair import ReplicatedPair
from tests.replication.test_failover import (
    FAILOVER_BOUND_S,
    cli,
    feed_port,
    listed,
    port_of,
    wait_until,
)

USER = Reply.ok("example.com/user/")


async def test_the_copy_answers_through_a_failover_and_follows_the_promoted_standby(
    own_pair: ReplicatedPair, quick_listen: None
) -> None:
    primary, standby = own_pair.new_database()
    run_sql(primary, *SCHEMA_DATA)
    own_pair.wait_until_replayed()
    dsn = listed(primary, standby)
    settings = settings_for(dsn, mode="complete")  # type: ignore[arg-type]
    async with running(settings, dsn) as host:
        copy, feed = host.copy, host.listener
        assert copy is not None
        assert feed is not None
        assert copy.copy is not None
        assert feed_port(host) == port_of(primary)
        client = await Client.to(host)
        wrong: list[str] = []
        asks = [
            ("user@example.com", USER),
            ("nobody@example.com", Reply.notfound()),
            ("x@unknown.test", Reply.notfound()),
        ]
        stop = trio.Event()

        async def hammer() -> None:
            while not stop.is_set():
                for key, expected in asks:
                    reply = await client.ask("vmailbox", key)
                    if reply != expected:  # TEMP included: the copy answers everything
                        wrong.append(f"{key}: {reply}")
                await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hammer)
            await trio.to_thread.run_sync(lambda: own_pair.primary.stop(mode="fast"))
            await wait_until(
                lambda: feed_port(host) == port_of(standby) and feed.live,
                timeout_s=FAILOVER_BOUND_S,
            )
            # Another server: the copy was loaded again there (before the feed went live; the
            # trio thread installs it a moment later).
            await wait_until(lambda: copy.counters.loads == 2)
            await trio.sleep(0.3)
            stop.set()
        assert wrong == []
        assert copy.counters.fallbacks == 0

        await trio.to_thread.run_sync(own_pair.promote_standby)
        code, err = await cli(
            "mailbox", "add", "new@example.com", "--path", "example.com/new/", "--dsn", dsn
        )
        assert (code, err) == (0, ""), err
        await client.wait_for("vmailbox", "new@example.com", Reply.ok("example.com/new/"))
        assert (await client.ask("vmailbox", "user@example.com")).status is Status.OK
        assert copy.counters.fallbacks == 0
        await client.stream.aclose()
