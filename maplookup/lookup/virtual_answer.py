"""What a ``virtual`` (virtual_alias_maps) answer becomes for the address as it was received.

The SQL function ``maplookup.virtual_match`` answers for the *folded* key, so that one cached
answer serves every spelling of an address.  But Postfix carries parts of the address *as
received* onto the result of a ``hash:`` table (src/global/mail_addr_map.c,
mail_addr_crunch.c; DESIGN.md section 2, fact 11): ``Alias+Test@example.org`` matched by
``alias@example.org -> mail@example.org`` gives ``mail+Test@example.org``, not ``+test``.  So
the match is cached and this module applies each request's own case, in a few string
operations (no database, no allocation beyond the answer).

A match is ``KIND\\nTARGET\\nTARGET...`` (internal, unquoted targets), KIND being ``E`` (the
address itself matched), ``B`` (the address without its extension matched: the received
extension goes onto every target, before its last ``@``, or at the end of a local account
name), or ``C`` (the catch-all ``@domain`` matched: no extension).  A sole target ``@other``
takes the received local part whole.  Every address is quoted as quote_822_local does.
"""

from __future__ import annotations

from maplookup.address import quote_local, split_extension


def received_local_part(internal_address: str) -> str:
    """The local part of an unquoted address (what precedes its last ``@``)."""
    return internal_address[: internal_address.rfind("@")]


def render_virtual(match: str, received_local: str, delimiter: str) -> str:
    """The comma-separated targets Postfix would get for an address with this local part.

    ``match`` comes from ``maplookup.virtual_match``; ``received_local`` is the local part
    of the address as received, unquoted but not folded; ``delimiter`` is the
    recipient_delimiter the match was made with.  Raises ValueError on a malformed match
    (the lookup layer turns any exception into TEMP).
    """
    kind, _, rest = match.partition("\n")
    if kind not in ("E", "B", "C") or not rest:
        raise ValueError(f"malformed virtual match {match[:40]!r}")
    targets = rest.split("\n")
    extension = split_extension(received_local, delimiter)[1] if kind == "B" else None
    rendered = []
    for target in targets:
        if target.startswith("@"):
            address = received_local + target
        elif extension is None:
            address = target
        else:
            at = target.rfind("@")
            address = target + extension if at < 0 else target[:at] + extension + target[at:]
        rendered.append(quote_local(address))
    return ",".join(rendered)
