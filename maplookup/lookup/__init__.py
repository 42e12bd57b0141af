"""The lookup layer: the map contract over an answer source, and the coherent cache.

Owns turning a request into the reply Postfix must get (``answer``: folding, the
never-NOTFOUND-on-error rule, the received case carried onto ``virtual`` answers) and the answer
cache (``cache``); the complete in-memory copy of the maps and its AnswerSource
(``complete``).  Sees the database only through the ``AnswerSource``/``LookupBackend``
protocols and ``maplookup.errors``.

Imports: the base modules (``maps``, ``address``, ``errors``, ``config``) and ``protocol``; never
``db``, ``serve``, ``cli``, sockets or asyncpg.
"""
