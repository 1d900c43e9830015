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
