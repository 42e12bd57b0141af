"""The ``maplookup`` command line: the parser, serve, query and database set-up.

The other commands live in modules of their own, each registering itself with
``add_commands``: records (domain, mailbox, alias), routing (sender, relay-recipient,
transport), postfix, check, trace, transfer.

Exit codes are part of the contract (scripts and tests rely on them):
``query`` exits 0 found, 1 not found, 2 temporary error, 3 permanent error or bad usage;
admin commands exit 0 on success and 1 with a one-line error on stderr otherwise; bad usage
exits 3 everywhere (argparse's own 2 would read as "temporary error" for ``query``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from maplookup.cli import check as cli_check
from maplookup.cli import postfix as cli_postfix
from maplookup.cli import records as cli_records
from maplookup.cli import routing as cli_routing
from maplookup.cli import trace as cli_trace
from maplookup.cli import transfer as cli_transfer
from maplookup.cli.common import (
    EXIT_NOTFOUND,
    EXIT_OK,
    EXIT_PERM,
    EXIT_TEMP,
    EXIT_USAGE,
    Parser,
    add_database_options,
    fail,
    load,
    with_connection,
)
from maplookup.config import HostPort, Settings
from maplookup.config_load import load_settings
from maplookup.db import admin
from maplookup.maps import MapName
from maplookup.protocol import Status

_QUERY_EXIT = {
    Status.OK: EXIT_OK,
    Status.NOTFOUND: EXIT_NOTFOUND,
    Status.TEMP: EXIT_TEMP,
    Status.TIMEOUT: EXIT_TEMP,
    Status.PERM: EXIT_PERM,
}


# -- commands ----------------------------------------------------------------------------------


def cmd_db_init(args: argparse.Namespace) -> int:
    async def action(conn: asyncpg.Connection) -> None:
        before, after = await admin.init_schema(conn)
        if before is None:
            print(f"schema created (version {after})")
        elif before < after:
            print(f"schema upgraded from version {before} to {after}")
        else:
            print(f"schema is current (version {after}); functions and triggers refreshed")
        if args.demo:
            from maplookup.db.demo import load_demo_data

            loaded = await load_demo_data(conn)
            print("demo data loaded" if loaded else "database not empty: demo data not loaded")

    return with_connection(args, action, writes=True)


def cmd_query(args: argparse.Namespace) -> int:
    from maplookup.client import QueryError, query_socketmap, query_tcp_table

    # query needs no settings, but a misspelt MAPLOOKUP_* variable is an error everywhere.
    load(args)

    try:
        if args.tcp_table is not None:
            reply = query_tcp_table(args.key.encode(), server=_host_port(args.tcp_table))
        else:
            server = None if args.unix else _host_port(args.server)
            reply = query_socketmap(args.map, args.key.encode(), server=server, unix_path=args.unix)
    except QueryError as exc:
        # Postfix treats an unreachable server as a temporary failure, and so do we.
        fail(str(exc), EXIT_TEMP)
    if reply.status is Status.OK:
        print(reply.value)
    elif reply.status is not Status.NOTFOUND:
        print(f"maplookup: {reply.status.value} {reply.value}", file=sys.stderr)
    return _QUERY_EXIT[reply.status]


def _host_port(text: str) -> HostPort:
    try:
        return HostPort.parse(text)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)


def _serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags given on the command line, shaped like the config file."""
    listen: dict[str, Any] = {}
    if args.socketmap:
        listen["socketmap"] = [] if args.socketmap == ["none"] else args.socketmap
    if args.socketmap_unix:
        listen["socketmap_unix"] = args.socketmap_unix
    if args.tcp_table:
        tables: dict[str, str] = {}
        for item in args.tcp_table:
            name, sep, endpoint = item.partition("=")
            if not sep:
                fail(f"--tcp-table takes MAP=HOST:PORT, got {item!r}", EXIT_USAGE)
            tables[name] = endpoint
        listen["tcp_table"] = tables
    lookup = {
        name: value
        for name, value in (
            ("recipient_delimiter", args.recipient_delimiter),
            ("default_uid", args.default_uid),
            ("default_gid", args.default_gid),
        )
        if value is not None
    }
    overrides: dict[str, Any] = {}
    if listen:
        overrides["listen"] = listen
    if lookup:
        overrides["lookup"] = lookup
    if args.dsn:
        overrides["database"] = {"dsn": args.dsn}
    if args.state_dir:
        overrides["embedded"] = {"state_dir": args.state_dir}
    if args.log_level:
        overrides["log_level"] = args.log_level
    if args.no_cache:
        overrides["cache"] = {"max_entries": 0}
    if args.metrics:
        overrides["metrics"] = {"listen": args.metrics}
    if args.workers is not None:
        overrides["workers"] = args.workers
    return overrides


def cmd_serve(args: argparse.Namespace) -> int:
    from maplookup.serve.run import run_serve

    overrides = _serve_overrides(args)

    def demo_defaults(settings: Settings) -> Settings:
        if not args.demo:
            return settings
        from maplookup.db.demo import with_demo_defaults

        return with_demo_defaults(settings)

    def reload_settings() -> Settings:
        # SIGHUP: the file and environment again, with the same command-line flags on top
        # (and, for the demo, its default ids where none of those set them).
        return demo_defaults(load_settings(args.config, overrides))

    return run_serve(
        demo_defaults(load(args, overrides)), demo=args.demo, reload_settings=reload_settings
    )


# -- parser ------------------------------------------------------------------------------------


def _add_serve_command(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the lookup server",
        description="Run the lookup server.  Without --dsn (or MAPLOOKUP_DSN, or a dsn in the "
        "config file) it starts a private PostgreSQL cluster in its state directory and stops "
        "it on exit.  SIGTERM/SIGINT: stop accepting, answer in-flight requests, exit 0.",
    )
    add_database_options(serve)
    serve.add_argument(
        "--socketmap",
        action="append",
        metavar="HOST:PORT",
        help="socketmap TCP listener, repeatable (default 127.0.0.1:9000; 'none' for none)",
    )
    serve.add_argument("--socketmap-unix", type=Path, metavar="PATH", help="socketmap unix socket")
    serve.add_argument(
        "--tcp-table",
        action="append",
        metavar="MAP=HOST:PORT",
        help="tcp_table listener for one map, repeatable (e.g. vmailbox=127.0.0.1:9011)",
    )
    serve.add_argument(
        "--demo",
        action="store_true",
        help="load the example data (arkum.ch, akadia.com) into an empty database, and use "
        "default uid/gid 5000 unless the config, environment or flags set them",
    )
    serve.add_argument(
        "--recipient-delimiter", help="as Postfix's recipient_delimiter (default '+')"
    )
    serve.add_argument(
        "--default-uid", type=int, help="uid when neither mailbox nor domain has one"
    )
    serve.add_argument(
        "--default-gid", type=int, help="gid when neither mailbox nor domain has one"
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes sharing the ports (SO_REUSEPORT); one per core (default 1)",
    )
    serve.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics and /healthz over HTTP here (default: off)",
    )
    serve.add_argument(
        "--no-cache",
        action="store_true",
        help="query PostgreSQL on every lookup (as Postfix's pgsql: tables do); for comparison",
    )
    serve.set_defaults(func=cmd_serve)


def _add_query_command(commands: Any) -> None:
    query = commands.add_parser(
        "query",
        help="ask the running server, as Postfix would",
        description="Ask the running server over socketmap (or tcp_table) and print the value. "
        "Exit 0 found, 1 not found, 2 temporary error, 3 permanent error or bad usage.",
    )
    query.add_argument(
        "map",
        choices=[m.value for m in MapName],
        metavar="MAP",
        help="one of: " + ", ".join(m.value for m in MapName),
    )
    query.add_argument("key", metavar="KEY")
    where = query.add_mutually_exclusive_group()
    where.add_argument(
        "--server",
        default="127.0.0.1:9000",
        metavar="HOST:PORT",
        help="socketmap server (default 127.0.0.1:9000)",
    )
    where.add_argument("--unix", type=Path, metavar="PATH", help="socketmap unix socket")
    where.add_argument(
        "--tcp-table",
        metavar="HOST:PORT",
        help="ask a tcp_table listener instead (it serves one map; MAP is then only a label)",
    )
    query.set_defaults(func=cmd_query)


def _add_db_commands(commands: Any) -> None:
    db = commands.add_parser("db", help="database set-up").add_subparsers(
        dest="db_command", required=True, metavar="ACTION"
    )
    init = db.add_parser(
        "init",
        help="create or upgrade the schema (idempotent)",
        description="Apply schema.sql in one transaction; safe to run again.",
    )
    add_database_options(init)
    init.add_argument("--demo", action="store_true", help="also load the example data if empty")
    init.set_defaults(func=cmd_db_init)


def program_name(argv0: str | None = None) -> str:
    """The command as the reader typed it, so that --help's examples work when pasted.

    After `make demo` the command is `.venv/bin/maplookup`, not on PATH: examples that say
    plain `maplookup` would answer "command not found".  Plain ``maplookup`` when that is
    what PATH finds, or when run as ``python -m maplookup``.
    """
    invoked = sys.argv[0] if argv0 is None else argv0
    if Path(invoked).name != "maplookup" or "/" not in invoked:
        return "maplookup"
    on_path = shutil.which("maplookup")
    if on_path is not None and Path(on_path).resolve() == Path(invoked).resolve():
        return "maplookup"
    return invoked


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=program_name(),
        description="Answer Postfix's virtual-hosting lookup tables (socketmap, tcp_table) "
        "from PostgreSQL.",
        epilog="Start with `%(prog)s serve --demo`, then, in another terminal, "
        "`%(prog)s query vmailbox meier@arkum.ch`.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve_command(commands)
    _add_query_command(commands)
    _add_db_commands(commands)
    cli_records.add_commands(commands)
    cli_routing.add_commands(commands)
    cli_postfix.add_commands(commands)
    cli_check.add_commands(commands)
    cli_trace.add_commands(commands)
    cli_transfer.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
