"""Rate limiting for messages a client can trigger at will: :class:`RateLimitedLogger`.

Bounded per-key windows with a summary line of what was suppressed, so a misbehaving client
cannot flood the log; the only logging code with a lock and a background trio task.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, TypeAlias

import trio

_ExcInfo: TypeAlias = (
    bool
    | BaseException
    | tuple[type[BaseException], BaseException, TracebackType | None]
    | tuple[None, None, None]
    | None
)


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
