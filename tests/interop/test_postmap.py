"""Postfix's own client against the real server process: ``postmap -q`` over socketmap and tcp.

The server runs as a subprocess started through the CLI (``python -m maplookup serve``) with a
database prepared by ``maplookup db init --demo``, so this is exactly what an admin runs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from maplookup.testing import RunningServer, free_port, start_server, stop_server
from tests.processes import maplookup_cli


@pytest.fixture(scope="module")
def demo_dsn(make_database: Callable[[], str]) -> str:
    dsn = make_database()
    result = maplookup_cli("db", "init", "--dsn", dsn, "--demo")
    assert result.returncode == 0, result.stderr
    assert "demo data loaded" in result.stdout
    return dsn


@pytest.fixture(scope="module")
def server(demo_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(demo_dsn, tmp_path_factory.mktemp("server") / "server.log")
    yield running
    assert stop_server(running) == 0


def postmap(
    postfix_dir: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["postmap", "-c", str(postfix_dir), *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
        check=False,
        env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin"},
    )


FOUND = [
    ("vmailbox", "meier@arkum.ch", "arkum.ch/meier/"),
    ("vmailbox", "Meier+Newsletter@ARKUM.CH", "arkum.ch/meier/"),
    ("vmailbox", "archive@akadia.com", "akadia.com/archive"),
    ("virtual", "roland.meier@arkum.ch", "meier@arkum.ch"),
    ("virtual", "team+x@arkum.ch", "meier+x@arkum.ch,mueller+x@arkum.ch"),
    ("virtual", "anyone@akadia.com", "info@akadia.com"),
    ("virtual", "Mueller@Arkum.ORG", "mueller@arkum.ch"),
    ("domains", "arkum.ch", "arkum.ch"),
    ("alias_domains", "arkum.org", "arkum.org"),
    ("uid", "meier@arkum.ch", "405"),
    ("gid", "meier@arkum.ch", "5000"),
    ("uid", "mueller@arkum.ch", "5000"),
]

NOT_FOUND = [
    ("vmailbox", "nobody@arkum.ch"),
    ("vmailbox", "meier@unhosted.example"),
    ("virtual", "meier@arkum.ch"),
    ("virtual", "ghost@arkum.org"),
    ("domains", "unhosted.example"),
    ("vmailbox", "a b c@arkum.ch"),
    ("vmailbox", "x'; DROP TABLE maplookup.mailboxes; --@arkum.ch"),
    ("vmailbox", "jürgen@arkum.ch"),
]


@pytest.mark.parametrize(("map_name", "key", "expected"), FOUND)
def test_postmap_socketmap_found(
    server: RunningServer, postfix_dir: Path, map_name: str, key: str, expected: str
) -> None:
    result = postmap(postfix_dir, "-q", key, server.socketmap(map_name))
    assert (result.returncode, result.stdout, result.stderr) == (0, expected + "\n", "")


@pytest.mark.parametrize(("map_name", "key"), NOT_FOUND)
def test_postmap_socketmap_not_found(
    server: RunningServer, postfix_dir: Path, map_name: str, key: str
) -> None:
    result = postmap(postfix_dir, "-q", key, server.socketmap(map_name))
    assert (result.returncode, result.stdout, result.stderr) == (1, "", "")


def test_postmap_many_keys_over_one_connection(server: RunningServer, postfix_dir: Path) -> None:
    keys = [f"user{i}@arkum.ch" for i in range(300)] + ["meier@arkum.ch", "MUELLER@arkum.ch"]
    result = postmap(postfix_dir, "-q", "-", server.socketmap("vmailbox"), stdin="\n".join(keys))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "meier@arkum.ch\tarkum.ch/meier/",
        "MUELLER@arkum.ch\tarkum.ch/mueller/",
    ]


@pytest.mark.parametrize(
    ("map_name", "key", "expected"),
    [
        ("vmailbox", "meier@arkum.ch", "arkum.ch/meier/"),
        ("vmailbox", "Meier+x@Arkum.ch", "arkum.ch/meier/"),
        ("virtual", "team@arkum.ch", "meier@arkum.ch,mueller@arkum.ch"),
        ("virtual", "anyone with space@akadia.com", "info@akadia.com"),
        ("virtual", "100%@akadia.com", "info@akadia.com"),
    ],
)
def test_postmap_tcp_table_found(
    server: RunningServer, postfix_dir: Path, map_name: str, key: str, expected: str
) -> None:
    result = postmap(postfix_dir, "-q", key, server.tcp(map_name))
    assert (result.returncode, result.stdout, result.stderr) == (0, expected + "\n", "")


@pytest.mark.parametrize("key", ["nobody@arkum.ch", "odd key%@arkum.ch", "x@unhosted.example"])
def test_postmap_tcp_table_not_found(server: RunningServer, postfix_dir: Path, key: str) -> None:
    result = postmap(postfix_dir, "-q", key, server.tcp("vmailbox"))
    assert (result.returncode, result.stdout, result.stderr) == (1, "", "")


def test_unknown_map_name_is_an_error_not_not_found(
    server: RunningServer, postfix_dir: Path
) -> None:
    result = postmap(postfix_dir, "-q", "meier@arkum.ch", server.socketmap("mailboxes"))
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr != "", "PERM must not look like 'not found' to Postfix"


def test_query_cli_exit_codes(server: RunningServer) -> None:
    where = ["--server", f"127.0.0.1:{server.socketmap_port}"]
    found = maplookup_cli("query", "vmailbox", "meier@arkum.ch", *where)
    assert (found.returncode, found.stdout) == (0, "arkum.ch/meier/\n")
    missing = maplookup_cli("query", "vmailbox", "nobody@arkum.ch", *where)
    assert (missing.returncode, missing.stdout) == (1, "")
    tcp = maplookup_cli(
        "query",
        "vmailbox",
        "meier@arkum.ch",
        "--tcp-table",
        f"127.0.0.1:{server.tcp_ports['vmailbox']}",
    )
    assert (tcp.returncode, tcp.stdout) == (0, "arkum.ch/meier/\n")
    bad_usage = maplookup_cli("query", "nosuchmap", "x")
    assert bad_usage.returncode == 3
    unreachable = maplookup_cli("query", "vmailbox", "x@y", "--server", f"127.0.0.1:{free_port()}")
    assert unreachable.returncode == 2


def test_database_down_gives_temporary_failure(postfix_dir: Path, tmp_path: Path) -> None:
    # Nothing listens on this port: every lookup must defer, never bounce.
    dead_dsn = f"postgresql://maplookup@127.0.0.1:{free_port()}/maplookup"
    running = start_server(dead_dsn, tmp_path / "server.log")
    try:
        result = postmap(postfix_dir, "-q", "meier@arkum.ch", running.socketmap("vmailbox"))
        assert result.returncode == 1
        assert result.stdout == ""
        assert "temporary" in result.stderr.lower() or "try again" in result.stderr.lower(), (
            result.stderr
        )
        tcp = postmap(postfix_dir, "-q", "meier@arkum.ch", running.tcp("vmailbox"))
        assert tcp.returncode == 1
        assert tcp.stdout == ""
        assert tcp.stderr != ""
        query = maplookup_cli(
            "query", "vmailbox", "meier@arkum.ch", "--server", f"127.0.0.1:{running.socketmap_port}"
        )
        assert query.returncode == 2
        assert "TEMP" in query.stderr
    finally:
        assert stop_server(running) == 0


def test_sigterm_exits_zero_and_frees_the_port(demo_dsn: str, tmp_path: Path) -> None:
    running = start_server(demo_dsn, tmp_path / "server.log")
    assert stop_server(running) == 0
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", running.socketmap_port)) != 0


def test_cli_change_is_seen_through_postmap(
    server: RunningServer, postfix_dir: Path, demo_dsn: str
) -> None:
    """The cache is on: a negative answer is cached, then the CLI adds the mailbox."""
    key, table = "fresh@arkum.ch", server.socketmap("vmailbox")
    for _ in range(2):
        assert postmap(postfix_dir, "-q", key, table).returncode == 1
    added = maplookup_cli("mailbox", "add", key, "--dsn", demo_dsn)
    assert added.returncode == 0, added.stderr
    deadline = time.monotonic() + 10
    while True:
        result = postmap(postfix_dir, "-q", key, table)
        if result.returncode == 0:
            break
        assert time.monotonic() < deadline, "the change was not seen within 10 s"
        time.sleep(0.01)
    assert result.stdout == "arkum.ch/fresh/\n"
    removed = maplookup_cli("mailbox", "remove", key, "--dsn", demo_dsn)
    assert removed.returncode == 0
    deadline = time.monotonic() + 10
    while postmap(postfix_dir, "-q", key, table).returncode != 1:
        assert time.monotonic() < deadline, "the removal was not seen within 10 s"
        time.sleep(0.01)
