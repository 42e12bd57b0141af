"""systemd readiness and watchdog notifications (sd_notify(3)) without a library.

Under ``Type=notify`` (or ``notify-reload``) systemd passes ``NOTIFY_SOCKET``; the service
sends newline-separated ``VARIABLE=value`` assignments as datagrams to that AF_UNIX socket.
A leading ``@`` names a socket in the abstract namespace.  Without ``NOTIFY_SOCKET`` (not
started by systemd, or ``Type=simple``) every method here does nothing.

Sending never raises: a failure is logged at debug level and reported by the return value,
because a lookup service must not stop answering Postfix over a status message.

Typical use::

    notifier = SystemdNotifier(unset_environment=True)  # before starting child processes
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run_watchdog)
        ...                                             # bind listeners
        notifier.ready()
        ...                                             # on SIGHUP: notifier.reloading(),
        ...                                             #   reload, then notifier.ready()
        notifier.stopping()
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import MutableMapping

import trio

__all__ = ["SystemdNotifier"]

log = logging.getLogger(__name__)

# The variables systemd passes for the protocol; removed by ``unset_environment``.
_ENV_NAMES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

# Never block the event loop for long if systemd is not reading its socket.
_SEND_TIMEOUT_S = 1.0


def _socket_address(value: str | None) -> str | None:
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # vsock:CID:PORT (systemd >= 254, for VMs) and relative paths are not supported.
    log.debug("NOTIFY_SOCKET=%r not supported: only absolute paths and @abstract", value)
    return None


def _positive_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    return number if number > 0 else None


class SystemdNotifier:
    """Sends sd_notify messages to ``NOTIFY_SOCKET``; silent no-ops when it is not set.

    ``environ`` (default ``os.environ``) is read once, here.  With ``unset_environment`` the
    variables are then removed from it, so child processes (the embedded PostgreSQL, which may
    itself speak sd_notify) do not send to our socket, as sd_notify(3)'s
    ``unset_environment`` does.  The socket is opened on first use and kept open.
    """

    def __init__(
        self,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset_environment: bool = False,
    ) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET"))
        self._watchdog_usec = _positive_int(env.get("WATCHDOG_USEC"))
        watchdog_pid = env.get("WATCHDOG_PID")
        self._watchdog_pid: int | None = None
        if watchdog_pid is not None:
            # Set but unparsable counts as "for some other process".
            self._watchdog_pid = _positive_int(watchdog_pid) or -1
        if unset_environment:
            for name in _ENV_NAMES:
                env.pop(name, None)
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notification socket."""
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``VARIABLE=value`` assignments in one datagram; True if it was sent."""
        address = self._address
        if address is None or not assignments:
            return False
        data = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with self._lock:
                if self._socket is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    sock.settimeout(_SEND_TIMEOUT_S)
                    self._socket = sock
                self._socket.sendto(data, address)
        except OSError as exc:
            log.debug("sd_notify %r to %r failed: %s", assignments, address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up (or a reload) is complete; optionally with a STATUS= line."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", _status(status))

    def stopping(self) -> bool:
        """STOPPING=1: shutting down (draining)."""
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (required by ``Type=notify-reload``, systemd 253).

        Send :meth:`ready` once the new configuration is in use.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def status(self, text: str) -> bool:
        """STATUS=: one line shown by ``systemctl status``."""
        return self.notify(_status(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1: the keep-alive ping for ``WatchdogSec=``."""
        return self.notify("WATCHDOG=1")

    def watchdog_interval_s(self) -> float | None:
        """The watchdog timeout in seconds, or None when no watchdog applies to this process.

        From WATCHDOG_USEC; if WATCHDOG_PID is set it must be our pid (sd_watchdog_enabled(3)).
        """
        if self._address is None or self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 1_000_000

    async def run_watchdog(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Ping the watchdog at once and then every half interval until cancelled.

        Returns at once when no watchdog is configured.  Because the pings come from the
        event loop, a wedged loop stops them and systemd restarts the service.
        """
        interval = self.watchdog_interval_s()
        task_status.started()
        if interval is None:
            return
        period = interval / 2
        log.debug("systemd watchdog: pinging every %g s", period)
        while True:
            self.watchdog()
            await trio.sleep(period)

    def close(self) -> None:
        """Close the socket (reopened if used again).  Normally it lives as long as the process."""
        with self._lock:
            sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()


def _status(text: str) -> str:
    # A newline would start another assignment.
    return "STATUS=" + " ".join(text.splitlines())
