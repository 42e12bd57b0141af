"""--help's examples name the command as the reader typed it (issue 11: `maplookup` is not on
PATH after `make demo`, `.venv/bin/maplookup` is)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from maplookup.cli.main import build_parser, program_name


def test_a_path_not_on_path_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert program_name(".venv/bin/maplookup") == ".venv/bin/maplookup"


def test_the_command_path_finds_is_plain_maplookup(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    command = tmp_path / "maplookup"
    command.touch()
    monkeypatch.setattr(shutil, "which", lambda name: str(command))
    assert program_name(str(command)) == "maplookup"


@pytest.mark.parametrize("argv0", ["maplookup", "/usr/lib/python3/maplookup/__main__.py", "-c"])
def test_other_invocations_say_maplookup(argv0: str) -> None:
    assert program_name(argv0) == "maplookup"


def test_the_epilogue_uses_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr("sys.argv", [".venv/bin/maplookup"])
    text = build_parser().format_help()
    assert "`.venv/bin/maplookup serve --demo`" in " ".join(text.split())
