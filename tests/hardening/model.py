"""A plain Python model of the map contract (DESIGN.md §3), written from the text, not the SQL.

It answers what each map must answer for a dataset held in Python dicts, so property tests can
compare the server against it.  Sources, rule by rule:

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
  uid/gid: mailbox's own, else domain default, else configured default.

Nothing here calls the database.  A value of None means NOTFOUND.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

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
            await conn.execute("TRUNCATE maplookup.aliases, maplookup.mailboxes, maplookup.domains")
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
        if map_name == "domains":
            return self._domain_of_kind(key, "mailbox")
        if map_name == "alias_domains":
            return self._domain_of_kind(key, "alias")
        if map_name == "vmailbox":
            found = self._find_mailbox(key, include_catchall=True)
            return None if found is None else found[0].path
        if map_name in ("uid", "gid"):
            return self._id(map_name, key)
        return self._virtual(key)

    @staticmethod
    def fold(map_name: str, raw_key: bytes) -> str | None:
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if "\x00" in key:
            return None
        key = key.lower()
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
        splittable = (
            self.delimiter
            and local
            and local not in _NEVER_SPLIT
            and not (
                "-" in self.delimiter and (local.startswith("owner-") or local.endswith("-request"))
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
        found = self._find_mailbox(key, include_catchall=True)
        if found is None:
            return None
        mailbox, domain = found
        if map_name == "uid":
            chain = (mailbox.uid, domain.default_uid, self.default_uid)
        else:
            chain = (mailbox.gid, domain.default_gid, self.default_gid)
        value = next((v for v in chain if v is not None), None)
        return None if value is None else str(value)

    @staticmethod
    def _expand(targets: Iterable[str], local_part: str, extension: str | None) -> str:
        out = []
        for target in targets:
            full = local_part + target if target.startswith("@") else target
            if extension is not None:
                at = full.rfind("@")
                full = full[:at] + extension + full[at:]
            out.append(full)
        return ",".join(out)

    def _virtual(self, key: str) -> str | None:
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
                return self._expand(alias.targets, local, None)
            if split.base_part is not None:
                alias = self._aliases.get((split.domain, split.base_part))
                if alias is not None:
                    return self._expand(alias.targets, split.base_part, split.extension)
        if domain.alias_of is not None:
            mirrored = f"{local}@{domain.alias_of}"
            if not local:
                return mirrored
            resolves = (
                self._find_mailbox(mirrored, include_catchall=True) is not None
                or self._virtual(mirrored) is not None
            )
            return mirrored if resolves else None
        # A catch-all never swallows a real mailbox.
        if local and self._find_mailbox(key, include_catchall=False) is not None:
            return None
        catchall = self._aliases.get((split.domain, ""))
        if catchall is not None:
            return self._expand(catchall.targets, local, None)
        return None
