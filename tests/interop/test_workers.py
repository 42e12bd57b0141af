"""``workers = N``: processes sharing the ports, each with a coherent cache, supervised."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from maplookup.client import query_socketmap
from maplookup.config import HostPort
from maplookup.protocol import Reply
from maplookup.testing import accepts, free_port, wait_for_port
from tests.interop.test_reload import ask, connect, wait_for
from tests.processes import maplookup_cli


def scrape(port: int) -> list[Sample]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def worker_pids(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children if Path(f"/proc/{pid}/cmdline").exists()]


def test_workers_share_ports_stay_coherent_and_are_supervised(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    dsn = make_database()
    assert maplookup_cli("db", "init", "--dsn", dsn, "--demo").returncode == 0
    port, extra, metrics_port = free_port(), free_port(), free_port()
    unix_path = tmp_path / "maplookup.sock"
    config = tmp_path / "maplookup.toml"
    config.write_text(
        f'workers = 2\n[listen]\nsocketmap = ["127.0.0.1:{port}"]\n'
        f'socketmap_unix = "{unix_path}"\n[database]\ndsn = "{dsn}"\n'
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
    )
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "maplookup", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = HostPort(host="127.0.0.1", port=port)
    try:
        wait_for_port(port, process)
        wait_for(lambda: len(worker_pids(process.pid)) == 2, "two workers")
        wait_for(
            lambda: log_path.read_text().count("listening: socketmap on 127.0.0.1") == 2,
            "both workers listening",
        )
        assert query_socketmap("vmailbox", b"meier@arkum.ch", unix_path=unix_path) == Reply.ok(
            "arkum.ch/meier/"
        )
        # Many connections, so both workers hold some; each caches a negative answer.
        connections = [connect(port) for _ in range(16)]
        for client in connections:
            assert ask(client, b"fresh@arkum.ch") == Reply.notfound()
        added = maplookup_cli("mailbox", "add", "fresh@arkum.ch", "--dsn", dsn)
        assert added.returncode == 0, added.stderr
        # Every worker's cache sees the change (each LISTENs for itself).
        for client in connections:
            wait_for(
                lambda client=client: ask(client, b"fresh@arkum.ch") == Reply.ok("arkum.ch/fresh/"),
                "the change on every connection",
            )
        for client in connections:
            client.close()

        # /metrics (on worker 0) has every worker's figures, each labelled with its worker.
        accepted = {
            s.labels["worker"]: s.value
            for s in scrape(metrics_port)
            if s.name == "maplookup_connections_accepted_total"
        }
        assert set(accepted) == {"0", "1"}
        assert sum(accepted.values()) >= 17  # the unix one and the 16 above
        workers = {s.labels["state"]: s.value for s in scrape(metrics_port)
                   if s.name == "maplookup_workers"}  # fmt: skip
        assert workers == {"configured": 2, "answering": 2}
        # Each worker put its start-up objects out of the garbage collector's sight.
        frozen = {s.labels["worker"]: s.value for s in scrape(metrics_port)
                  if s.name == "maplookup_gc_frozen_objects"}  # fmt: skip
        assert set(frozen) == {"0", "1"}
        assert min(frozen.values()) > 10_000

        # A worker that dies is replaced; the service keeps answering meanwhile.
        victim = worker_pids(process.pid)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: victim not in worker_pids(process.pid) and len(worker_pids(process.pid)) == 2,
            "the worker to be replaced",
        )
        deadline = time.monotonic() + 20
        answered = 0
        while answered < 50:
            assert time.monotonic() < deadline, "no answers after a worker died"
            try:
                if query_socketmap("vmailbox", b"meier@arkum.ch", server=server) == Reply.ok(
                    "arkum.ch/meier/"
                ):
                    answered += 1
            except Exception:  # a connection to the dying worker
                time.sleep(0.01)

        # SIGHUP reaches every worker.
        config.write_text(
            config.read_text().replace(
                f'"127.0.0.1:{port}"]', f'"127.0.0.1:{port}", "127.0.0.1:{extra}"]'
            )
        )
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: log_path.read_text().count("configuration reloaded") >= 2, "reloads")
        assert accepts(extra)
        assert query_socketmap(
            "vmailbox", b"meier@arkum.ch", server=HostPort(host="127.0.0.1", port=extra)
        ) == Reply.ok("arkum.ch/meier/")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
    assert code == 0, log_path.read_text()[-3000:]
    assert not unix_path.exists()
