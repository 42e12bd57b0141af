"""Several MX hosts on one machine: commit-to-visible through a standby, and a primary outage.

A primary and a streaming hot standby (``bench/lib/replication.py``: embedded clusters,
``pg_basebackup -R``) and three ``maplookup serve`` processes, each a "host":

``primary``
    reads the primary; its change feed LISTENs there, so a NOTIFY wakes it at once;
``standby``
    reads the standby with the default ``cache.change_feed_poll_interval_s`` (0.2 s): LISTEN
    is refused during recovery, so the feed polls the change log on the standby;
``standby-fast``
    the same with a shorter poll interval (``--fast-poll``, 0.05 s).

Two measurements, in one run:

``commit-to-visible``
    ``--changes`` changes per host, interleaved (one change for each host in turn, the order
    rotated every round, so that all three see the same machine load).  Each change is one
    autocommitted UPDATE on the primary (``synchronous_commit`` on, as in production: see
    ``bench/lib/replication.py``) that toggles the path of a mailbox whose answer the host
    has cached; each host has its own keys (one per domain, in domains of its own), so no
    change invalidates another host's keys.  The clock starts when the UPDATE returns and stops
    at the first lookup, on a persistent connection polling without sleeping, that answers the
    new path; the key is then asked once more so that it is cached again.  For the standby
    hosts, a thread reads the primary's flushed WAL position right after the UPDATE and polls
    ``pg_last_wal_replay_lsn()`` on the standby until it reaches it: the replay lag of that
    change, on the same clock.  Before each change for a standby host comes a pause of a
    random part of its poll interval, so that commits fall at random points of the poll cycle
    (a loop that changes again as soon as the last change was seen would lock onto the poll
    timer).  The servers' counters (``/metrics``) must show exactly one miss
    per change on every host: each change went through an invalidation, and the miss that
    followed it never read the old row.
``outage``
    The ``standby`` host under a closed loop of ``--clients`` connections (one request in
    flight each, as Postfix's processes ask): 45 % keys cached beforehand, 45 % existing keys
    asked for the first time, 10 % unknown users of hosted domains.  ``--phase-seconds`` with
    the primary up, then ``pg_ctl stop -m immediate`` on the primary while the load runs, then
    ``--phase-seconds`` with it down.  Every answer is checked: OK with the right path for an
    existing key, NOTFOUND for an unknown one; TEMP and NOTFOUND-for-existing are counted.
    Then the ``primary`` host is asked a few cached and uncached keys (it has lost its
    database), the primary is started again, and one change must become visible on all three
    hosts (the feeds resume).

Run from the project root::

    .venv/bin/python -m bench.replication        # --changes 400 --phase-seconds 20
    .venv/bin/python -m bench.replication --changes 30 --phase-seconds 5   # a quick look

Markdown tables go to stdout, progress to stderr, the figures to
``bench/results/replication-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import queue
import random
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import trio

from bench.lib.common import (
    BenchError,
    Deadline,
    Logger,
    bounded_int,
    cpu_seconds,
    descendants,
    machine_busy_seconds,
    machine_info,
    run_guarded,
    timeout_seconds,
    utc_stamp,
    write_json,
)
from bench.lib.replication import FLUSH_LSN, REPLAYED, ReplicatedClusters
from maplookup.config import HostPort
from maplookup.db import admin
from maplookup.protocol import Reply, Status, socketmap
from maplookup.testing import Client, RunningServer, TrioClient, start_server, stop_server

log = Logger("replication")

DEFAULT_MAILBOXES = 200_000
DEFAULT_DOMAINS = 150
DEFAULT_CHANGES = 400
DEFAULT_CLIENTS = 4
DEFAULT_PHASE_S = 20.0
DEFAULT_CACHED_KEYS = 5_000
DEFAULT_FAST_POLL_S = 0.05
DEFAULT_TIMEOUT_S = 480.0

DOMAIN_SUFFIX = ".repl-bench.example"
CHANGE_DEADLINE_S = 10.0
CPU_BLOCK_ROUNDS = 25
SLOW_MS = 100.0
RESUME_DEADLINE_S = 60.0
SOCKET_TIMEOUT_S = 10.0
SEED = 20261129

HOSTS = ("primary", "standby", "standby-fast")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------
# the dataset


def _domain(d: int) -> str:
    return f"domain{d}{DOMAIN_SUFFIX}"


def _key(i: int, domains: int) -> str:
    return f"user{i}@{_domain(i % domains)}"


def _path(i: int, domains: int, moved: bool = False) -> str:
    return f"{_domain(i % domains)}/user{i}{'.moved' if moved else ''}/"


async def _load(dsn: str, mailboxes: int, domains: int) -> str:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await admin.init_schema(conn)
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO maplookup.domains (name, kind)"
                " SELECT 'domain' || d || $2::text, 'mailbox'"
                " FROM generate_series(0, $1::int - 1) d",
                domains,
                DOMAIN_SUFFIX,
            )
            await conn.execute(
                "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
                " SELECT 'domain' || (i % $2::int) || $3::text, 'user' || i,"
                "        'domain' || (i % $2::int) || $3::text || '/user' || i || '/'"
                " FROM generate_series(0, $1::int - 1) i",
                mailboxes,
                domains,
                DOMAIN_SUFFIX,
            )
        await conn.execute("ANALYZE maplookup.domains")
        await conn.execute("ANALYZE maplookup.mailboxes")
        version: str = await conn.fetchval("SHOW server_version")
        return version
    finally:
        await conn.close()


def _request(key: str) -> bytes:
    return socketmap.encode_request(b"vmailbox", key.encode())


# --------------------------------------------------------------------------
# statistics


def _percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


def _summary_ms(values_ns: Sequence[int]) -> dict[str, float]:
    ordered = sorted(v / 1e6 for v in values_ns)
    if not ordered:
        return {}
    return {
        "n": len(ordered),
        "min": ordered[0],
        "p50": _percentile(ordered, 50),
        "p90": _percentile(ordered, 90),
        "p99": _percentile(ordered, 99),
        "max": ordered[-1],
        "mean": sum(ordered) / len(ordered),
    }


# --------------------------------------------------------------------------
# the servers and their counters


@dataclass
class Host:
    name: str
    reads: str  # "primary" or "standby"
    poll_interval_s: float
    server: RunningServer
    keys: list[int]  # the mailboxes its commit-to-visible changes toggle (one per domain)
    moved: list[bool] = field(default_factory=list)

    def client(self) -> Client:
        return Client.connect(
            HostPort(host="127.0.0.1", port=self.server.socketmap_port),
            timeout_s=SOCKET_TIMEOUT_S,
        )


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def metrics(host: Host) -> dict[str, float]:
    """The host's /metrics, each name summed over its labels."""
    assert host.server.metrics_port is not None
    url = f"http://127.0.0.1:{host.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=SOCKET_TIMEOUT_S) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            out[match[1]] = out.get(match[1], 0.0) + float(match[3])
    return out


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> int:
    return round(after.get(name, 0.0) - before.get(name, 0.0))


def _start_host(
    name: str, dsn: str, reads: str, poll_s: float, keys: list[int], logs: Path
) -> Host:
    env = {
        **os.environ,
        # As root (CI machines), the server must be told that is intended.
        "MAPLOOKUP_ALLOW_ROOT": "true",
        "MAPLOOKUP_CACHE__CHANGE_FEED_POLL_INTERVAL_S": str(poll_s),
    }
    server = start_server(dsn, logs / f"{name}.log", tcp_maps=(), metrics=True, env=env)
    host = Host(name, reads, poll_s, server, keys, [False] * len(keys))
    deadline = time.monotonic() + 30
    while metrics(host).get("maplookup_cache_live", 0.0) != 1.0:
        if time.monotonic() > deadline:
            raise BenchError(f"host {name}: the cache did not go live in 30 s")
        time.sleep(0.05)
    return host


def _log_summary(host: Host) -> dict[str, Any]:
    """How many lines the server logged, and its warnings and errors (the first 20)."""
    lines = host.server.log_tail(100_000).splitlines()
    notable = [line for line in lines if re.search(r"WARNING|ERROR|CRITICAL", line)]
    return {"lines": len(lines), "warnings_and_errors": len(notable), "first": notable[:20]}


class CpuWindow:
    """CPU over a window, in % of one core: the whole machine, this run's processes (this one,
    the servers, both clusters' backends) and the rest ("other": not this run's)."""

    def __init__(self, clusters: ReplicatedClusters) -> None:
        self._clusters = clusters
        self._t = 0.0
        self._busy = 0.0
        self._ours = 0.0

    def _ours_now(self) -> float:
        pids = descendants(os.getpid())
        for postmaster in self._clusters.postmaster_pids():
            pids += descendants(postmaster)
        return cpu_seconds(pids, children_too=True)

    def start(self) -> None:
        self._t = time.monotonic()
        self._busy = machine_busy_seconds()
        self._ours = self._ours_now()

    def stop(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self._t, 1e-9)
        machine = (machine_busy_seconds() - self._busy) / elapsed * 100
        ours = (self._ours_now() - self._ours) / elapsed * 100
        return {"machine_pct": machine, "ours_pct": ours, "other_pct": max(0.0, machine - ours)}


# --------------------------------------------------------------------------
# replay lag: a thread that polls the standby's replay position


class ReplayProbe:
    """``measure(lsn, t0)`` makes the thread poll the standby until it has replayed ``lsn``;
    ``result()`` is the time from ``t0`` (``perf_counter_ns``) to then."""

    def __init__(self, standby_dsn: str) -> None:
        self._dsn = standby_dsn
        self._jobs: queue.Queue[tuple[str, int] | None] = queue.Queue()
        self._results: queue.Queue[int | BaseException] = queue.Queue()
        self._thread = threading.Thread(target=self._main, name="replay-probe", daemon=True)
        self._thread.start()
        ready = self._results.get(timeout=30)
        if isinstance(ready, BaseException):
            raise BenchError(f"replay probe: {ready!r}")

    def measure(self, lsn: str, t0_ns: int) -> None:
        self._jobs.put((lsn, t0_ns))

    def result(self) -> int:
        value = self._results.get(timeout=CHANGE_DEADLINE_S + 5)
        if isinstance(value, BaseException):
            raise BenchError(f"replay probe: {value!r}")
        return value

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        try:
            conn = await asyncpg.connect(self._dsn, timeout=10)
            replayed = await conn.prepare(REPLAYED)
        except Exception as exc:
            self._results.put(exc)
            return
        self._results.put(0)
        clock = time.perf_counter_ns
        try:
            while (job := self._jobs.get()) is not None:
                lsn, t0 = job
                limit = t0 + int(CHANGE_DEADLINE_S * 1e9)
                try:
                    while not await replayed.fetchval(lsn):
                        if clock() > limit:
                            raise TimeoutError(f"{lsn} not replayed in {CHANGE_DEADLINE_S} s")
                    self._results.put(clock() - t0)
                except Exception as exc:
                    self._results.put(exc)
        finally:
            await conn.close()


# --------------------------------------------------------------------------
# part 1: commit-to-visible, interleaved over the hosts


@dataclass
class ChangeSample:
    host: str
    visible_ns: int
    commit_ns: int
    polls: int
    replay_ns: int | None


async def _measure_visibility(
    hosts: list[Host],
    primary_dsn: str,
    probe: ReplayProbe,
    cpu: CpuWindow,
    ns: argparse.Namespace,
    deadline: Deadline,
) -> tuple[list[ChangeSample], dict[str, dict[str, int]], list[dict[str, float]]]:
    """The changes, each host's counters, and CPU per block of CPU_BLOCK_ROUNDS rounds."""
    cpu_blocks: list[dict[str, float]] = []
    clients = {h.name: h.client() for h in hosts}
    conn = await asyncpg.connect(primary_dsn, timeout=10)
    samples: list[ChangeSample] = []
    clock = time.perf_counter_ns
    try:
        update = await conn.prepare(
            "UPDATE maplookup.mailboxes SET path = $1 WHERE domain = $2 AND local_part = $3"
        )
        flush_lsn = await conn.prepare(FLUSH_LSN)
        for h in hosts:  # every key cached (the second lookup must be a hit)
            for i in h.keys:
                for _ in range(2):
                    if clients[h.name].exchange(_request(_key(i, ns.domains))) != Reply.ok(
                        _path(i, ns.domains)
                    ):
                        raise BenchError(f"{h.name}: unexpected answer for {_key(i, ns.domains)}")
        before = {h.name: metrics(h) for h in hosts}
        rng = random.Random(SEED)
        cpu.start()
        for r in range(ns.changes):
            order = hosts[r % len(hosts) :] + hosts[: r % len(hosts)]
            for h in order:
                if h.reads == "standby":
                    # A pause of a random part of the poll interval, so that commits fall at
                    # random points of the feed's poll cycle.  Without it the loop's fixed
                    # rhythm (each change right after the last one became visible, that is
                    # right after a poll) locks onto the poll timer.
                    await asyncio.sleep(rng.uniform(0, h.poll_interval_s))
                slot = r % len(h.keys)
                i = h.keys[slot]
                h.moved[slot] = not h.moved[slot]
                new_path = _path(i, ns.domains, h.moved[slot])
                want = Reply.ok(new_path)
                request = _request(_key(i, ns.domains))
                client = clients[h.name]
                c0 = clock()
                await update.fetch(new_path, _domain(i % ns.domains), f"user{i}")
                t0 = clock()
                replay = h.reads == "standby"
                if replay:
                    probe.measure(await flush_lsn.fetchval(), t0)
                limit = t0 + int(CHANGE_DEADLINE_S * 1e9)
                polls = 0
                while True:
                    reply = client.exchange(request)
                    polls += 1
                    if reply == want:
                        break
                    if reply != Reply.ok(_path(i, ns.domains, not h.moved[slot])):
                        raise BenchError(f"{h.name}: unexpected answer {reply!r}")
                    if clock() > limit:
                        raise BenchError(f"{h.name}: change not visible in {CHANGE_DEADLINE_S} s")
                t1 = clock()
                replay_ns = probe.result() if replay else None
                if client.exchange(request) != want:  # cached again (a hit, checked below)
                    raise BenchError(f"{h.name}: the answer went back")
                samples.append(ChangeSample(h.name, t1 - t0, t0 - c0, polls, replay_ns))
            if (r + 1) % CPU_BLOCK_ROUNDS == 0 or r + 1 == ns.changes:
                cpu_blocks.append({"rounds_done": float(r + 1), **cpu.stop()})
                cpu.start()
            if r % 20 == 0:
                deadline.check("commit-to-visible")
            if (r + 1) % 50 == 0:
                log(f"commit-to-visible: {r + 1}/{ns.changes} changes per host")
        after = {h.name: metrics(h) for h in hosts}
    finally:
        for c in clients.values():
            c.close()
        await conn.close()
    counters: dict[str, dict[str, int]] = {}
    for h in hosts:
        mine = [s for s in samples if s.host == h.name]
        counters[h.name] = {
            "changes": len(mine),
            "polls": sum(s.polls for s in mine),
            "misses": _delta(before[h.name], after[h.name], "maplookup_cache_misses_total"),
            "hits": _delta(before[h.name], after[h.name], "maplookup_cache_hits_total")
            + _delta(before[h.name], after[h.name], "maplookup_cache_negative_hits_total"),
            "stores_skipped": _delta(
                before[h.name], after[h.name], "maplookup_cache_stores_skipped_total"
            ),
            "invalidations": _delta(
                before[h.name], after[h.name], "maplookup_cache_invalidations_total"
            ),
        }
    return samples, counters, cpu_blocks


def _one_miss_per_change(c: dict[str, int]) -> bool:
    # Every poll up to and including the first new answer, plus one re-check per change: the
    # first lookup after the invalidation is the only miss; everything else is a hit.
    return c["misses"] == c["changes"] and c["hits"] == c["polls"] and c["stores_skipped"] == 0


# --------------------------------------------------------------------------
# part 2: the standby host through a primary outage


@dataclass
class PhaseCounts:
    lookups: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies_ns: list[int] = field(default_factory=list)
    # Lookups slower than SLOW_MS: (seconds into the load, ms, kind), the first 50.
    slow: list[tuple[float, float, str]] = field(default_factory=list)


class OutageLoad:
    """The closed loop: key choice, answer checks, and counts per phase."""

    def __init__(self, ns: argparse.Namespace, cached: list[int], fresh: list[int]) -> None:
        self.ns = ns
        self.rng = random.Random(SEED)
        self.cached = cached
        self.fresh = fresh
        self.fresh_next = 0
        self.fresh_reused = 0
        self.unknown_next = 0
        self.phase = "up"
        self.phases: dict[str, PhaseCounts] = {p: PhaseCounts() for p in ("up", "stop", "down")}
        self.running = True
        self.errors: list[str] = []
        self.started_ns = time.perf_counter_ns()

    def next_request(self) -> tuple[str, str, Reply]:
        """(kind, key, expected answer)."""
        draw = self.rng.random()
        domains = self.ns.domains
        if draw < 0.45:
            i = self.rng.choice(self.cached)
            return "cached", _key(i, domains), Reply.ok(_path(i, domains))
        if draw < 0.90:
            if self.fresh_next < len(self.fresh):
                i = self.fresh[self.fresh_next]
                self.fresh_next += 1
            else:  # every fresh key was asked once: these are cached now (counted, reported)
                i = self.rng.choice(self.fresh)
                self.fresh_reused += 1
            return "fresh", _key(i, domains), Reply.ok(_path(i, domains))
        n = self.unknown_next
        self.unknown_next += 1
        return "unknown", f"nobody{n}@{_domain(n % domains)}", Reply.notfound()

    def record(self, phase: str, kind: str, reply: Reply, want: Reply, latency_ns: int) -> None:
        counts = self.phases[phase]
        counts.lookups += 1
        counts.by_kind[kind] += 1
        counts.latencies_ns.append(latency_ns)
        if latency_ns > SLOW_MS * 1e6 and len(counts.slow) < 50:
            at = (time.perf_counter_ns() - self.started_ns) / 1e9
            counts.slow.append((round(at, 3), round(latency_ns / 1e6, 1), kind))
        if reply.status is Status.TEMP or reply.status is Status.TIMEOUT:
            outcome = f"{reply.status.value} ({kind})"
        elif reply.status is Status.NOTFOUND and want.status is Status.OK:
            outcome = f"NOTFOUND for existing ({kind})"
        elif reply.status is not want.status or (
            want.status is Status.OK and reply.value != want.value
        ):
            outcome = f"wrong ({kind})"
            if len(self.errors) < 20:
                self.errors.append(f"{phase}: {kind}: expected {want!r}, got {reply!r}")
        else:
            outcome = "right"
        counts.outcomes[outcome] += 1


async def _client_loop(port: int, load: OutageLoad) -> None:
    clock = time.perf_counter_ns
    async with await TrioClient.connect(port, timeout_s=SOCKET_TIMEOUT_S) as client:
        while load.running:
            kind, key, want = load.next_request()
            phase = load.phase
            t0 = clock()
            reply = await client.exchange(_request(key))
            latency = clock() - t0
            if load.phase != phase:
                phase = "stop"
            load.record(phase, kind, reply, want, latency)


async def _outage(
    host: Host, clusters: ReplicatedClusters, load: OutageLoad, phase_s: float, cpu: CpuWindow
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Run the load: ``phase_s`` with the primary up, stop it, ``phase_s`` more; the
    durations of the three phases, and CPU during each."""
    cpu_by_phase: dict[str, dict[str, float]] = {}
    async with trio.open_nursery() as nursery:
        for _ in range(load.ns.clients):
            nursery.start_soon(_client_loop, host.server.socketmap_port, load)
        cpu.start()
        t0 = trio.current_time()
        await trio.sleep(phase_s)
        cpu_by_phase["up"] = cpu.stop()
        cpu.start()
        load.phase = "stop"
        t1 = trio.current_time()
        log("stopping the primary (pg_ctl stop -m immediate) under load")
        await trio.to_thread.run_sync(clusters.stop_primary)
        load.phase = "down"
        t2 = trio.current_time()
        cpu.start()  # (not while it stops: the primary's processes leave the count)
        log(f"primary stopped ({t2 - t1:.2f} s); {phase_s:.0f} s with it down")
        await trio.sleep(phase_s)
        load.running = False
        t3 = trio.current_time()
        cpu_by_phase["down"] = cpu.stop()
    return {"up": t1 - t0, "stop": t2 - t1, "down": t3 - t2}, cpu_by_phase


def _warm(host: Host, keys: list[int], domains: int, clients: int) -> None:
    async def warm_part(part: list[int]) -> None:
        async with await TrioClient.connect(host.server.socketmap_port) as client:
            for i in part:
                if await client.exchange(_request(_key(i, domains))) != Reply.ok(_path(i, domains)):
                    raise BenchError(f"warm-up: unexpected answer for {_key(i, domains)}")

    async def warm_all() -> None:
        async with trio.open_nursery() as nursery:
            for c in range(clients):
                nursery.start_soon(warm_part, keys[c::clients])

    trio.run(warm_all)


def _probe_primary_host(host: Host, fresh: list[int], domains: int) -> Counter[str]:
    """The host on the stopped primary: what it answers for its cached keys and for keys it
    never asked."""
    seen: Counter[str] = Counter()
    client = host.client()
    try:
        cached = [(i, _path(i, domains, host.moved[n])) for n, i in enumerate(host.keys)]
        uncached = [(i, _path(i, domains)) for i in fresh]
        for kind, keys in (("cached", cached), ("uncached", uncached)):
            for i, path in keys:
                reply = client.exchange(_request(_key(i, domains)))
                outcome = "right" if reply == Reply.ok(path) else reply.status.value
                seen[f"{kind}: {outcome}"] += 1
    finally:
        client.close()
    return seen


def _resume(hosts: list[Host], clusters: ReplicatedClusters, domains: int) -> dict[str, Any]:
    """Start the primary again; once every cache is live, one change: when each host has it."""
    clock = time.perf_counter_ns
    t_start = clock()
    clusters.start_primary()
    t_up = clock()
    out: dict[str, Any] = {"primary_start_s": (t_up - t_start) / 1e9}
    # When the standby streams again, and when each host's cache is live again.
    streaming: float | None = None
    live: dict[str, float] = {}
    limit = t_up + int(RESUME_DEADLINE_S * 1e9)
    while (streaming is None or len(live) < len(hosts)) and clock() < limit:
        if streaming is None:
            state = asyncio.run(_replication_state(clusters.standby_dsn))
            if state.get("wal_receiver") == "streaming":
                streaming = (clock() - t_up) / 1e9
        for h in hosts:
            if h.name not in live and metrics(h).get("maplookup_cache_live") == 1.0:
                live[h.name] = (clock() - t_up) / 1e9
        time.sleep(0.02)
    out["standby_streaming_after_s"] = streaming
    out["cache_live_after_s"] = live
    owner = hosts[0]
    i = owner.keys[0]
    old = Reply.ok(_path(i, domains, owner.moved[0]))
    request = _request(_key(i, domains))
    clients = {h.name: h.client() for h in hosts}
    try:
        for h in hosts:  # the key cached on every host before the change
            for _ in range(2):
                if clients[h.name].exchange(request) != old:
                    raise BenchError(f"resume: {h.name} does not answer {old!r}")
        owner.moved[0] = not owner.moved[0]
        new_path = _path(i, domains, owner.moved[0])
        before = {h.name: metrics(h) for h in hosts}
        t0 = asyncio.run(_update(clusters.primary_dsn, new_path, i, domains))
        out["update_after_primary_start_s"] = (t0 - t_up) / 1e9
        want = Reply.ok(new_path)
        pending = {h.name for h in hosts}
        visible: dict[str, float] = {}
        while pending and clock() - t0 < RESUME_DEADLINE_S * 1e9:
            for name in sorted(pending):
                if clients[name].exchange(request) == want:
                    visible[name] = (clock() - t0) / 1e9
                    pending.discard(name)
        after = {h.name: metrics(h) for h in hosts}
        out["visible_after_update_s"] = visible
        out["not_visible"] = sorted(pending)
        # Seen through an invalidation (a miss after hits), not by a lookup that was not cached.
        out["misses_during_check"] = {
            h.name: _delta(before[h.name], after[h.name], "maplookup_cache_misses_total")
            for h in hosts
        }
    finally:
        for c in clients.values():
            c.close()
    return out


async def _update(dsn: str, new_path: str, i: int, domains: int) -> int:
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
            break
        except (OSError, asyncpg.PostgresError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    try:
        await conn.execute(
            "UPDATE maplookup.mailboxes SET path = $1 WHERE domain = $2 AND local_part = $3",
            new_path,
            _domain(i % domains),
            f"user{i}",
        )
        return time.perf_counter_ns()
    finally:
        await conn.close()


async def _replication_state(standby_dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(standby_dsn, timeout=10)
    try:
        row = await conn.fetchrow(
            "SELECT pg_is_in_recovery() AS in_recovery,"
            " (SELECT status FROM pg_stat_wal_receiver) AS wal_receiver"
        )
        return dict(row) if row is not None else {}
    finally:
        await conn.close()


# --------------------------------------------------------------------------
# tables


def visibility_table(
    hosts: list[Host], samples: list[ChangeSample], counters: dict[str, dict[str, int]]
) -> str:
    lines = [
        "| host | reads | feed wakes on | changes | p50 ms | p90 ms | p99 ms | max ms "
        "| replay lag p50 / p99 / max ms | visible minus replayed p50 / p99 / max ms "
        "| lookups until new (p50 / max) | UPDATE p50 ms | one miss per change |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for h in hosts:
        mine = [s for s in samples if s.host == h.name]
        v = _summary_ms([s.visible_ns for s in mine])
        c = _summary_ms([s.commit_ns for s in mine])
        polls = sorted(s.polls for s in mine)
        wakes = "NOTIFY" if h.reads == "primary" else f"poll every {h.poll_interval_s:g} s"
        if h.reads == "standby":
            r = _summary_ms([s.replay_ns for s in mine if s.replay_ns is not None])
            d = _summary_ms([s.visible_ns - s.replay_ns for s in mine if s.replay_ns is not None])
            replay = f"{r['p50']:.2f} / {r['p99']:.2f} / {r['max']:.2f}"
            after = f"{d['p50']:.1f} / {d['p99']:.1f} / {d['max']:.1f}"
        else:
            replay = after = "n/a"
        ok = "yes" if _one_miss_per_change(counters[h.name]) else "NO"
        lines.append(
            f"| {h.name} | {h.reads} | {wakes} | {len(mine):,} | {v['p50']:.2f} "
            f"| {v['p90']:.2f} | {v['p99']:.2f} | {v['max']:.2f} | {replay} | {after} "
            f"| {int(_percentile(polls, 50))} / {polls[-1]} | {c['p50']:.2f} | {ok} |"
        )
    return "\n".join(lines)


def outage_table(
    load: OutageLoad, durations: dict[str, float], cpu: dict[str, dict[str, float]]
) -> str:
    lines = [
        "| primary | seconds | lookups | lookups/s | cached / fresh / unknown | p50 ms "
        "| p99 ms | max ms | TEMP | NOTFOUND for existing | wrong | this run's CPU "
        "| other CPU |",
        "|---|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    label = {"up": "up", "stop": "stopping (pg_ctl stop -m immediate)", "down": "down"}
    # While it stops, the primary's processes leave the count: no figure for that window.
    cpu_text = {
        phase: f"{cpu[phase]['ours_pct']:.0f} % | {cpu[phase]['other_pct']:.0f} %"
        for phase in ("up", "down")
    }
    cpu_text["stop"] = "n/a | n/a"
    for phase in ("up", "stop", "down"):
        p = load.phases[phase]
        seconds = durations[phase]
        lat = _summary_ms(p.latencies_ns)
        temp = sum(n for o, n in p.outcomes.items() if o.startswith(("TEMP", "TIMEOUT")))
        nf = sum(n for o, n in p.outcomes.items() if o.startswith("NOTFOUND for existing"))
        wrong = sum(n for o, n in p.outcomes.items() if o.startswith("wrong"))
        kinds = f"{p.by_kind['cached']:,} / {p.by_kind['fresh']:,} / {p.by_kind['unknown']:,}"
        rate = p.lookups / seconds if seconds > 0 else 0.0
        lines.append(
            f"| {label[phase]} | {seconds:.1f} | {p.lookups:,} | {rate:,.0f} | {kinds} "
            f"| {lat.get('p50', 0):.2f} | {lat.get('p99', 0):.2f} | {lat.get('max', 0):.2f} "
            f"| {temp} | {nf} | {wrong} | {cpu_text[phase]} |"
        )
    return "\n".join(lines)


def after_table(probe: Counter[str], resume: dict[str, Any]) -> str:
    visible = resume["visible_after_update_s"]
    live = resume["cache_live_after_s"]
    probe_text = ", ".join(f"{k} {v}" for k, v in sorted(probe.items()))
    streaming = resume["standby_streaming_after_s"]
    lines = [
        "| what | figure |",
        "|---|---|",
        f"| primary host, its primary down: answers to cached / never-asked keys | {probe_text} |",
        f"| primary started again (pg_ctl start) | {resume['primary_start_s']:.2f} s |",
        "| standby streaming again, after the primary's start | "
        + ("never" if streaming is None else f"{streaming:.2f} s")
        + " |",
        "| primary host's cache live again, after the primary's start | "
        + (f"{live['primary']:.2f} s" if "primary" in live else "never")
        + " |",
        "| one change after that: visible on primary / standby / standby-fast | "
        + " / ".join(f"{visible[h] * 1e3:.1f} ms" if h in visible else "never" for h in HOSTS)
        + " |",
        "| misses during that check (1 each: seen through an invalidation) | "
        + " / ".join(str(resume["misses_during_check"].get(h, "?")) for h in HOSTS)
        + " |",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# the run


def _run(ns: argparse.Namespace) -> int:
    started, stamp = utc_stamp()
    deadline = Deadline(ns.timeout)
    clusters = ReplicatedClusters()
    hosts: list[Host] = []
    payload: dict[str, Any] = {
        "benchmark": "replication",
        "started_utc": started.isoformat(),
        "command": " ".join([".venv/bin/python -m bench.replication", *sys.argv[1:]]),
        "settings": dict(vars(ns)),
        "loadavg_at_start": os.getloadavg(),
    }
    probe: ReplayProbe | None = None
    with tempfile.TemporaryDirectory(prefix="maplookup-bench-repl-") as tmp:
        try:
            t0 = time.monotonic()
            clusters.start()
            log(f"primary and standby up ({time.monotonic() - t0:.1f} s)")
            version = asyncio.run(_load(clusters.primary_dsn, ns.mailboxes, ns.domains))
            clusters.wait_until_replayed()
            log(
                f"loaded {ns.mailboxes:,} mailboxes in {ns.domains} domains, replayed "
                f"({time.monotonic() - t0:.1f} s)"
            )
            # Each host changes keys of its own domains (domain d belongs to host d % 3).
            keys = {
                name: [d for d in range(ns.domains) if d % len(HOSTS) == n]
                for n, name in enumerate(HOSTS)
            }
            logs = Path(tmp)
            hosts.append(
                _start_host("primary", clusters.primary_dsn, "primary", 0.2, keys["primary"], logs)
            )
            hosts.append(
                _start_host("standby", clusters.standby_dsn, "standby", 0.2, keys["standby"], logs)
            )
            hosts.append(
                _start_host(
                    "standby-fast",
                    clusters.standby_dsn,
                    "standby",
                    ns.fast_poll,
                    keys["standby-fast"],
                    logs,
                )
            )
            log("three hosts up, caches live")

            probe = ReplayProbe(clusters.standby_dsn)
            t0 = time.monotonic()
            cpu = CpuWindow(clusters)
            samples, counters, cpu_blocks = asyncio.run(
                _measure_visibility(hosts, clusters.primary_dsn, probe, cpu, ns, deadline)
            )
            log(f"commit-to-visible done ({time.monotonic() - t0:.1f} s)")
            probe.close()
            probe = None
            table1 = visibility_table(hosts, samples, counters)
            other = [b["other_pct"] for b in cpu_blocks]
            ours = [b["ours_pct"] for b in cpu_blocks]
            cpu_line = (
                f"CPU during these changes, in % of one core (blocks of {CPU_BLOCK_ROUNDS} "
                f"rounds): this run's processes {statistics.fmean(ours):.0f} % on average; "
                f"other processes {statistics.fmean(other):.0f} % on average, "
                f"{max(other):.0f} % in the busiest block."
            )
            print(table1, file=sys.stderr)
            clusters.wait_until_replayed()

            standby_host = hosts[1]
            outage_keys = list(range(ns.domains, ns.mailboxes))
            random.Random(SEED).shuffle(outage_keys)
            cached = outage_keys[: ns.cached_keys]
            fresh = outage_keys[ns.cached_keys :]
            t0 = time.monotonic()
            _warm(standby_host, cached, ns.domains, ns.clients)
            log(
                f"outage: {len(cached):,} keys cached on the standby host "
                f"({time.monotonic() - t0:.1f} s)"
            )
            deadline.check("outage warm-up")
            load = OutageLoad(ns, cached, fresh)
            before = metrics(standby_host)
            durations, outage_cpu = trio.run(
                _outage, standby_host, clusters, load, ns.phase_seconds, cpu
            )
            after_outage = metrics(standby_host)
            state_down = asyncio.run(_replication_state(clusters.standby_dsn))
            primary_host_probe = _probe_primary_host(hosts[0], fresh[-20:], ns.domains)
            log(f"primary host with its primary down: {dict(primary_host_probe)}")
            table2 = outage_table(load, durations, outage_cpu)
            print(table2, file=sys.stderr)
            resume = _resume(hosts, clusters, ns.domains)
            state_up = asyncio.run(_replication_state(clusters.standby_dsn))
            log(f"after restarting the primary: {resume}")
            payload.update(
                {
                    "machine": machine_info(
                        {"postgresql": version}, ("trio", "asyncpg", "uvloop", "maplookup")
                    ),
                    "hosts": [
                        {"name": h.name, "reads": h.reads, "poll_interval_s": h.poll_interval_s}
                        for h in hosts
                    ],
                    "commit_to_visible": {
                        h.name: {
                            "visible_ms": _summary_ms(
                                [s.visible_ns for s in samples if s.host == h.name]
                            ),
                            "replay_lag_ms": _summary_ms(
                                [
                                    s.replay_ns
                                    for s in samples
                                    if s.host == h.name and s.replay_ns is not None
                                ]
                            ),
                            "counters": counters[h.name],
                            "one_miss_per_change": _one_miss_per_change(counters[h.name]),
                        }
                        for h in hosts
                    },
                    "changes": [asdict(s) for s in samples],
                    "commit_to_visible_cpu_blocks": cpu_blocks,
                    "outage": {
                        "durations_s": durations,
                        "cpu_pct": outage_cpu,
                        "phases": {
                            phase: {
                                "lookups": p.lookups,
                                "lookups_per_s": p.lookups / durations[phase]
                                if durations[phase] > 0
                                else 0.0,
                                "by_kind": dict(p.by_kind),
                                "outcomes": dict(p.outcomes),
                                "latency_ms": _summary_ms(p.latencies_ns),
                                "slow_lookups": p.slow,
                            }
                            for phase, p in load.phases.items()
                        },
                        "fresh_keys_used": load.fresh_next,
                        "fresh_keys_reused": load.fresh_reused,
                        "wrong_answers": load.errors,
                        "standby_host_counters": {
                            name: _delta(before, after_outage, name)
                            for name in sorted(after_outage)
                            if name.endswith("_total")
                        },
                        "standby_host_gauges_after": {
                            name: value
                            for name, value in after_outage.items()
                            if not name.endswith(("_total", "_bucket", "_sum", "_count"))
                        },
                        "standby_during_outage": state_down,
                        "primary_host_probe": dict(primary_host_probe),
                    },
                    "resume": {**resume, "standby_after_restart": state_up},
                }
            )
        finally:
            if probe is not None:
                probe.close()
            for h in hosts:
                payload.setdefault("server_logs", {})[h.name] = _log_summary(h)
                stop_server(h.server)
            clusters.close()
    text = "\n".join(
        [
            "Commit to visible (changes interleaved over the three hosts):",
            "",
            table1,
            "",
            cpu_line,
            "",
            f"Standby host ({ns.clients} clients, closed loop) through a primary outage:",
            "",
            table2,
            "",
            "After the outage:",
            "",
            after_table(primary_host_probe, resume),
        ]
    )
    payload["loadavg_at_end"] = os.getloadavg()
    payload["tables_markdown"] = text
    path = write_json("replication", stamp, payload)
    print(text)
    log(f"wrote {path.relative_to(PROJECT_ROOT)}")
    failed = [h.name for h in hosts if not _one_miss_per_change(counters[h.name])]
    bad = load.errors or any(
        o.startswith(("TEMP", "TIMEOUT", "NOTFOUND", "wrong"))
        for p in load.phases.values()
        for o in p.outcomes
    )
    if failed or bad or resume["not_visible"]:
        log(
            f"CHECKS FAILED: counters {failed}, outage answers {bad}, "
            f"resume {resume['not_visible']}"
        )
        return 1
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.replication", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--mailboxes", type=bounded_int(10_000, 5_000_000), default=DEFAULT_MAILBOXES
    )
    parser.add_argument("--domains", type=bounded_int(3, 10_000), default=DEFAULT_DOMAINS)
    parser.add_argument(
        "--changes",
        type=bounded_int(1, 100_000),
        default=DEFAULT_CHANGES,
        help=f"changes per host for commit-to-visible (default {DEFAULT_CHANGES})",
    )
    parser.add_argument(
        "--fast-poll",
        type=float,
        default=DEFAULT_FAST_POLL_S,
        help=f"poll interval of the standby-fast host, s (default {DEFAULT_FAST_POLL_S})",
    )
    parser.add_argument("--clients", type=bounded_int(1, 64), default=DEFAULT_CLIENTS)
    parser.add_argument(
        "--phase-seconds",
        type=float,
        default=DEFAULT_PHASE_S,
        help=f"seconds of load with the primary up, then down (default {DEFAULT_PHASE_S:g})",
    )
    parser.add_argument(
        "--cached-keys",
        type=bounded_int(1, 1_000_000),
        default=DEFAULT_CACHED_KEYS,
        help=f"keys cached before the outage load (default {DEFAULT_CACHED_KEYS})",
    )
    parser.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds allowed for the whole run (default {DEFAULT_TIMEOUT_S:.0f})",
    )
    ns = parser.parse_args(argv)
    if not 0.001 <= ns.fast_poll <= 10 or not 1 <= ns.phase_seconds <= 600:
        parser.error("--fast-poll is 0.001..10 s, --phase-seconds 1..600")
    if ns.cached_keys >= ns.mailboxes - ns.domains:
        parser.error("--cached-keys must leave keys that are not cached")
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    return run_guarded(log, lambda: _run(ns))


if __name__ == "__main__":
    sys.exit(main())
