"""A bounded answer cache that stays coherent with PostgreSQL and outlives its outages.

Rules (DESIGN.md §5):

* Bounded by entry count (LRU), with a TTL as a safety net and a shorter one for negative
  answers.
* Coherent: schema.sql logs the domains every change touches (the change log, read by
  ``db/changes.py`` on the database the lookups read, so an invalidation never overtakes a
  standby's replay); each domain has a generation counter, and an entry is valid only while
  its domain's generation is the one it was fetched under.  Invalidating a domain is one
  integer increment, however many entries it has.
* Race-free: a miss records the generations before it queries and does not store its answer if
  either moved meanwhile (the answer may predate the change).
* Changes can be missed while the change feed's connection is down.  While it is down nothing
  is served from the cache as fresh; when it is back, a global generation bump invalidates
  every entry stored before (a flush that costs O(1) and keeps the entries for outage use).
* During an outage, a failed query falls back to the cached answer (positive or negative) if its
  domain was not invalidated and it is younger than ``max_stale_s``.  A miss with no such entry
  re-raises the error, which the lookup layer turns into TEMP.  Never NOTFOUND for an error.
* Concurrent misses for the same key share one query.
* Invisible to the garbage collector: an entry is a tuple of strings and numbers and its key a
  tuple of two plain strings, which CPython stops tracking once they survive a collection.  As
  objects of a class they were tracked, and every full collection walked all of them: with
  100,000 entries a pause of 40 to 230 ms for every connection, several times a minute under
  load (bench/README.md, "Garbage collection").

Everything here runs in the trio thread; the change feed hands its changes over through
the trio token, so no locks are needed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

import trio

from maplookup.errors import DatabaseError
from maplookup.lookup.answer import AnswerSource
from maplookup.maps import MapName

# (map name as a plain str, folded key): a MapName member would keep the tuple tracked by the GC.
CacheKey = tuple[str, str]
_PLAIN_MAP_NAMES: dict[MapName, str] = {m: str(m.value) for m in MapName}

# After a database error, cached answers are served without asking the database again for
# this long; then one lookup probes it again.  Keeps a stalled database from making every
# cached lookup wait out the query timeout.
OUTAGE_PROBE_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class CacheSettings:
    max_entries: int = 100_000
    positive_ttl_s: float = 600.0
    negative_ttl_s: float = 60.0
    max_stale_s: float = 3600.0


@dataclass(slots=True)
class CacheCounters:
    """Read by tests and, later, by the metrics endpoint."""

    hits: int = 0
    negative_hits: int = 0
    misses: int = 0
    shared_misses: int = 0
    stores_skipped: int = 0
    stores_outage_only: int = 0  # fetched across a flush: kept for outages, never fresh
    invalidations: int = 0
    flushes: int = 0
    evictions: int = 0
    stale_served: int = 0
    errors: int = 0


# An entry: a plain tuple, not a class or a NamedTuple, because CPython stops tracking only
# exact tuples of untracked values (see the module docstring).  Read through these indexes.
_Entry = tuple[str | None, str, int, int, float, float]
VALUE: Final = 0
_DOMAIN: Final = 1
_DOMAIN_GENERATION: Final = 2
_GLOBAL_GENERATION: Final = 3
_FETCHED_AT: Final = 4
_EXPIRES_AT: Final = 5


class _Flight:
    """One query in progress; later misses for the same key wait for it."""

    __slots__ = ("answered", "done", "error", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.answered = False  # False if the leading task was cancelled first
        self.value: str | None = None
        self.error: DatabaseError | None = None

    def answer(self, value: str | None) -> None:
        self.value = value
        self.answered = True

    def fail(self, error: DatabaseError) -> None:
        self.error = error
        self.answered = True

    def result(self) -> str | None:
        if self.error is not None:
            # A fresh exception per waiter: one exception object raised in many tasks would
            # collect all their tracebacks.
            raise DatabaseError(str(self.error))
        return self.value


# The generation of the answers that any change can change (MapName.depends_on_other_domains):
# not a domain name, which cannot hold '@'.
EVERY_CHANGE = "@every-change"


def domain_of(map_name: MapName, key: str) -> str:
    """The domain whose changes can change this key's answer (or EVERY_CHANGE)."""
    if map_name.depends_on_other_domains:
        return EVERY_CHANGE
    if map_name.is_address_map:
        return key[key.rfind("@") + 1 :]
    return key


class AnswerCache:
    """The entries and generations; pure bookkeeping, no I/O."""

    def __init__(
        self, settings: CacheSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._domain_generations: dict[str, int] = {}
        self._global_generation = 0
        # Not live until the change feed says it follows the change log.
        self.live = False
        self.counters = CacheCounters()

    def __len__(self) -> int:
        return len(self._entries)

    def generations(self, domain: str) -> tuple[int, int]:
        return self._domain_generations.get(domain, 0), self._global_generation

    def lookup_fresh(self, key: CacheKey) -> _Entry | None:
        """The entry if it may be served as the current truth, else None."""
        if not self.live:
            return None
        entry = self._entries.get(key)
        if entry is None:
            return None
        if (
            entry[_GLOBAL_GENERATION] != self._global_generation
            or entry[_DOMAIN_GENERATION] != self._domain_generations.get(entry[_DOMAIN], 0)
            or entry[_EXPIRES_AT] <= self.clock()
        ):
            return None
        self._entries.move_to_end(key)
        return entry

    def lookup_stale(self, key: CacheKey) -> _Entry | None:
        """An entry usable while the database is unreachable: not known to be changed."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[_DOMAIN_GENERATION] != self._domain_generations.get(entry[_DOMAIN], 0):
            return None
        if self.clock() - entry[_FETCHED_AT] > self.settings.max_stale_s:
            return None
        return entry

    def store(
        self, key: CacheKey, value: str | None, domain: str, generations: tuple[int, int]
    ) -> None:
        """Store an answer fetched under ``generations``.

        If its domain was invalidated meanwhile, the answer may predate the change: it is
        dropped.  If only the global generation moved (the change feed (re)connected while the
        query was out: right after start-up, or after a reconnect), no change of this domain
        is known, so the answer is kept under the generations it was fetched with: never
        served as fresh, but usable if PostgreSQL goes away a moment later, like every entry
        stored before a flush (DESIGN.md section 5: keep the two cases apart).
        """
        domain_generation, global_generation = self.generations(domain)
        if generations[0] != domain_generation:
            self.counters.stores_skipped += 1
            return
        if generations[1] != global_generation:
            self.counters.stores_outage_only += 1
        now = self.clock()
        ttl = self.settings.positive_ttl_s if value is not None else self.settings.negative_ttl_s
        self._entries[key] = (value, domain, generations[0], generations[1], now, now + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.settings.max_entries:
            self._entries.popitem(last=False)
            self.counters.evictions += 1

    def reconfigure(self, settings: CacheSettings) -> None:
        """New bounds and TTLs (reload); a smaller bound evicts at once."""
        self.settings = settings
        while len(self._entries) > settings.max_entries:
            self._entries.popitem(last=False)
            self.counters.evictions += 1

    def invalidate_domains(self, domains: Iterable[str]) -> None:
        generations = self._domain_generations
        changed = False
        for domain in domains:
            generations[domain] = generations.get(domain, 0) + 1
            self.counters.invalidations += 1
            changed = True
        if changed:
            generations[EVERY_CHANGE] = generations.get(EVERY_CHANGE, 0) + 1

    def flush(self) -> None:
        """Invalidate every entry (kept only as outage fallback)."""
        self._global_generation += 1
        self.counters.flushes += 1

    def set_live(self, live: bool) -> None:
        """The change feed is (again) followed, or lost.

        Going live flushes: changes may have been missed while it was lost.
        """
        if live:
            self.flush()
        self.live = live


class CachingSource:
    """An AnswerSource that answers from the cache and asks ``inner`` on a miss."""

    def __init__(self, inner: AnswerSource, cache: AnswerCache) -> None:
        self._inner = inner
        self.cache = cache
        self._flights: dict[CacheKey, _Flight] = {}
        # Until this time (cache clock), the database is taken to be failing.
        self._failing_until = 0.0

    async def fetch(self, map_name: MapName, key: str) -> str | None:
        cache_key = (_PLAIN_MAP_NAMES[map_name], key)
        cache = self.cache
        entry = cache.lookup_fresh(cache_key)
        if entry is not None:
            value = entry[VALUE]
            if value is None:
                cache.counters.negative_hits += 1
            else:
                cache.counters.hits += 1
            return value
        while True:
            flight = self._flights.get(cache_key)
            if flight is None:
                return await self._lead(cache_key, map_name, key)
            cache.counters.shared_misses += 1
            await flight.done.wait()
            if flight.answered:
                return flight.result()
            # The leading task was cancelled before it got an answer: lead a new query.

    async def _lead(self, cache_key: CacheKey, map_name: MapName, key: str) -> str | None:
        cache = self.cache
        cache.counters.misses += 1
        if self._failing_until > cache.clock():
            # The database failed a moment ago and has not answered since: a key with a
            # usable cached answer gets it now instead of waiting out another query timeout.
            # Keys without one still ask, so one transient error costs them nothing.
            stale = cache.lookup_stale(cache_key)
            if stale is not None:
                cache.counters.stale_served += 1
                return stale[VALUE]
        domain = domain_of(map_name, key)
        generations = cache.generations(domain)
        flight = _Flight()
        self._flights[cache_key] = flight
        try:
            try:
                value = await self._inner.fetch(map_name, key)
            except DatabaseError as exc:
                cache.counters.errors += 1
                self._failing_until = cache.clock() + OUTAGE_PROBE_INTERVAL_S
                stale = cache.lookup_stale(cache_key)
                if stale is None:
                    flight.fail(exc)
                    raise
                cache.counters.stale_served += 1
                flight.answer(stale[VALUE])
                return stale[VALUE]
            except Exception as exc:
                flight.fail(DatabaseError(f"internal error: {exc!r}"))
                raise
            self._failing_until = 0.0
            cache.store(cache_key, value, domain, generations)
            flight.answer(value)
            return value
        finally:
            del self._flights[cache_key]
            flight.done.set()
