"""The change feed's part of ``/healthz``: where it reads, how far behind, and whether stuck.

A feed is *stuck* when it has not read the change log successfully for longer than
``[cache] change_feed_stuck_after_s`` (counted from start-up before its first read): the cache
then no longer hears of changes.  Lookups are still answered (from the database, the cache
not trusted meanwhile), so a short reconnection or a failover through the host list is
reported but does not make the host unhealthy; a feed that cannot read for longer does, and
the reason names the bound and what the feed last saw.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from maplookup.db.servers import Reached
from maplookup.db.status import ServerStatus
from maplookup.metrics.views import ListenerView


@dataclass(frozen=True, slots=True)
class FeedReport:
    details: dict[str, object]
    problem: str | None  # why the host is unhealthy because of its feed, or None
    # What an admin must know although lookups are fine (200): a standby that does not
    # receive WAL answers from data that gets older and older.
    warning: str | None = None


def server_details(reached: Reached | None, status: ServerStatus | None = None) -> object:
    """``{"server": "host:port", "role": ..., lag ...}`` for a connection; a word if none."""
    if reached is None:
        return "not connected"
    details: dict[str, object] = {"server": str(reached.address), "role": reached.role}
    if status is not None:
        details.update(status.as_dict())
    return details


def feed_health(feed: ListenerView, stuck_after_s: float, now: float | None = None) -> FeedReport:
    """The feed's health details and, if it is stuck, why (``now``: ``time.monotonic()``)."""
    now = time.monotonic() if now is None else now
    last = feed.last_read_at
    age = now - (feed.started_at if last is None else last)
    details: dict[str, object] = {
        "live": feed.live,
        "position": feed.position,
        "listening": feed.listening,
        "last_read_age_s": round(age, 3),
        "stuck_after_s": stuck_after_s,
        "server": server_details(feed.server, feed.status if feed.server else None),
    }
    problem = None
    if age > stuck_after_s:
        since = "since start-up" if last is None else f"for {age:.1f} s"
        problem = (
            f"change feed stuck: no successful read of the change log {since} "
            f"(change_feed_stuck_after_s = {stuck_after_s} s); the cache does not follow "
            "changes"
        )
    warning = None
    status = feed.status if feed.server is not None else None
    if status is not None and status.in_recovery and status.wal_receiver is False:
        age_text = (
            ""
            if status.last_replay_age_s is None
            else f" (last replayed commit {status.last_replay_age_s:.0f} s ago)"
        )
        warning = (
            f"the standby {feed.server.address if feed.server else ''} is not receiving WAL: "
            f"it answers from data that no longer follows the primary{age_text}; lookups "
            "go on, changes do not arrive"
        )
    return FeedReport(details, problem, warning)
