"""One map's answer from a complete copy: what ``maps.query_for``'s statement returns.

For ``virtual`` that is ``maplookup.virtual_match`` (the server renders the received case
itself, lookup/virtual_answer.py), as on the database path.  A complete-copy AnswerSource
(lookup/answer.py's protocol) is then ``fetch = lookup(copy, map_name, key, settings)``,
with no await and never an error.
"""

from __future__ import annotations

from collections.abc import Callable

from maplookup.lookup.complete import routing, semantics, senders
from maplookup.lookup.complete.store import MapsCopy
from maplookup.maps import LookupSettings, MapName

_Answer = Callable[[MapsCopy, str, LookupSettings], str | None]

_ANSWERS: dict[MapName, _Answer] = {
    MapName.DOMAINS: lambda c, k, s: semantics.domains(c, k),
    MapName.ALIAS_DOMAINS: lambda c, k, s: semantics.alias_domains(c, k),
    MapName.VIRTUAL: lambda c, k, s: semantics.virtual_match(c, k, s.recipient_delimiter),
    MapName.VMAILBOX: lambda c, k, s: semantics.vmailbox(c, k, s.recipient_delimiter),
    MapName.UID: lambda c, k, s: semantics.mailbox_id(
        c, k, s.recipient_delimiter, s.default_uid, want_uid=True
    ),
    MapName.GID: lambda c, k, s: semantics.mailbox_id(
        c, k, s.recipient_delimiter, s.default_gid, want_uid=False
    ),
    MapName.SENDER_LOGIN: lambda c, k, s: senders.sender_login(c, k, s.recipient_delimiter),
    MapName.RELAY_DOMAINS: lambda c, k, s: routing.relay_domains(c, k),
    MapName.RELAY_RECIPIENTS: lambda c, k, s: routing.relay_recipients(c, k, s.recipient_delimiter),
    MapName.TRANSPORT: lambda c, k, s: routing.transport(c, k, s.recipient_delimiter),
}


def lookup(copy: MapsCopy, map_name: MapName, key: str, settings: LookupSettings) -> str | None:
    """The value the SQL function behind ``map_name`` returns for ``key`` (None: NULL)."""
    return _ANSWERS[map_name](copy, key, settings)
