"""Helpers shared by the hardening tests: condition waits, fd and RSS counts.

The socketmap client is :class:`maplookup.testing.TrioClient`.

Plain functions and small classes; fixtures live in the test modules that use them.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from pathlib import Path

import trio


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``condition`` until it holds; TooSlowError after ``timeout_s``."""
    with trio.fail_after(timeout_s):
        while not condition():  # noqa: ASYNC110 - polling counters, bounded by the deadline
            await trio.sleep(0.005)


async def closed_by_peer(stream: trio.SocketStream, timeout_s: float = 5.0) -> bool:
    """Read until EOF or reset: True; False if still open after ``timeout_s``."""
    with trio.move_on_after(timeout_s):
        while True:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return True
            if not data:
                return True
    return False


def open_fds(pid: int | str = "self") -> int:
    """Open file descriptors of a process (Linux /proc)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size from /proc/PID/status (VmRSS), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line")


def ensure_fd_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (never above the hard limit).

    Returns the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
