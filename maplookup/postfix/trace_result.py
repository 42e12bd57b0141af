"""What a trace returns: the alias expansion tree, each final recipient's fate, and why.

Owns the result model of ``trace.trace_address`` (``TraceResult`` and its parts, the verdict
and class enums) and ``PostfixSettings``, the Postfix parameters a trace assumes.  Plain data:
the tracer fills it, ``cli.trace`` renders it as text or JSON.
"""

from __future__ import annotations

import enum
import socket
from dataclasses import dataclass, field

from maplookup.maps import LookupSettings


@dataclass(frozen=True, slots=True)
class PostfixSettings:
    """Postfix parameters the trace depends on, with Postfix's defaults (postconf(5))."""

    virtual_alias_recursion_limit: int = 1000
    virtual_alias_expansion_limit: int = 1000
    virtual_alias_address_length_limit: int = 1000
    virtual_minimum_uid: int = 100
    # Appended to a local account name an alias points to (trivial-rewrite's "local"
    # rewriting; $myhostname by default, which is the host name).
    myorigin: str = field(default_factory=socket.gethostname)


class DomainClass(enum.StrEnum):
    """trivial-rewrite's address class of a domain (src/trivial-rewrite/resolve.c)."""

    VIRTUAL_MAILBOX = "virtual_mailbox"  # virtual_mailbox_domains: delivered by virtual(8)
    VIRTUAL_ALIAS = "virtual_alias"  # virtual_alias_domains: must be aliased, else unknown
    RELAY = "relay"  # relay_domains: relayed; smtpd checks relay_recipient_maps at RCPT
    REMOTE = "remote"  # none of these: delivered off-host (relayed)


class Verdict(enum.StrEnum):
    DELIVERED = "delivered"  # into a mailbox here
    RELAYED = "relayed"  # sent on to another host
    REJECTED = "rejected"  # 5.1.1 at RCPT, or a bounce after alias expansion
    DEFERRED = "deferred"  # 4.3.5: stays in the queue (or 450 at RCPT: a retry: transport)
    DISCARDED = "discarded"  # accepted and thrown away (a discard: transport)


class NodeKind(enum.StrEnum):
    ALIAS = "alias"  # virtual_alias_maps answered: replaced by its children
    FINAL = "final"  # virtual_alias_maps said NOTFOUND: a final recipient
    SELF = "self"  # expanded into itself earlier: kept as a final recipient, not looked up
    LOOP = "loop"  # back to an ancestor: the expansion would never end
    UNREACHED = "unreached"  # not expanded: the expansion stopped with an error first


class ErrorKind(enum.StrEnum):
    LOOP = "loop"
    RECURSION_LIMIT = "virtual_alias_recursion_limit"
    EXPANSION_LIMIT = "virtual_alias_expansion_limit"
    ADDRESS_LENGTH_LIMIT = "virtual_alias_address_length_limit"
    TRACE_LIMIT = "trace_limit"  # this tool gave up; not something Postfix does


@dataclass(frozen=True, slots=True)
class Delivery:
    """What happens to one final recipient."""

    domain: str
    domain_class: DomainClass
    verdict: Verdict
    reason: str  # one line, with the status Postfix would give
    mailbox: str | None = None  # relative to virtual_mailbox_base; trailing '/' = Maildir
    uid: str | None = None
    gid: str | None = None
    # The transport_maps answer for the address (else for '*'), which overrides the class's
    # transport (resolve.c); None: the class's default (virtual(8), relay or smtp).
    transport: str | None = None


@dataclass(slots=True, eq=False)
class AliasNode:
    """One address in the expansion tree."""

    address: str
    kind: NodeKind = NodeKind.UNREACHED
    virtual: str | None = None  # the virtual_alias_maps answer, for ALIAS nodes
    children: list[AliasNode] = field(default_factory=list)
    delivery: Delivery | None = None  # for FINAL and SELF nodes
    # A final address already written once: cleanup_out_recipient.c drops it (case-folded).
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class ExpansionError:
    """Why cleanup(8) would refuse the whole message (451 4.6.0 Alias expansion error)."""

    kind: ErrorKind
    address: str  # the address being expanded when it happened
    message: str
    path: tuple[str, ...] = ()  # for a loop: from the ancestor back to itself


@dataclass(frozen=True, slots=True)
class TraceResult:
    address: str
    domain: str
    domain_class: DomainClass
    tree: AliasNode
    # Final recipients in the order cleanup(8) writes them, each address once.
    recipients: tuple[AliasNode, ...]
    error: ExpansionError | None
    settings: LookupSettings
    postfix: PostfixSettings
    # The smtpd_sender_login_maps answer for the address as an envelope sender: the logins
    # that may use it (comma-separated), or None: anyone authenticated, nobody refused.
    sender_owners: str | None = None

    @property
    def ok(self) -> bool:
        """True when every final recipient is delivered here or relayed."""
        return self.error is None and all(
            r.delivery is not None and r.delivery.verdict in (Verdict.DELIVERED, Verdict.RELAYED)
            for r in self.recipients
        )

    def counts(self) -> dict[Verdict, int]:
        counts = dict.fromkeys(Verdict, 0)
        for node in self.recipients:
            if node.delivery is not None:
                counts[node.delivery.verdict] += 1
        return counts
