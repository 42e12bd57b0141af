"""Fixtures for tests that run Postfix's own programs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import require_postfix


@pytest.fixture(scope="session")
def postfix_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the minimal main.cf postmap insists on."""
    require_postfix()
    directory = tmp_path_factory.mktemp("postfix-conf")
    (directory / "main.cf").write_text("compatibility_level = 3.6\n")
    return directory
