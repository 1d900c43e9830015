"""`flowshard bench --plot FILE.png`: four panels from the figures (matplotlib, an optional extra).

1. service over time: dispatches/s per flow (or flow entry) in the median run of the first configuration;
2. wait-time distributions per band (server-reported enqueue-to-dispatch), as CCDFs on log axes;
3. dispatches/s per configuration (median, min-max bars);
4. admission latency p50 / p99 per configuration (median, min-max bars).

Without matplotlib it says so and draws nothing: the bench itself never needs it.
"""

from __future__ import annotations

from typing import Any

from bench.histogram import Histogram
from bench.report import aggregate, median_run

__all__ = ["plot"]


def plot(path: str, result: dict[str, Any]) -> str:
    """Draw the figures into `path`; returns a one-line message for the user."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return "plot: matplotlib is not installed (pip install 'flowshard[plot]'); no plot drawn"
    configs = result["configs"]
    runs = result["runs"]
    first = median_run(runs[configs[0]])
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    _timeline(axes[0][0], first, configs[0].label)
    _waits(axes[0][1], first, configs[0].label)
    labels = [c.label for c in configs]
    aggs = [aggregate(runs[c]) for c in configs]
    _bars(axes[1][0], labels, [[a.get("dispatches/s")] for a in aggs], ["dispatches/s"], "dispatches/s")
    _bars(axes[1][1], labels, [[a.get("latency p50 µs"), a.get("latency p99 µs")] for a in aggs],
          ["p50", "p99"], "admission latency (µs)", log=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: written to {path}"


def _timeline(ax: Any, run: dict[str, Any], label: str) -> None:
    tl = run["timeline"]
    for name, values in tl["series"].items():
        ax.plot([i * tl["bin_s"] for i in range(len(values))], values, label=name, linewidth=1)
    ax.axvline(run.get("warmup_s") or 0.0, color="grey", linewidth=0.5)
    ax.set_title(f"service over time per {tl['by']} ({label}, median run)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("dispatches/s")
    if tl["series"]:
        ax.legend(fontsize=7, ncol=2)


def _waits(ax: Any, run: dict[str, Any], label: str) -> None:
    drawn = False
    for band in run["bands"]:
        h = Histogram.from_dict(band["wait_hist_ns"])
        if h.count == 0:
            continue
        xs, ys = [], []
        seen = 0
        for low, high, count in h.buckets():
            seen += count
            xs.append(max((low + high) / 2, 1) / 1e6)
            ys.append(max(1.0 - seen / h.count, 0.5 / h.count))
        ax.step(xs, ys, where="post", label=band["name"])
        drawn = True
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(f"wait per band, P(wait > x) ({label}, median run)")
    ax.set_xlabel("wait (ms)")
    if drawn:
        ax.legend(fontsize=8)


def _bars(ax: Any, labels: list[str], stats: list[list[dict[str, Any] | None]], series: list[str],
          title: str, log: bool = False) -> None:
    width = 0.8 / len(series)
    for k, name in enumerate(series):
        xs, med, lo, hi = [], [], [], []
        for i, row in enumerate(stats):
            s = row[k]
            if not s:
                continue
            xs.append(i + k * width)
            med.append(s["median"])
            lo.append(s["median"] - s["min"])
            hi.append(s["max"] - s["median"])
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=20, fontsize=8)
    ax.set_title(f"{title}: median (min-max)")
    if log:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend(fontsize=8)
