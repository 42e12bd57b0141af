"""Helpers for testing and benchmarking maplookup: lookup clients and a server process.

Like :mod:`trio.testing`, this ships with the package so that the test suite (``tests/``),
the benchmarks (``bench/``) and anyone checking a deployment share one implementation
instead of hand-written copies of the wire framing.  It needs neither pytest nor any
other test-only dependency.

Clients, one request at a time on a persistent connection as a Postfix process holds it,
both built on the sans-IO codecs of :mod:`maplookup.protocol`:

* :class:`Client` -- blocking sockets (an alias of :class:`maplookup.client.Connection`,
  the client ``maplookup query`` uses);
* :class:`TrioClient` -- a trio stream.

Both speak socketmap (``ask(map_name, key)``) or tcp_table (the map name is not sent: the
listener's port chooses the map), and raise :class:`QueryError` when the server closes the
connection or sends something that is not a reply.

The server process: :func:`start_server` runs ``python -m maplookup serve`` and returns a
:class:`RunningServer` once every port accepts connections; :func:`stop_server` ends it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import trio

from maplookup.client import (
    Connection,
    QueryError,
    WireProtocol,
    encode_request,
    next_reply,
    reply_parser,
)
from maplookup.protocol import Reply

__all__ = [
    "Client",
    "QueryError",
    "RunningServer",
    "ServerNotReady",
    "TrioClient",
    "WireProtocol",
    "accepts",
    "free_port",
    "start_server",
    "stop_server",
    "wait_for_port",
]

#: How long a test client waits for one reply by default.
ASK_TIMEOUT_S = 10.0

Client = Connection
"""The blocking client: ``Client.connect(HostPort(...))``, then ``ask(map_name, key)``."""


class TrioClient:
    """One persistent socketmap or tcp_table connection over a trio stream.

    ``stream`` stays reachable for tests that also send raw bytes on the connection.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        protocol: WireProtocol = "socketmap",
        timeout_s: float = ASK_TIMEOUT_S,
    ) -> None:
        self.stream = stream
        self.protocol: WireProtocol = protocol
        self.timeout_s = timeout_s
        self._parser = reply_parser(protocol)

    @classmethod
    async def connect(
        cls,
        port: int,
        host: str = "127.0.0.1",
        *,
        protocol: WireProtocol = "socketmap",
        timeout_s: float = ASK_TIMEOUT_S,
    ) -> TrioClient:
        return cls(await trio.open_tcp_stream(host, port), protocol, timeout_s)

    @classmethod
    async def connect_unix(
        cls, path: str | os.PathLike[str], *, timeout_s: float = ASK_TIMEOUT_S
    ) -> TrioClient:
        """A socketmap connection to a unix-domain socket."""
        return cls(await trio.open_unix_socket(os.fspath(path)), "socketmap", timeout_s)

    async def ask(self, map_name: str, key: str | bytes, timeout_s: float | None = None) -> Reply:
        """Look ``key`` up in ``map_name``; trio.TooSlowError after ``timeout_s``."""
        return await self.exchange(encode_request(self.protocol, map_name, key), timeout_s)

    async def exchange(self, request: bytes, timeout_s: float | None = None) -> Reply:
        """Send one already encoded request and return its reply."""
        with trio.fail_after(self.timeout_s if timeout_s is None else timeout_s):
            await self.stream.send_all(request)
            return await self.receive()

    async def receive(self, timeout_s: float | None = None) -> Reply:
        """The next reply on the connection (after requests sent as raw bytes on ``stream``)."""
        with trio.fail_after(self.timeout_s if timeout_s is None else timeout_s):
            while (reply := next_reply(self._parser)) is None:
                data = await self.stream.receive_some(65_536)
                if not data:
                    raise QueryError("the server closed the connection without a reply")
                self._parser.receive_data(bytes(data))
        return reply

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self) -> TrioClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# -- the server as a process -------------------------------------------------------------------


class ServerNotReady(RuntimeError):
    """The server process exited, or did not listen in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def accepts(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    """True if something accepts TCP connections on ``host:port`` now."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_for_port(
    port: int, process: subprocess.Popen[bytes] | None = None, timeout_s: float = 20
) -> None:
    """Return once 127.0.0.1:``port`` accepts; ServerNotReady if ``process`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerNotReady(f"{process.args!r} exited early with {process.returncode}")
        if accepts(port):
            return
        time.sleep(0.05)
    raise ServerNotReady(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


@dataclass
class RunningServer:
    """A ``maplookup serve`` process and the ports it listens on."""

    socketmap_port: int
    tcp_ports: dict[str, int]
    process: subprocess.Popen[bytes]
    metrics_port: int | None = None
    log_path: Path | None = field(default=None, compare=False)

    def socketmap(self, map_name: str) -> str:
        """The Postfix table name of ``map_name`` over socketmap."""
        return f"socketmap:inet:127.0.0.1:{self.socketmap_port}:{map_name}"

    def tcp(self, map_name: str) -> str:
        """The Postfix table name of ``map_name``'s tcp_table listener."""
        return f"tcp:127.0.0.1:{self.tcp_ports[map_name]}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log ("" without one)."""
        if self.log_path is None:
            return ""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_server(
    dsn: str,
    log_path: Path,
    socketmap_port: int | None = None,
    tcp_maps: tuple[str, ...] = ("vmailbox", "virtual"),
    extra_args: tuple[str, ...] = (),
    *,
    metrics: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 20,
) -> RunningServer:
    """``python -m maplookup serve`` as a subprocess; returns once every port accepts.

    It listens for socketmap on ``socketmap_port`` (a free one by default), for tcp_table
    on a free port per map in ``tcp_maps``, and with ``metrics`` on a free metrics port.
    ``extra_args`` go on the command line as they are (``--default-uid 1500``, ...); output
    is appended to ``log_path``.
    """
    socketmap_port = socketmap_port or free_port()
    tcp_ports = {name: free_port() for name in tcp_maps}
    metrics_port = free_port() if metrics else None
    args = [
        sys.executable,
        "-m",
        "maplookup",
        "serve",
        "--dsn",
        dsn,
        "--socketmap",
        f"127.0.0.1:{socketmap_port}",
    ]
    for map_name, port in tcp_ports.items():
        args += ["--tcp-table", f"{map_name}=127.0.0.1:{port}"]
    if metrics_port is not None:
        args += ["--metrics", f"127.0.0.1:{metrics_port}"]
    args += extra_args
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
        )
    server = RunningServer(socketmap_port, tcp_ports, process, metrics_port, log_path)
    try:
        ports = [socketmap_port, *tcp_ports.values()]
        if metrics_port is not None:
            ports.append(metrics_port)
        for port in ports:
            wait_for_port(port, process, timeout_s)
    except ServerNotReady as exc:
        stop_server(server)
        raise ServerNotReady(f"{exc}:\n{server.log_tail()}") from exc
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: RunningServer, timeout_s: float = 20) -> int:
    """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit status."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode
