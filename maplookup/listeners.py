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


async def _bind_tcp(spec: ListenerSpec) -> list[BoundListener]:
    endpoint, map_name = spec.tcp, spec.map_name
    assert endpoint is not None
    kind = "socketmap" if map_name is None else f"tcp_table {map_name.value}"
    try:
        listeners = await trio.open_tcp_listeners(
            endpoint.port, host=endpoint.host, backlog=LISTEN_BACKLOG
        )
    except OSError as exc:
        raise ListenError(f"cannot listen on {endpoint} for {kind}: {exc.strerror}") from exc
    result = []
    for listener in listeners:
        host, port = listener.socket.getsockname()[:2]
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
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


async def _bind_unix(spec: ListenerSpec) -> BoundListener:
    path, mode, group = spec.unix_path, spec.unix_mode, spec.unix_group
    assert path is not None
    _remove_stale_socket(path)
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError as exc:
            raise ListenError(f"socketmap_unix_group: no group named {group!r}") from exc
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        # No client can connect before listen(), so setting mode and group here has no race.
        os.chmod(path, mode)
        if gid != -1:
            os.chown(path, -1, gid)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on unix socket {path}: {exc.strerror}") from exc
    return BoundListener(trio.SocketListener(sock), None, f"socketmap on unix:{path}", spec, path)


async def bind_spec(spec: ListenerSpec) -> list[BoundListener]:
    """Open the listener(s) of one endpoint (a host name may resolve to several addresses)."""
    if spec.unix_path is not None:
        return [await _bind_unix(spec)]
    return await _bind_tcp(spec)


async def bind_all(settings: ListenSettings) -> list[BoundListener]:
    """Open every configured listener, or none: on error, close what was opened and raise."""
    bound: list[BoundListener] = []
    try:
        for spec in listener_specs(settings):
            bound.extend(await bind_spec(spec))
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
