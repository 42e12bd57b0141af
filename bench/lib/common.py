"""Helpers shared by the load generator and the suite: processes, /proc, results, PostgreSQL.

Every process the benchmarks start goes through :class:`Children`: it is started in a session of
its own (so a Ctrl-C at the terminal reaches only the coordinator, which then stops everything
in order), with ``PR_SET_PDEATHSIG`` so that it gets SIGTERM if the coordinator dies without
cleaning up, and it is stopped by process group id (SIGTERM, then SIGKILL) when the ``with``
block ends, whatever ended it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any, Self

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # bench/lib/common.py -> the checkout
RESULTS_DIR = PROJECT_ROOT / "bench" / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The benchmark could not measure what it set out to; the message says why."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT: unwind through every ``finally`` and clean up."""


def install_signal_handlers() -> None:
    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


class Logger:
    def __init__(self, name: str) -> None:
        self.prefix = f"[bench.{name}]"
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"{self.prefix} {elapsed:6.1f}s {message}", file=sys.stderr, flush=True)


class Deadline:
    """A time budget."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def check(self, what: str) -> None:
        if self.remaining() <= 0:
            raise BenchError(f"time budget exhausted during {what}")


def run_guarded(log: Logger, run: Callable[[], int]) -> int:
    """Run a benchmark's ``run``: stop cleanly on SIGTERM/SIGINT, one log line on failure.

    Returns the process exit code: ``run``'s, 1 after a BenchError or QueryError (a lookup
    client's), 130 when interrupted.
    Every process and cluster the benchmark started is stopped by its own ``finally``.
    """
    from maplookup.client import QueryError  # a lookup client's failure: the server's fault

    install_signal_handlers()
    try:
        return run()
    except (BenchError, QueryError) as exc:
        log(f"failed: {exc}")
        return 1
    except Interrupted as exc:
        log(f"interrupted ({exc}); everything started was stopped")
        return 130


def utc_stamp() -> tuple[datetime, str]:
    now = datetime.now(UTC)
    return now, now.strftime("%Y%m%dT%H%M%SZ")


def write_json(name: str, stamp: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    tmp = path.with_suffix(".json.tmp")  # *.tmp is git-ignored
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info(
    extra: dict[str, Any] | None = None,
    distributions: Sequence[str] = ("trio", "asyncpg", "uvloop", "maplookup", "matplotlib"),
) -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in distributions},
    }
    if extra:
        info.update(extra)
    return info


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from low to high."""

    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}")
        return value

    return parse


def timeout_seconds(text: str) -> float:
    """An argparse type: a whole-run time limit from 1 s to an hour."""
    value = float(text)
    if not 1.0 <= value <= 3600.0:
        raise argparse.ArgumentTypeError("must be between 1 and 3600 seconds")
    return value


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    from maplookup.testing import free_port

    return free_port()


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen[Any] | None = None) -> None:
    """Return once 127.0.0.1:``port`` accepts; BenchError if ``proc`` exits or time runs out."""
    from maplookup.testing import ServerNotReady, wait_for_port

    try:
        wait_for_port(port, proc, timeout_s)
    except ServerNotReady as exc:
        raise BenchError(str(exc)) from None


# --------------------------------------------------------------------------
# child processes


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Children:
    """Starts processes and stops every one of them (by process group id) on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def start(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        kwargs.setdefault("cwd", PROJECT_ROOT)
        proc: subprocess.Popen[Any] = subprocess.Popen(
            list(argv), start_new_session=True, preexec_fn=_die_with_parent, **kwargs
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], timeout_s: float = 10.0) -> int | None:
        """SIGTERM to the process group, then SIGKILL; returns the exit code."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Workers forked by the child may outlive it; the group id still names them.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout_s=5.0)


# --------------------------------------------------------------------------
# /proc


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (via /proc/PID/task/*/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in task.read_text().split())
    return out


def cpu_seconds(pids: Sequence[int], children_too: bool = False) -> float:
    """utime + stime of the processes (plus their reaped children's with ``children_too``)."""
    ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        # fields[0] is field 3 (state): utime is field 14, stime 15, cutime 16, cstime 17.
        ticks += int(fields[11]) + int(fields[12])
        if children_too:
            ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time spent by everything on the machine (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def core_busy_seconds() -> list[float]:
    """CPU time spent on each core (``cpu0``, ``cpu1``, ...), from /proc/stat."""
    out: list[float] = []
    for line in Path("/proc/stat").read_text().splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in rest.split()[:8])
        out.append((user + nice + system + irq + softirq + steal) / CLOCK_TICKS)
    return out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def _tcp_table() -> Iterator[tuple[int, int, int]]:
    """(local port, remote port, inode) of every established IPv4 TCP socket."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[3] != "01":  # ESTABLISHED
                continue
            local_port = int(parts[1].rsplit(":", 1)[1], 16)
            remote_port = int(parts[2].rsplit(":", 1)[1], 16)
            yield local_port, remote_port, int(parts[9])


def connections_by_process(server_pids: Sequence[int], server_port: int) -> dict[int, set[int]]:
    """For each server process, the client ports of its established connections to the port."""
    by_inode = {}
    for local_port, remote_port, inode in _tcp_table():
        if local_port == server_port:
            by_inode[inode] = remote_port
    out: dict[int, set[int]] = {}
    for pid in server_pids:
        out[pid] = {by_inode[i] for i in _socket_inodes(pid) if i in by_inode}
    return out


# --------------------------------------------------------------------------
# PostgreSQL


class JsonLines:
    """Reads one JSON object per line from a child's stdout, each within a time limit.

    The control channel of the benchmarks' server children (``bench/cache.py``,
    ``bench/soak.py``); ``error`` is the exception type the caller reports failures with.
    """

    def __init__(self, proc: subprocess.Popen[bytes], error: type[Exception]) -> None:
        assert proc.stdout is not None
        self._proc = proc
        self._fd = proc.stdout.fileno()
        self._error = error
        self._buffer = b""

    def read(self, timeout_s: float) -> dict[str, Any]:
        end = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            left = end - time.monotonic()
            if left <= 0:
                raise self._error("the server process did not answer in time")
            readable, _, _ = select.select([self._fd], [], [], left)
            if readable:
                chunk = os.read(self._fd, 65536)
                if not chunk:
                    raise self._error(f"the server process exited ({self._proc.wait()})")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        result: dict[str, Any] = json.loads(line)
        return result


class PrivatePostgres:
    """A throwaway cluster (maplookup.embedded, fast_unsafe) in a fresh directory under /tmp."""

    def __init__(self) -> None:
        self.state: Path | None = None
        self.pg: Any = None
        self.dsn = ""
        self.port = 0

    def start(self) -> str:
        from maplookup.embedded import EmbeddedPostgres

        self.state = Path(tempfile.mkdtemp(prefix="maplookup-bench-", dir="/tmp"))
        self.state.chmod(0o755)  # the run-as user (postgres, when we are root) must traverse it
        self.pg = EmbeddedPostgres(state_dir=self.state, fast_unsafe=True)
        try:
            self.pg.start()
        except BaseException:
            self.stop()  # nothing left behind in /tmp
            raise
        self.dsn = self.pg.tcp_dsn
        self.port = int(self.pg.port)
        return self.dsn

    def postmaster_pid(self) -> int | None:
        if self.state is None:
            return None
        try:
            return int((self.state / "pgdata" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        try:
            if self.pg is not None:
                self.pg.stop()
        finally:
            if self.state is not None:
                shutil.rmtree(self.state, ignore_errors=True)
            self.pg = None
            self.state = None


def dsn_for(dsn: str, database: str, port: int | None = None) -> str:
    """The same DSN naming another database (and optionally another port)."""
    import urllib.parse

    parts = urllib.parse.urlsplit(dsn)
    netloc = parts.netloc
    if port is not None:
        host_part = netloc.rsplit(":", 1)[0] if ":" in netloc.split("@")[-1] else netloc
        netloc = f"{host_part}:{port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, path=f"/{database}"))
