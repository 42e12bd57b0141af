"""Table-driven tests for the tcp_table codec (tcp_table(5), dict_tcp.c, hex_quote.c).

Every decoder case is fed whole and in several chunk sizes; the expected
events and outcome must not depend on how the bytes were split.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from maplookup.protocol import (
    CLOSED,
    MAX_REPLY_LINE_BYTES,
    NEED_DATA,
    LocalProtocolError,
    RemoteProtocolError,
    Reply,
    Request,
    Status,
    TcpTableProtocol,
    hex_quote,
    hex_unquote,
    parse_reply_line,
)
from maplookup.protocol.tcptable import encode_reply, encode_request

CHUNK_SIZES = [None, 1, 2, 3, 7]  # None: the whole input in one receive_data()
MAP = b"virtual"


def chunked(data: bytes, size: int | None) -> Iterator[bytes]:
    if size is None:
        if data:  # receive_data(b"") would mean EOF
            yield data
        return
    for i in range(0, len(data), size):
        yield data[i : i + size]


def drive(
    proto: TcpTableProtocol, data: bytes, size: int | None
) -> tuple[list[Request], RemoteProtocolError | None]:
    """Feed ``data`` then EOF, draining events after every chunk.

    Returns the requests seen and the error raised, or None if the stream
    ended cleanly with CLOSED.
    """
    requests: list[Request] = []
    try:
        for chunk in chunked(data, size):
            proto.receive_data(chunk)
            while (event := proto.next_event()) is not NEED_DATA:
                assert isinstance(event, Request)
                requests.append(event)
        proto.receive_data(b"")
        while (event := proto.next_event()) is not CLOSED:
            assert isinstance(event, Request), f"unexpected {event!r} after EOF"
            requests.append(event)
    except RemoteProtocolError as exc:
        return requests, exc
    return requests, None


def req(key: bytes) -> Request:
    return Request(MAP, key)


BIG_KEY = bytes(range(256)) * 39 + b"k" * 16  # 10,000 bytes, every byte value

VALID = [
    pytest.param(b"get a@example.com\n", [req(b"a@example.com")], id="plain"),
    pytest.param(b"get \n", [req(b"")], id="empty-key"),
    pytest.param(b"get a%20b%20%20c\n", [req(b"a b  c")], id="key-with-spaces"),
    pytest.param(b"get foo\r\n", [req(b"foo")], id="crlf"),
    pytest.param(b"get %C3%A9t%C3%A9\n", [req("été".encode())], id="utf8-key"),
    pytest.param(b"get %c3%A9\n", [req("é".encode())], id="lower-and-mixed-case-hex"),
    pytest.param(b"get %25%00%0A\n", [req(b"%\x00\n")], id="escaped-specials"),
    pytest.param(b"get a:b,c\n", [req(b"a:b,c")], id="plain-punctuation"),
    pytest.param(b"get a b\xff\n", [req(b"a b\xff")], id="unquoted-bytes-pass-through"),
    pytest.param(b"get a\rb\n", [req(b"a\rb")], id="inner-cr-is-key"),
    pytest.param(encode_request(BIG_KEY), [req(BIG_KEY)], id="10000-byte-key"),
    pytest.param(
        b"get a\nget b%20c\r\nget \nget d\n",
        [req(b"a"), req(b"b c"), req(b""), req(b"d")],
        id="several-in-one-chunk",
    ),
    pytest.param(b"", [], id="empty-stream"),
]


@pytest.mark.parametrize("size", CHUNK_SIZES)
@pytest.mark.parametrize(("data", "expected"), VALID)
def test_valid_requests(data: bytes, expected: list[Request], size: int | None) -> None:
    requests, error = drive(TcpTableProtocol(MAP), data, size)
    assert error is None
    assert requests == expected


MALFORMED = [
    pytest.param(b"GET foo\n", [], "expected a 'get <key>'", id="uppercase-command"),
    pytest.param(b"put foo bar\n", [], "expected a 'get <key>'", id="put"),
    pytest.param(b"get\n", [], "expected a 'get <key>'", id="no-space"),
    pytest.param(b"get\r\n", [], "expected a 'get <key>'", id="no-space-crlf"),
    pytest.param(b"getfoo\n", [], "expected a 'get <key>'", id="no-separator"),
    pytest.param(b"\n", [], "expected a 'get <key>'", id="empty-line"),
    pytest.param(b" get a\n", [], "expected a 'get <key>'", id="leading-space"),
    pytest.param(b"get %4\n", [], "malformed %-escape", id="short-escape"),
    pytest.param(b"get abc%\n", [], "malformed %-escape", id="trailing-percent"),
    pytest.param(b"get %zz\n", [], "malformed %-escape", id="non-hex-escape"),
    pytest.param(b"get %G0\n", [], "malformed %-escape", id="non-hex-high"),
    pytest.param(b"get %+1\n", [], "malformed %-escape", id="sign-in-escape"),
    pytest.param(b"get % 1\n", [], "malformed %-escape", id="space-in-escape"),
    pytest.param(b"get %%\n", [], "malformed %-escape", id="double-percent"),
    pytest.param(b"get a\nxyz", [req(b"a")], "expected a 'get <key>'", id="garbage-after-valid"),
    pytest.param(b"get a", [], "truncated", id="eof-mid-line"),
    pytest.param(b"get a\r", [], "truncated", id="eof-after-cr"),
    pytest.param(b"ge", [], "truncated", id="eof-in-command"),
    pytest.param(b"get a\nget b", [req(b"a")], "truncated", id="eof-in-second"),
]


@pytest.mark.parametrize("size", CHUNK_SIZES)
@pytest.mark.parametrize(("data", "expected", "reason"), MALFORMED)
def test_malformed_requests(
    data: bytes, expected: list[Request], reason: str, size: int | None
) -> None:
    requests, error = drive(TcpTableProtocol(MAP), data, size)
    assert requests == expected
    assert error is not None
    assert reason in error.reason


# With max_request_bytes=10 the raw line may be 3 * 10 + 8 = 38 bytes, newline included.
LIMITS = [
    pytest.param(b"get " + b"%41" * 10 + b"\n", [req(b"A" * 10)], None, id="key-at-limit"),
    pytest.param(b"get " + b"a" * 11 + b"\n", [], "key longer than 10", id="key-over-limit"),
    pytest.param(
        b"get " + b"%41" * 11 + b"\n", [], "key longer than 10", id="escaped-key-over-limit"
    ),
    pytest.param(b"get " + b"%41" * 10 + b"\r\n", [req(b"A" * 10)], None, id="crlf-at-limit"),
    pytest.param(b"get " + b"a" * 33 + b"\n", [], "key longer than 10", id="line-at-limit"),
    pytest.param(b"get " + b"a" * 34 + b"\n", [], "line longer than 38", id="line-over-limit"),
    pytest.param(b"get " + b"a" * 34, [], "line longer than 38", id="no-newline-at-bound"),
]


@pytest.mark.parametrize("size", CHUNK_SIZES)
@pytest.mark.parametrize(("data", "expected", "reason"), LIMITS)
def test_limits(data: bytes, expected: list[Request], reason: str | None, size: int | None) -> None:
    requests, error = drive(TcpTableProtocol(MAP, max_request_bytes=10), data, size)
    assert requests == expected
    if reason is None:
        assert error is None
    else:
        assert error is not None
        assert reason in error.reason


def test_endless_line_rejected_before_newline() -> None:
    proto = TcpTableProtocol(MAP, max_request_bytes=10)
    proto.receive_data(b"get " + b"a" * 33)  # 37 bytes: a newline could still fit
    assert proto.next_event() is NEED_DATA
    proto.receive_data(b"a")  # 38 bytes and no newline: the line cannot fit any more
    with pytest.raises(RemoteProtocolError, match="line longer than 38"):
        proto.next_event()


def test_wrong_command_rejected_before_newline() -> None:
    proto = TcpTableProtocol(MAP)
    proto.receive_data(b"ge")
    assert proto.next_event() is NEED_DATA
    proto.receive_data(b"x")
    with pytest.raises(RemoteProtocolError, match="expected a 'get <key>'"):
        proto.next_event()


def test_map_name_is_the_configured_one() -> None:
    proto = TcpTableProtocol(b"transport")
    assert proto.map_name == b"transport"
    proto.receive_data(b"get example.com\n")
    assert proto.next_event() == Request(b"transport", b"example.com")


def test_negative_limit_rejected() -> None:
    with pytest.raises(ValueError, match="max_request_bytes"):
        TcpTableProtocol(MAP, max_request_bytes=-1)


# --- misuse of the API ----------------------------------------------------


def test_closed_is_repeatable() -> None:
    proto = TcpTableProtocol(MAP)
    proto.receive_data(b"")
    assert proto.next_event() is CLOSED
    assert proto.next_event() is CLOSED


def test_data_after_eof_is_local_error() -> None:
    proto = TcpTableProtocol(MAP)
    proto.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after end of stream"):
        proto.receive_data(b"get a\n")


def test_use_after_remote_error_is_local_error() -> None:
    proto = TcpTableProtocol(MAP)
    proto.receive_data(b"GET a\n")
    with pytest.raises(RemoteProtocolError):
        proto.next_event()
    with pytest.raises(LocalProtocolError):
        proto.next_event()
    with pytest.raises(LocalProtocolError):
        proto.receive_data(b"get a\n")
    with pytest.raises(LocalProtocolError):
        proto.send(Reply.ok("v"))


# --- replies ---------------------------------------------------------------

REPLIES = [
    pytest.param(Reply.ok("foo@example.com"), b"200 foo@example.com\n", id="ok"),
    pytest.param(Reply.ok("a b%c"), b"200 a%20b%25c\n", id="ok-quoted"),
    pytest.param(Reply.ok("é\n"), b"200 %C3%A9%0A\n", id="ok-utf8-newline"),
    pytest.param(Reply.ok("\udcff"), b"200 %FF\n", id="ok-surrogateescape"),
    pytest.param(Reply.notfound(), b"500 not%20found\n", id="notfound"),
    pytest.param(Reply.notfound("no such user"), b"500 no%20such%20user\n", id="notfound-reason"),
    pytest.param(Reply.temp("db down"), b"400 db%20down\n", id="temp"),
    pytest.param(Reply.temp(""), b"400 temporary%20failure\n", id="temp-empty"),
    pytest.param(Reply.timeout("slow"), b"400 slow\n", id="timeout"),
    pytest.param(Reply.timeout(""), b"400 timeout\n", id="timeout-empty"),
    pytest.param(Reply.perm("bad map"), b"400 bad%20map\n", id="perm-defers"),
    pytest.param(Reply.ok(""), b"400 lookup%20returned%20an%20empty%20value\n", id="ok-empty"),
    pytest.param(
        Reply.ok("\ud800"),
        b"400 reply%20value%20is%20not%20encodable%20as%20UTF-8\n",
        id="ok-unencodable",
    ),
]


@pytest.mark.parametrize(("reply", "wire"), REPLIES)
def test_encode_reply(reply: Reply, wire: bytes) -> None:
    assert encode_reply(reply) == wire
    assert TcpTableProtocol(MAP).send(reply) == wire


def test_reply_at_line_limit_is_sent() -> None:
    value = "x" * (MAX_REPLY_LINE_BYTES - 5)  # "200 " + value + "\n" == 4096 bytes
    wire = encode_reply(Reply.ok(value))
    assert wire == b"200 " + value.encode() + b"\n"
    assert parse_reply_line(wire) == Reply.ok(value)


@pytest.mark.parametrize(
    ("value", "line_size"),
    [("x" * (MAX_REPLY_LINE_BYTES - 4), 4097), ("é" * 682, 4097), (" " * 5000, 15005)],
)
def test_too_large_reply_becomes_400(value: str, line_size: int) -> None:
    wire = encode_reply(Reply.ok(value))
    reason = f"reply too large ({line_size} bytes > 4096)"
    assert wire == b"400 " + hex_quote(reason.encode()) + b"\n"


@pytest.mark.parametrize("status", [Status.NOTFOUND, Status.TEMP, Status.TIMEOUT, Status.PERM])
@pytest.mark.parametrize("reason", [" " * 5000, "x" * 5000, "é" * 2000])
def test_long_error_text_is_cut_at_escape_boundary(status: Status, reason: str) -> None:
    wire = encode_reply(Reply(status, reason))
    assert len(wire) <= MAX_REPLY_LINE_BYTES
    assert len(wire) >= MAX_REPLY_LINE_BYTES - 2
    reply = parse_reply_line(wire)  # raises on a split %XX escape
    expected_status = Status.NOTFOUND if status is Status.NOTFOUND else Status.TEMP
    assert reply.status is expected_status
    # The text may end inside a UTF-8 sequence (Postfix only logs it), never inside %XX.
    sent = reply.value.encode("utf-8", "surrogateescape")
    assert reason.encode().startswith(sent)
    assert len(hex_quote(sent)) >= MAX_REPLY_LINE_BYTES - 7


# --- client side -----------------------------------------------------------


def test_encode_request_is_postfix_format() -> None:
    assert encode_request(b"a b%c\xc3\xa9") == b"get a%20b%25c%C3%A9\n"
    assert encode_request(b"") == b"get \n"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"200 a%20b\n", Reply.ok("a b")),
        (b"200 a%20b", Reply.ok("a b")),
        (b"200 \n", Reply.ok("")),
        (b"200 %C3%A9\n", Reply.ok("é")),
        (b"250 x\n", Reply.ok("x")),  # dict_tcp.c looks at the first digit only
        (b"200\tx\n", Reply.ok("x")),  # any C isspace() after the code
        (b"500 not%20found\n", Reply.notfound("not found")),
        (b"500 not found\n", Reply.notfound("not found")),
        (b"400 db%20down\n", Reply.temp("db down")),
        (b"450 x\n", Reply.temp("x")),
    ],
)
def test_parse_reply_line(line: bytes, expected: Reply) -> None:
    assert parse_reply_line(line) == expected


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"300 x\n", "unexpected tcp_table reply code"),
        (b"100 x\n", "unexpected tcp_table reply code"),
        (b"20 x\n", "malformed"),
        (b"200x\n", "malformed"),
        (b"200\n", "malformed"),
        (b"2a0 x\n", "malformed"),
        (b"\n", "malformed"),
        (b"200 %zz\n", "malformed %-escape"),
        (b"200 " + b"x" * 4092 + b"\n", "longer than 4096"),
        (b"200 " + b"x" * 4092, "longer than 4096"),
    ],
)
def test_parse_reply_line_errors(line: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        parse_reply_line(line)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply.ok("a b%c é"), Reply.ok("a b%c é")),
        (Reply.notfound("gone"), Reply.notfound("gone")),
        (Reply.temp("t"), Reply.temp("t")),
        (Reply.timeout("t"), Reply.temp("t")),
        (Reply.perm("p"), Reply.temp("p")),
    ],
)
def test_reply_round_trip(reply: Reply, expected: Reply) -> None:
    assert parse_reply_line(encode_reply(reply)) == expected


# --- hex_quote / hex_unquote -------------------------------------------------


def test_hex_quote_example() -> None:
    assert hex_quote(b"a b%c\xc3\xa9") == b"a%20b%25c%C3%A9"
    assert hex_unquote(b"a%20b%25c%C3%A9") == b"a b%c\xc3\xa9"


@pytest.mark.parametrize("byte", range(256))
def test_hex_quote_every_byte(byte: int) -> None:
    # hex_quote.c: '%', white space, non-printable and non-ASCII bytes are %XX.
    char = bytes([byte])
    printable_non_space = 0x21 <= byte <= 0x7E
    expected = char if printable_non_space and char != b"%" else f"%{byte:02X}".encode()
    assert hex_quote(char) == expected
    assert hex_unquote(expected) == char
    if len(expected) == 3:  # hex_quote.c's hex_unquote() accepts either case
        assert hex_unquote(expected.lower()) == char


@pytest.mark.parametrize(
    ("raw", "quoted"),
    [
        (b"", b""),
        (b"plain", b"plain"),
        (b" \t\n\r\x0b\x0c", b"%20%09%0A%0D%0B%0C"),
        (b"\x00\x7f\x80\xff", b"%00%7F%80%FF"),
        (b"100%", b"100%25"),
    ],
)
def test_hex_quote_table(raw: bytes, quoted: bytes) -> None:
    assert hex_quote(raw) == quoted
    assert hex_unquote(quoted) == raw


@pytest.mark.parametrize("bad", [b"%", b"%4", b"%%", b"%%41", b"a%g0", b"%0g", b"% 1", b"%-1"])
def test_hex_unquote_rejects_bad_escape(bad: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="malformed %-escape"):
        hex_unquote(bad)


def test_reply_parser_splits_a_stream_of_lines_in_any_chunking() -> None:
    from maplookup.protocol import CLOSED, NEED_DATA, TcpTableReplyParser

    wire = b"200 a%20b\n500 not%20found\n400 db%20down\n"
    for size in (1, 3, len(wire)):
        parser = TcpTableReplyParser()
        replies = []
        for i in range(0, len(wire), size):
            parser.receive_data(wire[i : i + size])
            while (event := parser.next_event()) is not NEED_DATA:
                replies.append(event)
        parser.receive_data(b"")
        assert parser.next_event() is CLOSED
        assert replies == [Reply.ok("a b"), Reply.notfound("not found"), Reply.temp("db down")]


def test_reply_parser_refuses_an_endless_line_and_a_truncated_one() -> None:
    from maplookup.protocol import MAX_REPLY_LINE_BYTES, TcpTableReplyParser

    parser = TcpTableReplyParser()
    parser.receive_data(b"200 " + b"x" * MAX_REPLY_LINE_BYTES)
    with pytest.raises(RemoteProtocolError, match="longer than"):
        parser.next_event()
    parser = TcpTableReplyParser()
    parser.receive_data(b"200 partial")
    parser.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="truncated"):
        parser.next_event()
