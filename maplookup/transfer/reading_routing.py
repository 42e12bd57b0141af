"""Reading the source files of the maps beyond delivery into records (see routing_records.py).

``smtpd_sender_login_maps`` gives sender grants (and, through export's notes, mailbox logins),
``relay_domains`` relay domains, ``relay_recipient_maps`` relay recipients, ``transport``
transport entries.  Lines export derived from other records (``derived`` blocks) are skipped;
a hand-written file has none, and each of its lines is a record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from maplookup.db.admin_input import Address, AdminError, TransportKey

from .checking import convert, dedupe, without_derived
from .problems import Origin, Problem, Progress
from .records import DERIVED_BEGIN, DERIVED_END, _address
from .routing_records import (
    MAILBOX_LOGINS,
    RELAY_DOMAINS,
    RELAY_RECIPIENTS,
    SENDER_GRANTS,
    TRANSPORTS,
    GrantRecord,
    LoginRecord,
    RelayDomainRecord,
    RelayRecipientRecord,
    SenderNote,
    TransportRecord,
    owners,
    parse_sender_note,
    relay_domain,
    sender_key,
    transport_key,
    transport_value,
)
from .source import Entry, parse_source

_Key = tuple[str, str]


@dataclass
class RoutingParsed:
    """What the four files say, checked line by line, duplicates resolved."""

    grants: dict[_Key, GrantRecord] = field(default_factory=dict)
    logins: dict[_Key, LoginRecord] = field(default_factory=dict)
    relay_domains: dict[str, RelayDomainRecord] = field(default_factory=dict)
    relay_recipients: dict[_Key, RelayRecipientRecord] = field(default_factory=dict)
    transports: dict[TransportKey, TransportRecord] = field(default_factory=dict)


def _address_key(address: Address) -> _Key:
    return (address.domain, address.local_part)


def _is_derived_note(text: str) -> bool:
    return text.startswith((DERIVED_BEGIN, DERIVED_END))


def read_sender_login(
    routing: RoutingParsed,
    problems: list[Problem],
    data: bytes,
    source: str,
    rank: int,
    progress: Progress,
) -> None:
    """Grants: a line's owners, or those its ``grants of KEY:`` note names (export writes one
    where the line also lists owners maplookup derives); ``login of`` notes: mailbox logins."""
    notes: list[tuple[Origin, str]] = []
    # Markers: `# disabled:` lines are the grants of a disabled domain (off with it; the
    # domain's own line says it is disabled), restored as grants.
    entries = parse_source(
        data, source, SENDER_GRANTS, problems, rank=rank, markers=True, progress=progress,
        notes=notes,
    )  # fmt: skip
    entries = without_derived(entries, notes)
    grant_notes: dict[str, tuple[Origin, SenderNote]] = {}
    login_entries: list[tuple[Origin, SenderNote]] = []
    for origin, text in notes:
        if _is_derived_note(text):
            continue
        note = parse_sender_note(text)
        if note is None:
            problems.append(Problem(origin, f"unknown maplookup note {text!r}", SENDER_GRANTS))
        elif note.kind == "grants":
            grant_notes[note.key] = (origin, note)
        else:
            login_entries.append((origin, note))

    def make(entry: Entry) -> GrantRecord:
        address = sender_key(entry.key)
        listed = owners(entry.value)
        noted = grant_notes.pop(entry.key, None)
        if noted is None:
            return GrantRecord(address, listed, entry.origin, listed=listed)
        grants = tuple(dict.fromkeys(noted[1].logins))
        missing = [g for g in grants if g not in listed]
        if not grants or missing:
            raise AdminError(
                f"the note at {noted[0]} names grants {', '.join(missing) or '(none)'} that "
                "this line does not list"
            )
        return GrantRecord(address, grants, entry.origin, listed=listed)

    records = convert(entries, SENDER_GRANTS, problems, make)
    for origin, note in grant_notes.values():
        problems.append(
            Problem(origin, f"note for {note.key}, which has no line after it", SENDER_GRANTS)
        )
    routing.grants = dedupe(
        records,
        SENDER_GRANTS,
        problems,
        lambda r: _address_key(r.address),
        lambda r: frozenset(r.logins),
        lambda r: str(r.address),
    )
    routing.logins = dedupe(
        _login_records(login_entries, problems),
        MAILBOX_LOGINS,
        problems,
        lambda r: _address_key(r.address),
        lambda r: r.login,
        lambda r: str(r.address),
    )


def _login_records(
    notes: list[tuple[Origin, SenderNote]], problems: list[Problem]
) -> list[LoginRecord]:
    records = []
    for origin, note in notes:
        try:
            address = _address(note.key)
            if address.is_catchall:
                raise AdminError("a catch-all mailbox has no login")
            if note.kind == "no login":
                records.append(LoginRecord(address, None, origin))
            elif len(note.logins) != 1:
                raise AdminError(f"a mailbox has one login, the note names {len(note.logins)}")
            else:
                records.append(LoginRecord(address, owners(note.logins[0])[0], origin))
        except AdminError as exc:
            problems.append(Problem(origin, str(exc), MAILBOX_LOGINS))
    return records


def read_relay_domains(
    routing: RoutingParsed,
    problems: list[Problem],
    data: bytes,
    source: str,
    rank: int,
    progress: Progress,
) -> None:
    """``domain [value]`` lines; a ``.domain`` line (subdomains only) is redundant next to
    ``domain``, which covers its subdomains in maplookup, and refused without it."""
    notes: list[tuple[Origin, str]] = []
    entries = parse_source(
        data, source, RELAY_DOMAINS, problems, rank=rank, value_required=False,
        progress=progress, notes=notes,
    )  # fmt: skip
    entries = without_derived(entries, notes)
    listed = {e.key.lower() for e in entries if not e.key.startswith(".")}
    kept = []
    for entry in entries:
        if not entry.key.startswith("."):
            kept.append(entry)
        elif entry.key[1:].lower() in listed:
            problems.append(
                Problem(
                    entry.origin,
                    f"{entry.key} skipped: {entry.key[1:]} covers its subdomains already",
                    RELAY_DOMAINS,
                    warning=True,
                )
            )
        else:
            problems.append(
                Problem(
                    entry.origin,
                    f"{entry.key}: a relay domain covers its subdomains and itself; list "
                    f"{entry.key[1:]} instead (maplookup has no subdomains-only entry)",
                    RELAY_DOMAINS,
                )
            )
    records = convert(
        kept,
        RELAY_DOMAINS,
        problems,
        lambda e: RelayDomainRecord(relay_domain(e.key), e.origin, e.enabled),
    )
    routing.relay_domains = dedupe(
        records, RELAY_DOMAINS, problems, lambda r: r.name, lambda r: True, lambda r: r.name
    )


def read_relay_recipients(
    routing: RoutingParsed,
    problems: list[Problem],
    data: bytes,
    source: str,
    rank: int,
    progress: Progress,
) -> None:
    """``address value`` or ``@domain value`` lines (any value: Postfix only asks whether the
    key is found, src/smtpd/smtpd_check.c)."""
    notes: list[tuple[Origin, str]] = []
    entries = parse_source(
        data, source, RELAY_RECIPIENTS, problems, rank=rank, progress=progress, notes=notes
    )
    entries = without_derived(entries, notes)
    records = convert(
        entries,
        RELAY_RECIPIENTS,
        problems,
        lambda e: RelayRecipientRecord(_address(e.key), e.origin, e.enabled),
    )
    routing.relay_recipients = dedupe(
        records,
        RELAY_RECIPIENTS,
        problems,
        lambda r: _address_key(r.address),
        lambda r: True,
        lambda r: str(r.address),
    )


def read_transport(
    routing: RoutingParsed,
    problems: list[Problem],
    data: bytes,
    source: str,
    rank: int,
    progress: Progress,
) -> None:
    """transport(5) lines: ``user@domain``, ``domain``, ``.domain`` or ``*``, then the value."""
    entries = parse_source(
        data, source, TRANSPORTS, problems, rank=rank, markers=False, progress=progress
    )
    records = convert(
        entries,
        TRANSPORTS,
        problems,
        lambda e: TransportRecord(transport_key(e.key), transport_value(e.value), e.origin),
    )
    routing.transports = dedupe(
        records, TRANSPORTS, problems, lambda r: r.key, lambda r: r.transport, lambda r: str(r.key)
    )


RoutingReader = Callable[[RoutingParsed, list[Problem], bytes, str, int, Progress], None]

ROUTING_READERS: dict[str, RoutingReader] = {
    "sender_login": read_sender_login,
    "relay_domains": read_relay_domains,
    "relay_recipients": read_relay_recipients,
    "transport": read_transport,
}
