"""Example data from the classic Postfix virtual-hosting layout (arkum.ch, akadia.com).

Loaded by ``maplookup serve --demo`` into an empty database, so that a new user can query a
working server at once:

    postmap -q meier@arkum.ch socketmap:inet:127.0.0.1:9000:vmailbox   ->  arkum.ch/meier/
"""

from __future__ import annotations

import asyncpg

from maplookup.config import Settings
from maplookup.db import admin

DEMO_UID = 5000
DEMO_GID = 5000


def with_demo_defaults(settings: Settings) -> Settings:
    """``lookup.default_uid``/``default_gid`` 5000, as the README's config example, where unset.

    Without them a domain added to the demo without ``--uid/--gid`` gets mailboxes that
    virtual(8) defers for want of a uid, silently.  The config file, the environment and the
    flags still win: only ids nobody set are filled in.  Applied on every (re)load.
    """
    lookup = settings.lookup
    update: dict[str, int] = {}
    if lookup.default_uid is None:
        update["default_uid"] = DEMO_UID
    if lookup.default_gid is None:
        update["default_gid"] = DEMO_GID
    if not update:
        return settings
    return settings.model_copy(update={"lookup": lookup.model_copy(update=update)})


async def load_demo_data(conn: asyncpg.Connection) -> bool:
    """Load the example data into an empty database; returns False if it held domains already."""
    async with conn.transaction():
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM maplookup.domains)"):
            return False
        # Mailbox domains, with the default uid/gid virtual(8) uses when a mailbox has none.
        await admin.domain_add(conn, "arkum.ch", uid=DEMO_UID, gid=DEMO_GID)
        await admin.domain_add(conn, "akadia.com", uid=DEMO_UID, gid=DEMO_GID)
        # arkum.org mirrors arkum.ch: meier@arkum.org reaches meier@arkum.ch.
        await admin.domain_add(conn, "arkum.org", alias_of="arkum.ch")
        # A forwarding-only alias domain.
        await admin.domain_add(conn, "akadia.net", alias=True)

        await admin.mailbox_add(conn, "meier@arkum.ch", path="arkum.ch/meier/", uid=405)
        await admin.mailbox_add(conn, "mueller@arkum.ch")
        await admin.mailbox_add(conn, "info@akadia.com")
        # A path without a trailing slash is an mbox file.
        await admin.mailbox_add(conn, "archive@akadia.com", path="akadia.com/archive")

        await admin.alias_add(conn, "roland.meier@arkum.ch", ["meier@arkum.ch"])
        await admin.alias_add(conn, "postmaster@arkum.ch", ["meier@arkum.ch"])
        await admin.alias_add(conn, "team@arkum.ch", ["meier@arkum.ch", "mueller@arkum.ch"])
        # Catch-all: anything else @akadia.com goes to info@akadia.com.
        await admin.alias_add(conn, "@akadia.com", ["info@akadia.com"])
        await admin.alias_add(conn, "sales@akadia.net", ["info@akadia.com"])
    return True
