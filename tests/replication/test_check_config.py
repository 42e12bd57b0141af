"""`maplookup check-config` on a real primary and standby: what each connection reaches."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.replication.pair import ReplicatedPair


def check_config(dsn: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maplookup", "check-config", "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_says_what_each_connection_reaches(
    pair: ReplicatedPair, databases: tuple[str, str]
) -> None:
    primary, standby = databases
    primary_port, standby_port = pair.primary.port, pair.standby.port

    on_primary = check_config(primary)
    assert on_primary.returncode == 0, on_primary.stdout + on_primary.stderr
    assert (
        f"  lookups reach: 127.0.0.1:{primary_port}, a primary; LISTEN works: changes are seen "
        "within milliseconds\n"
    ) in on_primary.stdout
    assert f"  admin writes reach: 127.0.0.1:{primary_port}, the primary\n" in on_primary.stdout
    assert "change feed: at position" in on_primary.stdout
    assert "pooler" not in on_primary.stdout

    # The standby alone: a valid MX host (serve only reads), with a warning that the admin
    # commands cannot write through it.
    on_standby = check_config(standby)
    assert on_standby.returncode == 0, on_standby.stdout + on_standby.stderr
    lookups = next(
        line for line in on_standby.stdout.splitlines() if line.startswith("  lookups reach:")
    )
    assert lookups.startswith(f"  lookups reach: 127.0.0.1:{standby_port}, a hot standby (")
    # The fixture's standby streams over the primary's unix socket: the path, then the port.
    assert re.search(rf"\(streaming from \S+:{primary_port}; ", lookups), lookups
    assert "bytes received but not replayed" in lookups
    assert lookups.endswith(
        "; LISTEN refused: the change feed polls every 0.2 s (cache.change_feed_poll_interval_s)"
    )
    assert "WARNING: admin commands cannot write through this dsn: no primary reachable" in (
        on_standby.stdout
    )

    # A host list that prefers the standby: lookups on the standby, writes on the primary.
    database = primary.rsplit("/", 1)[1]
    host_list = (
        f"postgresql://{pair.primary.superuser}@127.0.0.1:{standby_port},"
        f"127.0.0.1:{primary_port}/{database}?target_session_attrs=prefer-standby"
    )
    listed = check_config(host_list)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert f"  lookups reach: 127.0.0.1:{standby_port}, a hot standby (" in listed.stdout
    assert f"  admin writes reach: 127.0.0.1:{primary_port}, the primary\n" in listed.stdout
    assert f"  host 127.0.0.1:{standby_port}: standby\n" in listed.stdout
    assert f"  host 127.0.0.1:{primary_port}: primary\n" in listed.stdout
