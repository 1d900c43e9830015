"""Property-based tests of the engine invariants (DESIGN.md §4) on random operation sequences.

A hypothesis state machine drives one engine built from a random small config (1-3 bands, each
fairness and ordering, random global/band/flow limits, displacement on or off, ceilings, TTLs) in
budget mode (pump/release) or grant mode (dispatch with band and byte caps), with random submits,
cancels, expiries, time steps and flow GC, and a shutdown at the end. After every step:
- exactly one outcome per request: the outbox never repeats an id; requests without an outcome are
  exactly the queued ones; at the end every request has one;
- admission matches an oracle of the limits and the displacement rule (no false rejections, no
  missed rejections, the right victims);
- limits are never exceeded; in-flight never exceeds the budget;
- counters reconcile: engine = bands = flows = what the queues really hold;
- dispatch honours strict priority, ceilings, the ordering (and global FCFS across flows), TTLs.
"""

from __future__ import annotations

import math

from conftest import Ledger, check_limits, make_config, reconcile
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from flowshard.engine import Engine
from flowshard.fairness import FAIRNESS
from flowshard.queues import ORDERINGS
from flowshard.types import Item, Outcome, Request

FLOWS = "abcd"
UNKNOWN_PRIORITY = 99


def _maybe(strategy):
    return st.none() | strategy


@st.composite
def small_configs(draw):
    priorities = draw(st.lists(st.sampled_from([0, 5, 10]), min_size=1, max_size=3, unique=True))
    bands = [
        {
            "priority": p,
            "fairness": draw(st.sampled_from(sorted(FAIRNESS))),
            "ordering": draw(st.sampled_from(sorted(ORDERINGS))),
            "max_bytes": draw(_maybe(st.integers(20, 200))),
            "max_requests": draw(_maybe(st.integers(1, 8))),
            "flow_max_bytes": draw(_maybe(st.integers(10, 100))),
            "flow_max_requests": draw(_maybe(st.integers(1, 5))),
            "ceiling": draw(st.sampled_from([0.5, 1.0])),
            "displacement": draw(st.booleans()),
        }
        for p in priorities
    ]
    for band in bands:  # (a drr key: on another policy's band it is a configuration error)
        quantum = draw(st.integers(1, 64))
        if band["fairness"] == "drr":
            band["quantum"] = quantum
    return make_config(
        bands,
        max_queued_bytes=draw(_maybe(st.integers(30, 300))),
        max_queued_requests=draw(_maybe(st.integers(2, 12))),
        max_inflight_requests=draw(_maybe(st.integers(1, 4))),
        max_inflight_bytes=draw(_maybe(st.integers(10, 100))),
        default_ttl=draw(st.sampled_from([0.0, 1.0, 3.0])),
        default_priority=draw(st.none() | st.sampled_from(priorities)),
        flow_gc_timeout=draw(st.sampled_from([0.0, 1.0, 5.0])),
        weights=draw(st.dictionaries(st.sampled_from(FLOWS), st.sampled_from([0.5, 1.0, 2.0, 3.0]), max_size=4)),
    )


def live_items(engine: Engine, band_index: int) -> list[Item]:
    return [i for f in engine.bands[band_index].flows.values() for i in f.queue.items()]


def eligible(engine: Engine, band_index: int, now: float) -> bool:
    """The band holds a request that could be dispatched at `now` (not past its deadline)."""
    return any(i.deadline > now for i in live_items(engine, band_index))


REQUESTS = st.tuples(
    st.sampled_from(FLOWS),  # flow
    st.sampled_from([0, 5, 10, UNKNOWN_PRIORITY]),  # priority
    st.integers(0, 60),  # size
    st.sampled_from([0.0, 0.5, 1.0, 4.0]),  # ttl
    st.sampled_from([0.0, 0.2, 1.0]),  # slo
    st.sampled_from([0, 0, 7, 50]),  # tokens
    st.sampled_from([0.0, 0.0, 0.0, 2.0]),  # weight
)


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.next_id = 1
        self.ledger = Ledger()
        self.inflight: list[Item] = []
        self.steps = 0

    @initialize(config=small_configs(), mode=st.sampled_from(["budget", "grant"]))
    def setup(self, config, mode):
        self.config = config
        self.mode = mode
        self.engine = Engine(config)

    # ------------------------------------------------------------------ helpers

    def absorb(self) -> list[Item]:
        out = self.ledger.absorb(self.engine)
        for item in out:
            event(Outcome(item.outcome).label)
            assert item.finished_at == self.now
            if item.outcome == Outcome.DISPATCHED:
                assert item.finished_at < item.deadline, "an expired request was dispatched"
        return out

    def snapshot_keys(self) -> dict[tuple[int, str], list[tuple[float, int]]]:
        return {
            (b.index, f.id): [(i.key, i.seq) for i in f.queue.items()]
            for b in self.engine.bands
            for f in b.flows.values()
        }

    def check_dispatch_order(self, dispatched: list[Item]) -> None:
        """Each dispatched item preceded, by (key, seq), everything its flow (global FCFS: band) still holds."""
        held = self.snapshot_keys()
        for item in dispatched:
            mine = (item.key, item.seq)
            rest = held.get((item.band, item.request.flow), [])
            assert all(mine < k for k in rest), "dispatched out of the flow's order"
            if self.engine.bands[item.band].config.fairness == "global-fcfs":
                for (band, _), keys in held.items():
                    if band == item.band:
                        assert all(mine < k for k in keys), "global FCFS skipped a better head"

    def expected_admission(self, band_index: int, flow: str, size: int):
        """Oracle: (admitted?, victims) from the limits and the displacement rule."""
        engine = self.engine
        if engine.shutting_down:
            return Outcome.REJECTED_SHUTTING_DOWN, []
        band = engine.bands[band_index]
        fq = band.flows.get(flow)
        f_items, f_bytes = (fq.queued_items, fq.queued_bytes) if fq else (0, 0)
        if band.queued_bytes + size > band.max_bytes or band.queued_items + 1 > band.max_items:
            return Outcome.REJECTED_CAPACITY, []
        if f_bytes + size > band.flow_max_bytes or f_items + 1 > band.flow_max_items:
            return Outcome.REJECTED_CAPACITY, []
        need_bytes = engine.queued_bytes + size - engine.max_bytes
        need_items = engine.queued_items + 1 - engine.max_items
        if need_bytes <= 0 and need_items <= 0:
            return None, []
        if not band.config.displacement:
            return Outcome.REJECTED_CAPACITY, []
        candidates = []
        for lower in reversed(range(band_index + 1, len(engine.bands))):
            candidates += sorted(live_items(engine, lower), key=lambda i: -i.seq)
        victims = []
        for victim in candidates:
            if need_bytes <= 0 and need_items <= 0:
                break
            victims.append(victim)
            need_bytes -= victim.size
            need_items -= 1
        if need_bytes > 0 or need_items > 0:
            return Outcome.REJECTED_CAPACITY, []
        return None, victims

    # ------------------------------------------------------------------ rules

    @rule(requests=st.lists(REQUESTS, min_size=1, max_size=6))
    def submit(self, requests):
        for args in requests:
            self.submit_one(*args)

    def submit_one(self, flow, priority, size, ttl, slo, tokens, weight):
        request = Request(self.next_id, flow, priority, size, ttl, slo, tokens, weight)
        self.next_id += 1
        band_index = self.engine.band_index(priority)
        assert band_index == (
            [b.priority for b in self.config.bands].index(priority)
            if priority in [b.priority for b in self.config.bands]
            else [b.priority for b in self.config.bands].index(self.config.default_band.priority)
        )
        rejected, victims = self.expected_admission(band_index, flow, size)
        self.ledger.submitted.add(request.id)
        item = self.engine.submit(request, self.now)
        out = self.absorb()
        if rejected is not None:
            assert [(i.id, i.outcome) for i in out] == [(request.id, rejected)]
        else:
            assert [i.id for i in out] == [v.id for v in victims]
            assert all(i.outcome == Outcome.EVICTED_DISPLACED for i in out)
            assert self.engine.queued(request.id) is item and item.band == band_index
            ttl_used = ttl or self.config.default_ttl
            assert item.deadline == (self.now + ttl_used if ttl_used > 0 else math.inf)

    @rule(band=st.integers(0, 2), max_bytes=st.sampled_from([math.inf, math.inf, 0, 10, 30, 60]))
    def dispatch(self, band, max_bytes):
        if self.mode == "budget":
            self.pump()
        else:
            self.grant(band, max_bytes)

    def pump(self):
        engine = self.engine
        n = engine.pump(self.now)
        out = self.absorb()
        dispatched = [i for i in out if i.outcome == Outcome.DISPATCHED]
        assert len(dispatched) == n
        bands = [i.band for i in dispatched]
        assert bands == sorted(bands), "within one pump, saturation only grows: bands never go back up"
        self.check_dispatch_order(dispatched)
        self.inflight += dispatched
        assert engine.pump(self.now) == 0, "pump dispatches everything it can"
        self.absorb()
        # What is left is blocked: by a ceiling, or behind the first eligible band's head that does not fit.
        saturation = engine.budget.saturation()
        blocked = [b.index for b in engine.bands if b.ceiling > saturation and eligible(engine, b.index, self.now)]
        if blocked:
            assert engine.budget.inflight > 0, "with nothing in flight every request fits"

    def grant(self, band, max_bytes):
        engine = self.engine
        first = next((b for b in range(min(band + 1, len(engine.bands))) if eligible(engine, b, self.now)), None)
        item = engine.dispatch(self.now, band=band, max_bytes=max_bytes)
        out = self.absorb()
        if item is None:
            assert all(i.outcome == Outcome.EVICTED_TTL for i in out)
            if first is not None:
                event("grant handed back")
                # handed back: the chosen request of the highest eligible band is too large
                again = engine.dispatch(self.now, band=band)
                assert again is not None and again.band == first and again.size > max_bytes
                self.check_dispatch_order([again])
                self.absorb()
        else:
            assert first is not None and item.band == first, "strict priority"
            assert item.size <= max_bytes
            assert [i.id for i in out if i.outcome == Outcome.DISPATCHED] == [item.id]
            self.check_dispatch_order([item])

    @precondition(lambda self: self.inflight)
    @rule(picks=st.lists(st.integers(0, 100), min_size=1, max_size=3))
    def release(self, picks):
        for pick in picks:
            if self.inflight:
                self.engine.release(self.inflight.pop(pick % len(self.inflight)))

    @rule(pick=st.integers(0, 10_000), unknown=st.booleans())
    def cancel(self, pick, unknown):
        ids = sorted(self.ledger.submitted)
        rid = 10**9 + pick if unknown or not ids else ids[pick % len(ids)]
        was_queued = self.engine.queued(rid) is not None
        assert self.engine.cancel(rid, self.now) is was_queued
        out = self.absorb()
        assert [(i.id, i.outcome) for i in out] == ([(rid, Outcome.EVICTED_CANCELLED)] if was_queued else [])

    @rule()
    def expire(self):
        bands = range(len(self.engine.bands))
        due = {i.id for b in bands for i in live_items(self.engine, b) if i.deadline <= self.now}
        assert self.engine.expire(self.now) == len(due)
        out = self.absorb()
        assert {i.id for i in out} == due and all(i.outcome == Outcome.EVICTED_TTL for i in out)
        assert self.engine.next_deadline() > self.now

    @rule(dt=st.sampled_from([0.0, 0.05, 0.3, 1.0, 2.5]))
    def advance(self, dt):
        self.now += dt

    @rule()
    def collect_garbage(self):
        before = {(b.index, f.id) for b in self.engine.bands for f in b.flows.values() if f.queue.live}
        self.engine.collect_garbage(self.now)
        after = {(b.index, f.id) for b in self.engine.bands for f in b.flows.values()}
        assert before <= after, "a flow with queued requests was collected"

    @precondition(lambda self: self.steps >= 20)
    @rule(now=st.booleans())
    def shutdown(self, now):
        if not now:
            return
        queued = set(self.ledger.pending())
        assert self.engine.shutdown(self.now) == len(queued)
        out = self.absorb()
        assert {i.id for i in out} == queued and all(i.outcome == Outcome.EVICTED_SHUTDOWN for i in out)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def counters_reconcile_and_limits_hold(self):
        self.steps += 1
        engine = self.engine
        reconcile(engine)
        check_limits(engine)
        self.ledger.check_open(engine)
        assert engine.take_outbox() == []
        assert engine.budget.inflight == len(self.inflight)
        assert engine.budget.inflight_bytes == sum(i.size for i in self.inflight)
        deadlines = [i.deadline for b in range(len(engine.bands)) for i in live_items(engine, b)]
        assert engine.next_deadline() == min(deadlines, default=math.inf)

    def teardown(self):
        engine = getattr(self, "engine", None)
        if engine is None:
            return
        engine.shutdown(self.now)
        self.absorb()
        self.ledger.check_closed()
        reconcile(engine)
        assert engine.queued_items == engine.queued_bytes == 0
        for band in engine.bands:
            assert band.queued_items == band.queued_bytes == 0
            assert band.fairness.pick() is None
            assert all(f.queued_items == f.queued_bytes == 0 for f in band.flows.values())
        late = engine.submit(Request(self.next_id, "a"), self.now)
        assert late.outcome == Outcome.REJECTED_SHUTTING_DOWN and engine.queued_items == 0
        for item in self.inflight:
            engine.release(item)
        assert engine.budget.inflight == engine.budget.inflight_bytes == 0


EngineMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestEngineInvariants = EngineMachine.TestCase


# --------------------------------------------------------------------------- determinism

_ops = st.lists(
    st.tuples(st.sampled_from(["submit", "submit", "pump", "release", "cancel", "expire", "tick"]), st.integers(0, 99)),
    max_size=80,
)


@settings(max_examples=40, deadline=None)
@given(config=small_configs(), ops=_ops)
def test_engine_is_deterministic(config, ops):
    """Sans-I/O: the same inputs give the same outcomes in the same order (the simulator relies on it)."""
    traces = []
    for _ in range(2):
        engine = Engine(config)
        now, inflight, trace, next_id = 0.0, [], [], 1
        for op, arg in ops:
            if op == "submit":
                engine.submit(Request(next_id, FLOWS[arg % 4], [0, 5, 10][arg % 3], arg % 40, [0.0, 1.0][arg % 2]), now)
                next_id += 1
            elif op == "pump":
                engine.pump(now)
            elif op == "release" and inflight:
                engine.release(inflight.pop(arg % len(inflight)))
            elif op == "cancel":
                engine.cancel(1 + arg % next_id, now)
            elif op == "expire":
                engine.expire(now)
            elif op == "tick":
                now += arg / 50
            for item in engine.take_outbox():
                trace.append((item.id, item.outcome, item.finished_at))
                if item.outcome == Outcome.DISPATCHED:
                    inflight.append(item)
        engine.shutdown(now)
        trace += [(i.id, i.outcome) for i in engine.take_outbox()]
        traces.append(trace)
    assert traces[0] == traces[1]
    assert len({t[0] for t in traces[0]}) == len(traces[0]) == next_id - 1
