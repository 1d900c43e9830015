"""VTC's counters against hostile costs, at 1 to 4 shards through the multi-shard model (`ShardedService`),
which corrects costs at release as the service does: the dispatching shard's engine by the item's seq,
the ledger by the request's charge number. The attacks are a review's (docs/fairness.md §8); each test
has a negative control (the rule before), under which the attacker must win."""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from typing import Any

import pytest

from flowshard import fairness, ledger
from flowshard.config import BandConfig, BudgetConfig, Config, ServiceConfig
from flowshard.multisim import ShardedService
from flowshard.types import Item, Outcome, Request

BIG = 1 << 32


class Driver:
    """A closed loop over `ShardedService`: each release of the oldest request in flight (at its declared
    cost) brings that flow's next request, if it is active."""

    def __init__(self, shards: int, budget: int = 4, max_lag: float = fairness.MAX_LAG) -> None:
        config = Config(budget=BudgetConfig(max_inflight_requests=budget),
                        service=ServiceConfig(fast_path=False, jsq_slack_bytes=0),
                        bands=[BandConfig(priority=0, fairness="vtc", max_lag=max_lag)], default_ttl=0)
        self.svc = ShardedService(config, shards, track=True)
        self.ids = 0
        self.inflight: list[Item] = []
        self.log: list[str] = []

    def submit(self, flow: str, tokens: int = 1000) -> None:
        self.ids += 1
        self.svc.submit(Request(self.ids, flow, 0, 1, tokens=tokens), 0.0)

    def pump(self) -> None:
        self.svc.pump(0.0)
        for item in self.svc.take_outbox():
            if item.outcome == Outcome.DISPATCHED:
                self.inflight.append(item)
                self.log.append(item.request.flow)

    def step(self, active: set[str]) -> None:
        item = self.inflight.pop(0)
        if item.request.tokens == BIG:  # (held to the end: the caller releases it)
            self.inflight.append(item)
            item = self.inflight.pop(0)
        self.svc.release(item, item.cost)
        if item.request.flow in active:
            self.submit(item.request.flow)
        self.pump()

    def take(self, flow: str) -> Item:
        item = next(i for i in self.inflight if i.request.flow == flow and i.request.tokens == BIG)
        self.inflight.remove(item)
        return item


def longest_run(log: list[str], flow: str) -> int:
    best = run = 0
    for name in log:
        run = run + 1 if name == flow else 0
        best = max(best, run)
    return best


def _unnamed(svc: ShardedService, item: Item, actual: int) -> None:
    """Release `item` with its refund named by no request (engine seq None, ledger charge -1): the rule
    before the fifteenth round, the negative control."""
    request = item.request
    shard, _ = svc._held.pop(request.id)
    delta = float(actual - item.cost)
    svc.engines[shard].correct(request.flow, 0, delta, 0.0, None)
    svc.ledger.correct(0, shard, delta, request.flow, 0.0, -1)
    svc.ledger.release(request.size)


def _refund(d: Driver, big: Item, actual: int, named: bool) -> int:
    """Release `big` at `actual` tokens, its refund named (as the service names it) or not (the control);
    returns where the dispatches after it start in `d.log`."""
    mark = len(d.log)
    if named:
        d.svc.release(big, actual)
    else:
        _unnamed(d.svc, big, actual)
    d.pump()
    return mark


@pytest.mark.parametrize("named", [True, False])
@pytest.mark.parametrize("shards", [2, 4])
def test_a_refund_of_a_request_dispatched_while_the_band_sat_on_one_shard_moves_nothing(shards, named):
    """f's 2**32-token request is dispatched while f is the band's only flow (on one shard: the ledger keeps
    no fair state, so charges no finish time); other flows then arrive on the other shards (the ledger
    rebuilds its fair state) and f, still backlogged, releases it having used nothing. Nothing was
    charged, so nothing is refunded; the whole refund took f's shard 4.3e9 below the others and gave f
    every one of 5,000 dispatches (a review)."""
    d = Driver(shards)
    for _ in range(4):
        d.submit("f")
    d.pump()
    d.submit("f", BIG)
    for _ in range(4):
        d.submit("f")
    d.pump()
    while not any(i.request.tokens == BIG for i in d.inflight):
        d.step({"f"})
    big = d.take("f")
    assert not d.svc.ledger.bands[0].fair  # dispatched while the band kept no fair state
    others = [f"g{i}" for i in range(shards - 1)]
    for g in others:
        for _ in range(4):
            d.submit(g)
    d.pump()
    active = {"f", *others}
    for _ in range(200):
        d.step(active)
    assert d.svc.ledger.bands[0].fair
    mark = _refund(d, big, 0, named)
    for _ in range(600):
        d.step(active)
    after = Counter(d.log[mark:])
    if named:
        assert longest_run(d.log[mark:], "f") <= 4, after
        assert all(after[g] >= 600 / shards * 0.8 for g in others), after
    else:
        assert all(after[g] == 0 for g in others), after


@pytest.mark.parametrize("named", [True, False])
@pytest.mark.parametrize("shards", [1, 2, 4])
def test_a_refund_after_its_flow_came_back_banks_no_idle_time_at_n_shards(shards, named):
    """f (a shard of its own at N shards, where the band is spread: the ledger charges f's finish time)
    sends one 2**32-token request and goes idle while it runs and the others are served; it comes back
    while the request still runs (ahead: not lifted), then releases it having used 10 tokens. The
    refund takes its counter (at N shards its finish time, which alone decides between f's shard and
    the others) back at most to where its return would have lifted it: with the whole refund, f had
    335-500 dispatches in a row (a review)."""
    d = Driver(shards)
    others = [f"g{i}" for i in range(max(shards - 1, 1))]
    for g in others:  # (first, backlogged: at N shards the band is spread, so the ledger charges f's request)
        for _ in range(8):
            d.submit(g)
    d.pump()
    d.submit("f", BIG)
    d.pump()
    while not any(i.request.tokens == BIG for i in d.inflight):
        d.step(set(others))
    big = d.take("f")
    if shards > 1:
        assert d.svc._held[big.request.id][1] > 0  # charged to f's finish time: the ledger's bound applies
    for _ in range(300):  # f idle, its request in flight
        d.step(set(others))
    for _ in range(8):  # f comes back
        d.submit("f")
    d.pump()
    mark = _refund(d, big, 10, named)
    active = {"f", *others}
    for _ in range(400):
        d.step(active)
    run = longest_run(d.log[mark:], "f")
    if named:
        assert run <= 4, Counter(d.log[mark:])
    else:
        assert run >= 100, Counter(d.log[mark:])


@pytest.mark.parametrize("rebase", [True, False])
@pytest.mark.parametrize("shards", [1, 2, 4])
def test_huge_charges_leave_the_counters_able_to_hold_small_ones(shards, rebase, monkeypatch):
    """Throw-away flows declare 2**32 tokens at weight 1e-6 (4.3e15 a charge) while they have the band to
    themselves; y (500 tokens a request) and z (5,000) then share it by tokens, 0.50 each. Without the
    re-base (the negative control) the counters, and at N shards the ledger's clock, sat near 1e19,
    where a float cannot hold a charge of 1,000: z got no dispatch in 4,000 (a review)."""
    if not rebase:
        monkeypatch.setattr(fairness, "_REBASE_AT", math.inf)
        monkeypatch.setattr(ledger, "_REBASE_AT", math.inf)
    d = Driver(shards)
    for _ in range(3):  # three long requests hold 3 of the 4 slots: the throw-away flows have the band
        d.submit("h")
    d.pump()
    held = list(d.inflight)
    d.inflight.clear()
    throwaway = [f"x{i}" for i in range(max(shards, 2))]
    for _ in range(6000 // len(throwaway)):
        for x in throwaway:
            d.ids += 1
            d.svc.submit(Request(d.ids, x, 0, 1, tokens=BIG, weight=1e-6), 0.0)
        d.pump()
        while d.inflight:
            d.svc.release(d.inflight.pop(), None)  # no actual count: the charge stands
            d.pump()
    for item in held:
        d.svc.release(item, item.cost)
    d.pump()
    tokens = {"y": 500, "z": 5000}
    for flow, cost in tokens.items():
        for _ in range(8):
            d.submit(flow, cost)
    d.pump()
    served: Counter[str] = Counter()
    for _ in range(2000):
        item = d.inflight.pop(0)
        d.svc.release(item, item.cost)
        flow = item.request.flow
        if flow in tokens:
            served[flow] += item.cost
            d.submit(flow, tokens[flow])
        d.pump()
    share = served["z"] / (served["y"] + served["z"])
    if rebase:
        assert 0.45 <= share <= 0.55, served
    else:
        assert share < 0.1, served


class PaperLiftVTC(fairness.VirtualTokenCounter):
    """Negative control: a flow that empties keeps no lag (the paper's lift, and this round's first fix)."""

    def deactivate(self, flow):  # type: ignore[no-untyped-def]
        super().deactivate(flow)
        flow.lag = -math.inf

    def correct(self, flow, delta, weight, before=False):  # type: ignore[no-untyped-def]
        super().correct(flow, delta, weight, before)
        flow.lag = -math.inf


def token_shares(shards: int, over: bool, seed: int, *, control: bool = False) -> dict[str, float]:
    """Five flows of 4 closed-loop clients each (a budget of 8), requests of 50-1,500 actual tokens, each
    released at its end with its actual count; `bursty` flows pause (50 ms on average) after 30 % of
    their releases. With `over`, two flows declare 4,096 tokens (an OpenAI client's `max_tokens`);
    else every flow declares exactly (the oracle). Each flow's share of the actual tokens served
    (a review's harness, in fake time)."""
    config = Config(budget=BudgetConfig(max_inflight_requests=8),
                    service=ServiceConfig(fast_path=False, jsq_slack_bytes=0),
                    bands=[BandConfig(priority=0, fairness="vtc")], default_ttl=0)
    svc = ShardedService(config, shards)
    if control:
        for engine in svc.engines:
            engine.bands[0].fairness = PaperLiftVTC()
    rng = random.Random(seed)
    flows = {"exact1": (False, 0.0), "exact2": (False, 0.0), "over_bursty": (True, 0.05),
             "over_steady": (True, 0.0), "exact_bursty": (False, 0.05)}
    actual: dict[int, int] = {}
    ids = iter(range(1, 10**9))
    now = 0.0

    def submit(flow: str) -> None:
        rid = next(ids)
        actual[rid] = rng.randint(50, 1500)
        declared = 4096 if over and flows[flow][0] else actual[rid]
        svc.submit(Request(rid, flow, 0, 1, tokens=declared), now)

    for flow in flows:
        for _ in range(4):
            submit(flow)
    events: list[tuple[float, int, Any]] = []
    tokens: Counter[str] = Counter()
    tick = 0
    while now < 120.0:
        svc.pump(now)
        for item in svc.take_outbox():
            if item.outcome == Outcome.DISPATCHED:
                tick += 1
                heapq.heappush(events, (now + actual[item.request.id] / 10000 * rng.expovariate(1.0), tick, item))
                if now > 10.0:
                    tokens[item.request.flow] += actual[item.request.id]
        now, _, x = heapq.heappop(events)
        if isinstance(x, str):
            submit(x)
            continue
        svc.release(x, actual[x.request.id])
        think = flows[x.request.flow][1]
        if think and rng.random() < 0.3:
            tick += 1
            heapq.heappush(events, (now + rng.expovariate(1 / think), tick, x.request.flow))
        else:
            submit(x.request.flow)
    total = sum(tokens.values())
    return {flow: tokens[flow] / total for flow in flows}


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_an_over_declaring_flow_that_pauses_gets_what_an_exact_one_would(shards):
    """An over-declaring flow (4,096 declared, 50-1,500 used) that pauses between bursts is held back by
    its declared costs while it is backlogged; the refunds of its requests in flight land after it
    emptied, often after it came back. They return what it was held back from (its lag when it
    emptied), not its idle time: its share is what it gets declaring exactly (0.199), within 0.006. A
    flow that emptied kept no lag in this round's first fix, the negative control: 0.181 (a review)."""
    oracle = token_shares(shards, over=False, seed=1)["over_bursty"]
    got = token_shares(shards, over=True, seed=1)["over_bursty"]
    assert abs(got - oracle) <= 0.006, (got, oracle)
    if shards == 1:
        assert token_shares(1, over=True, seed=1, control=True)["over_bursty"] <= oracle - 0.012


@pytest.mark.parametrize("capped", [True, False])
@pytest.mark.parametrize("trick", ["tokens", "weight"])
def test_a_flow_parked_far_ahead_gives_a_flow_emptying_beside_it_no_more_than_max_lag(trick, capped):
    """s is parked far ahead (one request declaring 2**32 tokens, or weight 1e-6) and kept backlogged; a
    empties while s is the only other flow backlogged, so a stood far behind it (its lag); h, empty at
    that moment, comes back and is lifted to s's counter. a keeps at most `max_lag` of its lag: 5
    dispatches ahead of h, then they alternate. Uncapped (the negative control) a took 20,000 of 20,000
    (a review)."""
    d = Driver(1, max_lag=fairness.MAX_LAG if capped else float(1 << 40))
    for _ in range(4):
        d.submit("h")
    d.pump()  # h: 4 in flight (the budget), none queued
    if trick == "tokens":
        d.submit("s", BIG)
        for _ in range(3):
            d.submit("s", 1)
    else:
        for _ in range(4):
            d.ids += 1
            d.svc.submit(Request(d.ids, "s", 0, 1, tokens=1, weight=1e-6), 0.0)
    d.submit("a", 1)
    for _ in range(2):  # s's first (its huge charge), then a's: a empties, s the only other backlogged
        d.svc.release(d.inflight.pop(0), None)
        d.pump()
    for _ in range(8):
        d.submit("h")
    for _ in range(8):
        d.submit("a")
    d.pump()
    mark = len(d.log)
    for _ in range(2000):
        d.step({"h", "a"})
    served = [f for f in d.log[mark:] if f in "ha"]
    first_h = served.index("h") if "h" in served else len(served)
    if capped:
        assert first_h <= 6 and 0.45 <= served.count("a") / len(served) <= 0.55, (first_h, Counter(served))
    else:
        assert first_h >= 1000, (first_h, Counter(served))
