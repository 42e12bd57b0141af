"""What the answer cache buys and costs: hit vs miss latency, COMMIT-to-visible, memory.

Three measurements, in one run:

``hit-miss``
    A seeded dataset (10,000 mailboxes in 100 domains).  The server runs in its own process
    (``maplookup.service.serve``, as ``maplookup serve`` runs it) and is asked over one
    persistent socketmap connection, one request at a time, as a Postfix process asks.
    *hits*: every key is looked up once to fill the cache, then 20,000 lookups of cached keys.
    *misses*: the same 20,000 lookups against a server started with the cache off (what
    ``maplookup serve --no-cache`` does), so every lookup is a query.
``commit-to-visible``
    With the caching server running: 1,000 changes, one at a time.  Each is one committed
    UPDATE that toggles the path of a mailbox whose answer is cached.  The clock starts when
    the UPDATE (autocommit, so COMMIT) returns and stops at the first lookup, on a persistent
    connection polling without sleeping, that returns the new answer.  The key is looked up
    once more afterwards, so it is cached again before its next change.  One key per domain,
    cycled, so no other change invalidates it in between; the server's counters confirm that
    every change was served from the cache until invalidated (one miss per change).
``memory``
    In-process, no server: ``AnswerCache.store`` of N realistic entries (90 % positive),
    measured with ``tracemalloc`` (the store calls alone, and also the key, value and domain
    strings the cache holds in the server) and, in a separate process without tracemalloc,
    with VmRSS from ``/proc/self/status``.

The load generator is this process, with plain blocking sockets; the server never shares its
event loop.  Latency is ``time.perf_counter_ns()`` around each request and reply; percentiles
use the nearest rank.

Run from the project root::

    .venv/bin/python -m bench.cache                    # private PostgreSQL
    .venv/bin/python -m bench.cache --dsn postgresql://user@127.0.0.1:5432/db

Markdown tables go to stdout, progress to stderr, the figures to
``bench/results/cache-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.lib.common import (
    BenchError,
    Deadline,
    JsonLines,
    PrivatePostgres,
    bounded_int,
    machine_info,
    timeout_seconds,
    write_json,
)
from maplookup.config import HostPort, redact_dsn
from maplookup.testing import Client

DEFAULT_MAILBOXES = 10_000
DEFAULT_DOMAINS = 100
DEFAULT_LOOKUPS = 20_000
DEFAULT_MISS_WARMUP = 1_000
DEFAULT_CHANGES = 1_000
DEFAULT_MEMORY_SIZES = (100_000, 1_000_000)
DEFAULT_TIMEOUT_S = 240.0
MAX_COUNT = 2_000_000
SEED = 20261122

# The dataset's domains; with --dsn, rows under these names are replaced, then removed.
DOMAIN_SUFFIX = ".cache-bench.example"
CHANGE_DEADLINE_S = 5.0
SOCKET_TIMEOUT_S = 10.0
SERVER_START_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 15.0
MEMORY_WORKER_TIMEOUT_S = 120.0
COMMIT_GOAL_P99_MS = 50.0

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _log(message: str) -> None:
    print(f"[bench.cache] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# statistics


def _percentile(ordered: Sequence[int], pct: float) -> int:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class LatencyResult:
    workload: str
    server: str
    lookups: int
    wall_s: float
    throughput_lps: float
    mean_us: float
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    max_us: float


def _summarise_latency(
    workload: str, server: str, wall_ns: int, latencies_ns: list[int]
) -> LatencyResult:
    ordered = sorted(latencies_ns)
    n = len(ordered)
    return LatencyResult(
        workload=workload,
        server=server,
        lookups=n,
        wall_s=wall_ns / 1e9,
        throughput_lps=n / (wall_ns / 1e9),
        mean_us=sum(ordered) / n / 1e3,
        p50_us=_percentile(ordered, 50) / 1e3,
        p90_us=_percentile(ordered, 90) / 1e3,
        p99_us=_percentile(ordered, 99) / 1e3,
        p999_us=_percentile(ordered, 99.9) / 1e3,
        max_us=ordered[-1] / 1e3,
    )


@dataclass(frozen=True, slots=True)
class VisibilityResult:
    changes: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    changes_stale_after_commit: int
    polls_p50: int
    polls_max: int
    commit_p50_ms: float
    commit_p99_ms: float
    verified_by_counters: bool


@dataclass(frozen=True, slots=True)
class MemoryResult:
    entries: int
    store_traced_bytes_per_entry: float
    total_traced_bytes_per_entry: float
    strings_traced_bytes_per_entry: float
    store_rss_bytes_per_entry: float
    total_rss_bytes_per_entry: float
    seconds: float


# --------------------------------------------------------------------------
# the dataset


def _domain(d: int) -> str:
    return f"domain{d}{DOMAIN_SUFFIX}"


def _mailbox_key(i: int, domains: int) -> str:
    return f"user{i}@{_domain(i % domains)}"


def _mailbox_path(i: int, domains: int) -> str:
    return f"{_domain(i % domains)}/user{i}/"


def _moved_path(i: int, domains: int) -> str:
    return f"{_domain(i % domains)}/user{i}.moved/"


_SEED_SQL = (
    "INSERT INTO maplookup.domains (name, kind)"
    " SELECT 'domain' || d || $2::text, 'mailbox' FROM generate_series(0, $1::int - 1) d",
    "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
    " SELECT 'domain' || (i % $2::int) || $3::text, 'user' || i,"
    "        'domain' || (i % $2::int) || $3::text || '/user' || i || '/'"
    " FROM generate_series(0, $1::int - 1) i",
)


async def _remove_dataset(conn: Any) -> None:
    like = f"%{DOMAIN_SUFFIX}"
    await conn.execute("DELETE FROM maplookup.mailboxes WHERE domain LIKE $1", like)
    await conn.execute("DELETE FROM maplookup.domains WHERE name LIKE $1", like)


async def _prepare_database(dsn: str, mailboxes: int, domains: int) -> str:
    """Schema (idempotent) and the dataset; returns PostgreSQL's version."""
    import asyncpg

    from maplookup.db.admin import init_schema

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await init_schema(conn)
        async with conn.transaction():
            await _remove_dataset(conn)
            await conn.execute(_SEED_SQL[0], domains, DOMAIN_SUFFIX)
            await conn.execute(_SEED_SQL[1], mailboxes, domains, DOMAIN_SUFFIX)
        await conn.execute("ANALYZE maplookup.domains")
        await conn.execute("ANALYZE maplookup.mailboxes")
        version: str = await conn.fetchval("SHOW server_version")
        return version
    finally:
        await conn.close()


async def _cleanup_database(dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        async with conn.transaction():
            await _remove_dataset(conn)
    finally:
        await conn.close()


# --------------------------------------------------------------------------
# the server, in its own process, with a control pipe for its counters


def _emit(payload: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def _server_state(running: Any) -> dict[str, object]:
    cache = running.cache
    state: dict[str, object] = {"server": asdict(running.server.counters)}
    if cache is not None:
        state["cache"] = asdict(cache.counters)
        state["entries"] = len(cache)
        state["live"] = cache.live
    if running.listener is not None:
        state["listener"] = asdict(running.listener.counters)
    return state


async def _server_worker(dsn: str, cache_on: bool, budget_s: float) -> None:
    """Run ``serve`` as ``maplookup serve`` would; obey ``state``/``stop`` lines on stdin."""
    import trio

    from maplookup.config_load import load_settings
    from maplookup.serve.service import Running, serve

    settings = load_settings(
        overrides={
            "listen": {"socketmap": ["127.0.0.1:0"]},
            "database": {"dsn": dsn},
            "cache": {"max_entries": 100_000 if cache_on else 0},
            "log_level": "warning",
        },
        environ={},
    )
    with trio.fail_after(budget_s):
        async with trio.open_nursery() as nursery:
            running: Running = await nursery.start(serve, settings, dsn)
            with trio.fail_after(SERVER_START_TIMEOUT_S):
                while running.cache is not None and not running.cache.live:  # noqa: ASYNC110
                    await trio.sleep(0.005)
            _emit({"port": running.listeners[0].tcp_port(), "cache": running.cache is not None})
            stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
            buffer = b""
            stop = False
            while not stop:
                data = await stdin.receive_some(4096)
                if not data:
                    break
                buffer += data
                while b"\n" in buffer and not stop:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip() == b"state":
                        _emit(_server_state(running))
                    elif line.strip() == b"stop":
                        stop = True
            await stdin.aclose()
            running.server.drain()
        _emit({"stopped": True})


class ServerProcess:
    """A server subprocess; ``state()`` asks it for its counters."""

    def __init__(self, dsn: str, cache_on: bool, budget_s: float) -> None:
        argv = [sys.executable, "-m", "bench.cache", "--server-worker", "--dsn", dsn]
        argv += ["--timeout", f"{max(budget_s, 1.0):.0f}"]
        if not cache_on:
            argv.append("--no-cache")
        self.proc = subprocess.Popen(
            argv, cwd=PROJECT_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        self._replies = JsonLines(self.proc, BenchError)
        ready = self._replies.read(SERVER_START_TIMEOUT_S)
        self.port = int(ready["port"])
        self.cache_on = bool(ready["cache"])

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")

    def state(self) -> dict[str, Any]:
        self._send("state")
        return self._replies.read(SOCKET_TIMEOUT_S)

    def stop(self) -> dict[str, Any]:
        final = self.state()
        self._send("stop")
        try:
            self.proc.wait(timeout=SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError("the server process did not stop; killed it") from None
        return final

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------
# the client: one persistent socketmap connection, one request at a time


def _connect(port: int) -> Client:
    """Blocking socketmap client, like a Postfix process's connection (TCP_NODELAY)."""
    return Client.connect(HostPort(host="127.0.0.1", port=port), timeout_s=SOCKET_TIMEOUT_S)


def _vmailbox_request(key: str) -> bytes:
    from maplookup.protocol import socketmap

    return socketmap.encode_request(b"vmailbox", key.encode())


def _run_lookups(
    client: Client, requests: list[bytes], expected: list[Any], deadline: Deadline, what: str
) -> tuple[int, list[int]]:
    latencies: list[int] = []
    append = latencies.append
    clock = time.perf_counter_ns
    started = clock()
    for n, (request, want) in enumerate(zip(requests, expected, strict=True)):
        t0 = clock()
        reply = client.exchange(request)
        append(clock() - t0)
        if reply != want:
            raise BenchError(f"{what}: expected {want!r}, got {reply!r}")
        if n % 1000 == 0:
            deadline.check(what)
            if n and n % 5000 == 0:
                _log(f"{what}: {n:,}/{len(requests):,}")
    return clock() - started, latencies


def _counter_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    return {k: after["cache"][k] - before["cache"][k] for k in after["cache"]}


# --------------------------------------------------------------------------
# phase 1 and 2: the caching server


@dataclass(frozen=True, slots=True)
class Workload:
    keys: list[int]  # mailbox numbers, in the order they are asked
    requests: list[bytes]
    expected: list[Any]


def _workload(mailboxes: int, domains: int, lookups: int) -> Workload:
    from maplookup.protocol import Reply

    rng = random.Random(SEED)
    order: list[int] = []
    while len(order) < lookups:
        batch = list(range(mailboxes))
        rng.shuffle(batch)
        order.extend(batch)
    order = order[:lookups]
    requests = [_vmailbox_request(_mailbox_key(i, domains)) for i in order]
    expected = [Reply.ok(_mailbox_path(i, domains)) for i in order]
    return Workload(order, requests, expected)


def _measure_hits(
    server: ServerProcess, ns: argparse.Namespace, work: Workload, deadline: Deadline
) -> tuple[LatencyResult, dict[str, int]]:
    from maplookup.protocol import Reply

    client = _connect(server.port)
    try:
        t0 = time.monotonic()
        warm = [_vmailbox_request(_mailbox_key(i, ns.domains)) for i in range(ns.mailboxes)]
        warm_expected = [Reply.ok(_mailbox_path(i, ns.domains)) for i in range(ns.mailboxes)]
        _run_lookups(client, warm, warm_expected, deadline, "cache warm-up")
        before = server.state()
        if before["entries"] < ns.mailboxes:
            raise BenchError(f"only {before['entries']} of {ns.mailboxes} keys were cached")
        _log(f"cache warmed with {before['entries']} entries ({time.monotonic() - t0:.1f} s)")
        wall, latencies = _run_lookups(client, work.requests, work.expected, deadline, "hits")
        after = server.state()
    finally:
        client.close()
    delta = _counter_delta(before, after)
    if delta["hits"] != len(work.requests) or delta["misses"] != 0:
        raise BenchError(f"the hit workload was not all hits: {delta}")
    result = _summarise_latency("hits", "cache on, every key cached", wall, latencies)
    _log(f"hits: {result.throughput_lps:,.0f} lookups/s, p50 {result.p50_us:,.0f} µs")
    return result, delta


async def _measure_visibility(
    server: ServerProcess, dsn: str, ns: argparse.Namespace, deadline: Deadline
) -> tuple[VisibilityResult, list[float], dict[str, int]]:
    import asyncpg

    from maplookup.protocol import Reply

    # Key d is mailbox number d, which lives in domain d: one key per domain.
    targets = min(ns.domains, ns.mailboxes)
    requests = [_vmailbox_request(_mailbox_key(d, ns.domains)) for d in range(targets)]
    paths = [(_mailbox_path(d, ns.domains), _moved_path(d, ns.domains)) for d in range(targets)]
    moved = [False] * targets
    client = _connect(server.port)
    conn = await asyncpg.connect(dsn, timeout=10)
    visible_ns: list[int] = []
    commit_ns: list[int] = []
    polls: list[int] = []
    stale_after_commit = 0
    clock = time.perf_counter_ns
    try:
        update = await conn.prepare(
            "UPDATE maplookup.mailboxes SET path = $1 WHERE domain = $2 AND local_part = $3"
        )
        for d in range(targets):  # cache every key (the second lookup must be a hit)
            for _ in range(2):
                if client.exchange(requests[d]) != Reply.ok(paths[d][0]):
                    raise BenchError(f"unexpected answer for key {d}")
        before = server.state()
        for k in range(ns.changes):
            d = k % targets
            new_path = paths[d][0] if moved[d] else paths[d][1]
            want = Reply.ok(new_path)
            c0 = clock()
            await update.fetch(new_path, _domain(d % ns.domains), f"user{d}")
            t0 = clock()
            moved[d] = not moved[d]
            limit = t0 + int(CHANGE_DEADLINE_S * 1e9)
            n = 0
            while True:
                reply = client.exchange(requests[d])
                n += 1
                if reply == want:
                    break
                if clock() > limit:
                    raise BenchError(f"change {k} not visible after {CHANGE_DEADLINE_S} s")
            t1 = clock()
            visible_ns.append(t1 - t0)
            commit_ns.append(t0 - c0)
            polls.append(n)
            if n > 1:
                stale_after_commit += 1
            if client.exchange(requests[d]) != want:  # cached again (a hit, checked below)
                raise BenchError(f"change {k}: answer went back")
            if k % 100 == 0:
                deadline.check("commit-to-visible")
            if (k + 1) % 250 == 0:
                done = sorted(visible_ns)
                _log(
                    f"commit-to-visible: {k + 1}/{ns.changes} changes, "
                    f"p50 {_percentile(done, 50) / 1e6:.2f} ms"
                )
        after = server.state()
    finally:
        client.close()
        # Put the dataset back, so that a second run starts from the same rows.
        await conn.execute(
            "UPDATE maplookup.mailboxes SET path = domain || '/' || local_part || '/'"
            " WHERE domain LIKE $1",
            f"%{DOMAIN_SUFFIX}",
        )
        await conn.close()
    delta = _counter_delta(before, after)
    # Every poll up to and including the first new answer, plus one re-check per change.
    # Exactly one miss per change (the first lookup after the invalidation) means the key was
    # cached when each change committed and the re-check after each change was a hit.
    verified = (
        delta["misses"] == ns.changes
        and delta["hits"] + delta["negative_hits"] == sum(polls)
        and delta["stores_skipped"] == 0
    )
    if not verified:
        _log(f"WARNING: counters do not match the expected pattern: {delta}")
    vis = sorted(visible_ns)
    com = sorted(commit_ns)
    ordered_polls = sorted(polls)
    result = VisibilityResult(
        changes=len(vis),
        mean_ms=sum(vis) / len(vis) / 1e6,
        p50_ms=_percentile(vis, 50) / 1e6,
        p90_ms=_percentile(vis, 90) / 1e6,
        p99_ms=_percentile(vis, 99) / 1e6,
        max_ms=vis[-1] / 1e6,
        changes_stale_after_commit=stale_after_commit,
        polls_p50=_percentile(ordered_polls, 50),
        polls_max=ordered_polls[-1],
        commit_p50_ms=_percentile(com, 50) / 1e6,
        commit_p99_ms=_percentile(com, 99) / 1e6,
        verified_by_counters=verified,
    )
    return result, [v / 1e6 for v in visible_ns], delta


def _measure_misses(
    server: ServerProcess, ns: argparse.Namespace, work: Workload, deadline: Deadline
) -> LatencyResult:
    client = _connect(server.port)
    try:
        warm = min(ns.miss_warmup, len(work.requests))
        _run_lookups(client, work.requests[:warm], work.expected[:warm], deadline, "miss warm-up")
        wall, latencies = _run_lookups(client, work.requests, work.expected, deadline, "misses")
    finally:
        client.close()
    result = _summarise_latency("misses", "--no-cache (one query per lookup)", wall, latencies)
    _log(f"misses: {result.throughput_lps:,.0f} lookups/s, p50 {result.p50_us:,.0f} µs")
    return result


# --------------------------------------------------------------------------
# phase 3: memory, in a fresh process per size and method


def _vm_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError("no VmRSS in /proc/self/status")


def _memory_worker(entries: int, use_tracemalloc: bool) -> dict[str, float]:
    """Bytes for ``entries`` stores: (strings, stores), by tracemalloc or by VmRSS."""
    from maplookup.lookup.cache import AnswerCache, CacheSettings, domain_of
    from maplookup.maps import MapName

    def measure() -> int:
        return tracemalloc.get_traced_memory()[0] if use_tracemalloc else _vm_rss_bytes()

    vmailbox = MapName.VMAILBOX
    # The lists that hold the objects exist before measuring: the server has no such lists.
    keys: list[Any] = [None] * entries
    values: list[str | None] = [None] * entries
    domains: list[str] = [""] * entries
    cache = AnswerCache(CacheSettings(max_entries=entries))
    cache.set_live(True)
    rng = random.Random(SEED)
    numbers = rng.sample(range(100_000, 1_000_000), k=min(entries, 900_000))
    gc.collect()
    if use_tracemalloc:
        tracemalloc.start()
    started = time.perf_counter()
    base = measure()
    for i in range(entries):
        user = numbers[i % len(numbers)] if i < len(numbers) else 1_000_000 + i
        d = i % 100
        # New string objects, as the server gets them: the key folded from the request, the
        # value from asyncpg, the domain sliced out of the key by domain_of.
        key = f"user{user}@domain{d}.example"
        keys[i] = (vmailbox, key)
        values[i] = None if i % 10 == 9 else f"domain{d}.example/user{user}/"
        domains[i] = domain_of(vmailbox, key)
    after_strings = measure()
    store = cache.store
    generations = cache.generations
    for i in range(entries):
        domain = domains[i]
        store(keys[i], values[i], domain, generations(domain))
    after_stores = measure()
    seconds = time.perf_counter() - started
    if use_tracemalloc:
        tracemalloc.stop()
    if len(cache) != entries:
        raise BenchError(f"the cache holds {len(cache)} entries, expected {entries}")
    return {
        "strings_bytes": after_strings - base,
        "store_bytes": after_stores - after_strings,
        "seconds": seconds,
    }


def _run_memory(entries: int, deadline: Deadline) -> MemoryResult:
    rows: dict[str, dict[str, float]] = {}
    for method in ("tracemalloc", "rss"):
        argv = [sys.executable, "-m", "bench.cache", "--memory-worker", str(entries), method]
        timeout = min(MEMORY_WORKER_TIMEOUT_S, max(deadline.remaining(), 1.0))
        proc = subprocess.run(
            argv, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise BenchError(f"memory worker ({entries}, {method}) failed: {proc.returncode}")
        rows[method] = json.loads(proc.stdout)
    traced, rss = rows["tracemalloc"], rows["rss"]
    result = MemoryResult(
        entries=entries,
        store_traced_bytes_per_entry=traced["store_bytes"] / entries,
        total_traced_bytes_per_entry=(traced["store_bytes"] + traced["strings_bytes"]) / entries,
        strings_traced_bytes_per_entry=traced["strings_bytes"] / entries,
        store_rss_bytes_per_entry=rss["store_bytes"] / entries,
        total_rss_bytes_per_entry=(rss["store_bytes"] + rss["strings_bytes"]) / entries,
        seconds=traced["seconds"] + rss["seconds"],
    )
    _log(
        f"memory at {entries:,} entries: {result.store_traced_bytes_per_entry:.0f} B/entry "
        f"for the stores, {result.total_traced_bytes_per_entry:.0f} B/entry with strings"
    )
    return result


# --------------------------------------------------------------------------
# tables


def latency_table(hits: LatencyResult, misses: LatencyResult) -> str:
    lines = [
        "| workload | server | lookups | lookups/s | p50 µs | p90 µs | p99 µs | p99.9 µs "
        "| max µs |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in (hits, misses):
        lines.append(
            f"| {r.workload} | {r.server} | {r.lookups:,} | {r.throughput_lps:,.0f} "
            f"| {r.p50_us:,.0f} | {r.p90_us:,.0f} | {r.p99_us:,.0f} | {r.p999_us:,.0f} "
            f"| {r.max_us:,.0f} |"
        )
    lines.append(
        f"| miss/hit | | | {misses.throughput_lps / hits.throughput_lps:.2f}x "
        f"| {misses.p50_us / hits.p50_us:.1f}x | {misses.p90_us / hits.p90_us:.1f}x "
        f"| {misses.p99_us / hits.p99_us:.1f}x | {misses.p999_us / hits.p999_us:.1f}x "
        f"| {misses.max_us / hits.max_us:.1f}x |"
    )
    return "\n".join(lines)


def visibility_table(v: VisibilityResult) -> str:
    return "\n".join(
        [
            "| changes | p50 ms | p90 ms | p99 ms | max ms | mean ms | old answer still served "
            "after COMMIT | lookups until new (p50 / max) | UPDATE+COMMIT p50 / p99 ms "
            "| one miss per change |",
            "|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
            f"| {v.changes:,} | {v.p50_ms:.2f} | {v.p90_ms:.2f} | {v.p99_ms:.2f} "
            f"| {v.max_ms:.2f} | {v.mean_ms:.2f} | {v.changes_stale_after_commit:,} "
            f"of {v.changes:,} | {v.polls_p50} / {v.polls_max} "
            f"| {v.commit_p50_ms:.2f} / {v.commit_p99_ms:.2f} "
            f"| {'yes' if v.verified_by_counters else 'NO'} |",
        ]
    )


def memory_table(rows: list[MemoryResult]) -> str:
    lines = [
        "| entries | store() only, tracemalloc | with key, value, domain strings, tracemalloc "
        "| store() only, RSS | with strings, RSS |",
        "|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.entries:,} | {r.store_traced_bytes_per_entry:.0f} B "
            f"| {r.total_traced_bytes_per_entry:.0f} B | {r.store_rss_bytes_per_entry:.0f} B "
            f"| {r.total_rss_bytes_per_entry:.0f} B |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# the coordinator


@dataclass(slots=True)
class Measured:
    pg_version: str = ""
    hits: LatencyResult | None = None
    hit_counters: dict[str, int] | None = None
    misses: LatencyResult | None = None
    visibility: VisibilityResult | None = None
    visibility_ms: list[float] | None = None
    visibility_counters: dict[str, int] | None = None
    caching_server_final: dict[str, Any] | None = None


def _with_server(
    dsn: str, cache_on: bool, deadline: Deadline, body: Callable[[ServerProcess], None]
) -> dict[str, Any]:
    server = ServerProcess(dsn, cache_on, deadline.remaining() + 30)
    try:
        body(server)
        return server.stop()
    finally:
        server.kill()


def _measure_servers(dsn: str, ns: argparse.Namespace, deadline: Deadline, out: Measured) -> None:
    t0 = time.monotonic()
    out.pg_version = asyncio.run(_prepare_database(dsn, ns.mailboxes, ns.domains))
    _log(
        f"seeded {ns.mailboxes:,} mailboxes in {ns.domains} domains ({time.monotonic() - t0:.1f} s)"
    )
    work = _workload(ns.mailboxes, ns.domains, ns.lookups)

    def caching(server: ServerProcess) -> None:
        out.hits, out.hit_counters = _measure_hits(server, ns, work, deadline)
        if ns.changes:
            t1 = time.monotonic()
            out.visibility, out.visibility_ms, out.visibility_counters = asyncio.run(
                _measure_visibility(server, dsn, ns, deadline)
            )
            v = out.visibility
            _log(
                f"commit-to-visible: p50 {v.p50_ms:.2f} ms, p99 {v.p99_ms:.2f} ms, "
                f"max {v.max_ms:.2f} ms ({time.monotonic() - t1:.1f} s)"
            )

    def uncached(server: ServerProcess) -> None:
        out.misses = _measure_misses(server, ns, work, deadline)

    out.caching_server_final = _with_server(dsn, True, deadline, caching)
    _with_server(dsn, False, deadline, uncached)


def _coordinator_main(ns: argparse.Namespace) -> int:
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    deadline = Deadline(ns.timeout)
    pg: PrivatePostgres | None = None
    out = Measured()
    if ns.dsn:
        dsn = ns.dsn
        _log(f"using {redact_dsn(dsn)}")
    else:
        t0 = time.monotonic()
        pg = PrivatePostgres()
        dsn = pg.start()
        _log(f"embedded PostgreSQL on {dsn} ({time.monotonic() - t0:.1f} s)")
    try:
        _measure_servers(dsn, ns, deadline, out)
        if ns.dsn:
            asyncio.run(_cleanup_database(dsn))
    finally:
        if pg is not None:
            pg.stop()
            _log("embedded PostgreSQL stopped")
    memory = [_run_memory(n, deadline) for n in ns.memory_sizes]
    if out.hits is None or out.misses is None:
        raise BenchError("the latency workloads did not run")

    tables = [
        "Hit vs miss (one connection, one request at a time):",
        "",
        latency_table(out.hits, out.misses),
    ]
    if out.visibility is not None:
        tables += ["", "COMMIT to visible:", "", visibility_table(out.visibility)]
    if memory:
        tables += ["", "Memory per cached entry (bytes):", "", memory_table(memory)]
    text = "\n".join(tables)
    payload: dict[str, object] = {
        "benchmark": "cache",
        "started_utc": started.isoformat(),
        "command": " ".join([".venv/bin/python -m bench.cache", *sys.argv[1:]]),
        "settings": {
            "mailboxes": ns.mailboxes,
            "domains": ns.domains,
            "lookups": ns.lookups,
            "miss_warmup": ns.miss_warmup,
            "changes": ns.changes,
            "memory_sizes": ns.memory_sizes,
            "seed": SEED,
            "dsn": redact_dsn(dsn),
            "database": "external (--dsn)" if ns.dsn else "embedded, fast_unsafe, TCP loopback",
        },
        "machine": machine_info(
            {"postgresql": out.pg_version}, ("trio", "asyncpg", "uvloop", "maplookup")
        ),
        "hit_miss": [asdict(out.hits), asdict(out.misses)],
        "hit_counters": out.hit_counters,
        "commit_to_visible": asdict(out.visibility) if out.visibility else None,
        "commit_to_visible_counters": out.visibility_counters,
        "commit_to_visible_ms": out.visibility_ms,
        "caching_server_final_state": out.caching_server_final,
        "memory": [asdict(m) for m in memory],
        "tables_markdown": text,
    }
    path = write_json("cache", stamp, payload)
    print(text)
    _log(f"wrote {path.relative_to(PROJECT_ROOT)}")
    return 0


# --------------------------------------------------------------------------
# command line


def _sizes(text: str) -> list[int]:
    if text.strip() in ("", "none"):
        return []
    parse = bounded_int(1, MAX_COUNT)
    return [parse(part) for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cache",
        description="Benchmark the answer cache (see bench/README.md).",
    )
    parser.add_argument(
        "--mailboxes",
        type=bounded_int(1, MAX_COUNT),
        default=DEFAULT_MAILBOXES,
        help=f"mailboxes in the dataset (default {DEFAULT_MAILBOXES})",
    )
    parser.add_argument(
        "--domains",
        type=bounded_int(1, 10_000),
        default=DEFAULT_DOMAINS,
        help=f"domains they are spread over (default {DEFAULT_DOMAINS})",
    )
    parser.add_argument(
        "--lookups",
        type=bounded_int(1, MAX_COUNT),
        default=DEFAULT_LOOKUPS,
        help=f"measured lookups for hits and for misses (default {DEFAULT_LOOKUPS})",
    )
    parser.add_argument(
        "--miss-warmup",
        type=bounded_int(0, MAX_COUNT),
        default=DEFAULT_MISS_WARMUP,
        help=f"unmeasured lookups before the misses (default {DEFAULT_MISS_WARMUP})",
    )
    parser.add_argument(
        "--changes",
        type=bounded_int(0, 100_000),
        default=DEFAULT_CHANGES,
        help=f"committed changes for commit-to-visible, 0 to skip (default {DEFAULT_CHANGES})",
    )
    parser.add_argument(
        "--memory-sizes",
        type=_sizes,
        default=list(DEFAULT_MEMORY_SIZES),
        help="comma-separated entry counts for the memory measurement, 'none' to skip "
        "(default 100000,1000000)",
    )
    parser.add_argument(
        "--dsn",
        help="PostgreSQL DSN to use instead of a private cluster (TCP loopback); the schema is "
        f"created if missing and domains named domainN{DOMAIN_SUFFIX} are replaced, then removed",
    )
    parser.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds allowed for the whole run (default {DEFAULT_TIMEOUT_S:.0f})",
    )
    parser.add_argument("--server-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-cache", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", nargs=2, metavar=("N", "METHOD"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.server_worker:
        if not ns.dsn:
            raise SystemExit("--server-worker needs --dsn")
        import logging

        import trio

        logging.basicConfig(
            level=logging.WARNING,
            format="[bench.cache server] %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        trio.run(_server_worker, ns.dsn, not ns.no_cache, ns.timeout)
        return 0
    if ns.memory_worker:
        entries = bounded_int(1, MAX_COUNT)(ns.memory_worker[0])
        method = ns.memory_worker[1]
        if method not in ("tracemalloc", "rss"):
            raise SystemExit("--memory-worker METHOD is tracemalloc or rss")
        json.dump(_memory_worker(entries, method == "tracemalloc"), sys.stdout)
        sys.stdout.write("\n")
        return 0
    try:
        return _coordinator_main(ns)
    except BenchError as exc:
        _log(f"failed: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
