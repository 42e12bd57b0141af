"""EmbeddedPostgres: the lifecycle of the private cluster in a state directory.

initdb on first use, start (or adopt a server an earlier process left running), create the
database, publish the DSN, stop.  One class, because every step works on the same state
directory and the same run-as user; finding binaries, switching users and reading
postmaster.pid are the neighbouring modules' business.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import shlex
import shutil
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

from .binaries import _REQUIRED_BINARIES, find_pg_bin_dir
from .errors import EmbeddedPostgresError
from .runas import (
    _can_search,
    _can_search_really,
    _group_name,
    _owner_name,
    _resolve_run_as,
    _run,
    _RunAs,
)
from .state import (
    _INITDB_TMP_NAME,
    DSN_FILE_NAME,
    LOCK_FILE_NAME,
    LOG_DIR_NAME,
    LOG_FILE_NAME,
    PGDATA_NAME,
    RUN_NAME,
    SERVE_LOCK_FILE_NAME,
    _PostmasterInfo,
    _running_postmaster,
    _wait_for_unreaped_postmaster,
)

# The name this logger had before embedded.py became a package: log lines keep saying
# logger=maplookup.embedded.
log = logging.getLogger("maplookup.embedded")

_T = TypeVar("_T")

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

    def claim_for_server(self) -> int:
        """Hold this state directory for one ``maplookup serve``; returns the lock's fd.

        A second server on the same state directory would adopt the running cluster and, if it
        then failed to start (its port taken by the first), stop the cluster under the first
        one: every lookup the first had not cached would answer TEMP from then on.  So the
        second refuses at once.  The lock goes with the process (and its workers), so a
        cluster left behind by a crash is still adopted by the next server.
        """
        self._prepare_dirs(_resolve_run_as(self.run_as_user))
        path = self.state_dir / SERVE_LOCK_FILE_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise EmbeddedPostgresError(
                f"another maplookup serve uses {self.state_dir} (pid {holder}): stop it first, "
                "or give this one its own --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        return fd

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
