"""A private PostgreSQL cluster owned by maplookup.

`maplookup serve` without a configured database, and the test suite, both need
a real PostgreSQL server without asking an administrator to set one up.  This
module runs one out of a state directory that it owns::

    state_dir/pgdata                 data directory (mode 0700, owned by the run-as user)
    state_dir/run                    unix socket directory (mode 0700, run-as user)
    state_dir/log/postgresql.log     server log (pg_ctl -l)
    state_dir/dsn                    DSN of the running cluster, for admin commands
    state_dir/.lock                  serialises start/stop between processes

PostgreSQL refuses to run as root.  When we are root the server binaries are
run as an unprivileged user (``postgres`` by default) by switching uid/gid in
the child process (the same thing ``setpriv`` does, without depending on PAM
like ``runuser``), and the directories it writes to are chowned to that user.

Authentication is ``trust`` on the private socket directory and on 127.0.0.1:
the socket directory is only reachable by the run-as user (and root), but note
that *any* local user can reach the TCP port, so the TCP listener is meant for
single-user machines, containers and tests.

All functions here block; call them from async code via a worker thread
(``trio.to_thread.run_sync``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import grp
import logging
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import asyncpg

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "default_state_dir",
    "find_pg_bin_dir",
    "read_running_dsn",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

PGDATA_NAME = "pgdata"
RUN_NAME = "run"
LOG_DIR_NAME = "log"
LOG_FILE_NAME = "postgresql.log"
DSN_FILE_NAME = "dsn"
LOCK_FILE_NAME = ".lock"
_INITDB_TMP_NAME = "pgdata.initdb-tmp"

_REQUIRED_BINARIES = ("pg_ctl", "initdb")
_STOP_MODES = ("smart", "fast", "immediate")

INITDB_TIMEOUT = 120.0
PG_CTL_TIMEOUT = 60
"""Seconds pg_ctl itself waits (-t); the subprocess gets a little more on top."""
CONNECT_TIMEOUT = 30.0

# sizeof(sockaddr_un.sun_path) on Linux is 108 including the NUL terminator;
# PostgreSQL refuses socket paths of 108 bytes or more.
_MAX_SOCKET_PATH = 107
_SOCKET_NAME_MAX = ".s.PGSQL.65535"

# Characters that pg_ctl cannot pass through its `/bin/sh -c "exec ..."` command
# line inside double quotes (-D and -l are quoted that way by pg_ctl itself).
_UNSAFE_PATH_CHARS = frozenset('"$`\\\n')

_HBA_CONF = """\
# Written by maplookup (maplookup/embedded.py).
# Trust on the private unix socket directory and on loopback IPv4 only.
# TYPE  DATABASE  USER  ADDRESS        METHOD
local   all       all                  trust
host    all       all   127.0.0.1/32   trust
"""


class EmbeddedPostgresError(Exception):
    """The private cluster could not be set up, started or stopped.

    Messages are one line and say what to do, because they end up printed by
    the CLI in front of an administrator.
    """


# --------------------------------------------------------------------------
# locating things


def _has_binaries(d: Path) -> bool:
    return all(os.access(d / name, os.X_OK) and (d / name).is_file() for name in _REQUIRED_BINARIES)


def _version_key(d: Path) -> tuple[int, ...]:
    """Sort key for /usr/lib/postgresql/<version>/bin so that 15 beats 9.6."""
    parts: list[int] = []
    for piece in d.parent.name.split("."):
        try:
            parts.append(int(piece))
        except ValueError:
            return (-1,)
    return tuple(parts)


def find_pg_bin_dir() -> Path:
    """Find the directory holding the PostgreSQL server binaries.

    PATH wins so that an administrator can choose a version explicitly; Debian
    and Ubuntu keep server binaries off PATH under /usr/lib/postgresql/<v>/bin
    (newest wins); source builds default to /usr/local/pgsql/bin.
    """
    tried: list[str] = []
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if entry:
            candidate = Path(entry)
            if _has_binaries(candidate):
                # /usr/local/bin/pg_ctl -> /usr/lib/postgresql/15/bin/pg_ctl: prefer the
                # real directory, which also holds postgres, psql and friends.
                real = (candidate / "pg_ctl").resolve().parent
                return real if _has_binaries(real) else candidate
    tried.append("PATH")
    versioned = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for candidate in versioned:
        if _has_binaries(candidate):
            return candidate
    tried.append("/usr/lib/postgresql/*/bin")
    fallback = Path("/usr/local/pgsql/bin")
    if _has_binaries(fallback):
        return fallback
    tried.append(str(fallback))
    raise EmbeddedPostgresError(
        f"PostgreSQL server binaries ({', '.join(_REQUIRED_BINARIES)}) not found; tried "
        f"{', '.join(tried)}; install the PostgreSQL server (e.g. `apt-get install postgresql`) "
        "or configure a database DSN instead of the embedded cluster"
    )


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


# --------------------------------------------------------------------------
# running commands


@dataclass(frozen=True)
class _RunAs:
    """Who runs the server binaries, and whether that needs a uid switch."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    switch: bool


def _resolve_run_as(run_as_user: str | None) -> _RunAs:
    euid = os.geteuid()
    if run_as_user is None:
        if euid != 0:
            pw = pwd.getpwuid(euid)
            return _RunAs(pw.pw_name, pw.pw_uid, pw.pw_gid, (pw.pw_gid,), pw.pw_dir, switch=False)
        run_as_user = "postgres"
    try:
        pw = pwd.getpwnam(run_as_user)
    except KeyError:
        raise EmbeddedPostgresError(
            f"user {run_as_user!r} (which should run the embedded PostgreSQL) does not exist; "
            f"create it (e.g. `useradd --system {run_as_user}`) or configure another user"
        ) from None
    if pw.pw_uid == 0:
        raise EmbeddedPostgresError(
            f"PostgreSQL refuses to run as root (user {run_as_user!r} has uid 0); "
            "configure an unprivileged run-as user such as 'postgres'"
        )
    if pw.pw_uid == euid:
        return _RunAs(pw.pw_name, pw.pw_uid, pw.pw_gid, (pw.pw_gid,), pw.pw_dir, switch=False)
    if euid != 0:
        raise EmbeddedPostgresError(
            f"cannot run the embedded PostgreSQL as user {run_as_user!r} without root; "
            "run as that user or leave the run-as user unset"
        )
    groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
    return _RunAs(pw.pw_name, pw.pw_uid, pw.pw_gid, groups, pw.pw_dir, switch=True)


def _child_env(ra: _RunAs) -> dict[str, str]:
    """Environment for PostgreSQL binaries.

    PG* variables from the caller (PGDATA, PGPORT, PGHOST...) would silently
    redirect pg_ctl or initdb, so they are dropped.  LC_ALL=C keeps messages in
    English so that errors are recognisable; the cluster's own locale is set
    explicitly at initdb time.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PG") and not k.startswith("LC_") and k not in ("LANG", "LANGUAGE")
    }
    env["LC_ALL"] = "C"
    if ra.switch:
        env.update(HOME=ra.home, USER=ra.name, LOGNAME=ra.name)
    return env


def _run(
    argv: list[str], ra: _RunAs, timeout: float, what: str
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL binary as the run-as user, with a hard timeout.

    The child gets its own session so that on timeout the whole group (a
    switched-user pg_ctl and its shell) can be killed; the postmaster puts
    itself in a separate session, so a started server is never killed here.
    """
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=_child_env(ra),
        cwd="/",  # the caller's cwd (e.g. /root) may be unreadable for the run-as user
        start_new_session=True,
        user=ra.uid if ra.switch else None,
        group=ra.gid if ra.switch else None,
        extra_groups=list(ra.groups) if ra.switch else None,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise EmbeddedPostgresError(
            f"{what} did not finish within {timeout:.0f} s; see {argv[0]} and the server log"
        ) from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _tail(text: str, lines: int = 6, limit: int = 800) -> str:
    """Last few non-empty lines joined into one line, for error messages."""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    joined = " | ".join(kept)
    if len(joined) > limit:
        joined = "..." + joined[-limit:]
    return joined or "(no output)"


def _run_async(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run an asyncio coroutine from blocking code, whatever loop the caller has.

    A fresh thread means this works from plain code, from inside a running
    asyncio loop and from trio alike.  The coroutine is created in that thread
    so that it can never be left un-awaited.
    """
    with concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="maplookup-embedded"
    ) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _pick_free_port() -> int:
    """Ask the kernel for a free loopback port (racy, so start() retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _can_search(path: Path, ra: _RunAs) -> bool:
    """POSIX permission check for directory search by the run-as user.

    Only the owner class applies to the owner, only the group class to group
    members; ACLs are not considered here (the caller double-checks).
    """
    st = path.stat()
    if st.st_uid == ra.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in ra.groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _can_search_really(path: Path, ra: _RunAs) -> bool:
    """Ask the kernel, as the run-as user, so that ACLs are honoured too."""
    test = shutil.which("test")
    if test is None:
        return False
    try:
        return _run([test, "-x", str(path)], ra, 10, "test -x").returncode == 0
    except (OSError, EmbeddedPostgresError):
        return False


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# --------------------------------------------------------------------------
# the cluster


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL cluster living in `state_dir`, started and stopped on demand.

    `port` is the requested TCP port (0: pick a free one at every start); after
    start() it holds the port actually in use.  `fast_unsafe` turns off fsync
    and friends: for throwaway test clusters only, a crash can corrupt data.
    """

    state_dir: Path
    run_as_user: str | None = None
    port: int = 0
    database: str = "maplookup"
    superuser: str = "maplookup"
    fast_unsafe: bool = False
    bin_dir: Path | None = None
    """Directory with pg_ctl and initdb; None means find_pg_bin_dir()."""

    _requested_port: int = field(init=False, repr=False)
    _dsn: str | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        self.state_dir = Path(os.path.abspath(os.fspath(self.state_dir)))
        self._requested_port = self.port
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        for label, name in (("database", self.database), ("superuser", self.superuser)):
            if not name or "\0" in name:
                raise ValueError(f"{label} name must be non-empty and contain no NUL")

    # -- paths ---------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.state_dir / PGDATA_NAME

    @property
    def socket_dir(self) -> Path:
        return self.state_dir / RUN_NAME

    @property
    def log_file(self) -> Path:
        return self.state_dir / LOG_DIR_NAME / LOG_FILE_NAME

    @property
    def dsn_file(self) -> Path:
        return self.state_dir / DSN_FILE_NAME

    # -- DSNs ------------------------------------------------------------------

    def _socket_dsn(self) -> str:
        user = urllib.parse.quote(self.superuser, safe="")
        db = urllib.parse.quote(self.database, safe="")
        host = urllib.parse.quote(str(self.socket_dir), safe="/")
        return f"postgresql://{user}@/{db}?host={host}&port={self.port}"

    @property
    def dsn(self) -> str:
        """Unix-socket DSN; understood by both asyncpg and libpq (psql)."""
        return self._require_started()

    @property
    def tcp_dsn(self) -> str:
        """Loopback TCP DSN, for clients that cannot use unix sockets."""
        self._require_started()
        user = urllib.parse.quote(self.superuser, safe="")
        db = urllib.parse.quote(self.database, safe="")
        return f"postgresql://{user}@127.0.0.1:{self.port}/{db}"

    def _require_started(self) -> str:
        if self._dsn is None:
            raise EmbeddedPostgresError(
                f"embedded PostgreSQL in {self.state_dir} is not started; call start() first"
            )
        return self._dsn

    # -- public operations ---------------------------------------------------------

    def is_running(self) -> bool:
        """Whether a postmaster is alive in our data directory (started by anyone)."""
        return _running_postmaster(self.data_dir) is not None

    def start(self) -> str:
        """Initialise if needed, start (or adopt a running server), return the DSN.

        Idempotent: an initialised data directory is reused, and a server left
        running in it by an earlier process is adopted when it listens where we
        want it to, or restarted cleanly when it does not.
        """
        bin_dir = self._resolve_bin_dir()
        ra = _resolve_run_as(self.run_as_user)
        self._check_paths()
        self._prepare_dirs(ra)
        with self._locked():
            started_here = False
            info = _running_postmaster(self.data_dir)
            if info is not None and self._can_adopt(info):
                log.info(
                    "reusing PostgreSQL already running in %s (pid %d)", self.data_dir, info.pid
                )
                self.port = info.port
            else:
                if info is not None:
                    log.info("restarting PostgreSQL in %s: it listens elsewhere", self.data_dir)
                    self._pg_ctl_stop(bin_dir, ra, "fast")
                if not (self.data_dir / "PG_VERSION").is_file():
                    self._initdb(bin_dir, ra)
                self._check_data_dir_owner(ra)
                self._pg_ctl_start(bin_dir, ra)
                started_here = True
            try:
                self._ensure_database()
                dsn = self._socket_dsn()
                self._write_dsn_file(dsn)
            except BaseException:
                if started_here:
                    with contextlib.suppress(Exception):
                        self._pg_ctl_stop(bin_dir, ra, "immediate")
                raise
            self._dsn = dsn
            log.info("embedded PostgreSQL ready in %s on port %d", self.state_dir, self.port)
            return dsn

    def stop(self, mode: str = "fast") -> None:
        """Stop the server in state_dir (whoever started it) and remove the dsn file.

        Harmless when nothing runs, so it can sit in finally blocks and be called
        twice.
        """
        if mode not in _STOP_MODES:
            raise ValueError(f"stop mode must be one of {', '.join(_STOP_MODES)}, got {mode!r}")
        self._dsn = None
        if not self.state_dir.is_dir():
            return
        with self._locked():
            if _running_postmaster(self.data_dir) is not None:
                self._pg_ctl_stop(self._resolve_bin_dir(), _resolve_run_as(self.run_as_user), mode)
            self.dsn_file.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.stop()
            return
        # Do not let a failing stop hide the exception that got us here.
        try:
            self.stop()
        except Exception:
            log.exception("stopping embedded PostgreSQL in %s failed", self.state_dir)

    # -- helpers: checks and directories -----------------------------------------

    def _resolve_bin_dir(self) -> Path:
        if self.bin_dir is None:
            return find_pg_bin_dir()
        bin_dir = Path(self.bin_dir)
        missing = [n for n in _REQUIRED_BINARIES if not os.access(bin_dir / n, os.X_OK)]
        if missing:
            raise EmbeddedPostgresError(
                f"PostgreSQL bin directory {bin_dir} lacks {', '.join(missing)}; "
                "point it at the directory holding pg_ctl and initdb "
                "(e.g. /usr/lib/postgresql/15/bin) or leave it unset to search"
            )
        return bin_dir

    def _check_paths(self) -> None:
        """Reject state directories PostgreSQL cannot use, before touching disk."""
        bad = sorted(set(str(self.state_dir)) & _UNSAFE_PATH_CHARS)
        if bad:
            raise EmbeddedPostgresError(
                f"state directory {str(self.state_dir)!r} contains {' '.join(map(repr, bad))}, "
                "which pg_ctl cannot pass through its shell command line; choose a plainer path"
            )
        sock = len(os.fsencode(self.socket_dir)) + 1 + len(_SOCKET_NAME_MAX)
        if sock > _MAX_SOCKET_PATH:
            raise EmbeddedPostgresError(
                f"state directory {self.state_dir} is too long for a unix socket path "
                f"({sock} > {_MAX_SOCKET_PATH} bytes); choose a shorter state directory"
            )

    def _dir_chain(self) -> list[Path]:
        """Existing directories from / down to state_dir, including symlink targets."""
        chain: list[Path] = []
        for p in (self.state_dir, self.state_dir.resolve()):
            for d in [*reversed(p.parents), p]:
                if d not in chain and d.is_dir():
                    chain.append(d)
        return chain

    def _check_traversable(self, ra: _RunAs, *, exclude: Path | None = None) -> None:
        for d in self._dir_chain():
            if d == exclude or _can_search(d, ra) or _can_search_really(d, ra):
                continue
            st = d.stat()
            raise EmbeddedPostgresError(
                f"directory {d} is not traversable by user {ra.name!r}, which runs the embedded "
                f"PostgreSQL (owner {_owner_name(st.st_uid)}:{_group_name(st.st_gid)}, mode "
                f"{stat.S_IMODE(st.st_mode):04o}); grant search permission (`chmod o+x {d}`) "
                "or choose a state directory below traversable directories, e.g. /var/lib/maplookup"
            )

    def _prepare_dirs(self, ra: _RunAs) -> None:
        """Create the state layout with the ownership and modes PostgreSQL needs."""
        if ra.switch:
            # Check what exists before creating anything, so that a bad location
            # fails without leaving directories behind.
            self._check_traversable(ra, exclude=self.state_dir)
        missing = [d for d in [*reversed(self.state_dir.parents), self.state_dir] if not d.exists()]
        try:
            for d in missing:
                d.mkdir(mode=0o755)
                os.chmod(d, 0o755)  # noqa: S103 -- ours; the run-as user must traverse it
            st = self.state_dir.stat()
            if ra.switch and st.st_uid == os.geteuid() and not _can_search(self.state_dir, ra):
                os.chmod(self.state_dir, stat.S_IMODE(st.st_mode) | 0o011)  # noqa: S103 -- search only
            if ra.switch:
                self._check_traversable(ra)
            for d, mode in ((self.socket_dir, 0o700), (self.log_file.parent, 0o750)):
                d.mkdir(mode=mode, exist_ok=True)
                if ra.switch:
                    os.chown(d, ra.uid, ra.gid)
                os.chmod(d, mode)
            if ra.switch and self.log_file.exists():
                os.chown(self.log_file, ra.uid, ra.gid)
        except OSError as e:
            raise EmbeddedPostgresError(
                f"cannot prepare state directory {self.state_dir}: {e.strerror} ({e.filename}); "
                "fix its permissions or choose another state directory"
            ) from e

    def _check_data_dir_owner(self, ra: _RunAs) -> None:
        st = self.data_dir.stat()
        if st.st_uid != ra.uid:
            owner = _owner_name(st.st_uid)
            raise EmbeddedPostgresError(
                f"data directory {self.data_dir} belongs to {owner!r} but the cluster runs as "
                f"{ra.name!r}; `chown -R {ra.name} {self.data_dir}` or set the run-as user "
                f"to {owner!r}"
            )
        with contextlib.suppress(OSError):
            os.chmod(self.data_dir, 0o700)  # PostgreSQL insists on 0700/0750

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise start/stop across processes sharing this state directory."""
        fd = os.open(self.state_dir / LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _can_adopt(self, info: _PostmasterInfo) -> bool:
        return (
            info.socket_dir == str(self.socket_dir)
            and info.listen_addr == "127.0.0.1"
            and info.port > 0
            and self._requested_port in (0, info.port)
            and info.status != "stopping"
        )

    # -- helpers: PostgreSQL binaries ---------------------------------------

    def _initdb(self, bin_dir: Path, ra: _RunAs) -> None:
        """Create the cluster in a scratch directory and rename it into place.

        A failed or interrupted initdb therefore never leaves a half-made
        pgdata that later starts would trip over.
        """
        pgdata = self.data_dir
        if pgdata.exists():
            if any(pgdata.iterdir()):
                raise EmbeddedPostgresError(
                    f"{pgdata} exists but is not a PostgreSQL data directory (no PG_VERSION); "
                    "move it away so that a fresh cluster can be created"
                )
            pgdata.rmdir()
        tmp = self.state_dir / _INITDB_TMP_NAME
        log.info("initialising PostgreSQL cluster in %s", pgdata)
        result: subprocess.CompletedProcess[str] | None = None
        for locale in ("C.UTF-8", "C"):
            self._fresh_dir(tmp, ra)
            argv = [
                str(bin_dir / "initdb"),
                "-D",
                str(tmp),
                "-U",
                self.superuser,
                "-E",
                "UTF8",
                f"--locale={locale}",
                "--auth-local=trust",
                "--auth-host=trust",
                "--no-instructions",
            ]
            if self.fast_unsafe:
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

    def _fresh_dir(self, path: Path, ra: _RunAs) -> None:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(mode=0o700)
        if ra.switch:
            os.chown(path, ra.uid, ra.gid)
        os.chmod(path, 0o700)

    def _server_options(self, port: int) -> str:
        """The -o string for pg_ctl; it goes through /bin/sh, hence shlex.quote."""
        sockdir = str(self.socket_dir)
        if any(c in sockdir for c in " ,\t'"):
            sockdir = f'"{sockdir}"'  # GUC list syntax
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(port),
            "unix_socket_directories": sockdir,
        }
        if self.fast_unsafe:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        return " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in settings.items())

    def _read_log_from(self, offset: int) -> str:
        try:
            with self.log_file.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _pg_ctl_start(self, bin_dir: Path, ra: _RunAs) -> None:
        _wait_for_unreaped_postmaster(self.data_dir)
        attempts = 1 if self._requested_port else 3
        for attempt in range(1, attempts + 1):
            port = self._requested_port or _pick_free_port()
            try:
                offset = self.log_file.stat().st_size
            except OSError:
                offset = 0
            argv = [
                str(bin_dir / "pg_ctl"),
                "start",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                str(PG_CTL_TIMEOUT),
                "-s",
                "-o",
                self._server_options(port),
            ]
            result = _run(argv, ra, PG_CTL_TIMEOUT + 30, "pg_ctl start")
            if result.returncode == 0:
                self.port = port
                return
            logged = self._read_log_from(offset)
            # pg_ctl may give up waiting while the postmaster lives on: don't leak it.
            if _running_postmaster(self.data_dir) is not None:
                with contextlib.suppress(EmbeddedPostgresError):
                    self._pg_ctl_stop(bin_dir, ra, "immediate")
            port_taken = "could not bind" in logged or "already in use" in logged
            if port_taken and attempt < attempts:
                log.info("port %d was taken meanwhile, retrying with another", port)
                continue
            raise EmbeddedPostgresError(
                f"PostgreSQL failed to start (pg_ctl exit {result.returncode}); "
                f"{self.log_file} ends with: {_tail(logged or result.stderr)}"
            )

    def _pg_ctl_stop(self, bin_dir: Path, ra: _RunAs, mode: str) -> None:
        argv = [
            str(bin_dir / "pg_ctl"),
            "stop",
            "-D",
            str(self.data_dir),
            "-m",
            mode,
            "-w",
            "-t",
            str(PG_CTL_TIMEOUT),
            "-s",
        ]
        result = _run(argv, ra, PG_CTL_TIMEOUT + 30, "pg_ctl stop")
        if result.returncode != 0 and _running_postmaster(self.data_dir) is not None:
            raise EmbeddedPostgresError(
                f"stopping PostgreSQL in {self.data_dir} failed (pg_ctl exit "
                f"{result.returncode}): {_tail(result.stderr)}; try stop mode 'immediate'"
            )

    # -- helpers: database and dsn file ---------------------------------------

    def _ensure_database(self) -> None:
        """Create `database` if missing, waiting out a server still starting up."""
        host, port, user, database = str(self.socket_dir), self.port, self.superuser, self.database

        async def ensure() -> None:
            deadline = time.monotonic() + CONNECT_TIMEOUT
            while True:
                try:
                    conn = await asyncpg.connect(
                        host=host, port=port, user=user, database="postgres", timeout=10
                    )
                    break
                except (TimeoutError, asyncpg.CannotConnectNowError, OSError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            try:
                exists = await conn.fetchval(
                    "SELECT 1 FROM pg_database WHERE datname = $1", database
                )
                if not exists:
                    with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                        await conn.execute(f"CREATE DATABASE {_quote_ident(database)}")
            finally:
                await conn.close()

        try:
            _run_async(ensure)
        except (TimeoutError, asyncpg.PostgresError, OSError) as e:
            raise EmbeddedPostgresError(
                f"could not create database {database!r} in the embedded PostgreSQL "
                f"({type(e).__name__}: {e}); see {self.log_file}"
            ) from e

    def _write_dsn_file(self, dsn: str) -> None:
        """Atomically publish the DSN so that readers never see half a line."""
        tmp = self.state_dir / f".{DSN_FILE_NAME}.tmp"
        tmp.write_text(dsn + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.dsn_file)


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
