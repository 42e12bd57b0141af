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
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, TextIO, TypeAlias

import trio

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

FORMATS: Final = ("text", "logfmt", "json")
LEVELS: Final = ("debug", "info", "warning", "error", "critical")

REDACTED: Final = "***"

_ExcInfo: TypeAlias = (
    bool
    | BaseException
    | tuple[type[BaseException], BaseException, TracebackType | None]
    | tuple[None, None, None]
    | None
)


def fields(**kv: object) -> dict[str, dict[str, object]]:
    """The ``extra`` argument that attaches structured fields to one log record.

    ``log.info("lookup", extra=fields(map="virtual", key=key))``.
    """
    return {"fields": kv}


# --- redaction ---------------------------------------------------------------------------------

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


class _Formatter(logging.Formatter):
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

    def render(
        self,
        record: logging.LogRecord,
        message: str,
        extra: list[tuple[str, object]],
        exc: str | None,
        stack: str | None,
    ) -> str:
        raise NotImplementedError


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


# --- configuration -----------------------------------------------------------------------------


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


# --- query log ---------------------------------------------------------------------------------


class QueryLog:
    """Logs a sample of lookups at INFO: fields ``map``, ``key``, ``result``, ``duration_ms``.

    ``sample_rate`` is the fraction of lookups logged: 0.0 never (the cost is then one float
    comparison per lookup), 1.0 every one.

    Privacy: the keys are mail addresses.  Enabling the query log writes the addresses of
    senders and recipients to the log, which may then fall under data-protection rules
    (retention, access); keep the rate at 0 unless debugging.
    """

    __slots__ = ("_logger", "_random", "sample_rate")

    def __init__(
        self, sample_rate: float, logger: logging.Logger, rng: random.Random | None = None
    ) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be between 0 and 1, got {sample_rate!r}")
        self.sample_rate = float(sample_rate)
        self._logger = logger
        # Sampling, not security: a seedable PRNG is what is wanted.
        self._random = (random.Random() if rng is None else rng).random  # noqa: S311 - sampling, not secrets  # noqa: S311

    def maybe_log(self, map_name: str, key: str, status: str, seconds: float) -> None:
        rate = self.sample_rate
        if rate <= 0.0:
            return
        if rate < 1.0 and self._random() >= rate:
            return
        self._logger.info(
            "lookup",
            extra=fields(
                map=str(map_name),
                key=key,
                result=str(status),
                duration_ms=round(seconds * 1000.0, 3),
            ),
        )


# --- rate limiting -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Window:
    start: float
    level: int
    emitted: int = 0
    suppressed: int = 0
    last_msg: str = ""
    last_args: tuple[object, ...] = ()
    last_fields: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Summary:
    level: int
    example: str
    suppressed: int
    fields: dict[str, object]


_OVERFLOW_KEY: Final = "\0overflow"


class RateLimitedLogger:
    """At most ``burst`` records per ``key`` in any ``interval_s`` window, then a summary.

    For messages a client can cause once per connection (protocol errors, timeouts)::

        errors = RateLimitedLogger(log, burst=10, interval_s=60)
        errors.warning("closing connection from %s: %s", peer, reason, key="protocol-error")

    ``key`` names the kind of message (default: the format string).  Do not put the peer in
    it: every key keeps a little state until its window ends.  Once a window with suppressed
    records ends, one summary line at the same level says so::

        closing connection from 10.0.0.7:41000: bad netstring ... 312 more suppressed within 60 s

    with the last suppressed record's fields plus ``suppressed=312``.  Summaries are written
    when the next record with that key arrives, by :meth:`flush`, or by :meth:`run_flusher`
    (a trio task that flushes every ``interval_s`` and once more when cancelled).
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 10,
        interval_s: float = 60.0,
        max_keys: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1:
            raise ValueError("burst must be at least 1")
        if not interval_s > 0:
            raise ValueError("interval_s must be positive")
        self.logger = logger
        self.burst = burst
        self.interval_s = interval_s
        self.max_keys = max(1, max_keys)
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def log(
        self,
        level: int,
        msg: str,
        *args: object,
        key: str | None = None,
        extra: Mapping[str, object] | None = None,
        exc_info: _ExcInfo = None,
        stacklevel: int = 1,
    ) -> bool:
        """Log unless this key is over its budget; True when the record was written."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        summaries: list[_Summary] = []
        with self._lock:
            name = msg if key is None else key
            window = self._windows.get(name)
            if window is None:
                if len(self._windows) >= self.max_keys:
                    summaries += self._expire(now, force=False)
                    if len(self._windows) >= self.max_keys:
                        name = _OVERFLOW_KEY
                        window = self._windows.get(name)
                if window is None:
                    window = self._windows[name] = _Window(start=now, level=level)
            elif now - window.start >= self.interval_s:
                summary = self._summary(window)
                if summary is not None:
                    summaries.append(summary)
                window.start, window.emitted, window.suppressed = now, 0, 0
            if window.emitted < self.burst:
                window.emitted += 1
                allowed = True
            else:
                window.suppressed += 1
                window.level = max(window.level, level)
                window.last_msg, window.last_args = msg, args
                extra_fields = extra.get("fields") if extra is not None else None
                window.last_fields = dict(extra_fields) if isinstance(extra_fields, Mapping) else {}
                allowed = False
        self._emit(summaries)
        if allowed:
            self.logger.log(
                level, msg, *args, extra=extra, exc_info=exc_info, stacklevel=stacklevel + 1
            )
        return allowed

    def debug(
        self,
        msg: str,
        *args: object,
        key: str | None = None,
        extra: Mapping[str, object] | None = None,
        exc_info: _ExcInfo = None,
    ) -> bool:
        return self.log(
            logging.DEBUG, msg, *args, key=key, extra=extra, exc_info=exc_info, stacklevel=2
        )

    def info(
        self,
        msg: str,
        *args: object,
        key: str | None = None,
        extra: Mapping[str, object] | None = None,
        exc_info: _ExcInfo = None,
    ) -> bool:
        return self.log(
            logging.INFO, msg, *args, key=key, extra=extra, exc_info=exc_info, stacklevel=2
        )

    def warning(
        self,
        msg: str,
        *args: object,
        key: str | None = None,
        extra: Mapping[str, object] | None = None,
        exc_info: _ExcInfo = None,
    ) -> bool:
        return self.log(
            logging.WARNING, msg, *args, key=key, extra=extra, exc_info=exc_info, stacklevel=2
        )

    def error(
        self,
        msg: str,
        *args: object,
        key: str | None = None,
        extra: Mapping[str, object] | None = None,
        exc_info: _ExcInfo = None,
    ) -> bool:
        return self.log(
            logging.ERROR, msg, *args, key=key, extra=extra, exc_info=exc_info, stacklevel=2
        )

    def flush(self, *, force: bool = False) -> int:
        """Write the summaries of windows that have ended (all windows if ``force``).

        Forgets those windows; returns the number of summary lines written.
        """
        with self._lock:
            summaries = self._expire(self._clock(), force=force)
        self._emit(summaries)
        return len(summaries)

    async def run_flusher(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Flush every ``interval_s`` until cancelled, then write what is still pending."""
        task_status.started()
        try:
            while True:
                await trio.sleep(self.interval_s)
                self.flush()
        finally:
            self.flush(force=True)

    def _expire(self, now: float, *, force: bool) -> list[_Summary]:
        summaries: list[_Summary] = []
        for name, window in list(self._windows.items()):
            if force or now - window.start >= self.interval_s:
                summary = self._summary(window)
                if summary is not None:
                    summaries.append(summary)
                del self._windows[name]
        return summaries

    def _summary(self, window: _Window) -> _Summary | None:
        if window.suppressed == 0:
            return None
        try:
            example = window.last_msg % window.last_args if window.last_args else window.last_msg
        except Exception:
            example = window.last_msg
        return _Summary(
            window.level,
            str(example),
            window.suppressed,
            {**window.last_fields, "suppressed": window.suppressed},
        )

    def _emit(self, summaries: list[_Summary]) -> None:
        for summary in summaries:
            self.logger.log(
                summary.level,
                "%s ... %d more suppressed within %g s",
                summary.example,
                summary.suppressed,
                self.interval_s,
                extra={"fields": summary.fields},
            )
