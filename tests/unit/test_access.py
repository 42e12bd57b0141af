"""Access control: loopback by default, deliberate exposure, allowlists, root, dsn_file."""

from __future__ import annotations

import os
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from maplookup.config import ConfigError
from maplookup.config_load import load_settings
from maplookup.serve.privileges import PrivilegeError, check_not_root
from maplookup.serve.server import Server


def test_default_bind_is_loopback() -> None:
    settings = load_settings(environ={})
    assert [e.host for e in settings.listen.socketmap] == ["127.0.0.1"]


@pytest.mark.parametrize("endpoint", ["0.0.0.0:9000", "[::]:9000", "192.0.2.10:9000", "mx:9000"])
def test_non_loopback_bind_needs_an_allowlist_or_an_opt_out(endpoint: str) -> None:
    with pytest.raises(ConfigError, match="allowed_clients"):
        load_settings(overrides={"listen": {"socketmap": [endpoint]}}, environ={})
    allowed = load_settings(
        overrides={"listen": {"socketmap": [endpoint], "allowed_clients": ["192.0.2.0/24"]}},
        environ={},
    )
    assert allowed.listen.allowed_clients == [ip_network("192.0.2.0/24")]
    assert load_settings(
        overrides={"listen": {"socketmap": [endpoint], "allow_any_client": True}}, environ={}
    ).listen.allow_any_client


@pytest.mark.parametrize("endpoint", ["127.0.0.1:9000", "127.0.0.53:9000", "[::1]:9000"])
def test_loopback_binds_need_nothing(endpoint: str) -> None:
    load_settings(overrides={"listen": {"socketmap": [endpoint]}}, environ={})


class FakeSocket:
    def __init__(self, peer: Any) -> None:
        self.peer = peer

    def getpeername(self) -> Any:
        return self.peer


class FakeStream:
    def __init__(self, peer: Any) -> None:
        self.socket = FakeSocket(peer)


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        (("192.0.2.7", 40000), True),
        (("198.51.100.1", 40000), False),
        (("::ffff:192.0.2.7", 40000, 0, 0), True),
        (("2001:db8::1", 40000, 0, 0), True),
        (("2001:db9::1", 40000, 0, 0), False),
        (("127.0.0.1", 40000), True),
        (("::1", 40000, 0, 0), True),
        ("", True),  # a unix socket peer
    ],
)
def test_allowlist_check(peer: Any, allowed: bool) -> None:
    server = Server(
        answerer=None,  # type: ignore[arg-type]
        limits=load_settings(environ={}).limits,
        listeners=[],
        allowed_clients=[ip_network("192.0.2.0/24"), ip_network("2001:db8::/32")],
    )
    assert server._client_allowed(FakeStream(peer)) is allowed  # type: ignore[arg-type]


def test_root_is_refused_unless_a_user_or_allow_root_is_given() -> None:
    if os.geteuid() != 0:
        check_not_root(None, False)  # not root: nothing to refuse
        return
    with pytest.raises(PrivilegeError, match="refusing to run as root"):
        check_not_root(None, False)
    check_not_root("nobody", False)
    check_not_root(None, True)


def test_dsn_file_keeps_the_password_out_of_the_config(tmp_path: Path) -> None:
    secret = tmp_path / "dsn"
    secret.write_text("postgresql://maplookup:s3cret@db.example/maplookup\n")
    secret.chmod(0o600)
    config = tmp_path / "maplookup.toml"
    config.write_text(f'[database]\ndsn_file = "{secret}"\n')
    settings = load_settings(config, environ={})
    assert settings.database.dsn is not None
    assert settings.database.dsn.get_secret_value().endswith("@db.example/maplookup")
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in str(settings)
    config.write_text(f'[database]\ndsn_file = "{tmp_path / "missing"}"\n')
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(config, environ={})
