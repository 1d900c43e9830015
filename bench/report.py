"""Figures, tables and the C-core projection of `flowshard bench`.

`run_figures` turns one run's raw record (generator results, CPU snapshots, /v1/stats) into a plain
dict: every figure the JSON holds. `aggregate` reduces the runs of one configuration to
min/median/max per figure; the `render_*` functions print the human tables.

CPU µs per request = a process's CPU seconds in the window / requests sent in the window (each ends
in exactly one outcome). `project` turns those costs into the rate the same processes would reach with C cores:
each process is one thread, so it is capped at one core, and all processes together at C cores:
rate(C) = min(C / sum(cost), 1 / max(cost of one process)). The generator's cost only enters the
first term (it is spread over as many generator processes as needed); "service only" leaves it out
(the generator on other machines). The costs are those measured at this load: more batching at a
higher load makes them smaller, fewer requests per wake-up at a lower load larger.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec
import numpy as np

from bench.fairness import (
    UNITS,
    apparent_inversions,
    blocked_by_higher,
    busy,
    closed_cycles,
    fair_shares,
    offered_segments,
    overtaken,
    pairwise_difference,
    round_trips,
    service_difference,
    slot_holds,
    window_demands,
)
from bench.histogram import Histogram
from bench.loadgen import LOG_COLUMNS, UNFINISHED, UNSENT, GenResult
from bench.procstat import TICK
from bench.runner import RunRecord
from flowshard.analysis import jain_index, percentile
from flowshard.config import band_index
from flowshard.reference import FlowRef, Verdict, failed_gap, judge, segments
from flowshard.scenario import Closed, Scenario, closed_clients, expand_flows, flow_weights, offered_rate
from flowshard.simulate import reference_line
from flowshard.types import Outcome

__all__ = ["METRICS", "aggregate", "project", "record_rows", "render_comparison", "render_config", "run_figures"]

QUANTILES = (0.5, 0.9, 0.99, 0.999)
PROJECT_CORES = (2, 4, 8, 16)
INVERSION_TOL = 0.005  # seconds; see bench.fairness
SATURATED = 0.9  # a generator process busier than this (of one core) may have limited the load
FOREIGN = 0.2  # cores used by processes not in the run: above this, a warning
LATE = 1e-3  # open-loop send lag p99 above this: a warning
_REJECTED = [o for o in Outcome if o.status == "rejected"]
_EVICTED = [o for o in Outcome if o.status == "evicted"]


# ---------------------------------------------------------------------------------------- helpers


def _r(value: float | None, digits: int = 3) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def latency_figures(h: Histogram, scale: float = 1e-3) -> dict[str, Any]:
    """count, p50/p90/p99/p99.9, max, mean of a histogram of ns, in µs (scale 1e-3) or ms (1e-6)."""
    if h.count == 0:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "p999": None, "max": None, "mean": None}
    p = h.percentiles(QUANTILES)
    return {"count": h.count, "p50": _r(p[0] * scale), "p90": _r(p[1] * scale), "p99": _r(p[2] * scale),
            "p999": _r(p[3] * scale), "max": _r(h.max * scale), "mean": _r(h.mean * scale)}


def _merged(results: Sequence[GenResult], name: str) -> Histogram:
    return Histogram.merged(Histogram.from_dict(r.histograms[name]) for r in results if name in r.histograms)


def merged_log(results: Sequence[GenResult]) -> dict[str, np.ndarray]:
    """Every process's per-request log as numpy columns, concatenated."""
    out: dict[str, np.ndarray] = {}
    dtypes = {"i": np.int32, "d": np.float64, "b": np.int8, "q": np.int64, "f": np.float32}
    for name, code in LOG_COLUMNS.items():
        parts = [np.frombuffer(r.log[name], dtype=dtypes[code]) for r in results]
        out[name] = np.concatenate(parts) if parts else np.zeros(0, dtypes[code])
    return out


# A wait for a connection to open longer than this is warned (`HttpPool`: a burst opening many at once)
CONNECT_WAIT_WARN = 0.010


def record_rows(results: Sequence[GenResult], scenario: Scenario) -> list[list[object]]:
    """The per-request records of one run (flowshard.records), in arrival order at the service where the
    answers carried it (then by send time). Times are seconds from the run's start: the service's own
    receive and dispatch times when the answer carried them, else the generator's send and answer
    times; `done` of a dispatch is the end of its service (answer + service time)."""
    log = merged_log(results)
    instances = expand_flows(scenario.workload)
    resolve = band_index(scenario.server)
    names = [scenario.server.bands[resolve(i.spec.priority)].name for i in instances]
    labels = {int(o): o.label for o in Outcome}
    labels[UNFINISHED] = "unfinished"
    labels[UNSENT] = "unsent"
    labels[-1] = "error"
    seq = log["seq"]
    order = np.lexsort((log["sent"], np.where(seq >= 0, seq, np.iinfo(np.int64).max)))
    rows: list[list[object]] = []
    for i in order.tolist():
        f = int(log["flow"][i])
        outcome = int(log["outcome"][i])
        dispatched = outcome == 0
        received, at = float(log["s_recv"][i]), float(log["s_disp"][i])
        answered, service = float(log["done"][i]), float(log["service"][i])
        shard = int(log["shard"][i])
        rows.append([
            instances[f].id, names[f], int(seq[i]) if seq[i] >= 0 else None,
            round(received if math.isfinite(received) else float(log["sent"][i]), 9),
            (round(at if math.isfinite(at) else answered, 9)) if dispatched else None,
            round(answered + service if dispatched else answered, 9), shard if shard >= -1 else None,
            labels.get(outcome, str(outcome)), int(log["size"][i]), int(log["tokens"][i]),
            round(service, 9) if dispatched else None,
        ])
    return rows


def _counts(outcomes: Sequence[int], submitted: int, unfinished: int, errors: int) -> dict[str, Any]:
    return {
        "submitted": submitted,
        "dispatched": outcomes[Outcome.DISPATCHED],
        "rejected": {o.reason: outcomes[o] for o in _REJECTED},
        "evicted": {o.reason: outcomes[o] for o in _EVICTED},
        "errors": errors,
        "unfinished": unfinished,
    }


def _sum_columns(rows: Iterable[Sequence[int]], width: int) -> list[int]:
    out = [0] * width
    for row in rows:
        for i, v in enumerate(row):
            out[i] += v
    return out


# ---------------------------------------------------------------------------------------- one run


def run_figures(record: RunRecord, scenario: Scenario, meta: dict[str, Any]) -> dict[str, Any]:
    """Every figure of one run, as a JSON-ready dict."""
    results = record.results
    workload = scenario.workload
    config = scenario.server
    window = record.window
    instances = expand_flows(workload)
    n_flows = len(instances)
    resolve = band_index(config)
    band_of = np.array([resolve(i.spec.priority) for i in instances], dtype=np.int32)
    weight_of = flow_weights(scenario)
    weights = [weight_of[i.id] for i in instances]
    submitted = [sum(r.flows_submitted[f] for r in results) for f in range(n_flows)]
    outcomes = [_sum_columns((r.flows_outcomes[f] for r in results), len(Outcome)) for f in range(n_flows)]
    unfinished = [sum(r.flows_unfinished[f] for r in results) for f in range(n_flows)]
    errors = [sum(r.flows_errors[f] for r in results) for f in range(n_flows)]
    win = [[sum(r.window[f][k] for r in results) for k in range(6)] for f in range(n_flows)]
    total_out = _sum_columns(outcomes, len(Outcome))
    totals = _counts(total_out, sum(submitted), sum(unfinished), sum(errors))
    accounted = sum(total_out) + totals["errors"] + totals["unfinished"]
    answered = sum(r.answered_in_window for r in results)
    dispatched_w = sum(r.dispatched_in_window for r in results)
    log = merged_log(results)
    truncated = any(r.log_truncated for r in results)
    warnings: list[str] = []

    # bands, groups, flows
    shares: list[float | None] = [None] * n_flows
    fairs: list[float | None] = [None] * n_flows
    bands: list[dict[str, Any]] = []
    inversions = apparent_inversions(log, band_of, len(config.bands), (workload.warmup, workload.duration),
                                     INVERSION_TOL) if not truncated else [0] * len(config.bands)
    refs, verdicts, ordering = _reference(scenario, log, win, band_of, weights, instances, truncated)
    # demand for the share / fair columns: the reference's (a backlog queued before the window included)
    unit_k = {"requests": 0, "bytes": 1, "cost": 2}
    arrived = [win[f][3 + unit_k[UNITS[config.bands[int(band_of[f])].fairness]]] for f in range(n_flows)]
    demand = window_demands(arrived, refs, workload.duration - workload.warmup)
    for b, bc in enumerate(config.bands):
        members = [f for f in range(n_flows) if band_of[f] == b]
        unit = UNITS[bc.fairness]
        k = {"requests": 0, "bytes": 1, "cost": 2}[unit]
        s, fs, jain = fair_shares([win[f][k] for f in members], [demand[f] for f in members],
                                  [weights[f] for f in members])
        if refs is not None:  # Jain over measured / allocation of the intrinsic-demand reference
            ratios_b = [refs[f].measured / refs[f].allocation for f in members if refs[f].allocation > 0]
            jain = jain_index(ratios_b) if ratios_b else None
        for f, a, c in zip(members, s, fs, strict=True):
            shares[f], fairs[f] = a, c
        diff = pairs = None
        if not truncated and len(members) > 1:
            diff = service_difference(log, np.array(members, dtype=np.int32), {f: weights[f] for f in members}, unit,
                                      (workload.warmup, workload.duration))
            pairs = pairwise_difference(log, np.array(members, dtype=np.int32), {f: weights[f] for f in members},
                                        unit, (workload.warmup, workload.duration))
        band_out = _sum_columns((outcomes[f] for f in members), len(Outcome))
        bands.append({
            "priority": bc.priority, "name": bc.name, "fairness": bc.fairness, "unit": unit, "flows": len(members),
            "counts": _counts(band_out, sum(submitted[f] for f in members), sum(unfinished[f] for f in members),
                              sum(errors[f] for f in members)),
            "dispatches_per_s": _r(sum(win[f][0] for f in members) / window),
            "wait_ms": latency_figures(_merged(results, f"wait:{b}"), 1e-6),
            "wait_hist_ns": _merged(results, f"wait:{b}").to_dict(),
            "latency_us": latency_figures(_merged(results, f"latency:{b}")),
            "jain": _r(jain, 4), "max_service_diff": _r(diff),
            "apparent_inversions": inversions[b] if not truncated else None,
            "service_diff": _r(pairs),
            "reference": None if verdicts is None else msgspec.to_builtins(verdicts[b]),
            "overtaken": ordering[b],
        })
    groups = _groups(instances, submitted, outcomes, unfinished, errors, win, shares, fairs,
                     None if truncated else log, band_of, config)
    flows = [
        {"id": inst.id, "group": inst.spec.id, "band": config.bands[int(band_of[f])].name, "weight": weights[f],
         "counts": _counts(outcomes[f], submitted[f], unfinished[f], errors[f]),
         "window": {"served": win[f][:3], "offered": win[f][3:]},
         "share": _r(shares[f], 6), "fair_share": _r(fairs[f], 6), **_ref_fields(refs, f)}
        for f, inst in enumerate(instances)
    ]
    ratios = [s / f for s, f in zip(shares, fairs, strict=True) if s is not None and f]
    if refs is not None:
        ratios = [r.measured / r.allocation for r in refs if r.allocation > 0]
    all_jain = bands[0]["jain"] if len(bands) == 1 else _jain_all(ratios)

    answered_latency = _merged(results, "latency")
    lag = _merged(results, "lag")
    sent = sum(r.sent_in_window for r in results)
    unanswered = sum(r.unanswered_in_window for r in results)
    latency, youngest = latency_with_unanswered(log, answered_latency, workload.warmup, workload.duration, unanswered)
    cpu = _cpu(record, sent, warnings, {f"loadgen{r.index}": r.spun_window for r in results})
    open_loop = offered_rate(scenario) > 0
    if open_loop and lag.count and lag.percentile(0.99) > LATE * 1e9:
        warnings.append(f"the generator sent late: send lag p99 {lag.percentile(0.99) / 1e6:.2f} ms "
                        "(latency is measured from the intended send time, so it includes this)")
    if accounted != totals["submitted"]:
        warnings.append(f"outcomes do not add up: {accounted} accounted for, {totals['submitted']} submitted")
    if totals["errors"]:
        warnings.append(f"{totals['errors']} requests were refused as errors")
    warnings += [f"load generator {r.index}: {note}" for r in results for note in r.errors]
    if unanswered:
        # the answered-only percentiles would be survivors' figures: the unanswered count at their age
        warnings.append(f"{unanswered} request{'s' if unanswered != 1 else ''} sent in the window "
                        f"{'were' if unanswered != 1 else 'was'} still unanswered at the end (row "
                        f"'{UNANSWERED_ROW[0]}'): the latency percentiles count each at its age then, a lower bound "
                        "of its latency, and print a percentile that may fall among them as '≥ X'")
    if truncated:
        warnings.append("the per-request log was truncated: service difference, inversions and per-flow waits "
                        "not computed")
    pool_waits = sum(r.pool_waits for r in results)
    unsent = sum(r.unsent for r in results)
    never = (f"{unsent} HTTP admissions were still waiting for a connection when the run ended: never sent, "
             "counted unfinished but not in the fairness figures (the service never saw them)") if unsent else ""
    if not pool_waits and never:
        warnings.append(never)
    refused = sum(r.refused for r in results)
    if pool_waits:
        never = f"; {never[0].lower()}{never[1:]}" if never else ""
        least, most = min(r.max_conns for r in results), max(r.max_conns for r in results)
        bound = ("the service's max_connections: it refused more" if refused
                 else "--max-conns, within the descriptor limit")
        per = f"at most {most} a process" if least == most else f"at most {least} to {most} a process"
        warnings.append(f"{pool_waits} HTTP admissions found every one of a generator's connections busy ({per}: "
                        f"{bound}) and waited for an answer to free one"
                        f"{'' if refused else ' (raise --max-conns)'}{never}; the reference verdict compares the "
                        "service with what the flows offered, which the generator sent late: it judges the "
                        "generator's connections too")
    connect_wait_most = max((r.connect_wait_most for r in results), default=0.0)
    if connect_wait_most > CONNECT_WAIT_WARN:
        warnings.append(f"{sum(r.connect_waits for r in results)} HTTP admissions waited for a connection to open "
                        f"(the longest {connect_wait_most * 1e3:,.0f} ms): sent late by that, which the latency "
                        "counts and the fairness figures do not (they start at the send)")
    if refused:
        warnings.append(f"the service refused {refused} of the generator's HTTP connections (past its "
                        "max_connections): their admissions were sent again on the others, which the generator "
                        "kept to (--max-conns at most its share of that limit avoids the refusals)")
    warnings += record.problems
    stats = record.stats or {}
    mismatch = config_mismatch(config, stats)
    if mismatch:
        warnings.append(f"the service's configuration is not the scenario's [server] ({mismatch}): its bands "
                        "are labelled, and its fairness judged, by the scenario's (a --target keeps its own)")
    one_unit = len({b["unit"] for b in bands}) == 1  # (the bands' figures compare only then)
    return {
        **meta,
        "window_s": window,
        "warmup_s": workload.warmup,
        "wall_start": record.wall_start,
        "offered_per_s": _r(offered_rate(scenario)),
        "closed_clients": closed_clients(scenario),
        "counts": totals,
        "consistent": accounted == totals["submitted"],
        "inflight_at_end": sum(r.inflight_at_end for r in results),
        "throughput": {"dispatches_per_s": _r(dispatched_w / window, 1), "answered_per_s": _r(answered / window, 1),
                       "sent_per_s": _r(sent / window, 1)},
        # every request intended in the window, the unanswered at their age at the end (lower bounds)
        "latency_us": bounded_latency_figures(latency, youngest, unanswered),
        "latency_answered_us": latency_figures(answered_latency),  # the answered ones only (survivors)
        "unanswered_in_window": unanswered,  # intended in the window, no answer by the end: the table's row
        "rtt_us": latency_figures(_merged(results, "rtt")),
        "send_lag_us": latency_figures(lag),
        "bands": bands,
        "groups": groups,
        "flows": flows,
        "fairness": {"jain": all_jain, "max_service_diff": _max_or_none(b["max_service_diff"] for b in bands)
                     if one_unit else None,
                     # the VTC paper's figure, the audit's (a review: the summary showed only the older one,
                     # 7 where the pairwise figure was 12 at 2-8 shards)
                     "service_diff": _max_or_none(b["service_diff"] for b in bands) if one_unit else None,
                     "service_diff_unit": bands[0]["unit"] if one_unit else "mixed",
                     "apparent_inversions": None if truncated else sum(inversions),
                     "fair": None if verdicts is None else _all_fair(verdicts),
                     "max_ref_error": _max_or_none(None if b["reference"] is None else b["reference"]["max_error"]
                                                   for b in bands),
                     "overtaken": _max_or_none(b["overtaken"] for b in bands),
                     "inversion_tolerance_s": INVERSION_TOL},
        "cpu": cpu,
        "generator": {
            "processes": len(results), "precise_timer": all(r.precise_timer for r in results),
            "spun_s": _r(sum(r.spun for r in results)), "pool_waits": pool_waits,
            "connections": sum(r.most_conns for r in results), "released": sum(r.released for r in results),
            "release_failed": sum(r.release_failed for r in results), "log_rows": sum(r.log_rows for r in results),
        },
        "projection": cpu.get("projection"),
        "timeline": _timeline(log, instances, workload.duration),
        "latency_hist_ns": latency.to_dict(),  # as latency_us: the unanswered at their age
        "latency_answered_hist_ns": answered_latency.to_dict(),
        "server": _server_stats(stats, since_start=meta.get("kind") == "target"),
        "warnings": warnings,
    }


def latency_with_unanswered(log: dict[str, np.ndarray], answered: Histogram, warmup: float, duration: float,
                            unanswered: int) -> tuple[Histogram, int | None]:
    """The latency of every request intended in the window: the answered ones' (`answered`), and each one
    still unanswered at the end at its age then (intended send to the end of the run: a lower bound of its
    latency). Returns the histogram and the youngest unanswered one's age in ns (None if all were answered):
    a percentile at or above that age may fall among the unanswered, so it is only a lower bound. If the
    log lacks some of the `unanswered` (truncated), those count at age 0 (still a lower bound), so every
    percentile is one."""
    out = Histogram.from_dict(answered.to_dict())
    rows = np.isin(log["outcome"], (UNFINISHED, UNSENT)) & (log["intended"] >= warmup) & (log["intended"] < duration)
    ages = np.maximum((log["done"][rows] - log["intended"][rows]) * 1e9, 0).astype(np.int64)
    for age in ages.tolist():
        out.record(int(age))
    missing = unanswered - len(ages)
    if missing > 0:
        out.record(0, missing)
    if unanswered <= 0 and len(ages) == 0:
        return out, None
    return out, 0 if missing > 0 or len(ages) == 0 else int(ages.min())


def bounded_latency_figures(h: Histogram, youngest_unanswered_ns: int | None, unanswered: int) -> dict[str, Any]:
    """latency_figures of `h` (all requests of the window) with `unanswered` (how many of them were
    unanswered) and `lower_bounds`: the figures that may fall among the unanswered (at or above the
    youngest one's age), so are only lower bounds (the table prints them as "≥ X")."""
    figures = latency_figures(h)
    lower: list[str] = []
    if youngest_unanswered_ns is not None and h.count:
        values = dict(zip(("p50", "p90", "p99", "p999"), h.percentiles(QUANTILES), strict=True))
        values["max"] = h.max
        lower = [k for k, v in values.items() if v >= youngest_unanswered_ns]
        lower += ["mean"]  # the unanswered pull it up by at least their ages
    return {**figures, "unanswered": unanswered, "lower_bounds": lower}


TIMELINE_SERIES = 12


def _timeline(log: dict[str, np.ndarray], instances: Sequence[Any], duration: float) -> dict[str, Any]:
    """Dispatches/s over time per flow (up to 12 flows) or per flow entry, the busiest first, for plots."""
    bin_s = max(0.1, duration / 60)
    bins = math.ceil(duration / bin_s)
    per_flow = len(instances) <= TIMELINE_SERIES
    names = [i.id if per_flow else i.spec.id for i in instances]
    rows = log["outcome"] == 0
    series: dict[str, np.ndarray] = {}
    if rows.any():
        flow = log["flow"][rows]
        idx = np.clip((log["done"][rows] / bin_s).astype(np.int64), 0, bins - 1)
        for name in dict.fromkeys(names):
            members = [f for f, n in enumerate(names) if n == name]
            mask = np.isin(flow, members)
            series[name] = np.bincount(idx[mask], minlength=bins) / bin_s
    top = sorted(series, key=lambda n: -float(series[n].sum()))[:TIMELINE_SERIES]
    return {"bin_s": bin_s, "unit": "dispatches/s", "by": "flow" if per_flow else "group",
            "series": {n: [round(float(x), 1) for x in series[n]] for n in top}}


def config_mismatch(config: Any, stats: dict[str, Any]) -> str:
    """What differs between the scenario's `[server]` and the service's own (its `/v1/stats`): the budget
    and the bands' priorities and policies; "" when they agree or the stats are not there (echo)."""
    totals, bands = stats.get("totals"), stats.get("bands")
    if not totals or not bands:
        return ""
    out = []
    for key, mine in (("max_inflight_requests", config.budget.max_inflight_requests),
                      ("max_inflight_bytes", config.budget.max_inflight_bytes)):
        if key in totals and totals[key] != mine:
            out.append(f"{key} {_limit_text(totals[key])}, the scenario's {_limit_text(mine)}")
    theirs = [(b.get("priority"), b.get("fairness"), b.get("ordering")) for b in bands]
    mine_bands = [(b.priority, b.fairness, b.ordering) for b in config.bands]
    if theirs != mine_bands:
        def show(rows: list[tuple[Any, Any, Any]]) -> str:
            return ", ".join(f"{p} {f}/{o}" for p, f, o in rows)
        out.append(f"bands {show(theirs)}, the scenario's {show(mine_bands)}")
    return "; ".join(out)


def _limit_text(value: Any) -> str:
    return "unlimited" if value is None else str(value)


def _reference(
    scenario: Scenario, log: dict[str, np.ndarray], win: list[list[float]], band_of: np.ndarray,
    weights: list[float], instances: Sequence[Any], truncated: bool,
) -> tuple[list[FlowRef] | None, list[Verdict] | None, list[float | None]]:
    """The intrinsic-demand reference (flowshard.reference) of every flow and the verdict of every band,
    and the fraction of each band's dispatches that overtook an earlier request of their flow. All
    need the whole per-request log: None when it was truncated."""
    bands = scenario.server.bands
    workload = scenario.workload
    if truncated:
        return None, None, [None] * len(bands)
    window = (workload.warmup, workload.duration)
    unit_of_band = [UNITS[bc.fairness] for bc in bands]
    n = len(instances)
    unit_of_flow = [unit_of_band[int(band_of[f])] for f in range(n)]
    k = {"requests": 0, "bytes": 1, "cost": 2}
    holds = slot_holds(log, n)
    # closed-loop flows: their clients' measured cycles, less their waits at the service, are their demand
    specs = [i.spec for i in instances]
    clients = [s.arrival.concurrency if isinstance(s.arrival, Closed) else 0 for s in specs]
    active = [(max(s.start, window[0]), min(s.stop if s.stop is not None else window[1], window[1])) for s in specs]
    gap_of: dict[int, float] = {}  # (flows of one entry share their spec)
    for s in specs:
        if id(s) not in gap_of:
            gap_of[id(s)] = failed_gap(s)
    gaps = [gap_of[id(s)] for s in specs]
    refs, verdicts = judge(
        scenario, unit_of_band, [int(b) for b in band_of], [i.id for i in instances], [i.spec for i in instances],
        weights, offered_segments(log, n, unit_of_flow, segments(scenario)),
        [win[f][k[unit_of_flow[f]]] for f in range(n)], busy(log, n, window, holds),
        overhead=round_trips(log, n), hold=holds,
        blocked=blocked_by_higher(log, band_of, [bc.ceiling for bc in bands], window),
        cycle=closed_cycles(log, clients, active, gaps),
    )
    return refs, verdicts, overtaken(log, band_of, len(bands), window)


def _ref_fields(refs: list[FlowRef] | None, f: int) -> dict[str, float | None]:
    if refs is None:
        return {"demand": None, "allocation": None, "measured": None, "error": None}
    r = refs[f]
    err = None if r.allocation <= 0 else (r.measured - r.allocation) / r.allocation
    return {"demand": _r(r.demand, 6), "allocation": _r(r.allocation, 6), "measured": _r(r.measured, 6),
            "error": _r(err, 6)}


def _all_fair(verdicts: Sequence[Verdict]) -> bool | None:
    judged = [v.fair for v in verdicts if v.fair is not None]
    return all(judged) if judged else None


def _jain_all(ratios: list[float]) -> float | None:
    return _r(jain_index(ratios), 4) if ratios else None


def _max_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _groups(
    instances: Sequence[Any], submitted: list[int], outcomes: list[list[int]], unfinished: list[int],
    errors: list[int], win: list[list[float]], shares: list[float | None], fairs: list[float | None],
    log: dict[str, np.ndarray] | None, band_of: np.ndarray, config: Any,
) -> list[dict[str, Any]]:
    """Per flow entry. Waits come from the per-request log; a truncated log (None) would describe only
    the start of the run, so then they are left out."""
    members: dict[str, list[int]] = {}
    for f, inst in enumerate(instances):
        members.setdefault(inst.spec.id, []).append(f)
    out = []
    for gid, fs in members.items():
        ratios = [s / f for s, f in ((shares[i], fairs[i]) for i in fs) if s is not None and f]
        waits: list[float] = []
        if log is not None:
            rows = (log["outcome"] == 0) & np.isin(log["flow"], fs)
            waits = sorted(log["wait"][rows].astype(np.float64).tolist())
        spec = instances[fs[0]].spec
        out.append({
            "id": gid, "flows": len(fs), "priority": spec.priority, "band": config.bands[int(band_of[fs[0]])].name,
            "counts": _counts(_sum_columns((outcomes[i] for i in fs), len(Outcome)), sum(submitted[i] for i in fs),
                              sum(unfinished[i] for i in fs), sum(errors[i] for i in fs)),
            "served": {"requests": sum(win[i][0] for i in fs), "bytes": sum(win[i][1] for i in fs),
                       "cost": sum(win[i][2] for i in fs)},
            "wait_ms": _sorted_figures(waits, 1e3),
            "share": _r(sum(shares[i] or 0.0 for i in fs), 6) if any(shares[i] is not None for i in fs) else None,
            "fair_share": _r(sum(fairs[i] or 0.0 for i in fs), 6) if any(fairs[i] is not None for i in fs) else None,
            "ratio_min": _r(min(ratios), 4) if ratios else None, "ratio_max": _r(max(ratios), 4) if ratios else None,
        })
    return out


def _sorted_figures(values: Sequence[float], scale: float) -> dict[str, float | None]:
    if len(values) == 0:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    return {"p50": _r(percentile(values, 0.5) * scale), "p90": _r(percentile(values, 0.9) * scale),
            "p99": _r(percentile(values, 0.99) * scale), "max": _r(float(values[-1]) * scale)}


def _kind(role: str) -> str:
    for prefix in ("worker", "loadgen", "acceptor"):
        if role.startswith(prefix):
            return prefix + "s"
    return role


COARSE_CPU_S = 1.0  # seconds of a process's CPU under which its tick-counted figure is said to be coarse


def _cpu(record: RunRecord, requests: int, warnings: list[str], spun: dict[str, float]) -> dict[str, Any]:
    """Per process and per kind: CPU seconds, utilisation, µs per request sent in the window, run-queue wait.

    Per request *sent*: each gets exactly one outcome in the end, and with a growing queue (deep
    queue) the service spends its CPU on admissions long before their outcomes come back.

    A generator's timer polling (`spun`, see bench.timer) is waiting, not load: its share of the
    window is left out of the generator's µs/request and utilisation, and reported as `spin_s`.
    """
    window = record.window
    per_req = 1e6 / requests if requests else math.nan
    processes: list[dict[str, Any]] = []
    kinds: dict[str, dict[str, float]] = {}
    for p, end in record.cpu_end.items():
        start = record.cpu_start.get(p)
        if start is None:
            continue
        raw = end.cpu - start.cpu
        spin = min(raw, spun.get(p.role, 0.0))
        cpu = raw - spin
        wait = end.runq_wait - start.runq_wait
        processes.append({"role": p.role, "pid": p.pid, "cpu_s": _r(cpu), "spin_s": _r(spin), "util": _r(cpu / window),
                          "us_per_req": _r(cpu * per_req), "runq_wait": _r(wait / window)})
        k = kinds.setdefault(_kind(p.role), {"cpu_s": 0.0, "processes": 0})
        k["cpu_s"] += cpu
        k["processes"] += 1
        if p.role.startswith("loadgen"):
            busy = cpu / window
            if busy >= SATURATED:
                warnings.append(f"load generator {p.role} was {busy:.0%} busy: it may have limited the load "
                                "(use --procs to add generator processes)")
    kind_figures = {k: {"processes": int(v["processes"]), "cpu_s": _r(v["cpu_s"]), "util": _r(v["cpu_s"] / window),
                        "us_per_req": _r(v["cpu_s"] * per_req)} for k, v in kinds.items()}
    ours = sum(v["cpu_s"] for v in kinds.values()) + sum(p["spin_s"] or 0.0 for p in processes)
    busy = record.machine_end.busy - record.machine_start.busy
    steal = record.machine_end.steal - record.machine_start.steal
    foreign = max(0.0, busy - ours) / window
    server_roles = {"distributor", "workers", "acceptors", "echo", "tracker"}
    # a --target's processes are not ours to read: no server cost, no projection from the generator alone
    measured_server = any(k in server_roles - {"tracker"} for k in kinds)
    if foreign > FOREIGN:
        warnings.append(
            f"other processes used {foreign:.2f} cores during the window: figures are disturbed" if measured_server
            else f"other processes, the --target service's own included, used {foreign:.2f} cores during the window"
        )
    if steal / window > FOREIGN:  # a shared VM: the host ran something else on our vCPUs
        warnings.append(f"the hypervisor took {steal / window:.2f} cores (steal) during the window: latencies "
                        "are inflated by waits for a CPU")
    # (those that matter to the projection: a tenth of the busiest server process's CPU or more)
    served = [p for p in processes if _kind(p["role"]) in server_roles - {"tracker"}]
    busiest = max((p["cpu_s"] or 0.0 for p in served), default=0.0)
    coarse = [p for p in served if 0.1 * busiest <= (p["cpu_s"] or 0.0) < COARSE_CPU_S and p["cpu_s"]]
    if coarse:  # (review 181: 0.04 s of CPU printed as "75.188 µs/req", read to ±25 %)
        least = min(p["cpu_s"] for p in coarse)
        warnings.append(f"{len(coarse)} server process(es) used under {COARSE_CPU_S:g} s of CPU in the window (the "
                        f"least {least:.2f} s): /proc counts CPU in {1000 / TICK:g} ms ticks, so their µs/request "
                        f"and the projection from them are within ±{100 / (least * TICK):.0f} % (a longer "
                        "--duration narrows it)")
    server_us = sum(v["cpu_s"] for k, v in kinds.items() if k in server_roles) * per_req
    costs = {p["role"]: p["us_per_req"] for p in processes
             if p["role"] not in ("bench", "tracker") and p["us_per_req"] is not None}
    return {
        "requests": requests,
        "processes": processes,
        "kinds": kind_figures,
        "server_us_per_req": _r(server_us) if measured_server else None,
        "machine": {"busy_cores": _r(busy / window), "ours_cores": _r(ours / window), "foreign_cores": _r(foreign),
                    "steal_cores": _r(steal / window)},
        "projection": project_all(costs) if measured_server and requests else None,
    }


def _server_stats(stats: dict[str, Any], since_start: bool) -> dict[str, Any] | None:
    """The service's own counters after the run. For a `--target` they count since that service
    started (other runs and other clients included), not this run alone."""
    if not stats:
        return None
    totals = stats.get("totals", {})
    return {
        "since_service_start": since_start,
        "dispatched": totals.get("dispatched"),
        "fast_path_dispatched": totals.get("fast_path_dispatched"),
        "per_shard_dispatched": [s.get("dispatched") for s in stats.get("shards", [])],
        "restarts": sum(s.get("restarts", 0) for s in stats.get("shards", [])),
        "consistent": stats.get("consistent"),
        "bands": [{"name": b.get("name"), "outcomes": b.get("outcomes")} for b in stats.get("bands", [])],
        "counters": stats.get("counters"),
        # counted by the service from its own dispatch decisions (None: a service that does not count them)
        "priority_inversions": _band_sum(stats, "priority_inversions"),
        "grants_narrowed": _band_sum(stats, "grants_narrowed"),
    }


def _band_sum(stats: dict[str, Any], key: str) -> int | None:
    values = [b.get(key) for b in stats.get("bands", [])]
    return sum(values) if values and all(isinstance(v, int) for v in values) else None


# ---------------------------------------------------------------------------------------- projection


def project(costs: dict[str, float], cores: int, spread: Iterable[str] = ()) -> tuple[float, str]:
    """(requests/s, bottleneck) for processes with these CPU µs per request on `cores` cores.

    Each process is one thread: at most one core, 1e6 / cost requests/s. All together share the
    cores: at most cores * 1e6 / sum(costs). Processes named in `spread` (the generator) can be
    split over more processes, so they only count towards the shared term.
    """
    if cores < 1:
        raise ValueError("cores must be at least 1")
    total = sum(costs.values())
    if total <= 0:
        return math.inf, "none"
    shared = cores * 1e6 / total
    single = {role: c for role, c in costs.items() if role not in set(spread) and c > 0}
    if single:
        worst = max(single, key=lambda r: single[r])
        one = 1e6 / single[worst]
        if one <= shared:
            return one, worst
    return shared, f"all {cores} cores"


def project_all(costs: dict[str, float]) -> dict[str, Any]:
    """The projection for PROJECT_CORES, with the generator on the same cores and without it."""
    gens = [r for r in costs if r.startswith("loadgen")]
    service = {r: c for r, c in costs.items() if r not in gens}
    out: dict[str, Any] = {"costs_us": costs, "with_generator": {}, "service_only": {}}
    for c in PROJECT_CORES:
        rate, neck = project(costs, c, spread=gens)
        out["with_generator"][str(c)] = {"per_s": _r(rate, 0), "bottleneck": neck}
        if service:
            rate, neck = project(service, c)
            out["service_only"][str(c)] = {"per_s": _r(rate, 0), "bottleneck": neck}
    return out


# ---------------------------------------------------------------------------------------- many runs

# (label, getter) of the figures the tables show; every getter returns a number or None
Getter = Callable[[dict[str, Any]], float | None]


def _path(*keys: str | int) -> Getter:
    def get(d: dict[str, Any]) -> float | None:
        cur: Any = d
        for k in keys:
            if cur is None:
                return None
            try:
                cur = cur[k]
            except (KeyError, IndexError, TypeError):
                return None
        return cur if isinstance(cur, int | float) and not isinstance(cur, bool) else None

    return get


def _kind_us(kind: str) -> Getter:
    return _path("cpu", "kinds", kind, "us_per_req")


def _kind_util(kind: str) -> Getter:
    return _path("cpu", "kinds", kind, "util")


# outcomes of the whole run by reason; a reason that occurred in no run is left out of the tables
OUTCOME_ROWS: list[tuple[str, Getter]] = [
    *((f"{o.status}:{o.reason}", _path("counts", o.status, o.reason)) for o in (*_REJECTED, *_EVICTED)),
    ("errors", _path("counts", "errors")),
    ("unfinished", _path("counts", "unfinished")),
]
# requests intended in the window and still unanswered at the end (the same figure as the warning about
# them): the latency rows count them at their age then, and mark a percentile among them "≥"
UNANSWERED_ROW = ("unanswered (sent in window)", _path("unanswered_in_window"))
# latency rows that are lower bounds in a run whose latency_us lists the key in lower_bounds
LOWER_BOUND_KEYS = {"latency p50 µs": "p50", "latency p90 µs": "p90", "latency p99 µs": "p99",
                    "latency p99.9 µs": "p999"}
_OPTIONAL = {label for label, _ in (*OUTCOME_ROWS, UNANSWERED_ROW)}

METRICS: list[tuple[str, Getter]] = [
    ("submitted", _path("counts", "submitted")),
    ("dispatched", _path("counts", "dispatched")),
    *OUTCOME_ROWS,
    ("dispatches/s", _path("throughput", "dispatches_per_s")),
    ("answered/s", _path("throughput", "answered_per_s")),
    ("latency p50 µs", _path("latency_us", "p50")),
    ("latency p90 µs", _path("latency_us", "p90")),
    ("latency p99 µs", _path("latency_us", "p99")),
    ("latency p99.9 µs", _path("latency_us", "p999")),
    UNANSWERED_ROW,
    ("rtt p50 µs (from send)", _path("rtt_us", "p50")),
    ("rtt p99 µs (from send)", _path("rtt_us", "p99")),
    ("send lag p99 µs", _path("send_lag_us", "p99")),
    ("server CPU µs/req", _path("cpu", "server_us_per_req")),
    ("distributor µs/req", _kind_us("distributor")),
    ("workers µs/req (sum)", _kind_us("workers")),
    ("acceptors µs/req (sum)", _kind_us("acceptors")),
    ("echo µs/req", _kind_us("echo")),
    ("loadgen µs/req", _kind_us("loadgens")),
    ("distributor util", _kind_util("distributor")),
    ("workers util (sum)", _kind_util("workers")),
    ("acceptors util (sum)", _kind_util("acceptors")),
    ("loadgen util", _kind_util("loadgens")),
    ("other processes (cores)", _path("cpu", "machine", "foreign_cores")),
    ("steal (cores)", _path("cpu", "machine", "steal_cores")),
    ("Jain (measured/allocation)", _path("fairness", "jain")),
    ("service diff, pairwise (band unit)", _path("fairness", "service_diff")),
    ("max service diff (band unit)", _path("fairness", "max_service_diff")),
    ("apparent inversions", _path("fairness", "apparent_inversions")),
    ("priority inversions (service)", _path("server", "priority_inversions")),
    ("grants narrowed (service)", _path("server", "grants_narrowed")),
    ("max ref error (worst band)", _path("fairness", "max_ref_error")),
    ("overtaken (worst band)", _path("fairness", "overtaken")),
]


# figures that count requests: whole numbers in every table
COUNT_ROWS = {
    "submitted", "dispatched", "apparent inversions", "priority inversions (service)", "grants narrowed (service)",
    *_OPTIONAL,
}


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """min/median/max over runs of every METRICS figure (absent figures, and outcome reasons that
    never occurred, are left out)."""
    out: dict[str, dict[str, float | None]] = {}
    for label, get in METRICS:
        values = [v for v in (get(r) for r in runs) if v is not None]
        if values and not (label in _OPTIONAL and not any(values)):
            # a count's median is one of the runs' counts (the lower middle one), so it stays a whole number
            median = statistics.median_low(values) if label in COUNT_ROWS else statistics.median(values)
            out[label] = {"min": min(values), "median": median, "max": max(values), "n": len(values)}
            key = LOWER_BOUND_KEYS.get(label)
            if key and any(key in ((r.get("latency_us") or {}).get("lower_bounds") or ()) for r in runs):
                out[label]["lower_bound"] = True  # some run's figure counts unanswered requests at their age
    return out


def median_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median dispatch rate (for per-band and per-group detail)."""
    ordered = sorted(runs, key=lambda r: r["throughput"]["dispatches_per_s"] or 0.0)
    return ordered[(len(ordered) - 1) // 2]


# ---------------------------------------------------------------------------------------- tables


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):  # a count: all its digits, never "12.0"
        return f"{value:,}"
    a = abs(value)
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}" if value else "0"


def cell(stat: dict[str, float | None] | None) -> str:
    if not stat:
        return "-"
    mark = "≥ " if stat.get("lower_bound") else ""  # falls among requests still unanswered at the end
    if stat.get("n", 1) == 1 or stat["min"] == stat["max"]:
        return mark + fmt(stat["median"])
    return f"{mark}{fmt(stat['median'])} ({fmt(stat['min'])}–{fmt(stat['max'])})"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for n, row in enumerate([header, *rows]):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                                   strict=True))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return [line.rstrip() for line in lines]


def render_config(label: str, runs: Sequence[dict[str, Any]]) -> str:
    """One configuration (a shard count, or the echo baseline): its figures over runs, then detail."""
    agg = aggregate(runs)
    lines = [f"== {label}: {len(runs)} run(s), median (min–max)"]
    lines += table(["figure", "value"], [[k, cell(v)] for k, v in agg.items()])
    if any(v.get("lower_bound") for v in agg.values()):
        lines.append("(≥: latency counts every request sent in the window, one still unanswered at the end at its "
                     "age then; this percentile may fall among those, so it is a lower bound)")
    mid = median_run(runs)
    if len(mid["bands"]) > 1 or len(mid["groups"]) > 1:
        lines.append("")
        lines += _band_lines(mid)
        lines.append("")
        lines += _group_lines(mid)
    else:
        lines += _reference_lines(mid)
    costs = median_costs(runs)
    if costs:
        lines.append("")
        lines.append(f"CPU µs/request by process ({'median over the runs' if len(runs) > 1 else 'the run'}): "
                     + ", ".join(f"{role} {fmt(c)}" for role, c in costs.items()))
    lines += [f"warning: {w}" for w in _warnings_once(runs)]
    return "\n".join(lines)


def _warnings_once(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Each kind of warning once for a configuration's runs (review 167: 27 lines for 3 configurations of
    3 runs, the same warnings with each run's own figures): in how many runs a warning alike but for its
    figures came up, with the worst run's words (`_figures`)."""
    kinds: dict[str, list[str]] = {}  # a kind: its words alike but for their figures (not whose they are)
    for r in runs:
        seen: set[str] = set()
        for w in r["warnings"]:
            kind = _WHOSE.sub(lambda m: m.group(1) or "#", w)
            if kind not in seen:  # (a run's warnings alike but for their figures: its first)
                seen.add(kind)
                kinds.setdefault(kind, []).append(w)
    out = []
    for said in kinds.values():
        if len(said) == 1:
            out.append(said[0])
        elif len(set(said)) == 1:
            out.append(f"{said[0]} (in {len(said)} of {len(runs)} runs)")
        else:
            worst = max(said, key=_figures)
            out.append(f"{worst} (in {len(said)} of {len(runs)} runs; the figures of the worst)")
    return sorted(out)


# Figures in a warning, but not those that name whose it is (a generator, a process, a worker, a shard):
# those stay, so that generator 1's warning is not taken for generator 0's (a review)
_WHOSE = re.compile(r"((?:load generator |loadgen|worker|acceptor|pid |shard |shards=)\d+)|\d[\d.,]*")
_FIGURE = re.compile(r"\d[\d,]*(?:\.\d+)?")


def _figures(warning: str) -> tuple[float, ...]:
    """A warning's figures, but those that name whose it is: the worst of warnings alike is the one
    whose first figure that differs is the largest."""
    out = []
    for m in _WHOSE.finditer(warning):
        if not m.group(1) and (figure := _FIGURE.match(m.group(0))):
            out.append(float(figure.group(0).replace(",", "")))
    return tuple(out)


def _band_lines(run: dict[str, Any]) -> list[str]:
    rows = []
    for b in run["bands"]:
        c = b["counts"]
        rows.append([b["name"], str(b["priority"]), b["fairness"], str(c["submitted"]), str(c["dispatched"]),
                     str(sum(c["rejected"].values())), str(sum(c["evicted"].values())), str(c["unfinished"]),
                     fmt(b["dispatches_per_s"]), fmt(b["wait_ms"]["p50"]), fmt(b["wait_ms"]["p99"]),
                     fmt(b["jain"]), pct(None if b["reference"] is None else b["reference"]["max_error"]),
                     fmt(b["max_service_diff"]), fmt(b["service_diff"]), pct(b["overtaken"]),
                     fmt(b["apparent_inversions"])])
    lines = table(["band", "prio", "fairness", "submitted", "dispatched", "rejected", "evicted", "unfinished",
                   "disp/s", "wait p50 ms", "p99", "jain", "max ref err", "svc diff", "pairwise", "overtaken",
                   "inversions?"], rows)
    return lines + _reference_lines(run)


def _reference_lines(run: dict[str, Any]) -> list[str]:
    """Each band's verdict against the intrinsic-demand reference (median run)."""
    return [reference_line(b["name"], b["fairness"], b["unit"], msgspec.convert(b["reference"], Verdict))
            for b in run["bands"] if b["reference"] is not None]


def _group_lines(run: dict[str, Any]) -> list[str]:
    rows = []
    for g in run["groups"]:
        c = g["counts"]
        ratio = "-" if g["ratio_min"] is None else f"{g['ratio_min']:.3f}..{g['ratio_max']:.3f}"
        rows.append([g["id"], str(g["flows"]), str(c["submitted"]), str(c["dispatched"]),
                     str(sum(c["rejected"].values())), str(sum(c["evicted"].values())), fmt(g["wait_ms"]["p50"]),
                     fmt(g["wait_ms"]["p99"]), pct(g["share"]), pct(g["fair_share"]), ratio])
    return table(["flow", "flows", "submitted", "dispatched", "rejected", "evicted", "wait p50 ms", "p99", "share",
                  "fair", "ratio min..max"], rows)


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def render_comparison(configs: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> str:
    """Every figure side by side across configurations."""
    labels = [label for label, _ in configs]
    aggs = {label: aggregate(runs) for label, runs in configs}
    figures = [m for m, _ in METRICS if any(m in a for a in aggs.values())]
    rows = [[m, *(cell(aggs[label].get(m)) for label in labels)] for m in figures]
    lines = ["== comparison: median (min–max) over runs", *table(["figure", *labels], rows)]
    return "\n".join(lines)


def projection_ratios(configs: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> list[list[float]]:
    """Per configuration after the first, per C in PROJECT_CORES: its projected service-only rate over
    the first configuration's, run by run (the k-th run of each against the k-th of the first). The
    runs alternate the configurations, so the k-th runs met the machine alike: a ratio per run takes
    its drift out (±30 % here), where a ratio of medians mixes it in."""
    if len(configs) < 2:
        return []
    base = configs[0][1]
    out = []
    for _, runs in configs[1:]:
        for c in PROJECT_CORES:
            rate = _path("projection", "service_only", str(c), "per_s")
            out.append([b / a for first, run in zip(base, runs, strict=False)
                        if (a := rate(first)) and (b := rate(run)) is not None])
    return out


def render_projection_ratios(configs: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> str:
    """`projection_ratios` as a table: median (min–max) of the runs' ratios."""
    ratios = projection_ratios(configs)
    if not any(ratios):
        return ""
    base = configs[0][0]
    rows = []
    for i, (label, _) in enumerate(configs[1:]):
        cells = []
        for values in ratios[i * len(PROJECT_CORES):(i + 1) * len(PROJECT_CORES)]:
            ordered = sorted(values)
            cells.append(cell({"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
                               "n": len(ordered)}) if ordered else "-")
        rows.append([f"{label} / {base}", *cells])
    return "\n".join([f"== projection (service only) against {base}, run by run: median (min–max) of each run's "
                      "ratio to the same round's run of it", *table(["ratio", *(f"{c} cores" for c in PROJECT_CORES)],
                                                                    rows)])


def median_costs(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Each process's CPU µs/request, the median over the runs that measured it: what the projection of
    several runs is made from, so that it agrees with the medians the tables print (review 181: from
    the median run's alone, with 2 runs the slower one's, 8 shards read 0.71× of one where the medians
    printed above gave 0.83×)."""
    per_role: dict[str, list[float]] = {}
    for run in runs:
        proj = run.get("projection")
        for role, cost in (proj["costs_us"] if proj else {}).items():
            per_role.setdefault(role, []).append(cost)
    return {role: statistics.median(costs) for role, costs in per_role.items()}


def render_projection(configs: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> str:
    """Projected requests/s on C cores from each configuration's per-process CPU costs, each the median
    over its runs (`median_costs`)."""
    rows = []
    for label, runs in configs:
        costs = median_costs(runs)
        if not costs:
            continue
        proj = project_all(costs)
        for scope in ("with_generator", "service_only"):
            if not proj[scope]:
                continue
            cells = [f"{fmt(v['per_s'])} [{v['bottleneck']}]" for v in proj[scope].values()]
            rows.append([label, scope.replace("_", " "), *cells])
    if not rows:
        return ""
    header = ["configuration", "scope", *(f"{c} cores" for c in PROJECT_CORES)]
    return "\n".join(["== projection: requests/s on C cores [bottleneck], from each process's CPU µs/request "
                      "(the median over the runs)",
                      *table(header, rows)])

