"""A minimal blocking client for ``maplookup query``: ask as Postfix asks, show what it gets.

Blocking sockets are right here: one question, one answer, then exit.
"""

from __future__ import annotations

import socket
from pathlib import Path

from maplookup.config import HostPort
from maplookup.protocol import (
    NEED_DATA,
    RemoteProtocolError,
    Reply,
    SocketmapReplyParser,
    socketmap,
    tcptable,
)

# Postfix's own client timeout for socketmap (src/global/dict_sockmap.c).
CLIENT_TIMEOUT_S = 100.0


class QueryError(Exception):
    """The server could not be asked or gave a reply that is not a reply."""


def _connect(server: HostPort | None, unix_path: Path | None, timeout_s: float) -> socket.socket:
    try:
        if unix_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout_s)
            sock.connect(str(unix_path))
            return sock
        assert server is not None
        return socket.create_connection((server.host, server.port), timeout=timeout_s)
    except OSError as exc:
        where = f"unix:{unix_path}" if unix_path is not None else str(server)
        raise QueryError(f"cannot connect to {where}: {exc.strerror or exc}") from exc


def ask_socketmap(sock: socket.socket, map_name: str, key: bytes) -> Reply:
    """One request on an open connection (Postfix keeps its connections open)."""
    try:
        sock.sendall(socketmap.encode_request(map_name.encode(), key))
        parser = SocketmapReplyParser()
        while True:
            event = parser.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, Reply)
                return event
            data = sock.recv(65_536)
            if not data:
                raise QueryError("the server closed the connection without a reply")
            parser.receive_data(data)
    except RemoteProtocolError as exc:
        raise QueryError(f"malformed reply: {exc.reason}") from exc
    except OSError as exc:
        raise QueryError(f"connection failed: {exc.strerror or exc}") from exc


def query_socketmap(
    map_name: str,
    key: bytes,
    *,
    server: HostPort | None = None,
    unix_path: Path | None = None,
    timeout_s: float = CLIENT_TIMEOUT_S,
) -> Reply:
    """Connect, send one socketmap request and return the decoded reply."""
    with _connect(server, unix_path, timeout_s) as sock:
        return ask_socketmap(sock, map_name, key)


def query_tcp_table(key: bytes, *, server: HostPort, timeout_s: float = CLIENT_TIMEOUT_S) -> Reply:
    """Send one tcp_table ``get`` and return the decoded reply."""
    with _connect(server, None, timeout_s) as sock:
        try:
            sock.sendall(tcptable.encode_request(key))
            line = b""
            while not line.endswith(b"\n"):
                data = sock.recv(4096)
                if not data:
                    raise QueryError("the server closed the connection without a reply")
                line += data
            return tcptable.parse_reply_line(line)
        except RemoteProtocolError as exc:
            raise QueryError(f"malformed reply: {exc.reason}") from exc
        except OSError as exc:
            raise QueryError(f"connection failed: {exc.strerror or exc}") from exc
