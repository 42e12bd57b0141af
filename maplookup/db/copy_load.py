"""Read a complete copy of the maps from PostgreSQL: a whole snapshot, or some partitions.

Both read inside ``feed.snapshot(conn)`` (one REPEATABLE READ transaction and the change-log
position it sees), on the change feed's own connection, so the copy reads exactly the server
the feed follows and whose lookups it replaces (db/changes.py pins the pool to it too).

A whole snapshot is streamed through server-side cursors, ``COPY_CHUNK_ROWS`` rows at a time,
into a ``CopyBuilder``: holding every row before building would cost more than the copy
itself (bench/README.md, "Complete copy": 417 MiB of row tuples at 1M mailboxes).  After
each chunk the builder's size estimate is checked against ``max_bytes``, so that a snapshot
too large for the bound is refused (``CopyTooLarge``) with at most one chunk beyond it in
memory, not after the whole table.  Each chunk is bounded by ``chunk_timeout_s`` (a silent
network failure ends the load rather than hanging it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import asyncpg

from maplookup.db.feed import snapshot
from maplookup.lookup.complete.rows import PARTITION_QUERIES, SNAPSHOT_QUERIES, SnapshotRows
from maplookup.lookup.complete.store import CopyBuilder, MapsCopy

#: Rows fetched per round trip while a snapshot streams in: large enough that the round trips
#: cost little beside building (about 2 µs a row), small enough that the asyncio thread
#: (which also runs the lookups the database still answers) is never busy for long at once
#: (5,000 rows: about 10 ms).
COPY_CHUNK_ROWS = 5000


class CopyTooLarge(Exception):
    """The snapshot would take more memory than ``cache.complete_max_bytes``."""

    def __init__(self, estimated_bytes: int, rows: int, max_bytes: int) -> None:
        super().__init__(
            f"the copy grew past {estimated_bytes:,} bytes (estimated) after {rows:,} rows, "
            f"above cache.complete_max_bytes = {max_bytes:,}"
        )
        self.estimated_bytes = estimated_bytes
        self.rows = rows
        self.max_bytes = max_bytes


@dataclass(frozen=True, slots=True)
class LoadedCopy:
    copy: MapsCopy
    position: int  # the change-log position the snapshot is the state of
    rows: int  # rows read
    estimated_bytes: int
    seconds: float  # how long the load took


async def load_snapshot(
    conn: asyncpg.Connection,
    max_bytes: int,
    chunk_timeout_s: float,
    chunk_rows: int = COPY_CHUNK_ROWS,
) -> LoadedCopy:
    """A complete copy as of one snapshot, and its position; CopyTooLarge past ``max_bytes``."""
    started = time.monotonic()
    builder = CopyBuilder(MapsCopy(), None)
    async with snapshot(conn) as position:
        for table, query in SNAPSHOT_QUERIES.items():
            cursor = await conn.cursor(query)
            while True:
                async with asyncio.timeout(chunk_timeout_s):
                    rows = await cursor.fetch(chunk_rows)
                if not rows:
                    break
                builder.add(table, rows)
                if builder.estimated_bytes() > max_bytes:
                    raise CopyTooLarge(builder.estimated_bytes(), builder.rows, max_bytes)
    estimated = builder.estimated_bytes()
    return LoadedCopy(
        builder.finish(), position, builder.rows, estimated, time.monotonic() - started
    )


async def read_partitions(
    conn: asyncpg.Connection, names: Iterable[str], timeout_s: float
) -> SnapshotRows:
    """Every row of the partitions of ``names`` (what ``MapsCopy.replace`` takes), in one
    snapshot: the six tables as of one moment, so a change spanning tables (a domain and its
    mailboxes) is never seen half-way."""
    wanted = sorted(names)
    tables: dict[str, Any] = {}
    async with asyncio.timeout(timeout_s), snapshot(conn):
        for table, query in PARTITION_QUERIES.items():
            # asyncpg Records unpack like the tuples rows.py names.
            tables[table] = await conn.fetch(query, wanted)
    return SnapshotRows(**tables)
