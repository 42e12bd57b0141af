"""Opening the sockets the server listens on: TCP for socketmap and tcp_table, and unix.

Kept apart from the connection handling so that binding rules (stale sockets, permissions,
symlinks) can be read and tested on their own.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from maplookup.config import HostPort, ListenSettings
from maplookup.maps import MapName

log = logging.getLogger(__name__)

# Enough for a burst of Postfix processes connecting at once after a restart.
LISTEN_BACKLOG = 512


class ListenError(Exception):
    """A listening socket cannot be opened; the message says which and why."""


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    """One configured endpoint; equal specs mean "the same listener" across reloads."""

    map_name: MapName | None  # None: socketmap; a map: tcp_table for that map
    tcp: HostPort | None = None
    unix_path: Path | None = None
    unix_mode: int = 0o660
    unix_group: str | None = None


def listener_specs(settings: ListenSettings) -> list[ListenerSpec]:
    specs = [ListenerSpec(None, tcp=endpoint) for endpoint in settings.socketmap]
    if settings.socketmap_unix is not None:
        specs.append(
            ListenerSpec(
                None,
                unix_path=settings.socketmap_unix,
                unix_mode=settings.socketmap_unix_mode,
                unix_group=settings.socketmap_unix_group,
            )
        )
    specs += [ListenerSpec(m, tcp=endpoint) for m, endpoint in settings.tcp_table.items()]
    return specs


@dataclass(frozen=True, slots=True, eq=False)
class BoundListener:
    """An open listening socket and what it serves.

    ``map_name`` is None for socketmap (the map travels in each request) and the one map of a
    tcp_table listener (tcp_table(5): no map name on the wire).
    """

    listener: trio.SocketListener
    map_name: MapName | None
    description: str
    spec: ListenerSpec
    unix_path: Path | None = None

    @property
    def protocol_name(self) -> str:
        return "socketmap" if self.map_name is None else "tcp_table"

    def tcp_port(self) -> int:
        """The bound port (useful when port 0 was asked for)."""
        address = self.listener.socket.getsockname()
        return int(address[1])


def _open_tcp_sockets(endpoint: HostPort, reuse_port: bool) -> list[socket.socket]:
    """Listening sockets for every address ``endpoint.host`` resolves to.

    ``reuse_port`` sets SO_REUSEPORT, so that several worker processes can each bind the same
    port and the kernel spreads connections across them.
    """
    infos = socket.getaddrinfo(
        endpoint.host or None,
        endpoint.port,
        type=socket.SOCK_STREAM,
        flags=socket.AI_PASSIVE | socket.AI_ADDRCONFIG,
    )
    opened: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            opened.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    return opened


def _bind_tcp(spec: ListenerSpec, reuse_port: bool) -> list[BoundListener]:
    endpoint, map_name = spec.tcp, spec.map_name
    assert endpoint is not None
    kind = "socketmap" if map_name is None else f"tcp_table {map_name.value}"
    try:
        sockets = _open_tcp_sockets(endpoint, reuse_port)
    except OSError as exc:
        raise ListenError(f"cannot listen on {endpoint} for {kind}: {exc.strerror}") from exc
    result = []
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        result.append(BoundListener(listener, map_name, f"{kind} on {shown}", spec))
    return result


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a crashed server; refuse anything else at that path."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise ListenError(f"{path} is a symbolic link; refusing to follow it")
    if not stat.S_ISSOCK(info.st_mode):
        raise ListenError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        log.info("removed stale socket %s", path)
        return
    finally:
        probe.close()
    raise ListenError(f"another server is already listening on {path}")


def open_unix_socket(spec: ListenerSpec) -> socket.socket:
    """A listening unix socket with the configured mode and group (replacing a stale one)."""
    path, mode, group = spec.unix_path, spec.unix_mode, spec.unix_group
    assert path is not None
    _remove_stale_socket(path)
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError as exc:
            raise ListenError(f"socketmap_unix_group: no group named {group!r}") from exc
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # No client can connect before listen(), so setting mode and group here has no race.
        os.chmod(path, mode)
        if gid != -1:
            os.chown(path, -1, gid)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on unix socket {path}: {exc.strerror}") from exc
    return sock


def _wrap_unix(spec: ListenerSpec, sock: socket.socket, owned: bool) -> BoundListener:
    """``owned``: this process created the socket file and removes it when it closes."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    description = f"socketmap on unix:{spec.unix_path}"
    return BoundListener(listener, None, description, spec, spec.unix_path if owned else None)


async def bind_spec(
    spec: ListenerSpec,
    *,
    reuse_port: bool = False,
    inherited: Mapping[ListenerSpec, socket.socket] | None = None,
) -> list[BoundListener]:
    """Open the listener(s) of one endpoint (a host name may resolve to several addresses).

    ``inherited`` holds sockets a parent process opened (unix sockets, with workers), which
    are used as they are instead of binding again.
    """
    if inherited and spec in inherited:
        return [_wrap_unix(spec, inherited[spec], owned=False)]
    if spec.unix_path is not None:
        return [_wrap_unix(spec, open_unix_socket(spec), owned=True)]
    return _bind_tcp(spec, reuse_port)


async def bind_all(
    settings: ListenSettings,
    *,
    reuse_port: bool = False,
    inherited: Mapping[ListenerSpec, socket.socket] | None = None,
) -> list[BoundListener]:
    """Open every configured listener, or none: on error, close what was opened and raise."""
    bound: list[BoundListener] = []
    try:
        for spec in listener_specs(settings):
            bound.extend(await bind_spec(spec, reuse_port=reuse_port, inherited=inherited))
    except BaseException:
        await close_all(bound)
        raise
    if not bound:
        raise ListenError("nothing to listen on: configure socketmap, socketmap_unix or tcp_table")
    return bound


async def close_all(bound: list[BoundListener]) -> None:
    """Close listeners and remove the unix socket files we created."""
    for item in bound:
        await trio.aclose_forcefully(item.listener)
        if item.unix_path is not None:
            try:
                os.unlink(item.unix_path)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("cannot remove %s: %s", item.unix_path, exc.strerror)
