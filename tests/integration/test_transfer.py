"""``maplookup import`` / ``export`` against a real PostgreSQL, and exported files against postmap.

The commands run in-process through their argparse sub-parsers (built here with
``cli_transfer.add_commands``, the same call cli.py makes), so exit codes, stdout and stderr are
what an admin sees.  The fixture files in tests/data/transfer are a realistic hash-table set-up:
comments, blank lines, continuation lines, mixed case, CRLF, catch-alls, multiple targets,
``@other`` targets, a bare-domain declaration line, uid/gid files with ``@domain`` defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from maplookup import transfer
from maplookup.cli.common import Parser
from maplookup.cli.transfer import add_commands
from tests.helpers import require_postfix

DATA = Path(__file__).resolve().parent.parent / "data" / "transfer"
ALL_FILES = ("domains", "alias_domains", "vmailbox", "virtual", "uids", "gids")
ROUTING_FILES = ("sender_login", "relay_domains", "relay_recipients", "transport")
POSTMAP = shutil.which("postmap") or "/usr/sbin/postmap"


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    parser = Parser(prog="maplookup")
    add_commands(parser.add_subparsers(dest="command", required=True))
    try:
        namespace = parser.parse_args(list(args))
        code = namespace.func(namespace)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def file_args(directory: Path, names: tuple[str, ...] = ALL_FILES) -> list[str]:
    args = []
    for name in names:
        if (directory / name).exists():
            args += [f"--{name.replace('_', '-')}", str(directory / name)]
    return args


def fetch(dsn: str, query: str, *args: object) -> list[tuple[object, ...]]:
    async def run() -> list[tuple[object, ...]]:
        conn = await asyncpg.connect(dsn)
        try:
            return [tuple(r) for r in await conn.fetch(query, *args)]
        finally:
            await conn.close()

    return asyncio.run(run())


TABLES = {
    "domains": "SELECT name, kind, alias_of, default_uid, default_gid, enabled"
    " FROM maplookup.domains ORDER BY name",
    "mailboxes": "SELECT domain, local_part, path, uid, gid, enabled"
    " FROM maplookup.mailboxes ORDER BY domain, local_part",
    "aliases": "SELECT domain, local_part, targets, enabled"
    " FROM maplookup.aliases ORDER BY domain, local_part",
}


def snapshot(dsn: str) -> dict[str, list[tuple[object, ...]]]:
    return {table: fetch(dsn, query) for table, query in TABLES.items()}


def sorted_targets(tables: dict[str, list[tuple[object, ...]]]) -> dict[str, object]:
    aliases = [(d, lp, sorted(t), e) for d, lp, t, e in tables["aliases"]]  # type: ignore[call-overload]
    return {**tables, "aliases": aliases}


def counts(dsn: str) -> tuple[object, ...]:
    return fetch(
        dsn,
        "SELECT (SELECT count(*) FROM maplookup.domains), (SELECT count(*) FROM "
        "maplookup.mailboxes), (SELECT count(*) FROM maplookup.aliases)",
    )[0]


@pytest.fixture
def dsn(make_database: Callable[[], str]) -> str:
    return make_database()


@pytest.fixture(scope="module")
def imported(make_database: Callable[[], str]) -> tuple[str, str]:
    """A database with the fixture files imported; returns (dsn, stdout of the import)."""
    dsn = make_database()
    out, err = io.StringIO(), io.StringIO()
    parser = Parser(prog="maplookup")
    add_commands(parser.add_subparsers(dest="command", required=True))
    namespace = parser.parse_args(["import", *file_args(DATA), "--dsn", dsn])
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = namespace.func(namespace)
    assert code == 0, err.getvalue()
    return dsn, out.getvalue() + err.getvalue()


# -- the realistic set of files ---------------------------------------------------------------

# (SQL function, key, answer): what Postfix gets from hash tables built from the same files
# (mail_addr_find's fallbacks: full address, without +extension, @domain).
ANSWERS = [
    ("domains", "example.com", "example.com"),
    ("domains", "example.net", "example.net"),
    ("domains", "shop.example", "shop.example"),
    ("domains", "implied.example", "implied.example"),
    ("domains", "forward.example", None),
    ("alias_domains", "forward.example", "forward.example"),
    ("alias_domains", "legacy.example", "legacy.example"),
    ("alias_domains", "new.example", "new.example"),
    ("alias_domains", "example.com", None),
    ("vmailbox", "info@example.com", "example.com/info/"),
    ("vmailbox", "INFO+tag@Example.COM", "example.com/info/"),
    ("vmailbox", "sales@example.com", "example.com/sales/"),
    ("vmailbox", "jim@example.com", "example.com/jim"),
    ("vmailbox", "nobody@example.com", None),
    ("vmailbox", "whoever@example.net", "example.net/catchall/"),
    ("vmailbox", "Anna+x@example.net", "example.net/anna/"),
    ("vmailbox", "@example.net", "example.net/catchall/"),
    ("vmailbox", "carol@implied.example", "implied.example/carol/"),
    ("vmailbox", "dave@shop.example", "shop.example/dave/"),
    ("vmailbox", "hello@forward.example", None),
    ("virtual", "postmaster@example.com", "info@example.com"),
    # A hash: table returns its values as written (postmap folds keys only).
    ("virtual", "team@example.com", "info@example.com,Sales@Example.com,jim@example.com"),
    (
        "virtual",
        "team+x@example.com",
        "info+x@example.com,Sales+x@Example.com,jim+x@example.com",
    ),
    ("virtual", "list@example.com", "a@remote.test,b@remote.test,c@remote.test"),
    ("virtual", "abuse@example.com", "INFO@EXAMPLE.COM"),
    ("virtual", "anyone@forward.example", "info@example.com"),
    ("virtual", "hello@forward.example", "jim@example.com"),
    ("virtual", "joe@legacy.example", "joe@example.com"),
    ("virtual", "Joe+x@legacy.example", "joe+x@example.com"),
    ("virtual", "copy@shop.example", "copy@example.com"),
    ("virtual", "sales@shop.example", "bob@shop.example"),
    ("virtual", "owner@new.example", "info@example.com"),
    ("virtual", "info@example.com", None),
    ("virtual", "nobody@shop.example", None),
    ("uid", "info@example.com", "5001"),
    ("uid", "info+x@example.com", "5001"),
    ("uid", "sales@example.com", "5000"),
    ("uid", "anna@example.net", "6000"),
    ("uid", "someone@example.net", "6000"),
    ("uid", "bob@shop.example", "7000"),
    ("uid", "dave@shop.example", None),
    ("gid", "info@example.com", "5000"),
    ("gid", "anna@example.net", "6000"),
    ("gid", "bob@shop.example", "7000"),
]


@pytest.mark.parametrize(("function", "key", "answer"), ANSWERS)
def test_imported_files_answer_like_hash_tables(
    imported: tuple[str, str], function: str, key: str, answer: str | None
) -> None:
    dsn, _ = imported
    assert fetch(dsn, f"SELECT maplookup.{function}($1)", key) == [(answer,)]


def test_import_summary_names_implied_domains_and_forwards(imported: tuple[str, str]) -> None:
    _, output = imported
    assert "imported:" in output
    assert "mailbox domains: 4 added, 0 unchanged, 0 skipped" in output
    assert "alias domains:   3 added, 0 unchanged, 0 skipped" in output
    assert "mailboxes:       9 added" in output
    assert "aliases:         10 added" in output
    assert "uids:            4 added" in output
    assert "gids:            3 added" in output
    assert "not in the domains file): implied.example" in output
    assert "neither listed nor implied): new.example" in output
    assert "maplookup domain add legacy.example --alias-of example.com" in output
    # shop.example has no value in the domains file: fine, no warning.
    assert "warning" not in output


def test_import_stores_rows_as_the_admin_commands_would(imported: tuple[str, str]) -> None:
    dsn, _ = imported
    assert fetch(
        dsn,
        "SELECT targets FROM maplookup.aliases WHERE domain = 'example.com' AND local_part = $1",
        "team",
    ) == [(["info@example.com", "Sales@Example.com", "jim@example.com"],)]
    assert fetch(
        dsn,
        "SELECT targets FROM maplookup.aliases WHERE local_part = '' AND domain = $1",
        "legacy.example",
    ) == [(["@example.com"],)]
    assert fetch(
        dsn,
        "SELECT default_uid, default_gid FROM maplookup.domains WHERE name = $1",
        "example.com",
    ) == [(5000, 5000)]
    assert fetch(
        dsn, "SELECT kind FROM maplookup.domains WHERE name IN ('new.example', 'legacy.example')"
    ) == [("alias",), ("alias",)]


def test_reimport_leaves_everything_unchanged(
    imported: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    dsn, _ = imported
    before = snapshot(dsn)
    code, out, err = run_cli(capsys, "import", *file_args(DATA), "--dsn", dsn)
    assert (code, err) == (0, "")
    assert "mailboxes:       0 added, 9 unchanged, 0 skipped" in out
    assert "aliases:         0 added, 10 unchanged, 0 skipped" in out
    assert "uids:            0 added, 4 unchanged" in out
    assert snapshot(dsn) == before


def test_parser_reads_the_files_as_postmap_does(tmp_path: Path, postfix_conf: Path) -> None:
    """Keys and values from our parser equal what postmap stores (postmap -s dumps a table)."""
    for name in ALL_FILES:
        problems: list[transfer.Problem] = []
        entries = transfer.parse_source(
            (DATA / name).read_bytes(), name, "test", problems, value_required=False
        )
        assert problems == []
        ours = {e.key.lower(): e.value for e in entries if e.value}
        table = tmp_path / name
        shutil.copy(DATA / name, table)
        build = subprocess.run(
            [POSTMAP, "-c", str(postfix_conf), f"lmdb:{table}"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert build.returncode == 0, build.stderr
        dump = subprocess.run(
            [POSTMAP, "-c", str(postfix_conf), "-s", f"lmdb:{table}"],
            capture_output=True,
            text=True,
            check=True,
        )
        theirs = dict(line.split("\t", 1) for line in dump.stdout.splitlines())
        assert ours == theirs, name


# -- bad lines, --skip-errors, --dry-run ------------------------------------------------------


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


BAD_VMAILBOX = """\
good@bad.example      bad.example/good/
nopath@bad.example
abs@bad.example       /var/mail/abs
dots@bad.example      bad.example/../etc/
not-an-address        bad.example/x/
good@bad.example      bad.example/other/
GOOD@bad.example      bad.example/good/
info@alias.example    alias.example/info/
"""
BAD_VIRTUAL = """\
fine@bad.example      good@bad.example
local@bad.example     root
late@bad.example      a@x.test, @other.test
"quoted"@bad.example  a@x.test
paren@bad.example     a@x.test (Alice)
info@bad.example:     a@x.test
"""
BAD_UIDS = """\
good@bad.example      0
@bad.example          abc
missing@bad.example   5000
dots@bad.example      5001
@alias.example        5000
"""
BAD_ALIAS_DOMAINS = """\
alias.example         OK
mirror.example        alias-of=alias.example
"""
EXPECTED_ERRORS = [
    ("alias_domains", 2, "alias-of=alias.example: not a mailbox domain"),
    ("vmailbox", 2, "expected format: key whitespace value"),
    ("vmailbox", 3, "is absolute"),
    ("vmailbox", 4, "contains '..'"),
    ("vmailbox", 5, "has no '@'"),
    ("vmailbox", 6, "duplicate key good@bad.example with a different value (first at"),
    ("vmailbox", 8, "alias.example is an alias domain"),
    ("virtual", 3, "must be the only target of its alias"),
    ("virtual", 4, "quoted or escaped keys are not supported"),
    ("virtual", 5, "comments and <...> are not supported"),
    ("virtual", 6, "is this an aliases(5) file?"),
    ("uids", 1, "uid must be a positive number (0 is root)"),
    ("uids", 2, "uid 'abc' is not a number"),
    ("uids", 3, "no mailbox missing@bad.example"),
    ("uids", 4, "mailbox dots@bad.example was not imported (see "),
    ("uids", 5, "alias.example is not a mailbox domain"),
]


@pytest.fixture
def bad_files(tmp_path: Path) -> Path:
    write(tmp_path, "vmailbox", BAD_VMAILBOX)
    write(tmp_path, "virtual", BAD_VIRTUAL)
    write(tmp_path, "uids", BAD_UIDS)
    write(tmp_path, "alias_domains", BAD_ALIAS_DOMAINS)
    return tmp_path


def check_errors(err: str, directory: Path) -> None:
    lines = [line for line in err.splitlines() if not line.startswith("maplookup: ")]
    assert len(lines) == len(EXPECTED_ERRORS), err
    for line, (name, number, message) in zip(lines, EXPECTED_ERRORS, strict=True):
        assert line.startswith(f"{directory / name}:{number}: "), (line, name, number)
        assert message in line, (line, message)


def test_bad_lines_are_reported_and_nothing_is_imported(
    dsn: str, bad_files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "import", *file_args(bad_files), "--dsn", dsn)
    assert code == 1
    assert out == ""
    check_errors(err, bad_files)
    assert err.splitlines()[-1] == (
        "maplookup: 16 bad line(s); nothing imported (--skip-errors imports the rest)"
    )
    assert counts(dsn) == (0, 0, 0)


def test_skip_errors_imports_the_rest(
    dsn: str, bad_files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "import", *file_args(bad_files), "--skip-errors", "--dsn", dsn)
    assert code == 0
    check_errors(err, bad_files)
    assert "mailboxes:       1 added, 0 unchanged, 6 skipped" in out
    assert "aliases:         2 added, 0 unchanged, 4 skipped" in out
    assert "uids:            0 added, 0 unchanged, 5 skipped" in out
    assert "alias domains:   1 added, 0 unchanged, 1 skipped" in out
    assert snapshot(dsn) == {
        "domains": [
            ("alias.example", "alias", None, None, None, True),
            ("bad.example", "mailbox", None, None, None, True),
        ],
        "mailboxes": [("bad.example", "good", "bad.example/good/", None, None, True)],
        "aliases": [
            ("bad.example", "fine", ["good@bad.example"], True),
            # A target without '@' is a local account (Postfix appends @$myorigin).
            ("bad.example", "local", ["root"], True),
        ],
    }


def test_dry_run_writes_nothing(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "import", *file_args(DATA), "--dry-run", "--dsn", dsn)
    assert (code, err) == (0, "")
    assert out.startswith("dry run, nothing written; the import would do:")
    assert "mailboxes:       9 added" in out
    assert counts(dsn) == (0, 0, 0)


def test_dry_run_with_errors_shows_summary_and_fails(
    dsn: str, bad_files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "import", *file_args(bad_files), "--dry-run", "--dsn", dsn)
    assert code == 1
    assert "6 skipped" in out
    check_errors(err, bad_files)
    assert counts(dsn) == (0, 0, 0)


def test_existing_records_unchanged_conflicting_or_replaced(
    dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = ("--dsn", dsn)
    write(tmp_path, "vmailbox", "a@ex.test  ex.test/a/\nb@ex.test  ex.test/b/\n")
    write(tmp_path, "virtual", "l@ex.test  x@y.test, z@y.test\n")
    write(tmp_path, "uids", "@ex.test 100\na@ex.test 101\n")
    assert run_cli(capsys, "import", *file_args(tmp_path), *d)[0] == 0
    # Same meaning (keys in another case, targets in another order): unchanged.  A target
    # in another case is another value: Postfix forwards to it as written.
    write(tmp_path, "vmailbox", "A@Ex.Test  ex.test/a/\n")
    write(tmp_path, "virtual", "l@ex.test  z@y.test x@y.test\n")
    code, out, _ = run_cli(capsys, "import", *file_args(tmp_path), *d)
    assert code == 0
    assert "aliases:         0 added, 1 unchanged" in out
    # Different values: errors, nothing written.
    write(tmp_path, "vmailbox", "a@ex.test  ex.test/new/\nc@ex.test ex.test/c/\n")
    write(tmp_path, "virtual", "l@ex.test  x@y.test\n")
    write(tmp_path, "uids", "@ex.test 200\na@ex.test 101\nb@ex.test 102\n")
    before = snapshot(dsn)
    code, out, err = run_cli(capsys, "import", *file_args(tmp_path), *d)
    assert code == 1
    assert (
        "vmailbox:1: mailbox a@ex.test exists with 'ex.test/a/' (enabled); this line says "
        "'ex.test/new/' (enabled)" in err
    )
    assert "virtual:1: alias l@ex.test exists with x@y.test,z@y.test" in err
    assert "uids:1: default uid of ex.test exists with 100; this line says 200" in err
    assert snapshot(dsn) == before
    # --replace overwrites them, and adds the rest.
    code, out, err = run_cli(capsys, "import", *file_args(tmp_path), "--replace", *d)
    assert (code, err) == (0, "")
    assert "mailboxes:       1 added, 0 unchanged, 1 replaced, 0 skipped" in out
    assert "uids:            1 added, 1 unchanged, 1 replaced, 0 skipped" in out
    assert fetch(dsn, TABLES["mailboxes"]) == [
        ("ex.test", "a", "ex.test/new/", 101, None, True),
        ("ex.test", "b", "ex.test/b/", 102, None, True),
        ("ex.test", "c", "ex.test/c/", None, None, True),
    ]
    assert fetch(dsn, "SELECT targets FROM maplookup.aliases") == [(["x@y.test"],)]
    assert fetch(dsn, "SELECT default_uid FROM maplookup.domains") == [(200,)]


def test_domain_kind_conflicts(
    dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "domains", "both.test OK\nmbox.test\n")
    write(tmp_path, "alias_domains", "both.test OK\nfwd.test OK\n")
    write(tmp_path, "vmailbox", "x@fwd.test  fwd.test/x/\n")
    code, _, err = run_cli(capsys, "import", *file_args(tmp_path), "--dsn", dsn)
    assert code == 1
    assert f"{tmp_path / 'alias_domains'}:1: both.test is also listed as a mailbox domain (" in err
    assert f"{tmp_path / 'vmailbox'}:1: fwd.test is an alias domain" in err
    assert counts(dsn) == (0, 0, 0)
    # Against the database: mbox.test exists as an alias domain.
    write(tmp_path, "alias_domains", "mbox.test OK\n")
    assert (
        run_cli(capsys, "import", "--alias-domains", str(tmp_path / "alias_domains"), "--dsn", dsn)[
            0
        ]
        == 0
    )
    code, _, err = run_cli(capsys, "import", "--domains", str(tmp_path / "domains"), "--dsn", dsn)
    assert code == 1
    assert "mbox.test exists as alias domain; this file declares it as mailbox domain" in err


def test_mirror_marker_and_catchall_notes(
    dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "domains", "base.test OK\n")
    write(tmp_path, "alias_domains", "mirror.test alias-of=base.test\n")
    write(tmp_path, "vmailbox", "u@base.test base.test/u/\n")
    write(tmp_path, "virtual", "@mirror.test @base.test\n@base.test u@base.test\n")
    code, out, err = run_cli(capsys, "import", *file_args(tmp_path), "--dsn", dsn)
    assert (code, err) == (0, "")
    assert "catch-all aliases in mailbox domains (base.test) never apply" in out
    assert fetch(dsn, "SELECT name, alias_of FROM maplookup.domains ORDER BY name") == [
        ("base.test", None),
        ("mirror.test", "base.test"),
    ]
    assert fetch(dsn, "SELECT domain FROM maplookup.aliases") == [("base.test",)]
    assert fetch(dsn, "SELECT maplookup.virtual('u@mirror.test')") == [("u@base.test",)]
    # A mirror answers for addresses that resolve in the target: here through its catch-all.
    assert fetch(dsn, "SELECT maplookup.virtual('nobody@mirror.test')") == [("nobody@base.test",)]
    assert fetch(dsn, "SELECT maplookup.virtual('u@nowhere.test')") == [(None,)]


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "import", "--dsn", "postgresql://unused/none")
    assert code == 3
    assert "import needs at least one of --domains" in err
    code, _, err = run_cli(
        capsys, "import", "--vmailbox", str(tmp_path / "missing"), "--dsn", "postgresql://x/y"
    )
    assert code == 1
    assert f"cannot read {tmp_path / 'missing'}" in err
    code, _, _ = run_cli(capsys, "export", "--dsn", "postgresql://x/y")
    assert code == 3  # --output is required


# -- export, round trip, postmap ----------------------------------------------------------------


async def _add_extras(conn: asyncpg.Connection) -> None:
    """What only the admin commands create: mirrors, disabled records, a mailbox's own gid."""
    from maplookup.db import admin

    await admin.domain_add(conn, "mirror.example", alias_of="example.com")
    await admin.domain_add(conn, "off.example")
    await admin.domain_set_enabled(conn, "off.example", False)
    await admin.mailbox_add(conn, "gone@example.com", gid=4242)
    await admin.mailbox_set_enabled(conn, "gone@example.com", False)
    await admin.alias_add(conn, "old@example.com", ["@remote.test"])
    await admin.alias_set_enabled(conn, "old@example.com", False)
    await admin.alias_add(conn, "x@mirror.example", ["info@example.com"])
    # One set of valid targets (issue 12.5): a quoted address, a local account and a target
    # in its own case are accepted, exported and read back alike.
    await admin.alias_add(
        conn, "odd@example.com", ['"a..b"@example.net', "postmaster", "Mixed@Example.NET"]
    )


@pytest.fixture
def exported(
    make_database: Callable[[], str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[str, Path]:
    """A database with the fixtures plus extras, exported into tmp_path/out."""
    dsn = make_database()
    assert run_cli(capsys, "import", *file_args(DATA), "--dsn", dsn)[0] == 0

    async def extras() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await _add_extras(conn)
        finally:
            await conn.close()

    asyncio.run(extras())
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "export", "--output", str(out_dir), "--dsn", dsn)
    assert code == 0, err
    # Only the note that mailboxes of two domains have no ids at all (no server default is
    # given here): their mail is deferred, with these tables as with maplookup.
    assert sorted(err.splitlines()) == [
        f"maplookup: warning: {c}s: 1 mailbox(es) of {d} have no {c} (none of their own, no "
        f"domain or server default; give --default-{c} as the server's): virtual(8) defers "
        "their mail"
        for c in ("gid", "uid")
        for d in ("implied.example", "shop.example")
    ]
    assert f"wrote {out_dir / 'vmailbox'}: 9 entries, 1 disabled (commented out)" in out
    return dsn, out_dir


def test_round_trip_preserves_every_row(
    exported: tuple[str, Path],
    make_database: Callable[[], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    source_dsn, out_dir = exported
    target_dsn = make_database()
    code, out, err = run_cli(capsys, "import", *file_args(out_dir), "--dsn", target_dsn)
    assert (code, err) == (0, ""), err
    assert "mailbox domains: 5 added, 0 unchanged" in out  # none implied: all are listed
    # Export moves a non-first '@domain' target to the front (only the first keeps the local
    # part in a hash table; maplookup's answer is the same in any order): compare as sets.
    assert sorted_targets(snapshot(target_dsn)) == sorted_targets(snapshot(source_dsn))
    # And exporting the copy gives the same files, byte for byte (modulo the database name).
    again = out_dir.parent / "again"
    assert run_cli(capsys, "export", "-o", str(again), "--dsn", target_dsn)[0] == 0
    for name in ALL_FILES:
        first = [x for x in (out_dir / name).read_text().splitlines() if "Generated" not in x]
        second = [x for x in (again / name).read_text().splitlines() if "Generated" not in x]
        assert first == second, name


def test_exported_files_format(exported: tuple[str, Path]) -> None:
    _, out_dir = exported
    for name in ALL_FILES:
        text = (out_dir / name).read_text()
        assert text.startswith("# "), name
        assert "Generated by `maplookup export`" in text
    # No temp files left.
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(ALL_FILES + ROUTING_FILES)
    virtual = (out_dir / "virtual").read_text()
    # A mirror is its target's addresses, one by one (unknown users refused at RCPT), between
    # notes import skips.
    assert "# maplookup-note: derived: begin (mirror.example mirrors example.com" in virtual
    assert "sales@mirror.example\tsales@example.com\n" in virtual
    assert "\n@mirror.example\t" not in virtual  # example.com has no catch-all
    assert "# disabled: old@example.com\t@remote.test\n" in virtual
    assert "mirror.example\talias-of=example.com\n" in (out_dir / "alias_domains").read_text()
    assert 'odd@example.com\t"a..b"@example.net, postmaster, Mixed@Example.NET\n' in virtual
    assert "# disabled: off.example\tOK\n" in (out_dir / "domains").read_text()
    uids = (out_dir / "uids").read_text()
    assert "@example.com\t5000\ninfo@example.com\t5001\n" in uids
    assert "gone@example.com\t4242\n" in (out_dir / "gids").read_text()


def test_export_refuses_to_overwrite_without_force(
    exported: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    dsn, out_dir = exported
    before = (out_dir / "virtual").read_text()
    (out_dir / "virtual").write_text("# hand-edited\n")
    code, _, err = run_cli(capsys, "export", "--output", str(out_dir), "--dsn", dsn)
    assert code == 1
    assert (
        f"{out_dir} already holds domains, alias_domains, vmailbox, virtual, uids, gids, "
        "sender_login, relay_domains, relay_recipients, transport;" in err
    )
    assert "use --force to overwrite" in err
    assert (out_dir / "virtual").read_text() == "# hand-edited\n"
    code, _, _ = run_cli(capsys, "export", "--output", str(out_dir), "--force", "--dsn", dsn)
    assert code == 0
    assert (out_dir / "virtual").read_text() == before


async def _add_awkward(conn: asyncpg.Connection) -> None:
    from maplookup.db import admin

    await admin.domain_add(conn, "a.test", uid=100)
    await admin.mailbox_add(conn, "@a.test", path="a.test/all/", uid=200)
    await admin.domain_add(conn, "b.test")
    await admin.mailbox_add(conn, "@b.test", path="b.test/all/", uid=300)
    await admin.mailbox_add(conn, "#hash@a.test")
    await admin.domain_add(conn, "m.test", alias_of="a.test")
    # The admin commands refuse a catch-all alias on a mirror (never used); SQL written by
    # other tools can still hold one, and export must say what it leaves out.
    await conn.execute(
        "INSERT INTO maplookup.aliases (domain, local_part, targets) VALUES ('m.test', '', $1)",
        ["x@c.test"],
    )


def test_export_reports_what_a_source_file_cannot_hold(
    dsn: str,
    tmp_path: Path,
    make_database: Callable[[], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def setup() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await _add_awkward(conn)
        finally:
            await conn.close()

    asyncio.run(setup())
    code, _, err = run_cli(capsys, "export", "-o", str(tmp_path), "--dsn", dsn)
    assert code == 0
    warnings = err.splitlines()
    assert all(w.startswith("maplookup: warning: ") for w in warnings), err
    # '#hash' inherits the domain default 100, not '@a.test' (200): it needs a uids line too;
    # it owns itself as a sender, in a.test and in its mirror m.test.
    assert len(warnings) == 7, err
    assert "sender_login: derived line '#hash@a.test' not exported" in err
    assert "sender_login: derived line '#hash@m.test' not exported" in err
    assert "gids: 1 mailbox(es) of a.test have no gid" in err
    assert "uids: uid '#hash@a.test' not exported" in err
    assert "virtual: derived line '#hash@m.test' not exported" in err
    assert "mailbox '#hash@a.test' not exported: the key starts with '#'" in err
    assert "catch-all alias @m.test not exported (never used in a mirror domain)" in err
    uids = (tmp_path / "uids").read_text()
    # '@a.test' answers every address of a.test without its own line: the catch-all
    # mailbox's own uid; the domain default comes back to import through the note.
    assert "# maplookup-note: @a.test is the fallback: catch-all; domain default 100\n" in uids
    assert "@a.test\t200\n" in uids
    assert "@b.test\t300\n" in uids  # no domain default: the catch-all's uid takes the key
    virtual = (tmp_path / "virtual").read_text()
    assert "@m.test\t@a.test\n" in virtual
    # What was written reads back without a single error.
    target = make_database()
    code, _, err = run_cli(capsys, "import", *file_args(tmp_path), "--dsn", target)
    assert (code, err) == (0, "")
    assert fetch(target, "SELECT maplookup.uid('x@b.test')") == [("300",)]


@pytest.fixture(scope="session")
def postfix_conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_postfix("lmdb")
    directory = tmp_path_factory.mktemp("postfix-conf")
    (directory / "main.cf").write_text("compatibility_level = 3.6\n")
    return directory


def postmap_query(conf: Path, table: Path, key: str) -> tuple[int, str]:
    result = subprocess.run(
        [POSTMAP, "-c", str(conf), "-q", key, f"lmdb:{table}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.stderr == "", result.stderr
    return result.returncode, result.stdout.rstrip("\n")


POSTMAP_ANSWERS = [
    ("domains", "example.com", "OK"),
    ("domains", "off.example", None),  # disabled: a comment to Postfix
    ("alias_domains", "legacy.example", "OK"),
    ("alias_domains", "mirror.example", "alias-of=example.com"),
    ("vmailbox", "info@example.com", "example.com/info/"),
    ("vmailbox", "@example.net", "example.net/catchall/"),
    ("vmailbox", "gone@example.com", None),
    ("virtual", "team@example.com", "info@example.com, Sales@Example.com, jim@example.com"),
    ("virtual", "sales@mirror.example", "sales@example.com"),
    ("virtual", "nobody@mirror.example", None),
    ("virtual", "@legacy.example", "@example.com"),
    ("virtual", "old@example.com", None),
    ("uids", "@example.com", "5000"),
    ("uids", "info@example.com", "5001"),
    ("gids", "bob@shop.example", "7000"),
]


def test_postmap_accepts_every_exported_file(
    exported: tuple[str, Path], postfix_conf: Path, tmp_path: Path
) -> None:
    _, out_dir = exported
    tables = tmp_path / "tables"
    tables.mkdir()
    for name in ALL_FILES:
        shutil.copy(out_dir / name, tables / name)
        result = subprocess.run(
            [POSTMAP, "-c", str(postfix_conf), f"lmdb:{tables / name}"],
            capture_output=True,
            text=True,
            check=False,
        )
        # Exit 0 and no warning at all (a malformed line is only a warning to postmap).
        assert (result.returncode, result.stderr) == (0, ""), (name, result.stderr)
    for name, key, answer in POSTMAP_ANSWERS:
        code, value = postmap_query(postfix_conf, tables / name, key)
        assert (code, value) == ((0, answer) if answer is not None else (1, "")), (name, key)


# -- scale and progress -------------------------------------------------------------------------


def test_large_vmailbox_imports_in_bulk(
    dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [
        f"user{n}@domain{n % 100}.example  domain{n % 100}.example/user{n}/" for n in range(100_000)
    ]
    (tmp_path / "vmailbox").write_text("# generated\n" + "\n".join(lines) + "\n")
    (tmp_path / "uids").write_text("".join(f"@domain{n}.example {1000 + n}\n" for n in range(100)))
    started = time.monotonic()
    code, out, err = run_cli(capsys, "import", *file_args(tmp_path), "--dsn", dsn)
    elapsed = time.monotonic() - started
    assert (code, err) == (0, "")
    assert "mailboxes:       100000 added" in out
    assert "mailbox domains: 100 added" in out
    assert fetch(dsn, "SELECT count(*) FROM maplookup.mailboxes") == [(100_000,)]
    assert fetch(dsn, "SELECT maplookup.uid('user99999@domain99.example')") == [("1099",)]
    # Not a timing assertion (that belongs in bench/): the per-test timeout is the guard.
    print(f"100,000-line import took {elapsed:.1f} s")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal_and_only_for_large_files() -> None:
    data = "".join(f"u{n}@d.test d.test/u{n}/\n" for n in range(12_000)).encode()
    terminal = _Terminal()
    transfer.parse_source(data, "vmailbox", "mailboxes", [], progress=transfer.Progress(terminal))
    assert "\r\x1b[Kreading vmailbox: 10,000/12,001 lines" in terminal.getvalue()
    assert terminal.getvalue().endswith("\r\x1b[K")
    pipe = io.StringIO()
    transfer.parse_source(data, "vmailbox", "mailboxes", [], progress=transfer.Progress(pipe))
    assert pipe.getvalue() == ""
    small = _Terminal()
    transfer.parse_source(data[:1000], "v", "mailboxes", [], progress=transfer.Progress(small))
    assert small.getvalue() == ""


def test_continuation_without_entry_and_bad_utf8_are_reported() -> None:
    problems: list[transfer.Problem] = []
    data = b"  orphan continuation\nk\xff@d.test v\nok@d.test v\n"
    parsed = transfer.parse_source(data, "f", "aliases", problems)
    assert [str(p) for p in problems] == [
        "f:1: continuation line (starts with white space) without an entry before it; "
        "Postfix ignores it",
        "f:2: not valid UTF-8",
    ]
    assert [e.key for e in parsed] == ["ok@d.test"]


@pytest.mark.parametrize(
    ("text", "entries"),
    [
        ("a@b.c x\n", [("a@b.c", "x", True)]),
        ("a@b.c   x y  \n", [("a@b.c", "x y", True)]),
        ("a@b.c x,\n  y\n#c\n\tz\nd@e.f w", [("a@b.c", "x,  y\tz", True), ("d@e.f", "w", True)]),
        ("# disabled: a@b.c x\n", [("a@b.c", "x", False)]),
        ("#disabled: a@b.c x\n  # disabled: a@b.c x\n", []),
        ("a@b.c x\r\n\r\n", [("a@b.c", "x", True)]),
    ],
)
def test_source_format(text: str, entries: list[tuple[str, str, bool]]) -> None:
    problems: list[transfer.Problem] = []
    parsed = transfer.parse_source(text.encode(), "f", "aliases", problems)
    assert problems == []
    assert [(e.key, e.value, e.enabled) for e in parsed] == entries


# -- the maps beyond delivery (issue 14) ----------------------------------------------------------

ROUTING_TABLES = {
    **TABLES,
    "domains": "SELECT name, kind, alias_of, default_uid, default_gid, enabled"
    " FROM maplookup.domains ORDER BY name",
    "logins": "SELECT domain, local_part, login FROM maplookup.mailboxes ORDER BY 1, 2",
    "grants": "SELECT domain, local_part, login FROM maplookup.sender_grants ORDER BY 1, 2, 3",
    "relay_recipients": "SELECT domain, local_part FROM maplookup.relay_recipients ORDER BY 1, 2",
    "transports": "SELECT domain, local_part, transport FROM maplookup.transports ORDER BY 1, 2",
}


def routing_snapshot(dsn: str) -> dict[str, list[tuple[object, ...]]]:
    return {table: fetch(dsn, query) for table, query in ROUTING_TABLES.items()}


@pytest.fixture
def routing_exported(
    make_database: Callable[[], str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[str, Path]:
    """The data set of the routing maps' contract test (plus odd logins), exported."""
    from maplookup.db import admin
    from tests.integration.test_routing_maps import _load

    dsn = make_database()

    async def load() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await _load(conn)
            await admin.mailbox_add(conn, "nologin@example.com")
            await conn.execute(
                "UPDATE maplookup.mailboxes SET login = NULL WHERE local_part = 'nologin'"
            )
            await admin.mailbox_add(conn, "off@example.com", login="Off-Login")
            await admin.mailbox_set_enabled(conn, "off@example.com", False)
            await admin_relay_recipient(conn, "kept@offrelay.test")  # a disabled domain
            await admin_relay_recipient(conn, "extra@backup.example")  # a hosted domain
        finally:
            await conn.close()

    asyncio.run(load())
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "export", "--output", str(out_dir), "--dsn", dsn)
    assert (code, err) == (0, ""), err
    assert f"wrote {out_dir / 'transport'}: 8 entries" in out
    return dsn, out_dir


async def admin_relay_recipient(conn: asyncpg.Connection, address: str) -> None:
    from maplookup.db import admin_routing

    await admin_routing.relay_recipient_add(conn, address)


def test_routing_files_round_trip(
    routing_exported: tuple[str, Path],
    make_database: Callable[[], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """export -> import into an empty database -> export gives the same records and files."""
    source_dsn, out_dir = routing_exported
    target_dsn = make_database()
    names = ALL_FILES + ROUTING_FILES
    code, out, err = run_cli(capsys, "import", *file_args(out_dir, names), "--dsn", target_dsn)
    assert (code, err) == (0, ""), err
    for line in (
        "sender grants:    6 added, 0 unchanged, 0 skipped",
        "mailbox logins:   4 added, 0 unchanged, 0 skipped",
        "relay domains:    3 added, 0 unchanged, 0 skipped",
        "relay recipients: 4 added, 0 unchanged, 0 skipped",
    ):
        assert line in out, out
    assert "transports:       8 added, 0 unchanged, 0 skipped" in out
    assert routing_snapshot(target_dsn) == routing_snapshot(source_dsn)
    again = out_dir.parent / "again"
    assert run_cli(capsys, "export", "-o", str(again), "--dsn", target_dsn)[0] == 0
    for name in names:
        first = [x for x in (out_dir / name).read_text().splitlines() if "Generated" not in x]
        second = [x for x in (again / name).read_text().splitlines() if "Generated" not in x]
        assert first == second, name
    # Importing the same files again changes nothing.
    code, out, err = run_cli(capsys, "import", *file_args(out_dir, names), "--dsn", target_dsn)
    assert (code, err) == (0, ""), err
    assert "sender grants:    0 added, 6 unchanged" in out
    assert routing_snapshot(target_dsn) == routing_snapshot(source_dsn)


def test_routing_files_format(routing_exported: tuple[str, Path]) -> None:
    _, out_dir = routing_exported
    sender = (out_dir / "sender_login").read_text()
    assert "# maplookup-note: login of carol@example.com: carol-sasl\n" in sender
    assert "# maplookup-note: login of off@example.com: Off-Login\n" in sender
    assert "# maplookup-note: no login: nologin@example.com\n" in sender
    # A grant's line lists every owner; the note says which are grants.
    assert "# maplookup-note: grants of x@shared.test" not in sender  # x owns it as a mailbox
    assert "\n@shared.test\tboss\n" in sender
    assert "\nshared@example.com\tdave\n" in sender
    derived = sender.split("derived: begin", 1)[1]
    assert "\nx@shared.test\tboss,x@shared.test\n" in derived
    assert "\ninfo@example.org\talice@example.com,bob@example.com\n" in derived  # a mirror
    assert "\nunknown@example.com" not in sender  # a catch-all alias gives no ownership
    relay = (out_dir / "relay_domains").read_text()
    assert "\nrelay.test\tOK\n" in relay
    assert "backup.example" not in relay  # a backup MX lists the domains table itself
    assert "# disabled: offrelay.test\tOK\n" in relay
    assert "\n.relay.test\tOK\n" in relay.split("derived: begin", 1)[1]
    assert "relay.test" not in (out_dir / "alias_domains").read_text()
    recipients = (out_dir / "relay_recipients").read_text()
    assert "\nknown@relay.test\tOK\n" in recipients
    assert "\n@open.test\tOK\n" in recipients
    assert "# disabled: kept@offrelay.test\tOK\n" in recipients
    assert "\nextra@backup.example\tOK\n" in recipients.split("derived: begin", 1)[0]
    hosted = recipients.split("derived: begin", 1)[1]
    assert "\nfwd@backup.example\tOK\nm@backup.example\tOK\n" in hosted
    # A catch-all alias accepts everything, in its domain and its mirror: one line each.
    assert "\n@example.com\tOK\n# maplookup-note: derived: end\n" in hosted
    assert "\n@example.org\tOK\n# maplookup-note: derived: end\n" in hosted
    transport = (out_dir / "transport").read_text()
    assert (
        "\nexample.com\tlmtp:unix:private/dovecot-lmtp\nspecial@example.com\tsmtp:[special.test]"
        "\n.example.com\tlmtp:unix:private/dovecot-lmtp\n"
    ) in transport
    assert "\n*\tsmtp:[smarthost.test]\n" in transport
    assert "\n.only.test" not in transport


def test_routing_bad_lines_are_one_line_each_and_nothing_is_written(
    dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "domains", "hosted.test OK\n")
    write(tmp_path, "vmailbox", "a@hosted.test hosted.test/a/\n")
    sender = write(
        tmp_path,
        "sender_login",
        "a@hosted.test two words\n"  # two logins: fine
        "b@hosted.test\n"  # no value
        "noat login\n"
        "# maplookup-note: grants of c@hosted.test: other\n"
        "c@hosted.test mine\n"
        "# maplookup-note: login of ghost@hosted.test: g\n",
    )
    relay = write(
        tmp_path, "relay_domains", "relay.test\n.sub.test OK\n.relay.test OK\nhosted.test OK\n"
    )
    recipients = write(
        tmp_path, "relay_recipients", "x@relay.test OK\ny@relay.test\nz@unknown.test OK\n"
    )
    transport = write(
        tmp_path, "transport", "@relay.test smtp:\nrelay.test\t smtp:[a]\n*  \x01bad\n"
    )
    args = [
        "import", *file_args(tmp_path, ("domains", "vmailbox")),
        "--sender-login", str(sender), "--relay-domains", str(relay),
        "--relay-recipients", str(recipients), "--transport", str(transport), "--dsn", dsn,
    ]  # fmt: skip
    code, _, err = run_cli(capsys, *args)
    assert code == 1
    lines = err.splitlines()
    assert lines[-1].endswith("nothing imported (--skip-errors imports the rest)")
    expected = [
        f"{sender}:2: expected format: key whitespace value",
        f"{sender}:3: 'noat' has no '@'",
        f"{sender}:5: the note at {sender}:4 names grants other that this line does not list",
        f"{sender}:6: no mailbox ghost@hosted.test (in the vmailbox file or the database) for "
        "this login",
        f"{relay}:2: .sub.test: a relay domain covers its subdomains and itself",
        f"{relay}:3: warning: .relay.test skipped: relay.test covers its subdomains already",
        f"{relay}:4: warning: hosted.test skipped: it is hosted here (mailbox domain)",
        f"{recipients}:2: expected format: key whitespace value",
        f"{recipients}:3: no domain unknown.test (in the files or the database)",
        f"{transport}:1: invalid transport key '@relay.test'",
        f"{transport}:3: invalid transport",
    ]
    for message in expected:
        assert any(line.startswith(message) for line in lines), (message, err)
    assert len(lines) == len(expected) + 1, err
    assert counts(dsn) == (0, 0, 0)
    assert fetch(dsn, "SELECT count(*) FROM maplookup.transports") == [(0,)]


def test_postmap_accepts_the_routing_files(
    routing_exported: tuple[str, Path], postfix_conf: Path, tmp_path: Path
) -> None:
    """Each file builds without a warning, and a few keys answer as maplookup does."""
    _, out_dir = routing_exported
    for name in ROUTING_FILES:
        shutil.copy(out_dir / name, tmp_path / name)
        result = subprocess.run(
            [POSTMAP, "-c", str(postfix_conf), f"lmdb:{tmp_path / name}"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert (result.returncode, result.stderr) == (0, ""), (name, result.stderr)
    for name, key, answer in [
        ("sender_login", "info@example.com", "alice@example.com,bob@example.com"),
        ("sender_login", "carol@example.com", "carol-sasl"),
        ("relay_domains", ".relay.test", "OK"),
        ("relay_domains", "offrelay.test", None),
        ("relay_recipients", "m@backup.example", "OK"),
        ("relay_recipients", "x@backup.example", None),
        ("transport", "*", "smtp:[smarthost.test]"),
    ]:
        assert postmap_query(postfix_conf, tmp_path / name, key) == (
            (0, answer) if answer is not None else (1, "")
        ), (name, key)


def test_a_hand_written_sender_file_that_maplookup_widens_is_reported(
    make_database: Callable[[], str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A hand-written smtpd_sender_login_maps means "the first key that matches"; maplookup
    adds the @domain owners and a mailbox's own login to every answer of the domain.  The
    import says which addresses gain owners, and how to take them away (a new-user trial:
    it was silent)."""
    dsn = make_database()
    write(tmp_path, "domains", "example.net OK\n")
    write(
        tmp_path,
        "vmailbox",
        "alice@example.net example.net/alice/\nbob@example.net example.net/bob/\n",
    )
    write(
        tmp_path,
        "sender_login",
        "alice@example.net   alice@example.net\n"
        "@example.net        postmaster@example.net\n"
        "bob@example.net     bob, alice@example.net\n",
    )
    code, out, err = run_cli(
        capsys, "import", *file_args(tmp_path, ("domains", "vmailbox", "sender_login")),
        "--dsn", dsn,
    )  # fmt: skip
    assert (code, err) == (0, ""), err
    assert "note: 2 sender address(es) now have more owners than their line listed" in out
    assert "sender_login:1: alice@example.net also owned by postmaster@example.net\n" in out
    assert (
        "sender_login:3: bob@example.net also owned by bob@example.net, postmaster@example.net"
        in (out)
    )
