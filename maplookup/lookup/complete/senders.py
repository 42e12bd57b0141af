"""sender_login over a complete copy: twins of ``maplookup.sender_login`` and its helpers
(``mailbox_login``, ``delivered_logins``, ``sender_owners``), statement by statement.

Same contract as :mod:`.semantics`.  The SQL joins the owners with
``string_agg(DISTINCT o, ',' ORDER BY o)``, whose order is the database's collation; Python
sorts by code point, which is that order under the C and C.UTF-8 collations only (the order
means nothing to Postfix, which splits the list and compares each login).
"""

from __future__ import annotations

from maplookup.lookup.complete.semantics import ascii_lower, split_address, virtual_match
from maplookup.lookup.complete.store import (
    ITEM,
    MapsCopy,
)
from maplookup.lookup.complete.store import mailbox_login as packed_login

#: ``delivered_logins``' max_depth default: how many alias levels an owner list follows.
MAX_DEPTH = 10


def mailbox_login(copy: MapsCopy, address: str, delimiter: str) -> str | None:
    """``maplookup.mailbox_login``: the login of the enabled mailbox the address is delivered
    to (exact, else without its extension; never the catch-all), None when that mailbox has
    none."""
    a = split_address(address, delimiter)
    if a is None or not a.local_part or copy.kind(a.domain) != "mailbox":
        return None
    for box in (a.address, a.base_address()):
        if box is not None and box in copy.mailboxes:
            return packed_login(copy.mailboxes[box], box)
    return None


def delivered_logins(
    copy: MapsCopy, alias_address: str, targets: list[str], delimiter: str
) -> list[str]:
    """``maplookup.delivered_logins``: the logins of the mailboxes the targets are delivered
    to, expanding aliases as cleanup(8) does (an address that expands into itself, or was
    seen before, is final; src/cleanup/cleanup_map1n.c), at most MAX_DEPTH levels."""
    frontier = targets
    seen = {alias_address}
    logins: list[str] = []
    depth = 0
    while frontier and depth < MAX_DEPTH:
        depth += 1
        next_frontier: list[str] = []
        for target in frontier:
            address = ascii_lower(target)
            if "@" not in address:
                continue  # a local account: not a virtual mailbox
            if address not in seen:
                seen.add(address)
                match = virtual_match(copy, address, delimiter)
                if match is not None:
                    expansion = match.split(ITEM)[1:]
                    if expansion[0].startswith("@"):  # '@other' keeps the local part
                        expansion = [address[: address.rfind("@")] + expansion[0]]
                    if not (len(expansion) == 1 and ascii_lower(expansion[0]) == address):
                        next_frontier.extend(expansion)
                        continue
            login = mailbox_login(copy, address, delimiter)
            if login is not None:
                logins.append(login)
        frontier = next_frontier
    return logins


def sender_owners(copy: MapsCopy, local: str, domain: str, delimiter: str) -> list[str]:
    """``maplookup.sender_owners``: the owners of exactly ``local@domain``: its grants, the
    mailbox's login, the logins its alias delivers to, and in a mirror domain the owners of
    the same address in the mirrored domain."""
    address = f"{local}@{domain}"
    granted = copy.grants.get(address)
    owners = [] if granted is None else granted.split(ITEM)
    row = copy.domain(domain)
    if row is None or row.kind == "relay":
        return owners
    if row.kind == "mailbox" and address in copy.mailboxes:
        login = packed_login(copy.mailboxes[address], address)
        if login is not None:
            owners.append(login)
    joined = copy.aliases.get(address)
    if joined is not None:
        targets = joined.split(ITEM)
        if targets[0].startswith("@"):
            targets = [local + targets[0]]
        owners += delivered_logins(copy, address, targets, delimiter)
    if row.alias_of is not None:
        owners += sender_owners(copy, local, row.alias_of, delimiter)
    return owners


def _has_own_record(copy: MapsCopy, local: str, domain: str) -> bool:
    """``maplookup.has_own_record``: an enabled mailbox or alias is exactly this address
    (in a mirror domain: in the mirrored domain, or an alias of the mirror's own)."""
    address = f"{local}@{domain}"
    row = copy.domain(domain)
    if row is None or row.kind == "relay":
        return False
    if address in copy.aliases or (row.kind == "mailbox" and address in copy.mailboxes):
        return True
    if row.alias_of is not None:
        return _has_own_record(copy, local, row.alias_of)
    return False


def sender_login(copy: MapsCopy, key: str, delimiter: str) -> str | None:
    """``maplookup.sender_login``: every login owning the sender address, sorted, joined by
    ``,``: the owners of the address, else of the address without its extension, plus the
    ``@domain`` grants of the domain (and of the domain it mirrors)."""
    a = split_address(key, delimiter)
    if a is None:
        return None
    owners: list[str] = []
    if a.local_part:
        owners = sender_owners(copy, a.local_part, a.domain, delimiter)
        if a.base_part is not None and (
            not owners or not _has_own_record(copy, a.local_part, a.domain)
        ):
            owners += sender_owners(copy, a.base_part, a.domain, delimiter)
    row = copy.domain(a.domain)
    for name in (a.domain, None if row is None else row.alias_of):
        if name is not None:
            granted = copy.grants.get(f"@{name}")
            if granted is not None:
                owners += granted.split(ITEM)
    return ",".join(sorted(set(owners))) or None
