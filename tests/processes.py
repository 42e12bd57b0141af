"""The maplookup server as a separate process, as admins and Postfix see it."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"server did not listen on port {port} within {timeout_s} s")


def maplookup_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maplookup", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


@dataclass
class RunningServer:
    socketmap_port: int
    tcp_ports: dict[str, int]
    process: subprocess.Popen[bytes]

    def socketmap(self, map_name: str) -> str:
        return f"socketmap:inet:127.0.0.1:{self.socketmap_port}:{map_name}"

    def tcp(self, map_name: str) -> str:
        return f"tcp:127.0.0.1:{self.tcp_ports[map_name]}"


def start_server(
    dsn: str,
    log_path: Path,
    socketmap_port: int | None = None,
    tcp_maps: tuple[str, ...] = ("vmailbox", "virtual"),
    extra_args: tuple[str, ...] = (),
) -> RunningServer:
    """``python -m maplookup serve`` as a subprocess; returns once every port accepts.

    ``extra_args`` go on the command line as they are (``--default-uid 1500``, ...).
    """
    socketmap_port = socketmap_port or free_port()
    tcp_ports = {name: free_port() for name in tcp_maps}
    args = [
        sys.executable,
        "-m",
        "maplookup",
        "serve",
        "--dsn",
        dsn,
        "--socketmap",
        f"127.0.0.1:{socketmap_port}",
    ]
    for map_name, port in tcp_ports.items():
        args += ["--tcp-table", f"{map_name}=127.0.0.1:{port}"]
    args += extra_args
    with log_path.open("ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    server = RunningServer(socketmap_port, tcp_ports, process)
    try:
        wait_for_port(socketmap_port, process)
        for port in tcp_ports.values():
            wait_for_port(port, process)
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: RunningServer) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode
