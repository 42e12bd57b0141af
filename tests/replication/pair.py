"""A real primary and a real streaming hot standby on this machine, for the tests.

Both are :class:`~maplookup.embedded.EmbeddedPostgres` clusters (initdb, pg_ctl, the run-as
user when we are root: the code ``maplookup serve`` uses for its private cluster); the standby's
data directory comes from ``pg_basebackup -R`` (:mod:`maplookup.embedded.standby`).  Each has a
fixed loopback port, so DSNs stay valid across a restart of either.

Every test gets databases of its own (``new_database``): created on the primary, they reach the
standby by replication like every other write.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from maplookup.db import admin
from maplookup.embedded import EmbeddedPostgres
from maplookup.embedded.standby import create_standby, promote
from maplookup.testing import free_port

# Replay of a small change takes milliseconds; a standby that has not caught up after this
# long is broken, not slow.  (The primary runs with synchronous_commit off: its WAL writer
# flushes, and so lets the walsender send, within wal_writer_delay, 200 ms.)
REPLAY_TIMEOUT_S = 30.0


@dataclass
class ReplicatedPair:
    primary: EmbeddedPostgres
    standby: EmbeddedPostgres
    directories: list[Path]
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @classmethod
    def start(cls) -> ReplicatedPair:
        """initdb and start a primary, copy it into a standby, start the standby."""
        directories = [Path(tempfile.mkdtemp(prefix=f"maplookup-{role}-")) for role in ("p", "s")]
        for directory in directories:
            directory.chmod(0o755)  # the clusters run as an unprivileged user when we are root
        primary = EmbeddedPostgres(directories[0], port=free_port(), fast_unsafe=True)
        primary.start()
        try:
            wal_level = _fetch(primary.tcp_dsn, "SHOW wal_level")
            if wal_level not in ("replica", "logical"):
                raise RuntimeError(f"the primary runs with wal_level {wal_level}, not replica")
            standby = create_standby(primary, directories[1] / "state", port=free_port())
            standby.start()
        except BaseException:
            primary.stop(mode="immediate")
            raise
        pair = cls(primary, standby, directories)
        pair.wait_until_replayed()
        return pair

    def close(self) -> None:
        for cluster in (self.standby, self.primary):
            cluster.stop(mode="immediate")
        for directory in self.directories:
            shutil.rmtree(directory, ignore_errors=True)

    # -- DSNs ------------------------------------------------------------------------------

    @staticmethod
    def dsn(cluster: EmbeddedPostgres, database: str) -> str:
        """Loopback TCP, with the cluster's fixed port: valid while it is down, too."""
        return f"postgresql://{cluster.superuser}@127.0.0.1:{cluster.port}/{database}"

    def new_database(self) -> tuple[str, str]:
        """A fresh database with the maplookup schema: (primary DSN, standby DSN), replayed."""
        name = f"maplookup_repl_{os.getpid()}_{next(self._numbers)}"

        async def create() -> None:
            conn = await asyncpg.connect(self.dsn(self.primary, "postgres"))
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
                # The clusters run with synchronous_commit off (fast_unsafe); here a commit is
                # flushed, and so on its way to the standby, when it returns: waiting for
                # replay then means waiting for what was committed.  (fsync stays off.)
                await conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = on')
            finally:
                await conn.close()
            conn = await asyncpg.connect(self.dsn(self.primary, name))
            try:
                await admin.init_schema(conn)
            finally:
                await conn.close()

        asyncio.run(create())
        self.wait_until_replayed()
        return self.dsn(self.primary, name), self.dsn(self.standby, name)

    # -- replication -----------------------------------------------------------------------

    def wait_until_replayed(self, timeout_s: float = REPLAY_TIMEOUT_S) -> None:
        """Return once the standby has replayed everything written on the primary so far."""
        asyncio.run(wait_until_replayed(self, timeout_s))

    def restart_standby(self) -> None:
        self.standby.stop(mode="fast")
        self.standby.start()

    def promote_standby(self) -> None:
        promote(self.standby)


async def wait_until_replayed(pair: ReplicatedPair, timeout_s: float = REPLAY_TIMEOUT_S) -> None:
    """The same as :meth:`ReplicatedPair.wait_until_replayed`, for async tests."""
    target = await _fetch_async(pair.dsn(pair.primary, "postgres"), _FLUSH_LSN)
    deadline = time.monotonic() + timeout_s
    standby = pair.dsn(pair.standby, "postgres")
    while not await _fetch_async(standby, _REPLAYED, target):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the standby has not replayed {target} after {timeout_s} s")
        await asyncio.sleep(0.01)


# The end of the WAL flushed so far: what the walsender can send.  Not the insert position,
# which can point past a page header that no record fills until the next one is written (the
# bgwriter logs one every 15 s on an idle cluster: a wait of up to 15 s).  Test databases
# commit with synchronous_commit on (new_database), so a commit is flushed when it returns.
_FLUSH_LSN = "SELECT pg_current_wal_flush_lsn()::text"
_REPLAYED = "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn"


def _fetch(dsn: str, query: str, *args: object) -> object:
    return asyncio.run(_fetch_async(dsn, query, *args))


async def _fetch_async(dsn: str, query: str, *args: object) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()
