"""postmap(1) source format: logical lines, continuations, comments, key and value.

Source format, as ``readlline()`` (src/util/readlline.c) and ``postmap`` (src/postmap/postmap.c)
read it: a logical line starts with non-white-space text; a line starting with white space
continues it; empty, white-space-only and comment lines (first non-white-space character ``#``)
are skipped, even between a line and its continuation, and do not end a logical line.  The key
ends at the first white space; the value is the rest, trimmed.  Keys are case-folded.

This module knows the file format only (plus the ``# disabled:`` marker, which is a comment to
Postfix): what a key or value must look like in a given map is records.py's business.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .problems import _SILENT, PROGRESS_MIN_LINES, PROGRESS_STEP_LINES, Origin, Problem, Progress

# C isspace(): what readlline() and postmap treat as white space.
_SPACE = " \t\n\r\v\f"
_SPACE_RE = re.compile(r"[ \t\n\r\v\f]")

DISABLED_MARKER = "# disabled: "
# Comments export writes for import only (Postfix ignores comments): see records.py.
NOTE_MARKER = "# maplookup-note: "


# -- reading source files ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One logical line: ``key value``, key not yet folded."""

    origin: Origin
    key: str
    value: str
    enabled: bool = True


def parse_source(
    data: bytes,
    source: str,
    category: str,
    problems: list[Problem],
    *,
    rank: int = 0,
    value_required: bool = True,
    markers: bool = True,
    progress: Progress = _SILENT,
    notes: list[tuple[Origin, str]] | None = None,
) -> list[Entry]:
    """Split a source file into entries the way postmap does; bad lines go to ``problems``.

    ``notes`` collects the text of ``# maplookup-note: `` comments, which export writes for import
    (a comment to Postfix).
    """
    entries: list[Entry] = []
    lines = data.split(b"\n")
    show_progress = len(lines) > PROGRESS_MIN_LINES
    start = 0
    parts: list[str] = []

    def finish(text: str, line: int, enabled: bool) -> None:
        origin = Origin(source, line, rank)
        # postmap: the key ends at the first white space, the value is the rest, trimmed.
        space = _SPACE_RE.search(text)
        key = text if space is None else text[: space.start()]
        value = "" if space is None else text[space.start() :].strip(_SPACE)
        message = _check_entry(key, value, value_required)
        if message is not None:
            problems.append(Problem(origin, message, category))
        else:
            entries.append(Entry(origin, key, value, enabled))

    for number, raw_bytes in enumerate(lines, 1):
        if show_progress and number % PROGRESS_STEP_LINES == 0:
            progress.show(f"reading {source}: {number:,}/{len(lines):,} lines")
        raw = raw_bytes.decode("utf-8", "surrogateescape")
        stripped = raw.lstrip(_SPACE)
        if not stripped or stripped[0] == "#":
            # A comment neither starts nor ends a logical line (readlline.c).
            if notes is not None and raw.startswith(NOTE_MARKER):
                notes.append((Origin(source, number, rank), raw[len(NOTE_MARKER) :].strip(_SPACE)))
            if markers and raw.startswith(DISABLED_MARKER):
                body = raw[len(DISABLED_MARKER) :].strip(_SPACE)
                if body:
                    finish(body, number, enabled=False)
            continue
        if raw[0] in _SPACE:
            if parts:
                parts.append(raw)
            else:
                problems.append(
                    Problem(
                        Origin(source, number, rank),
                        "continuation line (starts with white space) without an entry before "
                        "it; Postfix ignores it",
                        category,
                    )
                )
            continue
        if parts:
            finish("".join(parts), start, enabled=True)
        start, parts = number, [raw]
    if parts:
        finish("".join(parts), start, enabled=True)
    progress.clear()
    return entries


def _check_entry(key: str, value: str, value_required: bool) -> str | None:
    if _has_surrogates(key + value):
        return "not valid UTF-8"
    if value_required and not value:
        return "expected format: key whitespace value"
    if key.endswith(":"):
        return f"key {key!r} ends with ':'; is this an aliases(5) file? virtual(5) has no colon"
    if '"' in key or "\\" in key:
        return f"key {key!r}: quoted or escaped keys are not supported"
    return None


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
