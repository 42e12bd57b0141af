"""The maps beyond delivery (issue 14) against a real PostgreSQL, through the lookup layer:
sender_login, relay_domains, relay_recipients and transport.

The data is written with the admin functions the CLI uses.  Each expected answer is what
Postfix gets from the hash: table `maplookup export` writes for the same data (the
differential test checks that against a real Postfix); the comments give the rule.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import pytest

from maplookup.db import admin, admin_routing
from maplookup.db.admin_input import AdminError
from maplookup.db.database import PoolSettings, open_database
from maplookup.maps import LookupSettings
from maplookup.protocol import Reply, Request
from tests.helpers import run_with_connection
from tests.integration.answer_modes import MODES, lookup_for


async def _load(conn: asyncpg.Connection) -> None:
    await admin.domain_add(conn, "example.com", uid=5000, gid=5000)
    await admin.domain_add(conn, "example.org", alias_of="example.com")
    for box in ("alice", "bob", "dis"):
        await admin.mailbox_add(conn, f"{box}@example.com")
    await admin.mailbox_set_enabled(conn, "dis@example.com", False)
    await admin.mailbox_add(conn, "carol@example.com", login="carol-sasl")
    await admin.alias_add(conn, "info@example.com", ["alice@example.com", "Bob@Example.com"])
    await admin.alias_add(conn, "team@example.com", ["info@example.com"])
    await admin.alias_add(conn, "ext@example.com", ["someone@outside.test"])
    await admin.alias_add(conn, "sales@example.com", ["alice+sales@example.com"])
    await admin.alias_add(conn, "mirrored@example.com", ["carol@example.org"])
    await admin.alias_add(conn, "loop@example.com", ["loop2@example.com"])
    await admin.alias_add(conn, "loop2@example.com", ["loop@example.com", "bob@example.com"])
    await admin.alias_add(conn, "@example.com", ["alice@example.com"])
    # A mailbox without login (its login taken away): what is delivered to it owns nothing.
    await admin.mailbox_add(conn, "eve@example.com")
    await admin.mailbox_add(conn, "eve+list@example.com")
    await conn.execute("UPDATE maplookup.mailboxes SET login = NULL WHERE local_part = 'eve+list'")
    await admin.alias_add(conn, "evelist@example.com", ["eve+list@example.com"])
    await admin_routing.sender_allow(conn, "shared@example.com", "dave")
    # A grant of an extension adds an owner; it does not take alice's address from her.
    await admin_routing.sender_allow(conn, "alice+list@example.com", "carol-sasl")
    # Grants are off while their domain is disabled (found by a new-user trial).
    await admin.domain_add(conn, "off.test", uid=5000, gid=5000)
    await admin_routing.sender_allow(conn, "x@off.test", "ghost")
    await admin_routing.sender_allow(conn, "@off.test", "ghost")
    await admin.domain_set_enabled(conn, "off.test", False)
    await admin_routing.sender_allow(conn, "me@gmail.test", "alice@example.com")
    await admin.domain_add(conn, "shared.test", uid=5000, gid=5000)
    await admin.mailbox_add(conn, "x@shared.test")
    await admin_routing.sender_allow(conn, "@shared.test", "boss")

    await admin.domain_add(conn, "relay.test", relay=True)
    await admin_routing.relay_recipient_add(conn, "known@relay.test")
    await admin.domain_add(conn, "open.test", relay=True)
    await admin_routing.relay_recipient_add(conn, "@open.test")
    await admin.domain_add(conn, "backup.example", uid=5000, gid=5000)
    await admin.mailbox_add(conn, "m@backup.example")
    await admin.alias_add(conn, "fwd@backup.example", ["m@backup.example"])
    await admin.domain_add(conn, "offrelay.test", relay=True)
    await admin.domain_set_enabled(conn, "offrelay.test", False)

    await admin_routing.transport_set(conn, "example.com", "lmtp:unix:private/dovecot-lmtp")
    await admin_routing.transport_set(conn, "Special@example.com", "smtp:[special.test]")
    await admin_routing.transport_set(conn, "relay.test", "smtp:[mx2.example.net]:25")
    await admin_routing.transport_set(conn, "only.test", "relay:[only]", subdomains=False)
    await admin_routing.transport_set(conn, ".deep.test", "smtp:[deep]")
    await admin_routing.transport_set(conn, "*", "smtp:[smarthost.test]")


@pytest.fixture(scope="module")
def dataset_dsn(make_database: Callable[[], str]) -> str:
    dsn = make_database()
    run_with_connection(dsn, _load)
    return dsn


CASES: list[tuple[str, str, str | None]] = [
    # sender_login: a mailbox's login owns it (its address unless set otherwise), with any
    # extension and case; a disabled mailbox owns nothing.
    ("sender_login", "alice@example.com", "alice@example.com"),
    ("sender_login", "ALICE+Tag@Example.COM", "alice@example.com"),
    ("sender_login", "carol@example.com", "carol-sasl"),
    ("sender_login", "dis@example.com", None),
    # An alias is owned by the mailboxes it delivers to, through further aliases, extensions
    # and mirror domains; an address that expands into itself is final.
    ("sender_login", "info@example.com", "alice@example.com,bob@example.com"),
    ("sender_login", "info+x@example.com", "alice@example.com,bob@example.com"),
    ("sender_login", "team@example.com", "alice@example.com,bob@example.com"),
    ("sender_login", "sales@example.com", "alice@example.com"),
    ("sender_login", "mirrored@example.com", "carol-sasl"),
    ("sender_login", "loop@example.com", "bob@example.com"),
    ("sender_login", "ext@example.com", None),
    # Delivered to the mailbox eve+list, which has no login: not eve's (found by the complete
    # copy's property test); the address itself falls back to eve@, as a hash: table does.
    ("sender_login", "evelist@example.com", None),
    ("sender_login", "eve+list@example.com", "eve@example.com"),
    # A catch-all alias gives its recipients no right to every address of the domain.
    ("sender_login", "unknown@example.com", None),
    # A mirror domain's address is owned like the mirrored one.
    ("sender_login", "Alice@example.org", "alice@example.com"),
    ("sender_login", "info+x@example.org", "alice@example.com,bob@example.com"),
    ("sender_login", "ghost@example.org", None),
    # Grants: an address (hosted or not), or '@domain', which is in every answer of it.
    ("sender_login", "shared@example.com", "dave"),
    ("sender_login", "alice+list@example.com", "alice@example.com,carol-sasl"),
    ("sender_login", "alice+other@example.com", "alice@example.com"),
    ("sender_login", "x@off.test", None),
    ("sender_login", "y@off.test", None),
    ("sender_login", "me@gmail.test", "alice@example.com"),
    ("sender_login", "x@shared.test", "boss,x@shared.test"),
    ("sender_login", "x+y@shared.test", "boss,x@shared.test"),
    ("sender_login", "nobody@shared.test", "boss"),
    ("sender_login", "@shared.test", "boss"),
    ("sender_login", "user@relay.test", None),
    ("sender_login", "no-at-sign", None),
    # relay_domains: the domain and its subdomains (parent_domain_matches_subdomains lists
    # relay_domains by default); never a hosted domain (a backup MX lists the domains and
    # alias_domains maps in its relay_domains itself), never a disabled one.
    ("relay_domains", "relay.test", "relay.test"),
    ("relay_domains", "RELAY.Test", "relay.test"),
    ("relay_domains", "mx.sub.relay.test", "relay.test"),
    ("relay_domains", "backup.example", None),
    ("relay_domains", "example.com", None),
    ("relay_domains", "offrelay.test", None),
    ("relay_domains", "xrelay.test", None),
    ("relay_domains", "user@relay.test", None),
    # relay_recipients: explicit records (extension stripped, '@domain' for all), and what a
    # hosted domain accepts (mailboxes, aliases, catch-alls) for a backup MX; nothing else.
    ("relay_recipients", "known@relay.test", "OK"),
    ("relay_recipients", "Known+x@relay.test", "OK"),
    ("relay_recipients", "unknown@relay.test", None),
    ("relay_recipients", "anyone@open.test", "OK"),
    ("relay_recipients", "m@backup.example", "OK"),
    ("relay_recipients", "fwd@backup.example", "OK"),
    ("relay_recipients", "x@backup.example", None),
    ("relay_recipients", "alice@example.com", "OK"),
    ("relay_recipients", "anyone@example.com", "OK"),  # its catch-all alias
    ("relay_recipients", "anyone@example.org", "OK"),  # the mirrored domain's catch-all
    ("relay_recipients", "alice+x@example.org", "OK"),
    ("relay_recipients", "nobody@shared.test", None),
    ("relay_recipients", "x@offrelay.test", None),
    ("relay_recipients", "known@sub.relay.test", None),
    # transport: address, address without extension, domain, then '.parent' entries; '*'
    # only for the key '*' (Postfix asks for it itself).
    ("transport", "alice@example.com", "lmtp:unix:private/dovecot-lmtp"),
    ("transport", "special@example.com", "smtp:[special.test]"),
    ("transport", "SPECIAL+x@Example.com", "smtp:[special.test]"),
    ("transport", "x@mx.sub.example.com", "lmtp:unix:private/dovecot-lmtp"),
    ("transport", "x@relay.test", "smtp:[mx2.example.net]:25"),
    ("transport", "x@only.test", "relay:[only]"),
    ("transport", "x@sub.only.test", None),
    ("transport", "x@deep.test", None),
    ("transport", "x@a.deep.test", "smtp:[deep]"),
    ("transport", "x@unknown.test", None),
    ("transport", "*", "smtp:[smarthost.test]"),
    ("transport", "example.com", "lmtp:unix:private/dovecot-lmtp"),
    ("transport", "Sub.Example.com", "lmtp:unix:private/dovecot-lmtp"),
    ("transport", "x@", None),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("map_name", "key", "expected"), CASES)
async def test_routing_map_contract(
    dataset_dsn: str, mode: str, map_name: str, key: str, expected: str | None
) -> None:
    async with open_database(PoolSettings(dsn=dataset_dsn)) as database:
        lookup = lookup_for(mode, dataset_dsn, database, LookupSettings())
        reply = await lookup.answer(Request(map_name.encode(), key.encode()))
    assert reply == (Reply.notfound() if expected is None else Reply.ok(expected))


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (lambda c: admin_routing.sender_allow(c, "a@example.com", "two words"), "invalid login"),
        (
            lambda c: admin_routing.sender_deny(c, "alice@example.com", "alice@example.com"),
            "owns alice@example.com as a mailbox login",
        ),
        (lambda c: admin_routing.sender_deny(c, "shared@example.com", "eve"), "no grant"),
        (lambda c: admin_routing.relay_recipient_add(c, "x@nowhere.test"), "no such domain"),
        (lambda c: admin_routing.transport_set(c, "@example.com", "smtp:"), "without '@'"),
        (lambda c: admin_routing.transport_set(c, "example.com", "a\x01b"), "invalid transport"),
        (lambda c: admin_routing.transport_unset(c, "nothing.test"), "no transport entry"),
        (lambda c: admin.alias_add(c, "x@relay.test", ["a@b.test"]), "is a relay domain"),
        (lambda c: admin.mailbox_add(c, "x@relay.test"), "is a relay domain"),
        (lambda c: admin.domain_add(c, "new.test", alias=True, relay=True), "not both"),
        (lambda c: admin.domain_add(c, "new.test", relay=True, uid=5), "mailbox domains only"),
    ],
)
def test_bad_input_is_one_clear_line_and_changes_nothing(
    dataset_dsn: str, action: Callable[[asyncpg.Connection], object], message: str
) -> None:
    before = run_with_connection(dataset_dsn, _snapshot)
    with pytest.raises(AdminError, match=message) as raised:
        run_with_connection(dataset_dsn, action)
    assert "\n" not in str(raised.value)
    assert run_with_connection(dataset_dsn, _snapshot) == before


async def _snapshot(conn: asyncpg.Connection) -> object:
    return [
        await conn.fetch(f"SELECT * FROM maplookup.{table} ORDER BY 1, 2")
        for table in (
            "domains",
            "mailboxes",
            "aliases",
            "sender_grants",
            "relay_recipients",
            "transports",
        )
    ]
