"""A private Postfix instance for end-to-end tests: its own config, queue, log and mailboxes.

Runs the system's Postfix binaries as root with ``postfix -c DIR start`` (no systemd, chroot off,
smtpd on a loopback port), configured by the main.cf/master.cf snippets that
``maplookup postfix-config`` generates, merged into a minimal base configuration here.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

BASE_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.maplookup.test
mydomain = maplookup.test
myorigin = $myhostname
# Hosted domains must not be in mydestination (DESIGN.md section 2).
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost =
default_transport = error:remote delivery is disabled in this test instance
maillog_file = {base}/log/maillog
maillog_file_prefixes = {base}
biff = no
smtputf8_enable = yes
# Retry deferred mail quickly: the outage test flushes the queue explicitly anyway.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
"""

# chroot off on every service; smtpd on a private loopback port.
BASE_MASTER_CF = """\
127.0.0.1:{smtp_port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixError(Exception):
    pass


def _override(base: str, overrides: Mapping[str, str], generated: str) -> str:
    """``base`` with each overridden parameter's line replaced, then ``generated``, then the
    overrides the base did not have."""
    lines = []
    done = set()
    for line in base.splitlines():
        name = line.partition("=")[0].strip()
        if not line.startswith((" ", "\t", "#")) and name in overrides:
            lines.append(f"{name} = {overrides[name]}")
            done.add(name)
        else:
            lines.append(line)
    rest = [f"{name} = {value}" for name, value in overrides.items() if name not in done]
    return "\n".join(lines) + "\n" + generated + "".join(f"{line}\n" for line in rest)


def _postfix_bin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class PrivatePostfix:
    base: Path
    smtp_port: int

    @property
    def config_dir(self) -> Path:
        return self.base / "etc"

    @property
    def mail_base(self) -> Path:
        return self.base / "mail"

    @property
    def log_file(self) -> Path:
        return self.base / "log" / "maillog"

    def prepare(
        self,
        generated_main_cf: str,
        generated_master_cf: str,
        overrides: Mapping[str, str] | None = None,
    ) -> None:
        """Write main.cf and master.cf.

        ``overrides`` replace base main.cf parameters in place (so Postfix does not warn
        about a parameter set twice); those the base does not set are appended at the end.
        """
        postfix = pwd.getpwnam("postfix")
        self.base.chmod(0o755)
        for name in ("etc", "queue", "data", "log", "mail"):
            (self.base / name).mkdir(exist_ok=True)
        os.chown(self.base / "data", postfix.pw_uid, postfix.pw_gid)
        # virtual(8) creates each mailbox as its owner's uid: the folders above must let it.
        self.mail_base.chmod(0o1777)
        main_cf = _override(BASE_MAIN_CF.format(base=self.base), overrides or {}, generated_main_cf)
        master_cf = BASE_MASTER_CF.format(smtp_port=self.smtp_port) + generated_master_cf
        (self.config_dir / "main.cf").write_text(main_cf)
        (self.config_dir / "master.cf").write_text(master_cf)

    def make_domain_dirs(self, *domains: str) -> None:
        for domain in domains:
            path = self.mail_base / domain
            path.mkdir(exist_ok=True)
            path.chmod(0o1777)

    def _run(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"},
        )

    def postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run(_postfix_bin("postfix"), "-c", str(self.config_dir), *args)

    def start(self) -> None:
        check = self.postfix("check")
        if check.returncode != 0:
            raise PostfixError(f"postfix check failed: {check.stderr.strip()}")
        started = self.postfix("start")
        if started.returncode != 0:
            raise PostfixError(
                f"postfix start failed ({started.returncode}): {started.stderr.strip()}\n"
                f"{self.log_tail()}"
            )
        self.wait_for_smtp()

    def wait_for_smtp(self, timeout_s: float = 30) -> None:
        import socket

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise PostfixError(f"smtpd did not listen on {self.smtp_port}\n{self.log_tail()}")

    def stop(self) -> None:
        self.postfix("stop")
        # master exits asynchronously; wait for its pid file lock to go.
        pid_file = self.base / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, 0)
            except (OSError, ValueError, IndexError):
                return
            time.sleep(0.05)
        self.postfix("abort")

    def flush_queue(self) -> None:
        result = self._run(_postfix_bin("postqueue"), "-c", str(self.config_dir), "-f")
        if result.returncode != 0:
            raise PostfixError(f"postqueue -f failed: {result.stderr.strip()}")

    def queue_listing(self) -> str:
        return self._run(_postfix_bin("postqueue"), "-c", str(self.config_dir), "-p").stdout

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no maillog)"
        return "\n".join(text.splitlines()[-lines:])

    def maildir_messages(self, relative_path: str) -> list[Path]:
        new = self.mail_base / relative_path / "new"
        if not new.is_dir():
            return []
        return sorted(new.iterdir())

    def wait_for_messages(
        self, relative_path: str, count: int, timeout_s: float = 30
    ) -> list[Path]:
        """Poll a Maildir (or an mbox file) until it holds ``count`` messages."""
        deadline = time.monotonic() + timeout_s
        while True:
            if relative_path.endswith("/"):
                found = self.maildir_messages(relative_path)
                if len(found) >= count:
                    return found
            else:
                mbox = self.mail_base / relative_path
                if (
                    mbox.exists()
                    and mbox.read_bytes().count(b"\nFrom ") + mbox.read_bytes().startswith(b"From ")
                    >= count
                ):
                    return [mbox]
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{relative_path}: expected {count} message(s) within {timeout_s} s\n"
                    f"queue:\n{self.queue_listing()}\nlog:\n{self.log_tail()}"
                )
            time.sleep(0.05)
