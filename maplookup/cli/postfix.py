"""``maplookup postfix-config``: print or write the Postfix side of the set-up."""

from __future__ import annotations

import argparse
import grp
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from maplookup.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    add_database_options,
    fail,
    load,
    resolve_dsn,
    server_ids,
    warn,
)
from maplookup.config import HostPort
from maplookup.embedded import loopback_dsn
from maplookup.maps import MapName
from maplookup.postfix.config import GeneratedConfig, PostfixConfigOptions, generate


def add_commands(commands: Any) -> None:
    parser = commands.add_parser(
        "postfix-config",
        help="generate main.cf, master.cf and the pgsql: files virtual(8) needs",
        description=(
            "Print (or, with --output, write) the Postfix configuration for maplookup: the "
            "main.cf lines that point every virtual map at the server, the master.cf "
            "override that gives virtual(8) pgsql: tables (it refuses socketmap for its "
            "maps), and those pgsql: files, which call the same SQL functions as the server "
            "with the same recipient delimiter and default ids.  Settings not given as flags "
            "come from --config (the server's config file), so both sides agree."
        ),
    )
    add_database_options(parser)
    parser.add_argument(
        "--output",
        type=Path,
        metavar="DIR",
        help="write DIR/main.cf, DIR/master.cf (snippets to merge) and DIR/pgsql-MAP.cf",
    )
    parser.add_argument("--force", action="store_true", help="overwrite files in --output")
    parser.add_argument(
        "--backup-mx",
        action="store_true",
        help="a backup MX of the hosted domains: relay them, accept at RCPT only what the "
        "primary accepts, deliver nothing here (main.cf only)",
    )
    parser.add_argument("--socketmap", metavar="HOST:PORT", help="default 127.0.0.1:9000")
    parser.add_argument("--socketmap-unix", type=Path, metavar="PATH", help="use a unix socket")
    parser.add_argument(
        "--tcp-table",
        action="append",
        default=[],
        metavar="MAP=HOST:PORT",
        help="use tcp_table for MAP (repeatable); other maps stay on socketmap",
    )
    parser.add_argument("--recipient-delimiter", help="default: the config's, else '+'")
    parser.add_argument(
        "--virtual-mailbox-base", type=Path, default=Path("/var/mail/vhosts"), metavar="DIR"
    )
    parser.add_argument(
        "--default-uid",
        type=int,
        help="default: that of the server running on the embedded cluster, else the config's, "
        "else none",
    )
    parser.add_argument("--default-gid", type=int, help="default: as for --default-uid")
    parser.add_argument(
        "--virtual-minimum-uid",
        type=int,
        help="emit virtual_minimum_uid (Postfix defers mail for uids below it; default 100)",
    )
    parser.add_argument(
        "--pgsql-dir",
        type=Path,
        metavar="DIR",
        help="where the pgsql-*.cf files will live (default: --output, else /etc/postfix)",
    )
    parser.add_argument(
        "--pgsql-dsn",
        metavar="DSN",
        help="how virtual(8) reaches PostgreSQL (default: the database maplookup uses; a "
        "unix-socket DSN of the embedded cluster becomes its 127.0.0.1 form)",
    )
    parser.set_defaults(func=cmd_postfix_config)


def _options(args: argparse.Namespace) -> PostfixConfigOptions:
    settings = load(args)
    try:
        tcp_tables: dict[MapName, HostPort] = {}
        for item in args.tcp_table:
            name, sep, endpoint = item.partition("=")
            if not sep:
                raise ValueError(f"--tcp-table takes MAP=HOST:PORT, got {item!r}")
            tcp_tables[MapName(name)] = HostPort.parse(endpoint)
        if not tcp_tables:
            tcp_tables = dict(settings.listen.tcp_table)
        socketmap = HostPort.parse(args.socketmap) if args.socketmap else None
        if socketmap is None and settings.listen.socketmap:
            socketmap = settings.listen.socketmap[0]
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    pgsql_dir = args.pgsql_dir or (args.output.resolve() if args.output else Path("/etc/postfix"))
    lookup = settings.lookup
    server = server_ids(args)
    # A backup MX has no virtual(8), hence no pgsql: files and no database to name.
    pgsql_dsn = "" if args.backup_mx else args.pgsql_dsn or loopback_dsn(resolve_dsn(args))
    if (
        not args.backup_mx
        and not args.pgsql_dsn
        and not args.dsn
        and settings.database.dsn is None
        and settings.embedded.port == 0
    ):
        # The embedded cluster takes any free port at each start: files naming today's stop
        # working at the next restart, and virtual(8) defers every mail (new-user trial).
        warn(
            f"the pgsql: files name the embedded cluster's port {urlsplit(pgsql_dsn).port}, "
            "which changes at every start of `maplookup serve`: set [embedded] port in the "
            "config (or give --pgsql-dsn) for files that survive a restart"
        )
    return PostfixConfigOptions(
        pgsql_dsn=pgsql_dsn,
        socketmap=socketmap,
        socketmap_unix=args.socketmap_unix or settings.listen.socketmap_unix,
        tcp_tables=tcp_tables,
        recipient_delimiter=(
            args.recipient_delimiter
            if args.recipient_delimiter is not None
            else lookup.recipient_delimiter
        ),
        virtual_mailbox_base=args.virtual_mailbox_base,
        # The running server's ids (the demo's 5000, flags it was started with) where known.
        default_uid=args.default_uid if args.default_uid is not None else server.uid,
        default_gid=args.default_gid if args.default_gid is not None else server.gid,
        virtual_minimum_uid=args.virtual_minimum_uid,
        pgsql_dir=pgsql_dir,
        backup_mx=args.backup_mx,
    )


def _write(path: Path, content: str, mode: int, group: int | None) -> None:
    """Write atomically with the final mode from the start: the file may hold a password."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        if group is not None:
            os.fchown(fd, -1, group)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _write_all(directory: Path, generated: GeneratedConfig, force: bool) -> list[Path]:
    files = {"main.cf": generated.main_cf}
    if generated.master_cf:
        files["master.cf"] = generated.master_cf
    files.update(generated.pgsql_files)
    targets = [directory / name for name in files]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        fail(f"refusing to overwrite {', '.join(existing)} (use --force)")
    directory.mkdir(parents=True, exist_ok=True)
    try:
        postfix_gid: int | None = grp.getgrnam("postfix").gr_gid if os.geteuid() == 0 else None
    except KeyError:
        postfix_gid = None
    for name, content in files.items():
        secret = name.startswith("pgsql-")
        _write(
            directory / name, content, 0o640 if secret else 0o644, postfix_gid if secret else None
        )
    return targets


def cmd_postfix_config(args: argparse.Namespace) -> int:
    generated = generate(_options(args))
    if args.output is None:
        print(generated.render(), end="")
        return EXIT_OK
    for path in _write_all(args.output, generated, args.force):
        print(f"wrote {path}")
    return EXIT_OK
