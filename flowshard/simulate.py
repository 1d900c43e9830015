"""Deterministic discrete-event simulation of one engine in virtual time (`flowshard simulate`).

The backend is modelled by the engine's own dispatch budget: a dispatched request holds its slot
(and its bytes) for its service time, then is released. `simulate(scenario)` is a pure function of
the scenario: no clock, no I/O, no hash-seed dependence, so the same scenario gives the same report
byte for byte. Only the command part at the end (`main`, `Watch`: files, stderr, the wall clock for
progress) does I/O.

Measurement choices (the report's fields name them):
- Counts, waits and service received cover the whole run; `wait` is enqueue-to-dispatch of the
  dispatched requests. Run end: `drain = false` stops at `duration` and reports what is still queued
  as `unfinished` (not evicted) and what is still in service as `inflight_at_end` (counted as
  dispatched); `drain = true` stops arrivals at `duration` and runs until everything has an outcome.
- Fairness figures cover the window [warmup, duration], per band, in the unit the band's policy
  equalises: requests (round-robin), bytes (drr), cost = tokens where declared else bytes (vtc,
  global-fcfs). `share` is a flow's part of its band's service. `fair_share` is what a weighted
  max-min fair reference (fluid GPS, driven by the same arrivals and the same band service) would
  have given it: every unit the band dispatched is water-filled by weight over the flows the
  reference still owes work, each capped by what it owes. A flow is owed the work it queued (rejected
  requests never were demand); work that left the queue unserved (TTL, cancel, displacement) is
  withdrawn as far as the reference had not served it either. Saturated flows thus get
  weight-proportional shares, light flows exactly their demand, late joiners compete from when they
  arrive. (This reference follows *admitted* work, so it cannot see unfairness to closed-loop
  flows, whose admitted work shrinks with the service they get: it is kept as `share`/`fair_share`.)
- The fairness verdict (`reference` per band, `demand`/`allocation`/`measured`/`error` per flow,
  `fair` in the totals) judges each flow against the weighted max-min allocation of *intrinsic*
  demand (flowshard.reference): measured service per second vs its allocation, flows off by more
  than `fair_margin` named. Jain's index is over measured / allocation of the flows with one.
- `overtaken`: per band, the fraction of the window's dispatches that overtook an earlier-arrived
  request of their own flow (dispatched later): ordering violations under fcfs, and under edf or
  slo-deadline since a scenario entry's requests share one TTL and SLO; 0 on one engine.
- `max_service_diff`: the largest gap, at any time, in weighted service (unit / weight) between
  flows of a band that are backlogged at that time, counted from when each became backlogged (VTC
  paper style; a flow that becomes backlogged starts level with the least-served backlogged flow).
- Priority inversions: dispatches of a band while a higher band held a queued request it could have
  dispatched (queued items > 0 and saturation below its ceiling), replayed from each pump's outcomes.
  The engine guarantees 0.
"""

from __future__ import annotations

import difflib
import heapq
import importlib.resources
import math
import os
import sys
import time
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TextIO, cast

import msgspec
import numpy as np

from flowshard import records
from flowshard.analysis import (
    MAX_PAIRED_FLOWS,
    jain_index,
    overtakes,
    pairwise_service_difference,
    percentile,
    union_intervals,
)
from flowshard.config import MAX_SHARDS, ConfigError, read_toml_file
from flowshard.engine import Band as EngineBand
from flowshard.engine import Engine
from flowshard.estimate import estimate, events_per_second
from flowshard.heaps import compacted
from flowshard.multisim import ShardedService
from flowshard.reference import MIN_JUDGED, FlowRef, Verdict, judge, segments
from flowshard.scenario import Closed, FlowSource, Scenario, flow_sources, flow_weights, load_scenario
from flowshard.types import Item, ItemState, Outcome, Request

_ARRIVAL, _CLIENT, _DONE = 0, 1, 2  # event kinds
_Shape = tuple[float, int, int, float]  # a FlowSource draw: (gap, size, tokens, service)
_QUEUED = ItemState.QUEUED
_DISPATCHED = Outcome.DISPATCHED
_REJECTED = (Outcome.REJECTED_CAPACITY, Outcome.REJECTED_SHUTTING_DOWN)
_EVICTED = tuple(o for o in Outcome if o.status == "evicted")
_REQUESTS, _BYTES, _COST = 0, 1, 2
UNITS = {"round-robin": "requests", "drr": "bytes", "vtc": "cost", "global-fcfs": "cost"}


def audit_header(scenario: Scenario) -> dict[str, object]:
    """What a records file's header carries of its scenario (`flowshard.records`), so that an auditor
    judges the records alone: each band's fairness unit, the flows' weights (those not 1; the records
    have no weight column) and the window the figures count (warmup, duration)."""
    return {
        "units": {b.name: UNITS[b.fairness] for b in scenario.server.bands},
        "weights": {flow: w for flow, w in flow_weights(scenario).items() if w != 1.0},
        "window": [scenario.workload.warmup, scenario.workload.duration],
    }
_UNIT_KIND = {"requests": _REQUESTS, "bytes": _BYTES, "cost": _COST}
_GC_PERIOD = 1.0  # seconds of virtual time between flow garbage collections
_INF = math.inf
_PROGRESS_STEPS = 4096  # event-loop steps between two progress calls
Progress = Callable[[float, int], None]  # (virtual now, events so far)


# ---------------------------------------------------------------------------------------- report


class Waits(msgspec.Struct, kw_only=True):
    """Enqueue-to-dispatch seconds of dispatched requests; null when none was dispatched."""

    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None


class Served(msgspec.Struct, kw_only=True):
    requests: int
    bytes: int
    tokens: int


class Counts(msgspec.Struct, kw_only=True):
    """Outcomes of the requests of a flow, group, band or the whole run."""

    submitted: int
    dispatched: int
    rejected: dict[str, int]  # by reason; every reason present
    evicted: dict[str, int]
    unfinished: int  # still queued when the run stopped


class FlowReport(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    group: str  # the [[workload.flows]] entry it came from
    priority: int
    band: str
    weight: float
    counts: Counts
    wait: Waits
    served: Served
    backlogged: float  # fraction of the window with queued work
    share: float | None  # of the band's service in the window (band unit)
    fair_share: float | None
    demand: float  # intrinsic demand, band units per second (see flowshard.reference)
    allocation: float  # its weighted max-min allocation, band units per second
    measured: float  # band units per second it was served in the window
    error: float | None  # (measured - allocation) / allocation
    shards: list[int] | None = None  # N shards: its requests queued on each shard (absent at one shard)


class GroupReport(msgspec.Struct, kw_only=True):
    """One [[workload.flows]] entry, its `count` flows summed (shares too)."""

    id: str
    flows: int
    priority: int
    band: str
    counts: Counts
    wait: Waits
    served: Served
    share: float | None
    fair_share: float | None
    ratio_min: float | None  # smallest share / fair_share among its backlogged flows
    ratio_max: float | None


class BandReport(msgspec.Struct, kw_only=True, omit_defaults=True):
    priority: int
    name: str
    fairness: str
    ordering: str
    unit: str
    flows: int
    backlogged_flows: int
    counts: Counts
    wait: Waits
    served: Served
    throughput: float  # dispatched requests per second
    jain: float | None
    max_service_diff: float
    priority_inversions: int
    service_diff: float | None  # VTC paper: max |W_f - W_g| over pairs and jointly backlogged intervals
    reference: Verdict  # the flows off their intrinsic-demand allocation by more than the margin
    overtaken: float | None  # fraction of dispatches that overtook an earlier request of the same flow
    flows_per_shard: list[int] | None = None  # N shards: how many of its flows queued on each (absent at one)


class Throughput(msgspec.Struct, kw_only=True):
    requests: float
    bytes: float
    tokens: float


class Totals(msgspec.Struct, kw_only=True):
    counts: Counts
    inflight_at_end: int
    throughput: Throughput  # per second of simulated time
    served: Served
    jain: float | None  # over the backlogged flows of every band
    fair: bool | None  # every band within its reference margin (None: nothing to judge)
    backlogged_flows: int
    priority_inversions: int
    events: int


class ShardReport(msgspec.Struct, kw_only=True):
    """N shards: what each shard did (flowshard.multisim), in shard order."""

    queued: list[int]  # requests routed to each shard
    dispatched: list[int]  # requests each shard dispatched on a grant
    flows: list[int]  # (band, flow) pairs that queued on each shard (a flow that moved counts on each)
    fast_path: int  # dispatched at the distributor's idle fast path, never queued
    grants_handed_back: int  # grants a shard answered without a dispatch (head too big, TTL, narrowed)
    grants_narrowed: int  # of those: narrowed to a higher band waiting uncovered, which it did not hold


class Report(msgspec.Struct, kw_only=True, omit_defaults=True):
    scenario: str
    seed: int
    duration: float
    warmup: float
    drain: bool
    end: float  # simulated seconds
    totals: Totals
    bands: list[BandReport]
    groups: list[GroupReport]
    flows: list[FlowReport]
    shards: int = 1  # the service simulated: the distributor and this many shards (absent: one engine)
    sharding: ShardReport | None = None  # N shards only


# ---------------------------------------------------------------------------------------- priority check


class PriorityChecker:
    """Counts priority inversions in the outcomes of one `Engine.pump`, replayed in order.

    Given the queued items per band and the budget use before the pump, it follows each outcome
    (dispatch or eviction) and flags a dispatch of band b while some band a < b still held queued
    items and was below its ceiling — work strict priority says must go first.
    """

    def __init__(self, ceilings: Sequence[float], max_requests: float, max_bytes: float) -> None:
        self.ceilings = list(ceilings)
        self.max_requests = max_requests
        self.max_bytes = max_bytes

    def count(
        self, queued: Sequence[int], inflight: int, inflight_bytes: int, outcomes: Iterable[tuple[int, bool, int]]
    ) -> list[int]:
        """Inversions per band (of the dispatched request) for `outcomes` = (band, dispatched, bytes)."""
        left = list(queued)
        ceilings = self.ceilings
        inversions = [0] * len(left)
        for band, dispatched, size in outcomes:
            if dispatched:
                saturation = max(inflight / self.max_requests, inflight_bytes / self.max_bytes)
                if any(left[a] > 0 and saturation < ceilings[a] for a in range(band)):
                    inversions[band] += 1
                inflight += 1
                inflight_bytes += size
            left[band] -= 1
        return inversions


# ---------------------------------------------------------------------------------------- state


class _Flow:
    """One expanded flow: its request stream and every figure the report needs."""

    __slots__ = (
        "backlog_since",
        "backlog_time",
        "backlogs",
        "band",
        "busy",
        "busy_bytes",
        "closed",
        "credit",
        "credit0",
        "demanded",
        "dispatches",
        "finish",
        "ftick",
        "id",
        "index",
        "instance",
        "join",
        "offered",
        "outcomes",
        "owed",
        "priority",
        "queued",
        "rel",
        "request_weight",
        "served_bytes",
        "served_tokens",
        "slo",
        "source",
        "stamp",
        "stop",
        "submitted",
        "ttl",
        "unfinished",
        "units",
        "waits",
        "weight",
        "withdrawn",
    )

    def __init__(self, index: int, source: FlowSource, band: _Band, weight: float, end: float) -> None:
        instance = source.instance
        spec = instance.spec
        self.index = index
        self.instance = instance
        self.id = instance.id
        self.priority = spec.priority
        self.band = band
        self.weight = weight
        self.request_weight = spec.weight or 0.0
        self.ttl = spec.ttl
        self.slo = spec.slo
        self.source = source
        self.closed = spec.arrival if isinstance(spec.arrival, Closed) else None
        self.stop = min(spec.stop or end, end)
        self.submitted = self.unfinished = self.queued = 0
        self.outcomes = [0] * len(Outcome)
        self.waits: list[float] = []
        self.served_bytes = self.served_tokens = 0
        self.backlog_since = 0.0
        self.backlog_time = 0.0
        self.units = 0.0  # service in the window, band unit
        self.owed = False  # the fair reference still owes it work
        self.finish = self.join = 0.0
        self.credit = self.credit0 = 0.0  # reference service, all run / at the window's start
        self.demanded = self.withdrawn = 0.0  # work queued / withdrawn unserved, all run
        self.ftick = 0
        self.rel = 0.0  # weighted service since it became backlogged, for max_service_diff
        self.stamp = 0
        self.offered: list[float] = []  # units arriving per reference segment (open loop)
        self.busy = self.busy_bytes = 0.0  # slot- and byte-seconds of its dispatches in the window
        # for the pairwise service difference (bands of at most MAX_PAIRED_FLOWS flows): its backlogged
        # intervals in the window (start, end pairs) and its dispatches there (time, units / weight)
        self.backlogs: array[float] | None = None
        self.dispatches: array[float] | None = None


def _ticked(entry: tuple[float, int, _Flow]) -> bool:
    return entry[1] == entry[2].ftick  # (its flow's latest entry)


def _stamped(entry: tuple[float, int, _Flow]) -> bool:
    return entry[1] == entry[2].stamp


class _Reference:
    """The fair reference of one band: fluid weighted max-min (GPS) sharing of the band's own service.

    `level` is the service per unit of weight every owed flow has received; a flow is owed work until
    the level reaches its `finish`. Water-filling one dispatch is then a walk over the owed flows in
    `finish` order (a heap, stale entries skipped by tick), O(log F) amortised.
    """

    def __init__(self) -> None:
        self.level = 0.0
        self.owing = 0
        self.weight = 0.0  # of the owed flows
        self.heap: list[tuple[float, int, _Flow]] = []
        self.tick = 0

    def demand(self, flow: _Flow, units: float) -> float:
        """The flow queued `units` more work: the reference owes it that much more.

        Returns the work's end position in the flow's reference queue, for `withdraw`.
        """
        flow.demanded += units
        if units > 0 and flow.owed:
            flow.finish += units / flow.weight  # its heap entry is refreshed lazily when it surfaces
        elif units > 0:
            flow.owed = True
            flow.join = self.level
            flow.finish = self.level + units / flow.weight
            self.owing += 1
            self.weight += flow.weight
            self._push(flow)
        return flow.demanded - flow.withdrawn

    def _push(self, flow: _Flow) -> None:
        self.tick += 1
        flow.ftick = self.tick
        heapq.heappush(self.heap, (flow.finish, self.tick, flow))
        self.heap = compacted(self.heap, self.owing, _ticked)

    def withdraw(self, flow: _Flow, units: float, end: float, withdrawn: float) -> None:
        """Queued work left the queue unserved (TTL, cancel, displacement): stop owing whatever part of
        it the reference had not served yet either.

        `end` is the work's end position in the flow's reference queue when it was queued, `withdrawn`
        the flow's withdrawn total then; withdrawals since are taken to have been ahead of it (they
        were, when requests leave in arrival order).
        """
        if not flow.owed:
            return
        end -= flow.withdrawn - withdrawn
        unserved = min(units, end - self.given(flow))
        if unserved <= 0:
            return
        flow.withdrawn += unserved
        flow.finish -= unserved / flow.weight
        if flow.finish > self.level:
            self._push(flow)  # the old entry is now stale
        else:
            self._settle(flow, self.level)

    def _settle(self, flow: _Flow, level: float) -> None:
        """The reference owes the flow nothing more: credit what it served and drop the flow."""
        flow.owed = False
        flow.ftick = 0
        flow.credit += flow.weight * (level - flow.join)
        self.owing -= 1
        self.weight = self.weight - flow.weight if self.owing else 0.0

    def serve(self, units: float) -> None:
        """The band dispatched `units`: water-fill them over the owed flows by weight, capped by demand."""
        heap = self.heap
        while units > 0 and self.owing:
            finish, tick, flow = heap[0]
            if tick != flow.ftick:
                heapq.heappop(heap)
                continue
            if finish < flow.finish:
                heapq.heapreplace(heap, (flow.finish, tick, flow))
                continue
            need = (finish - self.level) * self.weight
            if need > units:
                self.level += units / self.weight
                return
            units -= need
            self.level = max(self.level, finish)
            heapq.heappop(heap)
            self._settle(flow, finish)

    def given(self, flow: _Flow) -> float:
        """What the reference has served the flow so far, all run."""
        return flow.credit + (flow.weight * (self.level - flow.join) if flow.owed else 0.0)


class _Gap:
    """The largest service difference between backlogged flows of one band (VTC paper style).

    Each backlogged flow's weighted service `rel` counts from when it became backlogged, starting
    level with the least-served backlogged flow. Min- and max-heaps of `rel`, stale entries skipped.
    """

    def __init__(self) -> None:
        self.backlogged = 0
        self.low: list[tuple[float, int, _Flow]] = []
        self.high: list[tuple[float, int, _Flow]] = []
        self.tick = 0
        self.max = 0.0

    @staticmethod
    def _top(heap: list[tuple[float, int, _Flow]]) -> float | None:
        while heap:
            value, tick, flow = heap[0]
            if tick == flow.stamp:
                return value
            heapq.heappop(heap)
        return None

    def _push(self, flow: _Flow) -> None:
        self.tick += 1
        flow.stamp = tick = self.tick
        heapq.heappush(self.low, (flow.rel, tick, flow))
        heapq.heappush(self.high, (-flow.rel, tick, flow))
        self.low = compacted(self.low, self.backlogged, _stamped)
        self.high = compacted(self.high, self.backlogged, _stamped)

    def start(self, flow: _Flow) -> None:
        low = self._top(self.low)
        flow.rel = 0.0 if low is None else low
        self.backlogged += 1
        self._push(flow)

    def end(self, flow: _Flow) -> None:
        flow.stamp = 0
        self.backlogged -= 1

    def advance(self, flow: _Flow, units: float, measuring: bool) -> None:
        flow.rel += units / flow.weight
        self._push(flow)
        if measuring and self.backlogged > 1:
            low, high = self._top(self.low), self._top(self.high)
            if low is not None and high is not None and -high - low > self.max:
                self.max = -high - low

    def restart(self, flows: Iterable[_Flow]) -> None:
        """Count from now: every backlogged flow starts level."""
        self.low, self.high = [], []
        for flow in flows:
            flow.rel = 0.0
            if flow.stamp:
                self._push(flow)


class _Band:
    """One band's flows and fairness bookkeeping, in the unit its policy equalises."""

    def __init__(self, engine_band: EngineBand) -> None:
        self.config = config = engine_band.config
        self.unit = UNITS[config.fairness]
        self.kind = _UNIT_KIND[self.unit]
        self.flows: list[_Flow] = []
        self.units = 0.0  # service in the window
        self.inversions = 0
        self.reference = _Reference()
        self.gap = _Gap()

    def units_of(self, request: Request) -> float:
        kind = self.kind
        if kind == _REQUESTS:
            return 1.0
        if kind == _BYTES:
            return float(request.size)
        return float(request.tokens or request.size)

    def start_window(self, engine_bands: Sequence[EngineBand]) -> None:
        """Warmup is over: fairness figures count from here. What a flow still has queued (on any
        shard) is demand in the window (the first piece of the reference's window)."""
        self.units = 0.0
        for flow in self.flows:
            flow.units = 0.0
            flow.credit0 = self.reference.given(flow)
            for engine_band in engine_bands:
                queue = engine_band.flows.get(flow.id)
                if queue is not None and queue.queue.live and flow.offered:
                    flow.offered[0] += sum(self.units_of(item.request) for item in queue.queue.items())
        self.gap.restart(self.flows)


# ---------------------------------------------------------------------------------------- simulation


class _Simulation:
    """The event loop. Events: (time, seq, kind, flow, payload) in a heap; seq keeps order total."""

    def __init__(self, scenario: Scenario, records: bool = False, shards: int = 1, *, sharded: bool = False,
                 blocks: bool = False) -> None:
        workload = scenario.workload
        self.scenario = scenario
        self.duration = workload.duration
        self.warmup = workload.warmup
        self.drain = workload.drain
        self.shards = shards
        # one shard: the engine itself, on its own budget; more: the service's ledger and N engines
        self.engine: Engine | ShardedService
        if shards < 1 or (shards > 1 and not sharded):
            raise ValueError(f"{shards} shards: at least 1, and more than 1 only as the sharded service")
        if not sharded:
            single = Engine(scenario.server)
            self.engine, self.engines = single, [single]
        else:
            service = ShardedService(scenario.server, shards, track=records, blocks=blocks)
            self.engine, self.engines = service, service.engines
        engine = self.engine
        self.bands = [_Band(b) for b in engine.bands]
        weights = flow_weights(scenario)
        self.flows: list[_Flow] = []
        for index, source in enumerate(flow_sources(workload)):
            spec = source.instance.spec
            band = self.bands[engine.band_index(spec.priority)]
            flow = _Flow(index, source, band, weights[source.instance.id], self.duration)
            band.flows.append(flow)
            self.flows.append(flow)
        self.cuts = segments(scenario)
        for flow in self.flows:
            flow.offered = [0.0] * (len(self.cuts) - 1)
            if len(flow.band.flows) <= MAX_PAIRED_FLOWS:
                flow.backlogs, flow.dispatches = array("d"), array("d")
        # every dispatch, in order: flow index, arrival sequence (= request id), in the window?
        self.dispatch_flow = array("q")
        self.dispatch_seq = array("q")
        self.dispatch_in = array("b")
        self.records: list[list[object]] | None = [] if records else None
        budget = engine.budget
        self.checker = PriorityChecker([b.ceiling for b in engine.bands], budget.max_requests, budget.max_bytes)
        self.heap: list[tuple[float, int, int, _Flow, object]] = []
        self.seq = 0
        self.next_id = 0
        # request id -> (flow, service time, end position in the reference queue, flow's withdrawn then)
        self.pending: dict[int, tuple[_Flow, float, float, float]] = {}
        self.events = 0
        self.now = 0.0
        self.tracking = True  # now <= duration: the fair reference and the difference tracker run
        self.measuring = self.warmup == 0  # inside [warmup, duration]
        self.ending = False

    def _push(self, at: float, kind: int, flow: _Flow, data: object) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, self.seq, kind, flow, data))

    def _start(self) -> None:
        for flow in self.flows:
            start = flow.instance.spec.start
            clients = flow.closed.concurrency if flow.closed is not None else 1
            kind = _CLIENT if flow.closed is not None else _ARRIVAL
            for _ in range(clients):
                shape = flow.source.next()
                if start + shape[0] < flow.stop:
                    self._push(start + shape[0], kind, flow, shape)

    def run(self, progress: Progress | None = None) -> float:
        """Process events until the end; returns the simulated end time. `progress(now, events)` is
        called every few thousand steps, so a caller can show how far a long run has come."""
        self._start()
        engine = self.engine
        heap = self.heap
        horizon = _INF if self.drain else self.duration
        next_gc = _GC_PERIOD
        steps = 0
        while True:
            steps += 1
            if steps == _PROGRESS_STEPS:
                steps = 0
                if progress is not None:
                    progress(self.now, self.events)
            deadline = engine.next_deadline()
            now = heap[0][0] if heap else _INF
            if deadline < now:
                now = deadline
            if now > horizon or now == _INF:
                break
            self.now = now
            if now > self.duration:
                self.tracking = self.measuring = False
            elif not self.measuring and now >= self.warmup:
                self._start_window()
            while heap and heap[0][0] == now:
                _, _, kind, flow, data = heapq.heappop(heap)
                self.events += 1
                self._event(kind, flow, data, now)
            if deadline <= now:
                self.events += 1
                engine.expire(now)
            if now >= next_gc:
                engine.collect_garbage(now)
                next_gc = now + _GC_PERIOD
            self._settle(now)
        end = self.now if self.drain else self.duration
        self.ending = True
        self.tracking = self.measuring = False
        engine.shutdown(end)
        self._deliver(engine.take_outbox(), end)
        return end

    def _start_window(self) -> None:
        """Warmup is over: fairness figures count from now."""
        self.measuring = True
        for index, band in enumerate(self.bands):
            band.start_window([engine.bands[index] for engine in self.engines])

    def _event(self, kind: int, flow: _Flow, data: object, now: float) -> None:
        if kind == _ARRIVAL:
            self._submit(flow, cast(_Shape, data), now)
            shape = flow.source.next()
            if now + shape[0] < flow.stop:
                self._push(now + shape[0], _ARRIVAL, flow, shape)
        elif kind == _CLIENT:
            self._submit(flow, cast(_Shape, data), now)
        else:
            self.engine.release(cast(Item, data))
            self._client_next(flow, now, failed=False)

    def _submit(self, flow: _Flow, shape: _Shape, now: float) -> None:
        _, size, tokens, service = shape
        rid = self.next_id
        self.next_id = rid + 1
        request = Request(rid, flow.id, flow.priority, size, flow.ttl, flow.slo, tokens, flow.request_weight)
        flow.submitted += 1
        if self.measuring:  # an arrival is demand, whatever becomes of it
            cut = min(bisect_right(self.cuts, now) - 1, len(flow.offered) - 1)
            flow.offered[cut] += flow.band.units_of(request)
        item = self.engine.submit(request, now)
        end = 0.0
        if item.state == _QUEUED or item.outcome == _DISPATCHED:  # (N shards: the idle fast path)
            if self.tracking:
                end = flow.band.reference.demand(flow, flow.band.units_of(request))
            flow.queued += 1
            if flow.queued == 1:
                flow.backlog_since = now
                if self.tracking:
                    flow.band.gap.start(flow)
        self.pending[rid] = (flow, service, end, flow.withdrawn)

    def _client_next(self, flow: _Flow, now: float, *, failed: bool) -> None:
        """A closed-loop client's request ended: it thinks (or backs off), then sends its next one."""
        closed = flow.closed
        if closed is None or self.ending:
            return
        shape = flow.source.next()
        gap = max(shape[0], closed.backoff) if failed else shape[0]
        if now + gap < flow.stop:
            self._push(now + gap, _CLIENT, flow, shape)

    def _settle(self, now: float) -> None:
        """Deliver what happened at `now`, pump the engine, and deliver the pump's outcomes."""
        engine = self.engine
        out = engine.take_outbox()
        if out:
            self._deliver(out, now)
        dispatched = engine.pump(now)
        out = engine.take_outbox()
        if dispatched and len(self.bands) > 1:
            self._check_priority(out)
        if out:
            self._deliver(out, now)

    def _check_priority(self, out: list[Item]) -> None:
        """Replay one pump's outcomes from the state before it (rebuilt: the pump only removed `out`)."""
        engine = self.engine
        engines = self.engines
        queued = [sum(e.bands[i].queued_items for e in engines) for i in range(len(self.bands))]
        inflight, inflight_bytes = engine.budget.inflight, engine.budget.inflight_bytes
        for item in out:
            queued[item.band] += 1
            if item.outcome == _DISPATCHED:
                inflight -= 1
                inflight_bytes -= item.request.size
        outcomes = ((item.band, item.outcome == _DISPATCHED, item.request.size) for item in out)
        for band, n in zip(self.bands, self.checker.count(queued, inflight, inflight_bytes, outcomes), strict=True):
            band.inversions += n

    def _deliver(self, items: list[Item], now: float) -> None:
        records = self.records
        for item in items:
            flow, service, end, withdrawn = self.pending.pop(item.request.id)
            outcome = item.outcome
            if records is not None:
                records.append(self._record(flow, item, service, now))
            if outcome == _DISPATCHED:
                self._dispatched(flow, item, service, now)
            elif outcome in _REJECTED:
                flow.outcomes[outcome] += 1
                self._client_next(flow, now, failed=True)
            else:
                if self.ending:
                    flow.unfinished += 1
                else:
                    flow.outcomes[outcome] += 1
                    if self.tracking:
                        flow.band.reference.withdraw(flow, flow.band.units_of(item.request), end, withdrawn)
                    self._client_next(flow, now, failed=True)
                self._dequeued(flow, now)

    def _dispatched(self, flow: _Flow, item: Item, service: float, now: float) -> None:
        request = item.request
        flow.outcomes[_DISPATCHED] += 1
        flow.waits.append(item.wait)
        flow.served_bytes += request.size
        flow.served_tokens += request.tokens
        self.dispatch_flow.append(flow.index)
        self.dispatch_seq.append(request.id)
        self.dispatch_in.append(self.measuring)
        if self.measuring:
            flow.busy += service
            flow.busy_bytes += service * request.size
            if flow.dispatches is not None:
                flow.dispatches.extend((now, flow.band.units_of(request) / flow.weight))
        if self.tracking:
            band = flow.band
            units = band.units_of(request)
            band.reference.serve(units)
            band.gap.advance(flow, units, self.measuring)
            if self.measuring:
                band.units += units
                flow.units += units
        self._push(now + service, _DONE, flow, item)
        self._dequeued(flow, now)

    def _record(self, flow: _Flow, item: Item, service: float, now: float) -> list[object]:
        """One per-request record (see RECORD_COLUMNS)."""
        request = item.request
        dispatched = item.outcome == _DISPATCHED
        label = "unfinished" if self.ending and not dispatched else Outcome(item.outcome).label
        # the shard that held it: one shard, 0; N shards, as routed (-1: the fast path); null: never queued
        # (rejected: at one shard too, a review)
        where = self.engine.where if isinstance(self.engine, ShardedService) else None
        if where is not None:
            shard = where.pop(request.id, None)
        else:
            shard = None if item.outcome in _REJECTED else 0
        return [
            flow.id, flow.band.config.name, request.id, _r(item.enqueued_at, 9),
            _r(now, 9) if dispatched else None, _r(now + service if dispatched else now, 9), shard, label,
            request.size, request.tokens, _r(service, 9) if dispatched else None,
        ]

    def _dequeued(self, flow: _Flow, now: float) -> None:
        flow.queued -= 1
        if flow.queued:
            return
        start, stop = max(flow.backlog_since, self.warmup), min(now, self.duration)
        if stop > start:
            flow.backlog_time += stop - start
        if stop >= start and flow.backlogs is not None:
            flow.backlogs.extend((start, stop))
        if flow.stamp:
            flow.band.gap.end(flow)


def simulate(scenario: Scenario, progress: Progress | None = None, *, shards: int = 1) -> Report:
    """Run the scenario in virtual time and report every figure. Deterministic: a pure function
    (`progress`, if given, only watches: see `_Simulation.run`). `shards` > 1 simulates the service:
    the distributor's ledger and that many shard engines (flowshard.multisim)."""
    return simulate_with_records(scenario, records=False, progress=progress, shards=shards)[0]


def simulate_with_records(
    scenario: Scenario, *, records: bool = True, progress: Progress | None = None, shards: int = 1,
    sharded: bool | None = None, blocks: bool = False,
) -> tuple[Report, list[list[object]]]:
    """`simulate`, and (if `records`) one record per request in the order their outcomes came.

    `sharded`: True runs the service's composition (ledger + engines) even at one shard, False the
    single engine on its own budget (one shard only); default: the engine at one shard. `blocks`: the
    shards get a pass's grants as the distributor writes them (`multisim.ShardedService`)."""
    sim = _Simulation(scenario, records, shards, sharded=shards > 1 if sharded is None else sharded,
                      blocks=blocks)
    end = sim.run(progress)
    return _Reporter(sim, end).report(), sim.records or []


# ---------------------------------------------------------------------------------------- figures


def _r(value: float, digits: int = 6) -> float:
    return round(value, digits)


def _overtaken(sim: _Simulation, band_of: list[int]) -> list[float | None]:
    """Per band: the fraction of its dispatches in the window that overtook an earlier request of their flow."""
    flow = np.frombuffer(sim.dispatch_flow, dtype=np.int64)
    inside = np.frombuffer(sim.dispatch_in, dtype=np.int8).astype(bool)
    over = overtakes(flow, np.frombuffer(sim.dispatch_seq, dtype=np.int64))
    band = np.asarray(band_of, dtype=np.int64)[flow] if len(flow) else np.zeros(0, dtype=np.int64)
    out: list[float | None] = []
    for b in range(len(sim.bands)):
        mine = inside & (band == b)
        n = int(np.count_nonzero(mine))
        out.append(_r(int(np.count_nonzero(over & mine)) / n) if n else None)
    return out


def _pairwise(band: _Band) -> float | None:
    """The band's service difference as the VTC paper defines it (flowshard.analysis)."""
    backlog, served = {}, {}
    for flow in band.flows:
        if flow.backlogs is None or flow.dispatches is None:
            return None
        b = np.frombuffer(flow.backlogs, dtype=np.float64).reshape(-1, 2)
        d = np.frombuffer(flow.dispatches, dtype=np.float64).reshape(-1, 2)
        backlog[flow.index] = union_intervals(b[:, 0], b[:, 1])
        served[flow.index] = (d[:, 0], d[:, 1])
    value = pairwise_service_difference(backlog, served)
    return None if value is None else _r(value, 3)


def _all_fair(verdicts: Sequence[Verdict]) -> bool | None:
    judged = [v.fair for v in verdicts if v.fair is not None]
    return all(judged) if judged else None


def _waits(waits: list[float]) -> Waits:
    if not waits:
        return Waits(p50=None, p90=None, p99=None, max=None)
    waits = sorted(waits)
    return Waits(
        p50=_r(percentile(waits, 0.5)),
        p90=_r(percentile(waits, 0.9)),
        p99=_r(percentile(waits, 0.99)),
        max=_r(waits[-1]),
    )


def _counts(flows: Sequence[_Flow]) -> Counts:
    outcomes = [sum(column) for column in zip(*(f.outcomes for f in flows), strict=True)] or [0] * len(Outcome)
    return Counts(
        submitted=sum(f.submitted for f in flows),
        dispatched=outcomes[_DISPATCHED],
        rejected={o.reason: outcomes[o] for o in _REJECTED},
        evicted={o.reason: outcomes[o] for o in _EVICTED},
        unfinished=sum(f.unfinished for f in flows),
    )


def _served(flows: Sequence[_Flow]) -> Served:
    return Served(
        requests=sum(f.outcomes[_DISPATCHED] for f in flows),
        bytes=sum(f.served_bytes for f in flows),
        tokens=sum(f.served_tokens for f in flows),
    )


class _Reporter:
    """Turns the final simulation state into a Report (rounded, so the JSON is stable and short)."""

    def __init__(self, sim: _Simulation, end: float) -> None:
        self.sim = sim
        self.end = end
        self.window = sim.duration - sim.warmup
        self.share: dict[int, float | None] = {}
        self.fair: dict[int, float | None] = {}
        for band in sim.bands:
            for flow in band.flows:
                total = band.units
                self.share[flow.index] = flow.units / total if total > 0 else None
                self.fair[flow.index] = (band.reference.given(flow) - flow.credit0) / total if total > 0 else None
        position = {id(b): i for i, b in enumerate(sim.bands)}
        band_of = [position[id(f.band)] for f in sim.flows]
        flows = sim.flows
        self.refs, self.verdicts = judge(
            sim.scenario, [b.unit for b in sim.bands], band_of, [f.id for f in flows],
            [f.instance.spec for f in flows], [f.weight for f in flows], [f.offered for f in flows],
            [f.units for f in flows], [(f.busy, f.busy_bytes) for f in flows],
        )
        self.overtaken = _overtaken(sim, band_of)

    def ratio(self, flow: _Flow) -> float | None:
        """share / fair_share of a flow that was backlogged in the window; None otherwise."""
        share, fair = self.share[flow.index], self.fair[flow.index]
        if flow.backlog_time <= 0 or share is None or not fair:
            return None
        return share / fair

    def jain(self, flows: Iterable[_Flow]) -> tuple[float | None, int]:
        """Jain's index over measured / allocation (the intrinsic-demand reference) of the flows that had
        an allocation, and how many flows were backlogged in the window."""
        flows = list(flows)
        refs = [self.refs[f.index] for f in flows]
        ratios = [r.measured / r.allocation for r in refs if r.allocation > 0]
        backlogged = sum(1 for f in flows if f.backlog_time > 0)
        return (_r(jain_index(ratios)) if ratios else None), backlogged

    def report(self) -> Report:
        sim = self.sim
        flows = sim.flows
        workload = sim.scenario.workload
        jain, backlogged = self.jain(flows)
        served = _served(flows)
        end = self.end
        totals = Totals(
            counts=_counts(flows),
            inflight_at_end=sim.engine.budget.inflight,
            throughput=Throughput(
                requests=_r(served.requests / end, 3),
                bytes=_r(served.bytes / end, 3),
                tokens=_r(served.tokens / end, 3),
            ),
            served=served,
            jain=jain,
            fair=_all_fair(self.verdicts),
            backlogged_flows=backlogged,
            priority_inversions=sum(b.inversions for b in sim.bands),
            events=sim.events,
        )
        return Report(
            scenario=sim.scenario.name,
            seed=workload.seed,
            duration=workload.duration,
            warmup=workload.warmup,
            drain=workload.drain,
            end=_r(end),
            totals=totals,
            bands=[self.band(i, b) for i, b in enumerate(sim.bands)],
            groups=self.groups(),
            flows=[self.flow(f) for f in flows],
            shards=sim.shards,
            sharding=self.sharding(),
        )

    def sharding(self) -> ShardReport | None:
        service = self.sim.engine
        if self.sim.shards == 1 or not isinstance(service, ShardedService):
            return None
        flows = [0] * service.n
        for counts in service.flow_shards.values():
            for shard, n in enumerate(counts):
                flows[shard] += n > 0
        return ShardReport(queued=list(service.routed), dispatched=list(service.dispatched), flows=flows,
                           fast_path=service.fast_paths, grants_handed_back=service.grantbacks,
                           grants_narrowed=service.narrowed)

    def flow_shards(self, flow: _Flow) -> list[int] | None:
        """N shards: the flow's requests queued on each shard; None at one shard."""
        service = self.sim.engine
        if self.sim.shards == 1 or not isinstance(service, ShardedService):
            return None
        band = self.sim.bands.index(flow.band)
        return list(service.flow_shards.get((band, flow.id), [0] * service.n))

    def band(self, index: int, band: _Band) -> BandReport:
        jain, backlogged = self.jain(band.flows)
        config = band.config
        return BandReport(
            priority=config.priority,
            name=config.name,
            fairness=config.fairness,
            ordering=config.ordering,
            unit=band.unit,
            flows=len(band.flows),
            backlogged_flows=backlogged,
            counts=_counts(band.flows),
            wait=_waits([w for f in band.flows for w in f.waits]),
            served=_served(band.flows),
            throughput=_r(sum(f.outcomes[_DISPATCHED] for f in band.flows) / self.end, 3),
            jain=jain,
            max_service_diff=_r(band.gap.max, 3),
            priority_inversions=band.inversions,
            service_diff=_pairwise(band),
            reference=self.verdicts[index],
            overtaken=self.overtaken[index],
            flows_per_shard=self.flows_per_shard(band),
        )

    def flows_per_shard(self, band: _Band) -> list[int] | None:
        """N shards: how many of the band's flows queued on each shard; None at one shard."""
        per_flow = [self.flow_shards(f) for f in band.flows]
        if not per_flow or per_flow[0] is None:
            return None
        return [sum(1 for counts in per_flow if counts is not None and counts[n]) for n in range(self.sim.shards)]

    def flow(self, flow: _Flow) -> FlowReport:
        share, fair = self.share[flow.index], self.fair[flow.index]
        ref: FlowRef = self.refs[flow.index]
        err = None if ref.allocation <= 0 else (ref.measured - ref.allocation) / ref.allocation
        return FlowReport(
            id=flow.id,
            group=flow.instance.spec.id,
            priority=flow.priority,
            band=flow.band.config.name,
            weight=flow.weight,
            counts=_counts([flow]),
            wait=_waits(flow.waits),
            served=_served([flow]),
            backlogged=_r(flow.backlog_time / self.window),
            share=None if share is None else _r(share),
            fair_share=None if fair is None else _r(fair),
            demand=_r(ref.demand),
            allocation=_r(ref.allocation),
            measured=_r(ref.measured),
            error=None if err is None else _r(err),
            shards=self.flow_shards(flow),
        )

    def groups(self) -> list[GroupReport]:
        members: dict[str, list[_Flow]] = {}
        for flow in self.sim.flows:
            members.setdefault(flow.instance.spec.id, []).append(flow)
        return [self.group(group_id, flows) for group_id, flows in members.items()]

    def group(self, group_id: str, flows: list[_Flow]) -> GroupReport:
        shares = [s for s in (self.share[f.index] for f in flows) if s is not None]
        fairs = [s for s in (self.fair[f.index] for f in flows) if s is not None]
        ratios = [r for r in map(self.ratio, flows) if r is not None]
        first = flows[0]
        return GroupReport(
            id=group_id,
            flows=len(flows),
            priority=first.priority,
            band=first.band.config.name,
            counts=_counts(flows),
            wait=_waits([w for f in flows for w in f.waits]),
            served=_served(flows),
            share=_r(sum(shares)) if shares else None,
            fair_share=_r(sum(fairs)) if fairs else None,
            ratio_min=_r(min(ratios)) if ratios else None,
            ratio_max=_r(max(ratios)) if ratios else None,
        )


# ---------------------------------------------------------------------------------------- output


def encode_report(report: Report) -> bytes:
    """The report as JSON with sorted keys: byte-identical for the same scenario."""
    return msgspec.json.encode(report, order="sorted")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _reasons(counts: Sequence[Counts]) -> list[tuple[str, str]]:
    """(column title, key) for every rejection/eviction reason that occurred anywhere."""
    columns = []
    for reason in (o.reason for o in _REJECTED):
        if any(c.rejected[reason] for c in counts):
            columns.append((f"rej:{reason}", f"rejected:{reason}"))
    for reason in (o.reason for o in _EVICTED):
        if any(c.evicted[reason] for c in counts):
            columns.append((f"ev:{reason}", f"evicted:{reason}"))
    return columns


def _count(counts: Counts, key: str) -> int:
    status, _, reason = key.partition(":")
    return (counts.rejected if status == "rejected" else counts.evicted)[reason]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = [f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths)]
    return ["  ".join(f.format(c) for f, c in zip(fmt, row, strict=True)).rstrip() for row in [header, *rows]]


def render_table(report: Report) -> str:
    """The human report: one row per flow entry (a `count` group is one row), one per band, totals."""
    totals = report.totals
    mode = "drain" if report.drain else "stop"
    shards = "" if report.shards == 1 else f", {report.shards} shards"
    lines = [
        f"scenario {report.scenario or '(unnamed)'}: seed {report.seed}, duration {report.duration:g} s "
        f"(warmup {report.warmup:g} s, end: {mode} at {report.end:g} s), {totals.events} events{shards}",
        "",
        *_group_table(report),
        "",
        *_band_table(report),
        "",
        *_total_lines(totals),
        *_shard_lines(report),
    ]
    return "\n".join(lines) + "\n"


def _shard_lines(report: Report) -> list[str]:
    """N shards: one line, what each shard queued and dispatched and how many flows it held."""
    s = report.sharding
    if s is None:
        return []
    each = "; ".join(f"{n}: {q} queued, {d} dispatched, {f} flows"
                     for n, (q, d, f) in enumerate(zip(s.queued, s.dispatched, s.flows, strict=True)))
    return [f"shards: {each}; fast path {s.fast_path}, grants handed back {s.grants_handed_back} "
            f"({s.grants_narrowed} narrowed)"]


def _group_table(report: Report) -> list[str]:
    reasons = _reasons([g.counts for g in report.groups])
    header = ["flow", "prio", "flows", "submitted", "dispatched", *(t for t, _ in reasons), "unfinished"]
    header += ["wait p50 ms", "p90", "p99", "max", "req/s", "backlogged", "share", "fair", "ratio min..max"]
    backlog: dict[str, list[float]] = {}
    for f in report.flows:
        backlog.setdefault(f.group, []).append(f.backlogged)
    rows = []
    for g in report.groups:
        c, w = g.counts, g.wait
        ratio = "-" if g.ratio_min is None else f"{g.ratio_min:.3f}..{g.ratio_max:.3f}"
        row = [g.id, str(g.priority), str(g.flows), str(c.submitted), str(c.dispatched)]
        row += [str(_count(c, key)) for _, key in reasons]
        row += [str(c.unfinished), _ms(w.p50), _ms(w.p90), _ms(w.p99), _ms(w.max), f"{c.dispatched / report.end:.1f}"]
        row += [_pct(sum(backlog[g.id]) / len(backlog[g.id])), _pct(g.share), _pct(g.fair_share), ratio]
        rows.append(row)
    return _table(header, rows)


def _band_table(report: Report) -> list[str]:
    header = ["band", "prio", "fairness", "unit", "flows", "dispatched", "req/s", "wait p50 ms", "p99"]
    header += ["jain", "max ref err", "max service diff", "pairwise", "overtaken", "inversions"]
    rows = []
    for b in report.bands:
        jain = "-" if b.jain is None else f"{b.jain:.4f}"
        row = [b.name, str(b.priority), b.fairness, b.unit, str(b.flows), str(b.counts.dispatched)]
        row += [f"{b.throughput:.1f}", _ms(b.wait.p50), _ms(b.wait.p99), jain, _pct(b.reference.max_error)]
        pairwise = "-" if b.service_diff is None else f"{b.service_diff:g}"
        row += [f"{b.max_service_diff:g}", pairwise, _pct(b.overtaken), str(b.priority_inversions)]
        rows.append(row)
    return [*_table(header, rows), *(reference_line(b.name, b.fairness, b.unit, b.reference) for b in report.bands)]


def reference_line(name: str, fairness: str, unit: str, verdict: Verdict, most: int = 6) -> str:
    """One line per band: does every flow get its max-min allocation of intrinsic demand, within the margin?"""
    margin = f"{verdict.margin * 100:g}%"
    head = f"reference {name} ({fairness}, {unit}): "
    if verdict.bound == "service":  # a peak run: the service's own rate, not the budget, held it back
        used = f"{verdict.slots:.3g} slots" if verdict.slots is not None else "the slots"
        head += f"[service-bound: the budget had room; judged on the {used} it used] "
    few = (f"; {verdict.unjudged} flows with an allocation under {MIN_JUDGED:g} requests in the window not "
           "judged (a request more or less is a fifth of it)") if verdict.unjudged else (
        f"; {verdict.pooled} flows with an allocation under {MIN_JUDGED:g} requests in the window judged "
        "together") if verdict.pooled else ""
    if verdict.fair is None:
        return head + ("nothing to judge (no flow had an allocation" if not verdict.unjudged else
                       f"nothing to judge ({verdict.unjudged} flows, each with an allocation under {MIN_JUDGED:g} "
                       "requests in the window: a request more or less is a fifth of it") + ")"
    if verdict.fair:
        if verdict.max_error is not None and verdict.max_error > verdict.margin:  # let through as noise
            return head + (f"fair: every flow within {margin} plus its sampling noise of its max-min allocation "
                           f"of intrinsic demand (largest error {verdict.max_error * 100:.1f}%, within that "
                           f"flow's sampling noise: its requests vary, and a short run judges loosely{few})")
        return head + f"fair: every flow within {margin} of its max-min allocation of intrinsic demand" + (
            f" ({few[2:]})" if few else "")
    more = f" (+{len(verdict.off) - most} more)" if len(verdict.off) > most else ""
    return head + f"UNFAIR: {len(verdict.off)} flows off their max-min allocation by more than {margin}: " + \
        ", ".join(verdict.off[:most]) + more + few


def _total_lines(totals: Totals) -> list[str]:
    c, rate = totals.counts, totals.throughput
    jain = "-" if totals.jain is None else f"{totals.jain:.4f}"
    return [
        f"total: {c.submitted} submitted, {c.dispatched} dispatched, {sum(c.rejected.values())} rejected, "
        f"{sum(c.evicted.values())} evicted, {c.unfinished} unfinished, {totals.inflight_at_end} in flight at end",
        # (the whole run, as the counts above: the warmup included, which the fairness figures leave out;
        # review 181 read it against the window's)
        f"throughput (the whole run, as the counts): {rate.requests:.1f} req/s, {rate.bytes:.0f} B/s, "
        f"{rate.tokens:.0f} tokens/s",
        f"fairness: Jain {jain} (measured / max-min allocation), {totals.backlogged_flows} flows backlogged; "
        f"max-min reference: {'-' if totals.fair is None else 'fair' if totals.fair else 'UNFAIR'}; "
        f"priority inversions: {totals.priority_inversions}",
    ]


# ---------------------------------------------------------------------------------------- command


def demo_text() -> str:
    """The built-in demo scenario: `bench/scenarios/demo.toml`, shipped as package data."""
    try:
        return importlib.resources.files("bench").joinpath("scenarios/demo.toml").read_text()
    except (ModuleNotFoundError, OSError) as exc:
        raise ConfigError(f"built-in demo scenario not found: {exc}") from None


def _shipped(name: str) -> str | None:
    """The text of shipped scenario `name` (package data), or None."""
    try:
        path = importlib.resources.files("bench").joinpath(f"scenarios/{name}.toml")
        return path.read_text() if path.is_file() else None
    except (ModuleNotFoundError, OSError):
        return None


def shipped_names() -> list[str]:
    """The names of the shipped scenarios (bench/scenarios/NAME.toml), sorted; [] if not found."""
    try:
        folder = importlib.resources.files("bench").joinpath("scenarios")
        return sorted(f.name.removesuffix(".toml") for f in folder.iterdir() if f.name.endswith(".toml"))
    except (ModuleNotFoundError, OSError):
        return []


LIST_HINT = "`flowshard simulate --help` lists every shipped scenario"


def _no_scenario(path: str, strerror: str | None) -> str:
    """The error for a scenario that is neither a readable file nor a shipped name: the shipped
    names close to what was given (difflib), and where to see them all."""
    name = Path(path).name.removesuffix(".toml")
    names = shipped_names()
    # the start of a name (`ttl` -> `ttl-storm`), else difflib's closest, as config.py suggests a key
    close = [n for n in names if name and n.startswith(name)][:5] or difflib.get_close_matches(name, names, n=3)
    if "/" not in path and not path.endswith(".toml"):  # given as a name
        head = f"{path}: no such file, and no shipped scenario has that name"
    else:
        head = f"{path}: cannot read: {strerror}"
    if close:
        meant = " or ".join(f"`{c}`" for c in close)
        return f"{head}; did you mean {meant}? ({LIST_HINT})"
    return f"{head} ({LIST_HINT})"


def shipped_scenarios() -> list[tuple[str, str, bool]]:
    """(name, description, simulates in seconds) of every shipped scenario, by name."""
    try:
        folder = importlib.resources.files("bench").joinpath("scenarios")
        files = sorted((f for f in folder.iterdir() if f.name.endswith(".toml")), key=lambda f: f.name)
    except (ModuleNotFoundError, OSError) as exc:
        raise ConfigError(f"shipped scenarios not found: {exc}") from None
    out = []
    for f in files:
        scenario = load_scenario(f.read_text(), where=f.name)
        out.append((f.name.removesuffix(".toml"), scenario.description, estimate(scenario).seconds <= WARN_SECONDS))
    return out


def check_writable(flag: str, path: str | None) -> None:
    """An output file the run will write (`--json`, `--records`, `--plot`) must be in a writable folder,
    checked before the run rather than after it (a review: a two-minute simulation, then "cannot write")."""
    if path is None:
        return
    if not path or Path(path).is_dir():  # (a review: both passed, and failed after the run)
        raise ConfigError(f"{flag}: cannot write {path!r}: a file's path is needed")
    folder = Path(path).resolve().parent
    if not (folder.is_dir() and os.access(folder, os.W_OK)):
        raise ConfigError(f"{flag}: cannot write {path}: {folder} is not a writable folder")


def read_scenario(path: str | None) -> Scenario:
    """A scenario file, a shipped scenario by name (`weighted-drr`), or the built-in demo when None."""
    if path is None:
        return load_scenario(demo_text(), where="demo.toml")
    try:
        text = read_toml_file(path)
    except OSError as exc:
        shipped = _shipped(path) if "/" not in path and not path.endswith(".toml") else None
        if shipped is None:
            if isinstance(exc, FileNotFoundError):
                raise ConfigError(_no_scenario(path, exc.strerror)) from None
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        return load_scenario(shipped, where=f"{path}.toml")
    return load_scenario(text, where=path)


WARN_SECONDS = 10.0  # an estimated run longer than this is announced before it starts
REFUSE_SECONDS = 120.0  # one longer than this is not started without --force


def check_size(scenario: Scenario, where: str, *, force: bool = False, shards: int = 1) -> str | None:
    """Refuse (ConfigError) a scenario estimated to take over REFUSE_SECONDS unless `force`; return a
    warning for one over WARN_SECONDS, else None. Either message names the heaviest flows and what
    to change. `shards` > 1 costs more per event (estimate.SHARDED_COST)."""
    est = estimate(scenario, shards)
    if est.seconds <= WARN_SECONDS:
        return None
    at = f"{shards} shards, " if shards > 1 else ""
    head = (f"{where}: about {est.events:,.0f} events to simulate ({est.requests:,.0f} requests), "
            f"roughly {_human(est.seconds)} ({at}~{events_per_second(shards) / 1000:.0f}k events/s)")
    flows = [f"  {f.id}: {f.why}: {f.per_second:,.0f} requests per virtual second" for f in est.flows[:3]]
    change = ("  To make it quicker: lengthen think or service times, lower the concurrency or the rates, or "
              f"shorten [workload] duration (now {scenario.workload.duration:g} s).")
    if est.seconds <= REFUSE_SECONDS or force:
        return "\n".join([f"{head}; progress below.", *flows, change])
    raise ConfigError("\n".join([
        f"{head}; not run (--force runs it anyway).", *flows, change,
        "  A scenario of zero service times and microsecond think times measures the real service's own cost "
        "per request, not its policies: run it with `flowshard bench` instead."]))


def _human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:,.1f} hours"


def _seconds(t: float) -> str:
    """Virtual seconds for the progress line: 1,962 rather than 1.96e+03 (review 167), 0.25, 12.5."""
    return f"{t:,.0f}" if t >= 100 else f"{t:.3g}"


class Watch:
    """Progress of a long run on stderr: silent for the first seconds, then a line a second (rewritten
    in place on a terminal, one every 10 s into a file or pipe)."""

    def __init__(self, duration: float, err: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self.duration = duration
        self.err = err
        self.clock = clock
        self.start = clock()
        self.tty = err.isatty()
        self.next = self.start + 2.0
        self.shown = False

    def __call__(self, now: float, events: int) -> None:
        t = self.clock()
        if t < self.next:
            return
        self.next = t + (1.0 if self.tty else 10.0)
        spent = t - self.start
        if now <= self.duration:
            done = now / self.duration if self.duration else 1.0
            left = f", about {_human(spent / done - spent)} left" if done > 0.01 else ""
            where = f"{_seconds(now)} of {_seconds(self.duration)} virtual s ({done:.0%})"
        else:
            where, left = f"draining: {_seconds(now)} virtual s (arrivals stopped at {_seconds(self.duration)} s)", ""
        line = f"simulate: {where}, {events:,} events, {_human(spent)} so far{left}"
        self.err.write(f"\r{line}\033[K" if self.tty else line + "\n")
        self.err.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown and self.tty:
            self.err.write("\n")


def main(scenario_path: str | None, json_path: str | None = None, records_path: str | None = None, *,
         force: bool = False, err: TextIO | None = None, shards: int = 1) -> int:
    """`flowshard simulate`: check the scenario's size, run it with progress on stderr, print the table,
    and write the JSON report and the per-request records if asked. `shards` > 1: the service's
    distributor and that many shards (flowshard.multisim)."""
    err = err if err is not None else sys.stderr
    if not 1 <= shards <= MAX_SHARDS:
        raise ConfigError(f"--shards: {shards} is not allowed; 1 to {MAX_SHARDS}")
    check_writable("--json", json_path)
    check_writable("--records", records_path)
    scenario = read_scenario(scenario_path)
    warning = check_size(scenario, scenario_path or "demo.toml", force=force, shards=shards)
    if warning:
        err.write(f"flowshard: {warning}\n")
    watch = Watch(scenario.workload.duration, err)
    try:
        report, rows = simulate_with_records(scenario, records=records_path is not None, progress=watch,
                                             shards=shards)
    finally:
        watch.close()
    sys.stdout.write(render_table(report))
    outputs = []
    if json_path is not None:
        outputs.append((json_path, encode_report(report) + b"\n"))
    if records_path is not None:
        header: dict[str, object] = {"seed": scenario.workload.seed, **audit_header(scenario)}
        if shards > 1:
            header["shards"] = shards
        outputs.append((records_path, records.encode("simulate", scenario.name, rows, **header)))
    for path, data in outputs:
        try:
            Path(path).write_bytes(data)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot write: {exc.strerror}") from None
    return 0
