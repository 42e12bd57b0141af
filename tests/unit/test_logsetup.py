"""Logging: the three formats, fields, one-line exceptions, redaction, reconfiguration, sampling
and rate limiting, all written to a StringIO and parsed back."""

from __future__ import annotations

import io
import json
import logging
import random
import re
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from maplookup.logsetup import (
    QueryLog,
    RateLimitedLogger,
    RedactingFilter,
    configure_logging,
    fields,
    redact,
    set_level,
)

LOGGER = "maplookup.test"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Leave the root logger (handlers, level) and our test loggers as we found them."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    level = root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    for name in (LOGGER, "maplookup.query", "maplookup.ratelimit"):
        logging.getLogger(name).setLevel(logging.NOTSET)


def _configure(fmt: str, level: str = "debug") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level, fmt, stream=stream)
    return stream


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


_LOGFMT_PAIR = re.compile(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?:\s|$)')


def _parse_logfmt(line: str) -> dict[str, str]:
    """A strict logfmt reader: the whole line must be key=value pairs."""
    pairs: dict[str, str] = {}
    pos = 0
    while pos < len(line):
        match = _LOGFMT_PAIR.match(line, pos)
        assert match is not None, f"not logfmt at {pos}: {line[pos:]!r}"
        key, raw = match.groups()
        pairs[key] = json.loads(raw) if raw.startswith('"') else raw
        pos = match.end()
    return pairs


# --- formats -------------------------------------------------------------------------------------

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def test_text_format_shape() -> None:
    stream = _configure("text")
    logging.getLogger(LOGGER).info(
        "closing connection from %s", "peer", extra=fields(peer="127.0.0.1:5000", n=3)
    )
    [line] = _lines(stream)
    assert re.fullmatch(
        TS + r" INFO maplookup\.test: closing connection from peer peer=127\.0\.0\.1:5000 n=3",
        line,
    )


def test_text_format_escapes_line_breaks_in_messages() -> None:
    stream = _configure("text")
    logging.getLogger(LOGGER).warning("key %s", "a\nFAKE ERROR line\r\x1b[31m")
    [line] = _lines(stream)
    assert line.endswith(r"key a\nFAKE ERROR line\r\u001b[31m")


def test_logfmt_format_shape_and_quoting() -> None:
    stream = _configure("logfmt")
    tricky = 'has space, "quotes", back\\slash,\nnew line\tand tab'
    logging.getLogger(LOGGER).warning(
        "hello world",
        extra=fields(reason=tricky, plain="abc", empty="", eq="a=b", num=1.5, flag=True, none=None),
    )
    [line] = _lines(stream)
    assert re.match(r"ts=" + TS + " level=warning logger=maplookup.test ", line)
    assert ' msg="hello world" ' in line
    assert " plain=abc " in line
    pairs = _parse_logfmt(line)
    assert pairs["msg"] == "hello world"
    assert pairs["reason"] == tricky
    assert pairs["empty"] == ""
    assert pairs["eq"] == "a=b"
    assert pairs["num"] == "1.5"
    assert pairs["flag"] == "true"
    assert pairs["none"] == "null"
    assert list(pairs)[:4] == ["ts", "level", "logger", "msg"]


def test_json_format_shape() -> None:
    stream = _configure("json")
    log = logging.getLogger(LOGGER)
    log.info("first %s", "message", extra=fields(peer="127.0.0.1:5000", count=2, ok=False))
    log.error("second\nline", extra=fields(key="caf\u00e9\udcff@example.org", ms=0.25))
    first, second = (json.loads(line) for line in _lines(stream))
    assert list(first) == ["ts", "level", "logger", "msg", "peer", "count", "ok"]
    assert re.fullmatch(TS, first["ts"])
    assert first["level"] == "info"
    assert first["logger"] == LOGGER
    assert first["msg"] == "first message"
    assert first["peer"] == "127.0.0.1:5000"
    assert first["count"] == 2
    assert first["ok"] is False
    assert second["level"] == "error"
    assert second["msg"] == "second\nline"
    assert second["key"] == "caf\u00e9\udcff@example.org"
    assert second["ms"] == 0.25


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_reserved_field_names_do_not_clobber_the_message(fmt: str) -> None:
    stream = _configure(fmt)
    logging.getLogger(LOGGER).info("real", extra=fields(msg="fake", level="fake"))
    [line] = _lines(stream)
    parsed = json.loads(line) if fmt == "json" else _parse_logfmt(line)
    assert parsed["msg"] == "real"
    assert parsed["level"] == "info"
    assert parsed["msg_"] == "fake"
    assert parsed["level_"] == "fake"


def _raise_and_log(log: logging.Logger) -> None:
    try:
        raise ValueError("bad value\nsecond line")
    except ValueError:
        log.exception("it failed", extra=fields(peer="x"))


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_exception_is_one_escaped_field(fmt: str) -> None:
    stream = _configure(fmt)
    _raise_and_log(logging.getLogger(LOGGER))
    [line] = _lines(stream)
    parsed = json.loads(line) if fmt == "json" else _parse_logfmt(line)
    assert parsed["msg"] == "it failed"
    assert parsed["peer"] == "x"
    assert parsed["exc"].startswith("Traceback (most recent call last):\n")
    assert parsed["exc"].endswith("ValueError: bad value\nsecond line")


def test_text_format_prints_the_traceback_after_the_line() -> None:
    stream = _configure("text")
    _raise_and_log(logging.getLogger(LOGGER))
    lines = _lines(stream)
    assert lines[0].endswith("ERROR maplookup.test: it failed peer=x")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-2:] == ["ValueError: bad value", "second line"]


# --- configuration -------------------------------------------------------------------------------


def _ours(root: logging.Logger) -> list[logging.Handler]:
    return [h for h in root.handlers if type(h).__name__ == "_MaplookupHandler"]


def test_reconfiguring_replaces_the_handler() -> None:
    root = logging.getLogger()
    before = len(root.handlers)
    first = _configure("text")
    second = _configure("json", level="info")
    assert len(_ours(root)) == 1
    assert len(root.handlers) == before + 1
    logging.getLogger(LOGGER).info("once")
    assert first.getvalue() == ""
    [line] = _lines(second)
    assert json.loads(line)["msg"] == "once"


def test_configure_leaves_foreign_handlers_alone() -> None:
    root = logging.getLogger()
    foreign = logging.StreamHandler(io.StringIO())
    root.addHandler(foreign)
    _configure("text")
    _configure("text")
    assert foreign in root.handlers


def test_set_level_changes_what_is_written() -> None:
    stream = _configure("logfmt", level="info")
    log = logging.getLogger(LOGGER)
    log.debug("hidden")
    set_level("DEBUG")
    log.debug("shown")
    set_level("warning")
    log.info("hidden too")
    log.warning("shown too")
    assert [_parse_logfmt(line)["msg"] for line in _lines(stream)] == ["shown", "shown too"]


def test_unknown_level_or_format_is_refused_without_changing_anything() -> None:
    stream = _configure("text", level="info")
    with pytest.raises(ValueError, match="log level"):
        configure_logging("verbose", "text")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")
    with pytest.raises(ValueError, match="log level"):
        set_level("loud")
    logging.getLogger(LOGGER).info("still here")
    assert "still here" in stream.getvalue()


# --- redaction -----------------------------------------------------------------------------------

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"postgresql://maplookup:{SECRET}@db.example.net:5432/mail?sslmode=require",
            "postgresql://maplookup:***@db.example.net:5432/mail?sslmode=require",
        ),
        (f"postgres://u:{SECRET}@localhost/mail", "postgres://u:***@localhost/mail"),
        (f"postgres://:{SECRET}@localhost/mail", "postgres://:***@localhost/mail"),
        (f"postgresql://u:{SECRET}@x@h/db", "postgresql://u:***@h/db"),
        (
            f"MAPLOOKUP_DSN=postgresql+asyncpg://u:{SECRET}@h/db failed",
            "MAPLOOKUP_DSN=postgresql+asyncpg://u:***@h/db failed",
        ),
        (
            f"host=db user=maplookup password={SECRET} dbname=mail",
            "host=db user=maplookup password=*** dbname=mail",
        ),
        (f"password = '{SECRET} with\\' space' port=5432", "password = *** port=5432"),
        (
            f"postgresql://u@h/db?password={SECRET}&sslmode=require",
            "postgresql://u@h/db?password=***&sslmode=require",
        ),
        (f"PGPASSWORD={SECRET} psql", "PGPASSWORD=*** psql"),
        (f"env PGPASSWORD='{SECRET}'", "env PGPASSWORD=***"),
        (f"{{'password': '{SECRET}', 'user': 'x'}}", "{'password': '***', 'user': 'x'}"),
        (f'{{"password": "{SECRET}"}}', '{"password": "***"}'),
    ],
)
def test_redact_dsn_forms(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert SECRET not in redact(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello world",
        "user@example.org:587 said 250 ok",
        'password authentication failed for user "maplookup"',
        "postgresql://db.example.net:5432/mail",
        "postgresql://maplookup@db.example.net/mail",
        "https://example.org/a:b@c",
        "password=",
        "closing connection from 127.0.0.1:5000: bad netstring",
    ],
)
def test_redact_leaves_ordinary_text_alone(text: str) -> None:
    assert redact(text) == text


def test_redact_never_raises_and_is_idempotent() -> None:
    assert redact("password=***") == "password=***"
    assert redact(redact(f"postgres://u:{SECRET}@h")) == "postgres://u:***@h"
    assert redact(12345) == "12345"  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["text", "logfmt", "json"])
def test_secrets_are_redacted_in_message_args_fields_and_traceback(fmt: str) -> None:
    stream = _configure(fmt)
    log = logging.getLogger(LOGGER)
    log.info(f"connecting to postgresql://u:{SECRET}@h/db")
    log.info("connecting to %s", f"host=h password={SECRET}")
    log.info("connecting to postgresql://u:%s@h/db", SECRET)  # assembled from format and arg
    log.info("env %(env)s", {"env": f"PGPASSWORD={SECRET}"})
    log.info(
        "fields",
        extra=fields(dsn=f"postgres://u:{SECRET}@h/db", db_password=SECRET, n=5),
    )
    try:
        raise ValueError(f"invalid dsn postgresql://u:{SECRET}@h/db")
    except ValueError:
        log.exception("start-up failed")
    output = stream.getvalue()
    assert SECRET not in output
    assert output.count("***") >= 7
    assert "connecting to postgresql://u:***@h/db" in output
    assert "password=***" in output
    assert "n=5" in output or '"n":5' in output


def test_filter_redacts_args_even_when_they_do_not_fit_the_format() -> None:
    record = logging.LogRecord(
        LOGGER, logging.INFO, __file__, 1, "%d and %s", (f"password={SECRET}", 1), None
    )
    assert RedactingFilter().filter(record)
    assert record.args == ("password=***", 1)


def test_filter_never_raises() -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    record = logging.LogRecord(LOGGER, logging.INFO, __file__, 1, "%s", (Unprintable(),), None)
    record.fields = {"x": Unprintable()}
    assert RedactingFilter().filter(record)
    assert record.__dict__["fields"] == {"x": "<unprintable Unprintable>"}


def test_ordinary_messages_pass_unchanged() -> None:
    stream = _configure("text")
    logging.getLogger(LOGGER).info(
        "lookup of %s in %s", "user@example.org", "virtual", extra=fields(result="OK")
    )
    assert (
        stream.getvalue()
        .rstrip("\n")
        .endswith("maplookup.test: lookup of user@example.org in virtual result=OK")
    )


# --- query log -----------------------------------------------------------------------------------


class NoRandom(random.Random):
    def random(self) -> float:
        raise AssertionError("the rng must not be consulted")


def test_query_log_rate_zero_logs_nothing_and_rolls_no_dice() -> None:
    stream = _configure("json")
    query_log = QueryLog(0.0, logging.getLogger("maplookup.query"), rng=NoRandom())
    for _ in range(100):
        query_log.maybe_log("virtual", "a@example.org", "OK", 0.001)
    assert stream.getvalue() == ""


def test_query_log_rate_one_logs_every_lookup_with_fields() -> None:
    stream = _configure("json")
    query_log = QueryLog(1.0, logging.getLogger("maplookup.query"), rng=NoRandom())
    for i in range(20):
        query_log.maybe_log("virtual", f"u{i}@example.org", "NOTFOUND", 0.0012345)
    records = [json.loads(line) for line in _lines(stream)]
    assert len(records) == 20
    assert records[3]["level"] == "info"
    assert records[3]["logger"] == "maplookup.query"
    assert records[3]["map"] == "virtual"
    assert records[3]["key"] == "u3@example.org"
    assert records[3]["result"] == "NOTFOUND"
    assert records[3]["duration_ms"] == pytest.approx(1.2345, abs=0.001)


def test_query_log_samples_with_a_seeded_rng() -> None:
    stream = _configure("json")
    query_log = QueryLog(0.25, logging.getLogger("maplookup.query"), rng=random.Random(42))
    for i in range(2000):
        query_log.maybe_log("mailbox", f"u{i}@example.org", "OK", 0.0)
    logged = [json.loads(line)["key"] for line in _lines(stream)]
    replay = random.Random(42)
    expected = [f"u{i}@example.org" for i in range(2000) if replay.random() < 0.25]
    assert logged == expected
    assert 400 < len(logged) < 600


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
def test_query_log_refuses_rates_outside_zero_to_one(rate: float) -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        QueryLog(rate, logging.getLogger("maplookup.query"))


# --- rate limiting -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_writes_a_burst_then_a_summary() -> None:
    stream = _configure("logfmt")
    clock = FakeClock()
    limited = RateLimitedLogger(
        logging.getLogger("maplookup.ratelimit"), burst=3, interval_s=10.0, clock=clock
    )
    written = [
        limited.warning(
            "closing connection from %s: %s",
            f"10.0.0.{i}:4000",
            "bad netstring",
            extra=fields(peer=f"10.0.0.{i}"),
        )
        for i in range(10)
    ]
    assert written == [True] * 3 + [False] * 7
    assert len(_lines(stream)) == 3
    clock.now += 9.9
    assert not limited.warning("closing connection from %s: %s", "10.0.0.99:4000", "x")
    assert len(_lines(stream)) == 3
    clock.now += 0.2
    assert limited.warning("closing connection from %s: %s", "10.0.0.100:4000", "y")
    lines = [_parse_logfmt(line) for line in _lines(stream)]
    assert len(lines) == 5
    summary, fresh = lines[3], lines[4]
    assert summary["level"] == "warning"
    assert summary["msg"] == (
        "closing connection from 10.0.0.99:4000: x ... 8 more suppressed within 10 s"
    )
    assert summary["suppressed"] == "8"
    assert fresh["msg"] == "closing connection from 10.0.0.100:4000: y"


def test_rate_limit_keys_are_independent_and_flush_writes_pending_summaries() -> None:
    stream = _configure("json")
    clock = FakeClock()
    limited = RateLimitedLogger(
        logging.getLogger("maplookup.ratelimit"), burst=1, interval_s=60.0, clock=clock
    )
    for _ in range(4):
        limited.warning("read timeout from %s", "peer", key="timeout")
        limited.error("protocol error: %s", "bad", key="protocol")
    assert [json.loads(line)["msg"] for line in _lines(stream)] == [
        "read timeout from peer",
        "protocol error: bad",
    ]
    assert limited.flush() == 0  # windows still open
    clock.now += 60
    assert limited.flush() == 2
    summaries = [json.loads(line) for line in _lines(stream)[2:]]
    assert [(s["level"], s["suppressed"]) for s in summaries] == [("warning", 3), ("error", 3)]
    assert all(s["msg"].endswith("3 more suppressed within 60 s") for s in summaries)
    assert limited.flush(force=True) == 0


def test_rate_limit_ignores_records_below_the_level() -> None:
    stream = _configure("text", level="warning")
    limited = RateLimitedLogger(logging.getLogger("maplookup.ratelimit"), burst=1)
    for _ in range(5):
        assert not limited.info("chatty")
    assert limited.flush(force=True) == 0
    assert stream.getvalue() == ""


def test_rate_limit_bounds_the_number_of_keys() -> None:
    stream = _configure("text")
    clock = FakeClock()
    limited = RateLimitedLogger(
        logging.getLogger("maplookup.ratelimit"),
        burst=2,
        interval_s=10.0,
        max_keys=3,
        clock=clock,
    )
    results = [limited.warning("error %d", i, key=f"k{i}") for i in range(10)]
    # three keys get their own window; the rest share one overflow window of burst 2
    assert results == [True] * 5 + [False] * 5
    assert len(_lines(stream)) == 5


async def test_rate_limit_flusher_task(autojump_clock: trio.testing.MockClock) -> None:
    stream = _configure("text")
    limited = RateLimitedLogger(
        logging.getLogger("maplookup.ratelimit"), burst=1, interval_s=30.0, clock=trio.current_time
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(limited.run_flusher)
        for _ in range(5):
            limited.warning("flood")
        await trio.sleep(29)
        assert len(_lines(stream)) == 1
        await trio.sleep(2)
        lines = _lines(stream)
        assert len(lines) == 2
        assert lines[1].endswith("flood ... 4 more suppressed within 30 s suppressed=4")
        limited.warning("again")
        limited.warning("again")
        nursery.cancel_scope.cancel()
    # cancellation writes what is pending
    assert _lines(stream)[-1].endswith("again ... 1 more suppressed within 30 s suppressed=1")
