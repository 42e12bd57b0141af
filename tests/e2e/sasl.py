"""SMTP AUTH for the private Postfix: Cyrus SASL with a sasldb of the test's own.

smtpd asks Cyrus SASL (``smtpd_sasl_type = cyrus``), which reads ``smtpd.conf``
(``smtpd_sasl_path``) and checks passwords against a sasldb through the sasldb auxprop
plugin.  smtpd runs as user postfix, so the directory and the database are group postfix.

Where smtpd.conf is read from: upstream Postfix hands ``cyrus_sasl_config_path`` to Cyrus
(``sasl_set_path``, src/xsasl/xsasl_cyrus_server.c), but Debian's Postfix (patch
07_sasl_config, "SASL configuration goes in /etc/postfix/sasl") overrides that with a
callback that reads ``$config_directory/sasl/smtpd.conf``, then ``/usr/lib/sasl``, and
ignores the parameter (seen with strace on 3.7.11).  So the directory must be ``sasl`` under
the instance's config directory, and cyrus_sasl_config_path names it too, for a Postfix
built without that patch.

Logins are full addresses (``alice@example.com``), as maplookup's mailbox logins are.  Cyrus
splits a login at its last ``@`` into user and realm, both for the sasldb key (``saslpasswd2
-u example.com alice`` stores what ``alice@example.com`` finds) and for the canonical name it
hands back; it appends a realm (smtpd_sasl_local_domain) only to a login without ``@``.  So
with smtpd_sasl_local_domain empty, the SASL username smtpd sees, logs and compares with
``smtpd_sender_login_maps`` is exactly the login the client typed.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

from tests.helpers import require_cyrus_sasl

MECHANISMS = ("PLAIN", "LOGIN")


class SaslDb:
    """A sasldb and the smtpd.conf that points Cyrus SASL at it, in ``config_dir``/sasl
    (``config_dir`` is the Postfix instance's configuration directory)."""

    def __init__(self, config_dir: Path) -> None:
        self.saslpasswd2 = require_cyrus_sasl(*MECHANISMS)
        directory = self.directory = config_dir / "sasl"
        self.path = directory / "sasldb2"
        postfix = pwd.getpwnam("postfix")
        config_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        directory.mkdir(mode=0o750)
        os.chown(directory, 0, postfix.pw_gid)
        (directory / "smtpd.conf").write_text(
            "pwcheck_method: auxprop\n"
            "auxprop_plugin: sasldb\n"
            f"sasldb_path: {self.path}\n"
            f"mech_list: {' '.join(MECHANISMS)}\n"
        )

    def add_user(self, login: str, password: str) -> None:
        """Create ``login`` (``user@realm``) with ``password``."""
        user, at, realm = login.rpartition("@")
        if not at or not user:
            raise ValueError(f"a login is user@realm: {login!r}")
        result = subprocess.run(
            [self.saslpasswd2, "-f", str(self.path), "-u", realm, "-p", "-c", user],
            input=password,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"saslpasswd2 {login}: {result.stderr.strip()}")
        # smtpd (user postfix) reads the database; nobody else needs to.
        os.chown(self.path, 0, pwd.getpwnam("postfix").pw_gid)
        self.path.chmod(0o640)

    def main_cf(self) -> dict[str, str]:
        """The main.cf parameters that turn on SMTP AUTH through this sasldb."""
        return {
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "cyrus",
            "smtpd_sasl_path": "smtpd",  # Cyrus reads smtpd.conf
            "cyrus_sasl_config_path": str(self.directory),  # see the module docstring
            # The login stays exactly what the client typed (see the module docstring).
            "smtpd_sasl_local_domain": "",
            # AUTH without TLS: the tests talk over loopback only.
            "smtpd_tls_auth_only": "no",
            "smtpd_sasl_security_options": "noanonymous",
            "broken_sasl_auth_clients": "no",
        }
