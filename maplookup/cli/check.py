"""``maplookup check-config``: is this configuration usable, and does the database fit it?"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import asyncpg

from maplookup.cli.common import EXIT_ERROR, EXIT_OK
from maplookup.config import ConfigError, Settings, redact_dsn
from maplookup.config_load import load_settings
from maplookup.db import schema
from maplookup.embedded import default_state_dir, read_running_dsn


def add_commands(commands: Any) -> None:
    parser = commands.add_parser(
        "check-config",
        help="validate a config file, then test the database and its schema",
        description=(
            "Validate the configuration (file, MAPLOOKUP_* environment): unknown keys and "
            "wrong types are reported with the file's line.  Then connect to the database "
            "and check the schema version.  Exit 0 when everything is usable, 1 otherwise."
        ),
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="the file `serve` will read")
    parser.add_argument("--dsn", help="check this database instead of the configured one")
    parser.set_defaults(func=cmd_check_config)


def _id(value: int | None) -> str:
    return "none" if value is None else str(value)


def _describe(settings: Settings) -> list[str]:
    listen = settings.listen
    endpoints = [f"socketmap on {e}" for e in listen.socketmap]
    if listen.socketmap_unix:
        endpoints.append(
            f"socketmap on unix:{listen.socketmap_unix} (mode {listen.socketmap_unix_mode:o}"
            f", group {listen.socketmap_unix_group or 'unchanged'})"
        )
    endpoints += [f"tcp_table {m.value} on {e}" for m, e in listen.tcp_table.items()]
    cache = settings.cache
    limits = settings.limits
    return [
        "listen: " + ("; ".join(endpoints) or "NOTHING (no listener configured)"),
        f"lookup: recipient_delimiter {settings.lookup.recipient_delimiter!r}, default uid "
        f"{_id(settings.lookup.default_uid)}, default gid {_id(settings.lookup.default_gid)}, "
        f"smtputf8_enable {'yes' if settings.lookup.smtputf8_enable else 'no'}",
        (
            f"cache: {cache.max_entries} entries, TTL {cache.positive_ttl_s} s "
            f"(negative {cache.negative_ttl_s} s), stale answers up to {cache.max_stale_s} s"
            if cache.max_entries
            else "cache: off (every lookup queries PostgreSQL)"
        ),
        f"limits: {limits.max_connections} connections, requests up to "
        f"{limits.max_request_bytes} bytes, idle timeout {limits.idle_timeout_s} s",
    ]


async def _check_database(dsn: str, timeout_s: float) -> list[tuple[bool, str]]:
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout_s)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        return [(False, f"connection: FAILED: {exc}")]
    try:
        server_version = await conn.fetchval("SHOW server_version")
        results = [(True, f"connection: OK (PostgreSQL {server_version})")]
        version = await schema.installed_version(conn)
        try:
            schema.check_usable(version)
        except schema.SchemaError as exc:
            results.append((False, f"schema: {exc}"))
        else:
            results.append((True, f"schema: version {version} (current)"))
        return results
    finally:
        await conn.close()


def cmd_check_config(args: argparse.Namespace) -> int:
    overrides = {"database": {"dsn": args.dsn}} if args.dsn else None
    try:
        settings = load_settings(args.config, overrides)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}")
        return EXIT_ERROR
    print(f"config: {args.config or '(no file: defaults and environment)'}: valid")
    for line in _describe(settings):
        print(line)
    ok = bool(
        settings.listen.socketmap or settings.listen.socketmap_unix or settings.listen.tcp_table
    )
    if settings.database.dsn is None:
        # The embedded cluster: check it when a server runs it (what the admin commands use).
        state_dir = settings.embedded.state_dir or default_state_dir()
        running = read_running_dsn(state_dir)
        if running is None:
            print(
                "database: none configured: `serve` would start its embedded PostgreSQL in "
                f"{state_dir} (not running now, so not checked)"
            )
            return EXIT_OK if ok else EXIT_ERROR
        dsn = running
        print(f"database: the embedded cluster in {state_dir}, started by `maplookup serve`")
    else:
        dsn = settings.database.dsn.get_secret_value()
        print(f"database: {redact_dsn(dsn)}")
    for good, line in asyncio.run(_check_database(dsn, settings.database.connect_timeout_s)):
        print(f"  {line}")
        ok = ok and good
    return EXIT_OK if ok else EXIT_ERROR
