"""How Postfix will route one address through maplookup's maps: the question admins ask most.

Three Postfix stages are modelled, each after the source that decides it:

1. cleanup(8)'s virtual alias expansion, ``src/cleanup/cleanup_map1n.c``, step by step: the
   address vector is rewritten in place; a lookup result replaces its address with the first
   result and appends the others at the end (so the left branch is followed first); an address
   that appears in its own expansion is remembered (a case-folded ``been_here`` table) and kept
   as a final recipient wherever it turns up afterwards; a NOTFOUND address is final; the
   result is written once per address (``src/cleanup/cleanup_out_recipient.c``).  The
   limits are ``virtual_alias_recursion_limit`` (lookups along one left branch),
   ``virtual_alias_expansion_limit`` (addresses in the vector) and
   ``virtual_alias_address_length_limit`` (length of one result), all 1000 by default
   (postconf(5)).  Hitting any of them refuses the whole message with
   "451 4.6.0 Alias expansion error".  A loop without such a self-reference (a -> b -> a)
   repeats until one of those limits: it is reported as a loop as soon as an address comes
   back to an ancestor with no self-referencing address on the way, because from there the
   same lookups repeat for ever.
2. trivial-rewrite's address classes, ``src/trivial-rewrite/resolve.c``: a final address in a
   virtual alias domain goes to the error transport ("User unknown in virtual alias table"),
   one in a virtual mailbox domain to virtual(8), one in a relay domain to the relay transport
   (smtpd checks relay_recipient_maps at RCPT), anything else off-host; transport_maps
   overrides every class's transport but the alias class's.
3. virtual(8), ``src/virtual/mailbox.c`` and ``recipient.c``: no mailbox path means a bounce
   ("unknown user", 5.1.1); a missing uid or gid, a uid below ``virtual_minimum_uid`` or a gid
   that is not positive defers the mail ("4.3.5 mail system configuration error").

Every answer comes from the statements the server runs (``maps.query_for`` and ``fold_key``),
so the trace sees exactly what Postfix gets, inside one REPEATABLE READ, READ ONLY transaction
(under READ COMMITTED each statement would take a new snapshot).

This module is the tracer; what it returns (the tree, verdicts, the Postfix parameters it
assumes) is ``trace_result``, rendered by ``cli.trace``.
"""

from __future__ import annotations

import re

import asyncpg

from maplookup.address import fold, quote_local, split_address_list, unquote_local
from maplookup.lookup.virtual_answer import received_local_part, render_virtual
from maplookup.maps import LookupSettings, MapName, decode_key, fold_decoded, query_for
from maplookup.postfix.trace_result import (
    AliasNode,
    Delivery,
    DomainClass,
    ErrorKind,
    ExpansionError,
    NodeKind,
    PostfixSettings,
    TraceResult,
    Verdict,
)

# Not a Postfix limit: a guard so that a pathological data set cannot make the trace itself
# run away (Postfix's own limits allow up to about recursion x expansion = 10^6 addresses).
MAX_TRACE_ADDRESSES = 100_000


class TraceInputError(ValueError):
    """The address cannot be traced (bad usage)."""


def parse_trace_address(text: str) -> str:
    """``user@domain`` as given (``<...>`` allowed), or TraceInputError."""
    address = text.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        raise TraceInputError(f"address is not valid UTF-8: {text!r}") from None
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise TraceInputError(f"expected an address user@domain, got {text!r}")
    return address


def _fold_address(address: str) -> str:
    """An address as Postfix compares addresses (been_here's BH_FLAG_FOLD, table keys)."""
    return fold(unquote_local(address))


def _domain_of(address: str) -> str:
    return fold(unquote_local(address).rpartition("@")[2])


def _atol(text: str) -> int:
    """C's atol(), as virtual(8) reads uid and gid answers: leading digits, else 0."""
    match = re.match(r"\s*([+-]?\d+)", text)
    return int(match.group(1)) if match else 0


class _Tracer:
    def __init__(
        self, conn: asyncpg.Connection, settings: LookupSettings, postfix: PostfixSettings
    ) -> None:
        self._conn = conn
        self._settings = settings
        self._postfix = postfix
        self._answers: dict[tuple[MapName, str], str | None] = {}
        self._smtputf8 = settings.smtputf8_enable
        self._deliveries: dict[tuple[str, bool], Delivery] = {}
        self._parents: dict[int, AliasNode] = {}

    async def lookup(self, map_name: MapName, key: str) -> str | None:
        """What the server answers: None for NOTFOUND.  Same snapshot, so memoised.

        As the server (lookup/answer.py): the statement for the folded key, and for ``virtual`` the
        received case applied onto the match (virtual_answer.py).
        """
        decoded = decode_key(map_name, key.encode("utf-8"))
        folded = None if decoded is None else fold_decoded(map_name, decoded, self._smtputf8)
        if folded is None or decoded is None:
            return None
        if (map_name, folded) not in self._answers:
            query, args = query_for(map_name, folded, self._settings)
            fetched = await self._conn.fetchval(query, *args)
            # The server answers NOTFOUND for NULL and for an empty string (lookup/answer.py).
            self._answers[map_name, folded] = str(fetched) if fetched else None
        value = self._answers[map_name, folded]
        if value is not None and map_name is MapName.VIRTUAL:
            value = render_virtual(
                value, received_local_part(decoded), self._settings.recipient_delimiter
            )
        return value

    async def classify(self, domain: str) -> DomainClass:
        # resolve.c tests virtual_alias_domains, virtual_mailbox_domains, then relay_domains.
        if await self.lookup(MapName.ALIAS_DOMAINS, domain) is not None:
            return DomainClass.VIRTUAL_ALIAS
        if await self.lookup(MapName.DOMAINS, domain) is not None:
            return DomainClass.VIRTUAL_MAILBOX
        if await self.lookup(MapName.RELAY_DOMAINS, domain) is not None:
            return DomainClass.RELAY
        return DomainClass.REMOTE

    async def transport(self, address: str) -> str | None:
        """transport_maps for a final address: its entry, else the wildcard '*', which
        trivial-rewrite asks for itself (src/trivial-rewrite/transport.c)."""
        found = await self.lookup(MapName.TRANSPORT, address)
        return found if found is not None else await self.lookup(MapName.TRANSPORT, "*")

    # -- cleanup(8): src/cleanup/cleanup_map1n.c --------------------------------------------

    async def expand(self, root: AliasNode) -> tuple[list[AliasNode], ExpansionError | None]:
        """Run cleanup_map1n_internal() over ``root``; returns the address vector and error."""
        limits = self._postfix
        vector = [root]
        been_here: set[str] = set()  # BH_FLAG_FOLD: compared case-folded
        nodes = 1
        arg = 0
        while arg < len(vector):
            if len(vector) > limits.virtual_alias_expansion_limit:
                return vector, ExpansionError(
                    ErrorKind.EXPANSION_LIMIT,
                    root.address,
                    f"more than {limits.virtual_alias_expansion_limit} addresses "
                    "(virtual_alias_expansion_limit)",
                )
            node = vector[arg]
            count = 0
            while True:
                folded = _fold_address(node.address)
                if folded in been_here:
                    node.kind = NodeKind.SELF
                    break
                if count >= limits.virtual_alias_recursion_limit:
                    return vector, ExpansionError(
                        ErrorKind.RECURSION_LIMIT,
                        node.address,
                        f"nesting deeper than {limits.virtual_alias_recursion_limit} "
                        "(virtual_alias_recursion_limit)",
                    )
                loop = self._loop_path(node, been_here)
                if loop:
                    node.kind = NodeKind.LOOP
                    return vector, ExpansionError(
                        ErrorKind.LOOP,
                        node.address,
                        "alias loop: " + " -> ".join(loop),
                        tuple(loop),
                    )
                answer = await self.lookup(MapName.VIRTUAL, node.address)
                # mail_addr_map() parses the answer as an address list (quotes respected);
                # a name without '@' is a local account, completed with @$myorigin by
                # trivial-rewrite's "local" rewriting (mail_addr_crunch.c).
                targets = [
                    t if "@" in unquote_local(t) else f"{t}@{self._postfix.myorigin}"
                    for t in split_address_list(answer or "")
                ]
                if not targets:
                    node.kind = NodeKind.FINAL
                    break
                node.kind = NodeKind.ALIAS
                node.virtual = answer
                for i, target in enumerate(targets):
                    if len(target) > limits.virtual_alias_address_length_limit:
                        return vector, ExpansionError(
                            ErrorKind.ADDRESS_LENGTH_LIMIT,
                            node.address,
                            f"a result longer than {limits.virtual_alias_address_length_limit}"
                            " characters (virtual_alias_address_length_limit)",
                        )
                    child = AliasNode(target)
                    node.children.append(child)
                    self._parents[id(child)] = node
                    if i == 0:
                        vector[arg] = child
                    else:
                        vector.append(child)
                    # "Allow an address to expand into itself once."
                    if _fold_address(target) == folded:
                        been_here.add(folded)
                nodes += len(targets)
                if nodes > MAX_TRACE_ADDRESSES:
                    return vector, ExpansionError(
                        ErrorKind.TRACE_LIMIT,
                        node.address,
                        f"trace stopped after {MAX_TRACE_ADDRESSES} addresses (a limit of "
                        "this tool, not of Postfix)",
                    )
                node = vector[arg]
                count += 1
            arg += 1
        return vector, None

    def _loop_path(self, node: AliasNode, been_here: set[str]) -> list[str]:
        """The cycle if ``node`` repeats an ancestor and nothing on the way stops it.

        Every ancestor has been looked up already, so each one that expands into itself is in
        ``been_here`` by now.  Without one on the cycle, the same lookups come round again
        and again until a limit refuses the message: report that now, as a loop.
        """
        folded = _fold_address(node.address)
        path = [node.address]
        parent = self._parents.get(id(node))
        while parent is not None:
            path.append(parent.address)
            if _fold_address(parent.address) == folded:
                cycle = path[::-1]
                if not any(_fold_address(a) in been_here for a in cycle):
                    return cycle
                return []
            parent = self._parents.get(id(parent))
        return []

    # -- trivial-rewrite and virtual(8) ------------------------------------------------------

    async def deliver(self, address: str, *, at_rcpt: bool) -> Delivery:
        """The fate of one final recipient; ``at_rcpt``: it is the address smtpd checks."""
        key = (_fold_address(address), at_rcpt)
        if key not in self._deliveries:
            self._deliveries[key] = await self._deliver(address, at_rcpt)
        return self._deliveries[key]

    async def _deliver(self, address: str, at_rcpt: bool) -> Delivery:
        domain = _domain_of(address)
        domain_class = await self.classify(domain)
        # resolve.c: transport_maps overrides every class's transport but the alias class's.
        transport = (
            None if domain_class is DomainClass.VIRTUAL_ALIAS else await self.transport(address)
        )
        via = f" via {transport}" if transport is not None else ""
        if transport is not None:
            special = _special_transport(domain, domain_class, transport, at_rcpt)
            if special is not None:
                return special
        if domain_class is DomainClass.RELAY:
            if at_rcpt and await self.lookup(MapName.RELAY_RECIPIENTS, address) is None:
                reason = "User unknown in relay recipient table (550 5.1.1 at RCPT)"
                return Delivery(domain, domain_class, Verdict.REJECTED, reason)
            discarded = _discarded(domain, domain_class, transport)
            if discarded is not None:
                return discarded
            reason = f"relayed to {domain}{via} (relay domain"
            if at_rcpt:
                reason += ", a valid recipient in relay_recipient_maps"
            return Delivery(
                domain, domain_class, Verdict.RELAYED, reason + ")", transport=transport
            )
        if domain_class is DomainClass.REMOTE:
            discarded = _discarded(domain, domain_class, transport)
            if discarded is not None:
                return discarded
            reason = f"relayed to {domain}{via} (not delivered here"
            if at_rcpt:
                reason += "; smtpd accepts it only from clients allowed to relay"
            return Delivery(
                domain, domain_class, Verdict.RELAYED, reason + ")", transport=transport
            )
        if domain_class is DomainClass.VIRTUAL_ALIAS:
            # resolve.c sends it to the error transport; smtpd rejects it at RCPT already.
            reason = "User unknown in virtual alias table " + (
                "(550 5.1.1 at RCPT)" if at_rcpt else "(5.1.1, bounced after alias expansion)"
            )
            return Delivery(domain, domain_class, Verdict.REJECTED, reason)
        mailbox = await self.lookup(MapName.VMAILBOX, address)
        if mailbox is None:
            reason = (
                "User unknown in virtual mailbox table (550 5.1.1 at RCPT)"
                if at_rcpt
                else "unknown user (5.1.1, bounced by virtual(8))"
            )
            return Delivery(domain, domain_class, Verdict.REJECTED, reason)
        if transport is not None:
            # smtpd still checked virtual_mailbox_maps (the class's recipient table), but the
            # transport entry delivers it, not virtual(8): no uid, gid or path is used.
            discarded = _discarded(domain, domain_class, transport)
            if discarded is not None:
                return discarded
            if transport.partition(":")[0] in _RELAYING_TRANSPORTS:
                verdict, what = Verdict.RELAYED, "relayed via"
            else:
                verdict, what = Verdict.DELIVERED, "handed to"
            return Delivery(
                domain,
                domain_class,
                verdict,
                f"{what} {transport} (transport_maps; virtual(8) not used)",
                transport=transport,
            )
        uid = await self.lookup(MapName.UID, address)
        gid = await self.lookup(MapName.GID, address)
        problems = []
        if uid is None:
            problems.append("no uid in virtual_uid_maps")
        elif _atol(uid) < self._postfix.virtual_minimum_uid:
            problems.append(
                f"bad uid {uid}: below virtual_minimum_uid {self._postfix.virtual_minimum_uid}"
            )
        if gid is None:
            problems.append("no gid in virtual_gid_maps")
        elif _atol(gid) <= 0:
            problems.append(f"bad gid {gid}")
        if problems:
            reason = ", ".join(problems) + " (4.3.5 mail system configuration error, virtual(8))"
            return Delivery(domain, domain_class, Verdict.DEFERRED, reason, mailbox, uid, gid)
        kind = "Maildir" if mailbox.endswith("/") else "mbox file"
        return Delivery(
            domain, domain_class, Verdict.DELIVERED, f"delivered to {kind}", mailbox, uid, gid
        )


# Transports that send mail on to another host (master.cf's defaults): a mailbox domain
# routed to one is relayed, not delivered here.
_RELAYING_TRANSPORTS = frozenset({"smtp", "relay"})


def _special_transport(
    domain: str, domain_class: DomainClass, transport: str, at_rcpt: bool
) -> Delivery | None:
    """``error:`` and ``retry:`` transports: refused at RCPT (550 and 450 with the entry's
    text, src/smtpd/smtpd_check.c, before the class's recipient table is even asked), or
    bounced and deferred after alias expansion.  None for any other transport."""
    channel, _, nexthop = transport.partition(":")
    text = nexthop or "Address is undeliverable"  # update_entry() in transport.c
    entry = f"(transport_maps: {transport})"
    if channel == "error":
        reason = f"550 {text} at RCPT" if at_rcpt else f"bounced: {text}"
        return Delivery(
            domain, domain_class, Verdict.REJECTED, f"{reason} {entry}", transport=transport
        )
    if channel == "retry":
        reason = f"450 {text} at RCPT" if at_rcpt else f"deferred: {text}"
        return Delivery(
            domain, domain_class, Verdict.DEFERRED, f"{reason} {entry}", transport=transport
        )
    return None


def _discarded(domain: str, domain_class: DomainClass, transport: str | None) -> Delivery | None:
    """A recipient accepted (its class's recipient table passed) and thrown away."""
    if transport is None or transport.partition(":")[0] != "discard":
        return None
    return Delivery(
        domain,
        domain_class,
        Verdict.DISCARDED,
        f"discarded (transport_maps: {transport})",
        transport=transport,
    )


async def trace_address(
    conn: asyncpg.Connection,
    address: str,
    settings: LookupSettings,
    postfix: PostfixSettings | None = None,
) -> TraceResult:
    """Follow ``address`` through the maps as Postfix would; read-only, one snapshot.

    Raises TraceInputError for something that is not ``user@domain``.  Runs in its own
    REPEATABLE READ, READ ONLY transaction, or in the caller's transaction if one is open.
    """
    address = parse_trace_address(address)
    postfix = postfix or PostfixSettings()
    if conn.is_in_transaction():
        return await _trace(conn, address, settings, postfix)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _trace(conn, address, settings, postfix)


async def _trace(
    conn: asyncpg.Connection, address: str, settings: LookupSettings, postfix: PostfixSettings
) -> TraceResult:
    tracer = _Tracer(conn, settings, postfix)
    domain = _domain_of(address)
    domain_class = await tracer.classify(domain)
    # The address as Postfix writes it (smtpd and cleanup parse it): a quoted dot-atom such
    # as "max"@example.com is max@example.com (src/global/quote_822_local.c).
    root = AliasNode(quote_local(unquote_local(address)))
    vector, error = await tracer.expand(root)
    recipients: list[AliasNode] = []
    written: set[str] = set()
    for node in vector:
        if node.kind not in (NodeKind.FINAL, NodeKind.SELF):
            continue
        node.delivery = await tracer.deliver(node.address, at_rcpt=node is root)
        # cleanup_out_recipient.c writes each expanded address once (been_here, BH_FLAG_FOLD).
        if _fold_address(node.address) in written:
            node.duplicate = True
        else:
            written.add(_fold_address(node.address))
            recipients.append(node)
    return TraceResult(
        address=address,
        domain=domain,
        domain_class=domain_class,
        tree=root,
        recipients=tuple(recipients),
        error=error,
        settings=settings,
        postfix=postfix,
        sender_owners=await tracer.lookup(MapName.SENDER_LOGIN, address),
    )
