"""What every ``maplookup`` sub-command shares: exit codes, errors, finding the database.

Sub-commands live in their own modules (``main`` for the core ones, one module per group for the
rest) and register themselves on the parser; this module is what they all import.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import asyncpg

from maplookup.config import ConfigError, Settings
from maplookup.config_load import load_settings
from maplookup.db.admin_input import AdminError
from maplookup.db.servers import NoServer, connect_listed

EXIT_OK = 0
EXIT_NOTFOUND = 1
EXIT_TEMP = 2
EXIT_PERM = 3
EXIT_ERROR = 1
EXIT_USAGE = 3


class Parser(argparse.ArgumentParser):
    """argparse with exit code 3 for bad usage (2 means "temporary error" for `query`)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    print(f"maplookup: {message}", file=sys.stderr)
    raise SystemExit(code)


# -- database access for admin commands --------------------------------------------------------


def resolve_dsn(args: argparse.Namespace) -> str:
    """--dsn, else MAPLOOKUP_DSN, else the config file, else the embedded cluster if running."""
    if getattr(args, "dsn", None):
        return str(args.dsn)
    # Through the settings, not os.environ directly: MAPLOOKUP_DSN is read there, and a
    # misspelt MAPLOOKUP_* variable is refused there, for admin commands as for serve.
    settings = load(args)
    if settings.database.dsn is not None:
        return settings.database.dsn.get_secret_value()
    from maplookup.embedded import default_state_dir, read_running_dsn

    state_dir = args.state_dir or settings.embedded.state_dir or default_state_dir()
    dsn = read_running_dsn(state_dir)
    if dsn is None:
        fail(
            "no database: give --dsn or set MAPLOOKUP_DSN "
            f"(or start `maplookup serve`, whose embedded cluster lives in {state_dir})"
        )
    return dsn


@dataclass(frozen=True, slots=True)
class ServerIds:
    """The default uid/gid the server applies, as far as an admin command can tell.

    ``source`` says where they were learnt (for messages); ``known`` is False when nothing
    told us, i.e. the server may still have defaults of its own (flags, its own config).
    """

    uid: int | None
    gid: int | None
    source: str
    known: bool


def server_ids(args: argparse.Namespace) -> ServerIds:
    """lookup.default_uid/gid of the server, for warnings and generated configuration.

    The server running on the embedded cluster this command uses publishes its ids in the
    state directory (it may have been started with flags, or as ``--demo``): that is the
    truth.  Otherwise the config file (``--config``) and environment say what a server
    reading them would use.  Never fails: a config that cannot be read only means "unknown".
    """
    try:
        settings = load_settings(getattr(args, "config", None))
    except ConfigError:
        settings = None
    uses_embedded = not getattr(args, "dsn", None) and (
        settings is None or settings.database.dsn is None
    )
    if uses_embedded:
        from maplookup.embedded import default_state_dir, read_server_ids

        state_dir = (
            getattr(args, "state_dir", None)
            or (settings.embedded.state_dir if settings is not None else None)
            or default_state_dir()
        )
        published = read_server_ids(state_dir)
        if published is not None:
            return ServerIds(*published, f"the server using {state_dir}", known=True)
    if settings is None:
        return ServerIds(None, None, "the server", known=False)
    lookup = settings.lookup
    config = getattr(args, "config", None)
    return ServerIds(
        lookup.default_uid,
        lookup.default_gid,
        f"{config}" if config is not None else "the server",
        known=config is not None,
    )


def warn(message: str) -> None:
    """A non-fatal problem the admin should fix: one line on stderr, exit status unchanged."""
    print(f"maplookup: warning: {message}", file=sys.stderr)


def load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Settings:
    try:
        return load_settings(getattr(args, "config", None), overrides)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


# Per server of a host list: a dead one costs this much before the next is tried.
ADMIN_CONNECT_TIMEOUT_S = 10.0


def with_connection(
    args: argparse.Namespace,
    action: Callable[[asyncpg.Connection], Awaitable[None]],
    *,
    writes: bool,
) -> int:
    """Run ``action`` on a connection to the configured database; one error line on failure.

    ``writes``: the command changes the maps, so it must reach the primary whatever the DSN
    prefers: ``target_session_attrs=read-write`` is forced, and a host list that names a
    standby first (an MX host's own DSN) still writes to the primary, after a failover to
    the promoted one.  Read-only commands use the DSN's own preference (a local standby).
    """
    dsn = resolve_dsn(args)

    async def run() -> None:
        try:
            conn, _reached = await connect_listed(
                dsn,
                target="read-write" if writes else None,
                timeout_s=ADMIN_CONNECT_TIMEOUT_S,
            )
        except NoServer as exc:
            raise AdminError(f"cannot connect to the database: {exc}") from exc
        try:
            await action(conn)
        finally:
            await conn.close()

    try:
        asyncio.run(run())
    except AdminError as exc:
        fail(str(exc))
    except asyncpg.UndefinedFunctionError as exc:
        fail(f"the database schema is missing or old: run `maplookup db init` ({exc})")
    except asyncpg.PostgresError as exc:
        fail(f"database error: {exc}")
    return EXIT_OK


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def print_table(rows: Sequence[asyncpg.Record], columns: Sequence[str]) -> None:
    cells = [[_cell(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def add_database_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn",
        help="PostgreSQL connection string (default: $MAPLOOKUP_DSN, else the embedded cluster "
        "started by `maplookup serve`)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="the TOML config file `serve` reads: its [database] dsn and [lookup] settings "
        "apply here too",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="state directory of the embedded PostgreSQL to use when no dsn is given",
    )
