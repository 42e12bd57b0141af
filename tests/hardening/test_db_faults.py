"""Database faults under steady lookup traffic: killed backends, a restart, a stalled network.

A caching maplookup service runs in-process (``maplookup.service.serve``) against a PostgreSQL
cluster of its own (fixed port, so its DSN survives a restart).  Four clients keep asking, each
over one persistent socketmap connection, for keys of three kinds:

* ``cached``: mailboxes and an alias looked up before the fault;
* ``existing``: mailboxes that exist but are looked up for the first time (per phase);
* ``missing``: addresses that do not exist.

Then one fault: (a) ``pg_terminate_backend`` of the pool's and the LISTEN connection, three
times; (b) PostgreSQL stopped and started again; (c) the network stalls: maplookup reaches
PostgreSQL through a TCP proxy in this test, which stops forwarding (connections stay open,
nothing moves), then resumes.

Invariants, whatever the phase: an existing key is never NOTFOUND, a cached key always answers
OK with its value, a missing key is never OK, every request is answered (TEMP is allowed).  Then
recovery without restarting maplookup: a key never looked up before answers OK from the
database, the LISTEN connection is back (cache live), and a change to a cached key is seen.
Answers are counted by kind and phase; the recovery time is measured and reported.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
import trio

from maplookup.config import Settings
from maplookup.config_load import load_settings
from maplookup.db import admin
from maplookup.embedded import EmbeddedPostgres
from maplookup.protocol import Reply, Status
from maplookup.serve.service import Running, serve
from maplookup.testing import TrioClient, free_port
from tests.hardening.support import wait_until

CACHED = [f"cached{i}@example.com" for i in range(20)]
PHASES = ("before", "fault", "recovery", "after")
EXISTING = {phase: [f"{phase}{i}@example.com" for i in range(300)] for phase in PHASES}
PROBES = [f"probe{i}@example.com" for i in range(5)]
CHANGE_KEY = "change@example.com"
ALIAS_KEY = "alias@example.com"
ALIAS_VALUE = "cached0@example.com"
QUERY_TIMEOUT_S = 1.0
RECOVERY_BOUND_S = 20.0
CLIENTS = 4
MAX_REQUESTS = 200_000  # a bound on the traffic, far above what the tests need


def path_of(key: str) -> str:
    local, _, domain = key.partition("@")
    return f"{domain}/{local}/"


# -- the cluster, for the whole module ---------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedPostgres]:
    state_dir = Path(tempfile.mkdtemp(prefix="maplookup-faults-"))
    state_dir.chmod(0o755)  # the cluster runs as postgres when we are root
    pg = EmbeddedPostgres(state_dir=state_dir, port=free_port(), fast_unsafe=True)
    pg.start()
    try:
        asyncio.run(_admin(pg.tcp_dsn, _init))
        yield pg
    finally:
        pg.stop(mode="immediate")
        shutil.rmtree(state_dir, ignore_errors=True)


async def _admin(dsn: str, action: object, *args: object) -> object:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await action(conn, *args)  # type: ignore[operator]
    finally:
        await conn.close()


async def _init(conn: asyncpg.Connection) -> None:
    await admin.init_schema(conn)


async def _reset_data(conn: asyncpg.Connection) -> None:
    keys = CACHED + [k for phase in PHASES for k in EXISTING[phase]] + PROBES + [CHANGE_KEY]
    async with conn.transaction():
        await conn.execute(
            "TRUNCATE maplookup.aliases, maplookup.mailboxes, maplookup.relay_recipients,"
            " maplookup.domains"
        )
        await conn.execute(
            "INSERT INTO maplookup.domains (name, kind) VALUES ('example.com', 'mailbox')"
        )
        await conn.executemany(
            "INSERT INTO maplookup.mailboxes (domain, local_part, path) VALUES ($1, $2, $3)",
            [("example.com", k.partition("@")[0], path_of(k)) for k in keys],
        )
        await conn.execute(
            "INSERT INTO maplookup.aliases (domain, local_part, targets)"
            " VALUES ('example.com', 'alias', $1)",
            [ALIAS_VALUE],
        )


async def _terminate_backends(conn: asyncpg.Connection) -> int:
    count: int = await conn.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name IN ('maplookup', 'maplookup-feed')"
    )
    return count


async def _terminate_listen_backend(conn: asyncpg.Connection) -> int:
    count: int = await conn.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = 'maplookup-feed'"
    )
    return count


async def _set_path(conn: asyncpg.Connection, key: str, path: str) -> None:
    await conn.execute(
        "UPDATE maplookup.mailboxes SET path = $2 WHERE local_part = $1",
        key.partition("@")[0],
        path,
    )


async def admin_sql(cluster: EmbeddedPostgres, action: object, *args: object) -> object:
    """Run an admin action on a direct connection, in a thread: the trio loop keeps serving."""
    dsn = cluster.tcp_dsn
    return await trio.to_thread.run_sync(lambda: asyncio.run(_admin(dsn, action, *args)))


# -- a TCP proxy that can stall ----------------------------------------------------------------


class StallingProxy:
    """Forwards loopback TCP to PostgreSQL; ``stall()`` stops moving bytes, ``resume()`` goes on.

    While stalled, connections stay open and new ones are accepted but not connected
    upstream: to maplookup the database is there and silent, as behind a broken network.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._flowing = trio.Event()
        self._flowing.set()
        self.connections = 0

    def stall(self) -> None:
        if self._flowing.is_set():
            self._flowing = trio.Event()

    def resume(self) -> None:
        self._flowing.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        try:
            await self._flowing.wait()
            upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        except OSError:
            await trio.aclose_forcefully(client)
            return
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
            nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, pair: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                await self._flowing.wait()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            pair.cancel()  # one side gone: end both (PostgreSQL never half-closes)


# -- traffic -----------------------------------------------------------------------------------


@dataclass
class Traffic:
    phase: str = "before"
    answers: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    slowest_s: dict[tuple[str, str], float] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    requests: int = 0
    stopped: bool = False

    def count(self, phase: str, kind: str | None = None) -> int:
        return sum(n for (p, k, _), n in self.answers.items() if p == phase and kind in (None, k))

    def table(self) -> str:
        """Answers by phase and key kind: counts per status word, and the slowest answer."""
        rows = []
        for phase in PHASES:
            cells = []
            for kind in ("cached", "existing", "missing"):
                by = {s: n for (p, k, s), n in self.answers.items() if p == phase and k == kind}
                counts = "/".join(f"{s}:{n}" for s, n in sorted(by.items())) or "-"
                cells.append(f"{kind} {counts} (max {self.slowest_s.get((phase, kind), 0):.2f}s)")
            rows.append(f"  {phase:8} " + "  ".join(cells))
        return "\n".join(rows)


def _check(kind: str, key: str, reply: Reply, traffic: Traffic) -> None:
    expected_value = ALIAS_VALUE if key == ALIAS_KEY else path_of(key)
    ok = reply.status is Status.OK
    if kind == "cached" and reply != Reply.ok(expected_value):
        traffic.violations.append(f"{traffic.phase}: cached {key} answered {reply}")
    elif kind == "existing" and not (reply == Reply.ok(expected_value) or _temp(reply)):
        traffic.violations.append(f"{traffic.phase}: existing {key} answered {reply}")
    elif kind == "missing" and (ok or not (_temp(reply) or reply.status is Status.NOTFOUND)):
        traffic.violations.append(f"{traffic.phase}: missing {key} answered {reply}")


def _temp(reply: Reply) -> bool:
    return reply.status is Status.TEMP


async def _client(port: int, number: int, traffic: Traffic) -> None:
    client = await TrioClient.connect(port)
    i = number
    try:
        while not traffic.stopped and traffic.requests < MAX_REQUESTS:
            i += CLIENTS
            phase = traffic.phase
            kind = ("cached", "existing", "cached", "missing")[i % 4]
            if kind == "cached":
                pool = [*CACHED, ALIAS_KEY]
                key = pool[i % len(pool)]
            elif kind == "existing":
                key = EXISTING[phase][i // 4 % len(EXISTING[phase])]
            else:
                key = f"nobody{i % 50}@example.com"
            map_name = "virtual" if key == ALIAS_KEY else "vmailbox"
            start = trio.current_time()
            try:
                reply = await client.ask(map_name, key, timeout_s=10)
            except trio.TooSlowError:
                traffic.violations.append(f"{phase}: {kind} {key}: no answer within 10 s")
                return
            took = trio.current_time() - start
            traffic.requests += 1
            traffic.answers[phase, kind, reply.status.value] += 1
            traffic.slowest_s[phase, kind] = max(traffic.slowest_s.get((phase, kind), 0.0), took)
            _check(kind, key, reply, traffic)
            await trio.sleep(0.002)  # steady pace, not a wait for anything
    finally:
        await client.aclose()


def _settings(dsn: str, change_feed_poll_interval_s: float = 0.2, mode: str = "lru") -> Settings:
    return load_settings(
        overrides={
            "listen": {"socketmap": ["127.0.0.1:0"]},
            "database": {
                "dsn": dsn,
                "connect_timeout_s": 1.0,
                "query_timeout_s": QUERY_TIMEOUT_S,
                "pool_max_connections": 4,
            },
            "cache": {"change_feed_poll_interval_s": change_feed_poll_interval_s, "mode": mode},
        },
        environ={},
    )


@asynccontextmanager
async def traffic_against(
    cluster: EmbeddedPostgres, service_dsn: str
) -> AsyncIterator[tuple[Running, Traffic, TrioClient]]:
    await admin_sql(cluster, _reset_data)
    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(serve, _settings(service_dsn), service_dsn)
        cache = running.cache
        assert cache is not None
        await wait_until(lambda: cache.live)
        port = running.listeners[0].tcp_port()
        probe = await TrioClient.connect(port)
        # Warm: the cached keys (and the key changed during recovery) are in the cache.
        for key in [*CACHED, CHANGE_KEY]:
            assert await probe.ask("vmailbox", key) == Reply.ok(path_of(key))
        assert await probe.ask("virtual", ALIAS_KEY) == Reply.ok(ALIAS_VALUE)
        traffic = Traffic()
        try:
            async with trio.open_nursery() as clients:
                for number in range(CLIENTS):
                    clients.start_soon(_client, port, number, traffic)
                await wait_until(lambda: traffic.count("before") >= 400)
                yield running, traffic, probe
                traffic.phase = "after"
                await wait_until(lambda: traffic.count("after") >= 400)
                traffic.stopped = True
        finally:
            await probe.aclose()
            running.server.drain()


async def _recover(
    cluster: EmbeddedPostgres, running: Running, traffic: Traffic, probe: TrioClient
) -> dict[str, float]:
    """From the heal on: time until fresh keys, notifications and changes all work again."""
    cache = running.cache
    assert cache is not None
    traffic.phase = "recovery"
    healed = trio.current_time()
    marks: dict[str, float] = {}
    fresh = PROBES[0]
    with trio.fail_after(RECOVERY_BOUND_S):
        while await probe.ask("vmailbox", fresh) != Reply.ok(path_of(fresh)):  # noqa: ASYNC110
            await trio.sleep(0.01)
        marks["fresh key answered from the database"] = trio.current_time() - healed
        await wait_until(lambda: cache.live, timeout_s=RECOVERY_BOUND_S)
        marks["LISTEN back (cache live)"] = trio.current_time() - healed
        # Cached again after the reconnect flush, served from the cache, then changed: only a
        # notification can make the new value visible (the TTL is 600 s).
        assert await probe.ask("vmailbox", CHANGE_KEY) == Reply.ok(path_of(CHANGE_KEY))
        hits = cache.counters.hits
        assert await probe.ask("vmailbox", CHANGE_KEY) == Reply.ok(path_of(CHANGE_KEY))
        assert cache.counters.hits == hits + 1
        await admin_sql(cluster, _set_path, CHANGE_KEY, "example.com/changed/")
        while await probe.ask("vmailbox", CHANGE_KEY) != Reply.ok("example.com/changed/"):  # noqa: ASYNC110
            await trio.sleep(0.005)
        marks["change seen through a notification"] = trio.current_time() - healed
    traffic.phase = "after"
    return marks


def _report(name: str, faults: str, traffic: Traffic, marks: dict[str, float]) -> None:
    recovery = ", ".join(f"{what} {s:.2f} s" for what, s in marks.items())
    print(
        f"\n{name}: {faults}; {traffic.requests} answers in all:\n{traffic.table()}\n"
        f"  recovery after the heal: {recovery}"
    )
    assert not traffic.violations, traffic.violations[:20]
    assert traffic.count("fault") + traffic.count("recovery") > 0


async def test_killed_backends(cluster: EmbeddedPostgres) -> None:
    """Five rounds of pg_terminate_backend on the pool's and the LISTEN connections.

    Fails (most runs: whether a lookup meets a terminated pooled connection is a race) while
    asyncpg's InternalClientError ("cannot switch to state 12; another operation (2) is in
    progress", raised for a query on a pooled connection whose backend was just terminated)
    escapes maplookup/db/database.py's error mapping: it is not a PostgresError, InterfaceError or
    OSError, so CachingSource does not fall back to the cached answer and Lookup answers
    "TEMP internal error in maplookup" (with a traceback in the log) for a cached key.
    """
    rounds = 5
    async with traffic_against(cluster, cluster.tcp_dsn) as (running, traffic, probe):
        cache, listener = running.cache, running.listener
        assert cache is not None
        assert listener is not None
        killed = []
        traffic.phase = "fault"
        for round_ in range(rounds):
            # The LISTEN connection of this round is in place before it is killed.
            await wait_until(lambda n=round_: listener.counters.connects > n)
            killed.append(int(await admin_sql(cluster, _terminate_backends)))  # type: ignore[call-overload]
            await wait_until(lambda n=round_: listener.counters.connection_losses > n)
        await wait_until(lambda: listener.counters.connects > rounds)
        marks = await _recover(cluster, running, traffic, probe)
        losses = listener.counters.connection_losses
    _report(
        "killed backends",
        f"{rounds} rounds of pg_terminate_backend, {sum(killed)} backends killed {killed}, "
        f"{losses} LISTEN losses",
        traffic,
        marks,
    )


@pytest.mark.parametrize("mode", ["lru", "complete"])
async def test_killing_the_listen_connection_never_stops_the_service(
    cluster: EmbeddedPostgres, mode: str
) -> None:
    """The change feed's connection killed 60 times while it reads the log every 5 ms (in
    complete mode the copy follows on that connection: every kill may land in its reads, and
    every answer comes from the copy, never TEMP).

    Failed while maplookup/db/changes.py caught only OSError, PostgresError, InterfaceError and
    TimeoutError around its keepalive query (now: its read of the change log): on a connection
    whose backend was just terminated asyncpg can raise InternalClientError ("cannot switch to
    state 12; another operation (2) is in progress"), which escaped the reconnect loop, ended
    ``run`` and with it the whole service nursery: ``maplookup serve`` exited.  The default
    poll interval (0.2 s) makes the race rarer, not impossible.
    """
    await admin_sql(cluster, _reset_data)
    settings = _settings(cluster.tcp_dsn, change_feed_poll_interval_s=0.005, mode=mode)
    kills = 60
    done = 0
    stopped = trio.Event()
    crash: list[Exception] = []

    async def service(*, task_status: trio.TaskStatus[Running]) -> None:
        # The service's own exception is kept here rather than cancelled away: a client noticing
        # the crash first must not hide its cause.
        try:
            await serve(settings, cluster.tcp_dsn, task_status=task_status)
        except Exception as exc:
            crash.append(exc)
        finally:
            stopped.set()

    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(service)
        listener = running.listener
        assert listener is not None
        client = await TrioClient.connect(running.listeners[0].tcp_port())
        try:
            for i in range(kills):
                await wait_until(lambda n=i: listener.counters.connects > n or stopped.is_set())
                if stopped.is_set():
                    break
                await admin_sql(cluster, _terminate_listen_backend)
                done += 1
                reply = await client.ask("vmailbox", CACHED[0])
                allowed = (Status.OK,) if mode == "complete" else (Status.OK, Status.TEMP)
                assert reply.status in allowed, reply
        except (trio.BrokenResourceError, AssertionError):
            # The server went away under the client: wait for the service to finish crashing.
            with trio.move_on_after(10):
                await stopped.wait()
            if not crash:
                raise
        finally:
            await client.aclose()
            running.server.drain()
    if crash:
        causes = sorted({f"{type(e).__name__}: {e}" for e in _leaves(crash[0])})
        pytest.fail(
            f"the service stopped after {done} of {kills} kills of its LISTEN connection; "
            f"exceptions: {causes}"
        )
    print(f"\nLISTEN connection killed {done} times with a 5 ms keepalive; service kept running")


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


async def test_postgres_stopped_and_restarted(cluster: EmbeddedPostgres) -> None:
    async with traffic_against(cluster, cluster.tcp_dsn) as (running, traffic, probe):
        cache = running.cache
        assert cache is not None
        traffic.phase = "fault"
        began = trio.current_time()
        await trio.to_thread.run_sync(lambda: cluster.stop(mode="fast"))
        stopped = trio.current_time()
        await wait_until(lambda: not cache.live)
        await wait_until(lambda: traffic.count("fault", "existing") >= 200)
        restarting = trio.current_time()
        await trio.to_thread.run_sync(cluster.start)
        started = trio.current_time()
        marks = await _recover(cluster, running, traffic, probe)
    _report(
        "PostgreSQL restart",
        f"pg_ctl stop -m fast took {stopped - began:.2f} s, down {restarting - stopped:.2f} s, "
        f"pg_ctl start took {started - restarting:.2f} s (recovery counted from its return)",
        traffic,
        marks,
    )


async def test_stalled_network(cluster: EmbeddedPostgres) -> None:
    async with trio.open_nursery() as nursery:
        proxy = StallingProxy(cluster.port)
        await nursery.start(proxy.run)
        dsn = f"postgresql://{cluster.superuser}@127.0.0.1:{proxy.port}/{cluster.database}"
        async with traffic_against(cluster, dsn) as (running, traffic, probe):
            cache = running.cache
            assert cache is not None
            traffic.phase = "fault"
            proxy.stall()
            stalled = trio.current_time()
            await wait_until(lambda: not cache.live)
            await wait_until(lambda: traffic.count("fault", "existing") >= 8, timeout_s=30)
            stall_s = trio.current_time() - stalled
            proxy.resume()
            marks = await _recover(cluster, running, traffic, probe)
        nursery.cancel_scope.cancel()
    _report(
        "stalled network",
        f"proxy stopped forwarding for {stall_s:.2f} s (query_timeout_s {QUERY_TIMEOUT_S})",
        traffic,
        marks,
    )


async def test_stalled_network_changes_nothing_for_the_complete_copy(
    cluster: EmbeddedPostgres,
) -> None:
    """cache.mode = "complete" through a network that stops forwarding (no RST, no FIN: the
    worst outage to notice): every key, existing or not, keeps its answer from the copy, none
    is TEMP, the copy's age grows past the feed's query timeout, and once the network is back
    the feed follows on from the copy's position and a change is seen."""
    await admin_sql(cluster, _reset_data)
    async with trio.open_nursery() as nursery:
        proxy = StallingProxy(cluster.port)
        await nursery.start(proxy.run)
        dsn = f"postgresql://{cluster.superuser}@127.0.0.1:{proxy.port}/{cluster.database}"
        settings = _settings(dsn, mode="complete")
        running: Running = await nursery.start(serve, settings, dsn)
        copy, feed = running.copy, running.listener
        assert copy is not None
        assert feed is not None
        client = await TrioClient.connect(running.listeners[0].tcp_port())
        asks = [
            *((key, Reply.ok(path_of(key))) for key in EXISTING["fault"][:50]),
            *((f"unknown{i}@example.com", Reply.notfound()) for i in range(50)),
            ("x@unhosted.test", Reply.notfound()),
        ]
        proxy.stall()
        stalled = trio.current_time()
        wrong: list[str] = []
        answers = 0
        while trio.current_time() - stalled < QUERY_TIMEOUT_S * 3:
            for key, expected in asks:
                reply = await client.ask("vmailbox", key)
                answers += 1
                if reply != expected:
                    wrong.append(f"{key}: {reply}")
            await trio.sleep(0.01)
        await wait_until(lambda: not feed.live)
        age = copy.age()
        assert age is not None
        assert age > QUERY_TIMEOUT_S
        assert wrong == []
        assert copy.counters.fallbacks == 0
        proxy.resume()
        await wait_until(lambda: feed.live and (copy.age() or 0) < 1.0, timeout_s=30)
        assert copy.counters.loads == 1  # the same server: followed on, not reloaded
        await admin_sql(cluster, _set_path, CHANGE_KEY, "example.com/changed/")
        with trio.fail_after(5):
            while await client.ask("vmailbox", CHANGE_KEY) != Reply.ok("example.com/changed/"):  # noqa: ASYNC110
                await trio.sleep(0.005)
        await client.aclose()
        running.server.drain()
        nursery.cancel_scope.cancel()
    print(f"\ncomplete copy through a stalled network: {answers} answers, 0 TEMP, 0 wrong")
