"""A log-linear latency histogram in the manner of HdrHistogram, small enough to ship as JSON.

Values are integers (nanoseconds here).  Values below 256 get a bucket each; above that, every
power of two is split into 128 linear sub-buckets, so a reported percentile is at most 1/128
(0.8 %) above the true value, whatever its size: the same guarantee HdrHistogram gives with
about two significant digits.  Recording is two integer operations and a list increment, cheap
enough to do for every reply in the load generator; histograms from several load processes are
merged by adding their counts.  ``max``, ``min`` and the sum (for the mean) are kept exactly.

Why this and not a package.  No earlier measurement was recorded in bench/README.md or the git
history when it was written; this one was made for issue 13 and is the figure to go by:
``.venv/bin/python -m bench.histcost`` (1,000,000 seeded lognormal latencies around 200 µs with
a tail, best of 3; 2-core AMD EPYC VM, CPython 3.11.7;
``bench/results/histcost-20261129T112359Z.json``):

=============================  ===========  =============  ===========  ==========  ===========
method                         record       4 percentiles  merge 2      JSON        max error
                               ns/value     ms             halves ms    bytes       p50..p99.9
=============================  ===========  =============  ===========  ==========  ===========
this module                    215          0.22           0.45         14,842      0.57 %
hdrhistogram 0.10, 2 digits    810          0.62           0.03         2,114       0.57 %
list, sorted at the end        16           217            3.2          7,919,159   0 (exact)
list + numpy.percentile        19           26             24           7,919,159   0.01 %
=============================  ===========  =============  ===========  ==========  ===========

So it records about 3.8 times faster than hdrhistogram's Python package with the same error.
Appending every value to a list is faster still per value (about 13 times), but its memory and
the JSON the load workers send grow with the run (8 MB a million replies; the suite's latest
full run, suite-20261122T074734Z.json, kept 62 histograms of up to 770,389 replies, 13.9 million
in all), while this histogram stays at 7,424 counters and about 15 KB of JSON.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

SUB_BITS = 8  # 256 exact values, then 128 sub-buckets per power of two
_HALF = 1 << (SUB_BITS - 1)
# Enough buckets for 2**63 ns (292 years); a bucket index is at most (63 - 7) * 128 + 255.
BUCKETS = (64 - SUB_BITS + 2) * _HALF


def bucket_of(value: int) -> int:
    if value < (1 << SUB_BITS):
        return value
    shift = value.bit_length() - SUB_BITS
    return (shift << (SUB_BITS - 1)) + (value >> shift)


def bucket_high(index: int) -> int:
    """The largest value that falls in bucket ``index`` (HdrHistogram's highest equivalent)."""
    if index < (1 << SUB_BITS):
        return index
    shift = (index >> (SUB_BITS - 1)) - 1
    mantissa = index - (shift << (SUB_BITS - 1))
    return ((mantissa + 1) << shift) - 1


class Histogram:
    __slots__ = ("counts", "max", "min", "n", "total")

    def __init__(self) -> None:
        self.counts = [0] * BUCKETS
        self.n = 0
        self.total = 0
        self.max = 0
        self.min = -1

    def record(self, value: int) -> None:
        if value < 0:
            value = 0
        if value < (1 << SUB_BITS):
            self.counts[value] += 1
        else:
            shift = value.bit_length() - SUB_BITS
            self.counts[(shift << (SUB_BITS - 1)) + (value >> shift)] += 1
        self.n += 1
        self.total += value
        if value > self.max:
            self.max = value
        if self.min < 0 or value < self.min:
            self.min = value

    def merge(self, other: Histogram) -> None:
        counts = self.counts
        for i, c in enumerate(other.counts):
            if c:
                counts[i] += c
        self.n += other.n
        self.total += other.total
        self.max = max(self.max, other.max)
        if other.min >= 0 and (self.min < 0 or other.min < self.min):
            self.min = other.min

    def percentile(self, pct: float) -> int:
        """Nearest-rank percentile (the bucket's upper edge, never above the exact max)."""
        if self.n == 0:
            return 0
        rank = max(1, math.ceil(pct / 100.0 * self.n - 1e-9))
        seen = 0
        for i, c in enumerate(self.counts):
            if c:
                seen += c
                if seen >= rank:
                    return min(bucket_high(i), self.max)
        return self.max

    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    def summary_us(self, percentiles: Iterable[float] = (50, 90, 99, 99.9)) -> dict[str, float]:
        out: dict[str, float] = {"n": self.n, "mean_us": self.mean() / 1e3}
        for p in percentiles:
            out[f"p{p:g}_us".replace(".", "_")] = self.percentile(p) / 1e3
        out["max_us"] = self.max / 1e3
        out["min_us"] = max(self.min, 0) / 1e3
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": {str(i): c for i, c in enumerate(self.counts) if c},
            "n": self.n,
            "total": self.total,
            "max": self.max,
            "min": self.min,
            "sub_bits": SUB_BITS,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Histogram:
        if data.get("sub_bits", SUB_BITS) != SUB_BITS:
            raise ValueError("histogram recorded with a different layout")
        h = cls()
        for i, c in data["counts"].items():
            h.counts[int(i)] = int(c)
        h.n = int(data["n"])
        h.total = int(data["total"])
        h.max = int(data["max"])
        h.min = int(data["min"])
        return h
