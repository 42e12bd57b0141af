"""Batched lookups (``maplookup/batching.py``) against a real PostgreSQL.

Concurrent cache misses share statements; each must still get exactly the answer it gets
alone, a failing or slow statement must answer TEMP (never NOTFOUND), and a key that makes
its statement fail must not take the other keys of its batch down with it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import asyncpg
import pytest
import trio

from maplookup.db.database import Database, PoolSettings, open_database
from maplookup.lookup.answer import DatabaseSource, Lookup
from maplookup.maps import LookupSettings
from maplookup.protocol import Reply, Request, Status
from tests.helpers import run_sql
from tests.integration.test_maps import CASES
from tests.integration.test_maps import _load as load_map_cases


def _replace_domains_function(dsn: str, *rows: str, before_lookup: str) -> None:
    """Insert mailbox domains, and wrap ``maplookup.domains`` so that it runs
    ``before_lookup`` (plpgsql) first: a way to make PostgreSQL fail or stall on cue."""
    run_sql(
        dsn,
        *(f"INSERT INTO maplookup.domains (name, kind) VALUES ('{d}', 'mailbox')" for d in rows),
        "ALTER FUNCTION maplookup.domains(text) RENAME TO domains_real",
        f"""CREATE FUNCTION maplookup.domains(key text) RETURNS text LANGUAGE plpgsql STABLE AS $$
            BEGIN
                {before_lookup}
                RETURN maplookup.domains_real(key);
            END $$""",
    )


@pytest.fixture(scope="module")
def cases_dsn(make_database: Callable[[], str]) -> str:
    dsn = make_database()

    async def load() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await load_map_cases(conn)
        finally:
            await conn.close()

    asyncio.run(load())
    return dsn


async def _answer_all(
    database: Database, requests: list[tuple[LookupSettings, Request]]
) -> list[Reply]:
    """Every request at once, each in its own task, as many connections would send them."""
    lookups = {s: Lookup(DatabaseSource(database, s)) for s in {s for s, _ in requests}}
    replies: list[Reply | None] = [None] * len(requests)

    async def one(i: int, settings: LookupSettings, request: Request) -> None:
        replies[i] = await lookups[settings].answer(request)

    async with trio.open_nursery() as nursery:
        for i, (settings, request) in enumerate(requests):
            nursery.start_soon(one, i, settings, request)
    assert all(reply is not None for reply in replies)
    return [reply for reply in replies if reply is not None]


async def test_concurrent_lookups_share_statements_and_answer_as_alone(cases_dsn: str) -> None:
    plus, dash = LookupSettings(), LookupSettings(recipient_delimiter="-")
    requests: list[tuple[LookupSettings, Request]] = []
    expected: list[Reply] = []
    for map_name, key, value in CASES * 3:
        requests.append((plus, Request(map_name.encode(), key.encode())))
        expected.append(Reply.notfound() if value is None else Reply.ok(value))
    # Other settings must never share a statement with these: the same key, other answers.
    for key, value in [("user-tag@example.com", "example.com/user/"), ("user+tag@example.com",
                                                                       None)] * 10:  # fmt: skip
        requests.append((dash, Request(b"vmailbox", key.encode())))
        expected.append(Reply.notfound() if value is None else Reply.ok(value))
    order = list(range(len(requests)))
    random.Random(7).shuffle(order)
    settings = PoolSettings(dsn=cases_dsn, pool_max_connections=2, max_keys_per_query=16)
    async with open_database(settings) as database:
        replies = await _answer_all(database, [requests[i] for i in order])
        statements, keys = database.batch_counts()
    for i, reply in zip(order, replies, strict=True):
        assert reply == expected[i], requests[i]
    # Folding to NOTFOUND without a query happens for some cases; the rest went to the
    # database, in far fewer statements than keys.
    assert keys > 0
    assert statements < keys / 2, (statements, keys)


async def test_a_key_that_breaks_its_statement_fails_alone(
    make_database: Callable[[], str],
) -> None:
    dsn = make_database()
    domains = [f"d{n}.example" for n in range(30)]
    _replace_domains_function(
        dsn, *domains, before_lookup="IF key = 'boom.example' THEN RAISE EXCEPTION 'boom'; END IF;"
    )
    keys = [*domains, "boom.example", "missing.example"]
    random.Random(3).shuffle(keys)
    settings = PoolSettings(dsn=dsn, pool_max_connections=1, max_keys_per_query=64)
    async with open_database(settings) as database:
        requests = [(LookupSettings(), Request(b"domains", k.encode())) for k in keys]
        replies = await _answer_all(database, requests)
        statements, _ = database.batch_counts()
    answers = dict(zip(keys, replies, strict=True))
    assert answers.pop("boom.example").status is Status.TEMP
    assert answers.pop("missing.example") == Reply.notfound()
    assert answers == {d: Reply.ok(d) for d in domains}
    assert statements > len(keys) / 2  # the failed batch was retried key by key


async def test_a_stalled_batch_answers_temp_and_the_pool_recovers(
    make_database: Callable[[], str],
) -> None:
    dsn = make_database()
    _replace_domains_function(
        dsn, "fast.example", before_lookup="IF key LIKE 'slow%' THEN PERFORM pg_sleep(30); END IF;"
    )
    settings = PoolSettings(dsn=dsn, pool_max_connections=1, query_timeout_s=0.5)
    async with open_database(settings) as database:
        requests = [(LookupSettings(), Request(b"domains", f"slow{n}.example".encode()))
                    for n in range(10)]  # fmt: skip
        with trio.fail_after(10):
            replies = await _answer_all(database, requests)
        assert {reply.status for reply in replies} == {Status.TEMP}
        assert all("0.5 s" in reply.value for reply in replies)
        with trio.fail_after(10):
            replies = await _answer_all(
                database, [(LookupSettings(), Request(b"domains", b"fast.example"))] * 5
            )
        assert replies == [Reply.ok("fast.example")] * 5


async def test_a_lookup_given_up_by_its_caller_leaves_the_others_alone(
    make_database: Callable[[], str],
) -> None:
    dsn = make_database()
    _replace_domains_function(
        dsn, "fast.example", before_lookup="IF key LIKE 'slow%' THEN PERFORM pg_sleep(0.5); END IF;"
    )
    settings = PoolSettings(dsn=dsn, pool_max_connections=1)
    async with open_database(settings) as database:
        lookup = Lookup(DatabaseSource(database, LookupSettings()))
        gave_up = []
        fast: list[Reply] = []

        async def impatient() -> None:
            with trio.move_on_after(0.1) as scope:
                await lookup.answer(Request(b"domains", b"slow.example"))
            gave_up.append(scope.cancelled_caught)

        async def patient() -> None:
            fast.append(await lookup.answer(Request(b"domains", b"fast.example")))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(impatient)
                await trio.sleep(0.01)  # the slow statement holds the only connection
                for _ in range(5):
                    nursery.start_soon(patient)
    assert gave_up == [True]
    assert fast == [Reply.ok("fast.example")] * 5


async def test_time_queued_behind_a_stuck_connection_counts_against_the_timeout(
    make_database: Callable[[], str],
) -> None:
    dsn = make_database()
    _replace_domains_function(dsn, before_lookup="PERFORM pg_sleep(30);")
    # One connection, stuck for the whole timeout on the first lookup; the lookups queued
    # behind it must not get a whole timeout of their own after waiting out the first one.
    settings = PoolSettings(dsn=dsn, pool_max_connections=1, query_timeout_s=2.0)
    async with open_database(settings) as database:
        lookup = Lookup(DatabaseSource(database, LookupSettings()))
        queued: list[Reply] = []

        async def behind(key: bytes) -> None:
            with trio.fail_after(3.0):  # 2 s timeout; without the rule, 3.7 s
                queued.append(await lookup.answer(Request(b"domains", key)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lookup.answer, Request(b"domains", b"first.example"))
            await trio.sleep(0.3)
            for n in range(3):
                nursery.start_soon(behind, f"queued{n}.example".encode())
    assert [reply.status for reply in queued] == [Status.TEMP] * 3


async def test_a_stuck_database_thread_costs_a_temp_not_a_hang() -> None:
    # Nothing listens there, and nothing is asked: the pool connects only on first use.
    settings = PoolSettings(dsn="postgresql://nobody@127.0.0.1:1/none", query_timeout_s=0.2)
    async with open_database(settings) as database:
        database._batcher.add = lambda job: None  # type: ignore[method-assign]  # never answers
        lookup = Lookup(DatabaseSource(database, LookupSettings()))
        with trio.fail_after(10):
            reply = await lookup.answer(Request(b"domains", b"example.com"))
    assert reply.status is Status.TEMP
    assert "database thread" in reply.value
