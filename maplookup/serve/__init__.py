"""The server process: trio listeners and connections, the admin HTTP endpoint (with the
change feed's and the complete copy's health), the service that wires lookup, cache, complete
copy and database together, workers, signals, sd_notify, privileges.

Imports: everything below it (base modules, ``protocol``, ``lookup``, ``db``, ``metrics``,
``logsetup``, ``embedded``); never ``cli``.
"""
