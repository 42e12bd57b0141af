"""The batcher's rules without a database: grouping, order, fair shares, and surviving bugs.

What PostgreSQL does with the statements is tested against a real one in
``tests/integration/test_batching.py``; here a scripted pool records what was sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import outcome

from maplookup.db.batching import BatchSettings, LookupBatcher, LookupJob
from maplookup.maps import LookupSettings, MapName


class ScriptedConnection:
    def __init__(self, statements: list[tuple[str, list[str]]]) -> None:
        self.statements = statements

    async def fetchval(self, query: str, key: str, *args: object) -> str:
        self.statements.append((query, [key]))
        await asyncio.sleep(0)
        return f"answer:{key}"

    async def fetch(self, query: str, keys: list[str], *args: object) -> list[tuple[str]]:
        self.statements.append((query, list(keys)))
        await asyncio.sleep(0)
        return [(f"answer:{key}",) for key in keys]


class ScriptedPool:
    """Hands out one connection at a time per acquire, like a pool of ``size``."""

    def __init__(self, size: int) -> None:
        self.statements: list[tuple[str, list[str]]] = []
        self._free = asyncio.Semaphore(size)

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[ScriptedConnection]:
        async with self._free:
            yield ScriptedConnection(self.statements)


def run_batcher(
    jobs: list[LookupJob], *, workers: int, max_keys: int, finish_fails_first: bool = False
) -> tuple[dict[int, outcome.Outcome[str | None]], list[tuple[str, list[str]]]]:
    """Queue every job at once (as one hand-over from trio would) and wait for all answers."""

    async def main() -> tuple[dict[int, outcome.Outcome[str | None]], list[Any]]:
        pool = ScriptedPool(workers)
        answers: dict[int, outcome.Outcome[str | None]] = {}
        done = asyncio.Event()
        failed_once = [not finish_fails_first]
        expected = sum(j.waiting for j in jobs)  # abandoned ones get no answer

        def finish(job: LookupJob, result: outcome.Outcome[str | None]) -> None:
            if not failed_once[0]:
                failed_once[0] = True
                raise RuntimeError("a bug in the hand-back")
            job.result = result
            answers[id(job)] = result
            if len(answers) == expected:
                done.set()

        batcher = LookupBatcher(
            pool,  # type: ignore[arg-type]
            BatchSettings(workers=workers, max_keys_per_query=max_keys, query_timeout_s=5.0),
            finish,
        )
        batcher.start()
        await asyncio.sleep(0)  # the workers go idle
        for job in jobs:
            batcher.add(job)
        await asyncio.wait_for(done.wait(), timeout=5)
        await batcher.close()
        return answers, pool.statements

    return asyncio.run(main())


def job(key: str, map_name: MapName = MapName.VMAILBOX, delimiter: str = "+") -> LookupJob:
    return LookupJob(map_name, key, LookupSettings(recipient_delimiter=delimiter), None)


def test_one_statement_per_map_and_settings_in_order_and_within_the_limit() -> None:
    jobs = [job(f"v{i}@d") for i in range(10)]
    jobs += [job(f"a{i}@d", MapName.VIRTUAL) for i in range(3)]
    jobs += [job(f"x{i}@d", delimiter="-") for i in range(2)]
    answers, statements = run_batcher(jobs, workers=1, max_keys=4)
    assert {id(j): answers[id(j)].unwrap() for j in jobs} == {
        id(j): f"answer:{j.key}" for j in jobs
    }
    sent = [keys for _, keys in statements]
    # The oldest first; then whatever waits for the same map and settings, up to 4 keys.
    assert sent == [
        ["v0@d", "v1@d", "v2@d", "v3@d"],
        ["v4@d", "v5@d", "v6@d", "v7@d"],
        ["v8@d", "v9@d"],
        ["a0@d", "a1@d", "a2@d"],
        ["x0@d", "x1@d"],
    ]
    assert all("maplookup.virtual_match(" in q for q, keys in statements if keys[0].startswith("a"))
    # A batch of one is the single-key statement the pgsql: tables also send.
    single = run_batcher([job("only@d")], workers=1, max_keys=32)[1]
    assert single == [("SELECT maplookup.vmailbox($1::text, $2::text)", ["only@d"])]


def test_a_burst_is_shared_between_the_workers_it_wakes() -> None:
    jobs = [job(f"v{i}@d") for i in range(40)]
    _, statements = run_batcher(jobs, workers=4, max_keys=32)
    sizes = [len(keys) for _, keys in statements]
    assert sum(sizes) == 40
    assert len(sizes) >= 4
    assert max(sizes) <= 10  # a fair share each, not one worker taking all 32


def test_duplicate_keys_are_asked_once_and_all_answered() -> None:
    jobs = [job("same@d") for _ in range(5)]
    answers, statements = run_batcher(jobs, workers=1, max_keys=32)
    assert [keys for _, keys in statements] == [["same@d"]]
    assert all(answers[id(j)].unwrap() == "answer:same@d" for j in jobs)


def test_abandoned_lookups_are_not_sent() -> None:
    jobs = [job(f"v{i}@d") for i in range(6)]
    for gone in jobs[1::2]:
        gone.waiting = False  # their trio tasks gave up
    live = jobs[0::2]
    answers, statements = run_batcher(live + jobs[1::2], workers=1, max_keys=32)
    assert [keys for _, keys in statements] == [["v0@d", "v2@d", "v4@d"]]
    assert set(answers) == {id(j) for j in live}


def test_a_bug_in_the_hand_back_costs_a_temp_not_the_worker() -> None:
    jobs = [job(f"v{i}@d") for i in range(3)]
    # The first hand-back raises; with one worker, the others must still be answered.
    answers, _ = run_batcher(jobs, workers=1, max_keys=1, finish_fails_first=True)
    assert len(answers) == 3
    results = [answers[id(j)] for j in jobs]
    assert isinstance(results[0], outcome.Error)
    assert [r.unwrap() for r in results[1:]] == ["answer:v1@d", "answer:v2@d"]
