"""Fetching and writing the records of the maps beyond delivery, inside import's transaction.

:func:`fetch_routing_state` reads the rows the files name (one query per table, keys passed as
arrays); :func:`write_routing` writes what planning_routing.py decided: relay recipients,
transports, grants and mailbox logins.  Also home of :func:`bulk`, the one-statement
form of many updates that both writers use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from maplookup.db.admin_input import TransportKey

from .plan import DbState, Plan
from .reading_routing import RoutingParsed


async def bulk(conn: asyncpg.Connection, query: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """One statement for many rows: each column travels as one array parameter (unnest)."""
    if rows:
        await conn.execute(query, *[list(column) for column in zip(*rows, strict=True)])


def _columns(keys: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    return [d for d, _ in keys], [lp for _, lp in keys]


async def fetch_routing_state(
    conn: asyncpg.Connection, routing: RoutingParsed, state: DbState
) -> None:
    grant_keys = sorted(routing.grants)
    for row in await conn.fetch(
        "SELECT g.domain, g.local_part, g.login FROM maplookup.sender_grants g"
        " JOIN unnest($1::text[], $2::text[]) AS k(domain, local_part)"
        " ON g.domain = k.domain AND g.local_part = k.local_part",
        *_columns(grant_keys),
    ):
        state.grants.add((row["domain"], row["local_part"], row["login"]))
    recipient_keys = sorted(routing.relay_recipients)
    for row in await conn.fetch(
        "SELECT r.domain, r.local_part FROM maplookup.relay_recipients r"
        " JOIN unnest($1::text[], $2::text[]) AS k(domain, local_part)"
        " ON r.domain = k.domain AND r.local_part = k.local_part",
        *_columns(recipient_keys),
    ):
        state.relay_recipients.add((row["domain"], row["local_part"]))
    transport_keys = sorted((k.domain, k.local_part) for k in routing.transports)
    for row in await conn.fetch(
        "SELECT t.domain, t.local_part, t.transport FROM maplookup.transports t"
        " JOIN unnest($1::text[], $2::text[]) AS k(domain, local_part)"
        " ON t.domain = k.domain AND t.local_part = k.local_part",
        *_columns(transport_keys),
    ):
        state.transports[TransportKey(row["domain"], row["local_part"])] = row["transport"]


async def write_routing(conn: asyncpg.Connection, plan: Plan) -> None:
    """After the domains and mailboxes are in: the rows that reference them."""
    if plan.relay_recipients:
        await conn.copy_records_to_table(
            "relay_recipients",
            schema_name="maplookup",
            columns=["domain", "local_part"],
            records=plan.relay_recipients,
        )
    await bulk(
        conn,
        "INSERT INTO maplookup.transports (domain, local_part, transport)"
        " SELECT * FROM unnest($1::text[], $2::text[], $3::text[])"
        " ON CONFLICT (domain, local_part) DO UPDATE SET transport = excluded.transport",
        sorted((k.domain, k.local_part, t) for k, t in plan.transports.items()),
    )
    if plan.grants:
        await conn.copy_records_to_table(
            "sender_grants",
            schema_name="maplookup",
            columns=["domain", "local_part", "login"],
            records=plan.grants,
        )
    await bulk(
        conn,
        "UPDATE maplookup.mailboxes m SET login = u.login"
        " FROM unnest($1::text[], $2::text[], $3::text[]) AS u(domain, local_part, login)"
        " WHERE m.domain = u.domain AND m.local_part = u.local_part",
        plan.mailbox_logins,
    )
