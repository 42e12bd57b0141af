"""Address syntax as Postfix has it: folding (casefold.c), quoting (quote_822_local.c),
extensions (split_addr.c).  Examples are the ones Postfix 3.7 gave on this project's machine
(issue 12; the hash: table experiments in its notes)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maplookup.address import fold, quote_local, split_extension, unquote_local


@pytest.mark.parametrize(
    ("text", "utf8", "ascii_only"),
    [
        ("Straße@Example.DE", "strasse@example.de", "straße@example.de"),
        ("ΣΊΣΥΦΟΣ@example.gr", "σίσυφοσ@example.gr", "ΣΊΣΥΦΟΣ@example.gr"),
        ("\ufb01le@example.com", "file@example.com", "\ufb01le@example.com"),
        ("İstanbul@example.tr", "i\u0307stanbul@example.tr", "İstanbul@example.tr"),
        ("\u0131i@example.tr", "\u0131i@example.tr", "\u0131i@example.tr"),  # dotless i
        ("\uab70@example.com", "\u13a0@example.com", "\uab70@example.com"),  # Cherokee
        ("ẞ", "ss", "ẞ"),
        ("User+Tag@Example.COM", "user+tag@example.com", "user+tag@example.com"),
    ],
)
def test_fold_as_postfix(text: str, utf8: str, ascii_only: str) -> None:
    assert fold(text) == utf8
    assert fold(text, smtputf8=True) == utf8
    assert fold(text, smtputf8=False) == ascii_only


def test_fold_is_not_lower() -> None:
    """A lower() after the fold would undo it (Cherokee folds to the upper-case letter)."""
    assert fold("\u13a0") == "\u13a0" != "\u13a0".lower()


@given(st.text())
def test_fold_is_idempotent(text: str) -> None:
    assert fold(fold(text)) == fold(text)


@given(st.text())
def test_folding_keeps_the_ascii_punctuation_where_it_was(text: str) -> None:
    """Quoting and extension splitting commute with folding: fold never makes or drops '@',
    '"', '\\' or a delimiter."""

    def marks(s: str) -> list[str]:
        return [c for c in s if c.isascii() and not c.isalnum()]

    assert marks(fold(text)) == marks(text)


@pytest.mark.parametrize(
    ("external", "internal"),
    [
        ('"joe+odd user"@example.org', "joe+odd user@example.org"),
        ('"taro."@example.com', "taro.@example.com"),
        ('"a@b"@example.com', "a@b@example.com"),
        ('"a\\"b"@x', 'a"b@x'),
        ('""@example.com', "@example.com"),
        ("plain@example.com", "plain@example.com"),
        ("straße@x", "straße@x"),
    ],
)
def test_quoting_round_trip(external: str, internal: str) -> None:
    assert unquote_local(external) == internal
    assert quote_local(internal) == external


@pytest.mark.parametrize(
    "address",
    ["a..b@x", ".a@x", "a.@x", "a b@x", "a,b@x", "a;b@x", "a(b@x", "a[b@x", "a\\b@x"],
)
def test_non_dot_atoms_are_quoted(address: str) -> None:
    quoted = quote_local(address)
    assert quoted.startswith('"')
    assert unquote_local(quoted) == address


def test_a_domain_is_never_unquoted() -> None:
    assert unquote_local('"a b"@"odd"') == 'a b@"odd"'


def test_local_account_names_are_quoted_whole() -> None:
    assert quote_local("postmaster") == "postmaster"
    assert quote_local("joe user") == '"joe user"'


@pytest.mark.parametrize(
    ("local", "delimiter", "split"),
    [
        ("user+Tag", "+", ("user", "+Tag")),
        ("user+a+b", "+", ("user", "+a+b")),
        ("user-x+y", "+-", ("user", "-x+y")),
        ("user+", "+", ("user", "+")),
        ("+user", "+", ("+user", None)),
        ("user", "+", ("user", None)),
        ("user+x", "", ("user+x", None)),
        ("PostMaster", "+", ("PostMaster", None)),
        ("PostMaster+x", "+", ("PostMaster", "+x")),  # only the whole local part counts
        ("mailer-daemon", "-", ("mailer-daemon", None)),
        ("double-bounce", "-", ("double-bounce", None)),
        ("owner-list", "-", ("owner-list", None)),
        ("list-request", "-", ("list-request", None)),
        ("owner-list+x", "+", ("owner-list", "+x")),
        ("-request", "-", ("-request", None)),  # empty base: never split
    ],
)
def test_split_extension_as_split_addr(
    local: str, delimiter: str, split: tuple[str, str | None]
) -> None:
    assert split_extension(local, delimiter) == split
