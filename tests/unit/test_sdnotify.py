"""sd_notify: datagrams to a real AF_UNIX socket (path and abstract), the watchdog task on a
virtual clock, and silence when systemd is not around."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from maplookup.serve.sdnotify import SystemdNotifier


class Receiver:
    """A bound datagram socket standing in for systemd's notification socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def messages(self) -> list[str]:
        """Every datagram received so far."""
        found: list[str] = []
        while True:
            try:
                found.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return found

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    path = tmp_path / "notify.sock"
    recv = Receiver(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield recv
    recv.close()


@pytest.fixture
def notifiers() -> Iterator[list[SystemdNotifier]]:
    """Notifiers made in a test, closed after it (no ResourceWarning for their sockets)."""
    made: list[SystemdNotifier] = []
    yield made
    for notifier in made:
        notifier.close()


@pytest.fixture
def make_notifier(notifiers: list[SystemdNotifier]) -> type[SystemdNotifier]:
    class Tracked(SystemdNotifier):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            notifiers.append(self)

    return Tracked


def test_messages_arrive(receiver: Receiver, make_notifier: type[SystemdNotifier]) -> None:
    notifier = make_notifier()
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.status("serving 3 listeners")
    assert notifier.watchdog()
    assert notifier.stopping()
    assert notifier.ready(status="reloaded")
    assert receiver.messages() == [
        "READY=1",
        "STATUS=serving 3 listeners",
        "WATCHDOG=1",
        "STOPPING=1",
        "READY=1\nSTATUS=reloaded",
    ]


def test_abstract_namespace_socket(
    monkeypatch: pytest.MonkeyPatch, make_notifier: type[SystemdNotifier]
) -> None:
    name = f"maplookup-test-{uuid.uuid4().hex}"
    recv = Receiver("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notifier = make_notifier()
        assert notifier.ready()
        assert notifier.stopping()
        assert recv.messages() == ["READY=1", "STOPPING=1"]
    finally:
        recv.close()


def test_reloading_carries_the_monotonic_clock(
    receiver: Receiver, make_notifier: type[SystemdNotifier]
) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert make_notifier().reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    [message] = receiver.messages()
    first, second = message.split("\n")
    assert first == "RELOADING=1"
    name, _, value = second.partition("=")
    assert name == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_status_stays_one_assignment(
    receiver: Receiver, make_notifier: type[SystemdNotifier]
) -> None:
    make_notifier().status("database down\nREADY=1")
    assert receiver.messages() == ["STATUS=database down READY=1"]


def test_socket_is_opened_once_and_reused(
    receiver: Receiver, make_notifier: type[SystemdNotifier]
) -> None:
    notifier = make_notifier()
    notifier.ready()
    first = notifier._socket
    notifier.watchdog()
    assert first is not None
    assert notifier._socket is first


def test_send_errors_are_swallowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_notifier: type[SystemdNotifier]
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    notifier = make_notifier()
    assert notifier.enabled
    assert not notifier.ready()
    assert not notifier.status("x")


def test_without_notify_socket_everything_is_a_no_op(
    monkeypatch: pytest.MonkeyPatch, make_notifier: type[SystemdNotifier]
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    notifier = make_notifier()
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.reloading()
    assert not notifier.status("x")
    assert not notifier.watchdog()
    assert not notifier.stopping()
    assert notifier.watchdog_interval_s() is None
    assert notifier._socket is None


@pytest.mark.parametrize("value", ["vsock:2:1234", "relative/path.sock", ""])
def test_unsupported_addresses_disable_notification(
    value: str, monkeypatch: pytest.MonkeyPatch, make_notifier: type[SystemdNotifier]
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    notifier = make_notifier()
    assert not notifier.enabled
    assert not notifier.ready()


def test_unset_environment_hides_the_socket_from_children(
    make_notifier: type[SystemdNotifier], receiver: Receiver
) -> None:
    environ = {
        "NOTIFY_SOCKET": os.environ["NOTIFY_SOCKET"],
        "WATCHDOG_USEC": "2000000",
        "WATCHDOG_PID": str(os.getpid()),
        "PATH": "/usr/bin",
    }
    notifier = make_notifier(environ, unset_environment=True)
    assert environ == {"PATH": "/usr/bin"}
    assert notifier.watchdog_interval_s() == 2.0
    assert notifier.ready()
    assert receiver.messages() == ["READY=1"]


# --- watchdog ------------------------------------------------------------------------------------


def test_watchdog_interval(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch, make_notifier: type[SystemdNotifier]
) -> None:
    assert make_notifier().watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert make_notifier().watchdog_interval_s() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert make_notifier().watchdog_interval_s() == 30.0


@pytest.mark.parametrize("pid", ["1", "not-a-pid"])
def test_watchdog_pid_mismatch_disables_it(
    pid: str,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    make_notifier: type[SystemdNotifier],
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", pid)
    assert make_notifier().watchdog_interval_s() is None


@pytest.mark.parametrize("usec", ["0", "-5", "soon"])
def test_invalid_watchdog_usec_disables_it(
    usec: str,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    make_notifier: type[SystemdNotifier],
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert make_notifier().watchdog_interval_s() is None


async def test_watchdog_pings_at_half_the_interval_until_cancelled(
    autojump_clock: trio.testing.MockClock,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    make_notifier: type[SystemdNotifier],
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")  # 10 s: a ping every 5 s
    notifier = make_notifier()
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run_watchdog)
        start = trio.current_time()
        assert receiver.messages() == ["WATCHDOG=1"]
        counts = []
        for offset in (4.9, 5.1, 9.9, 10.1, 30.1):
            await trio.sleep_until(start + offset)
            counts.append(len(receiver.messages()))
        assert counts == [0, 1, 0, 1, 4]
        nursery.cancel_scope.cancel()
    await trio.sleep(60)
    assert receiver.messages() == []


async def test_watchdog_task_returns_at_once_when_not_configured(
    autojump_clock: trio.testing.MockClock,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    make_notifier: type[SystemdNotifier],
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    notifier = make_notifier()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run_watchdog)
    with trio.fail_after(0):
        await notifier.run_watchdog()
    assert trio.current_time() == start
    assert receiver.messages() == []
