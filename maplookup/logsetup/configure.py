"""Installing and re-installing maplookup's one root handler: :func:`configure_logging`.

Also :func:`set_level` and the accepted level and format names; both validate before changing
anything, so a bad reload leaves logging as it was.
"""

from __future__ import annotations

import logging
import sys
from typing import Final, TextIO

from .formatting import _FORMATTERS
from .redaction import RedactingFilter

FORMATS: Final = ("text", "logfmt", "json")
LEVELS: Final = ("debug", "info", "warning", "error", "critical")


class _MaplookupHandler(logging.StreamHandler[TextIO]):
    """Marks the one handler configure_logging owns, so a second call can replace it."""


def _level_number(level: str) -> int:
    name = str(level).strip().lower()
    if name not in LEVELS:
        raise ValueError(f"unknown log level {level!r}: expected one of {', '.join(LEVELS)}")
    return logging.getLevelNamesMapping()[name.upper()]


def configure_logging(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Log records of ``level`` and above to ``stream`` (standard error) in format ``fmt``.

    Installs one handler, with a :class:`RedactingFilter`, on the root logger; calling it
    again (on reload) replaces that handler.  Handlers installed by others are left alone.
    Raises ValueError for an unknown level or format, before changing anything.
    """
    number = _level_number(level)
    if fmt not in _FORMATTERS:
        raise ValueError(f"unknown log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    handler = _MaplookupHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(_FORMATTERS[fmt]())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _MaplookupHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(number)


def set_level(level: str) -> None:
    """Change the level of the root logger while running; ValueError for an unknown level."""
    logging.getLogger().setLevel(_level_number(level))
