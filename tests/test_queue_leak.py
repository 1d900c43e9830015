"""Flow queues are freed after flow GC whatever way their requests left (issue 8, defect 1).

Queued items are `gc=False` and point back at their flow, so a dead item left in an idle flow's
queue (or in a lazily cleaned heap) kept the flow alive for good: the cycle collector cannot see
the item's edge. These tests count live `FlowQueue` objects after flow GC for every exit reason,
every ordering and every fairness policy.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from flowshard.config import BandConfig, BudgetConfig, Config
from flowshard.engine import Engine
from flowshard.flow import FlowQueue
from flowshard.types import Outcome, Request

FLOWS = 200
PER_FLOW = 3
POLICIES = [
    ("round-robin", "fcfs"),
    ("drr", "fcfs"),
    ("vtc", "edf"),
    ("global-fcfs", "fcfs"),
    ("global-fcfs", "edf"),
    ("round-robin", "slo-deadline"),
]
EXITS = ["dispatched", "granted", "cancelled", "ttl", "ttl-at-dispatch", "displaced", "shard-reset", "mixed"]


@pytest.fixture(autouse=True, scope="module")
def _frozen_heap() -> Iterator[None]:
    """Move what the test session holds (tens of MB by the time these tests run) to the permanent
    generation, so `live_flow_queues` walks only what this module creates: the objects of each test,
    every FlowQueue among them, are made after the freeze and seen by gc.collect and gc.get_objects
    as before, and `baseline` still subtracts whatever was live before a test. Unfrozen afterwards."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def live_flow_queues() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is FlowQueue)


def _engine(fairness: str, ordering: str, *, enforce_limits: bool = True) -> Engine:
    bands = [
        BandConfig(priority=1, displacement=True, fairness=fairness, ordering=ordering),
        BandConfig(priority=0, fairness=fairness, ordering=ordering),
    ]
    config = Config(
        bands=bands, flow_gc_timeout=1.0, max_queued_requests=FLOWS * PER_FLOW,
        budget=BudgetConfig(max_inflight_requests=None),
    )
    engine = Engine(config, enforce_limits=enforce_limits)
    engine.budget.max_requests = 0  # nothing dispatches until the test says so
    return engine


def _fill(engine: Engine, priority: int = 0, start: int = 0) -> None:
    for i in range(FLOWS * PER_FLOW):
        engine.submit(Request(start + i, f"f{i % FLOWS}", priority=priority, size=10, ttl=5.0, slo=1.0), 0.0)


def _run_exit(engine: Engine, how: str) -> None:
    n = FLOWS * PER_FLOW
    if how == "dispatched":
        engine.budget.max_requests = n
        assert engine.pump(0.0) == n
    elif how == "granted":
        while engine.dispatch(0.0) is not None:
            pass
    elif how == "cancelled":
        for i in range(n):
            assert engine.cancel(i, 0.0)
    elif how == "ttl":
        assert engine.expire(10.0) == n
    elif how == "ttl-at-dispatch":
        assert engine.dispatch(10.0) is None  # every head has expired: evicted on the way
    elif how == "displaced":
        for i in range(n):  # the higher band takes the whole global limit: every lower request goes
            engine.submit(Request(n + i, f"hi{i}", priority=1, size=10, ttl=5.0), 0.0)
        assert engine.bands[1].queued_items == 0
        engine.shutdown(0.0)  # the displacers leave too, so that every flow is idle
    elif how == "shard-reset":
        engine.shutdown(0.0, Outcome.EVICTED_SHARD_FAILURE)
    elif how == "mixed":  # a dead item in the middle of a queue, the rest dispatched after it
        for i in range(0, n, 2):
            engine.cancel(i, 0.0)
        engine.budget.max_requests = n
        engine.pump(0.0)
    assert engine.queued_items == 0
    engine.take_outbox()


@pytest.mark.parametrize(("fairness", "ordering"), POLICIES)
@pytest.mark.parametrize("how", EXITS)
def test_flow_queues_are_freed_after_flow_gc_for_every_exit(fairness: str, ordering: str, how: str) -> None:
    baseline = live_flow_queues()
    engine = _engine(fairness, ordering)
    _fill(engine)
    assert live_flow_queues() - baseline == FLOWS
    _run_exit(engine, how)
    assert engine.collect_garbage(100.0) >= FLOWS
    assert live_flow_queues() - baseline == 0
    del engine
    assert live_flow_queues() - baseline == 0


def test_memory_returns_to_its_plateau_over_rounds_of_new_flows() -> None:
    """The service reproduction in small: rounds of new flow ids, queued then cancelled or expired."""
    engine = _engine("round-robin", "fcfs")
    baseline = live_flow_queues()
    rid = 0
    for rnd in range(4):
        for i in range(2000):
            engine.submit(Request(rid, f"r{rnd}-{i}", ttl=1.0), rnd * 10.0)
            rid += 1
        for i in range(rid - 2000, rid - 1000):
            engine.cancel(i, rnd * 10.0)
        engine.expire(rnd * 10.0 + 2.0)
        engine.take_outbox()
        engine.collect_garbage(rnd * 10.0 + 5.0)
        assert live_flow_queues() - baseline == 0, f"round {rnd}"
