"""Sans-IO codec for Postfix tcp_table(5).

Requests are lines ``get <key>\\n`` and replies are lines ``<code> <text>\\n``,
both %XX-quoted with hex_quote(). No map name travels on the wire, so each
listener serves one map and the codec is told its name.
"""

from __future__ import annotations

import re
from typing import Final

from .errors import RemoteProtocolError
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
from .socketmap import DEFAULT_MAX_REQUEST_BYTES, EMPTY_VALUE_REASON

__all__ = [
    "MAX_REPLY_LINE_BYTES",
    "TcpTableProtocol",
    "TcpTableReplyParser",
    "encode_reply",
    "encode_request",
    "hex_quote",
    "hex_unquote",
    "parse_reply_line",
]

# src/global/dict_tcp.c: DICT_TCP_MAXLEN, the bound given to
# vstring_get_nonl_bound() when reading a reply; it counts the newline.
MAX_REPLY_LINE_BYTES: Final = 4096

_GET: Final = b"get "  # dict_tcp.c: vstream_fprintf(fp, "get %s\n", ...)

# src/util/hex_quote.c: a byte is sent as-is iff it is not '%', not white
# space and printable ASCII, i.e. 0x21..0x7E minus '%'; all else is %XX, upper case.
_PLAIN: Final = bytes(b for b in range(0x21, 0x7F) if b != ord("%"))
_QUOTED: Final = [bytes([b]) if b in _PLAIN else b"%%%02X" % b for b in range(256)]
_NEEDS_QUOTE: Final = re.compile(rb"[^\x21-\x24\x26-\x7e]")

# src/util/hex_quote.c: hex_unquote() accepts either case and fails on anything
# else after '%' (including "%%" and a '%' near the end).
_HEX_VALUE: Final = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}

# C isspace(), which dict_tcp.c requires after the three-digit code.
_C_SPACE: Final = b" \t\n\v\f\r"

# tcp_table has no permanent-error code: 4xx is the only way to say "not now".
_DEFAULT_TEXT: Final = {
    Status.NOTFOUND: "not found",
    Status.TEMP: "temporary failure",
    Status.TIMEOUT: "timeout",
    Status.PERM: "permanent failure",
}


def hex_quote(data: bytes) -> bytes:
    """Quote bytes exactly as Postfix's hex_quote() does."""
    if _NEEDS_QUOTE.search(data) is None:
        return bytes(data)
    return b"".join([_QUOTED[b] for b in data])


def hex_unquote(data: bytes | bytearray) -> bytes:
    """Undo hex_quote(); raise RemoteProtocolError on a malformed %XX escape.

    Bytes other than '%' pass through unchanged, as in Postfix's hex_unquote(),
    even ones hex_quote() would have escaped.
    """
    if b"%" not in data:
        return bytes(data)
    parts = data.split(b"%")
    out = bytearray(parts[0])
    for part in parts[1:]:
        hi = _HEX_VALUE.get(part[0]) if len(part) > 0 else None
        lo = _HEX_VALUE.get(part[1]) if len(part) > 1 else None
        if hi is None or lo is None:
            raise RemoteProtocolError(f"malformed %-escape {b'%' + part[:2]!r}")
        out.append(hi << 4 | lo)
        out += part[2:]
    return bytes(out)


class TcpTableProtocol(_BufferedReceiver[Request]):
    """Server side of one tcp_table connection: bytes in, :class:`Request` out.

    The decoded key is bounded by ``max_request_bytes``; the raw line by
    ``3 * max_request_bytes + 8`` (every key byte may take three as %XX, plus
    "get ", an optional CR and the newline), checked before the newline arrives.
    """

    _what = "tcp_table request line"

    def __init__(self, map_name: bytes, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        if max_request_bytes < 0:
            raise ValueError("max_request_bytes must be >= 0")
        super().__init__()
        self._map_name = map_name
        self._max_key = max_request_bytes
        self._max_line = 3 * max_request_bytes + 8
        self._scan = 0  # bytes already searched for a newline

    @property
    def map_name(self) -> bytes:
        return self._map_name

    def next_event(self) -> Request | NeedData | Closed:
        """Return the next request, NEED_DATA, or CLOSED (EOF at a boundary).

        Raises RemoteProtocolError for malformed, oversized or truncated input.
        """
        return self._next()

    def send(self, reply: Reply) -> bytes:
        """Encode ``reply`` for the wire (see :func:`encode_reply`)."""
        self._check_usable()
        return encode_reply(reply)

    def _parse(self) -> Request | None:
        buf = self._buf
        newline = buf.find(b"\n", self._scan)
        if newline < 0:
            # Fail fast on a wrong command or an endless line, so a peer that
            # never sends a newline cannot make us buffer without bound.
            if self._scan < len(_GET):
                self._check_command(buf)
            if len(buf) >= self._max_line:
                raise RemoteProtocolError(f"request line longer than {self._max_line} bytes")
            self._scan = len(buf)
            return None
        self._scan = 0
        self._check_command(buf)
        if newline + 1 > self._max_line:
            raise RemoteProtocolError(f"request line longer than {self._max_line} bytes")
        # _check_command() passed, so the line holds at least "get " before the newline.
        end = newline - 1 if buf[newline - 1] == 0x0D else newline  # tolerate CRLF
        key = hex_unquote(buf[len(_GET) : end])
        if len(key) > self._max_key:
            raise RemoteProtocolError(f"key longer than {self._max_key} bytes")
        del buf[: newline + 1]
        return Request(self._map_name, key)

    @staticmethod
    def _check_command(buf: bytearray) -> None:
        head = buf[: len(_GET)]
        if not _GET.startswith(head):
            raise RemoteProtocolError(f"expected a 'get <key>' request, got {bytes(head)!r}")


def _line(code: bytes, quoted: bytes) -> bytes:
    return code + b" " + quoted + b"\n"


def _cut_quoted(quoted: bytes, limit: int) -> bytes:
    """Cut quoted text to ``limit`` bytes without splitting a %XX escape."""
    if len(quoted) <= limit:
        return quoted
    percent = quoted.rfind(b"%", max(0, limit - 2), limit)
    return quoted[: limit if percent < 0 else percent]


def encode_reply(reply: Reply) -> bytes:
    """Encode a reply line; never raises.

    OK -> 200 with the hex-quoted value. An OK value that is empty,
    unencodable, or would make the line exceed MAX_REPLY_LINE_BYTES becomes a
    400 with the reason (Postfix defers). NOTFOUND -> 500. TEMP, TIMEOUT and
    PERM -> 400, since tcp_table has no permanent-error code. Error text is
    hex-quoted too (dict_tcp.c hex_unquote()s it) and truncated to fit.
    """
    status = reply.status
    if status is Status.OK:
        value = _encode_value(reply.value)
        if value is None:
            return _error_line(b"400", _quote_text("reply value is not encodable as UTF-8"))
        if not value:
            return _error_line(b"400", _quote_text(EMPTY_VALUE_REASON))
        line = _line(b"200", hex_quote(value))
        if len(line) > MAX_REPLY_LINE_BYTES:
            reason = f"reply too large ({len(line)} bytes > {MAX_REPLY_LINE_BYTES})"
            return _error_line(b"400", _quote_text(reason))
        return line
    code = b"500" if status is Status.NOTFOUND else b"400"
    return _error_line(code, _quote_text(reply.value or _DEFAULT_TEXT[status]))


def _quote_text(text: str) -> bytes:
    return hex_quote(_encode_reason(text))


def _error_line(code: bytes, quoted: bytes) -> bytes:
    # dict_tcp.c needs the space after the code even when the text is empty.
    return _line(code, _cut_quoted(quoted, MAX_REPLY_LINE_BYTES - len(code) - 2))


def encode_request(key: bytes) -> bytes:
    """Encode a request as dict_tcp.c does (client side: CLI and tests)."""
    return _GET + hex_quote(key) + b"\n"


def parse_reply_line(line: bytes) -> Reply:
    """Interpret one reply line as dict_tcp.c does; the newline is optional.

    Postfix dispatches on the first digit only: 2xx found, 5xx not found,
    4xx temporary error; anything else is an error here.
    """
    body = line[:-1] if line.endswith(b"\n") else line
    if len(body) + 1 > MAX_REPLY_LINE_BYTES:
        raise RemoteProtocolError(f"reply line longer than {MAX_REPLY_LINE_BYTES} bytes")
    if len(body) < 4 or not body[:3].isdigit() or body[3] not in _C_SPACE:
        raise RemoteProtocolError(f"malformed tcp_table reply {body[:64]!r}")
    text = _decode_text(hex_unquote(body[4:]))
    first = body[:1]
    if first == b"2":
        return Reply.ok(text)
    if first == b"5":
        return Reply.notfound(text)
    if first == b"4":
        return Reply.temp(text)
    raise RemoteProtocolError(f"unexpected tcp_table reply code {body[:3]!r}")


class TcpTableReplyParser(_BufferedReceiver[Reply]):
    """Client side: decode a stream of reply lines into :class:`Reply`.

    Applies dict_tcp.c's MAX_REPLY_LINE_BYTES as soon as that many bytes are buffered
    without a newline, so a peer cannot make the client buffer without bound.
    """

    _what = "tcp_table reply line"

    def next_event(self) -> Reply | NeedData | Closed:
        return self._next()

    def _parse(self) -> Reply | None:
        buf = self._buf
        newline = buf.find(b"\n", 0, MAX_REPLY_LINE_BYTES)
        if newline < 0:
            if len(buf) >= MAX_REPLY_LINE_BYTES:
                raise RemoteProtocolError(f"reply line longer than {MAX_REPLY_LINE_BYTES} bytes")
            return None
        line = bytes(buf[: newline + 1])
        del buf[: newline + 1]
        return parse_reply_line(line)
