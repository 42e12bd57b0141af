"""A streaming hot standby of an embedded cluster, and promoting it: PostgreSQL's replication
as an MX host sees it, on one machine.

The tests (``tests/replication``) and the benchmarks need a real primary and a real standby to
show that the change feed has no lag race and survives a standby's restart and promotion.
The standby is an :class:`EmbeddedPostgres` like the primary, in a state directory of its own:
its data directory comes from ``pg_basebackup -R`` (which writes ``standby.signal`` and the
``primary_conninfo`` that streams from the primary's unix socket) instead of ``initdb``, and
``start()``/``stop()`` then work on it unchanged.  Everything runs as the cluster's run-as
user, through the same helpers as initdb and pg_ctl.

The primary needs ``wal_level`` replica (PostgreSQL's default) and replication connections in
its pg_hba.conf: :func:`create_standby` adds them (trust, like every other line there: on the
private socket directory and 127.0.0.1 only) and reloads it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .cluster import EmbeddedPostgres
from .errors import EmbeddedPostgresError
from .postmaster import PG_CTL_TIMEOUT, _fresh_dir, _tail
from .runas import _resolve_run_as, _run

log = logging.getLogger("maplookup.embedded")

# A base backup of a small test cluster takes about a second; a large one is not made here.
BASE_BACKUP_TIMEOUT_S = 300.0

_REPLICATION_HBA = """\
# Added by maplookup (maplookup/embedded/standby.py): streaming standbys of this cluster.
local   replication  all                  trust
host    replication  all   127.0.0.1/32   trust
"""
_BACKUP_TMP_NAME = "pgdata.basebackup-tmp"


def allow_replication(primary: EmbeddedPostgres) -> None:
    """Let standbys connect to the running ``primary`` for replication (idempotent)."""
    hba = primary.data_dir / "pg_hba.conf"
    text = hba.read_text()
    if _REPLICATION_HBA not in text:
        with hba.open("a") as f:  # keeps the file's owner and mode
            f.write(_REPLICATION_HBA)
    _pg_ctl(primary, "reload")


def create_standby(
    primary: EmbeddedPostgres, state_dir: Path, *, port: int = 0
) -> EmbeddedPostgres:
    """A hot standby of the running ``primary`` in ``state_dir``, not yet started.

    ``port`` as for :class:`EmbeddedPostgres` (give a fixed one when its DSN must survive a
    restart).  Call ``start()`` on the result; it streams from the primary from then on.
    """
    standby = EmbeddedPostgres(
        state_dir=state_dir,
        run_as_user=primary.run_as_user,
        port=port,
        database=primary.database,
        superuser=primary.superuser,
        fast_unsafe=primary.fast_unsafe,
        bin_dir=primary.bin_dir,
    )
    if (standby.data_dir / "PG_VERSION").exists():
        raise EmbeddedPostgresError(f"{standby.data_dir} already holds a cluster")
    allow_replication(primary)
    ra = _resolve_run_as(standby.run_as_user)
    standby._check_paths()
    standby._prepare_dirs(ra)
    tmp = standby.state_dir / _BACKUP_TMP_NAME
    _fresh_dir(tmp, ra)
    argv = [
        str(standby._resolve_bin_dir() / "pg_basebackup"),
        "--host",
        str(primary.socket_dir),
        "--port",
        str(primary.port),
        "--username",
        primary.superuser,
        "--pgdata",
        str(tmp),
        "--write-recovery-conf",
        "--wal-method=stream",
        "--checkpoint=fast",
        "--no-password",
    ]
    if primary.fast_unsafe:
        argv.append("--no-sync")
    log.info("copying %s into %s for a standby", primary.data_dir, standby.data_dir)
    result = _run(argv, ra, BASE_BACKUP_TIMEOUT_S, "pg_basebackup")
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EmbeddedPostgresError(
            f"pg_basebackup from {primary.data_dir} failed (exit {result.returncode}): "
            f"{_tail(result.stderr or result.stdout)}"
        )
    os.replace(tmp, standby.data_dir)
    return standby


def promote(standby: EmbeddedPostgres) -> None:
    """End recovery on a running standby (``pg_ctl promote``): it accepts writes on return."""
    _pg_ctl(standby, "promote")


def _pg_ctl(cluster: EmbeddedPostgres, action: str) -> None:
    argv = [
        str(cluster._resolve_bin_dir() / "pg_ctl"),
        action,
        "-D",
        str(cluster.data_dir),
        "-s",
    ]
    if action == "promote":
        argv += ["-w", "-t", str(PG_CTL_TIMEOUT)]  # return once it accepts writes
    result = _run(
        argv, _resolve_run_as(cluster.run_as_user), PG_CTL_TIMEOUT + 30, f"pg_ctl {action}"
    )
    if result.returncode != 0:
        raise EmbeddedPostgresError(
            f"pg_ctl {action} on {cluster.data_dir} failed (exit {result.returncode}): "
            f"{_tail(result.stderr or result.stdout)}"
        )
