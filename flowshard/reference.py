"""The fair reference a run is judged against: water-filling of each flow's *intrinsic* demand.

A flow's intrinsic demand is what it would take from an idle server, independent of the service it
actually got (Kubernetes APF's fairness tests compute it this way):
- open loop: the work it offered (arrivals in the window, rejected ones too: an arrival is demand);
- closed loop: clients x E[units] / (E[service] + E[think]) per second, over the part of the window
  the flow was active: what its clients would send if no request ever waited.
(Counting only *admitted* work, as the first reports did, lets a closed-loop flow's demand shrink with
the service it gets, so a policy without any fairness scores as fair.)

Demands are in the band's unit (requests, bytes or cost), and the capacity they share is the dispatch
budget: a unit of flow i holds `seconds[i]` slot-seconds and `byte_seconds[i]` byte-seconds of it (a
flow of long requests uses more of the budget per request). The allocation is the weighted max-min
one: x_i = min(d_i, level * w_i), the level as high as every budget limit allows — the classic
water-filling when every unit costs the same. A band's capacity is its share of the budget (its
ceiling) less what the bands above it used. Measured service is compared with x_i flow by flow; a
flow off by more than the margin (relative) is named in the reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

from flowshard.scenario import Closed, Dist, Exponential, FlowSpec, LogNormal, Scenario, as_dist

_GRID = 4096  # midpoints of the uniform draw for numeric means (capped or rounded distributions)


class Means(msgspec.Struct, frozen=True):
    """Per-request means of one flow entry: service seconds, size bytes, declared tokens (0: none)."""

    service: float
    size: float
    tokens: float
    think: float  # closed loop only


def _mean(dist: Dist, rounding: bool, low: float = 0.0) -> float:
    """E[value] of a distribution after the scenario's rounding (int(x + 0.5)) and `low` floor."""
    if isinstance(dist, Exponential | LogNormal) and dist.max is None:
        return max(low, dist.expected())  # the heavy tail a grid would cut; rounding is negligible
    sample = dist.sampler()
    total = 0.0
    for k in range(_GRID):
        x = sample((k + 0.5) / _GRID)
        if rounding:
            x = int(x + 0.5)
        total += max(low, x)
    return total / _GRID


def means(spec: FlowSpec) -> Means:
    """The means of a flow entry's request shape (the same for each of its `count` flows)."""
    size = _mean(as_dist(spec.size), True)
    tokens = 0.0 if spec.tokens is None else _mean(as_dist(spec.tokens), True, 1.0)
    service = _mean(as_dist(spec.service), False) + spec.service_per_token * tokens
    think = _mean(as_dist(spec.arrival.think), False) if isinstance(spec.arrival, Closed) else 0.0
    return Means(service, size, tokens, think)


def unit_of(unit: str, m: Means) -> float:
    """E[units] per request in a band unit: requests, bytes, cost (declared tokens, else bytes)."""
    if unit == "requests":
        return 1.0
    if unit == "bytes":
        return m.size
    return m.tokens or m.size


def active_fraction(spec: FlowSpec, start: float, end: float) -> float:
    """The part of the window [start, end] the flow sends in (its own start/stop)."""
    stop = min(spec.stop or end, end)
    return max(0.0, stop - max(spec.start, start)) / (end - start)


class FlowRef(msgspec.Struct, kw_only=True):
    """One flow's demand, budget use per unit, weight; then its allocation and measured service."""

    demand: float  # units per second
    seconds: float  # slot-seconds per unit
    byte_seconds: float  # byte-seconds per unit
    weight: float
    allocation: float = 0.0  # units per second
    measured: float = 0.0


def intrinsic(
    spec: FlowSpec, m: Means, unit: str, window: tuple[float, float], offered: float, overhead: float = 0.0
) -> FlowRef:
    """A flow's reference entry; `offered`: the units that arrived in the window (open loop only);
    `overhead`: seconds a closed-loop client spends per request on the round trip (real time)."""
    start, end = window
    per = unit_of(unit, m)
    if isinstance(spec.arrival, Closed):
        cycle = m.service + m.think + overhead
        demand = spec.arrival.concurrency * per / cycle * active_fraction(spec, start, end) if cycle > 0 else 0.0
    else:
        demand = offered / (end - start)
    seconds = m.service / per if per > 0 else 0.0
    return FlowRef(demand=demand, seconds=seconds, byte_seconds=seconds * m.size, weight=1.0)


def water_fill(flows: Sequence[FlowRef], slots: float, byte_slots: float) -> None:
    """Set each flow's `allocation`: weighted max-min of the demands under both budget limits.

    x_i = min(d_i, level * w_i); every flow uses both limits, so when one binds nobody can grow and one
    level serves all. The level is found exactly by walking the flows in order of d_i / w_i.
    """
    caps = [(slots, [f.seconds for f in flows]), (byte_slots, [f.byte_seconds for f in flows])]
    order = sorted(range(len(flows)), key=lambda i: flows[i].demand / flows[i].weight)
    used = [0.0, 0.0]  # by the flows already at their demand
    slope = [sum(f.weight * a for f, a in zip(flows, use, strict=True)) for _, use in caps]
    level = 0.0
    for i in order:
        f = flows[i]
        target = f.demand / f.weight
        # the highest level reachable before flow i saturates, under each limit
        reach = target
        for k, (cap, _) in enumerate(caps):
            if slope[k] > 0 and cap != math.inf:
                reach = min(reach, (cap - used[k]) / slope[k])
        if reach < target:
            level = max(level, reach)
            break
        level = target
        for k, (_, use) in enumerate(caps):
            used[k] += f.demand * use[i]
            slope[k] -= f.weight * use[i]
    else:
        level = math.inf
    for f in flows:
        f.allocation = min(f.demand, level * f.weight)


def band_capacity(scenario: Scenario, band: int, higher_seconds: float, higher_byte_seconds: float,
                  window: float) -> tuple[float, float]:
    """(slots, byte slots) a band may use: its ceiling of the budget, less the bands above it used."""
    budget = scenario.server.budget
    ceiling = scenario.server.bands[band].ceiling
    slots = math.inf if budget.max_inflight_requests is None else float(budget.max_inflight_requests)
    byte_slots = math.inf if budget.max_inflight_bytes is None else float(budget.max_inflight_bytes)
    slots = min(slots * ceiling, slots - higher_seconds / window)
    byte_slots = min(byte_slots * ceiling, byte_slots - higher_byte_seconds / window)
    return max(0.0, slots), max(0.0, byte_slots)


def error(f: FlowRef) -> float | None:
    """(measured - allocation) / allocation; None when the allocation is 0."""
    return None if f.allocation <= 0 else (f.measured - f.allocation) / f.allocation


def segments(scenario: Scenario) -> list[float]:
    """The window cut where any flow starts or stops: demands are constant within each piece, and
    water-filling each piece (not the averages) gives a late joiner its due only from when it came."""
    w = scenario.workload
    cuts = {w.warmup, w.duration}
    for spec in w.flows:
        for t in (spec.start, spec.stop):
            if t is not None and w.warmup < t < w.duration:
                cuts.add(t)
    return sorted(cuts)


class Verdict(msgspec.Struct, kw_only=True):
    """One band judged against the reference: the flows off by more than `margin` (relative)."""

    margin: float
    slots: float | None  # the budget share the band had (request slots; None: unlimited)
    max_error: float | None
    off: list[str]  # "flow-id +12.3%" (measured above / below its allocation)
    fair: bool | None  # None: nothing to judge (no allocation)


def judge(
    scenario: Scenario,
    units: Sequence[str],
    band_of: Sequence[int],
    ids: Sequence[str],
    specs: Sequence[FlowSpec],
    weights: Sequence[float],
    offered: Sequence[Sequence[float]],
    served: Sequence[float],
    busy: Sequence[tuple[float, float]],
    effective: bool = False,
    overhead: Sequence[float] | None = None,
) -> tuple[list[FlowRef], list[Verdict]]:
    """The reference of every flow and the verdict of every band.

    Per flow (in expand order): `offered[f][s]` units that arrived in segment s (see `segments`),
    `served[f]` units dispatched in the window, `busy[f]` (slot-seconds, byte-seconds) those held.
    `effective`: a band whose intrinsic demand exceeds its share of the budget gets, as capacity, the
    budget it really used (real time: each request also holds its slot for the round trips of its
    answer and release, so the nominal budget overstates what any policy could hand out). It only
    caps the total, so it cannot hide an unfair split. `overhead[f]`: a closed-loop client's round trip
    per request (real time: it cannot send while its answer travels; see `intrinsic`).
    """
    w = scenario.workload
    cuts = segments(scenario)
    window = (w.warmup, w.duration)
    length = w.duration - w.warmup
    cache: dict[int, Means] = {}
    refs: list[FlowRef] = []
    for f, spec in enumerate(specs):
        m = cache.setdefault(id(spec), means(spec))
        ref = intrinsic(spec, m, units[band_of[f]], window, sum(offered[f]), overhead[f] if overhead else 0.0)
        ref.weight = weights[f]
        ref.measured = served[f] / length
        refs.append(ref)
    verdicts: list[Verdict] = []
    higher = [0.0, 0.0]
    for b in range(len(units)):
        members = [f for f in range(len(specs)) if band_of[f] == b]
        slots, byte_slots = band_capacity(scenario, b, higher[0], higher[1], length)
        if effective:
            used = sum(busy[f][0] for f in members) / length
            used_bytes = sum(busy[f][1] for f in members) / length
            wanted = sum(refs[f].demand * refs[f].seconds for f in members)
            wanted_bytes = sum(refs[f].demand * refs[f].byte_seconds for f in members)
            if wanted >= slots or wanted_bytes >= byte_slots:  # saturated: cap the limits the budget has
                if slots != math.inf:
                    slots = min(slots, used)
                if byte_slots != math.inf:
                    byte_slots = min(byte_slots, used_bytes)
        total = [0.0] * len(members)
        for s in range(len(cuts) - 1):
            lo, hi = cuts[s], cuts[s + 1]
            piece = []
            for f in members:
                spec, ref = specs[f], refs[f]
                if isinstance(spec.arrival, Closed):
                    active = spec.start <= lo and (spec.stop is None or spec.stop >= hi)
                    m = cache[id(spec)]
                    cycle = m.service + m.think + (overhead[f] if overhead else 0.0)
                    per = unit_of(units[b], m)
                    d = spec.arrival.concurrency * per / cycle if active and cycle > 0 else 0.0
                else:
                    d = offered[f][s] / (hi - lo)
                piece.append(FlowRef(demand=d, seconds=ref.seconds, byte_seconds=ref.byte_seconds, weight=ref.weight))
            water_fill(piece, slots, byte_slots)
            for k, p in enumerate(piece):
                total[k] += p.allocation * (hi - lo)
        for k, f in enumerate(members):
            refs[f].allocation = total[k] / length
        for f in members:
            higher[0] += busy[f][0]
            higher[1] += busy[f][1]
        errors = [(error(refs[f]), ids[f]) for f in members]
        judged = [(e, i) for e, i in errors if e is not None]
        off = [f"{i} {e * 100:+.1f}%" for e, i in sorted(judged, key=lambda x: -abs(x[0])) if abs(e) > w.fair_margin]
        verdicts.append(Verdict(
            margin=w.fair_margin,
            slots=None if slots == math.inf else round(slots, 3),
            max_error=round(max(abs(e) for e, _ in judged), 6) if judged else None,
            off=off,
            fair=(not off) if judged else None,
        ))
    return refs, verdicts
