"""Prometheus metrics that cost (almost) nothing on the lookup path.

The hot path only ever touches plain Python integers: the server, cache and change listener keep
their own counters (``ServerCounters``, ``CacheCounters``, ``ListenerCounters``), and the two
classes here, :class:`LookupStats` and :class:`DatabaseStats`, add per-map request counts and
fixed-bucket latency histograms that cost one dict lookup, one ``bisect`` and a few integer
additions per record.  No locks: everything that records runs in the single trio thread.

prometheus-client is used only at scrape time: :class:`MaplookupCollector` reads those counters
when ``/metrics`` is asked for and turns them into metric families, and :func:`render` writes the
text exposition format from a private registry (never the process-global default one), together
with the standard ``process_*`` metrics (RSS, open file descriptors, CPU time).

This module imports nothing from ``maplookup.service``: the collector takes plain objects
described by the protocols below, so the service can build it from its ``Running`` parts.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import pairwise
from typing import Final, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from maplookup.db import DatabaseTimeout
from maplookup.logsetup import QueryLog
from maplookup.maps import MapName
from maplookup.protocol import Reply, Request, Status

__all__ = [
    "DEFAULT_LATENCY_BUCKETS_S",
    "LOOKUP_RESULTS",
    "METRICS_CONTENT_TYPE",
    "OUTCOME_ERROR",
    "OUTCOME_OK",
    "OUTCOME_TIMEOUT",
    "SERVED_MAPS",
    "UNKNOWN_MAP",
    "CacheCountersView",
    "CacheView",
    "DatabaseStats",
    "LatencyHistogram",
    "ListenerCountersView",
    "ListenerView",
    "LookupStats",
    "MaplookupCollector",
    "PoolState",
    "RunningView",
    "ServerCountersView",
    "ServerView",
    "TimedAnswerer",
    "TimedValueSource",
    "make_registry",
    "render",
]

#: Content type of :func:`render`'s output (Prometheus text format 0.0.4).
METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: Upper bounds in seconds: a cache hit takes tens of microseconds, a query over the asyncio
#: bridge a few hundred, a database in trouble up to the query timeout (5 s by default).
DEFAULT_LATENCY_BUCKETS_S: Final[tuple[float, ...]] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: The ``result`` label values of ``maplookup_requests_total``: the socketmap status words.
LOOKUP_RESULTS: Final[tuple[str, ...]] = tuple(status.value for status in Status)

#: The maps with their own series by default: those maplookup serves.
SERVED_MAPS: Final[tuple[str, ...]] = tuple(name.value for name in MapName)

#: Where requests for map names the server does not serve are counted.
UNKNOWN_MAP: Final = "unknown"

#: ``DatabaseStats.record_query`` outcomes.
OUTCOME_OK: Final = "ok"
OUTCOME_ERROR: Final = "error"
OUTCOME_TIMEOUT: Final = "timeout"

# Shown when a status outside LOOKUP_RESULTS is recorded (a bug elsewhere, never a crash here).
_OTHER_RESULT: Final = "other"


def _format_le(bound: float) -> str:
    """A bucket bound as Prometheus spells it (Go's float formatting)."""
    if bound == math.inf:
        return "+Inf"
    if bound == int(bound) and abs(bound) < 1e15:
        return f"{int(bound)}.0"
    return repr(float(bound))


class LatencyHistogram:
    """A fixed-bucket latency histogram for the hot path: no locks, no allocation per record.

    ``counts[i]`` holds observations in ``(bounds[i-1], bounds[i]]``; the last slot holds
    those above the largest bound (the ``+Inf`` bucket).
    """

    __slots__ = ("_bounds", "_counts", "count", "sum")

    def __init__(self, bounds: Sequence[float] = DEFAULT_LATENCY_BUCKETS_S) -> None:
        finite = tuple(float(b) for b in bounds if b != math.inf)
        if not finite:
            raise ValueError("a histogram needs at least one finite bucket bound")
        if any(math.isnan(b) for b in finite):
            raise ValueError("bucket bounds must be numbers")
        if any(a >= b for a, b in pairwise(finite)):
            raise ValueError(f"bucket bounds must be strictly increasing: {finite}")
        self._bounds: tuple[float, ...] = finite
        self._counts: list[int] = [0] * (len(finite) + 1)
        self.sum = 0.0
        self.count = 0

    @property
    def bounds(self) -> tuple[float, ...]:
        """The finite upper bounds, in seconds."""
        return self._bounds

    def observe(self, seconds: float) -> None:
        """Count one observation (``bounds[i-1] < seconds <= bounds[i]`` lands in slot i)."""
        self._counts[bisect_left(self._bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def buckets(self) -> list[tuple[float, int]]:
        """Cumulative ``(le, count)`` pairs, ending with ``(inf, count)``, for exposition."""
        result: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip(self._bounds, self._counts, strict=False):
            running += n
            result.append((bound, running))
        result.append((math.inf, running + self._counts[-1]))
        return result

    def exposition_buckets(self) -> list[tuple[str, float]]:
        """:meth:`buckets` with ``le`` spelled for HistogramMetricFamily."""
        return [(_format_le(le), float(n)) for le, n in self.buckets()]


class _MapStats:
    __slots__ = ("counts", "histogram")

    def __init__(self, bounds: Sequence[float]) -> None:
        # One slot per LOOKUP_RESULTS entry, plus "other".
        self.counts: list[int] = [0] * (len(LOOKUP_RESULTS) + 1)
        self.histogram = LatencyHistogram(bounds)


class LookupStats:
    """Answered requests per map and result, and answer latency per map.

    Only the map names given at construction (by default the maps maplookup serves) get their
    own series; anything else a client sends is counted under ``map="unknown"``, so garbage
    map names cannot grow memory or the number of series.
    """

    def __init__(
        self,
        map_names: Iterable[str] = SERVED_MAPS,
        bounds: Sequence[float] = DEFAULT_LATENCY_BUCKETS_S,
    ) -> None:
        self._by_name: dict[str, _MapStats] = {}
        self._by_wire_name: dict[bytes, _MapStats] = {}
        for name in map_names:
            if name not in self._by_name:
                stats = _MapStats(bounds)
                self._by_name[name] = stats
                self._by_wire_name[name.encode()] = stats
        unknown = self._by_name.get(UNKNOWN_MAP)
        if unknown is None:
            unknown = _MapStats(bounds)
            self._by_name[UNKNOWN_MAP] = unknown
        self._unknown = unknown
        # Both the status words and the Status members, so callers need no conversion.
        self._result_index: dict[object, int] = {}
        for index, status in enumerate(Status):
            self._result_index[status] = index
            self._result_index[status.value] = index
        self._other_index = len(LOOKUP_RESULTS)

    def record(self, map_name: str | bytes, status: str | Status, seconds: float) -> None:
        """Count one answered request.  O(1): two dict lookups, one bisect.

        ``map_name`` may be the str name or the bytes Postfix sent; ``status`` a status word
        (``"OK"`` ...) or a :class:`~maplookup.protocol.Status`.
        """
        if isinstance(map_name, bytes):
            stats = self._by_wire_name.get(map_name, self._unknown)
        else:
            stats = self._by_name.get(map_name, self._unknown)
        stats.counts[self._result_index.get(status, self._other_index)] += 1
        stats.histogram.observe(seconds)

    def map_names(self) -> list[str]:
        """Every map with its own series, ``"unknown"`` included."""
        return list(self._by_name)

    def count(self, map_name: str, result: str) -> int:
        """Requests recorded for ``map_name`` (a known name or "unknown") with ``result``."""
        stats = self._by_name[map_name]
        index = self._result_index.get(result, self._other_index)
        return stats.counts[index]

    def histogram(self, map_name: str) -> LatencyHistogram:
        return self._by_name[map_name].histogram

    def series(self) -> Iterator[tuple[str, str, int]]:
        """``(map, result, count)`` for every map and status word, plus "other" if non-zero."""
        for name, stats in self._by_name.items():
            for index, result in enumerate(LOOKUP_RESULTS):
                yield name, result, stats.counts[index]
            other = stats.counts[self._other_index]
            if other:
                yield name, _OTHER_RESULT, other


class DatabaseStats:
    """Database query latency and outcomes (recorded around each query made for a lookup)."""

    __slots__ = ("errors", "histogram", "queries", "timeouts")

    def __init__(self, bounds: Sequence[float] = DEFAULT_LATENCY_BUCKETS_S) -> None:
        self.histogram = LatencyHistogram(bounds)
        self.queries = 0
        self.errors = 0  # every failed query, timeouts included
        self.timeouts = 0

    def record_query(self, seconds: float, outcome: str = OUTCOME_OK) -> None:
        """Count one query; ``outcome`` is "ok", "timeout" or "error" (anything else: error)."""
        self.queries += 1
        self.histogram.observe(seconds)
        if outcome == OUTCOME_OK:
            return
        self.errors += 1
        if outcome == OUTCOME_TIMEOUT:
            self.timeouts += 1


# -- recording wrappers -----------------------------------------------------------------------


class _Answerer(Protocol):
    async def answer(self, request: Request) -> Reply: ...


class TimedAnswerer:
    """Wraps the server's answerer (the ``Lookup``): records each answer in LookupStats.

    A request cancelled before it is answered (drain, shutdown) is not recorded.
    """

    def __init__(
        self,
        inner: _Answerer,
        stats: LookupStats,
        clock: Callable[[], float] = time.perf_counter,
        query_log: QueryLog | None = None,
    ) -> None:
        self._inner = inner
        self._stats = stats
        self._clock = clock
        # Replaced on reload; a rate of 0 costs one comparison per request.
        self.query_log = query_log

    async def answer(self, request: Request) -> Reply:
        started = self._clock()
        reply = await self._inner.answer(request)
        seconds = self._clock() - started
        self._stats.record(request.map_name, reply.status, seconds)
        query_log = self.query_log
        if query_log is not None and query_log.sample_rate > 0.0:
            query_log.maybe_log(
                request.map_name.decode("utf-8", "replace"),
                request.key.decode("utf-8", "surrogateescape"),
                reply.status.value,
                seconds,
            )
        return reply


class _ValueSource(Protocol):
    async def fetch_value(self, query: str, args: tuple[object, ...]) -> str | None: ...


class TimedValueSource:
    """Wraps the Database (``fetch_value``): records each query in DatabaseStats.

    Put it between ``DatabaseSource`` and ``Database`` so that only real queries (cache misses)
    are timed.  Cancelled queries are not recorded; other exceptions count as errors.
    """

    def __init__(
        self,
        inner: _ValueSource,
        stats: DatabaseStats,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._inner = inner
        self._stats = stats
        self._clock = clock

    async def fetch_value(self, query: str, args: tuple[object, ...]) -> str | None:
        started = self._clock()
        try:
            value = await self._inner.fetch_value(query, args)
        except DatabaseTimeout:
            self._stats.record_query(self._clock() - started, OUTCOME_TIMEOUT)
            raise
        except Exception:
            self._stats.record_query(self._clock() - started, OUTCOME_ERROR)
            raise
        self._stats.record_query(self._clock() - started, OUTCOME_OK)
        return value


# -- what the collector reads -----------------------------------------------------------------


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
    """``maplookup.changes.ListenerCounters``."""

    @property
    def notifications(self) -> int: ...
    @property
    def connects(self) -> int: ...
    @property
    def connection_losses(self) -> int: ...


class ListenerView(Protocol):
    """``maplookup.changes.ChangeListener``."""

    @property
    def counters(self) -> ListenerCountersView: ...
    @property
    def live(self) -> bool: ...


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
        info: Mapping[str, str] | None = None,
    ) -> None:
        self.lookups = lookups
        self.database = database
        self.server = server
        self.cache = cache
        self.listener = listener
        self.pool_state = pool_state
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
        """From a ``Running`` (server counters, cache, change listener) and the stats objects."""
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
        if self.listener is not None:
            yield from self._listener_metrics(self.listener)
        if self.database is not None:
            yield from self._database_metrics(self.database)
        if self.pool_state is not None:
            yield from self._pool_metrics(self.pool_state)

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
            "maplookup_cache_invalidations_total",
            "Per-domain invalidations applied from change notifications.",
            counters.invalidations,
        )
        yield _counter(
            "maplookup_cache_flushes_total",
            "Whole-cache invalidations (LISTEN (re)established, or a flush-all notification).",
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
            "1 when cached answers are trusted as fresh (LISTEN in place), 0 when every "
            "lookup goes to the database.",
            1 if cache.live else 0,
        )

    @staticmethod
    def _listener_metrics(listener: ListenerView) -> Iterator[Metric]:
        counters = listener.counters
        yield _gauge(
            "maplookup_listen_connected",
            "1 when the LISTEN connection for change notifications is established, else 0.",
            1 if listener.live else 0,
        )
        yield _counter(
            "maplookup_notifications_total",
            "Change notifications received from PostgreSQL.",
            counters.notifications,
        )
        yield _counter(
            "maplookup_listen_reconnects_total",
            "Times LISTEN was re-established after the first connection (each one flushes "
            "the cache).",
            max(counters.connects - 1, 0),
        )
        yield _counter(
            "maplookup_listen_connection_losses_total",
            "Times the LISTEN connection was lost.",
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
            "Lookup queries sent to PostgreSQL.",
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


def make_registry(collector: Collector, *, process_metrics: bool = True) -> CollectorRegistry:
    """A private registry holding ``collector`` and, by default, the ``process_*`` metrics.

    Build it once and pass it to :func:`render` on every scrape.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process_metrics:
        ProcessCollector(registry=registry)
    return registry


def render(collector: Collector) -> bytes:
    """The Prometheus text exposition (:data:`METRICS_CONTENT_TYPE`) of ``collector``.

    A :class:`CollectorRegistry` (from :func:`make_registry`) is rendered as it is; any other
    collector is put in a fresh private registry with the process metrics for this call.
    Synchronous and quick (reads counters, and /proc for the process metrics).
    """
    registry = collector if isinstance(collector, CollectorRegistry) else make_registry(collector)
    return generate_latest(registry)
