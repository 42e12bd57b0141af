"""Helpers shared by tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest


def dsn_for_database(dsn: str, database: str) -> str:
    """The same server and user, another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


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


def require_tool(name: str, package: str) -> str:
    """The path of a program; skip without it, except under CI (CI=true), where it fails."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found:
        return found
    message = f"{name} is not installed (apt-get install {package})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must install it (.ci/run)")
    pytest.skip(message)


def require_postfix() -> None:
    """Skip (or, under CI, fail) when Postfix's binaries are missing."""
    if postfix_available():
        return
    message = "Postfix is not installed (apt-get install postfix postfix-pgsql)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must install it (.ci/run)")
    pytest.skip(message)


def run_async(action: Callable[[asyncpg.Connection], Awaitable[object]], dsn: str) -> None:
    """Run ``action(connection)`` synchronously (test set-up through the admin functions)."""

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await action(conn)
        finally:
            await conn.close()

    asyncio.run(run())
