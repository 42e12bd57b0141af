"""PNG plots of a suite run (matplotlib, Agg backend: no display needed).

.venv/bin/python -m bench.lib.plots bench/results/suite-<stamp>.json   # redraw from a JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.lib.hist import Histogram, bucket_high

SERIES_STYLE = {
    "maplookup": "tab:blue",
    "maplookup-workers": "tab:cyan",
    "trio-bare": "tab:orange",
    "asyncio-bare": "tab:green",
    "maplookup-nocache": "tab:red",
    "asyncpg": "tab:purple",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scaling_series(runs: list[dict[str, Any]]) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    series: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for run in runs:
        if run["group"] != "scaling" or run.get("round", 0) != 0:
            continue
        series.setdefault(run["server_label"], []).append(
            (run["result"]["spec"]["connections"], run["result"])
        )
    for points in series.values():
        points.sort(key=lambda p: p[0])
    return series


def plot_scaling(payload: dict[str, Any], out: Path) -> list[Path]:
    plt = _pyplot()
    series = _scaling_series(payload["runs"])
    if not series:
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        xs = [c for c, _ in points]
        ax.plot(xs, [r["throughput_rps"] for _, r in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks([c for c, _ in next(iter(series.values()))])
    ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("connections (closed loop, one request in flight each)")
    ax.set_ylabel("replies / s")
    ax.set_title("Throughput vs connections (cached hits, 100k mailboxes)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out.with_name(out.name + "-throughput.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, (label, points) in enumerate(series.items()):
        color = f"C{n}"
        xs = [c for c, _ in points]
        for key, style in (("p50_us", "-"), ("p99_us", "--"), ("p99_9_us", ":")):
            ax.plot(
                xs,
                [r["latency"][key] for _, r in points],
                style,
                color=color,
                marker="o" if key == "p50_us" else None,
                label=f"{label} {key.removesuffix('_us').replace('_', '.')}",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([c for c, _ in next(iter(series.values()))])
    ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("connections")
    ax.set_ylabel("latency, µs (log)")
    ax.set_title("Latency percentiles vs connections (p50 solid, p99 dashed, p99.9 dotted)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = out.with_name(out.name + "-latency.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def plot_spectrum(payload: dict[str, Any], out: Path) -> list[Path]:
    """Latency by percentile (HdrHistogram style) for the 64-connection closed-loop runs."""
    plt = _pyplot()
    runs = [
        r
        for r in payload["runs"]
        if r["group"] in ("scaling", "miss-path") and r.get("round", 0) == 0
    ]
    runs = [
        r
        for r in runs
        if r["result"]["spec"]["connections"] == 64 and not r["result"]["spec"]["rate"]
    ]
    if not runs:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ticks = [0.5, 0.9, 0.99, 0.999, 0.9999]
    for run in runs:
        hist = Histogram.from_json(run["result"]["histogram"])
        if hist.n == 0:
            continue
        xs, ys = [], []
        seen = 0
        for i, c in enumerate(hist.counts):
            if c:
                seen += c
                q = seen / hist.n
                if q >= 1.0:
                    q = 1 - 0.5 / hist.n
                xs.append(1 / (1 - q))
                ys.append(min(bucket_high(i), hist.max) / 1e3)
        ax.plot(xs, ys, label=f"{run['server_label']} / {run['mix']}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([1 / (1 - t) for t in ticks])
    ax.set_xticklabels([f"{t * 100:g}%" for t in ticks])
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency, µs (log)")
    ax.set_title("Latency by percentile, 64 connections, closed loop")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out.with_name(out.name + "-percentiles.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_postmap(payload: dict[str, Any], out: Path) -> list[Path]:
    plt = _pyplot()
    rows = payload.get("postmap", [])
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    rows = [r for r in rows if r.get("round", 0) == 0]
    labels = [r["label"] for r in rows]
    values = [r["keys_per_s"] for r in rows]
    ax.barh(labels, values, color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("keys / s (log), 4 parallel postmap -q -")
    ax.set_title("Through Postfix's own client")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:,.0f}", va="center", fontsize=7)
    ax.invert_yaxis()
    fig.tight_layout()
    path = out.with_name(out.name + "-postmap.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_memory(payload: dict[str, Any], out: Path) -> list[Path]:
    plt = _pyplot()
    steps = payload.get("memory", {}).get("steps", [])
    if len(steps) < 2:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([s["entries"] for s in steps], [s["rss_kib"] / 1024 for s in steps], marker="o")
    ax.set_xlabel("cached entries (worker 0 metrics)")
    ax.set_ylabel("server RSS, MiB")
    ax.set_title(f"Server memory vs cached entries ({payload['memory'].get('dataset', '')})")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = out.with_name(out.name + "-memory.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_all(payload: dict[str, Any], out: Path) -> list[Path]:
    """``out`` is the results path without extension; PNGs go beside it."""
    paths: list[Path] = []
    for plot in (plot_scaling, plot_spectrum, plot_postmap, plot_memory):
        paths += plot(payload, out)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m bench.lib.plots bench/results/suite-<stamp>.json")
    path = Path(args[0])
    payload = json.loads(path.read_text())
    for p in plot_all(payload, path.with_suffix("")):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
