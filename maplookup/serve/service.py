"""``maplookup serve``: wire settings, database, lookup and listeners together and run them.

Start-up order matters for mail: listeners are bound only once the database layer exists, and
a database that is down at start-up does not stop the server: it answers TEMP (Postfix defers)
until PostgreSQL is back, which is what a mail admin wants at 3 a.m. after a reboot race.

Signals: SIGTERM/SIGINT drain and stop; SIGHUP re-reads the configuration and applies what can
change live (see ``Service.reload``), keeping every established connection.
"""

from __future__ import annotations

import gc
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from maplookup import __version__
from maplookup.config import ConfigError, HostPort, Settings
from maplookup.db import schema
from maplookup.db.changes import ChangeFeed, FeedSettings
from maplookup.db.copy_follow import CopyFollower, CopySettings
from maplookup.db.database import Database, DatabaseError, PoolSettings, open_database
from maplookup.db.servers import NoServer, target_of
from maplookup.lookup.answer import AnswerSource, DatabaseSource, Lookup
from maplookup.lookup.cache import AnswerCache, CachingSource
from maplookup.lookup.complete.source import CompleteSource
from maplookup.metrics import (
    DatabaseStats,
    LookupStats,
    MaplookupCollector,
    TimedAnswerer,
    TimedLookupBackend,
    make_registry,
    render,
)
from maplookup.metrics.peers import WorkerPeers, gather, serve_own_metrics
from maplookup.serve.copy_health import copy_health
from maplookup.serve.feed_health import feed_health, server_details
from maplookup.serve.http_admin import open_admin_listeners, serve_admin_http
from maplookup.serve.listeners import (
    BoundListener,
    ListenError,
    ListenerSpec,
    bind_all,
    close_all,
)
from maplookup.serve.privileges import PrivilegeError, drop_to
from maplookup.serve.reload import (
    Applied,
    apply_settings,
    cache_settings,
    lookup_settings,
    query_log,
)
from maplookup.serve.sdnotify import SystemdNotifier
from maplookup.serve.server import Server

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The service cannot start; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Running:
    """The parts of a running service, for tests and metrics."""

    service: Service
    server: Server
    lookup: Lookup
    cache: AnswerCache | None
    listener: ChangeFeed | None  # the change feed that keeps the cache coherent
    lookup_stats: LookupStats
    database_stats: DatabaseStats
    collector: MaplookupCollector
    copy: CompleteSource | None = None  # cache.mode = "complete"

    @property
    def listeners(self) -> list[BoundListener]:
        return self.server.listeners


async def _check_schema(database: Database) -> None:
    """Refuse a schema this version cannot answer from; tolerate a database that is down."""
    try:
        present = await database.fetch_value(
            "SELECT to_regclass('maplookup.schema_version') IS NOT NULL", ()
        )
        version = None
        if present == "True":
            version = await database.fetch_value("SELECT version FROM maplookup.schema_version", ())
    except DatabaseError as exc:
        log.warning("database not reachable at start-up (%s); answering TEMP until it is", exc)
        return
    try:
        schema.check_usable(None if version is None else int(version))
    except schema.SchemaError as exc:
        raise StartupError(str(exc)) from exc


_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# /healthz must answer well within a monitoring system's own timeout.
HEALTH_DATABASE_TIMEOUT_S = 2.0


class Service:
    """One running maplookup: database, cache, change feed, server; reloadable."""

    def __init__(
        self,
        settings: Settings,
        dsn: str,
        reload_settings: Callable[[], Settings] | None = None,
        notifier: SystemdNotifier | None = None,
        *,
        reuse_port: bool = False,
        inherited: Mapping[ListenerSpec, socket.socket] | None = None,
        peers: WorkerPeers | None = None,
        freeze_startup_objects: bool = False,
    ) -> None:
        self.settings = settings
        # Only for a process of its own (``maplookup serve``): gc.freeze() is process-wide.
        self._freeze_startup_objects = freeze_startup_objects
        # With several workers: which one this is (worker 0 serves /metrics for all).
        self._peers = peers if peers is not None and peers.count > 1 else None
        # With several workers: TCP ports are shared (SO_REUSEPORT), unix sockets inherited.
        self._bind_options: dict[str, Any] = {"reuse_port": reuse_port, "inherited": inherited}
        self._notifier = notifier or SystemdNotifier(environ={})
        self._dsn = dsn
        self._reload_settings = reload_settings
        self._running: Running | None = None
        # Set once the server answers: a SIGHUP before that (a restarted worker, a reload
        # right after start) waits for it instead of reloading a half-started server.
        self._serving: trio.Event | None = None
        self._source: DatabaseSource | None = None
        self.reloads = 0
        self.rejected_reloads = 0

    async def run(
        self,
        *,
        on_ready: Callable[[list[BoundListener]], None] | None = None,
        task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until SIGTERM/SIGINT (or ``drain()``), then drain and return."""
        # Signals are caught from the start: one that arrives while the service starts (the
        # port may already accept connections) waits here and then drains the server,
        # instead of killing the process with the default action.
        with trio.open_signal_receiver(*_HANDLED_SIGNALS) as signals:
            await self._run(signals, on_ready=on_ready, task_status=task_status)

    async def _run(
        self,
        signals: AsyncIterator[int],
        *,
        on_ready: Callable[[list[BoundListener]], None] | None,
        task_status: trio.TaskStatus[Running],
    ) -> None:
        settings = self.settings
        try:
            target_of(self._dsn)
        except NoServer as exc:
            raise StartupError(f"[database] dsn: {exc}") from exc
        pool_settings = PoolSettings(
            dsn=self._dsn,
            pool_max_connections=settings.database.pool_max_connections,
            query_timeout_s=settings.database.query_timeout_s,
            connect_timeout_s=settings.database.connect_timeout_s,
            max_keys_per_query=settings.database.max_keys_per_query,
        )
        async with open_database(pool_settings) as database:
            await _check_schema(database)
            lookup_stats, database_stats = LookupStats(), DatabaseStats()
            self._source = DatabaseSource(
                TimedLookupBackend(database, database_stats), lookup_settings(settings)
            )
            source: AnswerSource = self._source
            cache: AnswerCache | None = None
            copy: CompleteSource | None = None
            follower: CopyFollower | None = None
            if settings.cache.max_entries > 0:
                cache = AnswerCache(cache_settings(settings))
                source = CachingSource(source, cache)
            if settings.cache.mode == "complete":
                # In front of the LRU path, which answers until the copy is loaded, when it
                # is older than max_stale_s, and for good if it is refused for its size.
                copy = CompleteSource(
                    source,
                    self._source,
                    settings.cache.max_stale_s,
                    memo_entries=settings.cache.complete_memo_entries,
                )
                follower = CopyFollower(
                    copy,
                    CopySettings(
                        max_bytes=settings.cache.complete_max_bytes,
                        query_timeout_s=settings.database.query_timeout_s,
                    ),
                )
                source = copy
            listener: ChangeFeed | None = None
            if cache is not None or copy is not None:
                # The feed reads the database the lookups read (a standby included): its
                # invalidations can never overtake that database's replay.  With a host list
                # it chooses the server and pins the lookup pool to it (db/servers.py).  The
                # complete copy rides on it (db/copy_follow.py): same server, same order.
                listener = ChangeFeed(
                    FeedSettings(
                        dsn=self._dsn,
                        poll_interval_s=settings.cache.change_feed_poll_interval_s,
                        connect_timeout_s=settings.database.connect_timeout_s,
                        query_timeout_s=settings.database.query_timeout_s,
                    ),
                    invalidate=cache.invalidate_domains if cache is not None else _ignore,
                    flush=cache.flush if cache is not None else _nothing,
                    set_live=cache.set_live if cache is not None else _ignore,
                    pin=database.pin,
                    follower=follower,
                )
            else:
                log.info("cache off: every lookup queries PostgreSQL")
            lookup = Lookup(source, self._source)
            self._answerer = TimedAnswerer(
                lookup, lookup_stats, query_log=query_log(settings.query_log_sample_rate)
            )
            server = Server(
                self._answerer,
                settings.limits,
                await bind_all(settings.listen, **self._bind_options),
                settings.listen.allowed_clients,
            )
            if settings.user is not None:
                try:
                    drop_to(settings.user)
                except PrivilegeError as exc:
                    await close_all(server.listeners)
                    raise StartupError(str(exc)) from exc
            collector = MaplookupCollector(
                lookups=lookup_stats,
                database=database_stats,
                server=server.counters,
                cache=cache,
                listener=listener,
                pool_state=database.pool_state,
                servers=database.pin,
                statement_counts=database.batch_counts,
                copy=copy,
                info={"version": __version__},
            )
            running = Running(
                self,
                server,
                lookup,
                cache,
                listener,
                lookup_stats,
                database_stats,
                collector,
                copy,
            )
            self._running = running
            self._database = database
            serving = self._serving = trio.Event()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._handle_signals, signals)
                    if listener is not None:
                        await nursery.start(listener.run, database.bridge)
                    await nursery.start(_run_until_drained, server, nursery.cancel_scope)
                    registry = make_registry(collector)
                    if settings.metrics.listen is not None:
                        await self._start_metrics(nursery, settings.metrics.listen, registry)
                    elif self._peers is not None:
                        await nursery.start(
                            serve_own_metrics, self._peers, partial(render, registry)
                        )
                    for item in server.listeners:
                        log.info("listening: %s", item.description)
                    if copy is not None:
                        await _wait_for_the_copy(copy, settings.cache.complete_ready_timeout_s)
                    if on_ready is not None:
                        on_ready(server.listeners)
                    await nursery.start(self._notifier.run_watchdog)
                    if self._freeze_startup_objects:
                        # What exists now (modules, pool, listeners, the cache's dict) lives
                        # as long as the process: out of the collector's sight, so that a full
                        # collection walks only what changes (bench/README.md, "Garbage
                        # collection": 60 ms pauses became 3 ms).
                        gc.freeze()
                    self._notifier.ready(status=self._status_line())
                    serving.set()
                    task_status.started(running)
            finally:
                with trio.CancelScope(shield=True):
                    await close_all(server.listeners)
        log.info("stopped")

    async def _start_metrics(
        self, nursery: trio.Nursery, endpoint: HostPort, registry: CollectorRegistry
    ) -> None:
        try:
            admin_listeners = await open_admin_listeners(endpoint.host, endpoint.port)
        except OSError as exc:
            raise StartupError(f"cannot listen for metrics on {endpoint}: {exc.strerror}") from exc
        peers = self._peers

        async def metrics() -> bytes:
            own = render(registry)
            return own if peers is None else await gather(peers, own)

        await nursery.start(serve_admin_http, admin_listeners, metrics, self.health)
        log.info("metrics and health on http://%s/metrics and /healthz", endpoint)

    async def health(self) -> tuple[bool, dict[str, object]]:
        """Healthy: PostgreSQL answers, and (with the cache on) the change feed has read the
        log within ``[cache] change_feed_stuck_after_s``; the details say which server each
        connection is on, the feed's position and delay, and a standby's replay lag.

        A feed that is down for less than the bound (a reconnect, a failover through the host
        list) is reported but not unhealthy: lookups are answered from the database
        meanwhile, and a monitor should not page for a two-second reselection.
        """
        details: dict[str, object] = {}
        problems: list[str] = []
        try:
            with trio.fail_after(HEALTH_DATABASE_TIMEOUT_S):
                await self._database.ping()
            details["database"] = "ok"
        except (DatabaseError, trio.TooSlowError) as exc:
            reason = f"unreachable: {exc or 'timeout'}"
            details["database"] = reason
            problems.append(f"database {reason}")
        lookups = self._database.pin.lookup_server
        running = self._running
        feed = running.listener if running is not None else None
        # The feed reads its server's role every second; the pool's is from when it connected.
        status = None
        if feed is not None and feed.server is not None and lookups is not None:
            status = feed.status if feed.server.address == lookups.address else None
        details["lookups_server"] = server_details(lookups, status)
        if feed is not None:
            details["notifications"] = "live" if feed.live else "down"
            report = feed_health(feed, self.settings.cache.change_feed_stuck_after_s)
            details["change_feed"] = report.details
            if report.problem is not None:
                problems.append(report.problem)
            if report.warning is not None:
                details["warnings"] = [report.warning]
        else:
            details["notifications"] = "off (no cache)"
        copy = running.copy if running is not None else None
        if copy is not None:
            details["complete_copy"], problem = copy_health(copy)
            if problem is not None:
                problems.append(problem)
        if problems:
            details["problems"] = problems
        return not problems, details

    def _status_line(self) -> str:
        assert self._running is not None
        return "serving on " + ", ".join(b.description for b in self._running.server.listeners)

    def drain(self) -> None:
        self._notifier.stopping()
        if self._running is not None:
            log.info("draining (up to %s s)", self.settings.limits.drain_timeout_s)
            self._running.server.drain()

    async def _handle_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                serving = self._serving
                assert serving is not None  # created before this task starts
                if not serving.is_set():
                    log.info("SIGHUP received while starting: reloading once serving")
                    await serving.wait()
                log.info("SIGHUP received: reloading the configuration")
                self._notifier.reloading()
                await self.reload()
                self._notifier.ready(status=self._status_line())
                continue
            log.info("%s received", signal.Signals(signum).name)
            self.drain()
            return

    async def reload(self) -> bool:
        """Re-read the configuration and apply it live; False (old one kept) if it is unusable.

        Applied live: listeners added and removed (established connections stay), limits,
        cache size and TTLs, the recipient delimiter and default ids (the cache is flushed),
        the log level.  Database, pool and embedded settings, and turning the cache on or off,
        need a restart: they are reported and left as they are.
        """
        if self._reload_settings is None or self._running is None:
            log.warning("reload: nothing to reload from")
            return False
        try:
            new = self._reload_settings()
        except ConfigError as exc:
            self.rejected_reloads += 1
            log.error("reload rejected, keeping the running configuration: %s", exc)
            return False
        try:
            changes = await self._apply(new)
        except ListenError as exc:
            self.rejected_reloads += 1
            log.error("reload rejected, keeping the running configuration: %s", exc)
            return False
        self.reloads += 1
        log.info("configuration reloaded: %s", ", ".join(changes) or "nothing changed")
        return True

    async def _apply(self, new: Settings) -> list[str]:
        assert self._running is not None
        assert self._source is not None
        changes = await apply_settings(
            self.settings,
            new,
            Applied(
                self._running.server,
                self._running.cache,
                self._source,
                self._answerer,
                self._running.copy,
            ),
            self._bind_options,
        )
        self.settings = new.model_copy(
            update={"database": self.settings.database, "embedded": self.settings.embedded}
        )
        return changes


async def serve(
    settings: Settings,
    dsn: str,
    *,
    reload_settings: Callable[[], Settings] | None = None,
    notifier: SystemdNotifier | None = None,
    on_ready: Callable[[list[BoundListener]], None] | None = None,
    reuse_port: bool = False,
    inherited: Mapping[ListenerSpec, socket.socket] | None = None,
    peers: WorkerPeers | None = None,
    freeze_startup_objects: bool = False,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a Service until SIGTERM/SIGINT (or its ``drain()``)."""
    service = Service(
        settings,
        dsn,
        reload_settings,
        notifier,
        reuse_port=reuse_port,
        inherited=inherited,
        peers=peers,
        freeze_startup_objects=freeze_startup_objects,
    )
    await service.run(on_ready=on_ready, task_status=task_status)


async def _wait_for_the_copy(copy: CompleteSource, timeout_s: float) -> None:
    """Ready only with the copy: lookups are answered meanwhile (by the database), but a
    host that says it is ready answers from memory.  Bounded (complete_ready_timeout_s), so
    that a database down at boot does not make systemd kill the server at its start timeout.
    """
    log.info("complete mode: loading the copy before reporting ready")
    with trio.move_on_after(timeout_s):
        await copy.settled.wait()
        return
    log.warning(
        "complete mode: no copy after %s s (cache.complete_ready_timeout_s): reporting ready "
        "anyway; lookups go to the database until the copy is loaded",
        timeout_s,
    )


def _ignore(_value: object) -> None:
    """The feed's cache callbacks when only the complete copy follows it (no LRU cache)."""


def _nothing() -> None:
    """As ``_ignore``, for the callback without an argument."""


async def _run_until_drained(
    server: Server,
    watchers: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server; once it has drained, stop the tasks that watch for signals."""
    await server.run(task_status=task_status)
    watchers.cancel()
