"""Running an import against the database: fetch, plan, write, in one transaction; report.

:func:`import_parsed` locks the tables against other writers, fetches the rows the files name
(:func:`fetch_state`, one query per table), plans (planning.py), writes with COPY and one UPDATE
per kind of change (:func:`write_plan`), and rolls back on ``--dry-run`` or on errors without
``--skip-errors``.  :func:`summary_lines` is the report printed afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from maplookup.address import quote_local
from maplookup.db.admin_input import AdminError

from .importing_routing import bulk as _bulk
from .importing_routing import fetch_routing_state, write_routing
from .plan import Counts, DbAlias, DbDomain, DbMailbox, DbState, Plan
from .planning import plan_import
from .problems import _SILENT, PROGRESS_MIN_LINES, Progress
from .reading import Parsed
from .records import CATEGORIES, GIDS, UIDS
from .routing_records import ROUTING_CATEGORIES


async def fetch_state(conn: asyncpg.Connection, parsed: Parsed) -> DbState:
    """One query per table, keys passed as arrays: no round trip per record."""
    names: set[str] = set()
    for group in (parsed.mailbox_domains, parsed.alias_domains, parsed.virtual_domains):
        names.update(group)
        names.update(r.alias_of for r in group.values() if r.alias_of)
    # '@d' keys of the uid/gid files are domain defaults, not the catch-all mailbox.
    mailbox_keys = set(parsed.mailboxes) | {k for k in (*parsed.uids, *parsed.gids) if k[1] != ""}
    alias_keys = set(parsed.aliases)
    routing = parsed.routing
    mailbox_keys |= set(routing.logins)
    names.update(d for d, _ in (*mailbox_keys, *alias_keys, *parsed.uids, *parsed.gids))
    names.update(routing.relay_domains)
    names.update(d for d, _ in routing.relay_recipients)
    state = DbState()
    for row in await conn.fetch(
        "SELECT name, kind, alias_of, default_uid, default_gid, enabled"
        " FROM maplookup.domains WHERE name = ANY($1::text[])",
        sorted(names),
    ):
        state.domains[row["name"]] = DbDomain(
            row["kind"],
            row["alias_of"],
            row["default_uid"],
            row["default_gid"],
            row["enabled"],
        )
    keys = sorted(mailbox_keys)
    for row in await conn.fetch(
        "SELECT m.domain, m.local_part, m.path, m.uid, m.gid, m.enabled, m.login"
        " FROM maplookup.mailboxes m"
        " JOIN unnest($1::text[], $2::text[]) AS k(domain, local_part)"
        " ON m.domain = k.domain AND m.local_part = k.local_part",
        [d for d, _ in keys],
        [lp for _, lp in keys],
    ):
        state.mailboxes[(row["domain"], row["local_part"])] = DbMailbox(
            row["path"], row["uid"], row["gid"], row["enabled"], row["login"]
        )
    keys = sorted(alias_keys)
    for row in await conn.fetch(
        "SELECT a.domain, a.local_part, a.targets, a.enabled"
        " FROM maplookup.aliases a"
        " JOIN unnest($1::text[], $2::text[]) AS k(domain, local_part)"
        " ON a.domain = k.domain AND a.local_part = k.local_part",
        [d for d, _ in keys],
        [lp for _, lp in keys],
    ):
        state.aliases[(row["domain"], row["local_part"])] = DbAlias(
            tuple(row["targets"]), row["enabled"]
        )
    await fetch_routing_state(conn, parsed.routing, state)
    return state


# -- writing -----------------------------------------------------------------------------------


async def write_plan(conn: asyncpg.Connection, plan: Plan) -> None:
    """COPY the new rows and apply the updates as one statement per kind of change."""
    domain_columns = ["name", "kind", "alias_of", "default_uid", "default_gid", "enabled"]
    for kind in ("mailbox", "alias", "relay"):  # mirrors reference mailbox domains
        rows = [
            (name, d.kind, d.alias_of, d.default_uid, d.default_gid, d.enabled)
            for name, d in sorted(plan.domains.items())
            if d.kind == kind
        ]
        if rows:
            await conn.copy_records_to_table(
                "domains", schema_name="maplookup", columns=domain_columns, records=rows
            )
    await _bulk(
        conn,
        "UPDATE maplookup.domains d SET enabled = u.enabled"
        " FROM unnest($1::text[], $2::boolean[]) AS u(name, enabled) WHERE d.name = u.name",
        plan.domain_enabled,
    )
    for category, column in ((UIDS, "default_uid"), (GIDS, "default_gid")):
        await _bulk(
            conn,
            f"UPDATE maplookup.domains d SET {column} = u.value"
            " FROM unnest($1::text[], $2::integer[]) AS u(name, value) WHERE d.name = u.name",
            plan.domain_ids[category],
        )
    if plan.mailboxes:
        await conn.copy_records_to_table(
            "mailboxes",
            schema_name="maplookup",
            columns=["domain", "local_part", "path", "uid", "gid", "enabled"],
            records=[(*key, m.path, m.uid, m.gid, m.enabled) for key, m in plan.mailboxes.items()],
        )
    await _bulk(
        conn,
        "UPDATE maplookup.mailboxes m SET path = u.path, enabled = u.enabled"
        " FROM unnest($1::text[], $2::text[], $3::text[], $4::boolean[])"
        " AS u(domain, local_part, path, enabled)"
        " WHERE m.domain = u.domain AND m.local_part = u.local_part",
        plan.mailbox_updates,
    )
    for category, column in ((UIDS, "uid"), (GIDS, "gid")):
        await _bulk(
            conn,
            f"UPDATE maplookup.mailboxes m SET {column} = u.value"
            " FROM unnest($1::text[], $2::text[], $3::integer[]) AS u(domain, local_part, value)"
            " WHERE m.domain = u.domain AND m.local_part = u.local_part",
            plan.mailbox_ids[category],
        )
    if plan.aliases:
        await conn.copy_records_to_table(
            "aliases",
            schema_name="maplookup",
            columns=["domain", "local_part", "targets", "enabled"],
            records=[(*key, a.targets, a.enabled) for key, a in plan.aliases.items()],
        )
    # Targets cannot hold ',' (schema.sql, alias_targets_syntax): a joined string is safe.
    await _bulk(
        conn,
        "UPDATE maplookup.aliases a"
        " SET targets = string_to_array(u.targets, ','), enabled = u.enabled"
        " FROM unnest($1::text[], $2::text[], $3::text[], $4::boolean[])"
        " AS u(domain, local_part, targets, enabled)"
        " WHERE a.domain = u.domain AND a.local_part = u.local_part",
        plan.alias_updates,
    )
    await write_routing(conn, plan)


@dataclass(frozen=True, slots=True)
class ImportOptions:
    dry_run: bool = False
    skip_errors: bool = False
    replace: bool = False
    # The server's lookup.recipient_delimiter: the sender_login check asks with it.
    recipient_delimiter: str = "+"


async def import_parsed(
    conn: asyncpg.Connection,
    parsed: Parsed,
    options: ImportOptions,
    progress: Progress = _SILENT,
) -> tuple[Plan, bool]:
    """Check ``parsed`` against the database and write it in one transaction.

    Returns the plan and whether it was committed: not on --dry-run, not when there are errors
    and no --skip-errors.  The tables are locked against other writers (readers, i.e. the
    server, go on) so that what was checked is what gets written.
    """
    large = parsed.lines > PROGRESS_MIN_LINES
    result: list[Plan] = []
    try:
        async with conn.transaction():
            await conn.execute(
                "LOCK TABLE maplookup.domains, maplookup.mailboxes, maplookup.aliases,"
                " maplookup.sender_grants, maplookup.relay_recipients, maplookup.transports"
                " IN SHARE ROW EXCLUSIVE MODE"
            )
            if large:
                progress.show("checking against the database...")
            plan = plan_import(parsed, await fetch_state(conn, parsed), replace=options.replace)
            result.append(plan)
            if plan.errors and not options.skip_errors:
                raise _Rollback
            if large:
                progress.show(f"writing {plan.rows():,} rows...")
            try:
                await write_plan(conn, plan)
            except asyncpg.IntegrityConstraintViolationError as exc:
                # The checks above should make this unreachable; say what the database said.
                raise AdminError(f"the database refused the import: {exc}") from exc
            plan.widened_owners = await widened_owners(conn, parsed, options.recipient_delimiter)
            if options.dry_run:
                raise _Rollback
    except _Rollback:
        return result[0], False
    finally:
        progress.clear()
    return result[0], True


# How many widened sender addresses the summary names one by one.
WIDENED_SHOWN = 10


async def widened_owners(
    conn: asyncpg.Connection, parsed: Parsed, delimiter: str = "+"
) -> list[str]:
    """The sender_login keys of the file that maplookup now answers with more owners than
    the line listed, each as ``FILE:LINE: KEY also owned by X, Y``.

    A hand-written smtpd_sender_login_maps file means "the first key that matches"
    (src/global/mail_addr_find.c); maplookup gives every address of a domain that domain's
    ``@domain`` owners, and a mailbox its own login.  So a file with an ``@domain`` line
    beside its addresses' lines, or a mailbox whose line does not name its own login, gives
    more people the right to send as someone after import: the admin must hear of it.
    """
    widened: list[str] = []
    for record in parsed.routing.grants.values():
        address = record.address
        key = f"@{address.domain}" if address.is_catchall else quote_local(str(address))
        answer = await conn.fetchval("SELECT maplookup.sender_login($1, $2)", key, delimiter)
        listed = {owner.lower() for owner in record.listed}
        extra = [o for o in (answer or "").split(",") if o and o.lower() not in listed]
        if extra:
            widened.append(f"{record.origin}: {key} also owned by {', '.join(extra)}")
    return widened


class _Rollback(Exception):
    """Leave the import transaction without committing (dry run, or errors)."""


def summary_lines(plan: Plan, options: ImportOptions, committed: bool) -> list[str]:
    """The report on stdout: what was (or would be) added, left alone, replaced, skipped."""
    if options.dry_run:
        head = "dry run, nothing written; the import would do:"
    elif committed:
        head = "imported:"
    else:
        head = "nothing imported; the import would have done:"
    lines = [head]
    # The maps beyond delivery only when the import had something for them.
    shown = list(CATEGORIES) + [c for c in ROUTING_CATEGORIES if plan.counts[c] != Counts()]
    width = max(len(c) for c in shown) + 1
    for category in shown:
        counts = plan.counts[category]
        parts = [f"{counts.added} added", f"{counts.unchanged} unchanged"]
        if options.replace:
            parts.append(f"{counts.replaced} replaced")
        parts.append(f"{counts.skipped} skipped")
        lines.append(f"  {(category + ':').ljust(width)} {', '.join(parts)}")
    if plan.implied_mailbox_domains:
        lines.append(
            "mailbox domains created because the vmailbox file uses them (not in the domains "
            f"file): {_names(plan.implied_mailbox_domains)}"
        )
    if plan.implied_alias_domains:
        lines.append(
            "alias domains created because the virtual file has aliases in them (neither listed "
            f"nor implied): {_names(plan.implied_alias_domains)}"
        )
    if plan.mirror_lines:
        lines.append(
            f"{plan.mirror_lines} '@mirror @target' line(s) matched mirror domains (alias-of) "
            "and were taken as their hash-table equivalent"
        )
    for domain, target in plan.domain_forwards:
        lines.append(
            f"note: @{domain} -> @{target} is imported as a catch-all alias, as a hash table "
            "has it (every address is accepted, unknown ones bounce later); the stricter form "
            f"is `maplookup domain add {domain} --alias-of {target}` (after removing that alias "
            f"and domain), which accepts only addresses that exist in {target}"
        )
    if plan.widened_owners:
        lines.append(
            f"note: {len(plan.widened_owners)} sender address(es) now have more owners than "
            "their line listed (maplookup adds the domain's @domain owners and a mailbox's own "
            "login to every answer; a hash: table stops at the first key that matches); "
            "remove the grants you do not want with `maplookup sender deny`:"
        )
        lines += [f"  {line}" for line in plan.widened_owners[:WIDENED_SHOWN]]
        if len(plan.widened_owners) > WIDENED_SHOWN:
            lines.append(f"  ... and {len(plan.widened_owners) - WIDENED_SHOWN} more")
    if plan.mailbox_catchall_aliases:
        lines.append(
            "note: catch-all aliases in mailbox domains "
            f"({_names(plan.mailbox_catchall_aliases)}) never apply to addresses that are "
            "mailboxes (a hash table would apply them; list user@domain user@domain to get the "
            "same there)"
        )
    return lines


def _names(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
