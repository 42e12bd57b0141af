"""Several worker processes, so that lookups use every core.

One trio process answers on one core.  With ``workers = N`` the supervisor (this module) forks
N workers before any thread exists; each runs the whole service on its own — its own database
pool, cache and LISTEN connection, so each cache stays coherent by itself — and binds the TCP
ports with SO_REUSEPORT, so the kernel spreads Postfix's connections across them.  A unix
socket cannot be shared that way: the supervisor opens it once and every worker accepts on the
inherited descriptor.

The supervisor forwards SIGTERM/SIGINT (drain and stop) and SIGHUP (reload) to the workers,
restarts a worker that dies unexpectedly (with a back-off, so a crash loop does not spin), tells
systemd it is ready once every worker is, and exits 0 when all workers have stopped cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from maplookup.config import Settings
from maplookup.serve.listeners import ListenerSpec, listener_specs, open_unix_socket
from maplookup.serve.sdnotify import SystemdNotifier

log = logging.getLogger(__name__)

# A worker that dies is restarted after this long, doubling up to the maximum while it keeps
# dying within RESTART_RESET_S of being started.
RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
RESTART_RESET_S = 60.0


@dataclass
class _Worker:
    index: int
    pid: int = 0
    started_at: float = 0.0
    restart_delay_s: float = RESTART_MIN_S
    restart_at: float | None = None
    ready: bool = False


@dataclass
class WorkerContext:
    """What a worker process gets from the supervisor."""

    index: int
    inherited: dict[ListenerSpec, socket.socket] = field(default_factory=dict)
    ready_fd: int | None = None

    def announce_ready(self) -> None:
        """Tell the supervisor this worker listens (one byte on a pipe)."""
        if self.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.ready_fd, bytes([self.index % 256]))


def validate(settings: Settings) -> None:
    """Worker set-ups that cannot work; raise ValueError with what to change."""
    if settings.workers > 1:
        zero = [str(e) for e in settings.listen.socketmap if e.port == 0]
        zero += [str(e) for e in settings.listen.tcp_table.values() if e.port == 0]
        if zero:
            raise ValueError(
                f"workers = {settings.workers} needs fixed ports, not port 0 ({', '.join(zero)})"
            )


class Supervisor:
    """Forks and watches the workers; runs in the parent process, without an event loop."""

    def __init__(
        self,
        settings: Settings,
        run_worker: Callable[[WorkerContext], int],
        notifier: SystemdNotifier,
    ) -> None:
        self._settings = settings
        self._run_worker = run_worker
        self._notifier = notifier
        self._workers = [_Worker(i) for i in range(settings.workers)]
        self._stopping = False
        self._inherited: dict[ListenerSpec, socket.socket] = {}
        self._ready_read, self._ready_write = os.pipe()
        self._signals: list[int] = []

    def run(self) -> int:
        for spec in listener_specs(self._settings.listen):
            if spec.unix_path is not None:
                self._inherited[spec] = open_unix_socket(spec)
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        os.set_blocking(self._ready_read, False)
        try:
            for worker in self._workers:
                self._start(worker)
            return self._supervise()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            for sock in self._inherited.values():
                sock.close()
            for spec in self._inherited:
                if spec.unix_path is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(spec.unix_path)
            os.close(self._ready_read)
            os.close(self._ready_write)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def _start(self, worker: _Worker) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(signum, signal.SIG_DFL)
                os.close(self._ready_read)
                context = WorkerContext(worker.index, self._inherited, self._ready_write)
                code = self._run_worker(context)
            except BaseException:
                log.exception("worker %d failed", worker.index)
            finally:
                logging.shutdown()
                os._exit(code)
        worker.pid = pid
        worker.started_at = time.monotonic()
        worker.restart_at = None
        worker.ready = False
        log.info("worker %d started (pid %d)", worker.index, pid)

    def _supervise(self) -> int:
        exit_code = 0
        watchdog_s = self._notifier.watchdog_interval_s()
        next_ping = 0.0
        while True:
            if watchdog_s is not None and time.monotonic() >= next_ping:
                self._notifier.watchdog()
                next_ping = time.monotonic() + watchdog_s / 2
            self._handle_signals()
            self._collect_ready()
            for pid, status in self._reap():
                worker = next((w for w in self._workers if w.pid == pid), None)
                if worker is None:
                    continue
                worker.pid = 0
                code = os.waitstatus_to_exitcode(status)
                if self._stopping:
                    if code != 0:
                        exit_code = 1
                    continue
                log.error("worker %d (pid %d) exited with %d; restarting", worker.index, pid, code)
                alive_for = time.monotonic() - worker.started_at
                if alive_for > RESTART_RESET_S:
                    worker.restart_delay_s = RESTART_MIN_S
                worker.restart_at = time.monotonic() + worker.restart_delay_s
                worker.restart_delay_s = min(worker.restart_delay_s * 2, RESTART_MAX_S)
            if self._stopping and all(w.pid == 0 for w in self._workers):
                return exit_code
            if not self._stopping:
                for worker in self._workers:
                    due = worker.restart_at
                    if worker.pid == 0 and due is not None and time.monotonic() >= due:
                        self._start(worker)
            time.sleep(0.05)

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reloading every worker")
                self._notifier.reloading()
                self._forward(signal.SIGHUP)
                self._notifier.ready()
            elif not self._stopping:
                log.info("%s: stopping every worker", signal.Signals(signum).name)
                self._stopping = True
                self._notifier.stopping()
                self._forward(signal.SIGTERM)

    def _forward(self, signum: int) -> None:
        for worker in self._workers:
            if worker.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signum)

    def _collect_ready(self) -> None:
        try:
            data = os.read(self._ready_read, 4096)
        except BlockingIOError:
            return
        for index in data:
            for worker in self._workers:
                if worker.index % 256 == index:
                    worker.ready = True
        if all(w.ready for w in self._workers):
            self._notifier.ready(status=f"{len(self._workers)} workers serving")

    @staticmethod
    def _reap() -> list[tuple[int, int]]:
        reaped: list[tuple[int, int]] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return reaped
            if pid == 0:
                return reaped
            reaped.append((pid, status))
