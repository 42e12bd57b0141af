"""The admin commands against a real PostgreSQL: what they write, what they refuse, how they say it.

Run in-process through ``maplookup.cli.main`` (the console script's entry point), so exit codes
and stderr are exactly what an admin sees.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from maplookup.cli.main import main
from maplookup.db import schema


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def fetch(dsn: str, query: str) -> list[tuple[object, ...]]:
    async def run() -> list[tuple[object, ...]]:
        conn = await asyncpg.connect(dsn)
        try:
            return [tuple(r) for r in await conn.fetch(query)]
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.fixture
def dsn(make_database: Callable[[], str]) -> str:
    return make_database()


def test_add_list_disable_enable_remove(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    d = ("--dsn", dsn)
    assert run_cli(
        capsys, "domain", "add", "Example.COM", "--uid", "5000", "--gid", "5000", *d
    ) == (0, "domain example.com added (mailbox domain, default uid 5000 gid 5000)\n", "")
    assert run_cli(capsys, "domain", "add", "example.net", "--alias-of", "Example.com", *d) == (
        0,
        "domain example.net added (alias domain, mirror of example.com)\n",
        "",
    )
    assert run_cli(capsys, "domain", "add", "forward.example", "--alias", *d) == (
        0,
        "domain forward.example added (alias domain, forwarding only)\n",
        "",
    )
    assert run_cli(capsys, "mailbox", "add", "User@Example.com", *d) == (
        0,
        "mailbox user@example.com -> example.com/user/ added\n",
        "",
    )
    assert run_cli(capsys, "mailbox", "add", "@example.com", "--path", "example.com/all/", *d) == (
        0,
        "mailbox @example.com -> example.com/all/ added\n",
        "",
    )
    assert run_cli(capsys, "alias", "add", "list@example.com", "a@x.test", "B@Y.test", *d) == (
        0,
        # Targets keep their case: Postfix folds keys, never results.
        "alias list@example.com -> a@x.test, B@Y.test added\n",
        "",
    )
    assert run_cli(capsys, "alias", "add", "@forward.example", "@example.com", *d)[:2] == (
        0,
        "alias @forward.example -> @example.com added\n",
    )

    assert fetch(dsn, "SELECT name, kind, alias_of FROM maplookup.domains ORDER BY name") == [
        ("example.com", "mailbox", None),
        ("example.net", "alias", "example.com"),
        ("forward.example", "alias", None),
    ]
    assert fetch(dsn, "SELECT targets FROM maplookup.aliases WHERE local_part = 'list'") == [
        (["a@x.test", "B@Y.test"],)
    ]
    code, out, _ = run_cli(capsys, "mailbox", "list", *d)
    assert code == 0
    assert "user@example.com" in out
    assert "@example.com" in out

    assert run_cli(capsys, "mailbox", "disable", "User@example.com", *d)[:2] == (
        0,
        "mailbox user@example.com disabled\n",
    )
    assert fetch(dsn, "SELECT enabled FROM maplookup.mailboxes WHERE local_part = 'user'") == [
        (False,)
    ]
    assert run_cli(capsys, "mailbox", "enable", "user@example.com", *d)[:2] == (
        0,
        "mailbox user@example.com enabled\n",
    )
    assert run_cli(capsys, "alias", "disable", "list@example.com", *d)[:2] == (
        0,
        "alias list@example.com disabled\n",
    )
    assert run_cli(capsys, "alias", "enable", "list@example.com", *d)[:2] == (
        0,
        "alias list@example.com enabled\n",
    )
    assert run_cli(capsys, "domain", "disable", "example.net", *d)[:2] == (
        0,
        "domain example.net disabled\n",
    )
    assert run_cli(capsys, "domain", "enable", "example.net", *d)[:2] == (
        0,
        "domain example.net enabled\n",
    )
    assert run_cli(capsys, "alias", "remove", "list@example.com", *d)[:2] == (
        0,
        "alias list@example.com removed\n",
    )
    assert run_cli(capsys, "mailbox", "remove", "user@example.com", *d)[:2] == (
        0,
        "mailbox user@example.com removed\n",
    )
    assert run_cli(capsys, "domain", "remove", "example.net", *d)[:2] == (
        0,
        "domain example.net removed\n",
    )
    assert fetch(dsn, "SELECT count(*) FROM maplookup.aliases WHERE local_part = 'list'") == [(0,)]


def test_missing_ids_are_warned_about_on_stderr_with_the_fix(
    dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MAPLOOKUP_LOOKUP__DEFAULT_UID", raising=False)
    monkeypatch.delenv("MAPLOOKUP_LOOKUP__DEFAULT_GID", raising=False)
    d = ("--dsn", dsn)
    code, out, err = run_cli(capsys, "domain", "add", "new.example", *d)
    assert (code, out) == (0, "domain new.example added (mailbox domain, no default uid or gid)\n")
    assert err == (
        "maplookup: warning: domain new.example has no default uid or gid, so virtual(8) will "
        "defer mail for its mailboxes without their own uid or gid unless the server sets "
        "lookup.default_uid and lookup.default_gid; "
        "fix: maplookup domain set new.example --uid N --gid N\n"
    )
    # The record is valid: written, exit status 0.
    assert fetch(dsn, "SELECT name FROM maplookup.domains") == [("new.example",)]

    code, out, err = run_cli(capsys, "mailbox", "add", "x@new.example", *d)
    assert (code, out) == (0, "mailbox x@new.example -> new.example/x/ added\n")
    assert err == (
        "maplookup: warning: mailbox x@new.example has no uid or gid (none of its own, no "
        "default from domain new.example), so virtual(8) will defer its mail unless the server "
        "sets lookup.default_uid and lookup.default_gid; "
        "fix: maplookup domain set new.example --uid N --gid N\n"
    )
    # Only what is missing is named.
    code, _, err = run_cli(capsys, "mailbox", "add", "y@new.example", "--uid", "700", *d)
    assert code == 0
    assert "has no gid (" in err
    assert err.endswith("fix: maplookup domain set new.example --gid N\n")
    # Own ids: nothing to warn about.
    assert run_cli(
        capsys, "mailbox", "add", "z@new.example", "--uid", "700", "--gid", "700", *d
    ) == (0, "mailbox z@new.example -> new.example/z/ added\n", "")

    # The fix the warnings name exists and silences them.
    code, out, err = run_cli(capsys, "domain", "set", "new.example", "--uid", "5000", *d)
    assert (code, out) == (0, "domain new.example updated (default uid 5000, no default gid)\n")
    assert err.startswith("maplookup: warning: domain new.example has no default gid,")
    assert run_cli(capsys, "domain", "set", "New.Example", "--gid", "6000", *d) == (
        0,
        "domain new.example updated (default uid 5000 gid 6000)\n",
        "",
    )
    assert fetch(dsn, "SELECT default_uid, default_gid FROM maplookup.domains") == [(5000, 6000)]
    assert run_cli(capsys, "mailbox", "add", "w@new.example", *d)[2] == ""
    ids = ("--uid", "5000", "--gid", "5000")
    assert run_cli(capsys, "domain", "add", "ids.example", *ids, *d)[2] == ""
    assert run_cli(capsys, "domain", "add", "fwd.example", "--alias", *d)[2] == ""


def test_missing_ids_warning_knows_the_config(
    dsn: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    d = ("--dsn", dsn)
    with_ids = tmp_path / "with-ids.toml"
    with_ids.write_text("[lookup]\ndefault_uid = 5000\ndefault_gid = 5000\n")
    # The server's defaults cover what the data leaves out: no warning.
    assert run_cli(capsys, "domain", "add", "a.example", "--config", str(with_ids), *d)[2] == ""
    assert run_cli(capsys, "mailbox", "add", "x@a.example", "--config", str(with_ids), *d)[2] == ""

    uid_only = tmp_path / "uid-only.toml"
    uid_only.write_text("[lookup]\ndefault_uid = 5000\n")
    code, _, err = run_cli(capsys, "mailbox", "add", "y@a.example", "--config", str(uid_only), *d)
    assert code == 0
    assert err == (
        "maplookup: warning: mailbox y@a.example has no gid (none of its own, no default from "
        f"domain a.example), so virtual(8) will defer its mail ({uid_only} sets no "
        "lookup.default_gid); fix: maplookup domain set a.example --gid N\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("mailbox", "add", "no-at-sign"), "no '@'"),
        (("mailbox", "add", "x@unknown.test"), "no such domain: unknown.test"),
        (("mailbox", "add", "x@mirror.test"), "alias domain"),
        (("mailbox", "add", "@base.test"), "needs --path"),
        (("mailbox", "add", "x@base.test", "--path", "/etc/passwd"), "relative"),
        (("mailbox", "add", "x@base.test", "--path", "a/../../b"), "relative"),
        (("mailbox", "add", "x@base.test", "--uid", "0"), "positive"),
        (("mailbox", "add", "taken@base.test"), "mailbox taken@base.test already exists"),
        (("domain", "add", "base.test"), "domain base.test already exists"),
        (("domain", "add", "bad domain"), "invalid domain"),
        (("domain", "add", "m2.test", "--alias-of", "nowhere.test"), "existing mailbox domain"),
        (("domain", "add", "m3.test", "--alias-of", "mirror.test"), "existing mailbox domain"),
        (("domain", "add", "a.test", "--alias", "--uid", "5"), "mailbox domains only"),
        (("domain", "remove", "base.test"), "still has"),
        (("domain", "remove", "nowhere.test"), "no such domain"),
        (("alias", "add", "x@base.test", "@a.test", "b@c.test"), "only target"),
        (("alias", "add", "x@base.test", "a@"), "invalid target"),
        # Addresses Postfix would read as something else are refused, not stored as odd
        # quoted addresses (found by a new-user trial).
        (("alias", "add", "x@base.test", "x@@y.test"), "invalid target"),
        (("alias", "add", "x@base.test", "<a@b.test>"), "invalid target"),
        (("alias", "add", "x@base.test", "a@b.test;c@d.test"), "invalid target"),
        (("alias", "add", "x@base.test", '""@b.test'), "invalid target"),
        (("alias", "add", "x@nowhere.test", "a@b.test"), "no such domain"),
        (("alias", "remove", "x@base.test"), "no such alias"),
        (("mailbox", "disable", "nobody@base.test"), "no such mailbox"),
        (("domain", "set", "nowhere.test", "--uid", "5"), "no such domain: nowhere.test"),
        (("domain", "set", "mirror.test", "--uid", "5"), "is an alias domain"),
        # Found by a new-user trial: ids beyond uid_t reached PostgreSQL as an int32 error, and
        # a catch-all alias on a mirror domain was accepted though it is never used.
        (("mailbox", "add", "big@base.test", "--uid", "99999999999"), "too large"),
        (("domain", "add", "big.test", "--gid", "4294967295"), "too large"),
        (("alias", "add", "@mirror.test", "x@y.test"), "would never be used"),
        (("domain", "set", "base.test"), "give --uid, --gid or both"),
        (("domain", "set", "base.test", "--uid", "5", "--gid", "0"), "positive"),
        # Issue 14's commands, and the set commands.
        (("sender", "allow", "x@base.test", "two words"), "invalid login"),
        (("sender", "deny", "x@base.test", "nobody"), "no grant"),
        (("relay-recipient", "add", "x@nowhere.test"), "no such domain"),
        (("relay-recipient", "remove", "x@base.test"), "no such relay recipient"),
        (("transport", "set", "@base.test", "smtp:"), "without '@'"),
        (("transport", "unset", "nothing.test"), "no transport entry"),
        (("domain", "add", "r.test", "--relay", "--uid", "5"), "mailbox domains only"),
        (("mailbox", "add", "@base.test", "--path", "p/", "--login", "x"), "no login"),
        (("mailbox", "set", "taken@base.test"), "give --path"),
        (("mailbox", "set", "nobody@base.test", "--uid", "5"), "no such mailbox"),
        (("mailbox", "set", "taken@base.test", "--path", "/abs"), "relative"),
        (("alias", "set", "nobody@base.test", "a@b.test"), "no such alias"),
        # Names no address can have (a new-user trial: accepted, and dead).
        (("domain", "add", "bad_domain!"), "'!' cannot be in a domain name"),
        (("domain", "add", 'ex"ample.com', "--relay"), "cannot be in a domain name"),
        (("transport", "set", "*.example.com", "smtp:"), "no wildcards"),
    ],
)
def test_bad_input_is_one_line_error_and_writes_nothing(
    dsn: str, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    d = ("--dsn", dsn)
    assert run_cli(capsys, "domain", "add", "base.test", *d)[0] == 0
    assert run_cli(capsys, "domain", "add", "mirror.test", "--alias-of", "base.test", *d)[0] == 0
    assert run_cli(capsys, "mailbox", "add", "taken@base.test", *d)[0] == 0
    before = fetch(
        dsn,
        "SELECT (SELECT count(*) FROM maplookup.domains), (SELECT count(*) FROM "
        "maplookup.mailboxes), (SELECT count(*) FROM maplookup.aliases), (SELECT "
        "array_agg((default_uid, default_gid)::text ORDER BY name) FROM maplookup.domains)",
    )
    code, out, err = run_cli(capsys, *args, *d)
    assert code != 0
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("maplookup: ")
    assert message in err
    after = fetch(
        dsn,
        "SELECT (SELECT count(*) FROM maplookup.domains), (SELECT count(*) FROM "
        "maplookup.mailboxes), (SELECT count(*) FROM maplookup.aliases), (SELECT "
        "array_agg((default_uid, default_gid)::text ORDER BY name) FROM maplookup.domains)",
    )
    assert after == before


def test_db_init_is_idempotent_and_keeps_data(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "db", "init", "--dsn", dsn, "--demo")[0] == 0
    code, out, _ = run_cli(capsys, "db", "init", "--dsn", dsn, "--demo")
    assert code == 0
    assert "not empty" in out
    assert fetch(dsn, "SELECT count(*) FROM maplookup.mailboxes") == [(4,)]


def test_no_database_anywhere_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MAPLOOKUP_DSN", raising=False)
    code, _, err = run_cli(capsys, "domain", "list", "--state-dir", "/nonexistent/state")
    assert code == 1
    assert "no database" in err


def test_unreachable_database_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(
        capsys, "domain", "list", "--dsn", "postgresql://nobody@127.0.0.1:1/none"
    )
    assert code == 1
    assert "cannot connect to the database" in err


def test_dsn_from_environment(
    dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAPLOOKUP_DSN", dsn)
    assert run_cli(capsys, "domain", "add", "env.test")[0] == 0
    assert fetch(dsn, "SELECT name FROM maplookup.domains") == [("env.test",)]


def test_check_config_reports_typos_with_lines_and_checks_the_database(
    dsn: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nmax_conections = 5\n")
    code, out, _ = run_cli(capsys, "check-config", "--config", str(bad))
    assert code == 1
    assert f"error: {bad}:2: limits.max_conections: Extra inputs are not permitted" in out

    good = tmp_path / "good.toml"
    good.write_text(f'[database]\ndsn = "{dsn}"\n')
    code, out, _ = run_cli(capsys, "check-config", "--config", str(good))
    assert code == 0, out
    assert "connection: OK" in out
    assert f"schema: version {schema.SCHEMA_VERSION} (current)" in out

    code, out, _ = run_cli(
        capsys, "check-config", "--config", str(good), "--dsn", "postgresql://x:pw@127.0.0.1:1/x"
    )
    assert code == 1
    assert "connection: FAILED" in out
    assert "pw" not in out.replace("postgresql://x:***", "")


def test_alias_add_splits_a_list_as_postfix_and_import_do(
    dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`alias add A 'x@y, z@w'` is two targets, as the same text in a virtual file is."""
    d = ("--dsn", dsn)
    assert run_cli(capsys, "domain", "add", "example.com", *d)[0] == 0
    assert run_cli(capsys, "alias", "add", "split@example.com", "a@x.test,b@y.test", *d)[0] == 0
    assert fetch(dsn, "SELECT targets FROM maplookup.aliases WHERE local_part = 'split'") == [
        (["a@x.test", "b@y.test"],)
    ]


def test_a_uid_below_postfixs_minimum_is_added_with_a_warning(
    dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    d = ("--dsn", dsn)
    ids = ("--uid", "5000", "--gid", "5000")
    assert run_cli(capsys, "domain", "add", "low.test", *ids, *d)[0] == 0
    code, out, err = run_cli(capsys, "mailbox", "add", "low@low.test", "--uid", "50", *d)
    assert (code, out) == (0, "mailbox low@low.test -> low.test/low/ added\n")
    assert err == (
        "maplookup: warning: mailbox low@low.test: uid 50 is below Postfix's default "
        "virtual_minimum_uid (100): virtual(8) defers such mail unless main.cf sets "
        "virtual_minimum_uid = 50 or lower\n"
    )


@pytest.mark.parametrize(
    ("noun", "phrases"),
    [
        ("mailbox", ["add a mailbox", "list mailboxes"]),
        ("alias", ["add an alias", "remove an alias", "list aliases"]),
        ("domain", ["add a domain", "list domains"]),
    ],
)
def test_help_speaks_english(
    noun: str, phrases: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([noun, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in phrases:
        assert phrase in text


def test_routing_commands(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 14's commands (sender, relay-recipient, transport, domain add --relay) and the
    set commands of mailboxes and aliases: what each says, what it writes."""
    d = ("--dsn", dsn)
    assert (
        run_cli(capsys, "domain", "add", "example.com", "--uid", "5000", "--gid", "5000", *d)[0]
        == 0
    )
    assert run_cli(capsys, "mailbox", "add", "Alice@example.com", *d)[0] == 0
    assert run_cli(capsys, "mailbox", "add", "bob@example.com", "--login", "Bob", *d)[0] == 0
    assert run_cli(capsys, "alias", "add", "info@example.com", "alice@example.com", *d)[0] == 0
    assert fetch(dsn, "SELECT local_part, login FROM maplookup.mailboxes ORDER BY 1") == [
        ("alice", "alice@example.com"),
        ("bob", "Bob"),
    ]
    assert run_cli(capsys, "sender", "allow", "Info@example.com", "Bob", *d) == (
        0,
        "Bob may now send as info@example.com\n",
        "",
    )
    assert run_cli(capsys, "sender", "allow", "@example.com", "postmaster", *d)[0] == 0
    code, out, _ = run_cli(capsys, "sender", "list", *d)
    assert code == 0
    assert [line.split() for line in out.splitlines()[1:]] == [
        ["@example.com", "postmaster"],
        ["info@example.com", "Bob"],
    ]
    assert run_cli(capsys, "sender", "deny", "info@example.com", "bob", *d) == (
        0,
        "grant of info@example.com to bob removed\n",
        "",
    )
    assert fetch(dsn, "SELECT local_part, login FROM maplookup.sender_grants") == [
        ("", "postmaster")
    ]

    assert run_cli(capsys, "domain", "add", "Relay.test", "--relay", *d) == (
        0,
        "domain relay.test added (relay domain: add its valid recipients with "
        "`maplookup relay-recipient add`)\n",
        "",
    )
    assert run_cli(capsys, "relay-recipient", "add", "Known@relay.test", *d) == (
        0,
        "relay recipient known@relay.test added\n",
        "",
    )
    assert "known@relay.test" in run_cli(capsys, "relay-recipient", "list", *d)[1]
    assert run_cli(capsys, "relay-recipient", "remove", "known@relay.test", *d)[0] == 0
    assert fetch(dsn, "SELECT count(*) FROM maplookup.relay_recipients") == [(0,)]

    assert run_cli(
        capsys, "transport", "set", "Example.com", "lmtp:unix:private/dovecot-lmtp", *d
    ) == (
        0,
        "transport example.com, .example.com -> lmtp:unix:private/dovecot-lmtp\n",
        "",
    )
    assert run_cli(capsys, "transport", "set", "*", "smtp:[smarthost]", *d)[0] == 0
    assert run_cli(capsys, "transport", "set", "only.test", "relay:[x]", "--no-subdomains", *d) == (
        0,
        "transport only.test -> relay:[x]\n",
        "",
    )
    # A re-set says what it replaced, and what --no-subdomains left alone (new-user trial).
    assert run_cli(capsys, "transport", "set", "t2.test", "smtp:[c]", *d)[0] == 0
    assert run_cli(capsys, "transport", "set", "t2.test", "smtp:[d]", "--no-subdomains", *d) == (
        0,
        "transport t2.test -> smtp:[d]\n  t2.test was smtp:[c]\n"
        "  kept .t2.test -> smtp:[c] (its subdomains' entry)\n",
        "",
    )
    assert run_cli(capsys, "transport", "unset", "t2.test", *d)[0] == 0
    code, out, _ = run_cli(capsys, "transport", "list", *d)
    assert [line.split()[0] for line in out.splitlines()[1:]] == [
        "*",
        "example.com",
        ".example.com",
        "only.test",
    ]
    assert run_cli(capsys, "transport", "unset", "example.com", *d) == (
        0,
        "transport example.com, .example.com removed\n",
        "",
    )

    assert run_cli(capsys, "mailbox", "set", "alice@example.com", "--uid", "6000", *d) == (
        0,
        "mailbox alice@example.com updated (path example.com/alice/, uid 6000, gid -, "
        "login alice@example.com)\n",
        "",
    )
    assert run_cli(capsys, "alias", "set", "info@example.com", "bob@example.com", *d) == (
        0,
        "alias info@example.com -> bob@example.com (targets replaced)\n",
        "",
    )
    assert fetch(dsn, "SELECT targets FROM maplookup.aliases") == [(["bob@example.com"],)]


def test_check_config_says_to_remove_a_setting_that_is_no_longer_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An upgraded host's config file still loads (refusing it would stop the server and
    queue mail), and check-config says what to remove."""
    config = tmp_path / "maplookup.toml"
    config.write_text("[cache]\nlisten_keepalive_s = 3.0\n")
    code, out, _ = run_cli(capsys, "check-config", "--config", str(config))
    assert code == 0
    assert "warning: cache.listen_keepalive_s is no longer used" in out
    config.write_text("[cache]\nchange_feed_poll_interval_s = 0.1\n")
    assert "no longer used" not in run_cli(capsys, "check-config", "--config", str(config))[1]


def test_a_hosted_domain_below_a_relay_domain_or_a_parent_transport_is_warned_about(
    dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by a new-user trial: a hosted domain below a relay domain was added silently."""
    d = ("--dsn", dsn)
    assert run_cli(capsys, "domain", "add", "relay.net", "--relay", *d)[0] == 0
    assert run_cli(capsys, "transport", "set", "relay.net", "smtp:[mx9.relay.net]", *d)[0] == 0
    code, _, err = run_cli(
        capsys, "domain", "add", "hosted.relay.net", "--uid", "5000", "--gid", "5000", *d
    )
    assert code == 0
    assert "lies below relay domain relay.net" in err
    assert (
        "mail for hosted.relay.net goes to smtp:[mx9.relay.net] (the transport entry "
        ".relay.net), not to virtual(8) here" in err
    )
    code, _, err = run_cli(
        capsys, "domain", "add", "elsewhere.test", "--uid", "5000", "--gid", "5000", *d
    )
    assert (code, err) == (0, "")
