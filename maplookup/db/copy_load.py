"""Read a complete copy of the maps from PostgreSQL: a whole snapshot, or some partitions.

A snapshot is read inside ``feed.snapshot(conn)`` (one REPEATABLE READ transaction and the
change-log position it sees), partitions by one statement (one snapshot by itself), both on
the change feed's own connection, so the copy reads exactly the server
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
from dataclasses import dataclass
from typing import Final

import asyncpg

from maplookup.db.feed import EVERYTHING, Change, snapshot
from maplookup.lookup.complete.rows import (
    SNAPSHOT_QUERIES,
    SnapshotRows,
    partition_arrays,
    record_arrays,
    record_keys_relation,
)
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


#: The changes after ``$1`` (at most ``$2``), as ``feed.changes_after`` reads them, with the
#: rows each touched.  Only the change log: an idle poll must not wait on a lock that an
#: ALTER TABLE, VACUUM FULL or a long TRUNCATE holds on a map table.
CHANGES_QUERY: Final = (
    "SELECT change_position, domains, records FROM maplookup.changes_with_records_after($1, $2)"
)

#: Record keys beyond which a batch of changes reloads the copy (a snapshot, streamed in
#: chunks) rather than reading the rows by key in one statement: a bulk change of that many
#: rows is an import, and one statement reading them all could outlast the query timeout.
MAX_RECORDS_PER_READ: Final = 10_000


@dataclass(frozen=True, slots=True)
class ChangePlan:
    """What applying a batch of changes takes."""

    flush: bool  # a change of everything (TRUNCATE, a pruned log), or too many rows: reload
    names: frozenset[str]  # domains to re-read whole (domain rows, statements past 1000 rows)
    keys: frozenset[str]  # record keys to re-read (``table:local_part@domain``)


def plan_changes(changes: list[Change]) -> ChangePlan:
    """The reads a batch of changes asks of the copy."""
    whole = [change for change in changes if change.records is None]
    keys = frozenset(key for change in changes for key in change.records or ())
    return ChangePlan(
        flush=any(EVERYTHING in change.domains for change in whole)
        or len(keys) > MAX_RECORDS_PER_READ,
        names=frozenset(name for change in whole for name in change.domains),
        keys=keys,
    )


async def read_changes(conn: asyncpg.Connection, position: int, max_rows: int) -> list[Change]:
    """The changes after ``position``, oldest first, with the rows each touched."""
    return [
        Change(position, tuple(domains), None if records is None else tuple(records))
        for position, domains, records in await conn.fetch(CHANGES_QUERY, position, max_rows)
    ]


#: The partitions named in ``$1`` and the rows of the record keys in ``$2`` (both text[]), in
#: one row: one statement, so one snapshot of every table.
ROWS_QUERY: Final = (
    f"WITH keys AS ({record_keys_relation('unnest($2::text[])')}) "
    f"SELECT {partition_arrays('$1::text[]')}, {record_arrays('keys')}"
)


async def read_rows(
    conn: asyncpg.Connection, plan: ChangePlan, timeout_s: float
) -> tuple[SnapshotRows, SnapshotRows]:
    """What applying ``plan`` takes, as of one moment: the partitions of ``plan.names`` and the
    rows of ``plan.keys`` (with their domains' rows, which decide what is visible).  The rows
    may be newer than the changes read (a change committed since is in them, not yet in the
    log read): re-reading a row or a partition in a newer state is what applying that change
    will do anyway."""
    async with asyncio.timeout(timeout_s):
        row = await _one_row(conn, ROWS_QUERY, sorted(plan.names), sorted(plan.keys))
    return SnapshotRows(*row[:6]), SnapshotRows(*row[6:])


async def _one_row(conn: asyncpg.Connection, query: str, *args: object) -> asyncpg.Record:
    """The row of a select list without FROM (always exactly one)."""
    row = await conn.fetchrow(query, *args)
    if row is None:
        raise RuntimeError(f"no row from {query[:60]!r}")
    return row
