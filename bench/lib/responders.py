"""Baseline servers that speak maplookup's protocols, each in its own process.

``trio-bare``
    trio, one task per connection, ``receive_some``/``send_all`` and maplookup's own sans-IO
    codec (``maplookup.protocol``), answering a constant ``OK`` for every request: the floor
    for this stack, i.e. what maplookup would cost if lookups were free.
``asyncio-bare``
    the same on asyncio + uvloop with ``asyncio.Protocol`` callbacks: the reference for what
    the framing costs without trio.
``asyncpg``
    asyncio + uvloop + an asyncpg pool (``min_size=0``, ``max_size`` as maplookup's default
    pool of 10), one query per request with the very statement maplookup sends on a cache miss
    (``maplookup.maps.query_for``, after ``fold_key``): the reference for the miss path.

All of them answer socketmap on ``--port`` and, with ``--tcp-port``, tcp_table (for the map
``--tcp-map``) too.  Each prints ``ready`` on stdout once it listens, stops on SIGTERM/SIGINT,
and stops by itself after ``--max-seconds``.

    .venv/bin/python -m bench.lib.responders trio-bare --port 9100
    .venv/bin/python -m bench.lib.responders asyncpg --port 9101 --dsn postgresql://...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

KINDS = ("trio-bare", "asyncio-bare", "asyncpg")
# A value shaped like a real vmailbox answer (domain/user/).
CONSTANT = "dom0.bench.example/user12345/"
POOL_MAX_CONNECTIONS = 10
RECEIVE_BYTES = 65_536


def _codec(tcp_map: bytes | None) -> Any:
    from maplookup.protocol import SocketmapProtocol, TcpTableProtocol

    return SocketmapProtocol() if tcp_map is None else TcpTableProtocol(tcp_map)


def _ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------
# trio


def run_trio(port: int, tcp_port: int | None, tcp_map: bytes, max_seconds: float) -> None:
    import trio

    from maplookup.protocol import CLOSED, NEED_DATA, Reply, Request

    answer = Reply.ok(CONSTANT)

    async def converse(stream: trio.SocketStream, map_name: bytes | None) -> None:
        protocol = _codec(map_name)
        try:
            while True:
                event = protocol.next_event()
                if event is NEED_DATA:
                    protocol.receive_data(await stream.receive_some(RECEIVE_BYTES))
                elif event is CLOSED:
                    return
                else:
                    assert isinstance(event, Request)
                    await stream.send_all(protocol.send(answer))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as exc:  # a protocol error closes this connection only
            print(f"[trio-bare] closing a connection: {exc!r}", file=sys.stderr)
        finally:
            await trio.aclose_forcefully(stream)

    async def main() -> None:
        with trio.move_on_after(max_seconds):
            async with trio.open_nursery() as nursery:
                listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
                nursery.start_soon(trio.serve_listeners, lambda s: converse(s, None), listeners)
                if tcp_port is not None:
                    tcp = await trio.open_tcp_listeners(tcp_port, host="127.0.0.1")
                    nursery.start_soon(trio.serve_listeners, lambda s: converse(s, tcp_map), tcp)
                _ready()
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        break

    trio.run(main)


# --------------------------------------------------------------------------
# asyncio + uvloop


class _AsyncioServer(asyncio.Protocol):
    """One connection; ``respond`` turns a Request into reply bytes (sync or as a task)."""

    def __init__(self, responder: Any, map_name: bytes | None) -> None:
        self.responder = responder
        self.protocol = _codec(map_name)
        self.transport: asyncio.Transport | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.protocol.receive_data(data)
            self.pump()
        except Exception as exc:
            print(f"[responder] closing a connection: {exc!r}", file=sys.stderr)
            assert self.transport is not None
            self.transport.close()

    def eof_received(self) -> bool | None:
        return None

    def pump(self) -> None:
        from maplookup.protocol import CLOSED, NEED_DATA

        while not self.busy:
            event = self.protocol.next_event()
            if event is NEED_DATA:
                return
            if event is CLOSED:
                assert self.transport is not None
                self.transport.close()
                return
            self.responder.respond(self, event)

    def reply(self, reply: Any) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(self.protocol.send(reply))


class _Constant:
    def __init__(self) -> None:
        from maplookup.protocol import Reply

        self.answer = Reply.ok(CONSTANT)

    def respond(self, conn: _AsyncioServer, _request: Any) -> None:
        conn.reply(self.answer)


class _Database:
    """One query per request, as maplookup's DatabaseSource runs it (no cache)."""

    def __init__(self, pool: Any) -> None:
        from maplookup.maps import LookupSettings

        self.pool = pool
        self.settings = LookupSettings()
        self.loop = asyncio.get_running_loop()

    def respond(self, conn: _AsyncioServer, request: Any) -> None:
        conn.busy = True
        self.loop.create_task(self._answer(conn, request))

    async def _answer(self, conn: _AsyncioServer, request: Any) -> None:
        from maplookup.maps import MAP_BY_WIRE_NAME, fold_key, query_for
        from maplookup.protocol import Reply

        map_name = MAP_BY_WIRE_NAME.get(request.map_name)
        try:
            if map_name is None:
                reply = Reply.perm("unknown map name")
            else:
                key = fold_key(map_name, request.key)
                if key is None:
                    reply = Reply.notfound()
                else:
                    query, args = query_for(map_name, key, self.settings)
                    value = await self.pool.fetchval(query, *args)
                    reply = Reply.ok(value) if value else Reply.notfound()
        except Exception as exc:
            reply = Reply.temp(f"database error: {exc!r}")
        conn.busy = False
        conn.reply(reply)
        conn.pump()


async def _no_reset(_connection: Any) -> None:
    pass


def run_asyncio(
    kind: str,
    port: int,
    tcp_port: int | None,
    tcp_map: bytes,
    max_seconds: float,
    dsn: str,
    pool_reset: bool = True,
) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pool = None
        if kind == "asyncpg":
            import asyncpg

            extra: dict[str, Any] = {}
            if not pool_reset:
                # asyncpg's default resets every connection on release with one more round
                # trip (SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL);
                # a reset coroutine of our own replaces that query.  Safe for stateless
                # one-statement lookups.
                extra["reset"] = _no_reset
            pool = await asyncpg.create_pool(
                dsn,
                min_size=0,
                max_size=POOL_MAX_CONNECTIONS,
                command_timeout=5.0,
                server_settings={"application_name": "maplookup-bench-asyncpg"},
                **extra,
            )
            responder: Any = _Database(pool)
        else:
            responder = _Constant()
        servers = [
            await loop.create_server(
                lambda: _AsyncioServer(responder, None), "127.0.0.1", port, backlog=1024
            )
        ]
        if tcp_port is not None:
            servers.append(
                await loop.create_server(
                    lambda: _AsyncioServer(responder, tcp_map),
                    "127.0.0.1",
                    tcp_port,
                    backlog=1024,
                )
            )
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        _ready()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_seconds):
                await stop.wait()
        for server in servers:
            server.close()
        if pool is not None:
            await pool.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.lib.responders", description=__doc__)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--port", type=int, required=True, help="socketmap port on 127.0.0.1")
    parser.add_argument("--tcp-port", type=int, help="also serve tcp_table on this port")
    parser.add_argument("--tcp-map", default="vmailbox", help="the tcp_table listener's map")
    parser.add_argument("--dsn", help="PostgreSQL DSN (asyncpg only)")
    parser.add_argument(
        "--no-pool-reset",
        action="store_true",
        help="asyncpg: skip the reset query asyncpg runs on every release (one round trip)",
    )
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.kind == "trio-bare":
        run_trio(ns.port, ns.tcp_port, ns.tcp_map.encode(), ns.max_seconds)
    else:
        if ns.kind == "asyncpg" and not ns.dsn:
            raise SystemExit("asyncpg needs --dsn")
        run_asyncio(
            ns.kind,
            ns.port,
            ns.tcp_port,
            ns.tcp_map.encode(),
            ns.max_seconds,
            ns.dsn,
            pool_reset=not ns.no_pool_reset,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
