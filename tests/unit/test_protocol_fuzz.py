"""Property tests: the decoders survive any input and any chunking.

A decoder may only return events or raise RemoteProtocolError for peer bytes;
anything else (IndexError, UnicodeDecodeError, a hang) would crash a server
connection task on hostile input. The outcome must also not depend on how
the bytes were split across reads.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator

from hypothesis import given, settings
from hypothesis import strategies as st

from maplookup.protocol import (
    CLOSED,
    MAX_REPLY_BYTES,
    MAX_REPLY_LINE_BYTES,
    NEED_DATA,
    RemoteProtocolError,
    Reply,
    Request,
    SocketmapProtocol,
    Status,
    TcpTableProtocol,
    hex_quote,
    hex_unquote,
    parse_reply_line,
    socketmap,
    tcptable,
)

Codec = SocketmapProtocol | TcpTableProtocol
Outcome = tuple[list[Request], str | None]

FUZZ = settings(max_examples=300, deadline=None)

map_names = st.binary(min_size=1, max_size=20).filter(lambda b: b" " not in b)
keys = st.binary(max_size=200)
# Every code point, lone surrogates included: reply text is arbitrary str.
any_text = st.text(
    st.one_of(
        st.characters(exclude_categories=()),
        st.sampled_from(["\udcff", "\udc80", "\ud800", "\udfff", "é", " ", "%", "\n", "\x00"]),
    ),
    max_size=50,
)


def split(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, stop in itertools.pairwise(points):
        if stop > start:
            yield data[start:stop]


def run(make: Callable[[], Codec], chunks: Iterator[bytes]) -> Outcome:
    """Drive a fresh codec; return requests and the error class name, if any."""
    proto = make()
    requests: list[Request] = []
    try:
        for chunk in chunks:
            proto.receive_data(chunk)
            while (event := proto.next_event()) is not NEED_DATA:
                assert isinstance(event, Request)
                requests.append(event)
        proto.receive_data(b"")
        while (event := proto.next_event()) is not CLOSED:
            assert isinstance(event, Request)
            requests.append(event)
    except RemoteProtocolError as exc:
        return requests, type(exc).__name__
    return requests, None


def socketmap_fragments() -> st.SearchStrategy[bytes]:
    """Bytes that are often valid requests, sometimes near misses, sometimes noise."""
    valid = st.builds(socketmap.encode_request, map_names, keys)
    noise = st.binary(max_size=30)
    digits = st.integers(0, 40).map(lambda n: b"%d:" % n)
    return st.lists(st.one_of(valid, noise, digits), max_size=6).map(b"".join)


def tcptable_fragments() -> st.SearchStrategy[bytes]:
    valid = st.builds(tcptable.encode_request, keys)
    noise = st.binary(max_size=30)
    escapes = st.sampled_from([b"get ", b"%", b"%4", b"%41", b"\r", b"\n", b"\r\n", b"%zz"])
    return st.lists(st.one_of(valid, noise, escapes), max_size=8).map(b"".join)


@FUZZ
@given(
    data=st.one_of(st.binary(max_size=300), socketmap_fragments()),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
    limit=st.integers(0, 300),
)
def test_socketmap_decoder_total_and_chunking_invariant(
    data: bytes, cuts: list[int], limit: int
) -> None:
    def make() -> SocketmapProtocol:
        return SocketmapProtocol(max_request_bytes=limit)

    whole = run(make, iter([data] if data else []))
    assert run(make, split(data, cuts)) == whole
    assert whole[1] in (None, "RemoteProtocolError")


@FUZZ
@given(
    data=st.one_of(st.binary(max_size=300), tcptable_fragments()),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
    limit=st.integers(0, 300),
)
def test_tcptable_decoder_total_and_chunking_invariant(
    data: bytes, cuts: list[int], limit: int
) -> None:
    def make() -> TcpTableProtocol:
        return TcpTableProtocol(b"m", max_request_bytes=limit)

    whole = run(make, iter([data] if data else []))
    assert run(make, split(data, cuts)) == whole
    assert whole[1] in (None, "RemoteProtocolError")


@FUZZ
@given(
    requests=st.lists(st.tuples(map_names, keys), min_size=1, max_size=5),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
)
def test_socketmap_request_round_trip(requests: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
    data = b"".join(socketmap.encode_request(m, k) for m, k in requests)
    expected = [Request(m, k) for m, k in requests]
    assert run(SocketmapProtocol, split(data, cuts)) == (expected, None)


@FUZZ
@given(
    request_keys=st.lists(keys, min_size=1, max_size=5),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
)
def test_tcptable_request_round_trip(request_keys: list[bytes], cuts: list[int]) -> None:
    data = b"".join(tcptable.encode_request(k) for k in request_keys)
    expected = [Request(b"m", k) for k in request_keys]
    assert run(lambda: TcpTableProtocol(b"m"), split(data, cuts)) == (expected, None)


@FUZZ
@given(st.binary(max_size=500))
def test_hex_quote_round_trip(raw: bytes) -> None:
    quoted = hex_quote(raw)
    assert hex_unquote(quoted) == raw
    # Only printable, non-space ASCII goes on the wire, so no newline can slip in.
    assert all(0x21 <= b <= 0x7E for b in quoted)


@FUZZ
@given(st.binary(max_size=100))
def test_hex_unquote_total(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        hex_unquote(data)


def utf8_or_none(text: str) -> bytes | None:
    """Value bytes as the codecs define them (surrogateescape'd bytes pass through)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None


def reason_bytes(text: str) -> bytes:
    raw = utf8_or_none(text)
    return text.encode("utf-8", "backslashreplace") if raw is None else raw


def as_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


@FUZZ
@given(status=st.sampled_from(Status), text=any_text)
def test_socketmap_reply_always_encodes_and_parses(status: Status, text: str) -> None:
    wire = socketmap.encode_reply(Reply(status, text))
    reply, consumed = socketmap.parse_reply(wire)
    assert consumed == len(wire)
    if status is Status.NOTFOUND:
        assert reply == Reply.notfound()
    elif status is Status.OK:
        raw = utf8_or_none(text)
        if raw:
            assert reply.status is Status.OK
            assert as_bytes(reply.value) == raw
        else:  # empty or unencodable value
            assert reply.status is Status.TEMP
    else:
        assert reply.status is status
        assert as_bytes(reply.value) == reason_bytes(text)


@FUZZ
@given(status=st.sampled_from(Status), text=any_text)
def test_tcptable_reply_always_encodes_and_parses(status: Status, text: str) -> None:
    wire = tcptable.encode_reply(Reply(status, text))
    assert wire.endswith(b"\n")
    assert wire.count(b"\n") == 1
    assert len(wire) <= MAX_REPLY_LINE_BYTES
    reply = parse_reply_line(wire)
    raw = utf8_or_none(text)
    if status is Status.OK:
        if raw:
            assert reply.status is Status.OK
            assert as_bytes(reply.value) == raw
        else:
            assert reply.status is Status.TEMP
    elif status is Status.NOTFOUND:
        assert reply.status is Status.NOTFOUND
        assert as_bytes(reply.value) == (reason_bytes(text) or b"not found")
    else:
        assert reply.status is Status.TEMP  # tcp_table has no permanent-error code
        if text:
            assert as_bytes(reply.value) == reason_bytes(text)


@settings(max_examples=20, deadline=None)
@given(size=st.integers(MAX_REPLY_BYTES - 10, MAX_REPLY_BYTES + 10))
def test_socketmap_reply_size_boundary(size: int) -> None:
    wire = socketmap.encode_reply(Reply.ok("v" * (size - 3)))
    reply, _ = socketmap.parse_reply(wire)
    assert (reply.status is Status.OK) == (size <= MAX_REPLY_BYTES)
