"""Problems and progress: how every stage of an import reports a line, and shows it is busy.

Reading, checking against the database and writing all append to one list of :class:`Problem`,
each tied to an :class:`Origin` (the file as named on the command line, and the line), so that
the messages come out in file order whatever stage found them, and an error is told from a
warning.  :class:`Progress` is the status line large imports show on a terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TextIO

PROGRESS_MIN_LINES = 5000  # below this a file reads in well under a second: no progress line
PROGRESS_STEP_LINES = 5000


# -- problems and progress ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a record came from: the file as named on the command line and the line number."""

    source: str
    line: int
    rank: int = 0  # position of the file on the command line, for sorting messages

    def __str__(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True, slots=True)
class Problem:
    """A line that is not imported (error) or that is imported with a caveat (warning)."""

    origin: Origin
    message: str
    category: str
    warning: bool = False

    def __str__(self) -> str:
        return f"{self.origin}: {'warning: ' if self.warning else ''}{self.message}"


class Progress:
    """A ``\\r``-updated status line on a terminal; silent otherwise."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream if stream is not None and stream.isatty() else None
        self._shown = False

    def show(self, text: str) -> None:
        if self._stream is not None:
            self._stream.write(f"\r\x1b[K{text}")
            self._stream.flush()
            self._shown = True

    def clear(self) -> None:
        if self._stream is not None and self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._shown = False


_SILENT = Progress(None)


def print_problems(problems: Iterable[Problem], stream: TextIO | None = None) -> None:
    for problem in problems:
        print(problem, file=stream or sys.stderr)
