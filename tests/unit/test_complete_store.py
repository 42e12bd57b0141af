"""The complete copy's data layout (maplookup/lookup/complete/store.py), without a database.

What the property test (tests/integration/test_complete_copy.py) cannot see: that the copy
stays out of the garbage collector's walk, that the usual mailbox costs one shared value, and
that the index lets a partition go without touching the others.
"""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from maplookup.lookup.complete import MapsCopy, store
from maplookup.lookup.complete.rows import SnapshotRows
from maplookup.lookup.complete.store import (
    SNAPSHOT_TABLES,
    TABLES,
    CopyBuilder,
    mailbox_login,
    mailbox_path,
)

ROWS = SnapshotRows(
    domains=[
        ("a.test", "mailbox", None, 5000, None, True),
        ("m.test", "alias", "a.test", None, None, True),
        ("off.test", "mailbox", None, None, None, False),
    ],
    mailboxes=[
        ("a.test", "user", "a.test/user/", None, None, "user@a.test", True),
        ("a.test", "bob", "a.test/bob/", None, None, "bob@a.test", True),
        ("a.test", "", "catch/", 7000, None, None, True),
        ("a.test", "dis", "a.test/dis/", None, None, None, False),
        ("off.test", "x", "off.test/x/", None, None, None, True),
    ],
    aliases=[("a.test", "info", ["user@a.test", "Bob@a.test"], True)],
    sender_grants=[("a.test", "", "boss"), ("a.test", "", "chief"), ("gmail.test", "me", "bob")],
    relay_recipients=[("a.test", "x")],
    transports=[("*", "", "smtp:[h]"), (".a.test", "", "lmtp:x")],
)


def test_the_copy_holds_nothing_the_garbage_collector_walks() -> None:
    copy = MapsCopy.build(ROWS)
    gc.collect()
    held = [copy.domains, copy.index, *(getattr(copy, table) for table in TABLES)]
    assert not any(gc.is_tracked(d) for d in held)


def test_default_paths_and_logins_pack_into_one_shared_value() -> None:
    copy = MapsCopy.build(ROWS)
    user, bob = copy.mailboxes["user@a.test"], copy.mailboxes["bob@a.test"]
    assert user is bob
    assert mailbox_path(user, "user@a.test") == "a.test/user/"
    assert mailbox_login(bob, "bob@a.test") == "bob@a.test"
    assert mailbox_login(copy.mailboxes["@a.test"], "@a.test") is None


def test_what_no_lookup_can_see_is_left_out() -> None:
    copy = MapsCopy.build(ROWS)
    assert "dis@a.test" not in copy.mailboxes  # a disabled mailbox
    assert "x@off.test" not in copy.mailboxes  # in a disabled domain
    assert copy.kind("off.test") == ""
    assert copy.grants["@a.test"].split("\n") == ["boss", "chief"]
    assert copy.grants["me@gmail.test"] == "bob"  # grants need no hosted domain


def test_replace_changes_one_partition_only() -> None:
    copy = MapsCopy.build(ROWS)
    fresh = SnapshotRows(
        domains=[("a.test", "mailbox", None, None, None, True)],
        mailboxes=[("a.test", "new", "a.test/new/", None, None, None, True)],
        transports=[("*", "", "smtp:[other]")],  # not a named partition: ignored
    )
    copy.replace(["a.test", "gone.test"], fresh)
    assert sorted(copy.mailboxes) == ["new@a.test"]
    assert copy.aliases == {}
    assert copy.relay_recipients == {}
    assert "@a.test" not in copy.grants
    assert copy.grants["me@gmail.test"] == "bob"
    assert copy.transports["@*"] == "smtp:[h]"
    assert copy.kind("m.test") == "alias"
    assert copy.domain("a.test") is not None
    copy.replace(["a.test"], SnapshotRows())
    assert copy.domain("a.test") is None
    assert copy.mailboxes == {}
    assert "a.test" not in copy.index


def test_a_build_in_chunks_equals_one_build() -> None:
    """The loader streams each table through a cursor, chunk by chunk (CopyBuilder)."""
    whole = MapsCopy.build(ROWS)
    builder = CopyBuilder(MapsCopy(), None)
    for table in SNAPSHOT_TABLES:
        rows = list(getattr(ROWS, table))
        for start in range(0, len(rows), 2):
            builder.add(table, rows[start : start + 2])
    chunked = builder.finish()
    assert builder.rows == sum(len(list(getattr(ROWS, t))) for t in SNAPSHOT_TABLES)
    for table in ("domains", "index", *TABLES):
        assert getattr(chunked, table) == getattr(whole, table), table
    with pytest.raises(ValueError, match="out of order"):
        builder.add("domains", [])


@pytest.mark.parametrize("layout", ["default", "explicit"])
def test_the_size_estimate_is_near_what_tracemalloc_measures(layout: str) -> None:
    """cache.complete_max_bytes is checked against this estimate while a snapshot streams in:
    it must not be far below the truth (a refused limit would let memory run past it)."""
    from bench.memory_copy import make_rows

    rows = make_rows(20_000, layout)
    gc.collect()
    tracemalloc.start()
    try:
        builder = CopyBuilder(MapsCopy(), None)
        for table in SNAPSHOT_TABLES:
            builder.add(table, getattr(rows, table))
        copy = builder.finish()
        del rows
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert copy.counts()["mailboxes"] > 0
    assert 0.9 <= builder.estimated_bytes() / traced <= 1.4


def test_rows_applied_alone_are_removed_with_their_partition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Keys that apply_records adds are noted (``added``), merged into the index once the
    note grows long, and removed with their partition either way; visibility follows the
    domain rows read with them, not the copy's own."""
    monkeypatch.setattr(store, "ADDED_MERGE_CHARS", 60)
    copy = MapsCopy.build(
        SnapshotRows(
            domains=[
                ("a.test", "mailbox", None, None, None, True),
                ("off.test", "mailbox", None, None, None, False),
            ],
            mailboxes=[("a.test", "old", "a.test/old/", None, None, None, True)],
        )
    )
    domain_rows = [
        ("a.test", "mailbox", None, None, None, True),
        ("off.test", "mailbox", None, None, None, False),
    ]
    for n in range(6):
        local = f"user{n}"
        copy.apply_records(
            {
                f"mailboxes:{local}@a.test",
                "mailboxes:old@a.test",
                f"sender_grants:{local}@off.test",
            },
            SnapshotRows(
                domains=domain_rows,
                mailboxes=[("a.test", local, f"a.test/{local}/", None, None, None, True)],
                sender_grants=[("off.test", local, "someone")],  # a disabled domain's: off
            ),
        )
    assert sorted(copy.mailboxes) == [f"user{n}@a.test" for n in range(6)]
    assert copy.grants == {}
    assert "user0@a.test" in copy.index["a.test"]  # merged
    copy.replace(["a.test"], SnapshotRows(domains=domain_rows[:1]))
    assert copy.mailboxes == {}
    assert copy.added == {}
    assert copy.kind("a.test") == "mailbox"
