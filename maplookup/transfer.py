"""Import Postfix source map files into the database, and export the database back to them.

``maplookup import`` reads the files a classic ``hash:``/``lmdb:`` set-up is built from, in
postmap(1) source format, and loads them in one transaction: either everything valid goes in or
(on any error, without ``--skip-errors``) nothing does.  ``maplookup export`` writes the database
back in the same format, so a site can leave maplookup again, or diff its data.

Source format, as ``readlline()`` (src/util/readlline.c) and ``postmap`` (src/postmap/postmap.c)
read it: a logical line starts with non-white-space text; a line starting with white space
continues it; empty, white-space-only and comment lines (first non-white-space character ``#``)
are skipped, even between a line and its continuation, and do not end a logical line.  The key
ends at the first white space; the value is the rest, trimmed.  Keys are case-folded.

Markers (documented in every exported file's header): a comment line starting exactly with
``# disabled: `` holds a disabled record (Postfix skips it, import restores it disabled); in the
alias-domains file the value ``alias-of=DOMAIN`` (Postfix ignores domain-list values) marks a
mirror domain, whose hash-table equivalent is the catch-all ``@mirror  @DOMAIN`` in the virtual
file.  Together they make export -> import lossless for everything a source file can express.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO, TypeVar

import asyncpg

from maplookup import admin
from maplookup.admin import Address, AdminError

# C isspace(): what readlline() and postmap treat as white space.
_SPACE = " \t\n\r\v\f"
_SPACE_RE = re.compile(r"[ \t\n\r\v\f]")
# tok822_parse() (src/global/tok822_parse.c) separates addresses at commas and white space.
_TARGET_SPLIT_RE = re.compile(r"[ \t\n\r\v\f,]+")
_ID_RE = re.compile(r"[0-9]+")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# RFC 5322 syntax (quoted local parts, comments, <route>) that the database cannot hold.
_UNSUPPORTED_IN_ADDRESS = frozenset('"\\<>();')

DISABLED_MARKER = "# disabled: "
ALIAS_OF_PREFIX = "alias-of="
MAX_ID = 2**31 - 1  # the columns are PostgreSQL integers
MAX_PATH = 1024  # schema.sql, mailbox_path_relative
PROGRESS_MIN_LINES = 5000  # below this a file reads in well under a second: no progress line
PROGRESS_STEP_LINES = 5000

MAILBOX_DOMAINS = "mailbox domains"
ALIAS_DOMAINS = "alias domains"
MAILBOXES = "mailboxes"
ALIASES = "aliases"
UIDS = "uids"
GIDS = "gids"
CATEGORIES = (MAILBOX_DOMAINS, ALIAS_DOMAINS, MAILBOXES, ALIASES, UIDS, GIDS)

# Export file names, in the order of the import options.
EXPORT_FILES = ("domains", "alias_domains", "vmailbox", "virtual", "uids", "gids")


# -- problems and progress ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a record came from: the file as named on the command line and the line number."""

    source: str
    line: int
    rank: int = 0  # position of the file on the command line, for sorting messages

    def __str__(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True, slots=True)
class Problem:
    """A line that is not imported (error) or that is imported with a caveat (warning)."""

    origin: Origin
    message: str
    category: str
    warning: bool = False

    def __str__(self) -> str:
        return f"{self.origin}: {'warning: ' if self.warning else ''}{self.message}"


class Progress:
    """A ``\\r``-updated status line on a terminal; silent otherwise."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream if stream is not None and stream.isatty() else None
        self._shown = False

    def show(self, text: str) -> None:
        if self._stream is not None:
            self._stream.write(f"\r\x1b[K{text}")
            self._stream.flush()
            self._shown = True

    def clear(self) -> None:
        if self._stream is not None and self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._shown = False


_SILENT = Progress(None)


# -- reading source files ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One logical line: ``key value``, key not yet folded."""

    origin: Origin
    key: str
    value: str
    enabled: bool = True


def parse_source(
    data: bytes,
    source: str,
    category: str,
    problems: list[Problem],
    *,
    rank: int = 0,
    value_required: bool = True,
    markers: bool = True,
    progress: Progress = _SILENT,
) -> list[Entry]:
    """Split a source file into entries the way postmap does; bad lines go to ``problems``."""
    entries: list[Entry] = []
    lines = data.split(b"\n")
    show_progress = len(lines) > PROGRESS_MIN_LINES
    start = 0
    parts: list[str] = []

    def finish(text: str, line: int, enabled: bool) -> None:
        origin = Origin(source, line, rank)
        # postmap: the key ends at the first white space, the value is the rest, trimmed.
        space = _SPACE_RE.search(text)
        key = text if space is None else text[: space.start()]
        value = "" if space is None else text[space.start() :].strip(_SPACE)
        message = _check_entry(key, value, value_required)
        if message is not None:
            problems.append(Problem(origin, message, category))
        else:
            entries.append(Entry(origin, key, value, enabled))

    for number, raw_bytes in enumerate(lines, 1):
        if show_progress and number % PROGRESS_STEP_LINES == 0:
            progress.show(f"reading {source}: {number:,}/{len(lines):,} lines")
        raw = raw_bytes.decode("utf-8", "surrogateescape")
        stripped = raw.lstrip(_SPACE)
        if not stripped or stripped[0] == "#":
            # A comment neither starts nor ends a logical line (readlline.c).
            if markers and raw.startswith(DISABLED_MARKER):
                body = raw[len(DISABLED_MARKER) :].strip(_SPACE)
                if body:
                    finish(body, number, enabled=False)
            continue
        if raw[0] in _SPACE:
            if parts:
                parts.append(raw)
            else:
                problems.append(
                    Problem(
                        Origin(source, number, rank),
                        "continuation line (starts with white space) without an entry before "
                        "it; Postfix ignores it",
                        category,
                    )
                )
            continue
        if parts:
            finish("".join(parts), start, enabled=True)
        start, parts = number, [raw]
    if parts:
        finish("".join(parts), start, enabled=True)
    progress.clear()
    return entries


def _check_entry(key: str, value: str, value_required: bool) -> str | None:
    if _has_surrogates(key + value):
        return "not valid UTF-8"
    if value_required and not value:
        return "expected format: key whitespace value"
    if key.endswith(":"):
        return f"key {key!r} ends with ':'; is this an aliases(5) file? virtual(5) has no colon"
    if '"' in key or "\\" in key:
        return f"key {key!r}: quoted or escaped keys are not supported"
    return None


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# -- typed records -----------------------------------------------------------------------------


@dataclass(slots=True)
class DomainRecord:
    name: str
    kind: str  # 'mailbox' | 'alias'
    origin: Origin
    enabled: bool = True
    alias_of: str | None = None
    declared: bool = True  # False: a bare-domain line in the virtual file (only if not mailbox)


@dataclass(slots=True)
class MailboxRecord:
    address: Address
    path: str
    origin: Origin
    enabled: bool = True


@dataclass(slots=True)
class AliasRecord:
    address: Address
    targets: list[str]
    origin: Origin
    enabled: bool = True


@dataclass(slots=True)
class IdRecord:
    """A uid or gid; ``address.local_part == ''`` is the domain default (the ``@d`` key)."""

    address: Address
    value: int
    origin: Origin
    enabled: bool = True  # always: uid/gid files have no disabled marker


def _domain(text: str) -> str:
    if text.startswith("."):
        raise AdminError(f"{text!r} is a parent-domain pattern; list each domain itself")
    if text.startswith("!"):
        raise AdminError(f"{text!r}: negated patterns are not supported")
    if any(c in _UNSUPPORTED_IN_ADDRESS or c in "/:[]" for c in text):
        raise AdminError(f"invalid domain name: {text!r}")
    return admin.parse_domain(text)


def _address(text: str) -> Address:
    if any(c in _UNSUPPORTED_IN_ADDRESS for c in text):
        raise AdminError(f"{text!r}: quoted local parts, comments and <...> are not supported")
    if "@" not in text:
        raise AdminError(
            f"{text!r} has no '@' (a bare local part matches only local domains in Postfix; "
            "write user@domain)"
        )
    address = admin.parse_address(text)
    _domain(address.domain)
    return address


def _path(text: str) -> str:
    if text.startswith("/"):
        raise AdminError(
            f"mailbox path {text!r} is absolute; it must be relative to virtual_mailbox_base"
        )
    if ".." in text.split("/"):
        raise AdminError(
            f"mailbox path {text!r} contains '..'; it must stay below virtual_mailbox_base"
        )
    if _CONTROL_RE.search(text):
        raise AdminError(f"mailbox path {text!r} contains control characters")
    if len(text) > MAX_PATH:
        raise AdminError(f"mailbox path longer than {MAX_PATH} characters")
    return text


def _targets(value: str) -> list[str]:
    targets: list[str] = []
    for position, text in enumerate(t for t in _TARGET_SPLIT_RE.split(value) if t):
        if any(c in _UNSUPPORTED_IN_ADDRESS for c in text):
            raise AdminError(
                f"target {text!r}: quoted addresses, comments and <...> are not supported"
            )
        if "@" not in text:
            raise AdminError(
                f"target {text!r} has no domain (Postfix would append @$myorigin; write the "
                "full address)"
            )
        target = admin.parse_target(text)
        if target.startswith("@") and position > 0:
            # src/global/mail_addr_map.c prepends the user only when the whole value starts
            # with '@': a later '@domain' would be sent to the address '@domain' itself.
            raise AdminError(
                f"target {text!r}: '@domain' keeps the local part only as the first target "
                "(src/global/mail_addr_map.c); put it first or write user@domain"
            )
        if target not in targets:
            targets.append(target)
    if not targets:
        raise AdminError("no targets")
    return targets


def _id(value: str, name: str) -> int:
    if not _ID_RE.fullmatch(value):
        raise AdminError(f"{name} {value!r} is not a number")
    number = int(value)
    if number <= 0:
        raise AdminError(f"{name} must be a positive number (0 is root), got {number}")
    if number > MAX_ID:
        raise AdminError(f"{name} {number} is too large")
    return number


class _Located(Protocol):
    origin: Origin
    enabled: bool


_Record = TypeVar("_Record", bound=_Located)


def _convert(
    entries: Iterable[Entry],
    category: str,
    problems: list[Problem],
    make: Callable[[Entry], _Record],
) -> list[_Record]:
    records: list[_Record] = []
    for entry in entries:
        try:
            records.append(make(entry))
        except AdminError as exc:
            problems.append(Problem(entry.origin, str(exc), category))
    return records


def _dedupe(
    records: Iterable[_Record],
    category: str,
    problems: list[Problem],
    key: Callable[[_Record], object],
    value: Callable[[_Record], object],
    show: Callable[[_Record], str],
) -> dict[Any, _Record]:
    """First record per key.  A repeat with the same value is harmless; with another value it is
    an error (postmap only warns, and which one wins depends on the table type).  An active line
    beats a ``# disabled:`` one for the same key: that is what Postfix would use."""
    kept: dict[Any, _Record] = {}
    for record in records:
        k = key(record)
        first = kept.get(k)
        if first is None:
            kept[k] = record
            continue
        if first.enabled != record.enabled:
            if record.enabled:
                kept[k] = record
            continue
        if value(first) != value(record):
            problems.append(
                Problem(
                    record.origin,
                    f"duplicate key {show(record)} with a different value (first at "
                    f"{first.origin})",
                    category,
                )
            )
    return kept


@dataclass(frozen=True, slots=True)
class Sources:
    """The files to import; any may be None."""

    domains: Path | None = None
    alias_domains: Path | None = None
    vmailbox: Path | None = None
    virtual: Path | None = None
    uids: Path | None = None
    gids: Path | None = None

    def given(self) -> list[tuple[str, Path]]:
        return [(name, path) for name, path in self._items() if path is not None]

    def _items(self) -> list[tuple[str, Path | None]]:
        return [
            ("domains", self.domains),
            ("alias_domains", self.alias_domains),
            ("vmailbox", self.vmailbox),
            ("virtual", self.virtual),
            ("uids", self.uids),
            ("gids", self.gids),
        ]


@dataclass
class Parsed:
    """Everything read from the files, checked line by line, duplicates resolved."""

    mailbox_domains: dict[str, DomainRecord] = field(default_factory=dict)
    alias_domains: dict[str, DomainRecord] = field(default_factory=dict)
    virtual_domains: dict[str, DomainRecord] = field(default_factory=dict)
    mailboxes: dict[tuple[str, str], MailboxRecord] = field(default_factory=dict)
    aliases: dict[tuple[str, str], AliasRecord] = field(default_factory=dict)
    uids: dict[tuple[str, str], IdRecord] = field(default_factory=dict)
    gids: dict[tuple[str, str], IdRecord] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    # Mailboxes whose address was readable but whose line was not, for the uid/gid messages.
    failed_mailboxes: dict[tuple[str, str], Origin] = field(default_factory=dict)
    lines: int = 0


def read_sources(sources: Sources, progress: Progress = _SILENT) -> Parsed:
    """Read and check every given file; raises AdminError only if a file cannot be read."""
    parsed = Parsed()
    for rank, (name, path) in enumerate(sources.given()):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise AdminError(f"cannot read {path}: {exc.strerror or exc}") from exc
        parsed.lines += data.count(b"\n")
        _READERS[name](parsed, data, str(path), rank, progress)
    return parsed


def _read_domains(parsed: Parsed, data: bytes, source: str, rank: int, progress: Progress) -> None:
    problems = parsed.problems
    entries = parse_source(
        data, source, MAILBOX_DOMAINS, problems, rank=rank, value_required=False, progress=progress
    )
    for entry in entries:
        if "." in entry.value and not entry.value.startswith(ALIAS_OF_PREFIX):
            problems.append(
                Problem(
                    entry.origin,
                    f"value {entry.value!r} ignored; a file listing several domains per line "
                    "must have one per line",
                    MAILBOX_DOMAINS,
                    warning=True,
                )
            )
    records = _convert(
        entries,
        MAILBOX_DOMAINS,
        problems,
        lambda e: DomainRecord(_domain(e.key), "mailbox", e.origin, e.enabled),
    )
    parsed.mailbox_domains = _dedupe(
        records, MAILBOX_DOMAINS, problems, lambda r: r.name, lambda r: r.kind, lambda r: r.name
    )


def _read_alias_domains(
    parsed: Parsed, data: bytes, source: str, rank: int, progress: Progress
) -> None:
    problems = parsed.problems
    entries = parse_source(
        data, source, ALIAS_DOMAINS, problems, rank=rank, value_required=False, progress=progress
    )

    def make(entry: Entry) -> DomainRecord:
        name = _domain(entry.key)
        alias_of = None
        if entry.value.startswith(ALIAS_OF_PREFIX):
            alias_of = _domain(entry.value[len(ALIAS_OF_PREFIX) :])
            if alias_of == name:
                raise AdminError(f"{name}: a domain cannot mirror itself")
        return DomainRecord(name, "alias", entry.origin, entry.enabled, alias_of)

    records = _convert(entries, ALIAS_DOMAINS, problems, make)
    parsed.alias_domains = _dedupe(
        records,
        ALIAS_DOMAINS,
        problems,
        lambda r: r.name,
        lambda r: r.alias_of,
        lambda r: r.name,
    )


def _read_vmailbox(parsed: Parsed, data: bytes, source: str, rank: int, progress: Progress) -> None:
    problems = parsed.problems
    entries = parse_source(data, source, MAILBOXES, problems, rank=rank, progress=progress)

    def make(entry: Entry) -> MailboxRecord:
        address = _address(entry.key)
        try:
            return MailboxRecord(address, _path(entry.value), entry.origin, entry.enabled)
        except AdminError:
            parsed.failed_mailboxes[(address.domain, address.local_part)] = entry.origin
            raise

    records = _convert(entries, MAILBOXES, problems, make)
    parsed.mailboxes = _dedupe(
        records,
        MAILBOXES,
        problems,
        lambda r: (r.address.domain, r.address.local_part),
        lambda r: r.path,
        lambda r: str(r.address),
    )


def _read_virtual(parsed: Parsed, data: bytes, source: str, rank: int, progress: Progress) -> None:
    problems = parsed.problems
    entries = parse_source(data, source, ALIASES, problems, rank=rank, progress=progress)
    alias_entries: list[Entry] = []
    domain_entries: list[Entry] = []
    for entry in entries:
        # A key without '@' that looks like a domain is the old way of declaring a virtual
        # alias domain (virtual_alias_domains = $virtual_alias_maps, the default).
        if "@" not in entry.key and "." in entry.key:
            domain_entries.append(entry)
        else:
            alias_entries.append(entry)
    domains = _convert(
        domain_entries,
        ALIAS_DOMAINS,
        problems,
        lambda e: DomainRecord(_domain(e.key), "alias", e.origin, e.enabled, declared=False),
    )
    parsed.virtual_domains = _dedupe(
        domains, ALIAS_DOMAINS, problems, lambda r: r.name, lambda r: r.kind, lambda r: r.name
    )
    aliases = _convert(
        alias_entries,
        ALIASES,
        problems,
        lambda e: AliasRecord(_address(e.key), _targets(e.value), e.origin, e.enabled),
    )
    parsed.aliases = _dedupe(
        aliases,
        ALIASES,
        problems,
        lambda r: (r.address.domain, r.address.local_part),
        lambda r: frozenset(r.targets),
        lambda r: str(r.address),
    )


def _id_reader(category: str, name: str) -> Callable[[Parsed, bytes, str, int, Progress], None]:
    def read(parsed: Parsed, data: bytes, source: str, rank: int, progress: Progress) -> None:
        problems = parsed.problems
        # No markers: uid/gid lines have no enabled flag (a disabled mailbox keeps its uid).
        entries = parse_source(
            data, source, category, problems, rank=rank, markers=False, progress=progress
        )
        records = _convert(
            entries,
            category,
            problems,
            lambda e: IdRecord(_address(e.key), _id(e.value, name), e.origin),
        )
        setattr(
            parsed,
            category,
            _dedupe(
                records,
                category,
                problems,
                lambda r: (r.address.domain, r.address.local_part),
                lambda r: r.value,
                lambda r: str(r.address),
            ),
        )

    return read


_READERS: dict[str, Callable[[Parsed, bytes, str, int, Progress], None]] = {
    "domains": _read_domains,
    "alias_domains": _read_alias_domains,
    "vmailbox": _read_vmailbox,
    "virtual": _read_virtual,
    "uids": _id_reader(UIDS, "uid"),
    "gids": _id_reader(GIDS, "gid"),
}


# -- what the database holds already -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DbDomain:
    kind: str
    alias_of: str | None
    default_uid: int | None
    default_gid: int | None
    enabled: bool


@dataclass(frozen=True, slots=True)
class DbMailbox:
    path: str
    uid: int | None
    gid: int | None
    enabled: bool


@dataclass(frozen=True, slots=True)
class DbAlias:
    targets: tuple[str, ...]
    enabled: bool


@dataclass
class DbState:
    """The rows the import touches, as they are before it."""

    domains: dict[str, DbDomain] = field(default_factory=dict)
    mailboxes: dict[tuple[str, str], DbMailbox] = field(default_factory=dict)
    aliases: dict[tuple[str, str], DbAlias] = field(default_factory=dict)


async def fetch_state(conn: asyncpg.Connection, parsed: Parsed) -> DbState:
    """One query per table, keys passed as arrays: no round trip per record."""
    names: set[str] = set()
    for group in (parsed.mailbox_domains, parsed.alias_domains, parsed.virtual_domains):
        names.update(group)
        names.update(r.alias_of for r in group.values() if r.alias_of)
    # '@d' keys of the uid/gid files are domain defaults, not the catch-all mailbox.
    mailbox_keys = set(parsed.mailboxes) | {k for k in (*parsed.uids, *parsed.gids) if k[1] != ""}
    alias_keys = set(parsed.aliases)
    names.update(d for d, _ in (*mailbox_keys, *alias_keys, *parsed.uids, *parsed.gids))
    state = DbState()
    for row in await conn.fetch(
        "SELECT name, kind, alias_of, default_uid, default_gid, enabled"
        " FROM maplookup.domains WHERE name = ANY($1::text[])",
        sorted(names),
    ):
        state.domains[row["name"]] = DbDomain(
            row["kind"], row["alias_of"], row["default_uid"], row["default_gid"], row["enabled"]
        )
    keys = sorted(mailbox_keys)
    for row in await conn.fetch(
        "SELECT m.domain, m.local_part, m.path, m.uid, m.gid, m.enabled"
        " FROM maplookup.mailboxes m"
        " JOIN unnest($1::text[], $2::text[]) AS k(domain, local_part)"
        " ON m.domain = k.domain AND m.local_part = k.local_part",
        [d for d, _ in keys],
        [lp for _, lp in keys],
    ):
        state.mailboxes[(row["domain"], row["local_part"])] = DbMailbox(
            row["path"], row["uid"], row["gid"], row["enabled"]
        )
    keys = sorted(alias_keys)
    for row in await conn.fetch(
        "SELECT a.domain, a.local_part, a.targets, a.enabled"
        " FROM maplookup.aliases a"
        " JOIN unnest($1::text[], $2::text[]) AS k(domain, local_part)"
        " ON a.domain = k.domain AND a.local_part = k.local_part",
        [d for d, _ in keys],
        [lp for _, lp in keys],
    ):
        state.aliases[(row["domain"], row["local_part"])] = DbAlias(
            tuple(row["targets"]), row["enabled"]
        )
    return state


# -- deciding what to write --------------------------------------------------------------------


@dataclass
class Counts:
    added: int = 0
    unchanged: int = 0
    replaced: int = 0
    skipped: int = 0


@dataclass
class NewDomain:
    kind: str
    alias_of: str | None
    enabled: bool
    default_uid: int | None = None
    default_gid: int | None = None


@dataclass
class NewMailbox:
    path: str
    enabled: bool
    uid: int | None = None
    gid: int | None = None


@dataclass
class Plan:
    """The writes, plus what the summary reports.  Built without touching the database."""

    domains: dict[str, NewDomain] = field(default_factory=dict)
    mailboxes: dict[tuple[str, str], NewMailbox] = field(default_factory=dict)
    aliases: dict[tuple[str, str], AliasRecord] = field(default_factory=dict)
    domain_enabled: list[tuple[str, bool]] = field(default_factory=list)
    domain_ids: dict[str, list[tuple[str, int]]] = field(
        default_factory=lambda: {UIDS: [], GIDS: []}
    )
    mailbox_updates: list[tuple[str, str, str, bool]] = field(default_factory=list)
    mailbox_ids: dict[str, list[tuple[str, str, int]]] = field(
        default_factory=lambda: {UIDS: [], GIDS: []}
    )
    alias_updates: list[tuple[str, str, str, bool]] = field(default_factory=list)
    counts: dict[str, Counts] = field(default_factory=lambda: {c: Counts() for c in CATEGORIES})
    implied_mailbox_domains: list[str] = field(default_factory=list)
    implied_alias_domains: list[str] = field(default_factory=list)
    domain_forwards: list[tuple[str, str]] = field(default_factory=list)
    mailbox_catchall_aliases: list[str] = field(default_factory=list)
    mirror_lines: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if not p.warning]

    def rows(self) -> int:
        return (
            len(self.domains)
            + len(self.mailboxes)
            + len(self.aliases)
            + len(self.domain_enabled)
            + sum(len(v) for v in self.domain_ids.values())
            + len(self.mailbox_updates)
            + sum(len(v) for v in self.mailbox_ids.values())
            + len(self.alias_updates)
        )


def _state_word(enabled: bool) -> str:
    return "enabled" if enabled else "disabled"


class _Planner:
    """Compares the parsed files with the database, record by record, in a fixed order:
    declared domains, mailboxes (which imply mailbox domains), mirror targets, bare-domain
    declarations, aliases (which imply alias domains), then uids and gids."""

    def __init__(self, parsed: Parsed, db: DbState, replace: bool) -> None:
        self.parsed = parsed
        self.db = db
        self.replace = replace
        self.plan = Plan(problems=list(parsed.problems))
        self.failed_mailboxes = dict(parsed.failed_mailboxes)

    def error(self, origin: Origin, message: str, category: str) -> None:
        self.plan.problems.append(Problem(origin, message, category))

    def warn(self, origin: Origin, message: str, category: str) -> None:
        self.plan.problems.append(Problem(origin, message, category, warning=True))

    def kind(self, name: str) -> str | None:
        new = self.plan.domains.get(name)
        if new is not None:
            return new.kind
        old = self.db.domains.get(name)
        return old.kind if old is not None else None

    def alias_of(self, name: str) -> str | None:
        new = self.plan.domains.get(name)
        if new is not None:
            return new.alias_of
        old = self.db.domains.get(name)
        return old.alias_of if old is not None else None

    def differs(self, origin: Origin, what: str, old: str, new: str, category: str) -> bool:
        """An existing record with another value: replace it (True) or report it (False)."""
        if self.replace:
            self.plan.counts[category].replaced += 1
            return True
        self.error(
            origin,
            f"{what} exists with {old}; this line says {new} (nothing is overwritten without "
            "--replace)",
            category,
        )
        return False

    def run(self) -> Plan:
        self.declared_domains()
        self.mailboxes()
        self.mirror_targets()
        self.virtual_domains()
        self.aliases()
        self.ids(UIDS, self.parsed.uids, "uid")
        self.ids(GIDS, self.parsed.gids, "gid")
        plan = self.plan
        for problem in plan.problems:
            if not problem.warning:
                plan.counts[problem.category].skipped += 1
        plan.problems.sort(key=lambda p: (p.origin.rank, p.origin.line))
        return plan

    def declared_domains(self) -> None:
        for record in self.parsed.mailbox_domains.values():
            self.declared_domain(record, MAILBOX_DOMAINS)
        for record in self.parsed.alias_domains.values():
            other = self.parsed.mailbox_domains.get(record.name)
            if other is not None:
                self.error(
                    record.origin,
                    f"{record.name} is also listed as a mailbox domain ({other.origin}); a "
                    "domain is either a mailbox domain or an alias domain",
                    ALIAS_DOMAINS,
                )
                continue
            self.declared_domain(record, ALIAS_DOMAINS)

    def declared_domain(self, record: DomainRecord, category: str) -> None:
        existing = self.db.domains.get(record.name)
        if existing is None:
            self.plan.domains[record.name] = NewDomain(record.kind, record.alias_of, record.enabled)
            self.plan.counts[category].added += 1
            return
        if existing.kind != record.kind:
            self.error(
                record.origin,
                f"{record.name} exists as {existing.kind} domain; this file declares it as "
                f"{record.kind} domain (change it with `maplookup domain`)",
                category,
            )
            return
        if record.alias_of is not None and existing.alias_of != record.alias_of:
            old = (
                f"alias-of={existing.alias_of}" if existing.alias_of else "no alias-of (forwarding)"
            )
            self.error(
                record.origin,
                f"domain {record.name} exists with {old}; this line says "
                f"alias-of={record.alias_of} (change it with `maplookup domain`)",
                category,
            )
            return
        if existing.enabled == record.enabled:
            self.plan.counts[category].unchanged += 1
        elif self.differs(
            record.origin,
            f"domain {record.name}",
            _state_word(existing.enabled),
            _state_word(record.enabled),
            category,
        ):
            self.plan.domain_enabled.append((record.name, record.enabled))

    def mailboxes(self) -> None:
        for key, record in self.parsed.mailboxes.items():
            domain = record.address.domain
            kind = self.kind(domain)
            if kind == "alias":
                self.error(
                    record.origin,
                    f"{domain} is an alias domain; mailboxes need a mailbox domain",
                    MAILBOXES,
                )
                self.failed_mailboxes[key] = record.origin
                continue
            if kind is None:
                self.plan.domains[domain] = NewDomain("mailbox", None, True)
                self.plan.counts[MAILBOX_DOMAINS].added += 1
                self.plan.implied_mailbox_domains.append(domain)
            existing = self.db.mailboxes.get(key)
            if existing is None:
                self.plan.mailboxes[key] = NewMailbox(record.path, record.enabled)
                self.plan.counts[MAILBOXES].added += 1
            elif existing.path == record.path and existing.enabled == record.enabled:
                self.plan.counts[MAILBOXES].unchanged += 1
            elif self.differs(
                record.origin,
                f"mailbox {record.address}",
                f"{existing.path!r} ({_state_word(existing.enabled)})",
                f"{record.path!r} ({_state_word(record.enabled)})",
                MAILBOXES,
            ):
                self.plan.mailbox_updates.append((*key, record.path, record.enabled))
            else:
                self.failed_mailboxes[key] = record.origin

    def mirror_targets(self) -> None:
        for record in self.parsed.alias_domains.values():
            new = self.plan.domains.get(record.name)
            if record.alias_of is None or new is None:
                continue
            if self.kind(record.alias_of) != "mailbox":
                del self.plan.domains[record.name]
                self.plan.counts[ALIAS_DOMAINS].added -= 1
                self.error(
                    record.origin,
                    f"alias-of={record.alias_of}: not a mailbox domain (in the files or the "
                    "database); a mirror needs one",
                    ALIAS_DOMAINS,
                )

    def virtual_domains(self) -> None:
        for record in self.parsed.virtual_domains.values():
            kind = self.kind(record.name)
            if kind == "mailbox":
                self.warn(
                    record.origin,
                    f"{record.name} is a mailbox domain; its alias-domain declaration is ignored",
                    ALIAS_DOMAINS,
                )
            elif kind is None:
                self.plan.domains[record.name] = NewDomain("alias", None, record.enabled)
                self.plan.counts[ALIAS_DOMAINS].added += 1
            elif record.name in self.db.domains and record.name not in self.parsed.alias_domains:
                self.plan.counts[ALIAS_DOMAINS].unchanged += 1

    def aliases(self) -> None:
        for key, record in self.parsed.aliases.items():
            domain = record.address.domain
            kind = self.kind(domain)
            if kind is None:
                self.plan.domains[domain] = NewDomain("alias", None, True)
                self.plan.counts[ALIAS_DOMAINS].added += 1
                self.plan.implied_alias_domains.append(domain)
                kind = "alias"
            mirror_of = self.alias_of(domain)
            if record.address.is_catchall and mirror_of is not None:
                if record.targets == [f"@{mirror_of}"]:
                    self.plan.mirror_lines += 1  # the hash-table equivalent of the mirror
                else:
                    self.error(
                        record.origin,
                        f"{domain} mirrors {mirror_of} (alias-of); a catch-all alias there "
                        "would never be used",
                        ALIASES,
                    )
                continue
            existing = self.db.aliases.get(key)
            if existing is None:
                self.plan.aliases[key] = record
                self.plan.counts[ALIASES].added += 1
            elif set(existing.targets) == set(record.targets) and (
                existing.enabled == record.enabled
            ):
                self.plan.counts[ALIASES].unchanged += 1
                continue
            elif self.differs(
                record.origin,
                f"alias {record.address}",
                f"{','.join(existing.targets)} ({_state_word(existing.enabled)})",
                f"{','.join(record.targets)} ({_state_word(record.enabled)})",
                ALIASES,
            ):
                self.plan.alias_updates.append((*key, ",".join(record.targets), record.enabled))
            else:
                continue
            if record.address.is_catchall:
                if len(record.targets) == 1 and record.targets[0].startswith("@"):
                    self.plan.domain_forwards.append((domain, record.targets[0][1:]))
                elif kind == "mailbox":
                    self.plan.mailbox_catchall_aliases.append(domain)

    def ids(self, category: str, records: dict[tuple[str, str], IdRecord], name: str) -> None:
        column = "uid" if category == UIDS else "gid"
        for key, record in records.items():
            domain = record.address.domain
            if record.address.is_catchall:
                self.domain_id(category, column, record, name)
                continue
            new = self.plan.mailboxes.get(key)
            if new is not None:
                setattr(new, column, record.value)
                self.plan.counts[category].added += 1
                continue
            existing = self.db.mailboxes.get(key)
            if existing is None:
                failed = self.failed_mailboxes.get(key)
                self.error(
                    record.origin,
                    f"mailbox {record.address} was not imported (see {failed})"
                    if failed
                    else f"no mailbox {record.address} (in the vmailbox file or the database) "
                    f"for this {name}",
                    category,
                )
                continue
            old: int | None = getattr(existing, column)
            if old == record.value:
                self.plan.counts[category].unchanged += 1
            elif old is None:
                self.plan.counts[category].added += 1
                self.plan.mailbox_ids[category].append((domain, key[1], record.value))
            elif self.differs(
                record.origin, f"{name} of {record.address}", str(old), str(record.value), category
            ):
                self.plan.mailbox_ids[category].append((domain, key[1], record.value))

    def domain_id(self, category: str, column: str, record: IdRecord, name: str) -> None:
        """``@domain N``: the domain default (what virtual(8)'s @domain fallback key means)."""
        domain = record.address.domain
        if self.kind(domain) != "mailbox":
            self.error(
                record.origin,
                f"{domain} is not a mailbox domain (in the files or the database); a default "
                f"{name} needs one",
                category,
            )
            return
        new = self.plan.domains.get(domain)
        if new is not None:
            setattr(new, f"default_{column}", record.value)
            self.plan.counts[category].added += 1
            return
        old: int | None = getattr(self.db.domains[domain], f"default_{column}")
        if old == record.value:
            self.plan.counts[category].unchanged += 1
        elif old is None:
            self.plan.counts[category].added += 1
            self.plan.domain_ids[category].append((domain, record.value))
        elif self.differs(
            record.origin, f"default {name} of {domain}", str(old), str(record.value), category
        ):
            self.plan.domain_ids[category].append((domain, record.value))


def plan_import(parsed: Parsed, db: DbState, *, replace: bool = False) -> Plan:
    return _Planner(parsed, db, replace).run()


# -- writing -----------------------------------------------------------------------------------


async def _bulk(conn: asyncpg.Connection, query: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """One statement for many rows: each column travels as one array parameter (unnest)."""
    if rows:
        await conn.execute(query, *[list(column) for column in zip(*rows, strict=True)])


async def write_plan(conn: asyncpg.Connection, plan: Plan) -> None:
    """COPY the new rows and apply the updates as one statement per kind of change."""
    domain_columns = ["name", "kind", "alias_of", "default_uid", "default_gid", "enabled"]
    for kind in ("mailbox", "alias"):  # mirrors reference mailbox domains
        rows = [
            (name, d.kind, d.alias_of, d.default_uid, d.default_gid, d.enabled)
            for name, d in sorted(plan.domains.items())
            if d.kind == kind
        ]
        if rows:
            await conn.copy_records_to_table(
                "domains", schema_name="maplookup", columns=domain_columns, records=rows
            )
    await _bulk(
        conn,
        "UPDATE maplookup.domains d SET enabled = u.enabled"
        " FROM unnest($1::text[], $2::boolean[]) AS u(name, enabled) WHERE d.name = u.name",
        plan.domain_enabled,
    )
    for category, column in ((UIDS, "default_uid"), (GIDS, "default_gid")):
        await _bulk(
            conn,
            f"UPDATE maplookup.domains d SET {column} = u.value"
            " FROM unnest($1::text[], $2::integer[]) AS u(name, value) WHERE d.name = u.name",
            plan.domain_ids[category],
        )
    if plan.mailboxes:
        await conn.copy_records_to_table(
            "mailboxes",
            schema_name="maplookup",
            columns=["domain", "local_part", "path", "uid", "gid", "enabled"],
            records=[(*key, m.path, m.uid, m.gid, m.enabled) for key, m in plan.mailboxes.items()],
        )
    await _bulk(
        conn,
        "UPDATE maplookup.mailboxes m SET path = u.path, enabled = u.enabled"
        " FROM unnest($1::text[], $2::text[], $3::text[], $4::boolean[])"
        " AS u(domain, local_part, path, enabled)"
        " WHERE m.domain = u.domain AND m.local_part = u.local_part",
        plan.mailbox_updates,
    )
    for category, column in ((UIDS, "uid"), (GIDS, "gid")):
        await _bulk(
            conn,
            f"UPDATE maplookup.mailboxes m SET {column} = u.value"
            " FROM unnest($1::text[], $2::text[], $3::integer[]) AS u(domain, local_part, value)"
            " WHERE m.domain = u.domain AND m.local_part = u.local_part",
            plan.mailbox_ids[category],
        )
    if plan.aliases:
        await conn.copy_records_to_table(
            "aliases",
            schema_name="maplookup",
            columns=["domain", "local_part", "targets", "enabled"],
            records=[(*key, a.targets, a.enabled) for key, a in plan.aliases.items()],
        )
    # Targets cannot hold ',' (schema.sql, alias_targets_syntax): a joined string is safe.
    await _bulk(
        conn,
        "UPDATE maplookup.aliases a"
        " SET targets = string_to_array(u.targets, ','), enabled = u.enabled"
        " FROM unnest($1::text[], $2::text[], $3::text[], $4::boolean[])"
        " AS u(domain, local_part, targets, enabled)"
        " WHERE a.domain = u.domain AND a.local_part = u.local_part",
        plan.alias_updates,
    )


@dataclass(frozen=True, slots=True)
class ImportOptions:
    dry_run: bool = False
    skip_errors: bool = False
    replace: bool = False


async def import_parsed(
    conn: asyncpg.Connection,
    parsed: Parsed,
    options: ImportOptions,
    progress: Progress = _SILENT,
) -> tuple[Plan, bool]:
    """Check ``parsed`` against the database and write it in one transaction.

    Returns the plan and whether it was committed: not on --dry-run, not when there are errors
    and no --skip-errors.  The tables are locked against other writers (readers, i.e. the
    server, go on) so that what was checked is what gets written.
    """
    large = parsed.lines > PROGRESS_MIN_LINES
    result: list[Plan] = []
    try:
        async with conn.transaction():
            await conn.execute(
                "LOCK TABLE maplookup.domains, maplookup.mailboxes, maplookup.aliases"
                " IN SHARE ROW EXCLUSIVE MODE"
            )
            if large:
                progress.show("checking against the database...")
            plan = plan_import(parsed, await fetch_state(conn, parsed), replace=options.replace)
            result.append(plan)
            if plan.errors and not options.skip_errors:
                raise _Rollback
            if large:
                progress.show(f"writing {plan.rows():,} rows...")
            try:
                await write_plan(conn, plan)
            except asyncpg.IntegrityConstraintViolationError as exc:
                # The checks above should make this unreachable; say what the database said.
                raise AdminError(f"the database refused the import: {exc}") from exc
            if options.dry_run:
                raise _Rollback
    except _Rollback:
        return result[0], False
    finally:
        progress.clear()
    return result[0], True


class _Rollback(Exception):
    """Leave the import transaction without committing (dry run, or errors)."""


def summary_lines(plan: Plan, options: ImportOptions, committed: bool) -> list[str]:
    """The report on stdout: what was (or would be) added, left alone, replaced, skipped."""
    if options.dry_run:
        head = "dry run, nothing written; the import would do:"
    elif committed:
        head = "imported:"
    else:
        head = "nothing imported; the import would have done:"
    lines = [head]
    width = max(len(c) for c in CATEGORIES) + 1
    for category in CATEGORIES:
        counts = plan.counts[category]
        parts = [f"{counts.added} added", f"{counts.unchanged} unchanged"]
        if options.replace:
            parts.append(f"{counts.replaced} replaced")
        parts.append(f"{counts.skipped} skipped")
        lines.append(f"  {(category + ':').ljust(width)} {', '.join(parts)}")
    if plan.implied_mailbox_domains:
        lines.append(
            "mailbox domains created because the vmailbox file uses them (not in the domains "
            f"file): {_names(plan.implied_mailbox_domains)}"
        )
    if plan.implied_alias_domains:
        lines.append(
            "alias domains created because the virtual file has aliases in them (neither listed "
            f"nor implied): {_names(plan.implied_alias_domains)}"
        )
    if plan.mirror_lines:
        lines.append(
            f"{plan.mirror_lines} '@mirror @target' line(s) matched mirror domains (alias-of) "
            "and were taken as their hash-table equivalent"
        )
    for domain, target in plan.domain_forwards:
        lines.append(
            f"note: @{domain} -> @{target} is imported as a catch-all alias, as a hash table "
            "has it (every address is accepted, unknown ones bounce later); the stricter form "
            f"is `maplookup domain add {domain} --alias-of {target}` (after removing that alias "
            f"and domain), which accepts only addresses that exist in {target}"
        )
    if plan.mailbox_catchall_aliases:
        lines.append(
            "note: catch-all aliases in mailbox domains "
            f"({_names(plan.mailbox_catchall_aliases)}) never apply to addresses that are "
            "mailboxes (a hash table would apply them; list user@domain user@domain to get the "
            "same there)"
        )
    return lines


def _names(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


# -- export ------------------------------------------------------------------------------------


_HEADERS = {
    "domains": (
        "virtual_mailbox_domains: the mailbox domains, one `domain OK` per line.",
        "Postfix: virtual_mailbox_domains = lmdb:/etc/postfix/domains (after `postmap lmdb:...`).",
        "maplookup: `maplookup import --domains FILE`.",
    ),
    "alias_domains": (
        "virtual_alias_domains: the alias domains (forwarding-only and mirrors).",
        "Postfix ignores the value.  `alias-of=DOMAIN` marks a mirror of DOMAIN for maplookup;",
        "the virtual file holds its hash-table equivalent, the catch-all `@mirror @DOMAIN`.",
        "Postfix: virtual_alias_domains = lmdb:/etc/postfix/alias_domains.",
        "maplookup: `maplookup import --alias-domains FILE`.",
    ),
    "vmailbox": (
        "virtual_mailbox_maps: mailbox -> path below virtual_mailbox_base (trailing / = Maildir).",
        "`@domain path` is a catch-all mailbox.",
        "Postfix: virtual_mailbox_maps = lmdb:/etc/postfix/vmailbox.",
        "maplookup: `maplookup import --vmailbox FILE`.",
    ),
    "virtual": (
        "virtual_alias_maps: address -> targets (comma-separated).  `@domain` is a catch-all;",
        "a first target `@other` keeps the local part.",
        "`@mirror @target` lines are the hash-table equivalent of mirror domains: a hash table",
        "forwards every address, maplookup only addresses that exist in the target domain.",
        "maplookup applies a catch-all alias only to addresses that are not mailboxes; a hash",
        "table applies it to all addresses that have no alias of their own.",
        "Postfix: virtual_alias_maps = lmdb:/etc/postfix/virtual.",
        "maplookup: `maplookup import --virtual FILE`.",
    ),
    "uids": (
        "virtual_uid_maps: mailbox -> uid; `@domain uid` is the domain's default.",
        "Only explicit values: mailboxes without one use the domain's default, and a mailbox",
        "whose domain has no default uses the server's configured default (not written here).",
        "Postfix: virtual_uid_maps = lmdb:/etc/postfix/uids.",
        "maplookup: `maplookup import --uids FILE`.",
    ),
    "gids": (
        "virtual_gid_maps: mailbox -> gid; `@domain gid` is the domain's default.",
        "Only explicit values, as in the uids file.",
        "Postfix: virtual_gid_maps = lmdb:/etc/postfix/gids.",
        "maplookup: `maplookup import --gids FILE`.",
    ),
}


class _MapWriter:
    """One export file, written to a temporary file in the same directory, renamed at the end."""

    def __init__(self, directory: Path, name: str, database: str) -> None:
        self.path = directory / name
        fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        self.temp = Path(temp)
        self.file = os.fdopen(fd, "w", encoding="utf-8", newline="\n")
        self.entries = 0
        self.disabled = 0
        for line in _HEADERS[name]:
            self.comment(line)
        self.comment(f"Generated by `maplookup export` from database {database!r}.")
        self.comment("Format: postmap(1) source, `key<TAB>value`.  `# disabled: KEY VALUE` lines")
        self.comment("are disabled records: comments to Postfix, restored disabled by import.")
        self.file.write("\n")

    def comment(self, text: str) -> None:
        self.file.write(f"# {text}\n")

    def entry(self, key: str, value: str, enabled: bool = True) -> None:
        if enabled:
            self.file.write(f"{key}\t{value}\n")
            self.entries += 1
        else:
            self.file.write(f"{DISABLED_MARKER}{key}\t{value}\n")
            self.disabled += 1

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.temp.chmod(0o644)  # map sources are not secret; postmap keeps the source's mode
        os.replace(self.temp, self.path)

    def discard(self) -> None:
        self.file.close()
        self.temp.unlink(missing_ok=True)


@dataclass
class ExportResult:
    written: list[tuple[Path, int, int]] = field(default_factory=list)  # path, active, disabled
    warnings: list[str] = field(default_factory=list)


def _unrepresentable(key: str, value: str) -> str | None:
    """Why ``key value`` cannot be a source line that reads back the same, or None."""
    if key.startswith("#"):
        return "the key starts with '#' (it would be a comment)"
    if '"' in key or "\\" in key:
        return "the key holds '\"' or '\\' (postmap would treat it as quoting)"
    if value != value.strip(_SPACE):
        return "the value starts or ends with white space (postmap trims it)"
    return None


def prepare_export_directory(directory: Path, *, force: bool) -> None:
    """Create ``directory``; refuse (before any database work) to overwrite without ``force``."""
    existing = [name for name in EXPORT_FILES if (directory / name).exists()]
    if existing and not force:
        raise AdminError(
            f"{directory} already holds {', '.join(existing)}; use --force to overwrite"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AdminError(f"cannot create {directory}: {exc.strerror or exc}") from exc


async def export_maps(conn: asyncpg.Connection, directory: Path) -> ExportResult:
    """Write the six source files into ``directory`` (see prepare_export_directory) from one
    consistent snapshot; each file appears complete or not at all."""
    result = ExportResult()
    writers: dict[str, _MapWriter] = {}
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            database = str(await conn.fetchval("SELECT current_database()"))
            for name in EXPORT_FILES:
                writers[name] = _MapWriter(directory, name, database)
            await _export_domains(conn, writers, result)
            await _export_mailboxes(conn, writers["vmailbox"], result)
            await _export_ids(conn, writers, result)
            await _export_aliases(conn, writers["virtual"], result)
        for writer in writers.values():
            writer.commit()
            result.written.append((writer.path, writer.entries, writer.disabled))
    except OSError as exc:
        raise AdminError(f"cannot write in {directory}: {exc.strerror or exc}") from exc
    finally:
        for writer in writers.values():
            if writer.temp.exists():
                writer.discard()
    return result


def _checked(
    writer: _MapWriter, result: ExportResult, what: str, key: str, value: str, enabled: bool
) -> None:
    reason = _unrepresentable(key, value)
    if reason is None:
        writer.entry(key, value, enabled)
        return
    writer.comment(f"not exportable ({reason}): {key!r} -> {value!r}")
    result.warnings.append(f"{writer.path.name}: {what} {key!r} not exported: {reason}")


async def _export_domains(
    conn: asyncpg.Connection, writers: dict[str, _MapWriter], result: ExportResult
) -> None:
    rows = await conn.fetch(
        "SELECT name, kind, alias_of, enabled FROM maplookup.domains ORDER BY name"
    )
    for row in rows:
        if row["kind"] == "mailbox":
            _checked(writers["domains"], result, "domain", row["name"], "OK", row["enabled"])
        else:
            value = f"{ALIAS_OF_PREFIX}{row['alias_of']}" if row["alias_of"] else "OK"
            _checked(writers["alias_domains"], result, "domain", row["name"], value, row["enabled"])


async def _export_mailboxes(
    conn: asyncpg.Connection, writer: _MapWriter, result: ExportResult
) -> None:
    async for row in conn.cursor(
        "SELECT local_part || '@' || domain AS key, path, enabled FROM maplookup.mailboxes"
        " ORDER BY domain, local_part",
        prefetch=10_000,
    ):
        _checked(writer, result, "mailbox", row["key"], row["path"], row["enabled"])


async def _export_ids(
    conn: asyncpg.Connection, writers: dict[str, _MapWriter], result: ExportResult
) -> None:
    """Domain defaults as ``@d N``, mailbox values as ``user@d N``.

    A catch-all mailbox's own id also has the key ``@d`` in a hash table: it is written as
    ``@d`` when the domain has no default (import then makes it the domain default, which is what
    the hash table means), and reported as not exportable when the domain's default differs.
    """
    for category, column in ((UIDS, "uid"), (GIDS, "gid")):
        writer = writers[category]
        pending: tuple[str, int] | None = None  # the domain default of the current domain
        async for row in conn.cursor(
            f"SELECT domain, local_part, value, source FROM ("
            f" SELECT name AS domain, '' AS local_part, default_{column} AS value,"
            f"  0 AS source FROM maplookup.domains WHERE default_{column} IS NOT NULL"
            f" UNION ALL"
            f" SELECT domain, local_part, {column}, 1 FROM maplookup.mailboxes"
            f"  WHERE {column} IS NOT NULL) AS ids"
            f" ORDER BY domain, local_part, source",
            prefetch=10_000,
        ):
            key = f"{row['local_part']}@{row['domain']}"
            value = row["value"]
            if row["source"] == 0:
                pending = (row["domain"], value)
                _checked(writer, result, column, key, str(value), True)
            elif row["local_part"] == "":
                if pending is None or pending[0] != row["domain"]:
                    writer.comment(f"{key}: {column} of the catch-all mailbox")
                    _checked(writer, result, column, key, str(value), True)
                elif pending[1] != value:
                    writer.comment(
                        f"not exportable: the catch-all mailbox {key} has {column} {value}, the "
                        f"domain default is {pending[1]}; a hash table has one {key} key"
                    )
                    result.warnings.append(
                        f"{writer.path.name}: {column} {value} of the catch-all mailbox {key} "
                        f"not exported (the domain default {pending[1]} has the same key)"
                    )
            else:
                _checked(writer, result, column, key, str(value), True)


async def _export_aliases(
    conn: asyncpg.Connection, writer: _MapWriter, result: ExportResult
) -> None:
    """Aliases, and ``@mirror @target`` for each mirror domain (source 0, sorted first)."""
    mirror: str | None = None
    async for row in conn.cursor(
        "SELECT domain, local_part, targets, enabled, source FROM ("
        " SELECT name AS domain, '' AS local_part, ARRAY['@' || alias_of] AS targets, enabled,"
        "  0 AS source FROM maplookup.domains WHERE alias_of IS NOT NULL"
        " UNION ALL"
        " SELECT domain, local_part, targets, enabled, 1 FROM maplookup.aliases) AS a"
        " ORDER BY domain, local_part, source",
        prefetch=10_000,
    ):
        key = f"{row['local_part']}@{row['domain']}"
        targets: list[str] = list(row["targets"])
        if row["source"] == 0:
            mirror = row["domain"]
        elif row["local_part"] == "" and mirror == row["domain"]:
            writer.comment(
                f"not exported: catch-all alias {key} -> {','.join(targets)} is never used, "
                f"{row['domain']} is a mirror domain"
            )
            result.warnings.append(
                f"virtual: catch-all alias {key} not exported (never used in a mirror domain)"
            )
            continue
        firsts = [t for t in targets if t.startswith("@")]
        if firsts and not targets[0].startswith("@"):
            # Only a first '@domain' target keeps the local part (src/global/mail_addr_map.c).
            targets.remove(firsts[0])
            targets.insert(0, firsts[0])
        if len(firsts) > 1:
            writer.comment(
                f"not exportable: {key} has several '@domain' targets; a hash table keeps the "
                f"local part for the first only: {','.join(targets)}"
            )
            result.warnings.append(f"virtual: alias {key} not exported (several '@domain' targets)")
            continue
        _checked(writer, result, "alias", key, ", ".join(targets), row["enabled"])


def export_summary(result: ExportResult) -> list[str]:
    lines = []
    for path, active, disabled in result.written:
        extra = f", {disabled} disabled (commented out)" if disabled else ""
        lines.append(f"wrote {path}: {active} entries{extra}")
    return lines


def print_problems(problems: Iterable[Problem], stream: TextIO | None = None) -> None:
    for problem in problems:
        print(problem, file=stream or sys.stderr)
