"""Schema versions: created, upgraded in place from version 1, refused when unknown."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
import trio

from maplookup.config_load import load_settings
from maplookup.db import admin, schema
from maplookup.db.admin_input import AdminError
from maplookup.serve.service import StartupError, serve
from tests.helpers import dsn_for_database, run_sql

V1_SQL = (Path(__file__).parents[1] / "data" / "schema_v1.sql").read_text()
# The last released schema before version 6 (schema.sql as of issue 15), the upgrade most
# databases take next.
V5_SQL = (Path(__file__).parents[1] / "data" / "schema_v5.sql").read_text()


def test_schema_sql_declares_the_version_the_code_knows() -> None:
    inserted = re.search(
        r"INSERT INTO maplookup.schema_version \(version\) VALUES \((\d+)\)", schema.schema_sql()
    )
    assert inserted is not None
    assert int(inserted.group(1)) == schema.SCHEMA_VERSION
    assert set(schema.MIGRATIONS) == set(range(2, schema.SCHEMA_VERSION + 1))


@pytest.fixture
def empty_dsn(pg_dsn: str) -> str:
    name = f"maplookup_schema_{uuid.uuid4().hex}"
    run_sql(pg_dsn, f'CREATE DATABASE "{name}"')
    return dsn_for_database(pg_dsn, name)


def _fetch(dsn: str, query: str) -> object:
    async def run() -> object:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval(query)
        finally:
            await conn.close()

    return asyncio.run(run())


def _init(dsn: str) -> tuple[int | None, int]:
    async def run() -> tuple[int | None, int]:
        conn = await asyncpg.connect(dsn)
        try:
            return await admin.init_schema(conn)
        finally:
            await conn.close()

    return asyncio.run(run())


def test_fresh_database_gets_the_current_version(empty_dsn: str) -> None:
    assert _init(empty_dsn) == (None, schema.SCHEMA_VERSION)
    assert _init(empty_dsn) == (schema.SCHEMA_VERSION, schema.SCHEMA_VERSION)


def test_version_1_is_upgraded_in_place_keeping_data(empty_dsn: str) -> None:
    run_sql(
        empty_dsn,
        V1_SQL,
        "INSERT INTO maplookup.domains (name, kind) VALUES ('example.com', 'mailbox')",
        "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
        " VALUES ('example.com', 'user', 'example.com/user/')",
    )
    assert _fetch(empty_dsn, "SELECT version FROM maplookup.schema_version") == 1
    assert _init(empty_dsn) == (1, schema.SCHEMA_VERSION)
    assert _fetch(empty_dsn, "SELECT version FROM maplookup.schema_version") == (
        schema.SCHEMA_VERSION
    )
    assert _fetch(empty_dsn, "SELECT maplookup.vmailbox('User+x@example.com')") == (
        "example.com/user/"
    )
    # Version 4: an existing mailbox's login is its address, so it owns it as a sender.
    assert _fetch(empty_dsn, "SELECT maplookup.sender_login('User+x@example.com')") == (
        "user@example.com"
    )
    # Version 2's change notification is in place.
    assert (
        _fetch(
            empty_dsn,
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'mailboxes_notify_insert'",
        )
        == 1
    )
    # Version 4's change log starts empty and records the next change.
    assert _fetch(empty_dsn, "SELECT maplookup.change_log_head()") == 0
    run_sql(empty_dsn, "UPDATE maplookup.mailboxes SET path = 'example.com/u2/'")
    assert _fetch(empty_dsn, "SELECT domains FROM maplookup.changes_after(0, 10)") == [
        "example.com"
    ]


def test_newer_schema_is_refused_by_db_init(empty_dsn: str) -> None:
    _init(empty_dsn)
    run_sql(empty_dsn, "UPDATE maplookup.schema_version SET version = 99")
    with pytest.raises(AdminError, match="newer than this maplookup"):
        _init(empty_dsn)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("none", "no maplookup schema"),
        ("v1", "run `maplookup db init"),
        ("v99", "upgrade maplookup"),
    ],
)
async def test_serve_refuses_a_schema_it_does_not_know(
    empty_dsn: str, setup: str, message: str
) -> None:
    if setup == "v1":
        await trio.to_thread.run_sync(run_sql, empty_dsn, V1_SQL)
    elif setup == "v99":
        await trio.to_thread.run_sync(_init, empty_dsn)
        await trio.to_thread.run_sync(
            run_sql, empty_dsn, "UPDATE maplookup.schema_version SET version = 99"
        )
    settings = load_settings(
        overrides={"listen": {"socketmap": ["127.0.0.1:0"]}, "database": {"dsn": empty_dsn}},
        environ={},
    )
    with pytest.raises(StartupError, match=re.escape(message)):
        await serve(settings, empty_dsn)


def test_cli_db_init_reports_the_upgrade(
    empty_dsn: str, capsys: pytest.CaptureFixture[str], make_database: Callable[[], str]
) -> None:
    from maplookup.cli.main import main

    run_sql(empty_dsn, V1_SQL)
    assert main(["db", "init", "--dsn", empty_dsn]) == 0
    assert f"upgraded from version 1 to {schema.SCHEMA_VERSION}" in capsys.readouterr().out
    assert main(["db", "init", "--dsn", empty_dsn]) == 0
    assert "is current" in capsys.readouterr().out


_SHAPE = """
SELECT string_agg(line, E'\\n' ORDER BY line) FROM (
    SELECT format('column %s.%s %s null=%s default=%s', table_name, column_name, data_type,
                  is_nullable, column_default) AS line
    FROM information_schema.columns WHERE table_schema = 'maplookup'
    UNION ALL
    SELECT format('constraint %s.%s %s', conrelid::regclass, conname,
                  pg_get_constraintdef(oid))
    FROM pg_constraint WHERE connamespace = 'maplookup'::regnamespace
    UNION ALL
    SELECT format('trigger %s.%s', tgrelid::regclass, tgname)
    FROM pg_trigger WHERE NOT tgisinternal
      AND tgrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'maplookup'::regnamespace)
    UNION ALL
    SELECT format('function %s(%s)', proname, pg_get_function_identity_arguments(oid))
    FROM pg_proc WHERE pronamespace = 'maplookup'::regnamespace
) AS shape
"""


@pytest.mark.parametrize("old_sql", [V1_SQL, V5_SQL], ids=["from-v1", "from-v5"])
def test_an_upgraded_schema_has_the_shape_of_a_fresh_one(
    pg_dsn: str, empty_dsn: str, old_sql: str
) -> None:
    """Every migration must leave the tables exactly as schema.sql creates them (columns,
    constraints by name, triggers) and no function of an old signature beside the new one,
    or the next migration's ALTERs meet a different table (and a call is ambiguous)."""
    run_sql(empty_dsn, old_sql)
    _init(empty_dsn)
    fresh_name = f"maplookup_schema_{uuid.uuid4().hex}"
    run_sql(pg_dsn, f'CREATE DATABASE "{fresh_name}"')
    fresh = dsn_for_database(pg_dsn, fresh_name)
    _init(fresh)
    upgraded_shape = _fetch(empty_dsn, _SHAPE)
    assert isinstance(upgraded_shape, str)
    assert upgraded_shape == _fetch(fresh, _SHAPE)
