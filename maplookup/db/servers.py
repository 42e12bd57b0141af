"""Host lists: which PostgreSQL server of several a connection reaches, and staying on it.

A DSN may name several servers, ``postgresql://u@standby:5432,primary:5432/mail`` with
``?target_session_attrs=`` one of libpq's values (``any``, ``read-write``, ``read-only``,
``primary``, ``standby``, ``prefer-standby``): an MX host lists its local standby first and
another server after it, and keeps answering when one of them is down.

asyncpg can walk such a list itself, but not as a server that must fail over needs:

* its ``timeout`` covers the whole list, so one host that drops packets (a dead machine, a
  cut link) uses all of it and the next host is never tried; here every host gets its own
  ``connect_timeout_s``, as libpq's ``connect_timeout`` does;
* it moves on only after an OSError, so a server that refuses with an error (too many
  connections, a database shutting down) ends the walk; here any failure moves on;
* it does not say which server it reached, and a pool built on the list lets every connection
  choose for itself: the lookups could read one server while the change feed reads another,
  which is the lag race again (an invalidation applied before the lookups' server has
  replayed the change).  :func:`connect_listed` returns the server it reached, and
  :func:`connect_to` connects to exactly that one, so the caller can keep two readers on one
  server (``ServerPin``).

Only URI DSNs are walked (what asyncpg accepts); a DSN without a host (PGHOST, the default
socket) is handed to asyncpg as it is and counts as one unnamed server.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import asyncpg

from maplookup.db.errors import NoServer, describe

__all__ = [
    "NoServer",
    "Reached",
    "ServerAddress",
    "ServerPin",
    "connect_listed",
    "connect_to",
    "host_list",
    "target_of",
    "with_target",
]

#: libpq's target_session_attrs values (asyncpg accepts the same).
TARGETS: Final = frozenset(
    {"any", "read-write", "read-only", "primary", "standby", "prefer-standby"}
)

# Asked of each server reached: its role, in one round trip.
_ROLE = (
    "SELECT pg_catalog.pg_is_in_recovery(), "
    "pg_catalog.current_setting('default_transaction_read_only') = 'on'"
)


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """One entry of a host list; ``host`` None: the DSN names none (asyncpg's defaults)."""

    host: str | None
    port: int | None

    def __str__(self) -> str:
        if self.host is None:
            return "(default server)"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Reached:
    """The server a connection reached, and its role when it was reached."""

    address: ServerAddress
    index: int  # its place in the host list (0: the first, the preferred one)
    in_recovery: bool  # a hot standby
    read_only: bool  # default_transaction_read_only (a standby is read-only too)

    @property
    def role(self) -> str:
        return "standby" if self.in_recovery else "primary"


def host_list(dsn: str) -> list[ServerAddress]:
    """The servers a URI DSN names, in order: ``h1:p1,h2:p2`` or ``?host=h1,h2&port=p1,p2``.

    One unnamed entry when it names none (or is not a URI): asyncpg then decides.
    """
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        return [ServerAddress(None, None)]
    hostspec = parts.netloc.rpartition("@")[2]
    query = dict(parse_qsl(parts.query))
    if hostspec:
        entries = [_split_host_port(item) for item in hostspec.split(",")]
    elif query.get("host"):
        ports = query.get("port", "").split(",")
        entries = [
            (unquote(h), ports[i] if i < len(ports) else "")
            for i, h in enumerate(query["host"].split(","))
        ]
    else:
        return [ServerAddress(None, None)]
    return [ServerAddress(h or None, int(p) if p else None) for h, p in entries]


def _split_host_port(item: str) -> tuple[str, str]:
    if item.startswith("["):  # [::1]:5432
        host, _, rest = item[1:].partition("]")
        return host, rest.removeprefix(":")
    host, _, port = item.partition(":")
    return unquote(host), port


def target_of(dsn: str) -> str:
    """The DSN's target_session_attrs, else $PGTARGETSESSIONATTRS, else ``any``."""
    query = dict(parse_qsl(urlsplit(dsn).query))
    target = query.get("target_session_attrs") or os.environ.get("PGTARGETSESSIONATTRS") or "any"
    if target not in TARGETS:
        known = ", ".join(sorted(TARGETS))
        raise NoServer(f"target_session_attrs {target!r} is not one of {known}")
    return target


def with_target(dsn: str, target: str) -> str:
    """``dsn`` with ``target_session_attrs`` set to ``target`` (what the admin CLI forces)."""
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "target_session_attrs"]
    query.append(("target_session_attrs", target))
    return urlunsplit(parts._replace(query=urlencode(query, safe=",/:")))


def _accepts(target: str, reached: Reached) -> bool:
    if target in ("any", "prefer-standby"):
        return target == "any" or reached.in_recovery
    if target == "read-write":
        return not reached.read_only and not reached.in_recovery
    if target == "read-only":
        return reached.read_only or reached.in_recovery
    return reached.in_recovery == (target == "standby")


_REFUSALS: Final = {
    "read-write": "read-only",
    "primary": "a standby",
    "standby": "a primary",
    "read-only": "read-write",
}


async def connect_to(
    dsn: str, address: ServerAddress, *, timeout_s: float, **kwargs: Any
) -> asyncpg.Connection:
    """A connection to exactly ``address`` of ``dsn``'s list (its other settings kept)."""
    if address.host is not None:
        kwargs.update(host=address.host, port=address.port)
    kwargs["target_session_attrs"] = "any"  # this server, whatever it is now
    conn: asyncpg.Connection = await asyncpg.connect(dsn, timeout=timeout_s, **kwargs)
    return conn


async def role_of(
    conn: asyncpg.Connection, address: ServerAddress, index: int, timeout_s: float
) -> Reached:
    """What the server behind ``conn`` is now (primary or standby, read-only or not)."""
    async with asyncio.timeout(timeout_s):
        row = await conn.fetchrow(_ROLE)
    assert row is not None
    return Reached(address, index, bool(row[0]), bool(row[1]))


async def connect_listed(
    dsn: str,
    *,
    target: str | None = None,
    timeout_s: float,
    only: Sequence[int] | None = None,
    **kwargs: Any,
) -> tuple[asyncpg.Connection, Reached]:
    """Walk ``dsn``'s host list in order; the first server that suits ``target`` (default: the
    DSN's target_session_attrs), and which one it is.

    Each host gets ``timeout_s`` of its own, and any failure moves on to the next.
    ``prefer-standby`` takes the first standby, else the first server that answered (libpq's
    second pass, without connecting twice).  ``only``: walk only the hosts at these places
    of the list (is a better server back?).  Raises :class:`NoServer` naming every host and
    why it was passed over.
    """
    target = target or target_of(dsn)
    addresses = host_list(dsn)
    fallback: tuple[asyncpg.Connection, Reached] | None = None
    reasons: list[str] = []
    for index, address in enumerate(addresses):
        if only is not None and index not in only:
            continue
        try:
            conn = await connect_to(dsn, address, timeout_s=timeout_s, **kwargs)
        except Exception as exc:  # any failure: the next host
            reasons.append(f"{address}: {_why(exc, address, timeout_s)}")
            continue
        try:
            reached = await role_of(conn, address, index, timeout_s)
        except Exception as exc:
            conn.terminate()
            reasons.append(f"{address}: {_why(exc, address, timeout_s)}")
            continue
        if _accepts(target, reached):
            if fallback is not None:
                fallback[0].terminate()
            return conn, reached
        if target == "prefer-standby" and fallback is None:
            fallback = conn, reached
            continue
        conn.terminate()
        reasons.append(f"{address} is {_REFUSALS.get(target, reached.role)}")
    if fallback is not None:
        return fallback
    raise NoServer(f"no {_wanted(target)} server reachable ({'; '.join(reasons)})")


def _wanted(target: str) -> str:
    return "usable" if target in ("any", "prefer-standby") else target


def _why(exc: BaseException, address: ServerAddress, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s} s"
    return describe(exc).removesuffix(f" ({address})")  # the address is said already


def describe_list(addresses: Sequence[ServerAddress]) -> str:
    return ", ".join(str(a) for a in addresses)


class ServerPin:
    """The one server a host reads: chosen by the change feed, followed by the lookup pool.

    Why pinned: with a host list, a pool left to itself may reach one server while the change
    feed reaches another.  The feed's invalidations are consistent with what *its* server has
    replayed (``changes.py``); a lookup on a server that has replayed less would read the old
    row and cache it as fresh: the lag race.  So the feed walks the list (``connect_listed``),
    then :meth:`pin` points the pool at the very server it reached, and expires the pool's
    connections, before the cache goes live.  When that server fails, the feed loses its
    connection, the cache stops serving as fresh and the pin is released (:meth:`release`):
    the lookups walk the list on their own meanwhile (answering from whatever server is up:
    failover for misses without waiting for the feed), until the feed has reselected through
    the list and pins again.  Both always move together before anything is served as fresh.

    Without a feed (the cache off) nothing pins: each pool connection walks the list.

    :meth:`connect` is the pool's ``connect`` hook; everything here runs in the asyncio thread
    (the other threads only read ``feed_server`` and ``lookup_server``).
    """

    def __init__(self, connect_timeout_s: float) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._expire: list[Callable[[], Awaitable[None]]] = []  # pools' expire_connections
        self.feed_server: Reached | None = None  # where the pool is pinned
        self.lookup_server: Reached | None = None  # what the last new pool connection reached
        self.pins = 0  # times the feed pinned a server (each one flushes the cache)

    def follow(self, expire: Callable[[], Awaitable[None]]) -> None:
        """Call ``expire()`` (a pool's ``expire_connections``) whenever the pin moves."""
        self._expire.append(expire)

    async def pin(self, reached: Reached) -> None:
        """Point new lookup connections at ``reached`` and retire every older one."""
        self.feed_server = reached
        self.pins += 1
        # Always, also for the same server: connections opened while unpinned may have
        # reached another one.  Cheap: the pool reconnects lazily, and pins are rare.
        for expire in self._expire:
            await expire()

    def release(self) -> None:
        """The feed lost its server: lookups walk the list until it pins again."""
        self.feed_server = None

    async def connect(self, dsn: str | None = None, **kwargs: Any) -> asyncpg.Connection:
        """The pool's connect hook: to the pinned server, else through the list."""
        assert dsn is not None  # the pool is made with the DSN
        timeout_s = kwargs.pop("timeout", None) or self._connect_timeout_s
        pinned = self.feed_server
        if pinned is None:
            conn, reached = await connect_listed(dsn, timeout_s=timeout_s, **kwargs)
        else:
            conn = await connect_to(dsn, pinned.address, timeout_s=timeout_s, **kwargs)
            reached = pinned
        self.lookup_server = reached
        return conn
