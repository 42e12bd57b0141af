"""`.ci/run` installs every Postfix map type, and every Cyrus SASL package, a test asks for.

Under CI a test that finds a map type missing fails (tests/helpers.py), so a new
``require_postfix("cdb")`` without its package in `.ci/run` would turn CI red on a machine that
has Postfix already: the failure this check catches before CI does.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.e2e.sasl import MECHANISMS
from tests.helpers import MAP_TYPE_PACKAGES, SASL_PACKAGES, SASL_PLUGIN_PACKAGES

PROJECT = Path(__file__).resolve().parents[2]


def required_map_types() -> set[str]:
    found: set[str] = set()
    for path in (PROJECT / "tests").rglob("*.py"):
        if path.resolve() == Path(__file__).resolve():
            continue  # its docstring's example is not a requirement
        for call in re.findall(r"require_postfix\(([^)]*)\)", path.read_text(encoding="utf-8")):
            found.update(re.findall(r"\"([a-z0-9_]+)\"", call))
    return found


def test_tests_ask_for_map_types() -> None:
    assert {"pgsql", "lmdb"} <= required_map_types()


def test_ci_script_installs_every_map_type_the_tests_need() -> None:
    script = (PROJECT / ".ci" / "run").read_text(encoding="utf-8")
    for map_type in sorted(required_map_types()):
        package = MAP_TYPE_PACKAGES[map_type]
        assert f"has_map_type {map_type} || need+=({package})" in script, map_type


def test_ci_script_installs_every_cyrus_sasl_package_the_tests_need() -> None:
    script = (PROJECT / ".ci" / "run").read_text(encoding="utf-8")
    packages = set(SASL_PACKAGES) | {SASL_PLUGIN_PACKAGES[m] for m in MECHANISMS}
    for package in sorted(packages):
        assert f"|| need+=({package})" in script, package
