"""`maplookup trace` against a real PostgreSQL: the model, the renderings, the command.

asyncpg needs asyncio, so these are plain `def` tests calling asyncio.run(), as in
test_cli_admin.py.  The data is written with the admin functions the CLI uses.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from maplookup.cli import trace as cli_trace
from maplookup.cli.common import Parser
from maplookup.cli.trace import render_json, render_text
from maplookup.db import admin, admin_routing
from maplookup.maps import LookupSettings
from maplookup.postfix.trace import TraceInputError, trace_address
from maplookup.postfix.trace_result import (
    DomainClass,
    ErrorKind,
    NodeKind,
    PostfixSettings,
    TraceResult,
    Verdict,
)
from tests.helpers import run_with_connection


async def _load(conn: asyncpg.Connection) -> None:
    await admin.domain_add(conn, "arkum.ch", uid=5000, gid=5000)
    await admin.domain_add(conn, "mirror.ch", alias_of="arkum.ch")
    await admin.domain_add(conn, "fwd.example", alias=True)
    await admin.domain_add(conn, "nouid.example")
    await admin.domain_add(conn, "catch.example", uid=5000, gid=5000)

    await admin.mailbox_add(conn, "meier@arkum.ch", uid=405)
    await admin.mailbox_add(conn, "mueller@arkum.ch")
    await admin.mailbox_add(conn, "self@arkum.ch")
    await admin.mailbox_add(conn, "n@arkum.ch")
    await admin.mailbox_add(conn, "low@arkum.ch", uid=50)
    await admin.mailbox_add(conn, "mbox@arkum.ch", path="arkum.ch/mbox")
    await admin.mailbox_add(conn, "someone@nouid.example")
    await admin.mailbox_add(conn, "real@catch.example")

    # several targets, one of them remote
    await admin.alias_add(
        conn, "team@arkum.ch", ["meier@arkum.ch", "mueller@arkum.ch", "ext@remote.test"]
    )
    # alias -> alias -> mailbox
    await admin.alias_add(conn, "sales@arkum.ch", ["team@arkum.ch"])
    # an address in its own expansion (cleanup_map1n.c: kept, no loop)
    await admin.alias_add(conn, "self@arkum.ch", ["self@arkum.ch", "copy@remote.test"])
    # loops: on the left branch, and through a later target
    await admin.alias_add(conn, "a@arkum.ch", ["b@arkum.ch"])
    await admin.alias_add(conn, "b@arkum.ch", ["a@arkum.ch"])
    await admin.alias_add(conn, "l1@arkum.ch", ["meier@arkum.ch", "l2@arkum.ch"])
    await admin.alias_add(conn, "l2@arkum.ch", ["l1@arkum.ch"])
    # comes back to x, but through n, which expands into itself: Postfix stops at n
    await admin.alias_add(conn, "x@arkum.ch", ["n@arkum.ch"])
    await admin.alias_add(conn, "n@arkum.ch", ["n@arkum.ch", "x@arkum.ch"])
    # a chain for the recursion limit
    await admin.alias_add(conn, "c1@arkum.ch", ["c2@arkum.ch"])
    await admin.alias_add(conn, "c2@arkum.ch", ["c3@arkum.ch"])
    await admin.alias_add(conn, "c3@arkum.ch", ["c4@arkum.ch"])
    await admin.alias_add(conn, "c4@arkum.ch", ["meier@arkum.ch"])
    # targets that fail
    await admin.alias_add(conn, "broken@arkum.ch", ["ghost@fwd.example", "nobody@arkum.ch"])
    await admin.alias_add(conn, "staff@arkum.ch", ["meier@arkum.ch", "someone@nouid.example"])
    await admin.alias_add(conn, "info@fwd.example", ["meier@arkum.ch"])
    # catch-all alias (never used for the real mailbox of that domain)
    await admin.alias_add(conn, "@catch.example", ["meier@arkum.ch"])
    # issue 14: a relay domain, a transport entry, a sender grant
    await admin.domain_add(conn, "relay.test", relay=True)
    await admin_routing.relay_recipient_add(conn, "known@relay.test")
    await admin_routing.transport_set(conn, "relay.test", "smtp:[mx2.relay.test]:25")
    await admin.domain_add(conn, "lmtp.example", uid=5000, gid=5000)
    await admin.mailbox_add(conn, "box@lmtp.example")
    await admin_routing.transport_set(conn, "lmtp.example", "lmtp:unix:private/dovecot-lmtp")
    await admin_routing.sender_allow(conn, "team@arkum.ch", "boss")
    # Transports that do not deliver (found by a new-user trial: traced as delivered).
    await admin_routing.transport_set(conn, "gone@lmtp.example", "error:5.1.1 moved away")
    await admin_routing.transport_set(conn, "later@lmtp.example", "retry:4.2.0 maintenance")
    await admin.mailbox_add(conn, "void@lmtp.example")
    await admin_routing.transport_set(conn, "void@lmtp.example", "discard:")
    await admin.mailbox_add(conn, "out@lmtp.example")
    await admin_routing.transport_set(conn, "out@lmtp.example", "smtp:[smarthost.test]")
    await admin.alias_add(conn, "to-gone@arkum.ch", ["gone@lmtp.example"])


@pytest.fixture(scope="module")
def dsn(make_database: Callable[[], str]) -> str:
    dsn = make_database()
    run_with_connection(dsn, _load)
    return dsn


def trace(
    dsn: str,
    address: str,
    settings: LookupSettings | None = None,
    postfix: PostfixSettings | None = None,
) -> TraceResult:
    async def run() -> TraceResult:
        conn = await asyncpg.connect(dsn)
        try:
            return await trace_address(conn, address, settings or LookupSettings(), postfix)
        finally:
            await conn.close()

    return asyncio.run(run())


def recipients(result: TraceResult) -> list[tuple[str, Verdict]]:
    out = []
    for node in result.recipients:
        assert node.delivery is not None
        out.append((node.address, node.delivery.verdict))
    return out


# -- the model ---------------------------------------------------------------------------------


def test_plain_mailbox(dsn: str) -> None:
    result = trace(dsn, "meier@arkum.ch")
    assert result.domain_class is DomainClass.VIRTUAL_MAILBOX
    assert result.error is None
    assert result.ok
    assert result.tree.kind is NodeKind.FINAL
    assert result.tree.children == []
    delivery = result.tree.delivery
    assert delivery is not None
    assert (delivery.verdict, delivery.mailbox, delivery.uid, delivery.gid) == (
        Verdict.DELIVERED,
        "arkum.ch/meier/",
        "405",
        "5000",
    )
    assert result.recipients == (result.tree,)


def test_mailbox_with_extension_and_mbox_file(dsn: str) -> None:
    result = trace(dsn, "meier+news@arkum.ch")
    assert result.ok
    assert result.tree.delivery is not None
    assert result.tree.delivery.mailbox == "arkum.ch/meier/"
    mbox = trace(dsn, "mbox@arkum.ch").tree.delivery
    assert mbox is not None
    assert (mbox.mailbox, mbox.reason) == ("arkum.ch/mbox", "delivered to mbox file")


def test_alias_with_several_targets_one_remote_extension_carried(dsn: str) -> None:
    result = trace(dsn, "team+x@arkum.ch")
    assert result.ok
    assert result.tree.kind is NodeKind.ALIAS
    assert result.tree.virtual == "meier+x@arkum.ch,mueller+x@arkum.ch,ext+x@remote.test"
    assert [c.address for c in result.tree.children] == [
        "meier+x@arkum.ch",
        "mueller+x@arkum.ch",
        "ext+x@remote.test",
    ]
    assert recipients(result) == [
        ("meier+x@arkum.ch", Verdict.DELIVERED),
        ("mueller+x@arkum.ch", Verdict.DELIVERED),
        ("ext+x@remote.test", Verdict.RELAYED),
    ]
    remote = result.recipients[2].delivery
    assert remote is not None
    assert remote.domain_class is DomainClass.REMOTE
    assert remote.reason == "relayed to remote.test (not delivered here)"
    mueller = result.recipients[1].delivery
    assert mueller is not None
    assert (mueller.uid, mueller.gid) == ("5000", "5000")  # the domain's defaults


def test_nested_alias(dsn: str) -> None:
    result = trace(dsn, "sales@arkum.ch")
    assert result.ok
    (team,) = result.tree.children
    assert (team.address, team.kind) == ("team@arkum.ch", NodeKind.ALIAS)
    assert [c.address for c in team.children] == [
        "meier@arkum.ch",
        "mueller@arkum.ch",
        "ext@remote.test",
    ]
    assert [a for a, _ in recipients(result)] == [
        "meier@arkum.ch",
        "mueller@arkum.ch",
        "ext@remote.test",
    ]


def test_address_in_its_own_expansion_is_kept_not_a_loop(dsn: str) -> None:
    result = trace(dsn, "self@arkum.ch")
    assert result.error is None
    assert result.ok
    kept, copy = result.tree.children
    assert (kept.address, kept.kind, kept.children) == ("self@arkum.ch", NodeKind.SELF, [])
    assert copy.kind is NodeKind.FINAL
    assert recipients(result) == [
        ("self@arkum.ch", Verdict.DELIVERED),
        ("copy@remote.test", Verdict.RELAYED),
    ]


def test_loop_is_an_error(dsn: str) -> None:
    result = trace(dsn, "a@arkum.ch")
    assert not result.ok
    assert result.error is not None
    assert result.error.kind is ErrorKind.LOOP
    assert result.error.path == ("a@arkum.ch", "b@arkum.ch", "a@arkum.ch")
    (b,) = result.tree.children
    (again,) = b.children
    assert again.kind is NodeKind.LOOP
    assert result.recipients == ()


def test_loop_through_a_later_target(dsn: str) -> None:
    result = trace(dsn, "l1@arkum.ch")
    assert result.error is not None
    assert result.error.kind is ErrorKind.LOOP
    assert result.error.path == ("l1@arkum.ch", "l2@arkum.ch", "l1@arkum.ch")
    assert not result.ok


def test_cycle_through_a_self_including_address_ends_as_postfix_ends_it(dsn: str) -> None:
    # x -> n; n -> n, x.  cleanup_map1n.c marks n when it expands into itself, so the second
    # time x expands, n is final: two copies of n, no error, and cleanup_out_recipient.c
    # writes n once (Postfix 3.7 logs nrcpt=1 for this).
    result = trace(dsn, "x@arkum.ch")
    assert result.error is None
    assert result.ok
    (n,) = result.tree.children
    n_self, x_again = n.children
    assert (n_self.kind, x_again.kind) == (NodeKind.SELF, NodeKind.ALIAS)
    (n_again,) = x_again.children
    assert (n_again.kind, n_self.duplicate, n_again.duplicate) == (NodeKind.SELF, False, True)
    assert result.recipients == (n_self,)
    assert recipients(result) == [("n@arkum.ch", Verdict.DELIVERED)]


def test_recursion_limit(dsn: str) -> None:
    assert trace(dsn, "c1@arkum.ch").ok
    limit_3 = PostfixSettings(virtual_alias_recursion_limit=3)
    result = trace(dsn, "c1@arkum.ch", postfix=limit_3)
    assert result.error is not None
    assert result.error.kind is ErrorKind.RECURSION_LIMIT
    assert result.error.address == "c4@arkum.ch"
    assert not result.ok
    # The limit is checked before each lookup: three successful lookups use it up even when
    # the fourth would find nothing (seen so with Postfix 3.7: c2 -> 451, c3 -> accepted).
    assert trace(dsn, "c2@arkum.ch", postfix=limit_3).error is not None
    assert trace(dsn, "c3@arkum.ch", postfix=limit_3).ok
    assert trace(dsn, "c1@arkum.ch", postfix=PostfixSettings(virtual_alias_recursion_limit=5)).ok


def test_expansion_limit(dsn: str) -> None:
    result = trace(dsn, "team@arkum.ch", postfix=PostfixSettings(virtual_alias_expansion_limit=2))
    assert result.error is not None
    assert result.error.kind is ErrorKind.EXPANSION_LIMIT
    assert not result.ok
    assert trace(dsn, "team@arkum.ch", postfix=PostfixSettings(virtual_alias_expansion_limit=3)).ok


def test_catch_all_alias(dsn: str) -> None:
    result = trace(dsn, "whoever@catch.example")
    assert result.ok
    assert [c.address for c in result.tree.children] == ["meier@arkum.ch"]
    # The catch-all never swallows a real mailbox: it answers for itself (a hash: table's
    # identity line), and cleanup lets an address expand into itself once.
    real = trace(dsn, "real@catch.example")
    assert [c.kind for c in real.tree.children] == [NodeKind.SELF]
    (recipient,) = real.recipients
    assert recipient.delivery is not None
    assert recipient.delivery.mailbox == "catch.example/real/"


def test_mirror_domain(dsn: str) -> None:
    result = trace(dsn, "Meier+Tag@Mirror.CH")
    assert result.domain_class is DomainClass.VIRTUAL_ALIAS
    assert result.ok
    # The extension as received (src/global/mail_addr_map.c), as from a hash: table that
    # enumerates the mirror (meier@mirror.ch meier@arkum.ch).
    assert [a for a, _ in recipients(result)] == ["meier+Tag@arkum.ch"]
    unknown = trace(dsn, "ghost@mirror.ch")
    assert unknown.tree.delivery is not None
    assert unknown.tree.delivery.verdict is Verdict.REJECTED
    assert unknown.tree.delivery.reason == "User unknown in virtual alias table (550 5.1.1 at RCPT)"


def test_unknown_user_in_mailbox_domain_is_rejected(dsn: str) -> None:
    result = trace(dsn, "nobody@arkum.ch")
    assert not result.ok
    delivery = result.tree.delivery
    assert delivery is not None
    assert delivery.verdict is Verdict.REJECTED
    assert "550 5.1.1" in delivery.reason
    assert "virtual mailbox table" in delivery.reason


def test_failing_alias_targets_bounce(dsn: str) -> None:
    result = trace(dsn, "broken@arkum.ch")
    assert not result.ok
    ghost, nobody = result.recipients
    assert ghost.delivery is not None
    assert nobody.delivery is not None
    assert ghost.delivery.verdict is Verdict.REJECTED
    assert ghost.delivery.domain_class is DomainClass.VIRTUAL_ALIAS
    assert "User unknown in virtual alias table" in ghost.delivery.reason
    assert nobody.delivery.verdict is Verdict.REJECTED
    assert "bounced by virtual(8)" in nobody.delivery.reason


def test_unhosted_domain_is_relayed(dsn: str) -> None:
    result = trace(dsn, "user@remote.test")
    assert result.domain_class is DomainClass.REMOTE
    assert result.ok
    assert result.tree.delivery is not None
    assert result.tree.delivery.verdict is Verdict.RELAYED


def test_missing_uid_is_deferred_and_defaults_fix_it(dsn: str) -> None:
    result = trace(dsn, "someone@nouid.example")
    assert not result.ok
    delivery = result.tree.delivery
    assert delivery is not None
    assert delivery.verdict is Verdict.DEFERRED
    assert (delivery.mailbox, delivery.uid, delivery.gid) == ("nouid.example/someone/", None, None)
    assert "no uid in virtual_uid_maps" in delivery.reason
    fixed = trace(dsn, "someone@nouid.example", LookupSettings(default_uid=3000, default_gid=3000))
    assert fixed.ok
    # one deferred target makes the whole trace not ok
    staff = trace(dsn, "staff@arkum.ch")
    assert recipients(staff) == [
        ("meier@arkum.ch", Verdict.DELIVERED),
        ("someone@nouid.example", Verdict.DEFERRED),
    ]
    assert not staff.ok


def test_uid_below_virtual_minimum_uid_is_deferred(dsn: str) -> None:
    result = trace(dsn, "low@arkum.ch")
    assert result.tree.delivery is not None
    assert result.tree.delivery.verdict is Verdict.DEFERRED
    assert "bad uid 50" in result.tree.delivery.reason
    assert trace(dsn, "low@arkum.ch", postfix=PostfixSettings(virtual_minimum_uid=50)).ok


def test_case_is_folded(dsn: str) -> None:
    upper = trace(dsn, "TEAM+X@Arkum.CH")
    lower = trace(dsn, "team+x@arkum.ch")
    assert upper.address == "TEAM+X@Arkum.CH"
    assert upper.domain == "arkum.ch"
    # The same recipients and fates; the extension is carried as received (mail_addr_map.c).
    assert [(a.lower(), v) for a, v in recipients(upper)] == recipients(lower)
    assert recipients(upper)[0][0] == "meier+X@arkum.ch"
    assert trace(dsn, "A@ARKUM.CH").error is not None  # the loop, whatever the case


def test_recipient_delimiter(dsn: str) -> None:
    result = trace(dsn, "team-x@arkum.ch", LookupSettings(recipient_delimiter="+-"))
    assert [a for a, _ in recipients(result)] == [
        "meier-x@arkum.ch",
        "mueller-x@arkum.ch",
        "ext-x@remote.test",
    ]
    assert not trace(dsn, "meier+x@arkum.ch", LookupSettings(recipient_delimiter="")).ok


@pytest.mark.parametrize("bad", ["no-at-sign", "@arkum.ch", "user@", "", "<>"])
def test_not_an_address(dsn: str, bad: str) -> None:
    with pytest.raises(TraceInputError):
        trace(dsn, bad)


def test_one_read_only_snapshot(dsn: str) -> None:
    """A change committed while the trace runs is not seen: all lookups share one snapshot."""

    class ChangeAfterFirstLookup:
        def __init__(self, conn: asyncpg.Connection, other: asyncpg.Connection) -> None:
            self._conn = conn
            self._other = other
            self.isolation: list[str] = []
            self.changed = False

        def is_in_transaction(self) -> bool:
            return self._conn.is_in_transaction()

        def transaction(self, **kwargs: Any) -> Any:
            return self._conn.transaction(**kwargs)

        async def fetchval(self, query: str, *args: object) -> Any:
            value = await self._conn.fetchval(query, *args)
            if not self.changed:
                self.changed = True
                self.isolation.append(await self._conn.fetchval("SHOW transaction_isolation"))
                self.isolation.append(await self._conn.fetchval("SHOW transaction_read_only"))
                await self._other.execute(
                    "UPDATE maplookup.mailboxes SET enabled = false WHERE local_part = 'mueller'"
                )
            return value

    async def run() -> tuple[TraceResult, list[str]]:
        conn = await asyncpg.connect(dsn)
        other = await asyncpg.connect(dsn)
        try:
            proxy = ChangeAfterFirstLookup(conn, other)
            result = await trace_address(proxy, "team@arkum.ch", LookupSettings())  # type: ignore[arg-type]
            return result, proxy.isolation
        finally:
            await other.execute("UPDATE maplookup.mailboxes SET enabled = true")
            await other.close()
            await conn.close()

    result, isolation = asyncio.run(run())
    assert isolation == ["repeatable read", "on"]
    assert result.ok  # mueller was disabled after the first lookup: not seen


# -- renderings --------------------------------------------------------------------------------


def test_text_rendering(dsn: str) -> None:
    text = render_text(trace(dsn, "team+x@arkum.ch"))
    assert text == (
        "team+x@arkum.ch  (virtual mailbox domain arkum.ch)  alias, 3 addresses\n"
        "├─ meier+x@arkum.ch → mailbox arkum.ch/meier/ (Maildir)  uid 405  gid 5000\n"
        "├─ mueller+x@arkum.ch → mailbox arkum.ch/mueller/ (Maildir)  uid 5000  gid 5000\n"
        "└─ ext+x@remote.test → remote: relayed to remote.test (not delivered here)\n"
        "result: OK: 2 delivered, 1 relayed\n"
        "as sender: owned by boss, meier@arkum.ch, mueller@arkum.ch (smtpd_sender_login_maps)\n"
    )
    ascii_text = render_text(trace(dsn, "sales@arkum.ch"), ascii=True)
    assert "`- team@arkum.ch -> alias, 3 addresses\n   |- meier@arkum.ch -> mailbox" in ascii_text
    assert ascii_text.isascii()


def test_text_rendering_of_failures(dsn: str) -> None:
    assert render_text(trace(dsn, "nobody@arkum.ch")) == (
        "nobody@arkum.ch  (virtual mailbox domain arkum.ch)\n"
        "└─ REJECTED: User unknown in virtual mailbox table (550 5.1.1 at RCPT)\n"
        "result: NOT OK: 1 rejected\n"
        "as sender: no owner in smtpd_sender_login_maps\n"
    )
    loop = render_text(trace(dsn, "a@arkum.ch"))
    assert "a@arkum.ch → LOOP" in loop
    assert "MESSAGE DEFERRED: alias loop a@arkum.ch → b@arkum.ch → a@arkum.ch" in loop
    assert "451 4.6.0 Alias expansion error" in loop
    deferred = render_text(trace(dsn, "someone@nouid.example"))
    assert "uid -  gid -  DEFERRED: no uid in virtual_uid_maps" in deferred
    self_text = render_text(trace(dsn, "self@arkum.ch"))
    assert "self@arkum.ch → (in its own expansion: kept as is) mailbox arkum.ch/self/" in self_text
    assert "(remote.test is not hosted here)" in render_text(trace(dsn, "u@remote.test"))
    n_text = render_text(trace(dsn, "x@arkum.ch"))
    assert n_text.count("(duplicate: written once)") == 1
    assert "result: OK: 1 delivered\n" in n_text


def test_json_rendering(dsn: str) -> None:
    data = render_json(trace(dsn, "sales+x@arkum.ch"))
    assert json.loads(json.dumps(data)) == data
    assert data["ok"] is True
    assert data["error"] is None
    assert data["domain_class"] == "virtual_mailbox"
    assert data["counts"] == {
        "delivered": 2,
        "relayed": 1,
        "rejected": 0,
        "deferred": 0,
        "discarded": 0,
    }
    tree = data["tree"]
    assert (tree["address"], tree["kind"], tree["virtual"]) == (
        "sales+x@arkum.ch",
        "alias",
        "team+x@arkum.ch",
    )
    team = tree["children"][0]
    assert [c["address"] for c in team["children"]] == [
        "meier+x@arkum.ch",
        "mueller+x@arkum.ch",
        "ext+x@remote.test",
    ]
    meier = team["children"][0]["delivery"]
    assert meier == {
        "domain": "arkum.ch",
        "domain_class": "virtual_mailbox",
        "verdict": "delivered",
        "reason": "delivered to Maildir",
        "mailbox": "arkum.ch/meier/",
        "maildir": True,
        "uid": "405",
        "gid": "5000",
        "transport": None,
    }
    assert data["sender_owners"] == ["meier@arkum.ch", "mueller@arkum.ch"]
    assert [r["address"] for r in data["recipients"]] == [
        "meier+x@arkum.ch",
        "mueller+x@arkum.ch",
        "ext+x@remote.test",
    ]
    assert data["settings"]["virtual_alias_recursion_limit"] == 1000

    loop = render_json(trace(dsn, "a@arkum.ch"))
    assert loop["ok"] is False
    assert loop["error"]["kind"] == "loop"
    assert loop["error"]["path"] == ["a@arkum.ch", "b@arkum.ch", "a@arkum.ch"]


def test_relay_domain_transport_and_sender_owners(dsn: str) -> None:
    """Issue 14's maps in a trace: relay_recipient_maps at RCPT for a relay domain, the
    transport_maps entry that delivers instead of virtual(8), the owners of a sender."""
    known = render_text(trace(dsn, "Known+x@relay.test"))
    assert known.startswith("Known+x@relay.test  (relay domain relay.test)\n")
    assert "relay: relayed to relay.test via smtp:[mx2.relay.test]:25 (relay domain, a valid" in (
        known
    )
    assert "result: OK: 1 relayed\n" in known
    unknown = render_text(trace(dsn, "unknown@relay.test"))
    assert "REJECTED: User unknown in relay recipient table (550 5.1.1 at RCPT)" in unknown
    box = trace(dsn, "box@lmtp.example")
    delivery = box.recipients[0].delivery
    assert delivery is not None
    assert (delivery.verdict.value, delivery.transport, delivery.mailbox) == (
        "delivered",
        "lmtp:unix:private/dovecot-lmtp",
        None,
    )
    assert "handed to lmtp:unix:private/dovecot-lmtp (transport_maps; virtual(8) not used)" in (
        render_text(box)
    )
    # smtpd still checks virtual_mailbox_maps: an unknown user is rejected at RCPT.
    assert "REJECTED: User unknown in virtual mailbox table" in render_text(
        trace(dsn, "nobody@lmtp.example")
    )
    assert render_json(trace(dsn, "team@arkum.ch"))["sender_owners"] == [
        "boss",
        "meier@arkum.ch",
        "mueller@arkum.ch",
    ]


@pytest.mark.parametrize(
    ("address", "verdict", "reason"),
    [
        # smtpd refuses error: and retry: at RCPT with the entry's text, before it asks the
        # class's recipient table (src/smtpd/smtpd_check.c); after an alias they bounce/defer.
        ("gone@lmtp.example", "rejected", "550 5.1.1 moved away at RCPT"),
        ("to-gone@arkum.ch", "rejected", "bounced: 5.1.1 moved away"),
        ("later@lmtp.example", "deferred", "450 4.2.0 maintenance at RCPT"),
        ("void@lmtp.example", "discarded", "discarded (transport_maps: discard:)"),
        ("out@lmtp.example", "relayed", "relayed via smtp:[smarthost.test]"),
    ],
)
def test_transports_that_do_not_deliver(dsn: str, address: str, verdict: str, reason: str) -> None:
    result = trace(dsn, address)
    delivery = result.recipients[0].delivery
    assert delivery is not None
    assert delivery.verdict.value == verdict
    assert delivery.reason.startswith(reason), delivery.reason
    assert result.ok is (verdict == "relayed")


# -- the command -------------------------------------------------------------------------------


def run_trace(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = Parser(prog="maplookup")
    cli_trace.add_commands(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(["trace", *argv])
        code = args.func(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("address", "extra", "code"),
    [
        ("meier@arkum.ch", (), 0),
        ("team+x@arkum.ch", (), 0),
        ("self@arkum.ch", (), 0),
        ("user@remote.test", (), 0),
        ("nobody@arkum.ch", (), 1),
        ("ghost@fwd.example", (), 1),
        ("a@arkum.ch", (), 1),
        ("someone@nouid.example", (), 1),
        ("someone@nouid.example", ("--default-uid", "3000", "--default-gid", "3000"), 0),
        ("low@arkum.ch", (), 1),
        ("low@arkum.ch", ("--virtual-minimum-uid", "50"), 0),
        ("team-x@arkum.ch", ("--recipient-delimiter", "-"), 0),
    ],
)
def test_exit_codes(
    dsn: str,
    capsys: pytest.CaptureFixture[str],
    address: str,
    extra: tuple[str, ...],
    code: int,
) -> None:
    got, out, err = run_trace(capsys, address, "--dsn", dsn, *extra)
    assert (got, err) == (code, "")
    assert out.startswith(address)


def test_json_output(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_trace(capsys, "<Team@Arkum.CH>", "--json", "--dsn", dsn)
    assert code == 0
    data = json.loads(out)
    assert data["address"] == "Team@Arkum.CH"
    assert [r["delivery"]["verdict"] for r in data["recipients"]] == [
        "delivered",
        "delivered",
        "relayed",
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ("no-at-sign",),
        ("@arkum.ch",),
        ("x@arkum.ch", "--default-uid", "zero"),
        ("x@arkum.ch", "--default-uid", "0"),
        ("x@arkum.ch", "--recipient-delimiter", "@"),
        ("x@arkum.ch", "--virtual-minimum-uid", "0"),
        (),
    ],
)
def test_bad_usage_exits_3(
    dsn: str, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    code, out, err = run_trace(capsys, *argv, "--dsn", dsn)
    assert code == 3
    assert out == ""
    assert err


def test_unreachable_database(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_trace(
        capsys, "meier@arkum.ch", "--dsn", "postgresql://nobody@127.0.0.1:1/none"
    )
    assert (code, out) == (1, "")
    assert "cannot connect to the database" in err


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_trace(capsys, "--help")
    assert code == 0
    assert "Exit status: 0" in out
    assert "virtual_alias_recursion_limit" in out
