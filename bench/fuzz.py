"""A long fuzz run against a live maplookup server: inputs tried, failures and crashes found.

The same strategies, runner and invariants as ``tests/hardening/test_live_fuzz.py`` (they live
in ``bench/lib/fuzzcore.py``), for far more inputs: ``python -m maplookup serve`` runs in
a subprocess on a PostgreSQL seeded with a small dataset, and hypothesis sends it random bytes,
mutated requests, truncated, oversized and mis-framed netstrings, NUL bytes, invalid UTF-8 and
broken %-escapes, over socketmap and tcp_table in turn, each input on a fresh connection in
random chunks.  After every input the server process must be alive and a persistent control
connection must get the right answer.

The run goes in rounds of up to ``--round`` inputs (a fresh random seed each); it stops after
``--examples`` inputs or ``--minutes``, whichever comes first.  A failing input is shrunk by
hypothesis and recorded; if the server died it is restarted and the crash recorded.  At the
end the server's log is searched for tracebacks, and its protocol-error and read-timeout
counters (from /metrics) are compared with what the codec predicted for the inputs sent.

Run from the project root (needs the ``test`` extra, for hypothesis)::

    .venv/bin/python -m bench.fuzz --examples 100000            # until 100,000 inputs
    .venv/bin/python -m bench.fuzz --minutes 2                   # bounded in time
    .venv/bin/python -m bench.fuzz --dsn postgresql://user@127.0.0.1:5432/db

Markdown to stdout, progress to stderr, figures to ``bench/results/fuzz-<UTC timestamp>.json``
(the server log of a run with failures is kept next to it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from maplookup.client import WireProtocol

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROTOCOLS = ("socketmap", "tcp_table")


def _log(message: str) -> None:
    print(f"[bench.fuzz] {message}", file=sys.stderr, flush=True)


@dataclass
class Failure:
    protocol: str
    kind: str  # "invariant", "server died", "control lookup"
    message: str
    example: str
    server_log_tail: str = ""


@dataclass
class Totals:
    rounds: int = 0
    restarts: int = 0
    failures: list[Failure] = field(default_factory=list)


class TimeUp(Exception):
    """Not a failure: the time budget ran out inside a round."""


def _run_round(
    protocol: WireProtocol,
    examples: int,
    server: Any,
    control: Any,
    stats: Any,
    end: float,
) -> Failure | None:
    """One hypothesis run of up to ``examples`` inputs; the shrunk failure, if any."""
    from hypothesis import HealthCheck, given, settings

    from bench.lib import fuzzcore

    last_input: list[Any] = []

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(item=fuzzcore.fuzz_inputs(protocol))
    def round_(item: Any) -> None:
        if time.monotonic() >= end:
            return  # out of time: the remaining examples of this round are no-ops
        last_input[:] = [item]
        fuzzcore.run_input(item, server.port_for(protocol), stats)
        if not server.alive():
            raise fuzzcore.InvariantViolation(f"server died (exit {server.process.returncode})")
        control.check(stats)

    try:
        round_()
    except Exception as exc:
        notes = "\n".join(getattr(exc, "__notes__", []))
        died = not server.alive()
        kind = "server died" if died else "invariant"
        if "control" in str(exc):
            kind = "control lookup"
        return Failure(
            protocol,
            kind,
            "".join(traceback.format_exception_only(exc)).strip(),
            notes or repr(last_input[:1]),
            server.log_tail() if died else "",
        )
    return None


def _fuzz(ns: argparse.Namespace, dsn: str, log_path: Path) -> dict[str, Any]:
    from bench.lib import fuzzcore

    stats = {p: fuzzcore.FuzzStats() for p in ns.protocols}
    totals = Totals()
    server = fuzzcore.start_live_server(dsn, log_path, ns.read_timeout)
    control = fuzzcore.ControlClient(server.socketmap_port)
    counters_before = {
        name: server.metric(name)
        for name in ("maplookup_protocol_errors_total", "maplookup_read_timeouts_total")
    }
    started = time.monotonic()
    end = started + ns.minutes * 60 if ns.minutes else float("inf")
    next_report = started + 10
    try:
        while time.monotonic() < end:
            tried = sum(s.inputs for s in stats.values())
            if tried >= ns.examples:
                break
            protocol = ns.protocols[totals.rounds % len(ns.protocols)]
            size = min(ns.round, ns.examples - tried)
            failure = _run_round(protocol, size, server, control, stats[protocol], end)
            totals.rounds += 1
            if failure is not None:
                totals.failures.append(failure)
                _log(f"FAILURE ({failure.kind}, {protocol}): {failure.message}")
                if not server.alive():
                    totals.restarts += 1
                    server = fuzzcore.start_live_server(dsn, log_path, ns.read_timeout)
                control.close()
                control = fuzzcore.ControlClient(server.socketmap_port)
            if time.monotonic() >= next_report:
                tried = sum(s.inputs for s in stats.values())
                rate = tried / (time.monotonic() - started)
                _log(f"{tried:,} inputs ({rate:,.0f}/s), {len(totals.failures)} failures")
                next_report = time.monotonic() + 10
        elapsed = time.monotonic() - started
        counters = {name: server.metric(name) - before for name, before in counters_before.items()}
    finally:
        control.close()
        exit_code = fuzzcore.stop_live_server(server)
    tracebacks = server.tracebacks()
    inputs = sum(s.inputs for s in stats.values())
    predicted_errors = sum(s.endings.get("error", 0) for s in stats.values())
    predicted_timeouts = sum(s.endings.get("stalled", 0) for s in stats.values())
    return {
        "elapsed_s": elapsed,
        "inputs": inputs,
        "inputs_per_s": inputs / elapsed if elapsed else 0.0,
        "rounds": totals.rounds,
        "per_protocol": {p: asdict(s) for p, s in stats.items()},
        "failures": [asdict(f) for f in totals.failures],
        "crashes": sum(1 for f in totals.failures if f.kind == "server died"),
        "server_restarts": totals.restarts,
        "server_exit_code": exit_code,
        "server_log_tracebacks": tracebacks,
        # Exact only for a run without restarts (a restarted server starts its counters anew).
        "server_protocol_errors": counters["maplookup_protocol_errors_total"],
        "server_read_timeouts": counters["maplookup_read_timeouts_total"],
        "predicted_protocol_errors": predicted_errors,
        "predicted_read_timeouts": predicted_timeouts,
    }


def _table(result: dict[str, Any]) -> str:
    lines = [
        "| protocol | inputs | bytes sent | replies checked | clean end | framing error "
        "| stalled (read timeout) | left open | control lookups |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for protocol, s in result["per_protocol"].items():
        e = s["endings"]
        lines.append(
            f"| {protocol} | {s['inputs']:,} | {s['bytes_sent']:,} | {s['replies']:,} "
            f"| {e.get('eof', 0):,} | {e.get('error', 0):,} | {e.get('stalled', 0):,} "
            f"| {e.get('open', 0):,} | {s['control_checks']:,} |"
        )
    return "\n".join(lines)


def _write(payload: dict[str, Any], stamp: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"fuzz-{stamp}.json"
    tmp = path.with_suffix(".json.tmp")  # *.tmp is git-ignored
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _coordinator(ns: argparse.Namespace) -> int:
    from bench.lib import fuzzcore
    from maplookup.embedded import EmbeddedPostgres

    started_at = datetime.now(UTC)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    work = Path(tempfile.mkdtemp(prefix="maplookup-fuzz-", dir="/tmp"))
    work.chmod(0o755)  # the cluster runs as postgres when we are root
    log_path = work / "server.log"
    pg: EmbeddedPostgres | None = None
    try:
        if ns.dsn:
            dsn = ns.dsn
        else:
            pg = EmbeddedPostgres(state_dir=work / "pg", fast_unsafe=True)
            pg.start()
            dsn = pg.tcp_dsn
            _log(f"embedded PostgreSQL on {dsn}")
        fuzzcore.seed(dsn)
        bound = f"{ns.examples:,} inputs" + (f" or {ns.minutes} min" if ns.minutes else "")
        _log(f"fuzzing {', '.join(ns.protocols)} until {bound}")
        result = _fuzz(ns, dsn, log_path)
        kept_log = None
        if result["failures"] or result["server_log_tracebacks"]:
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            kept_log = RESULTS_DIR / f"fuzz-{stamp}.server.log"
            shutil.copyfile(log_path, kept_log)
    finally:
        if pg is not None:
            pg.stop(mode="immediate")
        shutil.rmtree(work, ignore_errors=True)
    print(_table(result))
    print()
    print(
        f"{result['inputs']:,} inputs in {result['elapsed_s']:.0f} s "
        f"({result['inputs_per_s']:,.0f}/s), {len(result['failures'])} failures, "
        f"{result['crashes']} server crashes, {result['server_log_tracebacks']} tracebacks in "
        f"the server log; server counted {result['server_protocol_errors']:,.0f} protocol "
        f"errors (predicted {result['predicted_protocol_errors']:,}) and "
        f"{result['server_read_timeouts']:,.0f} read timeouts (predicted "
        f"{result['predicted_read_timeouts']:,}); server exit code {result['server_exit_code']}"
    )
    for failure in result["failures"]:
        print(f"\n{failure['kind']} ({failure['protocol']}): {failure['message']}")
        print(failure["example"])
    payload = {
        "benchmark": "fuzz",
        "started_at": started_at.isoformat(),
        "settings": {
            "examples": ns.examples,
            "minutes": ns.minutes,
            "round": ns.round,
            "protocols": ns.protocols,
            "dsn": "external" if ns.dsn else "embedded",
            "read_timeout_s": ns.read_timeout,
            "max_request_bytes": fuzzcore.MAX_REQUEST_BYTES,
        },
        "machine": {
            "nproc": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "result": result,
        "server_log": str(kept_log.relative_to(PROJECT_ROOT)) if kept_log else None,
    }
    path = _write(payload, stamp)
    _log(f"wrote {path.relative_to(PROJECT_ROOT)}")
    clean = not result["failures"] and not result["server_log_tracebacks"]
    return 0 if clean and result["server_exit_code"] == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fuzz", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--examples", type=int, default=100_000, help="inputs in all")
    parser.add_argument("--minutes", type=float, default=0.0, help="time bound (0: none)")
    parser.add_argument("--round", type=int, default=1_000, help="inputs per hypothesis run")
    parser.add_argument(
        "--protocols",
        type=lambda text: [p.strip() for p in text.split(",") if p.strip()],
        default=list(PROTOCOLS),
        help="comma-separated: socketmap,tcp_table",
    )
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=0.1,
        help="the server's read_timeout_s: what each stalled partial input costs (default 0.1)",
    )
    parser.add_argument("--dsn", help="PostgreSQL to use (default: a private embedded one)")
    ns = parser.parse_args(argv)
    if ns.examples <= 0 or ns.round <= 0 or ns.minutes < 0 or ns.read_timeout <= 0:
        parser.error("--examples, --round, --read-timeout must be positive, --minutes not negative")
    unknown = set(ns.protocols) - set(PROTOCOLS)
    if unknown or not ns.protocols:
        parser.error(f"--protocols: choose from {', '.join(PROTOCOLS)}")
    return _coordinator(ns)


if __name__ == "__main__":
    sys.exit(main())
