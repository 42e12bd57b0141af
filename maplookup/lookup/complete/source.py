"""The AnswerSource of ``cache.mode = "complete"``: every key of every map from the copy.

Why an AnswerSource (lookup/answer.py) and not a cache: the copy holds every row, so an
absent key is as much an answer as a present one, and the database is not asked at all.
``Lookup`` stays as it is (key folding, the ``virtual`` rendering, TEMP for errors).

The copy is installed, updated and confirmed from the change feed (``db/copy_follow.py``,
through the trio token: everything here runs in the trio thread, so a partition replaced for
a change becomes visible to lookups at once and never half-way).  Until a copy is installed,
and whenever it is older than ``max_stale_s`` (its *age*: the time since the feed last
confirmed it current, i.e. read the change log and applied everything it said), lookups go to
``fallback``: the LRU path (cache, then database).  During a database outage that makes the
copy answer everything for ``max_stale_s``, exactly as long as a stale cached answer may be
served, and then the fallback answers TEMP: never NOTFOUND because of an error.  A copy
refused for its size (``cache.complete_max_bytes``) leaves the fallback answering for good.

The answers given from the copy are remembered, per map and folded key, up to
``cache.complete_memo_entries``: Postfix asks the same recipient several times per message
(smtpd's RCPT check, cleanup's virtual alias expansion, virtual(8)'s vmailbox, uid and gid),
and a remembered answer costs a dict probe where the copy's fallbacks cost a few microseconds
of Python (bench/README.md, "Complete mode").  The memo is forgotten, whole, whenever the copy
changes (a partition replaced, a new copy installed) or the lookup settings do, in the same
step: it can never answer anything the copy would not.  Its dicts hold only strings and None,
so the garbage collector never walks them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import trio

from maplookup.lookup.answer import AnswerSource, HasLookupSettings
from maplookup.lookup.complete.answer import lookup
from maplookup.lookup.complete.store import CopyChange, MapsCopy
from maplookup.maps import LookupSettings, MapName, sql_key

#: A memo probe's "not remembered" (None is a remembered NOTFOUND).
_ABSENT: Final = object()


@dataclass(slots=True)
class CopyCounters:
    """Read by /metrics."""

    answers: int = 0  # lookups answered from the copy (remembered or not)
    remembered: int = 0  # of which answered from the memo
    fallbacks: int = 0  # lookups sent to the fallback (no copy yet, too old, or refused)
    loads: int = 0  # copies installed (the first one, then each rebuild)
    partition_updates: int = 0  # changes applied by replacing partitions
    partitions_replaced: int = 0  # names whose partition was replaced
    records_replaced: int = 0  # record keys re-read alone (the change log named the rows)


class CompleteSource:
    """Answers from a complete copy while it is current enough; else from ``fallback``.

    ``settings`` holds the lookup settings in force (the DatabaseSource's, which a reload
    replaces): the copy applies them at lookup time, so a new delimiter needs no reload of it.
    ``settled`` is set once a copy is installed or refused: start-up waits for it before it
    reports ready.
    """

    def __init__(
        self,
        fallback: AnswerSource,
        settings: HasLookupSettings,
        max_stale_s: float,
        clock: Callable[[], float] = time.monotonic,
        memo_entries: int = 0,
    ) -> None:
        self._fallback = fallback
        self._settings = settings
        self.max_stale_s = max_stale_s  # replaced on reload
        self.memo_entries = memo_entries  # replaced on reload (takes effect when next full)
        self._memo: dict[MapName, dict[str, str | None]] = {name: {} for name in MapName}
        self._memo_size = 0
        self._memo_settings: LookupSettings | None = None  # the settings the memo was made with
        self.clock = clock
        self.copy: MapsCopy | None = None
        self.position: int | None = None  # the change-log position the copy is current to
        self.confirmed_at: float | None = None  # clock() of the read that confirmed it
        self.loaded_in_s: float | None = None  # how long the last snapshot took to load
        self.refused: str | None = None  # why the copy was refused (the fallback answers)
        self.settled = trio.Event()
        self.counters = CopyCounters()

    def age(self) -> float | None:
        """Seconds since the copy was last confirmed current (None: no copy)."""
        if self.copy is None or self.confirmed_at is None:
            return None
        return max(self.clock() - self.confirmed_at, 0.0)

    def current(self) -> bool:
        """Whether lookups are answered from the copy now."""
        age = self.age()
        return age is not None and age <= self.max_stale_s

    async def fetch(self, map_name: MapName, key: str) -> str | None:
        copy, confirmed_at = self.copy, self.confirmed_at
        if (
            copy is not None
            and confirmed_at is not None
            and self.clock() - confirmed_at <= self.max_stale_s
        ):
            counters = self.counters
            counters.answers += 1
            settings = self._settings.settings
            if settings is not self._memo_settings:  # a reload: a new delimiter, new defaults
                self.forget()
                self._memo_settings = settings
            memo = self._memo[map_name]
            value = memo.get(key, _ABSENT)
            if value is not _ABSENT:
                counters.remembered += 1
                return value  # type: ignore[return-value]  # str | None, never _ABSENT
            value = lookup(copy, map_name, sql_key(map_name, key), settings)
            if self.memo_entries > 0:
                if self._memo_size >= self.memo_entries:
                    self.forget()  # cheaper than an LRU's bookkeeping, and refilled from memory
                memo[key] = value
                self._memo_size += 1
            return value
        self.counters.fallbacks += 1
        return await self._fallback.fetch(map_name, key)

    def memo_size(self) -> int:
        """Answers remembered now (for /metrics)."""
        return self._memo_size

    def forget(self) -> None:
        """Forget every remembered answer (the copy or the settings changed)."""
        if self._memo_size:
            for memo in self._memo.values():
                memo.clear()
            self._memo_size = 0

    # -- from the change feed (trio thread) -------------------------------------------------------

    def install(self, copy: MapsCopy, position: int, read_at: float, load_s: float) -> None:
        """A copy loaded from a snapshot at ``position`` replaces the one in use (if any)."""
        self.forget()
        self.copy = copy
        self.position = position
        self.confirmed_at = read_at
        self.loaded_in_s = load_s
        self.refused = None
        self.counters.loads += 1
        self.settled.set()

    def update(self, change: CopyChange, position: int, read_at: float) -> None:
        """Apply ``change``, read after the change at ``position``."""
        if self.copy is None:
            return
        self.copy.apply(change)
        self.forget()
        self.counters.partition_updates += 1
        self.counters.partitions_replaced += len(change.names)
        self.counters.records_replaced += len(change.keys)
        self.confirm(position, read_at)

    def confirm(self, position: int, read_at: float) -> None:
        """The feed read the log at ``read_at`` and the copy holds everything up to
        ``position``."""
        if self.copy is None:
            return
        self.position = position
        self.confirmed_at = read_at

    def refuse(self, reason: str) -> None:
        """No copy (too large): the fallback answers from now on."""
        self.forget()
        self.copy = None
        self.position = None
        self.confirmed_at = None
        self.refused = reason
        self.settled.set()
