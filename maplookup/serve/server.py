"""The trio server: accept connections, run one task per connection, drain on shutdown.

Postfix keeps one connection per process and endpoint, sends one request at a time, closes a
connection idle for 10 s and any connection after 100 s (src/global/dict_sockmap.c), so expect
hundreds of short-lived connections.  A malformed request closes that one connection; nothing a
peer sends can stop the server from serving everyone else.

Connections arrive from the listeners, or as any trio stream through ``Server.handle_stream``
(the tests use in-memory streams and a virtual clock there); both take the same path, except
that a socket's replies are written straight to its file descriptor.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Protocol

import trio

from maplookup.config import LimitSettings
from maplookup.logsetup import RateLimitedLogger, fields
from maplookup.maps import MapName
from maplookup.protocol import (
    CLOSED,
    NEED_DATA,
    RemoteProtocolError,
    Reply,
    Request,
    SocketmapProtocol,
    TcpTableProtocol,
)
from maplookup.serve.listeners import BoundListener

log = logging.getLogger(__name__)

# One recv per request in practice: requests are far smaller than this.
RECEIVE_BYTES = 65_536

# accept() errors that mean "overloaded, try again" (as in trio's serve_listeners).
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY_S = 0.1


class Answerer(Protocol):
    async def answer(self, request: Request) -> Reply: ...


class WireProtocol(Protocol):
    """What the server needs from a sans-IO codec (socketmap or tcp_table)."""

    @property
    def in_message(self) -> bool: ...
    def receive_data(self, data: bytes) -> None: ...
    def next_event(self) -> object: ...
    def send(self, reply: Reply) -> bytes: ...


@dataclass(slots=True)
class ServerCounters:
    """Plain counters, read by the metrics of a later stage and by tests."""

    connections_open: int = 0
    connections_accepted: int = 0
    connections_rejected: int = 0
    connections_refused: int = 0  # not in allowed_clients
    protocol_errors: int = 0
    read_timeouts: int = 0
    requests: int = 0


class Server:
    """Serves lookups on already-bound listeners until drained."""

    def __init__(
        self,
        answerer: Answerer,
        limits: LimitSettings,
        listeners: list[BoundListener],
        allowed_clients: Sequence[IPv4Network | IPv6Network] = (),
    ) -> None:
        self.allowed_clients = list(allowed_clients)  # replaced on reload
        self._answerer = answerer
        self._limits = limits
        self._listeners = list(listeners)
        self._accept_scopes: dict[int, trio.CancelScope] = {}
        self._accept_loops: trio.Nursery | None = None
        self._connections: trio.Nursery | None = None
        self._draining = False
        self._accepting = trio.CancelScope()
        self._conversations: set[_Conversation] = set()
        self.counters = ServerCounters()
        # One line per connection error, but a flood of them (a broken or hostile client
        # reconnecting) becomes a few lines and a count.
        self._connection_log = RateLimitedLogger(log)

    @property
    def limits(self) -> LimitSettings:
        return self._limits

    def set_limits(self, limits: LimitSettings) -> None:
        """Apply new limits (reload): new connections and the next request of each open one."""
        self._limits = limits

    @property
    def listeners(self) -> list[BoundListener]:
        return list(self._listeners)

    def _protocol_factory(self, map_name: MapName | None) -> Callable[[], WireProtocol]:
        limits = self  # read the limit when the connection starts, so a reload applies

        if map_name is None:
            return lambda: SocketmapProtocol(max_request_bytes=limits.limits.max_request_bytes)
        wire_name = map_name.value.encode()
        return lambda: TcpTableProtocol(
            wire_name, max_request_bytes=limits.limits.max_request_bytes
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and serve until ``drain()``; then wait for in-flight requests, bounded."""
        async with trio.open_nursery() as connections:
            self._connections = connections
            with self._accepting:
                async with trio.open_nursery() as accept_loops:
                    self._accept_loops = accept_loops
                    # Keeps the nursery open even when a reload removes every listener.
                    accept_loops.start_soon(trio.sleep_forever)
                    accept_loops.start_soon(self._connection_log.run_flusher)
                    accept_loops.start_soon(self._enforce_timeouts)
                    for bound in self._listeners:
                        self._start_accept_loop(bound)
                    task_status.started()
            # Draining: no more accepts; connections finish what they are answering.
            connections.cancel_scope.deadline = trio.current_time() + self._limits.drain_timeout_s

    def _start_accept_loop(self, bound: BoundListener) -> None:
        if self._accept_loops is None or self._connections is None:
            raise RuntimeError("listeners can be added only while the server runs")
        scope = trio.CancelScope()
        self._accept_scopes[id(bound)] = scope
        self._accept_loops.start_soon(
            self._accept_loop,
            bound,
            self._protocol_factory(bound.map_name),
            self._connections,
            scope,
        )

    def add_listener(self, bound: BoundListener) -> None:
        """Start accepting on a newly bound listener (reload)."""
        self._listeners.append(bound)
        self._start_accept_loop(bound)

    def remove_listener(self, bound: BoundListener) -> None:
        """Stop accepting on a listener (reload); its established connections carry on.

        The caller closes the listener afterwards.
        """
        self._listeners.remove(bound)
        scope = self._accept_scopes.pop(id(bound), None)
        if scope is not None:
            scope.cancel()

    def drain(self) -> None:
        """Stop accepting, let in-flight requests be answered, close idle connections."""
        if self._draining:
            return
        self._draining = True
        self._accepting.cancel()
        for conversation in list(self._conversations):
            if conversation.waiting == _IDLE and conversation.scope is not None:
                conversation.scope.cancel()

    async def _accept_loop(
        self,
        bound: BoundListener,
        make_protocol: Callable[[], WireProtocol],
        connections: trio.Nursery,
        scope: trio.CancelScope,
    ) -> None:
        with scope:
            await self._accept_until_cancelled(bound, make_protocol, connections)

    async def _accept_until_cancelled(
        self,
        bound: BoundListener,
        make_protocol: Callable[[], WireProtocol],
        connections: trio.Nursery,
    ) -> None:
        while True:
            try:
                stream = await bound.listener.accept()
            except trio.ClosedResourceError:
                return  # removed by a reload and closed
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error(
                    "accept on %s failed: %s; retrying in %s s",
                    bound.description,
                    exc.strerror,
                    _ACCEPT_RETRY_S,
                )
                await trio.sleep(_ACCEPT_RETRY_S)
                continue
            await self._admit(
                stream, make_protocol, bound.protocol_name, bound.description, connections
            )

    async def handle_stream(
        self,
        stream: trio.abc.Stream,
        *,
        map_name: MapName | None = None,
        description: str = "a stream",
    ) -> None:
        """Serve a connection that did not come from a listener, on any trio stream.

        It is admitted, counted, timed out and drained exactly like an accepted connection
        (the same code, in the server's connection nursery, so the drain deadline covers it),
        which lets tests drive timeouts, limits and the drain over in-memory streams with a
        virtual clock.  ``map_name`` None speaks socketmap; a map speaks tcp_table for it.
        Returns once the connection is handed over (or refused and closed); the server must
        be running, and a draining one closes the stream at once, as its listeners would.
        """
        if self._connections is None:
            raise RuntimeError("streams can be handled only while the server runs")
        if self._draining:
            await trio.aclose_forcefully(stream)
            return
        protocol_name = "socketmap" if map_name is None else "tcp_table"
        await self._admit(
            stream, self._protocol_factory(map_name), protocol_name, description, self._connections
        )

    async def _admit(
        self,
        stream: trio.abc.Stream,
        make_protocol: Callable[[], WireProtocol],
        protocol_name: str,
        description: str,
        connections: trio.Nursery,
    ) -> None:
        """Refuse (closing at once, counted) or start serving a new connection."""
        limits = self._limits
        if self.allowed_clients and not self._client_allowed(stream):
            self.counters.connections_refused += 1
            peer = _peer(stream)
            self._connection_log.warning(
                "refusing connection from %s: not in allowed_clients",
                peer,
                key="acl",
                extra=fields(peer=peer),
            )
            await trio.aclose_forcefully(stream)
            return
        if self.counters.connections_open >= limits.max_connections:
            self.counters.connections_rejected += 1
            if self.counters.connections_rejected % 100 == 1:
                log.warning(
                    "max_connections=%d reached; refusing new connections (%d refused so far)",
                    limits.max_connections,
                    self.counters.connections_rejected,
                )
            await trio.aclose_forcefully(stream)
            return
        self.counters.connections_open += 1
        self.counters.connections_accepted += 1
        connections.start_soon(
            self._serve_connection, stream, make_protocol(), protocol_name, description
        )

    def _client_allowed(self, stream: trio.abc.Stream) -> bool:
        """Loopback and unix-socket clients always; others only from allowed_clients.

        A stream that is not a socket has no network peer (an in-memory stream, a pipe): it
        is let in, like a unix socket, since nothing on the network can reach it.
        """
        sock = getattr(stream, "socket", None)
        if sock is None:
            return True
        try:
            peer = sock.getpeername()
        except OSError:
            return False
        if not isinstance(peer, tuple):
            return True  # a unix socket: guarded by its mode and group
        address = ip_address(peer[0])
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.is_loopback:
            return True
        return any(address in network for network in self.allowed_clients)

    async def _serve_connection(
        self,
        stream: trio.abc.Stream,
        protocol: WireProtocol,
        protocol_name: str,
        description: str,
    ) -> None:
        try:
            await self._converse(stream, protocol)
        except RemoteProtocolError as exc:
            self.counters.protocol_errors += 1
            peer = _peer(stream)
            self._connection_log.warning(
                "closing %s connection from %s: %s",
                protocol_name,
                peer,
                exc.reason,
                key="protocol-error",
                extra=fields(peer=peer, listener=description),
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.counters.connections_open -= 1
            await trio.aclose_forcefully(stream)

    async def _converse(self, stream: trio.abc.Stream, protocol: WireProtocol) -> None:
        """Answer requests until the peer closes, a timeout, a protocol error or a drain.

        The hot path of the whole server, so it does little per request: no cancel scope per
        wait (moving a trio deadline costs as much as a whole cached lookup) but a timestamp
        that ``_enforce_timeouts`` checks a few times a second, and, on a socket, the reply
        written with one non-blocking ``write`` that nearly always takes it whole; only a peer
        that does not read falls back to ``send_all``.  Any other stream has no descriptor:
        its ``write`` writes nothing, so every reply takes the ``send_all`` path, with the
        write timeout around it, and what it receives may be a bytearray, copied to bytes for
        the codec.  Choosing ``receive`` and ``write`` once per connection keeps the socket's
        loop the code that was measured (bench/README.md, "What the numbers show").
        """
        receive: Callable[[int], Awaitable[bytes]]
        write: Callable[[int, bytes], int]
        if isinstance(stream, trio.SocketStream):
            receive = stream.receive_some
            fd = stream.socket.fileno()
            write = os.write
        else:
            receive = _receiving_bytes(stream)
            fd = -1
            write = _write_nothing
        conversation = _Conversation()
        answer = self._answerer.answer
        counters = self.counters
        with trio.CancelScope() as scope:
            conversation.scope = scope
            self._conversations.add(conversation)
            try:
                while True:
                    event = protocol.next_event()
                    if event is NEED_DATA:
                        if protocol.in_message:
                            # The read timeout runs from the request's first bytes, so a
                            # client dribbling a byte at a time cannot stretch it.
                            if conversation.waiting != _READ:
                                conversation.waiting = _READ
                                conversation.since = trio.current_time()
                        elif self._draining:
                            return
                        else:
                            conversation.waiting = _IDLE
                            conversation.since = trio.current_time()
                        protocol.receive_data(await receive(RECEIVE_BYTES))
                    elif event is CLOSED:
                        return
                    else:
                        conversation.waiting = _BUSY
                        counters.requests += 1
                        reply = protocol.send(await answer(event))  # type: ignore[arg-type]
                        try:
                            written = write(fd, reply)
                        except BlockingIOError:
                            written = 0
                        except OSError as exc:
                            raise trio.BrokenResourceError(str(exc)) from exc
                        if written < len(reply):
                            conversation.waiting = _WRITE
                            conversation.since = trio.current_time()
                            await stream.send_all(reply[written:])
                            conversation.waiting = _BUSY
                        else:
                            # Let the other connections run before reading again: by then
                            # this peer's next request has usually arrived, and the read
                            # succeeds at once instead of parking in epoll (measured: +20 %).
                            await trio.lowlevel.cancel_shielded_checkpoint()
            finally:
                self._conversations.discard(conversation)
        if scope.cancelled_caught:
            self._report_timeout(stream, conversation.waiting)

    async def _enforce_timeouts(self) -> None:
        """Cut connections idle, reading or writing for longer than their limits allow.

        Checked every quarter of the shortest limit (at most once a second), so each limit
        holds to within that.  O(connections) per check, nothing per request.
        """
        while True:
            limits = self._limits
            shortest = min(limits.idle_timeout_s, limits.read_timeout_s, limits.write_timeout_s)
            await trio.sleep(min(max(shortest / 4, 0.01), 1.0))
            now = trio.current_time()
            allowed = {
                _IDLE: limits.idle_timeout_s,
                _READ: limits.read_timeout_s,
                _WRITE: limits.write_timeout_s,
            }
            for conversation in list(self._conversations):
                limit = allowed.get(conversation.waiting)
                scope = conversation.scope
                if limit is not None and scope is not None and now - conversation.since > limit:
                    scope.cancel()

    def _report_timeout(self, stream: trio.abc.Stream, waiting: str) -> None:
        limits = self._limits
        if waiting == _READ:
            self.counters.read_timeouts += 1
            self._connection_log.info(
                "closing connection from %s: request not completed within %s s",
                _peer(stream),
                limits.read_timeout_s,
                key="read-timeout",
            )
        elif waiting == _WRITE:
            self._connection_log.info(
                "closing connection from %s: reply not read within %s s",
                _peer(stream),
                limits.write_timeout_s,
                key="write-timeout",
            )
        # _IDLE: the idle timeout or a drain; both are routine and not logged.


_IDLE, _READ, _WRITE, _BUSY = "idle", "read", "write", "busy"


class _Conversation:
    """What the drain needs to know about one connection: its scope and what it waits for."""

    __slots__ = ("scope", "since", "waiting")

    def __init__(self) -> None:
        self.scope: trio.CancelScope | None = None
        self.waiting = _BUSY
        self.since = 0.0  # when the current wait (or, reading, the request) began


def _receiving_bytes(stream: trio.abc.ReceiveStream) -> Callable[[int], Awaitable[bytes]]:
    """``receive_some`` giving bytes, which the codecs take; a stream may give a bytearray."""

    async def receive(max_bytes: int) -> bytes:
        return bytes(await stream.receive_some(max_bytes))

    return receive


def _write_nothing(fd: int, data: bytes) -> int:
    """The fast write of a stream without a descriptor: nothing written, ``send_all`` does it."""
    return 0


def _peer(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return type(stream).__name__  # no address to show; the kind of stream is something
    try:
        peer = sock.getpeername()
    except OSError:
        return "?"
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return "unix socket" if not peer else str(peer)
