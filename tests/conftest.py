"""Shared fixtures: a real PostgreSQL for the whole run, fresh databases, the Postfix check.

Tests never skip for want of a database: they start a throwaway cluster with the same module
``maplookup serve`` uses (or use MAPLOOKUP_TEST_DSN).  Postfix-dependent tests skip with a
reason when Postfix is not installed, except under CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from maplookup.embedded import EmbeddedPostgres
from tests.helpers import database_factory

# The suite runs as root on CI machines; servers it starts may keep root (tests that check
# the refusal and the privilege drop set this themselves).
os.environ.setdefault("MAPLOOKUP_ALLOW_ROOT", "true")


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """DSN of a PostgreSQL server that lets us create databases."""
    external = os.environ.get("MAPLOOKUP_TEST_DSN")
    if external:
        yield external
        return
    state_dir = Path(tempfile.mkdtemp(prefix="maplookup-test-pg-"))
    state_dir.chmod(0o755)  # the cluster runs as an unprivileged user when we are root
    cluster = EmbeddedPostgres(state_dir=state_dir, fast_unsafe=True)
    try:
        yield cluster.start()
    finally:
        cluster.stop(mode="immediate")
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def make_database(pg_dsn: str) -> Callable[[], str]:
    """Create an empty database with the maplookup schema; returns its DSN."""
    return database_factory(pg_dsn, "maplookup_test")


@pytest.fixture
def own_cluster() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of the test's own, on a fixed port, for tests that stop and start it."""
    state_dir = Path(tempfile.mkdtemp(prefix="maplookup-own-pg-"))
    state_dir.chmod(0o755)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # A fixed port, so that a service's DSN stays valid across a restart.
    cluster = EmbeddedPostgres(state_dir=state_dir, port=port, fast_unsafe=True)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop(mode="immediate")
        shutil.rmtree(state_dir, ignore_errors=True)
