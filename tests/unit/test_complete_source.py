"""cache.mode = "complete" without a database: the source's choice between the copy and the
fallback, its age, the health report and the metrics, the follower's decisions."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from maplookup.db import copy_follow, copy_load
from maplookup.db.copy_follow import CopyFollower, CopySettings
from maplookup.db.copy_load import CopyTooLarge, LoadedCopy
from maplookup.db.feed import Change, FeedStep
from maplookup.db.servers import Reached, ServerAddress
from maplookup.errors import DatabaseError
from maplookup.lookup.complete import MapsCopy
from maplookup.lookup.complete.rows import SnapshotRows
from maplookup.lookup.complete.source import CompleteSource
from maplookup.lookup.complete.store import CopyChange
from maplookup.maps import LookupSettings, MapName
from maplookup.metrics import MaplookupCollector, render
from maplookup.serve.copy_health import copy_health

ROWS = SnapshotRows(
    domains=[("a.test", "mailbox", None, None, None, True)],
    mailboxes=[("a.test", "user", "a.test/user/", None, None, None, True)],
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Fallback:
    """The LRU path: here a database that is down."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def fetch(self, map_name: MapName, key: str) -> str | None:
        self.asked.append(key)
        raise DatabaseError("down")


class Held:
    settings = LookupSettings()


def source(clock: Clock, fallback: Fallback) -> CompleteSource:
    return CompleteSource(fallback, Held(), max_stale_s=10.0, clock=clock)


async def test_the_copy_answers_present_and_absent_keys_until_max_stale_s() -> None:
    clock, fallback = Clock(), Fallback()
    src = source(clock, fallback)
    with pytest.raises(DatabaseError):  # no copy yet: the fallback
        await src.fetch(MapName.VMAILBOX, "user@a.test")
    src.install(MapsCopy.build(ROWS), position=7, read_at=clock.now, load_s=0.1)
    assert src.settled.is_set()
    clock.now += 10.0  # exactly max_stale_s old: still answered
    assert await src.fetch(MapName.VMAILBOX, "user@a.test") == "a.test/user/"
    assert await src.fetch(MapName.VMAILBOX, "nobody@a.test") is None
    assert src.age() == 10.0
    clock.now += 0.001  # beyond: the fallback (TEMP with the database down), never NOTFOUND
    with pytest.raises(DatabaseError):
        await src.fetch(MapName.VMAILBOX, "nobody@a.test")
    assert fallback.asked == ["user@a.test", "nobody@a.test"]
    src.confirm(8, clock.now)  # the feed is back and read the log
    assert await src.fetch(MapName.VMAILBOX, "nobody@a.test") is None
    assert (src.counters.answers, src.counters.fallbacks) == (3, 2)


async def test_updates_replace_partitions_and_confirm() -> None:
    clock = Clock()
    src = source(clock, Fallback())
    src.update(CopyChange(frozenset({"a.test"}), ROWS), 3, clock.now)  # before any copy: ignored
    assert src.copy is None
    src.install(MapsCopy.build(ROWS), 2, clock.now, 0.1)
    clock.now += 5
    gone = SnapshotRows(domains=[("a.test", "mailbox", None, None, None, True)])
    src.update(CopyChange(frozenset({"a.test"}), gone), 3, clock.now)
    assert await src.fetch(MapName.VMAILBOX, "user@a.test") is None
    assert src.position == 3
    assert src.age() == 0.0
    assert src.counters.partitions_replaced == 1


def test_health_says_loading_current_too_old_and_refused() -> None:
    clock = Clock()
    src = source(clock, Fallback())
    details, problem = copy_health(src)
    assert details["state"] == "loading"
    assert problem is not None
    src.install(MapsCopy.build(ROWS), 2, clock.now, 0.25)
    details, problem = copy_health(src)
    assert problem is None
    assert details["state"] == "current"
    assert details["position"] == 2
    assert details["entries"] == MapsCopy.build(ROWS).counts()
    clock.now += 11
    details, problem = copy_health(src)
    assert problem is not None
    assert "max_stale_s = 10.0 s" in problem
    src.refuse("too large")
    details, problem = copy_health(src)
    assert problem is None  # LRU mode answers, as configured
    assert details["reason"] == "too large"


def test_metrics_report_the_copy() -> None:
    clock = Clock()
    src = source(clock, Fallback())
    text = render(MaplookupCollector(copy=src)).decode()
    assert "maplookup_copy_loaded 0.0" in text
    assert "maplookup_copy_age_seconds" not in text
    src.install(MapsCopy.build(ROWS), 2, clock.now, 0.25)
    clock.now += 3
    text = render(MaplookupCollector(copy=src)).decode()
    assert "maplookup_copy_loaded 1.0" in text
    assert "maplookup_copy_age_seconds 3.0" in text
    assert 'maplookup_copy_entries{table="mailboxes"} 1.0' in text
    assert "maplookup_copy_fallbacks_total 0.0" in text


# -- the follower's decisions (its database reads replaced) ------------------------------------


class Target:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def install(self, copy: MapsCopy, position: int, read_at: float, load_s: float) -> None:
        self.calls.append(f"install {position}")

    def update(self, change: CopyChange, position: int, read_at: float) -> None:
        self.calls.append(f"update {sorted(change.names)} {position}")

    def confirm(self, position: int, read_at: float) -> None:
        self.calls.append(f"confirm {position}")

    def refuse(self, reason: str) -> None:
        self.calls.append("refuse")


def reached(port: int) -> Reached:
    return Reached(ServerAddress("127.0.0.1", port), 0, False, False)


async def test_the_follower_loads_follows_and_reloads_where_it_must(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    heads = iter([10, 25, 40])

    async def load(*_args: object) -> LoadedCopy:
        return LoadedCopy(MapsCopy(), next(heads), 0, 0, 0.0)

    async def rows(_conn: object, _plan: object, _timeout: float) -> tuple[SnapshotRows, ...]:
        return SnapshotRows(), SnapshotRows()

    monkeypatch.setattr(copy_follow, "load_snapshot", load)
    monkeypatch.setattr(copy_follow, "read_rows", rows)
    target = Target()
    follower = CopyFollower(target, CopySettings(max_bytes=1000))
    conn: Any = None  # the feed's connection: not used by the replaced reads
    assert await follower.start(conn, reached(1), head=9) == 10  # first: a snapshot
    step = FeedStep(12, False, frozenset({"a.test"}), 1)
    assert await follower.apply(conn, step, 1.0) == 12
    assert await follower.apply(conn, FeedStep(12, False, frozenset(), 0), 2.0) == 12
    # The same server, its log at or past the copy: follow on from the copy's position.
    assert await follower.start(conn, reached(1), head=20) == 12
    # A log behind the copy (a restored backup, a standby that replayed less): reload.
    assert await follower.start(conn, reached(1), head=11) == 25
    # '*': reload, and follow from the new snapshot's position.
    assert await follower.apply(conn, FeedStep(30, True, frozenset(), 1), 3.0) == 40

    # A load that fails on another server (connection lost): the next connection to that
    # server loads again rather than following on from the first server's position.
    async def lost(*_args: object) -> LoadedCopy:
        raise ConnectionResetError

    monkeypatch.setattr(copy_follow, "load_snapshot", lost)
    with pytest.raises(ConnectionResetError):
        await follower.start(conn, reached(3), head=45)
    with pytest.raises(ConnectionResetError):
        await follower.start(conn, reached(3), head=45)
    # Another server: reload (here the size bound refuses it: LRU from now on).

    async def too_large(*_args: object) -> LoadedCopy:
        raise CopyTooLarge(2000, 5, 1000)

    monkeypatch.setattr(copy_follow, "load_snapshot", too_large)
    assert await follower.start(conn, reached(2), head=50) == 50
    assert not follower.active
    assert await follower.apply(conn, FeedStep(51, True, frozenset(), 1), 4.0) == 51
    await trio.testing.wait_all_tasks_blocked()
    await trio.lowlevel.checkpoint()
    assert target.calls == [
        "install 10",
        "update ['a.test'] 12",
        "confirm 12",
        "install 25",
        "install 40",
        "refuse",
    ]
    assert follower.rebuilds == 2


async def test_the_rows_the_log_names_are_read_once_and_a_failed_read_reloads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The log is read alone; one read of rows follows when something changed: the rows a
    change names and the partitions of the domains named without rows.  The wildcard
    transport's row (logged under the domain '*', which flushes the LRU cache) reloads
    nothing; TRUNCATE does; a read of rows that fails (a timeout) reloads at the next start
    instead of being retried for ever."""
    loads: list[int] = []
    batches: list[list[Change]] = []
    plans: list[tuple[list[str], list[str]]] = []
    rows_read: list[tuple[SnapshotRows, SnapshotRows]] = []

    async def load(*_args: object) -> LoadedCopy:
        loads.append(1)
        return LoadedCopy(MapsCopy(), 10 * len(loads), 0, 0, 0.0)

    async def changes(_conn: object, _position: int, _max_rows: int) -> list[Change]:
        return batches.pop(0)

    async def read(_conn: object, plan: Any, _timeout: float) -> tuple[SnapshotRows, SnapshotRows]:
        plans.append((sorted(plan.names), sorted(plan.keys)))
        if not rows_read:
            raise TimeoutError
        return rows_read.pop(0)

    monkeypatch.setattr(copy_follow, "load_snapshot", load)
    monkeypatch.setattr(copy_follow, "read_changes", changes)
    monkeypatch.setattr(copy_follow, "read_rows", read)
    source = CompleteSource(Fallback(), Held(), max_stale_s=60.0)
    follower = CopyFollower(source, CopySettings(max_bytes=1000))
    conn: Any = None
    assert await follower.start(conn, reached(1), head=10) == 10
    # Nothing changed: no read of rows.
    batches.append([])
    assert await follower.changes_after(conn, 10, 1000) == []
    await follower.apply(conn, FeedStep(10, False, frozenset(), 0), 1.0)
    # A domain row changed, one mailbox, and the wildcard transport.
    batches.append(
        [
            Change(11, ("a.test",)),
            Change(12, ("a.test",), ("mailboxes:user@a.test",)),
            Change(13, ("*",), ("transports:@*",)),
        ]
    )
    rows_read.append(
        (
            # a.test re-read whole (its domain row changed): its mailbox comes with it.
            SnapshotRows(
                domains=[("a.test", "mailbox", None, None, None, True)],
                mailboxes=[("a.test", "user", "a.test/user/", None, None, None, True)],
            ),
            SnapshotRows(
                domains=[("a.test", "mailbox", None, None, None, True)],
                mailboxes=[("a.test", "user", "a.test/user/", None, None, None, True)],
                transports=[("*", "", "smtp:[relay.test]")],
            ),
        )
    )
    await follower.changes_after(conn, 10, 1000)
    assert await follower.apply(conn, FeedStep(13, True, frozenset(), 3), 2.0) == 13
    await trio.testing.wait_all_tasks_blocked()
    copy = source.copy
    assert copy is not None
    assert copy.kind("a.test") == "mailbox"
    assert list(copy.mailboxes) == ["user@a.test"]
    assert copy.transports == {"@*": "smtp:[relay.test]"}
    assert plans == [(["a.test"], ["mailboxes:user@a.test", "transports:@*"])]
    assert (loads, source.position) == ([1], 13)
    assert (source.counters.partitions_replaced, source.counters.records_replaced) == (1, 2)
    # A read of rows that times out: the feed reconnects, and the next start reloads.
    batches.append([Change(14, ("a.test",), ("mailboxes:info@a.test",))])
    await follower.changes_after(conn, 13, 1000)
    with pytest.raises(TimeoutError):
        await follower.apply(conn, FeedStep(14, False, frozenset({"a.test"}), 1), 3.0)
    assert await follower.start(conn, reached(1), head=14) == 20
    assert loads == [1, 1]
    # TRUNCATE (or a pruned log): a fresh snapshot.
    batches.append([Change(21, ("*",))])
    await follower.changes_after(conn, 20, 1000)
    assert await follower.apply(conn, FeedStep(21, True, frozenset(), 1), 4.0) == 30
    assert loads == [1, 1, 1]


def test_too_many_rows_at_once_reload_instead() -> None:
    keys = tuple(f"mailboxes:u{n}@a.test" for n in range(copy_load.MAX_RECORDS_PER_READ + 1))
    assert copy_load.plan_changes([Change(1, ("a.test",), keys)]).flush
    assert not copy_load.plan_changes([Change(1, ("a.test",), keys[:10])]).flush
    assert copy_load.plan_changes([Change(1, ("*",))]).flush
    assert not copy_load.plan_changes([Change(1, ("*",), ("transports:@*",))]).flush


class Reloadable:
    def __init__(self) -> None:
        self.settings = LookupSettings()


async def test_answers_are_remembered_until_the_copy_or_the_settings_change() -> None:
    clock, held = Clock(), Reloadable()
    src = CompleteSource(Fallback(), held, max_stale_s=10.0, clock=clock, memo_entries=3)
    src.install(MapsCopy.build(ROWS), position=7, read_at=clock.now, load_s=0.1)
    assert await src.fetch(MapName.VMAILBOX, "user@a.test") == "a.test/user/"
    assert await src.fetch(MapName.VMAILBOX, "nobody@a.test") is None
    assert await src.fetch(MapName.VMAILBOX, "user@a.test") == "a.test/user/"
    assert await src.fetch(MapName.VMAILBOX, "nobody@a.test") is None  # NOTFOUND remembered
    assert (src.counters.answers, src.counters.remembered, src.memo_size()) == (4, 2, 2)
    # A change to the copy: the remembered answers go in the same step.
    moved = SnapshotRows(
        domains=[("a.test", "mailbox", None, None, None, True)],
        mailboxes=[
            ("a.test", "user", "a.test/moved/", None, None, None, True),
            ("a.test", "nobody", "a.test/nobody/", None, None, None, True),
        ],
    )
    src.update(CopyChange(frozenset({"a.test"}), moved), position=8, read_at=clock.now)
    assert src.memo_size() == 0
    assert await src.fetch(MapName.VMAILBOX, "user@a.test") == "a.test/moved/"
    assert await src.fetch(MapName.VMAILBOX, "nobody@a.test") == "a.test/nobody/"
    # The same key in another map is another answer.
    assert await src.fetch(MapName.UID, "user@a.test") is None
    # Full (3 entries): forgotten, then remembered afresh.
    assert await src.fetch(MapName.VMAILBOX, "user+tag@a.test") == "a.test/moved/"
    assert src.memo_size() == 1
    # A reload with another recipient_delimiter: forgotten (the extension is no longer one).
    assert await src.fetch(MapName.VMAILBOX, "user-tag@a.test") is None
    held.settings = LookupSettings(recipient_delimiter="-")
    assert await src.fetch(MapName.VMAILBOX, "user-tag@a.test") == "a.test/moved/"
    assert src.memo_size() == 1
    # Too old: the fallback answers, and nothing is remembered from it.
    clock.now += 10.001
    with pytest.raises(DatabaseError):
        await src.fetch(MapName.VMAILBOX, "user@a.test")
    assert src.memo_size() == 1


async def test_no_memo_when_it_is_off() -> None:
    clock = Clock()
    src = CompleteSource(Fallback(), Held(), max_stale_s=10.0, clock=clock, memo_entries=0)
    src.install(MapsCopy.build(ROWS), position=7, read_at=clock.now, load_s=0.1)
    for _ in range(2):
        assert await src.fetch(MapName.VMAILBOX, "user@a.test") == "a.test/user/"
    assert (src.counters.remembered, src.memo_size()) == (0, 0)
