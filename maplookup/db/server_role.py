"""What a connection reaches: primary or standby, its replay lag, LISTEN, a pooler in between.

Several MX hosts each read a streaming standby (or the primary) through a host list; what the
server actually gets matters: on a standby the change feed only polls (LISTEN is refused
during recovery) and answers are as old as the replay lag; a pooler in transaction mode
(pgbouncer) silently breaks LISTEN and asyncpg's prepared statements.  ``maplookup
check-config`` reports this per connection (cli/check.py); the probes are here so that they
are read-only and reusable.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from maplookup.db import feed
from maplookup.db.servers import host_list


@dataclass(frozen=True, slots=True)
class ServerRole:
    """One connection's server, as PostgreSQL describes it."""

    address: str  # host:port as the server sees itself; "local socket" over a unix socket
    standby: bool
    # now() - pg_last_xact_replay_timestamp() on a standby (None: nothing replayed yet, or a
    # primary); WAL received but not yet replayed, in bytes.
    replay_lag_s: float | None
    replay_backlog_bytes: int | None
    wal_receiver: str | None  # pg_stat_wal_receiver: "streaming from HOST:PORT", or None
    listen_works: bool
    # The pid asyncpg got at start-up (BackendKeyData) differs from pg_backend_pid(): a
    # pooler answered the start-up, not PostgreSQL.
    pooler_suspected: bool
    feed_position: int | None  # the change log's head here (None: no change log yet)


async def probe(conn: asyncpg.Connection) -> ServerRole:
    """Read-only probes of ``conn``'s server (LISTEN is undone at once)."""
    row = await conn.fetchrow(
        "SELECT inet_server_addr()::text AS host, inet_server_port() AS port,"
        " pg_is_in_recovery() AS standby, pg_backend_pid() AS pid,"
        " extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS lag_s,"
        " CASE WHEN pg_is_in_recovery() THEN"
        "   pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::bigint"
        " END AS backlog"
    )
    assert row is not None
    receiver = None
    if row["standby"]:
        sender = await conn.fetchrow(
            "SELECT status, sender_host, sender_port FROM pg_stat_wal_receiver"
        )
        if sender is not None:
            receiver = f"{sender['status']} from {sender['sender_host']}:{sender['sender_port']}"
    try:
        await conn.execute("LISTEN maplookup_check_config; UNLISTEN maplookup_check_config")
        listen_works = True
    except asyncpg.PostgresError:
        listen_works = False
    try:
        position: int | None = await feed.head_position(conn)
    except asyncpg.PostgresError:
        position = None
    host = row["host"]
    return ServerRole(
        address="local socket" if host is None else f"{host.split('/')[0]}:{row['port']}",
        standby=bool(row["standby"]),
        replay_lag_s=row["lag_s"] if row["standby"] else None,
        replay_backlog_bytes=row["backlog"],
        wal_receiver=receiver,
        listen_works=listen_works,
        pooler_suspected=conn.get_server_pid() != row["pid"],
        feed_position=position,
    )


def single_hosts(dsn: str) -> list[str]:
    """One DSN per server of a host list (``postgresql://u@h1:5432,h2:5433/db``, or the
    ``?host=h1,h2&port=...`` form), in order; ``[dsn]`` when it names one server or none."""
    addresses = host_list(dsn)
    if len(addresses) < 2:
        return [dsn]
    parts = urlsplit(dsn)
    userinfo, at, _ = parts.netloc.rpartition("@")
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "port")]
    return [
        urlunsplit(parts._replace(netloc=f"{userinfo}{at}{a}", query=urlencode(query, safe=",/:")))
        for a in addresses
    ]
