"""A private PostgreSQL cluster owned by maplookup.

`maplookup serve` without a configured database, and the test suite, both need
a real PostgreSQL server without asking an administrator to set one up.  This
package runs one out of a state directory that it owns::

    state_dir/pgdata                 data directory (mode 0700, owned by the run-as user)
    state_dir/run                    unix socket directory (mode 0700, run-as user)
    state_dir/log/postgresql.log     server log (pg_ctl -l)
    state_dir/dsn                    DSN of the running cluster, for admin commands
    state_dir/server-ids             default uid/gid of the server using it, for them too
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

The modules:

- ``errors``: :class:`EmbeddedPostgresError`, raised by all of them;
- ``binaries``: finding pg_ctl and initdb (:func:`find_pg_bin_dir`);
- ``runas``: running those binaries as the run-as user, and checking that user can
  reach the state directory;
- ``state``: the state directory's layout and default location, and what a running
  cluster leaves there (postmaster.pid, the dsn file: :func:`read_running_dsn`),
  plus :func:`loopback_dsn`;
- ``postmaster``: initdb, pg_ctl start and stop on the data directory;
- ``database``: creating the maplookup database in the started cluster;
- ``cluster``: :class:`EmbeddedPostgres`, the cluster's lifecycle.

Layer: operations, beside ``metrics``: no ``serve``, ``cli`` or lookup code; the
server and the admin commands both use it (tests/unit/test_layers.py).
"""

from __future__ import annotations

from .binaries import find_pg_bin_dir
from .cluster import EmbeddedPostgres
from .errors import EmbeddedPostgresError
from .state import (
    default_state_dir,
    loopback_dsn,
    read_running_dsn,
    read_server_ids,
    remove_server_ids,
    write_server_ids,
)

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "default_state_dir",
    "find_pg_bin_dir",
    "loopback_dsn",
    "read_running_dsn",
    "read_server_ids",
    "remove_server_ids",
    "write_server_ids",
]
