"""The lookup layer without a database: key folding and the rule that errors never bounce mail."""

from __future__ import annotations

import pytest

from maplookup.db.database import DatabaseError, DatabaseTimeout
from maplookup.lookup.answer import Lookup
from maplookup.maps import LookupSettings, MapName, fold_key, query_for
from maplookup.protocol import Reply, Request, Status


class FakeSource:
    def __init__(self, result: str | BaseException | None) -> None:
        self.result = result
        self.calls: list[tuple[MapName, str]] = []

    async def fetch(self, map_name: MapName, key: str) -> str | None:
        self.calls.append((map_name, key))
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


@pytest.mark.parametrize(
    ("map_name", "raw", "folded"),
    [
        (MapName.VMAILBOX, b"User+Tag@Example.COM", "user+tag@example.com"),
        (MapName.VIRTUAL, b"J\xc3\x9cRGEN@example.com", "jürgen@example.com"),
        (MapName.VIRTUAL, b"@Example.com", "@example.com"),
        (MapName.VIRTUAL, b"a@b@Example.com", "a@b@example.com"),
        (MapName.DOMAINS, b"Example.COM", "example.com"),
        (MapName.VMAILBOX, b"no-at", None),
        (MapName.VMAILBOX, b"user@", None),
        (MapName.VMAILBOX, b"\xff@x", None),
        (MapName.VMAILBOX, b"a\x00@x", None),
        (MapName.DOMAINS, b"", None),
        (MapName.DOMAINS, b"user@example.com", None),
        # transport(5) keys: an address, the wildcard '*' (Postfix asks for it itself), or a
        # bare domain (an admin's `query transport example.com`).
        (MapName.TRANSPORT, b"User+X@Example.COM", "user+x@example.com"),
        (MapName.TRANSPORT, b"*", "*"),
        (MapName.TRANSPORT, b"Sub.Example.COM", "sub.example.com"),
        (MapName.TRANSPORT, b"", None),
        (MapName.TRANSPORT, b"user@", None),
        (MapName.RELAY_DOMAINS, b"MX.Example.net", "mx.example.net"),
        (MapName.RELAY_DOMAINS, b"u@example.net", None),
        (MapName.RELAY_RECIPIENTS, b"example.net", None),
        (MapName.SENDER_LOGIN, b'"Joe User"@Example.net', "joe user@example.net"),
    ],
)
def test_fold_key(map_name: MapName, raw: bytes, folded: str | None) -> None:
    assert fold_key(map_name, raw) == folded


def test_keys_travel_only_as_bound_parameters() -> None:
    evil = "x'); DROP TABLE maplookup.domains; --@example.com"
    for map_name in MapName:
        query, args = query_for(map_name, evil, LookupSettings())
        assert evil not in query
        assert args[0] == evil


@pytest.mark.parametrize(
    "error",
    [DatabaseError("connection refused"), DatabaseTimeout("5 s"), RuntimeError("a bug")],
)
async def test_every_failure_is_temp_never_notfound(error: BaseException) -> None:
    lookup = Lookup(FakeSource(error))
    for map_name in MapName:
        key = b"example.com" if not map_name.is_address_map else b"user@example.com"
        reply = await lookup.answer(Request(map_name.value.encode(), key))
        assert reply.status is Status.TEMP


async def test_null_is_notfound_and_a_value_is_ok() -> None:
    assert await Lookup(FakeSource(None)).answer(Request(b"vmailbox", b"a@b")) == Reply.notfound()
    assert await Lookup(FakeSource("b/a/")).answer(Request(b"vmailbox", b"a@b")) == Reply.ok("b/a/")


async def test_unfoldable_key_does_not_reach_the_database() -> None:
    source = FakeSource(DatabaseError("would be TEMP"))
    reply = await Lookup(source).answer(Request(b"vmailbox", b"\xff\xfe"))
    assert reply == Reply.notfound()
    assert source.calls == []


async def test_unknown_map_is_perm_without_a_query() -> None:
    source = FakeSource("x")
    reply = await Lookup(source).answer(Request(b"Vmailbox", b"a@b"))
    assert reply.status is Status.PERM
    assert source.calls == []
