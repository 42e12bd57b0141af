"""``/metrics`` for every worker: worker 0 serves the endpoint and gathers the others' figures.

With ``workers = N`` each worker counts for itself (its own requests, cache, pool).  Worker 0
holds the metrics port; each of the others listens on an abstract unix socket named after the
supervisor (no file to clean up and no permissions to get wrong after dropping root; it goes
away with the process) and writes its own exposition to whoever connects.  On a scrape,
worker 0 reads them all, each within ``PEER_TIMEOUT_S``, and merges them: every sample gets a
``worker`` label, so ``sum without (worker) (rate(maplookup_requests_total[5m]))`` is the
service's rate, and ``maplookup_workers{state="answering"}`` against ``{state="configured"}``
shows a worker that did not answer (restarting, or stuck) instead of silently lower totals.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

log = logging.getLogger(__name__)

# A worker's exposition is a few tens of KiB; anything beyond this is not one.
MAX_EXPOSITION_BYTES = 4 * 1024 * 1024
# How long worker 0 waits for each other worker's figures during one scrape.
PEER_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class WorkerPeers:
    """Which worker this process is, of how many, and the names their sockets share."""

    index: int
    count: int
    namespace: str  # unique per supervisor, e.g. "maplookup-<supervisor pid>"

    def address(self, index: int) -> str:
        """The abstract unix socket on which worker ``index`` gives its figures."""
        return f"\0{self.namespace}-metrics-{index}"

    @property
    def others(self) -> list[int]:
        return [i for i in range(self.count) if i != self.index]


async def serve_own_metrics(
    peers: WorkerPeers,
    render: Callable[[], bytes],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Give this worker's exposition to each connection on its socket, until cancelled."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(peers.address(peers.index))
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    listener = trio.SocketListener(sock)

    async def give(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(PEER_TIMEOUT_S):
                await stream.send_all(render())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("rendering this worker's metrics failed")
        finally:
            await trio.aclose_forcefully(stream)

    async with listener, trio.open_nursery() as nursery:
        task_status.started()
        while True:
            stream = await listener.accept()
            nursery.start_soon(give, stream)


async def read_peer(address: str, timeout_s: float = PEER_TIMEOUT_S) -> bytes | None:
    """One other worker's exposition, or None if it did not give one in time."""
    with trio.move_on_after(timeout_s):
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(address)
            stream = trio.SocketStream(sock)
            chunks: list[bytes] = []
            size = 0
            while chunk := await stream.receive_some(65536):
                size += len(chunk)
                if size > MAX_EXPOSITION_BYTES:
                    return None
                chunks.append(chunk)
            return b"".join(chunks)
        except OSError:
            return None
        finally:
            sock.close()
    return None


async def gather(peers: WorkerPeers, own: bytes) -> bytes:
    """This worker's exposition merged with every other worker's that answers in time."""
    parts: dict[int, bytes | None] = {peers.index: own}

    async def read(index: int) -> None:
        parts[index] = await read_peer(peers.address(index))

    async with trio.open_nursery() as nursery:
        for index in peers.others:
            nursery.start_soon(read, index)
    answering = {i: text for i, text in parts.items() if text is not None}
    missing = sorted(set(parts) - set(answering))
    if missing:
        log.warning("/metrics: no figures from worker(s) %s", ", ".join(map(str, missing)))
    return merge(answering, peers.count)


class _Fixed(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def merge(expositions: dict[int, bytes], configured: int) -> bytes:
    """One exposition from several workers' (index -> text): each sample labelled ``worker``."""
    families: dict[str, Metric] = {}
    for index in sorted(expositions):
        text = expositions[index].decode("utf-8")
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            merged.samples.extend(
                Sample(s.name, {"worker": str(index), **s.labels}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            )
    workers = Metric("maplookup_workers", "Worker processes: configured, and answering "
                     "this scrape.", "gauge")  # fmt: skip
    workers.add_sample("maplookup_workers", {"state": "configured"}, configured)
    workers.add_sample("maplookup_workers", {"state": "answering"}, len(expositions))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed([workers, *families.values()]))
    return generate_latest(registry)
