"""Policy conformance: every fairness policy under every ordering passes the same contract.

The contract, per (fairness, ordering):
- every queued request is dispatched exactly once when drained; nothing stays behind in the policy;
- within a flow, requests leave in the ordering's (key, arrival) order;
- dispatch is work-conserving: while anything is queued, a grant dispatches something;
- expired heads are evicted (ttl), never dispatched; cancels from anywhere keep the policy consistent;
- a handed-back grant (request larger than `max_bytes`) has no side effect on later choices.
Fair policies (round-robin, drr, vtc) also bound how long a backlogged or newly backlogged flow waits;
weighted ones (drr, vtc) split service by weight; byte/token-fair ones (drr, vtc) by size, not turns.
Global FCFS serves the best head across the band's flows: exact arrival order under FCFS.
"""

from __future__ import annotations

import itertools
import math
import random
import time

import pytest
from conftest import FAIRNESS_NAMES, ORDERING_NAMES, Ids, Ledger, drain, flows_of, make_engine, reconcile, submit
from hypothesis import given, settings
from hypothesis import strategies as st

from flowshard.fairness import FAIRNESS, DeficitRoundRobin, GlobalFcfs, RoundRobin, VirtualTokenCounter
from flowshard.flow import FlowQueue
from flowshard.queues import ORDERINGS
from flowshard.types import Item, Outcome, Request

COMBOS = list(itertools.product(FAIRNESS_NAMES, ORDERING_NAMES))
FAIR = ("round-robin", "drr", "vtc")
WEIGHTED = ("drr", "vtc")


def engine_for(fairness: str, ordering: str = "fcfs", quantum: int = 16384, **kw):
    band = {"priority": 0, "fairness": fairness, "ordering": ordering}
    if fairness == "drr":  # (only drr takes a quantum: config.BandConfig)
        band["quantum"] = quantum
    return make_engine([band], **kw)


def random_workload(engine, ledger: Ledger, ids: Ids, rng: random.Random, n: int, now: float = 0.0, flows="abcde"):
    items = []
    for _ in range(n):
        request = ids.req(
            rng.choice(flows),
            size=rng.randint(1, 40),
            ttl=rng.choice([0.0, 5.0, 50.0, 500.0]),
            slo=rng.choice([0.0, 0.1, 1.0, 3.0]),
            tokens=rng.choice([0, 0, rng.randint(1, 100)]),
        )
        items.append(ledger.submit(engine, request, now))
        now += rng.random() * 0.01
    return items


def assert_flow_order(dispatched):
    """Within each flow, dispatch order is (key, seq) order of the items dispatched."""
    by_flow: dict[str, list] = {}
    for item in dispatched:
        by_flow.setdefault(item.request.flow, []).append(item)
    for flow, items in by_flow.items():
        keys = [(i.key, i.seq) for i in items]
        assert keys == sorted(keys), f"flow {flow} out of order"


def test_registry():
    assert set(FAIRNESS) == set(FAIRNESS_NAMES)
    for name, cls in FAIRNESS.items():
        assert cls.name == name
        assert cls.tracks_heads is (cls in (GlobalFcfs, DeficitRoundRobin))  # (drr: a parked flow's head)
        assert cls(100).pick() is None


# =========================================================================== every policy x ordering


@pytest.mark.parametrize(("fairness", "ordering"), COMBOS)
@pytest.mark.parametrize("seed", [0, 1])
def test_drains_every_request_exactly_once_in_flow_order(fairness, ordering, seed):
    engine = engine_for(fairness, ordering, quantum=64, default_ttl=0)
    ids, ledger, rng = Ids(), Ledger(), random.Random(seed)
    items = random_workload(engine, ledger, ids, rng, 200)
    reconcile(engine)
    dispatched = drain(engine, now=1.0)
    ledger.absorb(engine)
    assert sorted(i.id for i in dispatched) == sorted(i.id for i in items)
    assert all(ledger.outcome[i.id] is Outcome.DISPATCHED for i in items)
    assert_flow_order(dispatched)
    ledger.check_closed()
    reconcile(engine)
    assert engine.queued_items == engine.queued_bytes == 0
    assert engine.bands[0].fairness.pick() is None, "no flow stays active in the policy"


@pytest.mark.parametrize(("fairness", "ordering"), COMBOS)
def test_dispatch_is_work_conserving_under_interleaving(fairness, ordering):
    engine = engine_for(fairness, ordering, quantum=32, default_ttl=0)
    ids, ledger, rng = Ids(), Ledger(), random.Random(7)
    now = 0.0
    for _ in range(400):
        now += 0.01
        if rng.random() < 0.55:
            ledger.submit(engine, ids.req(rng.choice("abcd"), size=rng.randint(1, 50), slo=rng.random()), now)
        else:
            had = engine.queued_items
            item = engine.dispatch(now)
            assert (item is not None) == (had > 0)
            ledger.absorb(engine)
        reconcile(engine)
    drain(engine, now)
    ledger.absorb(engine)
    ledger.check_closed()


@pytest.mark.parametrize(("fairness", "ordering"), COMBOS)
def test_dispatch_follows_the_ordering_with_arrivals_in_between(fairness, ordering):
    """Each dispatched item is the smallest (key, seq) of what its flow held at that moment."""
    engine = engine_for(fairness, ordering, quantum=32)
    ids, rng = Ids(), random.Random(3)
    now = 0.0
    for _ in range(300):
        now += 0.01
        if rng.random() < 0.6:
            submit(
                engine,
                ids,
                rng.choice("abc"),
                now,
                size=rng.randint(1, 30),
                ttl=rng.choice([0, 10, 100]),
                slo=rng.choice([0, 0.5, 5]),
            )
        else:
            flows = {f.id: [(i.key, i.seq) for i in f.queue.items()] for f in engine.bands[0].flows.values()}
            item = engine.dispatch(now)
            if item is not None:
                assert (item.key, item.seq) == min(flows[item.request.flow])
                if fairness == "global-fcfs":
                    assert (item.key, item.seq) == min(k for ks in flows.values() for k in ks)


@pytest.mark.parametrize(("fairness", "ordering"), COMBOS)
def test_expired_heads_are_evicted_never_dispatched(fairness, ordering):
    engine = engine_for(fairness, ordering, quantum=32, default_ttl=0)
    ids, ledger, rng = Ids(), Ledger(), random.Random(11)
    items = [
        ledger.submit(engine, ids.req(rng.choice("abc"), size=5, ttl=rng.choice([0.0, 1.0, 2.0, 9.0])), 0.0)
        for _ in range(90)
    ]
    out = drain(engine, now=2.0)
    ledger.absorb(engine)
    alive = {i.id for i in items if i.deadline > 2.0}
    assert {i.id for i in out} == alive
    assert all(i.finished_at < i.deadline for i in out)
    assert all(ledger.outcome[i.id] is Outcome.EVICTED_TTL for i in items if i.id not in alive)
    ledger.check_closed()
    reconcile(engine)


@pytest.mark.parametrize(("fairness", "ordering"), COMBOS)
def test_cancel_anywhere_keeps_the_policy_consistent(fairness, ordering):
    engine = engine_for(fairness, ordering, quantum=16, default_ttl=0)
    ids, ledger, rng = Ids(), Ledger(), random.Random(5)
    items = random_workload(engine, ledger, ids, rng, 150, flows="abcd")
    cancelled = set()
    for step in range(120):
        if step % 3 == 0:
            engine.dispatch(1.0)
        else:
            queued = [i for i in items if engine.queued(i.id) is not None]
            if not queued:
                break
            # heads, tails, middles: whatever the rng picks
            victim = rng.choice(queued)
            assert engine.cancel(victim.id, 1.0)
            cancelled.add(victim.id)
        reconcile(engine)
    rest = drain(engine, 2.0)
    ledger.absorb(engine)
    assert not cancelled & {i.id for i in rest}
    assert all(ledger.outcome[i] is Outcome.EVICTED_CANCELLED for i in cancelled)
    ledger.check_closed()
    assert engine.bands[0].fairness.pick() is None


@pytest.mark.parametrize(("fairness", "ordering"), COMBOS)
def test_handed_back_grant_has_no_side_effect(fairness, ordering):
    """Two identical engines; one is offered a too-small grant before every real one: same choices."""
    twins = [engine_for(fairness, ordering, quantum=50, default_ttl=0) for _ in range(2)]
    rng = random.Random(9)
    plan = [(rng.choice("abcd"), rng.randint(1, 80), rng.random()) for _ in range(150)]
    sequences = []
    for k, engine in enumerate(twins):
        ids = Ids()
        for flow, size, slo in plan:
            submit(engine, ids, flow, size=size, slo=slo)
        order = []
        while engine.queued_items:
            engine.take_outbox()
            if k == 1:
                assert engine.dispatch(0.0, max_bytes=0) is None
                assert engine.take_outbox() == []
            order.append(engine.dispatch(0.0).id)
        sequences.append(order)
    assert sequences[0] == sequences[1]


@pytest.mark.parametrize(("fairness", "ordering"), COMBOS)
def test_flows_that_empty_and_return_are_served_again(fairness, ordering):
    engine = engine_for(fairness, ordering, quantum=10)
    ids = Ids()
    for round_ in range(30):
        now = float(round_)
        mine = [submit(engine, ids, f, now, size=10) for f in "abc"[: 1 + round_ % 3]]
        assert sorted(i.id for i in drain(engine, now)) == sorted(i.id for i in mine)
        reconcile(engine)
    assert engine.bands[0].fairness.pick() is None


# =========================================================================== fair policies


@pytest.mark.parametrize("fairness", FAIR)
def test_backlogged_flows_take_turns(fairness):
    """Equal sizes (DRR quantum = size): every window of K dispatches serves each of K flows once."""
    engine = engine_for(fairness, quantum=10)
    ids = Ids()
    for _ in range(40):
        for f in "abcd":
            submit(engine, ids, f, size=10)
    for _ in range(10):
        submit(engine, ids, "a", size=10)  # the flood: more queued, no more turns
    order = flows_of(drain(engine))[: 4 * 40]
    for start in range(0, len(order) - 3):
        assert len(set(order[start : start + 4])) == 4, order[start : start + 4]


@pytest.mark.parametrize("fairness", FAIR)
def test_a_newly_backlogged_flow_is_served_within_one_round(fairness):
    """A flow that becomes backlogged waits at most one turn of each other backlogged flow."""
    engine = engine_for(fairness, quantum=100)
    ids = Ids()
    for f in "abc":
        for _ in range(10):
            submit(engine, ids, f, size=100)
    for _ in range(4):
        engine.dispatch(0.0)
    newcomer = submit(engine, ids, "d", 1.0, size=100)
    served = [engine.dispatch(1.0) for _ in range(4)]
    assert newcomer in served, f"{fairness}: the new flow waited more than a round: {flows_of(served)}"


@pytest.mark.parametrize("fairness", FAIR)
def test_a_returning_flow_gets_its_share_not_its_idle_time(fairness):
    """A flow idle while others were served does not monopolise dispatch when it comes back."""
    engine = engine_for(fairness, quantum=10)
    ids = Ids()
    for f in "abc":
        submit(engine, ids, f, size=10)
    drain(engine)
    for _ in range(200):
        for f in "ab":
            submit(engine, ids, f, size=10)
    for _ in range(300):  # a and b are served 150 times each while c is idle
        engine.dispatch(1.0)
    for _ in range(50):
        submit(engine, ids, "c", 2.0, size=10)
    order = flows_of(engine.dispatch(2.0) for _ in range(60))
    for n in range(1, len(order) + 1):
        assert order[:n].count("c") <= math.ceil(n / 3) + 1, order


@pytest.mark.parametrize("fairness", WEIGHTED)
@pytest.mark.parametrize("weights_from", ["config", "request"])
def test_weighted_policies_split_service_by_weight(fairness, weights_from):
    weights = {"a": 1.0, "b": 2.0, "c": 3.0}
    engine = engine_for(fairness, quantum=10, weights=weights if weights_from == "config" else {})
    ids = Ids()
    for _ in range(400):
        for f, w in weights.items():
            submit(engine, ids, f, size=10, weight=w if weights_from == "request" else 0.0)
    order = flows_of(engine.dispatch(0.0) for _ in range(600))
    counts = [order.count(f) for f in "abc"]
    for got, want in zip(counts, (100, 200, 300), strict=True):
        assert abs(got - want) <= 2, counts


@pytest.mark.parametrize("fairness", WEIGHTED)
def test_byte_fair_policies_equalise_bytes_not_turns(fairness):
    engine = engine_for(fairness, quantum=100)
    ids = Ids()
    for _ in range(300):
        submit(engine, ids, "small", size=10)
    for _ in range(60):
        submit(engine, ids, "big", size=100)
    served = {"small": 0, "big": 0}
    for _ in range(300):
        item = engine.dispatch(0.0)
        served[item.request.flow] += item.size
        assert abs(served["small"] - served["big"]) <= 2 * 100, served
    assert served["big"] > 0 and served["small"] > 0


def test_round_robin_is_fair_in_turns_not_bytes():
    engine = engine_for("round-robin")
    ids = Ids()
    for _ in range(50):
        submit(engine, ids, "s", size=1)
        submit(engine, ids, "b", size=1000)
    out = [engine.dispatch(0.0) for _ in range(40)]
    assert flows_of(out) == "sb" * 20
    assert sum(i.size for i in out if i.request.flow == "b") == 1000 * sum(i.request.flow == "s" for i in out)


def test_vtc_charges_declared_tokens_over_weight():
    engine = engine_for("vtc", weights={"b": 2.0})
    ids = Ids()
    a = submit(engine, ids, "a", size=1000, tokens=30)
    b = submit(engine, ids, "b", size=5)
    submit(engine, ids, "a", size=1)
    assert engine.dispatch(0.0) is a
    assert a.flow.vtc == 30.0
    assert engine.dispatch(0.0) is b
    assert b.flow.vtc == 5 / 2.0, "5 bytes (no tokens declared) / weight 2"


def test_vtc_corrections_of_backlogged_flows_do_not_grow_its_heap_for_good():
    """A correction renews a backlogged flow's entry; the old one goes stale. Releases that report
    fewer tokens than declared put the stale entries above every live counter, where nothing pops
    them: compacted as activations' are, the heap stays within a slack of its live flows (a review
    saw 36,669 entries for 2 backlogged flows after 50,000 dispatches)."""
    engine = engine_for("vtc")
    ids = Ids()
    for flow in "ab":
        for _ in range(4):
            submit(engine, ids, flow, size=100, tokens=100)
    vtc = engine.bands[0].fairness
    for _ in range(5000):
        item = engine.dispatch(0.0)
        assert item is not None
        flow = item.request.flow
        submit(engine, ids, flow, size=100, tokens=100)  # the flow stays backlogged
        assert engine.correct(flow, 0, -100.0)  # released having used no tokens
    assert len(vtc._heap) <= 2 * 2 + 64, len(vtc._heap)  # (_COMPACT_SLACK)


def test_vtc_lifts_a_returning_flow_to_the_least_backlogged_counter():
    engine = engine_for("vtc")
    ids = Ids()
    c_item = submit(engine, ids, "c", size=10)
    assert engine.dispatch(0.0) is c_item
    for _ in range(20):
        submit(engine, ids, "a", size=10)
        submit(engine, ids, "b", size=7)
    for _ in range(25):
        engine.dispatch(0.0)
    flows = engine.bands[0].flows
    low = min(flows["a"].vtc, flows["b"].vtc)
    assert flows["c"].vtc == 10.0 < low
    submit(engine, ids, "c", size=10)
    assert flows["c"].vtc == low, "no banking of idle credit"


def test_vtc_lifts_to_the_last_served_counter_when_nothing_is_backlogged():
    engine = engine_for("vtc")
    ids = Ids()
    for _ in range(5):
        submit(engine, ids, "a", size=10)
    drain(engine)
    submit(engine, ids, "b", size=10)
    assert engine.bands[0].flows["b"].vtc == 40.0, "the counter of a before its last charge"


def test_drr_resets_the_deficit_when_a_flow_empties():
    engine = engine_for("drr", quantum=100)
    ids = Ids()
    submit(engine, ids, "a", size=10)
    submit(engine, ids, "b", size=10)
    drain(engine)
    flow = engine.bands[0].flows["a"]
    assert flow.deficit == 0.0
    submit(engine, ids, "a", size=10)
    assert engine.dispatch(0.0).request.flow == "a"
    assert flow.deficit == 0.0, "emptied again: deficit cleared"


def test_drr_zero_size_requests_do_not_starve_other_flows():
    """Requests without a declared size (size 0) must still take turns: one flow must not be served forever."""
    engine = engine_for("drr", quantum=100)
    ids = Ids()
    for _ in range(700):
        submit(engine, ids, "a", size=0)
        submit(engine, ids, "b", size=0)
    order = flows_of(engine.dispatch(0.0) for _ in range(600))
    assert order.count("b") >= 200 and order.count("a") >= 200, (order.count("a"), order.count("b"))


def test_global_fcfs_is_exact_arrival_order_across_flows():
    engine = engine_for("global-fcfs")
    ids = Ids()
    rng = random.Random(2)
    items = [submit(engine, ids, rng.choice("ab" + "f" * 8), size=rng.randint(1, 99)) for _ in range(300)]
    assert drain(engine) == items


def test_global_fcfs_edf_serves_the_earliest_deadline_across_flows():
    engine = engine_for("global-fcfs", "edf")
    ids = Ids()
    rng = random.Random(4)
    items = [submit(engine, ids, rng.choice("abc"), ttl=rng.choice([1.0, 2.0, 3.0, 4.0])) for _ in range(120)]
    assert drain(engine) == sorted(items, key=lambda i: (i.deadline, i.seq))


# =========================================================================== policy objects directly


def test_policies_only_see_active_flows():
    for cls in (RoundRobin, DeficitRoundRobin, VirtualTokenCounter):
        engine = make_engine([{"priority": 0, "fairness": cls.name}])
        assert isinstance(engine.bands[0].fairness, cls)
        ids = Ids()
        a = submit(engine, ids, "a")
        submit(engine, ids, "b")
        engine.cancel(a.id, 0.0)
        policy = engine.bands[0].fairness
        assert policy.pick().id == "b"
        engine.dispatch(0.0)
        assert policy.pick() is None


# ---------------------------------------------------------------------------------------- drr's empty rounds


@pytest.mark.parametrize("weight", [1e-7, 1e-300, 5e-324])
def test_drr_a_tiny_weight_does_not_stop_the_shard(weight: float) -> None:
    """Review 2026-12-05 (D2): a request with weight 1e-300 under drr looped in the shard's pick until
    the heartbeat killed it (5 s: every request it held ended `shard_failure`); 1e-7 stalled it 4 s.
    The empty rounds are skipped in one step: the tiny flow is served at once when it is alone, and a
    normal flow beside it is not held up."""
    engine = make_engine([{"priority": 0, "fairness": "drr", "quantum": 500}], max_inflight_requests=None)
    ids = Ids()
    submit(engine, ids, "tiny", size=1000, weight=weight)
    submit(engine, ids, "tiny", size=1000, weight=weight)
    t0 = time.process_time()
    assert flows_of(drain(engine)) == "tiny" * 2
    submit(engine, ids, "tiny", size=1000, weight=weight)
    submit(engine, ids, "normal", size=1000)
    submit(engine, ids, "normal", size=1000)
    assert flows_of(drain(engine)).replace("tiny", "t").replace("normal", "n") in ("nnt", "tnn")
    assert time.process_time() - t0 < 0.5


def _classic_drr(flows: list[tuple[float, list[int]]], quantum: int) -> list[tuple[int, int]]:
    """Shreedhar & Varghese's DRR, round by round, every queue there from the start (the reference):
    each round a flow gets `quantum * weight` more and sends while its head fits; one that empties
    leaves. The picks as (flow, size)."""
    queues = [list(sizes) for _, sizes in flows]
    deficit = [0.0] * len(flows)
    active = [f for f, q in enumerate(queues) if q]
    out: list[tuple[int, int]] = []
    while active:
        for f in list(active):
            deficit[f] += quantum * flows[f][0]
            while queues[f] and deficit[f] >= queues[f][0]:
                size = queues[f].pop(0)
                deficit[f] -= max(size, 1)
                out.append((f, size))
            if not queues[f]:
                deficit[f] = 0.0
                active.remove(f)
    return out


@settings(max_examples=300, deadline=None)
@given(
    weights=st.lists(st.sampled_from([1 / 64, 0.125, 0.25, 0.75, 1.0, 2.5]), min_size=1, max_size=5),
    sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=40),
    quantum=st.sampled_from([1, 7, 100, 500]),
)
def test_drr_parking_heads_for_their_rounds_serves_as_round_by_round_drr(
    weights: list[float], sizes: list[int], quantum: int,
) -> None:
    """A head that needs many rounds is parked until its round, not visited in each (weights and a
    fixed quantum that make many such rounds; weights exact in binary floating point). The same
    requests go in the same rounds as the round-by-round DRR; within a round a woken flow may go after
    others that the reference puts after it, so at any point of the sequence a flow is at most one
    turn (its weight's quantum and a request) ahead or behind."""
    flows = [(weights[f], sizes[f::len(weights)]) for f in range(len(weights))]
    engine = make_engine([{"priority": 0, "fairness": "drr", "quantum": quantum}], max_inflight_requests=None)
    ids = Ids()
    for k, size in enumerate(sizes):
        f = k % len(weights)
        submit(engine, ids, f"f{f}", size=size, weight=weights[f])
    got = [(int(item.request.flow[1:]), item.request.size) for item in drain(engine)]
    want = _classic_drr(flows, quantum)
    assert sorted(got) == sorted(want)
    served_got, served_want = [0] * len(flows), [0] * len(flows)
    for (f, size), (g, other) in zip(got, want, strict=True):
        served_got[f] += size
        served_want[g] += other
        for h, (w, _) in enumerate(flows):
            assert abs(served_got[h] - served_want[h]) <= quantum * w + max(sizes), (h, got, want)


def test_drr_the_simulator_finishes_with_a_tiny_weight_alone_in_its_band() -> None:
    """The simulator runs the same policy: a lone flow of weight 1e-300 made `flowshard simulate` spin
    without end (review 2026-12-05). Scenarios now refuse weights below 1e-6, as the service does
    (review 24): the smallest one allowed."""
    from flowshard.scenario import load_scenario
    from flowshard.simulate import simulate

    scenario = load_scenario("""
[server.budget]
max_inflight_requests = 1
[[server.bands]]
priority = 0
fairness = "drr"
[workload]
duration = 5.0
[[workload.flows]]
id = "a"
weight = 1e-6
size = 1000
service = 0.5
arrival = { kind = "poisson", rate = 10 }
""")
    report = simulate(scenario)
    assert report.totals.counts.dispatched == 10


def test_vtc_a_request_that_declares_no_size_or_tokens_still_costs_1() -> None:
    """At 0 its flow's counter never grew, so a flow of such requests took every turn from flows that
    declared theirs (a review: 0 dispatches for a 2-client flow of 1,000-byte requests next to a
    16-client one of undeclared ones; the ledger already charged them 1). Now each costs 1: byte-fair,
    so the declared flow gets one dispatch per 1,000 of the other's, where it got none."""
    from fairsim import FlowSpec, run

    engine = make_engine([{"priority": 0, "fairness": "vtc"}], max_inflight_requests=4, default_ttl=0)
    served = run(engine, [FlowSpec("undeclared", clients=16, size=0), FlowSpec("declared", clients=2, size=1000)],
                 duration=30.0, service=0.01).served(5.0, 30.0)
    assert 5 <= served.get("declared", 0) <= 0.002 * served["undeclared"], served


def test_drr_a_parked_flow_whose_weight_changes_is_woken_and_credited_at_its_old_weight() -> None:
    """A review: a flow parked at weight 1e-6 (a million rounds to go) stayed parked after its requests
    came at weight 1, and with its head cancelled it was credited those rounds at the new weight and
    sent 998 requests in a row. Now the new weight wakes it, and the rounds it sat out count at the old:
    the two flows alternate, as round-by-round DRR has them."""
    from flowshard.types import Request

    engine = make_engine([{"priority": 0, "fairness": "drr", "quantum": 1000}], max_inflight_requests=None)
    rid = 0

    def add(flow: str, weight: float = 0.0) -> None:
        nonlocal rid
        rid += 1
        engine.submit(Request(rid, flow, size=1000, weight=weight), 0.0)

    for _ in range(4000):
        add("fast")
    add("slow", 1e-6)
    for _ in range(1000):
        engine.dispatch(0.0)
    for _ in range(2000):
        add("slow", 1.0)
    order = "".join(engine.dispatch(0.0).request.flow[0] for _ in range(3000))
    assert "ss" not in order and order.count("s") >= 1400, order[:80]


def test_drr_a_huge_request_at_a_tiny_weight_does_not_jump_the_queue() -> None:
    """More top-ups than are counted (a weight near 0): it went next (a review: a 2 MB request at
    weight 1e-6 beside a weight-1e6 flow was dispatched second); now it waits for the others to be
    gone, as its weight says, and goes once it is alone."""
    from flowshard.types import Request

    engine = make_engine([{"priority": 0, "fairness": "drr"}], max_inflight_requests=None, max_queued_bytes=None)
    for i in range(1, 2001):
        engine.submit(Request(i, "huge-weight", size=1, weight=1e6), 0.0)
    assert engine.dispatch(0.0).request.flow == "huge-weight"  # (the quantum: 1e-6 a turn)
    engine.submit(Request(5000, "tiny-weight", size=2_000_000, weight=1e-6), 0.0)
    order = [engine.dispatch(0.0).request.flow for _ in range(2000)]
    assert order[:1999] == ["huge-weight"] * 1999 and order[1999] == "tiny-weight"


def test_drr_the_parked_heap_drops_the_entries_of_flows_that_left() -> None:
    """A review: 20,000 throw-away flows, each with one parked head then cancelled, left 20,000 heap
    entries (and their queues) alive until their rounds, maybe a million rounds away."""
    from flowshard.types import Request

    engine = make_engine([{"priority": 0, "fairness": "drr", "quantum": 1000}], max_inflight_requests=None)
    policy = engine.bands[0].fairness
    assert isinstance(policy, DeficitRoundRobin)
    for i in range(50):
        engine.submit(Request(i + 1, "steady", size=1000), 0.0)
    rid = 100
    for i in range(5000):
        rid += 1
        engine.submit(Request(rid, f"gone-{i}", size=100_000), 0.0)
        engine.dispatch(0.0)  # ("steady" goes; the new flow is visited once and parked)
        engine.cancel(rid, 0.0)
        rid += 1
        engine.submit(Request(rid, "steady", size=1000), 0.0)
    assert len(policy._parked) <= 2 * len(policy._parked_at) + 64


def test_drr_a_flow_parked_before_the_quantum_shrank_is_not_paid_the_old_top_ups() -> None:
    """A review: four flows of 63 KB requests (the quantum learns 63,000), a 20 MB head parks, the four
    switch to 1 KB (the quantum shrinks to 1,000): the parked flow was paid 63,000 a round it sat out
    and served after 1.15 MB each went to the others, 17 times its share. Re-parked at the new
    quantum, it waits for its 20 MB's worth, as round-by-round DRR has it."""
    engine = make_engine([{"priority": 0, "fairness": "drr"}], max_inflight_requests=None, enforce_limits=False)
    ids = Ids()
    size = 63_000
    for k in range(4):
        for _ in range(8):
            submit(engine, ids, f"s{k}", size=size)
    served: dict[str, int] = {}
    base: dict[str, int] = {}
    for n in range(400_000):
        if n == 3000:
            submit(engine, ids, "big", size=20_000_000)
            base, size = dict(served), 1000
        item = engine.dispatch(0.0)
        flow = item.request.flow
        if flow == "big":
            break
        served[flow] = served.get(flow, 0) + item.request.size
        submit(engine, ids, flow, size=size)
    others = [served[f] - base[f] for f in ("s0", "s1", "s2", "s3")]
    assert min(others) >= 19_000_000, others  # its share: as many bytes as each of them, not 1.15 MB


def test_drr_several_heads_beyond_counting_do_not_stall_a_pick() -> None:
    """A review: with the quantum at 1e-6, flows of weight 1e-6 each with a 2^40-byte head needed more
    top-ups than are counted; each was parked and woken in turn, a million times in one pick (5.75 s
    with four of them). Now the first goes once nothing counted waits behind it."""
    from flowshard.types import Request

    engine = make_engine([{"priority": 0, "fairness": "drr"}], max_inflight_requests=None, enforce_limits=False)
    engine.submit(Request(1, "fast", size=1, weight=1e6), 0.0)
    engine.dispatch(0.0)  # (the quantum: 1e-6)
    for i in range(4):
        engine.submit(Request(10 + i, f"huge-{i}", size=1 << 40, weight=1e-6), 0.0)
    started = time.process_time()
    assert engine.dispatch(0.0).request.flow.startswith("huge-")
    assert time.process_time() - started < 0.5


def test_vtc_a_refund_after_a_return_keeps_at_most_max_lag_below_the_lift_point():
    """x stood 10,000 behind a when it emptied (its lag); it comes back max_lag (100) below a's counter.
    A refund of 5,000 for a request from before its return then raises its lag, but the counter stays
    at most max_lag below the lift point."""
    vtc = VirtualTokenCounter()
    vtc.max_lag = 100.0
    fcfs = ORDERINGS["fcfs"]
    a, x = (FlowQueue(name, 0, fcfs.new_queue(), 1.0) for name in ("a", "x"))
    vtc.activate(a)
    vtc.activate(x)
    request = Request(1, "a", 0, 1, tokens=10_000)
    vtc.charge(a, Item(request, a, 0, 0, 0.0, 0.0, math.inf, 10_000))
    vtc.deactivate(x)
    assert x.lag == 10_000.0
    vtc.activate(x)
    assert x.vtc == 9_900.0
    vtc.correct(x, -5_000.0, 1.0, True)
    assert x.lag == 15_000.0 and x.vtc == 9_900.0
