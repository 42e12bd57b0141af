"""Host lists, failover and promotion against a real primary and a real standby (issue 15).

Two maplookup services run in-process, as two MX hosts would, each with a host list in its
DSN: host A prefers its local standby (``standby,primary?target_session_attrs=prefer-standby``),
host B lists the primary first.  They are asked over socketmap, as Postfix asks; the admin
CLI writes through a host list, as an admin would.  Every wait is on a condition with a
deadline.
"""

from __future__ import annotations

import re
import time
from urllib.parse import urlsplit

import pytest
import trio

from maplookup.cli.main import main
from maplookup.db.changes import FeedSettings
from maplookup.metrics import render
from maplookup.protocol import Reply, Status
from maplookup.serve import service as service_module
from maplookup.serve.service import Running
from maplookup.testing import free_port
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
USER = Reply.ok("example.com/user/")
# A failover through the list: the feed notices the lost connection at once (the server
# closed it), the dead primary refuses at once, the reconnect back-off starts at 0.1 s.
FAILOVER_BOUND_S = 10.0


def listed(*dsns: str, target: str | None = None) -> str:
    """One DSN naming the servers of ``dsns`` in order (same user and database)."""
    parts = [urlsplit(dsn) for dsn in dsns]
    hosts = ",".join(f"{p.hostname}:{p.port}" for p in parts)
    query = f"?target_session_attrs={target}" if target else ""
    return f"postgresql://{parts[0].username}@{hosts}{parts[0].path}{query}"


def dead(dsn: str) -> str:
    """``dsn`` with a loopback port nothing listens on."""
    parts = urlsplit(dsn)
    return f"postgresql://{parts.username}@127.0.0.1:{free_port()}{parts.path}"


def port_of(dsn: str) -> int:
    port = urlsplit(dsn).port
    assert port is not None
    return port


@pytest.fixture
def dsns(databases: tuple[str, str], pair: ReplicatedPair) -> tuple[str, str]:
    primary, _standby = databases
    run_sql(primary, *SCHEMA_DATA)
    pair.wait_until_replayed()
    return databases


async def live(service: Running) -> None:
    await wait_until(lambda: service.cache is not None and service.cache.live, timeout_s=20)


def feed_port(service: Running) -> int | None:
    feed = service.listener
    assert feed is not None
    server = feed.server
    return None if server is None else server.address.port


async def cli(*args: str) -> tuple[int, str]:
    """``maplookup ARGS`` in a thread (it runs asyncio.run); exit code and stderr."""
    import contextlib
    import io

    err = io.StringIO()

    def run() -> int:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                return main(list(args))
            except SystemExit as exc:
                return int(exc.code or 0)

    code = await trio.to_thread.run_sync(run)
    return code, err.getvalue()


async def test_the_feed_and_the_lookups_read_one_server_of_the_list(
    dsns: tuple[str, str],
) -> None:
    """A dead first host is passed over; prefer-standby reaches the standby, a plain list its
    first live server; the pool follows the feed; /healthz and /metrics say where."""
    primary, standby = dsns
    on_standby_dsn = listed(dead(standby), standby, primary, target="prefer-standby")
    on_primary_dsn = listed(dead(primary), primary, standby)
    async with (
        running(settings_for(on_standby_dsn), on_standby_dsn) as host_a,
        running(settings_for(on_primary_dsn), on_primary_dsn) as host_b,
    ):
        await live(host_a)
        await live(host_b)
        assert feed_port(host_a) == port_of(standby)
        assert feed_port(host_b) == port_of(primary)
        for host, expected in ((host_a, standby), (host_b, primary)):
            client = await Client.to(host)
            assert await client.ask("vmailbox", KEY) == USER  # a miss: through the pool
            lookups = host.service._database.pin.lookup_server
            assert lookups is not None
            assert lookups.address.port == port_of(expected)
            await client.stream.aclose()

        healthy, details = await host_a.service.health()
        assert healthy, details
        feed_details = details["change_feed"]
        assert isinstance(feed_details, dict)
        server = feed_details["server"]
        assert isinstance(server, dict)
        assert server["server"] == f"127.0.0.1:{port_of(standby)}"
        assert server["role"] == "standby"
        assert server["replay_lag_s"] is not None
        assert server["wal_receiver"] == "streaming"
        lookups_details = details["lookups_server"]
        assert isinstance(lookups_details, dict)
        assert lookups_details["server"] == f"127.0.0.1:{port_of(standby)}"
        assert lookups_details["role"] == "standby"
        assert feed_details["last_read_age_s"] < 5

        await wait_until(lambda: host_a.listener is not None and host_a.listener.counters.reads > 5)
        text = render(host_a.collector).decode()
        standby_at = f'server="127.0.0.1:{port_of(standby)}"'
        for connection in ("change_feed", "lookups"):
            labels = f'connection="{connection}",role="standby",{standby_at}'
            assert re.search(rf"maplookup_db_server\{{{labels}\}} 1", text), text
        assert "maplookup_db_replay_lag_seconds " in text
        assert "maplookup_db_replay_lag_bytes " in text
        assert "maplookup_change_feed_last_read_age_seconds " in text
        text_b = render(host_b.collector).decode()
        assert "maplookup_db_replay_lag_seconds" not in text_b  # a primary has no replay lag
        assert f'role="primary",server="127.0.0.1:{port_of(primary)}"' in text_b


async def test_the_cli_writes_to_the_primary_whatever_the_list_prefers(
    dsns: tuple[str, str], pair: ReplicatedPair
) -> None:
    primary, standby = dsns
    local_first = listed(standby, primary, target="prefer-standby")
    code, err = await cli("mailbox", "add", "cli@example.com", "--dsn", local_first)
    assert (code, err) == (0, "")
    await trio.to_thread.run_sync(pair.wait_until_replayed)
    # A read-only command reads the standby the list prefers: it has replayed the write.
    code, err = await cli("mailbox", "list", "--dsn", listed(standby, target="standby"))
    assert (code, err) == (0, "")
    # Only a standby: one clear line naming it, and nothing written.
    code, err = await cli("mailbox", "add", "no@example.com", "--dsn", listed(standby))
    assert code == 1
    assert err.count("\n") == 1, err
    assert err == (
        "maplookup: cannot connect to the database: no read-write server reachable "
        f"(127.0.0.1:{port_of(standby)} is read-only)\n"
    )
    nothing = dead(primary)
    code, err = await cli("domain", "remove", "example.com", "--dsn", listed(nothing, standby))
    assert code == 1
    assert f"127.0.0.1:{port_of(nothing)}: connection refused; " in err
    assert f"127.0.0.1:{port_of(standby)} is read-only" in err


async def test_the_feed_is_stuck_beyond_its_bound_and_recovers(
    dsns: tuple[str, str], pair: ReplicatedPair
) -> None:
    _primary, standby = dsns
    settings = settings_for(standby, change_feed_stuck_after_s=1.0)
    async with running(settings, standby) as host:
        await live(host)
        healthy, details = await host.service.health()
        assert healthy, details
        try:
            await trio.to_thread.run_sync(lambda: pair.standby.stop(mode="fast"))
            await trio.sleep(1.2)
            healthy, details = await host.service.health()
            assert not healthy
            problems = details["problems"]
            assert isinstance(problems, list)
            assert any(
                "change feed stuck" in p and "change_feed_stuck_after_s = 1.0 s" in p
                for p in problems
            ), problems
        finally:
            await trio.to_thread.run_sync(pair.standby.start)
        await live(host)
        healthy, details = await host.service.health()
        assert healthy, details


async def hammer(
    client: Client, asks: list[tuple[str, Reply]], wrong: list[str], stop: trio.Event
) -> None:
    """Ask until ``stop``; an answer other than the expected one or TEMP is wrong."""
    while not stop.is_set():
        for key, expected in asks:
            reply = await client.ask("vmailbox", key)
            if reply != expected and reply.status is not Status.TEMP:
                wrong.append(f"{key}: {reply}")
        await trio.sleep(0.005)


async def test_failover_and_promotion_without_restart(
    own_pair: ReplicatedPair, quick_listen: None
) -> None:
    """The primary stops: host A (its standby first) keeps answering hits and misses from the
    standby, never TEMP; host B (the primary first) fails over to the standby within a bound
    and answers misses again, never NOTFOUND for an address that exists.  The standby is
    promoted: the CLI's write through the host list reaches it, both hosts see it, the feeds
    get LISTEN back and their positions go on."""
    primary, standby = own_pair.new_database()
    run_sql(primary, *SCHEMA_DATA)
    run_sql(
        primary,
        "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
        " VALUES ('example.com', 'late', 'example.com/late/')",
    )
    own_pair.wait_until_replayed()
    a_dsn = listed(standby, primary, target="prefer-standby")
    b_dsn = listed(primary, standby)
    late = Reply.ok("example.com/late/")
    new = Reply.ok("example.com/new/")
    async with (
        running(settings_for(a_dsn), a_dsn) as host_a,
        running(settings_for(b_dsn), b_dsn) as host_b,
    ):
        await live(host_a)
        await live(host_b)
        assert feed_port(host_a) == port_of(standby)
        assert feed_port(host_b) == port_of(primary)
        a, b = await Client.to(host_a), await Client.to(host_b)
        for client in (a, b):  # cached: a hit and a negative hit
            assert await client.ask("vmailbox", KEY) == USER
            assert await client.ask("vmailbox", "new@example.com") == Reply.notfound()
        feed_a, feed_b = host_a.listener, host_b.listener
        assert feed_a is not None
        assert feed_b is not None
        position_before = feed_a.position or 0

        wrong: list[str] = []
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            # B during its failover: the existing addresses never NOTFOUND.
            asks = [(KEY, USER), ("late@example.com", late)]
            b_hammer = await Client.to(host_b)
            nursery.start_soon(hammer, b_hammer, asks, wrong, stop)
            await trio.to_thread.run_sync(lambda: own_pair.primary.stop(mode="fast"))
            stopped = time.monotonic()
            # A reads its standby: hits, and misses (never asked before) from the standby.
            for _ in range(20):
                assert await a.ask("vmailbox", KEY) == USER
                assert await a.ask("vmailbox", "late@example.com") == late
                assert await a.ask("vmailbox", "other@example.com") == Reply.notfound()
            assert host_a.cache is not None
            assert host_a.cache.live
            await wait_until(
                lambda: feed_port(host_b) == port_of(standby) and feed_b.live,
                timeout_s=FAILOVER_BOUND_S,
            )
            failover_s = time.monotonic() - stopped
            # B answers misses again, from the standby (never asked before on B).
            assert await b.ask("vmailbox", "other@example.com") == Reply.notfound()
            await trio.sleep(0.3)
            stop.set()
        await b_hammer.stream.aclose()
        assert wrong == []
        assert feed_b.counters.server_changes == 1
        print(f"\nhost B failed over to the standby in {failover_s:.2f} s")

        await trio.to_thread.run_sync(own_pair.promote_standby)
        code, err = await cli(
            "mailbox", "add", "new@example.com", "--path", "example.com/new/", "--dsn", b_dsn
        )
        assert (code, err) == (0, ""), err
        for client in (a, b):
            await client.wait_for("vmailbox", "new@example.com", new, timeout_s=10)
        await wait_until(lambda: feed_a.listening and feed_b.listening, timeout_s=10)
        assert (feed_a.position or 0) > position_before
        # The role is read every status interval (1 s): the promotion shows within it.
        await wait_until(lambda: feed_a.status is not None and not feed_a.status.in_recovery)
        healthy, details = await host_a.service.health()
        assert healthy, details
        feed_details = details["change_feed"]
        assert isinstance(feed_details, dict)
        server = feed_details["server"]
        assert isinstance(server, dict)
        assert server["role"] == "primary"  # the promoted standby
        for client in (a, b):
            await client.stream.aclose()


async def test_a_silent_host_costs_its_own_timeout_and_the_next_is_tried(
    dsns: tuple[str, str],
) -> None:
    """A host that accepts TCP and never answers (a hung machine) uses up its own connect
    timeout, and the walk goes on to the next host (asyncpg's own walk would spend the
    whole timeout on the first host and give up)."""
    import asyncio
    import socket

    from maplookup.db.servers import connect_listed

    _primary, standby = dsns
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # never accepted: the handshake completes, no byte ever comes
        port = silent.getsockname()[1]
        user = urlsplit(standby).username
        dsn = listed(f"postgresql://{user}@127.0.0.1:{port}{urlsplit(standby).path}", standby)

        async def walk() -> tuple[int | None, float]:
            start = time.monotonic()
            conn, reached = await connect_listed(dsn, timeout_s=0.5)
            await conn.close()
            return reached.address.port, time.monotonic() - start

        reached_port, took = await trio.to_thread.run_sync(lambda: asyncio.run(walk()))
    assert reached_port == port_of(standby)
    assert 0.5 <= took < 5


async def test_a_host_moves_back_to_its_preferred_server_when_it_returns(
    dsns: tuple[str, str], pair: ReplicatedPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its local standby restarted: the host reads the primary meanwhile (misses answered),
    and moves back to the standby once it is up, feed and lookups together."""
    primary, standby = dsns
    monkeypatch.setattr(
        service_module,
        "FeedSettings",
        lambda **kwargs: FeedSettings(**{**kwargs, "prefer_recheck_s": 0.5}),
    )
    host_dsn = listed(standby, primary, target="prefer-standby")
    async with running(settings_for(host_dsn), host_dsn) as host:
        await live(host)
        assert feed_port(host) == port_of(standby)
        client = await Client.to(host)
        try:
            await trio.to_thread.run_sync(lambda: pair.standby.stop(mode="fast"))
            await wait_until(lambda: feed_port(host) == port_of(primary), timeout_s=10)
            assert await client.ask("vmailbox", KEY) == USER
            assert await client.ask("vmailbox", "nobody@example.com") == Reply.notfound()
            lookups = host.service._database.pin.lookup_server
            assert lookups is not None
            assert lookups.address.port == port_of(primary)
        finally:
            await trio.to_thread.run_sync(pair.standby.start)
        await wait_until(lambda: feed_port(host) == port_of(standby), timeout_s=20)
        await live(host)
        assert await client.ask("vmailbox", "someone@example.com") == Reply.notfound()
        lookups = host.service._database.pin.lookup_server
        assert lookups is not None
        assert lookups.address.port == port_of(standby)
        assert host.listener is not None
        assert host.listener.counters.server_changes == 2
        await client.stream.aclose()
