"""``maplookup check-config``: is this configuration usable, and does the database fit it?"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from maplookup.cli.common import EXIT_ERROR, EXIT_OK
from maplookup.config import ConfigError, Settings, redact_dsn
from maplookup.config_load import load_settings
from maplookup.db import schema
from maplookup.db.errors import describe
from maplookup.db.server_role import ServerRole, probe, single_hosts
from maplookup.db.servers import with_target
from maplookup.embedded import default_state_dir, read_running_dsn


def add_commands(commands: Any) -> None:
    parser = commands.add_parser(
        "check-config",
        help="validate a config file, then test the database and its schema",
        description=(
            "Validate the configuration (file, MAPLOOKUP_* environment): unknown keys and "
            "wrong types are reported with the file's line.  Then connect to the database "
            "and check the schema version, and say what the connections reach: primary or "
            "hot standby (with its replay lag), whether LISTEN works there, which server the "
            "admin commands write to, each host of a host list, and a connection pooler in "
            "between.  Exit 0 when everything is usable, 1 otherwise."
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


_CONNECT_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.TargetServerAttributeNotMatched,  # no host of the list is, e.g., read-write
    TimeoutError,
)


def _role_text(role: ServerRole, poll_interval_s: float) -> str:
    """``10.0.0.2:5432, a hot standby (...); LISTEN refused: ...``"""
    if not role.standby:
        text = f"{role.address}, a primary"
    else:
        replay = []
        if role.wal_receiver is not None:
            replay.append(role.wal_receiver)
        else:
            replay.append("NOT receiving WAL (no wal receiver: replication is down)")
        if role.replay_backlog_bytes is not None:
            replay.append(f"{role.replay_backlog_bytes} bytes received but not replayed")
        if role.replay_lag_s is not None:
            replay.append(f"last replayed commit {role.replay_lag_s:.1f} s ago")
        text = f"{role.address}, a hot standby ({'; '.join(replay)})"
    if role.listen_works:
        return text + "; LISTEN works: changes are seen within milliseconds"
    return (
        text + f"; LISTEN refused: the change feed polls every {poll_interval_s} s "
        "(cache.change_feed_poll_interval_s)"
    )


async def _probe(dsn: str, timeout_s: float) -> ServerRole | str:
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout_s)
    except _CONNECT_ERRORS as exc:
        return describe(exc)
    try:
        return await probe(conn)
    finally:
        await conn.close()


async def _check_database(
    dsn: str, timeout_s: float, poll_interval_s: float = 0.2
) -> list[tuple[bool, str]]:
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout_s)
    except _CONNECT_ERRORS as exc:
        return [(False, f"connection: FAILED: {describe(exc)}")]
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
        role = await probe(conn)
    finally:
        await conn.close()
    results.append((True, "lookups reach: " + _role_text(role, poll_interval_s)))
    if role.feed_position is not None:
        results.append((True, f"change feed: at position {role.feed_position}"))
    if role.pooler_suspected:
        # A warning, not a failure: session pooling works; transaction pooling does not.
        results.append(
            (
                True,
                "WARNING: a connection pooler (pgbouncer?) answers instead of PostgreSQL: in "
                "transaction mode LISTEN and asyncpg's prepared statements break; connect "
                "maplookup to PostgreSQL directly (or use session pooling)",
            )
        )
    writer = await _probe(with_target(dsn, "read-write"), timeout_s)
    if isinstance(writer, str):
        # A warning: `serve` only reads, and a host whose list names only its standby is a
        # valid MX host; only the admin commands need the primary.
        results.append(
            (
                True,
                f"WARNING: admin commands cannot write through this dsn: no primary reachable "
                f"({writer}); give them a dsn that names the primary (--dsn)",
            )
        )
    else:
        results.append((True, f"admin writes reach: {writer.address}, the primary"))
    hosts = single_hosts(dsn)
    if len(hosts) > 1:
        for host_dsn in hosts:
            each = await _probe(host_dsn, timeout_s)
            host = urlsplit(host_dsn).netloc.rpartition("@")[2]
            text = (
                f"UNREACHABLE ({each})"
                if isinstance(each, str)
                else ("standby" if each.standby else "primary")
            )
            results.append((True, f"host {host}: {text}"))
    return results


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
    if "listen_keepalive_s" in settings.cache.model_fields_set:
        print(
            "warning: cache.listen_keepalive_s is no longer used (the change feed checks its "
            "connection every cache.change_feed_poll_interval_s): remove it"
        )
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
    checks = _check_database(
        dsn, settings.database.connect_timeout_s, settings.cache.change_feed_poll_interval_s
    )
    for good, line in asyncio.run(checks):
        print(f"  {line}")
        ok = ok and good
    return EXIT_OK if ok else EXIT_ERROR
