"""Turn a request into the answer Postfix must get: the map contract of DESIGN.md §3.

Knows nothing of sockets.  The one rule that protects mail lives here: NOTFOUND only when the
database said the key does not exist; any failure to get an answer is TEMP, so Postfix defers
(451 4.3.0) instead of bouncing (550 5.1.1).  See src/global/dict_sockmap.c for how Postfix
reads each reply word.
"""

from __future__ import annotations

import logging
from typing import Protocol

from maplookup.db import DatabaseError
from maplookup.maps import MAP_BY_WIRE_NAME, LookupSettings, MapName, fold_key, query_for
from maplookup.protocol import Reply, Request

log = logging.getLogger(__name__)


class ValueSource(Protocol):
    """Where answers come from: the database, or a cache in front of it."""

    async def fetch_value(self, query: str, args: tuple[object, ...]) -> str | None: ...


_NOT_FOUND = Reply.notfound()


class Lookup:
    """Answers requests for the six maps from a ValueSource."""

    def __init__(self, source: ValueSource, settings: LookupSettings) -> None:
        self._source = source
        self.settings = settings

    async def answer(self, request: Request) -> Reply:
        map_name = MAP_BY_WIRE_NAME.get(request.map_name)
        if map_name is None:
            # PERM: Postfix logs a configuration error (451 4.3.5) rather than bouncing.
            shown = request.map_name[:64].decode("ascii", "backslashreplace")
            return Reply.perm(f"unknown map name '{shown}'")
        return await self.answer_map(map_name, request.key)

    async def answer_map(self, map_name: MapName, raw_key: bytes) -> Reply:
        key = fold_key(map_name, raw_key)
        if key is None:
            return _NOT_FOUND
        query, args = query_for(map_name, key, self.settings)
        try:
            value = await self._source.fetch_value(query, args)
        except DatabaseError as exc:
            return Reply.temp(f"database unavailable: {exc}")
        except Exception:
            # A bug must not bounce mail either: log it loudly and let Postfix retry.
            log.exception("lookup failed: map=%s", map_name.value)
            return Reply.temp("internal error in maplookup; see its log")
        if not value:
            # NULL is the database saying "no such key".  An empty string can only come from
            # data that violates the schema; Postfix treats OK with an empty value as a
            # configuration error, so it is not found either.
            return _NOT_FOUND
        return Reply.ok(value)
