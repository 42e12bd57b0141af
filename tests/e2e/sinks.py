"""Mail sinks for the private Postfix to deliver to: an SMTP server (a relay's next hop) and
an LMTP server (what Dovecot's LMTP would be), both aiosmtpd in a thread of the test.

Each records every transaction it accepts (envelope sender, recipients, content) so a test
can wait for the message it sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from maplookup.testing import free_port

# What the sinks greet with: not Postfix's own myhostname, which its smtp client would take
# for a mail loop.
SINK_HOSTNAME = "sink.maplookup.test"


@dataclass(frozen=True)
class Received:
    """One accepted transaction."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes


class _Recorder:
    """The aiosmtpd handler: accepts every message and keeps it."""

    def __init__(self, lmtp: bool) -> None:
        self.lmtp = lmtp
        self.received: list[Received] = []
        self.changed = threading.Condition()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        message = Received(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            content=envelope.original_content or b"",
        )
        with self.changed:
            self.received.append(message)
            self.changed.notify_all()
        if self.lmtp:
            # LMTP (RFC 2033, section 4.2) answers DATA once per accepted recipient; aiosmtpd
            # sends what the handler returns as it is, so one reply line each.
            return "\r\n".join(f"250 2.0.0 <{rcpt}> delivered" for rcpt in envelope.rcpt_tos)
        return "250 2.0.0 queued"


class _LmtpController(Controller):
    def factory(self) -> LMTP:
        return LMTP(self.handler, **self.SMTP_kwargs)


class Sink:
    """An SMTP (or, with ``lmtp=True``, LMTP) server on 127.0.0.1 at ``port``."""

    def __init__(self, *, lmtp: bool = False) -> None:
        self.lmtp = lmtp
        self.port = free_port()
        self._recorder = _Recorder(lmtp)
        controller_class = _LmtpController if lmtp else Controller
        self._controller = controller_class(
            self._recorder,
            hostname="127.0.0.1",
            port=self.port,
            server_hostname=SINK_HOSTNAME,
        )

    def __enter__(self) -> Sink:
        self._controller.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._controller.stop()

    @property
    def received(self) -> list[Received]:
        with self._recorder.changed:
            return list(self._recorder.received)

    def wait_for(
        self, matches: Callable[[Received], bool], timeout_s: float = 30, *, what: str = ""
    ) -> Received:
        """The first received transaction that ``matches``, waiting up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._recorder.changed:
            while True:
                for message in self._recorder.received:
                    if matches(message):
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{'LMTP' if self.lmtp else 'SMTP'} sink on port {self.port}: "
                        f"no message {what} within {timeout_s} s; received: "
                        f"{[(m.mail_from, m.rcpt_tos) for m in self._recorder.received]}"
                    )
                self._recorder.changed.wait(left)
