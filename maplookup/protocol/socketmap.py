"""Sans-IO codec for Postfix socketmap_table(5).

Every message is a netstring ``<len>:<payload>,``. A request payload is
``<mapname> <key>``; a reply payload is ``<STATUS> <text>``. One connection
carries many request/reply pairs in sequence.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Final, TypeVar

from .errors import LocalProtocolError, RemoteProtocolError
from .events import (
    Closed,
    NeedData,
    Reply,
    Request,
    Status,
    _BufferedReceiver,
    _decode_text,
    _encode_reason,
    _encode_value,
)

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "MAX_REPLY_BYTES",
    "SocketmapProtocol",
    "SocketmapReplyParser",
    "decode_reply_payload",
    "encode_reply",
    "encode_request",
    "parse_reply",
]

# src/global/dict_sockmap.c: DICT_SOCKMAP_DEF_MAX_REPLY, passed to netstring_get()
# as the limit on the reply *payload* length; Postfix fails the lookup beyond it.
MAX_REPLY_BYTES: Final = 100_000

# Payload limit for requests. Postfix keys stay under 10,000 bytes in practice;
# this leaves room for the map name and separator without letting a peer make
# us buffer arbitrary amounts.
DEFAULT_MAX_REQUEST_BYTES: Final = 16_384

_COLON: Final = 0x3A
_COMMA: Final = 0x2C
_ZERO: Final = 0x30
_NINE: Final = 0x39

# The lookup layer must never produce OK with an empty value (Postfix treats it
# as a configuration error); deferring with a visible reason is the safer outcome.
EMPTY_VALUE_REASON: Final = "lookup returned an empty value"

_T = TypeVar("_T")


class _NetstringDecoder(_BufferedReceiver[_T]):
    """Incremental netstring framing, shared by the request and reply decoders.

    The length prefix is re-examined on each call only until it is complete
    (at most ``len(str(limit)) + 1`` bytes, i.e. O(1) work); after that only the
    buffer size is compared, so byte-at-a-time input stays linear.
    """

    _what = "netstring"

    def __init__(self, max_payload_bytes: int) -> None:
        if max_payload_bytes < 0:
            raise ValueError("max_payload_bytes must be >= 0")
        super().__init__()
        self._max = max_payload_bytes
        self._max_digits = len(str(max_payload_bytes))
        self._start = -1  # payload offset once the length prefix is parsed
        self._length = 0

    def _parse(self) -> _T | None:
        buf = self._buf
        if self._start < 0 and not self._parse_length():
            return None
        start = self._start
        end = start + self._length
        if len(buf) <= end:
            return None
        if buf[end] != _COMMA:
            raise RemoteProtocolError(
                f"netstring of length {self._length} is not terminated by ','"
            )
        item = self._decode_payload(start, end)
        del buf[: end + 1]
        self._start = -1
        return item

    def _parse_length(self) -> bool:
        buf = self._buf
        colon = buf.find(b":", 0, self._max_digits + 1)
        if colon > 0 and (colon == 1 or buf[0] != _ZERO):
            digits = buf[:colon]
            if digits.isdigit():  # ASCII digits only; int() alone would accept "+1", "1_0"
                length = int(digits)
                if length <= self._max:
                    self._length = length
                    self._start = colon + 1
                    return True
        self._diagnose_length(colon)
        return False

    def _diagnose_length(self, colon: int) -> None:
        """Raise for the first byte that makes the prefix invalid, else return.

        Checking byte by byte in order makes the error independent of how the
        input was chunked, and rejects an oversized length before its payload
        arrives: once the digits seen exceed the limit, more digits only grow it.
        """
        region = self._buf[: colon if colon >= 0 else self._max_digits + 1]
        value = 0
        for i, c in enumerate(region):
            if not _ZERO <= c <= _NINE:
                raise RemoteProtocolError(f"invalid byte {bytes([c])!r} in netstring length")
            if i == 1 and region[0] == _ZERO:
                raise RemoteProtocolError("leading zero in netstring length")
            value = value * 10 + (c - _ZERO)
            if value > self._max:
                raise RemoteProtocolError(
                    f"netstring length {region[: i + 1].decode()}... exceeds "
                    f"the {self._max}-byte limit"
                )
        if colon == 0:
            raise RemoteProtocolError("empty netstring length")

    @abstractmethod
    def _decode_payload(self, start: int, end: int) -> _T:
        """Interpret ``self._buf[start:end]``; the framing is already verified."""


class SocketmapProtocol(_NetstringDecoder[Request]):
    """Server side of one socketmap connection: bytes in, :class:`Request` out."""

    _what = "socketmap request"

    def __init__(self, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        super().__init__(max_request_bytes)

    def next_event(self) -> Request | NeedData | Closed:
        """Return the next request, NEED_DATA, or CLOSED (EOF at a boundary).

        Raises RemoteProtocolError for malformed, oversized or truncated input.
        """
        return self._next()

    def send(self, reply: Reply) -> bytes:
        """Encode ``reply`` for the wire (see :func:`encode_reply`)."""
        self._check_usable()
        return encode_reply(reply)

    def _decode_payload(self, start: int, end: int) -> Request:
        buf = self._buf
        # dict_sockmap.c sends "%s %s" (map name, key): split at the FIRST space
        # only, since keys may contain spaces or be empty.
        space = buf.find(b" ", start, end)
        if space < 0:
            raise RemoteProtocolError("socketmap request has no space after the map name")
        if space == start:
            raise RemoteProtocolError("socketmap request has an empty map name")
        return Request(bytes(buf[start:space]), bytes(buf[space + 1 : end]))


def _netstring(payload: bytes) -> bytes:
    return b"%d:%b," % (len(payload), payload)


def _truncate_utf8(data: bytes, limit: int) -> bytes:
    """Cut to at most ``limit`` bytes without splitting a UTF-8 sequence."""
    if len(data) <= limit:
        return data
    cut = limit
    while cut > 0 and data[cut] & 0xC0 == 0x80:
        cut -= 1
    return data[:cut]


def encode_reply(reply: Reply) -> bytes:
    """Encode a reply netstring; never raises.

    An OK value that is empty, unencodable, or would make the payload exceed
    MAX_REPLY_BYTES becomes a TEMP reply with the reason, because Postfix
    would reject it anyway and a TEMP at least says why in its log. An error
    reason that is too long is truncated instead: it is only logged, and the
    status word is what matters.
    """
    status = reply.status
    if status is Status.NOTFOUND:
        # socketmap_table(5): "NOTFOUND " -- the text after the space is ignored.
        return b"9:NOTFOUND ,"
    if status is Status.OK:
        value = _encode_value(reply.value)
        if value is None:
            return _temp("reply value is not encodable as UTF-8")
        if not value:
            return _temp(EMPTY_VALUE_REASON)
        payload = b"OK " + value
        if len(payload) > MAX_REPLY_BYTES:
            return _temp(f"reply too large ({len(payload)} bytes > {MAX_REPLY_BYTES})")
        return _netstring(payload)
    head = status.value.encode("ascii") + b" "
    reason = _truncate_utf8(_encode_reason(reply.value), MAX_REPLY_BYTES - len(head))
    return _netstring(head + reason)


def _temp(reason: str) -> bytes:
    return _netstring(b"TEMP " + reason.encode())


def encode_request(map_name: bytes, key: bytes) -> bytes:
    """Encode a request as dict_sockmap.c does (client side: CLI and tests)."""
    if not map_name or b" " in map_name:
        raise LocalProtocolError(f"invalid socketmap name {map_name!r}")
    return _netstring(map_name + b" " + key)


_STATUS_BY_WORD: Final = {s.value.encode("ascii"): s for s in Status}


def decode_reply_payload(payload: bytes) -> Reply:
    """Interpret a reply payload as dict_sockmap.c does.

    Like Postfix's split_at(), a bare status word without a space is accepted.
    An unknown word is an error: Postfix treats it as a temporary failure, and
    a client of ours should surface it rather than guess.
    """
    word, _, text = payload.partition(b" ")
    status = _STATUS_BY_WORD.get(word)
    if status is None:
        raise RemoteProtocolError(f"unknown socketmap reply status {word[:32]!r}")
    return Reply(status, _decode_text(text))


class SocketmapReplyParser(_NetstringDecoder[Reply]):
    """Client side: decode a stream of reply netstrings into :class:`Reply`.

    Applies Postfix's own MAX_REPLY_BYTES limit, so a reply accepted here is one
    Postfix would accept too.
    """

    _what = "socketmap reply"

    def __init__(self) -> None:
        super().__init__(MAX_REPLY_BYTES)

    def next_event(self) -> Reply | NeedData | Closed:
        return self._next()

    def _decode_payload(self, start: int, end: int) -> Reply:
        return decode_reply_payload(bytes(self._buf[start:end]))


def parse_reply(data: bytes) -> tuple[Reply, int]:
    """Decode the first reply in ``data``; return it and the bytes consumed.

    ``data`` is taken to be everything there is, so an incomplete netstring
    raises RemoteProtocolError ("truncated ...").
    """
    parser = SocketmapReplyParser()
    parser.receive_data(data)
    parser.receive_data(b"")
    event = parser.next_event()
    if not isinstance(event, Reply):
        raise RemoteProtocolError("no socketmap reply: empty input")
    return event, len(data) - len(parser._buf)
