"""Managing the records of the maps beyond delivery: sender grants, relay recipients, transports.

``smtpd_sender_login_maps`` (explicit owners of sender addresses), ``relay_recipient_maps``
(valid recipients of relay domains) and ``transport_maps``.  Input is parsed in
``admin_input``; the schema's constraints are the last word, as for the other records
(``admin``).  Runs on plain asyncio, like every admin command.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from maplookup.db.admin import affected, run_checked
from maplookup.db.admin_input import (
    WILDCARD,
    Address,
    AdminError,
    TransportKey,
    parse_address,
    parse_domain,
    parse_login,
    parse_transport,
    parse_transport_key,
)

# -- sender grants (smtpd_sender_login_maps) ---------------------------------------------------


async def sender_allow(
    conn: asyncpg.Connection, address_text: str, login_text: str
) -> tuple[Address, str]:
    """Let ``login`` use ``address`` (``@domain``: every address of the domain) as sender."""
    address = parse_address(address_text)
    login = parse_login(login_text)
    await run_checked(
        conn,
        "INSERT INTO maplookup.sender_grants (domain, local_part, login) VALUES ($1, $2, $3)",
        address.domain,
        address.local_part,
        login,
        subject=f"the grant of {address} to {login}",
    )
    return address, login


async def sender_deny(
    conn: asyncpg.Connection, address_text: str, login_text: str
) -> tuple[Address, str]:
    """Remove a grant made by ``sender_allow``.

    Only grants can be removed: a mailbox's own login and the mailboxes an alias delivers to
    own an address by what the data says, so the error says so rather than pretending.
    """
    address = parse_address(address_text)
    login = parse_login(login_text)
    status = await run_checked(
        conn,
        "DELETE FROM maplookup.sender_grants"
        " WHERE domain = $1 AND local_part = $2 AND lower(login) = lower($3)",
        address.domain,
        address.local_part,
        login,
    )
    if affected(status) == 0:
        owners = await conn.fetchval("SELECT maplookup.sender_login($1, '')", str(address))
        if owners and login.lower() in (o.lower() for o in owners.split(",")):
            raise AdminError(
                f"{login} owns {address} as a mailbox login or through an alias, not by a grant:"
                " change the mailbox or alias instead"
            )
        raise AdminError(f"no grant of {address} to {login} (see `maplookup sender list`)")
    return address, login


async def sender_list(conn: asyncpg.Connection, domain: str | None = None) -> list[asyncpg.Record]:
    """The explicit grants, by address (``@domain`` for a whole domain)."""
    return list(
        await conn.fetch(
            "SELECT local_part || '@' || domain AS address, login"
            " FROM maplookup.sender_grants WHERE $1::text IS NULL OR domain = $1"
            " ORDER BY domain, local_part, login",
            parse_domain(domain) if domain else None,
        )
    )


# -- relay recipients (relay_recipient_maps) ---------------------------------------------------


async def _require_domain(conn: asyncpg.Connection, domain: str) -> None:
    if not await conn.fetchval("SELECT true FROM maplookup.domains WHERE name = $1", domain):
        raise AdminError(
            f"no such domain: {domain} (add it with `maplookup domain add {domain} --relay`)"
        )


async def relay_recipient_add(conn: asyncpg.Connection, address_text: str) -> Address:
    """Accept ``address`` (``@domain``: every address) at RCPT where its domain is relayed:
    a relay domain, or a hosted domain on a backup MX (beyond its mailboxes and aliases)."""
    address = parse_address(address_text)
    await _require_domain(conn, address.domain)
    await run_checked(
        conn,
        "INSERT INTO maplookup.relay_recipients (domain, local_part) VALUES ($1, $2)",
        address.domain,
        address.local_part,
        subject=f"relay recipient {address}",
    )
    return address


async def relay_recipient_remove(conn: asyncpg.Connection, address_text: str) -> Address:
    address = parse_address(address_text)
    status = await run_checked(
        conn,
        "DELETE FROM maplookup.relay_recipients WHERE domain = $1 AND local_part = $2",
        address.domain,
        address.local_part,
    )
    if affected(status) == 0:
        raise AdminError(f"no such relay recipient: {address}")
    return address


async def relay_recipient_list(
    conn: asyncpg.Connection, domain: str | None = None
) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT local_part || '@' || domain AS address"
            " FROM maplookup.relay_recipients WHERE $1::text IS NULL OR domain = $1"
            " ORDER BY domain, local_part",
            parse_domain(domain) if domain else None,
        )
    )


# -- transports (transport_maps) ---------------------------------------------------------------


def _with_subdomains(key: TransportKey, subdomains: bool) -> list[TransportKey]:
    """The entries one ``transport set`` writes: a domain also covers its subdomains (the
    ``.domain`` entry of a transport(5) table) unless told otherwise."""
    if (
        subdomains
        and not key.local_part
        and key.domain not in (WILDCARD,)
        and (not key.domain.startswith("."))
    ):
        return [key, TransportKey("." + key.domain)]
    return [key]


@dataclass(frozen=True, slots=True)
class TransportSet:
    """What ``transport set`` did: the entries written (with what each held before, if
    anything), and the ``.domain`` entry it left alone (``--no-subdomains``)."""

    written: list[tuple[TransportKey, str | None]]
    transport: str
    kept: tuple[TransportKey, str] | None = None


async def transport_set(
    conn: asyncpg.Connection, key_text: str, transport_text: str, *, subdomains: bool = True
) -> TransportSet:
    """Route ``key`` (address, domain, ``.domain`` or ``*``) to ``transport:nexthop``;
    replaces what the key had."""
    key = parse_transport_key(key_text)
    keys = _with_subdomains(key, subdomains)
    transport = parse_transport(transport_text)
    written: list[tuple[TransportKey, str | None]] = []
    async with conn.transaction():
        for each in keys:
            before: str | None = await conn.fetchval(
                "SELECT transport FROM maplookup.transports WHERE domain = $1 AND local_part = $2",
                each.domain,
                each.local_part,
            )
            await run_checked(
                conn,
                "INSERT INTO maplookup.transports (domain, local_part, transport)"
                " VALUES ($1, $2, $3) ON CONFLICT (domain, local_part)"
                " DO UPDATE SET transport = excluded.transport",
                each.domain,
                each.local_part,
                transport,
            )
            written.append((each, before))
        kept = None
        if not subdomains and not key.local_part and key.domain not in (WILDCARD,):
            sub = TransportKey("." + key.domain.lstrip("."))
            held = await conn.fetchval(
                "SELECT transport FROM maplookup.transports WHERE domain = $1 AND local_part = ''",
                sub.domain,
            )
            if held is not None and sub != key:
                kept = (sub, held)
    return TransportSet(written, transport, kept)


async def transport_unset(
    conn: asyncpg.Connection, key_text: str, *, subdomains: bool = True
) -> list[TransportKey]:
    """Remove the entries ``transport_set`` wrote for the same key; returns those removed."""
    removed = []
    async with conn.transaction():
        for key in _with_subdomains(parse_transport_key(key_text), subdomains):
            status = await run_checked(
                conn,
                "DELETE FROM maplookup.transports WHERE domain = $1 AND local_part = $2",
                key.domain,
                key.local_part,
            )
            if affected(status):
                removed.append(key)
    if not removed:
        raise AdminError(
            f"no transport entry for {key_text.strip()} (see `maplookup transport list`)"
        )
    return removed


async def transport_list(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT CASE WHEN local_part = '' THEN domain ELSE local_part || '@' || domain END"
            " AS key, transport FROM maplookup.transports"
            " ORDER BY ltrim(domain, '.'), domain LIKE '.%', local_part"
        )
    )
