"""LISTEN for data changes and keep the cache coherent, across connection losses.

schema.sql NOTIFYs channel ``maplookup_changes`` with the domains each committed change
touched.  This listener holds its own connection (not one from the lookup pool, which must
stay free for lookups), runs in the asyncio thread that owns asyncpg, and hands batches of
domains to the cache in the trio thread through the trio token.  Notifications that arrive
together are coalesced into one hand-over, so a burst of 10,000 changes costs the trio side one
call, not 10,000.

When the connection drops, notifications may be lost: the cache is told it is no longer live
(nothing is served from it as fresh), and once LISTEN is in place again it is flushed and goes
live.  Reconnection backs off from ``RECONNECT_MIN_S`` to ``RECONNECT_MAX_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import trio

from maplookup.db.database import AsyncioThread

log = logging.getLogger(__name__)

CHANNEL = "maplookup_changes"
FLUSH_ALL = "*"
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 2.0


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    dsn: str
    connect_timeout_s: float = 5.0
    # A silent network failure is noticed within about this long.
    keepalive_s: float = 5.0
    reconnect_min_s: float = RECONNECT_MIN_S
    reconnect_max_s: float = RECONNECT_MAX_S


@dataclass(slots=True)
class ListenerCounters:
    notifications: int = 0
    connects: int = 0
    connection_losses: int = 0


def _listen_refused(exc: BaseException) -> str:
    """The one log line for a LISTEN the database refuses, saying what it means for answers."""
    if isinstance(exc, asyncpg.ReadOnlySQLTransactionError) or "recovery" in str(exc):
        return (
            f"LISTEN refused: the database is a hot standby ({exc}); change notifications "
            "need the primary, so nothing is served from the cache (every lookup asks the "
            "database) until LISTEN works; retrying with a growing delay"
        )
    return f"LISTEN refused ({exc!r}): cache not trusted until it works; retrying"


class ChangeListener:
    """Feeds ``invalidate(domains)``, ``flush()`` and ``set_live(bool)`` in the trio thread."""

    def __init__(
        self,
        settings: ListenerSettings,
        invalidate: Callable[[set[str]], None],
        flush: Callable[[], None],
        set_live: Callable[[bool], None],
    ) -> None:
        self._settings = settings
        self._invalidate = invalidate
        self._flush = flush
        self._set_live = set_live
        self._token: trio.lowlevel.TrioToken | None = None
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._pending_flush = False
        self._delivery_scheduled = False
        self.counters = ListenerCounters()
        self.live = False

    async def run(
        self,
        bridge: AsyncioThread,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until cancelled.  Reports started at once: the server must not wait for it."""
        self._token = trio.lowlevel.current_trio_token()
        task_status.started()
        await bridge.run(self._listen_forever())

    # -- asyncio thread ------------------------------------------------------------------------

    async def _listen_forever(self) -> None:
        delay = self._settings.reconnect_min_s
        failures = 0
        while True:
            try:
                conn = await asyncpg.connect(
                    self._settings.dsn,
                    timeout=self._settings.connect_timeout_s,
                    server_settings={"application_name": "maplookup-listen"},
                )
            except Exception as exc:  # any failure to connect: retry, never stop the server
                failures += 1
                if failures == 1:
                    log.warning("cannot LISTEN for changes: %s; retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.reconnect_max_s)
                continue
            try:
                await conn.add_listener(CHANNEL, self._on_notification)
            except Exception as exc:
                # Connected, but LISTEN refused (a hot standby: "cannot execute LISTEN during
                # recovery"): a failure like any other, with the same growing delay.  Resetting
                # the delay on connect made this a loop of ten attempts and log lines a second.
                conn.terminate()
                failures += 1
                if failures == 1:
                    log.warning("%s", _listen_refused(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.reconnect_max_s)
                continue
            delay = self._settings.reconnect_min_s
            if failures:
                log.info("LISTEN for changes established after %d failed attempts", failures)
            failures = 0
            try:
                await self._serve_connection(conn)
            except Exception as exc:
                # asyncpg can raise more than its documented errors on a connection the
                # server just killed (InternalClientError "cannot switch to state"): a lost
                # connection all the same.
                self.counters.connection_losses += 1
                log.warning(
                    "LISTEN connection failed (%r): cache not trusted until it is back", exc
                )
            finally:
                self._post_live(False)
                conn.terminate()
            # Not at once: a connection that drops right after LISTEN must not make a hot loop.
            await asyncio.sleep(delay)

    async def _serve_connection(self, conn: asyncpg.Connection) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        self.counters.connects += 1
        # LISTEN is in place: from now on no change goes unnoticed.  Anything before may have.
        self._post_live(True)
        while not lost.is_set():
            try:
                await asyncio.wait_for(lost.wait(), timeout=self._settings.keepalive_s)
            except TimeoutError:
                try:
                    await asyncio.wait_for(
                        conn.fetchval("SELECT 1"), timeout=self._settings.connect_timeout_s
                    )
                except Exception:
                    break
        self.counters.connection_losses += 1
        log.warning("LISTEN connection lost: cache not trusted until it is back")

    def _on_notification(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self.counters.notifications += 1
        text = str(payload)
        with self._lock:
            if text == FLUSH_ALL:
                self._pending_flush = True
            else:
                self._pending.update(d for d in text.split(",") if d)
            if self._delivery_scheduled:
                return
            self._delivery_scheduled = True
        self._call_in_trio(self._deliver)

    def _post_live(self, live: bool) -> None:
        if self.live != live:
            self.live = live
            self._call_in_trio(self._set_live, live)

    def _call_in_trio(self, fn: Callable[..., object], *args: object) -> None:
        if self._token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(fn, *args)

    # -- trio thread ---------------------------------------------------------------------------

    def _deliver(self) -> None:
        with self._lock:
            domains, self._pending = self._pending, set()
            flush, self._pending_flush = self._pending_flush, False
            self._delivery_scheduled = False
        if flush:
            self._flush()
        if domains:
            self._invalidate(domains)
