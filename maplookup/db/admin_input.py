"""What an admin typed: domains, addresses, alias targets and ids, parsed and checked.

Owns the syntax a record must have before it is written (folded as Postfix folds keys,
targets in the forms virtual(5) reads as meant), the id bounds and the low-uid warning, and
``AdminError``, the one-line refusal every admin command and import reports.  Shared by the
writes (``admin``), the record commands and ``import``; no SQL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from maplookup.address import fold, split_address_list, unquote_local

_DOMAIN_RE = re.compile(r"^[^@\s,\x00-\x1f\x7f]+$")
_LOCAL_RE = re.compile(r"^[^\s,\x00-\x1f\x7f]*$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# A target in external form: a dot-atom or a quoted string as local part (a local account
# name has no domain), or '@domain' alone (RFC 5322 3.4.1, as quote_822_local.c writes them).
_ATOM = r'[^()<>@,;:\\".\[\]\s\x00-\x1f\x7f]+'
_LOCAL = rf'(?:{_ATOM}(?:\.{_ATOM})*|"(?:[^"\\\r\n]|\\.)*")'
_TARGET_DOMAIN = r'[^()<>@,;:\\"\[\]\s\x00-\x1f\x7f]+'
_TARGET_RE = re.compile(rf"{_LOCAL}(?:@{_TARGET_DOMAIN})?|@{_TARGET_DOMAIN}")


class AdminError(Exception):
    """A refused admin command; the message is one line, fit for stderr."""


@dataclass(frozen=True, slots=True)
class Address:
    """A folded address; ``local_part == ''`` is the catch-all ``@domain``."""

    local_part: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local_part}@{self.domain}"

    @property
    def is_catchall(self) -> bool:
        return self.local_part == ""


def parse_domain(text: str) -> str:
    """A domain name, folded as Postfix folds table keys (full Unicode case folding).

    Letters (any script: an internationalised name in UTF-8), digits, ``-``, ``_`` and dots:
    a name with anything else can never be an address's domain, so a record for it would be
    dead (transport(5) and Postfix's domain lists have no wildcards either).
    """
    stripped = text.strip()
    if stripped.startswith("*."):
        raise AdminError(
            f"invalid domain name: {text!r}: Postfix tables have no wildcards; give "
            f"{stripped[2:]!r} (a transport entry covers its subdomains too) or "
            f"'.{stripped[2:]}' (its subdomains only)"
        )
    domain = fold(stripped).rstrip(".")
    if not domain or not _DOMAIN_RE.match(domain) or ".." in domain or domain.startswith("."):
        raise AdminError(f"invalid domain name: {text!r}")
    bad = sorted({c for c in domain if not (c.isalnum() or c in "-_.")})
    if bad:
        raise AdminError(
            f"invalid domain name: {text!r}: {''.join(bad)!r} cannot be in a domain name "
            "(letters, digits, '-', '_' and dots)"
        )
    if len(domain) > 253:
        raise AdminError(f"domain name longer than 253 characters: {text[:40]!r}...")
    return domain


def parse_address(text: str, *, allow_catchall: bool = True) -> Address:
    """``user@domain`` or (when allowed) ``@domain``, unquoted and folded as Postfix folds keys.

    A quoted local part (``"taro."@example.com``) is read in its internal form, as Postfix
    looks it up; folding is Postfix's (src/util/casefold.c), so ``Straße@x`` is stored as
    ``strasse@x`` and found for every spelling Postfix folds to it.
    """
    local, sep, domain = unquote_local(text.strip()).rpartition("@")
    if not sep:
        raise AdminError(f"invalid address {text!r}: no '@'")
    if not local and not allow_catchall:
        raise AdminError(f"invalid address {text!r}: a catch-all is not allowed here")
    if not _LOCAL_RE.match(local) or len(local) > 64:
        raise AdminError(f"invalid local part in {text!r}")
    return Address(fold(local), parse_domain(domain))


def parse_target(text: str) -> str:
    """An alias target in internal (unquoted) form, its case kept.

    Postfix returns a table's result as written (only keys are folded), so a target keeps
    its case.  Three kinds, as virtual(5) and VIRTUAL_README have them:

    * ``user@domain``, quoted or not (``"joe user"@example.net`` is stored unquoted and
      quoted again in every answer and export);
    * ``@domain``: the received local part at another domain (only as the sole target);
    * ``name``, without ``@``: a local account, which Postfix completes with ``@$myorigin``.
    """
    stripped = text.strip()
    if not _TARGET_RE.fullmatch(stripped):
        raise AdminError(
            f'invalid target {text!r}: expected user@domain, "quoted local part"@domain, '
            "@domain or a local account name (RFC 5322 specials such as <>()[]:;@, and white "
            "space only inside quotes)"
        )
    internal = unquote_local(stripped)
    if not internal or _CONTROL_RE.search(internal) or internal[0] == "@" != stripped[0]:
        raise AdminError(f"invalid target {text!r}")  # e.g. ""@domain: an empty local part
    at = internal.rfind("@")
    if at < 0:
        return internal  # a local account name
    domain = internal[at + 1 :]
    if not domain or not _DOMAIN_RE.match(domain) or ".." in domain or domain.startswith("."):
        raise AdminError(f"invalid domain in target {text!r}")
    if len(internal[:at]) > 64:
        raise AdminError(f"local part longer than 64 characters in target {text!r}")
    return internal


def parse_targets(texts: list[str]) -> list[str]:
    """Alias targets (see :func:`parse_target`); ``@domain`` only as the sole target.

    Since Postfix 3.2 a result is read as ``@domain`` only when it starts the whole result,
    and then the whole list is taken as one quoted local part (``"u@h.test, x"@y.test``, mail
    lost); elsewhere in a list it gives ``""@domain``.  Neither is what an admin means.
    """
    # One argument may hold a list, as a virtual(5) value does ("a@x, b@y"): split it the way
    # Postfix splits a result, so `alias add` and `import` read the same text alike.
    texts = [t for text in texts for t in split_address_list(text)]
    if not texts:
        raise AdminError("an alias needs at least one target")
    targets = [parse_target(t) for t in texts]
    if len(targets) > 1 and any(t.startswith("@") for t in targets):
        raise AdminError(
            "a target @DOMAIN must be the only target of its alias: Postfix reads a list "
            "holding one as a single odd address (split it into separate aliases)"
        )
    return targets


# uid_t and gid_t are 32 bits, and the columns PostgreSQL integers.
MAX_ID = 2**31 - 1
# Postfix's default virtual_minimum_uid (postconf(5)): virtual(8) defers mail for lower uids.
POSTFIX_VIRTUAL_MINIMUM_UID = 100


def check_path(path: str) -> None:
    """A mailbox path stays below virtual_mailbox_base (the schema checks it again)."""
    if not path or path.startswith("/") or ".." in path.split("/"):
        raise AdminError(f"--path must be relative to virtual_mailbox_base, got {path!r}")


def check_id(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise AdminError(f"{name} must be a positive number (0 is root), got {value}")
    if value is not None and value > MAX_ID:
        raise AdminError(f"{name} {value} is too large (at most {MAX_ID})")


def low_uid_warning(value: int | None) -> str | None:
    """A warning for a uid below Postfix's default virtual_minimum_uid, or None."""
    if value is None or value >= POSTFIX_VIRTUAL_MINIMUM_UID:
        return None
    return (
        f"uid {value} is below Postfix's default virtual_minimum_uid "
        f"({POSTFIX_VIRTUAL_MINIMUM_UID}): virtual(8) defers such mail unless main.cf sets "
        f"virtual_minimum_uid = {value} or lower"
    )


# smtpd splits an owner list on commas and white space (src/smtpd/smtpd_check.c,
# CHARS_COMMA_SP); 320 = a 64-character local part, '@' and a 255-character domain.
MAX_LOGIN_LENGTH = 320
_LOGIN_RE = re.compile(r"^[^\s,\x00-\x1f\x7f]+$")


def parse_login(text: str) -> str:
    """A SASL login name as smtpd compares it (case-insensitively), kept as written."""
    login = text.strip()
    if not _LOGIN_RE.match(login) or len(login) > MAX_LOGIN_LENGTH:
        raise AdminError(
            f"invalid login {text!r}: a SASL login name without spaces, commas or control "
            f"characters, at most {MAX_LOGIN_LENGTH} characters"
        )
    return login


# transport(5) keys: '*', a domain, '.domain' (its subdomains), or user@domain.
WILDCARD = "*"
MAX_TRANSPORT_LENGTH = 1024


@dataclass(frozen=True, slots=True)
class TransportKey:
    """A transport(5) key: ``domain`` is a domain, ``.domain`` or ``*``; ``local_part`` is
    '' unless the key is one address."""

    domain: str
    local_part: str = ""

    def __str__(self) -> str:
        return f"{self.local_part}@{self.domain}" if self.local_part else self.domain


def parse_transport_key(text: str) -> TransportKey:
    """``*``, ``DOMAIN``, ``.DOMAIN`` or ``user@DOMAIN``, folded as Postfix folds keys."""
    stripped = text.strip()
    if stripped == WILDCARD:
        return TransportKey(WILDCARD)
    if stripped.startswith("@"):
        raise AdminError(
            f"invalid transport key {text!r}: transport(5) names a domain without '@' "
            f"(give {stripped[1:] or 'DOMAIN'!r})"
        )
    if "@" in stripped:
        address = parse_address(stripped, allow_catchall=False)
        return TransportKey(address.domain, address.local_part)
    if stripped.startswith("."):
        return TransportKey("." + parse_domain(stripped[1:]))
    return TransportKey(parse_domain(stripped))


def parse_transport(text: str) -> str:
    """A transport(5) value, ``transport:nexthop`` (either part may be empty), as written."""
    value = text.strip()
    if not value or _CONTROL_RE.search(value) or len(value) > MAX_TRANSPORT_LENGTH:
        raise AdminError(
            f"invalid transport {text!r}: expected TRANSPORT:NEXTHOP as in transport(5), e.g. "
            "lmtp:unix:private/dovecot-lmtp or smtp:[mx2.example.net]:25"
        )
    return value
