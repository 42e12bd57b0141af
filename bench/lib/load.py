"""Load generator for socketmap and tcp_table servers: many persistent connections, as Postfix.

Each connection sends one request and waits for its reply before sending the next (Postfix
never pipelines, DESIGN.md §2.3).  Two modes:

closed loop (default)
    every connection sends its next request as soon as the reply arrives: the throughput the
    server can sustain with N clients, and the latency at that throughput.
open loop (``--rate R``)
    requests are due on a fixed schedule, R per second in all, spread evenly over the
    connections (each connection is due every N/R seconds, the connections' phases evenly
    offset).  When a reply comes back after the next request was due, that request goes out at
    once and its latency counts from when it was *due*, not from when it could be sent, so a
    server that stalls is charged for every request it delayed (no coordinated omission).  A
    request that was not held up is sent when its timer fires.  libuv's timers (uvloop's
    ``call_later``) have a granularity of one millisecond, which would send requests in 1 ms
    bursts, so each worker paces with a Linux ``timerfd`` (nanosecond deadlines, through
    ctypes) watched by the event loop.  A timer-paced request's latency counts from when it was
    sent; how late the loader itself sent it is reported separately ("send lag"), so a loader
    that falls behind shows.

The load runs in P worker processes (``--processes``), each an asyncio event loop on uvloop
driving its share of the connections with plain ``asyncio.Protocol`` callbacks (no coroutine
per request), so the load generator costs as little CPU per request as Python allows.  The
workers connect, report ready, and start together on a common CLOCK_MONOTONIC time given by
the coordinator; they measure only replies that arrive inside the measurement window (after
the warm-up), record every latency in a log-linear histogram (``bench/lib/hist.py``), and send the
histograms back to be merged.  Every reply's status is checked against the one the key list
expects.

Keys: a file, one request a line, either ``EXPECT<TAB>MAP<TAB>KEY`` (EXPECT: ``o`` found,
``n`` not found, ``*`` anything) or just ``KEY`` (map from ``--map``, any answer accepted).
Connection i starts at key ``i * len / N`` and walks the list cyclically.

Run from the project root::

    .venv/bin/python -m bench.lib.load --port 9000 --keys keys.txt --connections 64 --duration 10
    .venv/bin/python -m bench.lib.load --port 9000 --keys keys.txt --connections 64 --rate 5000
    .venv/bin/python -m bench.lib.load --port 9011 --protocol tcptable --keys keys.txt

A Markdown table goes to stdout, progress to stderr, the figures to
``bench/results/load-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import heapq
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.lib.common import (
    PROJECT_ROOT,
    BenchError,
    Children,
    Logger,
    install_signal_handlers,
    machine_info,
    utc_stamp,
    write_json,
)
from bench.lib.hist import Histogram

log = Logger("load")

PROTOCOLS = ("socketmap", "tcptable")
CONNECT_TIMEOUT_S = 20.0
READY_TIMEOUT_S = 60.0
# After the window closes, in-flight requests get this long to be answered before the
# connection counts them as unfinished.
DRAIN_GRACE_S = 3.0
MAX_CONNECTIONS = 4096
MAX_PROCESSES = 32
MAX_DURATION_S = 600.0
MAX_MISMATCH_SAMPLES = 5

EXPECT_OK, EXPECT_NOTFOUND, EXPECT_ANY = 1, 0, 2
_EXPECT_CODES = {"o": EXPECT_OK, "n": EXPECT_NOTFOUND, "*": EXPECT_ANY}


@dataclass(frozen=True, slots=True)
class LoadSpec:
    port: int
    keys: str  # path of the key file
    connections: int = 64
    processes: int = 1
    duration_s: float = 10.0
    warmup_s: float = 2.0
    rate: float | None = None  # total requests/s; None = closed loop
    protocol: str = "socketmap"
    host: str = "127.0.0.1"
    default_map: str = "vmailbox"
    check: bool = True  # compare statuses with the key file's expectations
    label: str = ""


@dataclass(slots=True)
class LoadResult:
    spec: dict[str, Any]
    requests: int  # replies received inside the window
    throughput_rps: float
    offered_rps: float | None
    latency: dict[str, float]
    send_lag: dict[str, float] | None
    ok: int
    notfound: int
    other: int
    mismatches: int
    mismatch_samples: list[str]
    errors: int
    unfinished: int
    connections_open: int
    loader_cpu_s: float
    loader_cpu_per_request_us: float
    wall_s: float
    histogram: dict[str, Any] = field(repr=False)
    monitor: dict[str, Any] = field(default_factory=dict)

    def p(self, name: str) -> float:
        return float(self.latency[name])


# --------------------------------------------------------------------------
# keys


def read_keys(
    path: str, protocol: str, default_map: str
) -> tuple[list[bytes], list[int], list[str]]:
    """Encoded requests, expected statuses, and the raw keys (for mismatch reports)."""
    from maplookup.protocol import socketmap, tcptable

    requests: list[bytes] = []
    expects: list[int] = []
    keys: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) == 3:
                expect, map_name, key = parts
                code = _EXPECT_CODES[expect]
            else:
                map_name, key, code = default_map, line, EXPECT_ANY
            raw = key.encode()
            if protocol == "socketmap":
                requests.append(socketmap.encode_request(map_name.encode(), raw))
            else:
                requests.append(b"get " + tcptable.hex_quote(raw) + b"\n")
            expects.append(code)
            keys.append(f"{map_name} {key}")
    if not requests:
        raise BenchError(f"no keys in {path}")
    return requests, expects, keys


# --------------------------------------------------------------------------
# the worker: one process, an event loop, its share of the connections


class _Run:
    """What the connections of one worker share."""

    def __init__(self, spec: LoadSpec, first_index: int, count: int) -> None:
        self.spec = spec
        self.requests, self.expects, self.keys = read_keys(
            spec.keys, spec.protocol, spec.default_map
        )
        self.first_index = first_index
        self.count = count
        self.hist = Histogram()
        self.lag = Histogram()
        self.window_start = 0
        self.window_end = 0
        self.t0 = 0
        self.done = 0
        self.ok = 0
        self.notfound = 0
        self.other = 0
        self.mismatches = 0
        self.samples: list[str] = []
        self.errors = 0
        self.active = 0
        self.finished: asyncio.Future[None] | None = None
        self.pacer: _Pacer | None = None
        self.interval_ns = 0
        if spec.rate:
            self.interval_ns = int(spec.connections / spec.rate * 1e9)

    def connection_done(self) -> None:
        self.active -= 1
        if self.active <= 0 and self.finished is not None and not self.finished.done():
            self.finished.set_result(None)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_CLOCK_MONOTONIC = 1  # time.monotonic_ns() reads the same clock
_TFD_NONBLOCK = 0o4000
_TFD_CLOEXEC = 0o2000000
_TFD_TIMER_ABSTIME = 1
# Requests due within this much of the timer firing go out in the same round.
_PACER_SLACK_NS = 20_000


class _Pacer:
    """Sends timer-paced requests on time: one timerfd, armed at the earliest due time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self._heap: list[tuple[int, int, _Connection]] = []
        self._seq = 0
        self._armed = 0
        self._loop = loop
        loop.add_reader(self.fd, self._on_timer)

    def _arm(self, due: int) -> None:
        spec = _Itimerspec()
        spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(max(due, 1), 1_000_000_000)
        if self._libc.timerfd_settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None):
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")
        self._armed = due

    def add(self, due: int, conn: _Connection) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, conn))
        if not self._armed or due < self._armed:
            self._arm(due)

    def _on_timer(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)
        self._armed = 0
        heap = self._heap
        now = time.monotonic_ns()
        while heap and heap[0][0] <= now + _PACER_SLACK_NS:
            due, _, conn = heapq.heappop(heap)
            conn.fire(due, now)
        if heap:
            self._arm(heap[0][0])

    def close(self) -> None:
        self._loop.remove_reader(self.fd)
        os.close(self.fd)


class _Connection(asyncio.Protocol):
    """One persistent client connection; everything happens in callbacks."""

    def __init__(self, run: _Run, global_index: int, loop: asyncio.AbstractEventLoop) -> None:
        self.run = run
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        n = len(run.requests)
        self.next_key = (global_index * n // max(1, run.spec.connections)) % n
        self.current = 0
        self.sent_at = 0
        self.waiting = False
        self.stopped = False
        self.k = 0
        self.phase = 0
        if run.interval_ns:
            self.phase = global_index * run.interval_ns // run.spec.connections
        self.socketmap = run.spec.protocol == "socketmap"
        self.closed: asyncio.Future[None] = loop.create_future()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stopped:
            self.run.errors += 1
            self._stop()
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data if self.buffer else data
        if self.socketmap:
            colon = buf.find(b":")
            if colon < 0 or len(buf) < colon + int(buf[:colon]) + 2:
                self.buffer = buf
                return
            head = buf[colon + 1 : colon + 3]
            status = 1 if head == b"OK" else 0 if head == b"NO" else 2
        else:
            if buf[-1:] != b"\n":
                self.buffer = buf
                return
            head = buf[:3]
            status = 1 if head == b"200" else 0 if head == b"500" else 2
        now = time.monotonic_ns()
        self.buffer = b""
        self.waiting = False
        run = self.run
        if run.window_start <= now < run.window_end:
            run.hist.record(now - self.sent_at)
            run.done += 1
            if status == 1:
                run.ok += 1
            elif status == 0:
                run.notfound += 1
            else:
                run.other += 1
            expect = run.expects[self.current]
            if run.spec.check and expect != EXPECT_ANY and expect != status:
                run.mismatches += 1
                if len(run.samples) < MAX_MISMATCH_SAMPLES:
                    run.samples.append(f"{run.keys[self.current]!r} -> {buf[:120]!r}")
        if now >= run.window_end:
            self._stop()
            return
        if run.interval_ns:
            self._schedule(now)
        else:
            self._send(now, now)

    # -- sending

    def _send(self, now: int, start: int) -> None:
        i = self.next_key
        self.current = i
        self.next_key = i + 1 if i + 1 < len(self.run.requests) else 0
        self.sent_at = start
        self.waiting = True
        assert self.transport is not None
        self.transport.write(self.run.requests[i])

    def begin(self) -> None:
        now = time.monotonic_ns()
        if self.run.interval_ns:
            self.k = -1
            self._schedule(now)
        else:
            self._send(now, now)

    def _schedule(self, now: int) -> None:
        run = self.run
        self.k += 1
        due = run.t0 + self.phase + self.k * run.interval_ns
        if due >= run.window_end:
            self._stop()
        elif due <= now:
            # Held up by the previous reply: send now, charge the wait to the server.
            self._send(now, due)
        else:
            assert run.pacer is not None
            run.pacer.add(due, self)

    def fire(self, due: int, now: int) -> None:
        if self.stopped:
            return
        run = self.run
        if run.window_start <= now < run.window_end:
            run.lag.record(now - due)
        self._send(now, now)

    def _stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.run.connection_done()


def _returning(conn: _Connection) -> Callable[[], _Connection]:
    """``create_connection``'s protocol factory for a connection object made beforehand."""
    return lambda: conn


async def _worker_async(spec: LoadSpec, first_index: int, count: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    run = _Run(spec, first_index, count)
    conns: list[_Connection] = []
    for i in range(first_index, first_index + count):
        conn = _Connection(run, i, loop)
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await loop.create_connection(_returning(conn), spec.host, spec.port)
        conns.append(conn)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    line = sys.stdin.readline().split()  # blocks the loop: nothing is in flight yet
    if len(line) != 2 or line[0] != "go":
        raise BenchError(f"expected 'go T0', got {line!r}")
    run.t0 = int(line[1])
    run.window_start = run.t0 + int(spec.warmup_s * 1e9)
    run.window_end = run.window_start + int(spec.duration_s * 1e9)
    run.active = len(conns)
    run.finished = loop.create_future()
    if run.interval_ns:
        run.pacer = _Pacer(loop)
    delay = (run.t0 - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)
    for conn in conns:
        conn.begin()
    usage_before: resource.struct_rusage | None = None
    # Sample this process's CPU time at the window's edges.
    await asyncio.sleep(max(0.0, (run.window_start - time.monotonic_ns()) / 1e9))
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.sleep(max(0.0, (run.window_end - time.monotonic_ns()) / 1e9))
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_GRACE_S):
            await run.finished
    unfinished = sum(1 for c in conns if c.waiting)
    open_connections = sum(1 for c in conns if not c.closed.done())
    for conn in conns:
        if conn.transport is not None:
            conn.stopped = True
            conn.transport.close()
    if run.pacer is not None:
        run.pacer.close()
    cpu = (usage_after.ru_utime - usage_before.ru_utime) + (
        usage_after.ru_stime - usage_before.ru_stime
    )
    return {
        "hist": run.hist.to_json(),
        "lag": run.lag.to_json(),
        "done": run.done,
        "ok": run.ok,
        "notfound": run.notfound,
        "other": run.other,
        "mismatches": run.mismatches,
        "samples": run.samples,
        "errors": run.errors,
        "unfinished": unfinished,
        "open": open_connections,
        "cpu_s": cpu,
    }


def _worker_main() -> int:
    import uvloop

    payload = json.loads(sys.stdin.readline())
    spec = LoadSpec(**payload["spec"])
    budget = spec.warmup_s + spec.duration_s + DRAIN_GRACE_S + READY_TIMEOUT_S + 30
    signal.alarm(int(budget))  # a worker never outlives its run, whatever the coordinator does
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(_worker_async(spec, payload["first"], payload["count"]))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


# --------------------------------------------------------------------------
# the coordinator


class Hooks:
    """Called by run_load at the window's edges (the suite samples CPU and sockets there)."""

    def ready(self) -> None:
        """Every connection is open; nothing has been sent yet."""

    def window_start(self) -> None:
        pass

    def window_end(self) -> None:
        pass

    def report(self) -> dict[str, Any]:
        return {}


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class _Lines:
    """Line reader over a child's stdout with a timeout."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buffer = b""

    def readline(self, timeout_s: float) -> bytes:
        end = time.monotonic() + timeout_s
        while b"\n" not in self.buffer:
            left = end - time.monotonic()
            if left <= 0:
                raise BenchError("a load worker did not answer in time")
            readable, _, _ = select.select([self.fd], [], [], left)
            if readable:
                chunk = os.read(self.fd, 1 << 20)
                if not chunk:
                    raise BenchError(f"a load worker exited ({self.proc.wait()}); see stderr")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line


def _sleep_until(t_ns: int) -> None:
    delay = (t_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


def run_load(
    spec: LoadSpec,
    hooks: Hooks | None = None,
    children: Children | None = None,
    progress: Callable[[str], None] | None = None,
) -> LoadResult:
    """Run one load: start the workers, go, merge their results."""
    hooks = hooks or Hooks()
    if not 1 <= spec.connections <= MAX_CONNECTIONS:
        raise BenchError(f"connections must be 1..{MAX_CONNECTIONS}")
    processes = max(1, min(spec.processes, spec.connections, MAX_PROCESSES))
    own = children is None
    kids = children or Children()
    procs: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    try:
        first = 0
        for count in _split(spec.connections, processes):
            proc = kids.start(
                [sys.executable, "-m", "bench.lib.load", "--worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            assert proc.stdin is not None
            proc.stdin.write(
                json.dumps({"spec": asdict(spec), "first": first, "count": count}).encode() + b"\n"
            )
            proc.stdin.flush()
            procs.append(proc)
            first += count
        readers = [_Lines(p) for p in procs]
        for reader in readers:
            if reader.readline(READY_TIMEOUT_S).strip() != b"ready":
                raise BenchError("a load worker did not get ready")
        hooks.ready()
        t0 = time.monotonic_ns() + 50_000_000
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"go {t0}\n".encode())
            proc.stdin.flush()
        window_start = t0 + int(spec.warmup_s * 1e9)
        window_end = window_start + int(spec.duration_s * 1e9)
        _sleep_until(window_start)
        hooks.window_start()
        step = max(2.0, spec.duration_s / 5)
        while True:
            left = (window_end - time.monotonic_ns()) / 1e9
            if left <= 0:
                break
            time.sleep(min(step, left))
            if progress is not None and time.monotonic_ns() < window_end - 500_000_000:
                done = spec.duration_s - (window_end - time.monotonic_ns()) / 1e9
                progress(f"{spec.label or 'load'}: {done:.0f}/{spec.duration_s:.0f} s")
        hooks.window_end()
        outputs = [json.loads(r.readline(DRAIN_GRACE_S + 30)) for r in readers]
        for proc in procs:
            proc.wait(timeout=10)
    finally:
        if own:
            kids.stop_all()
        else:
            for proc in procs:
                kids.stop(proc, timeout_s=5)
    wall = time.monotonic() - started
    hist, lag = Histogram(), Histogram()
    counted = ("done", "ok", "notfound", "other", "mismatches", "errors", "unfinished")
    totals: dict[str, Any] = dict.fromkeys(counted, 0)
    samples: list[str] = []
    cpu = 0.0
    open_conns = 0
    for out in outputs:
        hist.merge(Histogram.from_json(out["hist"]))
        lag.merge(Histogram.from_json(out["lag"]))
        for k in totals:
            totals[k] += out[k]
        samples.extend(out["samples"])
        cpu += out["cpu_s"]
        open_conns += out["open"]
    done = totals["done"]
    return LoadResult(
        spec=asdict(spec),
        requests=done,
        throughput_rps=done / spec.duration_s,
        offered_rps=spec.rate,
        latency=hist.summary_us(),
        send_lag=lag.summary_us() if spec.rate else None,
        ok=totals["ok"],
        notfound=totals["notfound"],
        other=totals["other"],
        mismatches=totals["mismatches"],
        mismatch_samples=samples[:MAX_MISMATCH_SAMPLES],
        errors=totals["errors"],
        unfinished=totals["unfinished"],
        connections_open=open_conns,
        loader_cpu_s=cpu,
        loader_cpu_per_request_us=cpu / done * 1e6 if done else 0.0,
        wall_s=wall,
        histogram=hist.to_json(),
        monitor=hooks.report(),
    )


# --------------------------------------------------------------------------
# command line


def result_row(r: LoadResult, name: str | None = None) -> str:
    lat = r.latency
    offered = f"{r.offered_rps:,.0f}" if r.offered_rps else "closed"
    lag = f"{r.send_lag['p50_us']:,.0f} / {r.send_lag['p99_us']:,.0f}" if r.send_lag else ""
    return (
        f"| {name or r.spec['label'] or '-'} | {r.spec['connections']} | {offered} "
        f"| {r.throughput_rps:,.0f} | {lat['p50_us']:,.0f} | {lat['p90_us']:,.0f} "
        f"| {lat['p99_us']:,.0f} | {lat['p99_9_us']:,.0f} | {lat['max_us']:,.0f} "
        f"| {r.ok:,}/{r.notfound:,}/{r.other:,} | {r.mismatches + r.errors + r.unfinished} "
        f"| {r.loader_cpu_s / r.spec['duration_s'] * 100:.0f}% | {lag} |"
    )


TABLE_HEAD = (
    "| run | conns | offered/s | replies/s | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs "
    "| OK/NOTFOUND/other | errors | loader CPU | send lag p50 / p99 µs |\n"
    "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|"
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.lib.load",
        description="Drive a socketmap or tcp_table server with N persistent connections "
        "(see bench/README.md).",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help="server address (loopback only)")
    parser.add_argument("--port", type=int, help="server port")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="socketmap")
    parser.add_argument("--keys", help="key file (EXPECT<TAB>MAP<TAB>KEY or KEY per line)")
    parser.add_argument("--map", default="vmailbox", help="map for plain key lines")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--processes", type=int, default=1, help="load worker processes")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--rate", type=float, help="open loop: requests/s in all")
    parser.add_argument("--no-check", action="store_true", help="accept any reply status")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.worker:
        return _worker_main()
    install_signal_handlers()
    if ns.port is None or ns.keys is None:
        raise SystemExit("--port and --keys are required")
    if ns.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the load generator only targets loopback addresses")
    if not 0 < ns.duration <= MAX_DURATION_S or not 0 <= ns.warmup <= MAX_DURATION_S:
        raise SystemExit(f"--duration and --warmup must be within {MAX_DURATION_S} s")
    spec = LoadSpec(
        port=ns.port,
        keys=str(Path(ns.keys).resolve()),
        connections=ns.connections,
        processes=ns.processes,
        duration_s=ns.duration,
        warmup_s=ns.warmup,
        rate=ns.rate,
        protocol=ns.protocol,
        host=ns.host,
        default_map=ns.map,
        check=not ns.no_check,
        label=f"{ns.protocol}:{ns.port}",
    )
    started, stamp = utc_stamp()
    log(
        f"{spec.connections} connections in {spec.processes} process(es), "
        f"{'rate ' + str(spec.rate) if spec.rate else 'closed loop'}"
    )
    try:
        result = run_load(spec, progress=log)
    except BenchError as exc:
        log(f"failed: {exc}")
        return 1
    table = TABLE_HEAD + "\n" + result_row(result)
    path = write_json(
        "load",
        stamp,
        {
            "benchmark": "load",
            "started_utc": started.isoformat(),
            "command": " ".join([".venv/bin/python -m bench.lib.load", *sys.argv[1:]]),
            "machine": machine_info(),
            "result": asdict(result),
            "table_markdown": table,
        },
    )
    print(table)
    log(f"wrote {path.relative_to(PROJECT_ROOT)}")
    return 0 if result.mismatches == 0 and result.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
