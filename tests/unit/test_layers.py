"""Imports point down only: each package imports its own layer or the ones below it.

The layers, bottom up (README "Design"): the base modules (the map contract, addresses,
errors, settings); ``protocol`` (sans-IO codecs); ``lookup`` (the map contract over an answer
source, the cache); ``db`` (asyncpg, SQL); the operations packages (``metrics``, ``logsetup``,
``embedded``); the Postfix side (``postfix``, ``transfer``, ``client``, and ``testing``: the
clients and the server process for tests and benchmarks); ``serve`` (the process); ``cli``.
A module that imports a layer above its own fails this test, naming the import, so the
layering cannot erode one convenient import at a time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "maplookup"

LAYERS: dict[str, int] = {
    "errors": 0,
    "address": 0,
    "maps": 0,
    "config": 0,
    "config_env": 0,
    "config_load": 0,
    "protocol": 1,
    "lookup": 2,
    "db": 3,
    "metrics": 4,
    "logsetup": 4,
    "embedded": 4,
    "postfix": 5,
    "transfer": 5,
    "client": 5,
    "testing": 5,
    "serve": 6,
    "cli": 7,
    "__main__": 8,
}
# What the package root itself provides (``from maplookup import __version__``).
ROOT_NAMES = {"__version__"}


def _part(module: str) -> str:
    """The layer name of ``maplookup.X...`` (X), or '' for the package root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports_above_own_layer() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        own = relative.parts[1] if len(relative.parts) > 1 else ""
        if own == "__init__":
            continue
        own_rank = LAYERS[own]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "maplookup":
                    targets = [
                        f"maplookup.{a.name}" for a in node.names if a.name not in ROOT_NAMES
                    ]
                elif node.module.startswith("maplookup."):
                    targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("maplookup.")]
            for target in targets:
                layer = _part(target)
                if layer != own and LAYERS[layer] > own_rank:
                    problems.append(f"{relative}:{node.lineno} imports {target} (a layer above)")
    return problems


def test_every_package_has_a_layer() -> None:
    found = {
        p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.name != "__init__.py"
    }
    found = {n for n in found if not n.startswith(("_", ".")) or n == "__main__"}
    found -= {"py", "sql"}
    assert found <= set(LAYERS) | {"__pycache__"}, sorted(found - set(LAYERS))


def test_imports_point_down_only() -> None:
    assert imports_above_own_layer() == []


def test_the_check_finds_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is not vacuous: a lookup module importing the server is reported."""
    package = tmp_path / "maplookup"
    (package / "lookup").mkdir(parents=True)
    (package / "lookup" / "bad.py").write_text("from maplookup.serve.server import Server\n")
    (package / "maps.py").write_text("from maplookup.address import fold\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", package)
    assert imports_above_own_layer() == [
        "maplookup/lookup/bad:1 imports maplookup.serve.server (a layer above)"
    ]
