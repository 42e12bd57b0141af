"""Garbage-collection pauses in a loaded server with a full cache.

A full (generation 2) collection walks every object the collector tracks and stops every
connection meanwhile.  This runs ``maplookup serve`` (1 worker) on a dataset of 100,000
mailboxes, fills its cache with all of them, drives cached hits at 512 connections, and records
every collection inside the server (``gc.callbacks``, through ``python -m bench.gcpause
--server-child``, which runs ``maplookup serve`` unchanged apart from that hook).  It does this
twice, side by side: as shipped (``gc.freeze()`` once serve is up) and with ``gc.freeze``
turned into a no-op, so the effect of freezing is a ratio from one run.

    .venv/bin/python -m bench.gcpause
    .venv/bin/python -m bench.gcpause --mailboxes 1000000 --connections 64

Writes ``bench/results/gcpause-<UTC>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.lib import datasets
from bench.lib.common import (
    BenchError,
    Children,
    Logger,
    PrivatePostgres,
    bounded_int,
    dsn_for,
    free_port,
    machine_info,
    run_guarded,
    utc_stamp,
    write_json,
)
from bench.lib.load import LoadSpec, run_load
from bench.lib.servers import Monitor, ServerHandle, wait_ready, warm

log = Logger("gcpause")

VARIANTS = ("as shipped (gc.freeze)", "gc.freeze disabled")


def server_child(argv: list[str]) -> int:
    """``maplookup serve`` with every collection recorded; the record is written on SIGUSR1."""
    report_path = os.environ["GCPAUSE_REPORT"]
    if os.environ.get("GCPAUSE_NO_FREEZE") == "1":
        setattr(gc, "freeze", lambda: None)  # noqa: B010 - the whole point of this variant
    pauses: list[tuple[int, float]] = []
    started = [0.0]

    def on_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((info["generation"], (time.perf_counter() - started[0]) * 1e3))

    def write_report(_signum: int, _frame: object) -> None:
        Path(report_path).write_text(
            json.dumps({"pauses_ms": pauses, "frozen": gc.get_freeze_count()})
        )

    gc.callbacks.append(on_collection)
    signal.signal(signal.SIGUSR1, write_report)
    from maplookup.cli.main import main

    return main(["serve", *argv])


def _start(children: Children, dsn: str, work: Path, freeze: bool) -> tuple[ServerHandle, Path]:
    port, metrics_port = free_port(), free_port()
    report = work / f"gc-{'freeze' if freeze else 'nofreeze'}.json"
    argv = [
        sys.executable, "-m", "bench.gcpause", "--server-child",
        "--dsn", dsn, "--socketmap", f"127.0.0.1:{port}",
        "--metrics", f"127.0.0.1:{metrics_port}", "--log-level", "warning",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAPLOOKUP_")}
    env.update(
        GCPAUSE_REPORT=str(report),
        GCPAUSE_NO_FREEZE="0" if freeze else "1",
        MAPLOOKUP_CACHE__MAX_ENTRIES="2000000",
        MAPLOOKUP_CACHE__POSITIVE_TTL_S="7200",
    )
    if os.geteuid() == 0:
        env["MAPLOOKUP_ALLOW_ROOT"] = "true"
    proc = children.start(argv, env=env, stdin=subprocess.DEVNULL)
    handle = ServerHandle("maplookup", "maplookup", proc, port, None, metrics_port, 1, True, argv)
    wait_ready(handle)
    return handle, report


def _pauses(handle: ServerHandle, report: Path) -> dict[str, Any]:
    report.unlink(missing_ok=True)
    handle.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not report.exists():
        if time.monotonic() > deadline:
            raise BenchError("the server did not write its collection record")
        time.sleep(0.05)
    time.sleep(0.1)
    data: dict[str, Any] = json.loads(report.read_text())
    return data


def _summary(pauses: list[list[float]], generation: int) -> dict[str, float]:
    times = [ms for g, ms in pauses if g == generation]
    return {
        "count": len(times),
        "max_ms": max(times, default=0.0),
        "median_ms": statistics.median(times) if times else 0.0,
        "total_ms": sum(times),
    }


def run(ns: argparse.Namespace) -> int:
    started, stamp = utc_stamp()
    pg = PrivatePostgres()
    work = Path(tempfile.mkdtemp(prefix="maplookup-gcpause-", dir="/tmp"))
    rows: list[dict[str, Any]] = []
    with Children() as children:
        try:
            pg.start()
            ds = datasets.Dataset(ns.mailboxes)
            asyncio.run(datasets.load(pg.dsn, ds))
            hot = datasets.hot_set(ds, ns.mailboxes)
            keys = datasets.write_mix(
                work / "hits.tsv", datasets.make_mix(ds, "hits", hot, len(hot))
            )
            dsn = dsn_for(pg.dsn, ds.database)
            servers = {}
            for variant, freeze in zip(VARIANTS, (True, False), strict=True):
                handle, report = _start(children, dsn, work, freeze)
                warmed = warm(handle, str(keys))
                log(f"{variant}: {warmed['cache_entries_worker0']:,.0f} entries cached")
                servers[variant] = (handle, report)
            for n in range(ns.rounds):
                for variant, (handle, report) in servers.items():
                    before = _pauses(handle, report)["pauses_ms"]
                    spec = LoadSpec(port=handle.port or 0, keys=str(keys),
                                    connections=ns.connections, duration_s=ns.seconds,
                                    warmup_s=1.0, label=f"{variant} round {n}")  # fmt: skip
                    result = run_load(spec, Monitor(handle, pg.postmaster_pid()), children)
                    record = _pauses(handle, report)
                    during = record["pauses_ms"][len(before) :]
                    row = {
                        "variant": variant,
                        "round": n,
                        "frozen_objects": record["frozen"],
                        "throughput_rps": result.throughput_rps,
                        "latency": result.latency,
                        "gen2": _summary(during, 2),
                        "gen1": _summary(during, 1),
                        "gen0": _summary(during, 0),
                    }
                    rows.append(row)
                    log(
                        f"{spec.label}: {result.throughput_rps:,.0f}/s "
                        f"p99 {result.latency['p99_us']:,.0f} µs "
                        f"max {result.latency['max_us']:,.0f} µs; "
                        f"{row['gen2']['count']} full collections, longest "
                        f"{row['gen2']['max_ms']:.1f} ms"
                    )
        finally:
            children.stop_all()
            pg.stop()
            shutil.rmtree(work, ignore_errors=True)
    text = report_table(rows)
    payload = {
        "benchmark": "gcpause",
        "started_utc": started.isoformat(),
        "command": " ".join([".venv/bin/python -m bench.gcpause", *sys.argv[1:]]),
        "machine": machine_info({}),
        "mailboxes": ns.mailboxes,
        "connections": ns.connections,
        "rows": rows,
        "tables_markdown": text,
    }
    path = write_json("gcpause", stamp, payload)
    print(text)
    log(f"wrote {path}")
    return 0


def report_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| server | frozen objects | replies/s | p50 µs | p99 µs | max µs "
        "| full collections | longest ms | median ms | total ms |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue

        def med(get: Any, mine: list[dict[str, Any]] = mine) -> float:
            return float(statistics.median(get(r) for r in mine))

        lines.append(
            f"| {variant} | {mine[0]['frozen_objects']:,} "
            f"| {med(lambda r: r['throughput_rps']):,.0f} "
            f"| {med(lambda r: r['latency']['p50_us']):,.0f} "
            f"| {med(lambda r: r['latency']['p99_us']):,.0f} "
            f"| {med(lambda r: r['latency']['max_us']):,.0f} "
            f"| {med(lambda r: r['gen2']['count']):.0f} | {med(lambda r: r['gen2']['max_ms']):.1f} "
            f"| {med(lambda r: r['gen2']['median_ms']):.1f} "
            f"| {med(lambda r: r['gen2']['total_ms']):.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gcpause",
        description="Garbage-collection pauses of maplookup serve under load, with and "
        "without gc.freeze (see bench/README.md, 'Garbage collection').",
    )
    parser.add_argument(
        "--mailboxes",
        type=bounded_int(1000, 2_000_000),
        default=100_000,
        help="dataset size, all of it cached (default 100,000)",
    )
    parser.add_argument(
        "--connections",
        type=bounded_int(1, 4096),
        default=512,
        help="closed-loop connections (default 512)",
    )
    parser.add_argument(
        "--seconds", type=float, default=6.0, help="measured seconds per run (default 6)"
    )
    parser.add_argument("--rounds", type=bounded_int(1, 20), default=2,
                        help="alternating rounds (default 2)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--server-child"]:
        return server_child(args[1:])
    ns = parse_args(args)
    return run_guarded(log, lambda: run(ns))


if __name__ == "__main__":
    sys.exit(main())
