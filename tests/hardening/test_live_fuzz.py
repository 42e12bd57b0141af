"""Live-server fuzzing: hostile bytes against ``maplookup serve`` on a real PostgreSQL.

Random bytes, mutated valid requests, truncated and oversized netstrings, wrong lengths, leading
zeros, missing commas, NUL bytes, invalid UTF-8, and for tcp_table broken %-escapes and overlong
lines, each sent in random chunks over a fresh connection (see ``fuzzcore`` for the strategies
and the exact invariants).  Invariant: every complete request is answered as the map model says,
every bad input ends in a close, the process never dies, and a persistent control connection
keeps getting the right answer after every input.

Bounded: 300 inputs per protocol.  ``python -m bench.fuzz`` runs the same for longer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from bench.lib.fuzzcore import (
    ControlClient,
    FuzzInput,
    FuzzStats,
    LiveServer,
    fuzz_inputs,
    run_input,
    seed,
    start_live_server,
    stop_live_server,
)

EXAMPLES = 300
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

STATS = {"socketmap": FuzzStats(), "tcp_table": FuzzStats()}


@pytest.fixture(scope="module", params=["lru", "complete"])
def live_server(
    request: pytest.FixtureRequest,
    make_database: Callable[[], str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    """The server in each cache mode: with ``complete`` every answer the model checks comes
    from the in-memory copy."""
    mode: str = request.param
    dsn = make_database()
    seed(dsn)
    log_path = tmp_path_factory.mktemp("fuzz") / "server.log"
    server = start_live_server(dsn, Path(log_path), mode=mode)
    STATS.update(socketmap=FuzzStats(), tcp_table=FuzzStats())  # counted per server
    try:
        yield server
        if mode == "complete":
            assert server.metric("maplookup_copy_fallbacks_total") == 0
    finally:
        code = stop_live_server(server)
        assert code == 0, f"server exited with {code}:\n{server.log_tail()}"


def _run(server: LiveServer, control: ControlClient, item: FuzzInput) -> None:
    stats = STATS[item.protocol]
    run_input(item, server.port_for(item.protocol), stats)
    assert server.alive(), f"server died on {item!r}:\n{server.log_tail()}"
    control.check(stats)


@FUZZ
@given(item=fuzz_inputs("socketmap"))
def _fuzz_socketmap(server: LiveServer, control: ControlClient, item: FuzzInput) -> None:
    _run(server, control, item)


@FUZZ
@given(item=fuzz_inputs("tcp_table"))
def _fuzz_tcp_table(server: LiveServer, control: ControlClient, item: FuzzInput) -> None:
    _run(server, control, item)


@pytest.mark.parametrize("protocol", ["socketmap", "tcp_table"])
def test_live_server_survives_hostile_input(live_server: LiveServer, protocol: str) -> None:
    errors_before = live_server.metric("maplookup_protocol_errors_total")
    timeouts_before = live_server.metric("maplookup_read_timeouts_total")
    control = ControlClient(live_server.socketmap_port)
    try:
        (_fuzz_socketmap if protocol == "socketmap" else _fuzz_tcp_table)(live_server, control)
    finally:
        control.close()
    stats = STATS[protocol]
    errors = live_server.metric("maplookup_protocol_errors_total") - errors_before
    timeouts = live_server.metric("maplookup_read_timeouts_total") - timeouts_before
    print(
        f"\n{protocol} fuzz: {stats.inputs} inputs, {stats.bytes_sent:,} bytes sent, "
        f"{stats.replies} replies checked, endings {dict(sorted(stats.endings.items()))}, "
        f"{stats.control_checks} control lookups OK; server counted {errors:.0f} protocol "
        f"errors and {timeouts:.0f} read timeouts"
    )
    assert stats.inputs >= EXAMPLES * 2 // 3
    # The server's own counters agree with the codec's verdict on every input.
    assert errors == stats.endings.get("error", 0)
    assert timeouts == stats.endings.get("stalled", 0)
    assert stats.control_checks == stats.inputs
    assert live_server.alive()
    assert live_server.tracebacks() == 0, live_server.log_tail()
