"""Metrics of where a host reads and how far behind: the servers, the feed's delay, the lag.

Separate from the collector's counters because they are readings, not counts: which server
each connection is on (``maplookup_db_server``, labelled with the server and its role), how
long ago the change feed last read the log, and the replay lag of the standby it reads
(``db/status.py`` says what each lag figure means and why there are several).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from maplookup.db.servers import Reached

from .views import ListenerView, ServersView


def server_metrics(listener: ListenerView | None, servers: ServersView | None) -> Iterator[Metric]:
    """``maplookup_db_server`` for the feed's and the lookups' connections."""
    family = GaugeMetricFamily(
        "maplookup_db_server",
        "1 for the PostgreSQL server each connection is on (connection: change_feed, or "
        "lookups for the last new pool connection), with its role (primary or standby) when "
        "connected.  With the cache on, both are the same server.",
        labels=["connection", "server", "role"],
    )
    connections: list[tuple[str, Reached | None]] = []
    if listener is not None:
        connections.append(("change_feed", listener.server))
    if servers is not None:
        connections.append(("lookups", servers.lookup_server))
    feed_server = None if listener is None else listener.server
    for name, reached in connections:
        if reached is not None:
            role = reached.role
            # The feed reads its server's status every status interval, so that role follows
            # a promotion; the lookups' role is the one seen at connect time, unless they are
            # on the feed's server (with the cache on, always): then the fresh one applies.
            same = feed_server is not None and feed_server.address == reached.address
            if same and listener is not None and listener.status is not None:
                role = listener.status.role
            family.add_metric([name, str(reached.address), role], 1)
    yield family


def feed_delay_metrics(listener: ListenerView) -> Iterator[Metric]:
    """How long since the feed last read the log, and the lag of the server it reads."""
    last = listener.last_read_at
    age = time.monotonic() - (listener.started_at if last is None else last)
    yield GaugeMetricFamily(
        "maplookup_change_feed_last_read_age_seconds",
        "Seconds since the change feed last read the change log successfully (since start-up "
        "before its first read); /healthz is unhealthy above cache.change_feed_stuck_after_s.",
        value=age,
    )
    yield CounterMetricFamily(
        "maplookup_change_feed_server_changes_total",
        "Times the change feed (and with it the lookups) moved to another server of the host list.",
        value=listener.counters.server_changes,
    )
    status = listener.status
    if listener.server is None or status is None or not status.in_recovery:
        return
    if status.replay_lag_s is not None:
        yield GaugeMetricFamily(
            "maplookup_db_replay_lag_seconds",
            "On a standby: how long the oldest received but unreplayed change has waited (0 "
            "when everything received is replayed).",
            value=status.replay_lag_s,
        )
    if status.replay_lag_bytes is not None:
        yield GaugeMetricFamily(
            "maplookup_db_replay_lag_bytes",
            "On a standby: WAL received but not yet replayed, in bytes.",
            value=status.replay_lag_bytes,
        )
    if status.last_replay_age_s is not None:
        yield GaugeMetricFamily(
            "maplookup_db_last_replay_age_seconds",
            "On a standby: now() - pg_last_xact_replay_timestamp(); grows while the primary is "
            "idle or unreachable.",
            value=status.last_replay_age_s,
        )
    yield GaugeMetricFamily(
        "maplookup_db_wal_receiver_streaming",
        "On a standby: 1 while it streams WAL from a primary, 0 when it is cut off.",
        value=1 if status.wal_receiver else 0,
    )
