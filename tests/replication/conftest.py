"""Fixtures for the replication tests: one primary + standby pair per module, and databases.

The pair is started once per module (initdb, pg_basebackup: a few seconds); tests that stop,
start or promote a cluster restore what they changed, or use ``own_pair``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from maplookup.db.changes import FeedSettings
from maplookup.serve import service as service_module
from tests.replication.pair import ReplicatedPair


@pytest.fixture(scope="module")
def pair() -> Iterator[ReplicatedPair]:
    replicated = ReplicatedPair.start()
    try:
        yield replicated
    finally:
        replicated.close()


@pytest.fixture
def own_pair() -> Iterator[ReplicatedPair]:
    """A pair of the test's own, for tests that leave it changed (a promoted standby)."""
    replicated = ReplicatedPair.start()
    try:
        yield replicated
    finally:
        replicated.close()


@pytest.fixture
def databases(pair: ReplicatedPair) -> tuple[str, str]:
    """A fresh maplookup database: (primary DSN, standby DSN), the standby caught up."""
    return pair.new_database()


@pytest.fixture
def quick_listen(monkeypatch: pytest.MonkeyPatch) -> None:
    """LISTEN retried every 0.5 s instead of 30: a promotion is noticed within the test."""
    monkeypatch.setattr(
        service_module,
        "FeedSettings",
        lambda **kwargs: FeedSettings(**{**kwargs, "listen_retry_s": 0.5}),
    )
