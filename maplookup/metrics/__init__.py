"""Prometheus metrics that cost (almost) nothing on the lookup path.

The hot path only ever touches plain Python integers: the server, cache and change feed keep
their own counters (``ServerCounters``, ``CacheCounters``, ``FeedCounters``), and the two
classes in ``stats``, :class:`LookupStats` and :class:`DatabaseStats`, add per-map request
counts and fixed-bucket latency histograms that cost one dict lookup, one ``bisect`` and a few
integer additions per record.  No locks: everything that records runs in the single trio thread.

prometheus-client is used only at scrape time: :class:`MaplookupCollector` reads those counters
when ``/metrics`` is asked for and turns them into metric families, and :func:`render` writes the
text exposition format from a private registry (never the process-global default one), together
with the standard ``process_*`` metrics (RSS, open file descriptors, CPU time).

This package imports nothing from ``maplookup.service``: the collector takes plain objects
described by the protocols in ``views``, so the service can build it from its ``Running`` parts.

The package:

- ``histogram``: :class:`LatencyHistogram` and the default bucket bounds;
- ``stats``: :class:`LookupStats`, :class:`DatabaseStats` and the label values they count under;
- ``timing``: :class:`TimedAnswerer`, :class:`TimedLookupBackend`, the hot-path wrappers;
- ``views``: the protocols of what the collector reads (server, cache, listener, pool, copy);
- ``copy``: the complete copy's metrics (its age, size and updates: cache.mode = "complete");
- ``collector``: :class:`MaplookupCollector`, :func:`make_registry`, :func:`render`;
- ``peers``: with several workers, worker 0's ``/metrics`` gathers the others' expositions and
  labels each sample with its worker (imported from ``maplookup.metrics.peers``).

This module re-exports every public name, so ``from maplookup.metrics import ...`` keeps working.

Layer: operations, above ``db``: it may read the lookup, cache and database counters;
never ``serve`` or ``cli`` (tests/unit/test_layers.py).
"""

from __future__ import annotations

from .collector import METRICS_CONTENT_TYPE, MaplookupCollector, make_registry, render
from .histogram import DEFAULT_LATENCY_BUCKETS_S, LatencyHistogram
from .stats import (
    LOOKUP_RESULTS,
    OUTCOME_ERROR,
    OUTCOME_OK,
    OUTCOME_TIMEOUT,
    SERVED_MAPS,
    UNKNOWN_MAP,
    DatabaseStats,
    LookupStats,
)
from .timing import TimedAnswerer, TimedLookupBackend
from .views import (
    CacheCountersView,
    CacheView,
    ListenerCountersView,
    ListenerView,
    PoolState,
    RunningView,
    ServerCountersView,
    ServerView,
    StatementCounts,
)

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
    "StatementCounts",
    "TimedAnswerer",
    "TimedLookupBackend",
    "make_registry",
    "render",
]
