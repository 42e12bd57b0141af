"""The admin HTTP endpoint over real loopback sockets: /metrics, /healthz and bad clients.

Short limits are passed as parameters so the timeout cases run fast; waits are on conditions
with deadlines, never bare sleeps.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from maplookup.metrics import METRICS_CONTENT_TYPE, LookupStats, MaplookupCollector, render
from maplookup.serve.http_admin import (
    DEFAULT_MAX_CONNECTIONS,
    open_admin_listeners,
    serve_admin_http,
)

DEADLINE_S = 10.0

METRICS_BODY = b"# HELP maplookup_test A test.\n# TYPE maplookup_test gauge\nmaplookup_test 1.0\n"


class Endpoints:
    """The callables the admin server is given, scriptable per test."""

    def __init__(self) -> None:
        self.metrics_body = METRICS_BODY
        self.metrics_calls = 0
        self.metrics_error: Exception | None = None
        self.healthy = True
        self.details: dict[str, object] = {"database": "reachable"}
        self.health_error: Exception | None = None
        self.health_hangs = False

    async def metrics(self) -> bytes:
        await trio.lowlevel.checkpoint()
        self.metrics_calls += 1
        if self.metrics_error is not None:
            raise self.metrics_error
        return self.metrics_body

    async def health(self) -> tuple[bool, dict[str, object]]:
        if self.health_hangs:
            await trio.sleep_forever()
        if self.health_error is not None:
            raise self.health_error
        await trio.lowlevel.checkpoint()
        return self.healthy, self.details


@asynccontextmanager
async def admin_server(
    endpoints: Endpoints | None = None,
    metrics: Callable[[], Awaitable[bytes]] | None = None,
    health: Callable[[], Awaitable[tuple[bool, dict[str, object]]]] | None = None,
    *,
    max_head_bytes: int = 8192,
    head_timeout_s: float = 5.0,
    health_timeout_s: float = 10.0,
    max_connections: int = 64,
) -> AsyncIterator[int]:
    endpoints = endpoints or Endpoints()
    listeners = await open_admin_listeners("127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                serve_admin_http,
                listeners,
                metrics or endpoints.metrics,
                health or endpoints.health,
                max_head_bytes=max_head_bytes,
                head_timeout_s=head_timeout_s,
                health_timeout_s=health_timeout_s,
                max_connections=max_connections,
            )
        )
        yield port
        nursery.cancel_scope.cancel()


class Response:
    def __init__(self, raw: bytes) -> None:
        head, sep, self.body = raw.partition(b"\r\n\r\n")
        assert sep, f"no complete response head in {raw!r}"
        lines = head.decode("ascii").split("\r\n")
        version, status, _reason = lines[0].split(" ", 2)
        assert version == "HTTP/1.1"
        self.status = int(status)
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def json(self) -> dict[str, object]:
        document = json.loads(self.body)
        assert isinstance(document, dict)
        return document


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    return bytes(data)


async def exchange(port: int, raw: bytes) -> bytes:
    """Send ``raw``, read until the server closes; everything within the deadline."""
    with trio.fail_after(DEADLINE_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(raw)
            return await read_to_eof(stream)


async def request(port: int, method: str, path: str, version: str = "HTTP/1.1") -> Response:
    raw = f"{method} {path} {version}\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n".encode()
    response = Response(await exchange(port, raw))
    assert response.headers["connection"] == "close"
    if method != "HEAD":
        assert int(response.headers["content-length"]) == len(response.body)
    return response


# -- /metrics -------------------------------------------------------------------------------------


async def test_metrics_returns_what_the_callable_renders() -> None:
    endpoints = Endpoints()
    async with admin_server(endpoints) as port:
        response = await request(port, "GET", "/metrics")
        assert response.status == 200
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert response.headers["content-type"] == METRICS_CONTENT_TYPE
        assert response.body == METRICS_BODY
        endpoints.metrics_body = b"other 2.0\n"
        response = await request(port, "GET", "/metrics?name[]=x")
        assert response.body == b"other 2.0\n"
    assert endpoints.metrics_calls == 2


async def test_metrics_with_the_real_collector() -> None:
    stats = LookupStats()
    stats.record("vmailbox", "OK", 0.001)
    collector = MaplookupCollector(lookups=stats, info={"version": "0.1.0"})

    async def metrics() -> bytes:
        return render(collector)

    async with admin_server(metrics=metrics) as port:
        response = await request(port, "GET", "/metrics")
    assert response.status == 200
    text = response.body.decode()
    assert 'maplookup_requests_total{map="vmailbox",result="OK"} 1.0' in text
    assert 'maplookup_build_info{version="0.1.0"} 1.0' in text


async def test_head_sends_headers_only() -> None:
    async with admin_server() as port:
        response = await request(port, "HEAD", "/metrics")
        assert response.status == 200
        assert response.body == b""
        assert int(response.headers["content-length"]) == len(METRICS_BODY)
        response = await request(port, "HEAD", "/healthz")
        assert response.status == 200
        assert response.body == b""


async def test_http_1_0_is_answered() -> None:
    async with admin_server() as port:
        response = await request(port, "GET", "/metrics", version="HTTP/1.0")
    assert response.status == 200
    assert response.body == METRICS_BODY


async def test_bare_lf_request_head_is_accepted() -> None:
    async with admin_server() as port:
        response = Response(await exchange(port, b"GET /metrics HTTP/1.1\nHost: x\n\n"))
    assert response.status == 200


async def test_metrics_failure_is_a_500_and_the_server_keeps_serving() -> None:
    endpoints = Endpoints()
    endpoints.metrics_error = RuntimeError("collector bug")
    async with admin_server(endpoints) as port:
        response = await request(port, "GET", "/metrics")
        assert response.status == 500
        assert b"collector bug" not in response.body
        endpoints.metrics_error = None
        response = await request(port, "GET", "/metrics")
        assert response.status == 200


# -- /healthz -------------------------------------------------------------------------------------


async def test_healthz_ok() -> None:
    async with admin_server() as port:
        response = await request(port, "GET", "/healthz")
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"status": "ok", "database": "reachable"}


async def test_healthz_unavailable() -> None:
    endpoints = Endpoints()
    endpoints.healthy = False
    endpoints.details = {"database": "unreachable", "status": "ignored", "since": 12.5}
    async with admin_server(endpoints) as port:
        response = await request(port, "GET", "/healthz")
        assert response.status == 503
        assert response.json() == {
            "status": "unavailable",
            "database": "unreachable",
            "since": 12.5,
        }
        endpoints.healthy = True
        endpoints.details = {}
        response = await request(port, "GET", "/healthz")
        assert response.status == 200
        assert response.json() == {"status": "ok"}


async def test_healthz_details_that_are_not_json_are_shown_as_text() -> None:
    endpoints = Endpoints()
    endpoints.details = {"listen": object(), "maps": ("a", "b")}
    async with admin_server(endpoints) as port:
        response = await request(port, "GET", "/healthz")
    document = response.json()
    assert document["status"] == "ok"
    assert document["maps"] == ["a", "b"]
    assert str(document["listen"]).startswith("<object object")


async def test_healthz_check_raising_is_unavailable() -> None:
    endpoints = Endpoints()
    endpoints.health_error = RuntimeError("boom")
    async with admin_server(endpoints) as port:
        response = await request(port, "GET", "/healthz")
        assert response.status == 503
        document = response.json()
        assert document["status"] == "unavailable"
        assert "RuntimeError" in str(document["error"])
        endpoints.health_error = None
        assert (await request(port, "GET", "/healthz")).status == 200


async def test_healthz_check_hanging_is_unavailable_after_its_timeout() -> None:
    endpoints = Endpoints()
    endpoints.health_hangs = True
    async with admin_server(endpoints, health_timeout_s=0.1) as port:
        response = await request(port, "GET", "/healthz")
    assert response.status == 503
    document = response.json()
    assert document["status"] == "unavailable"
    assert "0.1 s" in str(document["error"])


# -- other paths and methods ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/metrics/", "/favicon.ico", "/healthz/x"])
async def test_other_paths_are_404(path: str) -> None:
    async with admin_server() as port:
        response = await request(port, "GET", path)
    assert response.status == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "BREW"])
async def test_other_methods_are_405(method: str) -> None:
    endpoints = Endpoints()
    async with admin_server(endpoints) as port:
        response = await request(port, method, "/metrics")
    assert response.status == 405
    assert response.headers["allow"] == "GET, HEAD"
    assert endpoints.metrics_calls == 0


# -- bad clients ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"garbage\r\n\r\n",
        b"GET /metrics\r\n\r\n",
        b"GET /metrics HTTP/2.0\r\n\r\n",
        b"GET /metrics HTTP/1.1 extra\r\n\r\n",
        b"GET http://example.com/metrics HTTP/1.1\r\n\r\n",
        b"GET http://example.com/metrics HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /m\xc3\xa9trics HTTP/1.1\r\n\r\n",
        b"G(T /metrics HTTP/1.1\r\n\r\n",
        b"\r\n\r\n",
    ],
)
async def test_malformed_request_is_400(raw: bytes) -> None:
    async with admin_server() as port:
        response = Response(await exchange(port, raw))
        assert response.status == 400
        assert response.headers["connection"] == "close"
        assert (await request(port, "GET", "/metrics")).status == 200


async def test_refused_head_request_has_no_body() -> None:
    async with admin_server() as port:
        response = Response(await exchange(port, b"HEAD /metrics HTTP/2.0\r\n\r\n"))
        assert response.status == 400
        assert response.body == b""
        assert int(response.headers["content-length"]) > 0
        assert (await request(port, "GET", "/metrics")).status == 200


async def test_request_cut_short_is_400() -> None:
    async with admin_server() as port:
        with trio.fail_after(DEADLINE_S):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                await stream.send_eof()
                response = Response(await read_to_eof(stream))
    assert response.status == 400


async def test_oversized_request_head_is_400() -> None:
    async with admin_server(max_head_bytes=8192) as port:
        # No end of head in sight: cut off once past the limit.
        raw = b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"a" * 9000
        response = Response(await exchange(port, raw))
        assert response.status == 400
        assert b"8192" in response.body
        # A complete head, but too large.
        raw = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 8200 + b"\r\n\r\n"
        response = Response(await exchange(port, raw))
        assert response.status == 400
        assert b"8192" in response.body
        # Just under the limit is fine.
        filler = b"a" * (8192 - 100)
        raw = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Filler: " + filler + b"\r\n\r\n"
        assert len(raw) <= 8192
        response = Response(await exchange(port, raw))
        assert response.status == 200


async def test_slow_client_is_cut_off() -> None:
    async with admin_server(head_timeout_s=0.2) as port:
        with trio.fail_after(DEADLINE_S):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                started = trio.current_time()
                await stream.send_all(b"GET /metrics HTTP/1.1\r\n")
                raw = await read_to_eof(stream)
                elapsed = trio.current_time() - started
        response = Response(raw)
        assert response.status == 408
        assert elapsed >= 0.15
        # A silent client too.
        with trio.fail_after(DEADLINE_S):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                assert Response(await read_to_eof(stream)).status == 408
        assert (await request(port, "GET", "/metrics")).status == 200


async def test_client_closing_at_once_does_not_disturb_the_server() -> None:
    async with admin_server() as port:
        for _ in range(5):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.aclose()
        assert (await request(port, "GET", "/metrics")).status == 200


async def test_connections_beyond_the_limit_are_closed() -> None:
    async with admin_server(max_connections=2, head_timeout_s=60) as port:
        with trio.fail_after(DEADLINE_S):
            first = await trio.open_tcp_stream("127.0.0.1", port)
            second = await trio.open_tcp_stream("127.0.0.1", port)
            await first.send_all(b"GET /metrics HTTP/1.1\r\n")
            await second.send_all(b"GET /healthz HTTP/1.1\r\n")
            # Accepted after the two above (the backlog is FIFO) while they are still open.
            third = await trio.open_tcp_stream("127.0.0.1", port)
            async with third:
                assert await read_to_eof(third) == b""
            async with first, second:
                await first.send_all(b"Host: x\r\n\r\n")
                await second.send_all(b"Host: x\r\n\r\n")
                assert Response(await read_to_eof(first)).status == 200
                assert Response(await read_to_eof(second)).status == 200
            # Once they are closed there is room again (the server notices the close shortly).
            while True:
                try:
                    raw = await exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                except trio.BrokenResourceError:  # refused while our request was on its way
                    raw = b""
                if raw:
                    break
                await trio.sleep(0.01)
        assert Response(raw).status == 200


async def wait_for_room(port: int) -> Response:
    """The answer to a scrape once the server has noticed earlier connections close."""
    with trio.fail_after(DEADLINE_S):
        while True:
            try:
                raw = await exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            except trio.BrokenResourceError:  # refused while our request was on its way
                raw = b""
            if raw:
                return Response(raw)
            await trio.sleep(0.01)


async def test_connection_limit_is_released_by_every_kind_of_answer() -> None:
    # With room for one connection, each answer below must give its place back, or the next
    # one would be closed unanswered.
    async with admin_server(max_connections=1, head_timeout_s=0.2) as port:
        assert (await wait_for_room(port)).status == 200
        assert Response(await exchange(port, b"garbage\r\n\r\n")).status == 400
        assert (await wait_for_room(port)).status == 200
        assert Response(await exchange(port, b"GET /metrics HTTP/1.1\r\n")).status == 408
        assert (await wait_for_room(port)).status == 200
        assert (await request(port, "GET", "/nowhere")).status == 404
        assert (await wait_for_room(port)).status == 200


async def test_default_connection_limit() -> None:
    listeners = await open_admin_listeners("127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    endpoints = Endpoints()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_admin_http, listeners, endpoints.metrics, endpoints.health)
        with trio.fail_after(DEADLINE_S):
            held = [
                await trio.open_tcp_stream("127.0.0.1", port)
                for _ in range(DEFAULT_MAX_CONNECTIONS)
            ]
            for stream in held:
                await stream.send_all(b"GET /metrics HTTP/1.1\r\n")
            extra = await trio.open_tcp_stream("127.0.0.1", port)
            async with extra:
                assert await read_to_eof(extra) == b""
            for stream in held:
                await stream.send_all(b"Host: x\r\n\r\n")
                assert Response(await read_to_eof(stream)).status == 200
                await stream.aclose()
        assert (await wait_for_room(port)).status == 200
        nursery.cancel_scope.cancel()


async def test_http_1_1_without_host_is_400() -> None:
    # RFC 9112 section 3.2, as h11 enforces it; HTTP/1.0 needs no Host.
    async with admin_server() as port:
        response = Response(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
        assert response.status == 400
        assert b"Host" in response.body
        assert response.headers["connection"] == "close"
        raw = await exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert Response(raw).status == 200


async def test_request_with_a_body_is_answered_and_closed() -> None:
    endpoints = Endpoints()
    async with admin_server(endpoints) as port:
        body = b"x" * 20_000
        raw = b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n" + body
        response = Response(await exchange(port, raw))
        assert response.status == 405
        assert endpoints.metrics_calls == 0
        assert (await request(port, "GET", "/metrics")).status == 200


async def test_one_request_per_connection() -> None:
    async with admin_server() as port:
        one = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        raw = await exchange(port, one + one)
    assert raw.count(b"HTTP/1.1 ") == 1
    assert Response(raw).status == 200


async def test_many_concurrent_scrapes() -> None:
    results: list[int] = []

    async def one() -> None:
        results.append((await request(port, "GET", "/metrics")).status)

    async with admin_server() as port, trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(one)
    assert results == [200] * 50


async def test_listeners_are_closed_when_the_server_stops() -> None:
    async with admin_server() as port:
        assert (await request(port, "GET", "/healthz")).status == 200
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)
