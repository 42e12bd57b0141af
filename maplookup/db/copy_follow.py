"""Keep a complete copy of the maps current from the change feed (``cache.mode = "complete"``).

A ``CopyFollower`` is the change feed's follower (db/changes.py, ``FeedFollower``): the feed
calls it on its own connection, in the asyncio thread, when it connects and after every read
of the change log, so the copy follows exactly the server the feed reads, and every change in
the order of its position:

* **connect**: the first time, and whenever the copy cannot simply continue (another server,
  or one whose log is behind the copy: a failover to a standby that had not replayed as far,
  a restored backup), a snapshot is loaded (``copy_load.load_snapshot``) and the feed follows
  from its position; otherwise the feed follows from the copy's own position, so a reconnect
  to the same server costs no reload (and a log pruned past it says ``*``: a reload).
* **a batch of changes**: the log is read alone (``copy_load.read_changes``: an idle poll
  touches no map table, so it never waits on a lock held there), then, if anything changed,
  one statement (``copy_load.read_rows``) reads the rows the change log names (a statement
  of at most 1000 rows of a record table, schema version 6), which replace the copy's one by
  one, and the partitions of the domains named without rows (domain rows, larger
  statements), which are re-read whole.  More than ``MAX_RECORDS_PER_READ`` keys, or a read
  that failed (a timeout: too many rows, a lock), reload a snapshot instead, streamed in
  chunks: the same read is never retried for ever.
* **``*``** (TRUNCATE, a pruned log): a fresh snapshot is loaded while lookups keep being
  answered from the old copy, then swapped in.
* **every read**: the copy is confirmed current as of that read (its age restarts from zero).

What the follower reads is handed to the copy's owner in the trio thread (``CopyTarget``,
lookup/complete/source.py's CompleteSource) through the trio token, in order: the copy is only
ever changed there, between two lookups.  A load refused for its size
(``cache.complete_max_bytes``) is logged once, with how to raise the bound, and the follower
stops: the LRU path answers from then on, kept coherent by the same feed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import asyncpg
import trio

from maplookup.db.copy_load import (
    ChangePlan,
    CopyTooLarge,
    LoadedCopy,
    load_snapshot,
    plan_changes,
    read_changes,
    read_rows,
)
from maplookup.db.feed import Change, FeedStep, changes_after
from maplookup.db.servers import Reached, ServerAddress
from maplookup.lookup.complete.store import CopyChange, MapsCopy

log = logging.getLogger(__name__)


class CopyTarget(Protocol):
    """The copy's owner in the trio thread (``CompleteSource``)."""

    def install(self, copy: MapsCopy, position: int, read_at: float, load_s: float) -> None: ...
    def update(self, change: CopyChange, position: int, read_at: float) -> None: ...
    def confirm(self, position: int, read_at: float) -> None: ...
    def refuse(self, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class CopySettings:
    max_bytes: int  # cache.complete_max_bytes
    # Each chunk of a snapshot and each partition read: longer is a lost connection.
    query_timeout_s: float = 5.0


class CopyFollower:
    """The change feed's follower that loads and updates a complete copy (module docstring).

    Built in the trio thread (it keeps that thread's token); its methods run in the asyncio
    thread, called by the feed.  ``active`` turns False for good once a copy was refused.
    """

    def __init__(self, target: CopyTarget, settings: CopySettings) -> None:
        self._target = target
        self._settings = settings
        self._token = trio.lowlevel.current_trio_token()
        self.active = True
        self.position: int | None = None  # the position of the copy last handed over
        self._server: ServerAddress | None = None  # where the copy was read
        # The last batch of changes read (with the rows each touched), for ``apply``.
        self._changes: list[Change] | None = None
        # A read of rows failed (a timeout: too many, or a lock): reload at the next start
        # rather than retry the same read for ever.
        self._reload = False
        self.rebuilds = 0

    async def start(self, conn: asyncpg.Connection, reached: Reached, head: int) -> int:
        """The feed connected to ``reached``, whose log's head is ``head``: where it follows
        from (the copy's position, or a fresh snapshot's)."""
        if not self.active:
            return head
        position = self.position
        if (
            position is not None
            and not self._reload
            and reached.address == self._server
            and head >= position
        ):
            return position
        loaded = await self._load(conn, head)
        # Only once loaded: a load that failed on another server must not make the next
        # connection to it follow on from the old server's position.
        self._server = reached.address
        return loaded

    async def changes_after(
        self, conn: asyncpg.Connection, position: int, max_rows: int
    ) -> list[Change]:
        """The feed's read of the log, with the rows each change touched (``apply`` reads
        them, and the partitions of the domains named without rows, in one statement)."""
        if not self.active:
            return await changes_after(conn, position, max_rows)
        self._changes = await read_changes(conn, position, max_rows)
        return self._changes

    async def apply(self, conn: asyncpg.Connection, step: FeedStep, read_at: float) -> int:
        """Apply one batch the feed read at ``read_at``; the position to follow from."""
        changes, self._changes = self._changes, None
        if not self.active:
            return step.position
        if changes is None:  # the log was not read here: the step's domains, whole
            plan = ChangePlan(step.flush, frozenset(step.domains), frozenset())
        else:
            # Not step.flush: a record of the wildcard transport ('*') flushes the LRU cache
            # (every transport answer may depend on it); the copy just re-reads that row.
            plan = plan_changes(changes)
        if plan.flush:
            return await self._load(conn, step.position)
        if plan.names or plan.keys:
            self._reload = True  # until the read succeeds: a timeout reloads instead
            rows, records = await read_rows(conn, plan, self._settings.query_timeout_s)
            self._reload = False
            change = CopyChange(plan.names, rows, plan.keys, records)
            self._post(self._target.update, change, step.position, read_at)
        else:
            self._post(self._target.confirm, step.position, read_at)
        self.position = step.position
        return step.position

    async def _load(self, conn: asyncpg.Connection, head: int) -> int:
        first = self.position is None
        settings = self._settings
        try:
            loaded: LoadedCopy = await load_snapshot(
                conn, settings.max_bytes, settings.query_timeout_s
            )
        except CopyTooLarge as exc:
            self.active = False
            self.position = None
            reason = (
                f"complete copy refused: {exc}; answering in LRU mode (cache.max_entries) "
                "instead.  To keep every key in memory, raise cache.complete_max_bytes above "
                "the estimate (the copy needs about that much, twice while it is rebuilt) and "
                "restart"
            )
            log.warning("%s", reason)
            self._post(self._target.refuse, reason)
            return head
        self.position = loaded.position
        self._reload = False
        if not first:
            self.rebuilds += 1
        log.info(
            "complete copy %s: %s rows as of change-log position %d in %.2f s, about %s MiB",
            "loaded" if first else "reloaded",
            f"{loaded.rows:,}",
            loaded.position,
            loaded.seconds,
            f"{loaded.estimated_bytes / 2**20:,.0f}",
        )
        self._post(
            self._target.install, loaded.copy, loaded.position, time.monotonic(), loaded.seconds
        )
        return loaded.position

    def _post(self, fn: Callable[..., None], *args: object) -> None:
        """Run ``fn(*args)`` in the trio thread, after everything posted before (FIFO)."""
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(fn, *args)
