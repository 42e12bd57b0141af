"""The three one-line output formats (text, logfmt, json) and :func:`fields`, their input.

Escaping of control characters lives here with the formatters, so that whatever a client puts
in a key, one record stays one line in every format.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Final

from .redaction import _format_exception, redact


def fields(**kv: object) -> dict[str, dict[str, object]]:
    """The ``extra`` argument that attaches structured fields to one log record.

    ``log.info("lookup", extra=fields(map="virtual", key=key))``.
    """
    return {"fields": kv}


# --- escaping ----------------------------------------------------------------------------------

_SIMPLE_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\", '"': '\\"'}


def _escape_char(ch: str, quoting: bool) -> str:
    if ch in _SIMPLE_ESCAPES and (quoting or ch not in '\\"'):
        return _SIMPLE_ESCAPES[ch]
    if ch.isprintable():
        return ch
    code = ord(ch)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _escape(text: str, *, quoting: bool) -> str:
    """Non-printable characters as escapes; with ``quoting`` also backslash and quote."""
    if text.isprintable() and not (quoting and ('"' in text or "\\" in text)):
        return text
    return "".join(_escape_char(ch, quoting) for ch in text)


def _logfmt_value(value: object) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int | float) and not isinstance(value, bool):
        text = repr(value) if isinstance(value, float) else str(int(value))
    else:
        text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' ="\\'):
        return text
    return f'"{_escape(text, quoting=True)}"'


_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


def _logfmt_key(key: str) -> str:
    return _KEY_CHARS.sub("_", key) or "_"


# --- formatters --------------------------------------------------------------------------------

_RESERVED: Final = frozenset({"ts", "level", "logger", "msg", "exc", "stack"})


def _timestamp(record: logging.LogRecord) -> str:
    seconds = int(record.created)
    millis = min(int((record.created - seconds) * 1000), 999)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _record_fields(record: logging.LogRecord) -> list[tuple[str, object]]:
    extra = record.__dict__.get("fields")
    if not isinstance(extra, Mapping):
        return [] if extra is None else [("fields", extra)]
    return [(f"{k}_" if k in _RESERVED else str(k), v) for k, v in extra.items()]


def _exception_text(record: logging.LogRecord) -> str | None:
    if record.exc_info and not record.exc_text:
        # Only reached without the filter (it formats and redacts the traceback itself).
        record.exc_text = redact(_format_exception(record.exc_info))
    return record.exc_text or None


class _Formatter(logging.Formatter, ABC):
    """Shared parts; subclasses lay out ts, level, logger, message, fields and exception."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        record.message = message
        return self.render(
            record,
            message,
            _record_fields(record),
            _exception_text(record),
            record.stack_info or None,
        )

    @abstractmethod
    def render(
        self,
        record: logging.LogRecord,
        message: str,
        extra: list[tuple[str, object]],
        exc: str | None,
        stack: str | None,
    ) -> str:
        """The line for one record, in this formatter's format (each subclass has its own)."""
        ...


class TextFormatter(_Formatter):
    def render(
        self,
        record: logging.LogRecord,
        message: str,
        extra: list[tuple[str, object]],
        exc: str | None,
        stack: str | None,
    ) -> str:
        parts = [
            _timestamp(record),
            " ",
            record.levelname,
            " ",
            _escape(record.name, quoting=False),
            ": ",
            _escape(message, quoting=False),
        ]
        for key, value in extra:
            parts += (" ", _logfmt_key(key), "=", _logfmt_value(value))
        if exc:
            parts += ("\n", exc)
        if stack:
            parts += ("\n", stack)
        return "".join(parts)


class LogfmtFormatter(_Formatter):
    def render(
        self,
        record: logging.LogRecord,
        message: str,
        extra: list[tuple[str, object]],
        exc: str | None,
        stack: str | None,
    ) -> str:
        pairs: list[tuple[str, object]] = [
            ("ts", _timestamp(record)),
            ("level", record.levelname.lower()),
            ("logger", record.name),
            ("msg", message),
            *extra,
        ]
        if exc:
            pairs.append(("exc", exc))
        if stack:
            pairs.append(("stack", stack))
        return " ".join(f"{_logfmt_key(k)}={_logfmt_value(v)}" for k, v in pairs)


def _json_value(value: object) -> object:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    return str(value)


class JsonFormatter(_Formatter):
    def render(
        self,
        record: logging.LogRecord,
        message: str,
        extra: list[tuple[str, object]],
        exc: str | None,
        stack: str | None,
    ) -> str:
        obj: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message,
        }
        for key, value in extra:
            obj[key] = _json_value(value)
        if exc:
            obj["exc"] = exc
        if stack:
            obj["stack"] = stack
        # ensure_ascii: lone surrogates (undecodable client bytes) stay valid output.
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), default=str)


_FORMATTERS: Final[dict[str, Callable[[], _Formatter]]] = {
    "text": TextFormatter,
    "logfmt": LogfmtFormatter,
    "json": JsonFormatter,
}
