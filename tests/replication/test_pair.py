"""The fixture itself: a real streaming hot standby that replays, refuses writes, restarts and
can be promoted."""

from __future__ import annotations

import asyncpg
import pytest

from maplookup.db.changes import CHANNEL
from tests.helpers import run_sql
from tests.replication.pair import ReplicatedPair, _fetch


def test_the_standby_replays_the_primary_and_refuses_writes(
    pair: ReplicatedPair, databases: tuple[str, str]
) -> None:
    primary, standby = databases
    assert _fetch(primary, "SELECT pg_is_in_recovery()") is False
    assert _fetch(standby, "SELECT pg_is_in_recovery()") is True
    run_sql(primary, "INSERT INTO maplookup.domains (name, kind) VALUES ('example.com', 'mailbox')")
    pair.wait_until_replayed()
    assert _fetch(standby, "SELECT maplookup.domains('example.com')") == "example.com"
    assert _fetch(standby, "SELECT maplookup.change_log_head()") == _fetch(
        primary, "SELECT maplookup.change_log_head()"
    )
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        run_sql(
            standby, "INSERT INTO maplookup.domains (name, kind) VALUES ('x.example', 'mailbox')"
        )
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        run_sql(standby, f"LISTEN {CHANNEL}")


def test_the_standby_restarts_and_catches_up(
    pair: ReplicatedPair, databases: tuple[str, str]
) -> None:
    primary, standby = databases
    pair.standby.stop(mode="fast")
    run_sql(
        primary, "INSERT INTO maplookup.domains (name, kind) VALUES ('late.example', 'mailbox')"
    )
    pair.standby.start()
    pair.wait_until_replayed()
    assert _fetch(standby, "SELECT maplookup.domains('late.example')") == "late.example"


def test_a_promoted_standby_accepts_writes_and_goes_on_with_the_log(
    own_pair: ReplicatedPair,
) -> None:
    primary, standby = own_pair.new_database()
    run_sql(primary, "INSERT INTO maplookup.domains (name, kind) VALUES ('old.example', 'mailbox')")
    own_pair.wait_until_replayed()
    head = _fetch(standby, "SELECT maplookup.change_log_head()")
    assert isinstance(head, int)
    assert head > 0
    own_pair.primary.stop(mode="fast")
    own_pair.promote_standby()
    assert _fetch(standby, "SELECT pg_is_in_recovery()") is False
    run_sql(standby, "INSERT INTO maplookup.domains (name, kind) VALUES ('new.example', 'mailbox')")
    assert _fetch(standby, "SELECT maplookup.domains('new.example')") == "new.example"
    # Positions go on increasing on the new primary (the sequence may skip ahead: holes are
    # allowed, going back is not).
    new_head = _fetch(standby, "SELECT maplookup.change_log_head()")
    assert isinstance(new_head, int)
    assert new_head > head
