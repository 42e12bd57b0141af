"""The fixed-bucket latency histogram every maplookup timing is counted in.

Its own module because it is the one piece of bucket arithmetic (``bisect`` on the hot path,
cumulative ``le`` buckets at scrape time) that both :mod:`.stats` and :mod:`.collector` rely on,
and it needs nothing from prometheus-client.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from itertools import pairwise
from typing import Final

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
