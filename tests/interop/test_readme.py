"""Every console example in README.md, run verbatim against `make demo`, prints what it shows.

README.md promises that after its two set-up commands every ``console`` block works as
written.  This test keeps that promise true: it runs the first set-up command (``make demo``)
as a new user would, then each ``$ `` line of every ``console`` block with bash in the
project directory, and compares what the terminal would show (stdout and stderr together)
with the lines the README prints under it.

Two things differ from a new user's machine, neither of them in the commands: the demo's
private PostgreSQL lives in a temporary directory (``MAPLOOKUP_EMBEDDED__STATE_DIR``, which
the commands inherit, so ``trace`` finds the same cluster) instead of the user's state
directory, and ``/usr/sbin`` is on PATH (it is for root, where the README's ``postmap``
runs).  The examples talk to 127.0.0.1:9000, the demo's port, so that port must be free.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from maplookup.testing import wait_for_port
from tests.helpers import require_postfix, require_tool

PROJECT = Path(__file__).resolve().parents[2]
README = PROJECT / "README.md"
DEMO_PORT = 9000  # README: "make demo  # run maplookup on 127.0.0.1:9000"


@dataclass(frozen=True)
class Example:
    """One ``$ command`` of a console block and the lines the README shows under it."""

    line: int  # 1-based line of the command in README.md
    command: str
    expected: tuple[str, ...]


def console_examples(text: str) -> list[Example]:
    """The ``$ `` commands of every ```console block, each with its expected output lines."""
    examples: list[Example] = []
    in_console = False
    command: tuple[int, str] | None = None
    expected: list[str] = []

    def finish() -> None:
        nonlocal command
        if command is not None:
            examples.append(Example(command[0], command[1], tuple(expected)))
        command = None
        expected.clear()

    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("```"):
            finish()
            in_console = line.strip() == "```console"
        elif in_console and line.startswith("$ "):
            finish()
            command = (number, line[2:])
        elif in_console and command is not None:
            expected.append(line)
    finish()
    return examples


def test_console_examples_are_found() -> None:
    """The parser sees the README's examples (else the test below would check nothing)."""
    examples = console_examples(README.read_text(encoding="utf-8"))
    commands = [e.command for e in examples]
    assert any(c.startswith("postmap ") for c in commands), commands
    assert any("maplookup trace" in c for c in commands), commands
    assert all(e.expected for e in examples), "an example without its output"


def test_parser_splits_commands_and_output() -> None:
    text = "```sh\n$ not console\n```\n```console\n$ a\nA1\nA2\n$ b; echo $?\n1\n```\n$ c\n"
    assert console_examples(text) == [
        Example(5, "a", ("A1", "A2")),
        Example(8, "b; echo $?", ("1",)),
    ]


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture(scope="module")
def demo_environment() -> Iterator[dict[str, str]]:
    """``make demo`` running on 127.0.0.1:9000; yields the environment the examples run in."""
    require_postfix()
    make = require_tool("make", "make")
    if not (PROJECT / ".venv" / "bin" / "maplookup").exists():
        pytest.fail("the README's examples use .venv/bin/maplookup: run `make test`, not pytest")
    if not _port_is_free(DEMO_PORT):
        message = f"port {DEMO_PORT}, the demo's, is in use (a `make demo` running?)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    state_dir = Path(tempfile.mkdtemp(prefix="maplookup-readme-"))
    state_dir.chmod(0o755)  # as root the cluster runs as postgres, which must reach it
    env = {
        **os.environ,
        "MAPLOOKUP_EMBEDDED__STATE_DIR": str(state_dir),
        "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin",
    }
    log_path = state_dir / "demo.log"
    with log_path.open("wb") as log:
        # A session of its own: make does not pass SIGTERM on, so the group gets it.
        demo = subprocess.Popen(
            [make, "--no-print-directory", "demo"],
            cwd=PROJECT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        try:
            wait_for_port(DEMO_PORT, demo, timeout_s=90)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log_path.read_text()}") from exc
        yield env
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGTERM)
            try:
                demo.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(demo.pid, signal.SIGKILL)
                demo.wait()
        subprocess.run(["rm", "-rf", str(state_dir)], check=False)


EXAMPLES = console_examples(README.read_text(encoding="utf-8"))


@pytest.mark.postfix
@pytest.mark.parametrize(
    "example", EXAMPLES, ids=[re.sub(r"\s+", "_", e.command)[:60] for e in EXAMPLES]
)
def test_readme_console_example(example: Example, demo_environment: dict[str, str]) -> None:
    result = subprocess.run(
        ["bash", "-c", example.command],
        cwd=PROJECT,
        env=demo_environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=False,
    )
    shown = tuple(result.stdout.splitlines())
    assert (result.returncode, shown) == (0, example.expected), (
        f"README.md:{example.line}: `{example.command}` exited {result.returncode} and printed\n"
        + result.stdout
    )
