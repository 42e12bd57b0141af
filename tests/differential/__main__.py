"""Run the differential test over many seeds and print every disagreement.

    python -m tests.differential --seeds 1-10
    python -m tests.differential --seeds 3 --exclude catchall_alias,mirror_domain --keep

Exit status 0 when A (Postfix + maplookup), B (Postfix + hash: from export) and maplookup's
trace agree for every recipient, the maps of issue 14 answer alike key by key, and
export+import gives back the same records, else 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from maplookup.embedded import EmbeddedPostgres

from .dataset import KINDS
from .harness import format_table, make_database_factory, run_seed


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        first, sep, last = part.partition("-")
        seeds += list(range(int(first), int(last) + 1)) if sep else [int(first)]
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.differential",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seeds", default="1-5", help="e.g. 1-20 or 1,4,9 (default 1-5)")
    parser.add_argument(
        "--exclude", default="", help=f"record kinds to leave out, comma-separated: {KINDS}"
    )
    parser.add_argument(
        "--no-local-targets", action="store_true", help="no alias targets without '@'"
    )
    parser.add_argument("--keep", action="store_true", help="keep each seed's work directory")
    parser.add_argument(
        "--mode", default="lru", choices=["lru", "complete"], help="A's cache.mode (default lru)"
    )
    parser.add_argument("--dataset", action="store_true", help="print each data set")
    parser.add_argument(
        "--brief", action="store_true", help="leave the records out of the disagreement table"
    )
    args = parser.parse_args(argv)
    exclude = frozenset(x for x in args.exclude.split(",") if x)
    os.environ.setdefault("MAPLOOKUP_ALLOW_ROOT", "true")

    external = os.environ.get("MAPLOOKUP_TEST_DSN")
    cluster = None
    state_dir = None
    if external:
        pg_dsn = external
    else:
        state_dir = Path(tempfile.mkdtemp(prefix="maplookup-diff-pg-"))
        state_dir.chmod(0o755)
        cluster = EmbeddedPostgres(state_dir=state_dir, fast_unsafe=True)
        pg_dsn = cluster.start()
    failed = False
    kinds: Counter[str] = Counter()
    started = time.monotonic()
    try:
        make_database = make_database_factory(pg_dsn)
        for seed in parse_seeds(args.seeds):
            result = run_seed(
                seed,
                make_database,
                exclude=exclude,
                local_targets=not args.no_local_targets,
                mode=args.mode,
                keep=args.keep,
            )
            if args.dataset:
                print(result.dataset_text)
            bad = bool(
                result.disagreements or result.round_trip or result.refused or result.routing
            )
            failed |= bad
            print(
                f"seed {seed}: {result.recipients} recipients, "
                f"{len(result.disagreements)} disagreeing, {len(result.routing)} routing-map "
                f"keys disagreeing, {len(result.refused)} refused, "
                f"{len(result.round_trip)} round-trip differences, {result.seconds:.1f} s",
                flush=True,
            )
            if bad:
                print(format_table([result], records=not args.brief), flush=True)
            for d in result.disagreements:
                kinds[d.recipient.kind] += 1
    finally:
        if cluster is not None:
            cluster.stop(mode="immediate")
            shutil.rmtree(state_dir or "", ignore_errors=True)
    print(f"total {time.monotonic() - started:.1f} s; disagreeing recipients by kind:")
    for kind, n in kinds.most_common():
        print(f"  {n:4}  {kind}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
