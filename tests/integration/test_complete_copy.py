"""Property test: the complete copy answers exactly what the SQL lookup functions answer.

Issue 16 allows two implementations of the map contract only with a proof that they agree.
For random datasets (complete_dataset.py: every kind of domain, mailboxes, aliases, grants,
relay recipients, transports) and random keys, each example:

1. loads the dataset into a real PostgreSQL (the constraints check the rows);
2. reads it back with the snapshot statements (``rows.SNAPSHOT_QUERIES``) in one REPEATABLE
   READ transaction, as the server's loader will, and builds a :class:`MapsCopy`;
3. builds a second copy in which a random set of partitions (domain names) holds another
   random dataset's rows, then replaces those from ``copy_load.read_rows`` (the
   change-feed path): it must hold exactly what the first holds;
4. asks every map, for every key, the SQL function (``maps.batch_query_for``, the server's
   statement) and the copy, and compares: once with the key as the server binds it
   (``maps.fold_key``), once with the text as received (what a pgsql: table may be asked).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from maplookup.db.copy_load import ChangePlan, read_rows
from maplookup.lookup.complete import MapsCopy, lookup
from maplookup.lookup.complete.rows import RECORD_TABLES, SNAPSHOT_QUERIES, SnapshotRows
from maplookup.lookup.complete.semantics import split_address
from maplookup.maps import LookupSettings, MapName, batch_query_for, fold_key
from tests.integration.complete_dataset import (
    DELIMITERS,
    NAMES,
    Dataset,
    copy_state,
    datasets,
    keys,
)

# MAPLOOKUP_TEST_EXAMPLES=2000 (with pytest --timeout 900) for a deeper run.
EXAMPLES = int(os.environ.get("MAPLOOKUP_TEST_EXAMPLES", "200"))
# Shrinking a failure costs thousands of database round trips (minutes, past the test's
# timeout): off unless asked for.  The failure message names the map, the key, both answers
# and the settings, and hypothesis prints the whole example.
SHRINK = os.environ.get("MAPLOOKUP_TEST_SHRINK") == "1"


@dataclass
class Tally:
    examples: int = 0
    compared: int = 0
    found: dict[str, int] = field(default_factory=dict)


TALLY = Tally()


@dataclass(frozen=True)
class Case:
    data: Dataset
    before: Dataset  # what the stale partitions of the updated copy held
    stale: frozenset[str]  # the partitions replaced in the updated copy
    settings: LookupSettings
    keys: tuple[bytes, ...]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    delimiter = draw(st.sampled_from(DELIMITERS))
    data = draw(datasets())
    lookup_settings = LookupSettings(
        recipient_delimiter=delimiter,
        default_uid=draw(st.one_of(st.none(), st.just(2000))),
        default_gid=draw(st.one_of(st.none(), st.just(3000))),
        smtputf8_enable=draw(st.integers(0, 3).map(bool)),
    )
    return Case(
        data=data,
        before=draw(datasets()),
        stale=frozenset(draw(st.sets(st.sampled_from(NAMES)))),
        settings=lookup_settings,
        keys=tuple(draw(st.lists(keys(data, delimiter), min_size=5, max_size=20))),
    )


def _python_rows(data: Dataset) -> SnapshotRows:
    """A dataset's rows as the snapshot statements would return them (no database)."""
    null = set(data.null_logins)
    return SnapshotRows(
        domains=data.domains,
        mailboxes=[
            (d, lp, path, uid, gid, None if (d, lp) in null else login, enabled)
            for d, lp, path, uid, gid, login, enabled in data.mailboxes
        ],
        aliases=data.aliases,
        sender_grants=data.grants,
        relay_recipients=data.relay_recipients,
        transports=data.transports,
    )


async def _partitions(conn: Any, names: list[str]) -> SnapshotRows:
    plan = ChangePlan(False, frozenset(names), frozenset())
    return (await read_rows(conn, plan, timeout_s=30.0))[0]


async def _read(conn: Any, queries: dict[str, str], *args: object) -> SnapshotRows:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        tables = {table: await conn.fetch(query, *args) for table, query in queries.items()}
    return SnapshotRows(**tables)


def _count(copy: MapsCopy, map_name: MapName, key: str, answer: str, delimiter: str) -> None:
    """Which rules the positive answers exercised (the proof covers only what it meets)."""
    found = [map_name.value]
    split = split_address(key, delimiter)
    if map_name is MapName.VIRTUAL and split is not None:
        kind, _, targets = answer.partition("\n")
        found.append(f"virtual {kind}")
        row = copy.domain(split.domain)
        mirrored = None if row is None else row.alias_of
        own = (split.local_part, split.base_part)
        if targets in (f"{local}@{split.domain}" for local in own):
            found.append("virtual: a mailbox answers for itself")
        elif mirrored is not None and targets.endswith(f"@{mirrored}"):
            found.append("virtual: mirror")
    if map_name is MapName.SENDER_LOGIN and "," in answer:
        found.append("sender_login: several owners")
    for name in found:
        TALLY.found[name] = TALLY.found.get(name, 0) + 1


async def _check(conn: Any, case: Case) -> None:
    await case.data.load(conn)
    snapshot = await _read(conn, SNAPSHOT_QUERIES)
    full = MapsCopy.build(snapshot)

    # A copy whose stale partitions hold another dataset's rows, the others the current ones;
    # replacing the stale ones from the partition statements must give the full copy.
    stale = sorted(case.stale)
    before = _python_rows(case.before)
    mixed = SnapshotRows(
        **{
            table: [row for row in getattr(before, table) if row[0] in case.stale]
            + [row for row in getattr(snapshot, table) if row[0] not in case.stale]
            for table in SNAPSHOT_QUERIES
        }
    )
    updated = MapsCopy.build(mixed)
    updated.replace(stale, await _partitions(conn, stale))
    assert copy_state(updated) == copy_state(full)

    # The same with the records alone (the change log naming rows, schema version 6): the
    # domain rows current, the stale partitions' records another dataset's; re-reading the
    # keys of both (``read_rows``) must give the full copy.  A first change adds the
    # keys' entries to ``added``; a second replaces the partitions, which must remove them.
    records = SnapshotRows(
        domains=snapshot.domains,
        **{
            table: [row for row in getattr(before, table) if row[0] in case.stale]
            + [row for row in getattr(snapshot, table) if row[0] not in case.stale]
            for table in RECORD_TABLES
        },
    )
    by_rows = MapsCopy.build(records)
    record_keys = {
        f"{table}:{row[1]}@{row[0]}"
        for source in (before, snapshot)
        for table in RECORD_TABLES
        for row in getattr(source, table)
        if row[0] in case.stale
    }
    plan = ChangePlan(False, frozenset(), frozenset(record_keys))
    by_rows.apply_records(record_keys, (await read_rows(conn, plan, timeout_s=30.0))[1])
    assert copy_state(by_rows) == copy_state(full)
    by_rows.replace(stale, await _partitions(conn, stale))
    assert copy_state(by_rows) == copy_state(full)

    for map_name in MapName:
        texts = []
        for raw in case.keys:
            folded = fold_key(map_name, raw, case.settings.smtputf8_enable)
            if folded is not None:
                texts.append(folded)
            try:
                received = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if "\x00" not in received:
                texts.append(received)
        if not texts:
            continue
        query, args = batch_query_for(map_name, case.settings)
        rows = await conn.fetch(query, texts, *args)
        for text, row in zip(texts, rows, strict=True):
            expected = row[0]
            got = lookup(full, map_name, text, case.settings)
            assert got == expected, (
                f"map={map_name.value} key={text!r} settings={case.settings}: "
                f"copy {got!r}, SQL {expected!r}"
            )
            TALLY.compared += 1
            if expected is not None:
                _count(full, map_name, text, expected, case.settings.recipient_delimiter)
    TALLY.examples += 1


@pytest.fixture(scope="module")
def connection(make_database: Callable[[], str]) -> Iterator[tuple[asyncio.AbstractEventLoop, Any]]:
    dsn = make_database()
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(asyncpg.connect(dsn))
    try:
        yield loop, conn
    finally:
        loop.run_until_complete(conn.close())
        loop.close()


def _example(keys: tuple[bytes, ...], **rows: tuple[Any, ...]) -> Case:
    """An explicit example: rules that random rows meet too rarely to rely on."""
    empty = Dataset((), (), (), (), (), (), ())
    data = Dataset(
        **{
            name: rows.get(name, ())
            for name in (
                "domains",
                "mailboxes",
                "null_logins",
                "aliases",
                "grants",
                "relay_recipients",
                "transports",
            )
        }
    )
    return Case(data, empty, frozenset(), LookupSettings("+", None, None), keys)


_A = ("a.test", "mailbox", None, None, None, True)
EXPLICIT = (
    # mailbox_login: the exact mailbox has no login, the one without extension has one.
    _example(
        (b"info@a.test", b"u+v@a.test"),
        domains=(_A,),
        mailboxes=(
            ("a.test", "u+v", "a.test/u+v/", None, None, None, True),
            ("a.test", "u", "a.test/u/", None, None, "ulogin", True),
        ),
        null_logins=(("a.test", "u+v"),),
        aliases=(("a.test", "info", ["u+v@a.test"], True),),
    ),
    # sender_login in a mirror: the mirrored domain's '@domain' grants.
    _example(
        (b"info@m.test", b"nobody@m.test", b"info+x@a.test"),
        domains=(_A, ("m.test", "alias", "a.test", None, None, True)),
        mailboxes=(("a.test", "info", "a.test/info/", None, None, None, True),),
        grants=(("a.test", "", "Bob"), ("m.test", "info", "zed")),
    ),
    # A quoted local part holding '"': the SQL unquotes the server's internal form again.
    _example(
        (b'"a\\"b"@a.test', b'a"b@a.test', b"ab@a.test"),
        domains=(_A,),
        mailboxes=(
            ("a.test", 'a"b', "a.test/q/", None, None, None, True),
            ("a.test", "ab", "a.test/ab/", None, None, None, True),
        ),
    ),
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    phases=tuple(p for p in Phase if SHRINK or p is not Phase.shrink),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=cases())
@example(case=EXPLICIT[0])
@example(case=EXPLICIT[1])
@example(case=EXPLICIT[2])
def _check_examples(connection: tuple[asyncio.AbstractEventLoop, Any], case: Case) -> None:
    loop, conn = connection
    loop.run_until_complete(_check(conn, case))


def test_the_copy_answers_what_the_sql_functions_answer(
    connection: tuple[asyncio.AbstractEventLoop, Any],
) -> None:
    _check_examples(connection)
    print(
        f"\ncomplete copy: {TALLY.examples} datasets, {TALLY.compared} answers compared with"
        f" the SQL functions; found per map {dict(sorted(TALLY.found.items()))}"
    )
    assert TALLY.examples >= EXAMPLES // 2
    # The generators must reach every map's positive answers, or the proof proves little.
    assert set(TALLY.found) >= {m.value for m in MapName} | set(RULES)


#: Rules the generated examples must reach (counted by _count).
RULES = (
    "virtual E",
    "virtual B",
    "virtual C",
    "virtual: a mailbox answers for itself",
    "virtual: mirror",
    "sender_login: several owners",
)
