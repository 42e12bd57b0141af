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

from maplookup.address import fold, quote_local, unquote_local


class MapName(enum.StrEnum):
    """The maps maplookup answers, named as Postfix will address them in socketmap requests."""

    DOMAINS = "domains"  # virtual_mailbox_domains
    ALIAS_DOMAINS = "alias_domains"  # virtual_alias_domains
    VIRTUAL = "virtual"  # virtual_alias_maps
    VMAILBOX = "vmailbox"  # virtual_mailbox_maps
    UID = "uid"  # virtual_uid_maps
    GID = "gid"  # virtual_gid_maps
    SENDER_LOGIN = "sender_login"  # smtpd_sender_login_maps
    RELAY_DOMAINS = "relay_domains"  # relay_domains
    RELAY_RECIPIENTS = "relay_recipients"  # relay_recipient_maps
    TRANSPORT = "transport"  # transport_maps

    @property
    def postfix_parameter(self) -> str:
        """The main.cf parameter this map serves."""
        return _POSTFIX_PARAMETERS[self]

    @property
    def is_address_map(self) -> bool:
        """Address maps take ``user@domain`` keys (``transport`` also a domain or ``*``);
        the domain lists take bare domains."""
        return self not in _DOMAIN_MAPS

    @property
    def depends_on_other_domains(self) -> bool:
        """Whether an answer can change when a domain other than the key's changes.

        ``sender_login`` follows alias targets into any domain; ``relay_domains`` and
        ``transport`` match parent domains (and ``*``).  The cache invalidates their answers
        on every change instead of per domain (lookup/cache.py).
        """
        return self in _CROSS_DOMAIN_MAPS


_POSTFIX_PARAMETERS = {
    MapName.DOMAINS: "virtual_mailbox_domains",
    MapName.ALIAS_DOMAINS: "virtual_alias_domains",
    MapName.VIRTUAL: "virtual_alias_maps",
    MapName.VMAILBOX: "virtual_mailbox_maps",
    MapName.UID: "virtual_uid_maps",
    MapName.GID: "virtual_gid_maps",
    MapName.SENDER_LOGIN: "smtpd_sender_login_maps",
    MapName.RELAY_DOMAINS: "relay_domains",
    MapName.RELAY_RECIPIENTS: "relay_recipient_maps",
    MapName.TRANSPORT: "transport_maps",
}
_DOMAIN_MAPS = frozenset({MapName.DOMAINS, MapName.ALIAS_DOMAINS, MapName.RELAY_DOMAINS})
_CROSS_DOMAIN_MAPS = frozenset({MapName.SENDER_LOGIN, MapName.RELAY_DOMAINS, MapName.TRANSPORT})

MAP_BY_WIRE_NAME: dict[bytes, MapName] = {m.value.encode(): m for m in MapName}


@dataclass(frozen=True, slots=True)
class LookupSettings:
    """The settings that change what the SQL functions answer; part of every query."""

    recipient_delimiter: str = "+"
    default_uid: int | None = None
    default_gid: int | None = None
    # Postfix's smtputf8_enable: full Unicode case folding of keys when true, ASCII only when
    # false (src/util/casefold.c).  Must match main.cf, like the delimiter.
    smtputf8_enable: bool = True


Query = tuple[str, tuple[object, ...]]


# The SQL function behind each map is ``maplookup.<map name>``, except for ``virtual``: the
# server asks for the match and applies the received case itself (virtual_answer.py), while
# pgsql: tables call ``maplookup.virtual``.  After the key each takes these parameters, bound
# from LookupSettings by ``_settings_args``.
_FUNCTIONS = {m: f"maplookup.{m.value}" for m in MapName} | {
    MapName.VIRTUAL: "maplookup.virtual_match"
}
_MORE_PARAMETERS = {
    MapName.DOMAINS: "",
    MapName.ALIAS_DOMAINS: "",
    MapName.VIRTUAL: ", $2::text",
    MapName.VMAILBOX: ", $2::text",
    MapName.UID: ", $2::text, $3::int",
    MapName.GID: ", $2::text, $3::int",
    MapName.SENDER_LOGIN: ", $2::text",
    MapName.RELAY_DOMAINS: "",
    MapName.RELAY_RECIPIENTS: ", $2::text",
    MapName.TRANSPORT: ", $2::text",
}


def _settings_args(map_name: MapName, settings: LookupSettings) -> tuple[object, ...]:
    if map_name in _DOMAIN_MAPS:
        return ()
    if map_name is MapName.UID:
        return (settings.recipient_delimiter, settings.default_uid)
    if map_name is MapName.GID:
        return (settings.recipient_delimiter, settings.default_gid)
    return (settings.recipient_delimiter,)


def sql_key(map_name: MapName, key: str) -> str:
    """The form of a folded key the SQL functions take: the external (quoted) form.

    The address functions read their key as Postfix sends it to a pgsql: table, quoted where
    the local part is not a dot-atom (``maplookup.split_address`` unquotes it, as
    src/global/mail_addr_find.c does).  The server holds the internal form, so a local part
    with a quote or a backslash is quoted again before it is bound; without this it was
    unquoted twice, and ``"a\\"b"@example.com`` answered for the mailbox ``ab@example.com``.
    """
    if ('"' in key or "\\" in key) and map_name.is_address_map and "@" in key:
        return quote_local(key)
    return key


def query_for(map_name: MapName, key: str, settings: LookupSettings) -> Query:
    """The one statement that answers ``map_name`` for a folded key, with its bound arguments.

    Keys only ever travel as bound parameters, never spliced into SQL text.  The statements
    are constants, so asyncpg's per-connection statement cache prepares each once.
    """
    query = f"SELECT {_FUNCTIONS[map_name]}($1::text{_MORE_PARAMETERS[map_name]})"
    return query, (sql_key(map_name, key), *_settings_args(map_name, settings))


def batch_query_for(map_name: MapName, settings: LookupSettings) -> Query:
    """The statement that answers ``map_name`` for many keys at once (``$1``, text[] of
    :func:`sql_key` forms).

    One row per key, in the keys' order, each computed by the very function ``query_for``
    calls, so a key answers the same alone or in a batch.  One statement for a batch costs
    PostgreSQL and the client a fraction of one statement per key: 125 to 150 µs of
    PostgreSQL CPU per single-key statement on the benchmark machine, about 30 µs per key in
    batches of 64 (bench/README.md, "Miss path").
    """
    query = (
        f"SELECT {_FUNCTIONS[map_name]}(k{_MORE_PARAMETERS[map_name]})"
        " FROM unnest($1::text[]) WITH ORDINALITY AS t(k, i) ORDER BY i"
    )
    return query, _settings_args(map_name, settings)


def decode_key(map_name: MapName, raw_key: bytes) -> str | None:
    """The key as text, in internal (unquoted) form for address maps; None if it cannot exist.

    A key that is not valid UTF-8 or holds a NUL byte cannot be stored in PostgreSQL text:
    NOTFOUND without a query (DESIGN.md §2.9: never TEMP, never a crash for such keys).
    Postfix sends a local part that is not a dot-atom in quoted form
    (``"joe+odd user"@example.org``, src/global/quote_822_local.c); the maps hold internal
    forms, as a hash: table's lookup does after unquoting.
    """
    try:
        key = raw_key.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\x00" in key:
        return None
    return unquote_local(key) if map_name.is_address_map else key


def fold_key(map_name: MapName, raw_key: bytes, smtputf8: bool = True) -> str | None:
    """Fold a key as Postfix would for a ``hash:`` table, or None if it cannot exist.

    Address keys arrive in the case the sender typed (cleanup queries virtual_alias_maps with
    the original case), possibly quoted; domain keys arrive folded.  Both are unquoted
    (:func:`decode_key`) and folded here as Postfix folds (src/util/casefold.c: full Unicode
    case folding when ``smtputf8`` is Postfix's smtputf8_enable = yes, ASCII otherwise).  An
    address key without ``@`` or with an empty domain names no row: NOTFOUND at once.
    """
    decoded = decode_key(map_name, raw_key)
    return None if decoded is None else fold_decoded(map_name, decoded, smtputf8)


def fold_decoded(map_name: MapName, decoded: str, smtputf8: bool = True) -> str | None:
    """:func:`fold_key` for a key already through :func:`decode_key` (which the lookup layer
    keeps, to carry the received case onto ``virtual`` answers without decoding twice)."""
    key = fold(decoded, smtputf8)
    at = key.rfind("@")
    if map_name is MapName.TRANSPORT and at < 0:
        # transport(5) keys: '*' (the wildcard Postfix asks for itself) or a bare domain.
        return key or None
    if map_name.is_address_map:
        if at < 0 or at == len(key) - 1:
            return None
    elif not key or at >= 0:
        return None
    return key
