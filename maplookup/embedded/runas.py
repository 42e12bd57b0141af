"""Running the PostgreSQL binaries as the run-as user, and checking what that user can reach.

PostgreSQL refuses to run as root, so when we are root the binaries run as an unprivileged user
(``postgres`` by default): the uid/gid switch happens in the child, like ``setpriv`` and without
PAM, with a cleaned environment and a hard timeout.  The search-permission checks tell, before
anything is created, whether that user can traverse the directories down to the state directory.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import EmbeddedPostgresError

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
