"""``maplookup sender``, ``relay-recipient`` and ``transport``: the records of the maps beyond
delivery (smtpd_sender_login_maps, relay_recipient_maps, transport_maps).

Registered on the main parser by ``add_commands`` (see cli/main.py); the writes are in
``db.admin_routing``.
"""

from __future__ import annotations

import argparse
from typing import Any

import asyncpg

from maplookup.cli.common import add_database_options, print_table, with_connection
from maplookup.db import admin_routing


def cmd_sender(args: argparse.Namespace) -> int:
    async def action(conn: asyncpg.Connection) -> None:
        if args.action == "allow":
            address, login = await admin_routing.sender_allow(conn, args.address, args.login)
            print(f"{login} may now send as {address}")
        elif args.action == "deny":
            address, login = await admin_routing.sender_deny(conn, args.address, args.login)
            print(f"grant of {address} to {login} removed")
        else:
            rows = await admin_routing.sender_list(conn, args.domain)
            print_table(rows, ["address", "login"])

    return with_connection(args, action, writes=args.action != "list")


def cmd_relay_recipient(args: argparse.Namespace) -> int:
    async def action(conn: asyncpg.Connection) -> None:
        if args.action == "add":
            address = await admin_routing.relay_recipient_add(conn, args.address)
            print(f"relay recipient {address} added")
        elif args.action == "remove":
            address = await admin_routing.relay_recipient_remove(conn, args.address)
            print(f"relay recipient {address} removed")
        else:
            rows = await admin_routing.relay_recipient_list(conn, args.domain)
            print_table(rows, ["address"])

    return with_connection(args, action, writes=args.action != "list")


def cmd_transport(args: argparse.Namespace) -> int:
    async def action(conn: asyncpg.Connection) -> None:
        if args.action == "set":
            done = await admin_routing.transport_set(
                conn, args.key, args.transport, subdomains=args.subdomains
            )
            written = ", ".join(str(key) for key, _ in done.written)
            print(f"transport {written} -> {done.transport}")
            for key, before in done.written:
                if before is not None and before != done.transport:
                    print(f"  {key} was {before}")
            if done.kept is not None:
                print(f"  kept {done.kept[0]} -> {done.kept[1]} (its subdomains' entry)")
        elif args.action == "unset":
            keys = await admin_routing.transport_unset(conn, args.key, subdomains=args.subdomains)
            print(f"transport {', '.join(map(str, keys))} removed")
        else:
            print_table(await admin_routing.transport_list(conn), ["key", "transport"])

    return with_connection(args, action, writes=args.action != "list")


def _group(commands: Any, name: str, help_text: str, description: str) -> Any:
    parser = commands.add_parser(name, help=help_text, description=description)
    return parser.add_subparsers(dest="action", required=True, metavar="ACTION")


def _sub(group: Any, name: str, help_text: str, description: str | None = None) -> Any:
    sub = group.add_parser(name, help=help_text, description=description or help_text + ".")
    add_database_options(sub)
    return sub


def add_commands(commands: Any) -> None:
    """Add ``sender``, ``relay-recipient`` and ``transport`` to the main parser."""
    group = _group(
        commands,
        "sender",
        "who may use which envelope sender (smtpd_sender_login_maps)",
        "Owners of sender addresses, for reject_sender_login_mismatch.  A mailbox's login "
        "owns its address, the mailboxes an alias delivers to own the alias; grants add "
        "owners.  `maplookup query sender_login ADDRESS` shows every owner of an address.",
    )
    commands.choices["sender"].set_defaults(func=cmd_sender)
    for name, text in (
        ("allow", "let LOGIN send as ADDRESS (@DOMAIN: every address of DOMAIN)"),
        ("deny", "remove a grant made with `sender allow`"),
    ):
        sub = _sub(group, name, text)
        sub.add_argument("address", metavar="ADDRESS|@DOMAIN")
        sub.add_argument("login", metavar="LOGIN", help="SASL login name")
    listing = _sub(group, "list", "list the grants")
    listing.add_argument("--domain", help="only this domain")

    group = _group(
        commands,
        "relay-recipient",
        "valid recipients of relay domains (relay_recipient_maps)",
        "Recipients a relay domain accepts at RCPT; every other address gets 550, so a backup "
        "MX does not accept mail it would later bounce.  On a backup MX of the hosted domains "
        "(`maplookup postfix-config --backup-mx`), their mailboxes and aliases are accepted "
        "without records.",
    )
    commands.choices["relay-recipient"].set_defaults(func=cmd_relay_recipient)
    for name, text in (
        ("add", "accept ADDRESS (@DOMAIN: every address of DOMAIN)"),
        ("remove", "remove a relay recipient"),
    ):
        sub = _sub(group, name, text)
        sub.add_argument("address", metavar="ADDRESS|@DOMAIN")
    listing = _sub(group, "list", "list relay recipients")
    listing.add_argument("--domain", help="only this domain")

    group = _group(
        commands,
        "transport",
        "where mail is delivered (transport_maps)",
        "Per-address and per-domain transport(5) entries.  Postfix uses the address, the "
        "address without its extension, the domain, then parent domains' .DOMAIN entries.  "
        "The key * is the wildcard entry (every address without an entry).",
    )
    commands.choices["transport"].set_defaults(func=cmd_transport)
    sub = _sub(
        group,
        "set",
        "route KEY to TRANSPORT:NEXTHOP",
        "Route KEY (user@DOMAIN, DOMAIN, .DOMAIN for its subdomains only, or *) to "
        "TRANSPORT:NEXTHOP, e.g. lmtp:unix:private/dovecot-lmtp or smtp:[mx2.example.net]:25.  "
        "A DOMAIN covers its subdomains too (a .DOMAIN entry) unless --no-subdomains.",
    )
    sub.add_argument("key", metavar="KEY")
    sub.add_argument("transport", metavar="TRANSPORT:NEXTHOP")
    sub.add_argument(
        "--no-subdomains",
        dest="subdomains",
        action="store_false",
        help="DOMAIN only, not its subdomains",
    )
    sub = _sub(group, "unset", "remove the entry of KEY (a DOMAIN's .DOMAIN entry too)")
    sub.add_argument("key", metavar="KEY")
    sub.add_argument(
        "--no-subdomains",
        dest="subdomains",
        action="store_false",
        help="leave the .DOMAIN entry",
    )
    _sub(group, "list", "list transport entries")
