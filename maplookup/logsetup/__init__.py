"""Logging for a server that runs for months under log collection.

One handler on the root logger, installed by :func:`configure_logging`, in one of three
formats, all one line per record unless noted:

``text``
    for people: ``2026-11-22T05:00:00.123Z INFO maplookup.server: message key=value ...``
    (a traceback follows on its own lines, as Python prints it);
``logfmt``
    ``ts=... level=info logger=maplookup.server msg="..." key=value ... exc="..."``;
``json``
    one object a line: ``ts``, ``level``, ``logger``, ``msg``, the extra fields, then ``exc``
    and ``stack`` when present.

Timestamps are UTC with milliseconds.  Control and other non-printable characters (for example a
newline in a client-supplied key) are escaped in every format, so one record is one line and a
client cannot forge log lines.

Extra fields
------------
Structured data goes in ``extra={"fields": {...}}``; :func:`fields` builds that dict::

    log.warning("closing connection: %s", reason, extra=fields(peer="127.0.0.1:5000"))

Values should be ``str``, ``int``, ``float``, ``bool`` or ``None``; anything else is written
with ``str()``.  A field named like a built-in key (``ts``, ``level``, ``logger``, ``msg``,
``exc``, ``stack``) is written with a trailing underscore (``msg_``).  Other attributes passed
in ``extra`` are not written.

Secrets
-------
The handler carries a :class:`RedactingFilter`: passwords in PostgreSQL URLs
(``postgresql://user:SECRET@host``), in ``password=SECRET`` key-value form (libpq conninfo, URL
query strings) and ``PGPASSWORD=SECRET`` become ``***`` in the message, its arguments, the
extra fields and the traceback text before anything is formatted.  Fields whose name contains
``password`` are replaced entirely.

The package:

- ``formatting``: :func:`fields`, the escaping rules and the three formatters;
- ``redaction``: :func:`redact` and :class:`RedactingFilter`;
- ``configure``: :func:`configure_logging`, :func:`set_level`, ``FORMATS``, ``LEVELS``;
- ``querylog``: :class:`QueryLog`, the sampled per-lookup log;
- ``ratelimit``: :class:`RateLimitedLogger`.

This module re-exports every public name, so ``from maplookup.logsetup import ...`` keeps working.

Layer: operations, beside ``metrics``: the base modules and below; never ``serve`` or
``cli`` (tests/unit/test_layers.py).
"""

from __future__ import annotations

from .configure import FORMATS, LEVELS, configure_logging, set_level

# The formatter classes and REDACTED (public names of the former single module, not in
# __all__) stay importable from here too.
from .formatting import JsonFormatter as JsonFormatter
from .formatting import LogfmtFormatter as LogfmtFormatter
from .formatting import TextFormatter as TextFormatter
from .formatting import fields
from .querylog import QueryLog
from .ratelimit import RateLimitedLogger
from .redaction import REDACTED as REDACTED
from .redaction import RedactingFilter, redact

__all__ = [
    "FORMATS",
    "LEVELS",
    "QueryLog",
    "RateLimitedLogger",
    "RedactingFilter",
    "configure_logging",
    "fields",
    "redact",
    "set_level",
]
