"""A minimal HTTP/1.1 server for ``/metrics`` and ``/healthz``: answer once, then close.

The protocol is h11's (request parsing, framing, HEAD, HTTP/1.0 clients) and the accept loop is
``trio.serve_listeners`` (which also retries on EMFILE and the like), so this module holds only
what is ours: the two paths, the limits, and how failures are answered.  A scraper and a health
probe need one request per connection, so each connection reads one bounded request head,
answers it with ``Connection: close`` and a Content-Length, and is closed.  Every limit is named
with its unit:

* the request head (request line and headers) must arrive within ``head_timeout_s`` (a read
  timeout per request: one request per connection) and fit in ``max_head_bytes``, else 408 or
  400;
* at most ``max_connections`` admin connections at once; more are closed at once, unanswered,
  so that a flood of probes cannot hold more than that many sockets and tasks;
* a health check that takes longer than ``health_timeout_s`` counts as unavailable.

Nothing a client sends, and no exception in the metrics or health callables, stops the server:
the failure is answered (400, 500, 503) or logged, and that one connection is closed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import h11
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
# Connections at once: a scraper or two and a few probes need far fewer; each one is a socket
# and a task, which is what the limit bounds.
DEFAULT_MAX_CONNECTIONS: Final = 64

# After answering, read (and drop) what the client still sends for this long before closing,
# so that unread request bytes do not make the kernel reset the connection under the response.
_LINGER_S: Final = 1.0
_LINGER_MAX_BYTES: Final = 65_536
_RECEIVE_BYTES: Final = 4096

MetricsRenderer = Callable[[], Awaitable[bytes]]
HealthCheck = Callable[[], Awaitable[tuple[bool, dict[str, object]]]]

_REASONS: Final = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}
_PATHS: Final = frozenset({"/metrics", "/healthz"})
_METHODS: Final = frozenset({b"GET", b"HEAD"})
# h11 parses any "HTTP/d.d"; we answer the versions we speak.
_VERSIONS: Final = frozenset({b"1.0", b"1.1"})


class _BadRequest(Exception):
    """The request head is not HTTP/1.x we can answer."""


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    content_type: str
    body: bytes
    extra_headers: tuple[tuple[str, str], ...] = ()

    def encode(self, connection: h11.Connection, *, include_body: bool) -> bytes:
        """The response as h11 frames it; without the body for HEAD (Content-Length kept)."""
        headers = [
            ("Content-Type", self.content_type),
            ("Content-Length", str(len(self.body))),
            ("Connection", "close"),
            ("Cache-Control", "no-store"),
            *self.extra_headers,
        ]
        head = h11.Response(status_code=self.status, headers=headers, reason=_REASONS[self.status])
        parts = [connection.send(head)]
        if include_body and self.body:
            parts.append(connection.send(h11.Data(data=self.body)))
        parts.append(connection.send(h11.EndOfMessage()))
        return b"".join(part for part in parts if part is not None)


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
        # serve_listeners starts one handler per accepted connection, in accept order, and the
        # count is taken before the handler's first checkpoint, so connections are admitted
        # first come, first served.  An exception escaping here would cancel the whole
        # endpoint (serve_listeners' nursery), hence the catch-all.
        nonlocal open_connections
        if open_connections >= max_connections:
            log.debug("admin HTTP: %d connections open; closing a new one", max_connections)
            await trio.aclose_forcefully(stream)
            return
        open_connections += 1
        try:
            await _serve_connection(stream, metrics, health, limits)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("admin HTTP connection failed")
        finally:
            open_connections -= 1
            await trio.aclose_forcefully(stream)

    try:
        async with trio.open_nursery() as nursery:
            # serve_listeners closes each listener when its accept loop ends.
            await nursery.start(trio.serve_listeners, handle, listeners)
            task_status.started()
    finally:
        # Also when cancelled before serve_listeners took them over; closing twice is harmless.
        for listener in listeners:
            await trio.aclose_forcefully(listener)


async def _serve_connection(
    stream: trio.SocketStream, metrics: MetricsRenderer, health: HealthCheck, limits: _Limits
) -> None:
    # The buffer limit h11 enforces is a backstop: _read_request stops at max_head_bytes first,
    # so that the 400 names our limit rather than h11's "Receive buffer too long" (a 431 hint).
    connection = h11.Connection(
        h11.SERVER, max_incomplete_event_size=limits.max_head_bytes + _RECEIVE_BYTES
    )
    received = await _receive(stream, connection, limits)
    if received is None:
        return  # closed before sending anything (a port check)
    if isinstance(received, _Response):
        response, include_body = received, True
    else:
        request, head_bytes = received
        # Also a refusal of a HEAD request has no body: h11 frames it as a HEAD response.
        include_body = request.method != b"HEAD"
        problem = _refusal(request, head_bytes, limits.max_head_bytes)
        if problem is not None:
            log.debug("admin HTTP: bad request: %s", problem)
            response = _text(400, f"bad request: {problem}")
        else:
            response = await _respond(request, metrics, health, limits)
    with trio.move_on_after(limits.write_timeout_s):
        await stream.send_all(response.encode(connection, include_body=include_body))
        await _linger(stream)


async def _receive(
    stream: trio.SocketStream, connection: h11.Connection, limits: _Limits
) -> tuple[h11.Request, int] | _Response | None:
    """The request and its head's size, or the 400 or 408 that answers a bad or slow one.

    ``None``: the client closed without sending anything.
    """
    with trio.move_on_after(limits.head_timeout_s):
        try:
            return await _read_request(stream, connection, limits.max_head_bytes)
        except (_BadRequest, h11.RemoteProtocolError) as exc:
            log.debug("admin HTTP: bad request: %s", exc)
            return _text(400, f"bad request: {exc}")
    log.debug("admin HTTP: no request head within %s s", limits.head_timeout_s)
    return _text(408, "request head not received in time")


async def _read_request(
    stream: trio.SocketStream, connection: h11.Connection, max_head_bytes: int
) -> tuple[h11.Request, int] | None:
    """The request as h11 parses it, and its head's size in bytes; ``None``: nothing sent.

    Raises _BadRequest once more than ``max_head_bytes`` arrived without a complete head, and
    h11.RemoteProtocolError for what h11 refuses (it also requires Host in HTTP/1.1).  The
    request body, if any, is not read: no path takes one.
    """
    received = 0
    while True:
        event = connection.next_event()
        if isinstance(event, h11.Request):
            return event, received - len(connection.trailing_data[0])
        if isinstance(event, h11.ConnectionClosed):
            return None
        if event is not h11.NEED_DATA:  # pragma: no cover - h11 gives a Request first
            raise _BadRequest(f"unexpected {type(event).__name__}")
        if received > max_head_bytes:
            raise _BadRequest(f"request head larger than {max_head_bytes} bytes")
        data = await stream.receive_some(_RECEIVE_BYTES)
        received += len(data)
        connection.receive_data(data)  # b"" is end of stream, as h11 expects


def _refusal(request: h11.Request, head_bytes: int, max_head_bytes: int) -> str | None:
    """Why a request h11 accepted is still a 400, if it is; ``None``: it can be answered.

    h11 parses a complete head of any size when it arrives at once, any "HTTP/d.d", and
    absolute or ``*`` request targets; we answer bounded HTTP/1.x requests for a path.
    """
    if head_bytes > max_head_bytes:
        return f"request head larger than {max_head_bytes} bytes"
    if request.http_version not in _VERSIONS:
        return "not HTTP/1.x"
    if not request.target.startswith(b"/"):
        return "request target must be a path"
    return None


async def _respond(
    request: h11.Request, metrics: MetricsRenderer, health: HealthCheck, limits: _Limits
) -> _Response:
    # h11 has checked the target is visible ASCII.
    path = request.target.decode("ascii").split("?", 1)[0]
    if path not in _PATHS:
        return _text(404, "not found: try /metrics or /healthz")
    if request.method not in _METHODS:
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
