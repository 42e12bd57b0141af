"""Secrets out of log records: :func:`redact` and :class:`RedactingFilter`.

Passwords in DSNs, ``password=`` pairs and quoted mapping keys become ``***`` in the message,
its arguments, the extra fields and the traceback, before any formatter sees the record.  Kept
on its own because it is security-relevant and applies whatever the output format.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Mapping
from typing import Final

REDACTED: Final = "***"


# postgresql://user:SECRET@host..., postgres://:SECRET@host, postgresql+asyncpg://...
# The password runs to the last '@' before white space or a quote: an unencoded '@' in a
# password then costs some of the host name, never part of the password.
_URL_PASSWORD = re.compile(
    r"""(?i)\b(postgres(?:ql)?(?:\+[a-z0-9_]+)?://[^:/?#@\s'"]*:)[^\s'"]*@"""
)
# password=SECRET, password = 'SE CRET', PGPASSWORD=SECRET, db_password=SECRET, passwd=...
_KV_PASSWORD = re.compile(
    r"""(?i)(?<![a-z0-9])((?:pg)?pass(?:word|wd)\s*=\s*)"""
    r"""('(?:[^'\\]|\\.)*'?|"(?:[^"\\]|\\.)*"?|[^\s'"&]+)"""
)
# {'password': 'SECRET'}, {"PGPASSWORD": "SECRET"}: reprs and JSON (the key must be quoted,
# so prose such as "password: authentication failed" is left alone).
_MAPPING_PASSWORD = re.compile(
    r"""(?i)((["'])[a-z0-9_]*pass(?:word|wd)\2\s*:\s*)"""
    r"""(?:'(?:[^'\\]|\\.)*'?|"(?:[^"\\]|\\.)*"?|[^\s,}\]]+)"""
)
_MAY_HOLD_SECRET = re.compile(r"(?i)pass|://")


def _mapping_replacement(match: re.Match[str]) -> str:
    quote = match.group(2)
    return f"{match.group(1)}{quote}{REDACTED}{quote}"


def redact(text: str) -> str:
    """``text`` with the passwords of DSN-like strings replaced by ``***``; never raises."""
    try:
        if not isinstance(text, str):
            text = str(text)
        if _MAY_HOLD_SECRET.search(text) is None:
            return text
        text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
        text = _KV_PASSWORD.sub(lambda m: f"{m.group(1)}{REDACTED}", text)
        return _MAPPING_PASSWORD.sub(_mapping_replacement, text)
    except Exception:
        return "<redaction failed: text withheld>"


def _redact_value(name: str, value: object) -> object:
    if "password" in name.lower() and value is not None:
        return REDACTED
    if value is None or isinstance(value, bool | int | float):
        return value
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"
    redacted = redact(text)
    if isinstance(value, str) or redacted != text:
        return redacted
    return value


def _redact_arg(value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    try:
        text = str(value)
    except Exception:
        return value
    redacted = redact(text)
    return value if redacted == text else redacted


class RedactingFilter(logging.Filter):
    """Replaces passwords with ``***`` in a record's message, arguments, fields and traceback.

    The message is formatted here (``msg % args``), redacted as a whole and stored back with
    empty ``args``, so a secret assembled from the format string and an argument is caught too.
    Never raises and never drops a record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._redact(record)
        except Exception:
            record.msg = "<log record withheld: redaction failed>"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            record.stack_info = None
            record.__dict__.pop("fields", None)
        return True

    @staticmethod
    def _redact(record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            # Bad format arguments: leave formatting (and its error report) to the handler,
            # but with every piece redacted.
            if isinstance(record.msg, str):
                record.msg = redact(record.msg)
            if isinstance(record.args, tuple):
                record.args = tuple(_redact_arg(a) for a in record.args)
            elif isinstance(record.args, Mapping):
                record.args = {k: _redact_arg(v) for k, v in record.args.items()}
        else:
            record.msg = redact(message)
            record.args = ()
        extra = record.__dict__.get("fields")
        if isinstance(extra, Mapping):
            record.fields = {str(k): _redact_value(str(k), v) for k, v in extra.items()}
        elif extra is not None:
            record.fields = {"fields": _redact_value("fields", extra)}
        if record.exc_info and not record.exc_text:
            record.exc_text = _format_exception(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)


def _format_exception(exc_info: object) -> str:
    if isinstance(exc_info, tuple) and len(exc_info) == 3:
        exc_type, exc, tb = exc_info
        if exc is None:
            return ""
        return "".join(traceback.format_exception(exc_type, exc, tb)).rstrip("\n")
    return ""
