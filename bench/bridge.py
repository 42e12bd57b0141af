"""How to call asyncpg from trio: three ways side by side, in one run.

Variants, each measured in its own subprocess (importing trio_asyncio replaces
``asyncio.new_event_loop()`` process-wide, so it must not leak into the others):

``asyncio-uvloop``
    Plain asyncio on uvloop with an asyncpg pool; no trio at all.  The reference.
``trio-asyncio``
    trio with ``trio_asyncio.open_loop()``; the pool is created inside that loop and every
    query goes through ``trio_asyncio.aio_as_trio``.
``trio-thread-bridge``
    trio with ``maplookup.db.open_database``: an asyncio (uvloop) loop in a dedicated thread
    owns the pool; queries go through ``Database.fetch_value``, the production path.

Workloads, both over TCP loopback with a pool of at most 10 connections and the query
``SELECT $1::text`` (a different key each time, and each answer checked):

``sequential``
    N queries one after another from a single task.
``concurrent``
    C tasks, closed loop, N queries in all (N/C each; the remainder is spread over the first
    tasks).

Each workload is preceded by a warm-up of the same shape that is not measured.  Per-query
latency is ``time.perf_counter_ns()`` around the awaited call; throughput is queries divided by
the wall time of the whole workload.

Run from the project root::

    .venv/bin/python -m bench.bridge                   # private PostgreSQL, all variants
    .venv/bin/python -m bench.bridge --dsn postgresql://user@127.0.0.1:5432/db

A Markdown table goes to stdout, progress (one line per variant) to stderr, and the figures to
``bench/results/bridge-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.lib.common import (
    PrivatePostgres,
    bounded_int,
    machine_info,
    timeout_seconds,
    write_json,
)
from maplookup.config import redact_dsn

QUERY = "SELECT $1::text"
POOL_MAX_CONNECTIONS = 10
QUERY_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0

VARIANTS = ("asyncio-uvloop", "trio-asyncio", "trio-thread-bridge")
REFERENCE = "asyncio-uvloop"
WORKLOADS = ("sequential", "concurrent")

DEFAULT_QUERIES = 5000
DEFAULT_CONCURRENCY = 64
DEFAULT_WARMUP = 200
DEFAULT_TIMEOUT_S = 300.0
MAX_QUERIES = 1_000_000
MAX_CONCURRENCY = 1024

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

Call = Callable[[str], Awaitable[object]]


def _log(message: str) -> None:
    print(f"[bench.bridge] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# statistics


@dataclass(frozen=True, slots=True)
class WorkloadResult:
    variant: str
    workload: str
    queries: int
    concurrency: int
    wall_s: float
    throughput_qps: float
    mean_us: float
    p50_us: float
    p99_us: float
    max_us: float


def _percentile(ordered: Sequence[int], pct: float) -> int:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


def _summarise(
    variant: str, workload: str, concurrency: int, wall_ns: int, latencies_ns: list[int]
) -> WorkloadResult:
    ordered = sorted(latencies_ns)
    n = len(ordered)
    return WorkloadResult(
        variant=variant,
        workload=workload,
        queries=n,
        concurrency=concurrency,
        wall_s=wall_ns / 1e9,
        throughput_qps=n / (wall_ns / 1e9),
        mean_us=sum(ordered) / n / 1e3,
        p50_us=_percentile(ordered, 50) / 1e3,
        p99_us=_percentile(ordered, 99) / 1e3,
        max_us=ordered[-1] / 1e3,
    )


def _split(total: int, parts: int) -> list[int]:
    """``total`` queries over ``parts`` tasks, as evenly as possible, no empty task."""
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class _AnswerMismatch(Exception):
    pass


def _check(key: str, value: object) -> None:
    if value != key:
        raise _AnswerMismatch(f"asked for {key!r}, got {value!r}")


# --------------------------------------------------------------------------
# workload drivers, one per framework (same shape, same timing)


async def _asyncio_workload(
    call: Call, total: int, concurrency: int, prefix: str
) -> tuple[int, list[int]]:
    latencies: list[int] = []

    async def client(idx: int, count: int) -> None:
        for j in range(count):
            key = f"{prefix}-{idx}-{j}"
            t0 = time.perf_counter_ns()
            value = await call(key)
            t1 = time.perf_counter_ns()
            latencies.append(t1 - t0)
            _check(key, value)

    started = time.perf_counter_ns()
    async with asyncio.TaskGroup() as group:
        for idx, count in enumerate(_split(total, concurrency)):
            group.create_task(client(idx, count))
    return time.perf_counter_ns() - started, latencies


async def _trio_workload(
    call: Call, total: int, concurrency: int, prefix: str
) -> tuple[int, list[int]]:
    import trio

    latencies: list[int] = []

    async def client(idx: int, count: int) -> None:
        for j in range(count):
            key = f"{prefix}-{idx}-{j}"
            t0 = time.perf_counter_ns()
            value = await call(key)
            t1 = time.perf_counter_ns()
            latencies.append(t1 - t0)
            _check(key, value)

    started = time.perf_counter_ns()
    async with trio.open_nursery() as nursery:
        for idx, count in enumerate(_split(total, concurrency)):
            nursery.start_soon(client, idx, count)
    return time.perf_counter_ns() - started, latencies


@dataclass(frozen=True, slots=True)
class WorkerArgs:
    variant: str
    dsn: str
    queries: int
    concurrency: int
    warmup: int
    budget_s: float


def _plan(args: WorkerArgs) -> list[tuple[str, int]]:
    return [("sequential", 1), ("concurrent", args.concurrency)]


async def _run_plan_asyncio(args: WorkerArgs, call: Call) -> list[WorkloadResult]:
    results = []
    for workload, concurrency in _plan(args):
        await _asyncio_workload(call, args.warmup, concurrency, f"warm-{workload}")
        wall, lat = await _asyncio_workload(call, args.queries, concurrency, workload)
        results.append(_summarise(args.variant, workload, concurrency, wall, lat))
    return results


async def _run_plan_trio(args: WorkerArgs, call: Call) -> list[WorkloadResult]:
    results = []
    for workload, concurrency in _plan(args):
        await _trio_workload(call, args.warmup, concurrency, f"warm-{workload}")
        wall, lat = await _trio_workload(call, args.queries, concurrency, workload)
        results.append(_summarise(args.variant, workload, concurrency, wall, lat))
    return results


def _pool_kwargs() -> dict[str, Any]:
    """Same pool shape as maplookup.db._create_pool, so that only the bridge differs."""
    return {
        "min_size": 0,
        "max_size": POOL_MAX_CONNECTIONS,
        "timeout": CONNECT_TIMEOUT_S,
        "command_timeout": QUERY_TIMEOUT_S,
        "server_settings": {"application_name": "maplookup-bench"},
    }


# --------------------------------------------------------------------------
# the three variants (each runs in a worker subprocess)


def _worker_asyncio_uvloop(args: WorkerArgs) -> list[WorkloadResult]:
    import asyncpg
    import uvloop

    async def main() -> list[WorkloadResult]:
        async with asyncio.timeout(args.budget_s):
            pool = await asyncpg.create_pool(args.dsn, **_pool_kwargs())
            try:

                async def call(key: str) -> object:
                    return await pool.fetchval(QUERY, key)

                return await _run_plan_asyncio(args, call)
            finally:
                await pool.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def _worker_trio_asyncio(args: WorkerArgs) -> list[WorkloadResult]:
    import asyncpg
    import trio
    import trio_asyncio

    async def main() -> list[WorkloadResult]:
        with trio.fail_after(args.budget_s):
            async with trio_asyncio.open_loop():
                pool = await trio_asyncio.aio_as_trio(asyncpg.create_pool)(
                    args.dsn, **_pool_kwargs()
                )
                try:
                    fetchval = trio_asyncio.aio_as_trio(pool.fetchval)

                    async def call(key: str) -> object:
                        return await fetchval(QUERY, key)

                    return await _run_plan_trio(args, call)
                finally:
                    with trio.CancelScope(shield=True):
                        await trio_asyncio.aio_as_trio(pool.close)()

    return trio.run(main)


def _worker_trio_thread_bridge(args: WorkerArgs) -> list[WorkloadResult]:
    import trio

    from maplookup.db.database import PoolSettings, open_database

    settings = PoolSettings(
        dsn=args.dsn,
        pool_max_connections=POOL_MAX_CONNECTIONS,
        query_timeout_s=QUERY_TIMEOUT_S,
        connect_timeout_s=CONNECT_TIMEOUT_S,
    )

    async def main() -> list[WorkloadResult]:
        with trio.fail_after(args.budget_s):
            async with open_database(settings) as db:

                async def call(key: str) -> object:
                    return await db.fetch_value(QUERY, (key,))

                return await _run_plan_trio(args, call)

    return trio.run(main)


_WORKERS: dict[str, Callable[[WorkerArgs], list[WorkloadResult]]] = {
    "asyncio-uvloop": _worker_asyncio_uvloop,
    "trio-asyncio": _worker_trio_asyncio,
    "trio-thread-bridge": _worker_trio_thread_bridge,
}


def _worker_main(args: WorkerArgs) -> int:
    results = _WORKERS[args.variant](args)
    json.dump([asdict(r) for r in results], sys.stdout)
    sys.stdout.write("\n")
    return 0


# --------------------------------------------------------------------------
# the coordinator


def _run_variant(
    variant: str, dsn: str, queries: int, concurrency: int, warmup: int, timeout_s: float
) -> list[WorkloadResult]:
    argv = [
        sys.executable,
        "-m",
        "bench.bridge",
        "--worker",
        variant,
        "--dsn",
        dsn,
        "--queries",
        str(queries),
        "--concurrency",
        str(concurrency),
        "--warmup",
        str(warmup),
        "--timeout",
        str(timeout_s),
    ]
    # The worker bounds itself to timeout_s; the extra margin covers interpreter start-up and
    # pool shutdown, after which subprocess.run kills it.
    proc = subprocess.run(
        argv,
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        text=True,
        timeout=timeout_s + 30,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"variant {variant} failed (exit {proc.returncode}); see stderr above")
    return [WorkloadResult(**row) for row in json.loads(proc.stdout)]


def _ratios(results: list[WorkloadResult]) -> dict[tuple[str, str], float | None]:
    reference = {r.workload: r.throughput_qps for r in results if r.variant == REFERENCE}
    out: dict[tuple[str, str], float | None] = {}
    for r in results:
        ref = reference.get(r.workload)
        out[(r.variant, r.workload)] = r.throughput_qps / ref if ref else None
    return out


def markdown_table(results: list[WorkloadResult]) -> str:
    ratios = _ratios(results)
    lines = [
        "| variant | workload | tasks | queries | q/s | vs asyncio-uvloop "
        "| mean µs | p50 µs | p99 µs | max µs | p99/p50 |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    order = {w: i for i, w in enumerate(WORKLOADS)}
    for r in sorted(results, key=lambda r: (order[r.workload], VARIANTS.index(r.variant))):
        ratio = ratios[(r.variant, r.workload)]
        lines.append(
            f"| {r.variant} | {r.workload} | {r.concurrency} | {r.queries} "
            f"| {r.throughput_qps:,.0f} | {'n/a' if ratio is None else f'{ratio:.2f}x'} "
            f"| {r.mean_us:,.0f} | {r.p50_us:,.0f} | {r.p99_us:,.0f} | {r.max_us:,.0f} "
            f"| {r.p99_us / r.p50_us:.1f} |"
        )
    return "\n".join(lines)


def _coordinator_main(ns: argparse.Namespace) -> int:
    variants: list[str] = ns.variants
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    pg: PrivatePostgres | None = None
    if ns.dsn:
        dsn = ns.dsn
        _log(f"using {redact_dsn(dsn)}")
    else:
        t0 = time.monotonic()
        pg = PrivatePostgres()
        dsn = pg.start()
        _log(f"embedded PostgreSQL on {dsn} ({time.monotonic() - t0:.1f} s)")
    results: list[WorkloadResult] = []
    try:
        for variant in variants:
            t0 = time.monotonic()
            rows = _run_variant(variant, dsn, ns.queries, ns.concurrency, ns.warmup, ns.timeout)
            results.extend(rows)
            summary = ", ".join(
                f"{r.workload} {r.throughput_qps:,.0f} q/s p99 {r.p99_us:,.0f} µs" for r in rows
            )
            _log(f"{variant}: {summary} ({time.monotonic() - t0:.1f} s)")
    finally:
        if pg is not None:
            pg.stop()
            _log("embedded PostgreSQL stopped")

    table = markdown_table(results)
    ratios = _ratios(results)
    payload: dict[str, object] = {
        "benchmark": "bridge",
        "started_utc": started.isoformat(),
        "command": " ".join([".venv/bin/python -m bench.bridge", *sys.argv[1:]]),
        "settings": {
            "queries": ns.queries,
            "concurrency": ns.concurrency,
            "warmup": ns.warmup,
            "pool_max_connections": POOL_MAX_CONNECTIONS,
            "query": QUERY,
            "dsn": redact_dsn(dsn),
            "database": "external (--dsn)" if ns.dsn else "embedded, fast_unsafe, TCP loopback",
        },
        "machine": machine_info(
            distributions=("trio", "asyncpg", "uvloop", "trio-asyncio", "maplookup")
        ),
        "results": [
            {**asdict(r), "throughput_vs_reference": ratios[(r.variant, r.workload)]}
            for r in results
        ],
        "table_markdown": table,
    }
    path = write_json("bridge", stamp, payload)
    print(table)
    _log(f"wrote {path.relative_to(PROJECT_ROOT)}")
    return 0


# --------------------------------------------------------------------------
# command line


def _variant_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {', '.join(unknown) or '(none)'}; "
            f"choose from {', '.join(VARIANTS)}"
        )
    return list(dict.fromkeys(names))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bridge",
        description="Benchmark ways of calling asyncpg from trio (see bench/README.md).",
    )
    parser.add_argument(
        "--queries",
        type=bounded_int(1, MAX_QUERIES),
        default=DEFAULT_QUERIES,
        help=f"measured queries per workload (default {DEFAULT_QUERIES})",
    )
    parser.add_argument(
        "--concurrency",
        type=bounded_int(1, MAX_CONCURRENCY),
        default=DEFAULT_CONCURRENCY,
        help=f"tasks in the concurrent workload (default {DEFAULT_CONCURRENCY})",
    )
    parser.add_argument(
        "--warmup",
        type=bounded_int(0, MAX_QUERIES),
        default=DEFAULT_WARMUP,
        help=f"unmeasured queries before each workload (default {DEFAULT_WARMUP})",
    )
    parser.add_argument(
        "--dsn",
        help="PostgreSQL DSN to use instead of starting a private cluster (use TCP loopback)",
    )
    parser.add_argument(
        "--variants",
        type=_variant_list,
        default=list(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)",
    )
    parser.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds allowed per variant (default {DEFAULT_TIMEOUT_S:.0f})",
    )
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.worker:
        if not ns.dsn:
            raise SystemExit("--worker needs --dsn")
        return _worker_main(
            WorkerArgs(ns.worker, ns.dsn, ns.queries, ns.concurrency, ns.warmup, ns.timeout)
        )
    return _coordinator_main(ns)


if __name__ == "__main__":
    sys.exit(main())
