"""Where a band's service difference comes from, recomputed from per-request records.

    python -m bench.servicediff RECORDS.jsonl [--scenario FILE] [--window FROM TO] [--burst-gap MS]

For each run in the records file (`flowshard bench --records`, `flowshard simulate --records`) and each
band, per pair of flows: the service difference as the VTC paper defines it (the largest
|W_f(t1, t2) - W_g(t1, t2)| over the intervals in which both were backlogged throughout: from the
arrival at the service to the dispatch, as `bench.fairness.pairwise_difference` takes it), the same
counted only between bursts of dispatches (a burst: dispatches of the band less than `--burst-gap`
apart; only intervals whose ends fall between bursts, so each burst counts whole and its order
inside is left out), and the longest run of one flow's
dispatches with none of the other's while both were backlogged (the difference's lower bound).

The band figure the bench reports (`pairwise`) is the largest pair's first figure. When the
difference between bursts is much smaller, the gap is the order in which the dispatches of a burst
were made: at N shards each shard's worker dispatches what a pass granted it as one block
(docs/architecture.md, "The service difference of backlogged flows across shards"). This is an
auditor's breakdown, not a replacement for the figure. Units and weights come from `--scenario`
(a flow's weight: its own `weight` in `[[workload.flows]]`, else `[server.weights]`), else from each
run's header (`units`, `weights`: the records of this release carry them), else bytes and weight 1;
the window is `--window`, else the header's `window` (the run's own, after the bench's `--warmup` and
`--duration`), else the scenario's (warmup, duration), else the whole run.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.fairness import backlogs_and_service, units
from flowshard import records
from flowshard.analysis import MAX_PAIRED_FLOWS, pairwise_service_difference
from flowshard.simulate import audit_header, read_scenario


def _joint(fa: tuple[np.ndarray, np.ndarray], ga: tuple[np.ndarray, np.ndarray]) -> list[tuple[float, float]]:
    """The intervals in which both flows were backlogged (both lists sorted and disjoint)."""
    out: list[tuple[float, float]] = []
    i = j = 0
    (fs, fe), (gs, ge) = fa, ga
    while i < len(fs) and j < len(gs):
        a, b = max(fs[i], gs[j]), min(fe[i], ge[j])
        if a <= b:
            out.append((float(a), float(b)))
        if fe[i] < ge[j]:
            i += 1
        else:
            j += 1
    return out


def between_bursts(joint: list[tuple[float, float]], starts: np.ndarray, ends: np.ndarray, net: np.ndarray) -> float:
    """The largest |W_f(t1, t2) - W_g(t1, t2)| over t1 < t2 of one joint interval that both fall between
    bursts (bursts sorted and disjoint, from `starts` to `ends`; `net`: each burst's units, +f -g). The
    value between bursts j-1 and j is the level after the first j bursts; that gap meets [a, b] when
    burst j starts after a and burst j-1 ends before b. A burst that holds the dispatch ending a
    flow's backlog is not counted whole: its order inside is what this figure leaves out."""
    level = np.concatenate([[0.0], np.cumsum(net)])  # level[j]: after the first j bursts
    best = 0.0
    for a, b in joint:
        lo, hi = np.searchsorted(starts, a, side="right"), np.searchsorted(ends, b, side="left")
        if hi > lo:
            values = level[lo : hi + 1]
            best = max(best, float(values.max() - values.min()))
    return best


def longest_run(joint: list[tuple[float, float]], at: np.ndarray, who: np.ndarray) -> int:
    """The most consecutive dispatches of one flow with none of the other's, inside a joint interval."""
    best = 0
    for a, b in joint:
        inside = who[(at >= a) & (at <= b)]
        if len(inside):
            cuts = np.flatnonzero(np.diff(inside) != 0)
            lengths = np.diff(np.concatenate([[-1], cuts, [len(inside) - 1]]))
            best = max(best, int(lengths.max()))
    return best


def breakdown(rows: Sequence[dict[str, Any]], *, unit_of: dict[str, str] | None = None,
              weights: dict[str, float] | None = None, window: tuple[float, float] | None = None,
              burst_gap: float = 0.005) -> dict[str, dict[str, dict[str, float]]]:
    """Per band, per pair "f/g": {"pairwise", "between_bursts", "longest_run"} (see the module). Bands of
    more than MAX_PAIRED_FLOWS flows are left out, as the bench leaves out their pairwise figure."""
    weights = weights or {}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for band in sorted({r["band"] for r in rows}):
        mine = [r for r in rows if r["band"] == band and not r["outcome"].startswith(("rejected", "error", "unsent"))]
        if not mine or len({r["flow"] for r in mine}) > MAX_PAIRED_FLOWS:  # as the bench: no pairs past that
            out[band] = {}
            continue
        lo, hi = window if window is not None else (min(r["arrival"] for r in mine), max(r["done"] for r in mine))
        unit = (unit_of or {}).get(band, "bytes")
        flow = np.array([r["flow"] for r in mine])
        start = np.array([r["arrival"] for r in mine], dtype=np.float64)
        disp = np.array([r["outcome"] == "dispatched" for r in mine])
        at = np.array([r["dispatch"] if r["outcome"] == "dispatched" else r["done"] for r in mine], dtype=np.float64)
        amount = units(unit, np.array([r["size"] for r in mine]), np.array([r["tokens"] for r in mine]))
        # bursts: the band's dispatches in the window, cut where the next is `burst_gap` or more later
        d_at = np.sort(at[disp & (at >= lo) & (at <= hi)])
        cut = np.diff(d_at) >= burst_gap
        starts, ends = d_at[np.insert(cut, 0, True)], d_at[np.append(cut, True)]
        backlog, served = backlogs_and_service(flow, start, at, disp, amount, weights, (lo, hi))
        pairs: dict[str, dict[str, float]] = {}
        names = sorted(backlog)
        for i, f in enumerate(names):
            for g in names[i + 1 :]:
                value = pairwise_service_difference({0: backlog[f], 1: backlog[g]}, {0: served[f], 1: served[g]})
                if value is None:
                    continue
                joint = _joint(backlog[f], backlog[g])
                t = np.concatenate([served[f][0], served[g][0]])
                u = np.concatenate([served[f][1], -served[g][1]])
                who = np.concatenate([np.zeros(len(served[f][0]), np.int8), np.ones(len(served[g][0]), np.int8)])
                order = np.argsort(t, kind="stable")
                t, u, who = t[order], u[order], who[order]
                net = np.bincount(np.searchsorted(ends, t, side="left"), weights=u, minlength=len(ends))
                pairs[f"{f}/{g}"] = {"pairwise": value, "between_bursts": between_bursts(joint, starts, ends, net),
                                     "longest_run": longest_run(joint, t, who)}
        out[band] = pairs
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.servicediff", description=__doc__.split("\n\n")[0])
    p.add_argument("records", help="a records file (flowshard bench/simulate --records)")
    p.add_argument("--scenario", help="the scenario it ran: band units, weights, the window")
    p.add_argument("--window", type=float, nargs=2, metavar=("FROM", "TO"),
                   help="seconds from the start of each run (the bench: --warmup and --duration)")
    p.add_argument("--burst-gap", type=float, default=5.0, metavar="MS",
                   help="dispatches less than this apart are one burst (default 5 ms)")
    args = p.parse_args(argv)
    window: tuple[float, float] | None = (args.window[0], args.window[1]) if args.window else None
    # the scenario's units and weights as a records header carries them (the flows' own weights: a review
    # found them ignored), taken before each run's header; its window after the header's, the run's own
    given: dict[str, Any] = audit_header(read_scenario(args.scenario)) if args.scenario else {}
    with open(args.records, "rb") as fh:
        data = fh.read()
    for head, rows in records.decode_runs(data):
        label = " ".join(f"{k}={head[k]}" for k in ("source", "label", "run") if k in head)
        print(f"== {label}")
        told = head.get("window") or given.get("window")
        for band, pairs in breakdown(rows, unit_of=given.get("units", head.get("units")),
                                     weights=given.get("weights", head.get("weights")),
                                     window=window or (None if told is None else (told[0], told[1])),
                                     burst_gap=args.burst_gap / 1e3).items():
            if not pairs:
                print(f"band {band}: no pairs (fewer than 2 flows, or more than {MAX_PAIRED_FLOWS})")
                continue
            print(f"band {band}: pair  pairwise  between-bursts  longest-run")
            for name, fig in sorted(pairs.items(), key=lambda kv: -kv[1]["pairwise"]):
                print(f"  {name:24s} {fig['pairwise']:>10,.0f} {fig['between_bursts']:>14,.0f}"
                      f" {fig['longest_run']:>12d}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # (`| head` closed the pipe: not an error of ours; review 181)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (so the exit's flush says nothing)
        sys.exit(1)
