"""The cache's rules without a database: bounds, TTLs, generations, races, herds, outages."""

from __future__ import annotations

import pytest
import trio

from maplookup.db.database import DatabaseError
from maplookup.lookup.cache import (
    EVERY_CHANGE,
    AnswerCache,
    CacheSettings,
    CachingSource,
    domain_of,
)
from maplookup.maps import MapName

V = MapName.VMAILBOX


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedSource:
    """Answers from a dict; counts calls; can hold every call until released."""

    def __init__(self, answers: dict[str, str | None] | None = None) -> None:
        self.answers = answers or {}
        self.calls = 0
        self.hold: trio.Event | None = None
        self.started = 0
        self.error: DatabaseError | None = None

    async def fetch(self, map_name: MapName, key: str) -> str | None:
        self.calls += 1
        self.started += 1
        value = self.answers.get(key)
        error = self.error
        if self.hold is not None:
            await self.hold.wait()
        if error is not None:
            raise error
        return value


def make(
    answers: dict[str, str | None] | None = None, **settings: float
) -> tuple[CachingSource, ScriptedSource, FakeClock]:
    clock = FakeClock()
    cache = AnswerCache(CacheSettings(**settings), clock=clock)  # type: ignore[arg-type]
    cache.set_live(True)
    inner = ScriptedSource(answers)
    return CachingSource(inner, cache), inner, clock


def test_domain_of() -> None:
    assert domain_of(MapName.VIRTUAL, "a@b@example.com") == "example.com"
    assert domain_of(MapName.VMAILBOX, "@example.com") == "example.com"
    assert domain_of(MapName.DOMAINS, "example.com") == "example.com"
    assert domain_of(MapName.RELAY_RECIPIENTS, "u@example.net") == "example.net"
    for cross_domain in (MapName.SENDER_LOGIN, MapName.TRANSPORT, MapName.RELAY_DOMAINS):
        assert domain_of(cross_domain, "u@example.net") == EVERY_CHANGE


async def test_any_change_invalidates_the_cross_domain_maps() -> None:
    source, inner, _ = make({"u@d": "owner"})
    assert await source.fetch(MapName.SENDER_LOGIN, "u@d") == "owner"
    assert await source.fetch(MapName.SENDER_LOGIN, "u@d") == "owner"
    assert await source.fetch(MapName.VMAILBOX, "u@d") == "owner"
    queries = inner.calls
    source.cache.invalidate_domains(["other.test"])
    assert await source.fetch(MapName.SENDER_LOGIN, "u@d") == "owner"
    assert await source.fetch(MapName.VMAILBOX, "u@d") == "owner"
    assert inner.calls == queries + 1  # sender_login asked again, vmailbox not


async def test_hits_and_negative_hits_do_not_query_again() -> None:
    source, inner, _ = make({"u@d": "d/u/"})
    for _ in range(3):
        assert await source.fetch(V, "u@d") == "d/u/"
        assert await source.fetch(V, "x@d") is None
    assert inner.calls == 2
    counters = source.cache.counters
    assert (counters.misses, counters.hits, counters.negative_hits) == (2, 2, 2)


async def test_maps_are_cached_separately() -> None:
    source, inner, _ = make({"u@d": "value"})
    await source.fetch(MapName.VMAILBOX, "u@d")
    await source.fetch(MapName.VIRTUAL, "u@d")
    assert inner.calls == 2


async def test_positive_and_negative_ttls() -> None:
    source, inner, clock = make({"u@d": "d/u/"}, positive_ttl_s=100, negative_ttl_s=10)
    await source.fetch(V, "u@d")
    await source.fetch(V, "x@d")
    clock.now += 11
    await source.fetch(V, "u@d")  # still fresh
    await source.fetch(V, "x@d")  # negative expired
    assert inner.calls == 3
    clock.now += 100
    await source.fetch(V, "u@d")
    assert inner.calls == 4


async def test_invalidating_a_domain_touches_only_that_domain() -> None:
    source, inner, _ = make({"u@a": "a/u/", "u@b": "b/u/"})
    await source.fetch(V, "u@a")
    await source.fetch(V, "u@b")
    inner.answers["u@a"] = "a/new/"
    source.cache.invalidate_domains({"a"})
    assert await source.fetch(V, "u@a") == "a/new/"
    assert await source.fetch(V, "u@b") == "b/u/"
    assert inner.calls == 3


async def test_flush_invalidates_everything() -> None:
    source, inner, _ = make({"u@a": "1"})
    await source.fetch(V, "u@a")
    source.cache.flush()
    await source.fetch(V, "u@a")
    assert inner.calls == 2


async def test_not_live_means_nothing_is_served_from_cache() -> None:
    source, inner, _ = make({"u@a": "old"})
    await source.fetch(V, "u@a")
    source.cache.set_live(False)
    inner.answers["u@a"] = "new"
    assert await source.fetch(V, "u@a") == "new"
    assert await source.fetch(V, "u@a") == "new"
    assert inner.calls == 3
    source.cache.set_live(True)  # flushes: what was stored while not live is not trusted
    assert await source.fetch(V, "u@a") == "new"
    assert inner.calls == 4
    assert await source.fetch(V, "u@a") == "new"
    assert inner.calls == 4


def test_eviction_keeps_the_bound_under_a_stream_of_distinct_keys() -> None:
    cache = AnswerCache(CacheSettings(max_entries=100))
    cache.set_live(True)
    for i in range(10_000):
        cache.store((V, f"user{i}@d"), "x", "d", cache.generations("d"))
        assert len(cache) <= 100
    assert len(cache) == 100
    assert cache.counters.evictions == 9_900
    # Least recently used goes first: the newest keys are the ones kept.
    assert cache.lookup_fresh((V, "user9999@d")) is not None
    assert cache.lookup_fresh((V, "user0@d")) is None


def test_recently_used_entries_survive_eviction() -> None:
    cache = AnswerCache(CacheSettings(max_entries=2))
    cache.set_live(True)
    cache.store((V, "a@d"), "a", "d", cache.generations("d"))
    cache.store((V, "b@d"), "b", "d", cache.generations("d"))
    assert cache.lookup_fresh((V, "a@d")) is not None  # a is now the most recent
    cache.store((V, "c@d"), "c", "d", cache.generations("d"))
    assert cache.lookup_fresh((V, "a@d")) is not None
    assert cache.lookup_fresh((V, "b@d")) is None


async def test_a_miss_in_flight_during_a_change_does_not_store_its_answer() -> None:
    source, inner, _ = make({"u@d": "old"})
    inner.hold = trio.Event()
    results: list[str | None] = []
    async with trio.open_nursery() as nursery:

        async def lookup() -> None:
            results.append(await source.fetch(V, "u@d"))

        nursery.start_soon(lookup)
        await trio.testing.wait_all_tasks_blocked()
        assert inner.started == 1
        # The change commits (and is notified) while the query is out.
        inner.answers["u@d"] = "new"
        source.cache.invalidate_domains({"d"})
        inner.hold.set()
    assert results == ["old"]  # the in-flight lookup answers what it read
    assert source.cache.counters.stores_skipped == 1
    inner.hold = None
    assert await source.fetch(V, "u@d") == "new"  # and the old answer was not kept


async def test_concurrent_misses_for_one_key_make_one_query() -> None:
    source, inner, _ = make({"u@d": "d/u/"})
    inner.hold = trio.Event()
    results: list[str | None] = []
    async with trio.open_nursery() as nursery:

        async def lookup() -> None:
            results.append(await source.fetch(V, "u@d"))

        for _ in range(50):
            nursery.start_soon(lookup)
        await trio.testing.wait_all_tasks_blocked()
        inner.hold.set()
    assert results == ["d/u/"] * 50
    assert inner.calls == 1
    assert source.cache.counters.shared_misses == 49


async def test_concurrent_misses_share_an_error_too() -> None:
    source, inner, _ = make()
    inner.hold = trio.Event()
    inner.error = DatabaseError("down")
    failures = 0
    async with trio.open_nursery() as nursery:

        async def lookup() -> None:
            nonlocal failures
            with pytest.raises(DatabaseError):
                await source.fetch(V, "u@d")
            failures += 1

        for _ in range(10):
            nursery.start_soon(lookup)
        await trio.testing.wait_all_tasks_blocked()
        inner.hold.set()
    assert failures == 10
    assert inner.calls == 1


async def test_a_cancelled_leader_hands_over_to_a_waiting_follower() -> None:
    source, inner, _ = make({"u@d": "d/u/"})
    inner.hold = trio.Event()
    results: list[str | None] = []
    async with trio.open_nursery() as nursery:
        leader_scope = trio.CancelScope()

        async def leader() -> None:
            with leader_scope:
                await source.fetch(V, "u@d")

        async def follower() -> None:
            results.append(await source.fetch(V, "u@d"))

        nursery.start_soon(leader)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(follower)
        await trio.testing.wait_all_tasks_blocked()
        leader_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        inner.hold.set()
    assert results == ["d/u/"]
    assert inner.calls == 2


async def test_an_answer_fetched_while_listen_comes_up_serves_in_an_outage() -> None:
    """Issue 12.8: right after start (or a reconnect) LISTEN goes live, which flushes, while
    the first misses are out.  Their answers are not fresh (a change may have been missed
    before LISTEN was in place) but no change of their domain is known: if PostgreSQL goes
    away a moment later they are served, not TEMP."""
    clock = FakeClock()
    cache = AnswerCache(CacheSettings(max_stale_s=1000), clock=clock)
    inner = ScriptedSource({"u@d": "d/u/", "x@d": None})
    source = CachingSource(inner, cache)
    inner.hold = trio.Event()
    async with trio.open_nursery() as nursery:
        for key in ("u@d", "x@d"):
            nursery.start_soon(source.fetch, V, key)
        await trio.testing.wait_all_tasks_blocked()
        cache.set_live(True)  # LISTEN established while both queries are out
        inner.hold.set()
    assert cache.counters.stores_outage_only == 2
    assert cache.counters.stores_skipped == 0
    inner.hold = None
    # Not fresh: the next lookup asks the database again.
    calls = inner.calls
    assert await source.fetch(V, "u@d") == "d/u/"
    assert inner.calls == calls + 1
    # A new fetch under the live generations is fresh again; now take the case where the
    # database goes away right after the first answers, before any fresh one was stored.
    cache.flush()
    inner.hold = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.fetch, V, "u@d")
        await trio.testing.wait_all_tasks_blocked()
        cache.set_live(True)  # a reconnect: flush again while the query is out
        inner.hold.set()
    inner.hold = None
    inner.error = DatabaseError("connection refused")
    assert await source.fetch(V, "u@d") == "d/u/"
    assert await source.fetch(V, "x@d") is None  # the negative answer too
    assert cache.counters.stale_served == 2


async def test_an_answer_fetched_across_a_change_of_its_domain_is_not_kept_for_outages() -> None:
    source, inner, _ = make({"u@d": "old"})
    inner.hold = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.fetch, V, "u@d")
        await trio.testing.wait_all_tasks_blocked()
        source.cache.invalidate_domains({"d"})
        source.cache.flush()
        inner.hold.set()
    inner.hold = None
    inner.error = DatabaseError("down")
    with pytest.raises(DatabaseError):
        await source.fetch(V, "u@d")


async def test_outage_serves_cached_answers_and_raises_for_the_rest() -> None:
    source, inner, clock = make(
        {"u@d": "d/u/"}, positive_ttl_s=10, negative_ttl_s=10, max_stale_s=1000
    )
    assert await source.fetch(V, "u@d") == "d/u/"
    assert await source.fetch(V, "x@d") is None
    # PostgreSQL goes away; LISTEN drops with it.
    source.cache.set_live(False)
    inner.error = DatabaseError("connection refused")
    clock.now += 500  # well past the TTLs, within max_stale_s
    assert await source.fetch(V, "u@d") == "d/u/"
    assert await source.fetch(V, "x@d") is None  # a cached negative stays negative
    with pytest.raises(DatabaseError):
        await source.fetch(V, "never-seen@d")
    assert source.cache.counters.stale_served == 2
    clock.now += 501  # past max_stale_s: no more stale answers
    with pytest.raises(DatabaseError):
        await source.fetch(V, "u@d")


async def test_outage_never_serves_an_answer_known_to_have_changed() -> None:
    source, inner, _ = make({"u@d": "d/u/"})
    await source.fetch(V, "u@d")
    source.cache.invalidate_domains({"d"})  # a change was notified...
    inner.error = DatabaseError("down")  # ...and then the database went away
    with pytest.raises(DatabaseError):
        await source.fetch(V, "u@d")


async def test_failing_database_is_not_asked_again_for_cached_keys_for_a_moment() -> None:
    source, inner, clock = make({"u@d": "d/u/"}, positive_ttl_s=10)
    assert await source.fetch(V, "u@d") == "d/u/"
    source.cache.set_live(False)  # the outage takes LISTEN down too
    inner.error = DatabaseError("stalled")
    calls = inner.calls
    assert await source.fetch(V, "u@d") == "d/u/"  # asks, fails, serves the cached answer
    assert inner.calls == calls + 1
    assert await source.fetch(V, "u@d") == "d/u/"  # failing: served at once, no query
    assert inner.calls == calls + 1
    with pytest.raises(DatabaseError):
        await source.fetch(V, "other@d")  # nothing cached: still asks
    assert inner.calls == calls + 2
    clock.now += 1.5  # past the probe interval: the next lookup asks again
    inner.error = None
    assert await source.fetch(V, "u@d") == "d/u/"
    assert inner.calls == calls + 3


async def test_entries_are_not_tracked_by_the_garbage_collector() -> None:
    # Tracked entries made every full collection walk the whole cache: a pause of up to
    # 230 ms for all connections with 100,000 entries (bench/README.md, "Garbage collection").
    import gc

    source, _, _ = make({f"user{i}@d": f"d/user{i}/" for i in range(100)} | {"gone@d": None})
    for i in range(100):
        assert await source.fetch(V, f"user{i}@d") == f"d/user{i}/"
    assert await source.fetch(V, "gone@d") is None
    gc.collect()
    entries = list(source.cache._entries.items())
    assert len(entries) == 101
    assert not any(gc.is_tracked(key) or gc.is_tracked(entry) for key, entry in entries)
