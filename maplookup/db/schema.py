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

from collections.abc import Awaitable, Callable
from importlib import resources

import asyncpg

from maplookup.address import fold

SCHEMA_VERSION = 6

_ASCII = "'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz'"

# version -> SQL bringing a database at version - 1 up to version (before schema.sql runs).
MIGRATIONS: dict[int, str] = {
    # 2: change-notification triggers for the cache, and faster lookup functions; both are
    # created or replaced by schema.sql itself, so there is no table change to make.
    2: "",
    # 3: keys folded as Postfix folds them (full Unicode case folding, not lower()), alias
    # targets with their case, quoted local parts, local account names; '@domain' only alone.
    3: f"""
ALTER TABLE maplookup.domains DROP CONSTRAINT domain_name_folded,
    ADD CONSTRAINT domain_name_folded CHECK (name = translate(name, {_ASCII}));
ALTER TABLE maplookup.mailboxes DROP CONSTRAINT mailbox_local_part_folded,
    ADD CONSTRAINT mailbox_local_part_folded CHECK (
        local_part = translate(local_part, {_ASCII}));
ALTER TABLE maplookup.aliases DROP CONSTRAINT alias_local_part_folded,
    ADD CONSTRAINT alias_local_part_folded CHECK (
        local_part = translate(local_part, {_ASCII}));
ALTER TABLE maplookup.aliases DROP CONSTRAINT alias_targets_syntax,
    ADD CONSTRAINT alias_targets_syntax CHECK (
        array_to_string(targets, '') !~ '[[:cntrl:]]'
        AND array_position(targets, '') IS NULL
        AND array_to_string(targets, E'\\n') !~ '@(\\n|$)'
        AND (cardinality(targets) = 1 OR array_to_string(targets, E'\\n') !~ '(^|\\n)@'));
DROP FUNCTION IF EXISTS maplookup.expand_targets(text[], text, text);
""",
    # 4: the maps beyond virtual hosting (issue 14): relay domains, mailbox logins (each
    # existing mailbox gets its address, as a new one does), sender grants, relay recipients
    # and transports (the new tables are created by schema.sql).
    4: """
ALTER TABLE maplookup.domains DROP CONSTRAINT IF EXISTS domains_kind_check,
    ADD CONSTRAINT domain_kind_values CHECK (kind IN ('mailbox', 'alias', 'relay'));
ALTER TABLE maplookup.mailboxes ADD COLUMN login text CONSTRAINT mailbox_login_syntax CHECK (
    login <> '' AND login !~ '[[:space:][:cntrl:],]' AND length(login) <= 320);
UPDATE maplookup.mailboxes SET login = local_part || '@' || domain
    WHERE local_part <> '' AND local_part !~ '[[:space:][:cntrl:],]';
""",
    # 5: the change log (maplookup.change_log, change_feed, the change_log_position sequence
    # and their functions; issue 15), written by the same triggers that NOTIFY.  All new
    # objects, created by schema.sql itself (IF NOT EXISTS, OR REPLACE): no table to change.
    # The log starts empty at position 0; a server reading it starts from the head anyway.
    5: "",
    # 6: the change log names the rows a change touched (change_log.records, written by the
    # record tables' triggers), so that a complete copy re-reads those rows, not whole
    # domains.  log_change and notify_domains gain a parameter: the old signatures go first
    # (schema.sql creates the new ones; a DEFAULT beside the old one would be ambiguous).
    6: """
ALTER TABLE IF EXISTS maplookup.change_log ADD COLUMN IF NOT EXISTS records text[]
    CONSTRAINT change_records_not_empty CHECK (cardinality(records) > 0);
DROP FUNCTION IF EXISTS maplookup.log_change(text[]);
DROP FUNCTION IF EXISTS maplookup.notify_domains(text[]);
""",
}


async def _refold_keys(conn: asyncpg.Connection) -> None:
    """Version 3: keys stored with lower() are stored folded as Postfix folds them.

    Only non-ASCII keys can differ (``straße`` becomes ``strasse``).  Two keys that fold to
    one are the same address to Postfix: the upgrade stops and names them.  A domain name is
    referenced by its records, so one that would change stops the upgrade with what to do.
    """
    for name in await conn.fetch("SELECT name FROM maplookup.domains WHERE name !~ '^[ -~]*$'"):
        if fold(name["name"]) != name["name"]:
            raise SchemaError(
                f"domain {name['name']!r} is {fold(name['name'])!r} under Postfix's case "
                "folding: remove it and add it again, then run `maplookup db init` once more"
            )
    for table in ("mailboxes", "aliases"):
        rows = await conn.fetch(
            f"SELECT domain, local_part FROM maplookup.{table} WHERE local_part !~ '^[ -~]*$'"
        )
        for row in rows:
            folded = fold(row["local_part"])
            if folded == row["local_part"]:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(
                        f"UPDATE maplookup.{table} SET local_part = $3"
                        " WHERE domain = $1 AND local_part = $2",
                        row["domain"],
                        row["local_part"],
                        folded,
                    )
            except asyncpg.UniqueViolationError as exc:
                raise SchemaError(
                    f"{table}: {row['local_part']}@{row['domain']} and {folded}@{row['domain']}"
                    " are one address under Postfix's case folding: remove one, then run "
                    "`maplookup db init` again"
                ) from exc


# version -> Python run after that version's SQL (data changes SQL alone cannot make).
DATA_MIGRATIONS: dict[int, Callable[[asyncpg.Connection], Awaitable[None]]] = {
    3: _refold_keys,
}

# Serialises concurrent `db init` runs ("mapl").
SCHEMA_LOCK_ID = 0x6D61706C


class SchemaError(Exception):
    """The database's schema cannot be used or upgraded; the message says what to do."""


def schema_sql() -> str:
    return resources.files("maplookup.db").joinpath("schema.sql").read_text(encoding="utf-8")


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
                if version in DATA_MIGRATIONS:
                    await DATA_MIGRATIONS[version](conn)
        await conn.execute(schema_sql())
        await conn.execute("UPDATE maplookup.schema_version SET version = $1", SCHEMA_VERSION)
    return before, SCHEMA_VERSION
