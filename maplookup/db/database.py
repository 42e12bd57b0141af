"""asyncpg under trio: a dedicated thread runs an asyncio loop that owns the connection pool.

asyncpg speaks asyncio only.  Two ways to call it from trio were measured on this kind of
machine (2 cores; ``python -m bench.bridge``, PostgreSQL 15 on loopback, ``SELECT $1::text``):

* trio-asyncio (the asyncio loop runs inside trio's);
* this module: an asyncio loop (uvloop when installed) in its own thread owns the pool; a trio
  task submits a coroutine with ``run_coroutine_threadsafe`` and sleeps until the loop hands the
  result back through the trio token.

The figures are in ``bench/README.md`` (section "Database bridge").  The thread bridge wins under
concurrency, where trio-asyncio's p99 fell apart, and it keeps asyncio out of the trio thread
entirely: importing trio_asyncio replaces ``asyncio.new_event_loop()`` process-wide.

Lookups do not run one coroutine each: they queue in ``batching.LookupBatcher``, whose
workers (one per pool connection) send the lookups waiting at the same moment as one
statement.  Other queries (the schema check, ``ping``) run as coroutines.

Cancellation: when the trio caller is cancelled (read timeout, shutdown) it returns at once.
A coroutine is cancelled too (it runs inside ``async with pool.acquire()``, so asyncpg returns
or terminates the connection and nothing leaks); a queued lookup is dropped, and one already
sent finishes with its statement (bounded by the query timeout) and its answer is discarded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

import asyncpg
import outcome
import trio

from maplookup.db.batching import BatchSettings, LookupBatcher, LookupJob
from maplookup.db.errors import CLIENT_ERRORS, DatabaseError, DatabaseTimeout, as_database_error
from maplookup.db.servers import ServerPin
from maplookup.maps import LookupSettings, MapName

__all__ = [
    "AsyncioThread",
    "Database",
    "DatabaseError",
    "DatabaseTimeout",
    "PoolSettings",
    "close_database",
    "open_database",
    "start_database",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (measurably faster under load), else a plain selector loop.

    Built explicitly rather than through ``asyncio.new_event_loop()``, which trio-asyncio
    (used by the benchmarks) replaces process-wide when it is imported.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported OS
        return asyncio.SelectorEventLoop()
    return uvloop.new_event_loop()


def _log_loop_exception(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Background task errors inside asyncpg (e.g. a pool release timing out while the
    database stalls) are already answered as TEMP by the lookup that saw them: one line,
    not an ERROR with a traceback."""
    exception = context.get("exception")
    log.warning("asyncio: %s%s", context.get("message"), f" ({exception!r})" if exception else "")


class AsyncioThread:
    """An asyncio event loop running in a daemon thread, callable from trio.

    One instance per process.  ``run`` is the only way in from trio; it never blocks trio's
    thread: the result comes back through ``TrioToken.run_sync_soon``.
    """

    def __init__(self) -> None:
        self._loop = _new_event_loop()
        self._thread = threading.Thread(target=self._main, name="maplookup-asyncio", daemon=True)
        self._started = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._lock = threading.Lock()
        self._inbox: list[tuple[Job, Callable[[Any], None]]] = []  # trio -> asyncio: (job, start)
        self._inbox_pending = False
        self._outbox: list[Job] = []  # asyncio -> trio
        self._outbox_pending = False

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.set_exception_handler(_log_loop_exception)
        self._loop.run_forever()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    def start(self) -> None:
        if not self._started:
            self._thread.start()
            self._started = True

    def stop(self) -> None:
        """Stop the loop and wait for the thread; tasks still running there are abandoned."""
        if self._started and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop from any thread (used by synchronous callers)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the asyncio loop and return its result to the calling trio task.

        If the trio task is cancelled, the asyncio task is cancelled as well and the trio task
        returns at once; the asyncio side finishes its own clean-up (releasing pool
        connections) in its own time.
        """
        job = _CoroutineJob(coro, trio.lowlevel.current_task())
        result: T = await self.hand_over(job, self._start_coroutine, self._cancel_coroutine)
        return result

    async def hand_over(
        self,
        job: Job,
        start: Callable[[Any], None],
        cancel: Callable[[Any], None] | None = None,
    ) -> Any:
        """Give ``job`` to the asyncio thread and sleep until it is finished there.

        ``start(job)`` runs in the asyncio thread and must lead to exactly one
        ``finish(job, outcome)``; ``cancel(job)``, if given, runs there when the trio task is
        cancelled first (the trio task returns at once and ``job.waiting`` turns False).

        Hand-overs are batched both ways: a trio task queues its job and wakes the asyncio
        loop only if no wake-up is pending yet, and finished jobs go back the same way.  Under
        concurrency that turns one pair of cross-thread wake-ups (a syscall and a GIL hand-over
        each) per query into one per batch.
        """
        self._token = trio.lowlevel.current_trio_token()
        with self._lock:
            self._inbox.append((job, start))
            wake = not self._inbox_pending
            self._inbox_pending = True
        if wake:
            self._loop.call_soon_threadsafe(self._start_jobs)

        def abort(_raise_cancel: Callable[[], object]) -> trio.lowlevel.Abort:
            job.waiting = False
            if cancel is not None:
                self._loop.call_soon_threadsafe(cancel, job)
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    # -- asyncio thread ------------------------------------------------------------------------

    def _start_jobs(self) -> None:
        with self._lock:
            jobs, self._inbox = self._inbox, []
            self._inbox_pending = False
        for job, start in jobs:
            # A job's start always runs before its cancel: the wake-up that starts it was
            # queued on the loop before the job could be aborted.
            start(job)

    def _start_coroutine(self, job: _CoroutineJob) -> None:
        job.asyncio_task = self._loop.create_task(job.coro)
        job.asyncio_task.add_done_callback(partial(self._coroutine_done, job))

    def _cancel_coroutine(self, job: _CoroutineJob) -> None:
        if job.asyncio_task is not None:
            job.asyncio_task.cancel()

    def _coroutine_done(self, job: _CoroutineJob, task: asyncio.Task[Any]) -> None:
        if not task.cancelled():  # cancelled: the trio side gave up waiting
            self.finish(job, outcome.capture(task.result))

    def finish(self, job: Job, result: outcome.Outcome[Any]) -> None:
        """Hand ``result`` back to the trio task waiting for ``job`` (asyncio thread)."""
        if not job.waiting:
            return
        job.result = result
        with self._lock:
            self._outbox.append(job)
            wake = not self._outbox_pending
            self._outbox_pending = True
        if wake and self._token is not None:
            with suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._deliver)

    # -- trio thread ---------------------------------------------------------------------------

    def _deliver(self) -> None:
        with self._lock:
            jobs, self._outbox = self._outbox, []
            self._outbox_pending = False
        for job in jobs:
            if job.waiting and job.result is not None:
                trio.lowlevel.reschedule(job.task, job.result)


class Job(Protocol):
    """What travels between the threads: the trio task to wake, and its outcome."""

    task: Any
    waiting: bool  # False once the trio task was cancelled
    result: outcome.Outcome[Any] | None


class _CoroutineJob:
    """A coroutine handed from a trio task to the asyncio loop."""

    __slots__ = ("asyncio_task", "coro", "result", "task", "waiting")

    def __init__(self, coro: Coroutine[Any, Any, Any], task: trio.lowlevel.Task) -> None:
        self.coro = coro
        self.task = task
        self.waiting = True
        self.asyncio_task: asyncio.Task[Any] | None = None
        self.result: outcome.Outcome[Any] | None = None


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """How the pool talks to PostgreSQL; every limit named with its unit."""

    dsn: str
    pool_max_connections: int = 10
    query_timeout_s: float = 5.0
    connect_timeout_s: float = 5.0
    max_keys_per_query: int = 32


# How much longer than the query timeout a lookup waits for the asyncio thread's answer.
HAND_BACK_GRACE_S = 1.0


class Database:
    """The lookup server's view of PostgreSQL: lookups (batched) and single values, errors as
    DatabaseError."""

    def __init__(
        self,
        bridge: AsyncioThread,
        pool: asyncpg.Pool,
        batcher: LookupBatcher,
        settings: PoolSettings,
        pin: ServerPin,
    ) -> None:
        self._bridge = bridge
        self.pin = pin  # which server the pool's connections reach (servers.py)
        self._pool = pool
        self._batcher = batcher
        self._settings = settings

    @property
    def bridge(self) -> AsyncioThread:
        """The asyncio thread, for other asyncpg work (the change feed)."""
        return self._bridge

    def pool_state(self) -> tuple[int, int, int]:
        """(open connections, idle connections, maximum); read across threads, approximate."""
        pool = self._pool
        return pool.get_size(), pool.get_idle_size(), pool.get_max_size()

    def batch_counts(self) -> tuple[int, int]:
        """(statements sent, keys looked up by them); read across threads, approximate."""
        return self._batcher.statements, self._batcher.keys

    async def lookup(self, map_name: MapName, key: str, settings: LookupSettings) -> str | None:
        """What the map's SQL function answers for the folded ``key`` (None: no such key).

        Batched with the other lookups waiting at the same moment (``batching.py``).
        """
        job = LookupJob(map_name, key, settings, trio.lowlevel.current_task())
        # The batcher answers within query_timeout_s; this bound only matters if the asyncio
        # thread itself is stuck or gone, and then the lookup answers TEMP instead of hanging.
        with trio.move_on_after(self._settings.query_timeout_s + HAND_BACK_GRACE_S):
            value: str | None = await self._bridge.hand_over(job, self._batcher.add)
            return value
        raise DatabaseTimeout(
            f"no answer from the database thread within "
            f"{self._settings.query_timeout_s + HAND_BACK_GRACE_S} s"
        )

    async def _fetch_value_in_loop(self, query: str, args: tuple[object, ...]) -> object:
        try:
            async with asyncio.timeout(self._settings.query_timeout_s):
                async with self._pool.acquire() as conn:
                    return await conn.fetchval(query, *args)
        except TimeoutError as exc:
            raise DatabaseTimeout(
                f"no answer from PostgreSQL within {self._settings.query_timeout_s} s"
            ) from exc
        except Exception as exc:
            raise as_database_error(exc) from exc

    async def fetch_value(self, query: str, args: tuple[object, ...]) -> str | None:
        """The first column of the first row as text, None when the query returned NULL."""
        value = await self._bridge.run(self._fetch_value_in_loop(query, args))
        return None if value is None else str(value)

    async def ping(self) -> None:
        """Raise DatabaseError unless PostgreSQL answers a trivial query."""
        await self.fetch_value("SELECT 1", ())


async def _no_reset(_conn: asyncpg.Connection) -> None:
    return None


async def _create_pool(settings: PoolSettings, pin: ServerPin) -> asyncpg.Pool:
    # min_size=0: the server starts (and answers TEMP) even while PostgreSQL is down, and
    # connects on first use; nothing is opened that is not needed.  Connections are made by
    # the pin: to the change feed's server, else through the DSN's host list (servers.py).
    pool: asyncpg.Pool = await asyncpg.create_pool(
        settings.dsn,
        min_size=0,
        max_size=settings.pool_max_connections,
        timeout=settings.connect_timeout_s,
        command_timeout=settings.query_timeout_s,
        max_inactive_connection_lifetime=300.0,
        server_settings={"application_name": "maplookup"},
        # Lookups only call STABLE functions and change no session state, so the reset
        # query asyncpg runs on every release (a full round trip) has nothing to undo.
        reset=_no_reset,
        connect=pin.connect,
    )
    pin.follow(pool.expire_connections)
    return pool


async def start_database(bridge: AsyncioThread, settings: PoolSettings) -> Database:
    """The pool and the batcher, for ``bridge``: a coroutine for the bridge's own loop.

    ``open_database`` is the way in from trio; this is for callers outside trio (tests
    that keep one database for a whole module), with ``bridge.submit``.
    """
    pin = ServerPin(settings.connect_timeout_s)
    pool = await _create_pool(settings, pin)
    batcher = LookupBatcher(
        pool,
        BatchSettings(
            workers=settings.pool_max_connections,
            max_keys_per_query=settings.max_keys_per_query,
            query_timeout_s=settings.query_timeout_s,
        ),
        bridge.finish,
    )
    batcher.start()
    return Database(bridge, pool, batcher, settings, pin)


async def close_database(database: Database) -> None:
    """Stop the batcher and close the pool (on the bridge's loop)."""
    await database._batcher.close()
    try:
        await asyncio.wait_for(database._pool.close(), timeout=5)
    except (TimeoutError, *CLIENT_ERRORS):
        database._pool.terminate()


@asynccontextmanager
async def open_database(settings: PoolSettings) -> AsyncIterator[Database]:
    """Start the asyncio thread, the pool and the batcher; close all on exit, whatever happened."""
    bridge = AsyncioThread()
    bridge.start()
    try:
        database = await bridge.run(start_database(bridge, settings))
        try:
            yield database
        finally:
            with trio.CancelScope(shield=True):
                await bridge.run(close_database(database))
    finally:
        bridge.stop()
