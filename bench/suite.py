"""The benchmark suite: maplookup against its baselines, in one run, on one machine.

What runs (bench/README.md, "Suite", has the details and the reasons):

1. datasets of 1k, 100k (and, without ``--quick``, 1M) mailboxes in a private PostgreSQL, and
   their key mixes (``bench/lib/datasets.py``);
2. closed-loop load (``bench/lib/load.py``) against the bare responders (trio, asyncio+uvloop),
   maplookup with one worker and with one worker per core, at 1, 8, 64 and 512 connections,
   on cached hits of the 100k dataset; the other key mixes, tcp_table, and open-loop load at
   fixed fractions of maplookup's capacity;
3. the miss path: ``maplookup serve --no-cache`` (as shipped, batching concurrent misses, and
   with one statement per key) against a small asyncio+uvloop+asyncpg responder running the
   same SQL one request at a time, with and without asyncpg's reset query
   (``bench/lib/responders.py``);
4. Postfix's own client: 4 parallel ``postmap -q -`` over the same keys through maplookup
   (socketmap), the bare responders, Postfix's ``pgsql:`` querying PostgreSQL itself, and an
   ``lmdb:`` file; then again with 0.5 ms added to every database round trip by a delaying
   proxy (``bench/lib/delayproxy.py``);
5. hit latency against data size (1k to 1M), and the server's RSS against cached entries;
6. the targets, each as a ratio measured in this run.

    .venv/bin/python -m bench.suite --quick     # a few minutes: 1k/100k, short runs
    .venv/bin/python -m bench.suite             # about 15 minutes on 2 cores
    .venv/bin/python -m bench.suite --profile   # also py-spy flame graphs of the server

Markdown tables go to stdout, progress to stderr, the figures to
``bench/results/suite-<UTC>.json`` and the plots to ``bench/results/suite-<UTC>-*.png``.
Every process and the PostgreSQL cluster it starts are stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.lib import datasets, postfix
from bench.lib.common import (
    PROJECT_ROOT,
    RESULTS_DIR,
    BenchError,
    Children,
    Deadline,
    Logger,
    PrivatePostgres,
    core_busy_seconds,
    cpu_seconds,
    descendants,
    dsn_for,
    free_port,
    machine_info,
    rss_kib,
    run_guarded,
    utc_stamp,
    write_json,
)
from bench.lib.load import LoadResult, LoadSpec, run_load
from bench.lib.servers import (
    Monitor,
    ServerHandle,
    maplookup_supports_workers,
    start_maplookup,
    start_responder,
    warm,
)

log = Logger("suite")

MAIN_SIZE = 100_000  # the dataset of the scaling, baseline and postmap runs
DELAY_US = 500
POSTMAP_PROCESSES = 4
TARGET_CONNECTIONS = 64
NOCACHE = "maplookup --no-cache"
NOCACHE_ONE_KEY = "maplookup --no-cache, one key per statement"
ASYNCPG_NO_RESET = "asyncpg, no pool reset"
# cache.max_entries of the caching servers: more than the hot set and all the mixes together.
CACHE_ENTRIES = 1_000_000
# ... and their TTLs (10 min and 60 s by default), longer than the whole run.
CACHE_TTL_S = 7200.0


@dataclass(frozen=True)
class Plan:
    quick: bool
    sizes: tuple[int, ...]
    hot: int  # hot mailboxes: the "hits" mix and the postmap key list
    mix_size: int  # keys in the other mixes
    duration_s: float
    warmup_s: float
    connections: tuple[int, ...] = (1, 8, 64, 512)
    open_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)
    memory_steps: tuple[int, ...] = ()
    workers: int = 2
    rounds: int = 3  # alternating repetitions of each target's pair
    timeout_s: float = 1800.0
    profile: bool = False

    @classmethod
    def make(cls, quick: bool, profile: bool) -> Plan:
        workers = max(2, os.cpu_count() or 2)
        if quick:
            return cls(
                quick=True,
                sizes=(1_000, MAIN_SIZE),
                hot=20_000,
                mix_size=5_000,
                duration_s=3.0,
                warmup_s=1.0,
                open_fractions=(0.5, 0.9),
                memory_steps=(0, 5_000, 10_000, 20_000),
                workers=workers,
                rounds=2,
                timeout_s=900.0,
                profile=profile,
            )
        return cls(
            quick=False,
            sizes=(1_000, MAIN_SIZE, 1_000_000),
            hot=100_000,
            mix_size=20_000,
            duration_s=8.0,
            warmup_s=2.0,
            memory_steps=(0, 10_000, 25_000, 50_000, 100_000),
            workers=workers,
            timeout_s=2400.0,
            profile=profile,
        )


@dataclass
class Suite:
    plan: Plan
    children: Children
    pg: PrivatePostgres
    work: Path
    stamp: str
    deadline: Deadline
    runs: list[dict[str, Any]] = field(default_factory=list)
    postmap: list[dict[str, Any]] = field(default_factory=list)
    datasets: dict[int, dict[str, Any]] = field(default_factory=dict)
    keyfiles: dict[tuple[int, str], Path] = field(default_factory=dict)
    warmups: list[dict[str, Any]] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    proxy: dict[str, Any] = field(default_factory=dict)
    profiles: list[str] = field(default_factory=list)
    servers: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    proxy_port: int = 0
    proxy_proc: Any = None
    asyncio_bare: Any = None
    trio_bare: Any = None
    one: Any = None
    all: Any = None
    all_label: str = "maplookup (all workers)"
    nocache: Any = None
    nocache_one_key: Any = None
    asyncpg: Any = None
    asyncpg_no_reset: Any = None

    # -- helpers ---------------------------------------------------------------------------

    def dsn(self, size: int, port: int | None = None) -> str:
        return dsn_for(self.pg.dsn, datasets.Dataset(size).database, port)

    def keys(self, size: int, mix: str) -> Path:
        return self.keyfiles[(size, mix)]

    def load(
        self,
        handle: ServerHandle,
        label: str,
        group: str,
        mix: str,
        connections: int,
        *,
        size: int = MAIN_SIZE,
        rate: float | None = None,
        protocol: str = "socketmap",
        processes: int = 1,
        check: bool = True,
        duration_s: float | None = None,
        round_: int = 0,
    ) -> LoadResult:
        self.deadline.check(f"{group} {label}")
        port = handle.tcp_port if protocol == "tcptable" else handle.port
        assert port is not None
        spec = LoadSpec(
            port=port,
            keys=str(self.keys(size, mix)),
            connections=connections,
            processes=processes,
            duration_s=duration_s or self.plan.duration_s,
            warmup_s=self.plan.warmup_s,
            rate=rate,
            protocol=protocol,
            check=check,
            label=f"{label} {mix} c={connections}" + (f" rate={rate:,.0f}" if rate else ""),
        )
        monitor = Monitor(handle, self.pg.postmaster_pid())
        result = run_load(spec, monitor, self.children)
        lat = result.latency
        problems = result.mismatches + result.errors + result.unfinished + result.other
        log(
            f"{spec.label}: {result.throughput_rps:,.0f}/s p50 {lat['p50_us']:,.0f} µs "
            f"p99 {lat['p99_us']:,.0f} µs p99.9 {lat['p99_9_us']:,.0f} µs "
            f"server CPU {result.monitor.get('server_cpu_pct', 0):.0f}% "
            f"loader CPU {result.loader_cpu_s / spec.duration_s * 100:.0f}% "
            f"other CPU {_other_cpu(asdict(result)):.0f}%"
            + (f" PROBLEMS {problems}: {result.mismatch_samples}" if problems else "")
        )
        misses = result.monitor.get("worker0_cache_misses")
        if handle.cache and misses:
            self.notes.append(f"{spec.label}: {misses} cache misses on worker 0 during the run")
        self.runs.append(
            {
                "group": group,
                "server": handle.name,
                "server_label": label,
                "mix": mix,
                "dataset": size,
                "protocol": protocol,
                "round": round_,
                "result": asdict(result),
            }
        )
        return result

    def warm(self, handle: ServerHandle, size: int, mixes: Sequence[str]) -> None:
        for mix in mixes:
            self.deadline.check(f"warming {handle.name}")
            out = warm(handle, str(self.keys(size, mix)))
            out.update(server=handle.name, mix=mix, dataset=size)
            self.warmups.append(out)
            log(
                f"warmed {handle.name} with {out['keys']:,} {mix} keys on {out['workers']} "
                f"worker(s) in {out['seconds']:.1f} s "
                f"(worker 0 holds {out['cache_entries_worker0']:,.0f} entries)"
            )

    def stop(self, handle: ServerHandle) -> None:
        info = handle.describe()
        info["exit_code"] = self.children.stop(handle.proc, timeout_s=15)
        self.servers.append(info)

    def run_postmap(
        self,
        table: str,
        label: str,
        keys: list[str],
        expected: int,
        server: ServerHandle | None,
        round_: int = 0,
    ) -> dict[str, Any]:
        self.deadline.check(f"postmap {label}")
        pg_pids = descendants(self.pg.postmaster_pid() or 0) if self.pg.postmaster_pid() else []
        server_pids = server.pids() if server else []
        cpu0 = (cpu_seconds(server_pids), cpu_seconds(pg_pids, children_too=True))
        misses0 = server.metrics().get("maplookup_cache_misses_total") if server else None
        cores0 = core_busy_seconds()
        result = postfix.run_postmap(
            self.children,
            self.postfix_conf,
            table,
            keys,
            expected,
            POSTMAP_PROCESSES,
            self.work,
            label,
        )
        row = result.as_dict()
        row["round"] = round_
        # The machine's headroom: how busy each core was (the postmap clients included).
        row["core_busy_pct"] = [
            (b - a) / result.wall_s * 100 for a, b in zip(cores0, core_busy_seconds(), strict=True)
        ]
        if server and misses0 is not None:
            misses = server.metrics().get("maplookup_cache_misses_total", 0) - misses0
            row["worker0_cache_misses"] = int(misses)
            if misses:
                self.notes.append(f"postmap {label}: {int(misses)} cache misses on worker 0")
        if server:
            row["server_cpu_pct"] = (cpu_seconds(server_pids) - cpu0[0]) / result.wall_s * 100
        pg_now = descendants(self.pg.postmaster_pid() or 0) if self.pg.postmaster_pid() else []
        row["postgres_cpu_pct"] = (
            (cpu_seconds(pg_now, children_too=True) - cpu0[1]) / result.wall_s * 100
        )
        self.postmap.append(row)
        flag = "" if result.found == expected else f" FOUND {result.found} != {expected}"
        log(f"postmap {label}: {result.keys_per_s:,.0f} keys/s ({result.wall_s:.1f} s){flag}")
        return row

    @property
    def postfix_conf(self) -> Path:
        return self.work / "postfix-conf"

    # -- phases ----------------------------------------------------------------------------

    def prepare_data(self) -> None:
        postfix.make_config_dir(self.work)
        for size in self.plan.sizes:
            ds = datasets.Dataset(size)
            info = asyncio.run(datasets.load(self.pg.dsn, ds))
            hot = datasets.hot_set(ds, self.plan.hot)
            info["hot"] = len(hot)
            info["verified"] = {}
            for mix in datasets.MIXES:
                size_of_mix = len(hot) if mix == "hits" else min(self.plan.mix_size, len(hot))
                keys = datasets.make_mix(ds, mix, hot, size_of_mix)
                path = datasets.write_mix(self.work / f"keys-{size}-{mix}.tsv", keys)
                self.keyfiles[(size, mix)] = path
                info["verified"][mix] = asyncio.run(
                    datasets.verify_mix(self.dsn(size), keys, 2000, ds.seed)
                )
            self.datasets[size] = info
            log(
                f"dataset {size:,}: {info['rows']} in {info['insert_s']:.1f} s "
                f"({info['database_bytes'] / 2**20:.0f} MiB); mixes verified against SQL"
            )

    # The servers of phases 2-6 stay up together, so that the runs compared with each other
    # can alternate (A, B, A, B ...): on a shared machine the background load drifts, and
    # alternating spreads that drift over both sides instead of charging it to one.

    def start_servers(self) -> None:
        kids = self.children
        self.asyncio_bare = start_responder(kids, "asyncio-bare")
        self.trio_bare = start_responder(kids, "trio-bare", tcp_table=True)
        # Room for the hot set and every mix (the default bound, 100,000, would evict).
        entries = CACHE_ENTRIES
        self.one = start_maplookup(
            kids,
            "maplookup",
            self.dsn(MAIN_SIZE),
            tcp_table=True,
            max_entries=entries,
            ttl_s=CACHE_TTL_S,
        )
        self.start_proxy()
        workers = self.plan.workers if maplookup_supports_workers() else 1
        if workers == 1:
            self.notes.append("maplookup serve has no --workers: 'all workers' ran with one")
        self.all = start_maplookup(
            kids,
            f"maplookup-{workers}w",
            self.dsn(MAIN_SIZE, self.proxy_port),
            workers=workers,
            max_entries=entries,
            ttl_s=CACHE_TTL_S,
        )
        self.all_label = f"maplookup ({workers} workers)"
        self.nocache = start_maplookup(kids, "maplookup-nocache", self.dsn(MAIN_SIZE), cache=False)
        self.nocache_one_key = start_maplookup(
            kids, "maplookup-nocache-one-key", self.dsn(MAIN_SIZE), cache=False,
            settings_env={"MAPLOOKUP_DATABASE__MAX_KEYS_PER_QUERY": "1"},
        )  # fmt: skip
        self.asyncpg = start_responder(kids, "asyncpg", dsn=self.dsn(MAIN_SIZE))
        self.asyncpg_no_reset = start_responder(
            kids, "asyncpg", dsn=self.dsn(MAIN_SIZE), extra_args=["--no-pool-reset"]
        )
        self.warm(self.one, MAIN_SIZE, ["hits"])
        self.warm(self.all, MAIN_SIZE, ["hits"])

    def start_proxy(self) -> None:
        self.proxy_port = free_port()
        proxy = self.children.start(
            [sys.executable, "-m", "bench.lib.delayproxy", "--port", str(self.proxy_port),
             "--upstream-port", str(self.pg.port), "--delay-us", "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        assert proxy.stdout is not None
        if not proxy.stdout.readline().startswith(b"ready"):
            raise BenchError("the delay proxy did not start")
        self.proxy_proc = proxy

    def set_delay(self, us: int) -> None:
        proxy = self.proxy_proc
        assert proxy.stdin is not None
        assert proxy.stdout is not None
        proxy.stdin.write(f"delay {us}\n".encode())
        proxy.stdin.flush()
        proxy.stdout.readline()

    def stop_servers(self) -> None:
        for handle in (
            self.asyncio_bare, self.trio_bare, self.one, self.all, self.nocache,
            self.nocache_one_key, self.asyncpg, self.asyncpg_no_reset,
        ):  # fmt: skip
            self.stop(handle)
        self.children.stop(self.proxy_proc, timeout_s=5)

    def phase_scaling(self) -> None:
        """Every server at every connection count, the servers in turn for each count."""
        servers = [
            (self.asyncio_bare, "asyncio-bare", False),
            (self.trio_bare, "trio-bare", False),
            (self.one, "maplookup", True),
            (self.all, self.all_label, True),
        ]
        for c in self.plan.connections:
            for handle, label, check in servers:
                self.load(handle, label, "scaling", "hits", c, check=check)
        # The load generator's own capacity: the fastest server, with two loader processes.
        self.load(self.asyncio_bare, "asyncio-bare", "loader", "hits", 64, processes=2,
                  check=False)  # fmt: skip
        # More rounds of the first target's pair (round 0 was the scaling run).
        for n in range(1, self.plan.rounds):
            self.load(self.one, "maplookup", "scaling", "hits", TARGET_CONNECTIONS, round_=n)
            self.load(self.trio_bare, "trio-bare", "scaling", "hits", TARGET_CONNECTIONS,
                      check=False, round_=n)  # fmt: skip
        if self.plan.profile:
            self.profile(self.one, "hits")

    def phase_mixes(self) -> None:
        self.warm(self.one, MAIN_SIZE, ["misses", "90-10", "virtual-90-10"])
        for mix in ("misses", "90-10", "virtual-90-10"):
            self.load(self.one, "maplookup", "baseline", mix, TARGET_CONNECTIONS)
        self.load(self.one, "maplookup", "tcp_table", "hits", TARGET_CONNECTIONS,
                  protocol="tcptable")  # fmt: skip
        self.load(self.trio_bare, "trio-bare", "tcp_table", "hits", TARGET_CONNECTIONS,
                  protocol="tcptable", check=False)  # fmt: skip

    def phase_open_loop(self) -> None:
        capacity = statistics.median(
            run["result"]["throughput_rps"]
            for run in self.runs
            if run["group"] == "scaling"
            and run["server_label"] == "maplookup"
            and run["result"]["spec"]["connections"] == TARGET_CONNECTIONS
        )
        for fraction in self.plan.open_fractions:
            rate = round(capacity * fraction, -2)
            self.load(self.one, "maplookup", "open-loop", "hits", TARGET_CONNECTIONS, rate=rate)
            self.load(self.trio_bare, "trio-bare", "open-loop", "hits", TARGET_CONNECTIONS,
                      rate=rate, check=False)  # fmt: skip

    def phase_miss_path(self) -> None:
        # The target's pair, alternating: maplookup as shipped (concurrent misses share a
        # statement) against the faster of the two asyncpg responders (no reset query), and
        # maplookup sending one statement per key, for what batching is worth.
        for n in range(self.plan.rounds):
            self.load(self.nocache, NOCACHE, "miss-path", "90-10", TARGET_CONNECTIONS,
                      round_=n)  # fmt: skip
            self.load(self.asyncpg_no_reset, ASYNCPG_NO_RESET, "miss-path", "90-10",
                      TARGET_CONNECTIONS, round_=n)  # fmt: skip
            self.load(self.nocache_one_key, NOCACHE_ONE_KEY, "miss-path", "90-10",
                      TARGET_CONNECTIONS, round_=n)  # fmt: skip
        self.load(self.asyncpg, "asyncpg", "miss-path", "90-10", TARGET_CONNECTIONS)
        for handle, label in (
            (self.nocache, NOCACHE),
            (self.asyncpg_no_reset, ASYNCPG_NO_RESET),
            (self.nocache_one_key, NOCACHE_ONE_KEY),
            (self.asyncpg, "asyncpg"),
        ):
            self.load(handle, label, "miss-path", "90-10", 1)  # fmt: skip
        if self.plan.profile:
            self.profile(self.nocache, "90-10")

    def postmap_socketmap(self, handle: ServerHandle, label: str, round_: int = 0) -> None:
        keys = self.postmap_keys()
        self.run_postmap(
            f"socketmap:inet:127.0.0.1:{handle.port}:vmailbox",
            label,
            keys,
            len(keys),
            handle,
            round_,
        )

    def postmap_keys(self) -> list[str]:
        path = self.keys(MAIN_SIZE, "hits")
        return [line.split("\t")[2] for line in path.read_text().splitlines() if line]

    def phase_postmap(self) -> None:
        """Through Postfix's client: socketmap, pgsql: (direct, via the proxy, delayed), lmdb:."""
        keys = self.postmap_keys()
        direct_cf = postfix.write_pgsql_cf(self.postfix_conf, "pgsql-direct", self.dsn(MAIN_SIZE))
        proxied_cf = postfix.write_pgsql_cf(
            self.postfix_conf, "pgsql-proxied", self.dsn(MAIN_SIZE, self.proxy_port)
        )
        self.postmap_socketmap(self.asyncio_bare, "asyncio-bare")
        self.postmap_socketmap(self.trio_bare, "trio-bare")
        self.postmap_socketmap(self.one, "maplookup (1 worker)")
        for n in range(self.plan.rounds):
            self.postmap_socketmap(self.all, self.all_label, n)
            self.run_postmap(f"pgsql:{direct_cf}", "pgsql: direct", keys, len(keys), None, n)
        self.run_postmap(f"pgsql:{proxied_cf}", "pgsql: via proxy, +0 µs", keys, len(keys), None)
        self.proxy = asyncio.run(
            calibrate_proxy(self.dsn(MAIN_SIZE), self.dsn(MAIN_SIZE, self.proxy_port),
                            self.set_delay)
        )  # fmt: skip
        delay_us = self.proxy["setting_us"]
        log(
            f"delay proxy set to {delay_us} µs: SELECT 1 p50 "
            + ", ".join(f"{k} {v['p50_us']:.0f} µs" for k, v in self.proxy["paths"].items())
        )
        self.set_delay(delay_us)
        try:
            for n in range(self.plan.rounds):
                self.postmap_socketmap(self.all, f"{self.all_label}, database +{DELAY_US} µs", n)
                self.run_postmap(
                    f"pgsql:{proxied_cf}",
                    f"pgsql: database +{DELAY_US} µs",
                    keys,
                    len(keys),
                    None,
                    n,
                )
        finally:
            self.set_delay(0)
        ds = datasets.Dataset(MAIN_SIZE)
        pairs = [(k, ds.mailbox_path(int(k.split("@")[0][4:]))) for k in keys]
        table, build_s = postfix.build_lmdb(self.postfix_conf, "vmailbox", pairs)
        self.notes.append(f"lmdb: table of {len(pairs):,} keys built in {build_s:.1f} s")
        self.run_postmap(table, "lmdb: (in-process)", keys, len(keys), None)

    def phase_data_size(self) -> None:
        """Hit latency by data size, the servers in turn each round; memory as a cache fills.

        One server per dataset, all with their hot set cached: the 100k one is the 1-worker
        server of the other phases, the others are started here.  The largest dataset's server
        fills its cache in steps, and its RSS is read after each step.
        """
        small = min(self.plan.sizes)
        large = max(self.plan.sizes)
        servers: dict[int, ServerHandle] = {MAIN_SIZE: self.one}
        started = []
        try:
            if small != MAIN_SIZE:
                servers[small] = start_maplookup(
                    self.children,
                    f"maplookup-{small}",
                    self.dsn(small),
                    max_entries=CACHE_ENTRIES,
                    ttl_s=CACHE_TTL_S,
                )
                started.append(servers[small])
                self.warm(servers[small], small, ["hits"])
            memory_size = large
            big = start_maplookup(
                self.children, f"maplookup-{memory_size}-memory", self.dsn(memory_size),
                max_entries=max(self.plan.memory_steps) * 2, ttl_s=CACHE_TTL_S,
            )  # fmt: skip
            started.append(big)
            self.memory = self.fill_measuring_memory(big, memory_size)
            if large != MAIN_SIZE:
                servers[large] = big
            for n in range(self.plan.rounds):
                for size, handle in sorted(servers.items()):
                    self.load(handle, "maplookup", "data-size", "hits", 1, size=size, round_=n)
            for size, handle in sorted(servers.items()):
                self.load(handle, "maplookup", "data-size", "hits", TARGET_CONNECTIONS, size=size)
        finally:
            for handle in started:
                self.stop(handle)

    def fill_measuring_memory(self, handle: ServerHandle, size: int) -> dict[str, Any]:
        """Fill the cache in steps from the hits mix, reading VmRSS after each step."""
        lines = self.keys(size, "hits").read_text().splitlines()
        steps = []
        done = 0
        for target in self.plan.memory_steps:
            target = min(target, len(lines))
            if target > done:
                chunk = self.work / f"memory-{size}-{target}.tsv"
                chunk.write_text("\n".join(lines[done:target]) + "\n")
                warm(handle, str(chunk))
                done = target
            time.sleep(0.2)
            entries = handle.metrics().get("maplookup_cache_entries", 0)
            steps.append({"entries": int(entries), "rss_kib": rss_kib(handle.proc.pid)})
            mib = steps[-1]["rss_kib"] / 1024
            log(f"memory: {int(entries):,} cached entries, RSS {mib:.1f} MiB")
        if done < len(lines):  # the rest of the hot set, for the hit latency runs
            rest = self.work / f"memory-{size}-rest.tsv"
            rest.write_text("\n".join(lines[done:]) + "\n")
            warm(handle, str(rest))
        return {"dataset": f"{size:,} mailboxes", "steps": steps}

    def profile(self, handle: ServerHandle, mix: str) -> None:
        """py-spy flame graph of the server under the 64-connection closed loop."""
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(py_spy).exists():
            self.notes.append("py-spy not installed: no profile")
            return
        svg = RESULTS_DIR / f"suite-{self.stamp}-profile-{handle.name}-{mix}.svg"
        seconds = int(self.plan.duration_s + self.plan.warmup_s)
        spy = self.children.start(
            [py_spy, "record", "--pid", str(handle.worker_pids()[0]), "--duration",
             str(seconds), "--rate", "250", "--nonblocking", "-o", str(svg)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.load(handle, handle.name, "profiled", mix, TARGET_CONNECTIONS, check=False)
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.children.stop(spy)
        if svg.exists():
            self.profiles.append(str(svg.relative_to(PROJECT_ROOT)))
            log(f"profile: {svg.relative_to(PROJECT_ROOT)}")


async def calibrate_proxy(direct: str, proxied: str, set_delay: Any) -> dict[str, Any]:
    """Sequential ``SELECT 1``: directly, through the proxy at 0 µs and at DELAY_US."""
    import asyncpg

    from bench.lib.hist import Histogram

    async def measure(dsn: str) -> dict[str, float]:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            for _ in range(50):
                await conn.fetchval("SELECT 1")
            hist = Histogram()
            for _ in range(500):
                t0 = time.perf_counter_ns()
                await conn.fetchval("SELECT 1")
                hist.record(time.perf_counter_ns() - t0)
            return hist.summary_us()
        finally:
            await conn.close()

    paths = {"direct": await measure(direct), "proxy, delay 0 µs": await measure(proxied)}
    # Adjust the setting until the p50 round trip is DELAY_US above the direct one.
    setting = DELAY_US
    try:
        for _ in range(3):
            set_delay(setting)
            got = await measure(proxied)
            added = got["p50_us"] - paths["direct"]["p50_us"]
            paths[f"proxy, delay {setting} µs"] = got
            if abs(added - DELAY_US) <= 0.05 * DELAY_US:
                break
            setting = max(0, round(setting + DELAY_US - added))
    finally:
        set_delay(0)
    return {"setting_us": setting, "paths": paths}


# --------------------------------------------------------------------------
# reporting


def _find(runs: list[dict[str, Any]], **want: Any) -> dict[str, Any] | None:
    found = _find_all(runs, **want)
    return found[0] if found else None


def _find_all(runs: list[dict[str, Any]], **want: Any) -> list[dict[str, Any]]:
    out = []
    for run in runs:
        spec = run["result"]["spec"]
        have = {**run, **{k: spec.get(k) for k in ("connections", "rate", "processes")}}
        if all(have.get(key) == value for key, value in want.items()):
            out.append(run)
    return out


def _paired(
    a: list[dict[str, Any]], b: list[dict[str, Any]], value: Any
) -> tuple[float | None, list[float], float | None, float | None]:
    """Median over rounds of value(a_i) / value(b_i), the ratios, and both medians."""
    b_by_round = {x.get("round", 0): x for x in b}
    ratios = [
        value(x) / value(b_by_round[x.get("round", 0)])
        for x in a
        if x.get("round", 0) in b_by_round and value(b_by_round[x.get("round", 0)])
    ]
    med_a = statistics.median(value(x) for x in a) if a else None
    med_b = statistics.median(value(x) for x in b) if b else None
    return (statistics.median(ratios) if ratios else None), ratios, med_a, med_b


def _rps(run: dict[str, Any]) -> float:
    return float(run["result"]["throughput_rps"])


def _lat(run: dict[str, Any], key: str) -> float:
    return float(run["result"]["latency"][key])


def _fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def targets(
    runs: list[dict[str, Any]], postmap: list[dict[str, Any]], plan: Plan, workers_label: str
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(
        name: str,
        pair: tuple[float | None, list[float], float | None, float | None],
        unit: str,
        goal: str,
        met: Any,
    ) -> None:
        ratio, ratios, a, b = pair
        verdict = None if ratio is None else met(ratio)
        out.append(
            {
                "target": name,
                "measured": "n/a" if a is None else f"{a:,.0f}{unit}",
                "reference": "n/a" if b is None else f"{b:,.0f}{unit}",
                "ratio": ratio,
                "rounds": ratios,
                "goal": goal,
                "met": None if verdict is None else bool(verdict),
            }
        )

    c = TARGET_CONNECTIONS
    add(
        f"cached hits, 1 worker, {c} connections vs bare trio responder",
        _paired(
            _find_all(runs, group="scaling", server_label="maplookup", connections=c),
            _find_all(runs, group="scaling", server_label="trio-bare", connections=c),
            _rps,
        ),
        "/s",
        ">= 0.80x",
        lambda r: r >= 0.8,
    )

    def rows(label: str) -> list[dict[str, Any]]:
        return [{"round": r.get("round", 0), "row": r} for r in postmap if r["label"] == label]

    def keys_per_s(x: dict[str, Any]) -> float:
        return float(x["row"]["keys_per_s"])

    add(
        f"cached hits, all workers, {POSTMAP_PROCESSES}x postmap -q - vs pgsql: direct",
        _paired(rows(workers_label), rows("pgsql: direct"), keys_per_s),
        " keys/s",
        ">= 1x",
        lambda r: r >= 1.0,
    )
    add(
        f"same, database +{DELAY_US / 1000:g} ms per round trip",
        _paired(
            rows(f"{workers_label}, database +{DELAY_US} µs"),
            rows(f"pgsql: database +{DELAY_US} µs"),
            keys_per_s,
        ),
        " keys/s",
        ">= 5x",
        lambda r: r >= 5.0,
    )
    nocache = _find_all(runs, group="miss-path", server_label=NOCACHE, connections=c)
    reference = _find_all(runs, group="miss-path", server_label=ASYNCPG_NO_RESET, connections=c)
    add(
        f"misses (--no-cache), {c} connections vs asyncio+uvloop+asyncpg (no reset query)",
        _paired(nocache, reference, _rps),
        "/s",
        ">= 0.80x",
        lambda r: r >= 0.8,
    )
    add(
        "(for comparison) the same, maplookup sending one statement per key",
        _paired(
            _find_all(runs, group="miss-path", server_label=NOCACHE_ONE_KEY, connections=c),
            reference,
            _rps,
        ),
        "/s",
        "none",
        lambda r: None,
    )
    tails = [_lat(x, "p99_us") / _lat(x, "p50_us") for x in nocache if _lat(x, "p50_us")]
    out.append(
        {
            "target": f"misses (--no-cache), {c} connections: p99 / p50",
            "measured": (
                f"p99 {statistics.median(_lat(x, 'p99_us') for x in nocache):,.0f} µs"
                if nocache
                else "n/a"
            ),
            "reference": (
                f"p50 {statistics.median(_lat(x, 'p50_us') for x in nocache):,.0f} µs"
                if nocache
                else "n/a"
            ),
            "ratio": statistics.median(tails) if tails else None,
            "rounds": tails,
            "goal": "<= 5x",
            "met": (statistics.median(tails) <= 5.0) if tails else None,
        }
    )
    small, large = min(plan.sizes), max(plan.sizes)
    add(
        f"hit latency (p50, 1 connection), {large:,} vs {small:,} mailboxes",
        _paired(
            _find_all(runs, group="data-size", dataset=large, connections=1),
            _find_all(runs, group="data-size", dataset=small, connections=1),
            lambda x: _lat(x, "p50_us"),
        ),
        " µs",
        "<= 1.10x",
        lambda r: r <= 1.1,
    )
    return out


def targets_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| target | maplookup | reference | ratio (median) | each round | goal | met |",
        "|---|--:|--:|--:|---|---|---|",
    ]
    for row in rows:
        met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
        each = ", ".join(f"{r:.2f}" for r in row.get("rounds", []))
        lines.append(
            f"| {row['target']} | {row['measured']} | {row['reference']} "
            f"| {_fmt_ratio(row['ratio'])} | {each} | {row['goal']} | {met} |"
        )
    return "\n".join(lines)


_LOAD_HEAD = (
    "| server | keys | conns | replies/s | vs maplookup | p50 µs | p90 µs | p99 µs | p99.9 µs "
    "| max µs | server CPU | PG CPU | loader CPU | other CPU | checks |\n"
    "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"
)


def _load_row(run: dict[str, Any], reference: float | None) -> str:
    r = run["result"]
    lat = r["latency"]
    mon = r.get("monitor", {})
    problems = r["mismatches"] + r["errors"] + r["unfinished"] + r["other"]
    checks = "ok" if problems == 0 else f"**{problems} bad**"
    if run["server_label"].startswith("maplookup") and "worker0_cache_misses" in mon:
        checks += (
            f", {mon['worker0_cache_misses']} misses (w0)"
            if mon["worker0_cache_misses"]
            else ", all hits"
        )
    spec = r["spec"]
    ratio = r["throughput_rps"] / reference if reference else None
    proto = " (tcp_table)" if spec["protocol"] == "tcptable" else ""
    per_worker = mon.get("connections_per_worker", [])
    conns = f"{spec['connections']}" + (
        f" ({'/'.join(map(str, per_worker))})" if len(per_worker) > 1 else ""
    )
    return (
        f"| {run['server_label']}{proto} | {run['mix']} | {conns} "
        f"| {r['throughput_rps']:,.0f} | {_fmt_ratio(ratio)} | {lat['p50_us']:,.0f} "
        f"| {lat['p90_us']:,.0f} | {lat['p99_us']:,.0f} | {lat['p99_9_us']:,.0f} "
        f"| {lat['max_us']:,.0f} | {mon.get('server_cpu_pct', 0):.0f}% "
        f"| {mon.get('postgres_cpu_pct', 0):.0f}% "
        f"| {r['loader_cpu_s'] / spec['duration_s'] * 100:.0f}% | {_other_cpu(r):.0f}% "
        f"| {checks} |"
    )


def _other_cpu(r: dict[str, Any]) -> float:
    """CPU used on the machine during the window by processes that are not this run's."""
    mon = r.get("monitor", {})
    if "machine_cpu_pct" not in mon:
        return 0.0
    ours = (
        mon.get("server_cpu_pct", 0)
        + mon.get("postgres_cpu_pct", 0)
        + r["loader_cpu_s"] / r["spec"]["duration_s"] * 100
    )
    return max(0.0, float(mon["machine_cpu_pct"] - ours))


def closed_loop_table(runs: list[dict[str, Any]]) -> str:
    """64 connections: every server and mix, with each one's ratio to maplookup."""
    ref = _find(runs, group="scaling", server_label="maplookup", connections=64, round=0)
    nc = _find(runs, group="miss-path", server_label=NOCACHE, connections=64, round=0)
    lines = [_LOAD_HEAD]
    for run in runs:
        spec = run["result"]["spec"]
        if spec["connections"] != 64 or spec["rate"] or run.get("round", 0) != 0:
            continue
        if run["group"] in ("loader", "profiled", "data-size"):
            continue
        reference = nc if run["group"] == "miss-path" else ref
        lines.append(_load_row(run, _rps(reference) if reference else None))
    return "\n".join(lines)


def scaling_table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| server | conns | replies/s | p50 µs | p99 µs | p99.9 µs | max µs | server CPU "
        "| loader CPU | other CPU |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for run in runs:
        if run["group"] != "scaling" or run.get("round", 0) != 0:
            continue
        r = run["result"]
        lat = r["latency"]
        lines.append(
            f"| {run['server_label']} | {r['spec']['connections']} | {r['throughput_rps']:,.0f} "
            f"| {lat['p50_us']:,.0f} | {lat['p99_us']:,.0f} | {lat['p99_9_us']:,.0f} "
            f"| {lat['max_us']:,.0f} | {r['monitor'].get('server_cpu_pct', 0):.0f}% "
            f"| {r['loader_cpu_s'] / r['spec']['duration_s'] * 100:.0f}% "
            f"| {_other_cpu(r):.0f}% |"
        )
    return "\n".join(lines)


def open_loop_table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| server | offered/s | replies/s | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs "
        "| send lag p50 / p99 µs |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for run in runs:
        if run["group"] != "open-loop":
            continue
        r = run["result"]
        lat = r["latency"]
        lag = r["send_lag"] or {}
        lines.append(
            f"| {run['server_label']} | {r['offered_rps']:,.0f} | {r['throughput_rps']:,.0f} "
            f"| {lat['p50_us']:,.0f} | {lat['p90_us']:,.0f} | {lat['p99_us']:,.0f} "
            f"| {lat['p99_9_us']:,.0f} | {lat['max_us']:,.0f} "
            f"| {lag.get('p50_us', 0):,.0f} / {lag.get('p99_us', 0):,.0f} |"
        )
    return "\n".join(lines)


def postmap_table(rows: list[dict[str, Any]], workers_label: str) -> str:
    ref = next((r for r in rows if r["label"] == workers_label), None)
    lines = [
        f"| table ({POSTMAP_PROCESSES} x postmap -q -) | round | keys | keys/s "
        f"| vs {workers_label} | wall s | server CPU | PG CPU | core busy (each) | found |",
        "|---|--:|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for row in rows:
        ratio = row["keys_per_s"] / ref["keys_per_s"] if ref else None
        found = (
            "ok"
            if row["found"] == row["expected_found"]
            else (f"**{row['found']:,} of {row['expected_found']:,}**")
        )
        cpu = f"{row['server_cpu_pct']:.0f}%" if "server_cpu_pct" in row else "-"
        lines.append(
            f"| {row['label']} | {row.get('round', 0)} | {row['keys']:,} "
            f"| {row['keys_per_s']:,.0f} | {_fmt_ratio(ratio)} "
            f"| {row['wall_s']:.1f} | {cpu} | {row['postgres_cpu_pct']:.0f}% "
            f"| {' / '.join(f'{c:.0f}%' for c in row.get('core_busy_pct', ()))} | {found} |"
        )
    return "\n".join(lines)


def data_size_table(runs: list[dict[str, Any]], plan: Plan) -> str:
    lines = [
        "| mailboxes | cached hot keys | conns | round | replies/s | p50 µs | p99 µs "
        "| p99.9 µs | other CPU |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for size in plan.sizes:
        for run in _find_all(runs, group="data-size", dataset=size):
            r = run["result"]
            lat = r["latency"]
            lines.append(
                f"| {size:,} | {min(size, plan.hot):,} | {r['spec']['connections']} "
                f"| {run.get('round', 0)} | {r['throughput_rps']:,.0f} | {lat['p50_us']:,.0f} "
                f"| {lat['p99_us']:,.0f} | {lat['p99_9_us']:,.0f} | {_other_cpu(r):.0f}% |"
            )
    return "\n".join(lines)


def memory_table(memory: dict[str, Any]) -> str:
    steps = memory.get("steps", [])
    lines = [
        "| cached entries | server RSS MiB | bytes per entry (from the empty cache) |",
        "|--:|--:|--:|",
    ]
    base = steps[0] if steps else None
    for s in steps:
        per = (
            f"{(s['rss_kib'] - base['rss_kib']) * 1024 / (s['entries'] - base['entries']):,.0f}"
            if base and s["entries"] > base["entries"]
            else "-"
        )
        lines.append(f"| {s['entries']:,} | {s['rss_kib'] / 1024:.1f} | {per} |")
    return "\n".join(lines)


def loader_table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| server | loader processes | conns | replies/s | loader CPU (all processes) "
        "| loader CPU µs per request | server CPU |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for run in runs:
        if run["server_label"] != "asyncio-bare":
            continue
        r = run["result"]
        lines.append(
            f"| asyncio-bare | {r['spec']['processes']} | {r['spec']['connections']} "
            f"| {r['throughput_rps']:,.0f} "
            f"| {r['loader_cpu_s'] / r['spec']['duration_s'] * 100:.0f}% "
            f"| {r['loader_cpu_per_request_us']:.1f} "
            f"| {r['monitor'].get('server_cpu_pct', 0):.0f}% |"
        )
    return "\n".join(lines)


def proxy_table(proxy: dict[str, Any]) -> str:
    lines = [
        "| path (sequential SELECT 1, 500 queries) | p50 µs | p99 µs | p50 added |",
        "|---|--:|--:|--:|",
    ]
    paths = proxy.get("paths", {})
    direct = paths.get("direct", {}).get("p50_us", 0.0)
    for name, s in paths.items():
        lines.append(
            f"| {name} | {s['p50_us']:,.0f} | {s['p99_us']:,.0f} | {s['p50_us'] - direct:+,.0f} |"
        )
    if proxy:
        lines.append(f"\nThe delayed runs used the setting {proxy['setting_us']} µs.")
    return "\n".join(lines)


def report(suite: Suite, workers_label: str) -> tuple[str, list[dict[str, Any]]]:
    rows = targets(suite.runs, suite.postmap, suite.plan, workers_label)
    parts = [
        "### Targets",
        "",
        targets_table(rows),
        "",
        f"### Closed loop, {TARGET_CONNECTIONS} connections, {MAIN_SIZE:,} mailboxes",
        "",
        'Hits are served from a cache warmed beforehand on every worker; "vs maplookup" is '
        "replies/s divided by maplookup's (1 worker, hits), and for the miss path by "
        "`maplookup --no-cache`'s.  Connections per worker in brackets.",
        "",
        closed_loop_table(suite.runs),
        "",
        "### Throughput and latency vs connections (cached hits)",
        "",
        scaling_table(suite.runs),
        "",
        f"### Open loop, {TARGET_CONNECTIONS} connections (latency from the due time)",
        "",
        open_loop_table(suite.runs),
        "",
        "### Through Postfix's client",
        "",
        postmap_table(suite.postmap, workers_label),
        "",
        "### Hit latency vs data size (maplookup, 1 worker)",
        "",
        data_size_table(suite.runs, suite.plan),
        "",
        f"### Memory vs cached entries ({suite.memory.get('dataset', '')})",
        "",
        memory_table(suite.memory),
        "",
        "### Load generator capacity (against the fastest responder)",
        "",
        loader_table(suite.runs),
        "",
        "### Delay proxy calibration",
        "",
        proxy_table(suite.proxy),
    ]
    others = [_other_cpu(run["result"]) for run in suite.runs]
    if others:
        suite.notes.append(
            "CPU used by processes outside this run during the measurement windows "
            f"(other CPU): median {statistics.median(others):.0f}%, max {max(others):.0f}% "
            f"of one core, on {os.cpu_count()} cores"
        )
    if suite.notes:
        parts += ["", "Notes:", ""] + [f"- {n}" for n in suite.notes]
    return "\n".join(parts), rows


# --------------------------------------------------------------------------
# main


def run_suite(plan: Plan) -> int:
    started, stamp = utc_stamp()
    deadline = Deadline(plan.timeout_s)
    pg = PrivatePostgres()
    work = Path(tempfile.mkdtemp(prefix="maplookup-suite-", dir="/tmp"))
    if not postfix.available():
        raise BenchError(
            "postmap (Postfix) is not installed: apt-get install postfix postfix-pgsql postfix-lmdb"
        )
    with Children() as children:
        try:
            t0 = time.monotonic()
            pg.start()
            log(f"PostgreSQL on port {pg.port} ({time.monotonic() - t0:.1f} s)")
            suite = Suite(plan, children, pg, work, stamp, deadline)
            phases = [
                ("datasets", suite.prepare_data),
                ("servers up, caches warmed", suite.start_servers),
                ("cached hits vs connections", suite.phase_scaling),
                ("key mixes and tcp_table", suite.phase_mixes),
                ("open loop", suite.phase_open_loop),
                ("miss path", suite.phase_miss_path),
                ("through postmap: socketmap, pgsql:, lmdb:", suite.phase_postmap),
                ("data size and memory", suite.phase_data_size),
                ("servers down", suite.stop_servers),
            ]
            for n, (name, phase) in enumerate(phases, 1):
                log(f"phase {n}/{len(phases)}: {name}")
                phase()
        finally:
            children.stop_all()
            pg.stop()
            shutil.rmtree(work, ignore_errors=True)
            log("stopped every process and the PostgreSQL cluster")
    text, target_rows = report(suite, suite.all_label)
    payload: dict[str, Any] = {
        "benchmark": "suite",
        "started_utc": started.isoformat(),
        "command": " ".join([".venv/bin/python -m bench.suite", *sys.argv[1:]]),
        "seconds": time.monotonic() - log.started,
        "plan": asdict(plan),
        "machine": machine_info(
            {"postgresql": next(iter(suite.datasets.values()), {}).get("postgresql")}
        ),
        "datasets": {str(k): v for k, v in suite.datasets.items()},
        "targets": target_rows,
        "runs": suite.runs,
        "postmap": suite.postmap,
        "warmups": suite.warmups,
        "memory": suite.memory,
        "proxy_calibration": suite.proxy,
        "servers": suite.servers,
        "profiles": suite.profiles,
        "notes": suite.notes,
        "tables_markdown": text,
    }
    path = write_json("suite", stamp, payload)
    try:
        from bench.lib.plots import plot_all

        pngs = plot_all(payload, path.with_suffix(""))
    except ImportError:
        pngs = []
        log("matplotlib is not installed (pip install -e '.[bench]'): no plots")
    payload["plots"] = [str(p.relative_to(PROJECT_ROOT)) for p in pngs]
    path = write_json("suite", stamp, payload)
    print(text)
    print()
    for p in pngs:
        print(f"- plot: {p.relative_to(PROJECT_ROOT)}")
    log(f"wrote {path.relative_to(PROJECT_ROOT)} in {payload['seconds']:.0f} s")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.suite",
        description="maplookup against its baselines, in one run (see bench/README.md).",
    )
    parser.add_argument("--quick", action="store_true", help="1k/100k, short runs (minutes)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record py-spy flame graphs of the server (hit and miss path)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    return run_guarded(log, lambda: run_suite(Plan.make(ns.quick, ns.profile)))


if __name__ == "__main__":
    sys.exit(main())
