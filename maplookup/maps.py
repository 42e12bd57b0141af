"""The map contract on the Python side: which maps exist, how a key is folded, which SQL answers.

The lookup semantics themselves (extension stripping, catch-alls, mirror domains) live once in
the SQL functions of ``schema.sql``, so that the socketmap server and the ``pgsql:`` tables
that virtual(8) needs cannot disagree.  Python only decides what never needs the database: a
key that cannot name anything in it (invalid UTF-8, a NUL byte, an address map key without
``@``) is NOTFOUND straight away, because no row can ever match it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class MapName(enum.StrEnum):
    """The maps maplookup answers, named as Postfix will address them in socketmap requests."""

    DOMAINS = "domains"  # virtual_mailbox_domains
    ALIAS_DOMAINS = "alias_domains"  # virtual_alias_domains
    VIRTUAL = "virtual"  # virtual_alias_maps
    VMAILBOX = "vmailbox"  # virtual_mailbox_maps
    UID = "uid"  # virtual_uid_maps
    GID = "gid"  # virtual_gid_maps

    @property
    def postfix_parameter(self) -> str:
        """The main.cf parameter this map serves."""
        return _POSTFIX_PARAMETERS[self]

    @property
    def is_address_map(self) -> bool:
        """Address maps take ``user@domain`` keys; the two domain lists take bare domains."""
        return self not in (MapName.DOMAINS, MapName.ALIAS_DOMAINS)


_POSTFIX_PARAMETERS = {
    MapName.DOMAINS: "virtual_mailbox_domains",
    MapName.ALIAS_DOMAINS: "virtual_alias_domains",
    MapName.VIRTUAL: "virtual_alias_maps",
    MapName.VMAILBOX: "virtual_mailbox_maps",
    MapName.UID: "virtual_uid_maps",
    MapName.GID: "virtual_gid_maps",
}

MAP_BY_WIRE_NAME: dict[bytes, MapName] = {m.value.encode(): m for m in MapName}


@dataclass(frozen=True, slots=True)
class LookupSettings:
    """The settings that change what the SQL functions answer; part of every query."""

    recipient_delimiter: str = "+"
    default_uid: int | None = None
    default_gid: int | None = None


Query = tuple[str, tuple[object, ...]]


# The SQL function behind each map is ``maplookup.<map name>``; after the key it takes these
# parameters, bound from LookupSettings by ``_settings_args``.
_MORE_PARAMETERS = {
    MapName.DOMAINS: "",
    MapName.ALIAS_DOMAINS: "",
    MapName.VIRTUAL: ", $2::text",
    MapName.VMAILBOX: ", $2::text",
    MapName.UID: ", $2::text, $3::int",
    MapName.GID: ", $2::text, $3::int",
}


def _settings_args(map_name: MapName, settings: LookupSettings) -> tuple[object, ...]:
    if not map_name.is_address_map:
        return ()
    if map_name is MapName.UID:
        return (settings.recipient_delimiter, settings.default_uid)
    if map_name is MapName.GID:
        return (settings.recipient_delimiter, settings.default_gid)
    return (settings.recipient_delimiter,)


def query_for(map_name: MapName, key: str, settings: LookupSettings) -> Query:
    """The one statement that answers ``map_name`` for a folded key, with its bound arguments.

    Keys only ever travel as bound parameters, never spliced into SQL text.  The statements
    are constants, so asyncpg's per-connection statement cache prepares each once.
    """
    query = f"SELECT maplookup.{map_name.value}($1::text{_MORE_PARAMETERS[map_name]})"
    return query, (key, *_settings_args(map_name, settings))


def batch_query_for(map_name: MapName, settings: LookupSettings) -> Query:
    """The statement that answers ``map_name`` for many folded keys at once (``$1``, text[]).

    One row per key, in the keys' order, each computed by the very function ``query_for``
    calls, so a key answers the same alone or in a batch.  One statement for a batch costs
    PostgreSQL and the client a fraction of one statement per key: 125 to 150 µs of
    PostgreSQL CPU per single-key statement on the benchmark machine, about 30 µs per key in
    batches of 64 (bench/README.md, "Miss path").
    """
    query = (
        f"SELECT maplookup.{map_name.value}(k{_MORE_PARAMETERS[map_name]})"
        " FROM unnest($1::text[]) WITH ORDINALITY AS t(k, i) ORDER BY i"
    )
    return query, _settings_args(map_name, settings)


def fold_key(map_name: MapName, raw_key: bytes) -> str | None:
    """Fold a key as Postfix would for a case-insensitive table, or None if it cannot exist.

    Address keys arrive in the case the sender typed (cleanup queries virtual_alias_maps with
    the original case); domain keys arrive lower-cased.  Both are folded here.  A key that is
    not valid UTF-8 or holds a NUL byte cannot be stored in PostgreSQL text, and an address
    key without ``@`` or with an empty domain names no row: all of them are NOTFOUND without a
    query (DESIGN.md §2.9: never TEMP, never a crash for such keys).
    """
    try:
        key = raw_key.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\x00" in key:
        return None
    key = key.lower()
    if map_name.is_address_map:
        at = key.rfind("@")
        if at < 0 or at == len(key) - 1:
            return None
    elif not key or "@" in key:
        return None
    return key
