"""Root: refused unless told, or dropped to a user once the listeners are bound."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from maplookup.client import query_socketmap
from maplookup.config import HostPort
from maplookup.embedded import loopback_dsn
from maplookup.protocol import Reply
from maplookup.testing import free_port, wait_for_port
from tests.processes import maplookup_cli

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="only root can test dropping root")


def test_root_without_user_is_refused(make_database: Callable[[], str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "maplookup", "serve", "--dsn", make_database(),
         "--socketmap", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MAPLOOKUP_ALLOW_ROOT": "false"},
        check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "refusing to run as root" in result.stderr


def test_privileges_are_dropped_after_binding(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    dsn = loopback_dsn(make_database())
    assert maplookup_cli("db", "init", "--dsn", dsn, "--demo").returncode == 0
    port = free_port()
    nobody = pwd.getpwnam("nobody")
    process = subprocess.Popen(
        [sys.executable, "-m", "maplookup", "serve", "--dsn", dsn,
         "--socketmap", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "MAPLOOKUP_ALLOW_ROOT": "false", "MAPLOOKUP_USER": "nobody"},
    )  # fmt: skip
    try:
        wait_for_port(port, process)
        status = Path(f"/proc/{process.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(nobody.pw_uid)] * 4
        reply = query_socketmap(
            "vmailbox", b"meier@arkum.ch", server=HostPort(host="127.0.0.1", port=port)
        )
        assert reply == Reply.ok("arkum.ch/meier/")
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
        assert process.stderr is not None
        process.stderr.close()
