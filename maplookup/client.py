"""A minimal blocking client: ask as Postfix asks, show what it gets.

``maplookup query`` uses it for one question and one answer; :class:`Connection` keeps the
connection open for many, as a Postfix process does (tests and benchmarks, through
:mod:`maplookup.testing`). Blocking sockets are right here: one request at a time.
"""

from __future__ import annotations

import socket
from pathlib import Path
from types import TracebackType
from typing import Literal

from maplookup.config import HostPort
from maplookup.protocol import (
    NEED_DATA,
    RemoteProtocolError,
    Reply,
    SocketmapReplyParser,
    TcpTableReplyParser,
    socketmap,
    tcptable,
)

# Postfix's own client timeout for socketmap (src/global/dict_sockmap.c).
CLIENT_TIMEOUT_S = 100.0

WireProtocol = Literal["socketmap", "tcp_table"]


class QueryError(Exception):
    """The server could not be asked or gave a reply that is not a reply."""


def encode_request(protocol: WireProtocol, map_name: str, key: str | bytes) -> bytes:
    """One request on the wire; tcp_table carries no map name (its listener has one map)."""
    raw = key.encode() if isinstance(key, str) else key
    if protocol == "socketmap":
        return socketmap.encode_request(map_name.encode(), raw)
    return tcptable.encode_request(raw)


def reply_parser(protocol: WireProtocol) -> SocketmapReplyParser | TcpTableReplyParser:
    """The sans-IO decoder for a stream of replies in ``protocol``."""
    return SocketmapReplyParser() if protocol == "socketmap" else TcpTableReplyParser()


def next_reply(parser: SocketmapReplyParser | TcpTableReplyParser) -> Reply | None:
    """The next complete reply buffered in ``parser``, or None if it needs more bytes.

    Raises QueryError for a malformed reply, or for end of stream before a reply.
    """
    try:
        event = parser.next_event()
    except RemoteProtocolError as exc:
        raise QueryError(f"malformed reply: {exc.reason}") from exc
    if event is NEED_DATA:
        return None
    if not isinstance(event, Reply):
        raise QueryError("the server closed the connection without a reply")
    return event


def _connect(server: HostPort | None, unix_path: Path | None, timeout_s: float) -> socket.socket:
    try:
        if unix_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout_s)
                sock.connect(str(unix_path))
            except OSError:
                sock.close()
                raise
            return sock
        assert server is not None
        return socket.create_connection((server.host, server.port), timeout=timeout_s)
    except OSError as exc:
        where = f"unix:{unix_path}" if unix_path is not None else str(server)
        raise QueryError(f"cannot connect to {where}: {exc.strerror or exc}") from exc


class Connection:
    """One persistent socketmap or tcp_table connection, one request at a time.

    ``ask()`` returns the decoded :class:`Reply`; QueryError when the server closes the
    connection, sends something that is not a reply, or the socket fails or times out.
    """

    def __init__(self, sock: socket.socket, protocol: WireProtocol = "socketmap") -> None:
        self.sock = sock
        self.protocol: WireProtocol = protocol
        self._parser = reply_parser(protocol)

    @classmethod
    def connect(
        cls,
        server: HostPort | None = None,
        *,
        unix_path: Path | None = None,
        protocol: WireProtocol = "socketmap",
        timeout_s: float = CLIENT_TIMEOUT_S,
    ) -> Connection:
        """Connect to ``server`` (TCP, with TCP_NODELAY) or to ``unix_path``."""
        sock = _connect(server, unix_path, timeout_s)
        if unix_path is None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, protocol)

    def ask(self, map_name: str, key: str | bytes) -> Reply:
        """Look ``key`` up in ``map_name`` (not sent for tcp_table: the port chooses the map)."""
        return self.exchange(encode_request(self.protocol, map_name, key))

    def exchange(self, request: bytes) -> Reply:
        """Send one already encoded request and return its reply (benchmarks pre-encode)."""
        try:
            self.sock.sendall(request)
        except OSError as exc:
            raise QueryError(f"connection failed: {exc.strerror or exc}") from exc
        return self.receive()

    def receive(self) -> Reply:
        """The next reply on the connection (after requests sent as raw bytes on ``sock``)."""
        try:
            while (reply := next_reply(self._parser)) is None:
                data = self.sock.recv(65_536)
                if not data:
                    raise QueryError("the server closed the connection without a reply")
                self._parser.receive_data(data)
        except OSError as exc:
            raise QueryError(f"connection failed: {exc.strerror or exc}") from exc
        return reply

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def query_socketmap(
    map_name: str,
    key: bytes,
    *,
    server: HostPort | None = None,
    unix_path: Path | None = None,
    timeout_s: float = CLIENT_TIMEOUT_S,
) -> Reply:
    """Connect, send one socketmap request and return the decoded reply."""
    with Connection.connect(server, unix_path=unix_path, timeout_s=timeout_s) as connection:
        return connection.ask(map_name, key)


def query_tcp_table(key: bytes, *, server: HostPort, timeout_s: float = CLIENT_TIMEOUT_S) -> Reply:
    """Send one tcp_table ``get`` and return the decoded reply."""
    with Connection.connect(server, protocol="tcp_table", timeout_s=timeout_s) as connection:
        return connection.ask("", key)
