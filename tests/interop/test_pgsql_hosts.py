"""The pgsql: files `postfix-config` writes, read by Postfix's own pgsql client (postmap -q).

virtual(8) reads its maps through these files, so what matters is what Postfix makes of
them: a host list (prefer the local standby, fall back to the primary) must survive
Postfix's splitting of `hosts` on commas and spaces, and a dead first host must not make
the lookup fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg

from maplookup.db import admin
from maplookup.maps import MapName
from maplookup.postfix.config import PostfixConfigOptions, generate, pgsql_file_name
from maplookup.testing import free_port
from tests.helpers import require_postfix
from tests.interop.test_postmap import postmap


def _tcp_dsn(dsn: str) -> str:
    """The test cluster's DSN over loopback TCP instead of its unix socket."""
    parts = urlsplit(dsn)
    port = parse_qs(parts.query)["port"][0]
    user = parts.netloc.rpartition("@")[0]
    return f"postgresql://{user}@127.0.0.1:{port}{parts.path}"


def test_a_host_list_reaches_postfix_whole_and_skips_a_dead_host(
    make_database: Callable[[], str], postfix_dir: Path, tmp_path: Path
) -> None:
    require_postfix("pgsql")
    dsn = make_database()

    async def load() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await admin.domain_add(conn, "example.com", uid=5000, gid=5000)
            await admin.mailbox_add(conn, "user@example.com")
        finally:
            await conn.close()

    asyncio.run(load())
    live = urlsplit(_tcp_dsn(dsn))
    dead_port = free_port()  # nothing listens there: the first host of the list is down
    host_list = (
        f"postgresql://{live.netloc.rpartition('@')[0]}@127.0.0.1:{dead_port},"
        f"{live.netloc.rpartition('@')[2]}{live.path}?target_session_attrs=any"
    )
    generated = generate(PostfixConfigOptions(pgsql_dsn=host_list, pgsql_dir=tmp_path))
    for name, content in generated.pgsql_files.items():
        (tmp_path / name).write_text(content)
    hosts_line = next(
        line
        for line in generated.pgsql_files[pgsql_file_name(MapName.VMAILBOX)].splitlines()
        if line.startswith("hosts = ")
    )
    assert "," not in hosts_line  # Postfix would cut the URI at a comma
    table = f"pgsql:{tmp_path / pgsql_file_name(MapName.VMAILBOX)}"
    for _ in range(3):  # each postmap is a new client: the dead host comes first every time
        found = postmap(postfix_dir, "-q", "User+x@Example.com", table)
        assert (found.returncode, found.stdout) == (0, "example.com/user/\n"), found.stderr
    missing = postmap(postfix_dir, "-q", "nobody@example.com", table)
    assert missing.returncode == 1, missing.stderr
    uid = postmap(postfix_dir, "-q", "user@example.com", f"pgsql:{tmp_path / 'pgsql-uid.cf'}")
    assert (uid.returncode, uid.stdout) == (0, "5000\n"), uid.stderr
