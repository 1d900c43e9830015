"""`flowshard bench --plot`: each panel answers one question, in units a person reads (issue 11).
Drawn from a small synthetic result and checked through matplotlib's own objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.histogram import Histogram
from bench.report import aggregate

plt = pytest.importorskip("matplotlib.pyplot")

from bench import plot as bench_plot  # noqa: E402


def _run(dispatches: float, p50_us: float, server_wait_ms: list[float]) -> dict[str, Any]:
    waits, at_once = Histogram(), Histogram()
    for ms in server_wait_ms:
        waits.record(int(ms * 1e6))
    at_once.record(0, 3)
    return {
        "warmup_s": 1.0,
        "timeline": {"bin_s": 0.5, "by": "flow", "unit": "dispatches/s",
                     "series": {"a": [10.0, 20.0, 20.0, 20.0], "b": [0.0, 20.0, 20.0, 20.0]}},
        "flows": [{"id": "a", "band": "interactive", "share": 0.5, "fair_share": 0.5},
                  {"id": "b", "band": "interactive", "share": 0.5, "fair_share": 0.5}],
        "groups": [],
        "bands": [{"name": "interactive", "wait_hist_ns": waits.to_dict(), "wait_ms": {"p50": 2.0, "p99": 40.0}},
                  {"name": "idle", "wait_hist_ns": at_once.to_dict(), "wait_ms": {}},
                  {"name": "unused", "wait_hist_ns": Histogram().to_dict(), "wait_ms": {}}],
        "counts": {"submitted": 100, "dispatched": 90},
        "throughput": {"dispatches_per_s": dispatches},
        "latency_us": {"p50": p50_us, "p99": p50_us * 10},
        "cpu": {"kinds": {"distributor": {"us_per_req": 20.0}, "workers": {"us_per_req": 10.0},
                          "loadgens": {"us_per_req": 15.0}}},
    }


def _axes(one_run: bool) -> tuple[Any, Any, Any, Any]:
    runs = [[_run(100.0, 2000.0, [0.5, 2.0, 40.0])], [_run(90.0, 3000.0, [1.0])]]
    if not one_run:
        runs = [[*r, _run(110.0, 2500.0, [1.0])] for r in runs]
    _fig, axes = plt.subplots(2, 2)
    bench_plot._shares(axes[0][0], runs[0][0], "shards=1")
    bench_plot._waits(axes[0][1], runs[0][0], "shards=1")
    aggs = [aggregate(r) for r in runs]
    bench_plot._costs(axes[1][0], ["shards=1", "shards=2"], aggs)
    bench_plot._latency(axes[1][1], ["shards=1", "shards=2"], aggs)
    return axes[0][0], axes[0][1], axes[1][0], axes[1][1]


def _error_bars(ax: Any) -> list[Any]:
    from matplotlib.container import ErrorbarContainer

    return [c for c in ax.containers if isinstance(c, ErrorbarContainer) or getattr(c, "errorbar", None)]


def test_each_panel_asks_its_question_in_readable_units() -> None:
    shares, waits, costs, latency = _axes(one_run=True)
    assert shares.get_title().startswith("Did each tenant get its share?")
    assert waits.get_title().startswith("How long did each band wait?")
    assert costs.get_title().startswith("What does each configuration cost?")
    assert latency.get_title().startswith("How fast are admissions answered?")
    assert "(ms" in waits.get_xlabel() and "(%)" in waits.get_ylabel()
    assert "(ms)" in latency.get_ylabel() and "(µs)" in costs.get_ylabel()
    plt.close("all")


def test_service_is_cumulative_with_the_warmup_labelled_and_bands_in_the_legend() -> None:
    shares, *_ = _axes(one_run=True)
    a, b = shares.get_lines()
    assert list(a.get_ydata()) == [0, 5, 15, 25, 35]  # requests so far, not a jumpy rate
    assert list(b.get_xdata()) == [0, 0.5, 1.0, 1.5, 2.0]
    legend = [t.get_text() for t in shares.get_legend().get_texts()]
    assert legend[0] == "a: band interactive, 50.0% of its band (fair 50.0%)"
    assert "warmup, 1 s (not counted)" in legend
    plt.close("all")


def test_wait_axis_starts_near_the_shortest_wait_and_names_idle_bands() -> None:
    _, waits, *_ = _axes(one_run=True)
    left, _ = waits.get_xlim()
    assert 0.1 <= left < 0.5  # about half the shortest wait (0.5 ms), not 1e-6 ms
    assert waits.get_ylim() == (0, 101)
    legend = [t.get_text() for t in waits.get_legend().get_texts()]
    assert legend[0].startswith("band interactive: p50 2.0 ms, p99 40 ms")
    assert legend[1:] == ["band idle: no request waited (3 dispatched at once)"]  # a band without requests: left out
    plt.close("all")


def test_latency_is_linear_from_zero_and_min_max_bars_only_for_several_runs() -> None:
    *_, costs, latency = _axes(one_run=True)
    assert latency.get_yscale() == "linear" and latency.get_ylim()[0] == 0
    assert not _error_bars(latency)
    assert "one run each" in latency.get_title()
    heights = sorted(round(p.get_height(), 3) for p in latency.patches)
    assert heights == [2.0, 3.0, 20.0, 30.0]  # ms
    rates = [t.get_text() for t in costs.texts]
    assert rates == ["100 req/s", "90 req/s"]
    plt.close("all")
    *_, costs, latency = _axes(one_run=False)
    assert _error_bars(latency)
    assert "min–max over runs" in latency.get_title()
    assert costs.texts[0].get_text() == "105 req/s\n(100–110)"
    plt.close("all")


def test_plot_writes_a_png(tmp_path: Path) -> None:
    class Config:
        label = "shards=1"

    config = Config()
    path = tmp_path / "p.png"
    message = bench_plot.plot(str(path), {"configs": [config], "runs": {config: [_run(100.0, 2000.0, [1.0, 3.0])]}})
    assert message == f"plot: written to {path}" and path.read_bytes()[:4] == b"\x89PNG"


def test_a_latency_that_is_a_lower_bound_is_marked_as_in_the_table() -> None:
    """A review: the table prints a percentile that falls among requests still unanswered at the end as
    "≥ X"; the plot printed it as X."""
    fig, ax = plt.subplots()
    stat = {"median": 30_000.0, "min": 30_000.0, "max": 30_000.0, "n": 1}
    figures = {"latency p50 µs": dict(stat), "latency p99 µs": {**stat, "lower_bound": True}}
    bench_plot._latency(ax, ["shards=1"], [figures])
    assert [t.get_text() for t in ax.texts] == ["30 ms", "≥ 30 ms"]
    plt.close(fig)


def test_the_bar_panels_legends_cover_no_bar_and_no_label() -> None:
    """Review 167: in the upper left corner a legend covered the first bar's label when that bar was the
    tallest (here: the first configuration costs and waits the most)."""
    *_, costs, latency = _axes(one_run=True)
    fig = costs.figure
    fig.set_size_inches(14, 10)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in (costs, latency):
        box = ax.get_legend().get_window_extent(renderer)
        assert ax.texts and ax.patches
        for item in (*ax.texts, *ax.patches):
            assert not box.overlaps(item.get_window_extent(renderer)), (ax.get_title(), item)
    plt.close("all")
