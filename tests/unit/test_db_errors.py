"""The TEMP reason a mail admin reads in Postfix's log: words, not Python reprs."""

from __future__ import annotations

import asyncpg
import pytest

from maplookup.db.errors import as_database_error, describe


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (
            ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)"),
            "connection refused (127.0.0.1:5432)",
        ),
        (OSError(101, "Network is unreachable"), "network is unreachable"),
        (
            asyncpg.exceptions.UndefinedFunctionError("function maplookup.x() does not exist"),
            "PostgreSQL: function maplookup.x() does not exist (SQLSTATE 42883)",
        ),
        (asyncpg.ConnectionDoesNotExistError("closed"), "the connection to PostgreSQL was lost"),
    ],
)
def test_failures_are_described_in_words(error: BaseException, text: str) -> None:
    assert describe(error) == text
    assert str(as_database_error(error)) == text
