"""Reproducible datasets (1k, 100k, 1M mailboxes) and key mixes for the load benchmarks.

A dataset of N mailboxes lives in its own database (``bench_<N>``) of the benchmark's private
cluster and is made entirely by ``INSERT ... SELECT generate_series`` (one statement per table,
no data crosses the wire), with ``session_replication_role = replica`` so that neither the
per-row foreign-key triggers nor the NOTIFY triggers run during the load (the rows are
consistent by construction, and no server listens yet).  1M mailboxes load in about 15 s.

Layout, for N mailboxes and D = max(10, N / 100) mailbox domains ``dom<j>.bench.example``:

- mailbox ``user<i>@dom<i mod D>``, path ``dom<j>.bench.example/user<i>/``;
- a catch-all mailbox ``@dom<j>`` when j mod 10 = 1;
- N/10 aliases ``alias<k>@dom<k mod D>`` pointing at one mailbox (two for every third alias);
- a catch-all alias ``@dom<j>`` when j mod 10 = 2;
- max(1, D/10) mirror domains ``mirror<m>.bench.example`` (alias domains with
  ``alias_of = dom<10 m>``).

Key mixes (files of ``EXPECT<TAB>MAP<TAB>KEY`` lines, read by ``bench/lib/load.py``), all drawn
with ``random.Random(seed)`` from a *hot set* of H mailboxes (a seeded sample):

``hits``
    every hot mailbox once, as stored (lower case, no extension), shuffled: ``vmailbox`` OK.
``misses``
    unknown users in domains without a catch-all, and unknown domains: ``vmailbox`` NOTFOUND.
``90-10``
    90 % found: hot mailboxes, a third with ``+extension``, half in mixed case
    (``User12+Tag@Dom3.Bench.Example``), 5 % through a catch-all; 10 % misses: ``vmailbox``.
``virtual-90-10``
    ``virtual`` (alias) lookups: aliases with and without extension, mirror-domain addresses,
    catch-all aliases, mixed case (90 % found); real mailboxes in domains without a catch-all
    alias and unknown users (NOTFOUND, 10 %).

What each key must answer is computed here; ``verify_mix`` asks PostgreSQL's own lookup
functions for a sample of every mix, so the expectations cannot drift from ``schema.sql``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIX = ".bench.example"
MIXES = ("hits", "misses", "90-10", "virtual-90-10")


@dataclass(frozen=True, slots=True)
class Dataset:
    mailboxes: int
    seed: int = 20261122

    @property
    def domains(self) -> int:
        return max(10, self.mailboxes // 100)

    @property
    def aliases(self) -> int:
        return max(10, self.mailboxes // 10)

    @property
    def mirrors(self) -> int:
        return max(1, self.domains // 10)

    @property
    def database(self) -> str:
        return f"bench_{self.mailboxes}"

    def domain(self, j: int) -> str:
        return f"dom{j}{SUFFIX}"

    def mailbox_key(self, i: int) -> str:
        return f"user{i}@{self.domain(i % self.domains)}"

    def mailbox_path(self, i: int) -> str:
        return f"{self.domain(i % self.domains)}/user{i}/"


# --------------------------------------------------------------------------
# loading


def _load_sql(ds: Dataset) -> list[tuple[str, tuple[Any, ...]]]:
    s = SUFFIX
    return [
        (
            "INSERT INTO maplookup.domains (name, kind, default_uid, default_gid)"
            " SELECT 'dom' || j || $2::text, 'mailbox', 5000, 5000"
            " FROM generate_series(0, $1::int - 1) j",
            (ds.domains, s),
        ),
        (
            "INSERT INTO maplookup.domains (name, kind, alias_of)"
            " SELECT 'mirror' || m || $2::text, 'alias', 'dom' || (10 * m) || $2::text"
            " FROM generate_series(0, $1::int - 1) m",
            (ds.mirrors, s),
        ),
        (
            "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
            " SELECT 'dom' || (i % $2::int) || $3::text, 'user' || i,"
            "        'dom' || (i % $2::int) || $3::text || '/user' || i || '/'"
            " FROM generate_series(0, $1::int - 1) i",
            (ds.mailboxes, ds.domains, s),
        ),
        (
            "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
            " SELECT 'dom' || j || $2::text, '', 'dom' || j || $2::text || '/catchall/'"
            " FROM generate_series(0, $1::int - 1) j WHERE j % 10 = 1",
            (ds.domains, s),
        ),
        (
            "INSERT INTO maplookup.aliases (domain, local_part, targets)"
            " SELECT 'dom' || (k % $2::int) || $4::text, 'alias' || k,"
            "   CASE WHEN k % 3 = 0 THEN ARRAY["
            "     'user' || (k::bigint * 7919 % $3::int) || '@dom'"
            "       || (k::bigint * 7919 % $3::int % $2::int) || $4::text,"
            "     'user' || ((k::bigint * 7919 + 1) % $3::int) || '@dom'"
            "       || ((k::bigint * 7919 + 1) % $3::int % $2::int) || $4::text]"
            "   ELSE ARRAY['user' || (k::bigint * 7919 % $3::int) || '@dom'"
            "       || (k::bigint * 7919 % $3::int % $2::int) || $4::text] END"
            " FROM generate_series(0, $1::int - 1) k",
            (ds.aliases, ds.domains, ds.mailboxes, s),
        ),
        (
            "INSERT INTO maplookup.aliases (domain, local_part, targets)"
            " SELECT 'dom' || j || $2::text, '', ARRAY['postmaster@dom' || j || $2::text]"
            " FROM generate_series(0, $1::int - 1) j WHERE j % 10 = 2",
            (ds.domains, s),
        ),
    ]


async def load(admin_dsn: str, ds: Dataset) -> dict[str, Any]:
    """Create database ``ds.database`` with the schema and the rows; return counts and time."""
    import asyncpg

    from bench.lib.common import dsn_for
    from maplookup.db.admin import init_schema

    started = time.monotonic()
    admin = await asyncpg.connect(admin_dsn, timeout=30)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{ds.database}"')
        await admin.execute(f'CREATE DATABASE "{ds.database}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(dsn_for(admin_dsn, ds.database), timeout=30)
    try:
        await init_schema(conn)
        rows_started = time.monotonic()
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            for sql, args in _load_sql(ds):
                await conn.execute(sql, *args)
        rows_s = time.monotonic() - rows_started
        for table in ("domains", "mailboxes", "aliases"):
            await conn.execute(f"ANALYZE maplookup.{table}")
        counts = {
            table: await conn.fetchval(f"SELECT count(*) FROM maplookup.{table}")
            for table in ("domains", "mailboxes", "aliases")
        }
        size = await conn.fetchval("SELECT pg_database_size(current_database())")
        version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return {
        "database": ds.database,
        "rows": counts,
        "insert_s": rows_s,
        "total_s": time.monotonic() - started,
        "database_bytes": size,
        "postgresql": version,
    }


# --------------------------------------------------------------------------
# key mixes


def _mixed_case(rng: random.Random, text: str) -> str:
    return "".join(c.upper() if c.isalpha() and rng.random() < 0.5 else c for c in text)


@dataclass(frozen=True, slots=True)
class Key:
    expect: str  # "o" found, "n" not found
    map_name: str
    key: str

    def line(self) -> str:
        return f"{self.expect}\t{self.map_name}\t{self.key}"


def hot_set(ds: Dataset, size: int) -> list[int]:
    rng = random.Random(ds.seed)
    return rng.sample(range(ds.mailboxes), min(size, ds.mailboxes))


def _vmailbox_miss(ds: Dataset, rng: random.Random) -> str:
    r = rng.randrange(10**9)
    if rng.random() < 0.25:
        return f"user{r}@unknown{r % 50}.invalid"
    j = rng.randrange(ds.domains)
    if j % 10 == 1:  # has a catch-all mailbox: pick the next domain
        j = (j + 1) % ds.domains
    return f"nouser{r}@{ds.domain(j)}"


def make_mix(ds: Dataset, name: str, hot: Sequence[int], size: int) -> list[Key]:
    rng = random.Random(f"{ds.seed}-{name}")
    keys: list[Key] = []
    if name == "hits":
        order = list(hot)
        rng.shuffle(order)
        return [Key("o", "vmailbox", ds.mailbox_key(i)) for i in order[:size]]
    if name == "misses":
        return [Key("n", "vmailbox", _vmailbox_miss(ds, rng)) for _ in range(size)]
    if name == "90-10":
        for _ in range(size):
            roll = rng.random()
            if roll < 0.10:
                keys.append(Key("n", "vmailbox", _vmailbox_miss(ds, rng)))
                continue
            if roll < 0.145:  # ~5 % of the hits: through a catch-all mailbox
                j = rng.randrange(ds.domains // 10) * 10 + 1  # always < D, as D >= 10
                key = f"anyone{rng.randrange(10**6)}@{ds.domain(j)}"
            else:
                i = rng.choice(hot)
                user, domain = ds.mailbox_key(i).split("@")
                if rng.random() < 1 / 3:
                    user += f"+tag{rng.randrange(100)}"
                key = f"{user}@{domain}"
            if rng.random() < 0.5:
                key = _mixed_case(rng, key)
            keys.append(Key("o", "vmailbox", key))
        return keys
    if name == "virtual-90-10":
        return [_virtual_key(ds, rng, hot) for _ in range(size)]
    raise ValueError(f"unknown mix {name!r}")


def _virtual_key(ds: Dataset, rng: random.Random, hot: Sequence[int]) -> Key:
    roll = rng.random()
    if roll < 0.10:  # NOTFOUND: a real mailbox (no catch-all alias there) or nobody
        if rng.random() < 0.5:
            i = rng.choice(hot)
            if (i % ds.domains) % 10 == 2:
                i = (i + 1) % ds.mailboxes
            return Key("n", "virtual", _maybe_case(rng, ds.mailbox_key(i)))
        j = rng.randrange(ds.domains)
        if j % 10 == 2:
            j = (j + 1) % ds.domains
        return Key("n", "virtual", f"nobody{rng.randrange(10**9)}@{ds.domain(j)}")
    if roll < 0.55:  # an alias, a third of them with an extension
        k = rng.randrange(ds.aliases)
        local = f"alias{k}" + (f"+x{rng.randrange(10)}" if rng.random() < 1 / 3 else "")
        return Key("o", "virtual", _maybe_case(rng, f"{local}@{ds.domain(k % ds.domains)}"))
    if roll < 0.80:  # a mirror domain: user i lives in dom<10 m>
        m = rng.randrange(ds.mirrors)
        t = rng.randrange(max(1, (ds.mailboxes - 10 * m) // ds.domains))
        i = 10 * m + t * ds.domains
        return Key("o", "virtual", _maybe_case(rng, f"user{i}@mirror{m}{SUFFIX}"))
    j = rng.randrange(ds.domains // 10) * 10 + 2  # a catch-all alias (always < D)
    return Key("o", "virtual", _maybe_case(rng, f"someone{rng.randrange(10**6)}@{ds.domain(j)}"))


def _maybe_case(rng: random.Random, key: str) -> str:
    return _mixed_case(rng, key) if rng.random() < 0.5 else key


def write_mix(path: Path, keys: Sequence[Key]) -> Path:
    path.write_text("".join(k.line() + "\n" for k in keys), encoding="utf-8")
    return path


def write_plain(path: Path, keys: Sequence[Key]) -> Path:
    """One key a line, for ``postmap -q -``."""
    path.write_text("".join(k.key + "\n" for k in keys), encoding="utf-8")
    return path


async def verify_mix(dsn: str, keys: Sequence[Key], sample: int, seed: int) -> dict[str, int]:
    """Ask PostgreSQL's lookup functions for a sample; raise if any expectation is wrong."""
    import asyncpg

    from bench.lib.common import BenchError

    rng = random.Random(seed)
    chosen = rng.sample(list(keys), min(sample, len(keys)))
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        wrong = []
        for map_name in sorted({k.map_name for k in chosen}):
            subset = [k for k in chosen if k.map_name == map_name]
            rows = await conn.fetch(
                f"SELECT k, maplookup.{map_name}(k, '+') IS NOT NULL AS found"
                " FROM unnest($1::text[]) AS k",
                [k.key for k in subset],
            )
            found = {r["k"]: r["found"] for r in rows}
            wrong += [k for k in subset if found[k.key] != (k.expect == "o")]
    finally:
        await conn.close()
    if wrong:
        raise BenchError(
            f"{len(wrong)} of {len(chosen)} sampled keys answer unexpectedly: "
            f"{[k.line() for k in wrong[:5]]}"
        )
    return {"checked": len(chosen), "found": sum(1 for k in chosen if k.expect == "o")}
