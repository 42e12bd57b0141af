"""The embedded PostgreSQL cluster, against real PostgreSQL binaries (no mocks).

One cluster is started per module and shared; tests that stop it leave it to
the `running` fixture to start it again (start() is idempotent and cheap once
the data directory exists).  asyncpg needs asyncio, so these are plain `def`
tests calling asyncio.run() rather than trio tests.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from maplookup.embedded import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    default_state_dir,
    find_pg_bin_dir,
    read_running_dsn,
)
from tests.helpers import require_tool

IS_ROOT = os.geteuid() == 0


def _traversable_tmpdir() -> Path:
    """A fresh dir under /tmp that the postgres user can traverse.

    pytest's tmp_path lives below /tmp/pytest-of-root, which is 0700 and so
    unusable for a cluster run as `postgres` when the tests run as root.
    """
    d = Path(tempfile.mkdtemp(prefix="maplookup-embedded-", dir="/tmp"))
    d.chmod(0o755)
    return d


async def _fetchval(dsn: str, query: str) -> Any:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def _execute(dsn: str, query: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(query)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def base_dir() -> Iterator[Path]:
    d = _traversable_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(base_dir: Path) -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(base_dir / "state", fast_unsafe=True)
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()
        assert not pg.is_running()


@pytest.fixture
def running(cluster: EmbeddedPostgres) -> EmbeddedPostgres:
    cluster.start()
    return cluster


def test_both_dsns_work_with_asyncpg(running: EmbeddedPostgres) -> None:
    assert running.dsn.startswith("postgresql://maplookup@/maplookup?host=/")
    assert running.tcp_dsn == f"postgresql://maplookup@127.0.0.1:{running.port}/maplookup"
    assert asyncio.run(_fetchval(running.dsn, "SELECT 1")) == 1
    assert asyncio.run(_fetchval(running.tcp_dsn, "SELECT 1")) == 1


def test_cluster_settings(running: EmbeddedPostgres) -> None:
    assert asyncio.run(_fetchval(running.dsn, "SHOW server_encoding")) == "UTF8"
    assert asyncio.run(_fetchval(running.dsn, "SHOW lc_collate")) == "C.UTF-8"
    assert asyncio.run(_fetchval(running.dsn, "SHOW fsync")) == "off"  # fast_unsafe
    assert asyncio.run(_fetchval(running.dsn, "SELECT current_database()")) == "maplookup"
    assert asyncio.run(_fetchval(running.dsn, "SHOW listen_addresses")) == "127.0.0.1"


def test_dsn_works_with_psql(running: EmbeddedPostgres) -> None:
    psql = find_pg_bin_dir() / "psql"
    if not psql.exists():
        psql = Path(require_tool("psql", "postgresql-client"))
    for dsn in (running.dsn, running.tcp_dsn):
        out = subprocess.run(
            [str(psql), dsn, "-XAtc", "SELECT 40 + 2"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert out.stdout.strip() == "42"


def test_state_layout(running: EmbeddedPostgres) -> None:
    state = running.state_dir
    assert (state / "dsn").read_text().strip() == running.dsn
    assert stat.S_IMODE((state / "pgdata").stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "run").stat().st_mode) == 0o700
    assert (state / "log" / "postgresql.log").stat().st_size > 0
    expected_owner = "postgres" if IS_ROOT else pwd.getpwuid(os.geteuid()).pw_name
    for sub in ("pgdata", "run", "log"):
        assert pwd.getpwuid((state / sub).stat().st_uid).pw_name == expected_owner


def test_second_instance_reuses_running_cluster(running: EmbeddedPostgres) -> None:
    other = EmbeddedPostgres(running.state_dir)
    assert other.start() == running.dsn
    assert other.port == running.port
    assert asyncio.run(_fetchval(other.dsn, "SELECT 1")) == 1


def test_stop_restart_persists_data(running: EmbeddedPostgres) -> None:
    state = running.state_dir
    asyncio.run(
        _execute(running.dsn, "CREATE TABLE persisted (x int); INSERT INTO persisted VALUES (7)")
    )
    assert read_running_dsn(state) == running.dsn

    running.stop()
    assert not running.is_running()
    assert read_running_dsn(state) is None
    assert not (state / "dsn").exists()
    with pytest.raises(EmbeddedPostgresError, match="not started"):
        _ = running.dsn
    running.stop()  # second stop is harmless

    # A new object on the same dir, as a later `maplookup serve` would do.
    with EmbeddedPostgres(state, fast_unsafe=True) as again:
        assert read_running_dsn(state) == again.dsn
        assert asyncio.run(_fetchval(again.dsn, "SELECT x FROM persisted")) == 7
    assert not again.is_running()
    assert read_running_dsn(state) is None


def test_read_running_dsn_ignores_stale_file(cluster: EmbeddedPostgres) -> None:
    cluster.stop()
    (cluster.state_dir / "dsn").write_text("postgresql://maplookup@/maplookup?host=/x&port=1\n")
    assert read_running_dsn(cluster.state_dir) is None
    assert read_running_dsn(cluster.state_dir / "does-not-exist") is None
    cluster.start()
    assert read_running_dsn(cluster.state_dir) == cluster.dsn


def test_dsn_before_start_is_an_error(base_dir: Path) -> None:
    pg = EmbeddedPostgres(base_dir / "never-started")
    with pytest.raises(EmbeddedPostgresError, match="not started"):
        _ = pg.tcp_dsn
    assert not pg.is_running()
    pg.stop()  # nothing there: harmless
    assert not (base_dir / "never-started").exists()


def test_initdb_failure_reports_stderr(base_dir: Path) -> None:
    state = base_dir / "bad-superuser"
    pg = EmbeddedPostgres(state, superuser="pg_forbidden", fast_unsafe=True)
    with pytest.raises(EmbeddedPostgresError, match=r"initdb failed .*pg_") as excinfo:
        pg.start()
    assert "\n" not in str(excinfo.value)
    assert not (state / "pgdata").exists()


@pytest.mark.skipif(not IS_ROOT, reason="only root runs the cluster as another user")
def test_untraversable_parent_is_a_clear_error() -> None:
    parent = Path(tempfile.mkdtemp(prefix="maplookup-private-", dir="/tmp"))  # 0700, root
    try:
        pg = EmbeddedPostgres(parent / "state")
        with pytest.raises(EmbeddedPostgresError, match=re.escape(str(parent))) as excinfo:
            pg.start()
        message = str(excinfo.value)
        assert "not traversable by user 'postgres'" in message
        assert "chmod o+x" in message
        assert not (parent / "state").exists()
    finally:
        shutil.rmtree(parent)


def test_bogus_bin_dir(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "state", bin_dir=tmp_path / "no-such-bin")
    with pytest.raises(EmbeddedPostgresError, match="lacks pg_ctl, initdb"):
        pg.start()
    assert not (tmp_path / "state").exists()


def test_find_pg_bin_dir_finds_server_binaries() -> None:
    bin_dir = find_pg_bin_dir()
    assert (bin_dir / "pg_ctl").is_file()
    assert (bin_dir / "initdb").is_file()


def test_find_pg_bin_dir_prefers_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("pg_ctl", "initdb"):
        (fake / name).write_text("#!/bin/sh\nexit 1\n")
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'empty'}{os.pathsep}{fake}")
    assert find_pg_bin_dir() == fake
    # Symlinks on PATH lead to the real directory, which has psql, postgres...
    links = tmp_path / "links"
    links.mkdir()
    for name in ("pg_ctl", "initdb"):
        (links / name).symlink_to(fake / name)
    monkeypatch.setenv("PATH", str(links))
    assert find_pg_bin_dir() == fake


def test_default_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_state_dir() == Path("/var/lib/maplookup")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "maplookup"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "maplookup"
