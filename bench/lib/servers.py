"""The servers under test, each in its own process group: maplookup and the baselines.

``start_maplookup`` runs ``python -m maplookup serve`` exactly as an administrator would (with
``--workers N`` when this maplookup has that option), with ``--metrics`` on so that the suite
can read worker 0's cache counters.  ``warm`` fills every worker's cache with a key list: it
finds out which worker holds each of its connections (the socket's inode in
``/proc/PID/fd`` against ``/proc/net/tcp``), keeps a few connections on every worker, and
asks each worker every key once.  ``Monitor`` samples, around a load's measurement window,
the CPU time of the server's processes and of PostgreSQL's, connections per worker, the cache
counters and the server's RSS.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.lib.common import (
    BenchError,
    Children,
    connections_by_process,
    cpu_seconds,
    descendants,
    free_port,
    machine_busy_seconds,
    rss_kib,
    wait_for_port,
)
from bench.lib.load import Hooks

START_TIMEOUT_S = 60.0
_workers_supported: bool | None = None


def maplookup_supports_workers() -> bool:
    """Whether this maplookup's ``serve`` has ``--workers`` (asked once, from --help)."""
    global _workers_supported
    if _workers_supported is None:
        out = subprocess.run(
            [sys.executable, "-m", "maplookup", "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        _workers_supported = "--workers" in out.stdout
    return _workers_supported


@dataclass
class ServerHandle:
    name: str
    kind: str  # maplookup, trio-bare, asyncio-bare, asyncpg
    proc: subprocess.Popen[Any]
    port: int
    tcp_port: int | None = None
    metrics_port: int | None = None
    workers: int = 1
    cache: bool = False
    argv: list[str] = field(default_factory=list)

    def pids(self) -> list[int]:
        return descendants(self.proc.pid)

    def worker_pids(self) -> list[int]:
        """The processes that accept connections (the supervisor's children, with workers)."""
        pids = self.pids()
        if self.kind == "maplookup" and self.workers > 1:
            return [p for p in pids if p != self.proc.pid]
        return [self.proc.pid]

    def metrics(self) -> dict[str, float]:
        """Worker 0's Prometheus metrics, label sets summed per name."""
        if self.metrics_port is None:
            return {}
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_part, _, value = line.rpartition(" ")
            name = name_part.split("{", 1)[0]
            try:
                out[name] = out.get(name, 0.0) + float(value)
            except ValueError:
                continue
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "workers": self.workers,
            "cache": self.cache,
            "argv": self.argv,
        }


def start_maplookup(
    children: Children,
    name: str,
    dsn: str,
    *,
    workers: int = 1,
    cache: bool = True,
    tcp_table: bool = False,
    max_entries: int | None = None,
    ttl_s: float | None = None,
    settings_env: dict[str, str] | None = None,
    unix_socket: Path | None = None,
) -> ServerHandle:
    """Start ``maplookup serve``; ``settings_env`` adds MAPLOOKUP_* settings (the caller's own
    MAPLOOKUP_* variables are not passed on); ``unix_socket`` adds a socketmap listener on
    that path."""
    port = free_port()
    metrics_port = free_port()
    argv = [
        sys.executable, "-m", "maplookup", "serve",
        "--dsn", dsn,
        "--socketmap", f"127.0.0.1:{port}",
        "--metrics", f"127.0.0.1:{metrics_port}",
        "--log-level", "warning",
    ]  # fmt: skip
    tcp_port = None
    if tcp_table:
        tcp_port = free_port()
        argv += ["--tcp-table", f"vmailbox=127.0.0.1:{tcp_port}"]
    if not cache:
        argv.append("--no-cache")
    if unix_socket is not None:
        argv += ["--socketmap-unix", str(unix_socket)]
    if workers > 1:
        if not maplookup_supports_workers():
            raise BenchError("this maplookup has no --workers option")
        argv += ["--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAPLOOKUP_")}
    if max_entries is not None:
        env["MAPLOOKUP_CACHE__MAX_ENTRIES"] = str(max_entries)
    if ttl_s is not None:
        # Both TTLs are safety nets behind NOTIFY; a run longer than them would turn
        # "cached hits" into misses half-way.
        env["MAPLOOKUP_CACHE__POSITIVE_TTL_S"] = str(ttl_s)
        env["MAPLOOKUP_CACHE__NEGATIVE_TTL_S"] = str(ttl_s)
    env.update(settings_env or {})
    if os.geteuid() == 0:
        # The benchmark runs as root (it starts PostgreSQL as postgres); the server may too.
        env["MAPLOOKUP_ALLOW_ROOT"] = "true"
    proc = children.start(argv, env=env, stdin=subprocess.DEVNULL)
    handle = ServerHandle(
        name, "maplookup", proc, port, tcp_port, metrics_port, workers, cache, argv
    )
    wait_ready(handle)
    return handle


def wait_ready(handle: ServerHandle) -> None:
    """Listening, answering from the database, and (with the cache) LISTEN in place."""
    from maplookup.client import query_socketmap
    from maplookup.config import HostPort
    from maplookup.protocol import Status

    end = time.monotonic() + START_TIMEOUT_S
    wait_for_port(handle.port, START_TIMEOUT_S, handle.proc)
    while True:
        if handle.proc.poll() is not None:
            raise BenchError(f"{handle.name} exited with {handle.proc.returncode}")
        try:
            reply = query_socketmap(
                "domains", b"dom0.bench.example", server=HostPort.parse(f"127.0.0.1:{handle.port}")
            )
            live = not handle.cache or handle.metrics().get("maplookup_cache_live", 0) >= 1
            if reply.status is Status.OK and live:
                break
        except Exception:
            pass
        if time.monotonic() > end:
            raise BenchError(f"{handle.name} did not get ready in {START_TIMEOUT_S} s")
        time.sleep(0.1)
    if handle.workers > 1:
        while len(handle.worker_pids()) < handle.workers:
            if time.monotonic() > end:
                raise BenchError(f"{handle.name}: workers did not all start")
            time.sleep(0.1)
        # Worker 0 reports live above; the others opened LISTEN at the same moment.
        time.sleep(1.0)


def start_responder(
    children: Children,
    kind: str,
    *,
    dsn: str | None = None,
    tcp_table: bool = False,
    extra_args: Sequence[str] = (),
) -> ServerHandle:
    port = free_port()
    argv = [sys.executable, "-m", "bench.lib.responders", kind, "--port", str(port)]
    tcp_port = None
    if tcp_table:
        tcp_port = free_port()
        argv += ["--tcp-port", str(tcp_port)]
    if dsn:
        argv += ["--dsn", dsn]
    argv += list(extra_args)
    proc = children.start(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"ready":
        raise BenchError(f"responder {kind} did not start (exit {proc.poll()})")
    return ServerHandle(kind, kind, proc, port, tcp_port, argv=argv)


# --------------------------------------------------------------------------
# warming the caches of every worker


async def _open_per_worker(
    handle: ServerHandle, per_worker: int
) -> dict[int, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    workers = handle.worker_pids()
    groups: dict[int, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {
        pid: [] for pid in workers
    }
    spare = []
    attempts = 0
    while any(len(g) < per_worker for g in groups.values()):
        attempts += 1
        if attempts > 50 * per_worker * len(workers):
            raise BenchError(f"could not reach every worker of {handle.name}")
        reader, writer = await asyncio.open_connection("127.0.0.1", handle.port)
        local_port = writer.get_extra_info("sockname")[1]
        owner = None
        for _ in range(100):  # the worker accepts asynchronously
            for pid, ports in connections_by_process(workers, handle.port).items():
                if local_port in ports:
                    owner = pid
            if owner is not None:
                break
            await asyncio.sleep(0.01)
        if owner is not None and len(groups[owner]) < per_worker:
            groups[owner].append((reader, writer))
        else:
            spare.append(writer)
    for writer in spare:
        writer.close()
    return groups


async def _ask_all(
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    requests: Sequence[bytes],
    expects: Sequence[int],
) -> int:
    reader, writer = conn
    wrong = 0
    for request, expect in zip(requests, expects, strict=True):
        writer.write(request)
        length = int((await reader.readuntil(b":"))[:-1])
        payload = (await reader.readexactly(length + 1))[:-1]
        status = 1 if payload.startswith(b"OK ") else 0 if payload.startswith(b"NOTFOUND") else 2
        if expect != 2 and status != expect:
            wrong += 1
    return wrong


async def _warm(
    handle: ServerHandle, requests: list[bytes], expects: list[int], per_worker: int
) -> dict[str, Any]:
    groups = await _open_per_worker(handle, per_worker)
    tasks = []
    for conns in groups.values():
        for n, conn in enumerate(conns):
            tasks.append(_ask_all(conn, requests[n::per_worker], expects[n::per_worker]))
    wrong = sum(await asyncio.gather(*tasks))
    for conns in groups.values():
        for _, writer in conns:
            writer.close()
    return {"workers": len(groups), "wrong": wrong}


def warm(handle: ServerHandle, keys_path: str, per_worker: int = 8) -> dict[str, Any]:
    """Ask every worker every key of the file once; returns counts, seconds and RSS."""
    import uvloop

    from bench.lib.load import read_keys

    requests, expects, _ = read_keys(keys_path, "socketmap", "vmailbox")
    started = time.monotonic()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        out = runner.run(_warm(handle, requests, expects, per_worker))
    out["keys"] = len(requests)
    out["seconds"] = time.monotonic() - started
    if out["wrong"]:
        raise BenchError(f"warming {handle.name}: {out['wrong']} unexpected answers")
    metrics = handle.metrics()
    out["cache_entries_worker0"] = metrics.get("maplookup_cache_entries")
    return out


# --------------------------------------------------------------------------
# sampling around a load's window


class Monitor(Hooks):
    """CPU of the server and of PostgreSQL over the window; connections per worker; cache."""

    def __init__(self, handle: ServerHandle, postmaster_pid: int | None) -> None:
        self.handle = handle
        self.postmaster_pid = postmaster_pid
        self.data: dict[str, Any] = {}
        self._t = 0.0
        self._server_cpu = 0.0
        self._pg_cpu = 0.0
        self._busy = 0.0
        self._metrics: dict[str, float] = {}

    def _pg_pids(self) -> list[int]:
        return descendants(self.postmaster_pid) if self.postmaster_pid else []

    def ready(self) -> None:
        workers = self.handle.worker_pids()
        by_worker = connections_by_process(workers, self.handle.port)
        if self.handle.tcp_port:
            tcp = connections_by_process(workers, self.handle.tcp_port)
            by_worker = {p: by_worker[p] | tcp[p] for p in workers}
        self.data["connections_per_worker"] = [len(v) for v in by_worker.values()]
        self._metrics = self._safe_metrics()

    def _safe_metrics(self) -> dict[str, float]:
        try:
            return self.handle.metrics()
        except OSError:
            return {}

    def window_start(self) -> None:
        self._t = time.monotonic()
        self._busy = machine_busy_seconds()
        self._server_cpu = cpu_seconds(self.handle.pids())
        self._pg_cpu = cpu_seconds(self._pg_pids(), children_too=True)

    def window_end(self) -> None:
        elapsed = time.monotonic() - self._t
        self.data["machine_cpu_pct"] = (machine_busy_seconds() - self._busy) / elapsed * 100
        self.data["server_cpu_pct"] = (
            (cpu_seconds(self.handle.pids()) - self._server_cpu) / elapsed * 100
        )
        self.data["postgres_cpu_pct"] = (
            (cpu_seconds(self._pg_pids(), children_too=True) - self._pg_cpu) / elapsed * 100
        )
        self.data["server_rss_kib"] = sum(rss_kib(p) for p in self.handle.pids())
        after = self._safe_metrics()
        if after and self._metrics:
            for name in ("hits", "negative_hits", "misses"):
                key = f"maplookup_cache_{name}_total"
                if key in after:
                    self.data[f"worker0_cache_{name}"] = int(after[key] - self._metrics.get(key, 0))

    def report(self) -> dict[str, Any]:
        return dict(self.data)
