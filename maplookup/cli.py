"""The ``maplookup`` command line: serve, query, database set-up and data administration.

Exit codes are part of the contract (scripts and tests rely on them):
``query`` exits 0 found, 1 not found, 2 temporary error, 3 permanent error or bad usage;
admin commands exit 0 on success and 1 with a one-line error on stderr otherwise; bad usage
exits 3 everywhere (argparse's own 2 would read as "temporary error" for ``query``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
from maplookup import admin
from maplookup.config import ConfigError, HostPort, Settings, load_settings
from maplookup.maps import MapName
from maplookup.protocol import Status

EXIT_OK = 0
EXIT_NOTFOUND = 1
EXIT_TEMP = 2
EXIT_PERM = 3
EXIT_ERROR = 1
EXIT_USAGE = 3

_QUERY_EXIT = {
    Status.OK: EXIT_OK,
    Status.NOTFOUND: EXIT_NOTFOUND,
    Status.TEMP: EXIT_TEMP,
    Status.TIMEOUT: EXIT_TEMP,
    Status.PERM: EXIT_PERM,
}


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 3 for bad usage (2 means "temporary error" for `query`)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    print(f"maplookup: {message}", file=sys.stderr)
    raise SystemExit(code)


# -- database access for admin commands --------------------------------------------------------


def _resolve_dsn(args: argparse.Namespace) -> str:
    """--dsn, else MAPLOOKUP_DSN, else the config file, else the embedded cluster if running."""
    if getattr(args, "dsn", None):
        return str(args.dsn)
    if os.environ.get("MAPLOOKUP_DSN"):
        return os.environ["MAPLOOKUP_DSN"]
    settings = _load(args)
    if settings.database.dsn is not None:
        return settings.database.dsn.get_secret_value()
    from maplookup.embedded import default_state_dir, read_running_dsn

    state_dir = settings.embedded.state_dir or default_state_dir()
    dsn = read_running_dsn(state_dir)
    if dsn is None:
        _fail(
            "no database: give --dsn or set MAPLOOKUP_DSN "
            f"(or start `maplookup serve`, whose embedded cluster lives in {state_dir})"
        )
    return dsn


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Settings:
    try:
        return load_settings(getattr(args, "config", None), overrides)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)


def _with_connection(
    args: argparse.Namespace, action: Callable[[asyncpg.Connection], Awaitable[None]]
) -> int:
    dsn = _resolve_dsn(args)

    async
