"""A plain Python model of the map contract (DESIGN.md §3), written from the text, not the SQL.

It answers what each map must answer for a dataset held in Python dicts, so property tests can
compare the server against it.  Sources, rule by rule:

* DESIGN.md §2, facts 10 to 12: keys fold with full Unicode case folding (Python's
  ``str.casefold``, which equals Postfix's casefold.c on every code point); a quoted local part
  is read unquoted and every address in an answer is quoted again (quote_822_local.c, whose
  two functions are taken from ``maplookup.address``, tested on Postfix's own examples); what
  is carried onto an alias answer (the extension, the local part for ``@other``) keeps the
  case it was received in.
* DESIGN.md §3: keys are case-folded and split at their last ``@``; the recipient delimiter
  (a set of characters) marks an extension; disabled rows do not exist; anything malformed is
  NOTFOUND; the table of answers per map.
* DESIGN.md §2.9 and ``maplookup/maps.py``'s docstring: an invalid (non-UTF-8) key, or one
  holding NUL, is NOTFOUND.
* schema.sql comments: the split follows Postfix's split_addr.c (no split for postmaster,
  mailer-daemon, double-bounce, nor owner-*/*-request when '-' is a delimiter, nor when the
  local part before the delimiter would be empty); mailbox fallback order exact, without
  extension, catch-all; an alias target ``@other`` becomes ``<matched local part>@other`` and,
  when the match needed the extension stripped, the extension goes before the last ``@`` of
  every target; a mirror domain answers only for addresses that resolve in its target domain;
  uid/gid: a mailbox's own, else domain default, else configured default, else the catch-all
  mailbox's own; any other address of a mailbox domain: the catch-all mailbox's own, else
  the domain default, else the configured default (what '@d' gives virtual(8)).

Nothing here calls the database.  A value of None means NOTFOUND.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from maplookup.address import quote_local, unquote_local

ADDRESS_MAPS = frozenset({"virtual", "vmailbox", "uid", "gid"})
DOMAIN_MAPS = frozenset({"domains", "alias_domains"})
ALL_MAPS = ADDRESS_MAPS | DOMAIN_MAPS

# split_addr.c never splits these (schema.sql's split_address comment).
_NEVER_SPLIT = frozenset({"postmaster", "mailer-daemon", "double-bounce"})


@dataclass(frozen=True, slots=True)
class Domain:
    name: str
    kind: str  # "mailbox" or "alias"
    alias_of: str | None = None
    default_uid: int | None = None
    default_gid: int | None = None
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class Mailbox:
    domain: str
    local_part: str  # "" is the catch-all @domain
    path: str
    uid: int | None = None
    gid: int | None = None
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class Alias:
    domain: str
    local_part: str  # "" is the catch-all @domain
    targets: tuple[str, ...]
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class Dataset:
    domains: tuple[Domain, ...] = ()
    mailboxes: tuple[Mailbox, ...] = ()
    aliases: tuple[Alias, ...] = ()

    async def load(self, conn: Any) -> None:
        """Replace the maplookup tables' rows with this dataset (an asyncpg connection)."""
        async with conn.transaction():
            await conn.execute(
                "TRUNCATE maplookup.aliases, maplookup.mailboxes, maplookup.relay_recipients,"
                " maplookup.domains"
            )
            # Mirror targets first: alias_of must reference an existing mailbox domain.
            ordered = sorted(self.domains, key=lambda d: d.alias_of is not None)
            await conn.executemany(
                "INSERT INTO maplookup.domains"
                " (name, kind, alias_of, default_uid, default_gid, enabled)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                [
                    (d.name, d.kind, d.alias_of, d.default_uid, d.default_gid, d.enabled)
                    for d in ordered
                ],
            )
            await conn.executemany(
                "INSERT INTO maplookup.mailboxes (domain, local_part, path, uid, gid, enabled)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                [(m.domain, m.local_part, m.path, m.uid, m.gid, m.enabled) for m in self.mailboxes],
            )
            await conn.executemany(
                "INSERT INTO maplookup.aliases (domain, local_part, targets, enabled)"
                " VALUES ($1, $2, $3, $4)",
                [(a.domain, a.local_part, list(a.targets), a.enabled) for a in self.aliases],
            )


@dataclass(frozen=True, slots=True)
class _Split:
    local_part: str
    domain: str
    base_part: str | None
    extension: str | None


@dataclass
class MapModel:
    """The expected answer of every map for one dataset and one set of lookup settings."""

    data: Dataset
    delimiter: str = "+"
    default_uid: int | None = None
    default_gid: int | None = None
    _domains: dict[str, Domain] = field(init=False)
    _mailboxes: dict[tuple[str, str], Mailbox] = field(init=False)
    _aliases: dict[tuple[str, str], Alias] = field(init=False)

    def __post_init__(self) -> None:
        self._domains = {d.name: d for d in self.data.domains if d.enabled}
        self._mailboxes = {(m.domain, m.local_part): m for m in self.data.mailboxes if m.enabled}
        self._aliases = {(a.domain, a.local_part): a for a in self.data.aliases if a.enabled}

    # -- entry points ------------------------------------------------------------------------

    def answer(self, map_name: str, raw_key: bytes) -> str | None:
        """The value Postfix must get for ``map_name``/``raw_key``, None for NOTFOUND.

        KeyError for a map name the server does not serve (that is PERM, not a lookup).
        """
        if map_name not in ALL_MAPS:
            raise KeyError(map_name)
        key = self.fold(map_name, raw_key)
        if key is None:
            return None
        received = unquote_local(raw_key.decode("utf-8"))
        if map_name == "domains":
            return self._domain_of_kind(key, "mailbox")
        if map_name == "alias_domains":
            return self._domain_of_kind(key, "alias")
        if map_name == "vmailbox":
            found = self._find_mailbox(key, include_catchall=True)
            return None if found is None else found[0].path
        if map_name in ("uid", "gid"):
            return self._id(map_name, key)
        match = self._virtual(key)
        if match is None:
            return None
        return self._render(match, received[: received.rfind("@")])

    @staticmethod
    def fold(map_name: str, raw_key: bytes) -> str | None:
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if "\x00" in key:
            return None
        if map_name in ADDRESS_MAPS:
            key = unquote_local(key)
        key = key.casefold()
        if map_name in ADDRESS_MAPS:
            at = key.rfind("@")
            if at < 0 or at == len(key) - 1:
                return None
        elif not key or "@" in key:
            return None
        return key

    # -- rules -------------------------------------------------------------------------------

    def _domain_of_kind(self, key: str, kind: str) -> str | None:
        domain = self._domains.get(key)
        return key if domain is not None and domain.kind == kind else None

    def _split(self, key: str) -> _Split | None:
        at = key.rfind("@")
        if at < 0 or at == len(key) - 1:
            return None
        local, domain = key[:at], key[at + 1 :]
        base = extension = None
        low = local.lower()  # split_addr.c compares these names case-insensitively
        splittable = (
            self.delimiter
            and local
            and low not in _NEVER_SPLIT
            and not (
                "-" in self.delimiter and (low.startswith("owner-") or low.endswith("-request"))
            )
        )
        if splittable:
            positions = [local.find(c) for c in self.delimiter if c in local]
            if positions and min(positions) > 0:
                cut = min(positions)
                base, extension = local[:cut], local[cut:]
        return _Split(local, domain, base, extension)

    def _find_mailbox(self, key: str, *, include_catchall: bool) -> tuple[Mailbox, Domain] | None:
        split = self._split(key)
        if split is None:
            return None
        domain = self._domains.get(split.domain)
        if domain is None or domain.kind != "mailbox":
            return None
        candidates = [split.local_part]
        if split.base_part is not None:
            candidates.append(split.base_part)
        if include_catchall:
            candidates.append("")
        for local_part in candidates:
            mailbox = self._mailboxes.get((split.domain, local_part))
            if mailbox is not None:
                return mailbox, domain
        return None

    def _id(self, map_name: str, key: str) -> str | None:
        """virtual(8) asks user+ext@d, user@d, then @d (mail_addr_find.c), so '@d' -- the
        catch-all mailbox's own id, else the domain default, else the configured default --
        is what an address gets when its own keys have nothing (DESIGN.md §3, uid/gid)."""
        split = self._split(key)
        if split is None:
            return None
        domain = self._domains.get(split.domain)
        if domain is None or domain.kind != "mailbox":
            return None
        uid = map_name == "uid"
        domain_default = domain.default_uid if uid else domain.default_gid
        configured = self.default_uid if uid else self.default_gid
        catchall = self._mailboxes.get((split.domain, ""))
        own_catchall = None if catchall is None else (catchall.uid if uid else catchall.gid)
        candidates = [split.local_part]
        if split.base_part is not None:
            candidates.append(split.base_part)
        chain: tuple[int | None, ...] = (own_catchall, domain_default, configured)
        for local_part in candidates:
            mailbox = self._mailboxes.get((split.domain, local_part)) if local_part else None
            if mailbox is not None:
                own = mailbox.uid if uid else mailbox.gid
                chain = (own, domain_default, configured, own_catchall)
                break
        value = next((v for v in chain if v is not None), None)
        return None if value is None else str(value)

    def _render(self, match: tuple[str, tuple[str, ...]], received_local: str) -> str:
        """Postfix's mail_addr_map: '@other' takes the received local part; after a match
        without the extension ("B"), the received extension goes before each target's last
        '@' (at the end of a local account name); every address quoted."""
        kind, targets = match
        extension = None
        if kind == "B":
            received = self._split(received_local + "@x")
            extension = None if received is None else received.extension
        out = []
        for target in targets:
            if target.startswith("@"):
                full = received_local + target
            elif extension is not None:
                at = target.rfind("@")
                full = target + extension if at < 0 else target[:at] + extension + target[at:]
            else:
                full = target
            out.append(quote_local(full))
        return ",".join(out)

    def _exists(self, domain: str, local: str) -> bool:
        """An enabled mailbox or alias of an enabled domain (disabled ones do not exist)."""
        if domain not in self._domains:
            return False
        return (domain, local) in self._mailboxes or (domain, local) in self._aliases

    def _virtual(self, key: str) -> tuple[str, tuple[str, ...]] | None:
        """The match a hash: table would make: ("E" exact | "B" without extension |
        "C" catch-all, targets as stored)."""
        split = self._split(key)
        if split is None:
            return None
        domain = self._domains.get(split.domain)
        if domain is None:
            return None
        local = split.local_part
        if local:
            alias = self._aliases.get((split.domain, local))
            if alias is not None:
                return "E", alias.targets
            if split.base_part is not None:
                alias = self._aliases.get((split.domain, split.base_part))
                if alias is not None:
                    return "B", alias.targets
        if domain.alias_of is not None:
            # Answered only for addresses that exist in the target domain, as from a hash:
            # table enumerating the mirror: exact, without extension, or its catch-all.
            target = domain.alias_of
            if local and self._exists(target, local):
                return "E", (f"{local}@{target}",)
            if split.base_part is not None and self._exists(target, split.base_part):
                return "B", (f"{split.base_part}@{target}",)
            if self._exists(target, ""):
                return "C", (f"@{target}",)
            return None
        catchall = self._aliases.get((split.domain, ""))
        if catchall is None:
            return None
        # A catch-all never swallows a real mailbox: it answers for itself, as a hash:
        # table's identity line (box@d box@d) does.
        if local and (split.domain, local) in self._mailboxes:
            return "E", (f"{local}@{split.domain}",)
        if split.base_part is not None and (split.domain, split.base_part) in self._mailboxes:
            return "B", (f"{split.base_part}@{split.domain}",)
        return "C", catchall.targets
