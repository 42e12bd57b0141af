"""Real mail through a real Postfix into virtual mailboxes, with maplookup answering the maps.

One private Postfix instance (its own config, queue and mailbox base under a temp dir; smtpd on
a loopback port; chroot off; no systemd) is configured by ``maplookup postfix-config`` and fed
by the maplookup server (a separate process) from a real PostgreSQL.  Mail is sent over SMTP
with smtplib; delivery is awaited by polling the mailbox with a deadline.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from maplookup.db import admin
from maplookup.testing import RunningServer, free_port, start_server, stop_server
from tests.e2e.postfix_instance import PrivatePostfix
from tests.helpers import require_postfix, run_async

SENDER = "sender@outside.test"


async def _load(conn: asyncpg.Connection) -> None:
    await admin.domain_add(conn, "example.com", uid=5000, gid=5000)
    await admin.domain_add(conn, "example.net", alias_of="example.com")
    await admin.domain_add(conn, "catch.example", uid=5000, gid=5000)
    await admin.domain_add(conn, "catchalias.example")
    await admin.mailbox_add(conn, "plain@example.com")
    await admin.mailbox_add(conn, "owner@example.com", uid=5001, gid=5002)
    await admin.mailbox_add(conn, "box@example.com", path="example.com/box")
    await admin.mailbox_add(conn, "@catch.example", path="catch.example/all/")
    await admin.alias_add(conn, "team@example.com", ["plain@example.com", "owner@example.com"])
    await admin.alias_add(conn, "@catchalias.example", ["owner@example.com"])


@dataclass
class MailSystem:
    postfix: PrivatePostfix
    server: RunningServer
    dsn: str
    log_dir: Path

    def send(self, recipients: list[str]) -> str:
        """Send one message; returns its unique subject."""
        subject = f"test {uuid.uuid4()}"
        message = f"From: {SENDER}\r\nSubject: {subject}\r\n\r\nHello.\r\n".encode()
        with smtplib.SMTP("127.0.0.1", self.postfix.smtp_port, timeout=30) as smtp:
            smtp.sendmail(SENDER, recipients, message)
        return subject

    def restart_server(self) -> None:
        self.server = start_server(
            self.dsn,
            self.log_dir / "server.log",
            socketmap_port=self.server.socketmap_port,
            tcp_maps=(),
        )


def _maplookup(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "maplookup", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def mail_system(make_database: Callable[[], str]) -> Iterator[MailSystem]:
    require_postfix("pgsql")
    dsn = make_database()
    run_async(_load, dsn)
    base = Path(tempfile.mkdtemp(prefix="maplookup-e2e-"))
    base.chmod(0o755)  # Postfix daemons run as user postfix and must reach their dirs
    server = start_server(dsn, base / "server.log", tcp_maps=())
    postfix = PrivatePostfix(base / "postfix", free_port())
    postfix.base.mkdir()
    generated = base / "generated"
    _maplookup(
        "postfix-config",
        "--output", str(generated),
        "--dsn", dsn,
        "--socketmap", f"127.0.0.1:{server.socketmap_port}",
        "--virtual-mailbox-base", str(postfix.mail_base),
        "--virtual-minimum-uid", "1000",
    )  # fmt: skip
    system = MailSystem(postfix, server, dsn, base)
    try:
        postfix.prepare((generated / "main.cf").read_text(), (generated / "master.cf").read_text())
        postfix.make_domain_dirs("example.com", "catch.example")
        postfix.start()
        yield system
    finally:
        postfix.stop()
        stop_server(system.server)


def owner_of(path: Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_uid, info.st_gid


def test_plain_mailbox_gets_mail_owned_by_its_uid(mail_system: MailSystem) -> None:
    mail_system.send(["plain@example.com"])
    (message,) = mail_system.postfix.wait_for_messages("example.com/plain/", 1)
    assert owner_of(message) == (5000, 5000)


def test_mailbox_with_its_own_uid_and_gid(mail_system: MailSystem) -> None:
    before = len(mail_system.postfix.maildir_messages("example.com/owner/"))
    subject = mail_system.send(["owner@example.com"])
    messages = mail_system.postfix.wait_for_messages("example.com/owner/", before + 1)
    newest = [m for m in messages if subject.encode() in m.read_bytes()]
    assert len(newest) == 1
    assert owner_of(newest[0]) == (5001, 5002)


def test_alias_with_several_targets(mail_system: MailSystem) -> None:
    plain = len(mail_system.postfix.maildir_messages("example.com/plain/"))
    owner = len(mail_system.postfix.maildir_messages("example.com/owner/"))
    subject = mail_system.send(["team@example.com"])
    for path, count in (("example.com/plain/", plain), ("example.com/owner/", owner)):
        messages = mail_system.postfix.wait_for_messages(path, count + 1)
        assert any(subject.encode() in m.read_bytes() for m in messages)


def test_extension_mixed_case_and_mirror_domain(mail_system: MailSystem) -> None:
    before = len(mail_system.postfix.maildir_messages("example.com/plain/"))
    subjects = [
        mail_system.send(["plain+newsletter@example.com"]),
        mail_system.send(["PLAIN@Example.COM"]),
        mail_system.send(["Plain+Tag@EXAMPLE.NET"]),
    ]
    messages = mail_system.postfix.wait_for_messages("example.com/plain/", before + 3)
    contents = b"".join(m.read_bytes() for m in messages)
    for subject in subjects:
        assert subject.encode() in contents


def test_catch_all_mailbox_and_catch_all_alias(mail_system: MailSystem) -> None:
    subject = mail_system.send(["anyone@catch.example"])
    (message,) = mail_system.postfix.wait_for_messages("catch.example/all/", 1)
    assert subject.encode() in message.read_bytes()
    before = len(mail_system.postfix.maildir_messages("example.com/owner/"))
    subject = mail_system.send(["whoever@catchalias.example"])
    messages = mail_system.postfix.wait_for_messages("example.com/owner/", before + 1)
    assert any(subject.encode() in m.read_bytes() for m in messages)


def test_mbox_path_without_slash(mail_system: MailSystem) -> None:
    subject = mail_system.send(["box@example.com"])
    (mbox,) = mail_system.postfix.wait_for_messages("example.com/box", 1)
    assert mbox.is_file()
    assert subject.encode() in mbox.read_bytes()
    assert owner_of(mbox) == (5000, 5000)


def test_unknown_user_is_rejected_at_rcpt_with_550(mail_system: MailSystem) -> None:
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        mail_system.send(["nobody@example.com"])
    code, text = refused.value.recipients["nobody@example.com"]
    assert code == 550
    assert b"5.1.1" in text
    # An unknown user of a mirror domain is rejected too, not accepted and bounced later.
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        mail_system.send(["nobody@example.net"])
    assert refused.value.recipients["nobody@example.net"][0] == 550


def test_mail_waits_while_maplookup_is_down_and_nothing_is_lost(
    mail_system: MailSystem,
) -> None:
    before = len(mail_system.postfix.maildir_messages("example.com/plain/"))
    assert stop_server(mail_system.server) == 0
    try:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            mail_system.send(["plain@example.com"])
        code, text = refused.value.recipients["plain@example.com"]
        assert 400 <= code < 500, (code, text)  # deferred (451 4.3.0), never bounced
    finally:
        mail_system.restart_server()
    # The sending MTA retries: once maplookup is back, the same mail is accepted and delivered.
    subject = mail_system.send(["plain@example.com"])
    mail_system.postfix.flush_queue()
    messages = mail_system.postfix.wait_for_messages("example.com/plain/", before + 1)
    assert any(subject.encode() in m.read_bytes() for m in messages)
    log = mail_system.postfix.log_file.read_text(errors="replace")
    assert "status=bounced" not in log
