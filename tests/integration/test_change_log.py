"""The change log in PostgreSQL (schema version 4): what the triggers write, in which order,
pruning, and a snapshot consistent with a position (maplookup/db/feed.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import trio

from maplookup.db import copy_load, feed
from maplookup.db.feed import EVERYTHING, Change
from maplookup.lookup.cache import AnswerCache, CacheSettings, CachingSource
from maplookup.lookup.complete.rows import SnapshotRows
from tests.helpers import run_sql, run_with_connection
from tests.integration.test_cache_coherence import SCHEMA_DATA, wait_until


@pytest.fixture
def dsn(make_database: Callable[[], str]) -> str:
    dsn = make_database()
    run_sql(dsn, *SCHEMA_DATA)
    return dsn


def _changes(dsn: str, after: int = 0, max_rows: int = 1000) -> list[Change]:
    async def read() -> list[Change]:
        conn = await asyncpg.connect(dsn)
        try:
            return await feed.changes_after(conn, after, max_rows)
        finally:
            await conn.close()

    return asyncio.run(read())


def _head(dsn: str) -> int:
    async def read() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            return await feed.head_position(conn)
        finally:
            await conn.close()

    return asyncio.run(read())


def test_each_changing_statement_logs_its_domains_in_order(dsn: str) -> None:
    head = _head(dsn)
    run_sql(
        dsn,
        "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
        " SELECT 'example.com', 'bulk' || g, 'example.com/bulk' || g || '/'"
        " FROM generate_series(1, 500) g",
        "UPDATE maplookup.mailboxes SET path = 'x/' WHERE local_part = 'nobody'",  # no rows
        "TRUNCATE maplookup.aliases",
    )
    changes = _changes(dsn, head)
    # One row for the 500-row statement, naming the mirror domain too; none for a statement
    # that changed nothing; '*' for TRUNCATE.
    assert [c.domains for c in changes] == [("example.com", "example.org"), (EVERYTHING,)]
    assert changes[0].position > head
    assert changes[1].position > changes[0].position
    assert _head(dsn) == changes[1].position
    assert _changes(dsn, changes[0].position) == changes[1:]
    assert _changes(dsn, head, max_rows=1) == changes[:1]


def _records_after(dsn: str, after: int) -> list[tuple[tuple[str, ...], list[str] | None]]:
    async def read(conn: asyncpg.Connection) -> list[asyncpg.Record]:
        return await conn.fetch(
            "SELECT domains, records FROM maplookup.changes_with_records_after($1, 1000)", after
        )

    rows = cast(list[asyncpg.Record], run_with_connection(dsn, read))
    return [
        (tuple(row["domains"]), None if row["records"] is None else sorted(row["records"]))
        for row in rows
    ]


def test_record_changes_log_their_rows_up_to_1000(dsn: str) -> None:
    """Schema version 6: a statement that changed at most 1000 rows of a record table logs
    their keys (old and new, an UPDATE that renames included); a larger one, a domain row and
    TRUNCATE log none (the reader re-reads the domains)."""
    head = _head(dsn)
    run_sql(
        dsn,
        "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
        " VALUES ('example.com', 'a:b', 'example.com/ab/')",
        "UPDATE maplookup.mailboxes SET local_part = 'c' WHERE local_part = 'a:b'",
        "INSERT INTO maplookup.transports (domain, transport) VALUES ('*', 'smtp:[relay]')",
        "INSERT INTO maplookup.sender_grants (domain, local_part, login)"
        " VALUES ('example.com', 'c', 'x'), ('example.com', 'c', 'y')",
        "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
        " SELECT 'example.com', 'bulk' || g, 'example.com/bulk' || g || '/'"
        " FROM generate_series(1, 1001) g",
        "UPDATE maplookup.domains SET default_uid = 1 WHERE name = 'example.com'",
        "TRUNCATE maplookup.aliases",
    )
    assert _records_after(dsn, head) == [
        (("example.com", "example.org"), ["mailboxes:a:b@example.com"]),
        (("example.com", "example.org"), ["mailboxes:a:b@example.com", "mailboxes:c@example.com"]),
        ((EVERYTHING,), ["transports:@*"]),
        (("example.com", "example.org"), ["sender_grants:c@example.com"]),
        (("example.com", "example.org"), None),
        (("example.com", "example.org"), None),
        ((EVERYTHING,), None),
    ]


def test_record_keys_split_at_the_last_at_sign(dsn: str) -> None:
    """A local part may hold ':' and '@', a grant's domain ':' (an address literal): the key
    ``table:local_part@domain`` splits at the first ':' and the last '@', and the rows it
    names are read back (``copy_load.read_rows``, the statement the copy uses)."""
    head = _head(dsn)
    run_sql(
        dsn,
        "INSERT INTO maplookup.sender_grants (domain, local_part, login)"
        " VALUES ('[ipv6:2001:db8::1]', 'a@b:c', 'owner')",
    )
    ((_, keys),) = _records_after(dsn, head)
    assert keys == ["sender_grants:a@b:c@[ipv6:2001:db8::1]"]

    async def read(conn: asyncpg.Connection) -> SnapshotRows:
        plan = copy_load.ChangePlan(False, frozenset(), frozenset(keys))
        return (await copy_load.read_rows(conn, plan, timeout_s=10.0))[1]

    rows = cast(SnapshotRows, run_with_connection(dsn, read))
    assert [tuple(row) for row in rows.sender_grants] == [("[ipv6:2001:db8::1]", "a@b:c", "owner")]


def test_a_long_list_of_domains_is_logged_whole(dsn: str) -> None:
    # NOTIFY's payload is limited (8000 bytes: it says '*'); the log names every domain.
    head = _head(dsn)
    run_sql(
        dsn,
        "INSERT INTO maplookup.domains (name, kind)"
        " SELECT 'domain-number-' || g || '.example', 'mailbox' FROM generate_series(1, 600) g",
    )
    (change,) = _changes(dsn, head)
    assert len(change.domains) == 600


async def test_a_writer_waits_for_the_one_before_it_to_commit(dsn: str) -> None:
    """Positions in commit order: a second writer cannot take a position until the first has
    committed, so no reader ever sees position N while N-1 is still to come."""

    async def scenario() -> tuple[int, int, list[Change]]:
        first = await asyncpg.connect(dsn)
        second = await asyncpg.connect(dsn)
        reader = await asyncpg.connect(dsn)
        try:
            head = await feed.head_position(reader)
            transaction = first.transaction()
            await transaction.start()
            await first.execute("UPDATE maplookup.mailboxes SET path = 'example.com/a/'")
            first_position = await first.fetchval("SELECT maplookup.change_log_head()")
            waiting = asyncio.create_task(
                second.execute(
                    "UPDATE maplookup.domains SET default_uid = 6000 WHERE name = 'example.com'"
                )
            )
            second_pid = second.get_server_pid()
            async with asyncio.timeout(10):
                # The second writer waits for the change log's advisory lock.
                while not await reader.fetchval(  # noqa: ASYNC110 - polling PostgreSQL, bounded
                    "SELECT wait_event = 'advisory' FROM pg_stat_activity WHERE pid = $1",
                    second_pid,
                ):
                    await asyncio.sleep(0.01)
            assert not waiting.done()
            assert await feed.changes_after(reader, head) == []  # nothing committed yet
            await transaction.commit()
            await waiting
            return first_position, head, await feed.changes_after(reader, head)
        finally:
            for conn in (first, second, reader):
                await conn.close()

    first_position, _head_before, changes = await trio.to_thread.run_sync(
        lambda: asyncio.run(scenario())
    )
    assert len(changes) == 2
    assert changes[0].position == first_position
    assert changes[1].position > first_position


def test_pruning_moves_the_horizon_and_a_reader_behind_it_gets_everything(dsn: str) -> None:
    head = _head(dsn)
    run_sql(dsn, "UPDATE maplookup.mailboxes SET path = 'example.com/1/'")
    run_sql(dsn, "UPDATE maplookup.mailboxes SET path = 'example.com/2/'")
    (first, second) = _changes(dsn, head)
    run_sql(
        dsn,
        "UPDATE maplookup.change_feed SET retention = interval '1 microsecond'",
        "SELECT maplookup.prune_change_log()",
    )
    # Everything was old: all rows gone, the horizon at the newest, the head where it was.
    assert _head(dsn) == second.position
    assert _changes(dsn, second.position) == []
    assert _changes(dsn, head) == [Change(second.position, (EVERYTHING,))]
    run_sql(
        dsn,
        "UPDATE maplookup.change_feed SET retention = interval '1 hour'",
        "UPDATE maplookup.mailboxes SET path = 'example.com/3/'",
    )
    (gap, third) = _changes(dsn, first.position)
    assert gap == Change(second.position, (EVERYTHING,))
    assert third.domains == ("example.com", "example.org")
    assert _changes(dsn, second.position) == [third]


def test_writers_prune_now_and_then(dsn: str) -> None:
    run_sql(
        dsn,
        "UPDATE maplookup.change_feed SET retention = interval '1 microsecond'",
        # 150 changes: at least one position divisible by 100 prunes what came before.
        *["UPDATE maplookup.mailboxes SET path = 'example.com/p/'"] * 150,
    )
    rows = _changes(dsn, 0)
    assert rows[0].domains == (EVERYTHING,)
    assert len(rows) < 100


async def test_a_snapshot_is_the_state_at_its_position(dsn: str) -> None:
    async def scenario() -> tuple[int, str, str, list[Change]]:
        conn = await asyncpg.connect(dsn)
        writer = await asyncpg.connect(dsn)
        try:
            async with feed.snapshot(conn) as position:
                await writer.execute("UPDATE maplookup.mailboxes SET path = 'example.com/new/'")
                inside = await conn.fetchval("SELECT path FROM maplookup.mailboxes")
                head_inside = await feed.head_position(conn)
                assert head_inside == position  # the snapshot does not move
            after = await conn.fetchval("SELECT path FROM maplookup.mailboxes")
            return position, inside, after, await feed.changes_after(conn, position)
        finally:
            await conn.close()
            await writer.close()

    position, inside, after, changes = await trio.to_thread.run_sync(
        lambda: asyncio.run(scenario())
    )
    assert inside == "example.com/user/"
    assert after == "example.com/new/"
    # What the snapshot did not see is exactly what follows its position.
    assert [c.domains for c in changes] == [("example.com", "example.org")]
    assert changes[0].position > position


async def test_a_feed_behind_a_pruned_log_flushes(dsn: str) -> None:
    """A reader that fell behind the pruned horizon has missed changes: the cache flushes."""
    from maplookup.db.changes import ChangeFeed, FeedSettings
    from maplookup.db.database import PoolSettings, open_database
    from maplookup.lookup.answer import DatabaseSource
    from maplookup.maps import LookupSettings

    async with open_database(PoolSettings(dsn=dsn)) as database:
        cache = AnswerCache(CacheSettings())
        CachingSource(DatabaseSource(database, LookupSettings()), cache)
        change_feed = ChangeFeed(
            FeedSettings(dsn=dsn, poll_interval_s=60.0),  # reads only when woken
            invalidate=cache.invalidate_domains,
            flush=cache.flush,
            set_live=cache.set_live,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(change_feed.run, database.bridge)
            await wait_until(lambda: cache.live and change_feed.listening)
            flushes = cache.counters.flushes
            # Two changes and a prune in one transaction: one NOTIFY at commit, and by then
            # the rows the feed has not read are gone.
            run_sql(
                dsn,
                "BEGIN; UPDATE maplookup.change_feed SET retention = interval '1 microsecond';"
                " UPDATE maplookup.mailboxes SET path = 'example.com/1/';"
                " UPDATE maplookup.aliases SET enabled = false;"
                " SELECT maplookup.prune_change_log(); COMMIT",
            )
            await wait_until(lambda: cache.counters.flushes > flushes)
            assert cache.counters.invalidations == 0
            nursery.cancel_scope.cancel()


def test_a_reader_granted_before_version_4_reads_the_log(dsn: str) -> None:
    """deploy/README.md grants SELECT on the tables once; the log's tables came later."""
    role = f"reader_{abs(hash(dsn)) % 10**8}"
    run_sql(
        dsn,
        f'DROP ROLE IF EXISTS "{role}"',
        f'CREATE ROLE "{role}" LOGIN',
        f'GRANT USAGE ON SCHEMA maplookup TO "{role}"',
        f'GRANT SELECT ON maplookup.domains, maplookup.mailboxes, maplookup.aliases TO "{role}"',
        "UPDATE maplookup.mailboxes SET path = 'example.com/r/'",
    )
    parts = urlsplit(dsn)
    reader = urlunsplit(parts._replace(netloc=parts.netloc.replace("maplookup@", f"{role}@", 1)))
    assert reader != dsn
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            run_sql(reader, "SELECT * FROM maplookup.change_log")
        assert _head(reader) == _head(dsn)
        assert _changes(reader, 0) == _changes(dsn, 0)
    finally:
        run_sql(dsn, f'DROP OWNED BY "{role}"', f'DROP ROLE "{role}"')
