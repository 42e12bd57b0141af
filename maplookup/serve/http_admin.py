"""A minimal HTTP/1.1 server for ``/metrics`` and ``/healthz``: answer once, then close.

No framework: a scraper and a health probe need one request per connection, so each connection
reads one bounded request head, answers it with ``Connection: close`` and a Content-Length, and
is closed.  Every limit is named with its unit:

* the request head (request line and headers) must arrive within ``head_timeout_s`` and fit in
  ``max_head_bytes``, else 408 or 400;
* at most ``max_connections`` admin connections at once; more are closed at once;
* a health check that takes longer than ``health_timeout_s`` counts as unavailable.

Nothing a client sends, and no exception in the metrics or health callables, stops the server:
the failure is answered (400, 500, 503) or logged, and that one connection is closed.
"""

from __future__ import annotations

import errno
import json
import logging
import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import trio

from maplookup.metrics import METRICS_CONTENT_TYPE

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_HEAD_TIMEOUT_S",
    "DEFAULT_HEALTH_TIMEOUT_S",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_HEAD_BYTES",
    "DEFAULT_WRITE_TIMEOUT_S",
    "HealthCheck",
    "MetricsRenderer",
    "open_admin_listeners",
    "serve_admin_http",
]

DEFAULT_MAX_HEAD_BYTES: Final = 8192
DEFAULT_HEAD_TIMEOUT_S: Final = 5.0
DEFAULT_WRITE_TIMEOUT_S: Final = 10.0
DEFAULT_HEALTH_TIMEOUT_S: Final = 10.0
DEFAULT_MAX_CONNECTIONS: Final = 64

# After answering, read (and drop) what the client still sends for this long before closing,
# so that unread request bytes do not make the kernel reset the connection under the response.
_LINGER_S: Final = 1.0
_LINGER_MAX_BYTES: Final = 65_536
_RECEIVE_BYTES: Final = 4096

_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY_S: Final = 0.1

MetricsRenderer = Callable[[], Awaitable[bytes]]
HealthCheck = Callable[[], Awaitable[tuple[bool, dict[str, object]]]]

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_PATHS: Final = frozenset({"/metrics", "/healthz"})
_METHODS: Final = frozenset({"GET", "HEAD"})
_TOKEN_CHARS: Final = frozenset("!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits)


class _BadRequest(Exception):
    """The request head is not HTTP/1.x we can answer."""


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    content_type: str
    body: bytes
    extra_headers: tuple[tuple[str, str], ...] = ()

    def encode(self, *, include_body: bool) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status} {_REASONS[self.status]}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Connection: close",
            "Cache-Control: no-store",
            *(f"{name}: {value}" for name, value in self.extra_headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        return head + self.body if include_body else head


def _text(status: int, message: str, *extra: tuple[str, str]) -> _Response:
    return _Response(status, "text/plain; charset=utf-8", f"{message}\n".encode(), extra)


@dataclass(frozen=True, slots=True)
class _Limits:
    max_head_bytes: int
    head_timeout_s: float
    write_timeout_s: float
    health_timeout_s: float


async def open_admin_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """TCP listeners for the admin endpoint (``port=0``: any free port; see ``getsockname``)."""
    return await trio.open_tcp_listeners(port, host=host)


async def serve_admin_http(
    listeners: list[trio.SocketListener],
    metrics: MetricsRenderer,
    health: HealthCheck,
    *,
    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
    head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S,
    write_timeout_s: float = DEFAULT_WRITE_TIMEOUT_S,
    health_timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` and ``/healthz`` on ``listeners`` until cancelled.

    ``await metrics()`` returns the exposition text (run in the trio thread, so it may read
    the server's counters without locks; async, so that it may gather other workers').
    ``health()`` returns ``(healthy, details)``; details are added to the JSON body next to
    ``"status"``.  Reports started once every listener is being served; closes the listeners
    when it returns.
    """
    limits = _Limits(max_head_bytes, head_timeout_s, write_timeout_s, health_timeout_s)
    open_connections = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal open_connections
        try:
            await _serve_connection(stream, metrics, health, limits)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("admin HTTP connection failed")
        finally:
            open_connections -= 1
            await trio.aclose_forcefully(stream)

    async def accept_loop(listener: trio.SocketListener, connections: trio.Nursery) -> None:
        nonlocal open_connections
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("admin HTTP accept failed: %s; retrying", exc.strerror)
                await trio.sleep(_ACCEPT_RETRY_S)
                continue
            if open_connections >= max_connections:
                log.debug("admin HTTP: %d connections open; closing a new one", max_connections)
                await trio.aclose_forcefully(stream)
                continue
            open_connections += 1
            connections.start_soon(handle, stream)

    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(accept_loop, listener, nursery)
            task_status.started()
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


async def _serve_connection(
    stream: trio.SocketStream, metrics: MetricsRenderer, health: HealthCheck, limits: _Limits
) -> None:
    head: bytes | None = None
    with trio.move_on_after(limits.head_timeout_s):
        head = await _read_head(stream, limits.max_head_bytes)
        if not head:
            return  # closed before sending anything (a port check)
    include_body = True
    if head is None:
        log.debug("admin HTTP: no request head within %s s", limits.head_timeout_s)
        response = _text(408, "request head not received in time")
    else:
        try:
            method, path = _parse_head(head, limits.max_head_bytes)
        except _BadRequest as exc:
            log.debug("admin HTTP: bad request: %s", exc)
            response = _text(400, f"bad request: {exc}")
        else:
            include_body = method != "HEAD"
            response = await _respond(method, path, metrics, health, limits)
    with trio.move_on_after(limits.write_timeout_s):
        await stream.send_all(response.encode(include_body=include_body))
        await _linger(stream)


async def _read_head(stream: trio.SocketStream, max_head_bytes: int) -> bytes:
    """The request head up to its blank line; what was read so far at EOF; too much: all of it.

    Returns at most ``max_head_bytes + _RECEIVE_BYTES`` bytes; the caller checks the size.
    """
    buffer = bytearray()
    while True:
        data = await stream.receive_some(_RECEIVE_BYTES)
        if not data:
            return bytes(buffer)
        start = max(len(buffer) - 3, 0)
        buffer += data
        for terminator in (b"\r\n\r\n", b"\n\n"):
            end = buffer.find(terminator, start)
            if end >= 0:
                return bytes(buffer[: end + len(terminator)])
        if len(buffer) > max_head_bytes:
            return bytes(buffer)


def _parse_head(head: bytes, max_head_bytes: int) -> tuple[str, str]:
    """``(method, path)`` of a complete, bounded request head, else _BadRequest."""
    if len(head) > max_head_bytes:
        raise _BadRequest(f"request head larger than {max_head_bytes} bytes")
    if not (head.endswith(b"\n\n") or head.endswith(b"\r\n\r\n")):
        raise _BadRequest("incomplete request head")
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise _BadRequest("request head is not ASCII") from None
    lines = text.replace("\r\n", "\n").split("\n")
    # Tolerate blank lines before the request line (RFC 9112 §2.2).
    while lines and lines[0] == "":
        lines.pop(0)
    if not lines:
        raise _BadRequest("empty request")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise _BadRequest("malformed request line")
    method, target, version = parts
    if not method or not set(method) <= _TOKEN_CHARS:
        raise _BadRequest("malformed method")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _BadRequest("not HTTP/1.x")
    if not target.startswith("/"):
        raise _BadRequest("request target must be a path")
    for line in lines[1:]:
        if line == "":
            continue
        name, colon, _value = line.partition(":")
        if not colon or not name or not set(name) <= _TOKEN_CHARS:
            raise _BadRequest("malformed header line")
    path = target.split("?", 1)[0]
    return method, path


async def _respond(
    method: str, path: str, metrics: MetricsRenderer, health: HealthCheck, limits: _Limits
) -> _Response:
    if path not in _PATHS:
        return _text(404, "not found: try /metrics or /healthz")
    if method not in _METHODS:
        return _text(405, "method not allowed", ("Allow", "GET, HEAD"))
    if path == "/metrics":
        try:
            body = await metrics()
        except Exception:
            log.exception("rendering /metrics failed")
            return _text(500, "metrics unavailable: see the maplookup log")
        return _Response(200, METRICS_CONTENT_TYPE, body)
    return await _health_response(health, limits.health_timeout_s)


async def _health_response(health: HealthCheck, timeout_s: float) -> _Response:
    healthy = False
    details: dict[str, object] = {}
    with trio.move_on_after(timeout_s) as scope:
        try:
            healthy, details = await health()
        except Exception as exc:
            log.exception("health check failed")
            details = {"error": f"health check failed: {type(exc).__name__}"}
    if scope.cancelled_caught:
        healthy = False
        details = {"error": f"health check did not finish within {timeout_s} s"}
    document: dict[str, object] = {"status": "ok" if healthy else "unavailable"}
    document.update((k, v) for k, v in details.items() if k != "status")
    body = (json.dumps(document, default=str, sort_keys=False) + "\n").encode()
    return _Response(200 if healthy else 503, "application/json", body)


async def _linger(stream: trio.SocketStream) -> None:
    """Half-close, then drop what the client still sends, briefly, before the caller closes."""
    try:
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return
    received = 0
    with trio.move_on_after(_LINGER_S):
        while received < _LINGER_MAX_BYTES:
            data = await stream.receive_some(_RECEIVE_BYTES)
            if not data:
                return
            received += len(data)
