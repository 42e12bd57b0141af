"""The database layer: asyncpg in its own asyncio thread, and everything that talks SQL.

Owns the bridge and the pool (``database``), batching of cache misses (``batching``), the
change feed (``changes``), the complete copy's loader and follower (``copy_load``,
``copy_follow``: cache.mode = "complete"), host lists and the server the pool and the feed share
(``servers``), a server's role and replay lag (``status``), the schema and its versions
(``schema``, ``schema.sql``), the admin writes (``admin``, with what an admin typed checked
in ``admin_input``) and the demo data (``demo``).  Errors leave it as ``maplookup.errors``'
DatabaseError, which the lookup layer turns into TEMP.

Imports: the base modules and ``lookup`` (for the protocols it implements); never ``serve`` or
``cli``.
"""
