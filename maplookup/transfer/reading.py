"""Reading the source files into checked, de-duplicated records: :func:`read_sources`.

Each file is split into entries by source.py, each entry becomes a record by the rules in
records.py, and repeated keys are resolved here the way Postfix would use them.  The database is
not consulted: :class:`Parsed` is what the files say, plus the problems found on the way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from maplookup.db.admin_input import AdminError

from .checking import convert, dedupe, without_derived
from .problems import _SILENT, Origin, Problem, Progress
from .reading_routing import ROUTING_READERS, RoutingParsed
from .records import (
    ALIAS_DOMAINS,
    ALIAS_OF_PREFIX,
    ALIASES,
    GIDS,
    MAILBOX_DOMAINS,
    MAILBOXES,
    UIDS,
    AliasRecord,
    DomainRecord,
    IdRecord,
    MailboxRecord,
    _address,
    _domain,
    _id,
    _path,
    _targets,
    parse_note,
)
from .source import Entry, parse_source


@dataclass(frozen=True, slots=True)
class Sources:
    """The files to import; any may be None."""

    domains: Path | None = None
    alias_domains: Path | None = None
    vmailbox: Path | None = None
    virtual: Path | None = None
    uids: Path | None = None
    gids: Path | None = None
    sender_login: Path | None = None
    relay_domains: Path | None = None
    relay_recipients: Path | None = None
    transport: Path | None = None

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
            ("sender_login", self.sender_login),
            ("relay_domains", self.relay_domains),
            ("relay_recipients", self.relay_recipients),
            ("transport", self.transport),
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
    # The maps beyond delivery (reading_routing.py).
    routing: RoutingParsed = field(default_factory=RoutingParsed)


def read_sources(sources: Sources, progress: Progress = _SILENT) -> Parsed:
    """Read and check every given file; raises AdminError only if a file cannot be read."""
    parsed = Parsed()
    for rank, (name, path) in enumerate(sources.given()):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise AdminError(f"cannot read {path}: {exc.strerror or exc}") from exc
        parsed.lines += data.count(b"\n")
        if name in ROUTING_READERS:
            ROUTING_READERS[name](parsed.routing, parsed.problems, data, str(path), rank, progress)
        else:
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
    records = convert(
        entries,
        MAILBOX_DOMAINS,
        problems,
        lambda e: DomainRecord(_domain(e.key), "mailbox", e.origin, e.enabled),
    )
    parsed.mailbox_domains = dedupe(
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

    records = convert(entries, ALIAS_DOMAINS, problems, make)
    parsed.alias_domains = dedupe(
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

    records = convert(entries, MAILBOXES, problems, make)
    parsed.mailboxes = dedupe(
        records,
        MAILBOXES,
        problems,
        lambda r: (r.address.domain, r.address.local_part),
        lambda r: r.path,
        lambda r: str(r.address),
    )


def _read_virtual(parsed: Parsed, data: bytes, source: str, rank: int, progress: Progress) -> None:
    problems = parsed.problems
    notes: list[tuple[Origin, str]] = []
    entries = parse_source(
        data, source, ALIASES, problems, rank=rank, progress=progress, notes=notes
    )
    entries = without_derived(entries, notes)
    alias_entries: list[Entry] = []
    domain_entries: list[Entry] = []
    for entry in entries:
        # A key without '@' that looks like a domain is the old way of declaring a virtual
        # alias domain (virtual_alias_domains = $virtual_alias_maps, the default).
        if "@" not in entry.key and "." in entry.key:
            domain_entries.append(entry)
        else:
            alias_entries.append(entry)
    domains = convert(
        domain_entries,
        ALIAS_DOMAINS,
        problems,
        lambda e: DomainRecord(_domain(e.key), "alias", e.origin, e.enabled, declared=False),
    )
    parsed.virtual_domains = dedupe(
        domains, ALIAS_DOMAINS, problems, lambda r: r.name, lambda r: r.kind, lambda r: r.name
    )
    aliases = convert(
        alias_entries,
        ALIASES,
        problems,
        lambda e: AliasRecord(_address(e.key), _targets(e.value), e.origin, e.enabled),
    )
    parsed.aliases = dedupe(
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
        notes: list[tuple[Origin, str]] = []
        entries = parse_source(
            data,
            source,
            category,
            problems,
            rank=rank,
            markers=False,
            progress=progress,
            notes=notes,
        )
        inherited: set[str] = set()
        fallbacks: dict[str, tuple[str, int | None]] = {}
        for origin, text in notes:
            note = parse_note(text)
            if note is None:
                problems.append(Problem(origin, f"unknown maplookup note {text!r}", category))
            elif note[0] == "inherited":
                inherited.add(note[1])
            else:
                fallbacks[note[1]] = (note[2] or "", note[3])
        entries = [e for e in entries if e.key not in inherited]
        records = convert(
            entries,
            category,
            problems,
            lambda e: IdRecord(
                _address(e.key),
                _id(e.value, name),
                e.origin,
                fallback=fallbacks[e.key][0] if e.key in fallbacks else None,
                domain_default=fallbacks[e.key][1] if e.key in fallbacks else None,
            ),
        )
        setattr(
            parsed,
            category,
            dedupe(
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
