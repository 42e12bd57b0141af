"""Two private Postfix instances judged against each other, and maplookup's trace against both.

* **A**: the maplookup server (a separate process) and exactly what ``maplookup postfix-config``
  generates: socketmap for smtpd, cleanup and trivial-rewrite, ``pgsql:`` files for virtual(8).
* **B**: ``maplookup export`` of the same database, each file built with ``postmap hash:``, and
  main.cf pointing the six virtual_* parameters and the four of issue 14
  (smtpd_sender_login_maps, relay_domains, relay_recipient_maps, transport_maps) at those
  tables.  The dataset's transports are all ``discard:``, so that nothing leaves the host.

Beyond what the two instances deliver, ``routing.py`` compares the answers of the four maps of
issue 14 key by key, with Postfix's own lookup order over ``postmap -q`` (smtpd's sender
login check has no outcome to observe without SASL).

Everything else in main.cf is the same for both (checked with ``postconf -n``): SMTPUTF8 on,
``recipient_delimiter = +``, ``virtual_minimum_uid``, ``myorigin`` a name not hosted here, and
``default_transport``/``relay_transport`` set to ``discard:`` so that nothing leaves the host;
where such mail went is read from the maillog.

Each recipient gets a transaction of its own (one RCPT), with a unique header so its delivered
copies can be found; accepted mail is awaited by polling the maillog until every recipient of its
queue id has a status (no fixed sleeps).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from maplookup.cli.trace import render_json
from maplookup.maps import LookupSettings
from maplookup.postfix.trace import trace_address
from maplookup.postfix.trace_result import PostfixSettings
from maplookup.testing import RunningServer, free_port, start_server, stop_server
from maplookup.transfer.exporting import EXPORT_FILES
from tests.e2e.postfix_instance import PostfixError, PrivatePostfix

from . import dataset as ds_mod
from .dataset import Dataset
from .recipients import Recipient
from .routing import RoutingDisagreement, compare_routing

SENDER = "sender@outside.example"
DELIVERY_TIMEOUT_S = 60.0

# Both instances get these in place of the base configuration's: nothing leaves the host.
# discard(8) logs "status=sent (<nexthop text>)" with relay=none and the final address in
# to=<...>.  myorigin (what a target without '@' is completed with) is not hosted here.
COMMON_OVERRIDES = {
    "default_transport": "discard:left the host",
    "relay_transport": "discard:left the host",
    "myorigin": "origin.invalid",
    "smtputf8_enable": "yes",
}

# The only parameters allowed to differ between A and B (postconf -n).
MAP_PARAMETERS = frozenset(
    {
        "virtual_mailbox_domains",
        "virtual_alias_domains",
        "virtual_alias_maps",
        "virtual_mailbox_maps",
        "virtual_uid_maps",
        "virtual_gid_maps",
        "smtpd_sender_login_maps",
        "relay_domains",
        "relay_recipient_maps",
        "transport_maps",
        "queue_directory",
        "data_directory",
        "maillog_file",
        "maillog_file_prefixes",
        "virtual_mailbox_base",
        "config_directory",
    }
)

VIRTUAL_SERVICE = "virtual   unix  -       n       n       -       -       virtual\n"


# -- outcomes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Final:
    """One final recipient's status line in the maillog."""

    to: str
    orig_to: str | None
    relay: str  # virtual, none (discard/error), ...
    status: str  # sent, bounced, deferred
    dsn: str

    def short(self) -> str:
        orig = f" orig_to={self.orig_to}" if self.orig_to else ""
        return f"{self.status}/{self.relay}/{self.dsn} to={self.to}{orig}"


@dataclass(frozen=True)
class MailFile:
    path: str  # relative to virtual_mailbox_base; trailing '/' for a Maildir
    form: str  # maildir | mbox
    uid: int
    gid: int

    def short(self) -> str:
        return f"{self.path} ({self.form} {self.uid}:{self.gid})"


@dataclass(frozen=True)
class Outcome:
    """What happened to one recipient: compared field by field (``detail`` is not compared)."""

    rcpt: str  # reply class and enhanced code, e.g. "2.1.5", "5.1.1"
    data: str | None = None  # DATA reply, None when RCPT was refused
    finals: tuple[Final, ...] = ()
    files: tuple[MailFile, ...] = ()
    detail: str = field(default="", compare=False)

    def short(self) -> str:
        parts = [f"RCPT {self.rcpt}"]
        if self.data is not None and not self.data.startswith("2"):
            parts.append(f"DATA {self.data}")
        parts += [f.short() for f in self.finals]
        parts += ["file " + f.short() for f in self.files]
        return "; ".join(parts)

    def for_trace(self) -> tuple[object, ...]:
        """What the trace predicts: RCPT class, each final (to, relay, status, DSN class), files."""
        return (
            self.rcpt[:1],
            tuple(sorted((f.to, f.relay, f.status, f.dsn[:1]) for f in self.finals)),
            self.files,
        )


# -- the maillog --------------------------------------------------------------------------------

_LOG_RE = re.compile(r"postfix/(?P<daemon>[\w/-]+)\[\d+\]: (?P<qid>[0-9A-F]{6,}): (?P<rest>.*)$")
_STATUS_RE = re.compile(
    r"^to=<(?P<to>.*?)>, (?:orig_to=<(?P<orig>.*?)>, )?relay=(?P<relay>[^,]*), .*?"
    r"dsn=(?P<dsn>[\d.]+), status=(?P<status>\w+) (?P<text>.*)$"
)
_NRCPT_RE = re.compile(r"nrcpt=(\d+)")


@dataclass
class LogState:
    nrcpt: dict[str, int] = field(default_factory=dict)
    finals: dict[str, dict[tuple[str, str | None], tuple[Final, str]]] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)

    def done(self, qid: str) -> bool:
        if qid in self.removed:
            return True
        n = self.nrcpt.get(qid)
        return n is not None and len(self.finals.get(qid, {})) >= n


def read_log(path: Path) -> LogState:
    state = LogState()
    try:
        text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    except OSError:
        return state
    for line in text.splitlines():
        match = _LOG_RE.search(line)
        if not match:
            continue
        qid, rest = match["qid"], match["rest"]
        if rest == "removed":
            state.removed.add(qid)
            continue
        if rest.startswith("from=<"):
            n = _NRCPT_RE.search(rest)
            if n and qid not in state.nrcpt:
                state.nrcpt[qid] = int(n.group(1))
            continue
        status = _STATUS_RE.match(rest)
        if status:
            final = Final(
                status["to"], status["orig"], status["relay"], status["status"], status["dsn"]
            )
            # The first attempt decides (a deferred recipient is retried later).
            state.finals.setdefault(qid, {}).setdefault(
                (final.to, final.orig_to), (final, status["text"])
            )
    return state


# -- the instances -----------------------------------------------------------------------------


def _maplookup(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "maplookup", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"maplookup {' '.join(args[:1])} failed: {result.stderr.strip()}")
    return result.stdout + result.stderr


def _postbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


#: cache.mode values A runs with: the SQL functions behind an LRU cache, and the complete copy.
MODES = ("lru", "complete")


def server_metric(server: RunningServer, name: str) -> float:
    """One unlabelled sample of the server's /metrics."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def start_maplookup(dsn: str, log_path: Path, mode: str = "lru") -> RunningServer:
    """``maplookup serve`` with the test's default ids (those postfix-config and trace get),
    in cache mode ``mode``; with ``complete``, returns once the copy is loaded, so that every
    answer A gets comes from it."""
    server = start_server(
        dsn,
        log_path,
        tcp_maps=(),
        extra_args=(
            "--default-uid", str(ds_mod.SERVER_DEFAULT_UID),
            "--default-gid", str(ds_mod.SERVER_DEFAULT_GID),
        ),
        metrics=True,
        env={**os.environ, "MAPLOOKUP_CACHE__MODE": mode},
    )  # fmt: skip
    if mode == "complete":
        deadline = time.monotonic() + 30
        while server_metric(server, "maplookup_copy_loaded") != 1.0:
            if time.monotonic() > deadline:
                stop_server(server)
                raise RuntimeError(f"complete copy not loaded:\n{server.log_tail()}")
            time.sleep(0.05)
    return server


def _postconf_n(config_dir: Path) -> dict[str, str]:
    out = subprocess.run(
        [_postbin("postconf"), "-c", str(config_dir), "-n"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    params = {}
    for line in out.splitlines():
        name, _, value = line.partition(" = ")
        params[name.strip()] = value.strip()
    return params


def _prefix_dirs(postfix: PrivatePostfix, ds: Dataset) -> None:
    postfix.make_domain_dirs(*(d.name for d in ds.mailbox_domains))


@dataclass
class Pair:
    """The two instances for one data set, and what they need to be stopped."""

    work: Path
    dsn: str
    a: PrivatePostfix
    b: PrivatePostfix
    server: RunningServer
    export_dir: Path
    export_warnings: str

    def stop(self) -> None:
        for postfix in (self.a, self.b):
            with contextlib.suppress(Exception):  # best effort: stop the rest anyway
                postfix.stop()
        stop_server(self.server)


def start_pair(ds: Dataset, dsn: str, work: Path, mode: str = "lru") -> Pair:
    """Start A (maplookup, cache mode ``mode``) and B (hash: from export) for the data set
    already in ``dsn``."""
    work.chmod(0o755)
    server = start_maplookup(dsn, work / "server.log", mode)
    a = PrivatePostfix(work / "a", free_port())
    b = PrivatePostfix(work / "b", free_port())
    a.base.mkdir()
    b.base.mkdir()
    export_dir = work / "export"
    pair = None
    try:
        generated = work / "generated"
        _maplookup(
            "postfix-config",
            "--output", str(generated),
            "--dsn", dsn,
            "--socketmap", f"127.0.0.1:{server.socketmap_port}",
            "--virtual-mailbox-base", str(a.mail_base),
            "--virtual-minimum-uid", str(ds_mod.VIRTUAL_MINIMUM_UID),
            "--default-uid", str(ds_mod.SERVER_DEFAULT_UID),
            "--default-gid", str(ds_mod.SERVER_DEFAULT_GID),
        )  # fmt: skip
        a.prepare(
            (generated / "main.cf").read_text(),
            (generated / "master.cf").read_text(),
            COMMON_OVERRIDES,
        )
        # The server's default ids go into the tables, as postfix-config puts them into the
        # pgsql: queries: a hash: table has no configuration of its own.
        export_warnings = _maplookup(
            "export", "--output", str(export_dir), "--dsn", dsn,
            "--default-uid", str(ds_mod.SERVER_DEFAULT_UID),
            "--default-gid", str(ds_mod.SERVER_DEFAULT_GID),
        )  # fmt: skip
        tables = b.config_dir / "maps"
        tables.mkdir(parents=True)
        for name in EXPORT_FILES:
            shutil.copy(export_dir / name, tables / name)
        b_main = "\n".join(
            [
                "# ---- hash: tables built by postmap from `maplookup export` ----",
                f"virtual_mailbox_domains = hash:{tables}/domains",
                f"virtual_alias_domains = hash:{tables}/alias_domains",
                f"virtual_alias_maps = hash:{tables}/virtual",
                f"virtual_mailbox_maps = hash:{tables}/vmailbox",
                f"virtual_uid_maps = hash:{tables}/uids",
                f"virtual_gid_maps = hash:{tables}/gids",
                f"smtpd_sender_login_maps = hash:{tables}/sender_login",
                f"relay_domains = hash:{tables}/relay_domains",
                f"relay_recipient_maps = hash:{tables}/relay_recipients",
                f"transport_maps = hash:{tables}/transport",
                f"virtual_mailbox_base = {b.mail_base}",
                "recipient_delimiter = +",
                f"virtual_minimum_uid = {ds_mod.VIRTUAL_MINIMUM_UID}",
                "",
            ]
        )
        b.prepare(b_main, VIRTUAL_SERVICE, COMMON_OVERRIDES)
        for name in EXPORT_FILES:
            built = subprocess.run(
                [_postbin("postmap"), "-c", str(b.config_dir), f"hash:{tables / name}"],
                capture_output=True,
                text=True,
                check=False,
            )
            if built.returncode != 0 or built.stderr.strip():
                raise PostfixError(f"postmap hash:{name}: {built.stderr.strip()}")
        check_same_main_cf(a.config_dir, b.config_dir)
        for postfix in (a, b):
            _prefix_dirs(postfix, ds)
        pair = Pair(work, dsn, a, b, server, export_dir, export_warnings)
        a.start()
        b.start()
        return pair
    except BaseException:
        if pair is not None:
            pair.stop()
        else:
            stop_server(server)
            for postfix in (a, b):
                if (postfix.config_dir / "main.cf").exists():
                    postfix.stop()
        raise


def check_same_main_cf(a_dir: Path, b_dir: Path) -> None:
    """The instances may differ only in the map parameters and their own directories."""
    a, b = _postconf_n(a_dir), _postconf_n(b_dir)
    differing = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} - MAP_PARAMETERS
    if differing:
        raise AssertionError(
            "harness error: main.cf of A and B differ beyond the maps: "
            + ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(differing))
        )


# -- sending and collecting ----------------------------------------------------------------------

_ENHANCED_RE = re.compile(rb"^([245]\.\d{1,3}\.\d{1,3})")
_QUEUED_RE = re.compile(rb"queued as ([0-9A-F]+)")


def _reply_code(code: int, text: bytes) -> str:
    match = _ENHANCED_RE.match(text)
    return match.group(1).decode() if match else f"{code // 100}.?.?({code})"


def marker_for(seed: int, index: int) -> str:
    return f"diff-{seed}-{index}"


def send(port: int, recipient: Recipient, marker: str) -> tuple[str, str | None, str | None, str]:
    """One transaction: returns (RCPT code, DATA code, queue id, reply texts)."""
    message = (
        f"From: {SENDER}\r\nTo: undisclosed-recipients:;\r\nSubject: differential\r\n"
        f"Message-ID: <{marker}@differential.invalid>\r\nX-Differential: {marker}\r\n\r\n"
        f"{marker}\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.invalid", timeout=30) as smtp:
        smtp.ehlo()
        options = [] if recipient.ascii else ["SMTPUTF8"]
        code, text = smtp.mail(SENDER, options)
        if code != 250:
            raise RuntimeError(f"MAIL FROM refused: {code} {text!r}")
        # Raw RCPT: smtplib.quoteaddr() would mangle quoted local parts.
        smtp.putcmd("rcpt", f"TO:<{recipient.address}>")
        code, text = smtp.getreply()
        rcpt = _reply_code(code, text)
        detail = f"RCPT {code} {text.decode(errors='replace')}"
        if code // 100 != 2:
            return rcpt, None, None, detail
        code, text = smtp.data(message)
        data = _reply_code(code, text)
        detail += f" | DATA {code} {text.decode(errors='replace')}"
        queued = _QUEUED_RE.search(text)
        return rcpt, data, queued.group(1).decode() if queued else None, detail


def _mail_files(mail_base: Path) -> dict[str, list[MailFile]]:
    """Every delivered copy under ``mail_base``, by marker."""
    found: dict[str, list[MailFile]] = {}
    marker_re = re.compile(rb"^X-Differential: (\S+)", re.MULTILINE)
    for root, _dirs, files in os.walk(mail_base):
        for name in files:
            path = Path(root) / name
            info = path.stat()
            data = path.read_bytes()
            if path.parent.name in ("new", "cur", "tmp"):
                rel = path.parent.parent.relative_to(mail_base).as_posix() + "/"
                form = "maildir"
            else:
                rel = path.relative_to(mail_base).as_posix()
                form = "mbox"
            for match in marker_re.finditer(data):
                marker = match.group(1).decode()
                found.setdefault(marker, []).append(MailFile(rel, form, info.st_uid, info.st_gid))
    return found


def run_instance(
    postfix: PrivatePostfix, seed: int, recipients: list[Recipient]
) -> dict[str, Outcome]:
    """Send every recipient to ``postfix``; wait for each queue id; collect outcomes."""
    sent: dict[str, tuple[str, str | None, str | None, str]] = {}
    for index, recipient in enumerate(recipients):
        sent[recipient.address] = send(postfix.smtp_port, recipient, marker_for(seed, index))
    queue_ids = {qid for _, _, qid, _ in sent.values() if qid}
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while True:
        state = read_log(postfix.log_file)
        pending = [q for q in queue_ids if not state.done(q)]
        if not pending:
            break
        if time.monotonic() > deadline:
            raise AssertionError(
                f"queue ids {pending} without a final status in {DELIVERY_TIMEOUT_S} s\n"
                f"{postfix.log_tail()}"
            )
        time.sleep(0.05)
    files = _mail_files(postfix.mail_base)
    outcomes = {}
    for index, recipient in enumerate(recipients):
        rcpt, data, qid, detail = sent[recipient.address]
        finals: list[Final] = []
        if qid:
            for final, text in state.finals.get(qid, {}).values():
                finals.append(final)
                detail += f" | {final.status} to={final.to} {text}"
        outcomes[recipient.address] = Outcome(
            rcpt=rcpt,
            data=data,
            finals=tuple(sorted(finals, key=lambda f: (f.to, f.orig_to or "", f.relay))),
            files=tuple(sorted(files.get(marker_for(seed, index), []), key=repr)),
            detail=detail,
        )
    return outcomes


# -- the prediction ---------------------------------------------------------------------------


def trace_settings() -> tuple[LookupSettings, PostfixSettings]:
    return (
        LookupSettings("+", ds_mod.SERVER_DEFAULT_UID, ds_mod.SERVER_DEFAULT_GID),
        # The instances' myorigin, which completes a local account an alias points to.
        PostfixSettings(
            virtual_minimum_uid=ds_mod.VIRTUAL_MINIMUM_UID,
            myorigin=str(COMMON_OVERRIDES["myorigin"]),
        ),
    )


def trace_outcome(trace: dict[str, object]) -> tuple[object, ...]:
    """``maplookup trace --json`` mapped to ``Outcome.for_trace()``'s shape."""
    error = trace.get("error")
    if error:
        return ("2", (("(alias expansion error)", str(error), "", "4"),), ())
    tree = trace["tree"]
    assert isinstance(tree, dict)
    recipients = trace["recipients"]
    assert isinstance(recipients, list)
    root_delivery = tree.get("delivery")
    if tree["kind"] == "final" and root_delivery and root_delivery["verdict"] == "rejected":
        return ("5", (), ())
    finals = []
    files = []
    for node in recipients:
        delivery = node["delivery"]
        verdict = delivery["verdict"]
        local_box = delivery["domain_class"] == "virtual_mailbox"
        relay = "virtual" if local_box else "none"
        if verdict in ("delivered", "discarded") and delivery.get("transport"):
            # A transport_maps entry takes it (the dataset's are all discard:, which Postfix
            # logs as sent with relay=none).
            finals.append((node["address"], "none", "sent", "2"))
        elif verdict == "delivered":
            finals.append((node["address"], relay, "sent", "2"))
            mailbox = delivery["mailbox"]
            form = "maildir" if mailbox.endswith("/") else "mbox"
            files.append(MailFile(mailbox, form, int(delivery["uid"]), int(delivery["gid"])))
        elif verdict == "relayed":
            finals.append((node["address"], "none", "sent", "2"))
        elif verdict == "rejected":
            finals.append((node["address"], relay, "bounced", "5"))
        else:
            finals.append((node["address"], relay, "deferred", "4"))
    return ("2", tuple(sorted(finals)), tuple(sorted(files, key=repr)))


def trace_all(dsn: str, addresses: Iterable[str]) -> dict[str, tuple[object, ...]]:
    """maplookup's prediction for each address (``maplookup trace --json``, in process)."""
    lookup, postfix = trace_settings()

    async def run() -> dict[str, tuple[object, ...]]:
        conn = await asyncpg.connect(dsn)
        try:
            out: dict[str, tuple[object, ...]] = {}
            for address in addresses:
                try:
                    result = await trace_address(conn, address, lookup, postfix)
                except ValueError as exc:  # TraceInputError: trace cannot take the address
                    out[address] = ("trace refused", str(exc))
                    continue
                out[address] = trace_outcome(render_json(result))
            return out
        finally:
            await conn.close()

    return asyncio.run(run())


# -- export -> import round trip -----------------------------------------------------------------

_TABLE_QUERIES = (
    "SELECT name, kind, alias_of, default_uid, default_gid, enabled FROM maplookup.domains"
    " ORDER BY name",
    "SELECT domain, local_part, path, uid, gid, enabled, login FROM maplookup.mailboxes"
    " ORDER BY domain, local_part",
    "SELECT domain, local_part, targets, enabled FROM maplookup.aliases"
    " ORDER BY domain, local_part",
    "SELECT domain, local_part, login FROM maplookup.sender_grants ORDER BY 1, 2, 3",
    "SELECT domain, local_part FROM maplookup.relay_recipients ORDER BY 1, 2",
    "SELECT domain, local_part, transport FROM maplookup.transports ORDER BY 1, 2",
)


def _tables(dsn: str) -> list[list[tuple[object, ...]]]:
    async def run() -> list[list[tuple[object, ...]]]:
        conn = await asyncpg.connect(dsn)
        try:
            return [
                [
                    tuple(tuple(v) if isinstance(v, list) else v for v in r)
                    for r in await conn.fetch(q)
                ]
                for q in _TABLE_QUERIES
            ]
        finally:
            await conn.close()

    return asyncio.run(run())


def round_trip(dsn: str, export_dir: Path, empty_dsn: str) -> list[str]:
    """Import ``export_dir`` into ``empty_dsn``; the records that differ, as text lines."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "maplookup",
            "import",
            "--dsn",
            empty_dsn,
            *(
                arg
                for name in EXPORT_FILES
                for arg in (f"--{name.replace('_', '-')}", str(export_dir / name))
            ),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    problems = []
    if result.returncode != 0:
        problems.append(f"import failed ({result.returncode}): {result.stderr.strip()}")
    names = ("domain", "mailbox", "alias", "sender grant", "relay recipient", "transport")
    for name, first, second in zip(names, _tables(dsn), _tables(empty_dsn), strict=True):
        for row in sorted(set(first) - set(second), key=repr):
            problems.append(f"{name} lost or changed by export+import: {row}")
        for row in sorted(set(second) - set(first), key=repr):
            problems.append(f"{name} after export+import: {row}")
    return problems


# -- one seed ------------------------------------------------------------------------------------


@dataclass
class Disagreement:
    seed: int
    recipient: Recipient
    a: Outcome
    b: Outcome
    trace: tuple[object, ...]
    a_vs_b: bool
    trace_vs_a: bool
    trace_vs_b: bool
    records: list[str]


@dataclass
class SeedResult:
    seed: int
    recipients: int
    seconds: float
    disagreements: list[Disagreement]
    refused: list[tuple[object, str]]
    round_trip: list[str]
    export_warnings: str
    dataset_text: str
    # The maps of issue 14, key by key (routing.py).
    routing: list[RoutingDisagreement] = field(default_factory=list)
    mode: str = "lru"  # A's cache.mode
    # With mode complete: lookups the copy left to the database (must be 0).
    copy_fallbacks: float = 0.0


def make_database_factory(pg_dsn: str) -> Callable[[], str]:
    """Fresh databases with the maplookup schema on ``pg_dsn``'s server (as conftest does)."""
    from tests.helpers import database_factory

    return database_factory(pg_dsn, "maplookup_diff")


def load_dataset(ds: Dataset, dsn: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await ds_mod.load(conn, ds)
        finally:
            await conn.close()

    asyncio.run(run())


def run_seed(
    seed: int,
    make_database: Callable[[], str],
    *,
    exclude: frozenset[str] = frozenset(),
    local_targets: bool = True,
    keep: bool = False,
    mode: str = "lru",
) -> SeedResult:
    from .recipients import recipients_for

    started = time.monotonic()
    ds = ds_mod.generate(seed, local_targets=local_targets, exclude=exclude)
    dsn = make_database()
    load_dataset(ds, dsn)
    recipients = recipients_for(ds)
    work = Path(tempfile.mkdtemp(prefix=f"maplookup-diff-{seed}-"))
    pair = start_pair(ds, dsn, work, mode)
    copy_fallbacks = 0.0
    try:
        outcomes_a = run_instance(pair.a, seed, recipients)
        outcomes_b = run_instance(pair.b, seed, recipients)
        routing = compare_routing(
            ds,
            [r.address for r in recipients],
            f"socketmap:inet:127.0.0.1:{pair.server.socketmap_port}",
            pair.b.config_dir / "maps",
            pair.b.config_dir,
            _postbin("postmap"),
        )
        if mode == "complete":
            copy_fallbacks = server_metric(pair.server, "maplookup_copy_fallbacks_total")
    finally:
        pair.stop()
    traces = trace_all(dsn, [r.address for r in recipients])
    disagreements = []
    for r in recipients:
        a, b, t = outcomes_a[r.address], outcomes_b[r.address], traces[r.address]
        a_vs_b = a != b
        trace_vs_a = t != a.for_trace()
        trace_vs_b = t != b.for_trace()
        if a_vs_b or trace_vs_a or trace_vs_b:
            disagreements.append(
                Disagreement(
                    seed, r, a, b, t, a_vs_b, trace_vs_a, trace_vs_b, ds.records_for(r.address)
                )
            )
    trip = round_trip(dsn, pair.export_dir, make_database())
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return SeedResult(
        seed,
        len(recipients),
        time.monotonic() - started,
        disagreements,
        list(ds.refused),
        trip,
        pair.export_warnings,
        ds.describe(),
        routing,
        mode,
        copy_fallbacks,
    )


# -- reporting ------------------------------------------------------------------------------------


def _trace_short(t: tuple[object, ...]) -> str:
    if len(t) != 3:
        return " ".join(map(str, t))
    rcpt, finals, files = t
    parts = [f"RCPT {rcpt}"]
    for f in finals:  # type: ignore[attr-defined]
        to, relay, status, dsn = f
        parts.append(f"{status}/{relay}/{dsn} to={to}")
    for mf in files:  # type: ignore[attr-defined]
        parts.append("file " + mf.short())
    return "; ".join(parts)


def format_table(results: Iterable[SeedResult], *, records: bool = True) -> str:
    """Every disagreeing recipient with A, B and trace, grouped by seed."""
    lines = []
    for res in results:
        if res.refused:
            for record, message in res.refused:
                lines.append(f"seed {res.seed}: admin REFUSED {record}: {message}")
        for problem in res.round_trip:
            lines.append(f"seed {res.seed}: round trip: {problem}")
        for disagreement in res.routing:
            lines.append(f"seed {res.seed}: {disagreement}")
        for d in res.disagreements:
            which = ",".join(
                n for n, flag in (("A!=B", d.a_vs_b), ("trace!=A", d.trace_vs_a),
                                  ("trace!=B", d.trace_vs_b)) if flag
            )  # fmt: skip
            lines.append(f"seed {d.seed}  [{d.recipient.kind}]  {d.recipient.address}   ({which})")
            lines.append(f"    A (maplookup): {d.a.short()}")
            lines.append(f"    B (hash:)    : {d.b.short()}")
            lines.append(f"    trace        : {_trace_short(d.trace)}")
            if records:
                for record in d.records:
                    lines.append(f"      | {record}")
    return "\n".join(lines)
