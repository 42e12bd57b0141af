"""What "the database could not answer" looks like to the rest of maplookup.

Every failure to get an answer (connection refused or lost, timeout, an error from
PostgreSQL, an asyncpg internal error) becomes a DatabaseError, which a lookup turns into TEMP
(or a cached answer), never NOTFOUND and never a crash.
"""

from __future__ import annotations

import logging
import re

import asyncpg

from maplookup.errors import DatabaseError, DatabaseTimeout

log = logging.getLogger(__name__)

__all__ = ["CLIENT_ERRORS", "DatabaseError", "DatabaseTimeout", "NoServer", "as_database_error"]


class NoServer(ConnectionError):
    """No server of a host list suits (``servers.connect_listed``); the message names each
    one and why it was passed over, on one line.  An OSError: "cannot connect", like a
    refused connection, wherever that is handled."""


# What asyncpg raises when the database cannot answer (anything else is logged as unexpected).
CLIENT_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)

# asyncio's "Connect call failed ('127.0.0.1', 5432)": the peer it names.
_PEER = re.compile(r"\('([^']*)', (\d+)")


def as_database_error(exc: BaseException) -> DatabaseError:
    """Whatever the client raised, as the DatabaseError a lookup turns into TEMP."""
    if isinstance(exc, DatabaseError):
        return exc
    if not isinstance(exc, CLIENT_ERRORS):
        # Anything else from asyncpg (e.g. InternalClientError "cannot switch to state" on a
        # connection the server just terminated) is still "the database could not answer".
        log.warning("unexpected database client error: %r", exc)
    return DatabaseError(describe(exc))


def describe(exc: BaseException) -> str:
    """A failure in words a mail admin reads in Postfix's log (the TEMP reason), not a repr.

    ``connection refused (127.0.0.1:5432)`` rather than ``ConnectionRefusedError: [Errno 111]
    Connect call failed ('127.0.0.1', 5432)``; PostgreSQL's own message with its SQLSTATE.
    """
    if isinstance(exc, NoServer):
        return str(exc)
    if isinstance(exc, asyncpg.TargetServerAttributeNotMatched):
        return (
            "no server reached is what target_session_attrs asks for (a standby where "
            "read-write is needed, or the reverse)"
        )
    if isinstance(exc, asyncpg.ConnectionDoesNotExistError):
        return "the connection to PostgreSQL was lost"
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None)
        return f"PostgreSQL: {exc}" + (f" (SQLSTATE {state})" if state else "")
    if isinstance(exc, OSError):
        if isinstance(exc, ConnectionRefusedError):
            what = "connection refused"
        else:
            what = (exc.strerror or str(exc) or type(exc).__name__).lower()
        peer = _PEER.search(str(exc))
        return f"{what} ({peer.group(1)}:{peer.group(2)})" if peer else what
    return f"{type(exc).__name__}: {exc}"
