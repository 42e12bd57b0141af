"""The import rules: how each parsed record compares with the database, and what follows.

:func:`plan_import` walks the parsed files in a fixed order and fills a :class:`Plan`: which rows
are new, unchanged, replaced (only with ``--replace``) or refused, which domains the addresses
imply, and which virtual lines are the hash-table form of a mirror domain.  It reads the
:class:`DbState` it is given and never the database itself, so the same rules serve a dry run.
"""

from __future__ import annotations

from dataclasses import replace

from .plan import DbState, NewDomain, NewMailbox, Plan
from .planning_routing import plan_routing
from .problems import Origin, Problem
from .reading import Parsed
from .records import (
    ALIAS_DOMAINS,
    ALIASES,
    GIDS,
    MAILBOX_DOMAINS,
    MAILBOXES,
    UIDS,
    DomainRecord,
    IdRecord,
)


def _state_word(enabled: bool) -> str:
    return "enabled" if enabled else "disabled"


class _Planner:
    """Compares the parsed files with the database, record by record, in a fixed order:
    declared domains, mailboxes (which imply mailbox domains), mirror targets, bare-domain
    declarations, aliases (which imply alias domains), uids and gids, then the maps beyond
    delivery (planning_routing.py)."""

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
        plan_routing(self, self.parsed.routing)
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
            if kind in ("alias", "relay"):
                self.error(
                    record.origin,
                    f"{domain} is {'an alias' if kind == 'alias' else 'a relay'} domain; "
                    "mailboxes need a mailbox domain",
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
            if kind == "relay":
                self.error(
                    record.origin,
                    f"{domain} is a relay domain: its mail goes to another host, which has its "
                    "aliases",
                    ALIASES,
                )
                continue
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
            if record.address.is_catchall:
                if record.fallback is None:
                    self.domain_id(category, column, record, name)
                    continue
                # Export's note: '@d' holds the catch-all mailbox's own id, or the server's
                # default; the domain's own default is in the note.
                if record.domain_default is not None:
                    self.domain_id(
                        category, column, replace(record, value=record.domain_default), name
                    )
                if record.fallback != "catch-all":
                    continue
            self.mailbox_id(category, column, key, record, name)

    def mailbox_id(
        self, category: str, column: str, key: tuple[str, str], record: IdRecord, name: str
    ) -> None:
        """``user@d N`` (or, by export's note, ``@d N`` of the catch-all mailbox)."""
        domain = record.address.domain
        new = self.plan.mailboxes.get(key)
        if new is not None:
            setattr(new, column, record.value)
            self.plan.counts[category].added += 1
            return
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
            return
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
