"""A bounded soak: steady mixed load against a maplookup server process, sampling its health.

The server runs in a process of its own, started by this module with ``--server-child``: that
process calls ``maplookup.service.serve`` exactly as ``maplookup serve`` does, and also answers
``state`` lines on stdin with its trio task count and counters.  The trio task count is not
observable from outside the process (no metric exports it), hence this control pipe.  RSS and
open descriptors are read from ``/proc/<pid>`` of the server process.

The load, from this process (trio, loopback):

* ``--clients`` persistent connections, as Postfix processes hold, paced to ``--rate`` lookups/s
  in all: 80 % mailboxes that exist (vmailbox), 10 % aliases (virtual), 5 % unknown users of
  hosted domains, 5 % keys never asked before (cache misses that query PostgreSQL; with
  ``--cache-entries`` below their number the cache keeps evicting);
* short-lived connections, ``--churn`` per second, a few lookups each;
* one malformed request per second (protocol error, connection closed) and one truncated one;
* one committed UPDATE per second (NOTIFY, cache invalidation).

Every answer is checked.  Every ``--interval`` seconds a row is printed: RSS, descriptors, trio
tasks, asyncio tasks of the database thread, open connections, cache entries, lookups and their
p99 in that interval.  At the end a start/end summary, and all figures in
``bench/results/soak-<UTC timestamp>.json``.

Run from the project root::

    .venv/bin/python -m bench.soak                 # 10 minutes, private PostgreSQL
    .venv/bin/python -m bench.soak --minutes 2 --interval 10
    .venv/bin/python -m bench.soak --dsn postgresql://user@127.0.0.1:5432/db
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from bench.lib.common import JsonLines, machine_info, write_json

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DOMAINS = 20
SUFFIX = ".soak.example"
CHILD_START_TIMEOUT_S = 60.0
CONTROL_TIMEOUT_S = 10.0
ASK_TIMEOUT_S = 10.0


def _log(message: str) -> None:
    print(f"[bench.soak] {message}", file=sys.stderr, flush=True)


class SoakError(Exception):
    """The soak could not run as set up; the message says why."""


# --------------------------------------------------------------------------
# the dataset


def _domain(d: int) -> str:
    return f"d{d}{SUFFIX}"


def mailbox_key(i: int) -> str:
    return f"user{i}@{_domain(i % DOMAINS)}"


def mailbox_path(i: int) -> str:
    return f"{_domain(i % DOMAINS)}/user{i}/"


def alias_key(i: int) -> str:
    return f"alias{i}@{_domain(i % DOMAINS)}"


def alias_value(i: int) -> str:
    return mailbox_key(i)


def change_key(i: int) -> str:
    return f"change{i}@{_domain(i % DOMAINS)}"


async def _seed(dsn: str, mailboxes: int) -> str:
    import asyncpg

    from maplookup.db.admin import init_schema

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await init_schema(conn)
        like = f"%{SUFFIX}"
        async with conn.transaction():
            await conn.execute("DELETE FROM maplookup.aliases WHERE domain LIKE $1", like)
            await conn.execute("DELETE FROM maplookup.mailboxes WHERE domain LIKE $1", like)
            await conn.execute("DELETE FROM maplookup.domains WHERE name LIKE $1", like)
            await conn.executemany(
                "INSERT INTO maplookup.domains (name, kind) VALUES ($1, 'mailbox')",
                [(_domain(d),) for d in range(DOMAINS)],
            )
            await conn.executemany(
                "INSERT INTO maplookup.mailboxes (domain, local_part, path) VALUES ($1, $2, $3)",
                [(_domain(i % DOMAINS), f"user{i}", mailbox_path(i)) for i in range(mailboxes)]
                + [(_domain(i % DOMAINS), f"change{i}", "a/") for i in range(100)],
            )
            await conn.executemany(
                "INSERT INTO maplookup.aliases (domain, local_part, targets) VALUES ($1, $2, $3)",
                [(_domain(i % DOMAINS), f"alias{i}", [alias_value(i)]) for i in range(1000)],
            )
        await conn.execute("ANALYZE")
        version: str = await conn.fetchval("SHOW server_version")
        return version
    finally:
        await conn.close()


async def _cleanup(dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        like = f"%{SUFFIX}"
        async with conn.transaction():
            await conn.execute("DELETE FROM maplookup.aliases WHERE domain LIKE $1", like)
            await conn.execute("DELETE FROM maplookup.mailboxes WHERE domain LIKE $1", like)
            await conn.execute("DELETE FROM maplookup.domains WHERE name LIKE $1", like)
    finally:
        await conn.close()


# --------------------------------------------------------------------------
# the server child


def _count_trio_tasks() -> int:
    import trio

    root = trio.lowlevel.current_root_task()
    if root is None:  # only outside trio.run, where nothing calls this
        return 0
    count = 0
    stack = [root]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


async def _asyncio_task_count(running: Any) -> int | None:
    """Tasks in the database thread's asyncio loop (pool, LISTEN); None if not reachable."""
    database = getattr(running.service, "_database", None)
    if database is None:
        return None

    async def count() -> int:
        return len(asyncio.all_tasks())

    result: int = await database.bridge.run(count())
    return result


def _emit(payload: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


async def _child_main(dsn: str, cache_entries: int) -> None:
    import trio

    from maplookup.config_load import load_settings
    from maplookup.logsetup import configure_logging
    from maplookup.serve.service import Running, serve

    settings = load_settings(
        overrides={
            "listen": {"socketmap": ["127.0.0.1:0"]},
            "database": {"dsn": dsn},
            "cache": {"max_entries": cache_entries},
            "log_level": "warning",
        },
        environ={},
    )
    configure_logging(settings.log_level, settings.log_format)
    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(
            partial(serve, settings, dsn, freeze_startup_objects=True)
        )
        with trio.fail_after(CHILD_START_TIMEOUT_S):
            while running.cache is not None and not running.cache.live:  # noqa: ASYNC110
                await trio.sleep(0.01)
        _emit({"port": running.listeners[0].tcp_port(), "pid": os.getpid()})
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        buffer = b""
        while True:
            data = await stdin.receive_some(4096)
            if not data:
                break
            buffer += data
            lines = buffer.split(b"\n")
            buffer = lines.pop()
            if b"stop" in (line.strip() for line in lines):
                break
            for line in lines:
                if line.strip() == b"state":
                    cache = running.cache
                    _emit(
                        {
                            "trio_tasks": _count_trio_tasks(),
                            "asyncio_tasks": await _asyncio_task_count(running),
                            "server": asdict(running.server.counters),
                            "cache_entries": len(cache) if cache is not None else 0,
                            "cache": asdict(cache.counters) if cache is not None else {},
                        }
                    )
        await stdin.aclose()
        running.server.drain()


class ServerChild:
    def __init__(self, dsn: str, cache_entries: int) -> None:
        argv = [sys.executable, "-m", "bench.soak", "--server-child", "--dsn", dsn]
        argv += ["--cache-entries", str(cache_entries)]
        env = dict(os.environ)
        if os.geteuid() == 0:
            env["MAPLOOKUP_ALLOW_ROOT"] = "true"
        self.proc = subprocess.Popen(
            argv,
            cwd=PROJECT_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env=env,
        )
        self._replies = JsonLines(self.proc, SoakError)
        ready = self._replies.read(CHILD_START_TIMEOUT_S)
        self.port = int(ready["port"])
        self.pid = int(ready["pid"])

    def state(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"state\n")
        return self._replies.read(CONTROL_TIMEOUT_S)

    def stop(self) -> int:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"stop\n")
                self.proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        return self.proc.returncode


def _proc_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise SoakError("no VmRSS")


def _proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --------------------------------------------------------------------------
# the load


@dataclass
class Interval:
    lookups: int = 0
    latencies_us: list[int] = field(default_factory=list)
    temp: int = 0
    wrong: int = 0
    short_lived: int = 0
    garbage: int = 0
    changes: int = 0


@dataclass
class Load:
    args: argparse.Namespace
    port: int
    current: Interval = field(default_factory=Interval)
    wrong_examples: list[str] = field(default_factory=list)
    fresh_keys: int = 0
    stop: bool = False

    def take(self) -> Interval:
        done, self.current = self.current, Interval()
        return done

    def next_request(self, rng: random.Random) -> tuple[str, str, str | None]:
        """(map, key, expected value or None for NOTFOUND); '?' accepts any OK value."""
        roll = rng.random()
        if roll < 0.80:
            i = rng.randrange(self.args.mailboxes)
            return "vmailbox", mailbox_key(i), mailbox_path(i)
        if roll < 0.90:
            i = rng.randrange(1000)
            return "virtual", alias_key(i), alias_value(i)
        if roll < 0.95:
            return (
                "vmailbox",
                f"nobody{rng.randrange(1000)}@{_domain(rng.randrange(DOMAINS))}",
                None,
            )
        self.fresh_keys += 1
        return "vmailbox", f"fresh{self.fresh_keys}@{_domain(self.fresh_keys % DOMAINS)}", None


async def _ask(client: Any, map_name: str, key: str) -> Any:
    from maplookup.testing import QueryError

    try:
        return await client.ask(map_name, key, timeout_s=ASK_TIMEOUT_S)
    except QueryError as exc:
        raise SoakError(f"a client connection failed: {exc}") from exc


def _record(load: Load, map_name: str, key: str, expected: str | None, reply: Any, us: int) -> None:
    from maplookup.protocol import Reply, Status

    interval = load.current
    interval.lookups += 1
    interval.latencies_us.append(us)
    if reply.status is Status.TEMP:
        interval.temp += 1
        return
    want = Reply.notfound() if expected is None else Reply.ok(expected)
    if reply.status is not want.status or (expected is not None and reply.value != expected):
        interval.wrong += 1
        if len(load.wrong_examples) < 20:
            load.wrong_examples.append(f"{map_name} {key}: {reply!r}, expected {want!r}")


async def _persistent_client(load: Load, number: int) -> None:
    import trio

    from maplookup.testing import TrioClient

    rng = random.Random(number)
    period = load.args.clients / load.args.rate
    client = await TrioClient.connect(load.port)
    next_at = trio.current_time()
    try:
        while not load.stop:
            map_name, key, expected = load.next_request(rng)
            start = time.perf_counter_ns()
            reply = await _ask(client, map_name, key)
            _record(load, map_name, key, expected, reply, (time.perf_counter_ns() - start) // 1000)
            next_at += period
            await trio.sleep_until(max(next_at, trio.current_time()))  # pacing
    finally:
        await client.aclose()


async def _short_lived_clients(load: Load) -> None:
    import trio

    from maplookup.testing import TrioClient

    rng = random.Random(-1)
    period = 1.0 / load.args.churn
    while not load.stop:
        client = await TrioClient.connect(load.port)
        try:
            for _ in range(3):
                map_name, key, expected = load.next_request(rng)
                start = time.perf_counter_ns()
                reply = await _ask(client, map_name, key)
                us = (time.perf_counter_ns() - start) // 1000
                _record(load, map_name, key, expected, reply, us)
        finally:
            await client.aclose()
        load.current.short_lived += 1
        await trio.sleep(period)  # pacing


async def _garbage(load: Load) -> None:
    """One malformed and one truncated request per second; each must end in a close."""
    import trio

    while not load.stop:
        for payload, half_close in ((b"3:abc;", False), (b"30:vmailbox trunc", True)):
            stream = await trio.open_tcp_stream("127.0.0.1", load.port)
            try:
                await stream.send_all(payload)
                if half_close:
                    await stream.send_eof()
                with trio.fail_after(ASK_TIMEOUT_S):
                    while await stream.receive_some(65536):
                        pass
            except trio.BrokenResourceError:
                pass
            finally:
                await stream.aclose()
            load.current.garbage += 1
        await trio.sleep(1.0)  # pacing


def _changer(dsn: str, load: Load, stop: threading.Event) -> None:
    """One committed UPDATE per second, in a thread with its own asyncio loop."""
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            i = 0
            while not stop.is_set():
                await conn.execute(
                    "UPDATE maplookup.mailboxes SET path = $3"
                    " WHERE domain = $1 AND local_part = $2",
                    _domain(i % DOMAINS),
                    f"change{i % 100}",
                    "a/" if i % 200 >= 100 else "b/",
                )
                load.current.changes += 1
                i += 1
                await asyncio.sleep(1.0)
        finally:
            await conn.close()

    asyncio.run(run())


# --------------------------------------------------------------------------
# sampling and report


def _percentile(ordered: Sequence[int], pct: float) -> int:
    if not ordered:
        return 0
    return ordered[max(1, math.ceil(pct / 100 * len(ordered))) - 1]


@dataclass
class Sample:
    t_s: float
    rss_mib: float
    fds: int
    trio_tasks: int
    asyncio_tasks: int | None
    connections_open: int
    cache_entries: int
    lookups: int
    lookups_per_s: float
    p50_us: int
    p99_us: int
    max_us: int
    temp: int
    wrong: int
    short_lived: int
    garbage: int
    changes: int
    protocol_errors_total: int
    evictions_total: int
    hit_percent: float


HEADER = (
    "| t s | RSS MiB | fds | trio tasks | asyncio tasks | conns | cache entries | lookups "
    "| lookups/s | cache hits % | p50 µs | p99 µs | max µs | TEMP | wrong | short conns "
    "| bad inputs | changes |\n"
    "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
)


def _row(s: Sample) -> str:
    return (
        f"| {s.t_s:.0f} | {s.rss_mib:.1f} | {s.fds} | {s.trio_tasks} | {s.asyncio_tasks} "
        f"| {s.connections_open} | {s.cache_entries:,} | {s.lookups:,} | {s.lookups_per_s:,.0f} "
        f"| {s.hit_percent:.0f} | {s.p50_us:,} | {s.p99_us:,} | {s.max_us:,} | {s.temp} "
        f"| {s.wrong} | {s.short_lived} | {s.garbage} | {s.changes} |"
    )


def _sample(
    child: ServerChild, load: Load, started: float, last: float, previous: dict[str, Any]
) -> tuple[Sample, float, dict[str, Any]]:
    now = time.monotonic()
    interval = load.take()
    state = child.state()
    cache, before = state["cache"], previous.get("cache", {})
    hits = cache.get("hits", 0) + cache.get("negative_hits", 0)
    hits -= before.get("hits", 0) + before.get("negative_hits", 0)
    misses = cache.get("misses", 0) + cache.get("shared_misses", 0)
    misses -= before.get("misses", 0) + before.get("shared_misses", 0)
    ordered = sorted(interval.latencies_us)
    sample = Sample(
        t_s=now - started,
        rss_mib=_proc_rss_bytes(child.pid) / 2**20,
        fds=_proc_fds(child.pid),
        trio_tasks=int(state["trio_tasks"]),
        asyncio_tasks=state["asyncio_tasks"],
        connections_open=int(state["server"]["connections_open"]),
        cache_entries=int(state["cache_entries"]),
        lookups=interval.lookups,
        lookups_per_s=interval.lookups / max(1e-9, now - last),
        p50_us=_percentile(ordered, 50),
        p99_us=_percentile(ordered, 99),
        max_us=ordered[-1] if ordered else 0,
        temp=interval.temp,
        wrong=interval.wrong,
        short_lived=interval.short_lived,
        garbage=interval.garbage,
        changes=interval.changes,
        protocol_errors_total=int(state["server"]["protocol_errors"]),
        evictions_total=int(state["cache"].get("evictions", 0)),
        hit_percent=100.0 * hits / max(1, hits + misses),
    )
    return sample, now, state


def _summary(samples: list[Sample]) -> dict[str, Any]:
    first, last = samples[0], samples[-1]
    # The first sample includes warm-up (the cache filling); growth is judged from the second
    # half of the run, when the cache has reached its bound.
    half = samples[len(samples) // 2]
    return {
        "rss_mib_start": first.rss_mib,
        "rss_mib_end": last.rss_mib,
        "rss_mib_max": max(s.rss_mib for s in samples),
        "rss_mib_second_half_growth": last.rss_mib - half.rss_mib,
        "fds_start": first.fds,
        "fds_end": last.fds,
        "fds_max": max(s.fds for s in samples),
        "trio_tasks_start": first.trio_tasks,
        "trio_tasks_end": last.trio_tasks,
        "trio_tasks_max": max(s.trio_tasks for s in samples),
        "asyncio_tasks_start": first.asyncio_tasks,
        "asyncio_tasks_end": last.asyncio_tasks,
        "lookups": sum(s.lookups for s in samples),
        "temp": sum(s.temp for s in samples),
        "wrong": sum(s.wrong for s in samples),
        "short_lived_connections": sum(s.short_lived for s in samples),
        "bad_inputs": sum(s.garbage for s in samples),
        "changes": sum(s.changes for s in samples),
        "protocol_errors_counted_by_server": last.protocol_errors_total,
        "cache_evictions": last.evictions_total,
        "p99_us_max_interval": max(s.p99_us for s in samples),
    }


def _summary_table(summary: dict[str, Any]) -> str:
    rows = [
        ("RSS MiB", "rss_mib", ".1f"),
        ("open descriptors", "fds", "d"),
        ("trio tasks", "trio_tasks", "d"),
    ]
    lines = ["| | start | end | max |", "|---|--:|--:|--:|"]
    for label, key, fmt in rows:
        lines.append(
            f"| {label} | {summary[key + '_start']:{fmt}} | {summary[key + '_end']:{fmt}} "
            f"| {summary[key + '_max']:{fmt}} |"
        )
    return "\n".join(lines)


async def _drive(load: Load, child: ServerChild, minutes: float, interval_s: float) -> list[Sample]:
    import trio

    samples: list[Sample] = []
    started = last = time.monotonic()
    state: dict[str, Any] = await trio.to_thread.run_sync(child.state)
    end = started + minutes * 60
    print(HEADER, flush=True)
    async with trio.open_nursery() as nursery:
        for number in range(load.args.clients):
            nursery.start_soon(_persistent_client, load, number)
        nursery.start_soon(_short_lived_clients, load)
        nursery.start_soon(_garbage, load)
        while time.monotonic() < end:
            await trio.sleep(min(interval_s, max(0.0, end - time.monotonic())))
            sample, last, state = await trio.to_thread.run_sync(
                _sample, child, load, started, last, state
            )
            samples.append(sample)
            print(_row(sample), flush=True)
        load.stop = True
    return samples


def _coordinator(ns: argparse.Namespace) -> int:
    import trio

    from maplookup.embedded import EmbeddedPostgres

    started_at = datetime.now(UTC)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    pg: EmbeddedPostgres | None = None
    state_dir: Path | None = None
    if ns.dsn:
        dsn = ns.dsn
    else:
        state_dir = Path(tempfile.mkdtemp(prefix="maplookup-soak-", dir="/tmp"))
        state_dir.chmod(0o755)  # the cluster runs as postgres when we are root
        pg = EmbeddedPostgres(state_dir=state_dir, fast_unsafe=True)
        pg.start()
        dsn = pg.tcp_dsn
        _log(f"embedded PostgreSQL on {dsn}")
    child: ServerChild | None = None
    stop_changes = threading.Event()
    changer: threading.Thread | None = None
    try:
        pg_version = asyncio.run(_seed(dsn, ns.mailboxes))
        _log(f"seeded {ns.mailboxes:,} mailboxes, 1,000 aliases in {DOMAINS} domains")
        child = ServerChild(dsn, ns.cache_entries)
        _log(f"server pid {child.pid} on 127.0.0.1:{child.port}; soak for {ns.minutes} min")
        load = Load(ns, child.port)
        changer = threading.Thread(target=_changer, args=(dsn, load, stop_changes), daemon=True)
        changer.start()
        samples = trio.run(_drive, load, child, ns.minutes, ns.interval)
        stop_changes.set()
        changer.join(timeout=10)
        final_state = child.state()
        exit_code = child.stop()
        if ns.dsn:
            asyncio.run(_cleanup(dsn))
    finally:
        stop_changes.set()
        if child is not None:
            child.stop()
        if pg is not None:
            pg.stop()
        if state_dir is not None:
            shutil.rmtree(state_dir, ignore_errors=True)
    if not samples:
        raise SoakError("no samples: the run was shorter than one interval")
    summary = _summary(samples)
    summary["server_exit_code"] = exit_code
    print()
    print(_summary_table(summary))
    print()
    print(
        f"{summary['lookups']:,} lookups, {summary['wrong']} wrong answers, {summary['temp']} "
        f"TEMP, {summary['short_lived_connections']:,} short-lived connections, "
        f"{summary['bad_inputs']:,} malformed/truncated inputs (server counted "
        f"{summary['protocol_errors_counted_by_server']:,} protocol errors), "
        f"{summary['changes']:,} changes, {summary['cache_evictions']:,} cache evictions; "
        f"RSS {summary['rss_mib_start']:.1f} -> {summary['rss_mib_end']:.1f} MiB "
        f"(second half {summary['rss_mib_second_half_growth']:+.1f} MiB), fds "
        f"{summary['fds_start']} -> {summary['fds_end']}, trio tasks "
        f"{summary['trio_tasks_start']} -> {summary['trio_tasks_end']}; server exit code "
        f"{exit_code}"
    )
    for example in load.wrong_examples:
        print(f"wrong: {example}")
    path = write_json(
        "soak",
        stamp,
        {
            "benchmark": "soak",
            "started_at": started_at.isoformat(),
            "settings": {
                "minutes": ns.minutes,
                "interval_s": ns.interval,
                "clients": ns.clients,
                "rate_per_s": ns.rate,
                "short_lived_per_s": ns.churn,
                "mailboxes": ns.mailboxes,
                "cache_entries": ns.cache_entries,
                "dsn": "embedded" if pg is not None else "external",
            },
            "machine": machine_info(
                {"postgresql": pg_version}, ("trio", "asyncpg", "uvloop", "maplookup")
            ),
            "samples": [asdict(s) for s in samples],
            "summary": summary,
            "final_server_state": final_state,
            "wrong_examples": load.wrong_examples,
        },
    )
    _log(f"wrote {path.relative_to(PROJECT_ROOT)}")
    return 0 if summary["wrong"] == 0 and exit_code == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="duration (default 10)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--clients", type=int, default=8, help="persistent connections")
    parser.add_argument("--rate", type=float, default=1000.0, help="lookups/s over them all")
    parser.add_argument("--churn", type=float, default=10.0, help="short-lived connections/s")
    parser.add_argument("--mailboxes", type=int, default=10_000)
    parser.add_argument(
        "--cache-entries", type=int, default=15_000, help="the server's cache.max_entries"
    )
    parser.add_argument("--dsn", help="PostgreSQL to use (default: a private embedded one)")
    parser.add_argument("--server-child", action="store_true", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.server_child:
        import trio

        trio.run(_child_main, ns.dsn, ns.cache_entries)
        return 0
    if ns.minutes <= 0 or ns.interval <= 0 or ns.clients <= 0 or ns.rate <= 0 or ns.churn <= 0:
        parser.error("durations, counts and rates must be positive")
    try:
        return _coordinator(ns)
    except SoakError as exc:
        _log(f"error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
