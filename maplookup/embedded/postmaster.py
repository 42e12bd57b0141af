"""PostgreSQL's own programs on the cluster's data directory: initdb, pg_ctl start and stop.

Owns the command lines (server options, the trust-only pg_hba.conf, ``--no-sync`` for
throwaway clusters), creating a cluster in a scratch directory so that a failed initdb leaves
nothing behind, retrying a start whose free port was taken meanwhile, and turning a failure
into an error that quotes the end of the server log.  ``cluster`` decides when to call them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

from .errors import EmbeddedPostgresError
from .runas import _run, _RunAs
from .state import _INITDB_TMP_NAME, _running_postmaster, _wait_for_unreaped_postmaster

# The name this logger had before embedded.py became a package: log lines keep saying
# logger=maplookup.embedded.
log = logging.getLogger("maplookup.embedded")

INITDB_TIMEOUT = 120.0
PG_CTL_TIMEOUT = 60
"""Seconds pg_ctl itself waits (-t); the subprocess gets a little more on top."""

_HBA_CONF = """\
# Written by maplookup (maplookup/embedded.py).
# Trust on the private unix socket directory and on loopback IPv4 only.
# TYPE  DATABASE  USER  ADDRESS        METHOD
local   all       all                  trust
host    all       all   127.0.0.1/32   trust
"""


def _tail(text: str, lines: int = 6, limit: int = 800) -> str:
    """Last few non-empty lines joined into one line, for error messages."""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    joined = " | ".join(kept)
    if len(joined) > limit:
        joined = "..." + joined[-limit:]
    return joined or "(no output)"


def _pick_free_port() -> int:
    """Ask the kernel for a free loopback port (racy, so start() retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def initdb(
    bin_dir: Path,
    ra: _RunAs,
    *,
    state_dir: Path,
    data_dir: Path,
    superuser: str,
    fast_unsafe: bool,
) -> None:
    """Create the cluster in a scratch directory and rename it into place.

    A failed or interrupted initdb therefore never leaves a half-made
    pgdata that later starts would trip over.
    """
    pgdata = data_dir
    if pgdata.exists():
        if any(pgdata.iterdir()):
            raise EmbeddedPostgresError(
                f"{pgdata} exists but is not a PostgreSQL data directory (no PG_VERSION); "
                "move it away so that a fresh cluster can be created"
            )
        pgdata.rmdir()
    tmp = state_dir / _INITDB_TMP_NAME
    log.info("initialising PostgreSQL cluster in %s", pgdata)
    result: subprocess.CompletedProcess[str] | None = None
    for locale in ("C.UTF-8", "C"):
        _fresh_dir(tmp, ra)
        argv = [
            str(bin_dir / "initdb"),
            "-D",
            str(tmp),
            "-U",
            superuser,
            "-E",
            "UTF8",
            f"--locale={locale}",
            "--auth-local=trust",
            "--auth-host=trust",
            "--no-instructions",
        ]
        if fast_unsafe:
            argv.append("--no-sync")
        result = _run(argv, ra, INITDB_TIMEOUT, "initdb")
        # C.UTF-8 is missing on some systems; C works with any encoding.
        if result.returncode == 0 or "locale" not in result.stderr.lower():
            break
    assert result is not None
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EmbeddedPostgresError(
            f"initdb failed (exit {result.returncode}) for {pgdata}: "
            f"{_tail(result.stderr or result.stdout)}"
        )
    hba = tmp / "pg_hba.conf"
    hba.write_text(_HBA_CONF)  # existing file: keeps its owner and 0600 mode
    os.replace(tmp, pgdata)


def _fresh_dir(path: Path, ra: _RunAs) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    if ra.switch:
        os.chown(path, ra.uid, ra.gid)
    os.chmod(path, 0o700)


def _server_options(port: int, socket_dir: Path, fast_unsafe: bool) -> str:
    """The -o string for pg_ctl; it goes through /bin/sh, hence shlex.quote."""
    sockdir = str(socket_dir)
    if any(c in sockdir for c in " ,\t'"):
        sockdir = f'"{sockdir}"'  # GUC list syntax
    settings = {
        "listen_addresses": "127.0.0.1",
        "port": str(port),
        "unix_socket_directories": sockdir,
    }
    if fast_unsafe:
        settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
    return " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in settings.items())


def _read_log_from(log_file: Path, offset: int) -> str:
    try:
        with log_file.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def pg_ctl_start(
    bin_dir: Path,
    ra: _RunAs,
    *,
    data_dir: Path,
    log_file: Path,
    socket_dir: Path,
    requested_port: int,
    fast_unsafe: bool,
) -> int:
    """Start the postmaster; the port it listens on (a free one when none was requested)."""
    _wait_for_unreaped_postmaster(data_dir)
    attempts = 1 if requested_port else 3
    for attempt in range(1, attempts + 1):
        port = requested_port or _pick_free_port()
        try:
            offset = log_file.stat().st_size
        except OSError:
            offset = 0
        argv = [
            str(bin_dir / "pg_ctl"),
            "start",
            "-D",
            str(data_dir),
            "-l",
            str(log_file),
            "-w",
            "-t",
            str(PG_CTL_TIMEOUT),
            "-s",
            "-o",
            _server_options(port, socket_dir, fast_unsafe),
        ]
        result = _run(argv, ra, PG_CTL_TIMEOUT + 30, "pg_ctl start")
        if result.returncode == 0:
            return port
        logged = _read_log_from(log_file, offset)
        # pg_ctl may give up waiting while the postmaster lives on: don't leak it.
        if _running_postmaster(data_dir) is not None:
            with contextlib.suppress(EmbeddedPostgresError):
                pg_ctl_stop(bin_dir, ra, data_dir, "immediate")
        port_taken = "could not bind" in logged or "already in use" in logged
        if port_taken and attempt < attempts:
            log.info("port %d was taken meanwhile, retrying with another", port)
            continue
        raise EmbeddedPostgresError(
            f"PostgreSQL failed to start (pg_ctl exit {result.returncode}); "
            f"{log_file} ends with: {_tail(logged or result.stderr)}"
        )
    raise AssertionError("unreachable: the last attempt returns or raises")


def pg_ctl_stop(bin_dir: Path, ra: _RunAs, data_dir: Path, mode: str) -> None:
    argv = [
        str(bin_dir / "pg_ctl"),
        "stop",
        "-D",
        str(data_dir),
        "-m",
        mode,
        "-w",
        "-t",
        str(PG_CTL_TIMEOUT),
        "-s",
    ]
    result = _run(argv, ra, PG_CTL_TIMEOUT + 30, "pg_ctl stop")
    if result.returncode != 0 and _running_postmaster(data_dir) is not None:
        raise EmbeddedPostgresError(
            f"stopping PostgreSQL in {data_dir} failed (pg_ctl exit "
            f"{result.returncode}): {_tail(result.stderr)}; try stop mode 'immediate'"
        )
