"""The recipients to try for a data set: every key, and the variants Postfix treats specially.

Each recipient carries a ``kind`` label, shown in the disagreement table, so a developer sees at
once which sort of address disagrees: ``mailbox``, ``alias``, ``+ext`` (extensions with mixed
case), ``case`` (mixed-case local part and domain), ``utf8`` (UTF-8 local parts, Unicode case
folding), ``quoted`` (local parts that travel quoted), ``mirror``, ``unknown@<domain kind>``,
``unhosted``, and for the maps beyond delivery ``relay`` (relay domains, their subdomains and
relay recipients: relay_domains and relay_recipient_maps at RCPT) and ``transport`` (addresses
a transport_maps entry or its fallbacks decide).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .dataset import UNHOSTED_DOMAINS, Dataset


@dataclass(frozen=True)
class Recipient:
    address: str  # exactly as sent in RCPT TO:<...>
    kind: str

    @property
    def ascii(self) -> bool:
        return self.address.isascii()


def _mixed_case(text: str, rng: random.Random) -> str:
    out = "".join(c.upper() if rng.random() < 0.5 else c for c in text)
    if out == text and any(c.isalpha() for c in text):
        # Make sure at least one letter changes.
        i = next(i for i, c in enumerate(text) if c.isalpha())
        out = text[:i] + text[i].upper() + text[i + 1 :]
    return out


def _ext(rng: random.Random) -> str:
    return rng.choice(("Test", "News", "x", "MiXed", "a-b"))


def recipients_for(ds: Dataset) -> list[Recipient]:
    rng = random.Random(ds.seed * 7919 + 1)
    out: list[Recipient] = []
    seen: set[str] = set()

    def add(address: str, kind: str) -> None:
        if address not in seen:
            seen.add(address)
            out.append(Recipient(address, kind))

    mailboxes = [m.address for m in ds.mailboxes if not m.address.startswith("@")]
    aliases = [a.address for a in ds.aliases if not a.address.startswith("@")]

    for address in mailboxes:
        local, _, domain = address.rpartition("@")
        add(address, "mailbox")
        add(f"{local}+{_ext(rng)}@{domain}", "+ext")
        if rng.random() < 0.5 or not local.isascii():
            add(f"{_mixed_case(local, rng)}@{_mixed_case(domain, rng)}", "case")
        if not local.isascii():
            add(f"{local.upper()}@{domain}", "utf8")  # STRASSE, ÄRGER, JÜRGEN, ZOË
            add(f"{local.capitalize()}+{_ext(rng)}@{domain}", "utf8")
    for address in aliases:
        local, _, domain = address.rpartition("@")
        add(address, "alias")
        add(f"{local}+{_ext(rng)}@{domain}", "+ext")
        add(f"{_mixed_case(local, rng)}+{_ext(rng)}@{_mixed_case(domain, rng)}", "case")
        if not local.isascii():
            add(f"{local.upper()}@{domain}", "utf8")

    # Quoted local parts: a space and a '+' inside quotes, a double dot, a needlessly quoted
    # dot-atom, a quoted trailing dot.
    for domain in [d.name for d in ds.mailbox_domains] + [a.name for a in ds.alias_domains]:
        known = [a.rpartition("@")[0] for a in mailboxes + aliases if a.endswith("@" + domain)]
        if known:
            local = rng.choice([k for k in known if k.isascii()] or known)
            add(f'"{local}"@{domain}', "quoted")
            add(f'"{local}+odd user"@{domain}', "quoted")
        add(f'"a..b"@{domain}', "quoted")
        add(f'"trail."@{domain}', "quoted")

    # Mirror domains: users of the target domain, with and without extension, and case.
    for a in ds.alias_domains:
        if not a.alias_of:
            continue
        target_locals = [m.rpartition("@")[0] for m in mailboxes if m.endswith("@" + a.alias_of)]
        target_locals += [x.rpartition("@")[0] for x in aliases if x.endswith("@" + a.alias_of)]
        for local in rng.sample(target_locals, min(4, len(target_locals))):
            add(f"{local}@{a.name}", "mirror")
            add(f"{_mixed_case(local, rng)}+{_ext(rng)}@{a.name}", "mirror")

    # Unknown users in each domain, labelled with the domain's kind.
    for d in ds.mailbox_domains:
        catchall = []
        if any(m.address == "@" + d.name for m in ds.mailboxes):
            catchall.append("catchall-mailbox")
        if any(x.address == "@" + d.name for x in ds.aliases):
            catchall.append("catchall-alias")
        label = "unknown@mailbox-domain" + ("+" + "+".join(catchall) if catchall else "")
        add(f"nobody{rng.randint(1, 99)}@{d.name}", label)
        add(f"Nobody+{_ext(rng)}@{_mixed_case(d.name, rng)}", label)
    for a in ds.alias_domains:
        if a.alias_of:
            label = "unknown@mirror-domain"
        elif any(x.address == "@" + a.name for x in ds.aliases):
            label = "unknown@forward-domain+catchall-alias"
        else:
            label = "unknown@forward-domain"
        add(f"nobody{rng.randint(1, 99)}@{a.name}", label)
        add(f"Nobody+{_ext(rng)}@{a.name}", label)

    # Not hosted here: relayed (discarded by the test's transports).
    for domain in UNHOSTED_DOMAINS:
        add(f"someone@{domain}", "unhosted")
    add(f"Mixed+{_ext(rng)}@{_mixed_case(UNHOSTED_DOMAINS[0], rng)}", "unhosted")
    if "utf8" in ds.kinds:
        add(f"straße@{UNHOSTED_DOMAINS[1]}", "unhosted")
    for address, kind in routing_addresses(ds, rng):
        add(address, kind)
    return out


def routing_addresses(ds: Dataset, rng: random.Random) -> list[tuple[str, str]]:
    """Addresses the relay and transport records decide: records, their extensions and case,
    unknown users, subdomains (parent-domain matching), look-alike domains."""
    out: list[tuple[str, str]] = []
    for address in ds.relay_recipients:
        local, _, domain = address.rpartition("@")
        local = local or f"anyone{rng.randint(1, 9)}"
        out.append((f"{local}@{domain}", "relay"))
        out.append((f"{_mixed_case(local, rng)}+{_ext(rng)}@{_mixed_case(domain, rng)}", "relay"))
    for name, _ in ds.relay_domains:
        out.append((f"nobody{rng.randint(1, 99)}@{name}", "relay"))
        out.append((f"known@mx.{name}", "relay"))
        out.append((f"x@x{name}", "relay"))
    for key, _, _ in ds.transports:
        if key == "*":
            continue
        local, at, domain = key.rpartition("@")
        if at:
            out.append((f"{local}+{_ext(rng)}@{domain}", "transport"))
            out.append((f"other{rng.randint(1, 9)}@{domain}", "transport"))
            continue
        domain = domain.lstrip(".")
        out.append((f"x@{domain}", "transport"))
        out.append((f"x@sub.{_mixed_case(domain, rng)}", "transport"))
        out.append((f"x@a.b.{domain}", "transport"))
    return out
