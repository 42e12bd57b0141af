"""``maplookup export``: the database back as postmap(1) source files.

All files come from one repeatable-read snapshot; each is written to a temporary file and
renamed into place, so it appears complete or not at all (writing.py).  This module writes the
six delivery maps (virtual_*); exporting_routing.py the maps beyond delivery
(smtpd_sender_login_maps, relay_domains, relay_recipient_maps, transport_maps).  Each file's
header documents the markers that make export -> import lossless (``# disabled:``,
``alias-of=``, ``# maplookup-note:``).
"""

from __future__ import annotations

from pathlib import Path

import asyncpg

from maplookup.address import quote_local
from maplookup.db.admin_input import AdminError

from .exporting_routing import ROUTING_FILES, ROUTING_HEADERS, export_routing
from .records import (
    ALIAS_OF_PREFIX,
    GIDS,
    UIDS,
    fallback_note,
    inherited_note,
)
from .writing import ExportResult, MapWriter, checked, derived

# Export file names, in the order of the import options: the six delivery maps, then the
# routing maps (exporting_routing.py).
DELIVERY_FILES = ("domains", "alias_domains", "vmailbox", "virtual", "uids", "gids")
EXPORT_FILES = DELIVERY_FILES + ROUTING_FILES


# -- export ------------------------------------------------------------------------------------


_HEADERS = {
    "domains": (
        "virtual_mailbox_domains: the mailbox domains, one `domain OK` per line.",
        "Postfix: virtual_mailbox_domains = lmdb:/etc/postfix/domains (after `postmap lmdb:...`).",
        "maplookup: `maplookup import --domains FILE`.",
    ),
    "alias_domains": (
        "virtual_alias_domains: the alias domains (forwarding-only and mirrors).",
        "Postfix ignores the value.  `alias-of=DOMAIN` marks a mirror of DOMAIN for maplookup;",
        "the virtual file holds its hash-table equivalent, the catch-all `@mirror @DOMAIN`.",
        "Postfix: virtual_alias_domains = lmdb:/etc/postfix/alias_domains.",
        "maplookup: `maplookup import --alias-domains FILE`.",
    ),
    "vmailbox": (
        "virtual_mailbox_maps: mailbox -> path below virtual_mailbox_base (trailing / = Maildir).",
        "`@domain path` is a catch-all mailbox.",
        "Postfix: virtual_mailbox_maps = lmdb:/etc/postfix/vmailbox.",
        "maplookup: `maplookup import --vmailbox FILE`.",
    ),
    "virtual": (
        "virtual_alias_maps: address -> targets (comma-separated).  `@domain` is a catch-all;",
        "a target `@other` (only ever alone) keeps the local part; a target without `@` is a",
        "local account, which Postfix completes with `@$myorigin`.",
        "Between `# maplookup-note: derived` notes: the hash-table form of two maplookup rules",
        "(import skips them): a mirror domain answers only for the addresses of its target",
        "(one line each), and a catch-all alias never takes a mailbox (identity lines).",
        "Postfix: virtual_alias_maps = lmdb:/etc/postfix/virtual.",
        "maplookup: `maplookup import --virtual FILE`.",
    ),
    "uids": (
        "virtual_uid_maps: mailbox -> uid; `@domain uid` answers every other address of the",
        "domain: the catch-all mailbox's own uid, else the domain default, else the server's",
        "default (a `# maplookup-note:` says which, for import; Postfix ignores comments).",
        "Postfix: virtual_uid_maps = lmdb:/etc/postfix/uids.",
        "maplookup: `maplookup import --uids FILE`.",
    ),
    "gids": (
        "virtual_gid_maps: mailbox -> gid; `@domain gid` as in the uids file.",
        "Postfix: virtual_gid_maps = lmdb:/etc/postfix/gids.",
        "maplookup: `maplookup import --gids FILE`.",
    ),
}


def prepare_export_directory(directory: Path, *, force: bool) -> None:
    """Create ``directory``; refuse (before any database work) to overwrite without ``force``."""
    existing = [name for name in EXPORT_FILES if (directory / name).exists()]
    if existing and not force:
        raise AdminError(
            f"{directory} already holds {', '.join(existing)}; use --force to overwrite"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AdminError(f"cannot create {directory}: {exc.strerror or exc}") from exc


async def export_maps(
    conn: asyncpg.Connection,
    directory: Path,
    *,
    default_uid: int | None = None,
    default_gid: int | None = None,
    recipient_delimiter: str = "+",
) -> ExportResult:
    """Write the ten source files into ``directory`` (see prepare_export_directory) from one
    consistent snapshot; each file appears complete or not at all.

    ``default_uid``/``default_gid`` are the server's configured defaults (lookup.default_uid
    and default_gid): a hash: table has no configuration, so they are written where
    virtual(8) would need them.  ``recipient_delimiter`` is the server's (lookup.
    recipient_delimiter): the routing maps' answers depend on it, as the server's do.
    """
    result = ExportResult()
    writers: dict[str, MapWriter] = {}
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            database = str(await conn.fetchval("SELECT current_database()"))
            for name in EXPORT_FILES:
                header = _HEADERS.get(name) or ROUTING_HEADERS[name]
                writers[name] = MapWriter(directory, name, database, header)
            await _export_domains(conn, writers, result)
            await _export_mailboxes(conn, writers["vmailbox"], result)
            await _export_ids(conn, writers, result, {"uid": default_uid, "gid": default_gid})
            await _export_aliases(conn, writers["virtual"], result)
            await export_routing(conn, writers, result, recipient_delimiter)
        for writer in writers.values():
            writer.commit()
            result.written.append((writer.path, writer.entries, writer.disabled))
    except OSError as exc:
        raise AdminError(f"cannot write in {directory}: {exc.strerror or exc}") from exc
    finally:
        for writer in writers.values():
            if writer.temp.exists():
                writer.discard()
    return result


async def _export_domains(
    conn: asyncpg.Connection, writers: dict[str, MapWriter], result: ExportResult
) -> None:
    rows = await conn.fetch(
        "SELECT name, kind, alias_of, enabled FROM maplookup.domains ORDER BY name"
    )
    for row in rows:
        if row["kind"] == "relay":
            continue  # relay_domains only (exporting_routing.py)
        if row["kind"] == "mailbox":
            checked(writers["domains"], result, "domain", row["name"], "OK", row["enabled"])
        else:
            value = f"{ALIAS_OF_PREFIX}{row['alias_of']}" if row["alias_of"] else "OK"
            checked(writers["alias_domains"], result, "domain", row["name"], value, row["enabled"])


async def _export_mailboxes(
    conn: asyncpg.Connection, writer: MapWriter, result: ExportResult
) -> None:
    async for row in conn.cursor(
        "SELECT local_part || '@' || domain AS key, path, enabled FROM maplookup.mailboxes"
        " ORDER BY domain, local_part",
        prefetch=10_000,
    ):
        checked(writer, result, "mailbox", row["key"], row["path"], row["enabled"])


async def _export_ids(
    conn: asyncpg.Connection,
    writers: dict[str, MapWriter],
    result: ExportResult,
    defaults: dict[str, int | None],
) -> None:
    """uid and gid tables under which virtual(8) gets what maplookup answers.

    virtual(8) asks ``user+ext@d``, ``user@d``, then ``@d`` (src/global/mail_addr_find.c),
    and maplookup's rule (schema.sql, ``maplookup.mailbox_id``) is built on that: ``@d``
    holds the domain's fallback, the catch-all mailbox's own id, else the domain default,
    else the server's configured default (``defaults``, by column); a mailbox's own id has
    its own line.  A mailbox that inherits a value other than the fallback (the domain
    default while the catch-all mailbox has an id of its own) gets a line too, marked
    ``# maplookup-note: inherited`` for import.  When ``@d`` is not the domain default, a
    ``# maplookup-note:`` says what it is and what the domain default is, so import gives
    back the same records.
    """
    domains = await conn.fetch(
        "SELECT name, default_uid, default_gid FROM maplookup.domains WHERE kind = 'mailbox'"
        " ORDER BY name"
    )
    catchalls = {
        r["domain"]: r
        for r in await conn.fetch(
            "SELECT domain, uid, gid FROM maplookup.mailboxes WHERE local_part = '' AND enabled"
        )
    }
    mailboxes: dict[str, list[asyncpg.Record]] = {}
    async for row in conn.cursor(
        "SELECT domain, local_part, uid, gid, enabled FROM maplookup.mailboxes"
        " WHERE local_part <> '' ORDER BY domain, local_part",
        prefetch=10_000,
    ):
        mailboxes.setdefault(row["domain"], []).append(row)
    for category, column in ((UIDS, "uid"), (GIDS, "gid")):
        writer = writers[category]
        configured = defaults.get(column)
        for domain in domains:
            name = domain["name"]
            default: int | None = domain[f"default_{column}"]
            catchall = catchalls.get(name)
            own_catchall: int | None = None if catchall is None else catchall[column]
            fallback = next((v for v in (own_catchall, default, configured) if v is not None), None)
            key = f"@{name}"
            if fallback is not None:
                if own_catchall is not None or default is None:
                    source = "catch-all" if own_catchall is not None else "server"
                    writer.note(fallback_note(key, source, default))
                checked(writer, result, column, key, str(fallback), True)
            without = [r for r in mailboxes.get(name, ()) if r[column] is None and r["enabled"]]
            if fallback is None and without:
                result.warnings.append(
                    f"{category}: {len(without)} mailbox(es) of {name} have no {column} (none "
                    f"of their own, no domain or server default; give --default-{column} as "
                    "the server's): virtual(8) defers their mail"
                )
            for row in mailboxes.get(name, ()):
                mailbox_key = f"{row['local_part']}@{name}"
                own: int | None = row[column]
                if own is not None:
                    checked(writer, result, column, mailbox_key, str(own), True)
                    continue
                if not row["enabled"]:
                    continue
                inherited = next(
                    (v for v in (default, configured, own_catchall) if v is not None), None
                )
                if inherited is not None and inherited != fallback:
                    writer.note(inherited_note(mailbox_key))
                    checked(writer, result, column, mailbox_key, str(inherited), True)


async def _export_aliases(
    conn: asyncpg.Connection, writer: MapWriter, result: ExportResult
) -> None:
    """The aliases, then what a hash: table needs to answer as maplookup does.

    Two rules of maplookup's have no line of their own in virtual(5), so export writes their
    hash-table form (VIRTUAL_README's way), between ``# maplookup-note: derived`` notes
    that import skips:

    * a mirror domain answers only for addresses that exist in its target: one line per
      address of the target (``user@mirror user@target``), and ``@mirror @target`` only
      when the target has a catch-all; unknown users of the mirror are then refused at RCPT
      under Postfix too, instead of accepted and bounced;
    * a catch-all alias never swallows a mailbox: an identity line per mailbox of its domain
      (``box@d box@d``), which Postfix's lookup stops at (cleanup lets an address expand
      into itself once, src/cleanup/cleanup_map1n.c).
    """
    domains = {
        r["name"]: r
        for r in await conn.fetch("SELECT name, kind, alias_of, enabled FROM maplookup.domains")
    }
    own_aliases: dict[str, set[str]] = {}
    async for row in conn.cursor(
        "SELECT domain, local_part, targets, enabled FROM maplookup.aliases"
        " ORDER BY domain, local_part",
        prefetch=10_000,
    ):
        key = f"{row['local_part']}@{row['domain']}"
        targets: list[str] = list(row["targets"])
        domain = domains[row["domain"]]
        if row["local_part"] == "" and domain["alias_of"] is not None:
            writer.comment(
                f"not exported: catch-all alias {key} -> {','.join(targets)} is never used, "
                f"{row['domain']} is a mirror domain"
            )
            result.warnings.append(
                f"virtual: catch-all alias {key} not exported (never used in a mirror domain)"
            )
            continue
        if row["enabled"]:
            own_aliases.setdefault(row["domain"], set()).add(row["local_part"])
        # Targets are stored unquoted; a hash: table holds them as Postfix reads results, in
        # external form (src/global/quote_822_local.c).  '@domain' is only ever alone.
        value = ", ".join(t if t.startswith("@") else quote_local(t) for t in targets)
        checked(writer, result, "alias", key, value, row["enabled"])

    locals_by_domain: dict[str, list[str]] = {}
    for row in await conn.fetch(
        "SELECT domain, local_part FROM maplookup.mailboxes WHERE enabled"
        " UNION SELECT domain, local_part FROM maplookup.aliases WHERE enabled"
        " ORDER BY 1, 2"
    ):
        locals_by_domain.setdefault(row["domain"], []).append(row["local_part"])
    mailbox_locals: dict[str, list[str]] = {}
    for row in await conn.fetch(
        "SELECT domain, local_part FROM maplookup.mailboxes WHERE enabled AND local_part <> ''"
        " ORDER BY 1, 2"
    ):
        mailbox_locals.setdefault(row["domain"], []).append(row["local_part"])

    for name in sorted(domains):
        domain = domains[name]
        target = domain["alias_of"]
        if target is None or not domain["enabled"] or not domains[target]["enabled"]:
            continue
        own = own_aliases.get(name, set())
        lines = [
            (f"{local}@{name}", quote_local(f"{local}@{target}"))
            for local in locals_by_domain.get(target, ())
            if local and local not in own
        ]
        if "" in locals_by_domain.get(target, ()):
            lines.append((f"@{name}", f"@{target}"))
        derived(writer, result, f"{name} mirrors {target}: its addresses, one by one", lines)

    for name in sorted(domains):
        domain = domains[name]
        own = own_aliases.get(name, set())
        if domain["kind"] != "mailbox" or not domain["enabled"] or "" not in own:
            continue
        lines = [
            (f"{local}@{name}", quote_local(f"{local}@{name}"))
            for local in mailbox_locals.get(name, ())
            if local not in own
        ]
        derived(writer, result, f"the catch-all alias @{name} does not take its mailboxes", lines)


def export_summary(result: ExportResult) -> list[str]:
    lines = []
    for path, active, disabled in result.written:
        extra = f", {disabled} disabled (commented out)" if disabled else ""
        lines.append(f"wrote {path}: {active} entries{extra}")
    return lines
