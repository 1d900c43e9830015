"""`flowshard bench --plot FILE.png`: four panels, each answering one question a user asks.

1. Did each tenant get its share? Requests dispatched so far, per flow (per flow entry when there are
   many flows: the mean per flow), over the run of the median dispatch rate of the first
   configuration. Equal weights and equal demand give parallel lines; the legend gives each flow's
   band, its share of the band's service in the window and the max-min fair share it should have had.
   The warmup, which the figures leave out, is shaded and in the legend.
2. How long did each band wait? The share of requests that waited longer than x in the queue
   (server-reported, enqueue to dispatch), per band, x in ms on a log axis from the shortest wait.
3. What does each configuration cost? CPU µs per request of each kind of process, stacked, with the
   dispatch rate on top of each bar.
4. How fast are admissions answered? Admission latency p50 and p99 per configuration in ms, from 0.

Min–max bars are drawn only where a configuration had more than one run. Without matplotlib it says
so and draws nothing: the bench itself never needs it.
"""

from __future__ import annotations

import math
from typing import Any

from bench.histogram import Histogram
from bench.report import aggregate, median_run

__all__ = ["plot", "plot_missing"]

# process kinds in the CPU panel: (aggregate figure, legend label)
COST_PARTS = [("distributor µs/req", "distributor"), ("workers µs/req (sum)", "workers"),
              ("acceptors µs/req (sum)", "acceptors"), ("echo µs/req", "echo server"),
              ("loadgen µs/req", "load generator")]


INSTALL_HINT = ("`pip install matplotlib`; in a checkout `.venv/bin/pip install -e '.[plot]'` or "
                "`scripts/bootstrap.sh test`")


def plot_missing() -> str | None:
    """Why --plot cannot draw (checked before a run, not after it), or None."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return f"needs matplotlib, which is not installed: {INSTALL_HINT}"
    return None


def plot(path: str, result: dict[str, Any]) -> str:
    """Draw the figures into `path`; returns a one-line message for the user."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return f"plot: matplotlib is not installed ({INSTALL_HINT}); no plot drawn"
    configs = result["configs"]
    runs = result["runs"]
    first = median_run(runs[configs[0]])
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    _shares(axes[0][0], first, configs[0].label)
    _waits(axes[0][1], first, configs[0].label)
    labels = [c.label for c in configs]
    aggs = [aggregate(runs[c]) for c in configs]
    _costs(axes[1][0], labels, aggs)
    _latency(axes[1][1], labels, aggs)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot: written to {path}"


def _shares(ax: Any, run: dict[str, Any], label: str) -> None:
    tl = run["timeline"]
    bin_s = tl["bin_s"]
    by_group = tl["by"] == "group"
    rows = {g["id"]: g for g in run["groups"]} if by_group else {f["id"]: f for f in run["flows"]}
    for name, rates in tl["series"].items():
        row = rows.get(name, {})
        per = row.get("flows", 1) if by_group else 1
        total, xs, ys = 0.0, [0.0], [0.0]
        for i, rate in enumerate(rates):
            total += rate * bin_s / per
            xs.append((i + 1) * bin_s)
            ys.append(total)
        share = "" if row.get("share") is None else (
            f", {_pct(row['share'])} of its band (fair {_pct(row.get('fair_share'))})")
        who = f"{name} ({per} flows, mean per flow)" if by_group and per > 1 else name
        ax.plot(xs, ys, linewidth=1.5, label=f"{who}: band {row.get('band', '?')}{share}")
    warmup = run.get("warmup_s") or 0.0
    if warmup > 0:
        ax.axvspan(0, warmup, color="grey", alpha=0.15, linewidth=0, label=f"warmup, {warmup:g} s (not counted)")
    ax.set_title(f"Did each tenant get its share?  ({label}, median run)", fontsize=11)
    ax.set_xlabel("time since the run started (s)")
    ax.set_ylabel("requests dispatched so far, per flow")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if tl["series"]:
        ax.legend(fontsize=7, loc="upper left", title="flow: band, share in the window", title_fontsize=7)


def _waits(ax: Any, run: dict[str, Any], label: str) -> None:
    shortest = math.inf
    drawn = False
    for band in run["bands"]:
        h = Histogram.from_dict(band["wait_hist_ns"])
        if h.count == 0:
            continue
        xs, ys, seen = [], [], 0
        for _low, high, count in h.buckets():
            seen += count
            if high <= 0:
                continue
            xs.append(high / 1e6)
            ys.append(100.0 * (1.0 - seen / h.count))
        waited = [x for x, y in zip(xs, ys, strict=True) if x > 0]
        if not waited:
            ax.plot([], [], label=f"band {band['name']}: no request waited ({h.count:,} dispatched at once)")
            continue
        shortest = min(shortest, waited[0])
        p50, p99 = band["wait_ms"].get("p50"), band["wait_ms"].get("p99")
        ax.step(xs, ys, where="post", linewidth=1.5,
                label=f"band {band['name']}: p50 {_ms(p50)}, p99 {_ms(p99)} ({h.count:,} requests)")
        drawn = True
    ax.set_xscale("log")
    if drawn:
        ax.set_xlim(left=max(shortest / 2, 1e-3))
        ax.xaxis.set_major_formatter(_ms_formatter())
    ax.set_ylim(0, 101)
    ax.set_title(f"How long did each band wait?  ({label}, median run)", fontsize=11)
    ax.set_xlabel("time waiting in the queue, x (ms, log scale)")
    ax.set_ylabel("requests that waited longer than x (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def _costs(ax: Any, labels: list[str], aggs: list[dict[str, Any]]) -> None:
    bottoms = [0.0] * len(labels)
    for figure, part in COST_PARTS:
        values = [(a.get(figure) or {}).get("median") or 0.0 for a in aggs]
        if not any(values):
            continue
        ax.bar(range(len(labels)), values, 0.6, bottom=bottoms, label=part)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    for i, agg in enumerate(aggs):
        rate = agg.get("dispatches/s")
        if rate:
            text = f"{rate['median']:,.0f} req/s" + (
                f"\n({rate['min']:,.0f}–{rate['max']:,.0f})" if rate.get("n", 1) > 1 else "")
            ax.text(i, bottoms[i], text, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=9)
    ax.set_ylim(0, max([*bottoms, 1.0]) * _HEADROOM)
    ax.set_title("What does each configuration cost?  (median over runs)", fontsize=11)
    ax.set_ylabel("CPU per request (µs), by process")
    ax.grid(alpha=0.3, axis="y")
    _legend_above_bars(ax)


def _latency(ax: Any, labels: list[str], aggs: list[dict[str, Any]]) -> None:
    width = 0.38
    top = 0.0
    for k, (figure, name) in enumerate((("latency p50 µs", "p50"), ("latency p99 µs", "p99"))):
        for i, agg in enumerate(aggs):
            stat = agg.get(figure)
            if not stat:
                continue
            med = stat["median"] / 1000
            x = i + (k - 0.5) * width
            many = stat.get("n", 1) > 1 and stat["min"] != stat["max"]
            err = [[med - stat["min"] / 1000], [stat["max"] / 1000 - med]] if many else None
            ax.bar(x, med, width, yerr=err, capsize=3, color=f"C{k}", label=name if i == 0 else None)
            mark = "≥ " if stat.get("lower_bound") else ""  # (among requests unanswered at the end, as the table says)
            ax.text(x, stat["max"] / 1000 if many else med, mark + _ms(med), ha="center", va="bottom", fontsize=8)
            top = max(top, stat["max"] / 1000)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=9)
    ax.set_ylim(0, max(top, 1e-3) * _HEADROOM)
    runs = max((a.get("latency p50 µs", {}).get("n", 1) for a in aggs), default=1)
    ax.set_title("How fast are admissions answered?  " + ("(median, min–max over runs)" if runs > 1 else
                                                           "(one run each)"), fontsize=11)
    ax.set_ylabel("admission latency (ms), from the intended send time")
    ax.grid(alpha=0.3, axis="y")
    _legend_above_bars(ax)


# The bar panels' room above the tallest bar: its label, then the legend in one row (in a corner, the
# legend covered the first bar's label when that bar was the tallest: review 167)
_HEADROOM = 1.4


def _legend_above_bars(ax: Any) -> None:
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(fontsize=8, loc="upper center", ncol=max(1, len(handles)), frameon=False)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    if value >= 10:
        return f"{value:.0f} ms"
    if value >= 1:
        return f"{value:.1f} ms"
    return f"{value * 1000:.0f} µs"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ms_formatter() -> Any:
    from matplotlib.ticker import FuncFormatter  # type: ignore[import-not-found,unused-ignore]

    return FuncFormatter(lambda x, _pos: f"{x:g}")
