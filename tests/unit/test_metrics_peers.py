"""/metrics across workers: merging expositions, and the sockets the workers give them on."""

from __future__ import annotations

import os

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from maplookup.maps import MapName
from maplookup.metrics import DatabaseStats, LookupStats, MaplookupCollector, make_registry, render
from maplookup.metrics.peers import WorkerPeers, gather, merge, read_peer, serve_own_metrics
from maplookup.protocol import Status
from maplookup.serve.server import ServerCounters

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: bytes) -> tuple[Samples, list[str]]:
    samples: Samples = {}
    names = []
    for family in text_string_to_metric_families(text.decode()):
        names.append(family.name)
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, names


def worker_exposition(requests: int, accepted: int) -> bytes:
    lookups = LookupStats()
    for _ in range(requests):
        lookups.record(MapName.VMAILBOX.value, Status.OK, 0.001)
    counters = ServerCounters()
    counters.connections_accepted = accepted
    collector = MaplookupCollector(
        lookups=lookups, database=DatabaseStats(), server=counters, info={"version": "1.0"}
    )
    return render(make_registry(collector, process_metrics=False))


def test_merge_labels_every_sample_with_its_worker_and_counts_workers() -> None:
    merged = merge({0: worker_exposition(3, 1), 1: worker_exposition(5, 2)}, configured=3)
    samples, names = parse(merged)
    assert len(names) == len(set(names)), "each family once"
    ok = {"map": "vmailbox", "result": "OK"}
    assert samples[("maplookup_requests_total", frozenset({**ok, "worker": "0"}.items()))] == 3
    assert samples[("maplookup_requests_total", frozenset({**ok, "worker": "1"}.items()))] == 5
    accepted = "maplookup_connections_accepted_total"
    assert samples[(accepted, frozenset({("worker", "0")}))] == 1
    assert samples[(accepted, frozenset({("worker", "1")}))] == 2
    # Histograms keep their buckets, sums and counts, per worker.
    count = "maplookup_request_duration_seconds_count"
    assert samples[(count, frozenset({("worker", "1"), ("map", "vmailbox")}))] == 5
    assert samples[("maplookup_workers", frozenset({("state", "configured")}))] == 3
    assert samples[("maplookup_workers", frozenset({("state", "answering")}))] == 2
    # Every sample but the worker count names its worker.
    for name, labels in samples:
        assert name == "maplookup_workers" or "worker" in dict(labels), name


def _peers(index: int, count: int = 3) -> WorkerPeers:
    return WorkerPeers(index, count, f"maplookup-test-{os.getpid()}-{id(object())}")


async def test_a_worker_gives_its_figures_and_worker_0_gathers_them() -> None:
    one = _peers(1)
    two = WorkerPeers(2, 3, one.namespace)
    zero = WorkerPeers(0, 3, one.namespace)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_own_metrics, one, lambda: worker_exposition(7, 1))
        await nursery.start(serve_own_metrics, two, lambda: worker_exposition(9, 4))
        assert await read_peer(one.address(1)) == worker_exposition(7, 1)
        merged = await gather(zero, worker_exposition(1, 1))
        nursery.cancel_scope.cancel()
    samples, _ = parse(merged)
    assert samples[("maplookup_workers", frozenset({("state", "answering")}))] == 3
    accepted = "maplookup_connections_accepted_total"
    assert [samples[(accepted, frozenset({("worker", w)}))] for w in "012"] == [1, 1, 4]


async def test_a_worker_that_does_not_answer_is_counted_not_waited_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    zero = _peers(0, count=2)  # worker 1 never started
    with trio.fail_after(5):
        merged = await gather(zero, worker_exposition(2, 1))
    samples, _ = parse(merged)
    assert samples[("maplookup_workers", frozenset({("state", "configured")}))] == 2
    assert samples[("maplookup_workers", frozenset({("state", "answering")}))] == 1
    assert "no figures from worker(s) 1" in caplog.text


async def test_a_stuck_worker_costs_the_scrape_at_most_the_peer_timeout() -> None:
    zero = _peers(0, count=2)
    one = WorkerPeers(1, 2, zero.namespace)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(one.address(1))
    sock.listen(1)  # accepts (in the backlog) and never writes
    try:
        with trio.fail_after(5):
            assert await read_peer(one.address(1), timeout_s=0.2) is None
    finally:
        sock.close()
