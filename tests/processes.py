"""The maplookup command line as a separate process, as admins see it.

The server process itself (start_server, free_port, wait_for_port, ...) and the lookup
clients live in :mod:`maplookup.testing`, shared with the benchmarks.
"""

from __future__ import annotations

import subprocess
import sys


def maplookup_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maplookup", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
