"""Turn a request into the answer Postfix must get: the map contract of DESIGN.md §3.

Knows nothing of sockets.  The one rule that protects mail lives here: NOTFOUND only when the
database said the key does not exist; any failure to get an answer is TEMP, so Postfix defers
(451 4.3.0) instead of bouncing (550 5.1.1).  See src/global/dict_sockmap.c for how Postfix
reads each reply word.
"""

from __future__ import annotations

import logging
from typing import Protocol

from maplookup.errors import DatabaseError
from maplookup.lookup.virtual_answer import received_local_part, render_virtual
from maplookup.maps import MAP_BY_WIRE_NAME, LookupSettings, MapName, decode_key, fold_decoded
from maplookup.protocol.events import Reply, Request, Status

log = logging.getLogger(__name__)


class AnswerSource(Protocol):
    """Where answers come from: the database, or a cache in front of it.

    ``fetch`` returns the value, None when the key does not exist, or raises DatabaseError
    when it cannot know.
    """

    async def fetch(self, map_name: MapName, key: str) -> str | None: ...


class LookupBackend(Protocol):
    """Something that runs a map's SQL function for a key (the Database)."""

    async def lookup(self, map_name: MapName, key: str, settings: LookupSettings) -> str | None: ...


class HasLookupSettings(Protocol):
    """Holds the lookup settings in force (replaced on reload)."""

    settings: LookupSettings


class DatabaseSource:
    """Answers straight from the SQL lookup functions, no cache in between."""

    def __init__(self, database: LookupBackend, settings: LookupSettings) -> None:
        self._database = database
        self.settings = settings  # replaced on reload

    async def fetch(self, map_name: MapName, key: str) -> str | None:
        return await self._database.lookup(map_name, key, self.settings)


_NOT_FOUND = Reply.notfound()


class _FixedSettings:
    def __init__(self, settings: LookupSettings) -> None:
        self.settings = settings


class Lookup:
    """Answers requests for every map (MapName) from an AnswerSource.

    ``settings`` holds the lookup settings in force (how keys fold, the recipient delimiter
    that re-applies the received case onto ``virtual`` answers); by default those of a
    DatabaseSource ``source``, which a reload replaces.
    """

    def __init__(self, source: AnswerSource, settings: HasLookupSettings | None = None) -> None:
        self._source = source
        if settings is None:
            settings = (
                source if isinstance(source, DatabaseSource) else _FixedSettings(LookupSettings())
            )
        self._settings = settings
        self.temp_answers = 0

    async def answer(self, request: Request) -> Reply:
        map_name = MAP_BY_WIRE_NAME.get(request.map_name)
        if map_name is None:
            # PERM: Postfix logs a configuration error (451 4.3.5) rather than bouncing.
            shown = request.map_name[:64].decode("ascii", "backslashreplace")
            return Reply.perm(f"unknown map name '{shown}'")
        settings = self._settings.settings
        decoded = decode_key(map_name, request.key)
        key = None if decoded is None else fold_decoded(map_name, decoded, settings.smtputf8_enable)
        if key is None or decoded is None:
            return _NOT_FOUND
        try:
            value = await self._source.fetch(map_name, key)
            if value and map_name is MapName.VIRTUAL:
                # The match is cached per folded key; the case of what is carried onto the
                # targets is this request's own (DESIGN.md section 2, fact 11).
                value = render_virtual(
                    value, received_local_part(decoded), settings.recipient_delimiter
                )
        except DatabaseError as exc:
            self.temp_answers += 1
            return Reply.temp(f"database unavailable: {exc}")
        except Exception:
            # A bug must not bounce mail either: log it loudly and let Postfix retry.
            log.exception("lookup failed: map=%s", map_name.value)
            self.temp_answers += 1
            return Reply.temp("internal error in maplookup; see its log")
        if not value:
            # NULL is the database saying "no such key".  An empty string can only come from
            # data that violates the schema; Postfix treats OK with an empty value as a
            # configuration error, so it is not found either.
            return _NOT_FOUND
        return Reply(Status.OK, value)
