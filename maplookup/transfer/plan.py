"""What an import will write (:class:`Plan`), and the rows it is compared with (:class:`DbState`).

Plain data: :class:`DbState` is the part of the database the files name, fetched before planning
(importing.py); :class:`Plan` is the outcome of the rules in planning.py: the new rows, the
updates, the counts for the summary and the problems.  Keeping them apart from the database
code lets a plan be built, reported and tested without one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from maplookup.db.admin_input import TransportKey

from .problems import Problem
from .records import CATEGORIES, GIDS, UIDS, AliasRecord
from .routing_records import ROUTING_CATEGORIES

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
    login: str | None = None


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
    # The maps beyond delivery: grants as (domain, local_part, login), relay recipients as
    # (domain, local_part), transports by key.
    grants: set[tuple[str, str, str]] = field(default_factory=set)
    relay_recipients: set[tuple[str, str]] = field(default_factory=set)
    transports: dict[TransportKey, str] = field(default_factory=dict)


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
    counts: dict[str, Counts] = field(
        default_factory=lambda: {c: Counts() for c in CATEGORIES + ROUTING_CATEGORIES}
    )
    implied_mailbox_domains: list[str] = field(default_factory=list)
    implied_alias_domains: list[str] = field(default_factory=list)
    domain_forwards: list[tuple[str, str]] = field(default_factory=list)
    mailbox_catchall_aliases: list[str] = field(default_factory=list)
    mirror_lines: int = 0
    # sender_login keys answered with more owners than their line listed (importing.py).
    widened_owners: list[str] = field(default_factory=list)
    # The maps beyond delivery (planning_routing.py).
    grants: list[tuple[str, str, str]] = field(default_factory=list)
    relay_recipients: list[tuple[str, str]] = field(default_factory=list)
    transports: dict[TransportKey, str] = field(default_factory=dict)  # new or replaced
    mailbox_logins: list[tuple[str, str, str | None]] = field(default_factory=list)
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
            + len(self.grants)
            + len(self.relay_recipients)
            + len(self.transports)
            + len(self.mailbox_logins)
        )
