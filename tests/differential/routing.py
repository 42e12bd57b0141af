"""The four maps of issue 14, key by key: Postfix with maplookup (socketmap) against Postfix with
the ``hash:`` tables from ``maplookup export``, each asked the way the Postfix daemon that uses
the map asks it.

Both tables are queried with Postfix's own client (``postmap -q -``: its socketmap client, and
its hash: reader with Postfix's key folding), and the daemon's lookup order is applied on top,
as the Postfix source does it (3.7, the version under test):

* ``smtpd_sender_login_maps`` and ``relay_recipient_maps``: smtpd's ``mail_addr_find()``
  (src/smtpd/smtpd_check.c: check_mail_addr_find), strategy MA_FIND_DEFAULT: the address (in
  external form first, then internal, MA_FIND_FORM_LEGACY), the address without its extension,
  then ``@domain`` (src/global/mail_addr_find.c).  MA_FIND_LOCALPART_IF_LOCAL never applies:
  no test domain is $myorigin, $mydestination or an interface address;
* ``relay_domains``: ``match_hostname()`` (src/util/match_ops.c): the domain, then its parent
  domains, ``b.c`` and ``c`` for ``a.b.c`` with parent_domain_matches_subdomains listing
  relay_domains (the default), ``.b.c`` and ``.c`` without it (both are checked);
* ``transport_maps``: ``transport_lookup()`` (src/trivial-rewrite/transport.c): mail_addr_find
  with MA_FIND_FULL | NOEXT | DOMAIN | PDDMDS (the address, without its extension, the domain,
  then ``.parent`` domains), then the wildcard ``*``.

Every step after the first asks with the PARTIAL flag, which Postfix skips for a table that is
not DICT_FLAG_FIXED (src/util/dict.h; a socketmap is a pattern table): so for maplookup only the
full key (and ``*``) is asked, and maplookup does the fallbacks itself, which is what this
compares.  The SMTP runs check the same maps through real smtpd and trivial-rewrite
(relay domains, relay recipients, transports); this adds the values, sender logins, and keys no
SMTP outcome tells apart.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from maplookup.address import fold, quote_local, split_extension

from .dataset import Dataset

Get = Callable[[str, bool], str | None]  # (key, partial) -> value


# -- Postfix's lookup orders ----------------------------------------------------------------------


def mail_addr_find(
    get: Get, address: str, delimiter: str, *, at_domain: bool, domains: bool
) -> str | None:
    """mail_addr_find_opt() for an internal-form address, MA_FIND_FORM_LEGACY: FULL, NOEXT,
    then ``@domain`` (``at_domain``) or the domain and its ``.parent`` domains (``domains``,
    MA_FIND_DOMAIN | MA_FIND_PDDMDS)."""
    local, at, domain = address.rpartition("@")
    if not at:
        return None

    def find_addr(key: str, partial: bool) -> str | None:
        external = quote_local(key)
        found = get(external, partial)
        if found is None and external != key:
            found = get(key, partial)
        return found

    result = find_addr(address, False)
    base, extension = split_extension(local, delimiter)
    if result is None and extension is not None:
        result = find_addr(f"{base}@{domain}", True)
    if result is None and at_domain:
        result = get(f"@{domain}", True)
    if result is None and domains:
        name = domain
        while name:
            result = get(name, True)
            if result is not None:
                break
            dot = name.find(".", 1)
            if dot < 0:
                break
            name = name[dot:]  # PDDMDS: '.parent'
    return result


def match_hostname(get: Get, name: str, *, parent: bool) -> str | None:
    """The matching entry of match_hostname() for a table, or None."""
    entry = fold(name)
    first = True
    while entry:
        if get(entry, not first) is not None:
            return entry
        first = False
        dot = entry.find(".", 1)
        if dot < 0:
            return None
        entry = entry[dot + 1 :] if parent else entry[dot:]
    return None


def transport_lookup(get: Get, address: str, delimiter: str) -> str | None:
    found = mail_addr_find(get, address, delimiter, at_domain=False, domains=True)
    return found if found is not None else get("*", False)


# -- querying tables with postmap ----------------------------------------------------------------


class Table:
    """A Postfix table asked through ``postmap -q -``: first every key a lookup may ask is
    recorded (``collect``), then all are asked in one run (``fill``), then the lookups run
    again over the answers (``answers``)."""

    def __init__(self, spec: str, fixed: bool) -> None:
        self.spec = spec
        self.fixed = fixed  # DICT_FLAG_FIXED: a hash: table; a socketmap is not
        self.wanted: set[str] = set()
        self.answers: dict[str, str] | None = None

    def get(self, key: str, partial: bool) -> str | None:
        if partial and not self.fixed:
            return None  # maps_find() skips the PARTIAL keys for a pattern table
        if self.answers is None:
            self.wanted.add(key)
            return None
        return self.answers.get(key)

    def fill(self, postmap: str, config_dir: Path) -> None:
        keys = sorted(k for k in self.wanted if "\n" not in k)
        result = subprocess.run(
            [postmap, "-c", str(config_dir), "-q", "-", self.spec],
            input="".join(f"{k}\n" for k in keys),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode not in (0, 1) or result.stderr.strip():
            raise RuntimeError(f"postmap -q - {self.spec}: {result.stderr.strip()}")
        self.answers = {}
        for line in result.stdout.splitlines():
            key, _, value = line.partition("\t")
            self.answers[key] = value


# -- comparing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingDisagreement:
    map_name: str
    key: str
    maplookup: str | None
    hash_table: str | None

    def __str__(self) -> str:
        return (
            f"{self.map_name} {self.key!r}: maplookup {self.maplookup!r}, hash: {self.hash_table!r}"
        )


MAPS = ("sender_login", "relay_domains", "relay_recipients", "transport")


def keys_for(ds: Dataset, addresses: Iterable[str]) -> dict[str, list[str]]:
    """The keys to compare: every recipient address (internal form) for the address maps,
    each address's domain and its subdomains for relay_domains, plus the grants' keys."""
    from maplookup.address import unquote_local

    internal = sorted({unquote_local(a) for a in addresses})
    internal += sorted({g for g, _ in ds.grants if not g.startswith("@")} - set(internal))
    domains = sorted({a.rpartition("@")[2] for a in internal})
    domains += [f"mx.sub.{d}" for d in domains] + [name.upper() for name, _ in ds.relay_domains]
    return {
        "sender_login": internal,
        "relay_domains": domains,
        "relay_recipients": internal,
        "transport": internal,
    }


def _lookup(map_name: str, get: Get, key: str, delimiter: str, *, parent: bool) -> str | None:
    if map_name == "relay_domains":
        return match_hostname(get, key, parent=parent)
    if map_name == "transport":
        return transport_lookup(get, key, delimiter)
    return mail_addr_find(get, key, delimiter, at_domain=True, domains=False)


def compare_routing(
    ds: Dataset,
    addresses: Iterable[str],
    socketmap: str,
    tables_dir: Path,
    config_dir: Path,
    postmap: str,
    delimiter: str = "+",
) -> list[RoutingDisagreement]:
    """Every key of every map whose answer differs between maplookup and the hash: table
    (relay_domains: the matching entry, with and without parent_domain_matches_subdomains)."""
    keys = keys_for(ds, addresses)
    out: list[RoutingDisagreement] = []
    for map_name in MAPS:
        a = Table(f"{socketmap}:{map_name}", fixed=False)
        b = Table(f"hash:{tables_dir / map_name}", fixed=True)
        modes = (True, False) if map_name == "relay_domains" else (True,)
        for table in (a, b):  # collect the keys every lookup may ask, then ask them at once
            for key in keys[map_name]:
                for parent in modes:
                    _lookup(map_name, table.get, key, delimiter, parent=parent)
            table.fill(postmap, config_dir)
        for key in keys[map_name]:
            for parent in modes:
                got_a = _lookup(map_name, a.get, key, delimiter, parent=parent)
                got_b = _lookup(map_name, b.get, key, delimiter, parent=parent)
                if map_name == "relay_domains":
                    # maplookup answers the relay domain's name; the hash: table's matching
                    # entry is the name ('.name' without parent matching).
                    got_a = None if got_a is None else a.get(fold(key), False)
                    got_b = None if got_b is None else got_b.lstrip(".")
                if got_a != got_b:
                    label = map_name if parent else f"{map_name} (no parent matching)"
                    out.append(RoutingDisagreement(label, key, got_a, got_b))
    return out
