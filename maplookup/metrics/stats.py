"""Per-map request counts and latencies, and database query stats: what the hot path records.

:class:`LookupStats` and :class:`DatabaseStats` hold plain integers and histograms, updated in
O(1) from the single trio thread without locks; the label values they count under
(:data:`LOOKUP_RESULTS`, :data:`SERVED_MAPS`, ``"unknown"``, the query outcomes) live here too,
so the collector and the recording wrappers agree on them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Final

from maplookup.maps import MapName
from maplookup.protocol.events import Status

from .histogram import DEFAULT_LATENCY_BUCKETS_S, LatencyHistogram

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
