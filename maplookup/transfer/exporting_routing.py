"""``maplookup export`` of the maps beyond delivery: smtpd_sender_login_maps, relay_domains,
relay_recipient_maps and transport_maps, as the source files of ``hash:`` tables that make
Postfix answer exactly what maplookup answers.

maplookup derives most of these answers (a mailbox's login owns its address, an alias is owned
by the mailboxes it delivers to, a mirror domain answers like its target, a hosted domain's
valid recipients, for a backup MX, are its mailboxes and aliases); a hash: table has only keys.
So, as for the virtual file, export enumerates the keys whose answer a hash: table cannot
derive, asks the SQL functions the server asks (``maplookup.sender_login``,
``relay_recipients``) for each, and writes the derived lines between ``# maplookup-note:
derived`` notes that import skips.  The records themselves (grants, relay domains and
recipients, transports) are plain lines, with notes where a line also carries derived owners.
"""

from __future__ import annotations

from collections.abc import Mapping

import asyncpg

from .routing_records import grants_note, login_note
from .writing import ExportResult, MapWriter, checked, derived

ROUTING_FILES = ("sender_login", "relay_domains", "relay_recipients", "transport")

ROUTING_HEADERS = {
    "sender_login": (
        "smtpd_sender_login_maps: sender address -> the SASL logins that own it, comma-separated.",
        "Each line lists every owner maplookup answers (Postfix stops at the first key that",
        "matches: user+ext@domain, user@domain, @domain).  A `# maplookup-note: grants of KEY:`",
        "note names the explicit grants of a line that also carries derived owners; lines",
        "between `# maplookup-note: derived` notes (a mailbox's login, an alias's recipients, a",
        "mirror domain, @domain grants) follow from the other records, and import skips them.",
        "`login of ADDRESS:` notes keep mailbox logins other than the address itself.",
        "Postfix: smtpd_sender_login_maps = lmdb:/etc/postfix/sender_login.",
        "maplookup: `maplookup import --sender-login FILE`.",
    ),
    "relay_domains": (
        "relay_domains: the relay domains (relayed to another host, not hosted here).  Each",
        "covers its subdomains, as with parent_domain_matches_subdomains' default (which lists",
        "relay_domains); the derived `.domain` lines do the same without it.  A backup MX of the",
        "hosted domains lists the domains and alias_domains tables in relay_domains as well.",
        "Postfix: relay_domains = lmdb:/etc/postfix/relay_domains.",
        "maplookup: `maplookup import --relay-domains FILE`.",
    ),
    "relay_recipients": (
        "relay_recipient_maps: the valid recipients of relay domains (`@domain`: all of them).",
        "Between `# maplookup-note: derived` notes: the addresses a hosted domain accepts (its",
        "mailboxes and aliases, a mirror's target's), which a backup MX must accept too; import",
        "skips them.  `# disabled:` lines are records of disabled domains.",
        "Postfix: relay_recipient_maps = lmdb:/etc/postfix/relay_recipients.",
        "maplookup: `maplookup import --relay-recipients FILE`.",
    ),
    "transport": (
        "transport_maps (transport(5)): user@domain, domain, .domain (its subdomains) or *",
        "-> transport:nexthop.",
        "Postfix: transport_maps = lmdb:/etc/postfix/transport.",
        "maplookup: `maplookup import --transport FILE`.",
    ),
}


def _key(local_part: str, domain: str) -> str:
    return f"{local_part}@{domain}"


async def export_routing(
    conn: asyncpg.Connection,
    writers: Mapping[str, MapWriter],
    result: ExportResult,
    delimiter: str,
) -> None:
    """The four files, from the snapshot the caller holds."""
    await _export_sender_login(conn, writers["sender_login"], result, delimiter)
    await _export_relay_domains(conn, writers["relay_domains"], result)
    await _export_relay_recipients(conn, writers["relay_recipients"], result, delimiter)
    await _export_transports(conn, writers["transport"], result)


# The keys a sender-login table needs: every address that can have owners of its own (a
# mailbox, an alias, a grant), the same addresses in each domain mirroring theirs, and '@d'
# for the domains with grants and their mirrors.  Any other key answers what a hash: table's
# fallback (user@d without the extension, then @d) answers for it: sender_login's own rule.
_SENDER_KEYS = """
WITH own AS (
    SELECT local_part, domain FROM maplookup.mailboxes WHERE local_part <> ''
    UNION SELECT local_part, domain FROM maplookup.aliases WHERE local_part <> ''
    UNION SELECT local_part, domain FROM maplookup.sender_grants
), keys AS (
    SELECT local_part, domain FROM own
    UNION SELECT o.local_part, m.name FROM own o JOIN maplookup.domains m ON m.alias_of = o.domain
    UNION SELECT '', m.name FROM maplookup.sender_grants g
          JOIN maplookup.domains m ON m.alias_of = g.domain WHERE g.local_part = ''
)
SELECT k.local_part, k.domain,
       maplookup.sender_login(
           CASE WHEN k.local_part = '' THEN '@' || k.domain
                ELSE maplookup.quote_local(k.local_part || '@' || k.domain) END, $1) AS owners,
       ARRAY(SELECT g.login FROM maplookup.sender_grants g
             WHERE g.domain = k.domain AND g.local_part = k.local_part ORDER BY g.login) AS grants
FROM keys k
ORDER BY k.domain, k.local_part
"""


async def _export_sender_login(
    conn: asyncpg.Connection, writer: MapWriter, result: ExportResult, delimiter: str
) -> None:
    """One line per key with an answer; grants first, derived lines after (see _SENDER_KEYS)."""
    for row in await conn.fetch(
        "SELECT local_part, domain, login FROM maplookup.mailboxes"
        " WHERE local_part <> '' AND login IS DISTINCT FROM local_part || '@' || domain"
        " ORDER BY domain, local_part"
    ):
        writer.note(login_note(_key(row["local_part"], row["domain"]), row["login"]))
    derived_lines: list[tuple[str, str]] = []
    for row in await conn.fetch(_SENDER_KEYS, delimiter):
        key = _key(row["local_part"], row["domain"])
        answer: str | None = row["owners"]
        grants: list[str] = list(row["grants"])
        if answer is None:
            if grants:
                # The grants of a disabled domain: off, like the domain; kept for import.
                checked(writer, result, "sender grant", key, ",".join(grants), False)
            continue
        if not grants:
            derived_lines.append((key, answer))
            continue
        if set(grants) != set(answer.split(",")):
            writer.note(grants_note(key, grants))
        checked(writer, result, "sender grant", key, answer, True)
    derived(
        writer,
        result,
        "owners maplookup derives: mailbox logins, alias recipients, mirrors, @domain grants",
        derived_lines,
    )


async def _export_relay_domains(
    conn: asyncpg.Connection, writer: MapWriter, result: ExportResult
) -> None:
    """Each relay domain (``# disabled:`` when disabled), then ``.domain`` for each enabled one:
    match_hostname (src/util/match_ops.c) tries ``sub.domain``, ``domain`` under
    parent_domain_matches_subdomains, and ``sub.domain``, ``.domain`` without it."""
    rows = await conn.fetch(
        "SELECT name, enabled FROM maplookup.domains WHERE kind = 'relay' ORDER BY name"
    )
    for row in rows:
        checked(writer, result, "relay domain", row["name"], "OK", row["enabled"])
    derived(
        writer,
        result,
        "subdomains, for a parent_domain_matches_subdomains without relay_domains",
        [(f".{row['name']}", "OK") for row in rows if row["enabled"]],
    )


async def _export_relay_recipients(
    conn: asyncpg.Connection, writer: MapWriter, result: ExportResult, delimiter: str
) -> None:
    """The records, then each hosted domain's addresses as maplookup accepts them (what a
    backup MX accepts at RCPT: postfix-config --backup-mx)."""
    explicit: set[str] = set()
    for row in await conn.fetch(
        "SELECT r.domain, r.local_part, d.enabled AS active"
        " FROM maplookup.relay_recipients r JOIN maplookup.domains d ON d.name = r.domain"
        " ORDER BY r.domain, r.local_part"
    ):
        key = _key(row["local_part"], row["domain"])
        if row["active"]:
            explicit.add(key)
        checked(writer, result, "relay recipient", key, "OK", row["active"])
    rows = await conn.fetch(
        """
        WITH relayed AS (
            SELECT name, alias_of FROM maplookup.domains WHERE enabled AND kind <> 'relay'
        ), locals AS (
            SELECT domain, local_part FROM maplookup.mailboxes
            UNION SELECT domain, local_part FROM maplookup.aliases
        ), keys AS (
            SELECT r.name AS domain, l.local_part FROM relayed r
            JOIN locals l ON l.domain IN (r.name, r.alias_of)
        )
        SELECT domain, local_part FROM keys
        WHERE maplookup.relay_recipients(
            CASE WHEN local_part = '' THEN '@' || domain
                 ELSE maplookup.quote_local(local_part || '@' || domain) END, $1) IS NOT NULL
        ORDER BY domain, local_part
        """,
        delimiter,
    )
    by_domain: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        key = _key(row["local_part"], row["domain"])
        if key not in explicit:
            by_domain.setdefault(row["domain"], []).append((key, "OK"))
    for domain, lines in by_domain.items():
        catchall = f"@{domain}"
        if any(key == catchall for key, _ in lines):
            # '@domain' answers every address of it: the other lines would change nothing.
            lines = [(catchall, "OK")]
        derived(writer, result, f"{domain} is hosted here: the addresses it accepts", lines)


async def _export_transports(
    conn: asyncpg.Connection, writer: MapWriter, result: ExportResult
) -> None:
    for row in await conn.fetch(
        "SELECT domain, local_part, transport FROM maplookup.transports"
        " ORDER BY ltrim(domain, '.'), domain LIKE '.%', local_part"
    ):
        key = _key(row["local_part"], row["domain"]) if row["local_part"] else row["domain"]
        checked(writer, result, "transport", key, row["transport"], True)
