"""Configuration: file, environment and flags, and errors that say where the mistake is."""

from __future__ import annotations

from pathlib import Path

import pytest

from maplookup.config import ConfigError, HostPort, load_settings
from maplookup.maps import MapName


def test_defaults_are_loopback_and_postfix_friendly() -> None:
    settings = load_settings(environ={})
    assert [str(e) for e in settings.listen.socketmap] == ["127.0.0.1:9000"]
    assert settings.limits.idle_timeout_s > 10  # Postfix closes idle connections at 10 s
    assert settings.limits.max_request_bytes >= 10_000  # Postfix keys stay under 10,000 bytes
    assert settings.database.dsn is None
    assert settings.lookup.recipient_delimiter == "+"


def test_file_environment_and_flags_in_that_order(tmp_path: Path) -> None:
    config = tmp_path / "maplookup.toml"
    config.write_text(
        """
        log_level = "warning"
        [listen]
        socketmap = ["127.0.0.1:9100", "[::1]:9100"]
        socketmap_unix = "/run/maplookup/socketmap.sock"
        socketmap_unix_mode = 0o660
        tcp_table = { vmailbox = "127.0.0.1:9011" }
        [limits]
        max_connections = 50
        read_timeout_s = 2.5
        [database]
        dsn = "postgresql://file@db/maplookup"
        [lookup]
        recipient_delimiter = "+-"
        default_uid = 5000
        """
    )
    settings = load_settings(
        config,
        overrides={"limits": {"max_connections": 70}},
        environ={
            "MAPLOOKUP_DSN": "postgresql://env@db/maplookup",
            "MAPLOOKUP_LIMITS__MAX_CONNECTIONS": "60",
            "MAPLOOKUP_LIMITS__IDLE_TIMEOUT_S": "30",
        },
    )
    assert settings.listen.socketmap == [
        HostPort.parse("127.0.0.1:9100"),
        HostPort(host="::1", port=9100),
    ]
    assert settings.listen.tcp_table == {MapName.VMAILBOX: HostPort.parse("127.0.0.1:9011")}
    assert settings.listen.socketmap_unix == Path("/run/maplookup/socketmap.sock")
    assert settings.limits.max_connections == 70  # flag beats environment beats file
    assert settings.limits.idle_timeout_s == 30
    assert settings.limits.read_timeout_s == 2.5
    assert settings.database.dsn is not None
    assert settings.database.dsn.get_secret_value() == "postgresql://env@db/maplookup"
    assert "env@db" not in repr(settings)  # the DSN is a secret
    assert settings.lookup.recipient_delimiter == "+-"
    assert settings.log_level == "warning"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[limits]\nmax_conections = 5\n", "limits.max_conections: Extra inputs are not permitted"),
        ("[limits]\nread_timeout_s = -1\n", "limits.read_timeout_s"),
        ('[listen]\nsocketmap = ["nohostport"]\n', "HOST:PORT"),
        ('[listen]\ntcp_table = { mailboxes = "127.0.0.1:1" }\n', "listen.tcp_table"),
        ('[lookup]\nrecipient_delimiter = "@"\n', "recipient_delimiter"),
        ("[lookup]\ndefault_uid = 0\n", "lookup.default_uid"),
        ('log_level = "loud"\n', "log_level"),
        ("[limits\n", "invalid TOML"),
    ],
)
def test_mistakes_are_reported_with_their_place(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=r"bad\.toml") as info:
        load_settings(config, environ={})
    assert message in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_problems_carry_the_line_of_the_file(tmp_path: Path) -> None:
    config = tmp_path / "maplookup.toml"
    config.write_text(
        'log_level = "info"\n'
        "\n"
        "[limits]\n"
        "read_timeout_s = 2\n"
        "max_conections = 5   # a typo\n"
        "[cache]\n"
        'max_entries = "many"\n'
        "[databse]\n"
        'dsn = "x"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ={})
    problems = info.value.problems
    assert f"{config}:5: limits.max_conections: Extra inputs are not permitted" in problems
    assert any(p.startswith(f"{config}:7: cache.max_entries:") for p in problems)
    assert any(p.startswith(f"{config}:8: databse:") for p in problems)


def test_problem_from_the_environment_has_no_line(tmp_path: Path) -> None:
    config = tmp_path / "maplookup.toml"
    config.write_text("[limits]\nread_timeout_s = 2\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ={"MAPLOOKUP_LIMITS__MAX_CONNECTIONS": "lots"})
    assert info.value.problems == [
        f"{config} (or the environment/flags): limits.max_connections: "
        "Input should be a valid integer, unable to parse string as an integer"
    ]


def test_redact_dsn() -> None:
    from maplookup.config import redact_dsn

    assert redact_dsn("postgresql://u:s3cret@db/x") == "postgresql://u:***@db/x"
    assert redact_dsn("host=db password=s3cret user=u") == "host=db password=*** user=u"
    assert redact_dsn("postgresql://u@db/x") == "postgresql://u@db/x"
