"""``maplookup serve``: wire settings, database, lookup and listeners together and run them.

Start-up order matters for mail: listeners are bound only once the database layer exists, and
a database that is down at start-up does not stop the server: it answers TEMP (Postfix defers)
until PostgreSQL is back, which is what a mail admin wants at 3 a.m. after a reboot race.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

import trio

from maplookup import schema
from maplookup.cache import AnswerCache, CacheSettings, CachingSource
from maplookup.changes import ChangeListener, ListenerSettings
from maplookup.config import Settings
from maplookup.db import Database, DatabaseError, PoolSettings, open_database
from maplookup.listeners import BoundListener, bind_all, close_all
from maplookup.lookup import AnswerSource, DatabaseSource, Lookup
from maplookup.maps import LookupSettings
from maplookup.server import Server

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The service cannot start; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Running:
    """The parts of a running service, for tests and (later) metrics."""

    server: Server
    lookup: Lookup
    cache: AnswerCache | None
    listener: ChangeListener | None
    listeners: list[BoundListener]


def cache_settings(settings: Settings) -> CacheSettings:
    return CacheSettings(
        max_entries=settings.cache.max_entries,
        positive_ttl_s=settings.cache.positive_ttl_s,
        negative_ttl_s=settings.cache.negative_ttl_s,
        max_stale_s=settings.cache.max_stale_s,
    )


def lookup_settings(settings: Settings) -> LookupSettings:
    return LookupSettings(
        recipient_delimiter=settings.lookup.recipient_delimiter,
        default_uid=settings.lookup.default_uid,
        default_gid=settings.lookup.default_gid,
    )


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


async def serve(
    settings: Settings,
    dsn: str,
    *,
    on_ready: Callable[[list[BoundListener]], None] | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until SIGTERM/SIGINT (or cancellation), then drain and return."""
    pool_settings = PoolSettings(
        dsn=dsn,
        pool_max_connections=settings.database.pool_max_connections,
        query_timeout_s=settings.database.query_timeout_s,
        connect_timeout_s=settings.database.connect_timeout_s,
    )
    async with open_database(pool_settings) as database:
        await _check_schema(database)
        source: AnswerSource = DatabaseSource(database, lookup_settings(settings))
        cache: AnswerCache | None = None
        listener: ChangeListener | None = None
        if settings.cache.max_entries > 0:
            cache = AnswerCache(cache_settings(settings))
            source = CachingSource(source, cache)
            listener = ChangeListener(
                ListenerSettings(
                    dsn=dsn,
                    connect_timeout_s=settings.database.connect_timeout_s,
                    keepalive_s=settings.cache.listen_keepalive_s,
                ),
                invalidate=cache.invalidate_domains,
                flush=cache.flush,
                set_live=cache.set_live,
            )
        else:
            log.info("cache off: every lookup queries PostgreSQL")
        lookup = Lookup(source)
        bound = await bind_all(settings.listen)
        try:
            server = Server(lookup, settings.limits, bound)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain_on_signal, server, settings.limits.drain_timeout_s)
                if listener is not None:
                    await nursery.start(listener.run, database.bridge)
                await nursery.start(_run_until_drained, server, nursery.cancel_scope)
                for item in bound:
                    log.info("listening: %s", item.description)
                if on_ready is not None:
                    on_ready(bound)
                task_status.started(Running(server, lookup, cache, listener, bound))
        finally:
            await close_all(bound)
    log.info("stopped")


async def _run_until_drained(
    server: Server,
    watchers: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server; once it has drained, stop the tasks that watch for signals."""
    await server.run(task_status=task_status)
    watchers.cancel()


async def _drain_on_signal(server: Server, drain_timeout_s: float) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info(
                "%s received: draining (up to %s s)", signal.Signals(signum).name, drain_timeout_s
            )
            server.drain()
            return
