"""Helpers shared by tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NoReturn
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


def run_with_connection(
    dsn: str, action: Callable[[asyncpg.Connection], Awaitable[object]]
) -> object:
    """Run ``action(conn)`` on a fresh connection synchronously (test set-up, e.g. a module's
    dataset written with the admin functions); returns what it returns."""

    async def run() -> object:
        conn = await asyncpg.connect(dsn)
        try:
            return await action(conn)
        finally:
            await conn.close()

    return asyncio.run(run())


def postfix_available() -> bool:
    return shutil.which("postmap") is not None or Path("/usr/sbin/postmap").exists()


def _missing(message: str) -> NoReturn:
    """Skip with the reason, except under CI (CI=true), where a missing tool is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must install it (.ci/run)")
    pytest.skip(message)


def require_tool(name: str, package: str) -> str:
    """The path of a program; skip without it, except under CI (CI=true), where it fails."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found:
        return found
    _missing(f"{name} is not installed (apt-get install {package})")


# Postfix map types that live in a package of their own on Debian (dynamicmaps.cf): a test
# that builds or reads such a table needs that package, not just Postfix.
MAP_TYPE_PACKAGES = {"pgsql": "postfix-pgsql", "lmdb": "postfix-lmdb", "cdb": "postfix-cdb"}


@functools.cache
def _postconf(option: str) -> frozenset[str]:
    """What ``postconf -m`` (map types) or ``postconf -a`` (SASL server types) lists, read
    once per run."""
    postconf = shutil.which("postconf") or "/usr/sbin/postconf"
    with tempfile.TemporaryDirectory(prefix="maplookup-postconf-") as directory:
        # postconf, like every Postfix program, refuses to run without a main.cf.
        (Path(directory) / "main.cf").write_text("compatibility_level = 3.6\n")
        result = subprocess.run(
            [postconf, "-c", directory, option], capture_output=True, text=True, check=False
        )
    if result.returncode != 0:
        raise RuntimeError(f"postconf {option} failed: {result.stderr.strip()}")
    return frozenset(result.stdout.split())


def require_postfix(*map_types: str) -> None:
    """Skip (or, under CI, fail) when Postfix, or one of the map types a test uses, is missing.

    ``map_types`` are Postfix map types beyond the built-in ones (``pgsql``, ``lmdb``); each
    is checked against ``postconf -m``, so a machine with Postfix but without, say,
    postfix-lmdb is told which package to install instead of failing inside postmap.
    """
    if not postfix_available():
        _missing("Postfix is not installed (apt-get install postfix postfix-pgsql postfix-lmdb)")
    missing = [t for t in map_types if t not in _postconf("-m")]
    if missing:
        packages = " ".join(MAP_TYPE_PACKAGES.get(t, f"postfix-{t}") for t in missing)
        _missing(
            f"Postfix map type {', '.join(missing)} is not installed (apt-get install {packages})"
        )


# Cyrus SASL's mechanism plugins, by the Debian package that ships each, and the packages
# every SMTP AUTH test needs besides (saslpasswd2 and saslpluginviewer; the sasldb plugin).
SASL_PLUGIN_PACKAGES = {"PLAIN": "libsasl2-modules", "LOGIN": "libsasl2-modules"}
SASL_PACKAGES = ("sasl2-bin", "libsasl2-modules-db")


def _sasl_plugins(option: str) -> frozenset[str]:
    """What ``saslpluginviewer -s`` (server mechanisms) or ``-a`` (auxprop plugins) lists as
    installed and properly configured: the first lines after its heading, up to the next."""
    viewer = require_tool("saslpluginviewer", "sasl2-bin")
    result = subprocess.run([viewer, option], capture_output=True, text=True, check=False)
    lines = result.stdout.splitlines()
    names: set[str] = set()
    for index, line in enumerate(lines):
        if line.startswith("Installed and properly configured"):
            for following in lines[index + 1 :]:
                if following.endswith(":") or following.startswith("List of"):
                    break
                names.update(following.split())
            break
    return frozenset(names)


def require_cyrus_sasl(*mechanisms: str) -> str:
    """Skip (or, under CI, fail) unless smtpd can authenticate with Cyrus SASL against a
    sasldb with each of ``mechanisms``; returns the path of saslpasswd2.

    Checks what the tests use: Postfix built with Cyrus SASL (``postconf -a``), saslpasswd2
    (sasl2-bin), the sasldb auxprop plugin (libsasl2-modules-db) and each mechanism's plugin
    (libsasl2-modules), as Cyrus SASL itself lists them (``saslpluginviewer``).
    """
    require_postfix()
    if "cyrus" not in _postconf("-a"):
        _missing("this Postfix is built without Cyrus SASL (postconf -a does not list cyrus)")
    saslpasswd2 = require_tool("saslpasswd2", "sasl2-bin")
    if "sasldb" not in _sasl_plugins("-a"):
        _missing(
            "Cyrus SASL's sasldb plugin is not installed (apt-get install libsasl2-modules-db)"
        )
    missing = [m for m in mechanisms if m not in _sasl_plugins("-s")]
    if missing:
        packages = " ".join(
            sorted({SASL_PLUGIN_PACKAGES.get(m, "libsasl2-modules") for m in missing})
        )
        names = ", ".join(missing)
        _missing(f"Cyrus SASL mechanism {names} is not installed (apt-get install {packages})")
    return saslpasswd2


def run_async(action: Callable[[asyncpg.Connection], Awaitable[object]], dsn: str) -> None:
    """Run ``action(connection)`` synchronously (test set-up through the admin functions)."""

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await action(conn)
        finally:
            await conn.close()

    asyncio.run(run())


def database_factory(pg_dsn: str, prefix: str) -> Callable[[], str]:
    """A function creating a fresh database with the maplookup schema on ``pg_dsn``'s server
    and returning its DSN (the ``make_database`` fixture, and the differential runner)."""
    from maplookup.db import admin

    numbers = itertools.count(1)

    def create() -> str:
        name = f"{prefix}_{os.getpid()}_{next(numbers)}"

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
