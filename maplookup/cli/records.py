"""``maplookup domain``, ``mailbox`` and ``alias``: the record commands and their warnings.

Registered on the main parser by ``add_commands`` (see cli/main.py).  Besides calling the
writes (``db.admin``) and the parsing (``db.admin_input``), this owns what the commands say
about a record that is valid but would make virtual(8) defer mail: no uid or gid from the
mailbox, its domain or the server, a uid below Postfix's default virtual_minimum_uid.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import asyncpg

from maplookup.cli.common import (
    ServerIds,
    add_database_options,
    print_table,
    server_ids,
    warn,
    with_connection,
)
from maplookup.db import admin, admin_input

# -- commands ----------------------------------------------------------------------------------


def _ids_text(uid: int | None, gid: int | None) -> str:
    """``default uid 5000 gid 5000``, ``default uid 5000, no default gid``, ``no default ...``."""
    if uid is not None and gid is not None:
        return f"default uid {uid} gid {gid}"
    if uid is None and gid is None:
        return "no default uid or gid"
    if uid is not None:
        return f"default uid {uid}, no default gid"
    return f"default gid {gid}, no default uid"


def _missing_ids(uid: int | None, gid: int | None, server: ServerIds) -> list[str]:
    """Which of uid, gid virtual(8) gets neither from the data nor from the server."""
    return [
        name
        for name, own, default in (("uid", uid, server.uid), ("gid", gid, server.gid))
        if own is None and default is None
    ]


def _unless_server(missing: list[str], server: ServerIds) -> str:
    """The server-default half of an ids warning: known to be absent, or a hedge."""
    keys = [f"lookup.default_{name}" for name in missing]
    if server.known:
        sets = f"sets no {keys[0]}" if len(keys) == 1 else f"sets neither {keys[0]} nor {keys[1]}"
        return f"({server.source} {sets})"
    return "unless the server sets " + " and ".join(keys)


def _fix(domain: str, missing: list[str]) -> str:
    return f"fix: maplookup domain set {domain} " + " ".join(f"--{n} N" for n in missing)


def _warn_domain_ids(
    domain: str, uid: int | None, gid: int | None, args: argparse.Namespace
) -> None:
    """Warn when a mailbox domain leaves its mailboxes without ids.

    The record is valid (mailboxes may carry their own ids, the server may have defaults),
    so this is a warning with exit status 0; but a mailbox that ends up with no uid is mail
    deferred by virtual(8) with nothing said at the time it was set up.
    """
    if uid is not None and gid is not None:
        return
    server = server_ids(args)
    missing = _missing_ids(uid, gid, server)
    if missing:
        ids = " or ".join(missing)
        warn(
            f"domain {domain} has no default {ids}, so virtual(8) will defer mail for its "
            f"mailboxes without their own {ids} {_unless_server(missing, server)}; "
            + _fix(domain, missing)
        )


async def _warn_parent_routes(conn: asyncpg.Connection, domain: str) -> None:
    """Warn when a new hosted domain lies below a relay domain or a parent's transport entry.

    Both match subdomains (relay_domains by Postfix's default parent matching, transport
    entries by their ``.domain`` form): Postfix would class the domain in both
    virtual_*_domains and relay_domains (and log "do not list domain ... in BOTH" for every
    message, src/trivial-rewrite/resolve.c), or send its mail to the parent's transport
    instead of virtual(8).  Valid, but rarely meant.
    """
    relay = await conn.fetchval("SELECT maplookup.relay_domains($1)", domain)
    if relay is not None:
        warn(
            f"domain {domain} lies below relay domain {relay}, whose subdomains relay_domains "
            f"matches: Postfix logs 'do not list domain {domain} in BOTH' for every message "
            "and delivers it here (the virtual class wins)"
        )
    route = await conn.fetchrow(
        "SELECT t.domain, t.transport FROM maplookup.transports t"
        " WHERE t.local_part = '' AND t.domain <> $1"
        " AND t.domain = ANY (maplookup.parent_domains($1, true))",
        domain,
    )
    if route is not None:
        warn(
            f"mail for {domain} goes to {route['transport']} (the transport entry "
            f"{route['domain']}), not to virtual(8) here: `maplookup transport set "
            f"{domain} virtual: --no-subdomains` delivers it here"
        )


def cmd_domain(args: argparse.Namespace) -> int:
    async def action(conn: asyncpg.Connection) -> None:
        domain = admin_input.parse_domain(args.domain) if args.action != "list" else ""
        if args.action == "add":
            await admin.domain_add(
                conn,
                args.domain,
                alias=args.alias,
                alias_of=args.alias_of,
                relay=args.relay,
                uid=args.uid,
                gid=args.gid,
            )
            if args.relay:
                kind = "relay domain: add its valid recipients with `maplookup relay-recipient add`"
            elif args.alias_of is not None:
                kind = f"alias domain, mirror of {admin_input.parse_domain(args.alias_of)}"
            elif args.alias:
                kind = "alias domain, forwarding only"
            else:
                kind = f"mailbox domain, {_ids_text(args.uid, args.gid)}"
            print(f"domain {domain} added ({kind})")
            low = admin_input.low_uid_warning(args.uid)
            if low is not None:
                warn(f"domain {domain}: {low}")
            if not (args.alias or args.alias_of is not None or args.relay):
                _warn_domain_ids(domain, args.uid, args.gid, args)
            if not args.relay:
                await _warn_parent_routes(conn, domain)
        elif args.action == "set":
            uid, gid = await admin.domain_set_ids(conn, args.domain, uid=args.uid, gid=args.gid)
            print(f"domain {domain} updated ({_ids_text(uid, gid)})")
            _warn_domain_ids(domain, uid, gid, args)
        elif args.action == "remove":
            await admin.domain_remove(conn, args.domain)
            print(f"domain {domain} removed")
        elif args.action in ("enable", "disable"):
            await admin.domain_set_enabled(conn, args.domain, args.action == "enable")
            print(f"domain {domain} {args.action}d")
        else:
            rows = await admin.domain_list(conn)
            print_table(rows, ["name", "kind", "alias_of", "default_uid", "default_gid", "enabled"])

    return with_connection(args, action, writes=args.action != "list")


def cmd_mailbox(args: argparse.Namespace) -> int:
    async def action(conn: asyncpg.Connection) -> None:
        if args.action == "add":
            added = await admin.mailbox_add(
                conn, args.address, path=args.path, uid=args.uid, gid=args.gid, login=args.login
            )
            print(f"mailbox {added.address} -> {added.path} added")
            low = admin_input.low_uid_warning(added.uid)
            if low is not None:
                warn(f"mailbox {added.address}: {low}")
            if added.uid is None or added.gid is None:
                server = server_ids(args)
                missing = _missing_ids(added.uid, added.gid, server)
                if missing:
                    domain = added.address.domain
                    warn(
                        f"mailbox {added.address} has no {' or '.join(missing)} (none of its "
                        f"own, no default from domain {domain}), so virtual(8) will defer its "
                        f"mail {_unless_server(missing, server)}; {_fix(domain, missing)}"
                    )
        elif args.action == "set":
            row = await admin.mailbox_set(
                conn, args.address, path=args.path, uid=args.uid, gid=args.gid, login=args.login
            )
            print(
                f"mailbox {row['address']} updated (path {row['path']}, "
                f"uid {row['uid'] or '-'}, gid {row['gid'] or '-'}, login {row['login'] or '-'})"
            )
            low = admin_input.low_uid_warning(args.uid)
            if low is not None:
                warn(f"mailbox {row['address']}: {low}")
        elif args.action == "remove":
            await admin.mailbox_remove(conn, args.address)
            print(f"mailbox {admin_input.parse_address(args.address)} removed")
        elif args.action in ("enable", "disable"):
            await admin.mailbox_set_enabled(conn, args.address, args.action == "enable")
            print(f"mailbox {admin_input.parse_address(args.address)} {args.action}d")
        else:
            rows = await admin.mailbox_list(conn, args.domain)
            print_table(rows, ["address", "path", "uid", "gid", "login", "enabled"])

    return with_connection(args, action, writes=args.action != "list")


def cmd_alias(args: argparse.Namespace) -> int:
    async def action(conn: asyncpg.Connection) -> None:
        if args.action == "add":
            address, targets = await admin.alias_add(conn, args.address, args.targets)
            print(f"alias {address} -> {', '.join(targets)} added")
        elif args.action == "set":
            address, targets = await admin.alias_set(conn, args.address, args.targets)
            print(f"alias {address} -> {', '.join(targets)} (targets replaced)")
        elif args.action == "remove":
            await admin.alias_remove(conn, args.address)
            print(f"alias {admin_input.parse_address(args.address)} removed")
        elif args.action in ("enable", "disable"):
            await admin.alias_set_enabled(conn, args.address, args.action == "enable")
            print(f"alias {admin_input.parse_address(args.address)} {args.action}d")
        else:
            rows = await admin.alias_list(conn, args.domain)
            print_table(rows, ["address", "targets", "enabled"])

    return with_connection(args, action, writes=args.action != "list")


# -- parser ------------------------------------------------------------------------------------


def _add_record_commands(
    commands: Any,
    noun: str,
    help_text: str,
    func: Callable[[argparse.Namespace], int],
    argument: tuple[str, str],
) -> tuple[Any, Any]:
    """The remove/enable/disable/list sub-commands every record type has; returns (group, add)."""
    name, metavar = argument
    article = "an" if noun[0] in "aeiou" else "a"
    plural = f"{noun}es" if noun.endswith(("s", "x")) else f"{noun}s"
    group = commands.add_parser(noun, help=help_text).add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    commands.choices[noun].set_defaults(func=func)
    add = group.add_parser("add", help=f"add {article} {noun}")
    for action, text in (
        ("remove", f"remove {article} {noun}"),
        ("enable", f"enable {article} {noun}"),
        ("disable", f"disable {article} {noun}: lookups treat it as absent until enabled"),
    ):
        sub = group.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        sub.add_argument(name, metavar=metavar)
        add_database_options(sub)
    listing = group.add_parser("list", help=f"list {plural}")
    if noun != "domain":
        listing.add_argument("--domain", help="only this domain")
    add_database_options(listing)
    add.add_argument(name, metavar=metavar)
    add_database_options(add)
    return group, add


def add_commands(commands: Any) -> None:
    """Add ``domain``, ``mailbox`` and ``alias`` to the sub-parsers object of the main parser."""
    group, add = _add_record_commands(
        commands, "domain", "manage hosted domains", cmd_domain, ("domain", "DOMAIN")
    )
    set_ids = group.add_parser(
        "set",
        help="set a mailbox domain's default uid/gid",
        description="Set the default uid and/or gid of a mailbox domain: virtual(8) uses them "
        "for its mailboxes that have none of their own.  An id not given is left as it is.",
    )
    set_ids.add_argument("domain", metavar="DOMAIN")
    set_ids.add_argument("--uid", type=int, help="default uid for this domain's mailboxes")
    set_ids.add_argument("--gid", type=int, help="default gid for this domain's mailboxes")
    add_database_options(set_ids)
    add.description = (
        "Add a mailbox domain (virtual_mailbox_domains), or with --alias a forwarding-only "
        "alias domain, or with --alias-of a mirror of a mailbox domain (user@DOMAIN reaches "
        "user@OTHER), or with --relay a domain this host relays (relay_domains: as backup MX, "
        "or to an internal host; route it with `maplookup transport set`)."
    )
    kind = add.add_mutually_exclusive_group()
    kind.add_argument("--alias", action="store_true", help="forwarding-only alias domain")
    kind.add_argument("--alias-of", metavar="OTHER", help="mirror of mailbox domain OTHER")
    kind.add_argument("--relay", action="store_true", help="relay domain (it and its subdomains)")
    add.add_argument("--uid", type=int, help="default uid for this domain's mailboxes")
    add.add_argument("--gid", type=int, help="default gid for this domain's mailboxes")

    group, add = _add_record_commands(
        commands, "mailbox", "manage mailboxes", cmd_mailbox, ("address", "ADDRESS")
    )
    add.description = (
        "Add a mailbox.  ADDRESS may be @DOMAIN for a catch-all mailbox (needs --path).  "
        "PATH is relative to virtual_mailbox_base; a trailing / means Maildir."
    )
    change = group.add_parser(
        "set",
        help="change a mailbox's path, uid, gid or login",
        description="Change a mailbox's path, uid, gid or login; what is not given is left as "
        "it is.  A new --path moves no mail: move the directory below virtual_mailbox_base.",
    )
    change.add_argument("address", metavar="ADDRESS")
    change.add_argument("--path", help="relative to virtual_mailbox_base; trailing / = Maildir")
    change.add_argument("--uid", type=int, help="owner uid")
    change.add_argument("--gid", type=int, help="owner gid")
    change.add_argument("--login", help="the SASL login that owns the address as a sender")
    add_database_options(change)
    add.add_argument("--path", help="default DOMAIN/LOCALPART/ (a Maildir)")
    add.add_argument(
        "--login",
        help="the SASL login that owns the address as a sender (default: the address)",
    )
    add.add_argument("--uid", type=int, help="owner uid (default: the domain's)")
    add.add_argument("--gid", type=int, help="owner gid (default: the domain's)")

    group, add = _add_record_commands(
        commands, "alias", "manage aliases (virtual_alias_maps)", cmd_alias, ("address", "ADDRESS")
    )
    change = group.add_parser(
        "set",
        help="replace an alias's targets",
        description="Replace the targets of an existing alias (the same forms as `alias add`).",
    )
    change.add_argument("address", metavar="ADDRESS")
    change.add_argument("targets", nargs="+", metavar="TARGET")
    add_database_options(change)
    add.description = (
        "Forward ADDRESS to one or more targets.  ADDRESS may be @DOMAIN (a catch-all, never "
        "used for addresses that are mailboxes); a target @OTHER keeps the local part."
    )
    add.add_argument("targets", nargs="+", metavar="TARGET")
