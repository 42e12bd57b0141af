"""Operations against a real PostgreSQL: /metrics moves with lookups, /healthz follows outages."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import trio
from prometheus_client.parser import text_string_to_metric_families

from maplookup.config_load import load_settings
from maplookup.db import admin
from maplookup.embedded import EmbeddedPostgres
from maplookup.protocol import Reply
from maplookup.testing import free_port
from tests.helpers import run_async, run_sql
from tests.integration.test_cache_coherence import SCHEMA_DATA, Client, running, wait_until


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_move_with_lookups_and_healthz_follows_the_database(
    own_cluster: EmbeddedPostgres,
) -> None:
    dsn = own_cluster.tcp_dsn
    run_async(admin.init_schema, dsn)
    run_sql(dsn, *SCHEMA_DATA)
    port = free_port()
    settings = load_settings(
        overrides={
            "listen": {"socketmap": ["127.0.0.1:0"]},
            "database": {"dsn": dsn, "connect_timeout_s": 1.0, "query_timeout_s": 2.0},
            "cache": {"change_feed_poll_interval_s": 0.2},
            "metrics": {"listen": f"127.0.0.1:{port}"},
        },
        environ={},
    )
    base = f"http://127.0.0.1:{port}"
    async with running(settings, dsn) as service:
        assert service.cache is not None
        await wait_until(lambda: service.cache is not None and service.cache.live)
        status, before_text = await trio.to_thread.run_sync(http_get, base + "/metrics")
        assert status == 200
        before = samples(before_text)

        client = await Client.to(service)
        for _ in range(3):
            assert await client.ask("vmailbox", "user@example.com") == Reply.ok("example.com/user/")
        assert await client.ask("vmailbox", "nobody@example.com") == Reply.notfound()
        assert (await client.ask("nosuchmap", "x")).status.value == "PERM"

        status, after_text = await trio.to_thread.run_sync(http_get, base + "/metrics")
        after = samples(after_text)

        def delta(name: str, **labels: str) -> float:
            key = (name, tuple(sorted(labels.items())))
            return after.get(key, 0.0) - before.get(key, 0.0)

        assert delta("maplookup_requests_total", map="vmailbox", result="OK") == 3
        assert delta("maplookup_requests_total", map="vmailbox", result="NOTFOUND") == 1
        assert delta("maplookup_requests_total", map="unknown", result="PERM") == 1
        assert delta("maplookup_request_duration_seconds_count", map="vmailbox") == 4
        assert delta("maplookup_cache_hits_total") == 2
        assert delta("maplookup_cache_misses_total") == 2
        assert delta("maplookup_db_queries_total") == 2
        assert after[("maplookup_connections_open", ())] == 1
        assert after[("maplookup_listen_connected", ())] == 1

        status, body = await trio.to_thread.run_sync(http_get, base + "/healthz")
        assert status == 200
        assert json.loads(body)["status"] == "ok"

        await trio.to_thread.run_sync(lambda: own_cluster.stop(mode="fast"))

        async def health() -> tuple[int, str]:
            return await trio.to_thread.run_sync(http_get, base + "/healthz")

        with trio.fail_after(20):
            while (result := await health())[0] != 503:  # noqa: ASYNC110
                await trio.sleep(0.05)
        details = json.loads(result[1])
        assert details["status"] == "unavailable"
        assert details["database"].startswith("unreachable")

        await trio.to_thread.run_sync(own_cluster.start)
        # Healthy once PostgreSQL answers: a change feed still reconnecting is reported, not
        # unhealthy, until change_feed_stuck_after_s; it is live again soon after.
        with trio.fail_after(30):
            while (result := await health())[0] != 200 or (  # noqa: ASYNC110
                json.loads(result[1])["notifications"] != "live"
            ):
                await trio.sleep(0.05)
        await client.stream.aclose()
