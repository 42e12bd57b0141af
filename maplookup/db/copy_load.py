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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import asyncpg

from maplookup.db.feed import EVERYTHING, Change, snapshot
from maplookup.lookup.complete.rows import (
    PARTITIONS_QUERY,
    RECORDS_QUERY,
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


async def read_partitions(
    conn: asyncpg.Connection, names: Iterable[str], timeout_s: float
) -> SnapshotRows:
    """Every row of the partitions of ``names`` (what ``MapsCopy.replace`` takes), as of one
    moment: ``rows.PARTITIONS_QUERY``, one statement, so one snapshot of the six tables and
    one round trip."""
    async with asyncio.timeout(timeout_s):
        row = await _one_row(conn, PARTITIONS_QUERY, sorted(names))
    # The records arrive as tuples of the columns rows.py names, in its order.
    return SnapshotRows(*row)


#: The changes after ``$1`` (at most ``$2``, as ``feed.changes_after`` reads them, with the
#: rows each touched) and, in the same statement, what applying them needs: every row of the
#: domains named by the changes that list no rows (domain rows, statements past 1000 rows),
#: and the rows of the record keys the others list.  A change costs the copy one round trip,
#: as it costs the LRU cache (whose next lookup then queries), not two; and a change of one
#: mailbox reads that mailbox, whatever the size of its domain.
CHANGES_QUERY: Final = (
    "WITH changes AS (SELECT change_position, domains, records "
    "FROM maplookup.changes_with_records_after($1, $2)), "
    "whole AS (SELECT coalesce(array_agg(DISTINCT name), '{}') AS names "
    "FROM changes, unnest(changes.domains) AS name WHERE changes.records IS NULL), "
    f"keys AS ({record_keys_relation('changes, unnest(changes.records)')}) "
    "SELECT ARRAY(SELECT row(change_position, domains, records) FROM changes "
    "ORDER BY change_position) AS changes, "
    + partition_arrays("(SELECT names FROM whole)::text[]")
    + ", "
    + record_arrays("keys")
)


@dataclass(frozen=True, slots=True)
class ChangesRead:
    """A read of the log with what applying it takes (:data:`CHANGES_QUERY`)."""

    changes: list[Change]  # oldest first, as feed.changes_after returns them
    flush: bool  # a change of everything (TRUNCATE, a pruned log): load a fresh snapshot
    names: frozenset[str]  # domains to re-read whole: ``rows`` holds their partitions
    rows: SnapshotRows
    keys: frozenset[str]  # record keys to re-read: ``records`` holds their rows
    records: SnapshotRows  # (``domains``: the rows of the keys' domains, for visibility)


def _plan(changes: list[Change], row: asyncpg.Record) -> ChangesRead:
    whole = [change for change in changes if change.records is None]
    return ChangesRead(
        changes,
        flush=any(EVERYTHING in change.domains for change in whole),
        names=frozenset(name for change in whole for name in change.domains),
        rows=SnapshotRows(*row[1:7]),
        keys=frozenset(key for change in changes for key in change.records or ()),
        records=SnapshotRows(*row[7:13]),
    )


async def read_changes(conn: asyncpg.Connection, position: int, max_rows: int) -> ChangesRead:
    """The changes after ``position`` and the rows applying them takes, as of one moment (one
    statement).  The rows may be newer than the last change read (a change committed since is
    in them but not yet in the log read): re-reading a row or a partition in a newer state is
    what applying that change will do anyway."""
    row = await _one_row(conn, CHANGES_QUERY, position, max_rows)
    changes = [
        Change(position, tuple(domains), None if records is None else tuple(records))
        for position, domains, records in row[0]
    ]
    return _plan(changes, row)


async def read_records(
    conn: asyncpg.Connection, keys: Iterable[str], timeout_s: float
) -> SnapshotRows:
    """The rows of the record keys ``keys`` (``table:local_part@domain``) and of their
    domains, in one statement (``rows.RECORDS_QUERY``): what ``MapsCopy.apply_records``
    takes."""
    async with asyncio.timeout(timeout_s):
        row = await _one_row(conn, RECORDS_QUERY, sorted(keys))
    return SnapshotRows(*row)


async def _one_row(conn: asyncpg.Connection, query: str, *args: object) -> asyncpg.Record:
    """The row of a select list without FROM (always exactly one)."""
    row = await conn.fetchrow(query, *args)
    if row is None:
        raise RuntimeError(f"no row from {query[:60]!r}")
    return row
