"""SIGHUP under continuous load: the configuration changes, no request is lost.

The server runs as its own process with a config file.  Client threads keep asking over
persistent connections (and reconnecting now and then) while the file is rewritten and SIGHUP
sent: a listener is added, limits change, an invalid file is rejected, a listener is removed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from maplookup.client import query_tcp_table
from maplookup.config import HostPort
from maplookup.protocol import Reply
from maplookup.testing import (
    Client,
    QueryError,
    accepts,
    free_port,
    start_server,
    stop_server,
    wait_for_port,
)
from tests.processes import maplookup_cli

EXPECTED = Reply.ok("arkum.ch/meier/")


@dataclass
class LoadResult:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def connect(port: int) -> Client:
    return Client.connect(HostPort(host="127.0.0.1", port=port), timeout_s=10)


def ask(client: Client, key: bytes) -> Reply:
    return client.ask("vmailbox", key)


def load(port: int, stop: threading.Event, result: LoadResult) -> None:
    """Ask one question after another; a new connection every 100 requests."""
    while not stop.is_set():
        try:
            with connect(port) as client:
                for _ in range(100):
                    reply = ask(client, b"meier@arkum.ch")
                    with result.lock:
                        if reply == EXPECTED:
                            result.ok += 1
                        else:
                            result.failures.append(repr(reply))
                    if stop.is_set():
                        return
        except (OSError, QueryError) as exc:
            with result.lock:
                result.failures.append(f"{type(exc).__name__}: {exc}")
            return


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def config_text(dsn: str, socketmap_ports: list[int], extra: str = "") -> str:
    endpoints = ", ".join(f'"127.0.0.1:{p}"' for p in socketmap_ports)
    return (
        f'log_level = "info"\n[listen]\nsocketmap = [{endpoints}]\n{extra}'
        f'[database]\ndsn = "{dsn}"\n[limits]\nmax_connections = 100\n'
    )


def test_sighup_under_load_loses_no_request(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    dsn = make_database()
    assert maplookup_cli("db", "init", "--dsn", dsn, "--demo").returncode == 0
    main_port, extra_port, tcp_port = free_port(), free_port(), free_port()
    config = tmp_path / "maplookup.toml"
    config.write_text(config_text(dsn, [main_port]))
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "maplookup", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    stop = threading.Event()
    result = LoadResult()
    threads = [threading.Thread(target=load, args=(main_port, stop, result)) for _ in range(4)]
    try:
        wait_for_port(main_port, process)
        for thread in threads:
            thread.start()
        wait_for(lambda: result.ok > 200, "load to start")

        # 1. Add a socketmap port and a tcp_table listener, raise a limit.
        config.write_text(
            config_text(
                dsn,
                [main_port, extra_port],
                f'tcp_table = {{ vmailbox = "127.0.0.1:{tcp_port}" }}\n',
            ).replace("max_connections = 100", "max_connections = 200")
        )
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: accepts(tcp_port) and accepts(extra_port), "the new listeners")
        tcp = HostPort(host="127.0.0.1", port=tcp_port)
        assert query_tcp_table(b"meier@arkum.ch", server=tcp) == EXPECTED
        with connect(extra_port) as client:
            assert ask(client, b"meier@arkum.ch") == EXPECTED

        # 2. A broken file is refused; everything keeps running as it was.
        good = config.read_text()
        config.write_text(good.replace("max_connections", "max_conections"))
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload rejected" in log_path.read_text(), "the rejection log line")
        assert "max_conections" in log_path.read_text()
        assert query_tcp_table(b"meier@arkum.ch", server=tcp) == EXPECTED

        # 3. Remove the extra socketmap port and the tcp_table listener again.
        config.write_text(config_text(dsn, [main_port]))
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: not accepts(extra_port) and not accepts(tcp_port), "listeners to close")
        ok_before = result.ok
        wait_for(lambda: result.ok > ok_before + 200, "load to continue after the reloads")
    finally:
        stop.set()
        for thread in threads:
            if thread.is_alive():
                thread.join(timeout=30)
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
    log_text = log_path.read_text()
    assert result.failures == [], (result.failures[:5], log_text[-3000:])
    assert result.ok > 400
    assert code == 0, log_text[-3000:]
    assert log_text.count("configuration reloaded") == 2


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_stop_signals_exit_zero(
    make_database: Callable[[], str], tmp_path: Path, signal_name: str
) -> None:
    dsn = make_database()
    server = start_server(dsn, tmp_path / "server.log", tcp_maps=())
    process = server.process
    try:
        process.send_signal(getattr(signal, signal_name))
        assert process.wait(timeout=30) == 0
    finally:
        stop_server(server)


def test_systemd_notifications(make_database: Callable[[], str], tmp_path: Path) -> None:
    """READY=1 once listening, RELOADING=1 then READY=1 around SIGHUP, STOPPING=1 at the end."""
    dsn = make_database()
    port = free_port()
    config = tmp_path / "maplookup.toml"
    config.write_text(config_text(dsn, [port]))
    notify_path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(notify_path))
    receiver.settimeout(20)
    process = subprocess.Popen(
        [sys.executable, "-m", "maplookup", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
    )
    messages: list[str] = []

    def next_message() -> str:
        messages.append(receiver.recv(4096).decode())
        return messages[-1]

    try:
        assert "READY=1" in next_message()
        assert accepts(port)
        process.send_signal(signal.SIGHUP)
        assert "RELOADING=1" in next_message()
        assert "READY=1" in next_message()
        process.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in next_message()
        assert process.wait(timeout=30) == 0
    finally:
        receiver.close()
        if process.poll() is None:
            process.kill()
            process.wait()
