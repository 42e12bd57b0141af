"""maplookup.testing's clients and server process against real servers.

The clients are asked over loopback and unix sockets of the in-process server from
test_server.py (scripted answers), and of ``python -m maplookup serve`` on a real database.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from maplookup.config import HostPort, ListenSettings
from maplookup.maps import MapName
from maplookup.protocol import Reply, socketmap
from maplookup.testing import (
    Client,
    QueryError,
    TrioClient,
    accepts,
    free_port,
    start_server,
    stop_server,
)
from tests.server.test_server import running_server

FOUND = Reply.ok("found-value")


async def test_trio_client_socketmap_many_requests_and_raw_bytes() -> None:
    async with (
        running_server() as (_, bound, _answerer),
        await TrioClient.connect(bound[0].tcp_port()) as client,
    ):
        for _ in range(3):
            assert await client.ask("vmailbox", "known") == FOUND
            assert await client.ask("virtual", b"nope") == Reply.notfound()
            assert await client.ask("vmailbox", "temp") == Reply.temp("db down")
        # Pipelined requests sent as raw bytes, replies read one by one.
        await client.stream.send_all(socketmap.encode_request(b"vmailbox", b"known") * 2)
        assert [await client.receive(), await client.receive()] == [FOUND, FOUND]


async def test_trio_client_tcp_table_and_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "maplookup.sock"
    listen = ListenSettings(
        socketmap=[],
        socketmap_unix=path,
        tcp_table={MapName.VMAILBOX: HostPort(host="127.0.0.1", port=0)},
    )
    async with running_server(listen=listen) as (_, bound, _answerer):
        tcp = next(b for b in bound if b.protocol_name == "tcp_table")
        async with await TrioClient.connect(tcp.tcp_port(), protocol="tcp_table") as client:
            assert await client.ask("vmailbox", "known") == FOUND
            assert await client.ask("vmailbox", "nope") == Reply.notfound("not found")
            assert (await client.ask("vmailbox", "temp")).status.value == "TEMP"
        async with await TrioClient.connect_unix(path) as client:
            assert await client.ask("vmailbox", "known") == FOUND


async def test_trio_client_reports_a_close_and_a_malformed_reply() -> None:
    async with running_server() as (_, bound, _answerer):
        client = await TrioClient.connect(bound[0].tcp_port())
        await client.stream.send_all(b"3:abc;")  # a framing error: the server closes
        with pytest.raises(QueryError, match="closed the connection"):
            await client.receive()
        await client.aclose()

    async def garbage(stream: trio.SocketStream) -> None:
        await stream.send_all(b"2:NO,")
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, garbage, listeners)
        port = listeners[0].socket.getsockname()[1]
        async with await TrioClient.connect(port) as client:
            with pytest.raises(QueryError, match="malformed reply"):
                await client.ask("vmailbox", "x")
        nursery.cancel_scope.cancel()


async def test_blocking_client_socketmap_and_tcp_table() -> None:
    listen = ListenSettings(
        socketmap=[HostPort(host="127.0.0.1", port=0)],
        tcp_table={MapName.VIRTUAL: HostPort(host="127.0.0.1", port=0)},
    )
    async with running_server(listen=listen) as (_, bound, _answerer):
        ports = {b.protocol_name: b.tcp_port() for b in bound}

        def ask_both() -> list[Reply]:
            server = HostPort(host="127.0.0.1", port=ports["socketmap"])
            with Client.connect(server, timeout_s=5) as client:
                replies = [client.ask("vmailbox", "known"), client.ask("virtual", b"nope")]
            server = HostPort(host="127.0.0.1", port=ports["tcp_table"])
            with Client.connect(server, protocol="tcp_table", timeout_s=5) as client:
                replies += [client.ask("virtual", "known"), client.ask("virtual", "nope")]
            return replies

        replies = await trio.to_thread.run_sync(ask_both)
    assert replies == [FOUND, Reply.notfound(), FOUND, Reply.notfound("not found")]


def test_start_server_answers_then_stops(make_database: Callable[[], str], tmp_path: Path) -> None:
    dsn = make_database()
    server = start_server(dsn, tmp_path / "server.log", tcp_maps=("vmailbox",), metrics=True)
    try:
        assert server.metrics_port is not None
        assert accepts(server.metrics_port)
        local = HostPort(host="127.0.0.1", port=server.socketmap_port)
        with Client.connect(local, timeout_s=10) as client:
            assert client.ask("vmailbox", "nobody@example.com") == Reply.notfound()
        tcp = HostPort(host="127.0.0.1", port=server.tcp_ports["vmailbox"])
        with Client.connect(tcp, protocol="tcp_table", timeout_s=10) as client:
            assert client.ask("vmailbox", "nobody@example.com").status.value == "NOTFOUND"
    finally:
        assert stop_server(server) == 0, server.log_tail()
    assert not server.alive()
    assert not accepts(server.socketmap_port)


def test_nothing_listens_on_a_free_port() -> None:
    assert not accepts(free_port())
