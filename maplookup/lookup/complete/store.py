"""The complete copy's data: every row the maps read, packed into flat dicts of strings.

Layout, and why:

* **One dict per table, keyed by the address** ``local@domain`` (``@domain`` for the empty
  local part: catch-alls, ``@domain`` grants, domain transports, ``@*`` for the wildcard
  transport), and the domains by name.  The folded key a lookup gets *is* that address once
  split (``user@d``), so the exact try costs one dict probe and no new string; the fallbacks
  build ``base@d`` and ``@d``.  A domain holds no ``@`` (schema.sql), so splitting at the last
  ``@`` is unambiguous even for local parts that hold one.
* **Only strings, no per-row or per-domain objects.**  A dict whose keys and values are all
  strings is never tracked by the garbage collector, so a million mailboxes in a million
  domains add nothing to any collection's walk (DESIGN.md §5; bench/README.md, "Garbage
  collection").  (A tuple or dict holding a dict is tracked whatever it holds: one
  Partition tuple per domain was, hence the flat layout.)  Rows are packed into one string
  each: a mailbox is ``path NUL uid NUL gid NUL login`` (``""`` for NULL, ``\\x01`` for the
  values the tools write by default, path ``domain/local/`` and login ``local@domain``, so the
  usual mailbox's value is one shared string); a domain ``kind NUL alias_of NUL default_uid
  NUL default_gid``; an alias its targets joined by ``\\n`` (what ``virtual_match`` returns
  after its kind line); grants their logins joined by ``\\n``.  No column can hold a control
  character (schema.sql's CHECK constraints), so the separators are unambiguous.
* **Partitioned by the ``domain`` column for updates.**  ``index`` maps each name (the
  ``domain`` column of any table, ``name`` for domains) to the keys it holds in each table,
  so :meth:`MapsCopy.replace` removes exactly one partition's keys and inserts its fresh rows.
  The change log names exactly these values (schema.sql, ``notify_domains``: the rows'
  ``domain`` column, plus the mirrors of a changed domain, which only cost a needless
  rebuild), so applying a change is: read the named partitions (one statement, one
  snapshot: ``rows.partition_arrays``), ``replace`` them.  ``*`` in the log (TRUNCATE, a log
  pruned past the reader) means a fresh snapshot and :meth:`MapsCopy.build`.  Answers
  that cross domains (mirrors, the alias chains of sender_login, the parent domains of
  transport) are computed at lookup time, so no derived data can go stale.
* **Only what lookups can see.**  Disabled rows do not exist for any lookup function, and none
  reads the mailboxes, aliases or relay recipients of a domain whose row is disabled or
  missing: they are left out.  Grants are kept unless their domain's row is disabled (an
  outside address may be granted: ``maplookup.sender_grants_of``); transports never look at
  the domains table (``transport``), so they are kept whatever the domain row.
* **Rows, where the change log names them** (schema version 6: a statement that changed at
  most 1000 rows of a record table logs their keys, ``table:local_part@domain``):
  :meth:`MapsCopy.apply_records` removes those keys and inserts what the database holds for
  them now, so changing one mailbox of a domain of a million costs one row, not the domain.
  The index is a string per name; a key added that way is noted in ``added`` (a second string
  per name, merged into the index when it grows long), so that replacing the partition later
  still removes it.
* ``replace`` and ``apply_records`` run without yielding: in the trio thread, a change that
  touches several domains becomes visible to lookups at once.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, Final, NamedTuple

from maplookup.lookup.complete.rows import SnapshotRows

#: Separates the fields of a packed row (no column can hold a control character).
FIELD: Final = "\x00"
#: Stands for the value the tools write by default (path ``domain/local/``, login
#: ``local@domain``).
DEFAULT: Final = "\x01"
#: Separates alias targets, grant logins, and the local parts of an index entry.
ITEM: Final = "\n"

_ALL_DEFAULT: Final = f"{DEFAULT}{FIELD}{FIELD}{FIELD}{DEFAULT}"
#: The tables keyed by address, in the order of an index entry's fields.
TABLES: Final = ("mailboxes", "aliases", "grants", "relay_recipients", "transports")
#: The change log's name of each of :data:`TABLES` (rows.RECORD_TABLES), in the same order.
LOGGED_TABLES: Final = ("mailboxes", "aliases", "sender_grants", "relay_recipients", "transports")
#: Characters of keys noted in ``added`` for one name beyond which they are merged into its
#: index entry (a pass over the partition's keys, about once per 2,000 keys added).
ADDED_MERGE_CHARS: Final = 65_536
#: The snapshot's tables (SnapshotRows' fields), in the order a build must receive them:
#: ``domains`` first (which mailboxes, aliases and relay recipients are visible depends on it).
SNAPSHOT_TABLES: Final = tuple(f.name for f in fields(SnapshotRows))

#: A str object's header (an ASCII str on 64-bit CPython), for the estimate below.
STR_HEADER_BYTES: Final = 49
#: What one stored entry costs beyond its characters, for :meth:`CopyBuilder.estimated_bytes`:
#: its key's str header and a dict slot with its share of the hash index (about 45 bytes at
#: the fill of a grown dict).  With the characters of the key (twice: the dict and the index)
#: and of the value (plus a header when it is not the shared default), the estimate lands
#: within about 20 % of tracemalloc's figure for bench/memory_copy.py's layouts;
#: tests/unit/test_complete_store.py holds it there.
ENTRY_OVERHEAD_BYTES: Final = STR_HEADER_BYTES + 45


class Domain(NamedTuple):
    """An enabled domain row, unpacked (ids as text, as the uid/gid maps answer them)."""

    kind: str  # mailbox, alias or relay
    alias_of: str | None
    default_uid: str | None
    default_gid: str | None


def pack_mailbox(
    domain: str, local: str, path: str, uid: int | None, gid: int | None, login: str | None
) -> str:
    """The packed value of an enabled mailbox (see the module docstring)."""
    packed = (
        f"{DEFAULT if path == f'{domain}/{local}/' else path}{FIELD}"
        f"{'' if uid is None else uid}{FIELD}{'' if gid is None else gid}{FIELD}"
        f"{'' if login is None else DEFAULT if login == f'{local}@{domain}' else login}"
    )
    return _ALL_DEFAULT if packed == _ALL_DEFAULT else packed


def mailbox_path(packed: str, address: str) -> str:
    """The path of a packed mailbox stored under ``address``."""
    path = packed[: packed.index(FIELD)]
    if path != DEFAULT:
        return path
    at = address.rfind("@")
    return f"{address[at + 1 :]}/{address[:at]}/"


def mailbox_ids(packed: str) -> tuple[str | None, str | None]:
    """The mailbox's own (uid, gid) as text, None for NULL."""
    _, uid, gid, _ = packed.split(FIELD)
    return uid or None, gid or None


def mailbox_login(packed: str, address: str) -> str | None:
    """The login of a packed mailbox stored under ``address``, None for NULL."""
    login = packed[packed.rindex(FIELD) + 1 :]
    if login == DEFAULT:
        return address
    return login or None


def _pack_domain(kind: str, alias_of: str | None, uid: int | None, gid: int | None) -> str:
    ids = ("" if uid is None else str(uid), "" if gid is None else str(gid))
    return FIELD.join((kind, alias_of or "", *ids))


@dataclass(frozen=True, slots=True)
class CopyChange:
    """What one read of the change log asks of the copy: the partitions of ``names`` replaced
    by ``rows`` (:meth:`MapsCopy.replace`), then the rows of the record keys ``keys``
    replaced by ``records`` (:meth:`MapsCopy.apply_records`)."""

    names: frozenset[str]
    rows: SnapshotRows
    keys: frozenset[str] = frozenset()
    records: SnapshotRows = field(default_factory=SnapshotRows)


class MapsCopy:
    """The complete copy: flat dicts of strings, see the module docstring.

    Built from a snapshot (:meth:`build`), kept current one partition at a time
    (:meth:`replace`).  The lookup functions read the dicts and :meth:`domain`/:meth:`kind`.
    """

    __slots__ = (
        "added",
        "aliases",
        "domains",
        "grants",
        "index",
        "mailboxes",
        "relay_recipients",
        "transports",
    )

    def __init__(self) -> None:
        self.domains: dict[str, str] = {}  # name -> packed enabled domain row
        self.mailboxes: dict[str, str] = {}  # address -> packed mailbox
        self.aliases: dict[str, str] = {}  # address -> targets joined by ITEM
        self.grants: dict[str, str] = {}  # address -> logins joined by ITEM
        self.relay_recipients: dict[str, str] = {}  # address -> ''
        self.transports: dict[str, str] = {}  # address -> transport
        # name -> the keys it holds in each of TABLES: ITEM-joined, FIELD-separated.
        self.index: dict[str, str] = {}
        # name -> keys added by apply_records since its index entry was written, each
        # prefixed by its table's position in TABLES, ITEM-joined (it may list a key twice,
        # or one since removed: removing is idempotent).
        self.added: dict[str, str] = {}

    @classmethod
    def build(cls, rows: SnapshotRows) -> MapsCopy:
        """A copy of everything in ``rows`` (the six tables read whole, rows.SNAPSHOT_QUERIES)."""
        builder = CopyBuilder(cls(), None)
        for table in SNAPSHOT_TABLES:
            builder.add(table, getattr(rows, table))
        return builder.finish()

    def replace(self, names: Iterable[str], rows: SnapshotRows) -> None:
        """Replace the partitions of ``names`` by what ``rows`` holds for them.

        ``rows`` must be every row of those partitions (``copy_load.read_rows`` for ``names``,
        read in one snapshot); rows of other names are ignored.  Runs without yielding.
        """
        wanted = set(names)
        for name in wanted:
            self._remove(name)
        builder = CopyBuilder(self, wanted)
        for table in SNAPSHOT_TABLES:
            builder.add(table, getattr(rows, table))
        builder.finish()

    def apply(self, change: CopyChange) -> None:
        """Apply one read of the change log: partitions, then rows.  Runs without yielding."""
        if change.names:
            self.replace(change.names, change.rows)
        if change.keys:
            self.apply_records(change.keys, change.records, change.names)

    def apply_records(
        self, keys: Iterable[str], rows: SnapshotRows, skip: frozenset[str] = frozenset()
    ) -> None:
        """Replace the rows of the record keys ``keys`` (``table:local_part@domain``, as the
        change log names them) by what ``rows`` holds for them.

        ``rows`` must be what ``copy_load.read_rows`` reads for those keys: their rows, and the
        rows of their domains, which decide what is visible exactly as in a snapshot (the
        copy's own domain rows are not changed).  Keys of a name in ``skip`` (partitions
        replaced in the same change) are left alone.  Runs without yielding.
        """
        held = [getattr(self, table) for table in TABLES]
        position = {table: n for n, table in enumerate(LOGGED_TABLES)}
        for key in keys:
            table, address = key.split(":", 1)
            if address[address.rfind("@") + 1 :] not in skip:
                held[position[table]].pop(address, None)
        builder = CopyBuilder(self, None, records=True)
        for table in SNAPSHOT_TABLES:
            table_rows = getattr(rows, table)
            if skip and table != "domains":
                table_rows = [row for row in table_rows if row[0] not in skip]
            builder.add(table, table_rows)
        builder.finish()

    def kind(self, name: str) -> str:
        """``mailbox``, ``alias`` or ``relay`` for an enabled domain, else ``""``."""
        packed = self.domains.get(name)
        return "" if packed is None else packed[: packed.index(FIELD)]

    def domain(self, name: str) -> Domain | None:
        """The enabled domain row of ``name``, unpacked."""
        packed = self.domains.get(name)
        if packed is None:
            return None
        kind, alias_of, uid, gid = packed.split(FIELD)
        return Domain(kind, alias_of or None, uid or None, gid or None)

    def counts(self) -> dict[str, int]:
        """How many names, enabled domains and visible rows of each table it holds."""
        return {"names": len(self.index), "domains": len(self.domains)} | {
            table: len(getattr(self, table)) for table in TABLES
        }

    def _remove(self, name: str) -> None:
        entry = self.index.pop(name, None)
        added = self.added.pop(name, None)
        self.domains.pop(name, None)
        if entry is not None:
            for table, keys in zip(TABLES, entry.split(FIELD), strict=True):
                if keys:
                    held = getattr(self, table)
                    for key in keys.split(ITEM):
                        held.pop(key, None)
        if added is not None:
            for item in added.split(ITEM):
                getattr(self, TABLES[int(item[0])]).pop(item[1:], None)

    def note_added(self, name: str, table: int, keys: list[str]) -> None:
        """Note keys that apply_records added to ``name``'s partition (see ``added``)."""
        noted = ITEM.join(f"{table}{key}" for key in keys)
        held = self.added.get(name)
        noted = noted if held is None else f"{held}{ITEM}{noted}"
        if len(noted) <= ADDED_MERGE_CHARS:
            self.added[name] = noted
            return
        # Merge into the index entry: every key listed in either that is still held, once.
        self.added.pop(name, None)
        entry = self.index.get(name)
        listed: list[set[str]] = [set() for _ in TABLES]
        if entry is not None:
            for n, keys_of_table in enumerate(entry.split(FIELD)):
                if keys_of_table:
                    listed[n].update(keys_of_table.split(ITEM))
        for item in noted.split(ITEM):
            listed[int(item[0])].add(item[1:])
        self.index[sys.intern(name)] = FIELD.join(
            ITEM.join(sorted(key for key in keys_of_table if key in getattr(self, table)))
            for table, keys_of_table in zip(TABLES, listed, strict=True)
        )


def _no_keys() -> tuple[list[str], ...]:
    return ([], [], [], [], [])


class CopyBuilder:
    """Adds rows to a copy table by table, in chunks: how a snapshot streamed through a
    cursor is built without ever holding all its rows (bench/README.md, "Complete copy":
    the rows in a list cost more than the copy itself).

    ``add`` takes the tables in :data:`SNAPSHOT_TABLES` order (each in as many chunks as
    wanted); ``finish`` writes the index and returns the copy.  With ``wanted``, only the rows
    of those names are added (:meth:`MapsCopy.replace`; their partitions must be empty).
    ``rows`` and :meth:`estimated_bytes` say how large the build has grown so far, so that a
    loader can refuse a snapshot past a memory bound before it is all in memory.
    """

    __slots__ = (
        "_copy",
        "_disabled",
        "_enabled",
        "_keys_by_name",
        "_records",
        "_table",
        "_wanted",
        "chars",
        "rows",
    )

    def __init__(self, copy: MapsCopy, wanted: set[str] | None, records: bool = False) -> None:
        self._copy = copy
        self._wanted = wanted
        # MapsCopy.apply_records: domain rows only decide visibility; keys are noted as added.
        self._records = records
        self._enabled: set[str] = set()  # the enabled domains among the names added
        self._disabled: set[str] = set()  # the disabled ones
        # The keys themselves (the dicts keep them anyway), not the rows' local parts: those
        # would stay alive until the end of the build among the kept strings, and the memory
        # they leave behind stays in the process (pymalloc frees an arena only when it is
        # empty): about 80 bytes per address in RSS at 1M mailboxes (bench/memory_copy.py).
        self._keys_by_name: dict[str, tuple[list[str], ...]] = {}
        self._table = 0  # index in SNAPSHOT_TABLES of the table being added
        self.rows = 0  # rows read, visible or not
        self.chars = 0  # characters stored: the keys (twice, with the index) and the values

    def estimated_bytes(self) -> int:
        """The memory the entries stored so far take: their characters plus
        :data:`ENTRY_OVERHEAD_BYTES` each."""
        copy = self._copy
        entries = len(copy.domains) + sum(len(getattr(copy, t)) for t in TABLES)
        return self.chars + entries * ENTRY_OVERHEAD_BYTES

    def add(self, table: str, rows: Iterable[Any]) -> None:
        """Add a chunk of ``table``'s rows (a SnapshotRows field name)."""
        position = SNAPSHOT_TABLES.index(table)
        if position < self._table:
            raise ValueError(f"{table} after {SNAPSHOT_TABLES[self._table]}: out of order")
        self._table = position
        getattr(self, f"_add_{table}")(rows)

    def _note(self, table: int, domain: str, key: str, value: str) -> None:
        entry = self._keys_by_name.get(domain)
        if entry is None:
            entry = self._keys_by_name[domain] = _no_keys()
        entry[table].append(key)
        own = STR_HEADER_BYTES if value and value is not _ALL_DEFAULT else 0
        self.chars += 2 * len(key) + len(value) + own

    def _add_domains(self, rows: Iterable[Any]) -> None:
        intern, wanted, domains = sys.intern, self._wanted, self._copy.domains
        for name, kind, alias_of, uid, gid, enabled in rows:
            self.rows += 1
            if wanted is not None and name not in wanted:
                continue
            if self._records:
                (self._enabled if enabled else self._disabled).add(name)
            elif enabled:
                packed = _pack_domain(kind, alias_of, uid, gid)
                domains[intern(name)] = packed
                self._enabled.add(name)
                self.chars += 2 * len(name) + len(packed)
            else:
                self._disabled.add(name)

    def _add_mailboxes(self, rows: Iterable[Any]) -> None:
        boxes, enabled_domains = self._copy.mailboxes, self._enabled
        for domain, local, path, uid, gid, login, enabled in rows:
            self.rows += 1
            if enabled and domain in enabled_domains:
                key = f"{local}@{domain}"
                packed = boxes[key] = pack_mailbox(domain, local, path, uid, gid, login)
                self._note(0, domain, key, packed)

    def _add_aliases(self, rows: Iterable[Any]) -> None:
        aliases, enabled_domains = self._copy.aliases, self._enabled
        for domain, local, targets, enabled in rows:
            self.rows += 1
            if enabled and domain in enabled_domains:
                key = f"{local}@{domain}"
                joined = aliases[key] = ITEM.join(targets)
                self._note(1, domain, key, joined)

    def _add_sender_grants(self, rows: Iterable[Any]) -> None:
        grants, wanted, disabled = self._copy.grants, self._wanted, self._disabled
        for domain, local, login in rows:
            self.rows += 1
            # Grants of a disabled domain are off with it; a domain without a row (an
            # outside address granted) has its grants all the same (maplookup.sender_grants_of).
            if (wanted is None or domain in wanted) and domain not in disabled:
                address = f"{local}@{domain}"
                held = grants.get(address)
                grants[address] = login if held is None else f"{held}{ITEM}{login}"
                if held is None:
                    self._note(2, domain, address, login)
                else:
                    self.chars += len(login) + 1

    def _add_relay_recipients(self, rows: Iterable[Any]) -> None:
        records, enabled_domains = self._copy.relay_recipients, self._enabled
        for domain, local in rows:
            self.rows += 1
            if domain in enabled_domains:
                key = f"{local}@{domain}"
                records[key] = ""
                self._note(3, domain, key, "")

    def _add_transports(self, rows: Iterable[Any]) -> None:
        entries, wanted = self._copy.transports, self._wanted
        for domain, local, transport in rows:
            self.rows += 1
            if wanted is None or domain in wanted:
                key = f"{local}@{domain}"
                entries[key] = transport
                self._note(4, domain, key, transport)

    def finish(self) -> MapsCopy:
        """Write the index of every name added; the copy is then complete."""
        if self._records:
            for name, entry in self._keys_by_name.items():
                for table, keys in enumerate(entry):
                    if keys:
                        self._copy.note_added(name, table, keys)
            self._keys_by_name = {}
            return self._copy
        intern, index, keys_by_name = sys.intern, self._copy.index, self._keys_by_name
        for name in self._enabled | keys_by_name.keys():
            entry = keys_by_name.get(name) or _no_keys()
            index[intern(name)] = FIELD.join(ITEM.join(keys) for keys in entry)
        self._keys_by_name = {}
        return self._copy
