"""A complete copy kept current by the change feed holds exactly what a fresh snapshot holds,
after every statement of a random stream of changes (issue 16, schema version 6).

The copy is updated three ways: rows the change log names (statements of at most 1000 rows
of a record table), whole domains (domain rows, larger statements), and nothing at all for
statements that changed nothing.  Each is a separate code path over the same data, so a
seeded stream of random statements (every table; renames across domains; domains disabled,
re-enabled and mirrored; address literals and local parts holding ':' and '@'; bulk
statements past 1000 rows; several tables in one transaction) runs against a server in
complete mode, and after each statement, once the copy has applied the log up to its head,
the server's copy must equal a copy built from a snapshot read then (``copy_state``: every
table, and the keys each partition holds for a later replacement).  The property test
(test_complete_copy.py) proves a freshly built copy answers what the SQL functions answer;
this test proves the copy the server keeps is that copy.  No reload may happen: TRUNCATE is
the only change that needs one, and it is tested on its own (test_complete_mode.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import cast

import asyncpg
import pytest

from maplookup.lookup.complete import MapsCopy
from maplookup.lookup.complete.rows import SNAPSHOT_QUERIES, SnapshotRows
from tests.helpers import run_sql, run_with_connection
from tests.integration.complete_dataset import copy_state

from .test_cache_coherence import running, wait_until
from .test_complete_mode import complete_settings

SEEDS = (1, 2, 3)
STEPS = 70

MAILBOX_DOMAINS = ("a.test", "b.test", "c.test")
ALIAS_DOMAINS = ("m.test",)  # mirrors a.test, or b.test after a change
RELAY_DOMAINS = ("r.test",)
OUTSIDE = ("outside.test", "[ipv6:2001:db8::1]")  # no domain row: grants only
LOCALS = ("user", "info", "x:y", "p@q", "", "sales")

SETUP = [
    *(
        f"INSERT INTO maplookup.domains (name, kind) VALUES ('{d}', 'mailbox')"
        for d in MAILBOX_DOMAINS
    ),
    "INSERT INTO maplookup.domains (name, kind, alias_of) VALUES ('m.test', 'alias', 'a.test')",
    "INSERT INTO maplookup.domains (name, kind) VALUES ('r.test', 'relay')",
    "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
    " SELECT d, l, d || '/' || l || '/' FROM unnest(ARRAY['a.test', 'b.test']) d,"
    " unnest(ARRAY['user', 'info', 'x:y']) l",
    "INSERT INTO maplookup.aliases (domain, local_part, targets)"
    " VALUES ('a.test', 'sales', ARRAY['user@a.test', 'info@b.test'])",
]


def _q(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _statement(rng: random.Random, step: int) -> str:
    """One random change (it may fail a constraint: then it changes nothing)."""
    d, d2 = rng.choice(MAILBOX_DOMAINS), rng.choice(MAILBOX_DOMAINS)
    local = rng.choice(LOCALS)
    where = f"domain = {_q(d)} AND local_part = {_q(local)}"
    any_domain = rng.choice((*MAILBOX_DOMAINS, *ALIAS_DOMAINS, *RELAY_DOMAINS, *OUTSIDE))
    choices: list[Callable[[], str]] = [
        lambda: (
            "INSERT INTO maplookup.mailboxes (domain, local_part, path, uid)"
            f" VALUES ({_q(d)}, {_q(local)}, {_q(f'{d}/n{step}/')}, {rng.choice(('NULL', '7000'))})"
        ),
        lambda: f"DELETE FROM maplookup.mailboxes WHERE {where}",
        lambda: f"UPDATE maplookup.mailboxes SET path = {_q(f'{d}/p{step}/')} WHERE {where}",
        lambda: f"UPDATE maplookup.mailboxes SET enabled = NOT enabled WHERE {where}",
        lambda: f"UPDATE maplookup.mailboxes SET login = {_q(f'login{step}')} WHERE {where}",
        lambda: f"UPDATE maplookup.mailboxes SET domain = {_q(d2)} WHERE {where}",  # a rename
        lambda: (
            "INSERT INTO maplookup.aliases (domain, local_part, targets) VALUES"
            f" ({_q(rng.choice((d, 'm.test')))}, {_q(local)}, ARRAY[{_q(f't{step}@{d2}')}])"
        ),
        lambda: f"UPDATE maplookup.aliases SET enabled = NOT enabled WHERE {where}",
        lambda: f"DELETE FROM maplookup.aliases WHERE local_part = {_q(local)}",
        lambda: (
            "INSERT INTO maplookup.sender_grants (domain, local_part, login)"
            f" VALUES ({_q(any_domain)}, {_q(local)}, {_q(f'g{step % 3}')})"
        ),
        lambda: f"DELETE FROM maplookup.sender_grants WHERE domain = {_q(any_domain)}",
        lambda: (
            "INSERT INTO maplookup.relay_recipients (domain, local_part)"
            f" VALUES ('r.test', {_q(local)})"
        ),
        lambda: f"DELETE FROM maplookup.relay_recipients WHERE local_part = {_q(local)}",
        lambda: (
            "INSERT INTO maplookup.transports (domain, local_part, transport) VALUES"
            f" ({_q(rng.choice(('*', '.b.test', 'b.test', 'r.test')))}, '',"
            f" {_q(f'smtp:[h{step}]')})"
            " ON CONFLICT (domain, local_part) DO UPDATE SET transport = excluded.transport"
        ),
        lambda: (
            f"DELETE FROM maplookup.transports WHERE domain = {_q(rng.choice(('*', 'b.test')))}"
        ),
        lambda: f"UPDATE maplookup.domains SET enabled = NOT enabled WHERE name = {_q(any_domain)}",
        lambda: f"UPDATE maplookup.domains SET default_uid = {step + 100} WHERE name = {_q(d)}",
        lambda: f"UPDATE maplookup.domains SET alias_of = {_q(d)} WHERE name = 'm.test'",
        # Past 1000 rows: the log names the domains, not the rows.
        lambda: (
            "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
            f" SELECT {_q(d)}, 'bulk{step}.' || g, {_q(d)} || '/bulk/' || g || '/'"
            " FROM generate_series(1, 1001) g"
        ),
        lambda: (
            f"DELETE FROM maplookup.mailboxes WHERE local_part LIKE 'bulk%' AND domain = {_q(d)}"
        ),
        # Several tables in one transaction: one log row per statement, applied together.
        lambda: (
            "BEGIN;"
            f" INSERT INTO maplookup.domains (name, kind) VALUES ('n{step}.test', 'mailbox');"
            " INSERT INTO maplookup.mailboxes (domain, local_part, path)"
            f" VALUES ('n{step}.test', {_q(local)}, 'n/');"
            f" UPDATE maplookup.mailboxes SET uid = {step + 1} WHERE {where};"
            " COMMIT"
        ),
    ]
    return rng.choice(choices)()


def _snapshot_copy(dsn: str) -> tuple[int, MapsCopy]:
    """The change-log head and a copy built from a snapshot of that moment."""

    async def read(conn: asyncpg.Connection) -> tuple[int, MapsCopy]:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            head: int = await conn.fetchval("SELECT maplookup.change_log_head()")
            tables = {table: await conn.fetch(query) for table, query in SNAPSHOT_QUERIES.items()}
        return head, MapsCopy.build(SnapshotRows(**tables))

    return cast(tuple[int, MapsCopy], run_with_connection(dsn, read))


def _try(dsn: str, statement: str) -> bool:
    try:
        run_sql(dsn, statement)
    except asyncpg.PostgresError:
        return False
    return True


@pytest.mark.parametrize("seed", SEEDS)
async def test_the_copy_the_server_keeps_is_the_snapshot_after_every_change(
    make_database: Callable[[], str], seed: int
) -> None:
    dsn = make_database()
    run_sql(dsn, *SETUP)
    rng = random.Random(seed)
    async with running(complete_settings(dsn), dsn) as service:
        source = service.copy
        assert source is not None
        applied = 0
        for step in range(STEPS):
            statement = _statement(rng, step)
            applied += _try(dsn, statement)
            head, fresh = _snapshot_copy(dsn)
            await wait_until(lambda head=head: (source.position or 0) >= head)
            held = source.copy
            assert held is not None
            assert copy_state(held) == copy_state(fresh), f"seed {seed}, step {step}: {statement}"
        counters = source.counters
        assert counters.loads == 1  # no reload: every change applied in place
        assert counters.records_replaced > 0
        assert counters.partitions_replaced > 0
        assert applied > STEPS // 3  # the stream changed something
