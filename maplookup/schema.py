"""The database schema's version, and upgrading an older one in place.

``schema.sql`` is the whole current schema and is idempotent (CREATE ... IF NOT EXISTS for
tables, CREATE OR REPLACE for functions and triggers), so applying it brings functions and
triggers up to date.  What it cannot do (change an existing table) lives in ``MIGRATIONS``:
the SQL that takes a database from version N-1 to N, run in order before ``schema.sql``, all
in one transaction, so an upgrade either happens completely or not at all.

The server refuses to start on a version it does not know, with a message that says what to
run, rather than answering from a schema whose semantics may differ.
"""

from __future__ import annotations

from importlib import resources

import asyncpg

SCHEMA_VERSION = 2

# version -> SQL bringing a database at version - 1 up to version (before schema.sql runs).
MIGRATIONS: dict[int, str] = {
    # 2: change-notification triggers for the cache, and faster lookup functions; both are
    # created or replaced by schema.sql itself, so there is no table change to make.
    2: "",
}

# Serialises concurrent `db init` runs ("mapl").
SCHEMA_LOCK_ID = 0x6D61706C


class SchemaError(Exception):
    """The database's schema cannot be used or upgraded; the message says what to do."""


def schema_sql() -> str:
    return resources.files("maplookup").joinpath("schema.sql").read_text(encoding="utf-8")


async def installed_version(conn: asyncpg.Connection) -> int | None:
    """The schema version in the database, or None when there is no maplookup schema."""
    present = await conn.fetchval("SELECT to_regclass('maplookup.schema_version') IS NOT NULL")
    if not present:
        return None
    version: int | None = await conn.fetchval("SELECT version FROM maplookup.schema_version")
    return version


def check_usable(version: int | None) -> None:
    """Raise SchemaError unless the server can answer from a schema at ``version``."""
    if version is None:
        raise SchemaError(
            "the database has no maplookup schema: run `maplookup db init --dsn ...` first"
        )
    if version < SCHEMA_VERSION:
        raise SchemaError(
            f"the database schema is version {version}, this maplookup needs {SCHEMA_VERSION}:"
            " run `maplookup db init --dsn ...` to upgrade it in place"
        )
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"the database schema is version {version}, newer than this maplookup knows"
            f" ({SCHEMA_VERSION}): upgrade maplookup"
        )


async def upgrade(conn: asyncpg.Connection) -> tuple[int | None, int]:
    """Create or upgrade the schema in one transaction; returns (version before, after)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_ID)
        await conn.execute("SET LOCAL client_min_messages = warning")
        before = await installed_version(conn)
        if before is not None and before > SCHEMA_VERSION:
            check_usable(before)
        if before is not None:
            for version in range(before + 1, SCHEMA_VERSION + 1):
                if MIGRATIONS[version]:
                    await conn.execute(MIGRATIONS[version])
        await conn.execute(schema_sql())
        await conn.execute("UPDATE maplookup.schema_version SET version = $1", SCHEMA_VERSION)
    return before, SCHEMA_VERSION
