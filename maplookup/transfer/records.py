"""The typed records an import is made of, and the rules that turn text into their fields.

A source line says ``key value``; what that means depends on the map: a domain, a mailbox and its
path, an alias and its targets, a uid or gid.  This module holds one record type per kind and the
checks for each field (an AdminError says why a text is refused, citing the Postfix source a rule
comes from where there is one), plus the category names that label problems and counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from maplookup.address import split_address_list
from maplookup.db import admin_input
from maplookup.db.admin_input import Address, AdminError

from .problems import Origin

# tok822_parse() (src/global/tok822_parse.c) separates addresses at commas and white space.
_TARGET_SPLIT_RE = re.compile(r"[ \t\n\r\v\f,]+")
_ID_RE = re.compile(r"[0-9]+")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_QUOTED_RE = re.compile(r'"(?:[^"\\]|\\.)*"')
# RFC 5322 syntax (quoted local parts, comments, <route>) that the database cannot hold.
_UNSUPPORTED_IN_ADDRESS = frozenset('"\\<>();')

ALIAS_OF_PREFIX = "alias-of="
MAX_ID = 2**31 - 1  # the columns are PostgreSQL integers
MAX_PATH = 1024  # schema.sql, mailbox_path_relative

MAILBOX_DOMAINS = "mailbox domains"
ALIAS_DOMAINS = "alias domains"
MAILBOXES = "mailboxes"
ALIASES = "aliases"
UIDS = "uids"
GIDS = "gids"
CATEGORIES = (MAILBOX_DOMAINS, ALIAS_DOMAINS, MAILBOXES, ALIASES, UIDS, GIDS)


# -- typed records -----------------------------------------------------------------------------


@dataclass(slots=True)
class DomainRecord:
    name: str
    kind: str  # 'mailbox' | 'alias'
    origin: Origin
    enabled: bool = True
    alias_of: str | None = None
    declared: bool = True  # False: a bare-domain line in the virtual file (only if not mailbox)


@dataclass(slots=True)
class MailboxRecord:
    address: Address
    path: str
    origin: Origin
    enabled: bool = True


@dataclass(slots=True)
class AliasRecord:
    address: Address
    targets: list[str]
    origin: Origin
    enabled: bool = True


@dataclass(slots=True)
class IdRecord:
    """A uid or gid; ``address.local_part == ''`` is the ``@d`` key.

    ``@d`` is the domain default, unless export's note says otherwise (``fallback``): the
    key a hash: table answers for every address of the domain without a key of its own
    (virtual(8) asks it last), which maplookup fills with the catch-all mailbox's own id
    (``fallback == "catch-all"``), else the domain default, else the server's configured
    default (``fallback == "server"``); ``domain_default`` is then the domain's own.
    """

    address: Address
    value: int
    origin: Origin
    enabled: bool = True  # always: uid/gid files have no disabled marker
    fallback: str | None = None
    domain_default: int | None = None


# The notes export writes in the uids and gids files (``# maplookup-note: ...``), so that import
# gives back the records: the value of ``@d`` when it is not the domain default, and the
# lines repeating a mailbox's inherited id where the hash: table needs them.
FALLBACK_NOTE = "{key} is the fallback: {source}; domain default {default}"
INHERITED_NOTE = "inherited, not the mailbox's own: {key}"


# The virtual file's lines that only make a hash: table answer as maplookup does (mirror
# domains enumerated, identity lines next to a catch-all alias) stand between these notes.
DERIVED_BEGIN = "derived: begin"
DERIVED_END = "derived: end"


def fallback_note(key: str, source: str, default: int | None) -> str:
    return FALLBACK_NOTE.format(
        key=key, source=source, default="none" if default is None else default
    )


def inherited_note(key: str) -> str:
    return INHERITED_NOTE.format(key=key)


def parse_note(text: str) -> tuple[str, str, str | None, int | None] | None:
    """``("fallback", key, source, default)`` or ``("inherited", key, None, None)``."""
    inherited = INHERITED_NOTE.split("{key}")[0]
    if text.startswith(inherited):
        return "inherited", text[len(inherited) :].strip(), None, None
    key, sep, rest = text.partition(" is the fallback: ")
    if not sep:
        return None
    source, sep, default = rest.partition("; domain default ")
    if not sep or source not in ("catch-all", "server"):
        return None
    if default == "none":
        return "fallback", key, source, None
    return ("fallback", key, source, int(default)) if default.isdigit() else None


def _domain(text: str) -> str:
    if text.startswith("."):
        raise AdminError(f"{text!r} is a parent-domain pattern; list each domain itself")
    if text.startswith("!"):
        raise AdminError(f"{text!r}: negated patterns are not supported")
    if any(c in _UNSUPPORTED_IN_ADDRESS or c in "/:[]" for c in text):
        raise AdminError(f"invalid domain name: {text!r}")
    return admin_input.parse_domain(text)


def _address(text: str) -> Address:
    if any(c in "<>()" for c in _QUOTED_RE.sub("", text)):
        raise AdminError(f"{text!r}: comments and <...> are not supported")
    if "@" not in text:
        raise AdminError(
            f"{text!r} has no '@' (a bare local part matches only local domains in Postfix; "
            "write user@domain)"
        )
    address = admin_input.parse_address(text)
    _domain(address.domain)
    return address


def _path(text: str) -> str:
    if text.startswith("/"):
        raise AdminError(
            f"mailbox path {text!r} is absolute; it must be relative to virtual_mailbox_base"
        )
    if ".." in text.split("/"):
        raise AdminError(
            f"mailbox path {text!r} contains '..'; it must stay below virtual_mailbox_base"
        )
    if _CONTROL_RE.search(text):
        raise AdminError(f"mailbox path {text!r} contains control characters")
    if len(text) > MAX_PATH:
        raise AdminError(f"mailbox path longer than {MAX_PATH} characters")
    return text


def _targets(value: str) -> list[str]:
    """The targets of a virtual(5) result, as ``maplookup alias add`` takes them.

    Quoted local parts, local account names and a sole ``@domain`` are read as Postfix reads
    them (admin_input.parse_targets); comments and ``<...>`` are not.
    """
    texts: list[str] = []
    for text in split_address_list(value):
        if any(c in "<>()" for c in _QUOTED_RE.sub("", text)):
            raise AdminError(f"target {text!r}: comments and <...> are not supported")
        if text not in texts:
            texts.append(text)
    if not texts:
        raise AdminError("no targets")
    return admin_input.parse_targets(texts)


def _id(value: str, name: str) -> int:
    if not _ID_RE.fullmatch(value):
        raise AdminError(f"{name} {value!r} is not a number")
    number = int(value)
    if number <= 0:
        raise AdminError(f"{name} must be a positive number (0 is root), got {number}")
    if number > MAX_ID:
        raise AdminError(f"{name} {number} is too large")
    return number
