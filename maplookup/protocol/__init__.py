"""Sans-IO codecs for Postfix's socketmap and tcp_table lookup protocols.

No I/O happens here: callers feed received bytes in, pull :class:`Request`
events out, and write the bytes returned by ``send()``. That keeps the wire
rules testable byte by byte and independent of trio or asyncio.

``encode_request``/``encode_reply``/``parse_reply`` exist in both wire modules,
so they are reached as ``socketmap.encode_request`` / ``tcptable.encode_request``.

Layer: above the base modules only (``maps``, ``address``, ``errors``, ``config``): it
imports nothing else of maplookup, and nothing with sockets (tests/unit/test_layers.py).
"""

from . import socketmap, tcptable
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import CLOSED, NEED_DATA, Closed, Event, NeedData, Reply, Request, Status
from .socketmap import (
    DEFAULT_MAX_REQUEST_BYTES,
    MAX_REPLY_BYTES,
    SocketmapProtocol,
    SocketmapReplyParser,
)
from .tcptable import (
    MAX_REPLY_LINE_BYTES,
    TcpTableProtocol,
    TcpTableReplyParser,
    hex_quote,
    hex_unquote,
    parse_reply_line,
)

__all__ = [
    "CLOSED",
    "DEFAULT_MAX_REQUEST_BYTES",
    "MAX_REPLY_BYTES",
    "MAX_REPLY_LINE_BYTES",
    "NEED_DATA",
    "Closed",
    "Event",
    "LocalProtocolError",
    "NeedData",
    "ProtocolError",
    "RemoteProtocolError",
    "Reply",
    "Request",
    "SocketmapProtocol",
    "SocketmapReplyParser",
    "Status",
    "TcpTableProtocol",
    "TcpTableReplyParser",
    "hex_quote",
    "hex_unquote",
    "parse_reply_line",
    "socketmap",
    "tcptable",
]
