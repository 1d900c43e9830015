"""The simulator's prediction next to the measurement, for the same scenario.

`flowshard simulate` runs the same engine in virtual time with an ideal client (no transport, no
generator); `flowshard bench` prints, per flow entry and per band, what it predicts for shares and
waits, what was measured (median over runs), and the difference. Where they differ, either the
real system adds something the model leaves out (transport, scheduling, the generator's timer
precision) or the model is wrong: both are worth knowing.

The simulator is skipped when a scenario would take it too long (a closed loop with ~zero think and
service times makes millions of virtual requests per second), and with `--no-simulate`.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any, TextIO

import msgspec

from bench.report import fmt, pct, table
from flowshard.estimate import estimate
from flowshard.scenario import Scenario
from flowshard.simulate import WARN_SECONDS, Report, Watch, simulate

__all__ = ["MAX_SIMULATED_REQUESTS", "predict", "render"]

MAX_SIMULATED_REQUESTS = 3_000_000


def predict(scenario: Scenario, err: TextIO | None = None, shards: int = 1) -> tuple[Report | None, str]:
    """(the simulator's report, why not) for the scenario as run at `shards` shards (the N-shard
    simulation: the service's ledger and N engines, `flowshard simulate --shards`). With `err`, a
    simulation estimated to take more than a few seconds is announced there and shows its progress."""
    est = estimate(scenario, shards)
    if est.requests > MAX_SIMULATED_REQUESTS:
        return None, (f"simulation skipped: about {est.requests:,.0f} virtual requests "
                      f"(limit {MAX_SIMULATED_REQUESTS:,})")
    if err is None or est.seconds <= WARN_SECONDS:
        return simulate(scenario, shards=shards), ""
    at = f" at {shards} shards" if shards > 1 else ""
    err.write(f"simulating the scenario{at} for the comparison: about {est.events:,.0f} events "
              "(--no-simulate skips it)\n")
    watch = Watch(scenario.workload.duration, err)
    try:
        return simulate(scenario, watch, shards=shards), ""
    finally:
        watch.close()


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _diff(measured: float | None, predicted: float | None, scale: float = 1.0) -> float | None:
    """measured − predicted (× scale), or None when either is missing."""
    if measured is None or predicted is None:
        return None
    return round((measured - predicted) * scale, 3)


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _with_diffs(predicted: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """predicted, measured, and measured − predicted for share (percentage points) and waits (ms)."""
    diff = {"wait_p50_ms": _diff(measured["wait_p50_ms"], predicted["wait_p50_ms"]),
            "wait_p99_ms": _diff(measured["wait_p99_ms"], predicted["wait_p99_ms"])}
    if "share" in predicted:
        diff["share_pp"] = _diff(measured["share"], predicted["share"], 100)
    return {"predicted": predicted, "measured": measured, "diff": diff}


def comparison(report: Report, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per group and per band: shares and waits (ms), predicted and measured (median over runs)."""
    groups = []
    for g in report.groups:
        ms = [m for r in runs for m in r["groups"] if m["id"] == g.id]
        predicted = {"share": g.share, "wait_p50_ms": _ms(g.wait.p50), "wait_p99_ms": _ms(g.wait.p99),
                     "dispatched": g.counts.dispatched, "rejected": sum(g.counts.rejected.values()),
                     "evicted": sum(g.counts.evicted.values())}
        measured = {"share": _median([m["share"] for m in ms]),
                    "wait_p50_ms": _median([m["wait_ms"]["p50"] for m in ms]),
                    "wait_p99_ms": _median([m["wait_ms"]["p99"] for m in ms]),
                    "dispatched": _median([m["counts"]["dispatched"] for m in ms]),
                    "rejected": _median([sum(m["counts"]["rejected"].values()) for m in ms]),
                    "evicted": _median([sum(m["counts"]["evicted"].values()) for m in ms])}
        groups.append({"id": g.id, **_with_diffs(predicted, measured)})
    bands = []
    for b in report.bands:
        mb = [m for r in runs for m in r["bands"] if m["name"] == b.name]
        predicted = {"wait_p50_ms": _ms(b.wait.p50), "wait_p99_ms": _ms(b.wait.p99), "jain": b.jain,
                     "max_service_diff": b.max_service_diff, "inversions": b.priority_inversions}
        measured = {"wait_p50_ms": _median([m["wait_ms"]["p50"] for m in mb]),
                    "wait_p99_ms": _median([m["wait_ms"]["p99"] for m in mb]),
                    "jain": _median([m["jain"] for m in mb]),
                    "max_service_diff": _median([m["max_service_diff"] for m in mb]),
                    "inversions": _median([m["apparent_inversions"] for m in mb])}
        bands.append({"name": b.name, **_with_diffs(predicted, measured)})
    return {"groups": groups, "bands": bands}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def render(label: str, cmp: dict[str, Any]) -> str:
    rows = []
    for g in cmp["groups"]:
        p, m, d = g["predicted"], g["measured"], g["diff"]
        rows.append([g["id"], pct(p["share"]), pct(m["share"]), _signed(d["share_pp"]),
                     fmt(p["wait_p50_ms"]), fmt(m["wait_p50_ms"]), _signed(d["wait_p50_ms"]),
                     fmt(p["wait_p99_ms"]), fmt(m["wait_p99_ms"]), _signed(d["wait_p99_ms"]),
                     fmt(p["dispatched"]), fmt(m["dispatched"])])
    lines = [f"== simulator vs measured ({label}; measured: median over runs; diff = measured − simulated)"]
    lines += table(["flow", "share sim", "measured", "diff pp", "wait p50 ms sim", "measured", "diff",
                    "p99 sim", "measured", "diff", "dispatched sim", "measured"], rows)
    brows = []
    for b in cmp["bands"]:
        p, m, d = b["predicted"], b["measured"], b["diff"]
        brows.append([b["name"], fmt(p["wait_p50_ms"]), fmt(m["wait_p50_ms"]), _signed(d["wait_p50_ms"]),
                      fmt(p["wait_p99_ms"]), fmt(m["wait_p99_ms"]), _signed(d["wait_p99_ms"]),
                      fmt(p["jain"]), fmt(m["jain"]), fmt(p["inversions"]), fmt(m["inversions"])])
    lines.append("")
    lines += table(["band", "wait p50 ms sim", "measured", "diff", "p99 sim", "measured", "diff", "jain sim",
                    "measured", "inversions sim", "apparent"], brows)
    return "\n".join(lines)


def encode(report: Report | None) -> Any:
    return None if report is None else msgspec.to_builtins(report)
