"""The checks every reader shares: entries into records, repeated keys, derived blocks.

Each reader (reading.py for the delivery maps, reading_routing.py for the others) turns a
file's entries into typed records with :func:`convert`, keeps one record per key as Postfix
would use it with :func:`dedupe`, and leaves out the lines export derived from other records
with :func:`without_derived`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from maplookup.db.admin_input import AdminError

from .problems import Origin, Problem
from .records import DERIVED_BEGIN, DERIVED_END
from .source import Entry


class _Located(Protocol):
    origin: Origin
    enabled: bool


_Record = TypeVar("_Record", bound=_Located)


def convert(
    entries: Iterable[Entry],
    category: str,
    problems: list[Problem],
    make: Callable[[Entry], _Record],
) -> list[_Record]:
    records: list[_Record] = []
    for entry in entries:
        try:
            records.append(make(entry))
        except AdminError as exc:
            problems.append(Problem(entry.origin, str(exc), category))
    return records


def dedupe(
    records: Iterable[_Record],
    category: str,
    problems: list[Problem],
    key: Callable[[_Record], object],
    value: Callable[[_Record], object],
    show: Callable[[_Record], str],
) -> dict[Any, _Record]:
    """First record per key.  A repeat with the same value is harmless; with another value it is
    an error (postmap only warns, and which one wins depends on the table type).  An active line
    beats a ``# disabled:`` one for the same key: that is what Postfix would use."""
    kept: dict[Any, _Record] = {}
    for record in records:
        k = key(record)
        first = kept.get(k)
        if first is None:
            kept[k] = record
            continue
        if first.enabled != record.enabled:
            if record.enabled:
                kept[k] = record
            continue
        if value(first) != value(record):
            problems.append(
                Problem(
                    record.origin,
                    f"duplicate key {show(record)} with a different value (first at "
                    f"{first.origin})",
                    category,
                )
            )
    return kept


def without_derived(entries: list[Entry], notes: list[tuple[Origin, str]]) -> list[Entry]:
    """The entries outside export's ``derived`` blocks (a hash: table's form of maplookup's
    mirror and catch-all rules, which the records imply)."""
    blocks: list[tuple[int, int]] = []
    start: int | None = None
    for origin, text in notes:
        if text.startswith(DERIVED_BEGIN):
            start = origin.line
        elif text.startswith(DERIVED_END) and start is not None:
            blocks.append((start, origin.line))
            start = None
    if not blocks:
        return entries
    return [e for e in entries if not any(a < e.origin.line < b for a, b in blocks)]
