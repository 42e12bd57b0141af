"""The README's first command: ``maplookup serve --demo`` on its own private PostgreSQL.

This is what a new user runs on a fresh machine; it must answer Postfix's own client at once,
let the admin commands find its database, and leave nothing running after SIGTERM.  It runs
with the README's default ids (5000), so a domain added without ``--uid/--gid`` still gets
mail delivered, and the admin commands, ``trace`` and ``postfix-config`` know it.  A restart
keeps what the user added, and says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from maplookup.db import schema
from maplookup.embedded import read_running_dsn
from maplookup.testing import RunningServer, free_port, stop_server, wait_for_port
from tests.interop.test_postmap import postmap
from tests.processes import maplookup_cli


def _start_demo(state_dir: Path, port: int, log_path: Path) -> RunningServer:
    with log_path.open("wb") as log:
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
    wait_for_port(port, process, timeout_s=60)
    return server


def test_serve_demo_on_embedded_postgres(postfix_dir: Path, tmp_path: Path) -> None:
    # The cluster runs as an unprivileged user when we are root: its parent must be searchable.
    state_dir = Path(tempfile.mkdtemp(prefix="maplookup-demo-"))
    state_dir.chmod(0o755)
    port = free_port()
    first_log = tmp_path / "serve.log"
    server = _start_demo(state_dir, port, first_log)
    try:
        result = postmap(postfix_dir, "-q", "meier@arkum.ch", server.socketmap("vmailbox"))
        assert (result.returncode, result.stdout) == (0, "arkum.ch/meier/\n"), result.stderr
        # Admin commands find the embedded cluster through the state directory.
        added = maplookup_cli("mailbox", "add", "new@arkum.ch", "--state-dir", str(state_dir))
        assert added.returncode == 0, added.stderr
        assert added.stdout == "mailbox new@arkum.ch -> arkum.ch/new/ added\n"
        result = postmap(postfix_dir, "-q", "new@arkum.ch", server.socketmap("vmailbox"))
        assert (result.returncode, result.stdout) == (0, "arkum.ch/new/\n")
        assert read_running_dsn(state_dir) is not None

        # A domain without ids: the demo's default 5000 applies, so nothing to warn about.
        s = ("--state-dir", str(state_dir))
        added = maplookup_cli("domain", "add", "new.example", *s)
        assert (added.returncode, added.stdout, added.stderr) == (
            0,
            "domain new.example added (mailbox domain, no default uid or gid)\n",
            "",
        )
        added = maplookup_cli("mailbox", "add", "someone@new.example", *s)
        assert (added.returncode, added.stderr) == (0, "")
        for map_name in ("uid", "gid"):
            answer = maplookup_cli(
                "query", map_name, "someone@new.example", "--server", f"127.0.0.1:{port}"
            )
            assert (answer.returncode, answer.stdout) == (0, "5000\n"), answer.stderr
        # trace and the pgsql: side of postfix-config agree with the server.
        trace = maplookup_cli("trace", "someone@new.example", *s)
        assert trace.returncode == 0, trace.stdout + trace.stderr
        assert "uid 5000  gid 5000" in trace.stdout
        generated = maplookup_cli("postfix-config", *s)
        assert generated.returncode == 0, generated.stderr
        # The embedded cluster's port changes at every start: said, not left to find out.
        assert "which changes at every start of `maplookup serve`" in generated.stderr
        assert "maplookup.uid(maplookup.client_key('%s'), '+', 5000)" in generated.stdout
        assert "maplookup.gid(maplookup.client_key('%s'), '+', 5000)" in generated.stdout

        # check-config checks the database the admin commands use: the demo's cluster.
        env = {**os.environ, "MAPLOOKUP_EMBEDDED__STATE_DIR": str(state_dir)}
        checked = maplookup_cli("check-config", env=env)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert f"database: the embedded cluster in {state_dir}" in checked.stdout
        assert f"schema: version {schema.SCHEMA_VERSION} (current)" in checked.stdout
        assert "default uid none" in checked.stdout  # no config file: the demo's are its own

        # A second demo on the same state directory refuses to start, and leaves the first
        # one's database alone (it used to adopt the cluster, fail on the taken port and stop
        # the cluster under the first: every uncached lookup then answered TEMP).
        second = subprocess.run(
            [sys.executable, "-m", "maplookup", "serve", "--demo", "--state-dir", str(state_dir),
             "--socketmap", f"127.0.0.1:{free_port()}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert second.returncode == 1, second.stderr
        assert f"another maplookup serve uses {state_dir} (pid " in second.stderr
        result = postmap(postfix_dir, "-q", "uncached@arkum.ch", server.socketmap("vmailbox"))
        assert (result.returncode, result.stderr) == (1, "")  # NOTFOUND from the database
    finally:
        code = stop_server(server)
        log_text = first_log.read_text()
    assert code == 0, log_text
    assert "demo data loaded" in log_text
    assert "already holds data" not in log_text
    # The private cluster was stopped with the server, and its published ids are gone.
    assert read_running_dsn(state_dir) is None
    assert not (state_dir / "server-ids").exists()

    # A restart keeps the data and says so.
    second_log = tmp_path / "serve-again.log"
    server = _start_demo(state_dir, port, second_log)
    try:
        answer = maplookup_cli(
            "query", "vmailbox", "someone@new.example", "--server", f"127.0.0.1:{port}"
        )
        assert (answer.returncode, answer.stdout) == (0, "new.example/someone/\n")
    finally:
        code = stop_server(server)
        log_text = second_log.read_text()
    assert code == 0, log_text
    assert (
        "demo: database already holds data: kept it, example data not loaded "
        f"(state dir {state_dir})" in log_text
    ), log_text
    assert "demo data loaded" not in log_text
    subprocess.run(["rm", "-rf", str(state_dir)], check=False)
