"""The import rules for the maps beyond delivery: relay domains, relay recipients, transports,
sender grants and mailbox logins, compared with the database like the other records.

Runs after the delivery records are planned (planning.py), so that a relay domain, a relay
recipient's domain or a login's mailbox may come from the same import.  Reads only the
:class:`DbState` and the plan it is given.
"""

from __future__ import annotations

from typing import Protocol

from .plan import DbState, NewDomain, Plan
from .problems import Origin
from .reading_routing import RoutingParsed
from .routing_records import (
    MAILBOX_LOGINS,
    RELAY_DOMAINS,
    RELAY_RECIPIENTS,
    SENDER_GRANTS,
    TRANSPORTS,
)


class Planner(Protocol):
    """What planning.py's planner offers these rules."""

    plan: Plan
    db: DbState
    failed_mailboxes: dict[tuple[str, str], Origin]

    def error(self, origin: Origin, message: str, category: str) -> None: ...

    def warn(self, origin: Origin, message: str, category: str) -> None: ...

    def kind(self, name: str) -> str | None: ...

    def differs(self, origin: Origin, what: str, old: str, new: str, category: str) -> bool: ...


def plan_routing(planner: Planner, routing: RoutingParsed) -> None:
    """Relay domains first: the relay recipients' checks need them."""
    _relay_domains(planner, routing)
    _relay_recipients(planner, routing)
    _transports(planner, routing)
    _grants(planner, routing)
    _logins(planner, routing)


def _relay_domains(planner: Planner, routing: RoutingParsed) -> None:
    """A listed domain becomes a relay domain; one that is hosted here (in the files or the
    database) is left as it is: a backup MX relays the hosted domains by its configuration
    (``maplookup postfix-config --backup-mx``), not by data."""
    plan, counts = planner.plan, planner.plan.counts[RELAY_DOMAINS]
    for name, record in routing.relay_domains.items():
        kind = planner.kind(name)
        old = planner.db.domains.get(name)
        if kind is None:
            plan.domains[name] = NewDomain("relay", None, record.enabled)
            counts.added += 1
        elif kind != "relay":
            planner.warn(
                record.origin,
                f"{name} skipped: it is hosted here ({kind} domain); a backup MX relays the "
                "hosted domains by its configuration (maplookup postfix-config --backup-mx)",
                RELAY_DOMAINS,
            )
        elif old is None or old.enabled == record.enabled:
            counts.unchanged += 1
        elif planner.differs(
            record.origin,
            f"relay domain {name}",
            "enabled" if old.enabled else "disabled",
            "enabled" if record.enabled else "disabled",
            RELAY_DOMAINS,
        ):
            plan.domain_enabled.append((name, record.enabled))


def _relay_recipients(planner: Planner, routing: RoutingParsed) -> None:
    """Any domain of the files or the database: a relay domain's recipients, or those a
    backup MX accepts for a hosted domain beyond its mailboxes and aliases."""
    plan, counts = planner.plan, planner.plan.counts[RELAY_RECIPIENTS]
    for key, record in routing.relay_recipients.items():
        domain = record.address.domain
        if planner.kind(domain) is None:
            planner.error(
                record.origin,
                f"no domain {domain} (in the files or the database): list it in the "
                "relay_domains file",
                RELAY_RECIPIENTS,
            )
        elif key in planner.db.relay_recipients:
            counts.unchanged += 1
        else:
            plan.relay_recipients.append(key)
            counts.added += 1


def _transports(planner: Planner, routing: RoutingParsed) -> None:
    plan, counts = planner.plan, planner.plan.counts[TRANSPORTS]
    for key, record in routing.transports.items():
        old = planner.db.transports.get(key)
        if old is None:
            plan.transports[key] = record.transport
            counts.added += 1
        elif old == record.transport:
            counts.unchanged += 1
        elif planner.differs(record.origin, f"transport {key}", old, record.transport, TRANSPORTS):
            plan.transports[key] = record.transport


def _grants(planner: Planner, routing: RoutingParsed) -> None:
    """Grants only add owners: a grant the database has and the file does not is kept."""
    plan, counts = planner.plan, planner.plan.counts[SENDER_GRANTS]
    for (domain, local_part), record in routing.grants.items():
        for login in record.logins:
            if (domain, local_part, login) in planner.db.grants:
                counts.unchanged += 1
            else:
                plan.grants.append((domain, local_part, login))
                counts.added += 1


def _logins(planner: Planner, routing: RoutingParsed) -> None:
    """Export's ``login of`` notes: a mailbox (in the files or the database) and its login."""
    plan, counts = planner.plan, planner.plan.counts[MAILBOX_LOGINS]
    for key, record in routing.logins.items():
        shown = "no login" if record.login is None else record.login
        if key in plan.mailboxes:
            plan.mailbox_logins.append((*key, record.login))
            counts.added += 1
            continue
        old = planner.db.mailboxes.get(key)
        if old is None:
            failed = planner.failed_mailboxes.get(key)
            planner.error(
                record.origin,
                f"mailbox {record.address} was not imported (see {failed})"
                if failed
                else f"no mailbox {record.address} (in the vmailbox file or the database) for "
                f"this login",
                MAILBOX_LOGINS,
            )
        elif old.login == record.login:
            counts.unchanged += 1
        elif planner.differs(
            record.origin,
            f"login of mailbox {record.address}",
            old.login or "no login",
            shown,
            MAILBOX_LOGINS,
        ):
            plan.mailbox_logins.append((*key, record.login))
