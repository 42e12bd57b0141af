"""Overload and hostile-but-well-formed clients against the trio server over real loopback sockets.

The server (``maplookup.server.Server``) runs in-process with a scripted answerer, so these
tests measure what the server itself owns: the connection limit, the read and write timeouts,
and what holding many connections costs.  Timeouts are set short (0.5 s) so the tests are fast;
waits are on conditions with deadlines.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from maplookup.config import HostPort, LimitSettings, ListenSettings
from maplookup.protocol import Reply, Request, socketmap
from maplookup.serve.listeners import bind_all, close_all
from maplookup.serve.server import Server
from maplookup.testing import TrioClient
from tests.hardening.support import (
    closed_by_peer,
    ensure_fd_limit,
    open_fds,
    rss_bytes,
    wait_until,
)

KNOWN = Reply.ok("found-value")
BIG_VALUE = "v" * 60_000  # under socketmap's 100,000-byte reply limit


class Answerer:
    """``known`` is found, ``big`` answers 60 kB, anything else is not found."""

    async def answer(self, request: Request) -> Reply:
        if request.key == b"known":
            return KNOWN
        if request.key == b"big":
            return Reply.ok(BIG_VALUE)
        return Reply.notfound()


@asynccontextmanager
async def serving(limits: LimitSettings) -> AsyncIterator[tuple[Server, int]]:
    bound = await bind_all(ListenSettings(socketmap=[HostPort(host="127.0.0.1", port=0)]))
    server = Server(Answerer(), limits, bound)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            yield server, bound[0].tcp_port()
            server.drain()
    finally:
        await close_all(bound)


async def test_connection_limit_refuses_new_connections_at_once_and_keeps_old_ones() -> None:
    limit, extra = 20, 50
    async with serving(LimitSettings(max_connections=limit)) as (server, port):
        kept = [await TrioClient.connect(port) for _ in range(limit)]
        for client in kept:
            assert await client.ask("vmailbox", "known") == KNOWN
        await wait_until(lambda: server.counters.connections_open == limit)

        close_times: list[float] = []

        async def refused() -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            start = trio.current_time()
            # Whatever the client sends, the server has already closed (or is closing) it.
            assert await closed_by_peer(stream, timeout_s=5)
            close_times.append(trio.current_time() - start)
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            for _ in range(extra):
                nursery.start_soon(refused)
        assert server.counters.connections_rejected == extra
        assert len(close_times) == extra
        # Every established connection still works, and a freed slot is usable again.
        for client in kept:
            assert await client.ask("vmailbox", "known") == KNOWN
        await kept.pop().aclose()
        await wait_until(lambda: server.counters.connections_open == limit - 1)
        again = await TrioClient.connect(port)
        assert await again.ask("vmailbox", "known") == KNOWN
        print(
            f"\nmax_connections={limit}: {extra} extra connections refused "
            f"(counted {server.counters.connections_rejected}), closed after "
            f"max {max(close_times) * 1000:.1f} ms; {limit} established kept answering"
        )
        for client in [*kept, again]:
            await client.aclose()


async def _cut_after(port: int, payload: bytes, interval_s: float, deadline_s: float) -> float:
    """Send ``payload`` one byte per ``interval_s``; seconds from the first byte to the close.

    TooSlowError if the server has not closed within ``deadline_s``.
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    closed_at: list[float] = []
    start = trio.current_time()

    async def dribble() -> None:
        for i in range(len(payload)):
            try:
                await stream.send_all(payload[i : i + 1])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            await trio.sleep(interval_s)  # the pace of the slow client, not a wait

    try:
        with trio.move_on_after(deadline_s):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dribble)
                if await closed_by_peer(stream, timeout_s=deadline_s):
                    closed_at.append(trio.current_time())
                nursery.cancel_scope.cancel()
    finally:
        await stream.aclose()
    if not closed_at:
        pytest.fail(
            f"the server still held the connection {deadline_s} s after the client's first "
            f"byte, sending one byte every {interval_s} s"
        )
    return closed_at[0] - start


async def test_client_sending_one_byte_per_second_is_cut_at_read_timeout() -> None:
    read_timeout_s = 0.5
    async with serving(LimitSettings(read_timeout_s=read_timeout_s)) as (server, port):
        request = socketmap.encode_request(b"vmailbox", b"known")
        took = await _cut_after(port, request, interval_s=1.0, deadline_s=5)
        assert server.counters.read_timeouts == 1
        assert read_timeout_s * 0.8 <= took <= read_timeout_s + 1.0
        control = await TrioClient.connect(port)
        assert await control.ask("vmailbox", "known") == KNOWN
        await control.aclose()
        print(f"\n1 byte/s client: cut {took:.2f} s after its first byte (read_timeout_s 0.5)")


async def test_client_dribbling_faster_than_the_read_timeout_is_still_cut() -> None:
    """A started request must complete within read_timeout_s (config.py, LimitSettings).

    One byte every 0.2 s never leaves a single read idle for 0.5 s, yet the request as a whole
    takes 20 s.  Fails while the timeout is applied to each receive rather than to the
    request: the server then holds the connection as long as the client keeps dribbling (a
    slowloris: max_connections such clients lock out Postfix).
    """
    read_timeout_s = 0.5
    async with serving(LimitSettings(read_timeout_s=read_timeout_s)) as (server, port):
        request = socketmap.encode_request(b"vmailbox", b"k" * 90)  # 100 bytes: 20 s of dribble
        took = await _cut_after(port, request, interval_s=0.2, deadline_s=read_timeout_s + 2.5)
        assert server.counters.read_timeouts == 1
        print(f"\ndribbling client: cut {took:.2f} s after its first byte (read_timeout_s 0.5)")


async def test_client_that_never_reads_is_cut_at_write_timeout_without_growing_memory() -> None:
    """Pipelined requests for 60 kB answers, never reading a reply.

    The kernel buffers fill, the server's send_all blocks, so it stops reading from that client
    (whose own sends then block too), and cuts it after write_timeout_s.  Memory is measured
    with tracemalloc (Python allocations of this whole process, server and client) from after
    the connection is set up until the close: the peak growth must stay small and must not
    depend on how long the client keeps trying to send.
    """
    write_timeout_s = 0.5
    limits = LimitSettings(write_timeout_s=write_timeout_s)
    block = socketmap.encode_request(b"vmailbox", b"big") * 4096  # ~64 kB of requests
    tracemalloc.start()
    try:
        async with serving(limits) as (server, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            control = await TrioClient.connect(port)
            try:
                assert await control.ask("vmailbox", "known") == KNOWN
                sent = 0
                last_send_done = trio.current_time()
                changes: list[tuple[float, int]] = [(trio.current_time(), 1)]
                tracemalloc.reset_peak()
                baseline = tracemalloc.get_traced_memory()[0]

                async def push() -> None:
                    nonlocal sent, last_send_done
                    while True:
                        try:
                            await stream.send_all(block)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            return
                        sent += len(block)
                        last_send_done = trio.current_time()

                async def watch_requests() -> None:
                    while True:
                        if server.counters.requests != changes[-1][1]:
                            changes.append((trio.current_time(), server.counters.requests))
                        await trio.sleep(0.005)  # sampling period of the observer

                with trio.fail_after(30):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(watch_requests)
                        await push()  # returns when the server has cut the connection
                        closed_at = trio.current_time()
                        nursery.cancel_scope.cancel()
                peak_growth = tracemalloc.get_traced_memory()[1] - baseline
                await wait_until(lambda: server.counters.connections_open == 1)
                # The other connection was never affected.
                assert await control.ask("vmailbox", "known") == KNOWN
            finally:
                await control.aclose()
                await stream.aclose()
    finally:
        tracemalloc.stop()
    not_read_for = closed_at - changes[-1][0]
    client_blocked_for = closed_at - last_send_done
    answered = changes[-1][1] - 1  # minus the control lookup
    print(
        f"\nnon-reading client: the kernel took {sent / 1024:.0f} KiB of pipelined requests, "
        f"{answered} were answered ({answered * 60_000 / 1024:.0f} KiB of replies, unread) before "
        f"send_all blocked; no request read for {not_read_for:.2f} s and the client's own "
        f"send blocked for {client_blocked_for:.2f} s, then cut (write_timeout_s "
        f"{write_timeout_s}); tracemalloc peak growth {peak_growth / 1024:.0f} KiB"
    )
    # The server stopped reading (so the client's sends blocked) and then cut the connection.
    assert not_read_for >= write_timeout_s * 0.8
    assert client_blocked_for >= write_timeout_s * 0.8
    assert peak_growth < 2 * 2**20


async def test_thousands_of_idle_connections_within_the_limit() -> None:
    """Hold 5,000 idle connections (10,000 descriptors: client and server share this process).

    If RLIMIT_NOFILE cannot be raised far enough, the count is scaled down to fit and the
    printed summary says so.
    """
    wanted = 5_000
    baseline = open_fds()
    limit = ensure_fd_limit(baseline + 2 * wanted + 500)
    count = min(wanted, (limit - baseline - 500) // 2)
    limits = LimitSettings(max_connections=count + 10)
    async with serving(limits) as (server, port):
        streams: list[trio.SocketStream] = []
        rss_before = rss_bytes()
        fds_before = open_fds()

        async def open_one() -> None:
            streams.append(await trio.open_tcp_stream("127.0.0.1", port))

        try:
            with trio.fail_after(60):
                for start in range(0, count, 250):  # batches below the listen backlog (512)
                    async with trio.open_nursery() as nursery:
                        for _ in range(min(250, count - start)):
                            nursery.start_soon(open_one)
                await wait_until(lambda: server.counters.connections_open == count, timeout_s=30)
            fds_held = open_fds() - fds_before
            rss_growth = rss_bytes() - rss_before
            assert server.counters.connections_rejected == 0
            assert 2 * count - 10 <= fds_held <= 2 * count + 50
            # A newcomer and a sample of the idle ones are all served.
            control = await TrioClient.connect(port)
            streams.append(control.stream)
            assert await control.ask("vmailbox", "known") == KNOWN
            for stream in streams[: count : max(1, count // 50)]:
                assert await TrioClient(stream).ask("vmailbox", "nothing") == Reply.notfound()
            print(
                f"\nidle connections: {count} held (asked for {wanted}; RLIMIT_NOFILE soft "
                f"{limit}), {fds_held} descriptors for both ends, RSS "
                f"+{rss_growth / 2**20:.1f} MiB ({rss_growth / count / 1024:.1f} KiB per "
                f"connection, both ends); control client answered"
            )
        finally:
            for stream in streams:
                await stream.aclose()
        await wait_until(lambda: server.counters.connections_open == 0, timeout_s=30)
    assert open_fds() <= baseline + 10
