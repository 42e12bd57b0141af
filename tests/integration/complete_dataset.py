"""Random datasets and keys for the complete copy's property test (test_complete_copy.py).

Small pools of names, so that random rows meet: mirrors of mailbox domains, relay domains
with subdomains (parent matching), aliases whose targets are other aliases (chains, loops),
catch-alls of both kinds, '@domain' targets, local accounts, grants for hosted and outside
domains, transports for addresses, domains, '.parents' and '*'.  Every row satisfies
schema.sql's constraints (the database checks them when the rows are loaded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from maplookup.address import quote_local
from maplookup.lookup.complete import MapsCopy
from maplookup.lookup.complete import store as copy_store

MAILBOX_DOMAINS = ("a.test", "b.test", "ü.test")
OTHER_DOMAINS = ("m.test", "n.test", "r.test", "sub.r.test", "x.sub.r.test")
DOMAIN_NAMES = MAILBOX_DOMAINS + OTHER_DOMAINS
UNHOSTED = ("outside.test", "deep.x.sub.r.test", "zz.r.test")
TRANSPORT_ONLY = (".r.test", ".sub.r.test", ".test", "*")
#: Every name a row's domain column can hold here (the partitions of a copy).
NAMES = (*DOMAIN_NAMES, *UNHOSTED, *TRANSPORT_ONLY)
# Families of local parts: a base and its extended forms under the delimiters tried, so that
# exact-before-base orders are exercised.  Each example draws a few families, so that its rows
# meet (a mailbox and an alias of one name, a base and its extension, a login and a grant).
FAMILIES = (
    ("u", "u+v", "u-w"),
    ("x", "x-y", "x.z", "x-request"),
    ("a", "a.b", "a=c"),
    ("user", "user+tag"),
    ("info",),
    ("bob", "bob-x"),
    ("postmaster", "postmaster+x"),
    ("owner", "owner-x"),
    ("strasse",),
    ("é", "é+1"),
    ('a"b', 'a"b+c'),
    ("q\\x",),
)
LOCAL_PARTS = tuple(local for family in FAMILIES for local in family)
# Targets as the tools store them: internal form, case as written.
TARGETS = (
    "user@a.test",
    "info@a.test",
    "bob@b.test",
    "user@m.test",
    "info@n.test",
    "u+v@ü.test",
    "x@outside.test",
    "Mixed@Ext.test",
    "y+z@outside.test",
    "a b@outside.test",
    "local",
    "Info@A.test",
)
SOLE_TARGETS = ("@outside.test", "@a.test", "@m.test")
LOGINS = ("alice", "Bob", "user@a.test", "zed", "é-login", "carol@b.test")
TRANSPORTS = ("smtp:[h1]", "lmtp:unix:private/x", "relay:[h2]:25", "local:")
EXTENSIONS = ("tag", "", "x+y", "a-b", "é", "%", "\\1", "+")
DELIMITERS = ("+", "-", "+-", ".", "+=", "")
CASES: tuple[Callable[[str], str], ...] = (str.lower, str.upper, str.swapcase, str.title)
SPECIAL_KEYS = (
    b"",
    b"@",
    b"*",
    b"user",
    b"user@",
    b"@a.test",
    b"@m.test",
    b"a@b@a.test",
    b"\xff@a.test",
    b"us\x00er@a.test",
    b"+tag@a.test",
    b'"user"@a.test',
    b'"a\\"b"@a.test',
    b".r.test",
    b"deep.x.sub.r.test",
)
# Referencing tables first.
TABLES = ("aliases", "mailboxes", "relay_recipients", "sender_grants", "transports", "domains")
ENABLED = st.integers(0, 4).map(bool)  # mostly enabled
IDS = st.one_of(st.none(), st.integers(1000, 1003))


@dataclass(frozen=True)
class Dataset:
    """Rows in the column order of the INSERTs in :meth:`load`."""

    domains: tuple[tuple[Any, ...], ...]
    mailboxes: tuple[tuple[Any, ...], ...]  # login None: the trigger's default
    null_logins: tuple[tuple[str, str], ...]  # mailboxes whose login is then set to NULL
    aliases: tuple[tuple[Any, ...], ...]
    grants: tuple[tuple[str, str, str], ...]
    relay_recipients: tuple[tuple[str, str], ...]
    transports: tuple[tuple[str, str, str], ...]

    def names(self) -> set[str]:
        rows = (
            *self.domains,
            *self.mailboxes,
            *self.aliases,
            *self.grants,
            *self.relay_recipients,
            *self.transports,
        )
        return {row[0] for row in rows}

    async def load(self, conn: Any) -> None:
        """Replace every row of the six tables with this dataset's (an asyncpg connection)."""
        async with conn.transaction():
            # DELETE, not TRUNCATE: for a few rows it is several times faster.
            for table in TABLES:
                await conn.execute(f"DELETE FROM maplookup.{table}")
            await conn.executemany(
                "INSERT INTO maplookup.domains"
                " (name, kind, alias_of, default_uid, default_gid, enabled)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                sorted(self.domains, key=lambda d: d[2] is not None),  # mirror targets first
            )
            await conn.executemany(
                "INSERT INTO maplookup.mailboxes (domain, local_part, path, uid, gid, login,"
                " enabled) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                self.mailboxes,
            )
            await conn.executemany(
                "UPDATE maplookup.mailboxes SET login = NULL WHERE domain = $1 AND local_part = $2",
                self.null_logins,
            )
            await conn.executemany(
                "INSERT INTO maplookup.aliases (domain, local_part, targets, enabled)"
                " VALUES ($1, $2, $3, $4)",
                self.aliases,
            )
            await conn.executemany(
                "INSERT INTO maplookup.sender_grants (domain, local_part, login)"
                " VALUES ($1, $2, $3)",
                self.grants,
            )
            await conn.executemany(
                "INSERT INTO maplookup.relay_recipients (domain, local_part) VALUES ($1, $2)",
                self.relay_recipients,
            )
            await conn.executemany(
                "INSERT INTO maplookup.transports (domain, local_part, transport)"
                " VALUES ($1, $2, $3)",
                self.transports,
            )


@st.composite
def datasets(draw: st.DrawFn) -> Dataset:
    domains: list[tuple[Any, ...]] = []
    mailbox_domains = [d for d in MAILBOX_DOMAINS if draw(st.integers(0, 5))]
    for name in mailbox_domains:
        domains.append((name, "mailbox", None, draw(IDS), draw(IDS), draw(ENABLED)))
    for name in OTHER_DOMAINS:
        kind = draw(st.sampled_from(("alias", "mirror", "relay", "absent")))
        if kind == "mirror" and mailbox_domains:
            target = draw(st.sampled_from(mailbox_domains))
            domains.append((name, "alias", target, None, None, draw(ENABLED)))
        elif kind in ("alias", "relay"):
            domains.append((name, kind, None, None, None, draw(ENABLED)))
    hosted = [d[0] for d in domains]
    families = draw(st.lists(st.sampled_from(FAMILIES), min_size=2, max_size=4, unique=True))
    local_parts = st.sampled_from(("", *(local for family in families for local in family)))

    mailboxes, null_logins = [], []
    for domain in mailbox_domains:
        for local in draw(st.sets(local_parts, max_size=5)):
            path = draw(st.sampled_from((f"{domain}/{local}/", f"custom/{local or 'all'}")))
            login = draw(st.sampled_from((None, None, "", "", *LOGINS)))
            if login == "":
                null_logins.append((domain, local))
            mailboxes.append(
                (domain, local, path, draw(IDS), draw(IDS), login or None, draw(ENABLED))
            )
    # Targets: fixed ones, and addresses of this example's own rows (chains, loops, mirrors).
    own_targets = st.builds(
        lambda local, domain, case: case(f"{local}@{domain}"),
        local_parts.filter(bool),
        st.sampled_from(DOMAIN_NAMES),
        st.sampled_from((str.lower, str.lower, str.title)),
    )
    targets_in = st.one_of(st.sampled_from(TARGETS), own_targets)
    aliases = []
    for domain in hosted:
        chosen = draw(st.sets(local_parts, max_size=4))
        if draw(st.booleans()):
            chosen.add("")  # catch-alls often: they meet mailboxes and mirrors
        for local in chosen:
            targets = draw(
                st.one_of(
                    st.lists(targets_in, min_size=1, max_size=3, unique=True),
                    st.sampled_from(SOLE_TARGETS).map(lambda t: [t]),
                )
            )
            aliases.append((domain, local, targets, draw(ENABLED)))
    grant_domains = st.sampled_from((*DOMAIN_NAMES, "outside.test"))
    grants = draw(
        st.lists(
            st.tuples(grant_domains, st.one_of(st.just(""), local_parts), st.sampled_from(LOGINS)),
            max_size=10,
            unique_by=lambda g: g,
        )
    )
    relay_recipients = (
        draw(st.lists(st.tuples(st.sampled_from(hosted), local_parts), max_size=5, unique=True))
        if hosted
        else []
    )
    transport_keys = st.one_of(
        st.tuples(st.sampled_from((*DOMAIN_NAMES, *UNHOSTED)), local_parts),
        st.tuples(st.sampled_from(TRANSPORT_ONLY), st.just("")),
    )
    transports = draw(
        st.lists(
            st.tuples(transport_keys, st.sampled_from(TRANSPORTS)),
            max_size=6,
            unique_by=lambda t: t[0],
        )
    )
    return Dataset(
        tuple(domains),
        tuple(mailboxes),
        tuple(null_logins),
        tuple(aliases),
        tuple(grants),
        tuple(relay_recipients),
        tuple((d, local, t) for (d, local), t in transports),
    )


@st.composite
def keys(draw: st.DrawFn, data: Dataset, delimiter: str) -> bytes:
    """A key for any map: mostly addresses and domains of the dataset, some never stored."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.sampled_from(SPECIAL_KEYS))
    case = draw(st.sampled_from(CASES))
    if kind == 1:
        names = (*DOMAIN_NAMES, *UNHOSTED, "unknown.test")
        return case(draw(st.sampled_from(names))).encode()
    stored = (*data.mailboxes, *data.aliases, *data.grants, *data.relay_recipients)
    rows = [(row[1], row[0]) for row in stored]
    others = [(row[1], row[0]) for row in data.transports]
    others += [(t.partition("@")[0], t.partition("@")[2]) for t in TARGETS if "@" in t]
    if kind <= 6 and rows:  # a stored address, as it is
        local, domain = draw(st.sampled_from(rows))
    elif kind == 7:  # an address named elsewhere (transports, alias targets)
        local, domain = draw(st.sampled_from(others))
    elif kind == 8 and rows:  # a stored local part in another domain: mirrors, catch-alls
        local = draw(st.sampled_from(rows))[0]
        domain = draw(st.sampled_from((*DOMAIN_NAMES, *UNHOSTED)))
    else:
        local = draw(st.one_of(st.sampled_from(("", *LOCAL_PARTS)), st.text("abc+-.", max_size=4)))
        domain = draw(st.sampled_from((*DOMAIN_NAMES, *UNHOSTED, "unknown.test")))
    if delimiter and draw(st.booleans()):
        local += draw(st.sampled_from(delimiter)) + draw(st.sampled_from(EXTENSIONS))
    address = case(f"{local}@{domain}")
    if draw(st.integers(0, 3)) == 0:
        address = quote_local(address)  # Postfix's external form, or forced quotes
        if not address.startswith('"') and draw(st.booleans()):
            at = address.rfind("@")
            address = f'"{address[:at]}"{address[at:]}'
    return address.encode()


def copy_state(copy: MapsCopy) -> tuple[object, ...]:
    """Everything a copy holds that lookups or a later ``replace`` can tell apart: the
    tables (a grant's logins as a set: sender_login sorts them), and the keys each name's
    partition holds, whether listed in the index or noted in ``added`` (entries of keys no
    longer held are only a removal that finds nothing)."""
    held = [getattr(copy, table) for table in copy_store.TABLES]
    listed: dict[str, list[set[str]]] = {}
    for name, entry in copy.index.items():
        sets = listed.setdefault(name, [set() for _ in copy_store.TABLES])
        for n, joined in enumerate(entry.split(copy_store.FIELD)):
            sets[n].update(key for key in joined.split(copy_store.ITEM) if key)
    for name, noted in copy.added.items():
        sets = listed.setdefault(name, [set() for _ in copy_store.TABLES])
        for item in noted.split(copy_store.ITEM):
            sets[int(item[0])].add(item[1:])
    partitions = {
        name: tuple(frozenset(key for key in of if key in held[n]) for n, of in enumerate(sets))
        for name, sets in listed.items()
    }
    partitions = {name: held_keys for name, held_keys in partitions.items() if any(held_keys)}
    tables = [dict(table) for table in held]
    tables[copy_store.TABLES.index("grants")] = {
        address: frozenset(logins.split(copy_store.ITEM)) for address, logins in copy.grants.items()
    }
    return (copy.domains, partitions, *tables)
