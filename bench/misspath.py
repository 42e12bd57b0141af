"""The miss path alone, in a few minutes: ``maplookup serve --no-cache`` (batching cache
misses, as it does by default, and with ``max_keys_per_query = 1``: one statement per key)
against the asyncio+uvloop+asyncpg responder (with and without asyncpg's reset-on-release
query), which sends one statement per request.

The full suite (``bench/suite.py``) measures this too, among everything else; this module is
for working on the miss path: it loads one dataset, starts the three servers once, and
alternates closed-loop runs (A, B, C, A, B, C ...) so that the drift of a shared machine is
spread over all of them.  First, with no server running, it measures what a statement costs
PostgreSQL and the client against the number of keys in it.  Besides throughput and latency
it reports the CPU each side spent per request (server and PostgreSQL), which is what tells
where a difference comes from.

    .venv/bin/python -m bench.misspath                     # 10k mailboxes, 64 connections
    .venv/bin/python -m bench.misspath --rounds 5 --connections 1 64

Writes ``bench/results/misspath-<UTC>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.lib import datasets
from bench.lib.common import (
    BenchError,
    Children,
    Logger,
    PrivatePostgres,
    bounded_int,
    cpu_seconds,
    descendants,
    dsn_for,
    machine_info,
    run_guarded,
    utc_stamp,
    write_json,
)
from bench.lib.load import LoadSpec, run_load
from bench.lib.servers import Monitor, ServerHandle, start_maplookup, start_responder

log = Logger("misspath")

MIX = "90-10"
REFERENCE = "asyncpg, no pool reset"
ONE_KEY = "maplookup --no-cache, one key per statement"
ONE_KEY_SETTING = "MAPLOOKUP_DATABASE__MAX_KEYS_PER_QUERY"


def _server_us_per_request(result: dict[str, Any]) -> float:
    rps = result["throughput_rps"]
    return result["monitor"].get("server_cpu_pct", 0.0) * 1e4 / rps if rps else 0.0


def _pg_us_per_request(result: dict[str, Any]) -> float:
    rps = result["throughput_rps"]
    return result["monitor"].get("postgres_cpu_pct", 0.0) * 1e4 / rps if rps else 0.0


STATEMENT_SIZES = (1, 2, 4, 8, 16, 32, 64)


def folded_keys(keys_path: Path, limit: int = 4000) -> list[str]:
    """The first ``limit`` keys of a key file, folded as the server folds them."""
    from maplookup.maps import MapName, fold_key

    keys = []
    for line in keys_path.read_text().splitlines():
        folded = fold_key(MapName.VMAILBOX, line.split("\t")[2].encode())
        if folded is not None:
            keys.append(folded)
    return keys[:limit]


async def statement_costs(
    dsn: str, keys: list[str], postmaster_pid: int | None
) -> list[dict[str, float]]:
    """What a statement costs against the keys in it: one asyncpg connection, no server.

    The same folded keys go to ``maplookup.vmailbox`` in statements of 1 to 64 keys
    (``maps.query_for`` / ``maps.batch_query_for``, as the server sends them); wall time and
    CPU (this process, and every PostgreSQL process) per key.
    """
    import time

    import asyncpg

    from maplookup.maps import LookupSettings, MapName, batch_query_for, query_for

    settings = LookupSettings()
    rows = []
    conn = await asyncpg.connect(dsn)
    try:
        for size in STATEMENT_SIZES:
            pg_pids = descendants(postmaster_pid) if postmaster_pid else []
            pg0, cpu0, t0 = (
                cpu_seconds(pg_pids, children_too=True),
                time.process_time(),
                time.perf_counter(),
            )
            for i in range(0, len(keys), size):
                chunk = keys[i : i + size]
                if len(chunk) == 1:
                    query, args = query_for(MapName.VMAILBOX, chunk[0], settings)
                    await conn.fetchval(query, *args)
                else:
                    query, args = batch_query_for(MapName.VMAILBOX, settings)
                    await conn.fetch(query, chunk, *args)
            wall = time.perf_counter() - t0
            n = len(keys)
            rows.append(
                {
                    "keys_per_statement": size,
                    "wall_us_per_key": wall / n * 1e6,
                    "client_cpu_us_per_key": (time.process_time() - cpu0) / n * 1e6,
                    "postgres_cpu_us_per_key": (cpu_seconds(pg_pids, children_too=True) - pg0)
                    / n
                    * 1e6,
                }
            )
            log(
                f"{size} keys per statement: {rows[-1]['wall_us_per_key']:.0f} µs/key wall, "
                f"PostgreSQL {rows[-1]['postgres_cpu_us_per_key']:.0f} µs CPU/key"
            )
    finally:
        await conn.close()
    return rows


def statement_table(rows: list[dict[str, float]]) -> str:
    lines = [
        "| keys per statement | wall µs/key | client CPU µs/key | PostgreSQL CPU µs/key |",
        "|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['keys_per_statement']:.0f} | {r['wall_us_per_key']:.0f} "
            f"| {r['client_cpu_us_per_key']:.0f} | {r['postgres_cpu_us_per_key']:.0f} |"
        )
    return "\n".join(lines)


def run(ns: argparse.Namespace) -> int:
    started, stamp = utc_stamp()
    pg = PrivatePostgres()
    work = Path(tempfile.mkdtemp(prefix="maplookup-misspath-", dir="/tmp"))
    runs: list[dict[str, Any]] = []
    costs: list[dict[str, float]] = []
    with Children() as children:
        try:
            pg.start()
            ds = datasets.Dataset(ns.mailboxes)
            info = asyncio.run(datasets.load(pg.dsn, ds))
            hot = datasets.hot_set(ds, min(ns.mailboxes, 20_000))
            keys = datasets.write_mix(
                work / "keys.tsv", datasets.make_mix(ds, MIX, hot, min(len(hot), 20_000))
            )
            log(f"dataset {ns.mailboxes:,} mailboxes in {info['insert_s']:.1f} s")
            dsn = dsn_for(pg.dsn, ds.database)
            costs = asyncio.run(statement_costs(dsn, folded_keys(keys), pg.postmaster_pid()))
            servers: list[tuple[str, ServerHandle]] = [
                ("maplookup --no-cache", start_maplookup(children, "nocache", dsn, cache=False)),
                (ONE_KEY, start_maplookup(children, "nocache-1", dsn, cache=False,
                                          settings_env={ONE_KEY_SETTING: "1"})),
                (REFERENCE, start_responder(children, "asyncpg", dsn=dsn,
                                            extra_args=["--no-pool-reset"])),
                ("asyncpg", start_responder(children, "asyncpg", dsn=dsn)),
            ]  # fmt: skip
            for n in range(ns.rounds):
                for connections in ns.connections:
                    for label, handle in servers:
                        spec = LoadSpec(
                            port=handle.port or 0,
                            keys=str(keys),
                            connections=connections,
                            duration_s=ns.seconds,
                            warmup_s=1.0,
                            label=f"{label} c={connections} round {n}",
                        )
                        result = asdict(run_load(spec, Monitor(handle, pg.postmaster_pid()),
                                                 children))  # fmt: skip
                        problems = result["mismatches"] + result["errors"] + result["other"]
                        if problems:
                            raise BenchError(f"{spec.label}: {problems} wrong answers")
                        log(
                            f"{spec.label}: {result['throughput_rps']:,.0f}/s "
                            f"p50 {result['latency']['p50_us']:,.0f} µs "
                            f"p99 {result['latency']['p99_us']:,.0f} µs, "
                            f"server {_server_us_per_request(result):.0f} µs CPU/req, "
                            f"PostgreSQL {_pg_us_per_request(result):.0f} µs CPU/req"
                        )
                        runs.append({"server": label, "connections": connections,
                                     "round": n, "result": result})  # fmt: skip
        finally:
            children.stop_all()
            pg.stop()
            shutil.rmtree(work, ignore_errors=True)
    text = statement_table(costs) + "\n\n" + report(runs, ns.connections)
    payload = {
        "benchmark": "misspath",
        "started_utc": started.isoformat(),
        "command": " ".join([".venv/bin/python -m bench.misspath", *sys.argv[1:]]),
        "machine": machine_info({}),
        "mailboxes": ns.mailboxes,
        "mix": MIX,
        "statement_costs": costs,
        "runs": runs,
        "tables_markdown": text,
    }
    path = write_json("misspath", stamp, payload)
    print(text)
    log(f"wrote {path}")
    return 0


def report(runs: list[dict[str, Any]], connections: Sequence[int]) -> str:
    lines = [
        "| server | connections | replies/s (median) | vs " + REFERENCE + " | p50 µs | p99 µs "
        "| p99/p50 | server CPU µs/req | PostgreSQL CPU µs/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in connections:
        at_c = [r for r in runs if r["connections"] == c]
        reference = statistics.median(
            r["result"]["throughput_rps"] for r in at_c if r["server"] == REFERENCE
        )
        for label in dict.fromkeys(r["server"] for r in at_c):
            mine = [r["result"] for r in at_c if r["server"] == label]
            rps = statistics.median(r["throughput_rps"] for r in mine)
            p50 = statistics.median(r["latency"]["p50_us"] for r in mine)
            p99 = statistics.median(r["latency"]["p99_us"] for r in mine)
            server_us = statistics.median(_server_us_per_request(r) for r in mine)
            pg_us = statistics.median(_pg_us_per_request(r) for r in mine)
            lines.append(
                f"| {label} | {c} | {rps:,.0f} | {rps / reference:.2f}x | {p50:,.0f} "
                f"| {p99:,.0f} | {p99 / p50:.2f} | {server_us:.0f} | {pg_us:.0f} |"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.misspath",
        description="maplookup --no-cache against asyncio+uvloop+asyncpg responders, "
        "alternating, with CPU per request (see bench/README.md).",
    )
    parser.add_argument(
        "--mailboxes",
        type=bounded_int(100, 2_000_000),
        default=10_000,
        help="dataset size (default 10,000; the miss path is an index lookup)",
    )
    parser.add_argument(
        "--rounds", type=bounded_int(1, 50), default=3, help="alternating repetitions (default 3)"
    )
    parser.add_argument(
        "--seconds", type=float, default=4.0, help="measured seconds per run (default 4)"
    )
    parser.add_argument("--connections", type=bounded_int(1, 4096), nargs="+", default=[64],
                        help="connection counts (default 64)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    return run_guarded(log, lambda: run(ns))


if __name__ == "__main__":
    sys.exit(main())
