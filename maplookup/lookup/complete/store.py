"""The complete copy's data: every row the maps read, packed, partitioned by domain.

Layout, and why:

* **Partitioned by the ``domain`` column** (``name`` for domains): one :class:`Partition` per
  name holds the domain row and every mailbox, alias, sender grant, relay recipient and
  transport whose ``domain`` is that name (for transports also ``.parent`` and ``*``, for
  grants domains not hosted here).  The change log names exactly these values
  (schema.sql, ``notify_domains``: the rows' ``domain`` column, plus mirrors of a changed
  domain, which cost a needless rebuild at worst), so applying a change is: read the named
  partitions with ``rows.PARTITION_QUERIES`` in one snapshot, :meth:`MapsCopy.replace` them.
  ``*`` (TRUNCATE, a pruned log) means a fresh snapshot and :meth:`MapsCopy.build`.  Answers
  that cross domains (mirrors, alias chains of sender_login, parent domains of transport) are
  computed at lookup time from the current partitions, so no derived data can go stale.
* **Plain dicts of plain strings, no per-row objects.**  A mailbox is one ``str`` value under
  its local part: ``path NUL uid NUL gid NUL login`` (``""`` for NULL, and ``\\x01`` for the
  values the tools write by default: path ``domain/local/`` and login ``local@domain``, so
  the usual mailbox's value is one shared string).  An alias is its targets joined by ``\\n``
  (what ``virtual_match`` returns after its kind line); grants are logins joined by ``\\n``.
  Control characters cannot occur in any of these columns (schema.sql's CHECK constraints),
  so the separators are unambiguous.  A dict whose keys and values are all strings is never
  tracked by the garbage collector, and a Partition (a tuple of such dicts, strings and
  None) stops being tracked once it survives a collection, so a million mailboxes add nothing
  to a full collection's walk (DESIGN.md §5; bench/README.md, "Garbage collection").
* **Only what lookups can see.**  Disabled rows do not exist for any lookup function, and
  nothing reads the mailboxes, aliases or relay recipients of a domain whose row is disabled
  or missing: they are dropped at build time.  Grants and transports never look at the
  domains table (``sender_login``, ``transport``), so they are kept whatever the domain row.
* **Immutable partitions**, replaced whole: a lookup holding a partition sees one consistent
  state of its domain; in the trio thread, :meth:`MapsCopy.replace` runs without awaiting, so
  a change touching several domains becomes visible at once.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Final, NamedTuple

from maplookup.lookup.complete.rows import SnapshotRows

#: Separates the fields of a packed mailbox (no column can hold a control character).
FIELD: Final = "\x00"
#: Stands for the value the tools write by default (path ``domain/local/``, login
#: ``local@domain``).
DEFAULT: Final = "\x01"
#: Separates alias targets and grant logins.
ITEM: Final = "\n"

_ALL_DEFAULT: Final = f"{DEFAULT}{FIELD}{FIELD}{FIELD}{DEFAULT}"


class Partition(NamedTuple):
    """Everything of one domain name that a lookup can see.

    ``kind`` is ``mailbox``, ``alias`` or ``relay`` for an enabled domain row, ``""`` when the
    row is missing or disabled (then ``mailboxes``, ``aliases`` and ``relay_recipients`` are
    empty).  Ids are kept as text, as the uid/gid maps answer them.
    """

    kind: str
    alias_of: str | None
    default_uid: str | None
    default_gid: str | None
    mailboxes: Mapping[str, str]  # local part ('' = catch-all) -> packed mailbox
    aliases: Mapping[str, str]  # local part ('' = catch-all) -> targets joined by ITEM
    grants: Mapping[str, str]  # local part ('' = every address) -> logins joined by ITEM
    relay_recipients: Mapping[str, str]  # local part ('' = every address) -> ''
    transports: Mapping[str, str]  # local part ('' = the domain entry) -> transport


_NOTHING: Mapping[str, str] = {}  # shared by every partition that has none; never mutated

#: The partition of a name that has no rows at all.
EMPTY: Final = Partition("", None, None, None, _NOTHING, _NOTHING, _NOTHING, _NOTHING, _NOTHING)


def _text(value: int | None) -> str | None:
    return None if value is None else str(value)


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


def mailbox_path(packed: str, domain: str, local: str) -> str:
    """The path of a packed mailbox."""
    path = packed[: packed.index(FIELD)]
    return f"{domain}/{local}/" if path == DEFAULT else path


def mailbox_ids(packed: str) -> tuple[str | None, str | None]:
    """The mailbox's own (uid, gid) as text, None for NULL."""
    _, uid, gid, _ = packed.split(FIELD)
    return uid or None, gid or None


def mailbox_login(packed: str, domain: str, local: str) -> str | None:
    """The mailbox's login, None for NULL."""
    login = packed[packed.rindex(FIELD) + 1 :]
    if login == DEFAULT:
        return f"{local}@{domain}"
    return login or None


class _Builder:
    """Collects the rows of many partitions in one pass, then makes the Partitions."""

    def __init__(self) -> None:
        self.domains: dict[str, tuple[str, str | None, str | None, str | None]] = {}
        self.mailboxes: dict[str, dict[str, str]] = {}
        self.aliases: dict[str, dict[str, str]] = {}
        self.grants: dict[str, dict[str, str]] = {}
        self.relay_recipients: dict[str, dict[str, str]] = {}
        self.transports: dict[str, dict[str, str]] = {}

    def add(self, rows: SnapshotRows) -> None:
        intern = sys.intern
        for name, kind, alias_of, uid, gid, enabled in rows.domains:
            if enabled:
                mirrored = None if alias_of is None else intern(alias_of)
                self.domains[intern(name)] = (kind, mirrored, _text(uid), _text(gid))
        mailboxes = self.mailboxes
        for domain, local, path, m_uid, m_gid, login, m_enabled in rows.mailboxes:
            if m_enabled:
                boxes = mailboxes.get(domain)
                if boxes is None:
                    boxes = mailboxes[intern(domain)] = {}
                boxes[local] = pack_mailbox(domain, local, path, m_uid, m_gid, login)
        for domain, local, targets, a_enabled in rows.aliases:
            if a_enabled:
                self.aliases.setdefault(intern(domain), {})[local] = ITEM.join(targets)
        for domain, local, grant_login in rows.sender_grants:
            logins = self.grants.setdefault(intern(domain), {})
            held = logins.get(local)
            logins[local] = grant_login if held is None else f"{held}{ITEM}{grant_login}"
        for domain, local in rows.relay_recipients:
            self.relay_recipients.setdefault(intern(domain), {})[local] = ""
        for domain, local, transport in rows.transports:
            self.transports.setdefault(intern(domain), {})[local] = transport

    def names(self) -> set[str]:
        return (
            self.domains.keys()
            | self.mailboxes.keys()
            | self.aliases.keys()
            | self.grants.keys()
            | self.relay_recipients.keys()
            | self.transports.keys()
        )

    def partition(self, name: str) -> Partition | None:
        """The partition of ``name``, or None if nothing of it can ever answer."""
        grants = self.grants.get(name) or _NOTHING
        transports = self.transports.get(name) or _NOTHING
        domain = self.domains.get(name)
        if domain is None:
            if grants is _NOTHING and transports is _NOTHING:
                return None
            return EMPTY._replace(grants=grants, transports=transports)
        kind, alias_of, default_uid, default_gid = domain
        return Partition(
            kind,
            alias_of,
            default_uid,
            default_gid,
            self.mailboxes.get(name) or _NOTHING,
            self.aliases.get(name) or _NOTHING,
            grants,
            self.relay_recipients.get(name) or _NOTHING,
            transports,
        )


class MapsCopy:
    """The complete copy: a dict from domain name to its :class:`Partition`.

    Built from a snapshot (:meth:`build`), kept current one change at a time
    (:meth:`replace`).  The lookup functions only read :meth:`partition`.
    """

    __slots__ = ("_partitions",)

    def __init__(self, partitions: dict[str, Partition] | None = None) -> None:
        self._partitions: dict[str, Partition] = {} if partitions is None else partitions

    @classmethod
    def build(cls, rows: SnapshotRows) -> MapsCopy:
        """A copy of everything in ``rows`` (the six tables read whole, rows.SNAPSHOT_QUERIES)."""
        builder = _Builder()
        builder.add(rows)
        partitions = {}
        for name in builder.names():
            partition = builder.partition(name)
            if partition is not None:
                partitions[name] = partition
        return cls(partitions)

    def replace(self, names: Iterable[str], rows: SnapshotRows) -> None:
        """Replace the partitions of ``names`` by what ``rows`` holds for them.

        ``rows`` must be every row of those partitions (rows.PARTITION_QUERIES with ``names``,
        read in one snapshot); a name without rows is removed.  Rows of other names are
        ignored.  Runs without yielding: every partition changes at once for the lookups.
        """
        builder = _Builder()
        builder.add(rows)
        for name in set(names):
            partition = builder.partition(name)
            if partition is None:
                self._partitions.pop(name, None)
            else:
                self._partitions[sys.intern(name)] = partition

    def partition(self, name: str) -> Partition:
        """The partition of ``name`` (:data:`EMPTY` when there is none)."""
        return self._partitions.get(name, EMPTY)

    def __len__(self) -> int:
        return len(self._partitions)

    def counts(self) -> dict[str, int]:
        """How many partitions, enabled domains and visible rows of each kind it holds."""
        parts = self._partitions.values()
        return {
            "partitions": len(self._partitions),
            "domains": sum(1 for p in parts if p.kind),
            "mailboxes": sum(len(p.mailboxes) for p in parts),
            "aliases": sum(len(p.aliases) for p in parts),
            "sender_grants": sum(len(p.grants) for p in parts),
            "relay_recipients": sum(len(p.relay_recipients) for p in parts),
            "transports": sum(len(p.transports) for p in parts),
        }
