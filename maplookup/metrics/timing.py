"""The hot-path recording wrappers: :class:`TimedAnswerer` and :class:`TimedLookupBackend`.

They sit around the server's answerer and the database, time each call with a monotonic clock
and record it in :class:`~.stats.LookupStats` / :class:`~.stats.DatabaseStats` (and, sampled,
the query log).  Kept apart from the stats so the per-request code path is all in one place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from maplookup.errors import DatabaseTimeout
from maplookup.logsetup import QueryLog
from maplookup.maps import LookupSettings, MapName
from maplookup.protocol.events import Reply, Request

from .stats import OUTCOME_ERROR, OUTCOME_OK, OUTCOME_TIMEOUT, DatabaseStats, LookupStats


class _Answerer(Protocol):
    async def answer(self, request: Request) -> Reply: ...


class TimedAnswerer:
    """Wraps the server's answerer (the ``Lookup``): records each answer in LookupStats.

    A request cancelled before it is answered (drain, shutdown) is not recorded.
    """

    def __init__(
        self,
        inner: _Answerer,
        stats: LookupStats,
        clock: Callable[[], float] = time.perf_counter,
        query_log: QueryLog | None = None,
    ) -> None:
        self._inner = inner
        self._stats = stats
        self._clock = clock
        # Replaced on reload; a rate of 0 costs one comparison per request.
        self.query_log = query_log

    async def answer(self, request: Request) -> Reply:
        started = self._clock()
        reply = await self._inner.answer(request)
        seconds = self._clock() - started
        self._stats.record(request.map_name, reply.status, seconds)
        query_log = self.query_log
        if query_log is not None and query_log.sample_rate > 0.0:
            query_log.maybe_log(
                request.map_name.decode("utf-8", "replace"),
                request.key.decode("utf-8", "surrogateescape"),
                reply.status.value,
                seconds,
            )
        return reply


class _LookupBackend(Protocol):
    async def lookup(self, map_name: MapName, key: str, settings: LookupSettings) -> str | None: ...


class TimedLookupBackend:
    """Wraps the Database (``lookup``): records each database lookup in DatabaseStats.

    Put it between ``DatabaseSource`` and ``Database`` so that only real queries (cache misses)
    are timed.  Cancelled queries are not recorded; other exceptions count as errors.
    """

    def __init__(
        self,
        inner: _LookupBackend,
        stats: DatabaseStats,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._inner = inner
        self._stats = stats
        self._clock = clock

    async def lookup(self, map_name: MapName, key: str, settings: LookupSettings) -> str | None:
        started = self._clock()
        try:
            value = await self._inner.lookup(map_name, key, settings)
        except DatabaseTimeout:
            self._stats.record_query(self._clock() - started, OUTCOME_TIMEOUT)
            raise
        except Exception:
            self._stats.record_query(self._clock() - started, OUTCOME_ERROR)
            raise
        self._stats.record_query(self._clock() - started, OUTCOME_OK)
        return value
