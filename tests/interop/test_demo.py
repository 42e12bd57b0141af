"""The README's first command: ``maplookup serve --demo`` on its own private PostgreSQL.

This is what a new user runs on a fresh machine; it must answer Postfix's own client at once,
let the admin commands find its database, and leave nothing running after SIGTERM.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from maplookup.embedded import read_running_dsn
from tests.interop.test_postmap import postmap
from tests.processes import (
    RunningServer,
    free_port,
    maplookup_cli,
    stop_server,
    wait_for_port,
)


def test_serve_demo_on_embedded_postgres(postfix_dir: Path, tmp_path: Path) -> None:
    # The cluster runs as an unprivileged user when we are root: its parent must be searchable.
    state_dir = Path(tempfile.mkdtemp(prefix="maplookup-demo-"))
    state_dir.chmod(0o755)
    port = free_port()
    with (tmp_path / "serve.log").open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "maplookup",
                "serve",
                "--demo",
                "--state-dir",
                str(state_dir),
                "--socketmap",
                f"127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = RunningServer(port, {}, process)
    try:
        wait_for_port(port, process, timeout_s=60)
        result = postmap(postfix_dir, "-q", "meier@arkum.ch", server.socketmap("vmailbox"))
        assert (result.returncode, result.stdout) == (0, "arkum.ch/meier/\n"), result.stderr
        # Admin commands find the embedded cluster through the state directory.
        added = maplookup_cli("mailbox", "add", "new@arkum.ch", "--state-dir", str(state_dir))
        assert added.returncode == 0, added.stderr
        result = postmap(postfix_dir, "-q", "new@arkum.ch", server.socketmap("vmailbox"))
        assert (result.returncode, result.stdout) == (0, "arkum.ch/new/\n")
        assert read_running_dsn(state_dir) is not None
    finally:
        code = stop_server(server)
        log_text = (tmp_path / "serve.log").read_text()
    assert code == 0, log_text
    # The private cluster was stopped with the server.
    assert read_running_dsn(state_dir) is None
    subprocess.run(["rm", "-rf", str(state_dir)], check=False)
