"""Every map side by side: cached hits and uncached misses per map, through one server.

Issue 14 asks that the maps beyond delivery (``sender_login``, ``relay_domains``,
``relay_recipients``, ``transport``) have a hit path as fast as the six virtual-hosting maps:
they share the cache, so a hit costs the same whatever the map; a miss runs the map's SQL
function, whose cost differs (``sender_login`` follows aliases).  This measures both.

The dataset (``--mailboxes`` in ``--domains`` mailbox domains, an alias per ten mailboxes
delivering to two of them, a transport entry per domain, a sender grant per domain, relay
domains with recipients) is loaded into a private PostgreSQL.  Two servers run as
``python -m maplookup serve`` subprocesses: one caching, one with ``--no-cache``.  The
client is this process, one persistent socketmap connection, one request at a time, as a
Postfix process asks.

For each map a key list of ``--keys`` existing keys is built.  The caching server is warmed
with every key once; then ``--rounds`` rounds each ask every map's keys, the maps in a
rotated order per round, so that every map is measured across the same stretch of time
(side by side, on a shared machine).  The same then runs against the uncached server.
Latency is ``perf_counter_ns()`` around each request; percentiles use the nearest rank.
The "vs vmailbox" columns are ratios of medians measured in the same run.

Run from the project root::

    .venv/bin/python -m bench.maps     # --mailboxes 10000 --domains 100 --keys 2000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

from bench.lib.common import (
    BenchError,
    Logger,
    PrivatePostgres,
    bounded_int,
    machine_info,
    run_guarded,
    utc_stamp,
    write_json,
)
from maplookup.config import HostPort
from maplookup.db import admin
from maplookup.protocol import Status
from maplookup.testing import Client, RunningServer, start_server, stop_server

log = Logger("maps")

MAPS = (
    "vmailbox",
    "virtual",
    "uid",
    "domains",
    "sender_login",
    "transport",
    "relay_domains",
    "relay_recipients",
)


def _domain(d: int) -> str:
    return f"d{d}.maps-bench.example"


async def _load(dsn: str, mailboxes: int, domains: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await admin.init_schema(conn)
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO maplookup.domains (name, kind, default_uid, default_gid)"
                " SELECT 'd' || d || '.maps-bench.example', 'mailbox', 5000, 5000"
                " FROM generate_series(0, $1 - 1) AS d",
                domains,
            )
            await conn.execute(
                "INSERT INTO maplookup.domains (name, kind)"
                " SELECT 'r' || d || '.relay-bench.example', 'relay'"
                " FROM generate_series(0, $1 - 1) AS d",
                domains,
            )
            await conn.execute(
                "INSERT INTO maplookup.mailboxes (domain, local_part, path)"
                " SELECT 'd' || (i % $2) || '.maps-bench.example', 'user' || i,"
                " 'd' || (i % $2) || '/user' || i || '/'"
                " FROM generate_series(0, $1 - 1) AS i",
                mailboxes,
                domains,
            )
            # An alias per ten mailboxes, to two mailboxes of its domain.
            await conn.execute(
                "INSERT INTO maplookup.aliases (domain, local_part, targets)"
                " SELECT 'd' || (i % $2) || '.maps-bench.example', 'list' || i,"
                " ARRAY['user' || i || '@d' || (i % $2) || '.maps-bench.example',"
                "       'user' || (i + $2) || '@d' || (i % $2) || '.maps-bench.example']"
                " FROM generate_series(0, $1 - 1 - $2, 10) AS i",
                mailboxes,
                domains,
            )
            await conn.execute(
                "INSERT INTO maplookup.transports (domain, transport)"
                " SELECT 'd' || d || '.maps-bench.example', 'lmtp:unix:private/dovecot-lmtp'"
                " FROM generate_series(0, $1 - 1) AS d",
                domains,
            )
            await conn.execute(
                "INSERT INTO maplookup.sender_grants (domain, local_part, login)"
                " SELECT 'd' || d || '.maps-bench.example', '', 'admin' || d"
                " FROM generate_series(0, $1 - 1) AS d",
                domains,
            )
            await conn.execute(
                "INSERT INTO maplookup.relay_recipients (domain, local_part)"
                " SELECT 'r' || (i % $2) || '.relay-bench.example', 'user' || i"
                " FROM generate_series(0, $1 - 1) AS i",
                mailboxes,
                domains,
            )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


def _keys(map_name: str, count: int, mailboxes: int, domains: int) -> list[str]:
    """``count`` keys that exist in ``map_name``, spread over the dataset."""
    step = max(1, mailboxes // count)
    users = [(i * step) % mailboxes for i in range(count)]
    if map_name == "domains":
        return [_domain(i % domains) for i in range(count)]
    if map_name == "relay_domains":
        return [f"mx{i}.r{i % domains}.relay-bench.example" for i in range(count)]
    if map_name == "relay_recipients":
        return [f"user{i}@r{i % domains}.relay-bench.example" for i in users]
    if map_name in ("virtual", "sender_login"):
        # Aliases: the heavier answer of each map (sender_login follows their targets).
        lists = [i - i % 10 for i in users if i - i % 10 <= mailboxes - 1 - domains]
        return [f"list{i}@{_domain(i % domains)}" for i in lists]
    return [f"user{i}+tag@{_domain(i % domains)}" for i in users]


def _ask_all(client: Client, map_name: str, keys: Sequence[str]) -> list[int]:
    latencies = []
    clock = time.perf_counter_ns
    for key in keys:
        t0 = clock()
        reply = client.ask(map_name, key)
        latencies.append(clock() - t0)
        if reply.status is not Status.OK:
            raise BenchError(f"{map_name} {key}: expected OK, got {reply}")
    return latencies


def _percentile(ordered: Sequence[int], pct: float) -> int:
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))]


def _measure(port: int, keys: dict[str, list[str]], rounds: int, warm: bool) -> dict[str, Any]:
    client = Client.connect(HostPort(host="127.0.0.1", port=port), timeout_s=10)
    try:
        if warm:
            for name in MAPS:
                _ask_all(client, name, keys[name])
        samples: dict[str, list[int]] = {name: [] for name in MAPS}
        for r in range(rounds):
            order = MAPS[r % len(MAPS) :] + MAPS[: r % len(MAPS)]
            for name in order:
                samples[name] += _ask_all(client, name, keys[name])
            log(f"{'hits' if warm else 'misses'}: round {r + 1}/{rounds}")
    finally:
        client.close()
    result = {}
    for name, values in samples.items():
        ordered = sorted(values)
        result[name] = {
            "n": len(ordered),
            "p50_us": _percentile(ordered, 50) / 1000,
            "p99_us": _percentile(ordered, 99) / 1000,
            "mean_us": statistics.fmean(ordered) / 1000,
        }
    return result


def _table(hits: dict[str, Any], misses: dict[str, Any]) -> str:
    lines = [
        "| map | hit p50 µs | hit p99 µs | hit p50 vs vmailbox | miss p50 µs | miss p99 µs "
        "| miss p50 vs vmailbox |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in MAPS:
        h, m = hits[name], misses[name]
        lines.append(
            f"| `{name}` | {h['p50_us']:.0f} | {h['p99_us']:.0f} "
            f"| {h['p50_us'] / hits['vmailbox']['p50_us']:.2f} "
            f"| {m['p50_us']:.0f} | {m['p99_us']:.0f} "
            f"| {m['p50_us'] / misses['vmailbox']['p50_us']:.2f} |"
        )
    return "\n".join(lines)


def _run(ns: argparse.Namespace) -> int:
    pg = PrivatePostgres()
    servers: list[RunningServer] = []
    try:
        dsn = ns.dsn or pg.start()
        log(f"loading {ns.mailboxes:,} mailboxes in {ns.domains} domains")
        asyncio.run(_load(dsn, ns.mailboxes, ns.domains))
        keys = {name: _keys(name, ns.keys, ns.mailboxes, ns.domains) for name in MAPS}
        with tempfile.TemporaryDirectory() as tmp:
            # As root (CI machines), the server must be told that is intended.
            env = {**os.environ, "MAPLOOKUP_ALLOW_ROOT": "true"}
            cached = start_server(dsn, Path(tmp) / "cached.log", tcp_maps=(), env=env)
            servers.append(cached)
            uncached = start_server(
                dsn, Path(tmp) / "uncached.log", tcp_maps=(), extra_args=("--no-cache",), env=env
            )
            servers.append(uncached)
            hits = _measure(cached.socketmap_port, keys, ns.rounds, warm=True)
            misses = _measure(uncached.socketmap_port, keys, ns.rounds, warm=False)
    finally:
        for server in servers:
            stop_server(server)
        pg.stop()
    print(_table(hits, misses))
    _, stamp = utc_stamp()
    path = write_json(
        "maps",
        stamp,
        {
            "machine": machine_info(),
            "settings": vars(ns),
            "hits": hits,
            "misses": misses,
        },
    )
    log(f"figures: {path}")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.maps", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--dsn", help="an existing database (default: a private PostgreSQL)")
    parser.add_argument("--mailboxes", type=bounded_int(1000, 10_000_000), default=10_000)
    parser.add_argument("--domains", type=bounded_int(1, 100_000), default=100)
    parser.add_argument("--keys", type=bounded_int(10, 1_000_000), default=2000, help="per map")
    parser.add_argument("--rounds", type=bounded_int(1, 1000), default=5)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    return run_guarded(log, lambda: _run(ns))


if __name__ == "__main__":
    sys.exit(main())
