"""EmbeddedPostgres: the lifecycle of the private cluster in a state directory.

initdb on first use, start (or adopt a server an earlier process left running), create the
database, publish the DSN, stop.  One class, because every step works on the same state
directory and the same run-as user; it decides which step runs when, and prepares and checks
the state directory.  Finding binaries, switching users, reading postmaster.pid, running
initdb and pg_ctl (``postmaster``) and creating the database (``database``) are the
neighbouring modules' business.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from .binaries import _REQUIRED_BINARIES, find_pg_bin_dir
from .database import ensure_database
from .errors import EmbeddedPostgresError
from .postmaster import initdb, pg_ctl_start, pg_ctl_stop
from .runas import (
    _can_search,
    _can_search_really,
    _group_name,
    _owner_name,
    _resolve_run_as,
    _RunAs,
)
from .state import (
    DSN_FILE_NAME,
    LOCK_FILE_NAME,
    LOG_DIR_NAME,
    LOG_FILE_NAME,
    PGDATA_NAME,
    RUN_NAME,
    SERVE_LOCK_FILE_NAME,
    _PostmasterInfo,
    _running_postmaster,
)

# The name this logger had before embedded.py became a package: log lines keep saying
# logger=maplookup.embedded.
log = logging.getLogger("maplookup.embedded")

_STOP_MODES = ("smart", "fast", "immediate")

# sizeof(sockaddr_un.sun_path) on Linux is 108 including the NUL terminator;
# PostgreSQL refuses socket paths of 108 bytes or more.
_MAX_SOCKET_PATH = 107
_SOCKET_NAME_MAX = ".s.PGSQL.65535"

# Characters that pg_ctl cannot pass through its `/bin/sh -c "exec ..."` command
# line inside double quotes (-D and -l are quoted that way by pg_ctl itself).
_UNSAFE_PATH_CHARS = frozenset('"$`\\\n')

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
                    pg_ctl_stop(bin_dir, ra, self.data_dir, "fast")
                if not (self.data_dir / "PG_VERSION").is_file():
                    initdb(
                        bin_dir,
                        ra,
                        state_dir=self.state_dir,
                        data_dir=self.data_dir,
                        superuser=self.superuser,
                        fast_unsafe=self.fast_unsafe,
                    )
                self._check_data_dir_owner(ra)
                self.port = pg_ctl_start(
                    bin_dir,
                    ra,
                    data_dir=self.data_dir,
                    log_file=self.log_file,
                    socket_dir=self.socket_dir,
                    requested_port=self._requested_port,
                    fast_unsafe=self.fast_unsafe,
                )
                started_here = True
            try:
                ensure_database(
                    self.socket_dir, self.port, self.superuser, self.database, self.log_file
                )
                dsn = self._socket_dsn()
                self._write_dsn_file(dsn)
            except BaseException:
                if started_here:
                    with contextlib.suppress(Exception):
                        pg_ctl_stop(bin_dir, ra, self.data_dir, "immediate")
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
                pg_ctl_stop(
                    self._resolve_bin_dir(), _resolve_run_as(self.run_as_user), self.data_dir, mode
                )
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

    # -- helpers: dsn file ---------------------------------------------------------

    def _write_dsn_file(self, dsn: str) -> None:
        """Atomically publish the DSN so that readers never see half a line."""
        tmp = self.state_dir / f".{DSN_FILE_NAME}.tmp"
        tmp.write_text(dsn + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.dsn_file)
