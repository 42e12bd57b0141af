"""A primary and a streaming hot standby on this machine, for the benchmarks.

Both are :class:`~maplookup.embedded.EmbeddedPostgres` clusters (``fast_unsafe``, run as
``postgres`` when we are root), the standby made with ``pg_basebackup -R``
(:func:`maplookup.embedded.standby.create_standby`), as ``tests/replication/pair.py`` runs
them for the tests.  Each has a fixed loopback port, so DSNs stay valid while the primary is
stopped and started again.

``fast_unsafe`` turns ``synchronous_commit`` off, which lets a commit's WAL wait up to
``wal_writer_delay`` (200 ms) before the walsender may send it: not what a production primary
does (PostgreSQL's default is on).  The benchmark database therefore gets
``synchronous_commit = on`` (fsync stays off), so a commit is on its way to the standby when
it returns, as in production.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import asyncpg

from bench.lib.common import BenchError
from maplookup.embedded import EmbeddedPostgres
from maplookup.embedded.standby import create_standby
from maplookup.testing import free_port

REPLAY_TIMEOUT_S = 30.0

# The end of the WAL flushed so far (what the walsender can send); not the insert position,
# which can point past a page header that no record fills until the next write.
FLUSH_LSN = "SELECT pg_current_wal_flush_lsn()::text"
REPLAYED = "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn"


class ReplicatedClusters:
    """A running primary and standby in temporary directories under /tmp; ``close()`` ends both."""

    def __init__(self) -> None:
        self.directories: list[Path] = []
        self.primary: EmbeddedPostgres | None = None
        self.standby: EmbeddedPostgres | None = None

    def start(self) -> None:
        for role in ("primary", "standby"):
            directory = Path(tempfile.mkdtemp(prefix=f"maplookup-bench-{role}-", dir="/tmp"))
            directory.chmod(0o755)  # the run-as user (postgres, when we are root) traverses it
            self.directories.append(directory)
        self.primary = EmbeddedPostgres(self.directories[0], port=free_port(), fast_unsafe=True)
        self.primary.start()
        asyncio.run(self._synchronous_commit())
        self.standby = create_standby(self.primary, self.directories[1] / "state", port=free_port())
        self.standby.start()
        self.wait_until_replayed()

    async def _synchronous_commit(self) -> None:
        conn = await asyncpg.connect(self.primary_dsn, timeout=10)
        try:
            database = self.database
            await conn.execute(f'ALTER DATABASE "{database}" SET synchronous_commit = on')
        finally:
            await conn.close()

    @property
    def database(self) -> str:
        assert self.primary is not None
        return self.primary.database

    @staticmethod
    def _dsn(cluster: EmbeddedPostgres | None) -> str:
        assert cluster is not None
        return f"postgresql://{cluster.superuser}@127.0.0.1:{cluster.port}/{cluster.database}"

    @property
    def primary_dsn(self) -> str:
        """Loopback TCP with the primary's fixed port: valid while it is down, too."""
        return self._dsn(self.primary)

    @property
    def standby_dsn(self) -> str:
        return self._dsn(self.standby)

    def postmaster_pids(self) -> list[int]:
        """The running clusters' postmasters (to account for their CPU)."""
        pids = []
        for cluster in (self.primary, self.standby):
            if cluster is None:
                continue
            try:
                text = (cluster.data_dir / "postmaster.pid").read_text()
                pids.append(int(text.split()[0]))
            except (OSError, ValueError, IndexError):
                continue
        return pids

    def stop_primary(self) -> None:
        """``pg_ctl stop -m immediate``: a crash, as far as the standby can tell."""
        assert self.primary is not None
        self.primary.stop(mode="immediate")

    def start_primary(self) -> None:
        assert self.primary is not None
        self.primary.start()

    def wait_until_replayed(self, timeout_s: float = REPLAY_TIMEOUT_S) -> None:
        """Return once the standby has replayed everything flushed on the primary so far."""
        asyncio.run(self._wait_until_replayed(timeout_s))

    async def _wait_until_replayed(self, timeout_s: float) -> None:
        conn = await asyncpg.connect(self.primary_dsn, timeout=10)
        try:
            target = await conn.fetchval(FLUSH_LSN)
        finally:
            await conn.close()
        deadline = time.monotonic() + timeout_s
        conn = await asyncpg.connect(self.standby_dsn, timeout=10)
        try:
            while not await conn.fetchval(REPLAYED, target):
                if time.monotonic() > deadline:
                    raise BenchError(f"the standby has not replayed {target} after {timeout_s} s")
                await asyncio.sleep(0.01)
        finally:
            await conn.close()

    def close(self) -> None:
        """Stop both clusters (immediate) and remove their directories."""
        try:
            for cluster in (self.standby, self.primary):
                if cluster is not None:
                    cluster.stop(mode="immediate")
        finally:
            for directory in self.directories:
                shutil.rmtree(directory, ignore_errors=True)
            self.directories = []
