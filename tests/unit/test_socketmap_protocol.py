"""Table-driven tests for the socketmap codec (socketmap_table(5), dict_sockmap.c).

Every decoder case is fed whole and in several chunk sizes; the expected
events and outcome must not depend on how the bytes were split.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from maplookup.protocol import (
    CLOSED,
    DEFAULT_MAX_REQUEST_BYTES,
    MAX_REPLY_BYTES,
    NEED_DATA,
    LocalProtocolError,
    RemoteProtocolError,
    Reply,
    Request,
    SocketmapProtocol,
    SocketmapReplyParser,
    Status,
)
from maplookup.protocol.socketmap import (
    decode_reply_payload,
    encode_reply,
    encode_request,
    parse_reply,
)

CHUNK_SIZES = [None, 1, 2, 3, 7]  # None: the whole input in one receive_data()


def ns(payload: bytes) -> bytes:
    return b"%d:%b," % (len(payload), payload)


def chunked(data: bytes, size: int | None) -> Iterator[bytes]:
    if size is None:
        if data:  # receive_data(b"") would mean EOF
            yield data
        return
    for i in range(0, len(data), size):
        yield data[i : i + size]


def drive(
    proto: SocketmapProtocol, data: bytes, size: int | None
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


BIG_KEY = bytes(range(256)) * 39 + b"k" * 16  # 10,000 bytes, every byte value

VALID = [
    pytest.param(b"21:virtual a@example.com,", [Request(b"virtual", b"a@example.com")], id="plain"),
    pytest.param(b"8:virtual ,", [Request(b"virtual", b"")], id="empty-key"),
    pytest.param(ns(b"map a b  c "), [Request(b"map", b"a b  c ")], id="key-with-spaces"),
    pytest.param(
        ns("map ünïcødé@exämple.org".encode()),
        [Request(b"map", "ünïcødé@exämple.org".encode())],
        id="utf8-key",
    ),
    pytest.param(ns(b"m a:b,c:d,"), [Request(b"m", b"a:b,c:d,")], id="key-with-colons-commas"),
    pytest.param(ns(b"m \x00\n\r\xff"), [Request(b"m", b"\x00\n\r\xff")], id="binary-key"),
    pytest.param(ns(b"big " + BIG_KEY), [Request(b"big", BIG_KEY)], id="10000-byte-key"),
    pytest.param(
        ns(b"a 1") + ns(b"b 2") + ns(b"c ") + ns(b"d 4 4"),
        [Request(b"a", b"1"), Request(b"b", b"2"), Request(b"c", b""), Request(b"d", b"4 4")],
        id="several-in-one-chunk",
    ),
    pytest.param(b"", [], id="empty-stream"),
    pytest.param(
        ns(b"m " + b"x" * (DEFAULT_MAX_REQUEST_BYTES - 2)),
        [Request(b"m", b"x" * (DEFAULT_MAX_REQUEST_BYTES - 2))],
        id="payload-exactly-at-limit",
    ),
]


@pytest.mark.parametrize("size", CHUNK_SIZES)
@pytest.mark.parametrize(("data", "expected"), VALID)
def test_valid_requests(data: bytes, expected: list[Request], size: int | None) -> None:
    requests, error = drive(SocketmapProtocol(), data, size)
    assert error is None
    assert requests == expected


MALFORMED = [
    pytest.param(b"x:map k,", [], "invalid byte", id="non-digit-length"),
    pytest.param(b"5x:map k,", [], "invalid byte", id="non-digit-after-digit"),
    pytest.param(b"+5:map k,", [], "invalid byte", id="plus-sign"),
    pytest.param(b"-5:map k,", [], "invalid byte", id="minus-sign"),
    pytest.param(b" 5:map k,", [], "invalid byte", id="leading-space"),
    pytest.param(b"5 :map k,", [], "invalid byte", id="space-before-colon"),
    pytest.param(b"1_0:map k12,", [], "invalid byte", id="underscore"),
    pytest.param(b":map k,", [], "empty netstring length", id="empty-length"),
    pytest.param(b"05:map k,", [], "leading zero", id="leading-zero"),
    pytest.param(b"00:,", [], "leading zero", id="double-zero"),
    pytest.param(b"16385:" + b"m " * 9000, [], "exceeds", id="declared-over-limit"),
    pytest.param(b"99999999999:", [], "exceeds", id="too-many-digits"),
    pytest.param(b"5:map k;", [], "not terminated by ','", id="wrong-terminator"),
    pytest.param(b"5:map kk,", [], "not terminated by ','", id="length-too-short"),
    pytest.param(b"5:mapkk,", [], "no space", id="no-space"),
    pytest.param(b"0:,", [], "no space", id="empty-payload"),
    pytest.param(b"5: mapk,", [], "empty map name", id="empty-map-name"),
    pytest.param(ns(b"a 1") + b"garbage", [Request(b"a", b"1")], "invalid byte", id="after-valid"),
    pytest.param(b"12", [], "truncated", id="eof-in-length"),
    pytest.param(b"12:", [], "truncated", id="eof-after-colon"),
    pytest.param(b"5:map", [], "truncated", id="eof-in-payload"),
    pytest.param(b"5:map k", [], "truncated", id="eof-before-comma"),
    pytest.param(ns(b"a 1") + b"3:b", [Request(b"a", b"1")], "truncated", id="eof-in-second"),
]


@pytest.mark.parametrize("size", CHUNK_SIZES)
@pytest.mark.parametrize(("data", "expected", "reason"), MALFORMED)
def test_malformed_requests(
    data: bytes, expected: list[Request], reason: str, size: int | None
) -> None:
    requests, error = drive(SocketmapProtocol(), data, size)
    assert requests == expected
    assert error is not None
    assert reason in error.reason


@pytest.mark.parametrize(
    ("max_bytes", "prefix"),
    [
        (DEFAULT_MAX_REQUEST_BYTES, b"16385:"),
        (DEFAULT_MAX_REQUEST_BYTES, b"99999"),  # no colon yet: already impossible
        (DEFAULT_MAX_REQUEST_BYTES, b"100000"),
        (10, b"11"),
        (0, b"1"),
    ],
)
def test_oversized_length_rejected_before_payload(max_bytes: int, prefix: bytes) -> None:
    proto = SocketmapProtocol(max_request_bytes=max_bytes)
    proto.receive_data(prefix)  # no payload, no EOF
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        proto.next_event()


@pytest.mark.parametrize(("max_bytes", "prefix"), [(16_384, b"16384:"), (10, b"10:"), (0, b"0:")])
def test_length_at_limit_waits_for_data(max_bytes: int, prefix: bytes) -> None:
    proto = SocketmapProtocol(max_request_bytes=max_bytes)
    proto.receive_data(prefix)
    assert proto.next_event() is NEED_DATA


def test_partial_length_prefix_waits_for_data() -> None:
    proto = SocketmapProtocol()
    for byte in b"1638":
        proto.receive_data(bytes([byte]))
        assert proto.next_event() is NEED_DATA


def test_negative_limit_rejected() -> None:
    with pytest.raises(ValueError, match="max_payload_bytes"):
        SocketmapProtocol(max_request_bytes=-1)


# --- misuse of the API ----------------------------------------------------


def test_closed_is_repeatable_and_empty_data_after_eof_is_ignored() -> None:
    proto = SocketmapProtocol()
    proto.receive_data(b"")
    assert proto.next_event() is CLOSED
    proto.receive_data(b"")
    assert proto.next_event() is CLOSED


def test_data_after_eof_is_local_error() -> None:
    proto = SocketmapProtocol()
    proto.receive_data(ns(b"m k"))
    proto.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after end of stream"):
        proto.receive_data(b"1")
    # What arrived before EOF is still delivered.
    assert proto.next_event() == Request(b"m", b"k")
    assert proto.next_event() is CLOSED


def test_use_after_remote_error_is_local_error() -> None:
    proto = SocketmapProtocol()
    proto.receive_data(b"x")
    with pytest.raises(RemoteProtocolError):
        proto.next_event()
    with pytest.raises(LocalProtocolError):
        proto.next_event()
    with pytest.raises(LocalProtocolError):
        proto.receive_data(ns(b"m k"))
    with pytest.raises(LocalProtocolError):
        proto.send(Reply.ok("v"))


def test_error_classes() -> None:
    err = RemoteProtocolError("why")
    assert err.reason == "why"
    assert str(err) == "why"
    assert not issubclass(LocalProtocolError, RemoteProtocolError)


# --- replies ---------------------------------------------------------------

REPLIES = [
    pytest.param(Reply.ok("value"), b"8:OK value,", id="ok"),
    pytest.param(Reply.ok("a b,c:"), b"9:OK a b,c:,", id="ok-with-separators"),
    pytest.param(Reply.ok("héllo"), "9:OK héllo,".encode(), id="ok-utf8"),
    pytest.param(Reply.ok("\udcff"), b"4:OK \xff,", id="ok-surrogateescape"),
    pytest.param(Reply.notfound(), b"9:NOTFOUND ,", id="notfound"),
    pytest.param(Reply.notfound("no such user"), b"9:NOTFOUND ,", id="notfound-reason-dropped"),
    pytest.param(Reply.temp("db down"), b"12:TEMP db down,", id="temp"),
    pytest.param(Reply.temp(""), b"5:TEMP ,", id="temp-empty"),
    pytest.param(Reply.timeout("slow"), b"12:TIMEOUT slow,", id="timeout"),
    pytest.param(Reply.perm("bad map"), b"12:PERM bad map,", id="perm"),
    pytest.param(Reply.perm("\ud800"), b"11:PERM \\ud800,", id="perm-unencodable-reason"),
    pytest.param(Reply.ok(""), b"35:TEMP lookup returned an empty value,", id="ok-empty"),
    pytest.param(
        Reply.ok("\ud800"), b"42:TEMP reply value is not encodable as UTF-8,", id="ok-unencodable"
    ),
]


@pytest.mark.parametrize(("reply", "wire"), REPLIES)
def test_encode_reply(reply: Reply, wire: bytes) -> None:
    assert encode_reply(reply) == wire
    assert SocketmapProtocol().send(reply) == wire


def test_reply_constructors() -> None:
    assert Reply.ok("v") == Reply(Status.OK, "v")
    assert Reply.notfound() == Reply(Status.NOTFOUND, "")
    assert Reply.temp("r") == Reply(Status.TEMP, "r")
    assert Reply.timeout("r") == Reply(Status.TIMEOUT, "r")
    assert Reply.perm("r") == Reply(Status.PERM, "r")


def test_reply_at_size_limit_is_sent() -> None:
    value = "v" * (MAX_REPLY_BYTES - 3)  # "OK " + value == exactly the limit
    wire = encode_reply(Reply.ok(value))
    assert wire == b"100000:OK " + value.encode() + b","
    assert parse_reply(wire) == (Reply.ok(value), len(wire))


@pytest.mark.parametrize(
    ("value", "payload_size"),
    [("v" * (MAX_REPLY_BYTES - 2), MAX_REPLY_BYTES + 1), ("é" * 50_000, 100_003)],
)
def test_too_large_reply_becomes_temp(value: str, payload_size: int) -> None:
    wire = encode_reply(Reply.ok(value))
    reason = f"reply too large ({payload_size} bytes > 100000)"
    assert wire == ns(b"TEMP " + reason.encode())


@pytest.mark.parametrize("status", [Status.TEMP, Status.TIMEOUT, Status.PERM])
@pytest.mark.parametrize("reason", ["x" * 200_000, "é" * 60_000])
def test_long_error_reason_is_truncated_not_replaced(status: Status, reason: str) -> None:
    wire = encode_reply(Reply(status, reason))
    reply, consumed = parse_reply(wire)  # would raise if the payload exceeded the limit
    assert consumed == len(wire)
    assert reply.status is status
    assert reason.startswith(reply.value)
    assert len(reply.value.encode()) >= MAX_REPLY_BYTES - len(status.value) - 2
    reply.value.encode("utf-8")  # no split character (surrogateescape'd bytes would fail)


# --- client side -----------------------------------------------------------


def test_encode_request() -> None:
    assert encode_request(b"virtual", b"a@example.com") == b"21:virtual a@example.com,"
    assert encode_request(b"m", b"") == b"2:m ,"


@pytest.mark.parametrize("map_name", [b"", b"two words"])
def test_encode_request_rejects_bad_map_name(map_name: bytes) -> None:
    with pytest.raises(LocalProtocolError, match="invalid socketmap name"):
        encode_request(map_name, b"k")


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"OK value with spaces", Reply.ok("value with spaces")),
        (b"NOTFOUND ", Reply.notfound()),
        (b"NOTFOUND", Reply.notfound()),  # dict_sockmap.c split_at() tolerates no space
        (b"TEMP db down", Reply.temp("db down")),
        (b"TIMEOUT t", Reply.timeout("t")),
        (b"PERM p", Reply.perm("p")),
        (b"OK \xc3\xa9", Reply.ok("é")),
    ],
)
def test_decode_reply_payload(payload: bytes, expected: Reply) -> None:
    assert decode_reply_payload(payload) == expected


@pytest.mark.parametrize("payload", [b"", b"ok value", b"FOUND x", b" OK x", b"OKAY x", b"\xff x"])
def test_unknown_reply_status_is_error(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="unknown socketmap reply status"):
        decode_reply_payload(payload)


@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_reply_parser_stream(size: int | None) -> None:
    replies = [Reply.ok("a b"), Reply.notfound(), Reply.temp("x"), Reply.perm("y")]
    data = b"".join(encode_reply(r) for r in replies)
    parser = SocketmapReplyParser()
    seen: list[Reply] = []
    for chunk in chunked(data, size):
        parser.receive_data(chunk)
        while (event := parser.next_event()) is not NEED_DATA:
            assert isinstance(event, Reply)
            seen.append(event)
    parser.receive_data(b"")
    assert parser.next_event() is CLOSED
    assert seen == replies


def test_reply_parser_rejects_reply_postfix_would_reject() -> None:
    parser = SocketmapReplyParser()
    parser.receive_data(b"100001:")
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        parser.next_event()


def test_parse_reply_reports_consumed_bytes() -> None:
    wire = encode_reply(Reply.ok("v")) + b"2:OK"
    assert parse_reply(wire) == (Reply.ok("v"), 7)


@pytest.mark.parametrize(("data", "reason"), [(b"", "empty input"), (b"5:OK v", "truncated")])
def test_parse_reply_incomplete(data: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        parse_reply(data)


def test_sentinel_reprs() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"
    assert repr(CLOSED) == "CLOSED"
