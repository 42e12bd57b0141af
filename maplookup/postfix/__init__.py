"""The Postfix side: generated Postfix configuration (``config``) and routing traces
(``trace``, its result model ``trace_result``), both built on the same SQL and rendering the
server uses.

Imports: the base modules, ``lookup`` and ``db``; never ``serve`` or ``cli``.
"""
