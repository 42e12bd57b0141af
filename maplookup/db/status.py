"""What the server a host reads is doing: primary or standby, and how far a standby lags.

Read by the change feed on its own connection every ``status_interval_s`` (one trivial
statement), for ``/metrics`` and ``/healthz``.  Three figures, because each alone misleads:

* ``replay_lag_s``: how long the oldest received but not yet replayed change has waited,
  ``now() - pg_last_xact_replay_timestamp()`` while the standby has received WAL it has not
  replayed, else 0.  The raw difference alone grows on a standby that is simply idle (no
  transaction to replay since the last one), which is not lag.
* ``replay_lag_bytes``: received minus replayed WAL (``pg_wal_lsn_diff``): lag that is
  queued, whatever the clock says.
* ``last_replay_age_s``: the raw ``now() - pg_last_xact_replay_timestamp()``, and
  ``wal_receiver``: whether the standby streams from a primary at all.  With the primary down
  nothing arrives, so both lags read 0 while the data only grows older: these two say so.

All are None on a primary.  Functions every role may call (no superuser, no
pg_read_all_stats): the server may run as a read-only role.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg

_STATUS = """
SELECT r.standby,
       CASE WHEN r.standby THEN
           CASE WHEN r.received IS NULL OR r.received <= r.replayed THEN 0.0
                ELSE coalesce(extract(epoch FROM now() - r.replayed_at)::float8, 0.0) END
       END,
       CASE WHEN r.standby THEN
           greatest(coalesce(pg_catalog.pg_wal_lsn_diff(r.received, r.replayed), 0), 0)::int8
       END,
       CASE WHEN r.standby THEN extract(epoch FROM now() - r.replayed_at)::float8 END,
       CASE WHEN r.standby THEN EXISTS (SELECT 1 FROM pg_catalog.pg_stat_wal_receiver) END
FROM (SELECT pg_catalog.pg_is_in_recovery() AS standby,
             pg_catalog.pg_last_wal_receive_lsn() AS received,
             pg_catalog.pg_last_wal_replay_lsn() AS replayed,
             pg_catalog.pg_last_xact_replay_timestamp() AS replayed_at) r
"""


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """One reading; the lag fields are None on a primary (and where unknown)."""

    in_recovery: bool
    replay_lag_s: float | None
    replay_lag_bytes: int | None
    last_replay_age_s: float | None
    wal_receiver: bool | None  # a standby streaming from a primary

    @property
    def role(self) -> str:
        return "standby" if self.in_recovery else "primary"

    def as_dict(self) -> dict[str, object]:
        details: dict[str, object] = {"role": self.role}
        if self.in_recovery:
            details.update(
                replay_lag_s=_round(self.replay_lag_s),
                replay_lag_bytes=self.replay_lag_bytes,
                last_replay_age_s=_round(self.last_replay_age_s),
                wal_receiver="streaming" if self.wal_receiver else "not running",
            )
        return details


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


async def read_status(conn: asyncpg.Connection, timeout_s: float) -> ServerStatus:
    """The status of the server behind ``conn``, within ``timeout_s`` (else TimeoutError)."""
    async with asyncio.timeout(timeout_s):
        row = await conn.fetchrow(_STATUS)
    assert row is not None
    return ServerStatus(bool(row[0]), row[1], row[2], row[3], row[4])
