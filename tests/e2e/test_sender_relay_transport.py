"""Issue 14's maps through a real Postfix: sender login, relay domains and recipients, transport.

One private Postfix instance (as in test_delivery.py: its own config, queue and mailboxes,
smtpd on a loopback port) is configured by ``maplookup postfix-config``, which writes the four
map parameters below, and asks a maplookup server, fed from a real PostgreSQL, for:

* ``smtpd_sender_login_maps`` (``sender_login``), with ``reject_sender_login_mismatch`` in
  ``smtpd_sender_restrictions``; clients log in over SMTP AUTH through Cyrus SASL and a
  sasldb of the test's own (tests/e2e/sasl.py), with their full address as login;
* ``relay_domains`` and ``relay_recipient_maps`` (``relay_domains``, ``relay_recipients``);
* ``transport_maps`` (``transport``): a relay domain's next hop is an SMTP sink, and a
  hosted domain is delivered over LMTP to an LMTP sink (tests/e2e/sinks.py, aiosmtpd in a
  thread), as a Dovecot-delivered domain would be.

A second instance on the same server is a backup MX of the hosted domains, configured by
``maplookup postfix-config --backup-mx``: it relays what the primary accepts and refuses the
rest at RCPT.

The data is loaded with the ``maplookup`` CLI, as an administrator would.  ``mynetworks``
leaves out loopback, so the test client is an outside client: relaying is allowed only to
what ``relay_domains`` answers, or after SMTP AUTH.
"""

from __future__ import annotations

import shutil
import smtplib
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from maplookup.testing import RunningServer, free_port, start_server, stop_server
from tests.e2e.postfix_instance import PrivatePostfix
from tests.e2e.sasl import SaslDb
from tests.e2e.sinks import Received, Sink
from tests.helpers import require_postfix

OUTSIDE_SENDER = "sender@outside.test"

# Mailboxes, each the SASL login of its own address (the default login).
ALICE = "alice@example.com"
BOB = "bob@example.com"
ADMIN = "admin@example.com"
CAROL = "carol@lmtp.example"  # in the domain delivered over LMTP
DAVE = "dave@example.com"  # a mailbox with a transport entry of its own
LOGINS = (ALICE, BOB, ADMIN)


def password(login: str) -> str:
    return f"{login} secret"


def _maplookup(dsn: str, *args: str) -> str:
    """Run the admin CLI against the test database."""
    result = subprocess.run(
        [sys.executable, "-m", "maplookup", *args, "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"maplookup {' '.join(args)}: {result.stderr}"
    return result.stdout


def _load(dsn: str, *, lmtp_port: int, smtp_port: int) -> None:
    commands: list[tuple[str, ...]] = [
        ("domain", "add", "example.com", "--uid", "5000", "--gid", "5000"),
        ("mailbox", "add", ALICE),
        ("mailbox", "add", BOB),
        ("mailbox", "add", ADMIN),
        # An alias is owned by the mailboxes it delivers to.
        ("alias", "add", "info@example.com", ALICE),
        # Explicit grants: one address, and every address of a domain.
        ("sender", "allow", "noreply@example.com", ALICE),
        ("sender", "allow", "@example.com", ADMIN),
        # A hosted domain that Dovecot would deliver: over LMTP.
        ("domain", "add", "lmtp.example", "--uid", "5000", "--gid", "5000"),
        ("mailbox", "add", CAROL),
        ("transport", "set", "lmtp.example", f"lmtp:inet:127.0.0.1:{lmtp_port}"),
        # One mailbox of a domain that virtual(8) delivers, delivered over LMTP instead.
        ("mailbox", "add", DAVE),
        ("transport", "set", DAVE, f"lmtp:inet:127.0.0.1:{lmtp_port}"),
        # A backup-MX domain, relayed to its primary.
        ("domain", "add", "relay.example", "--relay"),
        ("relay-recipient", "add", "known@relay.example"),
        ("transport", "set", "relay.example", f"smtp:[127.0.0.1]:{smtp_port}"),
    ]
    for command in commands:
        _maplookup(dsn, *command)


@dataclass
class MailSystem:
    postfix: PrivatePostfix
    dsn: str
    server: RunningServer
    lmtp: Sink
    smtp: Sink

    def send(
        self,
        sender: str,
        recipient: str,
        *,
        login: str | None = None,
        mechanism: str = "PLAIN",
    ) -> str:
        """Send one message, after SMTP AUTH as ``login`` if given; returns its subject.

        Raises what smtplib raises for a refusal (SMTPRecipientsRefused: Postfix applies
        smtpd_sender_restrictions at RCPT time, smtpd_delay_reject = yes).
        """
        subject = f"test {uuid.uuid4()}"
        message = f"From: {sender}\r\nSubject: {subject}\r\n\r\nHello.\r\n".encode()
        with smtplib.SMTP("127.0.0.1", self.postfix.smtp_port, timeout=30) as client:
            if login is not None:
                client.ehlo()
                client.user, client.password = login, password(login)
                authenticate = {"PLAIN": client.auth_plain, "LOGIN": client.auth_login}
                client.auth(mechanism, authenticate[mechanism])
            client.sendmail(sender, [recipient], message)
        return subject

    def refusal(self, sender: str, recipient: str, *, login: str | None = None) -> tuple[int, str]:
        """The code and text with which Postfix refuses ``recipient`` of this message."""
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            self.send(sender, recipient, login=login)
        code, text = refused.value.recipients[recipient]
        return code, text.decode()


def _with_subject(subject: str) -> Callable[[Received], bool]:
    return lambda message: f"Subject: {subject}".encode() in message.content


@pytest.fixture(scope="module")
def mail_system(make_database: Callable[[], str]) -> Iterator[MailSystem]:
    require_postfix("pgsql")
    base = Path(tempfile.mkdtemp(prefix="maplookup-e2e14-"))
    base.chmod(0o755)  # Postfix daemons run as user postfix and must reach their dirs
    postfix = PrivatePostfix(base / "postfix", free_port())
    postfix.base.mkdir()
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, base, ignore_errors=True)  # runs last
        sasl = SaslDb(postfix.config_dir)  # skips (fails under CI) without Cyrus SASL
        for login in LOGINS:
            sasl.add_user(login, password(login))
        dsn = make_database()
        lmtp = stack.enter_context(Sink(lmtp=True))
        smtp = stack.enter_context(Sink())
        _load(dsn, lmtp_port=lmtp.port, smtp_port=smtp.port)
        server = start_server(dsn, base / "server.log", tcp_maps=())
        stack.callback(stop_server, server)
        generated = base / "generated"
        _maplookup(
            dsn,
            "postfix-config",
            "--output", str(generated),
            "--socketmap", f"127.0.0.1:{server.socketmap_port}",
            "--virtual-mailbox-base", str(postfix.mail_base),
            "--virtual-minimum-uid", "1000",
        )  # fmt: skip
        overrides = {
            **sasl.main_cf(),
            "smtpd_sender_restrictions": "reject_sender_login_mismatch",
            # The test client (127.0.0.1) is an outside client: not in mynetworks.
            "mynetworks": "192.0.2.0/24",
        }
        postfix.prepare(
            (generated / "main.cf").read_text(), (generated / "master.cf").read_text(), overrides
        )
        postfix.make_domain_dirs("example.com")
        postfix.start()
        stack.callback(postfix.stop)
        yield MailSystem(postfix, dsn, server, lmtp, smtp)


# --- SMTP AUTH itself --------------------------------------------------------------------


def test_a_wrong_password_is_refused(mail_system: MailSystem) -> None:
    with smtplib.SMTP("127.0.0.1", mail_system.postfix.smtp_port, timeout=30) as client:
        client.ehlo()
        assert set(client.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login(ALICE, "not the password")
    assert refused.value.smtp_code == 535


# --- smtpd_sender_login_maps ------------------------------------------------------------


@pytest.mark.parametrize(
    ("login", "sender", "mechanism"),
    [
        pytest.param(ALICE, ALICE, "PLAIN", id="own-mailbox"),
        pytest.param(BOB, BOB, "LOGIN", id="own-mailbox-login-mechanism"),
        pytest.param(ALICE, "Alice@EXAMPLE.com", "PLAIN", id="own-mailbox-other-case"),
        pytest.param(ALICE, "alice+news@example.com", "PLAIN", id="own-mailbox-extension"),
        pytest.param(ALICE, "info@example.com", "PLAIN", id="alias-delivering-to-it"),
        pytest.param(ALICE, "noreply@example.com", "PLAIN", id="address-granted"),
        pytest.param(ADMIN, BOB, "PLAIN", id="domain-granted"),
    ],
)
def test_authenticated_client_may_send_as_an_address_it_owns(
    mail_system: MailSystem, login: str, sender: str, mechanism: str
) -> None:
    subject = mail_system.send(sender, CAROL, login=login, mechanism=mechanism)
    received = mail_system.lmtp.wait_for(_with_subject(subject), what=f"from {sender}")
    assert received.mail_from == sender
    assert received.rcpt_tos == (CAROL,)


@pytest.mark.parametrize(
    ("login", "sender", "owner"),
    [
        pytest.param(ALICE, BOB, BOB, id="another-mailbox"),
        pytest.param(BOB, "info@example.com", ALICE, id="alias-of-another"),
        pytest.param(BOB, "noreply@example.com", ALICE, id="granted-to-another"),
        pytest.param(BOB, "alice+news@example.com", ALICE, id="extension-of-another"),
    ],
)
def test_authenticated_client_may_not_send_as_someone_elses_address(
    mail_system: MailSystem, login: str, sender: str, owner: str
) -> None:
    code, text = mail_system.refusal(sender, CAROL, login=login)
    assert code == 553
    assert text == f"5.7.1 <{sender}>: Sender address rejected: not owned by user {login}"
    # Postfix refuses a logged-in client the same way when the map knows no owner at all
    # (reject_sender_login_mismatch includes reject_authenticated_sender_login_mismatch:
    # src/smtpd/smtpd_check.c, FORBID_UNKNOWN_SENDER).  The owner getting through shows
    # that the map did answer, with a list that lacks only ``login``.
    subject = mail_system.send(sender, CAROL, login=owner)
    assert mail_system.lmtp.wait_for(_with_subject(subject)).mail_from == sender


@pytest.mark.parametrize("sender", [ALICE, "info@example.com", "noreply@example.com"])
def test_unauthenticated_client_may_not_use_an_owned_address(
    mail_system: MailSystem, sender: str
) -> None:
    code, text = mail_system.refusal(sender, CAROL)
    assert code == 553
    assert text == f"5.7.1 <{sender}>: Sender address rejected: not logged in"


# --- relay_domains, relay_recipient_maps --------------------------------------------------


@pytest.mark.parametrize("recipient", ["unknown@relay.example", "unknown@sub.relay.example"])
def test_relay_domain_unknown_recipient_is_refused_at_rcpt(
    mail_system: MailSystem, recipient: str
) -> None:
    code, text = mail_system.refusal(OUTSIDE_SENDER, recipient)
    assert code == 550
    assert "User unknown in relay recipient table" in text, text
    assert text.startswith("5.1.1 ")


def test_a_domain_that_is_not_a_relay_domain_is_not_relayed(mail_system: MailSystem) -> None:
    # What makes the 550 above a relay domain's answer: any other domain is refused
    # (smtpd_relay_restrictions' defer_unauth_destination) before its recipient is looked at.
    code, text = mail_system.refusal(OUTSIDE_SENDER, "known@elsewhere.example")
    assert code == 454
    assert "Relay access denied" in text, text


@pytest.mark.parametrize("recipient", ["known@relay.example", "Known+x@Relay.EXAMPLE"])
def test_relay_domain_known_recipient_is_relayed_to_the_next_hop(
    mail_system: MailSystem, recipient: str
) -> None:
    subject = mail_system.send(OUTSIDE_SENDER, recipient)
    received = mail_system.smtp.wait_for(_with_subject(subject), what=f"for {recipient}")
    assert received.mail_from == OUTSIDE_SENDER
    assert received.rcpt_tos == (recipient,)
    assert not any(_with_subject(subject)(m) for m in mail_system.lmtp.received)


# --- transport_maps -----------------------------------------------------------------------


@pytest.mark.parametrize("recipient", [CAROL, "carol+tag@lmtp.example"])
def test_domain_with_an_lmtp_transport_is_delivered_over_lmtp(
    mail_system: MailSystem, recipient: str
) -> None:
    subject = mail_system.send(OUTSIDE_SENDER, recipient)
    received = mail_system.lmtp.wait_for(_with_subject(subject), what=f"for {recipient}")
    assert received.mail_from == OUTSIDE_SENDER
    assert received.rcpt_tos == (recipient,)


@pytest.mark.parametrize("recipient", [DAVE, "Dave+tag@example.com"])
def test_address_with_a_transport_entry_is_delivered_over_lmtp(
    mail_system: MailSystem, recipient: str
) -> None:
    subject = mail_system.send(OUTSIDE_SENDER, recipient)
    received = mail_system.lmtp.wait_for(_with_subject(subject), what=f"for {recipient}")
    assert received.rcpt_tos == (recipient,)
    assert mail_system.postfix.maildir_messages("example.com/dave/") == []


def test_subdomain_of_a_domain_with_a_transport_follows_it(mail_system: MailSystem) -> None:
    # `transport set lmtp.example` covers sub.lmtp.example (as a hash: table with the entry
    # .lmtp.example).  Not a hosted domain: only a logged-in client may relay to it.
    recipient = "someone@sub.lmtp.example"
    subject = mail_system.send(ALICE, recipient, login=ALICE)
    received = mail_system.lmtp.wait_for(_with_subject(subject), what=f"for {recipient}")
    assert received.rcpt_tos == (recipient,)


def test_domain_without_a_transport_entry_is_delivered_by_virtual(
    mail_system: MailSystem,
) -> None:
    before = len(mail_system.postfix.maildir_messages("example.com/bob/"))
    subject = mail_system.send(OUTSIDE_SENDER, BOB)
    messages = mail_system.postfix.wait_for_messages("example.com/bob/", before + 1)
    assert any(subject.encode() in m.read_bytes() for m in messages)
    assert not any(_with_subject(subject)(m) for m in mail_system.lmtp.received)


# --- a backup MX of the hosted domains -----------------------------------------------------


@pytest.fixture(scope="module")
def backup_mx(mail_system: MailSystem) -> Iterator[MailSystem]:
    """A second Postfix on the same maplookup server, configured by ``postfix-config
    --backup-mx``.  A real backup MX relays to each domain's MX host; this one relays every
    relay-class recipient to the SMTP sink (``relay_transport``), so it needs no DNS."""
    base = Path(tempfile.mkdtemp(prefix="maplookup-e2e14-backup-"))
    base.chmod(0o755)
    postfix = PrivatePostfix(base / "postfix", free_port())
    postfix.base.mkdir()
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        generated = base / "generated"
        _maplookup(
            mail_system.dsn,
            "postfix-config",
            "--backup-mx",
            "--output", str(generated),
            "--socketmap", f"127.0.0.1:{mail_system.server.socketmap_port}",
        )  # fmt: skip
        overrides = {
            "mynetworks": "192.0.2.0/24",  # the test client is an outside client here too
            "relay_transport": f"relay:[127.0.0.1]:{mail_system.smtp.port}",
        }
        postfix.prepare((generated / "main.cf").read_text(), "", overrides)
        postfix.start()
        stack.callback(postfix.stop)
        yield replace(mail_system, postfix=postfix)


@pytest.mark.parametrize(
    "recipient",
    [
        pytest.param(BOB, id="mailbox"),
        pytest.param("Bob+tag@Example.COM", id="mailbox-extension-case"),
        pytest.param("info@example.com", id="alias"),
        pytest.param(CAROL, id="mailbox-of-the-lmtp-domain"),
        pytest.param("known@relay.example", id="relay-recipient"),
    ],
)
def test_backup_mx_relays_what_the_primary_accepts(backup_mx: MailSystem, recipient: str) -> None:
    subject = backup_mx.send(OUTSIDE_SENDER, recipient)
    received = backup_mx.smtp.wait_for(_with_subject(subject), what=f"for {recipient}")
    assert received.rcpt_tos == (recipient,)


@pytest.mark.parametrize(
    "recipient", ["nobody@example.com", "nobody@lmtp.example", "unknown@relay.example"]
)
def test_backup_mx_refuses_at_rcpt_what_the_primary_would_refuse(
    backup_mx: MailSystem, recipient: str
) -> None:
    code, text = backup_mx.refusal(OUTSIDE_SENDER, recipient)
    assert code == 550
    assert text.startswith("5.1.1 "), text
    assert "User unknown in relay recipient table" in text, text
