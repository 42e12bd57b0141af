"""A TCP proxy that adds a fixed latency to every round trip to PostgreSQL.

It sits between a client (maplookup's pool, Postfix's ``pgsql:`` client) and PostgreSQL on
loopback, and holds every chunk the client sends for ``--delay-us`` microseconds before passing
it on; replies pass straight back.  A query/answer round trip therefore takes ``delay`` longer,
as with a database that is that much further away.

Why threads and not an event loop: libuv's timers (uvloop) count whole milliseconds, so
``call_later(0.0005)`` fires at once (uvloop rounds 0.5 ms to 0) and 0.9 ms becomes 1.1 ms;
plain asyncio's epoll timeouts are rounded up to the next millisecond.  Neither can add 0.5 ms.
``tc qdisc ... netem delay`` in a network namespace would do it in the kernel, but this kernel
has no ``sch_netem`` ("Specified qdisc kind is unknown").  ``time.sleep`` uses
``clock_nanosleep`` and wakes within tens of microseconds, so each connection gets three
threads: one reads from the client and stamps each chunk with its due time, one sleeps until
each chunk is due and forwards it (a FIFO: with a constant delay, due times are in order), and
one copies the replies back.  All of them block in system calls with the GIL released, and the
switch interval is lowered so that a waking thread gets the GIL quickly.  The suite checks the
result: a sequential ``SELECT 1`` through the proxy at 0 µs and at the target delay, against the
database directly.

    .venv/bin/python -m bench.lib.delayproxy --port 6433 --upstream-port 5432 --delay-us 500

Prints ``ready`` once it listens.  How late ``time.sleep`` wakes on this machine is measured
at start and subtracted from every wait; the suite then adjusts the delay until the measured
round trip through the proxy is the target above the direct one.  A line ``delay N`` on
stdin changes the delay (µs) for everything sent from then on.  Stops on SIGTERM/SIGINT, on
EOF of stdin, or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence

CHUNK = 65_536
SLEEP_BIAS_NS = 0  # how late time.sleep() wakes up here; measured at start


def _measure_sleep_bias() -> int:
    """Median oversleep of a sub-millisecond time.sleep(); subtracted from every wait."""
    late = []
    for _ in range(25):
        t0 = time.monotonic_ns()
        time.sleep(0.0003)
        late.append(time.monotonic_ns() - t0 - 300_000)
    return max(0, sorted(late)[len(late) // 2])


class _Connection:
    """One proxied connection; its sockets are closed only when all three threads are done.

    (Closing a socket that another thread is blocked on frees its descriptor number for the
    next accept() while the blocked call goes on: the threads only ever shut sockets down.)
    """

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.pending: queue.SimpleQueue[tuple[int, bytes] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = 3

    def done(self) -> None:
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            for s in (self.client, self.server):
                with contextlib.suppress(OSError):
                    s.close()


class DelayProxy:
    def __init__(self, port: int, upstream: tuple[str, int], delay_us: int) -> None:
        self.upstream = upstream
        self.delay_ns = delay_us * 1000
        self.listener = socket.create_server(("127.0.0.1", port), backlog=256)
        self.port = int(self.listener.getsockname()[1])
        self.connections = 0
        self.stopping = threading.Event()

    def serve_forever(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connections += 1
            conn = _Connection(client, server)
            for target in (self._read_client, self._forward_delayed, self._copy):
                threading.Thread(target=target, args=(conn,), daemon=True).start()

    def _read_client(self, conn: _Connection) -> None:
        try:
            while True:
                data = conn.client.recv(CHUNK)
                if not data:
                    break
                conn.pending.put((time.monotonic_ns() + self.delay_ns, data))
        except OSError:
            pass
        finally:
            conn.pending.put(None)
            conn.done()

    @staticmethod
    def _forward_delayed(conn: _Connection) -> None:
        try:
            while True:
                item = conn.pending.get()
                if item is None:
                    break
                due, data = item
                wait = due - time.monotonic_ns() - SLEEP_BIAS_NS
                if wait > 0:
                    time.sleep(wait / 1e9)
                conn.server.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.server.shutdown(socket.SHUT_WR)
            conn.done()

    @staticmethod
    def _copy(conn: _Connection) -> None:
        try:
            while True:
                data = conn.server.recv(CHUNK)
                if not data:
                    break
                conn.client.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.client.shutdown(socket.SHUT_WR)
            conn.done()

    def close(self) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            self.listener.close()


def _control(proxy: DelayProxy, done: threading.Event) -> None:
    for line in sys.stdin:
        parts = line.split()
        if len(parts) == 2 and parts[0] == "delay":
            proxy.delay_ns = int(parts[1]) * 1000
            sys.stdout.write(f"delay {parts[1]}\n")
            sys.stdout.flush()
    done.set()  # EOF: the coordinator is gone


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.lib.delayproxy", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="listen on 127.0.0.1:PORT")
    parser.add_argument("--upstream-port", type=int, required=True, help="PostgreSQL's port")
    parser.add_argument("--upstream-host", default="127.0.0.1")
    parser.add_argument("--delay-us", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.upstream_host not in ("127.0.0.1", "localhost"):
        raise SystemExit("the delay proxy only forwards to loopback")
    sys.setswitchinterval(0.0001)
    global SLEEP_BIAS_NS
    SLEEP_BIAS_NS = _measure_sleep_bias()
    proxy = DelayProxy(ns.port, (ns.upstream_host, ns.upstream_port), ns.delay_us)
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    threading.Thread(target=_control, args=(proxy, done), daemon=True).start()
    sys.stdout.write(f"ready sleep-bias-us={SLEEP_BIAS_NS // 1000}\n")
    sys.stdout.flush()
    done.wait(ns.max_seconds)
    proxy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
