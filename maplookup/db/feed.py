"""The change log's contract: ordered positions, "every change after P", a snapshot at P.

``schema.sql`` (its change-log block, schema version 5) appends one row per changing statement
to ``maplookup.change_log``: a position and the domains whose answers may have changed (``*``:
every domain).  Positions become visible in the order they were taken (the writers serialise on
an advisory lock, see schema.sql), so a reader that has seen position P has seen every lower
position that will ever exist, and "every change after P" is exact.  They can have holes.

Why a table and not only NOTIFY: a table is replicated.  Read on the database the lookups are
read from (a hot standby included), every change it reports is already visible to the lookups
there: invalidating then cannot race the replay (DESIGN.md section 5, the lag race).

Three operations, plain functions over an asyncpg connection so that any reader can use them:

* :func:`head_position`: the last position this database can see (where a new reader starts);
* :func:`changes_after`: the changes after P, oldest first; if the log was pruned past P the
  first one is ``*`` at the pruned position (the reader missed changes: flush);
* :func:`snapshot`: a REPEATABLE READ, READ ONLY transaction and the head position read in
  it: everything else read in that transaction is the state as of exactly that position (what
  a complete in-memory copy of the maps loads before it follows ``changes_after``).

:class:`FeedCursor` is the pure part: where a reader is, and what a batch of changes asks of
the cache (invalidate these domains, or flush).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg

#: The advisory lock every change-log writer holds until it commits ("maplchng"; the literal
#: in schema.sql's log_change and prune_change_log must be the same number).
CHANGE_LOG_LOCK_ID = 0x6D61706C63686E67

#: A domain entry meaning "every domain" (TRUNCATE, or the log pruned past the reader).
EVERYTHING = "*"

#: Changes read per statement.  A statement-level trigger writes one row per statement, so
#: this is rarely reached; a read that returns this many is followed by the next at once.
MAX_CHANGES_PER_READ = 1000

_HEAD = "SELECT maplookup.change_log_head()"
_AFTER = "SELECT change_position, domains FROM maplookup.changes_after($1, $2)"


@dataclass(frozen=True, slots=True)
class Change:
    """One row of the change log."""

    position: int
    domains: tuple[str, ...]
    # The rows it touched, ``table:local_part@domain`` (schema version 6; None: re-read the
    # domains).  Only the complete copy reads them (``changes_with_records_after``).
    records: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class FeedStep:
    """What one batch of changes asks of a cache."""

    position: int  # the cursor's position after the batch
    flush: bool  # everything may have changed
    domains: frozenset[str]  # these domains changed (empty when flush)
    changes: int  # rows applied (rows at or before the old position are not counted)


class FeedCursor:
    """A reader's position in the change log, advanced by the batches it reads."""

    __slots__ = ("position",)

    def __init__(self, position: int) -> None:
        if position < 0:
            raise ValueError(f"a change-log position is >= 0, got {position}")
        self.position = position

    def advance(self, changes: Iterable[Change]) -> FeedStep:
        """Apply a batch read with ``changes_after(self.position)``, oldest first.

        A row at or before the position is ignored (it was applied already: a reader must
        never go back).  ``*`` anywhere flushes, and then naming domains adds nothing.
        """
        flush = False
        domains: set[str] = set()
        applied = 0
        for change in changes:
            if change.position <= self.position:
                continue
            self.position = change.position
            applied += 1
            if EVERYTHING in change.domains:
                flush = True
            elif not flush:
                domains.update(change.domains)
        if flush:
            domains.clear()
        return FeedStep(self.position, flush, frozenset(domains), applied)


async def head_position(conn: asyncpg.Connection) -> int:
    """The position of the last change visible to ``conn`` now (0 before any)."""
    position: int = await conn.fetchval(_HEAD)
    return position


async def changes_after(
    conn: asyncpg.Connection, position: int, max_rows: int = MAX_CHANGES_PER_READ
) -> list[Change]:
    """The changes after ``position`` visible to ``conn``, oldest first, at most ``max_rows``
    (plus a leading ``*`` row when the log was pruned past ``position``)."""
    rows = await conn.fetch(_AFTER, position, max_rows)
    return [Change(row[0], tuple(row[1])) for row in rows]


@asynccontextmanager
async def snapshot(conn: asyncpg.Connection) -> AsyncIterator[int]:
    """A read-only REPEATABLE READ transaction on ``conn``; yields its head position.

    Every query in the block sees the maps exactly as of that position: follow with
    ``changes_after(position)`` to stay current.  Works on a hot standby.
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        yield await head_position(conn)
