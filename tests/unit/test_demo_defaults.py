"""``serve --demo`` fills in the README's default ids only where nobody set them."""

from __future__ import annotations

from pathlib import Path

from maplookup.config import Settings
from maplookup.db.demo import DEMO_GID, DEMO_UID, with_demo_defaults


def test_demo_gets_the_readme_default_ids() -> None:
    lookup = with_demo_defaults(Settings()).lookup
    assert (lookup.default_uid, lookup.default_gid) == (DEMO_UID, DEMO_GID) == (5000, 5000)


def test_ids_from_config_environment_or_flags_win() -> None:
    settings = Settings.model_validate({"lookup": {"default_uid": 700, "recipient_delimiter": "-"}})
    lookup = with_demo_defaults(settings).lookup
    assert (lookup.default_uid, lookup.default_gid, lookup.recipient_delimiter) == (700, 5000, "-")
    both = Settings.model_validate({"lookup": {"default_uid": 700, "default_gid": 800}})
    assert with_demo_defaults(both) is both


def test_a_reload_republishes_the_default_ids(tmp_path: Path) -> None:
    """Admin commands learn the embedded server's ids from its state dir: a SIGHUP that
    changes them must change the file too, or postfix-config writes the old ones."""
    from maplookup.serve.run import _publishing_ids

    new = Settings.model_validate({"lookup": {"default_uid": 7000, "default_gid": 7001}})
    reload = _publishing_ids(lambda: new, tmp_path)
    assert reload() is new
    assert (tmp_path / "server-ids").read_text().split() == ["7000", "7001"]
