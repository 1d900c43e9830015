"""Fairness yardsticks shared by the simulator, the load generator's reports and the tests."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def max_min_fair(demands: Sequence[float], capacity: float, weights: Sequence[float] | None = None) -> list[float]:
    """Weighted max-min fair allocation of `capacity` among `demands` (water-filling).

    Each flow gets min(demand, level * weight) with one common level chosen so the allocations
    sum to `capacity` (or to the total demand, if that is smaller). Example: demands [3, 7, 9, 1],
    capacity 14 -> [3, 5, 5, 1].
    """
    n = len(demands)
    weights = [1.0] * n if weights is None else list(weights)
    if len(weights) != n:
        raise ValueError("demands and weights differ in length")
    if any(w <= 0 for w in weights) or any(d < 0 for d in demands) or capacity < 0:
        raise ValueError("weights must be positive, demands and capacity non-negative")
    alloc = [0.0] * n
    remaining = capacity
    open_ = set(range(n))
    while open_ and remaining > 1e-12:
        total_weight = sum(weights[i] for i in open_)
        level = remaining / total_weight
        satisfied = {i for i in open_ if demands[i] - alloc[i] <= level * weights[i]}
        if not satisfied:
            for i in open_:
                alloc[i] += level * weights[i]
            break
        for i in satisfied:
            remaining -= demands[i] - alloc[i]
            alloc[i] = float(demands[i])
        open_ -= satisfied
    return alloc


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1.0 is perfectly even, 1/n is one-takes-all."""
    if not values:
        return 1.0
    total = sum(values)
    squares = sum(v * v for v in values)
    return 1.0 if squares == 0 else total * total / (len(values) * squares)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values, nearest-rank; nan when empty."""
    if not sorted_values:
        return math.nan
    rank = max(0, math.ceil(q * len(sorted_values)) - 1)
    return float(sorted_values[min(rank, len(sorted_values) - 1)])


def overtakes(flow: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """Which dispatches overtook an earlier request of their own flow.

    `flow` and `seq` (arrival sequence numbers) are per dispatch, in dispatch order. A dispatch
    overtook if a request of the same flow that arrived before it was dispatched after it (an
    ordering violation under fcfs). O(n log n): a stable sort by flow, then a running minimum of
    the arrival sequence over each flow's later dispatches.
    """
    n = len(flow)
    if n == 0:
        return np.zeros(0, dtype=bool)
    order = np.argsort(flow, kind="stable")  # by flow, dispatch order kept within a flow
    f = flow[order].astype(np.int64)
    s = seq[order].astype(np.int64)
    span = int(s.max() - s.min()) + 1
    # walk backwards; offset each flow so a running minimum never reaches across flows
    f0 = f - f.min()
    key = (s - s.min())[::-1] + f0[::-1] * span
    prior = np.empty(n, dtype=np.int64)
    prior[0] = np.iinfo(np.int64).max
    np.minimum.accumulate(key[:-1], out=prior[1:])
    out = np.empty(n, dtype=bool)
    out[order] = (key > prior)[::-1]
    return out


MAX_PAIRED_FLOWS = 64  # pairwise service difference: bands with more flows are not paired (O(F^2))


def union_intervals(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The union of closed intervals [starts[i], ends[i]] as sorted, disjoint (starts, ends)."""
    if len(starts) == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(starts, kind="stable")
    s, e = starts[order].astype(np.float64), np.maximum.accumulate(ends[order].astype(np.float64))
    new = np.ones(len(s), dtype=bool)
    new[1:] = s[1:] > e[:-1]
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, len(s) - 1)
    return s[first], e[last]


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Every index in the half-open ranges [lo[k], hi[k]), concatenated in order (all hi >= lo)."""
    counts = hi - lo
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    out: np.ndarray = np.arange(total) - np.repeat(starts - lo, counts)
    return out


def pairwise_service_difference(
    backlog: dict[int, tuple[np.ndarray, np.ndarray]], served: dict[int, tuple[np.ndarray, np.ndarray]]
) -> float | None:
    """The service difference as the VTC paper defines it: the largest |W_f(t1, t2) - W_g(t1, t2)| over
    every pair of flows f, g and every interval [t1, t2] in which both were backlogged throughout.

    `backlog[f]`: the flow's backlogged intervals (sorted, disjoint; see `union_intervals`);
    `served[f]`: (times, weighted units) of its dispatches. None when there is no pair to compare or
    more than MAX_PAIRED_FLOWS flows. Within one joint interval the difference W_f - W_g is a step
    function of time; the answer there is its range (max - min, counting its value at the start), its
    value at an instant taken after every dispatch at that instant (review 181: the simulator's
    dispatches of one pass share their virtual instant, and taken one by one in the order they were
    sorted in they read 5 requests of difference where, in time, there was none). Intervals of no length
    (two flows backlogged together for an instant) are not intervals.
    """
    flows = sorted(f for f in backlog if len(backlog[f][0]))
    if len(flows) < 2 or len(flows) > MAX_PAIRED_FLOWS:
        return None
    best = 0.0
    empty = (np.zeros(0), np.zeros(0))
    for i, f in enumerate(flows):
        fs, fe = backlog[f]
        ft, fu = served.get(f, empty)
        for g in flows[i + 1 :]:
            gs, ge = backlog[g]
            # joint intervals: each f interval meets the g intervals that end after it starts and
            # start before it ends (both lists sorted and disjoint, so those are consecutive)
            j_lo = np.searchsorted(ge, fs, side="left")
            j_hi = np.maximum(np.searchsorted(gs, fe, side="right"), j_lo)
            gj = _ranges(j_lo, j_hi)
            if len(gj) == 0:
                continue
            fi = np.repeat(np.arange(len(fs)), j_hi - j_lo)
            a, b = np.maximum(fs[fi], gs[gj]), np.minimum(fe[fi], ge[gj])
            longer = b > a
            if not longer.any():
                continue
            a, b = a[longer], b[longer]
            gt, gu = served.get(g, empty)
            order = np.argsort(np.concatenate([ft, gt]), kind="stable")
            times = np.concatenate([ft, gt])[order]
            level = np.concatenate([[0.0], np.cumsum(np.concatenate([fu, -gu])[order])])  # level[k]: after k events
            # a level between two dispatches of one instant is no value in time: left out (NaN, which fmax
            # and fmin pass over; each interval's first level, before its first dispatch, is always one)
            within = np.zeros(len(level), dtype=bool)
            within[1:-1] = times[1:] == times[:-1]
            level = np.where(within, np.nan, level)
            first = np.searchsorted(times, a, side="left")  # value at the start: level[first]
            last = np.searchsorted(times, b, side="right")  # then after each event in [a, b]
            idx = _ranges(first, last + 1)
            cuts = np.cumsum(last + 1 - first) - (last + 1 - first)
            values = level[idx]
            spread = np.fmax.reduceat(values, cuts) - np.fmin.reduceat(values, cuts)
            best = max(best, float(spread.max()))
    return best
