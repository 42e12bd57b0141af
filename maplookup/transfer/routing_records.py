"""The records of the maps beyond delivery, as import reads them, and the notes export writes.

``smtpd_sender_login_maps`` lines are ``ADDRESS owners`` (``@domain`` for a whole domain);
``relay_domains`` lines ``domain [value]``; ``relay_recipient_maps`` lines ``ADDRESS value``;
``transport`` lines ``KEY transport:nexthop`` with transport(5) keys.  An exported sender-login
line lists every owner maplookup answers (Postfix stops at the first key that matches), so the
notes below say which of them are explicit grants and which mailboxes have a login other than
their address; lines that only repeat what the records imply stand in ``derived`` blocks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from maplookup.db import admin_input
from maplookup.db.admin_input import Address, AdminError, TransportKey

from .problems import Origin
from .records import _address

SENDER_GRANTS = "sender grants"
MAILBOX_LOGINS = "mailbox logins"
RELAY_DOMAINS = "relay domains"
RELAY_RECIPIENTS = "relay recipients"
TRANSPORTS = "transports"
ROUTING_CATEGORIES = (SENDER_GRANTS, MAILBOX_LOGINS, RELAY_DOMAINS, RELAY_RECIPIENTS, TRANSPORTS)

# smtpd splits an owner list at commas and white space (src/smtpd/smtpd_check.c,
# CHARS_COMMA_SP).
_OWNERS_SPLIT_RE = re.compile(r"[, \t\n\r\v\f]+")

# Notes in the sender-login file (``# maplookup-note: ...``, comments to Postfix).
GRANTS_NOTE = "grants of "  # "grants of KEY: login,login": the explicit grants of KEY's line
LOGIN_NOTE = "login of "  # "login of ADDRESS: NAME": a mailbox whose login is not its address
NO_LOGIN_NOTE = "no login: "  # "no login: ADDRESS": a mailbox without a login


def grants_note(key: str, logins: list[str]) -> str:
    return f"{GRANTS_NOTE}{key}: {','.join(logins)}"


def login_note(key: str, login: str | None) -> str:
    return f"{NO_LOGIN_NOTE}{key}" if login is None else f"{LOGIN_NOTE}{key}: {login}"


@dataclass(frozen=True, slots=True)
class SenderNote:
    """A parsed note: ``kind`` is 'grants' (``logins`` the grants), 'login' or 'no login'."""

    kind: str
    key: str
    logins: tuple[str, ...]


def parse_sender_note(text: str) -> SenderNote | None:
    for prefix, kind in ((GRANTS_NOTE, "grants"), (LOGIN_NOTE, "login")):
        if text.startswith(prefix):
            key, sep, rest = text[len(prefix) :].rpartition(": ")
            if not sep or not key:
                return None
            return SenderNote(kind, key, tuple(x for x in _OWNERS_SPLIT_RE.split(rest) if x))
    if text.startswith(NO_LOGIN_NOTE):
        return SenderNote("no login", text[len(NO_LOGIN_NOTE) :].strip(), ())
    return None


@dataclass(slots=True)
class GrantRecord:
    """``address`` (``@domain``: every address of it) may be used as sender by ``logins``."""

    address: Address
    logins: tuple[str, ...]
    origin: Origin
    enabled: bool = True  # always: grants have no disabled state
    # Every owner the line lists (``logins`` are the grants among them when a note says so):
    # what Postfix answered for the key from that file, checked after the import.
    listed: tuple[str, ...] = ()


@dataclass(slots=True)
class LoginRecord:
    """A mailbox's login (None: it has none), from export's note."""

    address: Address
    login: str | None
    origin: Origin
    enabled: bool = True  # always: a login has no disabled state


@dataclass(slots=True)
class RelayDomainRecord:
    name: str
    origin: Origin
    enabled: bool = True


@dataclass(slots=True)
class RelayRecipientRecord:
    address: Address
    origin: Origin
    enabled: bool = True  # False: a record of a domain that is not relayed (now)


@dataclass(slots=True)
class TransportRecord:
    key: TransportKey
    transport: str
    origin: Origin
    enabled: bool = True  # always: transports have no disabled state


def owners(value: str) -> tuple[str, ...]:
    """The logins of a sender-login value, each checked as ``sender allow`` checks it."""
    logins = tuple(dict.fromkeys(x for x in _OWNERS_SPLIT_RE.split(value) if x))
    if not logins:
        raise AdminError("no login names")
    return tuple(admin_input.parse_login(login) for login in logins)


def sender_key(text: str) -> Address:
    """``user@domain`` or ``@domain``, as ``sender allow`` takes it."""
    return _address(text)


def relay_domain(text: str) -> str:
    return admin_input.parse_domain(text)


def transport_key(text: str) -> TransportKey:
    return admin_input.parse_transport_key(text)


def transport_value(text: str) -> str:
    return admin_input.parse_transport(text)
