"""Generate the Postfix configuration that uses maplookup: main.cf, master.cf, pgsql: files.

Two paths read the maps, and both must answer alike (DESIGN.md §2.6):

* smtpd (recipient validation), cleanup (alias expansion) and trivial-rewrite (domain classes)
  read them over socketmap (or tcp_table) from the maplookup server, cached and resilient;
* virtual(8) refuses socketmap and tcp tables for virtual_mailbox_maps, virtual_uid_maps and
  virtual_gid_maps (it opens them with DICT_FLAG_PARANOID; src/global/dict_sockmap.c answers
  "map is not allowed for security-sensitive data").  It gets ``pgsql:`` tables that call the
  very same SQL functions the server calls, with the same delimiter and defaults.

So the generated text is the one place where the two paths are tied together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from maplookup.config import HostPort
from maplookup.db.servers import host_list
from maplookup.maps import MapName

# The maps virtual(8) reads and therefore needs as pgsql: tables.
DELIVERY_MAPS = (MapName.VMAILBOX, MapName.UID, MapName.GID)

# The maps that go over socketmap/tcp_table in main.cf.
SERVED_MAPS = (
    MapName.DOMAINS,
    MapName.ALIAS_DOMAINS,
    MapName.VIRTUAL,
    MapName.VMAILBOX,
    MapName.SENDER_LOGIN,
    MapName.RELAY_DOMAINS,
    MapName.RELAY_RECIPIENTS,
    MapName.TRANSPORT,
)


@dataclass(frozen=True)
class PostfixConfigOptions:
    """What the admin chose; defaults are the usual single-host layout."""

    pgsql_dsn: str
    socketmap: HostPort | None = field(default_factory=lambda: HostPort.parse("127.0.0.1:9000"))
    socketmap_unix: Path | None = None
    tcp_tables: dict[MapName, HostPort] = field(default_factory=dict)
    recipient_delimiter: str = "+"
    virtual_mailbox_base: Path = Path("/var/mail/vhosts")
    default_uid: int | None = None
    default_gid: int | None = None
    virtual_minimum_uid: int | None = None
    pgsql_dir: Path = Path("/etc/postfix")
    # A backup MX for the hosted domains: relays them, delivers nothing (generate_backup_mx).
    backup_mx: bool = False


@dataclass(frozen=True)
class GeneratedConfig:
    main_cf: str
    master_cf: str
    pgsql_files: dict[str, str]  # file name -> content

    def render(self) -> str:
        """Everything as one text, each part headed by where it goes."""
        parts = ["# ---- main.cf (add to /etc/postfix/main.cf) ----", self.main_cf]
        if self.master_cf:
            parts += ["# ---- master.cf (replace the 'virtual' service) ----", self.master_cf]
        for name, content in self.pgsql_files.items():
            parts += [f"# ---- {name} (mode 0640, group postfix) ----", content]
        return "\n".join(parts)


def _sql_literal(text: str) -> str:
    """A SQL string literal that survives Postfix's %-expansion in pgsql queries."""
    return "'" + text.replace("'", "''").replace("%", "%%") + "'"


def _sql_int(value: int | None) -> str:
    return "NULL" if value is None else str(int(value))


def pgsql_query(map_name: MapName, options: PostfixConfigOptions) -> str:
    """The query virtual(8) runs: the server's SQL function, with the server's settings.

    ``WHERE v IS NOT NULL`` turns "not found" into no row; a NULL row would make Postfix log
    "empty lookup result ... ignored" on every miss.  ``client_key``/``client_value`` undo
    the LATIN1 session of Postfix before 3.8 (schema.sql), without which a UTF-8 address is
    not found by virtual(8) (or found as someone else) after smtpd accepted it.
    """
    delimiter = _sql_literal(options.recipient_delimiter)
    key = "maplookup.client_key('%s')"
    if map_name is MapName.VMAILBOX:
        call = f"maplookup.vmailbox({key}, {delimiter})"
    elif map_name is MapName.UID:
        call = f"maplookup.uid({key}, {delimiter}, {_sql_int(options.default_uid)})"
    elif map_name is MapName.GID:
        call = f"maplookup.gid({key}, {delimiter}, {_sql_int(options.default_gid)})"
    else:
        raise ValueError(f"{map_name.value} is not read by virtual(8)")
    return f"SELECT maplookup.client_value(v) FROM {call} AS v WHERE v IS NOT NULL"


def _database_name(dsn: str) -> str:
    """Postfix insists on a ``dbname`` line even when the URI in ``hosts`` names the database."""
    path = urlsplit(dsn).path.lstrip("/")
    return unquote(path) or "maplookup"


def _hosts_lines(dsn: str) -> list[str]:
    """The ``hosts`` line of a pgsql: file, with why it looks as it does.

    Postfix's pgsql client picks among the entries of ``hosts`` at random, and before Postfix
    3.10 takes a single entry out of use for ``retry_interval`` (60 s) after one failure
    (pgsql_table(5)): virtual(8) would defer mail for a minute after one dropped
    connection.  So the URI is given twice.  A host list goes inside the URI, where libpq
    tries the hosts in order and ``target_session_attrs`` (``prefer-standby``) chooses among
    them: the very list and preference the maplookup server uses.
    """
    lines = ["# The same URI twice: see pgsql_table(5), hosts (a single entry is out of use"]
    lines.append("# for retry_interval after one failure before Postfix 3.10).")
    uri = pgsql_hosts_uri(dsn)
    if uri != dsn:
        lines.append("# libpq tries the hosts in order, as target_session_attrs prefers; the")
        lines.append("# commas are %2C because Postfix splits hosts on commas and spaces.")
    return [*lines, f"hosts = {uri} {uri}"]


def pgsql_hosts_uri(dsn: str) -> str:
    """``dsn`` as one entry of a pgsql: file's ``hosts``, which Postfix splits on commas and
    white space (src/global/dict_pgsql.c: argv_split(hosts, CHARS_COMMA_SP)).

    A host list (``postgresql://u@h1:5432,h2:5432/db``) would be cut at its comma; libpq also
    reads it as ``?host=h1%2Ch2&port=5432%2C5432`` (it decodes URI parameters before
    splitting the lists), which has no comma.  A single-host DSN is returned unchanged.
    """
    addresses = host_list(dsn)
    if len(addresses) < 2:
        return dsn
    parts = urlsplit(dsn)
    userinfo, at, _ = parts.netloc.rpartition("@")
    hosts = [a.host or "" for a in addresses]
    ports = [str(a.port or 5432) for a in addresses]
    query = [p for p in parts.query.split("&") if p and p.split("=")[0] not in ("host", "port")]
    query = [f"host={'%2C'.join(hosts)}", f"port={'%2C'.join(ports)}", *query]
    return urlunsplit(parts._replace(netloc=userinfo + at, query="&".join(query)))


def pgsql_file_name(map_name: MapName) -> str:
    return f"pgsql-{map_name.value}.cf"


def _table(map_name: MapName, options: PostfixConfigOptions) -> str:
    if map_name in options.tcp_tables:
        return f"tcp:{options.tcp_tables[map_name]}"
    if options.socketmap_unix is not None:
        return f"socketmap:unix:{options.socketmap_unix}:{map_name.value}"
    if options.socketmap is None:
        raise ValueError(
            f"no endpoint for map {map_name.value}: give a socketmap endpoint or a tcp_table"
        )
    return f"socketmap:inet:{options.socketmap}:{map_name.value}"


def generate_backup_mx(options: PostfixConfigOptions) -> GeneratedConfig:
    """main.cf for a backup MX of the hosted domains, reading the same (replicated) database.

    It relays the hosted domains and the relay domains, and accepts at RCPT only what the
    primary accepts (relay_recipients answers a hosted domain's mailboxes and aliases), so it
    never accepts mail it would bounce later.  The hosted domains are in its relay_domains and
    in no virtual_* list: resolve.c would otherwise class them virtual (delivering here) and
    warn "do not list domain ... in BOTH".  transport_maps is left out: its entries route mail
    on the primary (lmtp: to its Dovecot); a backup sends to the domains' MX hosts.
    """
    relay = ", ".join(
        _table(m, options) for m in (MapName.RELAY_DOMAINS, MapName.DOMAINS, MapName.ALIAS_DOMAINS)
    )
    main = [
        "# maplookup: backup MX (generated by `maplookup postfix-config --backup-mx`)",
        "# Relays the hosted domains and the relay domains to their MX hosts; accepts at RCPT",
        "# only the addresses the primary MX accepts.  No virtual_* maps here: this host",
        "# delivers nothing itself.",
        f"relay_domains = {relay}",
        f"relay_recipient_maps = {_table(MapName.RELAY_RECIPIENTS, options)}",
        "# No transport_maps: its entries route mail on the primary (lmtp: to its Dovecot);",
        "# a relay domain that needs a route from here too gets it in a table of this host's.",
        "# Must equal the primary's: relay_recipients strips extensions with it.",
        f"recipient_delimiter = {options.recipient_delimiter}",
    ]
    return GeneratedConfig("\n".join(main) + "\n", "", {})


def generate(options: PostfixConfigOptions) -> GeneratedConfig:
    """The configuration of a host that delivers the hosted domains (the usual one), or,
    with ``options.backup_mx``, of a backup MX (:func:`generate_backup_mx`)."""
    if options.backup_mx:
        return generate_backup_mx(options)
    pgsql = {m: options.pgsql_dir / pgsql_file_name(m) for m in DELIVERY_MAPS}
    main = [
        "# maplookup: virtual hosting maps (generated by `maplookup postfix-config`)",
        f"virtual_mailbox_domains = {_table(MapName.DOMAINS, options)}",
        f"virtual_alias_domains = {_table(MapName.ALIAS_DOMAINS, options)}",
        f"virtual_alias_maps = {_table(MapName.VIRTUAL, options)}",
        f"virtual_mailbox_maps = {_table(MapName.VMAILBOX, options)}",
        "# virtual(8) refuses socketmap/tcp for these: same SQL through pgsql: (see master.cf)",
        f"virtual_uid_maps = pgsql:{pgsql[MapName.UID]}",
        f"virtual_gid_maps = pgsql:{pgsql[MapName.GID]}",
        f"virtual_mailbox_base = {options.virtual_mailbox_base}",
        "# Must equal maplookup's recipient_delimiter: virtual(8) and alias expansion use it.",
        f"recipient_delimiter = {options.recipient_delimiter}",
        "# A domain listed in mydestination too gets 'User unknown in local recipient table'.",
        "# Keep hosted domains out of mydestination.",
    ]
    if options.virtual_minimum_uid is not None:
        main.append(f"virtual_minimum_uid = {options.virtual_minimum_uid}")
    main += [
        "#",
        "# Who may send as whom: takes effect with reject_sender_login_mismatch (or its",
        "# reject_authenticated_/reject_unauthenticated_ halves) in smtpd_sender_restrictions,",
        "# e.g. smtpd_sender_restrictions = reject_sender_login_mismatch, ...",
        f"smtpd_sender_login_maps = {_table(MapName.SENDER_LOGIN, options)}",
        "# Relay (backup MX) domains, and their valid recipients: the others get 550 at RCPT.",
        f"relay_domains = {_table(MapName.RELAY_DOMAINS, options)}",
        f"relay_recipient_maps = {_table(MapName.RELAY_RECIPIENTS, options)}",
        f"transport_maps = {_table(MapName.TRANSPORT, options)}",
    ]
    master = [
        "# virtual(8) reads the delivery maps through pgsql:, calling maplookup's SQL functions.",
        "virtual   unix  -       n       n       -       -       virtual",
        f"  -o virtual_mailbox_maps=pgsql:{pgsql[MapName.VMAILBOX]}",
        f"  -o virtual_uid_maps=pgsql:{pgsql[MapName.UID]}",
        f"  -o virtual_gid_maps=pgsql:{pgsql[MapName.GID]}",
    ]
    files = {
        pgsql_file_name(m): "\n".join(
            [
                f"# {m.postfix_parameter} for virtual(8), generated by `maplookup postfix-config`.",
                "# Calls the same SQL function as the maplookup server, so both answer alike.",
                *_hosts_lines(options.pgsql_dsn),
                f"dbname = {_database_name(options.pgsql_dsn)}",
                f"query = {pgsql_query(m, options)}",
                "",
            ]
        )
        for m in DELIVERY_MAPS
    }
    return GeneratedConfig("\n".join(main) + "\n", "\n".join(master) + "\n", files)
