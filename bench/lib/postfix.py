"""Lookups through Postfix's own client: ``postmap -q -`` with several processes in parallel.

``postmap -q - TABLE`` reads keys from stdin and looks each one up over one connection (one
request at a time, as every Postfix process does), printing ``key<TAB>value`` for each key
found.  The same key list is split round-robin over P processes that run at the same time; the
figure is keys / wall time from the first start to the last exit, and the number of found
keys is checked against what the key list expects.  Tables compared:

- ``socketmap:inet:127.0.0.1:PORT:vmailbox`` — maplookup, or a bare responder;
- ``pgsql:FILE`` — Postfix querying PostgreSQL itself, with the query maplookup's
  ``postfix-config`` generates for virtual(8) (``maplookup.postfix_config.pgsql_query``);
- ``lmdb:FILE`` — a file built by ``postmap`` from the same mailboxes: no IPC at all, the
  in-process limit.

postmap needs a main.cf: it gets a directory of its own holding ``compatibility_level = 3.6``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.lib.common import BenchError, Children

POSTMAP = "/usr/sbin/postmap"
POSTMAP_TIMEOUT_S = 300.0


def available() -> bool:
    return Path(POSTMAP).is_file() or shutil.which("postmap") is not None


def postmap_binary() -> str:
    return POSTMAP if Path(POSTMAP).is_file() else (shutil.which("postmap") or POSTMAP)


def make_config_dir(root: Path) -> Path:
    conf = root / "postfix-conf"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "main.cf").write_text("compatibility_level = 3.6\n")
    return conf


def write_pgsql_cf(conf: Path, name: str, dsn: str) -> Path:
    """A pgsql: table calling the same SQL function as the server (postfix-config's query)."""
    from maplookup.maps import MapName
    from maplookup.postfix.config import PostfixConfigOptions, pgsql_query

    query = pgsql_query(MapName.VMAILBOX, PostfixConfigOptions(pgsql_dsn=dsn))
    # The path of the URI, not its last '/': a unix-socket DSN has a path in its query too.
    database = urlsplit(dsn).path.lstrip("/")
    path = conf / f"{name}.cf"
    path.write_text(f"hosts = {dsn}\ndbname = {database}\nquery = {query}\n")
    path.chmod(0o640)
    return path


def build_lmdb(conf: Path, name: str, pairs: list[tuple[str, str]]) -> tuple[str, float]:
    """``postmap lmdb:FILE`` from ``key value`` lines; returns the table and build seconds."""
    source = conf / name
    source.write_text("".join(f"{k} {v}\n" for k, v in pairs))
    started = time.monotonic()
    proc = subprocess.run(
        [postmap_binary(), "-c", str(conf), f"lmdb:{source}"],
        capture_output=True,
        text=True,
        timeout=POSTMAP_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"postmap lmdb:{source} failed: {proc.stderr.strip()[:300]}")
    return f"lmdb:{source}", time.monotonic() - started


@dataclass(slots=True)
class PostmapResult:
    table: str
    label: str
    processes: int
    keys: int
    found: int
    expected_found: int
    wall_s: float
    keys_per_s: float
    per_process_s: list[float]
    stderr_sample: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "label": self.label,
            "processes": self.processes,
            "keys": self.keys,
            "found": self.found,
            "expected_found": self.expected_found,
            "wall_s": self.wall_s,
            "keys_per_s": self.keys_per_s,
            "per_process_s": self.per_process_s,
            "stderr_sample": self.stderr_sample,
        }


def run_postmap(
    children: Children,
    conf: Path,
    table: str,
    keys: list[str],
    expected_found: int,
    processes: int,
    workdir: Path,
    label: str,
) -> PostmapResult:
    """P parallel ``postmap -q -`` over ``keys`` (round-robin split); checks the found count."""
    parts = [keys[i::processes] for i in range(processes)]
    inputs, outputs, errors = [], [], []
    for n, part in enumerate(parts):
        path = workdir / f"postmap-in-{n}.txt"
        path.write_text("".join(k + "\n" for k in part))
        inputs.append(path)
        outputs.append(workdir / f"postmap-out-{n}.txt")
        errors.append(workdir / f"postmap-err-{n}.txt")
    procs = []
    handles = []
    try:
        started = time.monotonic()
        for n in range(processes):
            fin = inputs[n].open("rb")
            fout = outputs[n].open("wb")
            ferr = errors[n].open("wb")
            handles += [fin, fout, ferr]
            procs.append(
                children.start(
                    [postmap_binary(), "-c", str(conf), "-q", "-", table],
                    stdin=fin,
                    stdout=fout,
                    stderr=ferr,
                )
            )
        ended = []
        deadline = started + POSTMAP_TIMEOUT_S
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise BenchError(f"postmap on {table} did not finish in time") from None
            ended.append(time.monotonic() - started)
        wall = time.monotonic() - started
    finally:
        for proc in procs:
            children.stop(proc, timeout_s=2)
        for h in handles:
            h.close()
    found = sum(
        sum(1 for line in path.read_bytes().splitlines() if line.strip()) for path in outputs
    )
    stderr = b"".join(path.read_bytes() for path in errors).decode(errors="replace")
    # postmap exits 1 when the last key was not found; anything above is a failure.
    codes = [p.returncode for p in procs]
    if any(c not in (0, 1) for c in codes) or "fatal:" in stderr:
        raise BenchError(f"postmap on {table} failed ({codes}): {stderr.strip()[:300]}")
    return PostmapResult(
        table=table,
        label=label,
        processes=processes,
        keys=len(keys),
        found=found,
        expected_found=expected_found,
        wall_s=wall,
        keys_per_s=len(keys) / wall,
        per_process_s=ended,
        stderr_sample=stderr.strip()[:300],
    )
