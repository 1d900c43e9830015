"""The fair reference a run is judged against: water-filling of each flow's *intrinsic* demand.

A flow's intrinsic demand is what it would take from an idle server, independent of the service it
actually got (Kubernetes APF's fairness tests compute it this way):
- open loop: the work it offered (arrivals in the window, rejected ones too: an arrival is demand,
  plus what it still had queued when the window opened);
- closed loop: clients x E[units] / (E[service] + E[think]) per second, over the part of the window
  the flow was active: what its clients would send if no request ever waited. A real run (the bench)
  measures that cycle instead: its clients' mean time between sends less their waits at the service
  (`bench.fairness.closed_cycles`), which includes what the model cannot know (round trips, the
  generator's own loop).
(Counting only *admitted* work, as the first reports did, lets a closed-loop flow's demand shrink with
the service it gets, so a policy without any fairness scores as fair.)

Demands are in the band's unit (requests, bytes or cost), and the capacity they share is the dispatch
budget: a unit of flow i holds `seconds[i]` slot-seconds and `byte_seconds[i]` byte-seconds of it (a
flow of long requests uses more of the budget per request). The allocation is the weighted max-min
one: x_i = min(d_i, level * w_i), the level as high as every budget limit allows — the classic
water-filling when every unit costs the same. A band's capacity is its ceiling of the budget less
what the bands above it used. Measured service is compared with x_i flow by flow; a flow off by more
than the margin (relative) plus its sampling noise (3 standard errors of a sum of its n requests:
3 cv / sqrt(n), cv the variation of what the band judges of a request: its units and its time in a
slot, its size only where bytes are counted; 0 when those are all alike) is named in the reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

from flowshard.config import limit
from flowshard.scenario import Closed, Dist, Exponential, FlowSpec, LogNormal, Scenario, as_dist

_GRID = 4096  # midpoints of the uniform draw for numeric means (capped or rounded distributions)


class Means(msgspec.Struct, frozen=True):
    """Per-request means of one flow entry: service seconds, size bytes, declared tokens (0: none), and
    `cv`: how much one request's use of the budget varies (coefficient of variation of its service, its
    units and its think time together; 0 when every request is alike)."""

    service: float
    size: float
    tokens: float
    think: float  # closed loop only
    cv: float = 0.0
    # each part of `cv`: a band judges only some of them (`noise`)
    cv_size: float = 0.0
    cv_tokens: float = 0.0
    cv_service: float = 0.0
    cv_think: float = 0.0

    def noise(self, unit: str, bytes_budgeted: bool) -> float:
        """The variation of one request's share of what its band judges: its time in a slot (service, and
        think in a closed loop), its units (bytes: its size; cost: its tokens, else its size), and its
        size where a byte budget holds it. Sizes do not move a round-robin band's share under a request
        budget (review 181: they widened its allowance from 5 % to ~9.5 %)."""
        parts = [self.cv_service, self.cv_think]
        if unit == "bytes" or bytes_budgeted:
            parts.append(self.cv_size)
        if unit == "cost":
            parts.append(self.cv_tokens if self.tokens else self.cv_size)
        return math.sqrt(sum(p * p for p in parts))


def _moments(dist: Dist, rounding: bool, low: float = 0.0) -> tuple[float, float]:
    """(mean, coefficient of variation) of a distribution after the scenario's rounding (int(x + 0.5))
    and `low` floor."""
    if isinstance(dist, Exponential) and dist.max is None:
        return max(low, dist.expected()), 1.0  # the heavy tail a grid would cut; rounding is negligible
    if isinstance(dist, LogNormal) and dist.max is None:
        return max(low, dist.expected()), math.sqrt(math.expm1(dist.sigma * dist.sigma))
    sample = dist.sampler()
    total = squares = 0.0
    for k in range(_GRID):
        x = sample((k + 0.5) / _GRID)
        if rounding:
            x = int(x + 0.5)
        x = max(low, x)
        total += x
        squares += x * x
    mean = total / _GRID
    variance = max(0.0, squares / _GRID - mean * mean)
    return mean, (math.sqrt(variance) / mean if mean > 0 else 0.0)


def means(spec: FlowSpec) -> Means:
    """The means of a flow entry's request shape (the same for each of its `count` flows)."""
    size, cv_size = _moments(as_dist(spec.size), True)
    tokens, cv_tokens = (0.0, 0.0) if spec.tokens is None else _moments(as_dist(spec.tokens), True, 1.0)
    service, cv_service = _moments(as_dist(spec.service), False)
    service += spec.service_per_token * tokens
    think, cv_think = _moments(as_dist(spec.arrival.think), False) if isinstance(spec.arrival, Closed) else (0, 0)
    cv = math.sqrt(cv_size**2 + cv_tokens**2 + cv_service**2 + cv_think**2)
    return Means(service, size, tokens, think, cv, cv_size, cv_tokens, cv_service, cv_think)


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
    tolerance: float = 0.0  # the error it may show: the margin plus sampling noise (see `allowance`)


def cycle_of(m: Means, overhead: float = 0.0, measured: float | None = None) -> float:
    """The seconds of one closed-loop client's cycle had the service never made it wait: `measured` (a
    real run's own figure: its clients' mean cycle less their waits at the service, see
    `bench.fairness.closed_cycles`) where there is one, else the model's service + think + `overhead`
    (the round trip per request)."""
    return measured if measured is not None else m.service + m.think + overhead


def failed_gap(spec: FlowSpec) -> float:
    """E[max(think, backoff)]: the mean seconds a closed-loop client waits after a request that failed
    (rejected, evicted, refused) before it sends again; 0 for an open-loop flow."""
    a = spec.arrival
    if not isinstance(a, Closed):
        return 0.0
    sample = as_dist(a.think).sampler()
    return sum(max(a.backoff, sample((k + 0.5) / _GRID)) for k in range(_GRID)) / _GRID


def intrinsic(
    spec: FlowSpec, m: Means, unit: str, window: tuple[float, float], offered: float, overhead: float = 0.0,
    hold: float = 0.0, measured: float | None = None,
) -> FlowRef:
    """A flow's reference entry; `offered`: the units that arrived in the window (open loop only);
    `overhead`: seconds a closed-loop client spends per request on the round trip, `hold`: seconds a
    request holds its slot beyond its service (both real time: answer and release in transit);
    `measured`: a closed-loop client's measured cycle less its waits at the service, which replaces
    the model's (see `cycle_of`)."""
    start, end = window
    per = unit_of(unit, m)
    if isinstance(spec.arrival, Closed):
        cycle = cycle_of(m, overhead, measured)
        demand = spec.arrival.concurrency * per / cycle * active_fraction(spec, start, end) if cycle > 0 else 0.0
    else:
        demand = offered / (end - start)
    seconds = (m.service + hold) / per if per > 0 else 0.0
    return FlowRef(demand=demand, seconds=seconds, byte_seconds=seconds * m.size, weight=1.0)


def water_fill(flows: Sequence[FlowRef], slots: float, byte_slots: float) -> None:
    """Set each flow's `allocation`: weighted max-min of the demands under both budget limits.

    x_i = min(d_i, level * w_i); every flow uses both limits, so when one binds nobody can grow and one
    level serves all. The level is found exactly by walking the flows in order of d_i / w_i.
    """
    if slots <= 0 or byte_slots <= 0:  # no room at all: nothing for anyone, also for flows whose units
        for f in flows:                 # measured no slot time (no dispatch, no service)
            f.allocation = 0.0
        return
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
    """(slots, byte slots) a band may use: a band dispatches only while the *whole* budget's saturation
    is below its ceiling, so it gets its ceiling of the budget less what the bands above it used."""
    budget = scenario.server.budget
    ceiling = scenario.server.bands[band].ceiling
    slots = math.inf if budget.max_inflight_requests is None else float(budget.max_inflight_requests)
    byte_slots = math.inf if budget.max_inflight_bytes is None else float(budget.max_inflight_bytes)
    slots = slots * ceiling - higher_seconds / window
    byte_slots = byte_slots * ceiling - higher_byte_seconds / window
    return max(0.0, slots), max(0.0, byte_slots)


NOISE = 3.0  # standard errors of sampling noise allowed on top of the margin
MIN_JUDGED = 5.0  # requests of allocation in the window a flow needs to be judged (`Verdict.unjudged`)
_HELD_BACK = 1.01  # a band that wanted this much more than it used was held back (by the budget or the service)
# A run whose bands together left more than a third of the budget unused while one of them was held
# back was bound by the service's own rate (its CPU), not by the budget: slots in transit or idle at a
# window's edge are a few percent of the budget, never a third.
_SERVICE_BOUND = 1.5


def allowance(margin: float, cv: float, requests: float, allotted: float = math.inf) -> float:
    """The error a flow may show and still count as fair: the margin, plus NOISE standard errors of a
    sum of `requests` requests whose budget use varies by `cv` (0 for identical requests: the margin),
    plus one request of its `allotted` (its allocation in the window, in requests): service comes in
    whole requests, which a fluid allocation does not."""
    noise = NOISE * cv / math.sqrt(requests) if requests > 0 and cv > 0 else 0.0
    return margin + noise + (1.0 / allotted if allotted > 0 else 0.0)


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
    """One band judged against the reference: the flows off by more than `margin` (relative) plus their
    sampling noise (requests that vary in service, size or think time; none for identical requests)."""

    margin: float
    slots: float | None  # the budget share the band had (request slots; None: unlimited)
    # flows whose allocation in the window came to fewer than MIN_JUDGED requests: not judged (a request
    # more or less is a fifth of it or more; review 181: 10,000 flows of 1-2 requests each read UNFAIR)
    unjudged: int = 0
    pooled: int = 0  # flows allotted under MIN_JUDGED each, judged together (review 184) instead
    # "budget": judged against its share of the budget; "service": it waited while the budget had room
    # (the service's own rate bound it, as in a peak run), so it is judged on the slots it did use
    bound: str = "budget"
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
    overhead: Sequence[float] | None = None,
    hold: Sequence[float] | None = None,
    blocked: Sequence[float] | None = None,
    cycle: Sequence[float | None] | None = None,
) -> tuple[list[FlowRef], list[Verdict]]:
    """The reference of every flow and the verdict of every band.

    Per flow (in expand order): `offered[f][s]` units that arrived in segment s (see `segments`),
    `served[f]` units dispatched in the window, `busy[f]` (slot-seconds, byte-seconds) those held.
    Capacity: the band's ceiling of the budget less what the bands above used, on average; a band held
    back by the budget (its intrinsic demand exceeds what it used) that used more than that got the
    rest in the moments the bands above left room, which averages cannot see: then what it used. A band
    held back that used clearly less than that share (or had an unlimited budget) was held back by
    the service's own rate (a peak run: the dispatcher's CPU, not the budget, is the bottleneck): its
    flows are judged on the slots it used, so the verdict says how that capacity was shared among
    them (against the budget, every flow of a perfectly fair peak run showed the same -50 %).
    `busy` must count how long each dispatch really held its slot, and `hold[f]` (real time) how much
    longer than its service a request of flow f holds its slot (its answer and its release in
    transit); `overhead[f]`: a closed-loop client's round trip per request (it cannot send while its
    answer travels; see `intrinsic`). `blocked[b]`: the fraction of the window in which a band above b
    had work waiting (strict priority: b may use the budget only in the rest), which caps b's share at
    its ceiling of the budget over the rest of the window: averages alone left a band below a
    backlogged one the few slots in transit as a share it never could use. `cycle[f]` (real time): a
    closed-loop client's measured cycle less its waits at the service (None: not measured), its
    demand's cycle in place of the model's service + think + `overhead[f]`: a generator saturated by
    its own loop sends less often than the model says, whatever the policy.
    """
    w = scenario.workload
    cuts = segments(scenario)
    window = (w.warmup, w.duration)
    length = w.duration - w.warmup
    cache: dict[int, Means] = {}
    refs: list[FlowRef] = []
    for f, spec in enumerate(specs):
        m = cache.get(id(spec))
        if m is None:  # (setdefault would compute it for every flow: flows of one group share a spec)
            m = cache[id(spec)] = means(spec)
        ref = intrinsic(spec, m, units[band_of[f]], window, sum(offered[f]), overhead[f] if overhead else 0.0,
                        hold[f] if hold else 0.0, cycle[f] if cycle else None)
        ref.weight = weights[f]
        ref.measured = served[f] / length
        refs.append(ref)
    verdicts: list[Verdict] = []
    higher = [0.0, 0.0]
    held_above = False  # a band above this one was held back
    budget = scenario.server.budget
    usable = max(bc.ceiling for bc in scenario.server.bands)  # of the budget, by any band
    whole, whole_bytes = limit(budget.max_inflight_requests) * usable, limit(budget.max_inflight_bytes) * usable
    all_used = sum(b[0] for b in busy) / length
    all_used_bytes = sum(b[1] for b in busy) / length
    service_bound = all_used * _SERVICE_BOUND < whole and all_used_bytes * _SERVICE_BOUND < whole_bytes
    for b in range(len(units)):
        members = [f for f in range(len(specs)) if band_of[f] == b]
        slots, byte_slots = band_capacity(scenario, b, higher[0], higher[1], length)
        if blocked is not None and blocked[b] > 0:
            free = max(0.0, 1.0 - blocked[b])
            top_slots, top_bytes = band_capacity(scenario, b, 0.0, 0.0, length)
            if free:
                slots, byte_slots = min(slots, top_slots * free), min(byte_slots, top_bytes * free)
            else:  # (inf * 0 is nan)
                slots = byte_slots = 0.0
        used = sum(busy[f][0] for f in members) / length
        used_bytes = sum(busy[f][1] for f in members) / length
        wanted = sum(refs[f].demand * refs[f].seconds for f in members)
        wanted_bytes = sum(refs[f].demand * refs[f].byte_seconds for f in members)
        bound = "budget"
        if wanted > used * _HELD_BACK or wanted_bytes > used_bytes * _HELD_BACK:  # held back
            # ... by the service's rate (the whole budget had room), if it got some service or a band above
            # it also waited (strict priority: a band that got nothing while nothing above it waited is
            # judged against the budget, so a band left starving with room free is named)
            waited_above = held_above if blocked is None else blocked[b] > 0
            if service_bound and (used or waited_above):
                slots, byte_slots, bound = used, math.inf, "service"
            if slots != math.inf and used > slots * _HELD_BACK:  # (clearly more: not a window-edge crumb)
                slots = used
            if byte_slots != math.inf and used_bytes > byte_slots * _HELD_BACK:
                byte_slots = used_bytes
        total = [0.0] * len(members)
        for s in range(len(cuts) - 1):
            lo, hi = cuts[s], cuts[s + 1]
            piece = []
            for f in members:
                spec, ref = specs[f], refs[f]
                if isinstance(spec.arrival, Closed):
                    active = spec.start <= lo and (spec.stop is None or spec.stop >= hi)
                    m = cache[id(spec)]
                    c = cycle_of(m, overhead[f] if overhead else 0.0, cycle[f] if cycle else None)
                    per = unit_of(units[b], m)
                    d = spec.arrival.concurrency * per / c if active and c > 0 else 0.0
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
        held_above = held_above or wanted > used * _HELD_BACK or wanted_bytes > used_bytes * _HELD_BACK
        judged = []
        pooled_flows = 0
        few: list[tuple[float, float, float, float]] = []  # flows allotted too few to judge alone
        bytes_budgeted = scenario.server.budget.max_inflight_bytes is not None
        for f in members:
            e = error(refs[f])
            if e is None:
                continue
            m = cache[id(specs[f])]
            per = unit_of(units[b], m)
            allotted = refs[f].allocation * length / per if per > 0 else 0.0
            noise = m.noise(units[b], bytes_budgeted)
            # the noise of what the flow was owed, not of what it got: a starved flow got few requests,
            # and judged by those its allowance grew with its starvation (review 184: 7 of 29 served,
            # -76 %, allowed 121 %)
            refs[f].tolerance = allowance(w.fair_margin, noise, allotted, allotted)
            if allotted < MIN_JUDGED:
                few.append((refs[f].measured, refs[f].allocation, allotted, noise))
                continue
            judged.append((e, ids[f], refs[f].tolerance))
        unjudged = len(few)
        pooled = sum(x[2] for x in few)
        if few and pooled >= MIN_JUDGED:  # judged together (review 184: 16 of 20 light flows left out, a
            # flood that served 15 of their 40 requests read fair)
            measured, allocation = sum(x[0] for x in few), sum(x[1] for x in few)
            tolerance = allowance(w.fair_margin, max(x[3] for x in few), pooled, pooled)
            judged.append(((measured - allocation) / allocation,
                           f"{len(few)} flows of under {MIN_JUDGED:g} requests each, together", tolerance))
            unjudged = 0
            pooled_flows = len(few)
        judged.sort(key=lambda x: -abs(x[0]))
        off = [f"{i} {e * 100:+.1f}%" for e, i, t in judged if abs(e) > t]
        verdicts.append(Verdict(
            margin=w.fair_margin,
            slots=None if slots == math.inf else round(slots, 3),
            bound=bound,
            max_error=round(max(abs(e) for e, _, _ in judged), 6) if judged else None,
            off=off,
            fair=(not off) if judged else None,
            unjudged=unjudged,
            pooled=pooled_flows,
        ))
    return refs, verdicts
