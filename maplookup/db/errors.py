"""What "the database could not answer" looks like to the rest of maplookup.

Every failure to get an answer (connection refused or lost, timeout, an error from
PostgreSQL, an asyncpg internal error) becomes a DatabaseError, which a lookup turns into TEMP
(or a cached answer), never NOTFOUND and never a crash.
"""

from __future__ import annotations

import logging

import asyncpg

from maplookup.errors import DatabaseError, DatabaseTimeout

log = logging.getLogger(__name__)

__all__ = ["CLIENT_ERRORS", "DatabaseError", "DatabaseTimeout", "as_database_error"]

# What asyncpg raises when the database cannot answer (anything else is logged as unexpected).
CLIENT_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


def as_database_error(exc: BaseException) -> DatabaseError:
    """Whatever the client raised, as the DatabaseError a lookup turns into TEMP."""
    if isinstance(exc, DatabaseError):
        return exc
    if not isinstance(exc, CLIENT_ERRORS):
        # Anything else from asyncpg (e.g. InternalClientError "cannot switch to state" on a
        # connection the server just terminated) is still "the database could not answer".
        log.warning("unexpected database client error: %r", exc)
    return DatabaseError(f"{type(exc).__name__}: {exc}")
