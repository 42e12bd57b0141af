"""relay_domains, relay_recipients and transport over a complete copy: twins of schema.sql's
functions of the same names (and of ``maplookup.parent_domains``), statement by statement.

Same contract as :mod:`.semantics`: the key the server binds, the answer the SQL returns,
None for NULL.
"""

from __future__ import annotations

from maplookup.lookup.complete.semantics import (
    ascii_lower,
    find_mailbox,
    split_address,
    virtual_match,
)
from maplookup.lookup.complete.store import MapsCopy


def parent_domains(name: str, dotted: bool) -> list[str]:
    """``maplookup.parent_domains``: the name, then each parent, most specific first, as
    ``.parent`` (transport_maps, src/trivial-rewrite/transport.c) or ``parent``
    (relay_domains under parent_domain_matches_subdomains, src/util/match_ops.c)."""
    result = [name]
    rest = name
    while True:
        pos = rest.find(".", 1)  # strchr(entry + 1, '.')
        if pos < 0:
            return result
        rest = rest[pos:]
        result.append(rest if dotted else rest[1:])


def relay_domains(copy: MapsCopy, key: str) -> str | None:
    """``maplookup.relay_domains``: the enabled relay domain that is the key or its nearest
    parent."""
    for name in parent_domains(ascii_lower(key), dotted=False):
        if copy.kind(name) == "relay":
            return name
    return None


def relay_recipients(copy: MapsCopy, key: str, delimiter: str) -> str | None:
    """``maplookup.relay_recipients``: ``OK`` for an explicit record of an enabled domain (the
    address, without its extension, or ``@domain``), or, in a hosted (non-relay) domain, for
    an address the primary accepts (an alias match or a mailbox, catch-alls included)."""
    a = split_address(key, delimiter)
    if a is None:
        return None
    kind = copy.kind(a.domain)
    if not kind:
        return None
    records = copy.relay_recipients
    base = a.base_address()
    if a.address in records or f"@{a.domain}" in records or (base is not None and base in records):
        return "OK"
    if kind != "relay" and (
        virtual_match(copy, key, delimiter) is not None
        or find_mailbox(copy, key, delimiter) is not None
    ):
        return "OK"
    return None


def transport(copy: MapsCopy, key: str, delimiter: str) -> str | None:
    """``maplookup.transport``: the address, the address without its extension, the domain,
    then ``.parent`` entries; the key ``*`` answers the wildcard entry, which an address
    never falls back to.  A key without ``@`` is a domain."""
    entries = copy.transports
    if key == "*":
        return entries.get("@*")
    if "@" not in key:
        domain = ascii_lower(key)
    else:
        a = split_address(key, delimiter)
        if a is None:
            return None
        domain = a.domain
        if a.local_part:
            for address in (a.address, a.base_address()):
                if address is not None and address in entries:
                    return entries[address]
    for name in parent_domains(domain, dotted=True):
        found = entries.get(f"@{name}")
        if found is not None:
            return found
    return None
