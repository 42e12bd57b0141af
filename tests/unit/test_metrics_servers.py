"""maplookup_db_server: each connection's server and role, the role following a promotion."""

from __future__ import annotations

from dataclasses import dataclass

from maplookup.db.servers import Reached, ServerAddress
from maplookup.db.status import ServerStatus
from maplookup.metrics.servers import server_metrics


@dataclass
class _Feed:
    server: Reached | None
    status: ServerStatus | None


@dataclass
class _Pin:
    lookup_server: Reached | None


def _roles(feed: _Feed, pin: _Pin) -> dict[str, tuple[str, str]]:
    (family,) = server_metrics(feed, pin)  # type: ignore[arg-type]
    return {s.labels["connection"]: (s.labels["server"], s.labels["role"]) for s in family.samples}


def test_a_promoted_server_is_primary_for_both_connections_on_it() -> None:
    """Found by a new-user trial: after a promotion the lookups stayed "standby" in /metrics
    (their role was the one seen at connect time) while /healthz said primary."""
    standby = Reached(ServerAddress("127.0.0.1", 5433), 0, in_recovery=True, read_only=True)
    promoted = ServerStatus(False, None, None, None, None)
    roles = _roles(_Feed(standby, promoted), _Pin(standby))
    assert roles == {
        "change_feed": ("127.0.0.1:5433", "primary"),
        "lookups": ("127.0.0.1:5433", "primary"),
    }
    # A lookups connection on another server keeps the role it was reached with.
    other = Reached(ServerAddress("127.0.0.1", 5432), 1, in_recovery=True, read_only=True)
    assert _roles(_Feed(standby, promoted), _Pin(other))["lookups"] == ("127.0.0.1:5432", "standby")
