"""Exceptions raised by the sans-IO protocol codecs.

The split mirrors h11: a *remote* error means the peer broke the protocol and
the only safe reaction is to drop that connection (Postfix reconnects and
retries); a *local* error means our own code drove the codec wrongly, which is
a bug to fix, not a peer to blame.
"""

from __future__ import annotations

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """Base class, so callers can catch both kinds with one clause when they
    only want to log and close."""

    reason: str

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are malformed, oversized or truncated.

    There is no way to resynchronise a netstring or line stream after garbage,
    so the connection must be closed; the codec refuses further use.
    """


class LocalProtocolError(ProtocolError):
    """The caller misused the codec (data after end of stream, use after an
    error, an unencodable request)."""
