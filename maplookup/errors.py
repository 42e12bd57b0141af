"""maplookup's own error types that cross layers.

``DatabaseError`` is how "the database could not answer" reaches the lookup layer, which turns
it into TEMP (or a cached answer), never NOTFOUND: defined here, below both, so that the lookup
layer needs nothing from the database layer (``maplookup.db.errors`` turns asyncpg's errors
into it).
"""

from __future__ import annotations


class DatabaseError(Exception):
    """The database could not give an answer; the lookup must answer TEMP, never NOTFOUND."""


class DatabaseTimeout(DatabaseError):
    """The database did not answer within the query timeout."""
