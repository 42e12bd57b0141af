"""``maplookup trace ADDRESS``: how Postfix will route an address through the maps.

The model lives in ``maplookup.trace``; this module is the command and the two renderings
(a text tree for people, JSON for machines), both pure functions of a TraceResult.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import asyncpg

from maplookup.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    add_database_options,
    fail,
    load,
    server_ids,
    with_connection,
)
from maplookup.maps import LookupSettings
from maplookup.postfix.trace import TraceInputError, parse_trace_address, trace_address
from maplookup.postfix.trace_result import (
    AliasNode,
    Delivery,
    DomainClass,
    ErrorKind,
    NodeKind,
    PostfixSettings,
    TraceResult,
    Verdict,
)

EXIT_TRACE_OK = EXIT_OK  # every final recipient is delivered here or relayed
EXIT_TRACE_FAILS = 1  # a recipient would be rejected or deferred, or the expansion fails

_DESCRIPTION = """\
Show how Postfix will route ADDRESS through maplookup's maps, from the database (the same SQL
the server answers with, in one read-only snapshot).  With --dsn (or MAPLOOKUP_DSN, or a
config file's dsn) the server need not run; without one, trace reads the embedded cluster,
which runs only while `maplookup serve` does:

  1. the class of the address's domain: virtual mailbox domain, virtual alias domain, relay
     domain, or not hosted here (relayed);
  2. virtual alias expansion as cleanup(8) does it, as a tree: each address is looked up
     in virtual_alias_maps and replaced by its targets, recursively; an address that
     appears in its own expansion is kept as is; a loop or more than 1000 addresses or
     levels (virtual_alias_expansion_limit, virtual_alias_recursion_limit) makes Postfix
     refuse the whole message (451 4.6.0 Alias expansion error);
  3. for each final recipient: the mailbox path, uid and gid virtual(8) would use, or the
     transport_maps entry that delivers it instead, or why it would be rejected (550 5.1.1
     User unknown), deferred (no or bad uid/gid), or relayed to another host;
  4. who may use the address as envelope sender (smtpd_sender_login_maps).

Use the same --recipient-delimiter and default ids as the server (they default to the
config file's, like `maplookup serve`).

Exit status: 0 every final recipient is delivered here or relayed; 1 some recipient would
be rejected or deferred, or the expansion fails (loop, limits), or the database could not
be read (with a message on stderr); 3 bad usage."""


def add_commands(commands: Any) -> None:
    parser = commands.add_parser(
        "trace",
        help="show how Postfix will route an address through the maps",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("address", metavar="ADDRESS", help="the recipient, user@domain")
    parser.add_argument(
        "--recipient-delimiter",
        metavar="CHARS",
        help="as Postfix's recipient_delimiter (default: the config's, else '+'; '' for none)",
    )
    parser.add_argument(
        "--default-uid",
        type=int,
        metavar="N",
        help="default: the running demo/embedded server's, else the config's, else none",
    )
    parser.add_argument(
        "--default-gid",
        type=int,
        metavar="N",
        help="default: the running demo/embedded server's, else the config's, else none",
    )
    parser.add_argument(
        "--virtual-minimum-uid",
        type=int,
        default=PostfixSettings().virtual_minimum_uid,
        metavar="N",
        help="as Postfix's virtual_minimum_uid: virtual(8) defers mail for lower uids "
        "(default 100)",
    )
    parser.add_argument(
        "--myorigin",
        metavar="DOMAIN",
        help="as Postfix's myorigin: appended to a local account an alias points to "
        "(default: this host's name, Postfix's default)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the tree")
    add_database_options(parser)
    parser.set_defaults(func=cmd_trace)


def _settings(args: argparse.Namespace) -> tuple[LookupSettings, PostfixSettings]:
    lookup_overrides = {
        name: value
        for name, value in (
            ("recipient_delimiter", args.recipient_delimiter),
            ("default_uid", args.default_uid),
            ("default_gid", args.default_gid),
        )
        if value is not None
    }
    # load() validates like the server does and exits 3 on a bad value.
    lookup = load(args, {"lookup": lookup_overrides} if lookup_overrides else None).lookup
    if args.virtual_minimum_uid < 1:
        fail("--virtual-minimum-uid must be at least 1", EXIT_USAGE)
    # Without a flag, the ids the server applies: those the server on the embedded cluster
    # published (e.g. the demo's 5000), else the config's, as postfix-config does.
    server = server_ids(args)
    uid = args.default_uid if args.default_uid is not None else server.uid
    gid = args.default_gid if args.default_gid is not None else server.gid
    return (
        LookupSettings(lookup.recipient_delimiter, uid, gid, lookup.smtputf8_enable),
        PostfixSettings(
            virtual_minimum_uid=args.virtual_minimum_uid,
            **({"myorigin": args.myorigin} if args.myorigin else {}),
        ),
    )


def cmd_trace(args: argparse.Namespace) -> int:
    try:
        address = parse_trace_address(args.address)
    except TraceInputError as exc:
        fail(str(exc), EXIT_USAGE)
    lookup, postfix = _settings(args)
    results: list[TraceResult] = []

    async def action(conn: asyncpg.Connection) -> None:
        results.append(await trace_address(conn, address, lookup, postfix))

    with_connection(args, action, writes=False)
    result = results[0]
    if args.json:
        print(json.dumps(render_json(result), indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(render_text(result, ascii=not _can_draw(sys.stdout)))
    return EXIT_TRACE_OK if result.ok else EXIT_TRACE_FAILS


def _can_draw(stream: Any) -> bool:
    """Whether the stream can show the box-drawing characters and arrows of the tree."""
    try:
        "├─└│→".encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


# -- text --------------------------------------------------------------------------------------

_CLASS_TEXT = {
    DomainClass.VIRTUAL_MAILBOX: "virtual mailbox domain {}",
    DomainClass.VIRTUAL_ALIAS: "virtual alias domain {}",
    DomainClass.RELAY: "relay domain {}",
    DomainClass.REMOTE: "{} is not hosted here",
}


def _delivery_text(delivery: Delivery) -> str:
    if delivery.mailbox is not None:
        kind = "Maildir" if delivery.mailbox.endswith("/") else "mbox file"
        text = (
            f"mailbox {delivery.mailbox} ({kind})  "
            f"uid {delivery.uid or '-'}  gid {delivery.gid or '-'}"
        )
        if delivery.verdict is Verdict.DEFERRED:
            text += f"  DEFERRED: {delivery.reason}"
        return text
    if delivery.verdict is Verdict.RELAYED:
        return f"{'relay' if delivery.domain_class is DomainClass.RELAY else 'remote'}: " + (
            delivery.reason
        )
    return f"{delivery.verdict.value.upper()}: {delivery.reason}"


def _node_text(node: AliasNode) -> str:
    """What became of one address (without the address itself)."""
    if node.kind is NodeKind.ALIAS:
        n = len(node.children)
        return f"alias, {n} address{'es' if n != 1 else ''}"
    if node.kind is NodeKind.LOOP:
        return "LOOP: back to an address it was expanded from"
    if node.kind is NodeKind.UNREACHED or node.delivery is None:
        return "not expanded: the expansion stopped before it"
    text = _delivery_text(node.delivery)
    if node.kind is NodeKind.SELF:
        text = f"(in its own expansion: kept as is) {text}"
    if node.duplicate:
        text += "  (duplicate: written once)"
    return text


def _tree_lines(nodes: list[AliasNode], prefix: str, ascii: bool) -> list[str]:
    arrow = "->" if ascii else "→"
    lines = []
    for i, node in enumerate(nodes):
        last = i == len(nodes) - 1
        if ascii:
            branch, below = ("`- ", "   ") if last else ("|- ", "|  ")
        else:
            branch, below = ("└─ ", "   ") if last else ("├─ ", "│  ")
        lines.append(f"{prefix}{branch}{node.address} {arrow} {_node_text(node)}")
        lines += _tree_lines(node.children, prefix + below, ascii)
    return lines


def _summary(result: TraceResult, ascii: bool) -> str:
    error = result.error
    if error is not None:
        if error.kind is ErrorKind.TRACE_LIMIT:
            return f"result: UNKNOWN: {error.message}"
        if error.kind is ErrorKind.LOOP:
            what = "alias loop " + (" -> " if ascii else " → ").join(error.path)
            how = (
                " (Postfix repeats the loop until virtual_alias_recursion_limit or "
                "virtual_alias_expansion_limit)"
            )
        else:
            what, how = f"{error.message} expanding {error.address}", ""
        return (
            f"result: MESSAGE DEFERRED: {what}; cleanup(8) refuses the whole message with "
            f"451 4.6.0 Alias expansion error{how}"
        )
    counts = result.counts()
    parts = [f"{counts[v]} {v.value}" for v in Verdict if counts[v]]
    return f"result: {'OK' if result.ok else 'NOT OK'}: {', '.join(parts)}"


def render_text(result: TraceResult, *, ascii: bool = False) -> str:
    """A compact tree: the address and its domain's class, each alias level, each recipient."""
    root = result.tree
    header = f"{result.address}  ({_CLASS_TEXT[result.domain_class].format(result.domain)})"
    if root.kind is NodeKind.ALIAS:
        lines = [f"{header}  {_node_text(root)}", *_tree_lines(root.children, "", ascii)]
    else:
        lines = [header, ("`- " if ascii else "└─ ") + _node_text(root)]
    lines.append(_summary(result, ascii))
    owners = result.sender_owners
    lines.append(
        f"as sender: owned by {owners.replace(',', ', ')} (smtpd_sender_login_maps)"
        if owners is not None
        else "as sender: no owner in smtpd_sender_login_maps"
    )
    return "\n".join(lines) + "\n"


# -- JSON --------------------------------------------------------------------------------------


def _delivery_json(delivery: Delivery | None) -> dict[str, Any] | None:
    if delivery is None:
        return None
    return {
        "domain": delivery.domain,
        "domain_class": delivery.domain_class.value,
        "verdict": delivery.verdict.value,
        "reason": delivery.reason,
        "mailbox": delivery.mailbox,
        "maildir": None if delivery.mailbox is None else delivery.mailbox.endswith("/"),
        "uid": delivery.uid,
        "gid": delivery.gid,
        "transport": delivery.transport,
    }


def _node_json(node: AliasNode) -> dict[str, Any]:
    return {
        "address": node.address,
        "kind": node.kind.value,
        "virtual": node.virtual,
        "delivery": _delivery_json(node.delivery),
        "duplicate": node.duplicate,
        "children": [_node_json(c) for c in node.children],
    }


def render_json(result: TraceResult) -> dict[str, Any]:
    """The trace as plain data for json.dumps: verdict, recipients, the tree, the settings."""
    error = result.error
    postfix = result.postfix
    return {
        "address": result.address,
        "domain": result.domain,
        "domain_class": result.domain_class.value,
        "ok": result.ok,
        "error": None
        if error is None
        else {
            "kind": error.kind.value,
            "address": error.address,
            "message": error.message,
            "path": list(error.path),
        },
        "counts": {v.value: n for v, n in result.counts().items()},
        "recipients": [
            {"address": n.address, "kind": n.kind.value, "delivery": _delivery_json(n.delivery)}
            for n in result.recipients
        ],
        "tree": _node_json(result.tree),
        "sender_owners": None if result.sender_owners is None else result.sender_owners.split(","),
        "settings": {
            "recipient_delimiter": result.settings.recipient_delimiter,
            "default_uid": result.settings.default_uid,
            "default_gid": result.settings.default_gid,
            "smtputf8_enable": result.settings.smtputf8_enable,
            "virtual_minimum_uid": postfix.virtual_minimum_uid,
            "myorigin": postfix.myorigin,
            "virtual_alias_recursion_limit": postfix.virtual_alias_recursion_limit,
            "virtual_alias_expansion_limit": postfix.virtual_alias_expansion_limit,
            "virtual_alias_address_length_limit": postfix.virtual_alias_address_length_limit,
        },
    }
