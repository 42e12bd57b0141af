"""The complete mode (``cache.mode = "complete"``, issue 16) against its references, in one run.

One dataset (100,000 mailboxes by default) in a private PostgreSQL, every server up at once, so
that the runs compared alternate (A, B, A, B, ...) and a shared machine's drift is spread over
both sides:

1. **misses and hits through socketmap**, closed loop at 1 connection (one request in flight,
   as one Postfix process) and at 64: maplookup ``mode=complete`` with 1 worker against the bare
   trio responder (``trio-bare``, ``bench/lib/responders.py``; it answers a constant OK without
   any lookup, so its statuses are not checked), with ``--no-cache`` and ``lru`` (1 worker) for
   reference, and complete mode without its memo (``cache.complete_memo_entries = 0``: every
   lookup computed from the copy, as for the unique keys of a dictionary attack; the runs
   cycle through 20,000 keys, so the memo answers most of them after the first pass).  The
   ``misses`` keys do not exist; the ``hits`` keys do.  ``lru`` answers from its cache the keys
   an earlier run asked (negative entries for the misses; round 0 starts cold), the others and
   ``--no-cache`` from PostgreSQL;
2. **``postmap -q -``** (4 processes, then 8, 100,000 keys of the ``90-10`` mix: 90 % existing)
   through maplookup ``mode=complete`` with one worker per core against Postfix's ``pgsql:``
   direct, alternating, with the CPU of the server, of PostgreSQL and of each core;
3. **change-to-visible**: committed UPDATEs of a mailbox's path, the clock running from the
   UPDATE's return to the first lookup (one persistent connection polling) that answers the new
   path, ``complete`` and ``lru`` alternating change by change (``bench/cache.py``'s method),
   every other server paused (SIGSTOP) meanwhile: each would read the log and apply every
   change too, on the same cores, at the same moment;
4. **a database outage**: PostgreSQL stopped with ``pg_ctl stop -m immediate``, then the
   ``hits`` and ``misses`` runs again on the complete-mode server (every status checked: 0
   TEMP is the target) and, for contrast, on ``lru`` (whose cache holds the keys the earlier
   runs reached, not all of them) and ``--no-cache``.  Last, since the cluster is gone after it.

    .venv/bin/python -m bench.complete                  # about 7 minutes
    .venv/bin/python -m bench.complete --parts socketmap,changes    # some of the parts
    .venv/bin/python -m bench.complete --rounds 3 --seconds 5

Markdown tables on stdout, progress on stderr, ``bench/results/complete-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.lib import datasets, postfix
from bench.lib.common import (
    BenchError,
    Children,
    Deadline,
    Logger,
    PrivatePostgres,
    bounded_int,
    core_busy_seconds,
    cpu_seconds,
    descendants,
    dsn_for,
    machine_info,
    rss_kib,
    run_guarded,
    utc_stamp,
    write_json,
)
from bench.lib.load import LoadSpec, run_load
from bench.lib.servers import Monitor, ServerHandle, start_maplookup, start_responder

log = Logger("complete")

COMPLETE = "maplookup complete, 1 worker"
TRIO = "trio-bare"
NOCACHE = "maplookup --no-cache"
NOMEMO = "maplookup complete, no memo"
LRU = "maplookup lru, 1 worker"
#: postmap -q - processes: 4 as issue 16's measurement, 8 to leave the server no idle core.
POSTMAP_PROCESSES = (4, 8)
POSTMAP_KEYS = 100_000
LOAD_KEYS = 20_000
COMPLETE_ENV = {"MAPLOOKUP_CACHE__MODE": "complete"}
# Every lookup computed from the copy: what unique keys (a dictionary attack) cost.
NOMEMO_ENV = COMPLETE_ENV | {"MAPLOOKUP_CACHE__COMPLETE_MEMO_ENTRIES": "0"}
# The LRU server keeps every key the runs ask (no eviction, no expiry during a run).
LRU_ENV = {
    "MAPLOOKUP_CACHE__MAX_ENTRIES": "1000000",
    "MAPLOOKUP_CACHE__POSITIVE_TTL_S": "7200",
    "MAPLOOKUP_CACHE__NEGATIVE_TTL_S": "7200",
}
CHANGE_DEADLINE_S = 5.0
#: The bench's parts (``--parts``), in the order they run.
PARTS = ("socketmap", "postmap", "changes", "outage")
BUDGET_S = 900.0


@contextlib.contextmanager
def paused(handles: Iterable[ServerHandle]) -> Iterator[None]:
    """SIGSTOP every process of ``handles`` for the block (SIGCONT after, whatever happens)."""
    pids = [pid for handle in handles for pid in handle.pids()]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def server_memory(servers: dict[str, ServerHandle], ds: datasets.Dataset) -> dict[str, Any]:
    """VmRSS of each maplookup server's serving processes, and the copy's share per address:
    a complete-mode worker's RSS minus the lru server's (same code, same start-up, an empty
    cache), over the dataset's addresses (mailboxes and aliases)."""
    rss = {
        name: [rss_kib(pid) for pid in handle.worker_pids()]
        for name, handle in servers.items()
        if handle.kind == "maplookup"
    }
    addresses = ds.mailboxes + ds.aliases
    base = rss[LRU][0]
    share = {
        name: statistics.mean(kib) * 1024 / addresses - base * 1024 / addresses
        for name, kib in rss.items()
        if name not in (LRU, NOCACHE)
    }
    return {"addresses": addresses, "rss_kib": rss, "copy_bytes_per_address": share}


class _Done(Exception):
    """The parts asked for have run (``--parts`` without ``outage``)."""


def wait_copy_loaded(handle: ServerHandle, timeout_s: float = 120.0) -> float:
    """Wait for ``maplookup_copy_loaded`` on worker 0; returns its snapshot load seconds."""
    end = time.monotonic() + timeout_s
    while True:
        metrics = handle.metrics()
        if metrics.get("maplookup_copy_loaded", 0) >= 1:
            return metrics.get("maplookup_copy_load_seconds", float("nan"))
        if time.monotonic() > end:
            raise BenchError(f"{handle.name}: the complete copy did not load in {timeout_s} s")
        time.sleep(0.2)


class Bench:
    def __init__(self, ns: argparse.Namespace, children: Children, pg: PrivatePostgres) -> None:
        self.ns = ns
        self.children = children
        self.pg = pg
        self.deadline = Deadline(BUDGET_S)
        self.runs: list[dict[str, Any]] = []
        self.postmap: list[dict[str, Any]] = []
        self.visibility: dict[str, list[float]] = {}
        self.notes: list[str] = []

    def load(
        self, handle: ServerHandle, label: str, keys: Path, mix: str, conns: int, phase: str,
        round_: int, check: bool = True,
    ) -> dict[str, Any]:  # fmt: skip
        self.deadline.check(label)
        spec = LoadSpec(
            port=handle.port,
            keys=str(keys),
            connections=conns,
            duration_s=self.ns.seconds,
            warmup_s=1.0,
            check=check,
            label=f"{phase} {label} {mix} c={conns} r{round_}",
        )
        result = asdict(run_load(spec, Monitor(handle, self.pg.postmaster_pid()), self.children))
        mon = result["monitor"]
        ours = mon.get("server_cpu_pct", 0) + mon.get("postgres_cpu_pct", 0)
        ours += result["loader_cpu_s"] / self.ns.seconds * 100
        other = max(0.0, mon.get("machine_cpu_pct", 0) - ours)
        problems = result["mismatches"] + result["errors"] + result["unfinished"]
        if check:
            problems += result["other"]
        log(
            f"{spec.label}: {result['throughput_rps']:,.0f}/s p50 "
            f"{result['latency']['p50_us']:,.0f} µs p99 {result['latency']['p99_us']:,.0f} µs, "
            f"OK/NOTFOUND/other {result['ok']}/{result['notfound']}/{result['other']}, "
            f"server {mon.get('server_cpu_pct', 0):.0f}% other CPU {other:.0f}%"
            + (f" PROBLEMS {problems}: {result['mismatch_samples'][:2]}" if problems else "")
        )
        row = {"phase": phase, "server": label, "mix": mix, "connections": conns,
               "round": round_, "other_cpu_pct": other, "problems": problems,
               "result": result}  # fmt: skip
        self.runs.append(row)
        return row

    def postmap_run(
        self, table: str, label: str, keys: list[str], expected: int, server: ServerHandle | None,
        conf: Path, work: Path, round_: int, processes: int, transport: str,
    ) -> None:  # fmt: skip
        self.deadline.check(label)
        pg_pids = descendants(self.pg.postmaster_pid() or 0)
        server_pids = server.pids() if server else []
        cpu0 = (cpu_seconds(server_pids), cpu_seconds(pg_pids, children_too=True))
        cores0 = core_busy_seconds()
        result = postfix.run_postmap(
            self.children, conf, table, keys, expected, processes, work, label
        )
        cores = [
            (b - a) / result.wall_s * 100 for a, b in zip(cores0, core_busy_seconds(), strict=True)
        ]
        row = result.as_dict()
        row["round"] = round_
        row["processes"] = processes
        row["transport"] = transport
        row["core_busy_pct"] = cores
        row["server_cpu_pct"] = (cpu_seconds(server_pids) - cpu0[0]) / result.wall_s * 100
        pg_now = descendants(self.pg.postmaster_pid() or 0)
        row["postgres_cpu_pct"] = (
            (cpu_seconds(pg_now, children_too=True) - cpu0[1]) / result.wall_s * 100
        )
        self.postmap.append(row)
        flag = "" if result.found == expected else f" FOUND {result.found} != {expected}"
        log(
            f"postmap {label} ({transport}) x{processes} r{round_}: "
            f"{result.keys_per_s:,.0f} keys/s "
            f"({result.wall_s:.1f} s), "
            f"cores {' / '.join(f'{c:.0f}%' for c in cores)}, server "
            f"{row['server_cpu_pct']:.0f}%, PostgreSQL {row['postgres_cpu_pct']:.0f}%{flag}"
        )

    async def visibility_run(
        self, servers: Sequence[tuple[str, ServerHandle]], dsn: str, ds: datasets.Dataset
    ) -> None:
        """One change at a time, servers alternating; ms from UPDATE's return to visible."""
        import asyncpg

        from maplookup.client import Connection
        from maplookup.config import HostPort
        from maplookup.protocol import Reply, socketmap

        conn = await asyncpg.connect(dsn, timeout=10)
        clients = [
            Connection.connect(HostPort(host="127.0.0.1", port=h.port), timeout_s=10)
            for _, h in servers
        ]
        try:
            update = await conn.prepare(
                "UPDATE maplookup.mailboxes SET path = $1 WHERE domain = $2 AND local_part = $3"
            )
            for name, _ in servers:
                self.visibility[name] = []
            for k in range(self.ns.changes):
                for n, ((name, _), client) in enumerate(zip(servers, clients, strict=True)):
                    i = k % ds.domains  # one mailbox per domain: each change its own partition
                    key = ds.mailbox_key(i)
                    request = socketmap.encode_request(b"vmailbox", key.encode())
                    # A path of this server's own: with a shared one, the second server's cache
                    # could already hold the first server's change, and its UPDATE (to the
                    # same value) would be "seen" at once.
                    new = f"{ds.domain(i % ds.domains)}/moved{k}-server{n}/"
                    client.exchange(request)  # cached (lru) before the change
                    await update.fetch(new, ds.domain(i % ds.domains), f"user{i}")
                    t0 = time.perf_counter_ns()
                    want = Reply.ok(new)
                    limit = t0 + int(CHANGE_DEADLINE_S * 1e9)
                    while client.exchange(request) != want:
                        if time.perf_counter_ns() > limit:
                            raise BenchError(f"{name}: change {k} not visible in time")
                    self.visibility[name].append((time.perf_counter_ns() - t0) / 1e6)
                if k % 50 == 0:
                    self.deadline.check("change-to-visible")
        finally:
            for client in clients:
                client.close()
            await conn.close()
        for name, values in self.visibility.items():
            ordered = sorted(values)
            log(
                f"change-to-visible {name}: p50 {_pct(ordered, 50):.2f} ms, "
                f"p99 {_pct(ordered, 99):.2f} ms, max {ordered[-1]:.2f} ms"
            )


def _pct(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of sorted values."""
    rank = max(1, -(-len(ordered) * pct // 100))
    return float(ordered[int(rank) - 1])


def run(ns: argparse.Namespace) -> int:
    started, stamp = utc_stamp()
    pg = PrivatePostgres()
    work = Path(tempfile.mkdtemp(prefix="maplookup-complete-", dir="/tmp"))
    workers = max(2, os.cpu_count() or 2)
    snapshot_s: dict[str, float] = {}
    outage: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    memo: dict[str, Any] = {}
    with Children() as children:
        bench = Bench(ns, children, pg)
        try:
            pg.start()
            ds = datasets.Dataset(ns.mailboxes)
            info = asyncio.run(datasets.load(pg.dsn, ds))
            log(f"dataset {ns.mailboxes:,} mailboxes in {info['insert_s']:.1f} s")
            dsn = dsn_for(pg.dsn, ds.database)
            unix_dsn = dsn_for(pg.pg.dsn, ds.database)  # the same cluster's unix socket
            hot = datasets.hot_set(ds, ns.mailboxes)
            mixes = {mix: datasets.make_mix(ds, mix, hot, LOAD_KEYS) for mix in ("hits", "misses")}
            postmap_mix = datasets.make_mix(ds, "90-10", hot, POSTMAP_KEYS)
            for keys in (*mixes.values(), postmap_mix):
                asyncio.run(datasets.verify_mix(dsn, keys, 500, ds.seed))
            files = {m: datasets.write_mix(work / f"{m}.tsv", k) for m, k in mixes.items()}
            servers: dict[str, ServerHandle] = {}
            servers[COMPLETE] = start_maplookup(
                children, "complete", dsn, settings_env=COMPLETE_ENV
            )
            snapshot_s[COMPLETE] = wait_copy_loaded(servers[COMPLETE])
            servers[NOMEMO] = start_maplookup(children, "nomemo", dsn, settings_env=NOMEMO_ENV)
            snapshot_s[NOMEMO] = wait_copy_loaded(servers[NOMEMO])
            servers[TRIO] = start_responder(children, "trio-bare")
            servers[NOCACHE] = start_maplookup(children, "nocache", dsn, cache=False)
            servers[LRU] = start_maplookup(children, "lru", dsn, settings_env=LRU_ENV)
            all_label = f"maplookup complete, {workers} workers"
            servers[all_label] = start_maplookup(
                children, "complete-all", dsn, workers=workers, settings_env=COMPLETE_ENV,
                unix_socket=work / "complete-all.sock",
            )  # fmt: skip
            snapshot_s[all_label] = wait_copy_loaded(servers[all_label])
            log(f"servers up; snapshot load s: {snapshot_s}")
            memory = server_memory(servers, ds)
            log(f"server memory: {memory}")
            socketmap_servers = (COMPLETE, NOMEMO, TRIO, NOCACHE, LRU)
            # 1. misses and hits, alternating (the LRU server's cache filled by round 0's runs)
            for r in range(ns.rounds if "socketmap" in ns.parts else 0):
                for conns in (1, 64):
                    for mix in ("misses", "hits"):
                        for name in socketmap_servers:
                            bench.load(servers[name], name, files[mix], mix, conns, "socketmap",
                                       r, check=name != TRIO)  # fmt: skip
            memo = {
                name: {k: v for k, v in servers[name].metrics().items() if "copy_" in k
                       and ("answers" in k or "memo" in k)}
                for name in (COMPLETE, NOMEMO)
            }  # fmt: skip
            log(f"copy answers: {memo}")
            # 2. postmap -q -: complete on every core vs pgsql: direct, over TCP and over
            # unix sockets (socketmap:unix: against PostgreSQL's own unix socket)
            conf = postfix.make_config_dir(work)
            plain = [k.key for k in postmap_mix]
            expected = sum(1 for k in postmap_mix if k.expect == "o")
            tables = {
                "inet": (
                    f"socketmap:inet:127.0.0.1:{servers[all_label].port}:vmailbox",
                    f"pgsql:{postfix.write_pgsql_cf(conf, 'pgsql-inet', dsn)}",
                ),
                "unix": (
                    f"socketmap:unix:{work / 'complete-all.sock'}:vmailbox",
                    f"pgsql:{postfix.write_pgsql_cf(conf, 'pgsql-unix', unix_dsn)}",
                ),
            }
            for r in range(ns.rounds if "postmap" in ns.parts else 0):
                for transport, (table, pgsql) in tables.items():
                    for processes in POSTMAP_PROCESSES:
                        bench.postmap_run(table, all_label, plain, expected, servers[all_label],
                                          conf, work, r, processes, transport)  # fmt: skip
                        bench.postmap_run(pgsql, "pgsql: direct", plain, expected, None, conf,
                                          work, r, processes, transport)  # fmt: skip
            # 3. change-to-visible, complete and lru alternating change by change
            if ns.changes and "changes" in ns.parts:
                # Only the two servers compared run: the others would each read the log and
                # apply every change too, on the same 2 cores, at the same moment.
                compared = [(COMPLETE, servers[COMPLETE]), (LRU, servers[LRU])]
                with paused(h for name, h in servers.items() if name not in (COMPLETE, LRU)):
                    asyncio.run(bench.visibility_run(compared, dsn, ds))
            # 4. the database stopped (immediate: no shutdown checkpoint, connections cut)
            if "outage" not in ns.parts:
                raise _Done
            t0 = time.monotonic()
            pg.pg.stop(mode="immediate")
            outage["stopped_s"] = time.monotonic() - t0
            log("PostgreSQL stopped (immediate)")
            time.sleep(1.0)
            for conns in (1, 64):
                for mix in ("misses", "hits"):
                    for name in (COMPLETE, LRU, NOCACHE):
                        bench.load(servers[name], name, files[mix], mix, conns, "outage", 0,
                                   check=name == COMPLETE)  # fmt: skip
            outage["copy_metrics"] = {
                k: v
                for k, v in servers[COMPLETE].metrics().items()
                if k.startswith("maplookup_copy")
            }
        except _Done:
            pass
        finally:
            children.stop_all()
            pg.stop()
            shutil.rmtree(work, ignore_errors=True)
    text = report(bench, all_label, snapshot_s, memory)
    payload = {
        "benchmark": "complete",
        "started_utc": started.isoformat(),
        "command": " ".join([".venv/bin/python -m bench.complete", *sys.argv[1:]]),
        "machine": machine_info({"loadavg_end": os.getloadavg()}),
        "mailboxes": ns.mailboxes,
        "seconds": ns.seconds,
        "rounds": ns.rounds,
        "snapshot_load_s": snapshot_s,
        "memory": memory,
        "copy_answers": memo,
        "runs": bench.runs,
        "postmap": bench.postmap,
        "change_to_visible_ms": bench.visibility,
        "outage": outage,
        "tables_markdown": text,
    }
    path = write_json("complete", stamp, payload)
    print(text)
    log(f"wrote {path}")
    return 0


def _median(rows: Sequence[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r["result"][key]) for r in rows) if rows else float("nan")


def report(
    bench: Bench, all_label: str, snapshot_s: dict[str, float], memory: dict[str, Any]
) -> str:
    runs = [r for r in bench.runs if r["phase"] == "socketmap"]
    out = [
        f"Socketmap, closed loop (median of rounds; ratio = median of per-round ratios to {TRIO}):",
        "",
        "| mix | conns | server | replies/s | vs trio-bare | each round | p50 µs | p99 µs "
        "| server CPU | other CPU | problems |",
        "|---|--:|---|--:|--:|---|--:|--:|--:|--:|--:|",
    ]
    for mix in ("misses", "hits"):
        for conns in (1, 64):
            at = [r for r in runs if r["mix"] == mix and r["connections"] == conns]
            ref = {r["round"]: r["result"]["throughput_rps"] for r in at if r["server"] == TRIO}
            for name in dict.fromkeys(r["server"] for r in at):
                mine = [r for r in at if r["server"] == name]
                ratios = [r["result"]["throughput_rps"] / ref[r["round"]] for r in mine]
                lat = [r["result"]["latency"] for r in mine]
                out.append(
                    f"| {mix} | {conns} | {name} | {_median(mine, 'throughput_rps'):,.0f} "
                    f"| {statistics.median(ratios):.2f}x "
                    f"| {', '.join(f'{x:.2f}' for x in ratios)} "
                    f"| {statistics.median(x['p50_us'] for x in lat):,.0f} "
                    f"| {statistics.median(x['p99_us'] for x in lat):,.0f} "
                    f"| {statistics.median(r['result']['monitor'].get('server_cpu_pct', 0) for r in mine):.0f}% "  # noqa: E501
                    f"| {statistics.median(r['other_cpu_pct'] for r in mine):.0f}% "
                    f"| {sum(r['problems'] for r in mine)} |"
                )
    out += [
        "",
        f"`postmap -q -` ({POSTMAP_KEYS:,} keys, 90 % existing):",
        "",
        "| table | transport | postmap processes | round | keys/s | vs pgsql: | wall s "
        "| core busy (each) | server CPU | PostgreSQL CPU | CPU µs/key (server or PostgreSQL) "
        "| found / expected |",
        "|---|---|--:|--:|--:|--:|--:|---|--:|--:|--:|---|",
    ]
    pgsql = {
        (r["transport"], r["processes"], r["round"]): r["keys_per_s"]
        for r in bench.postmap
        if r["label"] == "pgsql: direct"
    }
    for r in bench.postmap:
        ref = pgsql[(r["transport"], r["processes"], r["round"])]
        busy = r["server_cpu_pct"] if r["server_cpu_pct"] else r["postgres_cpu_pct"]
        out.append(
            f"| {r['label']} | {r['transport']} | {r['processes']} | {r['round']} "
            f"| {r['keys_per_s']:,.0f} | {r['keys_per_s'] / ref:.2f}x | {r['wall_s']:.1f} "
            f"| {' / '.join(f'{c:.0f}%' for c in r['core_busy_pct'])} "
            f"| {r['server_cpu_pct']:.0f}% | {r['postgres_cpu_pct']:.0f}% "
            f"| {busy / 100 / r['keys_per_s'] * 1e6:.0f} "
            f"| {r['found']:,} / {r['expected_found']:,} |"
        )
    if bench.visibility:
        out += [
            "",
            "Change-to-visible (ms from the UPDATE's return to the first new answer):",
            "",
            "| server | changes | p50 ms | p90 ms | p99 ms | max ms |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for name, values in bench.visibility.items():
            o = sorted(values)
            out.append(
                f"| {name} | {len(o)} | {_pct(o, 50):.2f} | {_pct(o, 90):.2f} "
                f"| {_pct(o, 99):.2f} | {o[-1]:.2f} |"
            )
    outage = [r for r in bench.runs if r["phase"] == "outage"]
    if outage:
        before = {
            (r["server"], r["mix"], r["connections"]): r["result"]["throughput_rps"]
            for r in runs
            if r["round"] == 0
        }
        out += [
            "",
            "PostgreSQL stopped (`pg_ctl stop -m immediate`):",
            "",
            "| server | mix | conns | replies/s | vs database up (round 0) | OK / NOTFOUND / TEMP "
            "| wrong or failed |",
            "|---|---|--:|--:|--:|---|--:|",
        ]
        for r in outage:
            res = r["result"]
            up = before.get((r["server"], r["mix"], r["connections"]))
            out.append(
                f"| {r['server']} | {r['mix']} | {r['connections']} "
                f"| {res['throughput_rps']:,.0f} "
                f"| {res['throughput_rps'] / up if up else float('nan'):.2f}x "
                f"| {res['ok']:,} / {res['notfound']:,} / {res['other']:,} "
                f"| {res['mismatches'] + res['errors'] + res['unfinished']} |"
            )
    out += ["", "Snapshot load (maplookup_copy_load_seconds): "
            + ", ".join(f"{k} {v:.2f} s" for k, v in snapshot_s.items())]  # fmt: skip
    if memory:
        out += [
            "",
            f"Server memory, VmRSS after start-up ({memory['addresses']:,} addresses; the "
            f"copy's share = complete minus lru, per address):",
            "",
            "| server | RSS MiB (each process) | copy bytes/address |",
            "|---|---|--:|",
        ]
        for name, kib in memory["rss_kib"].items():
            share = memory["copy_bytes_per_address"].get(name)
            out.append(
                f"| {name} | {' / '.join(f'{k / 1024:,.0f}' for k in kib)} "
                f"| {'' if share is None else f'{share:,.0f}'} |"
            )
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.complete",
        description="cache.mode = complete against trio-bare, --no-cache, lru and pgsql:, "
        "alternating, with a database outage (see bench/README.md, 'Complete mode').",
    )
    parser.add_argument("--mailboxes", type=bounded_int(1000, 2_000_000), default=100_000,
                        help="dataset size (default 100,000)")  # fmt: skip
    parser.add_argument("--rounds", type=bounded_int(1, 20), default=2,
                        help="alternating repetitions (default 2)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="measured seconds per closed-loop run (default 3)")  # fmt: skip
    parser.add_argument("--changes", type=bounded_int(0, 10_000), default=300,
                        help="changes per server, change-to-visible (default 300)")  # fmt: skip
    parser.add_argument("--parts", type=_parts, default=PARTS,
                        help="comma-separated parts to run, of " + ",".join(PARTS)
                        + " (default all)")  # fmt: skip
    return parser.parse_args(argv)


def _parts(text: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [part for part in chosen if part not in PARTS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown part {', '.join(unknown) or '(none)'}: choose among {','.join(PARTS)}"
        )
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    return run_guarded(log, lambda: run(ns))


if __name__ == "__main__":
    sys.exit(main())
