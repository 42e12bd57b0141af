"""Issue 12: for any data set and any recipient, Postfix + maplookup, Postfix + hash: tables from
``maplookup export``, and ``maplookup trace`` give the same outcome; export + import gives back
the same records; admin accepts every record kind Postfix supports.

Seeds: ``MAPLOOKUP_DIFFERENTIAL_SEEDS`` (``1-3`` by default, about 10-15 s each; ``1-50`` for a
long run), each run with A in both cache modes (``lru``, and ``complete``: every answer from
the in-memory copy; ``MAPLOOKUP_DIFFERENTIAL_MODES`` to choose); record kinds to leave out:
``MAPLOOKUP_DIFFERENTIAL_EXCLUDE`` (comma-separated, see ``dataset.KINDS``).
``python -m tests.differential`` runs the same outside pytest (``--mode complete`` for the
copy) and prints the disagreement table for many seeds.

Every disagreement is a bug in maplookup, in export, or in this test: decide which from the
Postfix source, never by bending the test.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from tests.helpers import require_postfix

from .__main__ import parse_seeds
from .harness import MODES, SeedResult, format_table, run_seed

SEEDS = parse_seeds(os.environ.get("MAPLOOKUP_DIFFERENTIAL_SEEDS", "1-3"))
RUN_MODES = [
    m for m in os.environ.get("MAPLOOKUP_DIFFERENTIAL_MODES", ",".join(MODES)).split(",") if m
]
RUNS = [(seed, mode) for seed in SEEDS for mode in RUN_MODES]
EXCLUDE = frozenset(x for x in os.environ.get("MAPLOOKUP_DIFFERENTIAL_EXCLUDE", "").split(",") if x)

pytestmark = [pytest.mark.postfix, pytest.mark.timeout(300)]

_results: dict[tuple[int, str], SeedResult] = {}


def _run_id(run: tuple[int, str]) -> str:
    seed, mode = run
    return f"seed{seed}" if mode == "lru" else f"seed{seed}-{mode}"


@pytest.fixture
def seed_result(request: pytest.FixtureRequest, make_database: Callable[[], str]) -> SeedResult:
    """One run per seed and mode (both instances, every recipient), shared by the tests of
    that run."""
    require_postfix("pgsql")
    run: tuple[int, str] = request.param
    if run not in _results:
        _results[run] = run_seed(run[0], make_database, exclude=EXCLUDE, mode=run[1])
    return _results[run]


def _fail(result: SeedResult, what: str, table: str) -> None:
    pytest.fail(f"seed {result.seed}: {what}\n{table}\n\n{result.dataset_text}", pytrace=False)


@pytest.mark.parametrize("seed_result", RUNS, indirect=True, ids=_run_id)
def test_maplookup_and_hash_tables_from_export_agree(seed_result: SeedResult) -> None:
    bad = [d for d in seed_result.disagreements if d.a_vs_b]
    if bad:
        result = SeedResult(**{**seed_result.__dict__, "disagreements": bad, "refused": [],
                               "round_trip": [], "routing": []})  # fmt: skip
        _fail(
            seed_result,
            f"{len(bad)} of {seed_result.recipients} recipients differ between Postfix with "
            "maplookup (A) and Postfix with hash: tables from `maplookup export` (B)",
            format_table([result]),
        )


@pytest.mark.parametrize("seed_result", RUNS, indirect=True, ids=_run_id)
def test_trace_predicts_what_postfix_does(seed_result: SeedResult) -> None:
    bad = [d for d in seed_result.disagreements if d.trace_vs_a]
    if bad:
        result = SeedResult(**{**seed_result.__dict__, "disagreements": bad, "refused": [],
                               "round_trip": [], "routing": []})  # fmt: skip
        _fail(
            seed_result,
            f"{len(bad)} of {seed_result.recipients} recipients: `maplookup trace` predicts "
            "otherwise than Postfix with maplookup (A) does",
            format_table([result]),
        )


@pytest.mark.parametrize("seed_result", RUNS, indirect=True, ids=_run_id)
def test_routing_maps_answer_like_hash_tables_from_export(seed_result: SeedResult) -> None:
    """sender_login, relay_domains, relay_recipients, transport: each key, asked in the order
    the Postfix daemon using the map asks (tests/differential/routing.py)."""
    if seed_result.routing:
        _fail(
            seed_result,
            f"{len(seed_result.routing)} keys of the maps of issue 14 answer otherwise with "
            "maplookup than with hash: tables from `maplookup export`",
            "\n".join(str(d) for d in seed_result.routing),
        )


@pytest.mark.parametrize("seed_result", RUNS, indirect=True, ids=_run_id)
def test_export_then_import_gives_back_the_same_records(seed_result: SeedResult) -> None:
    if seed_result.round_trip:
        _fail(seed_result, "export + import changed records", "\n".join(seed_result.round_trip))


@pytest.mark.parametrize("seed_result", RUNS, indirect=True, ids=_run_id)
def test_admin_accepts_every_record_postfix_accepts(seed_result: SeedResult) -> None:
    if seed_result.refused:
        _fail(
            seed_result,
            "admin refused records Postfix's hash: tables accept",
            "\n".join(f"{record}: {message}" for record, message in seed_result.refused),
        )


@pytest.mark.parametrize("seed_result", RUNS, indirect=True, ids=_run_id)
def test_the_complete_copy_answered_every_lookup(seed_result: SeedResult) -> None:
    """In complete mode, A's agreement above is the copy's: not one lookup went to the
    database."""
    if seed_result.mode == "complete" and seed_result.copy_fallbacks:
        _fail(
            seed_result,
            f"{seed_result.copy_fallbacks:.0f} lookups were not answered from the complete copy",
            "",
        )
