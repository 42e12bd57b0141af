"""Shared fixtures: a real PostgreSQL for the whole run, fresh databases, the Postfix check.

Tests never skip for want of a database: they start a throwaway cluster with the same module
``maplookup serve`` uses (or use MAPLOOKUP_TEST_DSN).  Postfix-dependent tests skip with a
reason when Postfix is not installed, except under CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from maplookup import admin
from maplookup.embedded import EmbeddedPostgres


def dsn_for_database(dsn: str, database: str) -> str:
    """The same server and user, another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """DSN of a PostgreSQL server that lets us create databases."""
    external = os.environ.get("MAPLOOKUP_TEST_DSN")
    if external:
        yield external
        return
    state_dir = Path(tempfile.mkdtemp(prefix="maplookup-test-pg-"))
    state_dir.chmod(0o755)  # the cluster runs as an unprivileged user when we are root
    cluster = EmbeddedPostgres(state_dir=state_dir, fast_unsafe=True)
    try:
        yield cluster.start()
    finally:
        cluster.stop(mode="immediate")
        shutil.rmtree(state_dir, ignore_errors=True)


_database_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def make_database(pg_dsn: str) -> Callable[[], str]:
    """Create an empty database with the maplookup schema; returns its DSN."""

    def create() -> str:
        name = f"maplookup_test_{os.getpid()}_{next(_database_numbers)}"

        async def run() -> None:
            conn = await asyncpg.connect(pg_dsn)
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()
            conn = await asyncpg.connect(dsn_for_database(pg_dsn, name))
            try:
                await admin.init_schema(conn)
            finally:
                await conn.close()

        asyncio.run(run())
        return dsn_for_database(pg_dsn, name)

    return create


def run_sql(dsn: str, *statements: str) -> None:
    """Run SQL statements synchronously (test set-up)."""

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


def postfix_available() -> bool:
    return shutil.which("postmap") is not None or Path("/usr/sbin/postmap").exists()


def require_postfix() -> None:
    """Skip (or, under CI, fail) when Postfix's binaries are missing."""
    if postfix_available():
        return
    message = "Postfix is not installed (apt-get install postfix postfix-pgsql)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must install it (.ci/run)")
    pytest.skip(message)
