"""A complete in-memory copy of the maps' rows, and the map semantics over it (issue 16).

Why: a cached hit is fast, but every miss (each unknown recipient of a dictionary attack, each
address nobody wrote to lately) went to PostgreSQL, and during an outage it answered TEMP.  A
copy holding *every* row answers present and absent keys alike without the database.

Two parts, both pure (no I/O, no asyncpg; this package never imports ``maplookup.db``):

* :mod:`.store` — the data: every row of domains, mailboxes, aliases, sender_grants,
  relay_recipients and transports that a lookup can see, packed into strings in flat dicts
  keyed by address (no per-row or per-domain objects: invisible to the garbage collector).
  Built from the rows the snapshot statements of :mod:`.rows` return, and updated one
  partition (everything whose ``domain`` column is one name) at a time from fresh rows: how
  the change feed's "domains D changed" is applied.
* :mod:`.semantics` (delivery maps), :mod:`.routing` (relay and transport maps),
  :mod:`.senders` (sender_login) — Python twins of the SQL lookup functions of
  ``maplookup/db/schema.sql``, one function per SQL function, answering exactly what it
  answers; :func:`.answer.lookup` dispatches on the MapName as ``maps.query_for`` does.

:mod:`.source` is the AnswerSource of ``cache.mode = "complete"``: every key from the copy
while the change feed confirms it current (its loader and follower live in ``maplookup.db``:
``copy_load``, ``copy_follow``).

Two implementations of one contract are only acceptable with a proof that they agree:
``tests/integration/test_complete_copy.py`` compares them on random datasets and keys against
a real PostgreSQL.
"""

from maplookup.lookup.complete.answer import lookup
from maplookup.lookup.complete.store import MapsCopy

__all__ = ["MapsCopy", "lookup"]
