"""The delivery maps over a complete copy: Python twins of schema.sql's lookup functions.

Each function names the SQL function it mirrors and follows it statement by statement; the
comments say where the order of the tries matters.  They take the key the server would bind as
``$1`` (``maps.fold_key``'s result) and answer exactly what the SQL function returns for it,
None for NULL (NOTFOUND).  Like the SQL they unquote and ASCII-fold the key again
(``maplookup.split_address``), which is a no-op for most folded keys, but not all (see
:func:`split_address`), so the two stay equal for every input.

``tests/integration/test_complete_copy.py`` proves the equality against PostgreSQL.
"""

from __future__ import annotations

from typing import NamedTuple

from maplookup.address import fold, split_extension, unquote_local
from maplookup.lookup.complete.store import ITEM, MapsCopy, mailbox_ids, mailbox_path


def ascii_lower(text: str) -> str:
    """``maplookup.ascii_lower``: ASCII letters only (keys arrive folded already)."""
    return fold(text, smtputf8=False)


class Split(NamedTuple):
    """A row of ``maplookup.split_address``, and the address it was split from (the key of
    the exact try in the copy's dicts)."""

    local_part: str
    domain: str
    base_part: str | None
    extension: str | None
    address: str  # local_part@domain

    def base_address(self) -> str | None:
        """``base_part@domain``, the key of the try without the extension."""
        return None if self.base_part is None else f"{self.base_part}@{self.domain}"


def split_address(key: str, delimiter: str) -> Split | None:
    """``maplookup.split_address``: the key unquoted, ASCII-folded, split at its last ``@``,
    the local part at its first delimiter (split_addr.c's rules, :func:`address.split_extension`);
    None for no row (no ``@``, or an empty domain).

    Like the SQL, this reads the key in external (quoted) form: a caller holding the
    internal form passes :func:`maplookup.maps.sql_key` of it, as the server does for SQL.
    """
    folded = ascii_lower(unquote_local(key))
    at = folded.rfind("@")
    if at < 0 or at == len(folded) - 1:
        return None
    local = folded[:at]
    base, extension = split_extension(local, delimiter)
    if extension is None:
        return Split(local, folded[at + 1 :], None, None, folded)
    return Split(local, folded[at + 1 :], base, extension, folded)


def domains(copy: MapsCopy, key: str) -> str | None:
    """``maplookup.domains``: an enabled mailbox domain answers its name."""
    name = ascii_lower(key)
    return name if copy.kind(name) == "mailbox" else None


def alias_domains(copy: MapsCopy, key: str) -> str | None:
    """``maplookup.alias_domains``: an enabled alias domain (forwarding-only or mirror)."""
    name = ascii_lower(key)
    return name if copy.kind(name) == "alias" else None


def _mailbox_address(copy: MapsCopy, a: Split) -> str | None:
    """The address of the mailbox ``find_mailbox`` finds: exact, then without extension, then
    the catch-all (the order of src/global/mail_addr_find.c); the domain is checked first."""
    boxes = copy.mailboxes
    if a.address in boxes:
        return a.address
    base = a.base_address()
    if base is not None and base in boxes:
        return base
    catchall = f"@{a.domain}"
    return catchall if catchall in boxes else None


class Mailbox(NamedTuple):
    """A row of ``maplookup.find_mailbox`` (ids resolved against the domain default)."""

    path: str
    uid: str | None
    gid: str | None
    is_catchall: bool


def find_mailbox(copy: MapsCopy, key: str, delimiter: str) -> Mailbox | None:
    """``maplookup.find_mailbox`` (include_catchall = true, the only way it is called): the
    enabled mailbox of an enabled mailbox domain the address delivers to."""
    a = split_address(key, delimiter)
    if a is None:
        return None
    domain = copy.domain(a.domain)
    if domain is None or domain.kind != "mailbox":
        return None
    address = _mailbox_address(copy, a)
    if address is None:
        return None
    packed = copy.mailboxes[address]
    uid, gid = mailbox_ids(packed)
    return Mailbox(
        mailbox_path(packed, address),
        uid or domain.default_uid,
        gid or domain.default_gid,
        address.startswith("@"),
    )


def vmailbox(copy: MapsCopy, key: str, delimiter: str) -> str | None:
    """``maplookup.vmailbox``: the path of the mailbox :func:`find_mailbox` finds."""
    a = split_address(key, delimiter)
    if a is None or copy.kind(a.domain) != "mailbox":
        return None
    address = _mailbox_address(copy, a)
    return None if address is None else mailbox_path(copy.mailboxes[address], address)


def mailbox_id(
    copy: MapsCopy, key: str, delimiter: str, default_id: int | None, want_uid: bool
) -> str | None:
    """``maplookup.mailbox_id`` (as text: ``maplookup.uid`` and ``maplookup.gid``).

    A mailbox (exact, else without extension): its own id, else the domain default, else the
    configured default, else the catch-all mailbox's own id; any other address of an enabled
    mailbox domain, and ``@d``: the catch-all's own id, else the domain default, else the
    configured default; None outside enabled mailbox domains.
    """
    a = split_address(key, delimiter)
    if a is None:
        return None
    domain = copy.domain(a.domain)
    if domain is None or domain.kind != "mailbox":
        return None
    which = 0 if want_uid else 1
    domain_default = domain.default_uid if want_uid else domain.default_gid
    configured = None if default_id is None else str(default_id)
    boxes = copy.mailboxes
    catchall_box = boxes.get(f"@{a.domain}")
    catchall = None if catchall_box is None else mailbox_ids(catchall_box)[which]
    if a.local_part:
        for address in (a.address, a.base_address()):
            if address is not None and address in boxes:
                own = mailbox_ids(boxes[address])[which]
                return own or domain_default or configured or catchall
    return catchall or domain_default or configured


def local_part_exists(copy: MapsCopy, domain: str, local: str) -> bool:
    """``maplookup.local_part_exists``: an enabled mailbox or alias of an enabled domain."""
    address = f"{local}@{domain}"
    return address in copy.mailboxes or address in copy.aliases


def virtual_match(copy: MapsCopy, key: str, delimiter: str) -> str | None:
    """``maplookup.virtual_match``: ``KIND\\nTARGET...`` as a hash: table would match
    (E exact, B without extension, C catch-all), None for no match.  The order: alias of the
    address, alias without extension, the mirrored domain's address if it resolves there, then
    the catch-all alias, which never swallows a mailbox (the mailbox answers for itself)."""
    a = split_address(key, delimiter)
    if a is None:
        return None
    domain = copy.domain(a.domain)
    if domain is None or domain.kind == "relay":
        return None
    local, base, aliases = a.local_part, a.base_part, copy.aliases
    base_address = a.base_address()
    if local:
        if a.address in aliases:
            return f"E{ITEM}{aliases[a.address]}"
        if base_address is not None and base_address in aliases:
            return f"B{ITEM}{aliases[base_address]}"
    target = domain.alias_of
    if target is not None:
        # Only addresses that exist in the mirrored domain: unknown users are refused at RCPT.
        if local and local_part_exists(copy, target, local):
            return f"E{ITEM}{local}@{target}"
        if base is not None and local_part_exists(copy, target, base):
            return f"B{ITEM}{base}@{target}"
        if local_part_exists(copy, target, ""):
            return f"C{ITEM}@{target}"
        return None
    catchall = aliases.get(f"@{a.domain}")
    if catchall is None:
        return None
    if local:
        if a.address in copy.mailboxes:
            return f"E{ITEM}{a.address}"
        if base_address is not None and base_address in copy.mailboxes:
            return f"B{ITEM}{base_address}"
    return f"C{ITEM}{catchall}"
