"""The files in deploy/ are what the code accepts: config loads, unit verifies, snippets match."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from pydantic import BaseModel

from maplookup.config_load import load_settings
from maplookup.maps import MapName
from maplookup.postfix.config import PostfixConfigOptions, generate
from tests.helpers import require_tool

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_example_config_is_valid_and_documents_every_option() -> None:
    settings = load_settings(DEPLOY / "maplookup.toml", environ={})
    assert settings.database.dsn is not None
    text = (DEPLOY / "maplookup.toml").read_text()
    for section_name, section in settings:
        if isinstance(section, BaseModel):
            for field, info in type(section).model_fields.items():
                if info.deprecated:
                    # Still loads (an upgraded host's file), but no longer to be written.
                    assert f"{field} =" not in text, f"[{section_name}] {field} is deprecated"
                    continue
                assert f"{field} =" in text, f"[{section_name}] {field} is not documented"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    maplookup = shutil.which("maplookup") or str(Path(__file__).parents[2] / ".venv/bin/maplookup")
    unit = tmp_path / "maplookup.service"
    # verify insists that ExecStart exists: point it at this checkout's entry point.
    unit.write_text(
        (DEPLOY / "maplookup.service").read_text().replace("/usr/local/bin/maplookup", maplookup)
    )
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


def test_postfix_snippets_are_what_postfix_config_generates() -> None:
    settings = load_settings(DEPLOY / "maplookup.toml", environ={})
    generated = generate(
        PostfixConfigOptions(
            pgsql_dsn="postgresql://maplookup_reader:CHANGE-ME@127.0.0.1:5432/maplookup",
            socketmap=settings.listen.socketmap[0],
            recipient_delimiter=settings.lookup.recipient_delimiter,
            default_uid=settings.lookup.default_uid,
            default_gid=settings.lookup.default_gid,
            virtual_minimum_uid=1000,
        )
    )
    assert (DEPLOY / "postfix/main.cf.snippet").read_text() == generated.main_cf
    assert (DEPLOY / "postfix/master.cf.snippet").read_text() == generated.master_cf
    for name, content in generated.pgsql_files.items():
        assert (DEPLOY / "postfix" / name).read_text() == content
    assert f"socketmap:inet:127.0.0.1:9000:{MapName.VMAILBOX.value}" in generated.main_cf
