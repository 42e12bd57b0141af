"""Reload: what differs between the running settings and newly read ones, applied live.

Owns the diff (``apply_settings``: listeners, limits, cache, lookup, query log, logging live;
the rest reported as needing a restart) and the translations from ``Settings`` to the
components' own settings, which start-up (``service``) and reload share.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from maplookup.config import Settings
from maplookup.logsetup import QueryLog, configure_logging
from maplookup.lookup.answer import DatabaseSource
from maplookup.lookup.cache import AnswerCache, CacheSettings
from maplookup.lookup.complete.source import CompleteSource
from maplookup.maps import LookupSettings
from maplookup.metrics import TimedAnswerer
from maplookup.serve.listeners import (
    BoundListener,
    ListenError,
    bind_spec,
    close_all,
    listener_specs,
)
from maplookup.serve.server import Server

# The service's logger: a reload logs under the same name as before the split.
log = logging.getLogger("maplookup.serve.service")


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
        smtputf8_enable=settings.lookup.smtputf8_enable,
    )


def query_log(sample_rate: float) -> QueryLog:
    return QueryLog(sample_rate, logging.getLogger("maplookup.queries"))


@dataclass(frozen=True, slots=True)
class Applied:
    """The running parts a reload changes."""

    server: Server
    cache: AnswerCache | None
    source: DatabaseSource
    answerer: TimedAnswerer
    copy: CompleteSource | None = None


async def apply_settings(
    old: Settings, new: Settings, running: Applied, bind_options: dict[str, Any]
) -> list[str]:
    """Apply what changed from ``old`` to ``new``; the changes, for the log.

    Raises ``ListenError`` (nothing changed) when a new listener cannot be bound.
    """
    server, cache = running.server, running.cache
    changes: list[str] = []

    # Listeners first: binding can fail, and then nothing at all may change.
    wanted = listener_specs(new.listen)
    if not wanted:
        raise ListenError("nothing to listen on: configure socketmap or tcp_table")
    current = {b.spec for b in server.listeners}
    added: list[BoundListener] = []
    try:
        for spec in wanted:
            if spec not in current:
                added.extend(await bind_spec(spec, **bind_options))
    except BaseException:
        await close_all(added)
        raise
    for bound in added:
        server.add_listener(bound)
        changes.append(f"listening on {bound.description}")
    for bound in server.listeners:
        if bound.spec not in wanted:
            server.remove_listener(bound)
            await close_all([bound])
            changes.append(f"stopped listening on {bound.description}")

    if new.listen.allowed_clients != old.listen.allowed_clients:
        server.allowed_clients = list(new.listen.allowed_clients)
        changes.append("allowed_clients")
    if new.limits != old.limits:
        server.set_limits(new.limits)
        changes.append("limits")
    if cache is not None and new.cache != old.cache and new.cache.max_entries > 0:
        cache.reconfigure(cache_settings(new))
        changes.append("cache settings")
    if running.copy is not None and new.cache.max_stale_s != old.cache.max_stale_s:
        running.copy.max_stale_s = new.cache.max_stale_s
        changes.append("complete copy max_stale_s")
    if (
        running.copy is not None
        and new.cache.complete_memo_entries != old.cache.complete_memo_entries
    ):
        running.copy.memo_entries = new.cache.complete_memo_entries
        running.copy.forget()
        changes.append("complete copy memo entries")
    if new.lookup != old.lookup:
        # The complete copy applies the lookup settings at lookup time: nothing to reload.
        running.source.settings = lookup_settings(new)
        if cache is not None:
            cache.flush()
        changes.append("lookup settings (cache flushed)")
    if new.query_log_sample_rate != old.query_log_sample_rate:
        running.answerer.query_log = query_log(new.query_log_sample_rate)
        changes.append(f"query log sample rate {new.query_log_sample_rate}")
    if new.log_level != old.log_level or new.log_format != old.log_format:
        configure_logging(new.log_level, new.log_format)
        changes.append(f"logging {new.log_level}/{new.log_format}")
    restart = [
        name
        for name, differs in (
            ("database", new.database != old.database),
            ("user", new.user != old.user),
            ("metrics", new.metrics != old.metrics),
            ("embedded", new.embedded != old.embedded),
            ("cache on/off", (new.cache.max_entries == 0) != (old.cache.max_entries == 0)),
            ("cache.mode", new.cache.mode != old.cache.mode),
            ("complete_max_bytes", new.cache.complete_max_bytes != old.cache.complete_max_bytes),
            (
                "change_feed_poll_interval_s",
                new.cache.change_feed_poll_interval_s != old.cache.change_feed_poll_interval_s,
            ),
        )
        if differs
    ]
    if restart:
        log.warning("reload: %s changed; these take effect at the next restart", restart)
    return changes
