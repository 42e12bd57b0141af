"""Follow the change log and keep the cache coherent, on a primary or a hot standby.

The reader holds one connection of its own (not one from the lookup pool, which must stay free
for lookups) **to the database the lookups read**, and asks it for every change after the last
position it applied (``feed.changes_after``) every ``poll_interval_s``.  On a standby that
database only reports what it has replayed, so an invalidation is never applied before the
lookups can read the change it announces: the lag race of a reader that LISTENs on the primary
and reads a standby cannot happen (DESIGN.md section 5).

LISTEN only wakes the reader early.  Where the database allows it (a primary), a NOTIFY from
the triggers makes the reader read the log at once, so a single host keeps its
millisecond commit-to-visible latency; where it refuses (a hot standby: "cannot execute LISTEN
during recovery"; a transaction-mode pooler may also swallow it silently) polling alone keeps
the cache coherent, bounded by the poll interval plus the standby's replay lag.  A standby is
recognised (``pg_is_in_recovery()``) and not sent a LISTEN at all; either way it is logged
once, not at every poll, and checked again every ``listen_retry_s``, so a promoted standby
gets its early wake-ups back (logged once too).

Start and lost connections: the cache is not live (nothing served from it as fresh) until
the reader has connected and read the head position; it then flushes and goes live, and
follows from that position.  A read that fails or outlasts ``query_timeout_s`` is a lost
connection.  Reconnection backs off from ``reconnect_min_s`` to ``reconnect_max_s``.  If the
log was pruned past the reader's position (it lagged more than the retention), the log says
``*`` and the cache is flushed.

Host lists (``servers.py``): the reader walks the DSN's list (target_session_attrs
respected, each host its own connect timeout), and before the cache goes live it pins the
lookup pool to the very server it reached (``ServerPin``), so that the lookups and the feed
read one server and move together: when that server fails, the feed loses its connection, the
cache stops serving as fresh, and the reader walks the list again.  While it reads a server
later in the list than the first (or, with ``prefer-standby``, a server that is not a
standby), it tries the better ones every ``prefer_recheck_s`` and moves back to one that suits
again (a local standby back from a restart): one more flush.

Every ``status_interval_s`` it also reads its server's status (primary or standby, replay lag:
``status.py``), and it notes when it last read the log successfully: ``/healthz`` calls the
feed stuck when that is longer ago than ``[cache] change_feed_stuck_after_s``.

A follower (``FeedFollower``; the complete copy of ``cache.mode = "complete"``,
db/copy_follow.py) can ride on the feed: called on the feed's connection when it connects, to
read the log (with what it needs of the changed rows, in the same statement) and after every
read, it sees every change in order, on the same server as the feed and the pool.

Runs in the asyncio thread that owns asyncpg and hands what it read to the cache in the trio
thread through the trio token, coalesced: a burst of changes costs the trio side one call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import asyncpg
import trio

from maplookup.db.database import AsyncioThread
from maplookup.db.errors import describe
from maplookup.db.feed import (
    MAX_CHANGES_PER_READ,
    Change,
    FeedCursor,
    FeedStep,
    changes_after,
    head_position,
)
from maplookup.db.servers import Reached, ServerPin, connect_listed, host_list, target_of
from maplookup.db.status import ServerStatus, read_status

log = logging.getLogger(__name__)

CHANNEL = "maplookup_changes"
APPLICATION_NAME = "maplookup-feed"
# A single host sees a change within this long even if LISTEN is broken; on a standby, within
# this plus the replay lag.  Each poll is one index lookup on the log's primary key.
DEFAULT_POLL_INTERVAL_S = 0.2
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 2.0
# Where LISTEN was refused, it is tried again this often (a standby may have been promoted).
LISTEN_RETRY_S = 30.0
# The server's role and replay lag are read this often (one trivial statement), for /metrics
# and /healthz; a promotion is seen within this.
STATUS_INTERVAL_S = 1.0
# While the feed reads a server later in its host list than the first, the earlier ones are
# tried this often; moving back costs a cache flush, so not much more often than this.
PREFER_RECHECK_S = 30.0


@dataclass(frozen=True, slots=True)
class FeedSettings:
    dsn: str
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    connect_timeout_s: float = 5.0
    # A read of the log taking longer counts as a lost connection (a silent network failure
    # is noticed within poll_interval_s plus this).
    query_timeout_s: float = 5.0
    reconnect_min_s: float = RECONNECT_MIN_S
    reconnect_max_s: float = RECONNECT_MAX_S
    listen_retry_s: float = LISTEN_RETRY_S
    status_interval_s: float = STATUS_INTERVAL_S
    prefer_recheck_s: float = PREFER_RECHECK_S


@dataclass(slots=True)
class FeedCounters:
    notifications: int = 0  # NOTIFYs received (wake-ups only)
    connects: int = 0  # times the feed went live on a fresh connection
    connection_losses: int = 0
    reads: int = 0  # reads of the log
    changes: int = 0  # change-log rows applied
    listen_refusals: int = 0  # times LISTEN was not possible (a standby, or refused)
    server_changes: int = 0  # times the feed went live on another server than before


class FeedFollower(Protocol):
    """Something that follows the change log beside the cache, on the feed's own connection
    (the complete copy: db/copy_follow.py), so that it reads the very server the feed reads
    and sees every change in order.

    ``start`` runs when the feed has connected and read the head, before it goes live: it
    returns the position to follow from (the head, or its own position).  ``changes_after``
    reads the log in place of ``feed.changes_after`` (same contract), so that a follower can
    read what it needs in the same statement.  ``apply`` runs after every read of the log
    (``step.changes`` may be 0) and returns the position to follow from (the step's, or a later
    one when it loaded a fresh snapshot).  An exception from any of them is a lost connection.
    """

    async def start(self, conn: asyncpg.Connection, reached: Reached, head: int) -> int: ...
    async def changes_after(
        self, conn: asyncpg.Connection, position: int, max_rows: int
    ) -> list[Change]: ...
    async def apply(self, conn: asyncpg.Connection, step: FeedStep, read_at: float) -> int: ...


class _Lost(Exception):
    """The feed connection is gone (its termination listener fired)."""


class _Reselect(Exception):
    """An earlier server of the host list suits again: walk the list afresh."""


class _BetterServers:
    """Is a server the host list prefers to the one read back?  Probed every
    ``prefer_recheck_s`` in a task of its own, so that a dead host (its connect timeout)
    never delays the feed's reads.

    Better: a server listed earlier that suits the DSN's target; with ``prefer-standby``, a
    standby listed earlier, or any standby when the feed reads a non-standby (the fallback).
    """

    def __init__(self, settings: FeedSettings, reached: Reached, now: float) -> None:
        self._settings = settings
        self._next = now + settings.prefer_recheck_s
        self._task: asyncio.Task[bool] | None = None
        self._target = target_of(settings.dsn)
        count = len(host_list(settings.dsn))
        self._only: list[int] = list(range(reached.index))
        if self._target == "prefer-standby":
            self._target = "standby"
            if not reached.in_recovery:
                self._only = [i for i in range(count) if i != reached.index]

    def better_suits(self, now: float) -> bool:
        """True once a probe found a better server; starts probes when due."""
        if not self._only:
            return False
        task = self._task
        if task is not None and task.done():
            self._task = None
            if not task.cancelled() and task.exception() is None and task.result():
                return True
        if self._task is None and now >= self._next:
            self._task = asyncio.get_running_loop().create_task(self._probe())
            self._next = now + self._settings.prefer_recheck_s
        return False

    async def _probe(self) -> bool:
        settings = self._settings
        try:
            probe, _better = await connect_listed(
                settings.dsn,
                target=self._target,
                timeout_s=settings.connect_timeout_s,
                only=self._only,
                server_settings={"application_name": APPLICATION_NAME},
            )
        except Exception:
            return False  # none of them: stay
        probe.terminate()
        return True

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class ChangeFeed:
    """Feeds ``invalidate(domains)``, ``flush()`` and ``set_live(bool)`` in the trio thread.

    ``live``: the cache may serve as fresh; ``position``: the change-log position whose
    invalidations the cache has been given (trio thread); ``listening``: LISTEN is in place on
    the current connection (else the reader only polls); ``in_recovery``: that database is a
    hot standby; ``server``: the server it reads (None while disconnected), ``status``: that
    server's last status reading; ``last_read_at``: ``time.monotonic()`` of the last
    successful read of the log (None before the first).
    """

    def __init__(
        self,
        settings: FeedSettings,
        invalidate: Callable[[set[str]], None],
        flush: Callable[[], None],
        set_live: Callable[[bool], None],
        pin: ServerPin | None = None,
        follower: FeedFollower | None = None,
    ) -> None:
        self._settings = settings
        self._pin = pin
        self._follower = follower
        self._several = len(host_list(settings.dsn)) > 1
        self._invalidate = invalidate
        self._flush = flush
        self._set_live = set_live
        self._token: trio.lowlevel.TrioToken | None = None
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._pending_flush = False
        self._pending_position: int | None = None
        self._delivery_scheduled = False
        self._wake: asyncio.Event | None = None
        self._listen_state: bool | None = None  # what was last logged about LISTEN
        self.counters = FeedCounters()
        self.live = False
        self.listening = False
        self.in_recovery: bool | None = None  # the database is a hot standby (None: unknown)
        self.position: int | None = None
        self.server: Reached | None = None
        self.status: ServerStatus | None = None
        self.last_read_at: float | None = None
        self.started_at = time.monotonic()  # "stuck since start-up" counts from here
        self._last_address: object = None

    async def run(
        self,
        bridge: AsyncioThread,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until cancelled.  Reports started at once: the server must not wait for it."""
        self._token = trio.lowlevel.current_trio_token()
        task_status.started()
        await bridge.run(self.follow_forever())

    # -- asyncio thread ------------------------------------------------------------------------

    async def follow_forever(self) -> None:
        """Connect, follow, and reconnect with a growing delay, until cancelled."""
        settings = self._settings
        delay = settings.reconnect_min_s
        failures = 0
        while True:
            connects = self.counters.connects
            try:
                conn, reached = await connect_listed(
                    settings.dsn,
                    timeout_s=settings.connect_timeout_s,
                    server_settings={
                        "application_name": APPLICATION_NAME,
                        # The server ends a statement that outlasts the client's timeout
                        # itself: a connection dropped after a timeout leaves no backend
                        # behind still waiting (on a lock, say) to pile up with each retry.
                        "statement_timeout": str(int(settings.query_timeout_s * 1000)),
                    },
                )
            except Exception as exc:  # any failure to connect: retry, never stop the server
                failures += 1
                if failures == 1:
                    log.warning("cannot read the change feed: %s; retrying", describe(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, settings.reconnect_max_s)
                continue
            try:
                await self._follow(conn, reached)
            except _Reselect:
                log.info("a server the host list prefers is back: moving to it")
            except Exception as exc:
                # asyncpg can raise more than its documented errors on a connection the
                # server just killed (InternalClientError "cannot switch to state"): a lost
                # connection all the same.
                if self.counters.connects > connects:
                    self.counters.connection_losses += 1
                    log.warning(
                        "change feed connection lost (%r): cache not trusted until it is back",
                        exc,
                    )
                else:
                    failures += 1
                    if failures == 1:
                        log.warning("cannot read the change feed: %r; retrying", exc)
            finally:
                self._post_live(False)
                if self._pin is not None:
                    self._pin.release()
                self.listening = False
                self.server = None
                self._wake = None
                conn.terminate()
            if self.counters.connects > connects:
                delay = settings.reconnect_min_s  # it was live: start the back-off afresh
                failures = 0
            # Not at once: a connection that drops right after it went live must not loop hot.
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.reconnect_max_s)

    async def _follow(self, conn: asyncpg.Connection, reached: Reached) -> None:
        settings = self._settings
        loop = asyncio.get_running_loop()
        self.server = reached
        self.status = await read_status(conn, settings.query_timeout_s)
        wake = self._wake = asyncio.Event()
        lost = asyncio.Event()

        def on_termination(_conn: object) -> None:
            lost.set()
            wake.set()

        conn.add_termination_listener(on_termination)
        # LISTEN before the head is read: a change committed in between wakes the first poll.
        self.listening = await self._try_listen(conn)
        async with asyncio.timeout(settings.query_timeout_s):
            head = await head_position(conn)
        if self._follower is not None:
            # Not under the query timeout: a first snapshot can take seconds (its own reads
            # are bounded one by one).
            head = await self._follower.start(conn, reached, head)
        cursor = FeedCursor(head)
        if self._pin is not None:
            # Before going live: from now on the lookups read this server too.
            await self._pin.pin(reached)
        self._note_server(reached)
        self.last_read_at = time.monotonic()
        self.counters.connects += 1
        # Changes before the head may have been missed: flush, then follow from the head.
        self._post_live(True, cursor.position)
        recheck = _BetterServers(settings, reached, loop.time())
        try:
            await self._poll(conn, cursor, wake, lost, recheck)
        finally:
            recheck.cancel()

    async def _poll(
        self,
        conn: asyncpg.Connection,
        cursor: FeedCursor,
        wake: asyncio.Event,
        lost: asyncio.Event,
        recheck: _BetterServers,
    ) -> None:
        """Read the log at every wake-up or poll interval, until the connection fails."""
        settings = self._settings
        loop = asyncio.get_running_loop()
        next_listen_try = loop.time() + settings.listen_retry_s
        next_status = loop.time() + settings.status_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(settings.poll_interval_s):
                    await wake.wait()
            if lost.is_set():
                raise _Lost("connection terminated")
            wake.clear()
            if not self.listening and loop.time() >= next_listen_try:
                self.listening = await self._try_listen(conn)
                next_listen_try = loop.time() + settings.listen_retry_s
            read = changes_after if self._follower is None else self._follower.changes_after
            async with asyncio.timeout(settings.query_timeout_s):
                batch = await read(conn, cursor.position, MAX_CHANGES_PER_READ)
            self.counters.reads += 1
            read_at = self.last_read_at = time.monotonic()
            step = cursor.advance(batch)
            if self._follower is not None:
                cursor.position = await self._follower.apply(conn, step, read_at)
            if step.changes:
                self.counters.changes += step.changes
                self._post_step(step)
            if len(batch) >= MAX_CHANGES_PER_READ:
                wake.set()  # more to read: no waiting
            if loop.time() >= next_status:
                self.status = await read_status(conn, settings.query_timeout_s)
                next_status = loop.time() + settings.status_interval_s
            if recheck.better_suits(loop.time()):
                raise _Reselect("a server the host list prefers is back")

    def _note_server(self, reached: Reached) -> None:
        """Say which server the feed (and the lookups) read, when that is news."""
        if reached.address == self._last_address:
            return
        if self._last_address is not None:
            self.counters.server_changes += 1
        if self._several or self._last_address is not None:
            log.info(
                "reading %s (%s, host %d of the list): the change feed and the lookups",
                reached.address,
                reached.role,
                reached.index + 1,
            )
        self._last_address = reached.address

    async def _try_listen(self, conn: asyncpg.Connection) -> bool:
        """LISTEN on ``conn`` where the database allows it; False (said once per change of
        state) where it does not.

        A hot standby is asked first (``pg_is_in_recovery()``) rather than sent a LISTEN it
        refuses: a refusal is an ERROR line in PostgreSQL's own log at every retry.
        """
        async with asyncio.timeout(self._settings.query_timeout_s):
            self.in_recovery = bool(await conn.fetchval("SELECT pg_is_in_recovery()"))
            if self.in_recovery:
                self._listen_refused("the database is a hot standby")
                return False
            try:
                await conn.add_listener(CHANNEL, self._on_notification)
            except asyncpg.PostgresError as exc:
                # The connection stays usable: refusing LISTEN does not end the session.
                self._listen_refused(f"LISTEN refused: {exc}")
                return False
        if self._listen_state is False:
            log.info("LISTEN in place again (a promoted standby?): changes wake the feed at once")
        self._listen_state = True
        return True

    def _listen_refused(self, why: str) -> None:
        self.counters.listen_refusals += 1
        if self._listen_state is not False:
            log.info(
                "no LISTEN (%s): following the change log every %s s, which keeps the cache "
                "consistent with what this database has replayed",
                why,
                self._settings.poll_interval_s,
            )
        self._listen_state = False

    def _on_notification(self, _conn: object, _pid: int, _channel: str, _payload: object) -> None:
        # Only a wake-up: what changed is read from the log, in order, with its position.
        self.counters.notifications += 1
        if self._wake is not None:
            self._wake.set()

    def _post_step(self, step: FeedStep) -> None:
        with self._lock:
            if step.flush:
                self._pending_flush = True
            self._pending.update(step.domains)
            self._pending_position = step.position
            if self._delivery_scheduled:
                return
            self._delivery_scheduled = True
        self._call_in_trio(self._deliver)

    def _post_live(self, live: bool, position: int | None = None) -> None:
        if self.live != live:
            self.live = live
            self._call_in_trio(self._go_live if live else self._go_down, position)

    def _call_in_trio(self, fn: Callable[..., object], *args: object) -> None:
        if self._token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(fn, *args)

    # -- trio thread ---------------------------------------------------------------------------

    def _go_live(self, position: int | None) -> None:
        self.position = position
        self._set_live(True)

    def _go_down(self, _position: int | None) -> None:
        self._set_live(False)

    def _deliver(self) -> None:
        with self._lock:
            domains, self._pending = self._pending, set()
            flush, self._pending_flush = self._pending_flush, False
            position, self._pending_position = self._pending_position, None
            self._delivery_scheduled = False
        if flush:
            self._flush()
        if domains:
            self._invalidate(domains)
        if position is not None:
            self.position = position
