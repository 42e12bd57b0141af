"""Configuration: file, environment and flags, and errors that say where the mistake is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from maplookup.cli.common import EXIT_ERROR, EXIT_USAGE
from maplookup.cli.main import main
from maplookup.config import ConfigError, HostPort, Settings
from maplookup.config_load import load_settings
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
        "environment: MAPLOOKUP_LIMITS__MAX_CONNECTIONS: "
        "Input should be a valid integer, unable to parse string as an integer"
    ]


def test_a_misspelt_variable_is_an_error_naming_the_right_one() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"MAPLOOKUP_WORKER": "4", "MAPLOOKUP_LIMITS__MAX_CONECTIONS": "5"})
    assert info.value.problems == [
        "environment: MAPLOOKUP_LIMITS__MAX_CONECTIONS is not a maplookup setting; "
        "did you mean MAPLOOKUP_LIMITS__MAX_CONNECTIONS?",
        "environment: MAPLOOKUP_WORKER is not a maplookup setting; did you mean MAPLOOKUP_WORKERS?",
    ]


def test_an_unknown_variable_with_no_close_name_has_no_hint() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"MAPLOOKUP_XYZZY": "1"})
    assert info.value.problems == ["environment: MAPLOOKUP_XYZZY is not a maplookup setting"]


def test_variables_of_the_project_that_are_not_settings_are_tolerated() -> None:
    settings = load_settings(
        environ={"MAPLOOKUP_TEST_DSN": "postgresql://test@db/x", "PATH": "/usr/bin"}
    )
    assert settings.database.dsn is None


def test_top_level_and_nested_variables() -> None:
    settings = load_settings(
        environ={
            "MAPLOOKUP_WORKERS": "4",
            "MAPLOOKUP_ALLOW_ROOT": "true",
            "MAPLOOKUP_LOG_LEVEL": "DEBUG",
            "MAPLOOKUP_LIMITS__MAX_CONNECTIONS": "60",
            "MAPLOOKUP_CACHE__POSITIVE_TTL_S": "7.5",
            "MAPLOOKUP_LISTEN__SOCKETMAP": "127.0.0.1:9100",  # a plain HOST:PORT, as before
            "MAPLOOKUP_LISTEN__TCP_TABLE__VMAILBOX": "127.0.0.1:9011",
            "MAPLOOKUP_METRICS__LISTEN": "127.0.0.1:9101",
        }
    )
    assert settings.workers == 4
    assert settings.allow_root is True
    assert settings.log_level == "debug"
    assert settings.limits.max_connections == 60
    assert settings.cache.positive_ttl_s == 7.5
    assert settings.listen.socketmap == [HostPort.parse("127.0.0.1:9100")]
    assert settings.listen.tcp_table == {MapName.VMAILBOX: HostPort.parse("127.0.0.1:9011")}
    assert settings.metrics.listen == HostPort.parse("127.0.0.1:9101")


def test_lists_and_sections_as_json() -> None:
    settings = load_settings(
        environ={
            "MAPLOOKUP_LISTEN__SOCKETMAP": '["127.0.0.1:9100", "[::1]:9100"]',
            "MAPLOOKUP_LIMITS": '{"max_connections": 5, "read_timeout_s": 2}',
        }
    )
    assert [str(e) for e in settings.listen.socketmap] == ["127.0.0.1:9100", "[::1]:9100"]
    assert settings.limits.max_connections == 5
    assert settings.limits.read_timeout_s == 2


def test_dsn_variable_is_database_dsn() -> None:
    settings = load_settings(environ={"MAPLOOKUP_DSN": "postgresql://env@db/maplookup"})
    assert settings.database.dsn is not None
    assert settings.database.dsn.get_secret_value() == "postgresql://env@db/maplookup"
    nested = load_settings(environ={"MAPLOOKUP_DATABASE__DSN": "postgresql://nested@db/x"})
    assert nested.database.dsn is not None
    assert nested.database.dsn.get_secret_value() == "postgresql://nested@db/x"


def test_environment_beats_file_and_flags_beat_environment(tmp_path: Path) -> None:
    config = tmp_path / "maplookup.toml"
    config.write_text('workers = 2\nlog_level = "warning"\n[cache]\nmax_entries = 10\n')
    environ = {"MAPLOOKUP_WORKERS": "3", "MAPLOOKUP_CACHE__MAX_ENTRIES": "20"}
    settings = load_settings(config, overrides={"workers": 4}, environ=environ)
    assert settings.workers == 4
    assert settings.cache.max_entries == 20
    assert settings.log_level == "warning"
    assert load_settings(config, environ=environ).workers == 3
    assert load_settings(config, environ={}).workers == 2


@pytest.mark.parametrize(
    ("environ", "problem"),
    [
        ({"MAPLOOKUP_WORKERS": "0"}, "environment: MAPLOOKUP_WORKERS: Input should be greater"),
        (
            {"MAPLOOKUP_LISTEN__SOCKETMAP": "nohostport"},
            "environment: MAPLOOKUP_LISTEN__SOCKETMAP: Value error, expected HOST:PORT",
        ),
        (
            {"MAPLOOKUP_LIMITS": '{"max_conections": 5}'},
            "environment: MAPLOOKUP_LIMITS: limits.max_conections: Extra inputs",
        ),
        (
            {"MAPLOOKUP_DSN": "x", "MAPLOOKUP_ALLOW_ROOT": "maybe"},
            "environment: MAPLOOKUP_ALLOW_ROOT: Input should be a valid boolean",
        ),
    ],
)
def test_an_invalid_value_names_its_variable(environ: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ=environ)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(problem)


def test_a_flag_replacing_a_bad_variable_is_not_blamed_on_it() -> None:
    settings = load_settings(
        overrides={"limits": {"max_connections": 5}},
        environ={"MAPLOOKUP_LIMITS__MAX_CONNECTIONS": "lots"},
    )
    assert settings.limits.max_connections == 5


def test_settings_alone_does_not_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only load_settings reads it: checked, injectable and below the flags.
    monkeypatch.setenv("MAPLOOKUP_WORKERS", "5")
    assert Settings().workers == 1
    assert Settings.model_validate({"workers": 2}).workers == 2


def test_check_config_reports_a_misspelt_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MAPLOOKUP_WORKER", "4")
    assert main(["check-config"]) == EXIT_ERROR
    out = capsys.readouterr().out
    assert "error: environment: MAPLOOKUP_WORKER is not a maplookup setting" in out
    assert "did you mean MAPLOOKUP_WORKERS?" in out


def test_serve_with_a_misspelt_variable_exits_before_starting(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAPLOOKUP_")}
    env["MAPLOOKUP_WORKER"] = "4"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "maplookup",
            "serve",
            # Were the check missing, nothing real would be touched: no embedded cluster (a
            # DSN is given), a port of its own, and the timeout ends the test.
            "--dsn",
            "postgresql://nobody@127.0.0.1:1/none",
            "--socketmap",
            "127.0.0.1:0",
            "--state-dir",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == EXIT_USAGE
    assert result.stderr.splitlines() == [
        "maplookup: environment: MAPLOOKUP_WORKER is not a maplookup setting; "
        "did you mean MAPLOOKUP_WORKERS?"
    ]
    assert result.stdout == ""


def test_redact_dsn() -> None:
    from maplookup.config import redact_dsn

    assert redact_dsn("postgresql://u:s3cret@db/x") == "postgresql://u:***@db/x"
    assert redact_dsn("host=db password=s3cret user=u") == "host=db password=*** user=u"
    assert redact_dsn("postgresql://u@db/x") == "postgresql://u@db/x"


def test_the_request_limit_default_is_the_codecs() -> None:
    """config owns the operational default; the codecs' own default must not drift from it."""
    from maplookup.config import MAX_REQUEST_BYTES_DEFAULT
    from maplookup.protocol import DEFAULT_MAX_REQUEST_BYTES

    assert MAX_REQUEST_BYTES_DEFAULT == DEFAULT_MAX_REQUEST_BYTES
    assert Settings().limits.max_request_bytes == MAX_REQUEST_BYTES_DEFAULT
