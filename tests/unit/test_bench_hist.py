"""bench/lib/hist.py: the latency histogram the load generator records every reply in.

Its docstring promises: values below 256 exact; above, 128 linear sub-buckets per power of two,
so a percentile is at most 1/128 above the true (nearest-rank) value and never above the exact
max; merging is adding counts; max, min and the sum are exact; values up to 2**63 ns and beyond
(2**64 - 1) fit.
"""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.lib.hist import BUCKETS, SUB_BITS, Histogram, bucket_high, bucket_of

REL_ERROR = 1 / 128
LARGEST = 2**64 - 1  # the last bucket's upper edge
PERCENTILES = (0.0, 0.1, 1.0, 50.0, 90.0, 99.0, 99.9, 99.99, 100.0)


def nearest_rank(ordered: list[int], pct: float) -> int:
    rank = max(1, math.ceil(pct / 100.0 * len(ordered) - 1e-9))
    return ordered[rank - 1]


def histogram_of(values: list[int]) -> Histogram:
    h = Histogram()
    for v in values:
        h.record(v)
    return h


# -- bucket edges --------------------------------------------------------------------------------


def test_values_below_256_have_a_bucket_each() -> None:
    for v in range(1 << SUB_BITS):
        assert bucket_of(v) == v
        assert bucket_high(v) == v


def test_buckets_are_contiguous_and_ordered_up_to_the_largest_value() -> None:
    assert bucket_of(0) == 0
    for i in range(1, BUCKETS):
        low = bucket_high(i - 1) + 1  # the first value of bucket i
        assert bucket_of(low) == i
        assert bucket_of(bucket_high(i)) == i
        assert bucket_high(i) >= low
    assert bucket_high(BUCKETS - 1) == LARGEST
    assert bucket_of(LARGEST) == BUCKETS - 1


def test_a_bucket_is_at_most_1_128_of_its_lowest_value_wide() -> None:
    for i in range(1 << SUB_BITS, BUCKETS):
        low = bucket_high(i - 1) + 1
        width = bucket_high(i) - low + 1
        assert width / low <= REL_ERROR
    # The first split bucket: 256 and 257 share one.
    assert bucket_of(256) == bucket_of(257) != bucket_of(258)


@pytest.mark.parametrize("power", [8, 9, 20, 32, 62, 63])
def test_powers_of_two_start_a_bucket(power: int) -> None:
    v = 1 << power
    assert bucket_of(v) == bucket_of(v - 1) + 1
    assert bucket_high(bucket_of(v - 1)) == v - 1


# -- percentiles ---------------------------------------------------------------------------------


def check_percentiles(values: list[int]) -> None:
    h = histogram_of(values)
    ordered = sorted(values)
    for pct in PERCENTILES:
        true = nearest_rank(ordered, pct)
        got = h.percentile(pct)
        assert true <= got <= max(ordered), (pct, true, got)
        assert got - true <= true * REL_ERROR, (pct, true, got)


def test_percentiles_of_latencies_against_sorted_data() -> None:
    rng = random.Random(13)
    values = [int(rng.lognormvariate(math.log(200_000), 0.8)) for _ in range(20_000)]
    check_percentiles(values)


@given(st.lists(st.integers(0, LARGEST), min_size=1, max_size=300))
def test_percentiles_of_any_values_against_sorted_data(values: list[int]) -> None:
    check_percentiles(values)


@given(st.lists(st.integers(0, 255), min_size=1, max_size=300))
def test_percentiles_below_256_are_exact(values: list[int]) -> None:
    h = histogram_of(values)
    ordered = sorted(values)
    for pct in PERCENTILES:
        assert h.percentile(pct) == nearest_rank(ordered, pct)


def test_max_min_and_mean_are_exact() -> None:
    values = [1_000_003, 17, 999_999_937, 4_096]
    h = histogram_of(values)
    assert (h.max, h.min, h.n, h.total) == (max(values), min(values), 4, sum(values))
    assert h.mean() == sum(values) / 4
    assert h.percentile(100) == max(values)  # capped at the exact max, not the bucket's edge


def test_summary_in_microseconds() -> None:
    h = histogram_of([1_000, 2_000, 3_000])
    summary = h.summary_us()
    assert summary["n"] == 3
    assert summary["mean_us"] == 2.0
    assert summary["min_us"] == 1.0
    assert summary["max_us"] == 3.0
    assert summary["p50_us"] == pytest.approx(2.0, rel=REL_ERROR)
    percentiles = {"p50_us", "p90_us", "p99_us", "p99_9_us"}
    assert set(summary) == {"n", "mean_us", "min_us", "max_us", *percentiles}


# -- empty, extreme, negative ----------------------------------------------------------------------


def test_empty_histogram() -> None:
    h = Histogram()
    assert h.n == 0
    assert h.percentile(50) == 0
    assert h.percentile(100) == 0
    assert h.mean() == 0.0
    summary = h.summary_us()
    assert summary["n"] == 0
    assert summary["min_us"] == 0.0  # not the -1 "nothing recorded" marker
    assert summary["max_us"] == 0.0
    assert Histogram.from_json(json.loads(json.dumps(h.to_json()))).to_json() == h.to_json()


@pytest.mark.parametrize("value", [0, 1, 255, 256, 257, 2**31, 2**62, 2**63 - 1, 2**63, LARGEST])
def test_a_single_extreme_value_is_reported_exactly(value: int) -> None:
    h = histogram_of([value])
    for pct in PERCENTILES:
        assert h.percentile(pct) == value
    assert (h.min, h.max, h.total) == (value, value, value)


def test_extremes_together() -> None:
    values = [0, 0, 1, LARGEST, LARGEST]
    h = histogram_of(values)
    assert h.percentile(0) == 0
    assert h.percentile(50) == 1
    assert h.percentile(100) == LARGEST
    assert h.min == 0
    assert h.total == sum(values)  # Python integers: no overflow


def test_a_negative_value_counts_as_zero() -> None:
    # A clock step can make a latency negative; it must not index from the end of the list.
    h = histogram_of([-5, 10])
    assert h.counts[0] == 1
    assert (h.min, h.max, h.total) == (0, 10, 10)


# -- merge and JSON --------------------------------------------------------------------------------


def same(a: Histogram, b: Histogram) -> bool:
    return (a.counts, a.n, a.total, a.max, a.min) == (b.counts, b.n, b.total, b.max, b.min)


@given(st.lists(st.integers(0, 2**40), max_size=100), st.lists(st.integers(0, 2**40), max_size=100))
def test_merge_equals_recording_everything_in_one(left: list[int], right: list[int]) -> None:
    merged = histogram_of(left)
    merged.merge(histogram_of(right))
    assert same(merged, histogram_of(left + right))


def test_merge_with_empty_keeps_min() -> None:
    h = histogram_of([42, 7])
    h.merge(Histogram())
    assert (h.n, h.min, h.max) == (2, 7, 42)
    empty = Histogram()
    empty.merge(histogram_of([42, 7]))
    assert (empty.n, empty.min, empty.max) == (2, 7, 42)


def test_merge_does_not_change_the_other() -> None:
    other = histogram_of([5, 500, 5_000_000])
    before = other.to_json()
    histogram_of([1]).merge(other)
    assert other.to_json() == before


@given(st.lists(st.integers(0, LARGEST), max_size=100))
def test_json_round_trip(values: list[int]) -> None:
    h = histogram_of(values)
    again = Histogram.from_json(json.loads(json.dumps(h.to_json())))
    assert same(again, h)


def test_json_from_another_layout_is_refused() -> None:
    data = histogram_of([1]).to_json()
    data["sub_bits"] = SUB_BITS + 1
    with pytest.raises(ValueError, match="different layout"):
        Histogram.from_json(data)
