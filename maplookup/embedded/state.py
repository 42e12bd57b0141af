"""The state directory, and what a running cluster leaves in it.

The layout's names, the default location, postmaster.pid (is a server alive in a data
directory, and where does it listen?) and the dsn file `maplookup serve` publishes: admin
commands find the cluster another process started through :func:`read_running_dsn`, without
touching it.  :func:`loopback_dsn` turns such a DSN into its TCP form for Postfix.
"""

from __future__ import annotations

import contextlib
import os
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

PGDATA_NAME = "pgdata"
RUN_NAME = "run"
LOG_DIR_NAME = "log"
LOG_FILE_NAME = "postgresql.log"
DSN_FILE_NAME = "dsn"
SERVER_IDS_FILE_NAME = "server-ids"
LOCK_FILE_NAME = ".lock"
# Held by the one `maplookup serve` using the state directory (claim_for_server).
SERVE_LOCK_FILE_NAME = "serve.lock"
_INITDB_TMP_NAME = "pgdata.initdb-tmp"


def default_state_dir() -> Path:
    """Where `maplookup serve` keeps its private cluster when none is configured.

    Root gets the FHS location; other users get the XDG state directory so that
    a developer can run the demo without privileges.
    """
    if os.geteuid() == 0:
        return Path("/var/lib/maplookup")
    xdg = os.environ.get("XDG_STATE_HOME", "")
    # The XDG spec says relative values are invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "maplookup"
    return Path.home() / ".local" / "state" / "maplookup"


# --------------------------------------------------------------------------
# postmaster.pid


@dataclass(frozen=True)
class _PostmasterInfo:
    """The interesting lines of postmaster.pid (see PostgreSQL's miscadmin.h)."""

    pid: int
    port: int
    socket_dir: str
    listen_addr: str
    status: str


def _pid_zombie(pid: int) -> bool:
    """Whether `pid` is a dead process its parent has not reaped yet.

    After a crash the postmaster is reparented to PID 1; until PID 1 reaps it,
    kill(pid, 0) still succeeds and PostgreSQL refuses to start ("lock file
    postmaster.pid already exists").  Some container init processes reap only
    every few seconds.
    """
    try:
        proc_stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return proc_stat[proc_stat.rfind(")") + 2 :][:1] in ("Z", "X")


def _pid_alive(pid: int) -> bool:
    """Whether `pid` is a live postgres process; guards against stale pid files."""
    if pid <= 0:  # kill(0 or negative) would address process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user (the run-as user when we are not root)
    try:
        proc_stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill()
    # /proc/PID/stat is "pid (comm) state ..."; comm may itself contain ") ".
    comm = proc_stat[proc_stat.find("(") + 1 : proc_stat.rfind(")")]
    # A recycled pid belonging to something else must not count as our server.
    return not _pid_zombie(pid) and comm.startswith(("postgres", "postmaster"))


def _pidfile_pid(pgdata: Path) -> int | None:
    try:
        first = (pgdata / "postmaster.pid").read_text().split("\n", 1)[0]
        return int(first.strip())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _wait_for_unreaped_postmaster(pgdata: Path, timeout: float = 15.0) -> None:
    """Give PID 1 time to reap a crashed postmaster before starting a new one."""
    pid = _pidfile_pid(pgdata)
    if pid is None or pid <= 0:
        return
    deadline = time.monotonic() + timeout
    while _pid_zombie(pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def _running_postmaster(pgdata: Path) -> _PostmasterInfo | None:
    """Parse pgdata/postmaster.pid and return it if its process is alive."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None

    def line(n: int) -> str:
        return lines[n].strip() if len(lines) > n else ""

    try:
        pid = int(line(0))
    except ValueError:
        return None
    if not _pid_alive(pid):
        return None
    try:
        port = int(line(3))
    except ValueError:
        port = 0
    return _PostmasterInfo(
        pid=pid, port=port, socket_dir=line(4), listen_addr=line(5), status=line(7)
    )


def _dsn_port(dsn: str) -> int | None:
    parsed = urllib.parse.urlsplit(dsn)
    values = urllib.parse.parse_qs(parsed.query).get("port")
    raw = values[0] if values else None
    if raw is None:
        try:
            return parsed.port
        except ValueError:
            return None
    try:
        return int(raw)
    except ValueError:
        return None


def read_running_dsn(state_dir: Path) -> str | None:
    """The DSN of the cluster another process started in `state_dir`, if it runs.

    Admin commands use this to find the cluster that `maplookup serve` started.
    The dsn file alone is not trusted: a crashed server leaves it behind, so the
    postmaster must be alive and listening on the port the DSN names.
    """
    state_dir = Path(state_dir)
    try:
        dsn = (state_dir / DSN_FILE_NAME).read_text().strip()
    except OSError:
        return None
    if not dsn:
        return None
    info = _running_postmaster(state_dir / PGDATA_NAME)
    if info is None:
        return None
    port = _dsn_port(dsn)
    if port is not None and info.port and port != info.port:
        return None
    return dsn


def write_server_ids(state_dir: Path, uid: int | None, gid: int | None) -> None:
    """Publish the default uid/gid the server on this cluster started with.

    Admin commands that reach the cluster through the state directory cannot see the
    server's flags or (for ``--demo``) its built-in defaults; without this file
    ``postfix-config`` would write pgsql: queries without the defaults the socketmap side
    applies, and ``mailbox add`` would warn about ids the server does supply.  One line,
    ``uid gid``, ``-`` for none; written atomically like the dsn file.
    """
    text = f"{'-' if uid is None else uid} {'-' if gid is None else gid}\n"
    tmp = Path(state_dir) / f".{SERVER_IDS_FILE_NAME}.tmp"
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, Path(state_dir) / SERVER_IDS_FILE_NAME)


def remove_server_ids(state_dir: Path) -> None:
    """Best effort: a server that dropped root may not be allowed to; the next start rewrites it."""
    with contextlib.suppress(OSError):
        (Path(state_dir) / SERVER_IDS_FILE_NAME).unlink(missing_ok=True)


def read_server_ids(state_dir: Path) -> tuple[int | None, int | None] | None:
    """The default (uid, gid) of the server running on this cluster; None if unknown.

    Like :func:`read_running_dsn`, only trusted while the cluster runs.
    """
    state_dir = Path(state_dir)
    if read_running_dsn(state_dir) is None:
        return None
    try:
        fields = (state_dir / SERVER_IDS_FILE_NAME).read_text().split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(fields) != 2:
        return None
    try:
        uid, gid = (None if f == "-" else int(f) for f in fields)
    except ValueError:
        return None
    return uid, gid


def loopback_dsn(dsn: str) -> str:
    """The 127.0.0.1 form of a unix-socket DSN such as an embedded cluster's.

    The embedded cluster's socket directory belongs to the user PostgreSQL runs as; Postfix's
    daemons reach the same cluster over loopback TCP instead.  Other DSNs come back unchanged.
    """
    parts = urllib.parse.urlsplit(dsn)
    query = urllib.parse.parse_qs(parts.query)
    hosts = query.get("host", [])
    if parts.hostname or not hosts or not hosts[0].startswith("/"):
        return dsn
    port = query.get("port", ["5432"])[0]
    rest = {k: v for k, v in query.items() if k not in ("host", "port")}
    netloc = f"{parts.netloc.rstrip('@')}@127.0.0.1:{port}" if parts.netloc else f"127.0.0.1:{port}"
    return urllib.parse.urlunsplit(
        parts._replace(netloc=netloc, query=urllib.parse.urlencode(rest, doseq=True))
    )
