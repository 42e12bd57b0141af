"""The map-contract tests in both modes: the SQL functions (``database``: what LRU mode asks
on a miss) and the complete copy (``complete``: cache.mode = "complete").

A test parametrized with :data:`MODES` builds its Lookup with :func:`lookup_for`; in complete
mode the copy is loaded from the test's database once (``db/copy_load.load_snapshot``, the
server's own loader) and every key must be answered from it: the fallback fails the test.
"""

from __future__ import annotations

import math
import time

import asyncpg

from maplookup.db.copy_load import LoadedCopy, load_snapshot
from maplookup.db.database import Database
from maplookup.lookup.answer import DatabaseSource, Lookup
from maplookup.lookup.complete.source import CompleteSource
from maplookup.maps import LookupSettings, MapName
from tests.helpers import run_with_connection

MODES = ("database", "complete")

_copies: dict[str, LoadedCopy] = {}


class _Settings:
    def __init__(self, settings: LookupSettings) -> None:
        self.settings = settings


class _NoFallback:
    async def fetch(self, map_name: MapName, key: str) -> str | None:
        raise AssertionError(f"the complete copy did not answer {map_name}:{key}")


def loaded_copy(dsn: str) -> LoadedCopy:
    """The complete copy of ``dsn``'s maps, loaded once per database (the datasets of these
    modules are written once and only read)."""
    if dsn not in _copies:

        async def load(conn: asyncpg.Connection) -> LoadedCopy:
            return await load_snapshot(conn, max_bytes=2**30, chunk_timeout_s=30.0)

        loaded = run_with_connection(dsn, load)
        assert isinstance(loaded, LoadedCopy)
        _copies[dsn] = loaded
    return _copies[dsn]


def complete_lookup(dsn: str, settings: LookupSettings) -> Lookup:
    """A Lookup answering from the complete copy of ``dsn`` only."""
    held = _Settings(settings)
    source = CompleteSource(_NoFallback(), held, max_stale_s=math.inf)
    loaded = loaded_copy(dsn)
    source.install(loaded.copy, loaded.position, time.monotonic(), loaded.seconds)
    return Lookup(source, held)


def lookup_for(mode: str, dsn: str, database: Database, settings: LookupSettings) -> Lookup:
    if mode == "complete":
        return complete_lookup(dsn, settings)
    return Lookup(DatabaseSource(database, settings))
