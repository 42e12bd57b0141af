"""The process around the server: logging, the embedded PostgreSQL, schema, demo data, trio.

Kept apart from ``service.serve`` (the trio part, which tests start in-process) because what
happens here is synchronous and happens once: start a private cluster when no database is
configured, make sure it has the schema, and stop it again whatever way the server ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import asyncpg
import trio

from maplookup.config import Settings, redact_dsn
from maplookup.db import admin
from maplookup.db.demo import load_demo_data
from maplookup.embedded import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    default_state_dir,
    loopback_dsn,
    remove_server_ids,
    write_server_ids,
)
from maplookup.logsetup import configure_logging
from maplookup.metrics.peers import WorkerPeers
from maplookup.serve import workers
from maplookup.serve.listeners import ListenError
from maplookup.serve.privileges import PrivilegeError, check_not_root
from maplookup.serve.sdnotify import SystemdNotifier
from maplookup.serve.service import StartupError, serve

log = logging.getLogger("maplookup")


async def _prepare_database(dsn: str, *, apply_schema: bool, demo: bool, where: str) -> None:
    """Schema for the embedded cluster; demo data into an empty database.

    ``where`` names the database for the log (the state directory, or the redacted DSN): on a
    restart the demo keeps what is there, and says so, so that nobody wonders whether their
    own additions were wiped or why the example data did not come back.
    """
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        if apply_schema:
            await admin.init_schema(conn)
        if demo:
            if await load_demo_data(conn):
                log.info("demo data loaded (arkum.ch, akadia.com, arkum.org, akadia.net)")
            else:
                log.info(
                    "demo: database already holds data: kept it, example data not loaded (%s)",
                    where,
                )
    finally:
        await conn.close()


def run_serve(
    settings: Settings,
    *,
    demo: bool = False,
    reload_settings: Callable[[], Settings] | None = None,
) -> int:
    """Run ``maplookup serve`` to completion; returns the process exit code."""
    configure_logging(settings.log_level, settings.log_format)
    # Read NOTIFY_SOCKET now and take it out of the environment, so that the embedded
    # PostgreSQL (a child process) does not announce itself to systemd as us.
    notifier = SystemdNotifier(unset_environment=True)
    try:
        # The demo is for trying maplookup out, often as root on a fresh machine.
        check_not_root(settings.user, settings.allow_root or demo)
    except PrivilegeError as exc:
        log.error("%s", exc)
        return 1
    if demo:
        log.info(
            "demo: lookup.default_uid %s, default_gid %s (for mailboxes and domains without ids)",
            settings.lookup.default_uid,
            settings.lookup.default_gid,
        )
    with ExitStack() as stack:
        if settings.database.dsn is not None:
            dsn = settings.database.dsn.get_secret_value()
            embedded = False
            where = f"database {redact_dsn(dsn)}"
        else:
            cluster = EmbeddedPostgres(
                state_dir=settings.embedded.state_dir or default_state_dir(),
                run_as_user=settings.embedded.run_as_user,
                port=settings.embedded.port,
            )
            log.info(
                "no database configured: starting embedded PostgreSQL in %s", cluster.state_dir
            )
            try:
                stack.callback(os.close, cluster.claim_for_server())
                dsn = cluster.start()
            except EmbeddedPostgresError as exc:
                log.error("%s", exc)
                return 1
            stack.callback(cluster.stop)
            log.info("embedded PostgreSQL ready: %s", dsn)
            # Admin commands that find this cluster through the state directory learn the
            # default ids from here (postfix-config, trace, the mailbox add warnings).
            try:
                write_server_ids(
                    cluster.state_dir, settings.lookup.default_uid, settings.lookup.default_gid
                )
                stack.callback(remove_server_ids, cluster.state_dir)
            except OSError as exc:
                log.warning("cannot write %s/server-ids: %s", cluster.state_dir, exc)
            where = f"state dir {cluster.state_dir}"
            if reload_settings is not None:
                reload_settings = _publishing_ids(reload_settings, cluster.state_dir)
            if settings.user is not None:
                # Its socket directory belongs to the cluster's own user: use loopback TCP.
                dsn = loopback_dsn(dsn)
            embedded = True
        if embedded or demo:
            try:
                asyncio.run(_prepare_database(dsn, apply_schema=embedded, demo=demo, where=where))
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.error("cannot prepare the database: %s", exc)
                return 1
        if settings.workers > 1:
            return _run_workers(settings, dsn, reload_settings, notifier)
        try:
            trio.run(
                partial(
                    serve,
                    settings,
                    dsn,
                    reload_settings=reload_settings,
                    notifier=notifier,
                    freeze_startup_objects=True,
                )
            )
        except (StartupError, ListenError) as exc:
            log.error("%s", exc)
            return 1
    return 0


def _publishing_ids(
    reload_settings: Callable[[], Settings], state_dir: Path
) -> Callable[[], Settings]:
    """``reload_settings`` that also republishes the default ids a reload may have changed."""

    def reload() -> Settings:
        settings = reload_settings()
        try:
            write_server_ids(state_dir, settings.lookup.default_uid, settings.lookup.default_gid)
        except OSError as exc:  # e.g. after dropping root: the ids in the file are stale
            log.warning("cannot write %s/server-ids: %s", state_dir, exc)
        return settings

    return reload


def _worker_settings(settings: Settings, index: int) -> Settings:
    """Worker 0 serves /metrics (for every worker); the others do not bind that port."""
    if index == 0:
        return settings
    return settings.model_copy(
        update={"metrics": settings.metrics.model_copy(update={"listen": None})}
    )


def _run_workers(
    settings: Settings,
    dsn: str,
    reload_settings: Callable[[], Settings] | None,
    notifier: SystemdNotifier,
) -> int:
    try:
        workers.validate(settings)
    except ValueError as exc:
        log.error("%s", exc)
        return 1

    def run_worker(context: workers.WorkerContext) -> int:
        index = context.index
        reload = None
        if reload_settings is not None:
            reload_all = reload_settings

            def reload() -> Settings:
                return _worker_settings(reload_all(), index)

        try:
            trio.run(
                partial(
                    serve,
                    _worker_settings(settings, index),
                    dsn,
                    reload_settings=reload,
                    on_ready=lambda _listeners: context.announce_ready(),
                    reuse_port=True,
                    inherited=context.inherited,
                    freeze_startup_objects=True,
                    # Worker 0 gathers the others' figures for /metrics.
                    peers=(
                        WorkerPeers(index, settings.workers, namespace)
                        if settings.metrics.listen is not None
                        else None
                    ),
                )
            )
        except (StartupError, ListenError) as exc:
            log.error("worker %d: %s", index, exc)
            return 1
        return 0

    namespace = f"maplookup-{os.getpid()}"
    log.info("starting %d workers", settings.workers)
    try:
        return workers.Supervisor(settings, run_worker, notifier).run()
    except ListenError as exc:
        log.error("%s", exc)
        return 1
