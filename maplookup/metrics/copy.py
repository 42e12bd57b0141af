"""Metrics of the complete copy (``cache.mode = "complete"``): its age, size and updates.

The age is the figure to alert on: the time since the change feed last confirmed the copy
current.  Lookups are answered from the copy while it is at most ``max_stale_s`` old (during a
database outage too), and go to the database beyond that.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .views import CopyView


def copy_metrics(copy: CopyView) -> Iterator[Metric]:
    counters = copy.counters
    age = copy.age()
    held = copy.copy
    yield GaugeMetricFamily(
        "maplookup_copy_loaded",
        "1 when a complete copy of the maps is in memory (cache.mode = complete), 0 while the "
        "first snapshot loads or after the copy was refused for its size (LRU mode answers).",
        value=0 if held is None else 1,
    )
    if age is not None:
        yield GaugeMetricFamily(
            "maplookup_copy_age_seconds",
            "Seconds since the change feed last confirmed the complete copy current; lookups "
            "are answered from it while this is at most cache.max_stale_s.",
            value=age,
        )
    yield GaugeMetricFamily(
        "maplookup_copy_max_stale_seconds",
        "cache.max_stale_s: the age beyond which lookups no longer come from the copy.",
        value=copy.max_stale_s,
    )
    if copy.position is not None:
        yield GaugeMetricFamily(
            "maplookup_copy_position",
            "The change-log position the complete copy is current to.",
            value=copy.position,
        )
    if copy.loaded_in_s is not None:
        yield GaugeMetricFamily(
            "maplookup_copy_load_seconds",
            "How long the last snapshot took to load into the complete copy.",
            value=copy.loaded_in_s,
        )
    if held is not None:
        entries = GaugeMetricFamily(
            "maplookup_copy_entries",
            "Entries of the complete copy, by table (disabled rows are not held).",
            labels=["table"],
        )
        for table, count in held.counts().items():
            entries.add_metric([table], count)
        yield entries
    yield GaugeMetricFamily(
        "maplookup_copy_memo_entries",
        "Answers of the complete copy remembered now (cache.complete_memo_entries bounds them; "
        "forgotten at every change).",
        value=copy.memo_size(),
    )
    for name, documentation, value in (
        ("answers", "Lookups answered from the complete copy.", counters.answers),
        ("memo_answers", "Of the copy's answers, those remembered from an earlier lookup "
         "(cache.complete_memo_entries).", counters.remembered),
        (
            "fallbacks",
            "Lookups the complete copy did not answer (not loaded yet, older than "
            "max_stale_s, or refused): answered by the LRU cache and the database.",
            counters.fallbacks,
        ),
        ("loads", "Snapshots loaded into the complete copy (the first, then each reload).",
         counters.loads),
        ("partition_updates", "Change-log batches applied to the copy.",
         counters.partition_updates),
        ("partitions_replaced", "Domains re-read whole for the change log (domain rows, "
         "statements of more than 1000 rows).", counters.partitions_replaced),
        ("records_replaced", "Rows re-read alone for the change log (the records it named).",
         counters.records_replaced),
    ):  # fmt: skip
        yield CounterMetricFamily(f"maplookup_copy_{name}", documentation, value=value)
