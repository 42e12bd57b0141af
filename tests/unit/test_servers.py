"""Host lists without a database: parsing, forcing read-write, which server suits a target,
and the change feed's health report."""

from __future__ import annotations

import pytest

from maplookup.db.servers import (
    NoServer,
    Reached,
    ServerAddress,
    _accepts,
    host_list,
    target_of,
    with_target,
)
from maplookup.db.status import ServerStatus
from maplookup.serve.feed_health import feed_health


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://u:p@db1:5432,db2:5433/mail", [("db1", 5432), ("db2", 5433)]),
        ("postgres://u@db1,db2:6000/mail", [("db1", None), ("db2", 6000)]),
        ("postgresql://u@[::1]:5432,127.0.0.1/mail", [("::1", 5432), ("127.0.0.1", None)]),
        ("postgresql://u@%2Frun%2Fpg:5432/mail", [("/run/pg", 5432)]),
        ("postgresql:///mail?host=/run/pg,db2&port=5432,5433", [("/run/pg", 5432), ("db2", 5433)]),
        ("postgresql:///mail", [(None, None)]),
        ("host=db1 dbname=mail", [(None, None)]),
    ],
)
def test_host_list(dsn: str, expected: list[tuple[str | None, int | None]]) -> None:
    assert host_list(dsn) == [ServerAddress(h, p) for h, p in expected]


def test_addresses_print_as_host_port() -> None:
    assert str(ServerAddress("db1", 5432)) == "db1:5432"
    assert str(ServerAddress("::1", 5432)) == "[::1]:5432"
    assert str(ServerAddress("db1", None)) == "db1"
    assert str(ServerAddress(None, None)) == "(default server)"


def test_with_target_replaces_the_dsns_own() -> None:
    dsn = "postgresql://u:p@s:5433,p:5432/mail?target_session_attrs=prefer-standby&sslmode=require"
    forced = with_target(dsn, "read-write")
    assert target_of(forced) == "read-write"
    assert host_list(forced) == host_list(dsn)
    assert "sslmode=require" in forced
    assert forced.startswith("postgresql://u:p@s:5433,p:5432/mail?")


def test_target_of(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGTARGETSESSIONATTRS", raising=False)
    assert target_of("postgresql://h/db") == "any"
    monkeypatch.setenv("PGTARGETSESSIONATTRS", "read-write")
    assert target_of("postgresql://h/db") == "read-write"
    assert target_of("postgresql://h/db?target_session_attrs=standby") == "standby"
    with pytest.raises(NoServer, match="not one of"):
        target_of("postgresql://h/db?target_session_attrs=master")


PRIMARY = Reached(ServerAddress("p", 1), 0, in_recovery=False, read_only=False)
STANDBY = Reached(ServerAddress("s", 2), 1, in_recovery=True, read_only=True)
READ_ONLY_PRIMARY = Reached(ServerAddress("r", 3), 2, in_recovery=False, read_only=True)


@pytest.mark.parametrize(
    ("target", "suits"),
    [
        ("any", {"p", "s", "r"}),
        ("read-write", {"p"}),
        ("read-only", {"s", "r"}),
        ("primary", {"p", "r"}),
        ("standby", {"s"}),
        ("prefer-standby", {"s"}),  # the others only as the fallback (connect_listed)
    ],
)
def test_which_server_suits_a_target(target: str, suits: set[str]) -> None:
    servers = (PRIMARY, STANDBY, READ_ONLY_PRIMARY)
    assert {r.address.host for r in servers if _accepts(target, r)} == suits


class Feed:
    live = True
    listening = False
    position: int | None = 7
    server: Reached | None = STANDBY
    status: ServerStatus | None = ServerStatus(True, 0.25, 4096, 3.0, True)
    last_read_at: float | None = 100.0
    started_at = 50.0


def test_feed_health_reports_server_lag_and_delay() -> None:
    report = feed_health(Feed(), stuck_after_s=30.0, now=100.5)
    assert report.problem is None
    details = report.details
    assert details["last_read_age_s"] == 0.5
    assert details["position"] == 7
    assert details["server"] == {
        "server": "s:2",
        "role": "standby",
        "replay_lag_s": 0.25,
        "replay_lag_bytes": 4096,
        "last_replay_age_s": 3.0,
        "wal_receiver": "streaming",
    }


def test_a_standby_that_does_not_receive_wal_is_a_warning_not_a_problem() -> None:
    """Found by a new-user trial: /healthz said "ok" with nothing about it."""
    assert feed_health(Feed(), stuck_after_s=30.0, now=100.5).warning is None
    feed = Feed()
    feed.status = ServerStatus(True, 0.0, 0, 42.0, False)
    report = feed_health(feed, stuck_after_s=30.0, now=100.5)
    assert report.problem is None
    assert report.warning == (
        "the standby s:2 is not receiving WAL: it answers from data that no longer follows "
        "the primary (last replayed commit 42 s ago); lookups go on, changes do not arrive"
    )


def test_a_feed_that_has_not_read_beyond_the_bound_is_stuck() -> None:
    feed = Feed()
    assert feed_health(feed, stuck_after_s=30.0, now=130.0).problem is None
    problem = feed_health(feed, stuck_after_s=30.0, now=130.5).problem
    assert problem is not None
    assert "change feed stuck" in problem
    assert "for 30.5 s" in problem
    assert "change_feed_stuck_after_s = 30.0 s" in problem
    feed.last_read_at = None  # never read: counted from start-up
    feed.server = None
    report = feed_health(feed, stuck_after_s=30.0, now=81.0)
    assert report.problem is not None
    assert "since start-up" in report.problem
    assert report.details["server"] == "not connected"


@pytest.mark.parametrize(
    ("query", "reached", "target", "only"),
    [
        ("", STANDBY, "any", [0]),  # an earlier server of any kind
        ("", PRIMARY, "any", []),  # the first: nothing better
        ("?target_session_attrs=prefer-standby", STANDBY, "standby", [0]),  # earlier standbys
        # Read as the fallback (no standby was up): any standby of the list is better.
        ("?target_session_attrs=prefer-standby", PRIMARY, "standby", [1, 2]),
        ("?target_session_attrs=read-write", READ_ONLY_PRIMARY, "read-write", [0, 1]),
    ],
)
def test_which_servers_the_feed_probes_as_better(
    query: str, reached: Reached, target: str, only: list[int]
) -> None:
    from maplookup.db.changes import FeedSettings, _BetterServers

    settings = FeedSettings(dsn=f"postgresql://u@p:1,s:2,r:3/mail{query}")
    better = _BetterServers(settings, reached, now=0.0)
    assert (better._target, better._only) == (target, only)
    assert better.better_suits(0.0) is False  # not due yet
