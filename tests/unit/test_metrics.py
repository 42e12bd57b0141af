"""Metrics without a server: histogram bucket math, bounded per-map stats, the exposition."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from maplookup.db.changes import ChangeFeed, FeedSettings
from maplookup.db.database import DatabaseError, DatabaseTimeout
from maplookup.lookup.cache import AnswerCache, CacheSettings
from maplookup.maps import LookupSettings, MapName
from maplookup.metrics import (
    DEFAULT_LATENCY_BUCKETS_S,
    LOOKUP_RESULTS,
    SERVED_MAPS,
    UNKNOWN_MAP,
    DatabaseStats,
    LatencyHistogram,
    LookupStats,
    MaplookupCollector,
    TimedAnswerer,
    TimedLookupBackend,
    make_registry,
    render,
)
from maplookup.protocol import Reply, Request, Status
from maplookup.serve.server import ServerCounters

SampleKey = tuple[str, frozenset[tuple[str, str]]]


def parse(text: bytes) -> tuple[dict[SampleKey, float], dict[str, tuple[str, str]]]:
    """Samples by (name, labels), and (type, help) by family name, as a scraper sees them."""
    samples: dict[SampleKey, float] = {}
    families: dict[str, tuple[str, str]] = {}
    for family in text_string_to_metric_families(text.decode()):
        families[family.name] = (family.type, family.documentation)
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = sample.value
    return samples, families


def value(samples: dict[SampleKey, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- LatencyHistogram ---------------------------------------------------------------------------


def test_histogram_bucket_bounds_are_inclusive_upper_bounds() -> None:
    h = LatencyHistogram((0.001, 0.01, 0.1))
    for seconds in (0.0, 0.001, 0.0011, 0.01, 0.05, 0.1, 0.2, 99.0):
        h.observe(seconds)
    assert h.buckets() == [(0.001, 2), (0.01, 4), (0.1, 6), (math.inf, 8)]
    assert h.count == 8
    assert h.sum == pytest.approx(0.0 + 0.001 + 0.0011 + 0.01 + 0.05 + 0.1 + 0.2 + 99.0)


def test_histogram_buckets_are_cumulative_and_empty_at_start() -> None:
    h = LatencyHistogram()
    assert h.bounds == DEFAULT_LATENCY_BUCKETS_S
    assert h.buckets() == [(b, 0) for b in DEFAULT_LATENCY_BUCKETS_S] + [(math.inf, 0)]
    h.observe(0.0003)  # between 0.00025 and 0.0005
    counts = dict(h.buckets())
    assert counts[0.00025] == 0
    assert counts[0.0005] == 1
    assert counts[10.0] == 1
    assert counts[math.inf] == 1
    assert [c for _, c in h.buckets()] == sorted(c for _, c in h.buckets())


def test_histogram_default_buckets_span_50us_to_10s() -> None:
    assert DEFAULT_LATENCY_BUCKETS_S[0] == 0.00005
    assert DEFAULT_LATENCY_BUCKETS_S[-1] == 10.0
    assert list(DEFAULT_LATENCY_BUCKETS_S) == sorted(set(DEFAULT_LATENCY_BUCKETS_S))


def test_histogram_exposition_buckets_spell_le_like_prometheus() -> None:
    h = LatencyHistogram((0.00005, 1.0, 2.5))
    h.observe(3.0)
    assert h.exposition_buckets() == [("5e-05", 0.0), ("1.0", 0.0), ("2.5", 0.0), ("+Inf", 1.0)]


def test_histogram_ignores_an_explicit_inf_bound() -> None:
    h = LatencyHistogram((0.1, math.inf))
    h.observe(5.0)
    assert h.buckets() == [(0.1, 0), (math.inf, 1)]


@pytest.mark.parametrize("bounds", [(), (1.0, 1.0), (2.0, 1.0), (math.nan,), (math.inf,)])
def test_histogram_rejects_bad_bounds(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="bound"):
        LatencyHistogram(bounds)


# -- LookupStats ----------------------------------------------------------------------------------


def test_lookup_stats_counts_per_map_and_result() -> None:
    stats = LookupStats()
    stats.record("vmailbox", "OK", 0.0001)
    stats.record("vmailbox", Status.OK, 0.0002)
    stats.record(b"vmailbox", Status.NOTFOUND, 0.003)
    stats.record("domains", "TEMP", 1.0)
    assert stats.count("vmailbox", "OK") == 2
    assert stats.count("vmailbox", "NOTFOUND") == 1
    assert stats.count("domains", "TEMP") == 1
    assert stats.count("domains", "OK") == 0
    assert stats.histogram("vmailbox").count == 3
    assert stats.histogram("domains").sum == pytest.approx(1.0)


def test_lookup_stats_has_a_series_per_served_map_and_unknown() -> None:
    stats = LookupStats()
    assert set(stats.map_names()) == {*SERVED_MAPS, UNKNOWN_MAP}
    series = list(stats.series())
    assert len(series) == len(stats.map_names()) * len(LOOKUP_RESULTS)
    assert all(count == 0 for _, _, count in series)


def test_lookup_stats_buckets_unknown_map_names_without_growing() -> None:
    stats = LookupStats()
    names_before = stats.map_names()
    for i in range(10_000):
        stats.record(f"garbage-{i}", "PERM", 0.00001)
        stats.record(f"garbage-{i}".encode(), "PERM", 0.00001)
    stats.record(b"\xff\x00", "PERM", 0.00001)
    assert stats.map_names() == names_before
    assert stats.count(UNKNOWN_MAP, "PERM") == 20_001
    assert stats.histogram(UNKNOWN_MAP).count == 20_001


def test_lookup_stats_wire_names_are_only_the_exact_bytes() -> None:
    stats = LookupStats()
    stats.record(b"VMAILBOX", "OK", 0.001)
    assert stats.count(UNKNOWN_MAP, "OK") == 1
    assert stats.count("vmailbox", "OK") == 0


def test_lookup_stats_unexpected_status_is_counted_as_other_not_raised() -> None:
    stats = LookupStats(map_names=["m"])
    stats.record("m", "WEIRD", 0.001)
    assert ("m", "other", 1) in list(stats.series())
    assert stats.map_names() == ["m", UNKNOWN_MAP]


def test_database_stats_outcomes() -> None:
    stats = DatabaseStats()
    stats.record_query(0.001)
    stats.record_query(0.002, "ok")
    stats.record_query(5.0, "timeout")
    stats.record_query(0.01, "error")
    stats.record_query(0.01, "something else")
    assert (stats.queries, stats.errors, stats.timeouts) == (5, 3, 1)
    assert stats.histogram.count == 5


# -- recording wrappers ---------------------------------------------------------------------------


class SteppingAnswerer:
    def __init__(self, clock: FakeClock, reply: Reply) -> None:
        self.clock = clock
        self.reply = reply

    async def answer(self, request: Request) -> Reply:
        self.clock.now += 0.25
        return self.reply


async def test_timed_answerer_records_map_status_and_duration() -> None:
    clock = FakeClock()
    stats = LookupStats()
    timed = TimedAnswerer(SteppingAnswerer(clock, Reply.ok("x")), stats, clock=clock)
    reply = await timed.answer(Request(b"virtual", b"a@example.com"))
    assert reply == Reply.ok("x")
    assert stats.count("virtual", "OK") == 1
    assert stats.histogram("virtual").sum == pytest.approx(0.25)
    timed = TimedAnswerer(SteppingAnswerer(clock, Reply.perm("no map")), stats, clock=clock)
    await timed.answer(Request(b"nonsense", b"k"))
    assert stats.count(UNKNOWN_MAP, "PERM") == 1


class ScriptedBackend:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.error: Exception | None = None

    async def lookup(self, map_name: MapName, key: str, settings: LookupSettings) -> str | None:
        self.clock.now += 0.5
        if self.error is not None:
            raise self.error
        return "v"


async def test_timed_lookup_backend_records_outcomes() -> None:
    clock = FakeClock()
    inner = ScriptedBackend(clock)
    stats = DatabaseStats()
    timed = TimedLookupBackend(inner, stats, clock=clock)
    assert await timed.lookup(MapName.VMAILBOX, "a@b", LookupSettings()) == "v"
    inner.error = DatabaseTimeout("slow")
    with pytest.raises(DatabaseTimeout):
        await timed.lookup(MapName.VMAILBOX, "a@b", LookupSettings())
    inner.error = DatabaseError("down")
    with pytest.raises(DatabaseError):
        await timed.lookup(MapName.VMAILBOX, "a@b", LookupSettings())
    inner.error = RuntimeError("bug")
    with pytest.raises(RuntimeError):
        await timed.lookup(MapName.VMAILBOX, "a@b", LookupSettings())
    assert (stats.queries, stats.errors, stats.timeouts) == (4, 3, 1)
    assert stats.histogram.sum == pytest.approx(2.0)


# -- the collector ----------------------------------------------------------------------------


@dataclass
class Parts:
    lookups: LookupStats
    database: DatabaseStats
    server: ServerCounters
    cache: AnswerCache
    listener: ChangeFeed
    pool: list[tuple[int, int, int] | Exception]

    def pool_state(self) -> tuple[int, int, int]:
        state = self.pool[0]
        if isinstance(state, Exception):
            raise state
        return state


def make_parts() -> Parts:
    cache = AnswerCache(CacheSettings(max_entries=500))
    listener = ChangeFeed(
        FeedSettings(dsn="postgresql://unused"),
        invalidate=cache.invalidate_domains,
        flush=cache.flush,
        set_live=cache.set_live,
    )
    return Parts(LookupStats(), DatabaseStats(), ServerCounters(), cache, listener, [(3, 1, 10)])


def collector_for(parts: Parts) -> MaplookupCollector:
    return MaplookupCollector(
        lookups=parts.lookups,
        database=parts.database,
        server=parts.server,
        cache=parts.cache,
        listener=parts.listener,
        pool_state=parts.pool_state,
        statement_counts=lambda: (4, 37),
        info={"version": "9.9.9"},
    )


def scrape(
    collector: MaplookupCollector,
) -> tuple[dict[SampleKey, float], dict[str, tuple[str, str]]]:
    return parse(render(make_registry(collector, process_metrics=False)))


def test_exposition_starts_at_zero_with_documented_families() -> None:
    samples, families = scrape(collector_for(make_parts()))
    expected = {
        "maplookup_build_info": "gauge",
        "maplookup_requests": "counter",
        "maplookup_request_duration_seconds": "histogram",
        "maplookup_connections_open": "gauge",
        "maplookup_connections_accepted": "counter",
        "maplookup_connections_rejected": "counter",
        "maplookup_protocol_errors": "counter",
        "maplookup_read_timeouts": "counter",
        "maplookup_requests_received": "counter",
        "maplookup_cache_hits": "counter",
        "maplookup_cache_negative_hits": "counter",
        "maplookup_cache_misses": "counter",
        "maplookup_cache_shared_misses": "counter",
        "maplookup_cache_stores_skipped": "counter",
        "maplookup_cache_stores_outage_only": "counter",
        "maplookup_cache_invalidations": "counter",
        "maplookup_cache_flushes": "counter",
        "maplookup_cache_evictions": "counter",
        "maplookup_cache_stale_answers": "counter",
        "maplookup_cache_database_errors": "counter",
        "maplookup_cache_entries": "gauge",
        "maplookup_cache_max_entries": "gauge",
        "maplookup_cache_live": "gauge",
        "maplookup_listen_connected": "gauge",
        "maplookup_change_feed_listening": "gauge",
        "maplookup_change_feed_changes": "counter",
        "maplookup_notifications": "counter",
        "maplookup_listen_reconnects": "counter",
        "maplookup_listen_connection_losses": "counter",
        "maplookup_change_feed_last_read_age_seconds": "gauge",
        "maplookup_change_feed_server_changes": "counter",
        "maplookup_db_server": "gauge",
        "maplookup_db_query_duration_seconds": "histogram",
        "maplookup_db_queries": "counter",
        "maplookup_db_errors": "counter",
        "maplookup_db_timeouts": "counter",
        "maplookup_db_pool_connections": "gauge",
        "maplookup_db_pool_max_connections": "gauge",
        "maplookup_db_statements": "counter",
        "maplookup_db_statement_keys": "counter",
    }
    assert {name: kind for name, (kind, _) in families.items()} == expected
    assert all(len(help_text) > 20 for _, help_text in families.values())
    assert value(samples, "maplookup_build_info", version="9.9.9") == 1
    assert value(samples, "maplookup_requests_total", map="vmailbox", result="OK") == 0
    assert value(samples, "maplookup_requests_total", map="unknown", result="PERM") == 0
    assert value(samples, "maplookup_cache_max_entries") == 500
    assert value(samples, "maplookup_listen_connected") == 0
    assert value(samples, "maplookup_db_pool_connections", state="idle") == 1
    assert value(samples, "maplookup_db_pool_connections", state="busy") == 2
    assert value(samples, "maplookup_db_pool_max_connections") == 10
    assert value(samples, "maplookup_request_duration_seconds_count", map="uid") == 0


def test_exposition_follows_the_counters() -> None:
    parts = make_parts()
    collector = collector_for(parts)
    registry = make_registry(collector, process_metrics=False)

    parts.lookups.record("vmailbox", "OK", 0.0004)
    parts.lookups.record("vmailbox", "OK", 0.02)
    parts.lookups.record("virtual", "TEMP", 3.0)
    parts.lookups.record("no-such-map", "PERM", 0.00001)
    parts.database.record_query(0.0007, "ok")
    parts.database.record_query(5.0, "timeout")
    parts.server.connections_open = 4
    parts.server.connections_accepted = 7
    parts.server.connections_rejected = 2
    parts.server.protocol_errors = 1
    parts.server.read_timeouts = 3
    parts.server.requests = 11
    parts.cache.counters.hits = 5
    parts.cache.counters.negative_hits = 6
    parts.cache.counters.misses = 8
    parts.cache.counters.stale_served = 1
    parts.cache.counters.evictions = 9
    parts.cache.set_live(True)  # flushes once
    parts.cache.invalidate_domains({"example.com", "example.org"})
    parts.listener.live = True
    parts.listener.counters.notifications = 12
    parts.listener.counters.connects = 3
    parts.listener.counters.connection_losses = 2
    parts.listener.counters.changes = 7
    parts.listener.position = 42
    parts.listener.listening = True
    parts.pool[0] = (5, 0, 10)

    samples, _ = parse(render(registry))
    assert value(samples, "maplookup_requests_total", map="vmailbox", result="OK") == 2
    assert value(samples, "maplookup_requests_total", map="virtual", result="TEMP") == 1
    assert value(samples, "maplookup_requests_total", map="unknown", result="PERM") == 1
    assert (
        "maplookup_requests_total",
        frozenset({("map", "no-such-map"), ("result", "PERM")}),
    ) not in samples
    hist = "maplookup_request_duration_seconds"
    assert value(samples, f"{hist}_count", map="vmailbox") == 2
    assert value(samples, f"{hist}_sum", map="vmailbox") == pytest.approx(0.0204)
    assert value(samples, f"{hist}_bucket", map="vmailbox", le="0.0005") == 1
    assert value(samples, f"{hist}_bucket", map="vmailbox", le="0.025") == 2
    assert value(samples, f"{hist}_bucket", map="vmailbox", le="+Inf") == 2
    assert value(samples, f"{hist}_bucket", map="virtual", le="2.5") == 0
    assert value(samples, f"{hist}_bucket", map="virtual", le="5.0") == 1
    assert value(samples, "maplookup_db_queries_total") == 2
    assert value(samples, "maplookup_db_errors_total") == 1
    assert value(samples, "maplookup_db_timeouts_total") == 1
    assert value(samples, "maplookup_db_query_duration_seconds_bucket", le="0.001") == 1
    assert value(samples, "maplookup_db_query_duration_seconds_count") == 2
    assert value(samples, "maplookup_connections_open") == 4
    assert value(samples, "maplookup_connections_accepted_total") == 7
    assert value(samples, "maplookup_connections_rejected_total") == 2
    assert value(samples, "maplookup_protocol_errors_total") == 1
    assert value(samples, "maplookup_read_timeouts_total") == 3
    assert value(samples, "maplookup_requests_received_total") == 11
    assert value(samples, "maplookup_cache_hits_total") == 5
    assert value(samples, "maplookup_cache_negative_hits_total") == 6
    assert value(samples, "maplookup_cache_misses_total") == 8
    assert value(samples, "maplookup_cache_stale_answers_total") == 1
    assert value(samples, "maplookup_cache_evictions_total") == 9
    assert value(samples, "maplookup_cache_flushes_total") == 1
    assert value(samples, "maplookup_cache_invalidations_total") == 2
    assert value(samples, "maplookup_cache_live") == 1
    assert value(samples, "maplookup_listen_connected") == 1
    assert value(samples, "maplookup_notifications_total") == 12
    assert value(samples, "maplookup_change_feed_position") == 42
    assert value(samples, "maplookup_change_feed_listening") == 1
    assert value(samples, "maplookup_change_feed_changes_total") == 7
    assert value(samples, "maplookup_listen_reconnects_total") == 2
    assert value(samples, "maplookup_listen_connection_losses_total") == 2
    assert value(samples, "maplookup_db_pool_connections", state="idle") == 0
    assert value(samples, "maplookup_db_pool_connections", state="busy") == 5


def test_cache_entries_gauge_counts_entries() -> None:
    parts = make_parts()
    parts.cache.store((MapName.VMAILBOX, "a@example.com"), "x", "example.com", (0, 0))
    samples, _ = scrape(collector_for(parts))
    assert value(samples, "maplookup_cache_entries") == 1


def test_statement_counts_are_counters() -> None:
    samples, families = scrape(collector_for(make_parts()))
    assert families["maplookup_db_statements"][0] == "counter"
    assert value(samples, "maplookup_db_statements_total") == 4
    assert value(samples, "maplookup_db_statement_keys_total") == 37


def test_pool_state_failure_omits_only_the_pool_metrics() -> None:
    parts = make_parts()
    parts.pool[0] = RuntimeError("pool closed")
    samples, families = scrape(collector_for(parts))
    assert "maplookup_db_pool_connections" not in families
    assert "maplookup_db_pool_max_connections" not in families
    assert "maplookup_cache_hits" in families
    assert value(samples, "maplookup_db_queries_total") == 0


def test_optional_parts_are_omitted() -> None:
    samples, families = scrape(MaplookupCollector(lookups=LookupStats()))
    assert set(families) == {"maplookup_requests", "maplookup_request_duration_seconds"}
    assert samples


@dataclass(frozen=True)
class FakeServer:
    counters: ServerCounters


@dataclass(frozen=True)
class FakeRunning:
    server: FakeServer
    cache: AnswerCache | None
    listener: ChangeFeed | None


def test_from_running_without_cache_or_listener() -> None:
    counters = ServerCounters(connections_open=2)
    running = FakeRunning(FakeServer(counters), cache=None, listener=None)
    collector = MaplookupCollector.from_running(
        running, lookups=LookupStats(), database=DatabaseStats(), info={"version": "1"}
    )
    samples, families = scrape(collector)
    assert value(samples, "maplookup_connections_open") == 2
    assert not any(name.startswith(("maplookup_cache", "maplookup_listen")) for name in families)
    assert "maplookup_notifications" not in families
    assert "maplookup_db_queries" in families


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process metrics read /proc")
def test_render_includes_process_metrics_on_a_private_registry() -> None:
    text = render(MaplookupCollector(info={"version": "1"}))
    samples, families = parse(text)
    assert "maplookup_build_info" in families
    assert "process_resident_memory_bytes" in families
    assert value(samples, "process_open_fds") > 0
    # The garbage collector's collections, and what start-up froze (nothing in a test).
    assert families["python_gc_collections"][0] == "counter"
    assert "maplookup_gc_frozen_objects" in families
    # Nothing else from prometheus_client's global default registry (python_info, platform).
    assert "python_info" not in families


def test_render_twice_is_stable() -> None:
    registry = make_registry(collector_for(make_parts()))
    first, _ = parse(render(registry))
    second, _ = parse(render(registry))
    assert {k for k in first if not k[0].startswith("process_")} == {
        k for k in second if not k[0].startswith("process_")
    }
