"""Scrape time: :class:`MaplookupCollector`, its private registry, and the text exposition.

The only module that talks to prometheus-client: it reads the plain counters (stats, server,
cache, listener, pool) when ``/metrics`` is asked for, turns them into metric families, and
:func:`render` writes them with the ``process_*`` metrics from a registry of its own.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping
from typing import Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from .copy import copy_metrics
from .servers import feed_delay_metrics, server_metrics
from .stats import DatabaseStats, LookupStats
from .views import (
    CacheView,
    CopyView,
    ListenerView,
    PoolState,
    RunningView,
    ServerCountersView,
    ServersView,
    StatementCounts,
)

#: Content type of :func:`render`'s output (Prometheus text format 0.0.4).
METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class MaplookupCollector(Collector):
    """Reads maplookup's plain counters at scrape time and yields metric families.

    Every part is optional, so that a collector can be built before everything exists (and in
    tests): ``None`` omits that part's metrics.  ``pool_state`` may raise (the pool is gone,
    the database thread stopped): the pool metrics are then omitted from that scrape.
    """

    def __init__(
        self,
        *,
        lookups: LookupStats | None = None,
        database: DatabaseStats | None = None,
        server: ServerCountersView | None = None,
        cache: CacheView | None = None,
        listener: ListenerView | None = None,
        pool_state: PoolState | None = None,
        statement_counts: StatementCounts | None = None,
        servers: ServersView | None = None,
        copy: CopyView | None = None,
        info: Mapping[str, str] | None = None,
    ) -> None:
        self.lookups = lookups
        self.database = database
        self.server = server
        self.cache = cache
        self.listener = listener
        self.pool_state = pool_state
        self.statement_counts = statement_counts
        self.servers = servers
        self.copy = copy
        self.info = dict(info or {})

    @classmethod
    def from_running(
        cls,
        running: RunningView,
        *,
        lookups: LookupStats | None = None,
        database: DatabaseStats | None = None,
        pool_state: PoolState | None = None,
        info: Mapping[str, str] | None = None,
    ) -> MaplookupCollector:
        """From a ``Running`` (server counters, cache, change feed) and the stats objects."""
        return cls(
            lookups=lookups,
            database=database,
            server=running.server.counters,
            cache=running.cache,
            listener=running.listener,
            pool_state=pool_state,
            info=info,
        )

    def collect(self) -> Iterator[Metric]:
        if self.info:
            yield self._info()
        if self.lookups is not None:
            yield from self._lookup_metrics(self.lookups)
        if self.server is not None:
            yield from self._server_metrics(self.server)
        if self.cache is not None:
            yield from self._cache_metrics(self.cache)
        if self.copy is not None:
            yield from copy_metrics(self.copy)
        if self.listener is not None:
            yield from self._listener_metrics(self.listener)
            yield from feed_delay_metrics(self.listener)
        if self.listener is not None or self.servers is not None:
            yield from server_metrics(self.listener, self.servers)
        if self.database is not None:
            yield from self._database_metrics(self.database)
        if self.pool_state is not None:
            yield from self._pool_metrics(self.pool_state)
        if self.statement_counts is not None:
            statements, keys = self.statement_counts()
            yield _counter(
                "maplookup_db_statements",
                "Statements sent to PostgreSQL for lookups (concurrent misses share one).",
                statements,
            )
            yield _counter(
                "maplookup_db_statement_keys",
                "Keys looked up by those statements; divided by maplookup_db_statements_total, "
                "the mean batch size.",
                keys,
            )

    def _info(self) -> GaugeMetricFamily:
        names = sorted(self.info)
        family = GaugeMetricFamily(
            "maplookup_build_info",
            "Always 1; the labels say which maplookup build is running.",
            labels=names,
        )
        family.add_metric([self.info[n] for n in names], 1)
        return family

    @staticmethod
    def _lookup_metrics(lookups: LookupStats) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "maplookup_requests_total",
            "Lookup requests answered, by map and by the result sent to Postfix "
            '(OK, NOTFOUND, TEMP, TIMEOUT, PERM); map="unknown" counts map names maplookup '
            "does not serve.",
            labels=["map", "result"],
        )
        for name, result, count in lookups.series():
            requests.add_metric([name, result], count)
        yield requests
        durations = HistogramMetricFamily(
            "maplookup_request_duration_seconds",
            "Time to answer one lookup request (cache or database), by map; excludes network I/O.",
            labels=["map"],
        )
        for name in lookups.map_names():
            histogram = lookups.histogram(name)
            durations.add_metric([name], histogram.exposition_buckets(), histogram.sum)
        yield durations

    @staticmethod
    def _server_metrics(counters: ServerCountersView) -> Iterator[Metric]:
        yield _gauge(
            "maplookup_connections_open",
            "Client (Postfix) connections open now.",
            counters.connections_open,
        )
        yield _counter(
            "maplookup_connections_accepted_total",
            "Client connections accepted and served.",
            counters.connections_accepted,
        )
        yield _counter(
            "maplookup_connections_rejected_total",
            "Client connections closed at once because max_connections was reached.",
            counters.connections_rejected,
        )
        yield _counter(
            "maplookup_protocol_errors_total",
            "Connections closed because the client sent a malformed or oversized request.",
            counters.protocol_errors,
        )
        yield _counter(
            "maplookup_read_timeouts_total",
            "Connections closed because a request was not completed within read_timeout_s.",
            counters.read_timeouts,
        )
        yield _counter(
            "maplookup_requests_received_total",
            "Requests decoded from clients, answered or not (see maplookup_requests_total for "
            "answers by map and result).",
            counters.requests,
        )

    @staticmethod
    def _cache_metrics(cache: CacheView) -> Iterator[Metric]:
        counters = cache.counters
        yield _counter(
            "maplookup_cache_hits_total",
            "Lookups answered from the cache with a value (positive hits).",
            counters.hits,
        )
        yield _counter(
            "maplookup_cache_negative_hits_total",
            "Lookups answered from the cache with not-found (negative hits).",
            counters.negative_hits,
        )
        yield _counter(
            "maplookup_cache_misses_total",
            "Lookups not answerable from the cache that queried the database.",
            counters.misses,
        )
        yield _counter(
            "maplookup_cache_shared_misses_total",
            "Cache misses that waited for an identical query already in flight instead of "
            "querying again.",
            counters.shared_misses,
        )
        yield _counter(
            "maplookup_cache_stores_skipped_total",
            "Database answers not cached because their domain changed while they were fetched.",
            counters.stores_skipped,
        )
        yield _counter(
            "maplookup_cache_stores_outage_only_total",
            "Database answers fetched while the cache was flushed (change feed coming up): kept "
            "only as outage fallback, never served as fresh.",
            counters.stores_outage_only,
        )
        yield _counter(
            "maplookup_cache_invalidations_total",
            "Per-domain invalidations applied from change notifications.",
            counters.invalidations,
        )
        yield _counter(
            "maplookup_cache_flushes_total",
            "Whole-cache invalidations (change feed (re)connected, or a flush-all change).",
            counters.flushes,
        )
        yield _counter(
            "maplookup_cache_evictions_total",
            "Entries evicted because the cache was full (least recently used first).",
            counters.evictions,
        )
        yield _counter(
            "maplookup_cache_stale_answers_total",
            "Lookups answered from a stale cache entry because the database query failed.",
            counters.stale_served,
        )
        yield _counter(
            "maplookup_cache_database_errors_total",
            "Cache misses whose database query failed (answered stale or TEMP).",
            counters.errors,
        )
        yield _gauge("maplookup_cache_entries", "Entries in the cache now.", len(cache))
        yield _gauge(
            "maplookup_cache_max_entries",
            "Configured cache capacity (cache.max_entries).",
            cache.settings.max_entries,
        )
        yield _gauge(
            "maplookup_cache_live",
            "1 when cached answers are trusted as fresh (change feed live), 0 when every "
            "lookup goes to the database.",
            1 if cache.live else 0,
        )

    @staticmethod
    def _listener_metrics(listener: ListenerView) -> Iterator[Metric]:
        counters = listener.counters
        yield _gauge(
            "maplookup_listen_connected",
            "1 when the change feed is connected and followed (the cache may serve as fresh), "
            "else 0.",
            1 if listener.live else 0,
        )
        yield _gauge(
            "maplookup_change_feed_listening",
            "1 when LISTEN wakes the change feed early, 0 when it only polls (a hot standby "
            "refuses LISTEN).",
            1 if listener.listening else 0,
        )
        if listener.position is not None:
            yield _gauge(
                "maplookup_change_feed_position",
                "The change-log position whose invalidations the cache has applied.",
                listener.position,
            )
        yield _counter(
            "maplookup_change_feed_changes_total",
            "Change-log rows applied to the cache.",
            counters.changes,
        )
        yield _counter(
            "maplookup_notifications_total",
            "NOTIFY wake-ups received from PostgreSQL (what changed is read from the log).",
            counters.notifications,
        )
        yield _counter(
            "maplookup_listen_reconnects_total",
            "Times the change feed connected again after the first connection (each one "
            "flushes the cache).",
            max(counters.connects - 1, 0),
        )
        yield _counter(
            "maplookup_listen_connection_losses_total",
            "Times the change feed connection was lost.",
            counters.connection_losses,
        )

    @staticmethod
    def _database_metrics(database: DatabaseStats) -> Iterator[Metric]:
        histogram = database.histogram
        yield HistogramMetricFamily(
            "maplookup_db_query_duration_seconds",
            "Time for one lookup query to PostgreSQL, including the asyncio bridge and waiting "
            "for a pool connection.",
            buckets=histogram.exposition_buckets(),
            sum_value=histogram.sum,
        )
        yield _counter(
            "maplookup_db_queries_total",
            "Lookups sent to PostgreSQL (cache misses), whether alone or in a shared statement.",
            database.queries,
        )
        yield _counter(
            "maplookup_db_errors_total",
            "Lookup queries that failed (connection errors, timeouts included).",
            database.errors,
        )
        yield _counter(
            "maplookup_db_timeouts_total",
            "Lookup queries not answered within query_timeout_s.",
            database.timeouts,
        )

    @staticmethod
    def _pool_metrics(pool_state: PoolState) -> Iterator[Metric]:
        try:
            size, idle, maximum = pool_state()
        except Exception:  # the pool may be gone; the other metrics still matter
            return
        connections = GaugeMetricFamily(
            "maplookup_db_pool_connections",
            "Database pool connections open now, by state (idle or busy running a query).",
            labels=["state"],
        )
        connections.add_metric(["idle"], idle)
        connections.add_metric(["busy"], max(size - idle, 0))
        yield connections
        yield _gauge(
            "maplookup_db_pool_max_connections",
            "Maximum size of the database pool (database.pool_max_connections).",
            maximum,
        )


class _FrozenObjectsCollector(Collector):
    """How many objects ``gc.freeze()`` put out of the collector's sight at start-up."""

    def collect(self) -> Iterator[Metric]:
        yield _gauge(
            "maplookup_gc_frozen_objects",
            "Objects moved out of the garbage collector's sight once start-up was done "
            "(gc.freeze), so that full collections stay short.",
            gc.get_freeze_count(),
        )


def make_registry(collector: Collector, *, process_metrics: bool = True) -> CollectorRegistry:
    """A private registry holding ``collector`` and, by default, the process metrics:
    ``process_*`` (RSS, descriptors, CPU), ``python_gc_*`` (collections by generation) and
    ``maplookup_gc_frozen_objects``.

    Build it once and pass it to :func:`render` on every scrape.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process_metrics:
        ProcessCollector(registry=registry)
        GCCollector(registry=registry)
        registry.register(_FrozenObjectsCollector())
    return registry


def render(collector: Collector) -> bytes:
    """The Prometheus text exposition (:data:`METRICS_CONTENT_TYPE`) of ``collector``.

    A :class:`CollectorRegistry` (from :func:`make_registry`) is rendered as it is; any other
    collector is put in a fresh private registry with the process metrics for this call.
    Synchronous and quick (reads counters, and /proc for the process metrics).
    """
    registry = collector if isinstance(collector, CollectorRegistry) else make_registry(collector)
    return generate_latest(registry)
