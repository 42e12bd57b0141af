"""The server's timeouts, drain and limits over in-memory streams, on trio's virtual clock.

Each test takes ``autojump_clock`` (pytest-trio): whenever every task waits, the clock jumps
to the next deadline, so a 60 s idle timeout takes no wall time and the moment a connection is
cut can be asserted to the tick of the server's timeout check, which a real clock on a loaded
machine could not do without flaking.  Connections come in through ``Server.handle_stream``,
the same admission and conversation code as accepted sockets minus the socket's direct write;
test_server.py keeps proving that real-socket path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from maplookup.config import LimitSettings
from maplookup.maps import MapName
from maplookup.protocol import Reply, socketmap
from maplookup.serve.server import Server
from maplookup.testing import QueryError, TrioClient
from tests.server.test_server import ScriptedAnswerer

FOUND = Reply.ok("found-value")
# The server checks timeouts every quarter of its shortest limit, at most once a second, so a
# limit holds to within this (for the limits used here, all 4 s or more).
CHECK_S = 1.0
# Virtual seconds: a client gives up long after any limit used here, so a wait that never ends
# fails the test instead of hanging it.
CLIENT_TIMEOUT_S = 600

StreamPair = Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]]


class Watched(trio.abc.Stream):
    """The server's end of a connection, noting when the server closes it.

    The moment of ``aclose`` is when a timeout, a drain or a refusal acted, read on the
    virtual clock; waiting on ``closed`` replaces polling the server's counters.
    """

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.closed = trio.Event()
        self.closed_at: float | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        if self.closed_at is None:
            self.closed_at = trio.current_time()
            self.closed.set()
        await self.inner.aclose()

    async def wait_closed(self) -> None:
        with trio.fail_after(CLIENT_TIMEOUT_S):
            await self.closed.wait()

    def open_for(self, since: float) -> float:
        """How long after ``since`` the server closed this connection."""
        assert self.closed_at is not None, "the server has not closed this connection"
        return self.closed_at - since


@asynccontextmanager
async def memory_server(
    limits: LimitSettings | None = None, answerer: ScriptedAnswerer | None = None
) -> AsyncIterator[tuple[Server, ScriptedAnswerer]]:
    """A running server with no listeners; connections are handed to it as streams."""
    answerer = answerer or ScriptedAnswerer()
    server = Server(answerer, limits or LimitSettings(), [])
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server, answerer
        server.drain()


async def connect(
    server: Server,
    pair: StreamPair = trio.testing.memory_stream_pair,
    map_name: MapName | None = None,
) -> tuple[TrioClient, Watched]:
    """A client connection and the server's (watched) end of it."""
    client_end, server_end = pair()
    watched = Watched(server_end)
    await server.handle_stream(watched, map_name=map_name, description="test stream")
    protocol = "socketmap" if map_name is None else "tcp_table"
    return TrioClient(client_end, protocol, timeout_s=CLIENT_TIMEOUT_S), watched


async def assert_closed_by_server(stream: trio.abc.Stream) -> None:
    """Read until the server's end is closed (end of stream), discarding any replies."""
    with trio.fail_after(CLIENT_TIMEOUT_S):
        while True:
            try:
                if not await stream.receive_some(65536):
                    return
            except trio.BrokenResourceError:
                return


async def test_requests_are_answered_over_both_kinds_of_memory_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_server() as (server, _answerer):
        # memory_stream_pair buffers without limit; lockstep_stream_pair makes every reply
        # wait for the client to read it, like a socket whose buffer is full.
        for pair in (trio.testing.memory_stream_pair, trio.testing.lockstep_stream_pair):
            client, _served = await connect(server, pair)
            for _ in range(3):
                assert await client.ask("vmailbox", "known") == FOUND
                assert await client.ask("virtual", "nope") == Reply.notfound()
            await client.stream.send_all(socketmap.encode_request(b"vmailbox", b"known") * 2)
            assert [await client.receive(), await client.receive()] == [FOUND, FOUND]
        assert server.counters.requests == 16


async def test_tcp_table_over_a_memory_stream(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_server() as (server, _answerer):
        client, _served = await connect(server, map_name=MapName.VMAILBOX)
        assert await client.ask("vmailbox", "known") == FOUND
        assert (await client.ask("vmailbox", "temp")).status.value == "TEMP"


async def test_idle_connection_is_closed_after_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = LimitSettings(idle_timeout_s=60)
    async with memory_server(limits) as (server, _answerer):
        client, served = await connect(server)
        # Idle but within the limit, then a request: the connection is kept.
        await trio.sleep(50)
        assert await client.ask("vmailbox", "known") == FOUND
        answered = trio.current_time()
        await assert_closed_by_server(client.stream)
        assert 60 < served.open_for(answered) <= 60 + CHECK_S
        assert server.counters.connections_open == 0
        assert server.counters.read_timeouts == 0


async def dribble(stream: trio.abc.Stream, data: bytes, interval_s: float) -> None:
    """Send ``data`` a byte at a time, ``interval_s`` apart, until done or cut off."""
    try:
        for i in range(len(data)):
            await stream.send_all(data[i : i + 1])
            await trio.sleep(interval_s)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def test_read_timeout_runs_from_the_first_byte_of_a_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = LimitSettings(read_timeout_s=10, idle_timeout_s=60)
    request = socketmap.encode_request(b"vmailbox", b"k" * 30)  # 44 bytes: 44 s at 1 byte/s
    async with memory_server(limits) as (server, _answerer):
        client, served = await connect(server)
        # 30 s idle first: the read timeout does not count it, the idle timeout allows it.
        await trio.sleep(30)
        first_byte = trio.current_time()
        await dribble(client.stream, request, interval_s=1)
        await served.wait_closed()
        # Each byte arriving does not restart the clock: cut 10 s after the first one.
        assert 10 < served.open_for(first_byte) <= 10 + CHECK_S
        assert server.counters.read_timeouts == 1
        assert server.counters.requests == 0


async def test_slow_request_within_read_timeout_is_answered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = LimitSettings(read_timeout_s=10, idle_timeout_s=60)
    request = socketmap.encode_request(b"vmailbox", b"known")  # 20 bytes
    async with memory_server(limits) as (server, _answerer):
        client, served = await connect(server)
        await dribble(client.stream, request, interval_s=0.4)  # 8 s in all
        assert await client.receive() == FOUND
        assert served.closed_at is None
        assert server.counters.read_timeouts == 0


async def test_client_that_stops_reading_is_cut_at_write_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = LimitSettings(write_timeout_s=10, idle_timeout_s=60)
    async with memory_server(limits) as (server, _answerer):
        client, served = await connect(server, trio.testing.lockstep_stream_pair)
        assert await client.ask("vmailbox", "known") == FOUND
        # A request sent, its reply never read: the server's send_all waits for the reader.
        await client.stream.send_all(socketmap.encode_request(b"vmailbox", b"known"))
        sent = trio.current_time()
        await served.wait_closed()
        assert 10 < served.open_for(sent) <= 10 + CHECK_S
        assert server.counters.connections_open == 0
        assert server.counters.read_timeouts == 0


async def test_drain_answers_in_flight_request_then_cuts_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    answerer = ScriptedAnswerer()
    answerer.hold_keys.add(b"slow")
    server = Server(answerer, LimitSettings(drain_timeout_s=10), [])
    replies: list[Reply] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        busy, busy_served = await connect(server)
        idle, idle_served = await connect(server)
        assert await idle.ask("vmailbox", "known") == FOUND

        async def slow_request() -> None:
            replies.append(await busy.ask("vmailbox", "slow"))

        nursery.start_soon(slow_request)
        await trio.testing.wait_all_tasks_blocked()
        assert answerer.held == 1
        drained = trio.current_time()
        server.drain()
        # The idle connection goes at once; a new one is closed unserved.
        await idle_served.wait_closed()
        assert idle_served.open_for(drained) == 0
        late, late_served = await connect(server)
        assert late_served.open_for(drained) == 0
        assert server.counters.connections_accepted == 2
        # The held answer comes 5 s into the 10 s drain: it is sent, then the connection
        # closes without waiting for another request.
        await trio.sleep(5)
        answerer.release.set()
        await busy_served.wait_closed()
        assert busy_served.open_for(drained) == 5
    # The nursery exited: server.run returned as soon as its last connection closed.
    assert trio.current_time() - drained == 5
    assert replies == [Reply.notfound()]
    with pytest.raises(QueryError):
        await late.receive()


async def test_drain_cuts_a_request_not_answered_within_drain_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    answerer = ScriptedAnswerer()
    answerer.hold_keys.add(b"slow")
    server = Server(answerer, LimitSettings(drain_timeout_s=10), [])
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        busy, busy_served = await connect(server)
        await busy.stream.send_all(socketmap.encode_request(b"vmailbox", b"slow"))
        await trio.testing.wait_all_tasks_blocked()
        drained = trio.current_time()
        server.drain()  # the answer is never released
    assert busy_served.open_for(drained) == 10
    assert trio.current_time() - drained == 10
    with pytest.raises(QueryError):
        await busy.receive()


async def test_connection_limit_closes_extra_connections_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_server(LimitSettings(max_connections=3)) as (server, _answerer):
        kept = [await connect(server) for _ in range(3)]
        for client, _served in kept:
            assert await client.ask("vmailbox", "known") == FOUND
        before = trio.current_time()
        extra, extra_served = await connect(server)
        # Closed by handle_stream itself, before any time passed, and counted.
        assert extra_served.open_for(before) == 0
        await assert_closed_by_server(extra.stream)
        assert server.counters.connections_rejected == 1
        assert server.counters.connections_accepted == 3
        # The others carry on; a slot freed is a slot usable again.
        assert await kept[0][0].ask("vmailbox", "known") == FOUND
        await kept[0][0].aclose()
        await kept[0][1].wait_closed()
        assert server.counters.connections_open == 2
        again, _again_served = await connect(server)
        assert await again.ask("vmailbox", "known") == FOUND
        assert server.counters.connections_rejected == 1


@pytest.mark.parametrize(
    "garbage",
    [b"xyz", b"5:abc", b"00:,", b"3:abc;", b"99999999999:", b"5:nospc,", b"-1:", b"20000:vm"],
)
async def test_protocol_error_closes_only_that_connection(
    garbage: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_server() as (server, _answerer):
        good, good_served = await connect(server)
        assert await good.ask("vmailbox", "known") == FOUND
        bad, bad_served = await connect(server)
        await bad.stream.send_all(garbage + b",,,,")
        sent = trio.current_time()
        await assert_closed_by_server(bad.stream)
        assert bad_served.open_for(sent) == 0  # at once, not at a timeout
        assert server.counters.protocol_errors == 1
        # Everyone else is still served, on old and new connections.
        assert await good.ask("vmailbox", "known") == FOUND
        fresh, _fresh_served = await connect(server)
        assert await fresh.ask("vmailbox", "known") == FOUND
        assert good_served.closed_at is None
