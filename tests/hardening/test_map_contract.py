"""Property test: for random small datasets and keys, lookups equal the Python model of §3.

The answers come from ``maplookup.lookup.Lookup`` over ``DatabaseSource`` (the SQL functions in a
real PostgreSQL), once straight and once behind the ``CachingSource``; the expectation comes from
``bench/lib/model.py``, written from DESIGN.md §3 and schema.sql's comments without
calling SQL.  A wrapper in front of the database fails a random share of the calls (a database
error, a timeout, or an unexpected exception, i.e. a bug): such a lookup must answer TEMP, or,
behind the cache, the answer cached before; never NOTFOUND (DESIGN.md §2.2, §5).

One database is reused; each example replaces its rows (TRUNCATE in one transaction) and each
example runs in its own ``trio.run``.  The database pool lives in its own asyncio thread
(``maplookup.db.AsyncioThread``) for the whole module, as in the server.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.lib.model import ALL_MAPS, Alias, Dataset, Domain, Mailbox, MapModel
from maplookup.db.database import (
    AsyncioThread,
    Database,
    DatabaseError,
    DatabaseTimeout,
    PoolSettings,
    close_database,
    start_database,
)
from maplookup.lookup.answer import AnswerSource, DatabaseSource, Lookup
from maplookup.lookup.cache import AnswerCache, CacheSettings, CachingSource
from maplookup.maps import LookupSettings, MapName
from maplookup.protocol import Reply, Request, Status

EXAMPLES = 100

DOMAIN_NAMES = ("a.test", "b.test", "c.test", "m.test")
LOCAL_PARTS = (
    "user",
    "info",
    "bob",
    "postmaster",
    "owner-x",
    "x-request",
    "u+v",
    "a.b",
    "x-y",
    "é",
)
TARGETS = ("x@ext.test", "user@a.test", "y+z@ext.test", "Mixed@Ext.test", "local", "a b@ext.test")
# '@domain' targets stand alone (Postfix reads '@' only at the start of the whole result).
SOLE_TARGETS = ("@ext.test", "@b.test")
# Extensions as senders write them, including characters that mean something to regexes.
EXTENSIONS = ("tag", "", "x+y", "a-b", "é", "&", "\\1", "\\\\", "$1", "%")
DELIMITERS = ("+", "-", "+-", ".", "+=", "")
CASES: tuple[Callable[[str], str], ...] = (str.lower, str.upper, str.swapcase, str.title)
SPECIAL_KEYS = (
    b"",
    b"@",
    b"user",
    b"user@",
    b"@a.test",
    b"@m.test",
    b"a@b@a.test",
    b"\xff\xfe@a.test",
    b"us\x00er@a.test",
    b"USER@A.TEST\x00",
    b"+tag@a.test",
)
FAULTS = ("error", "timeout", "bug")


# -- the counters this module reports ----------------------------------------------------------


@dataclass
class Tally:
    examples: int = 0
    lookups: int = 0
    compared: int = 0
    faults_injected: int = 0
    temp_on_fault: int = 0
    stale_on_fault: int = 0
    answers: dict[str, int] = field(default_factory=dict)


TALLY = Tally()


# -- strategies --------------------------------------------------------------------------------


@st.composite
def datasets(draw: st.DrawFn) -> Dataset:
    kinds = {name: draw(st.sampled_from(["mailbox", "alias", "absent"])) for name in DOMAIN_NAMES}
    mailbox_domains = [n for n, k in kinds.items() if k == "mailbox"]
    ids = st.one_of(st.none(), st.integers(1000, 1010))
    domains = []
    for name, kind in kinds.items():
        if kind == "absent":
            continue
        enabled = draw(st.integers(0, 3).map(bool))  # mostly enabled
        if kind == "mailbox":
            domains.append(Domain(name, "mailbox", None, draw(ids), draw(ids), enabled=enabled))
        else:
            alias_of = None
            if mailbox_domains:
                alias_of = draw(st.one_of(st.none(), st.sampled_from(mailbox_domains)))
            domains.append(Domain(name, "alias", alias_of, enabled=enabled))
    present = [d.name for d in domains]
    mailboxes = []
    for domain in mailbox_domains:
        for local in draw(st.sets(st.sampled_from(("", *LOCAL_PARTS)), max_size=5)):
            mailboxes.append(
                Mailbox(
                    domain,
                    local,
                    f"{domain}/{local or '@'}/",
                    draw(ids),
                    draw(ids),
                    enabled=draw(st.integers(0, 4).map(bool)),
                )
            )
    aliases = []
    for domain in present:
        for local in draw(st.sets(st.sampled_from(("", *LOCAL_PARTS)), max_size=4)):
            targets = draw(
                st.one_of(
                    st.lists(st.sampled_from(TARGETS), min_size=1, max_size=3),
                    st.sampled_from(SOLE_TARGETS).map(lambda t: [t]),
                )
            )
            aliases.append(
                Alias(domain, local, tuple(targets), enabled=draw(st.integers(0, 4).map(bool)))
            )
    return Dataset(tuple(domains), tuple(mailboxes), tuple(aliases))


@st.composite
def lookup_keys(draw: st.DrawFn, data: Dataset, delimiter: str) -> bytes:
    """A key for any map: mostly addresses and domains of the dataset, some never stored."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.sampled_from(SPECIAL_KEYS))
    case = draw(st.sampled_from(CASES))
    stored = [(m.local_part, m.domain) for m in data.mailboxes]
    stored += [(a.local_part, a.domain) for a in data.aliases]
    if kind == 1:
        return case(draw(st.sampled_from((*DOMAIN_NAMES, "unknown.test")))).encode()
    if kind <= 6 and stored:
        local, domain = draw(st.sampled_from(stored))
        # The same local part in another domain reaches mirrors and catch-alls.
        if draw(st.integers(0, 3)) == 0:
            domain = draw(st.sampled_from(DOMAIN_NAMES))
    else:
        local = draw(st.one_of(st.sampled_from(("", *LOCAL_PARTS)), st.text("abc+-.", max_size=4)))
        domain = draw(st.sampled_from((*DOMAIN_NAMES, "unknown.test")))
    if delimiter and draw(st.booleans()):
        local += draw(st.sampled_from(delimiter)) + draw(st.sampled_from(EXTENSIONS))
    return case(f"{local}@{domain}").encode()


@dataclass(frozen=True)
class Case:
    data: Dataset
    delimiter: str
    default_uid: int | None
    default_gid: int | None
    keys: tuple[bytes, ...]
    fault_rate: float
    seed: int
    extra_map: str


@st.composite
def cases(draw: st.DrawFn) -> Case:
    delimiter = draw(st.sampled_from(DELIMITERS))
    data = draw(datasets())
    return Case(
        data=data,
        delimiter=delimiter,
        default_uid=draw(st.one_of(st.none(), st.just(2000))),
        default_gid=draw(st.one_of(st.none(), st.just(3000))),
        keys=tuple(draw(st.lists(lookup_keys(data, delimiter), min_size=4, max_size=20))),
        fault_rate=draw(st.sampled_from((0.0, 0.0, 0.2, 0.5))),
        seed=draw(st.integers(0, 2**32 - 1)),
        extra_map=draw(st.sampled_from(("nosuch", "VMAILBOX", "vmailbox ", "x"))),
    )


# -- fault injection ---------------------------------------------------------------------------


class FaultyBackend:
    """Wraps the Database: fails a share of the calls; records whether the last one failed."""

    def __init__(self, inner: Database, rate: float, rng: random.Random) -> None:
        self._inner = inner
        self._rate = rate
        self._rng = rng
        self.calls = 0
        self.failures = 0

    async def lookup(self, map_name: MapName, key: str, settings: LookupSettings) -> str | None:
        self.calls += 1
        if self._rng.random() < self._rate:
            self.failures += 1
            fault = self._rng.choice(FAULTS)
            if fault == "error":
                raise DatabaseError("injected: connection lost")
            if fault == "timeout":
                raise DatabaseTimeout("injected: no answer within the query timeout")
            raise RuntimeError("injected: a bug below the lookup layer")
        return await self._inner.lookup(map_name, key, settings)


# -- the database, for the whole module --------------------------------------------------------


@pytest.fixture(scope="module")
def database(make_database: Callable[[], str]) -> Iterator[Database]:
    dsn = make_database()
    pool_settings = PoolSettings(dsn=dsn, pool_max_connections=4, query_timeout_s=10.0)
    bridge = AsyncioThread()
    bridge.start()
    database = bridge.submit(start_database(bridge, pool_settings)).result(timeout=30)
    try:
        yield database
    finally:
        bridge.submit(close_database(database)).result(timeout=30)
        bridge.stop()


async def _load(database: Database, data: Dataset) -> None:
    pool: Any = database._pool

    async def load() -> None:
        async with pool.acquire() as conn:
            await data.load(conn)

    await database.bridge.run(load())


def _describe(reply: Reply) -> str:
    return reply.status.value if reply.status is not Status.OK else f"OK {reply.value}"


async def _check(database: Database, case: Case) -> None:
    await _load(database, case.data)
    model = MapModel(case.data, case.delimiter, case.default_uid, case.default_gid)
    lookup_settings = LookupSettings(case.delimiter, case.default_uid, case.default_gid)
    rng = random.Random(case.seed)
    faulty = FaultyBackend(database, case.fault_rate, rng)
    straight = Lookup(DatabaseSource(faulty, lookup_settings))
    cache = AnswerCache(CacheSettings(max_entries=1000))
    cache.set_live(True)
    behind_cache = DatabaseSource(faulty, lookup_settings)
    cached_source: AnswerSource = CachingSource(behind_cache, cache)
    cached = Lookup(cached_source, behind_cache)

    requests = [(m, k) for k in case.keys for m in sorted(ALL_MAPS)]
    requests.append((case.extra_map, case.keys[0]))
    # Behind the cache every request comes twice, so hits, stale answers and misses all occur.
    plan = [(straight, r) for r in requests] + [(cached, r) for r in requests * 2]
    rng.shuffle(plan)
    # Part way through, the cache stops being live (its LISTEN connection dropped): entries
    # are then no longer fresh, every lookup asks the database, and a failed call may be
    # answered from an entry stored before (DESIGN.md §5).
    lost_listen_at = rng.randrange(len(plan))
    for step, (lookup, (map_name, key)) in enumerate(plan):
        if step == lost_listen_at:
            cache.set_live(False)
        calls, failures = faulty.calls, faulty.failures
        reply = await lookup.answer(Request(map_name.encode(), key))
        TALLY.lookups += 1
        TALLY.answers[reply.status.value] = TALLY.answers.get(reply.status.value, 0) + 1
        where = (
            f"map={map_name!r} key={key!r} delimiter={case.delimiter!r} "
            f"{'cached' if lookup is cached else 'straight'}"
        )
        if map_name not in ALL_MAPS:
            assert reply.status is Status.PERM, f"{where}: {_describe(reply)}"
            continue
        expected = model.answer(map_name, key)
        expected_reply = Reply.notfound() if expected is None else Reply.ok(expected)
        failed = faulty.failures > failures
        if faulty.calls == calls:
            # No database call: only a key that cannot name anything may be answered so.
            assert model.fold(map_name, key) is None or lookup is cached, where
        if failed:
            TALLY.faults_injected += 1
            # The one rule that protects mail: an error is never NOTFOUND.  Behind the cache an
            # answer stored earlier (from the same data) may be served instead of TEMP.
            if reply.status is Status.TEMP:
                TALLY.temp_on_fault += 1
                continue
            assert lookup is cached, f"{where}: database failed, answered {_describe(reply)}"
            TALLY.stale_on_fault += 1
        assert reply.status is not Status.TEMP or failed, f"{where}: TEMP without a fault"
        assert reply == expected_reply, (
            f"{where}: server {_describe(reply)}, model {_describe(expected_reply)}"
        )
        TALLY.compared += 1
    TALLY.examples += 1


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=cases())
def _check_examples(database: Database, case: Case) -> None:
    trio.run(_check, database, case)


def test_lookups_match_the_model_and_faults_never_give_notfound(database: Database) -> None:
    _check_examples(database)
    print(
        f"\nmap contract: {TALLY.examples} datasets, {TALLY.lookups} lookups, "
        f"{TALLY.compared} compared with the model, {TALLY.faults_injected} database calls "
        f"failed ({TALLY.temp_on_fault} answered TEMP, {TALLY.stale_on_fault} from the cache); "
        f"answers {dict(sorted(TALLY.answers.items()))}"
    )
    assert TALLY.examples >= EXAMPLES // 2
    assert TALLY.faults_injected > 0
