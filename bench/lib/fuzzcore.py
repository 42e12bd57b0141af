"""Fuzzing a live maplookup server: input strategies, one-input runner, invariants, the server.

Shared by ``tests/hardening/test_live_fuzz.py`` (bounded) and ``bench/fuzz.py`` (long runs).

The server is ``python -m maplookup serve`` in a subprocess, on a real PostgreSQL seeded with
``FUZZ_DATA``.  For each input the runner opens a connection, sends the bytes in the chunks
hypothesis chose, optionally half-closes, and reads until the server closes or every expected
reply has arrived.  What the server must do is derived from the sans-IO codec (the same one the
server uses, whose totality and chunking invariance tests/unit/test_protocol_fuzz.py checks)
and the map model (bench/lib/model.py):

* each complete request before the first framing error gets exactly the reply the model gives
  (PERM for an unknown map; never TEMP, since the database is up);
* after a framing error, a truncated request at end of stream, or a stalled partial request
  (read timeout), the server closes the connection;
* a clean stream stays open until the client closes it;
* afterwards the server process is alive and a separate, persistent control connection still
  gets the right answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

from bench.lib.model import ALL_MAPS, Alias, Dataset, Domain, Mailbox, MapModel
from maplookup.client import QueryError, WireProtocol, next_reply, reply_parser
from maplookup.config import HostPort
from maplookup.protocol import (
    CLOSED,
    DEFAULT_MAX_REQUEST_BYTES,
    NEED_DATA,
    RemoteProtocolError,
    Reply,
    Request,
    SocketmapProtocol,
    Status,
    TcpTableProtocol,
    hex_quote,
)
from maplookup.testing import Client, RunningServer, start_server, stop_server

PROJECT_ROOT = Path(__file__).resolve().parents[2]

FUZZ_DATA = Dataset(
    domains=(
        Domain("example.com", "mailbox", default_uid=5000, default_gid=5000),
        Domain("example.org", "alias", alias_of="example.com"),
        Domain("lists.test", "alias"),
    ),
    mailboxes=(
        Mailbox("example.com", "user", "example.com/user/"),
        Mailbox("example.com", "info", "example.com/info/", uid=5001),
    ),
    aliases=(
        Alias("example.com", "postmaster", ("user@example.com",)),
        Alias("lists.test", "", ("@example.com",)),
    ),
)
MODEL = MapModel(FUZZ_DATA)
CONTROL_MAP, CONTROL_KEY, CONTROL_VALUE = "vmailbox", b"user@example.com", "example.com/user/"
TCP_MAP = "vmailbox"  # the map of the fuzzed tcp_table listener

MAX_REQUEST_BYTES = DEFAULT_MAX_REQUEST_BYTES  # the server runs with the default
MAX_TCP_LINE = 3 * MAX_REQUEST_BYTES + 8  # TcpTableProtocol's raw line bound
READ_TIMEOUT_S = 0.2  # short, so a stalled partial request costs little wall time
EXAMPLE_DEADLINE_S = 10.0

KNOWN_KEYS = (
    b"user@example.com",
    b"User+Tag@Example.COM",
    b"info@example.com",
    b"info@example.org",
    b"postmaster@example.com",
    b"PostMaster@Example.Com",
    b"someone@lists.test",
    b"nobody@example.com",
    b"@example.com",
    b"example.com",
    b"EXAMPLE.ORG",
    b"lists.test",
    b"user@",
    b"user",
    b"",
    b" ",
    b"a b@example.com",
)
MAP_NAMES = (
    b"vmailbox",
    b"virtual",
    b"domains",
    b"alias_domains",
    b"uid",
    b"gid",
    b"VMAILBOX",
    b"nosuch",
    b"v\x00mailbox",
    b"\xff",
)
INVALID_UTF8 = (b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80")


# -- strategies --------------------------------------------------------------------------------


def netstring(payload: bytes) -> bytes:
    return b"%d:%b," % (len(payload), payload)


def _splice(key: bytes, bad: bytes, at: int) -> bytes:
    at %= len(key) + 1
    return key[:at] + bad + key[at:]


keys: st.SearchStrategy[bytes] = st.one_of(
    st.sampled_from(KNOWN_KEYS),
    st.binary(max_size=40),
    st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.builds(_splice, st.sampled_from(KNOWN_KEYS), st.sampled_from(INVALID_UTF8), st.integers()),
    st.builds(_splice, st.sampled_from(KNOWN_KEYS), st.just(b"\x00"), st.integers()),
)

socketmap_requests = st.builds(
    lambda m, k: netstring(m + b" " + k), st.sampled_from(MAP_NAMES), keys
)


def _truncated(data: bytes, at: int) -> bytes:
    return data[: at % max(1, len(data))]


def _oversized(size: int) -> bytes:
    return b"%d:vmailbox %b," % (size, b"k" * (size - len(b"vmailbox ")))


socketmap_broken = st.one_of(
    st.builds(_truncated, socketmap_requests, st.integers(0, 1000)),
    # missing or wrong terminator
    st.builds(
        lambda r, end: r[:-1] + end, socketmap_requests, st.sampled_from([b"", b";", b"x", b"\n"])
    ),
    # length off by a little
    st.builds(
        lambda m, k, delta: b"%d:%b %b," % (max(0, len(m) + 1 + len(k) + delta), m, k),
        st.sampled_from(MAP_NAMES),
        keys,
        st.integers(-3, 3).filter(bool),
    ),
    # leading zeros, signs, spaces, non-ASCII digits, underscores, hex
    st.builds(
        lambda prefix, r: prefix + r,
        st.sampled_from([b"0", b"00", b"+", b"-", b" ", b"\xd9\xa3"]),
        socketmap_requests,
    ),
    st.sampled_from([b"-1:", b"+5:", b"5 :", b"0x5:", b"1_0:", b":", b"0:,", b"1:,,", b"00:,"]),
    # huge declared lengths, never followed by the payload
    st.integers(5, 30).map(lambda n: b"9" * n + b":"),
    # oversized payloads, actually sent; and the largest allowed one
    st.integers(MAX_REQUEST_BYTES + 1, MAX_REQUEST_BYTES + 5000).map(_oversized),
    st.just(_oversized(MAX_REQUEST_BYTES)),
    # no space after the map name, empty map name, empty payload
    st.builds(lambda k: netstring(k.replace(b" ", b"")), keys),
    st.builds(lambda k: netstring(b" " + k), keys),
    st.binary(max_size=64),
)

tcp_requests = st.one_of(
    st.builds(lambda k: b"get " + hex_quote(k) + b"\n", keys),
    st.builds(lambda k: b"get " + hex_quote(k) + b"\r\n", keys),
)

tcp_broken = st.one_of(
    st.builds(_truncated, tcp_requests, st.integers(0, 1000)),
    # unquoted bytes (spaces, NUL, non-ASCII) as a careless client would send them
    st.builds(lambda k: b"get " + k.replace(b"\n", b"") + b"\n", keys),
    # %-encoding errors
    st.builds(
        lambda k, esc, at: b"get " + _splice(hex_quote(k), esc, at) + b"\n",
        keys,
        st.sampled_from([b"%", b"%4", b"%zz", b"%%", b"%g0", b"%0", b"%\n"]),
        st.integers(),
    ),
    # valid escapes of invalid UTF-8 and NUL
    st.builds(
        lambda k, bad: b"get " + hex_quote(_splice(k, bad, len(k))) + b"\n",
        st.sampled_from(KNOWN_KEYS),
        st.sampled_from((*INVALID_UTF8, b"\x00")),
    ),
    st.sampled_from([b"GET x\n", b"put x\n", b"get\n", b"ge\n", b"\n", b"\r\n", b"get \n"]),
    # lines around the raw line bound; keys just over the key bound once unquoted
    st.integers(MAX_TCP_LINE - 10, MAX_TCP_LINE + 100).map(lambda n: b"get " + b"a" * n + b"\n"),
    st.integers(MAX_REQUEST_BYTES - 2, MAX_REQUEST_BYTES + 2).map(
        lambda n: b"get " + b"%41" * n + b"\n"
    ),
    st.binary(max_size=64),
)


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Flip, insert or delete bytes at positions hypothesis chose."""
    out = bytearray(data)
    for kind, position, value in edits:
        if not out and kind != 1:
            continue
        at = position % (len(out) + (1 if kind == 1 else 0))
        if kind == 0:
            out[at] ^= value or 1
        elif kind == 1:
            out.insert(at, value)
        else:
            del out[at]
    return bytes(out)


def _inputs(
    valid: st.SearchStrategy[bytes], broken: st.SearchStrategy[bytes]
) -> st.SearchStrategy[bytes]:
    # Well-formed requests alone; then some followed by one bad piece (what a broken client
    # does); then anything in any order; each of them sometimes with a few bytes mutated.
    all_valid = st.lists(valid, min_size=1, max_size=5).map(b"".join)
    pieces = st.one_of(
        all_valid,
        all_valid,
        st.builds(lambda ok, bad: b"".join(ok) + bad, st.lists(valid, max_size=4), broken),
        st.lists(st.one_of(valid, broken), min_size=1, max_size=5).map(b"".join),
    )
    edits = st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 2**16), st.integers(0, 255)),
        min_size=1,
        max_size=3,
    )
    return st.one_of(pieces, pieces, pieces, st.builds(_mutate, pieces, edits))


@dataclass(frozen=True)
class FuzzInput:
    protocol: WireProtocol
    data: bytes
    cuts: tuple[int, ...]
    half_close: bool

    def chunks(self) -> list[bytes]:
        points = sorted({c % (len(self.data) + 1) for c in self.cuts} | {0, len(self.data)})
        return [self.data[a:b] for a, b in itertools.pairwise(points) if b > a]

    def __repr__(self) -> str:
        shown = self.data if len(self.data) <= 200 else self.data[:200] + b"..."
        return (
            f"FuzzInput({self.protocol}, {len(self.data)} bytes {shown!r}, "
            f"{len(self.chunks())} chunks, half_close={self.half_close})"
        )


def fuzz_inputs(protocol: WireProtocol) -> st.SearchStrategy[FuzzInput]:
    data = (
        _inputs(socketmap_requests, socketmap_broken)
        if protocol == "socketmap"
        else _inputs(tcp_requests, tcp_broken)
    )
    return st.builds(
        FuzzInput,
        st.just(protocol),
        data,
        st.lists(st.integers(0, 2**16), max_size=6).map(tuple),
        # Mostly half-closed; otherwise a partial request must run into the read timeout.
        st.integers(0, 9).map(bool),
    )


# -- what the server must do -------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    replies: list[Reply]
    ending: str  # "error", "eof" (clean end), "open" (clean, not half-closed), "stalled"


def _codec(protocol: WireProtocol) -> SocketmapProtocol | TcpTableProtocol:
    if protocol == "socketmap":
        return SocketmapProtocol(max_request_bytes=MAX_REQUEST_BYTES)
    return TcpTableProtocol(TCP_MAP.encode(), max_request_bytes=MAX_REQUEST_BYTES)


def expected_reply(request: Request) -> Reply:
    name = request.map_name.decode("latin-1")
    if name not in ALL_MAPS:
        return Reply.perm("unknown map")
    value = MODEL.answer(name, request.key)
    return Reply.notfound() if value is None else Reply.ok(value)


def expect(item: FuzzInput) -> Expected:
    codec = _codec(item.protocol)
    requests: list[Request] = []
    try:
        if item.data:
            codec.receive_data(item.data)
        while (event := codec.next_event()) is not NEED_DATA:
            assert isinstance(event, Request)
            requests.append(event)
        if not item.half_close:
            ending = "stalled" if codec.in_message else "open"
        else:
            codec.receive_data(b"")
            while (event := codec.next_event()) is not CLOSED:
                assert isinstance(event, Request)
                requests.append(event)
            ending = "eof"
    except RemoteProtocolError:
        ending = "error"
    return Expected([expected_reply(r) for r in requests], ending)


def same_reply(got: Reply, want: Reply) -> bool:
    if got.status is not want.status:
        return False
    return want.status is not Status.OK or got.value == want.value


# -- running one input -------------------------------------------------------------------------


@dataclass
class FuzzStats:
    inputs: int = 0
    bytes_sent: int = 0
    replies: int = 0
    endings: dict[str, int] = field(default_factory=dict)
    control_checks: int = 0

    def count(self, ending: str) -> None:
        self.endings[ending] = self.endings.get(ending, 0) + 1


class InvariantViolation(AssertionError):
    """The server did something the protocol or the map contract forbids."""


class _ReplyReader:
    def __init__(self, protocol: WireProtocol) -> None:
        self.replies: list[Reply] = []
        self._parser = reply_parser(protocol)

    def feed(self, data: bytes) -> None:
        try:
            self._parser.receive_data(data)
            while (reply := next_reply(self._parser)) is not None:
                self.replies.append(reply)
        except QueryError as exc:
            raise InvariantViolation(f"server sent a {exc}") from exc


def run_input(item: FuzzInput, port: int, stats: FuzzStats) -> None:
    """Send one input to the live server; raise InvariantViolation if it misbehaves."""
    expected = expect(item)
    sock = socket.create_connection(("127.0.0.1", port), timeout=EXAMPLE_DEADLINE_S)
    reader = _ReplyReader(item.protocol)
    ended = ""  # "eof" or "reset" once the server closed
    send_failed = False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for chunk in item.chunks():
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                send_failed = True
                break
            stats.bytes_sent += len(chunk)
        if item.half_close and not send_failed:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + EXAMPLE_DEADLINE_S
        while not ended:
            if expected.ending == "open" and len(reader.replies) >= len(expected.replies):
                break
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                ended = "reset"
                break
            except TimeoutError:
                raise InvariantViolation(
                    f"no reply and no close within {EXAMPLE_DEADLINE_S} s: expected "
                    f"{len(expected.replies)} replies then {expected.ending!r}, "
                    f"got {len(reader.replies)}"
                ) from None
            if not data:
                ended = "eof"
                break
            reader.feed(data)
    finally:
        sock.close()
    stats.inputs += 1
    stats.replies += len(reader.replies)
    stats.count(expected.ending)
    _check(expected, reader.replies, ended, send_failed)


def _check(expected: Expected, got: list[Reply], ended: str, send_failed: bool) -> None:
    want = expected.replies
    if send_failed and expected.ending != "error":
        raise InvariantViolation("the server closed while a well-formed input was being sent")
    if expected.ending == "open":
        if ended:
            raise InvariantViolation(f"server closed a clean connection ({ended})")
    elif not ended:
        raise InvariantViolation(f"server did not close the connection ({expected.ending})")
    # A reset (the server closed with our bytes unread) may cut replies already sent; anything
    # that did arrive must still be right, in order.
    complete = ended != "reset" or expected.ending != "error"
    if len(got) > len(want) or (complete and len(got) != len(want)):
        raise InvariantViolation(f"expected {len(want)} replies, got {len(got)}: {got!r}")
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        if not same_reply(g, w):
            raise InvariantViolation(f"reply {i}: got {g!r}, expected {w!r}")


class ControlClient:
    """A persistent socketmap connection asking one known key after every input."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.client = Client.connect(
            HostPort(host="127.0.0.1", port=port), timeout_s=EXAMPLE_DEADLINE_S
        )

    def check(self, stats: FuzzStats) -> None:
        try:
            reply = self.client.ask(CONTROL_MAP, CONTROL_KEY)
        except QueryError as exc:
            raise InvariantViolation(f"the control connection failed: {exc}") from exc
        if reply != Reply.ok(CONTROL_VALUE):
            raise InvariantViolation(f"control lookup answered {reply!r}")
        stats.control_checks += 1

    def close(self) -> None:
        self.client.close()


# -- the live server ---------------------------------------------------------------------------


def seed(dsn: str, data: Dataset = FUZZ_DATA) -> None:
    """Create the schema if needed and load ``data``."""
    import asyncpg

    from maplookup.db import admin

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await admin.init_schema(conn)
            await data.load(conn)
        finally:
            await conn.close()

    asyncio.run(run())


@dataclass
class LiveServer:
    """The fuzzed server: socketmap, one tcp_table listener (``TCP_MAP``) and /metrics."""

    running: RunningServer

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.running.process

    @property
    def socketmap_port(self) -> int:
        return self.running.socketmap_port

    @property
    def tcp_port(self) -> int:
        return self.running.tcp_ports[TCP_MAP]

    def port_for(self, protocol: str) -> int:
        return self.socketmap_port if protocol == "socketmap" else self.tcp_port

    def alive(self) -> bool:
        return self.running.alive()

    def metric(self, name: str) -> float:
        """One unlabelled sample from /metrics."""
        url = f"http://127.0.0.1:{self.running.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def log_tail(self, lines: int = 30) -> str:
        return self.running.log_tail(lines)

    def tracebacks(self) -> int:
        try:
            assert self.running.log_path is not None
            return self.running.log_path.read_text(errors="replace").count("Traceback")
        except OSError:
            return 0


def start_live_server(
    dsn: str, log_path: Path, read_timeout_s: float = READ_TIMEOUT_S, mode: str = "lru"
) -> LiveServer:
    """``python -m maplookup serve`` with a socketmap, a tcp_table and a metrics listener, in
    cache mode ``mode`` (with ``complete``, returned once the copy is loaded).

    ``read_timeout_s`` is what a stalled partial request costs; too short, and a scheduling
    gap between two chunks of one input on a busy machine looks like a stall.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAPLOOKUP_")}
    env["MAPLOOKUP_LIMITS__READ_TIMEOUT_S"] = str(read_timeout_s)
    env["MAPLOOKUP_CACHE__MODE"] = mode
    if os.geteuid() == 0:
        # Tests and benchmarks run as root in containers; no user to drop privileges to.
        env["MAPLOOKUP_ALLOW_ROOT"] = "true"
    running = start_server(
        dsn,
        log_path,
        tcp_maps=(TCP_MAP,),
        extra_args=("--log-level", "warning"),
        metrics=True,
        env=env,
        cwd=PROJECT_ROOT,
        timeout_s=30,
    )
    server = LiveServer(running)
    try:
        _wait_for(lambda: server.metric("maplookup_cache_live") == 1.0, server)
        if mode == "complete":
            _wait_for(lambda: server.metric("maplookup_copy_loaded") == 1.0, server)
    except BaseException:
        stop_server(running)
        raise
    return server


def _wait_for(condition: Callable[[], bool], server: LiveServer, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(
                f"server exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        with contextlib.suppress(OSError, KeyError):
            if condition():
                return
        time.sleep(0.05)
    raise RuntimeError(f"server not ready within {timeout_s} s:\n{server.log_tail()}")


def stop_live_server(server: LiveServer) -> int:
    return stop_server(server.running)
