"""What recording a latency costs: bench/lib/hist.py against the alternatives.

The load generator records every reply's latency in its worker's event loop, so the cost of one
``record`` is load-generator CPU that the server under test does not get.  This runner records
the same values (lognormal around 200 µs, with a tail, in nanoseconds; seeded) into:

- ``bench.lib.hist.Histogram`` (the one the benchmarks use);
- ``hdrhistogram`` (PyPI, ``hdrh.histogram.HdrHistogram``, 2 significant digits, the same
  precision class), if it is installed;
- a Python list, sorted at the end for exact nearest-rank percentiles;
- a Python list turned into a numpy array for ``numpy.percentile`` (``inverted_cdf``, the
  nearest-rank method), if numpy is installed (matplotlib, in the bench extra, brings it).

It reports nanoseconds per recorded value, the time to compute four percentiles and to merge
two halves, the size of the JSON the load workers would send, and the largest relative error
of p50/p90/p99/p99.9 against the exact values.  Only the best of ``--repeat`` timings counts.

    .venv/bin/python -m bench.histcost                     # 1,000,000 values, best of 3
    .venv/bin/python -m bench.histcost --values 200000 --repeat 5

Writes ``bench/results/histcost-<UTC>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.lib.common import Logger, bounded_int, machine_info, utc_stamp, write_json
from bench.lib.hist import Histogram

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
log = Logger("histcost")


@dataclass
class Row:
    method: str
    record_ns_per_value: float
    percentiles_ms: float
    merge_ms: float
    json_bytes: int
    max_rel_error_pct: float


def latencies(n: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    out = [int(rng.lognormvariate(math.log(200_000), 0.5)) for _ in range(n)]
    for i in range(0, n, 1000):  # a tail: one value in a thousand 10 to 100 times slower
        out[i] *= rng.randint(10, 100)
    return out


def exact(sorted_values: Sequence[int], pct: float) -> int:
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values) - 1e-9))
    return sorted_values[rank - 1]


def best(repeat: int, fn: Callable[[], object]) -> float:
    """The shortest of ``repeat`` runs of ``fn``, in seconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _errors(got: Sequence[float], want: Sequence[int]) -> float:
    return max(abs(g - w) / w * 100 for g, w in zip(got, want, strict=True))


def measure_hist(values: list[int], repeat: int, want: list[int]) -> Row:
    def record() -> Histogram:
        h = Histogram()
        rec = h.record
        for v in values:
            rec(v)
        return h

    h = record()
    half = len(values) // 2
    a, b = Histogram(), Histogram()
    for v in values[:half]:
        a.record(v)
    for v in values[half:]:
        b.record(v)

    def merge() -> None:
        m = Histogram()
        m.merge(a)
        m.merge(b)

    return Row(
        "bench.lib.hist",
        best(repeat, record) / len(values) * 1e9,
        best(repeat, lambda: [h.percentile(p) for p in PERCENTILES]) * 1e3,
        best(repeat, merge) * 1e3,
        len(json.dumps(h.to_json())),
        _errors([h.percentile(p) for p in PERCENTILES], want),
    )


def measure_hdrh(values: list[int], repeat: int, want: list[int]) -> Row | None:
    try:
        from hdrh.histogram import HdrHistogram
    except ImportError:
        log("hdrhistogram is not installed (pip install hdrhistogram): skipped")
        return None
    highest = 3_600 * 10**9  # one hour in ns

    def record() -> Any:
        h = HdrHistogram(1, highest, 2)
        rec = h.record_value
        for v in values:
            rec(v)
        return h

    h = record()
    half = len(values) // 2
    a, b = HdrHistogram(1, highest, 2), HdrHistogram(1, highest, 2)
    for v in values[:half]:
        a.record_value(v)
    for v in values[half:]:
        b.record_value(v)

    def merge() -> None:
        m = HdrHistogram(1, highest, 2)
        m.add(a)
        m.add(b)

    return Row(
        "hdrhistogram 0.10 (2 digits)",
        best(repeat, record) / len(values) * 1e9,
        best(repeat, lambda: [h.get_value_at_percentile(p) for p in PERCENTILES]) * 1e3,
        best(repeat, merge) * 1e3,
        len(json.dumps(h.encode().decode())),
        _errors([h.get_value_at_percentile(p) for p in PERCENTILES], want),
    )


def _append_all(values: list[int]) -> list[int]:
    """What recording costs when every value is kept: one list append each."""
    out: list[int] = []
    add = out.append
    for v in values:
        add(v)
    return out


def measure_list(values: list[int], repeat: int, want: list[int]) -> Row:
    def record() -> list[int]:
        return _append_all(values)

    kept = record()
    half = len(values) // 2
    a, b = values[:half], values[half:]

    def percentiles() -> list[int]:
        ordered = sorted(kept)
        return [exact(ordered, p) for p in PERCENTILES]

    return Row(
        "list, sorted at the end",
        best(repeat, record) / len(values) * 1e9,
        best(repeat, percentiles) * 1e3,
        best(repeat, lambda: a + b) * 1e3,
        len(json.dumps(kept)),
        _errors(percentiles(), want),
    )


def measure_numpy(values: list[int], repeat: int, want: list[int]) -> Row | None:
    try:
        import numpy as np
    except ImportError:
        log("numpy is not installed (it comes with the bench extra's matplotlib): skipped")
        return None

    def record() -> list[int]:
        return _append_all(values)

    kept = record()
    half = len(values) // 2
    a, b = values[:half], values[half:]

    def percentiles() -> list[float]:
        arr = np.asarray(kept, dtype=np.int64)
        return [float(x) for x in np.percentile(arr, PERCENTILES, method="inverted_cdf")]

    return Row(
        "list + numpy.percentile",
        best(repeat, record) / len(values) * 1e9,
        best(repeat, percentiles) * 1e3,
        best(repeat, lambda: np.concatenate([np.asarray(a), np.asarray(b)])) * 1e3,
        len(json.dumps(kept)),
        _errors(percentiles(), want),
    )


TABLE_HEAD = (
    "| method | record ns/value | 4 percentiles ms | merge 2 halves ms | JSON bytes "
    "| max error p50..p99.9 |\n|---|--:|--:|--:|--:|--:|"
)


def row_markdown(r: Row) -> str:
    return (
        f"| {r.method} | {r.record_ns_per_value:,.0f} | {r.percentiles_ms:,.2f} "
        f"| {r.merge_ms:,.2f} | {r.json_bytes:,} | {r.max_rel_error_pct:.2f} % |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.histcost", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--values", type=bounded_int(1000, 10_000_000), default=1_000_000, help="values recorded"
    )
    parser.add_argument("--repeat", type=bounded_int(1, 20), default=3, help="best of N")
    ns = parser.parse_args(argv)
    started, stamp = utc_stamp()
    values = latencies(ns.values)
    ordered = sorted(values)
    want = [exact(ordered, p) for p in PERCENTILES]
    rows: list[Row] = []
    for measure in (measure_hist, measure_hdrh, measure_list, measure_numpy):
        row = measure(values, ns.repeat, want)
        if row is not None:
            log(f"{row.method}: {row.record_ns_per_value:.0f} ns/value")
            rows.append(row)
    table = TABLE_HEAD + "\n" + "\n".join(row_markdown(r) for r in rows)
    path = write_json(
        "histcost",
        stamp,
        {
            "benchmark": "histcost",
            "started_utc": started.isoformat(),
            "command": " ".join([".venv/bin/python -m bench.histcost", *sys.argv[1:]]),
            "machine": machine_info(distributions=("maplookup", "numpy", "hdrhistogram")),
            "values": ns.values,
            "repeat": ns.repeat,
            "exact_percentiles_ns": dict(zip(map(str, PERCENTILES), want, strict=True)),
            "rows": [asdict(r) for r in rows],
            "table_markdown": table,
        },
    )
    print(table)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
