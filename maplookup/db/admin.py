"""Managing the data: domains, mailboxes and aliases, with errors an admin can act on.

The writes and listings; what an admin typed is parsed and checked in ``admin_input``.

Every change is one statement (or one transaction), so a refused change leaves nothing
half-written.  Input is checked first for a clear message, and again by the schema's constraints,
which are the last word for anyone writing SQL directly.  Runs on plain asyncio: admin commands
are one-shot and need no trio server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from maplookup.db import schema
from maplookup.db.admin_input import (
    Address,
    AdminError,
    check_id,
    check_path,
    parse_address,
    parse_domain,
    parse_login,
    parse_targets,
)


async def run_checked(conn: asyncpg.Connection, query: str, *args: Any, subject: str = "it") -> str:
    """Execute one statement, turning constraint violations into AdminError."""
    try:
        status: str = await conn.execute(query, *args)
    except asyncpg.UniqueViolationError as exc:
        raise AdminError(f"{subject} already exists") from exc
    except asyncpg.ForeignKeyViolationError as exc:
        raise AdminError(_foreign_key_message(exc)) from exc
    except asyncpg.CheckViolationError as exc:
        raise AdminError(f"refused by constraint {exc.constraint_name}") from exc
    except asyncpg.UndefinedTableError as exc:
        raise AdminError("the maplookup schema is missing: run `maplookup db init`") from exc
    return status


def _foreign_key_message(exc: asyncpg.ForeignKeyViolationError) -> str:
    constraint = exc.constraint_name or ""
    if constraint == "mailbox_in_mailbox_domain":
        return "no such mailbox domain (add it with `maplookup domain add DOMAIN`)"
    if constraint == "alias_of_is_mailbox_domain":
        return "--alias-of must name an existing mailbox domain"
    if constraint.startswith("aliases_domain"):
        return "no such domain (add it with `maplookup domain add DOMAIN [--alias]`)"
    if "still referenced" in str(exc) or "is still referenced" in (exc.detail or ""):
        return f"still in use: {exc.detail}"
    return f"{exc.detail or exc}"


def affected(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])


async def init_schema(conn: asyncpg.Connection) -> tuple[int | None, int]:
    """Create or upgrade the schema (see maplookup.schema); returns (version before, after)."""
    try:
        return await schema.upgrade(conn)
    except schema.SchemaError as exc:
        raise AdminError(str(exc)) from exc


# -- domains -----------------------------------------------------------------------------------


async def domain_add(
    conn: asyncpg.Connection,
    name: str,
    *,
    alias: bool = False,
    alias_of: str | None = None,
    relay: bool = False,
    uid: int | None = None,
    gid: int | None = None,
) -> None:
    """Add a mailbox domain, an alias domain (``alias``/``alias_of``) or a relay domain."""
    domain = parse_domain(name)
    target = parse_domain(alias_of) if alias_of is not None else None
    is_alias = alias or target is not None
    check_id("--uid", uid)
    check_id("--gid", gid)
    if (is_alias or relay) and (uid is not None or gid is not None):
        raise AdminError("--uid/--gid apply to mailbox domains only")
    if is_alias and relay:
        raise AdminError("a domain is an alias domain or a relay domain, not both")
    if target == domain:
        raise AdminError("a domain cannot mirror itself")
    await run_checked(
        conn,
        "INSERT INTO maplookup.domains (name, kind, alias_of, default_uid, default_gid)"
        " VALUES ($1, $2, $3, $4, $5)",
        domain,
        "relay" if relay else "alias" if is_alias else "mailbox",
        target,
        uid,
        gid,
        subject=f"domain {domain}",
    )


async def domain_set_ids(
    conn: asyncpg.Connection, name: str, *, uid: int | None = None, gid: int | None = None
) -> tuple[int | None, int | None]:
    """Give a mailbox domain default ids; returns its (default_uid, default_gid) afterwards.

    The fix for a domain added without ``--uid/--gid``: otherwise the only way to give it
    defaults would be removing it (and first everything in it) and adding it again.  An id
    not given is left as it is.
    """
    domain = parse_domain(name)
    if uid is None and gid is None:
        raise AdminError("give --uid, --gid or both")
    check_id("--uid", uid)
    check_id("--gid", gid)
    row = await conn.fetchrow(
        "UPDATE maplookup.domains SET default_uid = coalesce($2, default_uid),"
        " default_gid = coalesce($3, default_gid)"
        " WHERE name = $1 AND kind = 'mailbox' RETURNING default_uid, default_gid",
        domain,
        uid,
        gid,
    )
    if row is None:
        kind = await conn.fetchval("SELECT kind FROM maplookup.domains WHERE name = $1", domain)
        if kind is not None:
            raise AdminError(
                f"{domain} is {_KIND_TEXT[kind]}; default ids apply to mailbox domains"
            )
        raise AdminError(f"no such domain: {domain}")
    return row["default_uid"], row["default_gid"]


_KIND_TEXT = {"mailbox": "a mailbox domain", "alias": "an alias domain", "relay": "a relay domain"}


async def domain_remove(conn: asyncpg.Connection, name: str) -> None:
    domain = parse_domain(name)
    try:
        status = await conn.execute("DELETE FROM maplookup.domains WHERE name = $1", domain)
    except asyncpg.ForeignKeyViolationError as exc:
        raise AdminError(
            f"{domain} still has mailboxes, aliases, relay recipients or mirror domains;"
            " remove those first"
        ) from exc
    if affected(status) == 0:
        raise AdminError(f"no such domain: {domain}")


async def domain_set_enabled(conn: asyncpg.Connection, name: str, enabled: bool) -> None:
    domain = parse_domain(name)
    status = await run_checked(
        conn, "UPDATE maplookup.domains SET enabled = $2 WHERE name = $1", domain, enabled
    )
    if affected(status) == 0:
        raise AdminError(f"no such domain: {domain}")


async def domain_list(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT name, kind, alias_of, default_uid, default_gid, enabled"
            " FROM maplookup.domains ORDER BY name"
        )
    )


# -- mailboxes ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddedMailbox:
    """What ``mailbox_add`` wrote, with the ids virtual(8) gets from the data.

    ``uid``/``gid`` are the mailbox's own, else its domain's default, else None: None means
    only the server's ``lookup.default_uid``/``default_gid`` can supply one, which the CLI
    warns about.
    """

    address: Address
    path: str
    uid: int | None
    gid: int | None


async def mailbox_add(
    conn: asyncpg.Connection,
    address_text: str,
    *,
    path: str | None = None,
    uid: int | None = None,
    gid: int | None = None,
    login: str | None = None,
) -> AddedMailbox:
    """Add a mailbox (default path ``domain/localpart/``, a Maildir; default login its
    address, which then owns it as a sender); see AddedMailbox."""
    address = parse_address(address_text)
    login = parse_login(login) if login is not None else None
    if login is not None and address.is_catchall:
        raise AdminError("a catch-all mailbox has no login: grant @DOMAIN with `sender allow`")
    check_id("--uid", uid)
    check_id("--gid", gid)
    if path is None:
        if address.is_catchall:
            raise AdminError("a catch-all mailbox needs --path")
        path = f"{address.domain}/{address.local_part}/"
    check_path(path)
    domain = await conn.fetchrow(
        "SELECT kind, default_uid, default_gid FROM maplookup.domains WHERE name = $1",
        address.domain,
    )
    if domain is None:
        raise AdminError(f"no such domain: {address.domain} (add it with `maplookup domain add`)")
    if domain["kind"] != "mailbox":
        raise AdminError(
            f"{address.domain} is {_KIND_TEXT[domain['kind']]}; mailboxes need a mailbox domain"
        )
    await run_checked(
        conn,
        "INSERT INTO maplookup.mailboxes (domain, local_part, path, uid, gid, login)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        address.domain,
        address.local_part,
        path,
        uid,
        gid,
        login,
        subject=f"mailbox {address}",
    )
    return AddedMailbox(
        address,
        path,
        uid if uid is not None else domain["default_uid"],
        gid if gid is not None else domain["default_gid"],
    )


async def mailbox_set(
    conn: asyncpg.Connection,
    address_text: str,
    *,
    path: str | None = None,
    uid: int | None = None,
    gid: int | None = None,
    login: str | None = None,
) -> asyncpg.Record:
    """Change a mailbox's path, ids or login (what is not given is left as it is); returns
    the mailbox afterwards.  Moving the path moves no mail: the admin moves the directory."""
    address = parse_address(address_text)
    if path is None and uid is None and gid is None and login is None:
        raise AdminError("give --path, --uid, --gid or --login")
    check_id("--uid", uid)
    check_id("--gid", gid)
    if path is not None:
        check_path(path)
    if login is not None:
        login = parse_login(login)
        if address.is_catchall:
            raise AdminError("a catch-all mailbox has no login: grant @DOMAIN with `sender allow`")
    try:
        row: asyncpg.Record | None = await conn.fetchrow(
            "UPDATE maplookup.mailboxes SET path = coalesce($3, path), uid = coalesce($4, uid),"
            " gid = coalesce($5, gid), login = coalesce($6, login)"
            " WHERE domain = $1 AND local_part = $2"
            " RETURNING local_part || '@' || domain AS address, path, uid, gid, login",
            address.domain,
            address.local_part,
            path,
            uid,
            gid,
            login,
        )
    except asyncpg.CheckViolationError as exc:
        raise AdminError(f"refused by constraint {exc.constraint_name}") from exc
    if row is None:
        raise AdminError(f"no such mailbox: {address}")
    return row


async def mailbox_remove(conn: asyncpg.Connection, address_text: str) -> None:
    address = parse_address(address_text)
    status = await run_checked(
        conn,
        "DELETE FROM maplookup.mailboxes WHERE domain = $1 AND local_part = $2",
        address.domain,
        address.local_part,
    )
    if affected(status) == 0:
        raise AdminError(f"no such mailbox: {address}")


async def mailbox_set_enabled(conn: asyncpg.Connection, address_text: str, enabled: bool) -> None:
    address = parse_address(address_text)
    status = await run_checked(
        conn,
        "UPDATE maplookup.mailboxes SET enabled = $3 WHERE domain = $1 AND local_part = $2",
        address.domain,
        address.local_part,
        enabled,
    )
    if affected(status) == 0:
        raise AdminError(f"no such mailbox: {address}")


async def mailbox_list(conn: asyncpg.Connection, domain: str | None = None) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT local_part || '@' || domain AS address, path, uid, gid, login, enabled"
            " FROM maplookup.mailboxes WHERE $1::text IS NULL OR domain = $1"
            " ORDER BY domain, local_part",
            parse_domain(domain) if domain else None,
        )
    )


# -- aliases -----------------------------------------------------------------------------------


async def alias_add(
    conn: asyncpg.Connection, address_text: str, targets: list[str]
) -> tuple[Address, list[str]]:
    """Add an alias; returns the address and targets as stored (folded), for the CLI to show."""
    address = parse_address(address_text)
    parsed = parse_targets(targets)
    domain = await conn.fetchrow(
        "SELECT kind, alias_of FROM maplookup.domains WHERE name = $1", address.domain
    )
    if domain is None:
        raise AdminError(f"no such domain: {address.domain} (add it with `maplookup domain add`)")
    if domain["kind"] == "relay":
        raise AdminError(
            f"{address.domain} is a relay domain: its mail goes to another host, which has its"
            " aliases (add its valid recipients with `maplookup relay-recipient add`)"
        )
    if address.is_catchall and domain["alias_of"] is not None:
        raise AdminError(
            f"{address.domain} mirrors {domain['alias_of']}: its unknown users are refused, so "
            "a catch-all alias there would never be used (give the target domain one instead)"
        )
    await run_checked(
        conn,
        "INSERT INTO maplookup.aliases (domain, local_part, targets) VALUES ($1, $2, $3)",
        address.domain,
        address.local_part,
        parsed,
        subject=f"alias {address}",
    )
    return address, parsed


async def alias_set(
    conn: asyncpg.Connection, address_text: str, targets: list[str]
) -> tuple[Address, list[str]]:
    """Replace an alias's targets; returns the address and the targets as stored."""
    address = parse_address(address_text)
    parsed = parse_targets(targets)
    status = await run_checked(
        conn,
        "UPDATE maplookup.aliases SET targets = $3 WHERE domain = $1 AND local_part = $2",
        address.domain,
        address.local_part,
        parsed,
    )
    if affected(status) == 0:
        raise AdminError(f"no such alias: {address} (add it with `maplookup alias add`)")
    return address, parsed


async def alias_remove(conn: asyncpg.Connection, address_text: str) -> None:
    address = parse_address(address_text)
    status = await run_checked(
        conn,
        "DELETE FROM maplookup.aliases WHERE domain = $1 AND local_part = $2",
        address.domain,
        address.local_part,
    )
    if affected(status) == 0:
        raise AdminError(f"no such alias: {address}")


async def alias_set_enabled(conn: asyncpg.Connection, address_text: str, enabled: bool) -> None:
    address = parse_address(address_text)
    status = await run_checked(
        conn,
        "UPDATE maplookup.aliases SET enabled = $3 WHERE domain = $1 AND local_part = $2",
        address.domain,
        address.local_part,
        enabled,
    )
    if affected(status) == 0:
        raise AdminError(f"no such alias: {address}")


async def alias_list(conn: asyncpg.Connection, domain: str | None = None) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT local_part || '@' || domain AS address,"
            " array_to_string(targets, ',') AS targets, enabled"
            " FROM maplookup.aliases WHERE $1::text IS NULL OR domain = $1"
            " ORDER BY domain, local_part",
            parse_domain(domain) if domain else None,
        )
    )
