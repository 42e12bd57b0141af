"""The rows a complete copy is built from, and the statements that read them.

The copy is built from exactly what these statements return, column for column, so that the
loader (later, in ``maplookup.db``: inside ``feed.snapshot(conn)``, one REPEATABLE READ
transaction whose head position the copy then follows with ``changes_after``) only runs them
and hands the records over: asyncpg's Records index like the tuples named here.

Every table is read whole, disabled rows included: the copy drops what no lookup can see
(:mod:`.store`), so the rule "disabled rows do not exist" lives in one place, next to the
semantics.  ``targets`` (text[]) arrives as a list.

``partition_arrays`` reads the same columns for some partitions only (``$1``: a text[] of
names, as a change-log row lists them): every row whose ``domain`` column (``name`` for
domains) is one of them, which is what :meth:`.store.MapsCopy.replace` takes.  It is one
statement returning one row of six arrays of anonymous records (asyncpg decodes each record
as a tuple of the columns named here): one statement sees one snapshot of every table even
under READ COMMITTED, so a change spanning tables is never seen half-way, and it costs one
round trip instead of a transaction of seven.  Applying a change is on the path that makes it
visible (bench/README.md, "Complete mode": change-to-visible).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# (name, kind, alias_of, default_uid, default_gid, enabled)
DomainRow = tuple[str, str, str | None, int | None, int | None, bool]
# (domain, local_part, path, uid, gid, login, enabled)
MailboxRow = tuple[str, str, str, int | None, int | None, str | None, bool]
# (domain, local_part, targets, enabled)
AliasRow = tuple[str, str, Sequence[str], bool]
# (domain, local_part, login)
GrantRow = tuple[str, str, str]
# (domain, local_part)
RelayRecipientRow = tuple[str, str]
# (domain, local_part, transport)
TransportRow = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class SnapshotRows:
    """The rows of the six tables (any iterables: consumed once, never kept)."""

    domains: Iterable[DomainRow] = ()
    mailboxes: Iterable[MailboxRow] = ()
    aliases: Iterable[AliasRow] = ()
    sender_grants: Iterable[GrantRow] = ()
    relay_recipients: Iterable[RelayRecipientRow] = ()
    transports: Iterable[TransportRow] = ()


_COLUMNS = {
    "domains": ("name", "name, kind, alias_of, default_uid, default_gid, enabled"),
    "mailboxes": ("domain", "domain, local_part, path, uid, gid, login, enabled"),
    "aliases": ("domain", "domain, local_part, targets, enabled"),
    "sender_grants": ("domain", "domain, local_part, login"),
    "relay_recipients": ("domain", "domain, local_part"),
    "transports": ("domain", "domain, local_part, transport"),
}

#: One statement per table (the field names of :class:`SnapshotRows`), reading it whole.
SNAPSHOT_QUERIES: dict[str, str] = {
    table: f"SELECT {columns} FROM maplookup.{table}" for table, (_, columns) in _COLUMNS.items()
}


def partition_arrays(names: str) -> str:
    """The select list that reads the partitions named by the SQL expression ``names`` (a
    text[]): one column per table (in :class:`SnapshotRows` field order), each an array of
    records of that table's columns, which asyncpg decodes as tuples."""
    return ", ".join(
        f"ARRAY(SELECT row({columns}) FROM maplookup.{table} WHERE {key} = ANY({names})) AS {table}"
        for table, (key, columns) in _COLUMNS.items()
    )


#: The record tables, as the change log names them in a key ``table:local_part@domain``
#: (schema.sql, ``record_keys``): every one is keyed by (domain, local_part).
RECORD_TABLES: tuple[str, ...] = tuple(table for table in _COLUMNS if table != "domains")


def record_keys_relation(keys: str) -> str:
    """A query of the change log's record keys in ``keys`` (a FROM item yielding ``k``, e.g.
    ``unnest($1::text[])``) split into ``tbl``, ``dom`` and ``loc``: the table before the
    first ':', the domain after the last '@' (no domain holds one; a local part may)."""
    address = "substr(k, strpos(k, ':') + 1)"
    domain = f"substring({address} from '@([^@]*)$')"
    return (
        f"SELECT DISTINCT split_part(k, ':', 1) AS tbl, {domain} AS dom, "
        f"left({address}, length({address}) - length({domain}) - 1) AS loc FROM {keys} AS k"
    )


def record_arrays(keys: str) -> str:
    """The select list that reads the rows named by the relation ``keys`` (columns ``tbl``,
    ``dom``, ``loc``, :func:`record_keys_relation`): the rows of their domains (which decide
    what is visible, as in a snapshot), then each record table's rows of those keys, in
    :class:`SnapshotRows` field order."""
    _, domain_columns = _COLUMNS["domains"]
    arrays = [
        f"ARRAY(SELECT row({domain_columns}) FROM maplookup.domains "
        f"WHERE name IN (SELECT dom FROM {keys})) AS record_domains"
    ]
    for table in RECORD_TABLES:
        _, columns = _COLUMNS[table]
        arrays.append(
            f"ARRAY(SELECT row({columns}) FROM maplookup.{table} WHERE (domain, local_part) "
            f"IN (SELECT dom, loc FROM {keys} WHERE tbl = '{table}')) AS record_{table}"
        )
    return ", ".join(arrays)
