"""The maplookup database inside the started cluster: created if missing, from blocking code.

Owns waiting for a postmaster that still refuses connections, ``CREATE DATABASE`` (racing
another process is harmless), and running that asyncpg code from the blocking functions of
this package whatever event loop, if any, the caller has.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from .errors import EmbeddedPostgresError

_T = TypeVar("_T")

CONNECT_TIMEOUT = 30.0


def _run_async(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run an asyncio coroutine from blocking code, whatever loop the caller has.

    A fresh thread means this works from plain code, from inside a running
    asyncio loop and from trio alike.  The coroutine is created in that thread
    so that it can never be left un-awaited.
    """
    with concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="maplookup-embedded"
    ) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def ensure_database(
    socket_dir: Path, port: int, superuser: str, database: str, log_file: Path
) -> None:
    """Create `database` if missing, waiting out a server still starting up."""
    host, user = str(socket_dir), superuser

    async def ensure() -> None:
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            try:
                conn = await asyncpg.connect(
                    host=host, port=port, user=user, database="postgres", timeout=10
                )
                break
            except (TimeoutError, asyncpg.CannotConnectNowError, OSError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
            if not exists:
                with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                    await conn.execute(f"CREATE DATABASE {_quote_ident(database)}")
        finally:
            await conn.close()

    try:
        _run_async(ensure)
    except (TimeoutError, asyncpg.PostgresError, OSError) as e:
        raise EmbeddedPostgresError(
            f"could not create database {database!r} in the embedded PostgreSQL "
            f"({type(e).__name__}: {e}); see {log_file}"
        ) from e
