"""The server process: trio listeners and connections, the admin HTTP endpoint, the service
that wires lookup, cache and database together, workers, signals, sd_notify, privileges.

Imports: everything below it (base modules, ``protocol``, ``lookup``, ``db``, ``metrics``,
``logsetup``, ``embedded``); never ``cli``.
"""
