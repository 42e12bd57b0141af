"""FeedCursor: what a batch of change-log rows asks of the cache (pure, no database)."""

from __future__ import annotations

import pytest

from maplookup.db.feed import EVERYTHING, Change, FeedCursor, FeedStep


def test_changes_name_their_domains_and_move_the_position() -> None:
    cursor = FeedCursor(10)
    step = cursor.advance([Change(11, ("a.example",)), Change(15, ("b.example", "a.example"))])
    assert step == FeedStep(15, False, frozenset({"a.example", "b.example"}), 2)
    assert cursor.position == 15


def test_an_empty_batch_changes_nothing() -> None:
    cursor = FeedCursor(7)
    assert cursor.advance([]) == FeedStep(7, False, frozenset(), 0)


def test_holes_in_positions_are_normal() -> None:
    # A rolled-back writer leaves a hole: positions increase, they need not be consecutive.
    cursor = FeedCursor(0)
    assert cursor.advance([Change(2, ("a",)), Change(9, ("b",))]).position == 9


def test_everything_flushes_and_names_no_domain() -> None:
    cursor = FeedCursor(3)
    step = cursor.advance(
        [Change(4, ("a.example",)), Change(5, (EVERYTHING,)), Change(6, ("b.example",))]
    )
    assert step == FeedStep(6, True, frozenset(), 3)


def test_a_pruned_log_reads_as_everything() -> None:
    # changes_after's first row when the log was pruned past the reader: (pruned_through, '*').
    cursor = FeedCursor(3)
    step = cursor.advance([Change(40, (EVERYTHING,)), Change(41, ("a.example",))])
    assert step.flush
    assert step.position == 41


def test_rows_at_or_before_the_position_are_never_applied_again() -> None:
    cursor = FeedCursor(5)
    step = cursor.advance([Change(4, ("old",)), Change(5, (EVERYTHING,)), Change(6, ("new",))])
    assert step == FeedStep(6, False, frozenset({"new"}), 1)
    assert cursor.advance([Change(6, ("new",))]) == FeedStep(6, False, frozenset(), 0)


def test_a_position_is_never_negative() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        FeedCursor(-1)
