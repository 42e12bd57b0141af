"""``maplookup import`` and ``maplookup export``: Postfix source map files in and out.

Registered on the main parser by ``add_commands`` (see cli/main.py).  Exit codes as for the admin
commands: 0 done, 1 error (for import: any bad line, unless --skip-errors), 3 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import asyncpg

from maplookup import transfer
from maplookup.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    add_database_options,
    fail,
    server_ids,
    with_connection,
)
from maplookup.config import ConfigError
from maplookup.config_load import load_settings
from maplookup.db.admin_input import AdminError

_IMPORT_FILES = (
    ("--domains", "domains", "virtual_mailbox_domains list: `domain [value]` per line"),
    (
        "--alias-domains",
        "alias_domains",
        "virtual_alias_domains list: `domain [value]`; the value `alias-of=DOMAIN` (written by "
        "export) makes a mirror domain",
    ),
    (
        "--vmailbox",
        "vmailbox",
        "virtual_mailbox_maps source: `user@domain path` (`@domain path`: catch-all mailbox)",
    ),
    (
        "--virtual",
        "virtual",
        "virtual_alias_maps source: `address target, target ...` (`@domain`: catch-all; a "
        "bare `domain anything` line declares an alias domain)",
    ),
    ("--uids", "uids", "virtual_uid_maps source: `user@domain N`; `@domain N` = domain default"),
    ("--gids", "gids", "virtual_gid_maps source: `user@domain N`; `@domain N` = domain default"),
    (
        "--sender-login",
        "sender_login",
        "smtpd_sender_login_maps source: `address login, login ...` (`@domain`: every address "
        "of it); each line's logins become sender grants (export's notes say which)",
    ),
    (
        "--relay-domains",
        "relay_domains",
        "relay_domains list: `domain [value]`, each a relay domain (a hosted domain listed "
        "there is skipped with a warning: a backup MX relays those by its configuration)",
    ),
    (
        "--relay-recipients",
        "relay_recipients",
        "relay_recipient_maps source: `user@domain value` (`@domain`: every address)",
    ),
    (
        "--transport",
        "transport",
        "transport_maps source (transport(5)): `user@domain|domain|.domain|* transport:nexthop`",
    ),
)

_IMPORT_DESCRIPTION = """\
Load existing Postfix source map files (the text files postmap(1) reads) into the database,
in one transaction.  Format as postmap reads it: `key value` per line, `#` comment lines and
blank lines ignored, a line starting with white space continues the previous one; keys are
case-folded.  Domains used by the vmailbox file but not listed are created as mailbox domains,
domains of aliases neither listed nor implied as alias domains; the summary names them.

Bad lines are reported as FILE:LINE: message on stderr.  If there is any, nothing is imported
(exit 1), unless --skip-errors.  A record that exists already with the same meaning is left
alone (unchanged); one with a different value is an error, unless --replace.

`# disabled: KEY VALUE` comment lines (written by `maplookup export`) are imported as disabled
records; Postfix sees them as comments.  Lines between `# maplookup-note: derived` notes are
the hash-table form of rules maplookup applies itself (mirror domains, alias owners, a relayed
domain's addresses): import skips them.  Sender grants only add owners; a grant already in
the database that the file does not list is kept."""

_EXPORT_DESCRIPTION = """\
Write the database as Postfix source map files into DIR: domains, alias_domains, vmailbox,
virtual, uids, gids, sender_login (smtpd_sender_login_maps), relay_domains, relay_recipients
(relay_recipient_maps) and transport (each `postmap lmdb:FILE`-able, each with a header saying
what it is); Postfix answers from them what maplookup answers.  Owners and addresses maplookup
derives (a mailbox's login, an alias's recipients, mirrors, the addresses a hosted domain
accepts, which a backup MX accepts too) are written out between `# maplookup-note: derived`
notes, which import skips.
A mirror domain is `mirror alias-of=target` in alias_domains, and its addresses are written
out in virtual (`@mirror @target` only when the target has a catch-all); disabled records
are written as `# disabled: ...` comments, which Postfix ignores and `maplookup import`
restores.  Files are written to temporary files and renamed; existing files are kept unless
--force."""


def add_commands(commands: Any) -> None:
    """Add ``import`` and ``export`` to the sub-parsers object of the main parser."""
    importer = commands.add_parser(
        "import",
        help="load Postfix source map files (domains, vmailbox, virtual, ...) into the database",
        description=_IMPORT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: maplookup import --domains domains --vmailbox vmailbox "
        "--virtual virtual --uids uids --gids gids --dry-run",
    )
    files = importer.add_argument_group("files (at least one)")
    for flag, dest, text in _IMPORT_FILES:
        files.add_argument(flag, dest=dest, type=Path, metavar="FILE", help=text)
    importer.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything against the database, print the summary, write nothing",
    )
    importer.add_argument(
        "--skip-errors",
        action="store_true",
        help="import all valid lines; bad lines are still reported, and counted as skipped",
    )
    importer.add_argument(
        "--replace",
        action="store_true",
        help="overwrite existing records whose value differs (path, targets, uid/gid, enabled) "
        "instead of reporting them; a domain's kind or alias-of is never changed",
    )
    add_database_options(importer)
    importer.set_defaults(func=cmd_import)

    exporter = commands.add_parser(
        "export",
        help="write the database as Postfix source map files",
        description=_EXPORT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    exporter.add_argument(
        "--output", "-o", required=True, type=Path, metavar="DIR", help="directory to write into"
    )
    exporter.add_argument("--force", action="store_true", help="overwrite existing files")
    exporter.add_argument(
        "--default-uid",
        type=int,
        metavar="N",
        help="the server's lookup.default_uid, written where a hash: table needs it (default: "
        "that of the server running on the embedded cluster, else the config's, else none)",
    )
    exporter.add_argument(
        "--default-gid", type=int, metavar="N", help="default: as for --default-uid"
    )
    exporter.add_argument(
        "--recipient-delimiter",
        metavar="CHARS",
        help="the server's lookup.recipient_delimiter (Postfix's recipient_delimiter), which "
        "the sender-login and relay-recipient answers depend on (default: the config's, else +)",
    )
    add_database_options(exporter)
    exporter.set_defaults(func=cmd_export)


def cmd_import(args: argparse.Namespace) -> int:
    sources = transfer.Sources(**{dest: getattr(args, dest) for _, dest, _ in _IMPORT_FILES})
    if not sources.given():
        fail(
            "import needs at least one of " + ", ".join(flag for flag, _, _ in _IMPORT_FILES),
            EXIT_USAGE,
        )
    options = transfer.ImportOptions(
        dry_run=args.dry_run,
        skip_errors=args.skip_errors,
        replace=args.replace,
        recipient_delimiter=_recipient_delimiter(args),
    )
    progress = transfer.Progress(sys.stderr)
    # Read the files before connecting: a missing file or bad line needs no database.
    try:
        parsed = transfer.read_sources(sources, progress)
    except AdminError as exc:
        fail(str(exc))
    outcome: list[int] = []

    async def action(conn: asyncpg.Connection) -> None:
        plan, committed = await transfer.import_parsed(conn, parsed, options, progress)
        transfer.print_problems(plan.problems)
        errors = len(plan.errors)
        if errors and not options.skip_errors:
            if options.dry_run:
                print("\n".join(transfer.summary_lines(plan, options, committed)))
            raise AdminError(
                f"{errors} bad line(s); nothing imported (--skip-errors imports the rest)"
            )
        print("\n".join(transfer.summary_lines(plan, options, committed)))
        outcome.append(EXIT_OK)

    with_connection(args, action, writes=True)
    return outcome[0] if outcome else EXIT_ERROR


def cmd_export(args: argparse.Namespace) -> int:
    try:
        transfer.prepare_export_directory(args.output, force=args.force)
    except AdminError as exc:
        fail(str(exc))

    async def action(conn: asyncpg.Connection) -> None:
        # A hash: table has no configuration: the server's default ids go into the files.
        ids = server_ids(args)
        result = await transfer.export_maps(
            conn,
            args.output,
            default_uid=args.default_uid if args.default_uid is not None else ids.uid,
            default_gid=args.default_gid if args.default_gid is not None else ids.gid,
            recipient_delimiter=_recipient_delimiter(args),
        )
        for warning in result.warnings:
            print(f"maplookup: warning: {warning}", file=sys.stderr)
        print("\n".join(transfer.export_summary(result)))

    return with_connection(args, action, writes=False)


def _recipient_delimiter(args: argparse.Namespace) -> str:
    """--recipient-delimiter, else the config file's (as a server reading it would use)."""
    if getattr(args, "recipient_delimiter", None) is not None:
        return str(args.recipient_delimiter)
    try:
        return load_settings(getattr(args, "config", None)).lookup.recipient_delimiter
    except ConfigError:
        return "+"
