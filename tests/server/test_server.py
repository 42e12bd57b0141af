"""The trio server over real loopback sockets, with a scripted answerer instead of a database.

Covers what the server itself owns: many requests per connection, a malformed request closing
only its own connection, the connection limit, timeouts, tcp_table listeners, unix sockets and
graceful drain.  Waits are on conditions with deadlines, never bare sleeps.  These prove the
real socket path (accept, the reply written straight to the descriptor, the fallback to
``send_all``); test_server_memory.py checks the timing of timeouts, drain and limits over
in-memory streams on a virtual clock.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from maplookup.config import HostPort, LimitSettings, ListenSettings
from maplookup.maps import MapName
from maplookup.protocol import Reply, Request, socketmap
from maplookup.serve.listeners import BoundListener, ListenError, bind_all, close_all
from maplookup.serve.server import Server
from maplookup.testing import TrioClient


class ScriptedAnswerer:
    """Answers from a dict; can hold answers until released, to test in-flight requests."""

    def __init__(self) -> None:
        self.answers = {b"known": Reply.ok("found-value"), b"temp": Reply.temp("db down")}
        self.release = trio.Event()
        self.hold_keys: set[bytes] = set()
        self.held = 0

    async def answer(self, request: Request) -> Reply:
        if request.key in self.hold_keys:
            self.held += 1
            await self.release.wait()
        if request.map_name not in (b"vmailbox", b"virtual"):
            return Reply.perm("unknown map")
        return self.answers.get(request.key, Reply.notfound())


@asynccontextmanager
async def running_server(
    limits: LimitSettings | None = None,
    listen: ListenSettings | None = None,
    answerer: ScriptedAnswerer | None = None,
) -> AsyncIterator[tuple[Server, list[BoundListener], ScriptedAnswerer]]:
    answerer = answerer or ScriptedAnswerer()
    listen = listen or ListenSettings(socketmap=[HostPort(host="127.0.0.1", port=0)])
    bound = await bind_all(listen)
    server = Server(answerer, limits or LimitSettings(), bound)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            yield server, bound, answerer
            server.drain()
    finally:
        await close_all(bound)


async def connect(bound: BoundListener) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", bound.tcp_port())


async def ask(stream: trio.abc.Stream, map_name: bytes, key: bytes) -> Reply:
    return await TrioClient(stream, timeout_s=5).ask(map_name.decode(), key)


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    # Polling is the simplest way to wait on server counters; the deadline bounds it.
    with trio.fail_after(timeout_s):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.005)


async def assert_closed_by_server(stream: trio.SocketStream) -> None:
    with trio.fail_after(5):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                return


async def test_many_requests_on_one_connection() -> None:
    async with running_server() as (_, bound, _answerer):
        stream = await connect(bound[0])
        for _ in range(50):
            assert await ask(stream, b"vmailbox", b"known") == Reply.ok("found-value")
            assert await ask(stream, b"vmailbox", b"other") == Reply.notfound()
            assert await ask(stream, b"virtual", b"temp") == Reply.temp("db down")
            assert (await ask(stream, b"nosuchmap", b"x")).status.value == "PERM"
        await stream.aclose()


async def test_two_requests_in_one_packet_get_two_replies() -> None:
    async with running_server() as (_, bound, _answerer):
        stream = await connect(bound[0])
        await stream.send_all(
            socketmap.encode_request(b"vmailbox", b"known")
            + socketmap.encode_request(b"vmailbox", b"nope")
        )
        client = TrioClient(stream, timeout_s=5)
        replies = [await client.receive(), await client.receive()]
        assert replies == [Reply.ok("found-value"), Reply.notfound()]
        await stream.aclose()


@pytest.mark.parametrize(
    "garbage",
    [b"xyz", b"5:abc", b"00:,", b"3:abc;", b"99999999999:", b"5:nospc,", b"-1:"],
)
async def test_malformed_request_closes_only_that_connection(garbage: bytes) -> None:
    async with running_server() as (server, bound, _answerer):
        good = await connect(bound[0])
        assert await ask(good, b"vmailbox", b"known") == Reply.ok("found-value")
        bad = await connect(bound[0])
        await bad.send_all(garbage)
        await bad.send_all(b",,,,")  # whatever follows, the connection is done
        await assert_closed_by_server(bad)
        assert server.counters.protocol_errors == 1
        # Everyone else is still served, on old and new connections.
        assert await ask(good, b"vmailbox", b"known") == Reply.ok("found-value")
        fresh = await connect(bound[0])
        assert await ask(fresh, b"vmailbox", b"known") == Reply.ok("found-value")
        for stream in (good, fresh, bad):
            await stream.aclose()


async def test_oversized_request_is_refused_before_it_is_read() -> None:
    limits = LimitSettings(max_request_bytes=1000)
    async with running_server(limits=limits) as (server, bound, _answerer):
        stream = await connect(bound[0])
        await stream.send_all(b"2000:vmailbox ")
        await assert_closed_by_server(stream)
        assert server.counters.protocol_errors == 1
        await stream.aclose()


async def test_connection_limit_refuses_extra_connections_politely() -> None:
    limits = LimitSettings(max_connections=3)
    async with running_server(limits=limits) as (server, bound, _answerer):
        kept = [await connect(bound[0]) for _ in range(3)]
        for stream in kept:
            assert await ask(stream, b"vmailbox", b"known") == Reply.ok("found-value")
        extra = await connect(bound[0])
        await assert_closed_by_server(extra)
        assert server.counters.connections_rejected == 1
        # Existing connections keep working, and a slot freed is a slot usable again.
        assert await ask(kept[0], b"vmailbox", b"known") == Reply.ok("found-value")
        await kept[0].aclose()
        await wait_until(lambda: server.counters.connections_open == 2)
        again = await connect(bound[0])
        assert await ask(again, b"vmailbox", b"known") == Reply.ok("found-value")
        for stream in [*kept[1:], again, extra]:
            await stream.aclose()


async def test_idle_connection_is_closed_after_idle_timeout() -> None:
    limits = LimitSettings(idle_timeout_s=0.2)
    async with running_server(limits=limits) as (server, bound, _answerer):
        stream = await connect(bound[0])
        assert await ask(stream, b"vmailbox", b"known") == Reply.ok("found-value")
        await assert_closed_by_server(stream)
        await wait_until(lambda: server.counters.connections_open == 0)
        await stream.aclose()


async def test_slow_request_is_cut_at_read_timeout() -> None:
    # Short: the request never completes, so nothing can be cut early by a slow machine.
    limits = LimitSettings(read_timeout_s=0.05, idle_timeout_s=60)
    async with running_server(limits=limits) as (server, bound, _answerer):
        stream = await connect(bound[0])
        await stream.send_all(b"20:vmailbox kn")  # a request started and never finished
        await assert_closed_by_server(stream)
        assert server.counters.read_timeouts == 1
        await stream.aclose()


async def test_client_that_stops_reading_is_cut_at_write_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The descriptor write's fallback: a partial write, the rest by send_all, timed out."""
    answerer = ScriptedAnswerer()
    answerer.answers[b"big"] = Reply.ok("x" * 99_000)  # just under Postfix's reply limit
    limits = LimitSettings(write_timeout_s=0.05, idle_timeout_s=60)
    caplog.set_level(logging.INFO, logger="maplookup.serve.server")
    async with running_server(limits=limits, answerer=answerer) as (server, bound, _answerer):
        stream = await connect(bound[0])
        # 200 replies, about 20 MB, more than both kernel buffers hold; none is read.
        await stream.send_all(socketmap.encode_request(b"vmailbox", b"big") * 200)
        await wait_until(lambda: server.counters.connections_open == 0)
        assert server.counters.requests < 200
        assert "reply not read within 0.05 s" in caplog.text
        await stream.aclose()


async def test_tcp_table_listener_serves_its_one_map() -> None:
    listen = ListenSettings(
        socketmap=[], tcp_table={MapName.VMAILBOX: HostPort(host="127.0.0.1", port=0)}
    )
    async with running_server(listen=listen) as (_, bound, _answerer):
        assert bound[0].protocol_name == "tcp_table"
        stream = await connect(bound[0])
        client = TrioClient(stream, "tcp_table", timeout_s=5)
        replies = [await client.ask("vmailbox", key) for key in (b"known", b"nope", b"temp")]
        assert [r.status.value for r in replies] == ["OK", "NOTFOUND", "TEMP"]
        assert replies[0].value == "found-value"
        await stream.aclose()


async def test_unix_socket_mode_and_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "maplookup.sock"
    path.touch()
    listen = ListenSettings(socketmap=[], socketmap_unix=path, socketmap_unix_mode=0o600)
    # A regular file at the path is not replaced.
    with pytest.raises(ListenError, match="not a socket"):
        await bind_all(listen)
    path.unlink()
    # A symlink at the path is never followed.
    os.symlink(tmp_path / "elsewhere", path)
    with pytest.raises(ListenError, match="symbolic link"):
        await bind_all(listen)
    path.unlink()
    async with running_server(listen=listen) as (_, _bound, _answerer):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        stream = await trio.open_unix_socket(str(path))
        assert await ask(stream, b"vmailbox", b"known") == Reply.ok("found-value")
        await stream.aclose()
        # A second server on the same path is refused while the first listens.
        with pytest.raises(ListenError, match="already listening"):
            await bind_all(listen)
    assert not path.exists()


async def test_drain_answers_in_flight_requests_then_stops() -> None:
    answerer = ScriptedAnswerer()
    answerer.hold_keys.add(b"slow")
    listen = ListenSettings(socketmap=[HostPort(host="127.0.0.1", port=0)])
    bound = await bind_all(listen)
    server = Server(answerer, LimitSettings(), bound)
    reply_holder: list[Reply] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            busy = await connect(bound[0])
            idle = await connect(bound[0])
            assert await ask(idle, b"vmailbox", b"known") == Reply.ok("found-value")

            async def slow_request() -> None:
                reply_holder.append(await ask(busy, b"vmailbox", b"slow"))

            nursery.start_soon(slow_request)
            await wait_until(lambda: answerer.held == 1)
            server.drain()
            # The idle connection is closed at once; new connections are not accepted.
            await assert_closed_by_server(idle)
            answerer.release.set()
        # server.run returned: the in-flight request got its answer first.
        assert reply_holder == [Reply.notfound()]
        await busy.aclose()
        await idle.aclose()
    finally:
        await close_all(bound)
