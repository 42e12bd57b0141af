"""What a complete in-memory copy of the maps costs: bytes per address, RSS, build time.

Issue 16 asks for at most 300 bytes per address on average with 1M mailboxes, and a start-up
from a 1M-row snapshot in seconds.  This runner builds ``maplookup.lookup.complete.MapsCopy``
from rows made in Python in the shape the snapshot statements return (tuples, one per row; no
database: the figures are the copy's own, not PostgreSQL's or asyncpg's), for each size, in a
fresh subprocess per measurement so that nothing else is in the heap:

- **tracemalloc**: the rows are made and the copy built under tracemalloc; the rows are then
  dropped and a collection run, so what stays traced is the copy alone (its dicts, packed
  values, and the local-part strings it kept from the rows).
- **RSS** (no tracemalloc): VmRSS after imports, after the rows are made, after the build, and
  after the rows are dropped; the peak (VmHWM) holds rows and copy together, as a loader that
  fetches every row before building would.
- **build time**: ``MapsCopy.build`` over the rows, best of ``--repeat``; and the time to
  replace one domain's partition (the change-feed path for a domain row), and apply one
  mailbox's row alone (for a record the change log names).
- **GC**: objects the collector tracks after the build (after a full collection), beyond those
  before it: the copy is meant to add none but its one top-level object.
- **lookups**: ns per ``lookup`` call for a few maps (hits and misses), one thread.

Layouts: ``default`` is bench/lib/datasets.py's (N mailboxes in N/100 domains, N/10 aliases,
catch-alls, mirrors) with the path and login the tools write by default (``domain/user/``,
``user@domain``); ``explicit`` gives every mailbox its own path, uid, gid and login (nothing
packs away), an upper bound.

    .venv/bin/python -m bench.memory_copy                          # 100k and 1M, both layouts
    .venv/bin/python -m bench.memory_copy --sizes 100000 --layouts default --repeat 1

Writes ``bench/results/memory_copy-<UTC>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

from bench.lib.common import Logger, machine_info, utc_stamp, write_json
from maplookup.lookup.complete import MapsCopy, lookup
from maplookup.lookup.complete.rows import SnapshotRows
from maplookup.maps import LookupSettings, MapName

log = Logger("memory_copy")
SUFFIX = ".bench.example"


def make_rows(mailboxes: int, layout: str, lazy: bool = False) -> SnapshotRows:
    """Rows of bench/lib/datasets.py's layout for ``mailboxes`` mailboxes: lists, as
    ``fetch`` returns them, or (``lazy``) generators, as a server-side cursor streams them."""
    domains = max(10, mailboxes // 100)
    aliases = max(10, mailboxes // 10)
    mirrors = max(1, domains // 10)
    explicit = layout == "explicit"
    dom = [f"dom{j}{SUFFIX}" for j in range(domains)]

    def domain_rows() -> Iterator[Any]:
        yield from ((d, "mailbox", None, 5000, 5000, True) for d in dom)
        for m in range(mirrors):
            yield (f"mirror{m}{SUFFIX}", "alias", dom[10 * m], None, None, True)

    def box_rows() -> Iterator[Any]:
        for i in range(mailboxes):
            d = f"dom{i % domains}{SUFFIX}"  # a string of its own per row, as a fetch gives
            if explicit:
                yield (
                    d,
                    f"user{i}",
                    f"{d[:4]}/{d}/user{i}/Maildir/",
                    6000 + i % 997,
                    6000,
                    f"u{i}",
                    True,
                )
            else:
                yield (d, f"user{i}", f"{d}/user{i}/", None, None, f"user{i}@{d}", True)
        for j in range(1, domains, 10):
            yield (dom[j], "", f"{dom[j]}/catchall/", None, None, None, True)

    def alias_rows() -> Iterator[Any]:
        for k in range(aliases):
            first = k * 7919 % mailboxes
            targets = [f"user{first}@dom{first % domains}{SUFFIX}"]
            if k % 3 == 0:
                second = (k * 7919 + 1) % mailboxes
                targets.append(f"user{second}@dom{second % domains}{SUFFIX}")
            yield (f"dom{k % domains}{SUFFIX}", f"alias{k}", targets, True)
        for j in range(2, domains, 10):
            yield (dom[j], "", [f"user{j}@{dom[j]}"], True)

    if lazy:
        return SnapshotRows(domains=domain_rows(), mailboxes=box_rows(), aliases=alias_rows())
    return SnapshotRows(
        domains=list(domain_rows()), mailboxes=list(box_rows()), aliases=list(alias_rows())
    )


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _tracked() -> int:
    gc.collect()
    return len(gc.get_objects())


def child_tracemalloc(mailboxes: int, layout: str) -> dict[str, Any]:
    tracemalloc.start()
    rows = make_rows(mailboxes, layout)
    rows_bytes = tracemalloc.get_traced_memory()[0]
    copy = MapsCopy.build(rows)
    del rows
    gc.collect()
    copy_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    counts = copy.counts()
    addresses = counts["mailboxes"] + counts["aliases"]
    return {
        "rows_bytes": rows_bytes,
        "copy_bytes": copy_bytes,
        "addresses": addresses,
        "bytes_per_address": copy_bytes / addresses,
        "counts": counts,
    }


def child_rss(mailboxes: int, layout: str, repeat: int) -> dict[str, Any]:
    gc.disable()  # as after gc.freeze() in the server: no collection in the middle of a build
    rss0 = _status_kib("VmRSS")
    tracked0 = _tracked()
    # Streamed rows: what stays in RSS is the copy (freed rows would stay in pymalloc's arenas).
    started = time.perf_counter()
    copy = MapsCopy.build(make_rows(mailboxes, layout, lazy=True))
    streamed_s = time.perf_counter() - started
    rss_copy = _status_kib("VmRSS")
    tracked = _tracked() - tracked0
    addresses = copy.counts()["mailboxes"] + copy.counts()["aliases"]
    speed = lookup_speed(copy, mailboxes)
    del copy
    rows = make_rows(mailboxes, layout)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        copy = MapsCopy.build(rows)
        times.append(time.perf_counter() - started)
        if len(times) < repeat:
            del copy
    name = f"dom1{SUFFIX}"
    part = SnapshotRows(
        domains=[r for r in rows.domains if r[0] == name],
        mailboxes=[r for r in rows.mailboxes if r[0] == name],
        aliases=[r for r in rows.aliases if r[0] == name],
    )
    started = time.perf_counter()
    copy.replace([name], part)
    replace_s = time.perf_counter() - started
    # One mailbox's row re-read alone (schema version 6: the change log names it).
    box = next(iter(part.mailboxes))
    one = SnapshotRows(domains=part.domains, mailboxes=[box])
    started = time.perf_counter()
    copy.apply_records([f"mailboxes:{box[1]}@{box[0]}"], one)
    record_s = time.perf_counter() - started
    return {
        "build_s": min(times),
        "build_s_all": times,
        "build_streamed_s": streamed_s,
        "replace_one_domain_ms": replace_s * 1000,
        "apply_one_record_ms": record_s * 1000,
        "rows_in_domain": len(list(part.mailboxes)) + len(list(part.aliases)),
        "rss_start_kib": rss0,
        "rss_copy_kib": rss_copy,
        "rss_peak_kib": _status_kib("VmHWM"),
        "copy_rss_bytes_per_address": (rss_copy - rss0) * 1024 / addresses,
        "gc_tracked_objects_added": tracked,
        "lookup_ns": speed,
    }


def lookup_speed(copy: MapsCopy, mailboxes: int, n: int = 100_000) -> dict[str, float]:
    domains = max(10, mailboxes // 100)
    settings = LookupSettings()
    cases = {
        "vmailbox hit": (MapName.VMAILBOX, [f"user{i}@dom{i % domains}{SUFFIX}" for i in range(n)]),
        "vmailbox miss": (
            MapName.VMAILBOX,
            [f"nobody{i}@dom{10 * (i % (domains // 10))}{SUFFIX}" for i in range(n)],
        ),
        "virtual hit": (
            MapName.VIRTUAL,
            [f"alias{i}+x@dom{i % domains}{SUFFIX}" for i in range(n)],
        ),
        "uid hit": (MapName.UID, [f"user{i}@dom{i % domains}{SUFFIX}" for i in range(n)]),
        "sender_login hit": (
            MapName.SENDER_LOGIN,
            [f"user{i}@dom{i % domains}{SUFFIX}" for i in range(n)],
        ),
    }
    result = {}
    for label, (map_name, keys) in cases.items():
        started = time.perf_counter_ns()
        for key in keys:
            lookup(copy, map_name, key, settings)
        result[label] = (time.perf_counter_ns() - started) / n
    return result


def _run_child(args: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.memory_copy", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="mailbox counts")
    parser.add_argument("--layouts", default="default,explicit")
    parser.add_argument("--repeat", type=int, default=3, help="builds timed per size")
    parser.add_argument("--child", choices=("tracemalloc", "rss"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    layouts = args.layouts.split(",")
    if args.child:
        run = child_tracemalloc if args.child == "tracemalloc" else child_rss
        extra = () if args.child == "tracemalloc" else (args.repeat,)
        print(json.dumps(run(sizes[0], layouts[0], *extra)))
        return 0
    now, stamp = utc_stamp()
    results = []
    for layout in layouts:
        for size in sizes:
            log(f"{layout} layout, {size:,} mailboxes: tracemalloc")
            traced = _run_child(
                ["--child", "tracemalloc", "--sizes", str(size), "--layouts", layout]
            )
            log(f"{layout} layout, {size:,} mailboxes: RSS, build time, lookups")
            rss = _run_child(
                [
                    "--child",
                    "rss",
                    "--sizes",
                    str(size),
                    "--layouts",
                    layout,
                    "--repeat",
                    str(args.repeat),
                ]
            )
            results.append({"layout": layout, "mailboxes": size, **traced, **rss})
    path = write_json(
        "memory_copy",
        stamp,
        {
            "started": now.isoformat(),
            "machine": machine_info(),
            "args": vars(args),
            "results": results,
        },
    )
    print(
        "| layout | mailboxes | addresses | bytes/address (tracemalloc) | RSS bytes/address"
        " (streamed build) | RSS peak MiB (all rows + copy) | build s (rows in a list)"
        " | build s (streamed) | replace 1 domain ms | apply 1 record ms | GC objects added |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in results:
        print(
            f"| {r['layout']} | {r['mailboxes']:,} | {r['addresses']:,} "
            f"| {r['bytes_per_address']:.0f} | {r['copy_rss_bytes_per_address']:.0f} "
            f"| {r['rss_peak_kib'] / 1024:.0f} | {r['build_s']:.2f} | {r['build_streamed_s']:.2f} "
            f"| {r['replace_one_domain_ms']:.2f} | {r['apply_one_record_ms']:.3f} "
            f"| {r['gc_tracked_objects_added']} |"
        )
    print()
    print("| layout | mailboxes | " + " | ".join(f"{k} ns" for k in results[0]["lookup_ns"]) + " |")
    print("|---|--:|" + "--:|" * len(results[0]["lookup_ns"]))
    for r in results:
        cells = " | ".join(f"{v:,.0f}" for v in r["lookup_ns"].values())
        print(f"| {r['layout']} | {r['mailboxes']:,} | {cells} |")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
