"""What the collector reads: protocols for the server, cache and listener counters.

The collector takes plain objects shaped like these (``ServerCounters``, ``AnswerCache``,
``ChangeListener`` ...) instead of importing them, so the metrics package imports nothing from
``maplookup.service`` and tests can hand it stand-ins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from maplookup.db.servers import Reached
from maplookup.db.status import ServerStatus


class ServerCountersView(Protocol):
    """``maplookup.server.ServerCounters``."""

    @property
    def connections_open(self) -> int: ...
    @property
    def connections_accepted(self) -> int: ...
    @property
    def connections_rejected(self) -> int: ...
    @property
    def protocol_errors(self) -> int: ...
    @property
    def read_timeouts(self) -> int: ...
    @property
    def requests(self) -> int: ...


class ServerView(Protocol):
    """``maplookup.server.Server``."""

    @property
    def counters(self) -> ServerCountersView: ...


class CacheCountersView(Protocol):
    """``maplookup.cache.CacheCounters``."""

    @property
    def hits(self) -> int: ...
    @property
    def negative_hits(self) -> int: ...
    @property
    def misses(self) -> int: ...
    @property
    def shared_misses(self) -> int: ...
    @property
    def stores_skipped(self) -> int: ...
    @property
    def stores_outage_only(self) -> int: ...
    @property
    def invalidations(self) -> int: ...
    @property
    def flushes(self) -> int: ...
    @property
    def evictions(self) -> int: ...
    @property
    def stale_served(self) -> int: ...
    @property
    def errors(self) -> int: ...


class _CacheSettingsView(Protocol):
    @property
    def max_entries(self) -> int: ...


class CacheView(Protocol):
    """``maplookup.cache.AnswerCache``."""

    @property
    def counters(self) -> CacheCountersView: ...
    @property
    def settings(self) -> _CacheSettingsView: ...
    @property
    def live(self) -> bool: ...
    def __len__(self) -> int: ...


class ListenerCountersView(Protocol):
    """``maplookup.db.changes.FeedCounters``."""

    @property
    def notifications(self) -> int: ...
    @property
    def connects(self) -> int: ...
    @property
    def connection_losses(self) -> int: ...
    @property
    def changes(self) -> int: ...
    @property
    def server_changes(self) -> int: ...


class ListenerView(Protocol):
    """``maplookup.db.changes.ChangeFeed``."""

    @property
    def counters(self) -> ListenerCountersView: ...
    @property
    def live(self) -> bool: ...
    @property
    def listening(self) -> bool: ...
    @property
    def position(self) -> int | None: ...
    @property
    def server(self) -> Reached | None: ...
    @property
    def status(self) -> ServerStatus | None: ...
    @property
    def last_read_at(self) -> float | None: ...
    @property
    def started_at(self) -> float: ...


class CopyCountersView(Protocol):
    """``maplookup.lookup.complete.source.CopyCounters``."""

    @property
    def answers(self) -> int: ...
    @property
    def fallbacks(self) -> int: ...
    @property
    def loads(self) -> int: ...
    @property
    def partition_updates(self) -> int: ...
    @property
    def partitions_replaced(self) -> int: ...


class _CopyData(Protocol):
    def counts(self) -> dict[str, int]: ...


class CopyView(Protocol):
    """``maplookup.lookup.complete.source.CompleteSource`` (cache.mode = "complete")."""

    @property
    def counters(self) -> CopyCountersView: ...
    @property
    def copy(self) -> _CopyData | None: ...
    @property
    def position(self) -> int | None: ...
    @property
    def loaded_in_s(self) -> float | None: ...
    @property
    def refused(self) -> str | None: ...
    @property
    def max_stale_s(self) -> float: ...
    def age(self) -> float | None: ...


class ServersView(Protocol):
    """``maplookup.db.servers.ServerPin``: the server new lookup connections reach."""

    @property
    def lookup_server(self) -> Reached | None: ...


class RunningView(Protocol):
    """``maplookup.service.Running`` (its server, cache and listener)."""

    @property
    def server(self) -> ServerView: ...
    @property
    def cache(self) -> CacheView | None: ...
    @property
    def listener(self) -> ListenerView | None: ...


#: ``(size, idle, max)`` of the database pool: connections open, of those idle, the maximum.
PoolState = Callable[[], tuple[int, int, int]]
# (statements sent for lookups, keys they looked up): Database.batch_counts.
StatementCounts = Callable[[], tuple[int, int]]
