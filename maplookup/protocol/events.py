"""Protocol-neutral events shared by the socketmap and tcp_table codecs.

Both Postfix lookup protocols reduce to the same exchange -- one key in, one
status plus text out -- so the server and lookup layers deal only in
:class:`Request` and :class:`Reply` and never see wire formats.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "CLOSED",
    "NEED_DATA",
    "Closed",
    "Event",
    "NeedData",
    "Reply",
    "Request",
    "Status",
]


class Status(enum.Enum):
    """Reply status words, spelled as socketmap_table(5) spells them on the wire."""

    OK = "OK"
    NOTFOUND = "NOTFOUND"
    TEMP = "TEMP"
    TIMEOUT = "TIMEOUT"
    PERM = "PERM"


@dataclass(frozen=True, slots=True)
class Request:
    """One lookup asked for by Postfix.

    ``map_name`` is what socketmap sent, or what the tcp_table listener was
    configured with (tcp_table carries no map name). ``key`` stays bytes
    because Postfix keys are not guaranteed to be UTF-8.
    """

    map_name: bytes
    key: bytes


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to one :class:`Request`: the value for OK, a reason otherwise."""

    status: Status
    value: str = ""

    @classmethod
    def ok(cls, value: str) -> Reply:
        return cls(Status.OK, value)

    @classmethod
    def notfound(cls, reason: str = "") -> Reply:
        return cls(Status.NOTFOUND, reason)

    @classmethod
    def temp(cls, reason: str) -> Reply:
        return cls(Status.TEMP, reason)

    @classmethod
    def timeout(cls, reason: str) -> Reply:
        return cls(Status.TIMEOUT, reason)

    @classmethod
    def perm(cls, reason: str) -> Reply:
        return cls(Status.PERM, reason)


# Single-member enums make the sentinels real singletons (they survive copy and
# pickle) and let mypy narrow ``event is NEED_DATA`` to exclude the type.
class NeedData(enum.Enum):
    """Type of :data:`NEED_DATA`: no complete message is buffered yet."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.name


class Closed(enum.Enum):
    """Type of :data:`CLOSED`: the peer ended the stream at a message boundary."""

    CLOSED = "CLOSED"

    def __repr__(self) -> str:
        return self.name


NEED_DATA: Final = NeedData.NEED_DATA
CLOSED: Final = Closed.CLOSED

Event = Request | NeedData | Closed

_T = TypeVar("_T")


class _BufferedReceiver(ABC, Generic[_T]):
    """Buffering, end-of-stream and error bookkeeping common to every decoder.

    Subclasses only implement :meth:`_parse`; keeping the state rules in one
    place is what guarantees both protocols honour the same contract.
    """

    _what: str = "message"

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False
        self._errored = False

    def receive_data(self, data: bytes) -> None:
        """Append bytes read from the peer; ``b""`` signals end of stream."""
        if self._errored:
            raise LocalProtocolError("receive_data() called after a protocol error")
        if not data:
            self._eof = True
        elif self._eof:
            raise LocalProtocolError("receive_data() called with data after end of stream")
        else:
            self._buf += data

    @property
    def in_message(self) -> bool:
        """True while part of a message is buffered.

        The server uses it to choose between its idle timeout (between requests) and its
        read timeout (a request started and not yet complete).
        """
        return bool(self._buf)

    def _next(self) -> _T | NeedData | Closed:
        self._check_usable()
        if not self._buf:
            # The common case between requests; skips the parser entirely.
            return CLOSED if self._eof else NEED_DATA
        try:
            item = self._parse()
            if item is not None:
                return item
            if not self._eof:
                return NEED_DATA
            if not self._buf:
                return CLOSED
            raise RemoteProtocolError(
                f"truncated {self._what}: end of stream with {len(self._buf)} bytes pending"
            )
        except RemoteProtocolError:
            self._errored = True
            raise

    def _check_usable(self) -> None:
        if self._errored:
            raise LocalProtocolError("codec used after a protocol error")

    @abstractmethod
    def _parse(self) -> _T | None:
        """Consume and return one complete message from ``self._buf``, return
        None if more bytes are needed, or raise RemoteProtocolError as soon as
        the buffered prefix cannot start a valid message."""


# Reply text is str for the lookup layer's convenience, but values may have
# come from bytes decoded with surrogateescape (Postfix keys are not always
# UTF-8); encoding the same way hands those bytes back unchanged.


def _encode_value(text: str) -> bytes | None:
    """UTF-8 bytes of a reply value, or None if it holds unpairable surrogates."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None


def _encode_reason(text: str) -> bytes:
    """UTF-8 bytes of diagnostic text; never fails, since a reason only gets logged."""
    encoded = _encode_value(text)
    return text.encode("utf-8", "backslashreplace") if encoded is None else encoded


def _decode_text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")
