"""Batched lookups: the cache misses waiting at one moment reach PostgreSQL as one statement.

A statement costs PostgreSQL and asyncpg far more than the key lookup inside it: on the
benchmark machine 125 to 150 µs of PostgreSQL CPU for a single-key statement against about 30 µs
per key in a statement of 64 (``python -m bench.misspath``, bench/README.md "Miss path").  When
many misses arrive together (a dictionary attack on unknown users, a cold cache after a
restart, ``--no-cache``), answering them one statement each would spend both cores on
statement overhead.  So lookups queue here, in the asyncio thread, and a fixed set of workers
(one per pool connection) each take whatever is waiting for one map, up to
``max_keys_per_query``, and send it as one statement (``maps.batch_query_for``).

Nothing waits to fill a batch: a worker that is free takes what is there, which is one key
when the server is quiet, so a lone lookup costs what it did without batching.  Batches form
only when lookups arrive faster than the pool answers them: exactly when they pay.

Each key is answered by the same SQL function as alone, in one snapshot.  A batch that fails
with a connection error or a timeout fails every key in it (each answers TEMP); a batch that
PostgreSQL rejected for another reason is retried one key per statement, so a key that makes a
function fail cannot turn its neighbours' answers into TEMP.

Everything here runs in the asyncio thread (``db.AsyncioThread``); jobs come in through
``add`` and leave through the ``finish`` callback the thread gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import outcome

from maplookup.db.errors import DatabaseError, DatabaseTimeout, as_database_error
from maplookup.maps import LookupSettings, MapName, batch_query_for, query_for, sql_key

log = logging.getLogger(__name__)

# SQLSTATE classes that say "the connection or the server", not "this statement": a batch
# failing with one of them is not retried key by key (every retry would fail the same way).
_SERVER_STATE_CLASSES = frozenset({"08", "53", "54", "57", "58", "XX"})


class LookupJob:
    """One key to look up, handed from a trio task to the batcher, and its way back.

    ``waiting`` turns False when the trio side gave up (its timeout, or shutdown); the
    batcher then drops the job if it has not been sent yet, and its answer if it has.
    """

    __slots__ = ("deadline", "key", "map_name", "result", "settings", "task", "waiting")

    def __init__(self, map_name: MapName, key: str, settings: LookupSettings, task: object):
        self.map_name = map_name
        self.key = key
        self.settings = settings
        self.task = task  # the trio task to reschedule
        self.waiting = True
        self.result: outcome.Outcome[str | None] | None = None
        self.deadline = 0.0  # asyncio loop time; set when queued


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """How lookups are grouped; every limit named with its unit."""

    workers: int  # concurrent statements: the pool's maximum connections
    max_keys_per_query: int
    query_timeout_s: float


Answer = str | None | DatabaseError  # the value (None: no such key), or why there is none
Finish = Callable[[LookupJob, outcome.Outcome[str | None]], None]


class LookupBatcher:
    """Queues lookups and answers them in batches over the pool (asyncio thread only)."""

    def __init__(self, pool: asyncpg.Pool, settings: BatchSettings, finish: Finish) -> None:
        self._pool = pool
        self._settings = settings
        self._finish = finish
        self._pending: deque[LookupJob] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()  # one wake-up per idle worker
        self._woken = 0  # workers woken that have not taken their share yet
        self._workers: list[asyncio.Task[None]] = []
        self.statements = 0
        self.keys = 0

    def start(self) -> None:
        """Start the workers; call in the asyncio thread, with its loop running."""
        loop = asyncio.get_running_loop()
        self._workers = [
            loop.create_task(self._work(), name=f"maplookup-lookup-{n}")
            for n in range(self._settings.workers)
        ]

    async def close(self) -> None:
        """Stop the workers; lookups still queued fail (the trio side has gone by now)."""
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        while self._pending:
            job = self._pending.popleft()
            self._finish(job, outcome.Error(DatabaseError("maplookup is shutting down")))

    def add(self, job: LookupJob) -> None:
        """Queue one lookup and wake an idle worker if there is one.

        The query timeout runs from here: time spent queued behind busy connections counts,
        so a lookup answers (TEMP at worst) within ``query_timeout_s`` however stuck the
        database is.
        """
        job.deadline = asyncio.get_running_loop().time() + self._settings.query_timeout_s
        self._pending.append(job)
        while self._idle:
            wake_up = self._idle.popleft()
            if not wake_up.done():
                wake_up.set_result(None)
                self._woken += 1
                break

    # -- the workers ---------------------------------------------------------------------

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                wake_up = loop.create_future()
                self._idle.append(wake_up)
                try:
                    await wake_up
                finally:
                    self._woken = max(0, self._woken - 1)
            batch = self._take()
            if batch:
                try:
                    await self._answer(batch)
                except Exception:
                    # A bug here must cost these lookups a TEMP, not the worker: a batcher
                    # that lost its workers would leave every later lookup waiting forever.
                    log.exception("answering %d lookups failed", len(batch))
                    self._fail_unanswered(batch)

    def _take(self) -> list[LookupJob]:
        """The oldest waiting lookup and up to a fair share of the others for the same map.

        The share splits what is waiting between this worker and those woken with it, so a
        burst spreads over several connections (and PostgreSQL's cores) instead of one.
        """
        pending = self._pending
        while pending and not pending[0].waiting:
            pending.popleft()
        if not pending:
            return []
        first = pending.popleft()
        share = math.ceil((len(pending) + 1) / (self._woken + 1))
        limit = min(self._settings.max_keys_per_query, share)
        batch = [first]
        if limit > 1 and pending:
            kept: deque[LookupJob] = deque()
            while pending:
                job = pending.popleft()
                if not job.waiting:
                    continue
                if (
                    len(batch) < limit
                    and job.map_name is first.map_name
                    and job.settings == first.settings
                ):
                    batch.append(job)
                else:
                    kept.append(job)
            self._pending = pending = kept
        return batch

    def _fail_unanswered(self, batch: list[LookupJob]) -> None:
        for job in batch:
            if job.result is None:
                with contextlib.suppress(Exception):
                    error = DatabaseError("internal error in maplookup; see its log")
                    self._finish(job, outcome.Error(error))

    async def _answer(self, batch: list[LookupJob]) -> None:
        keys = list(dict.fromkeys(job.key for job in batch))  # in order, once each
        deadline = min(job.deadline for job in batch)
        answers = await self._query(batch[0], keys, deadline)
        for job in batch:
            answer = answers[job.key]
            if isinstance(answer, DatabaseError):
                # One exception object per job: each is raised in its own trio task.
                self._finish(job, outcome.Error(type(answer)(*answer.args)))
            else:
                self._finish(job, outcome.Value(answer))

    async def _query(self, first: LookupJob, keys: list[str], deadline: float) -> dict[str, Answer]:
        """One statement for ``keys`` (distinct, all for ``first``'s map and settings),
        answered by ``deadline`` (loop time) or failed with DatabaseTimeout."""
        timeout_s = self._settings.query_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                async with self._pool.acquire() as conn:
                    return await self._run_statement(conn, first, keys)
        except TimeoutError:
            failure: DatabaseError = DatabaseTimeout(
                f"no answer from PostgreSQL within {timeout_s} s"
            )
        except asyncpg.PostgresError as exc:
            if len(keys) > 1 and (exc.sqlstate or "XX")[:2] not in _SERVER_STATE_CLASSES:
                log.warning("a statement of %d lookups failed (%s); retrying them one by one",
                            len(keys), exc)  # fmt: skip
                answers: dict[str, Answer] = {}
                for key in keys:
                    answers.update(await self._query(first, [key], deadline))
                return answers
            failure = as_database_error(exc)
        except Exception as exc:
            failure = as_database_error(exc)
        return dict.fromkeys(keys, failure)

    async def _run_statement(
        self, conn: asyncpg.pool.PoolConnectionProxy, first: LookupJob, keys: list[str]
    ) -> dict[str, Answer]:
        self.statements += 1
        self.keys += len(keys)
        if len(keys) == 1:
            query, args = query_for(first.map_name, keys[0], first.settings)
            value = await conn.fetchval(query, *args)
            return {keys[0]: None if value is None else str(value)}
        query, args = batch_query_for(first.map_name, first.settings)
        rows = await conn.fetch(query, [sql_key(first.map_name, k) for k in keys], *args)
        if len(rows) != len(keys):
            raise DatabaseError(f"{len(rows)} answers for {len(keys)} keys")
        return {
            key: None if row[0] is None else str(row[0])
            for key, row in zip(keys, rows, strict=True)
        }
