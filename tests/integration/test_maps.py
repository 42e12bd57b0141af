"""Every row of DESIGN.md §3 against a real PostgreSQL, through the Python lookup layer.

The data is written with the admin functions the CLI uses, so those are exercised too.  Each
case goes bytes -> Lookup (key folding) -> Database (the trio/asyncio bridge) -> the SQL
functions of schema.sql -> Reply, which is the server's whole path minus the socket.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable

import asyncpg
import pytest

from maplookup.db import admin
from maplookup.db.database import PoolSettings, open_database
from maplookup.lookup.answer import DatabaseSource, Lookup
from maplookup.maps import LookupSettings, MapName
from maplookup.protocol import Reply, Request, Status
from tests.helpers import require_tool, run_with_connection

from .answer_modes import MODES, lookup_for


async def _load(conn: asyncpg.Connection) -> None:
    await admin.domain_add(conn, "example.com", uid=5000, gid=5001)
    await admin.domain_add(conn, "example.org", alias_of="example.com")
    await admin.domain_add(conn, "forward.example", alias=True)
    await admin.domain_add(conn, "nouid.example")
    await admin.domain_add(conn, "nouid.org", alias_of="nouid.example")
    await admin.domain_add(conn, "catch.example", uid=7000, gid=7000)
    await admin.domain_add(conn, "off.example")
    await admin.domain_set_enabled(conn, "off.example", False)

    await admin.mailbox_add(conn, "user@example.com", uid=1001)
    await admin.mailbox_add(conn, "plain@example.com")
    await admin.mailbox_add(conn, "dis@example.com")
    await admin.mailbox_set_enabled(conn, "dis@example.com", False)
    await admin.mailbox_add(conn, "a+b@example.com")
    await admin.mailbox_add(conn, "jürgen@example.com")
    await admin.mailbox_add(conn, "o'brien@example.com")
    await admin.mailbox_add(conn, "mbox@example.com", path="example.com/mbox")
    await admin.mailbox_add(conn, "x@nouid.example")
    await admin.mailbox_add(conn, "@catch.example", path="catch.example/all/")
    await admin.mailbox_add(conn, "real@catch.example", uid=7001, gid=7002)
    await admin.mailbox_add(conn, "user@off.example")
    await admin.domain_add(conn, "fallback.example")
    await admin.mailbox_add(
        conn, "@fallback.example", path="fallback.example/all/", uid=6100, gid=6101
    )
    await admin.mailbox_add(conn, "plain@fallback.example")
    await admin.mailbox_add(conn, "own@fallback.example", uid=6200)

    await admin.alias_add(conn, "list@example.com", ["a@x.test", "b@y.test"])
    await admin.alias_add(conn, "fwd@example.com", ["user@example.com"])
    await admin.alias_add(conn, "@example.com", ["postmaster@example.com"])
    await admin.alias_add(conn, "keep@example.com", ["@elsewhere.test"])
    await admin.alias_add(conn, "info@forward.example", ["user@example.com"])
    await admin.alias_add(conn, "@forward.example", ["@example.com"])
    await admin.alias_add(conn, "off@nouid.example", ["user@example.com"])
    await admin.alias_set_enabled(conn, "off@nouid.example", False)
    await admin.alias_add(conn, "list@off.example", ["user@example.com"])
    # Issue 12: Unicode folding, quoted local parts, local accounts, the case of targets.
    await admin.mailbox_add(conn, "Straße@example.com")
    await admin.alias_add(conn, "joe@forward.example", ["jsmith@example.net"])
    await admin.alias_add(conn, "acct@forward.example", ["postmaster"])
    await admin.alias_add(conn, "case@forward.example", ["Mail@Example.net"])
    # A quote or a backslash in a local part (found by the complete copy's property test: the
    # server unquoted such keys twice, once itself and once in the SQL functions).
    await admin.mailbox_add(conn, '"a\\"b"@example.com')
    await admin.mailbox_add(conn, "ab@example.com")
    await admin.mailbox_add(conn, '"q\\\\x"@example.com')


@pytest.fixture(scope="module")
def dataset_dsn(make_database: Callable[[], str]) -> str:
    dsn = make_database()
    run_with_connection(dsn, _load)
    return dsn


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    """Where the answers come from: the SQL functions, or the complete copy."""
    mode: str = request.param
    return mode


async def _answer(
    dsn: str, map_name: str, key: bytes, settings: LookupSettings | None = None, mode: str = ""
) -> Reply:
    async with open_database(PoolSettings(dsn=dsn)) as database:
        lookup = lookup_for(mode or "database", dsn, database, settings or LookupSettings())
        return await lookup.answer(Request(map_name.encode(), key))


# (map, key, expected value or None for NOTFOUND)
CASES: list[tuple[str, str, str | None]] = [
    # domains: enabled mailbox domains only; keys folded
    ("domains", "example.com", "example.com"),
    ("domains", "EXAMPLE.COM", "example.com"),
    ("domains", "example.org", None),
    ("domains", "off.example", None),
    ("domains", "unhosted.test", None),
    ("domains", "user@example.com", None),
    ("domains", "", None),
    # alias_domains: forwarding-only and mirror domains
    ("alias_domains", "example.org", "example.org"),
    ("alias_domains", "Forward.Example", "forward.example"),
    ("alias_domains", "example.com", None),
    # vmailbox: exact, then without extension, then catch-all mailbox
    ("vmailbox", "user@example.com", "example.com/user/"),
    ("vmailbox", "User@Example.COM", "example.com/user/"),
    ("vmailbox", "user+tag@example.com", "example.com/user/"),
    ("vmailbox", "USER+Tag@EXAMPLE.com", "example.com/user/"),
    ("vmailbox", "a+b@example.com", "example.com/a+b/"),
    ("vmailbox", "a+c@example.com", None),
    ("vmailbox", "mbox@example.com", "example.com/mbox"),
    ("vmailbox", "dis@example.com", None),
    ("vmailbox", "nobody@example.com", None),
    ("vmailbox", "who@catch.example", "catch.example/all/"),
    ("vmailbox", "@catch.example", "catch.example/all/"),
    ("vmailbox", "real+x@catch.example", "catch.example/real/"),
    ("vmailbox", "user@off.example", None),
    ("vmailbox", "user@example.org", None),
    ("vmailbox", "user@unhosted.test", None),
    ("vmailbox", "jürgen@example.com", "example.com/jürgen/"),
    ("vmailbox", "JÜRGEN@EXAMPLE.COM", "example.com/jürgen/"),
    ("vmailbox", "o'brien@example.com", "example.com/o'brien/"),
    ("vmailbox", "'; DROP TABLE maplookup.mailboxes; --@example.com", None),
    ("vmailbox", "user@example.com' OR '1'='1", None),
    ("vmailbox", "some one@example.com", None),
    ("vmailbox", "nodomain", None),
    ("vmailbox", "user@", None),
    ("vmailbox", "", None),
    # virtual: alias, alias without extension (extension carried), mirror, mailbox, catch-all
    ("virtual", "list@example.com", "a@x.test,b@y.test"),
    ("virtual", "LIST@Example.Com", "a@x.test,b@y.test"),
    ("virtual", "list+ext@example.com", "a+ext@x.test,b+ext@y.test"),
    # The extension is data, never a replacement pattern (found by the property test).
    # A backslash makes the local part a quoted string (src/global/quote_822_local.c): Postfix
    # sends it quoted, and quotes the targets that carry it.
    ("virtual", '"list+\\\\1&"@example.com', '"a+\\\\1&"@x.test,"b+\\\\1&"@y.test'),
    ("virtual", "fwd@example.com", "user@example.com"),
    ("virtual", "keep@example.com", "keep@elsewhere.test"),
    ("virtual", "keep+x@example.com", "keep+x@elsewhere.test"),
    # A mailbox beside a catch-all alias answers for itself (a hash: table's identity line).
    ("virtual", "user@example.com", "user@example.com"),
    ("virtual", "User+Tag@example.com", "user+Tag@example.com"),
    ("virtual", "a+b@example.com", "a+b@example.com"),
    ("virtual", "x@nouid.example", None),  # no catch-all alias there: NOTFOUND
    ("virtual", "unknown@example.com", "postmaster@example.com"),
    ("virtual", "dis@example.com", "postmaster@example.com"),
    ("virtual", "some one@example.com", "postmaster@example.com"),
    ("virtual", "user@example.org", "user@example.com"),
    # The extension is carried as received (src/global/mail_addr_map.c), the target as stored.
    ("virtual", "User+Tag@Example.ORG", "user+Tag@example.com"),
    ("virtual", "x@nouid.org", "x@nouid.example"),
    ("virtual", "ghost@nouid.org", None),
    ("virtual", "off@nouid.example", None),
    ("virtual", "x@nouid.example", None),
    ("virtual", "info@forward.example", "user@example.com"),
    ("virtual", "other@forward.example", "other@example.com"),
    # '@example.com' takes the local part as received.
    ("virtual", "Other+T@Forward.Example", "Other+T@example.com"),
    ("virtual", "list@off.example", None),
    ("virtual", "user@unhosted.test", None),
    ("virtual", "no-at-sign", None),
    # Keys fold as Postfix folds them (src/util/casefold.c), never with lower(): Straße and
    # STRASSE are one address.
    ("vmailbox", "straße@example.com", "example.com/strasse/"),
    ("vmailbox", "STRASSE+X@example.com", "example.com/strasse/"),
    ("vmailbox", "Straße@Example.COM", "example.com/strasse/"),
    # Quoted local parts: split and looked up in their internal form, the answer quoted again
    # (src/global/quote_822_local.c, mail_addr_find.c); cleanup sends the quoted form, smtpd
    # the unquoted one after it.  Never the catch-all for a key that has its own alias.
    ("virtual", '"joe+odd user"@forward.example', '"jsmith+odd user"@example.net'),
    ("virtual", "joe+odd user@forward.example", '"jsmith+odd user"@example.net'),
    ("virtual", '"Taro."@forward.example', '"Taro."@example.com'),
    ("vmailbox", '"user+odd one"@example.com', "example.com/user/"),
    # A target without '@' is a local account: Postfix appends @$myorigin itself, after the
    # extension (src/global/mail_addr_crunch.c).
    ("virtual", "Acct+Ext@forward.example", "postmaster+Ext"),
    ("virtual", "acct@forward.example", "postmaster"),
    # A target keeps the case it was written in: Postfix folds keys, never results.
    ("virtual", "CASE@forward.example", "Mail@Example.net"),
    ("vmailbox", '"a\\"b"@example.com', 'example.com/a"b/'),
    ("vmailbox", '"A\\"B+x"@example.com', 'example.com/a"b/'),
    ("vmailbox", "ab@example.com", "example.com/ab/"),
    ("vmailbox", '"q\\\\x"@example.com', "example.com/q\\x/"),
    # uid / gid: mailbox's own, else domain default, else configured default (none here)
    ("uid", "user@example.com", "1001"),
    ("gid", "user@example.com", "5001"),
    ("uid", "plain@example.com", "5000"),
    ("uid", "plain+x@example.com", "5000"),
    ("uid", "real@catch.example", "7001"),
    ("gid", "real@catch.example", "7002"),
    ("uid", "@catch.example", "7000"),
    ("uid", "who@catch.example", "7000"),
    ("uid", "x@nouid.example", None),
    # Any other address of a mailbox domain gets what '@example.com' holds in a hash: table
    # (virtual(8) asks it last): the catch-all mailbox's, else the domain's default.
    ("uid", "nobody@example.com", "5000"),
    ("gid", "unknown@unhosted.test", None),
    ("uid", "dis@example.com", "5000"),
    ("uid", "@example.com", "5000"),
    ("uid", "x@off.example", None),
    # A mailbox without ids in a domain without defaults gets the catch-all mailbox's: what
    # virtual(8) gets through the pgsql: table's '@fallback.example' key (issue 12.7).
    ("uid", "plain@fallback.example", "6100"),
    ("gid", "plain+x@fallback.example", "6101"),
    ("uid", "own@fallback.example", "6200"),
    ("uid", "who@fallback.example", "6100"),
]


@pytest.mark.parametrize(("map_name", "key", "expected"), CASES)
async def test_map_contract(
    dataset_dsn: str, mode: str, map_name: str, key: str, expected: str | None
) -> None:
    reply = await _answer(dataset_dsn, map_name, key.encode(), mode=mode)
    if expected is None:
        assert reply == Reply.notfound()
    else:
        assert reply == Reply.ok(expected)


@pytest.mark.parametrize(
    ("map_name", "key", "expected"),
    [
        ("vmailbox", "user-foo@example.com", "example.com/user/"),
        ("vmailbox", "user+foo@example.com", "example.com/user/"),
        ("vmailbox", "user-a+b@example.com", "example.com/user/"),
        ("virtual", "list-x@example.com", "a-x@x.test,b-x@y.test"),
        ("virtual", "list+x@example.com", "a+x@x.test,b+x@y.test"),
        ("uid", "plain-x@example.com", "5000"),
    ],
)
async def test_multi_character_delimiter(
    dataset_dsn: str, mode: str, map_name: str, key: str, expected: str
) -> None:
    settings = LookupSettings(recipient_delimiter="+-")
    assert await _answer(dataset_dsn, map_name, key.encode(), settings, mode=mode) == Reply.ok(
        expected
    )


async def test_no_delimiter_means_no_extension_stripping(dataset_dsn: str, mode: str) -> None:
    settings = LookupSettings(recipient_delimiter="")
    reply = await _answer(dataset_dsn, "vmailbox", b"user+foo@example.com", settings, mode=mode)
    assert reply == Reply.notfound()


async def test_configured_default_ids(dataset_dsn: str, mode: str) -> None:
    settings = LookupSettings(default_uid=99, default_gid=98)
    assert await _answer(dataset_dsn, "uid", b"x@nouid.example", settings, mode=mode) == Reply.ok(
        "99"
    )
    assert await _answer(dataset_dsn, "gid", b"x@nouid.example", settings, mode=mode) == Reply.ok(
        "98"
    )
    # The domain default still wins over the configured default.
    assert await _answer(dataset_dsn, "uid", b"plain@example.com", settings, mode=mode) == Reply.ok(
        "5000"
    )
    # And the configured default over a catch-all mailbox's own id, for a mailbox; the
    # catch-all's deliveries keep theirs.
    assert await _answer(
        dataset_dsn, "uid", b"plain@fallback.example", settings, mode=mode
    ) == Reply.ok("99")
    assert await _answer(
        dataset_dsn, "uid", b"who@fallback.example", settings, mode=mode
    ) == Reply.ok("6100")
    # Unhosted addresses stay NOTFOUND even with a configured default.
    assert (
        await _answer(dataset_dsn, "uid", b"x@unhosted.test", settings, mode=mode)
        == Reply.notfound()
    )


@pytest.mark.parametrize(
    "key",
    [b"\xff\xfe@example.com", b"us\xc3er@example.com", b"a\x00b@example.com", b"\x80"],
)
async def test_invalid_keys_are_not_found(dataset_dsn: str, mode: str, key: bytes) -> None:
    for map_name in MapName:
        assert await _answer(dataset_dsn, map_name.value, key, mode=mode) == Reply.notfound()


async def test_ten_thousand_byte_key(dataset_dsn: str, mode: str) -> None:
    local = "a" * (10_000 - len("@example.com"))
    key = f"{local}@example.com".encode()
    assert len(key) == 10_000
    assert await _answer(dataset_dsn, "vmailbox", key, mode=mode) == Reply.notfound()
    assert await _answer(dataset_dsn, "virtual", key, mode=mode) == Reply.ok(
        "postmaster@example.com"
    )


async def test_sql_injection_attempt_leaves_tables_alone(dataset_dsn: str, mode: str) -> None:
    key = b"x'); DELETE FROM maplookup.mailboxes; --@example.com"
    for map_name in MapName:
        reply = await _answer(dataset_dsn, map_name.value, key, mode=mode)
        assert reply.status in (Status.OK, Status.NOTFOUND)
    reply = await _answer(dataset_dsn, "vmailbox", b"user@example.com", mode=mode)
    assert reply == Reply.ok("example.com/user/")


async def test_unknown_map_is_perm(dataset_dsn: str, mode: str) -> None:
    reply = await _answer(dataset_dsn, "mailboxes", b"user@example.com", mode=mode)
    assert reply.status is Status.PERM


async def test_unreachable_database_is_temp_never_notfound(pg_dsn: str) -> None:
    # A port nothing listens on: every address map must answer TEMP, never NOTFOUND.
    dsn = "postgresql://maplookup@127.0.0.1:1/maplookup"
    async with open_database(PoolSettings(dsn=dsn, connect_timeout_s=2)) as database:
        lookup = Lookup(DatabaseSource(database, LookupSettings()))
        for map_name in MapName:
            reply = await lookup.answer(Request(map_name.value.encode(), b"user@example.com"))
            key_is_domain = not map_name.is_address_map
            if key_is_domain:
                # "user@example.com" is not a domain key: NOTFOUND without asking the database.
                assert reply == Reply.notfound()
            else:
                assert reply.status is Status.TEMP, (map_name, reply)
        reply = await lookup.answer(Request(b"domains", b"example.com"))
        assert reply.status is Status.TEMP


async def test_stalled_database_is_temp_within_the_timeout() -> None:
    # A listener that accepts and never answers: PostgreSQL hung, or a black-holed network.
    import trio

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    dsn = f"postgresql://maplookup@127.0.0.1:{port}/maplookup"
    settings = PoolSettings(dsn=dsn, connect_timeout_s=0.3, query_timeout_s=0.5)
    async with open_database(settings) as database:
        lookup = Lookup(DatabaseSource(database, LookupSettings()))
        with trio.fail_after(10):
            reply = await lookup.answer(Request(b"vmailbox", b"user@example.com"))
    assert reply.status is Status.TEMP
    for listener in listeners:
        await listener.aclose()


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("STRASSE@example.com", "example.com/strasse/"),
        ("strasse@example.com", "example.com/strasse/"),
        # ASCII folding leaves the sharp s: as a hash: table exported from this database and
        # built by postmap with smtputf8_enable = no, it does not match the stored strasse.
        ("straße@example.com", None),
        ("JÜRGEN@example.com", None),
        ("jürgen@EXAMPLE.com", "example.com/jürgen/"),
    ],
)
async def test_ascii_only_folding_when_smtputf8_is_off(
    dataset_dsn: str, mode: str, key: str, expected: str | None
) -> None:
    settings = LookupSettings(smtputf8_enable=False)
    reply = await _answer(dataset_dsn, "vmailbox", key.encode(), settings, mode=mode)
    assert reply == (Reply.notfound() if expected is None else Reply.ok(expected))


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        # virtual(8) asks a pgsql: table the quoted form first (mail_addr_find.c), folded.
        ("SELECT maplookup.vmailbox('\"user+odd one\"@example.com', '+')", "example.com/user/"),
        ("SELECT maplookup.vmailbox('strasse+x@example.com', '+')", "example.com/strasse/"),
        ("SELECT maplookup.uid('\"user+odd one\"@example.com', '+', NULL)", "1001"),
        # The same semantics as the server's for the folded key a pgsql: table is sent.
        (
            "SELECT maplookup.virtual('\"joe+odd user\"@forward.example', '+')",
            '"jsmith+odd user"@example.net',
        ),
        ("SELECT maplookup.virtual('acct+ext@forward.example', '+')", "postmaster+ext"),
        ("SELECT maplookup.virtual('other+t@forward.example', '+')", "other+t@example.com"),
        ("SELECT maplookup.virtual('list+x@example.com', '+')", "a+x@x.test,b+x@y.test"),
        ("SELECT maplookup.virtual('user+x@example.com', '+')", "user+x@example.com"),
        ("SELECT maplookup.quote_local('a..b@x')", '"a..b"@x'),
        ("SELECT maplookup.quote_local('a\"b\\c@x')", '"a\\"b\\\\c"@x'),
        ('SELECT maplookup.unquote_local(\'"a\\"b\\\\c"@"x"\')', 'a"b\\c@"x"'),
    ],
)
def test_the_sql_functions_read_keys_as_postfix_sends_them(
    dataset_dsn: str, query: str, expected: str | None
) -> None:
    async def fetch() -> str | None:
        conn = await asyncpg.connect(dataset_dsn)
        try:
            value: str | None = await conn.fetchval(query)
            return value
        finally:
            await conn.close()

    assert asyncio.run(fetch()) == expected


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("jürgen@example.com", "example.com/jürgen/"),
        ("strasse@example.com", "example.com/strasse/"),
        ("nobody@example.com", ""),
    ],
)
def test_pgsql_queries_survive_postfix_37s_latin1_session(
    dataset_dsn: str, key: str, expected: str
) -> None:
    """Postfix before 3.8 opens its pgsql: connections in LATIN1 (dict_pgsql.c) and sends
    UTF-8 bytes: the generated query must find jürgen and hand back UTF-8 bytes, as psql in a
    LATIN1 session does here byte for byte."""
    from maplookup.maps import MapName
    from maplookup.postfix.config import PostfixConfigOptions, pgsql_query

    psql = require_tool("psql", "postgresql-client")
    options = PostfixConfigOptions(pgsql_dsn=dataset_dsn)
    query = pgsql_query(MapName.VMAILBOX, options).replace("%s", key)
    result = subprocess.run(
        [psql, "-X", "-At", "-v", "ON_ERROR_STOP=1", dataset_dsn],
        input=query.encode("utf-8"),
        env={**os.environ, "PGCLIENTENCODING": "LATIN1"},
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode("utf-8").strip() == expected
