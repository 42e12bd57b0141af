"""Seeded random data sets covering every record kind, and a loader through ``maplookup.admin``.

A data set is plain data (domains, mailboxes, aliases), generated from a seed so a failure can be
replayed.  Every record kind of the issue appears in every data set unless it is left out on
purpose (``exclude=``), so that the disagreements of one kind can be switched off to see the rest.

Kinds (the names ``exclude`` takes):

* ``domain_ids``: mailbox domains with default uid/gid (others have none);
* ``mailbox_ids``: mailboxes with their own uid and/or gid;
* ``mbox``: mbox mailboxes (a path without trailing ``/``) next to Maildirs;
* ``catchall_mailbox``: a catch-all mailbox ``@domain``;
* ``catchall_alias``: a catch-all alias ``@domain`` in a mailbox domain that has mailboxes,
  and in a forwarding-only alias domain;
* ``alias_multi``: aliases with several targets (mailboxes, other aliases);
* ``alias_remote``: targets in domains not hosted here;
* ``alias_on_mailbox``: an alias on an address that is also a mailbox;
* ``alias_domain``: a forwarding-only alias domain with aliases;
* ``mirror_domain``: a mirror (``alias_of``) of a mailbox domain;
* ``local_target``: alias targets without ``@`` (a local account, completed with
  ``@$myorigin`` by Postfix); behind the ``local_targets`` flag as well;
* ``domain_target``: an alias whose only target is ``@other.domain`` (keeps the local part);
* ``utf8``: UTF-8 local parts (``straße``, ``ärger``);
* ``delimiter_key``: a mailbox whose local part contains the recipient delimiter
  (``list+info``), so the full key matches before extension stripping;
* ``mailbox_login``: mailboxes whose SASL login is not their address (issue 14);
* ``sender_grant``: explicit sender grants: an alias, an outside address, an address with an
  extension, ``@domain`` of a mailbox domain (and so of its mirror), a mirror's address;
* ``relay_domain``: relay domains, one a subdomain of another, one open (``@domain``), one
  sometimes disabled, with relay recipients (and one in a hosted domain, for a backup MX);
* ``transport``: transport entries for a domain (and its subdomains), a domain without its
  subdomains, ``.domain`` only, addresses, and sometimes the wildcard ``*``; all of them
  ``discard:`` transports (the nexthop names the entry), so that nothing leaves the host.

The records of the maps beyond delivery come from a random generator of their own, so that
the delivery records of a seed are those it always had.

Uids and gids are in the range 1000..9999 (``virtual_minimum_uid = 1000``); ``SERVER_DEFAULT_UID``
and ``SERVER_DEFAULT_GID`` are the server's configured defaults, for mailboxes whose domain has
none.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg

from maplookup.db import admin, admin_routing
from maplookup.db.admin_input import AdminError

KINDS = (
    "domain_ids",
    "mailbox_ids",
    "mbox",
    "catchall_mailbox",
    "catchall_alias",
    "alias_multi",
    "alias_remote",
    "alias_on_mailbox",
    "alias_domain",
    "mirror_domain",
    "local_target",
    "domain_target",
    "utf8",
    "delimiter_key",
    "mailbox_login",
    "sender_grant",
    "relay_domain",
    "transport",
)

VIRTUAL_MINIMUM_UID = 1000
SERVER_DEFAULT_UID = 1500
SERVER_DEFAULT_GID = 1501

# Names of domains that are never hosted: remote targets and unhosted recipients.
REMOTE_DOMAINS = ("remote.example", "elsewhere.example")
UNHOSTED_DOMAINS = ("unhosted.example", "nowhere.example")

_ASCII_LOCALS = (
    "anna", "bob", "carl", "dora", "emil", "fritz", "greta", "hans", "ida", "jonas",
    "karl", "lena", "max", "nora", "otto", "paul", "first.last", "x-ray", "info", "sales",
)  # fmt: skip
_UTF8_LOCALS = ("straße", "ärger", "jürgen", "zoë")


@dataclass(frozen=True)
class MailboxDomain:
    name: str
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class AliasDomain:
    name: str
    alias_of: str | None = None  # None: forwarding-only


@dataclass(frozen=True)
class Mailbox:
    address: str  # local@domain, or @domain for a catch-all mailbox
    path: str | None = None  # None: admin's default domain/local/ (a Maildir)
    uid: int | None = None
    gid: int | None = None
    login: str | None = None  # None: the default, the address itself


@dataclass(frozen=True)
class Alias:
    address: str  # local@domain, or @domain for a catch-all alias
    targets: tuple[str, ...]


@dataclass
class Dataset:
    seed: int
    kinds: frozenset[str]
    mailbox_domains: list[MailboxDomain] = field(default_factory=list)
    alias_domains: list[AliasDomain] = field(default_factory=list)
    mailboxes: list[Mailbox] = field(default_factory=list)
    aliases: list[Alias] = field(default_factory=list)
    # The maps beyond delivery (issue 14).
    grants: list[tuple[str, str]] = field(default_factory=list)  # (address or @domain, login)
    relay_domains: list[tuple[str, bool]] = field(default_factory=list)  # (name, enabled)
    relay_recipients: list[str] = field(default_factory=list)
    transports: list[tuple[str, str, bool]] = field(default_factory=list)  # key, value, subdomains
    # Filled by load(): records admin refused, with its message.
    refused: list[tuple[object, str]] = field(default_factory=list)

    def domain_kind(self, name: str) -> str:
        """'mailbox', 'forward', 'mirror' or 'unhosted'."""
        if any(d.name == name for d in self.mailbox_domains):
            return "mailbox"
        for d in self.alias_domains:
            if d.name == name:
                return "mirror" if d.alias_of else "forward"
        return "unhosted"

    def describe(self) -> str:
        """The data set as text, one record a line (for failure reports)."""
        lines = [f"# dataset seed {self.seed}"]
        for d in self.mailbox_domains:
            lines.append(f"domain {d.name} uid={d.uid} gid={d.gid}")
        for a in self.alias_domains:
            lines.append(
                f"domain {a.name} " + (f"alias-of={a.alias_of}" if a.alias_of else "alias")
            )
        for m in self.mailboxes:
            lines.append(f"mailbox {m.address} path={m.path} uid={m.uid} gid={m.gid}")
        for al in self.aliases:
            lines.append(f"alias {al.address} -> {', '.join(al.targets)}")
        lines += [f"mailbox {m.address} login={m.login}" for m in self.mailboxes if m.login]
        lines += [f"sender allow {address} {login}" for address, login in self.grants]
        lines += [f"domain {name} --relay enabled={on}" for name, on in self.relay_domains]
        lines += [f"relay-recipient add {address}" for address in self.relay_recipients]
        lines += [
            f"transport set {key} {value}" + ("" if sub else " (no subdomains)")
            for key, value, sub in self.transports
        ]
        for record, message in self.refused:
            lines.append(f"REFUSED by admin: {record}: {message}")
        return "\n".join(lines)

    def records_for(self, address: str) -> list[str]:
        """The records that can decide ``address``: its domain (and a mirror's target), the
        catch-alls there, and the records of its local part (folded, extension and quotes
        stripped); for the disagreement table."""
        local, _, domain = address.rpartition("@")
        domain = domain.lower()
        base = local.strip('"').lower().split("+", 1)[0]
        domains = {domain}
        out = []
        for a in self.alias_domains:
            if a.name == domain:
                out.append(
                    f"domain {a.name} " + (f"alias-of={a.alias_of}" if a.alias_of else "alias")
                )
                if a.alias_of:
                    domains.add(a.alias_of)
        for d in self.mailbox_domains:
            if d.name in domains:
                out.append(f"domain {d.name} uid={d.uid} gid={d.gid}")
        refused = {id(record) for record, _ in self.refused}
        for m in self.mailboxes:
            m_local, _, m_domain = m.address.rpartition("@")
            if m_domain in domains and m_local in ("", base, local.lower()):
                out.append(f"mailbox {m.address} path={m.path} uid={m.uid} gid={m.gid}")
        for al in self.aliases:
            a_local, _, a_domain = al.address.rpartition("@")
            if a_domain in domains and a_local in ("", base, local.lower()):
                mark = "  (REFUSED by admin)" if id(al) in refused else ""
                out.append(f"alias {al.address} -> {','.join(al.targets)}{mark}")
        return out


def generate(
    seed: int, *, local_targets: bool = True, exclude: frozenset[str] | set[str] = frozenset()
) -> Dataset:
    """A data set for ``seed`` with every kind in KINDS except ``exclude``.

    ``local_targets`` (on by default) adds alias targets without '@' (kind ``local_target``).
    """
    unknown = set(exclude) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown record kinds: {sorted(unknown)}")
    kinds = frozenset(k for k in KINDS if k not in exclude)
    if not local_targets:
        kinds -= {"local_target"}
    rng = random.Random(seed)
    ds = Dataset(seed=seed, kinds=kinds)
    ids = iter(range(1000 + rng.randrange(0, 50) * 100, 10_000))

    def next_id() -> int:
        return next(ids)

    # Mailbox domains: one with default ids, one without, one random.
    mdomains = ["alpha.test", "beta.test", "gamma.test"]
    for i, name in enumerate(mdomains):
        with_ids = "domain_ids" in kinds and (i == 0 or (i == 2 and rng.random() < 0.5))
        if with_ids:
            # Sometimes only one of the two defaults.
            which = rng.choice(("both", "both", "uid", "gid"))
            uid = next_id() if which in ("both", "uid") else None
            gid = next_id() if which in ("both", "gid") else None
            ds.mailbox_domains.append(MailboxDomain(name, uid, gid))
        else:
            ds.mailbox_domains.append(MailboxDomain(name))

    # Mailboxes.
    locals_pool = list(_ASCII_LOCALS)
    rng.shuffle(locals_pool)
    mailbox_locals: dict[str, list[str]] = {d: [] for d in mdomains}
    for name in mdomains:
        count = rng.randint(3, 5)
        chosen = [locals_pool.pop() for _ in range(count)]
        if "utf8" in kinds:
            chosen.append(rng.choice(_UTF8_LOCALS))
            if name == "alpha.test" and "straße" not in chosen:
                chosen.append("straße")
        if "delimiter_key" in kinds and name == "beta.test":
            chosen.append("list+info")
        for local in chosen:
            path = None
            if "mbox" in kinds and rng.random() < 0.3:
                path = f"{name}/{local.replace('+', '-')}.mbox"
            elif rng.random() < 0.2:
                path = f"{name}/md-{local.replace('+', '-')}/"
            uid = gid = None
            if "mailbox_ids" in kinds and rng.random() < 0.4:
                which = rng.choice(("both", "both", "uid", "gid"))
                uid = next_id() if which in ("both", "uid") else None
                gid = next_id() if which in ("both", "gid") else None
            ds.mailboxes.append(Mailbox(f"{local}@{name}", path, uid, gid))
            mailbox_locals[name].append(local)
        locals_pool += [x for x in _ASCII_LOCALS if x not in locals_pool and rng.random() < 0.3]

    # A catch-all mailbox in gamma (sometimes with its own ids).
    if "catchall_mailbox" in kinds:
        uid = gid = None
        if "mailbox_ids" in kinds and rng.random() < 0.5:
            uid, gid = next_id(), next_id()
        path = (
            "gamma.test/catchall/"
            if rng.random() < 0.7 or "mbox" not in kinds
            else ("gamma.test/catchall.mbox")
        )
        ds.mailboxes.append(Mailbox("@gamma.test", path, uid, gid))

    # Alias domains.
    if "alias_domain" in kinds:
        ds.alias_domains.append(AliasDomain("fwd.test"))
    if "mirror_domain" in kinds:
        ds.alias_domains.append(AliasDomain("mirror.test", alias_of="alpha.test"))

    all_mailboxes = [m.address for m in ds.mailboxes if not m.address.startswith("@")]

    def remote() -> str:
        return (
            f"{rng.choice(('ext', 'far', 'out'))}{rng.randint(1, 9)}@{rng.choice(REMOTE_DOMAINS)}"
        )

    # Aliases in mailbox domains.
    used: set[str] = set()

    def fresh(domain: str) -> str:
        for _ in range(100):
            local = rng.choice(("team", "staff", "all", "ops", "help", "desk", "crew", "board"))
            local += str(rng.randint(1, 9))
            address = f"{local}@{domain}"
            if address not in used:
                used.add(address)
                return address
        raise RuntimeError("no fresh alias name")

    for domain in mdomains:
        # A simple alias to a mailbox.
        ds.aliases.append(Alias(fresh(domain), (rng.choice(all_mailboxes),)))
    if "alias_multi" in kinds:
        for _ in range(2):
            targets = rng.sample(all_mailboxes, 2)
            if "alias_remote" in kinds and rng.random() < 0.7:
                targets.append(remote())
            ds.aliases.append(Alias(fresh(rng.choice(mdomains)), tuple(targets)))
        # A chain: an alias whose target is another alias.
        first = ds.aliases[0]
        ds.aliases.append(Alias(fresh("beta.test"), (first.address, rng.choice(all_mailboxes))))
    if "alias_remote" in kinds:
        ds.aliases.append(Alias(fresh("alpha.test"), (remote(),)))
    if "alias_on_mailbox" in kinds:
        mailbox = rng.choice([a for a in all_mailboxes if a.endswith("@alpha.test")])
        targets = [rng.choice(all_mailboxes)]
        if rng.random() < 0.5:
            targets.append(mailbox)  # keeps a copy: the address expands into itself
        ds.aliases.append(Alias(mailbox, tuple(targets)))
    if "local_target" in kinds:
        ds.aliases.append(Alias(fresh("alpha.test"), ("postmaster", rng.choice(all_mailboxes))))
    if "domain_target" in kinds:
        ds.aliases.append(Alias(fresh("gamma.test"), (f"@{rng.choice(REMOTE_DOMAINS)}",)))
    if "catchall_alias" in kinds:
        # A catch-all alias in a mailbox domain that has mailboxes (beta has no catch-all
        # mailbox; gamma's catch-all mailbox is left alone).
        target = rng.choice([a for a in all_mailboxes if not a.endswith("@beta.test")])
        ds.aliases.append(Alias("@beta.test", (target,)))

    # Aliases in the forwarding-only alias domain.
    if "alias_domain" in kinds:
        for _ in range(rng.randint(2, 3)):
            targets = [rng.choice(all_mailboxes)]
            if "alias_multi" in kinds and rng.random() < 0.5:
                targets.append(rng.choice(all_mailboxes))
            if "alias_remote" in kinds and rng.random() < 0.4:
                targets.append(remote())
            ds.aliases.append(Alias(fresh("fwd.test"), tuple(dict.fromkeys(targets))))
        if "utf8" in kinds:
            ds.aliases.append(Alias("größe@fwd.test", (rng.choice(all_mailboxes),)))
        if "catchall_alias" in kinds and rng.random() < 0.7:
            ds.aliases.append(Alias("@fwd.test", (rng.choice(all_mailboxes),)))
    if "mirror_domain" in kinds and rng.random() < 0.5:
        # An alias of the mirror domain's own (it takes precedence over the mirror rule).
        ds.aliases.append(Alias(fresh("mirror.test"), (rng.choice(all_mailboxes),)))
    _generate_routing(ds, random.Random(seed * 104_729 + 14))
    return ds


RELAY_DOMAINS = ("relay.test", "sub.relay.test", "open.test", "offrelay.test")


def _generate_routing(ds: Dataset, rng: random.Random) -> None:
    """The records of the maps beyond delivery (issue 14), with their own random generator."""
    kinds = ds.kinds
    boxes = [m for m in ds.mailboxes if not m.address.startswith("@")]
    aliases = [a.address for a in ds.aliases if not a.address.startswith("@")]
    if "mailbox_login" in kinds:
        for index in rng.sample(range(len(ds.mailboxes)), 3):
            m = ds.mailboxes[index]
            if not m.address.startswith("@"):
                local = m.address.partition("@")[0]
                login = rng.choice((f"{local}-sasl", f"U{index}", m.address.upper()))
                ds.mailboxes[index] = replace(m, login=login)
    if "sender_grant" in kinds:
        logins = ["boss", "Helper", rng.choice(boxes).address]
        ds.grants.append((rng.choice(aliases), rng.choice(logins)))
        ds.grants.append((f"me@{REMOTE_DOMAINS[0]}", rng.choice(boxes).address))
        ds.grants.append(("@gamma.test", "gammaboss"))
        ds.grants.append((f"shared{rng.randint(1, 9)}@beta.test", "boss"))
        ds.grants.append((f"{rng.choice(boxes).address.partition('@')[0]}+news@alpha.test", "news"))
        if rng.random() < 0.6:
            ds.grants.append(("@alpha.test", rng.choice(logins)))
        if "mirror_domain" in kinds and rng.random() < 0.6:
            ds.grants.append((f"{rng.choice(('sales', 'info', 'x'))}@mirror.test", "mirrorboss"))
        if rng.random() < 0.5:  # a second owner of a granted address
            ds.grants.append((ds.grants[0][0], "second"))
    if "relay_domain" in kinds:
        for name in RELAY_DOMAINS:
            ds.relay_domains.append((name, name != "offrelay.test" or rng.random() < 0.3))
        ds.relay_recipients += ["known@relay.test", "other@relay.test", "deep@sub.relay.test"]
        ds.relay_recipients += ["@open.test", "gone@offrelay.test", "extra@beta.test"]
        if rng.random() < 0.5:
            ds.relay_recipients.append("known+ext@relay.test")
    if "transport" in kinds:
        ds.transports.append(("gamma.test", "discard:t-gamma", rng.random() < 0.7))
        box = rng.choice([m.address for m in boxes if m.address.endswith("@beta.test")])
        ds.transports.append((box, "discard:t-box", True))
        ds.transports.append(("relay.test", "discard:t-relay", True))
        ds.transports.append(("only.test", "discard:t-only", False))
        ds.transports.append((".deep.test", "discard:t-deep", True))
        ds.transports.append((f"x@{UNHOSTED_DOMAINS[0]}", "discard:t-x", True))
        if "delimiter_key" in kinds:
            ds.transports.append(("list+info@beta.test", "discard:t-list", True))
        if rng.random() < 0.25:  # every class but the alias class: no virtual(8) delivery
            ds.transports.append(("*", "discard:t-wildcard", True))


async def load(conn: asyncpg.Connection, ds: Dataset) -> None:
    """Load ``ds`` through the admin functions; refusals go to ``ds.refused`` (not raised)."""
    ds.refused.clear()

    async def attempt(record: object, action: object) -> None:
        try:
            await action  # type: ignore[misc]
        except AdminError as exc:
            ds.refused.append((record, str(exc)))

    for d in ds.mailbox_domains:
        await attempt(d, admin.domain_add(conn, d.name, uid=d.uid, gid=d.gid))
    for a in ds.alias_domains:
        if a.alias_of:
            await attempt(a, admin.domain_add(conn, a.name, alias_of=a.alias_of))
        else:
            await attempt(a, admin.domain_add(conn, a.name, alias=True))
    for m in ds.mailboxes:
        await attempt(
            m,
            admin.mailbox_add(conn, m.address, path=m.path, uid=m.uid, gid=m.gid, login=m.login),
        )
    for al in ds.aliases:
        await attempt(al, admin.alias_add(conn, al.address, list(al.targets)))
    await _load_routing(conn, ds, attempt)


async def _load_routing(conn: asyncpg.Connection, ds: Dataset, attempt: Any) -> None:
    for address, login in ds.grants:
        await attempt(("grant", address, login), admin_routing.sender_allow(conn, address, login))
    for name, _ in ds.relay_domains:
        await attempt(("relay domain", name), admin.domain_add(conn, name, relay=True))
    for address in ds.relay_recipients:
        await attempt(
            ("relay recipient", address), admin_routing.relay_recipient_add(conn, address)
        )
    for name, enabled in ds.relay_domains:
        if not enabled:
            await attempt(("disable", name), admin.domain_set_enabled(conn, name, False))
    for key, value, subdomains in ds.transports:
        await attempt(
            ("transport", key, value),
            admin_routing.transport_set(conn, key, value, subdomains=subdomains),
        )
