"""The distributor's ledger across shards (DESIGN.md §4 invariants 1-4, §6 admission and dispatch).

Most tests run `tests/multishard.py`: one `Ledger` and N `Engine(enforce_limits=False)` wired like
`distributor/service.py` and `workers/worker.py`, with per-shard FIFO channels both ways and a
seeded scheduler that interleaves deliveries, client operations (admit, release, cancel), clock
steps, TTL timers and crashes in every legal order. The model checks invariant 2 and the ledger's
counters after every step, invariant 3 at every dispatch, invariant 1 on every outcome.

Random schedules come from hypothesis (config, seed, length; derandomized so a run is repeatable);
scripted scenarios pin the races one at a time. Tests marked "BUG" assert the correct behaviour and
fail against the current ledger / engine; each names the cause and the proposed fix.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from conftest import FAIRNESS_NAMES, ORDERING_NAMES, make_config
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from multishard import Model, ModelError

from flowshard import ledger as ledger_module
from flowshard.analysis import max_min_fair
from flowshard.codec import Cancel
from flowshard.config import Config, ServiceConfig
from flowshard.ledger import Ledger, Pending, PendingState
from flowshard.types import Outcome

D = Outcome.DISPATCHED
CAP = Outcome.REJECTED_CAPACITY
DISPLACED = Outcome.EVICTED_DISPLACED
CANCELLED = Outcome.EVICTED_CANCELLED
SHARD_FAILURE = Outcome.EVICTED_SHARD_FAILURE

HI_LO = [{"priority": 1, "name": "hi"}, {"priority": 0, "name": "lo"}]
THREE = [
    {"priority": 2, "name": "hi", "displacement": True},
    {"priority": 1, "name": "mid"},
    {"priority": 0, "name": "lo"},
]
THREE_PLAIN = [{"priority": 2, "name": "hi"}, {"priority": 1, "name": "mid"}, {"priority": 0, "name": "lo"}]

# Derandomized (the same schedules every run) and without the shrink phase: a failure prints the
# config, seed and length, and the model's message carries the recent event trace; shrinking these
# schedules would cost 30 s and more.
MODEL_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def config(bands=None, *, fast_path: bool = True, jsq_slack_bytes: int = 0, **kw) -> Config:
    """A model config; JSQ-Bytes exact (no slack) unless asked, so that flows spread over the shards."""
    kw.setdefault("default_ttl", 0)
    return make_config(bands, service=ServiceConfig(fast_path=fast_path, jsq_slack_bytes=jsq_slack_bytes), **kw)


def _maybe(strategy, none_weight: int = 1):
    return st.one_of(*[st.none()] * none_weight, strategy)


@st.composite
def configs(
    draw, *, monotone_ceilings: bool = True, min_bands: int = 1, displacement: bool | None = None, scarce: bool = False
):
    """Small random configs: 1-3 bands with any policies, tight limits and budgets so that queues fill,
    displacement kicks in and grants are scarce. `scarce`: 3 bands, only a global request limit and
    a budget of 2-6 requests (several grants in flight at once: where priority races live)."""
    n = 3 if scarce else draw(st.integers(min_bands, 3))

    def limit(lo: int, hi: int) -> int | None:
        return None if scarce else draw(_maybe(st.integers(lo, hi), 3))

    ceilings = [draw(st.sampled_from([0.75, 1.0, 1.0, 1.0] if scarce else [0.5, 0.75, 1.0, 1.0])) for _ in range(n)]
    if monotone_ceilings:  # a higher band never has a lower ceiling (the usual setup)
        ceilings.sort(reverse=True)
    bands = [
        {
            "priority": n - i,
            "fairness": draw(st.sampled_from(FAIRNESS_NAMES)),
            "ordering": draw(st.sampled_from(ORDERING_NAMES)),
            "max_bytes": limit(40, 300),
            "max_requests": limit(2, 8),
            "flow_max_bytes": limit(30, 200),
            "flow_max_requests": limit(1, 5),
            "ceiling": ceilings[i],
            "displacement": draw(st.booleans()) if displacement is None else displacement,
        }
        for i in range(n)
    ]
    for band in bands:  # (a drr key: on another policy's band it is a configuration error)
        quantum = draw(st.integers(1, 64))
        if band["fairness"] == "drr":
            band["quantum"] = quantum
    return config(
        bands,
        fast_path=draw(st.booleans()),
        # exact JSQ-Bytes (flows spread), or a slack of a few requests' bytes (flows pack, then spill)
        jsq_slack_bytes=draw(st.sampled_from([0, 0, 30])),
        max_queued_requests=draw(st.integers(6, 16) if scarce else st.integers(3, 12) | _maybe(st.integers(3, 12))),
        max_queued_bytes=None if scarce else draw(_maybe(st.integers(50, 400))),
        max_inflight_requests=draw(st.integers(2, 6) if scarce else st.one_of(st.integers(1, 4), st.none())),
        max_inflight_bytes=None if scarce else draw(_maybe(st.integers(20, 150))),
    )


def fill_budget(m: Model, n: int, size: int = 10) -> list[int]:
    """Dispatch `n` requests (flow "t", lowest band) and keep their tickets: the budget is then full."""
    ids = [m.admit("t", m.priorities[-1], size) for _ in range(n)]
    m.settle()
    assert all(m.reqs[i].outcome is D for i in ids)
    return ids


# =========================================================================== invariant 2: exact limits


@MODEL_SETTINGS
@given(
    cfg=configs(monotone_ceilings=False),
    shards=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    steps=st.integers(20, 300),
    crash=st.sampled_from([0, 0, 1]),
    big=st.booleans(),
)
def test_limits_and_budget_hold_at_every_step(cfg, shards, seed, steps, crash, big):
    """Queued bytes/items within global, band and flow limits; in flight + grants within the request
    budget; in-flight bytes within the byte budget unless one oversized request runs alone; the
    ledger's counters equal the model's own (checked by Model.check after every step)."""
    _run(Model(cfg, shards, seed=seed, ttls=(0.0, 0.0, 1.0, 3.0), sizes=(0, 160 if big else 60),
               weights={"crash": crash, "cancel": 6}), steps)


def _run(m: Model, steps: int) -> None:
    """Random steps, then everything delivered and released: nothing may be left anywhere."""
    m.run(steps)
    m.drain()
    m.check_empty()


# random runs of 2-4 shards (the two tests below)
RANDOM_RUNS = {
    "cfg": configs(monotone_ceilings=False),
    "shards": st.integers(2, 4),
    "seed": st.integers(0, 2**32 - 1),
    "steps": st.integers(50, 300),
    "crash": st.sampled_from([0, 0, 1]),
}


@MODEL_SETTINGS
@given(**RANDOM_RUNS)
def test_shards_behind_on_their_answers_keep_every_invariant(cfg, shards, seed, steps, crash):
    """With the rule for shards behind on their answers on (`ledger.ANSWER_TIMEOUT`, on the model's
    clock, which moves 0.25-2 s a step: a shard not delivered to for a step is behind): every count,
    limit and budget check, strict priority at each dispatch, nothing left stuck at the end."""
    _run(Model(cfg, shards, seed=seed, ttls=(0.0, 0.0, 1.0), sizes=(0, 60), weights={"crash": crash, "cancel": 6},
               raise_on_priority_violation=True, answer_timer=True), steps)


def _rounds(m: Model, rounds: int, live: Callable[[float], Sequence[int]]) -> Iterator[tuple[float, Counter[str]]]:
    """Rounds of 0.25 s, requests held one round: each delivers everything to and from the shards
    `live(now)` names, yields (now, the round's dispatches per flow), then releases every ticket."""
    seen = 0
    for _ in range(rounds):
        for n in live(m.now):
            m.deliver_all_to(n)
            m.deliver_all_from(n)
        got = Counter(m.reqs[rec.id].flow for rec in m.dispatches[seen:])
        seen = len(m.dispatches)
        yield m.now, got
        for ticket in list(m.tickets):
            m.release(ticket)
        m.advance(0.25)


def _frozen_shard_run(frozen_band: int, *, timer: bool) -> tuple[dict[str, int], list[tuple[float, int]]]:
    """Shard 0 stops answering (nothing is delivered to it); shard 1 holds a low-band flow, shard 2 a
    high-band one; the others' grants are answered and their tickets released, a round every 0.25 s
    (requests that take about that long on the backends) for 5 s (the watchdog's). `frozen_band`:
    the band of shard 0's flow. Returns the healthy flows' dispatches, and the grants shard 0 held
    at each round (time, grants)."""
    cfg = config(HI_LO, max_inflight_requests=6, fast_path=False, max_queued_requests=None, max_queued_bytes=None)
    m = Model(cfg, 3, answer_timer=timer)
    priority = m.priorities[frozen_band]
    for _ in range(30):
        m.admit("frozen", priority, 10, shard=0)
        m.admit("low", m.priorities[1], 10, shard=1)
        m.admit("high", m.priorities[0], 10, shard=2)
    counted: dict[str, int] = {"low": 0, "high": 0}
    held: list[tuple[float, int]] = []
    for now, got in _rounds(m, 20, lambda now: (1, 2)):
        held.append((now, m.ledger.outstanding_grants(0)))
        for flow in counted:
            counted[flow] += got[flow]
    return counted, held


def test_a_shard_that_stops_answering_gets_no_more_grants_and_the_others_keep_the_budget():
    """A stopped worker (the review's SIGSTOP): its grants are never answered. Once it has answered
    none for `ANSWER_TIMEOUT` it gets no more, and the other shards' flows, of its band and above,
    share the rest of the budget; without the rule (negative control) it soaks up the whole budget
    and the low flow on the healthy shard stalls until the watchdog would kill it."""
    counted, held = _frozen_shard_run(1, timer=True)
    judged = {grants for at, grants in held if at > ledger_module.ANSWER_TIMEOUT}
    assert len(judged) == 1 and max(judged) < 6, held  # none more once judged behind
    assert counted == {"low": 30, "high": 30}, counted  # every request of theirs dispatched
    counted, held = _frozen_shard_run(1, timer=False)
    assert held[-1][1] == 6 and counted["low"] < 30, (held, counted)  # the low flow on shard 1 stalls


@pytest.mark.parametrize("budget", ["requests", "bytes"])
@pytest.mark.parametrize("hoard_rule", [True, False])
def test_a_stopped_shard_holding_half_the_budget_gets_no_more_before_it_is_judged_behind(
    hoard_rule: bool, budget: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 155: with requests held briefly (here 2 ms), the releases of the 0.1 s before a stopped
    shard is judged behind (`ANSWER_TIMEOUT`) gave it every grant: it held the whole budget and nothing
    was dispatched anywhere until the watchdog. One holding half the budget or more in grants it has
    not answered gets no more once `HOARD_TIMEOUT` has passed: the healthy shards keep the rest.
    Without the rule (the negative control) it takes all 6. The same in bytes (60: 6 requests of 10
    bytes; review 158: the rule counted requests only, and the first grant made with nothing in use
    reserved the whole byte budget, so 0 were served elsewhere)."""
    if not hoard_rule:
        monkeypatch.setattr(ledger_module, "HOARD_TIMEOUT", math.inf)
    limit = {"max_inflight_requests": 6} if budget == "requests" else {"max_inflight_bytes": 60}
    cfg = config(HI_LO, fast_path=False, max_queued_requests=None, max_queued_bytes=None, **limit)
    m = Model(cfg, 3, answer_timer=True)
    low = m.priorities[1]
    for _ in range(40):
        for shard, flow in enumerate(("frozen", "a", "b")):
            m.admit(flow, low, 10, shard=shard)
    served, held = 0, []
    for _ in range(40):  # 80 ms: under ANSWER_TIMEOUT
        for n in (1, 2):
            m.deliver_all_to(n)
            m.deliver_all_from(n)
        held.append(m.ledger.outstanding_grants(0))
        for ticket in list(m.tickets):
            m.release(ticket)
            served += 1
        m.advance(0.002)
    reserved = sum(g[1] for g in m.ledger._grants[0])
    if hoard_rule:
        assert held[-1] < 6 and max(held) <= 5, held  # about half, and what came in its first 5 ms
        assert served >= 40, served  # the healthy shards go on with the rest
        assert budget == "requests" or reserved < 60, reserved
    else:
        assert held[-1] == 6 or (budget == "bytes" and reserved >= 60 - 10), (held, reserved)


def test_a_stopped_shard_holding_the_higher_band_keeps_the_lower_bands_waiting_not_the_budget():
    """Strict priority holds: the high band's work on the stopped shard waits, and so does the low
    band elsewhere (the plan stops at the high band); the high band's other shard gets the budget,
    and none of it goes to the stopped shard once it is judged behind."""
    counted, held = _frozen_shard_run(0, timer=True)
    judged = {grants for at, grants in held if at > ledger_module.ANSWER_TIMEOUT}
    assert len(judged) == 1 and max(judged) < 6, held
    assert counted == {"low": 0, "high": 30}, counted


def _ceiling_model(max_inflight_bytes: int) -> tuple[Model, int, int]:
    """3 shards, a byte budget, the high band's ceiling (0.3) below the low band's: (model, hi, lo)."""
    bands = [{"priority": 1, "name": "hi", "ceiling": 0.3}, {"priority": 0, "name": "lo"}]
    cfg = config(bands, max_inflight_requests=20, max_inflight_bytes=max_inflight_bytes, fast_path=False,
                 max_queued_requests=None, max_queued_bytes=None)
    m = Model(cfg, 3, answer_timer=True)
    return m, m.priorities[0], m.priorities[1]


def _low_served_while_shard_0_is_silent(m: Model, lo: int, *, rounds: int, admit_at: int, more: int) -> int:
    """Rounds of 0.25 s in which shards 1 and 2 answer everything and shard 0 nothing; the low band's
    requests end each round (the high band's stay in flight); `more` low requests arrive on shard 2
    at round `admit_at`. Returns the low band's dispatches."""
    seen, low = 0, 0
    for step in range(rounds):
        for n in (1, 2):
            m.deliver_all_to(n)
            m.deliver_all_from(n)
        low += sum(1 for rec in m.dispatches[seen:] if m.reqs[rec.id].flow == "low")
        seen = len(m.dispatches)
        for ticket in [t for t in m.tickets if m.reqs[t].flow == "low"]:
            m.release(ticket)
        if step == admit_at:
            for _ in range(more):
                m.admit("low", lo, 100, shard=2)
        m.advance(0.25)
    return low


def test_a_band_above_its_ceiling_holds_nothing_for_an_unsure_grant_on_a_stopped_shard():
    """A byte budget: the high band (ceiling 0.3) is at its ceiling with requests in flight on shard 1,
    and its grant on shard 0 is unsure (a 30 kB request queued behind 100 B ones: it may come back
    for its head's size). While shard 0 answers, the bands below wait for that grant (its hand-back
    would bring the band under its ceiling again); once shard 0 is behind on its answers (stopped),
    they do not: a band above its ceiling holds nothing for its work there either (a review: every
    lower band, on every shard, waited for the watchdog)."""
    m, hi, lo = _ceiling_model(100_000)
    for _ in range(20):
        m.admit("low", lo, 100, shard=2)
    for n in (1, 2):
        m.deliver_all_to(n)
        m.deliver_all_from(n)
    for _ in range(5):
        m.admit("stuck", hi, 100, shard=0)
    m.admit("stuck", hi, 30_000, shard=0)
    for _ in range(30):
        m.admit("high", hi, 100, shard=1)
    low = _low_served_while_shard_0_is_silent(m, lo, rounds=12, admit_at=2, more=40)
    assert m.ledger.bands[0].unsure >= 1  # shard 0 still holds unsure grants
    assert low == 60  # served on the healthy shard all along


def test_a_shard_that_answers_then_stops_is_judged_behind_on_the_grants_it_still_holds():
    """Review 104: shard 0 answered one of its grants, then stopped with more out (unsure grants of a
    band above its ceiling). Hearing from it cleared its clock, and nothing planned for it again (the
    band above its ceiling gets none; the bands below wait for its unsure grants), so it was never
    judged behind: every lower band, on every shard, waited for the watchdog. A shard heard from that
    still holds grants is asked again from the next plan."""
    m, hi, lo = _ceiling_model(1_000_000)
    with m.one_pass():
        for _ in range(8):
            m.admit("stuck", hi, 100, shard=0)
        m.admit("stuck", hi, 30_000, shard=0)  # queued behind them: every reserve below it is unsure
    s0 = m.shards[0]
    m.deliver_to_shard(0)
    while s0.inbox and not s0.outbox:
        m.deliver_to_shard(0)
    m.deliver_all_from(0)  # its first answer; the plan then grants it unsure ones up to the ceiling
    while s0.inbox and not s0.outbox:
        m.deliver_to_shard(0)
    m._deliver_to_dist(0)  # one more answer, read: heard from; then shard 0 stops
    assert m.ledger.bands[0].unsure > 0 and m.ledger.outstanding_grants(0) > 0
    assert _low_served_while_shard_0_is_silent(m, lo, rounds=20, admit_at=1, more=20) == 20  # 5 s: the watchdog's


def test_a_band_that_gets_an_unsure_grant_mid_plan_holds_the_bands_below_from_then_on():
    """Review 105: the plan judges once whether a band above its ceiling has an unsure grant on a shard
    answering; in proxy mode the detector's saturation can fall within a plan, the band then gets an
    unsure grant on a healthy shard, and when it rose again the bands below went on, on the judgement
    made before that grant. (The detector here reads 0.6, 0.0, then 0.6 within one plan.)"""
    bands = [{"priority": 1, "name": "hi", "ceiling": 0.5}, {"priority": 0, "name": "lo"}]
    m = Model(config(bands, max_inflight_requests=1000, max_inflight_bytes=10_000_000, fast_path=False),
              3, answer_timer=True, check_every_step=False)
    hi, lo = m.priorities[0], m.priorities[1]
    ledger = m.ledger
    for _ in range(8):  # shard 2: the high band's work, an unsure grant out; then shard 2 stops (behind)
        m.admit("stuck", hi, 100, shard=2)
    m.admit("stuck", hi, 300_000, shard=2)
    m.deliver_all_to(2)
    m.deliver_all_from(2)
    m.advance(0.3)
    reads: Iterator[float] = iter([])
    ledger.external_saturation = lambda grants_out: next(reads, 0.0)
    with m.one_pass():
        for _ in range(4):
            m.admit("high", hi, 100, shard=0)
        m.admit("high", hi, 300_000, shard=0)  # its grant will be unsure
        for _ in range(3):
            m.admit("low", lo, 100, shard=1)
        reads = iter([0.6, 0.0, 0.6, 0.6, 0.6, 0.6])  # the detector's reads in the plan at the pass's end
    assert sum(g[4] for g in ledger._grants[0]) == 1  # the high band's unsure grant on a shard answering
    assert ledger.outstanding_grants(1) == 1  # and the low band's grants stop with it (3 before)


def _stop_and_resume(fairness: str, *, stop: float, resume: float, rounds: int = 40,
                     ) -> tuple[dict[str, int], list[dict[str, int]]]:
    """One band, 3 shards, a flow on each, 8 clients' worth of budget, requests held one round (0.25
    s): shard 0 answers nothing from `stop` to `resume` (seconds). Returns the dispatches per flow
    while it was stopped, and per round after it resumed."""
    cfg = config([{"priority": 0, "fairness": fairness}], max_inflight_requests=8, fast_path=False,
                 max_queued_requests=None, max_queued_bytes=None)
    m = Model(cfg, 3, answer_timer=True)
    for _ in range(60):
        for n in range(3):
            m.admit(f"f{n}", 0, 10, shard=n)
    during: dict[str, int] = {"f0": 0, "f1": 0, "f2": 0}
    after: list[dict[str, int]] = []

    def stopped(now: float) -> bool:
        return stop <= now < resume

    for now, got in _rounds(m, rounds, lambda now: (1, 2) if stopped(now) else (0, 1, 2)):
        if stopped(now):
            for flow in during:
                during[flow] += got[flow]
        elif now >= resume:
            after.append({flow: got[flow] for flow in during})
    return during, after


@pytest.mark.parametrize("fairness", ["round-robin", "drr", "global-fcfs"])
def test_the_other_shards_go_on_while_one_is_stopped_and_share_with_it_once_it_answers(fairness):
    """While shard 0 answers nothing, the flows on the others are served (global-fcfs passes over the
    stopped shard's older requests: waiting on them stalled the band with budget free, a review);
    once it answers again a fair band gives it its share, not every grant until its virtual time has
    caught up with the others' service meanwhile (a review: the healthy shards got nothing for 2 s
    after a 4.5 s stop); global-fcfs serves its requests first, the oldest."""
    during, after = _stop_and_resume(fairness, stop=0.5, resume=3.0)
    assert during["f1"] + during["f2"] >= 60, during  # ~8 a round between them, 10 rounds
    first = after[1]  # (the round it answers in is its backlog's: its grants from before the stop)
    if fairness == "global-fcfs":  # the oldest first: the stopped shard's requests waited longest
        assert first == {"f0": 8, "f1": 0, "f2": 0}, after[:4]
    else:
        assert first["f1"] >= 2 and first["f2"] >= 2, after[:4]


@pytest.mark.parametrize("ahead", [3, 300, 20_000])
def test_global_fcfs_passes_over_a_stopped_shards_requests_whatever_their_number(ahead):
    """global-fcfs across shards with shard 0 behind on its answers: the oldest uncovered request
    elsewhere is found however many of shard 0's are older, in each shard's own order (scanning the
    band's order past them cost 1.6 ms a plan at 50,000; a cap on the scan stalled the band once the
    stopped shard's backlog passed it: two reviews)."""
    cfg = config([{"priority": 0, "fairness": "global-fcfs"}], max_inflight_requests=None,
                 max_queued_requests=None, max_queued_bytes=None)
    ledger = Ledger(cfg, 3)
    for i in range(ahead):
        ledger.enqueue(Pending(i + 1, "stuck", 0, 10), 0)
    ledger.enqueue(Pending(ahead + 1, "fine", 0, 10), 2)
    ledger.enqueue(Pending(ahead + 2, "later", 0, 10), 1)
    asked_at = [0.0, math.inf, math.inf]  # shard 0 asked at 0.0, never answered
    assert ledger._oldest_uncovered(ledger.bands[0], asked_at, 0.5) == 2
    assert ledger._oldest_uncovered(ledger.bands[0], asked_at, -math.inf) == 0  # none behind: the oldest


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.booleans()), min_size=1, max_size=40), st.lists(st.integers(0, 5),
       min_size=3, max_size=3))
def test_global_fcfs_picks_the_same_oldest_uncovered_request_by_either_order(ops, grants):
    """The pick through each shard's own order (used while a shard is behind) is the pick through the
    band's order, when no shard is behind: requests queued and leaving at random, grants at random."""
    cfg = config([{"priority": 0, "fairness": "global-fcfs"}], max_inflight_requests=None,
                 max_queued_requests=None, max_queued_bytes=None)
    ledger = Ledger(cfg, 3)
    band = ledger.bands[0]
    queued: list[Pending] = []
    for i, (shard, leave) in enumerate(ops):
        if leave and queued:
            ledger.leave(queued.pop(len(queued) // 2))
        else:
            p = Pending(i + 1, f"f{i % 4}", 0, 10)
            ledger.enqueue(p, shard)
            queued.append(p)
    band.shard_granted = [min(g, items) for g, items in zip(grants, band.shard_items, strict=True)]
    none_behind = [math.inf] * 3
    assert ledger._oldest_uncovered(band, none_behind, 0.5) == ledger._oldest_uncovered(band, none_behind, -math.inf)


def _restless(config: Config, shards: int) -> Ledger:
    """A ledger whose bands settle (drop their fair state) after two requests on one shard instead of
    64: the lone/fair transitions (re-base, settle, re-spill) many times per run (review 22: at 64
    the model's small queues never reached a settle)."""
    ledger = Ledger(config, shards)
    ledger._calm = 2
    return ledger


@MODEL_SETTINGS
@given(**RANDOM_RUNS)
def test_bands_that_settle_and_spread_again_keep_every_invariant(cfg, shards, seed, steps, crash):
    """As above, with bands moving between one shard (lone, no fair state) and several (fair) all the
    time: every count, limit and budget check of the model, strict priority at each dispatch and
    nothing left stuck at the end."""
    _run(Model(cfg, shards, seed=seed, ttls=(0.0, 0.0, 1.0), sizes=(0, 60), weights={"crash": crash, "cancel": 6},
               ledger_factory=_restless, raise_on_priority_violation=True), steps)


def test_oversized_request_runs_alone_and_nothing_joins_it():
    m = Model(config(max_inflight_bytes=100), 2, fast_path=False)
    big = m.admit("a", 0, 150)
    m.settle()
    assert m.reqs[big].outcome is D  # larger than the whole byte budget: dispatched, alone
    small = [m.admit("b", 0, 1) for _ in range(3)]
    m.settle()
    assert all(m.reqs[i].outcome is None for i in small)  # nothing joins it
    assert m.inflight == {big: 150}
    m.release(big)
    m.settle()
    assert all(m.reqs[i].outcome is D for i in small)


def test_byte_budget_is_exact_across_shards():
    m = Model(config(max_inflight_bytes=100), 4, fast_path=False)
    ids = [m.admit(f, 0, 30) for f in "abcdefgh"]
    m.settle()
    assert sum(m.inflight.values()) <= 100
    assert sum(m.reqs[i].outcome is D for i in ids) == 3  # 3 x 30 B fit, a 4th does not
    m.drain()
    m.check_empty()


def test_a_byte_grant_below_a_queued_request_holds_the_bands_below_until_answered():
    """Under a byte budget a grant's reserve follows its shard's mean request size, which can be below
    its head's: 500, 0 and 0 bytes queued made 334-byte grants, handed back for the 500-byte head,
    while the band, counted covered, let a lower band be granted on the other shard, which dispatched
    first (a review: the service counted the inversion). Such a grant is unsure: until it is answered
    the bands below get nothing, in this plan or the next."""
    cfg = config([{"priority": 10, "name": "high"}, {"priority": 0, "name": "low"}], max_inflight_bytes=2202,
                 max_inflight_requests=10, fast_path=False)
    m = Model(cfg, 2, raise_on_priority_violation=True)
    m.admit("x", 0, 1000, shard=1)
    m.settle()
    highs = [m.admit("h", 10, size, shard=0) for size in (500, 0, 0)]
    low = m.admit("l", 0, 100, shard=1)
    m.settle()
    assert [d.id for d in m.dispatches][1:] == [*highs, low]
    m.drain()
    m.check_empty()

    ledger = Ledger(cfg, 2)
    held = Pending(1, "x", 1, 1000)
    ledger.enqueue(held, 1)
    ledger.plan_grants()
    ledger.grant_answered(1, 1000)
    ledger.leave(held, covered=True)
    for i, size in enumerate((500, 0, 0)):
        ledger.enqueue(Pending(2 + i, "h", 0, size), 0)
    assert [g[:3] for g in ledger.plan_grants()] == [(0, 0, 334)] * 3  # each below the 500-byte head
    ledger.enqueue(Pending(5, "l", 1, 100), 1)
    assert ledger.plan_grants() == []  # the next plan too: low waits for the high grants' answers
    for _ in range(3):
        ledger.grant_answered(0, None, need=500)
    assert [g[:2] for g in ledger.plan_grants()][:1] == [(0, 0)]  # high first, now with room for its head


def test_a_large_request_long_gone_does_not_shrink_byte_plans():
    """The largest request queued on a (band, shard) is counted exactly, not as a bound that falls
    only when its queue empties: one 90 kB request served earlier cut a backlog of 100-byte requests
    to one grant a plan for good (a review)."""
    ledger = Ledger(config(max_inflight_bytes=100_000, max_inflight_requests=None), 1)
    big = Pending(1, "a", 0, 90_000)
    ledger.enqueue(big, 0)
    backlog = [Pending(2 + i, "a", 0, 100) for i in range(1000)]
    for p in backlog:
        ledger.enqueue(p, 0)
    ledger.plan_grants()
    ledger.grant_answered(0, 90_000)
    ledger.leave(big, covered=True)
    ledger.budget.release(90_000)
    assert len(ledger.plan_grants()) > 100  # 200 bytes each, of the 100,000 free


# =========================================================================== invariant 3: strict priority


def priority_model(cfg, seed, *, evictions: bool, ledger_factory=Ledger, steps=300, narrow=True) -> Model:
    weights = {"cancel": 25 if evictions else 0, "timer": 4 if evictions else 0, "advance": 4 if evictions else 0}
    return Model(
        cfg,
        4,
        seed=seed,
        ledger_factory=ledger_factory,
        ttls=(0.0, 0.0, 1.0) if evictions else (0.0,),
        sizes=(1, 60),
        weights=weights,
        narrow=narrow,
    ).run(steps)


@MODEL_SETTINGS
@given(
    cfg=configs(displacement=False, scarce=True),
    seed=st.integers(0, 2**32 - 1),
    steps=st.integers(100, 400),
)
def test_strict_priority_across_four_shards_without_evictions(cfg, seed, steps):
    """No cancels, no TTLs, no displacement: every dispatch's grant was planned while no higher band
    had eligible work without a grant (Model.first_ungranted), on any of the 4 shards."""
    m = priority_model(cfg, seed, evictions=False, steps=steps)
    assert not m.violations, m.violations[:3]
    assert not m.ceiling_violations, m.ceiling_violations[:3]
    m.drain()
    assert not m.violations, m.violations[:3]


@settings(MODEL_SETTINGS, max_examples=60)  # about 1 in 7 of these schedules meets a phantom grant
@given(cfg=configs(scarce=True), seed=st.integers(0, 2**32 - 1), steps=st.integers(100, 400))
def test_strict_priority_across_four_shards_with_cancels_ttls_and_displacement(cfg, seed, steps):
    """BUG (phantom grants, see the two scripted tests below): with requests leaving their queues
    by cancel, TTL or displacement, the ledger grants a lower band while a higher band has eligible
    work holding no grant."""
    m = priority_model(cfg, seed, evictions=True, steps=steps)
    m.drain()
    assert not m.violations, m.violations[:3]


def _phantom_setup(x2_shard: int, lo_shard: int):
    """Two shards, budget 2 requests (both held), no fast path. A high request x1 on shard 0 gets
    its grant only after its client left (Cancel sent first), so the grant meets nothing and will
    come back; the ledger has the Done(cancelled) but not yet the GrantBack. Then x2 (high) arrives
    and one ticket is released."""
    m = Model(config(HI_LO, max_inflight_requests=2, fast_path=False), 2)
    t1, t2 = fill_budget(m, 2)
    lo = m.admit("l", 0, 10, shard=lo_shard)
    x1 = m.admit("x", 1, 10, shard=0)
    m.cancel(x1)
    m.release(t1)  # the ledger grants band hi to shard 0 for x1 (it does not know x1 is gone)
    assert [type(msg).__name__ for msg, _ in m.shards[0].inbox][-2:] == ["Cancel", "Grant"]
    m.deliver_all_to(0)  # x1 cancelled, then the grant finds no high work: GrantBack is on its way
    m.deliver_all_to(1)
    m.deliver_all_from(1)
    m._deliver_to_dist(0)  # only the Done(cancelled) of x1
    assert m.reqs[x1].outcome is CANCELLED and m.ledger.bands[0].granted == 1
    x2 = m.admit("x", 1, 10, shard=x2_shard)
    m.release(t2)
    return m, lo, x2


def test_phantom_grant_on_another_shard_does_not_cover_a_high_request():
    """BUG: the ledger treats band 0 as covered because queued_items (1: x2) <= granted (1: the grant
    sent to shard 0 for the cancelled x1). x2 sits on shard 1 with no grant, yet band lo gets the
    freed budget and shard 0 dispatches lo first.

    Fix: decide "band has grantable work" per shard: any(shard_items[n] > shard_granted[n]), not the
    band totals (a grant on shard n can never serve work on shard m)."""
    m, _lo, x2 = _phantom_setup(x2_shard=1, lo_shard=0)
    m.settle()
    assert not m.violations, m.violations
    assert m.reqs[x2].outcome is D


def test_phantom_grant_ahead_on_the_same_shard_does_not_cover_a_high_request():
    """BUG: x2 is queued on shard 0 *behind* the grant sent for x1 (FIFO): that grant can never serve
    x2, though per-shard counts (1 item, 1 grant) say x2 is covered. Band lo gets the budget.

    Fix: a grant can only serve requests enqueued before it. Track per (band, shard) how many
    outstanding grants are stale: when a request leaves other than by a dispatch answering a live
    grant of its own band and shard (cancel, TTL, displacement, failure, or taken by a lower band's
    grant), mark every grant of that (band, shard) outstanding now as stale; the answers of stale
    grants come first (FIFO), so count them down as grants are answered. Grantable work on (band,
    shard) = items > granted - stale. This never under-grants; it over-grants at most one round
    after such an exit (the extra grants are handed back)."""
    m, _lo, x2 = _phantom_setup(x2_shard=0, lo_shard=1)
    m.settle()
    assert not m.violations, m.violations
    assert m.reqs[x2].outcome is D


def test_lower_band_grant_does_not_dispatch_a_higher_band_above_its_ceiling():
    """BUG: per-band ceilings do not hold in grant mode. hi may dispatch only below saturation 0.5;
    with one of two slots in use the ledger rightly grants band lo, but Engine.dispatch(band=lo)
    serves the highest band with work, hi, at saturation 0.5. (Engine.pump skips a band at its
    ceiling; grant mode must too.)

    Fix: send the planner's saturation with the grant (Grant(band, max_bytes, saturation)) and make
    Engine.dispatch skip bands whose ceiling <= saturation, as pump does. Only matters when a
    higher band has a lower ceiling than a lower band (configs allow it)."""
    bands = [{"priority": 1, "ceiling": 0.5}, {"priority": 0, "ceiling": 1.0}]
    m = Model(config(bands, max_inflight_requests=2, fast_path=False), 1)
    fill_budget(m, 1)
    hi = m.admit("h", 1, 10)
    lo = m.admit("l", 0, 10)
    m.settle()
    assert not m.ceiling_violations, m.ceiling_violations
    assert m.reqs[hi].outcome is None and m.reqs[lo].outcome is D


class ReversedBandsLedger(Ledger):
    """Negative control: the planner grants the lowest band with work first."""

    def plan_grants(self):
        self.bands.reverse()
        try:
            return super().plan_grants()
        finally:
            self.bands.reverse()


class RoundRobinBandsLedger(Ledger):
    """Negative control: the planner starts from a different band on every call."""

    turn = 0

    def plan_grants(self):
        original = self.bands
        k = self.turn % len(original)
        self.turn += 1
        self.bands = original[k:] + original[:k]
        try:
            return super().plan_grants()
        finally:
            self.bands = original


@pytest.mark.parametrize("factory", [Ledger, ReversedBandsLedger])
def test_priority_checker_scripted_negative_control(factory):
    """hi waits on shard 0, lo on shard 1, one slot frees: the real planner grants hi; the reversed
    one grants lo, and the checker flags the dispatch."""
    # narrow=False: the shards' own check (see the dispatch-time tests) would otherwise hide the planner's fault
    m = Model(config(HI_LO, max_inflight_requests=1, fast_path=False), 2, ledger_factory=factory, narrow=False)
    (t,) = fill_budget(m, 1)
    hi = m.admit("h", 1, 10, shard=0)
    lo = m.admit("l", 0, 10, shard=1)
    m.settle()
    m.release(t)
    m.settle()
    if factory is Ledger:
        assert not m.violations
        assert m.reqs[hi].outcome is D and m.reqs[lo].outcome is None
    else:
        assert m.reqs[lo].outcome is D
        assert len(m.violations) == 1 and "band 0 had 1 eligible queued request(s) holding no grant" in m.violations[0]


@pytest.mark.parametrize("factory", [ReversedBandsLedger, RoundRobinBandsLedger])
def test_priority_checker_flags_broken_planners_in_random_schedules(factory):
    """The same checker and schedules that the real planner passes (without evictions) catch a
    planner that serves bands in the wrong order."""
    cfg = config(THREE_PLAIN, max_inflight_requests=2, max_queued_requests=12)
    flagged = 0
    for seed in range(20):
        ok = priority_model(cfg, seed, evictions=False, steps=200)
        assert not ok.violations, ok.violations[:1]
        bad = priority_model(cfg, seed, evictions=False, ledger_factory=factory, steps=200, narrow=False)
        flagged += bool(bad.violations)
    assert flagged >= 10, f"the checker flagged the broken planner in only {flagged}/20 schedules"


def test_idle_fast_path_never_skips_queued_higher_work():
    m = Model(config(HI_LO, max_inflight_requests=1), 2)
    (t,) = fill_budget(m, 1)
    hi = m.admit("h", 1, 10)
    m.release(t)  # the grant for hi is in flight; a low newcomer must not take the fast path
    lo = m.admit("l", 0, 10)
    assert m.reqs[lo].outcome is None and m.fast_paths == 1
    m.settle()
    assert m.reqs[hi].outcome is D and not m.violations


# =========================================================================== invariant 1: one outcome


@MODEL_SETTINGS
@given(
    cfg=configs(monotone_ceilings=False),
    shards=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    steps=st.integers(20, 300),
)
def test_exactly_one_outcome_with_cancels_racing_dispatches(cfg, shards, seed, steps):
    """Heavy cancelling (clients leaving while their request is queued, being granted, dispatched,
    displaced or parked), TTLs and crashes: each request ends exactly once, a client that stayed
    hears exactly that outcome, one that left hears nothing, nothing is dispatched twice, and a
    dispatch nobody waits for gives its budget back at once (Model.check)."""
    m = Model(cfg, shards, seed=seed, ttls=(0.0, 1.0, 2.0), weights={"cancel": 20, "crash": 1, "to_shard": 20})
    m.run(steps)
    m.check_outcomes()
    m.drain()
    m.check_empty()


def test_cancel_that_arrives_after_the_dispatch_releases_the_budget_at_once():
    m = Model(config(HI_LO, max_inflight_requests=2, fast_path=False), 2)
    (t,) = fill_budget(m, 1)
    a = m.admit("a", 0, 10, shard=0)  # granted at once (one slot free); the grant is in transit
    waiting = m.admit("b", 0, 10, shard=1)  # budget full now
    assert [type(msg).__name__ for msg, _ in m.shards[0].inbox] == ["Enqueue", "Grant"]
    m.cancel(a)  # the client leaves; the Cancel travels behind the Grant
    assert [type(msg).__name__ for msg, _ in m.shards[0].inbox] == ["Enqueue", "Grant", "Cancel"]
    m.deliver_all_to(0)  # the shard dispatches a, then ignores the Cancel
    assert m.reqs[a].dispatches == 1
    m.deliver_all_from(0)  # Done(dispatched) for a client that left: released at once
    assert m.reqs[a].outcome is D and m.reqs[a].delivered == []
    assert a not in m.tickets and a not in m.inflight
    assert m.ledger.budget.inflight == 1  # only t
    m.settle()
    assert m.reqs[waiting].outcome is D  # the freed slot went to the next request
    m.release(t)
    m.release(waiting)
    m.drain()
    m.check_empty()


def test_cancel_before_the_grant_arrives_hands_the_grant_back():
    m = Model(config(max_inflight_requests=1, fast_path=False), 1)
    (t,) = fill_budget(m, 1)
    a = m.admit("a", 0, 10)
    m.cancel(a)
    m.release(t)  # grant planned behind the Cancel
    m.settle()
    assert m.reqs[a].outcome is CANCELLED and m.reqs[a].delivered == [] and m.reqs[a].dispatches == 0
    assert m.grantbacks == 1 and m.ledger.grants_out == 0 and m.ledger.budget.inflight == 0
    m.check_empty()


def test_cancelled_parked_newcomer_ends_cancelled_at_once_and_its_victim_still_leaves():
    """A parked newcomer whose client leaves ends `cancelled` at once and its held room goes back (it
    waited for its victims before, holding the room); the victim, whose cancel is on its way, is
    displaced all the same."""
    m = Model(config(THREE, max_queued_requests=2, max_inflight_requests=1, fast_path=False), 2)
    fill_budget(m, 1)
    lows = [m.admit("l", 0, 10) for _ in range(2)]
    hi = m.admit("h", 2, 10)
    assert m.reqs[hi].victims == [lows[1]] and m.reqs[hi].pending.state == PendingState.NEW
    m.cancel(hi)
    assert m.reqs[hi].outcome is CANCELLED and m.reqs[hi].delivered == []
    assert (m.ledger.reserved_items, m.ledger.bands[0].held) == (0, (0, 0))
    m.settle()
    assert m.reqs[lows[1]].outcome is DISPLACED and not m.reqs[hi].routed
    m.drain()
    m.check_empty()


# =========================================================================== invariant 4: counters reconcile


@MODEL_SETTINGS
@given(
    cfg=configs(monotone_ceilings=False),
    shards=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    steps=st.integers(20, 300),
)
def test_counters_reconcile_at_quiescence(cfg, shards, seed, steps):
    """After delivering everything in transit (tickets still held, so work may stay queued): ledger
    total = sum over bands = sum over shards = sum over flows = what each engine's queues hold;
    after releasing everything and draining: all zero, nothing in flight, no grants."""
    m = Model(cfg, shards, seed=seed, ttls=(0.0, 1.0, 3.0), weights={"crash": 1})
    m.run(steps)
    m.settle()
    m.reconcile()
    m.drain()
    m.check_empty()


# =========================================================================== displacement across shards


def displacement_model(**kw) -> tuple[Model, list[int], list[int]]:
    """4 shards, budget held; lo requests on shards 0-2, mid on 3, 0, 1 (6 queued: the global limit)."""
    kw.setdefault("max_queued_requests", 6)
    m = Model(config(THREE, max_inflight_requests=1, fast_path=False, **kw), 4)
    fill_budget(m, 1)
    lo = [m.admit(f"l{i}", 0, 10, shard=i) for i in range(3)]
    mid = [m.admit(f"m{i}", 1, 10, shard=(3 + i) % 4) for i in range(3)]
    m.settle()
    assert m.ledger.queued_items == 6
    return m, lo, mid


def test_displacement_takes_the_newest_of_the_lowest_band_first_on_whichever_shard():
    m, lo, mid = displacement_model()
    his = [m.admit("h", 2, 10) for _ in range(4)]
    assert [m.reqs[h].victims for h in his] == [[lo[2]], [lo[1]], [lo[0]], [mid[2]]]
    cancels = {n: [msg.id for msg, _ in m.shards[n].inbox if isinstance(msg, Cancel)] for n in range(4)}
    assert cancels == {0: [lo[0]], 1: [lo[1], mid[2]], 2: [lo[2]], 3: []}
    assert all(m.reqs[h].pending.state == PendingState.NEW and not m.reqs[h].routed for h in his)
    m.settle()
    assert m.outcomes([*lo, mid[2]]) == dict.fromkeys([*lo, mid[2]], DISPLACED)
    assert all(m.reqs[h].routed for h in his)  # admitted once their victims left
    assert m.ledger.queued_items == 6
    m.drain()
    m.check_empty()


def test_newcomer_is_admitted_only_after_all_its_victims_left():
    m, lo, _mid = displacement_model(max_queued_requests=None, max_queued_bytes=60)
    hi = m.admit("h", 2, 25)  # needs 25 B: three 10 B victims, on shards 2, 1, 0
    assert m.reqs[hi].victims == [lo[2], lo[1], lo[0]]
    m.deliver_all_to(2)
    m.deliver_all_from(2)
    m.deliver_all_to(1)
    m.deliver_all_from(1)
    assert m.reqs[hi].pending.victims_left == 1 and not m.reqs[hi].routed
    assert m.ledger.queued_bytes == 40
    m.deliver_all_to(0)
    m.deliver_all_from(0)
    assert m.reqs[hi].routed and m.ledger.queued_bytes == 55
    m.drain()
    m.check_empty()


def test_room_freed_by_victims_is_held_for_their_newcomer():
    # 60 B limit, 60 B queued below. hi needs 25 B: victims on shards 2, 1, 0 (10 B each). While it
    # waits for the last one, a later arrival of the same band must not take the room the first two
    # freed: it is held for hi, or hi would be rejected after three evictions for nothing.
    m, _lo, mid = displacement_model(max_queued_requests=None, max_queued_bytes=60)
    hi = m.admit("h", 2, 25)
    m.deliver_all_to(2)
    m.deliver_all_from(2)
    m.deliver_all_to(1)
    m.deliver_all_from(1)
    assert m.ledger.queued_bytes == 40 and m.ledger.reserved_bytes == 20  # two victims' room, held
    late = m.admit("x", 2, 20)  # same band, arrives while hi is parked: only mid-band victims are left
    assert m.reqs[late].victims == [mid[2], mid[1]]  # it displaces for itself, not into hi's room
    m.deliver_all_to(0)
    m.deliver_all_from(0)
    assert m.reqs[hi].routed and m.reqs[hi].outcome is None  # admitted, not rejected
    assert m.ledger.reserved_bytes == m.reqs[late].pending.reserved_bytes  # only late's room is held now
    m.settle()
    assert m.reqs[late].routed and m.ledger.reserved_bytes == 0
    assert m.ledger.queued_bytes == 25 + 20 + 10  # hi, late, the last mid-band request
    m.drain()
    m.check_empty()


def test_band_room_of_a_parked_newcomer_is_held_too():
    # hi may hold 30 B. hi#1 (25 B) parks for victims below; hi#2 (20 B) arrives meanwhile. Without a
    # hold, hi#2 would also pass the band limit (nothing of hi is queued yet), evict victims of its
    # own, and be rejected only after they left. With the hold it is rejected at once, evicting nothing.
    bands = [{"priority": 2, "name": "hi", "displacement": True, "max_bytes": 30}, *THREE[1:]]
    m = Model(config(bands, max_inflight_requests=1, fast_path=False, max_queued_bytes=60), 4)
    fill_budget(m, 1)
    lo = [m.admit(f"l{i}", 0, 10, shard=i) for i in range(3)]
    [m.admit(f"m{i}", 1, 10, shard=(3 + i) % 4) for i in range(3)]
    m.settle()
    first = m.admit("h", 2, 25)
    assert m.reqs[first].victims == [lo[2], lo[1], lo[0]]
    second = m.admit("h", 2, 20)
    assert m.reqs[second].outcome is CAP and m.reqs[second].victims == []
    m.settle()
    assert m.reqs[first].routed and m.displacements == 3
    m.drain()
    m.check_empty()


def test_newcomer_parked_past_its_ttl_is_evicted_not_dispatched():
    m, lo, _mid = displacement_model()
    hi = m.admit("h", 2, 10, ttl=0.5)
    assert m.reqs[hi].victims == [lo[2]] and not m.reqs[hi].routed
    m.advance(0.6)  # its victim is slow to leave: the TTL runs out while it is parked
    m.settle()
    assert m.reqs[hi].outcome is Outcome.EVICTED_TTL and m.reqs[hi].dispatches == 0
    assert m.ledger.reserved_bytes == 0
    m.drain()
    m.check_empty()


def test_nothing_is_displaced_when_everything_below_would_not_suffice():
    m, lo, mid = displacement_model(max_queued_requests=None, max_queued_bytes=70)
    hi = m.admit("h", 2, 80)  # 60 B queued below, 70 B limit: even all of it would not make room
    assert m.reqs[hi].outcome is CAP and m.reqs[hi].victims == []
    assert m.cancels_sent == 0 and all(m.reqs[i].routed for i in lo + mid)
    hi2 = m.admit("h", 2, 65)  # needs 55 B: all six lower requests (60 B), lowest band first, newest first
    assert m.reqs[hi2].victims == [lo[2], lo[1], lo[0], mid[2], mid[1], mid[0]]
    m.settle()
    assert m.reqs[hi2].routed and m.ledger.queued_bytes == 65
    m.drain()
    m.check_empty()


def test_a_parked_newcomer_that_gives_up_returns_its_held_room_and_its_victims_owe_it_nothing():
    """`abandon`: a newcomer parked for displacement whose TTL runs out (or whose client leaves) before
    its victims have left gives back the global, band and flow room held for it at once; the victims,
    already being cancelled, then leave without freeing it (it is gone)."""
    cfg = config([{"priority": 1, "displacement": True}, {"priority": 0}], max_queued_requests=2,
                 max_inflight_requests=None)
    ledger = Ledger(cfg, 2)
    lows = [Pending(i, "low", 1, 10) for i in (1, 2)]
    for p in lows:
        assert ledger.check(p) == []
        ledger.enqueue(p, 0)
    newcomer = Pending(3, "high", 0, 10)
    victims = ledger.check(newcomer)
    assert victims == [lows[1]]
    ledger.mark_victims(newcomer, victims)
    held = (ledger.reserved_items, ledger.bands[0].held, ledger.bands[0].flow_held)
    assert held[0] == 0 and held[1] == (10, 1) and held[2] == {"high": (10, 1)}  # the queue is full: held per band
    ledger.abandon(newcomer)
    assert (ledger.reserved_items, ledger.reserved_bytes) == (0, 0)
    assert ledger.bands[0].held == (0, 0) and ledger.bands[0].flow_held == {}
    assert newcomer.victims_left == 0 and lows[1].displacer is None
    assert ledger.leave(lows[1]) is None  # the victim leaves: nobody to hand the room to
    assert ledger.check(Pending(4, "other", 0, 10)) == []  # the room is free for others


@MODEL_SETTINGS
@given(
    cfg=configs(displacement=True, scarce=True),
    seed=st.integers(0, 2**32 - 1),
    steps=st.integers(50, 300),
)
def test_displacement_in_random_schedules(cfg, seed, steps):
    """Every band displaces, the global limit binds: each admission matches the capacity oracle
    (Model._check_admission: reject only when displacing all queued lower work would not do, else
    exactly the shortest newest-first prefix from the lowest band), newcomers wait for their victims,
    victims racing their own dispatch, TTL or cancel end once; counters reconcile at the end."""
    m = Model(cfg, 4, seed=seed, ttls=(0.0, 2.0), weights={"cancel": 4, "release": 6})
    m.run(steps)
    m.settle()
    m.reconcile()
    m.drain()
    m.check_empty()


def test_victim_dispatched_before_its_cancel_arrives_still_frees_the_newcomer():
    m = Model(config(THREE, max_queued_requests=2, max_inflight_requests=2, fast_path=False), 2)
    fill_budget(m, 1)
    victim = m.admit("l", 0, 10, shard=0)  # granted at once: Enqueue, Grant in shard 0's inbox
    other = m.admit("l2", 0, 10, shard=1)  # another flow: one flow is never on two shards at once
    hi = m.admit("h", 2, 10)
    assert m.reqs[hi].victims == [other]
    hi2 = m.admit("h", 2, 10)
    assert m.reqs[hi2].victims == [victim]
    assert [type(msg).__name__ for msg, _ in m.shards[0].inbox] == ["Enqueue", "Grant", "Cancel"]
    m.deliver_all_to(0)  # dispatched on the grant; the Cancel finds nothing
    m.deliver_all_from(0)
    assert m.reqs[victim].outcome is D and m.reqs[victim].delivered == [D]
    assert m.reqs[hi2].routed  # its victim left (by dispatch): admitted
    m.drain()
    m.check_empty()


# =========================================================================== shard failure


def test_shard_failure_fails_exactly_what_was_routed_there():
    m = Model(config(THREE, max_inflight_requests=3, max_queued_requests=8, fast_path=False), 4)
    t = fill_budget(m, 3)
    queued = {n: [m.admit(f"f{n}", 0, 10, shard=n), m.admit(f"f{n}", 1, 10, shard=n)] for n in range(3)}
    low3 = m.admit("f3", 0, 10, shard=3)
    m.settle()
    in_transit = m.admit("z", 1, 30, shard=3)  # the 8th: never read by shard 3
    newcomer = m.admit("h", 2, 10)  # full: displaces the newest low request, low3 on shard 3
    assert m.reqs[newcomer].victims == [low3]
    m.release(t[0])
    m.release(t[1])
    assert m.ledger.outstanding_grants(3) == 1  # shard 3 holds the most mid bytes: the first grant
    m.crash(3)  # loses Enqueue(z), Cancel(low3) and the Grant
    m.deliver_all_from(3)
    failed = m.notice_crash(3)  # asserts shard_failed(3) == the requests routed there, not done
    assert failed == sorted([low3, in_transit])
    assert m.outcomes(failed) == dict.fromkeys(failed, SHARD_FAILURE)
    assert m.ledger.outstanding_grants(3) == 0
    for band in m.ledger.bands:
        assert band.shard_items[3] == band.shard_bytes[3] == band.shard_granted[3] == 0
    assert m.reqs[newcomer].routed and m.reqs[newcomer].shard != 3  # its victim is gone: admitted elsewhere
    assert all(m.reqs[i].routed for ids in queued.values() for i in ids)  # other shards untouched
    m.settle()
    m.reconcile()
    m.drain()
    m.check_empty()


@MODEL_SETTINGS
@given(cfg=configs(monotone_ceilings=False), seed=st.integers(0, 2**32 - 1), steps=st.integers(20, 300))
def test_random_crashes_keep_outcomes_and_counters_exact(cfg, seed, steps):
    """Crashes at random points (unread messages lost, written ones still read, then the distributor
    notices): shard_failed returns exactly the requests routed there and not done (Model.notice_crash)."""
    m = Model(cfg, 4, seed=seed, ttls=(0.0, 2.0), weights={"crash": 3, "cancel": 5})
    m.run(steps)
    m.settle()
    m.reconcile()
    m.drain()
    m.check_empty()


# =========================================================================== grants and routing


def test_a_backlogged_flow_stays_on_one_shard_and_new_flows_spread_by_jsq_bytes():
    """Flow affinity (DESIGN §4.7): while a flow holds anything queued or in transit, every new
    request of it goes to the same shard; JSQ-Bytes places a flow only when it starts afresh, so
    flows (not one flow's requests) spread over the shards."""
    m = Model(config(max_inflight_requests=1, fast_path=False, max_queued_requests=None, max_queued_bytes=None), 4)
    fill_budget(m, 1)
    sizes = [(i * 37) % 50 + 1 for i in range(80)]
    for i, size in enumerate(sizes):
        m.admit(f"f{i % 8}", 0, size)
    m.settle()
    shards_of = {f: {r.shard for r in m.reqs.values() if r.flow == f and r.routed} for f in (f"f{i}" for i in range(8))}
    assert all(len(s) == 1 for s in shards_of.values()), shards_of
    per_shard = [sum(1 for s in shards_of.values() if n in s) for n in range(4)]
    assert per_shard == [2, 2, 2, 2], per_shard  # 8 new flows over 4 empty shards: two each
    m.drain()
    m.check_empty()
    assert m.admit("f0", 0, 5) and m.reqs[max(m.reqs)].shard in range(4)  # an idle flow may start anywhere


def test_grants_spread_over_shards_in_proportion_to_queued_bytes():
    cfg = config(max_inflight_requests=None)
    ledger = Ledger(cfg, 2)
    for i in range(30):
        first = i < 10  # flow a: 10 x 30 B on shard 0; flow b: 20 x 10 B on shard 1
        ledger.enqueue(Pending(i + 1, "a" if first else "b", 0, 30 if first else 10), 0 if first else 1)
    grants = ledger.plan_grants()
    assert len(grants) == 30  # unlimited budget: every queued request gets a grant
    first = [g[0] for g in grants[:10]]
    assert 5 <= first.count(0) <= 7, first  # 300:200 bytes -> about 6 of the first 10 to shard 0


def test_stale_need_does_not_block_a_request_that_fits():
    """BUG: after a GrantBack(need=80) the ledger remembers the need for (band, shard) until a
    dispatch there. When the 80 B head leaves another way (cancelled here; TTL, displacement and
    shard failure likewise), the 10 B request behind it is never granted while 70 B of budget are
    free (and no lower band is either): plan_grants returns at `room < hint` until every ticket is
    released.

    Fix: forget `_need[(band, shard)]` when a request of that (band, shard) leaves without being
    dispatched (leave()) and in shard_failed(); a too-large head is re-discovered by one GrantBack."""
    m = Model(config(max_inflight_bytes=100, fast_path=False), 1)
    fill_budget(m, 1, size=30)
    big = m.admit("a", 0, 80)
    small = m.admit("a", 0, 10)  # typical size 45 <= room 70: a grant of 70 B, the 80 B head is handed back
    m.settle()
    assert m.grantbacks == 1 and m.reqs[small].outcome is None
    m.cancel(big)
    m.settle()
    assert m.reqs[big].outcome is CANCELLED
    assert m.reqs[small].outcome is D, "a 10 B request waits with 70 B of budget free"


def test_grants_are_answered_in_order_and_reserve_bytes():
    cfg = config(max_inflight_bytes=100, max_inflight_requests=None)
    ledger = Ledger(cfg, 1)
    a, b = Pending(1, "a", 0, 20), Pending(2, "a", 0, 20)
    ledger.enqueue(a, 0)
    ledger.enqueue(b, 0)
    grants = ledger.plan_grants()
    # twice the typical size each, nothing in flight or not (it was the whole budget for the first: one grant
    # to a stopped shard held all of it, review 158)
    assert [g[:3] for g in grants] == [(0, 0, 40)] * 2
    ledger.grant_answered(0, 20)
    ledger.leave(a)
    assert ledger.budget.inflight_bytes == 20 and ledger.grants_bytes == 40 and ledger.grants_out == 1
    c = Pending(3, "a", 0, 20)
    ledger.enqueue(c, 0)
    assert [g[:3] for g in ledger.plan_grants()] == [(0, 0, 40)]  # within the 40 B left
    assert ledger.grants_out == 2 and ledger.grants_bytes == 80


def test_model_detects_a_ledger_that_miscounts():
    """The model's own cross-checks are live: a ledger that forgets to count a request is caught."""

    class LeakyLedger(Ledger):
        def leave(self, p, *, covered=False):
            newcomer = super().leave(p, covered=covered)
            self.queued_bytes += 1  # leak a byte
            return newcomer

    m = Model(config(max_inflight_requests=1, fast_path=False), 2, ledger_factory=LeakyLedger)
    m.admit("a", 0, 10)
    with pytest.raises(ModelError, match="ledger queued_bytes"):
        m.settle()


# =========================================================================== invariant 7: ordering


class NoAffinityLedger(Ledger):
    """The routing before flow affinity (negative control): every request placed by JSQ-Bytes alone.
    Always fair: a band on one shard grants only that shard, which affinity makes the only one holding
    its work (Ledger._spread_to looks at a flow's first request only)."""

    def __init__(self, config: Config, shards: int) -> None:
        super().__init__(config, shards, lone=False)

    def affine_shard(self, p: Pending) -> int:
        return -1


def ordering_model(cfg: Config, shards: int, seed: int, ledger_factory=Ledger, crash: int = 0) -> Model:
    return Model(cfg, shards, seed=seed, ledger_factory=ledger_factory, flows="ab", sizes=(1, 40),
                 ttls=(0.0, 1.0, 3.0, 8.0), weights={"cancel": 1, "admit": 30, "crash": crash})


@MODEL_SETTINGS
@given(cfg=configs(), shards=st.sampled_from([1, 2, 4, 8]), seed=st.integers(0, 2**32 - 1),
       steps=st.integers(50, 300))
def test_a_flow_is_dispatched_in_order_at_every_shard_count(cfg, shards, seed, steps):
    """Invariant 7: under fcfs a flow's requests leave in arrival order, under edf by their deadline
    keys, at every shard count, through cancels, TTLs and displacement (the model's oracle looks at
    every queue and every message in transit at each dispatch)."""
    m = ordering_model(cfg, shards, seed).run(steps)
    m.drain()
    assert m.overtakes == [], m.overtakes[:3]


@MODEL_SETTINGS
@given(cfg=configs(), shards=st.sampled_from([2, 4]), seed=st.integers(0, 2**32 - 1), steps=st.integers(50, 300))
def test_a_flow_stays_in_order_through_shard_crashes(cfg, shards, seed, steps):
    """A crash ends everything its shard held (shard_failure) and with it the affinity of its flows:
    their next requests start afresh elsewhere, behind nothing of theirs."""
    m = ordering_model(cfg, shards, seed, crash=2).run(steps)
    m.drain()
    assert m.overtakes == [], m.overtakes[:3]


def test_ordering_oracle_negative_control():
    """Without flow affinity one flow is spread over the shards and its requests overtake each other:
    the same oracle must see it (else the test above proves nothing)."""
    cfg = config([{"priority": 0, "fairness": "round-robin", "ordering": "fcfs"}], max_inflight_requests=2,
                 fast_path=False)
    seen = 0
    for seed in range(5):
        m = ordering_model(cfg, 4, seed, NoAffinityLedger).run(300)
        m.drain()
        seen += len(m.overtakes)
        assert ordering_model(cfg, 4, seed).run(300).overtakes == []
    assert seen > 0


# =========================================================================== fairness across shards


class BytesProportionalLedger(Ledger):
    """Grants spread over shards in proportion to the bytes they hold (before fair shares): negative control."""

    @staticmethod
    def _shard_rank(band, shard, live):
        return 0.0, -band.shard_bytes[shard] / (live + 1)


def backlogged_service_difference(fairness: str, shards: int, *, weights: dict[str, float] | None = None,
                                  ledger_factory=Ledger, rounds: int = 150, seed: int = 1) -> float:
    """Every flow kept backlogged (one flooding: 30 queued, the rest 3 each), budget 4, tickets released
    as soon as dispatched; the largest gap in weighted service (the band's unit) between two flows at
    any dispatch. The same oracle at every shard count: the flows never stop being backlogged."""
    weights = weights or {}
    band: dict[str, Any] = {"priority": 0, "fairness": fairness, **({"quantum": 64} if fairness == "drr" else {})}
    cfg = config([band], max_inflight_requests=4,
                 fast_path=False, max_queued_requests=None, max_queued_bytes=None, weights=weights)
    m = Model(cfg, shards, seed=seed, ledger_factory=ledger_factory)
    rng = random.Random(seed)
    backlog = {"a": 30, "b": 3, "c": 3, "d": 3, "e": 3}
    unit = {"round-robin": lambda r: 1, "drr": lambda r: r.size, "vtc": lambda r: r.size}[fairness]
    served = dict.fromkeys(backlog, 0.0)
    worst, seen = 0.0, 0
    for _ in range(rounds):
        for f, depth in backlog.items():
            while sum(1 for r in m.reqs.values() if r.flow == f and r.outcome is None) < depth:
                m.admit(f, 0, rng.randint(1, 60))
        m.settle()
        for rec in m.dispatches[seen:]:
            r = m.reqs[rec.id]
            served[r.flow] += unit(r) / weights.get(r.flow, 1.0)
            worst = max(worst, max(served.values()) - min(served.values()))
        seen = len(m.dispatches)
        for t in list(m.tickets):
            m.release(t)
    return worst


@pytest.mark.parametrize("fairness", ["round-robin", "drr", "vtc"])
def test_fairness_across_shards_within_one_and_a_half_of_one_shard(fairness):
    """Goal 4 of issue 12 in the model: a band's service difference between backlogged flows at 2, 4
    and 8 shards stays within 1.5x of one shard (plus one request's worth), however unequal their
    backlogs; byte-proportional grants (negative control) let the flooding flow's shard run away."""
    one = backlogged_service_difference(fairness, 1)
    slack = {"round-robin": 1, "drr": 60, "vtc": 60}[fairness]
    for shards in (2, 4, 8):
        assert backlogged_service_difference(fairness, shards) <= 1.5 * one + 2 * slack, (fairness, shards, one)
    assert backlogged_service_difference(fairness, 4, ledger_factory=BytesProportionalLedger) > 3 * one + 2 * slack


def test_weighted_fairness_across_shards():
    weights = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 1.0, "e": 4.0}
    one = backlogged_service_difference("drr", 1, weights=weights)
    for shards in (2, 4):
        assert backlogged_service_difference("drr", shards, weights=weights) <= 1.5 * one + 120, (shards, one)


class MinActiveStartLedger(Ledger):
    """The rule before: a shard gaining its first flow starts at the smallest virtual time of the shards
    holding flows, and no flow's finish time is kept. A thin flow placed afresh then waits behind every
    backlogged shard at that virtual time (ties go to the shard holding more bytes): negative control."""

    @staticmethod
    def _start(band, shard, flow):
        others = [v for n, v in enumerate(band.shard_vtime) if n != shard and band.shard_weight[n]]
        return min(others) if others else 0.0, 0.0

    @staticmethod
    def _remember(band, flow, finish, weight):
        pass


class ForgetfulLedger(Ledger):
    """Flows start at the band's virtual clock however far ahead of it they were served: negative control."""

    @staticmethod
    def _remember(band, flow, finish, weight):
        pass


FAIR_ALLOC = {"three": 3, "seven": 7, "nine": 9, "one": 1}  # bench/scenarios/fair-alloc.toml: 3, 5, 5, 1 of 14
THIN_AND_HEAVY = {"t1": 1, "t2": 1, "t3": 2, "h1": 12, "h2": 12}  # 1, 1, 2, 5, 5 of 14


def closed_loop_errors(shards: int, clients: dict[str, int], *, fairness: str = "drr", ledger_factory=Ledger,
                       budget: int = 14, service: float = 50.0, noise: float = 0.5, batch: float = 0.3,
                       horizon: float = 12_000.0, warmup: float = 2_000.0, seed: int = 1) -> dict[str, float]:
    """Closed-loop clients in virtual time, as `fair-alloc` in the bench: each client sends a 1,000 B
    request, which holds its ticket for `service` (+ up to `noise`) once dispatched; the client then
    releases it and at once sends the next. Releases due within `batch` of the first are handled in one
    distributor pass together with the requests that follow them (a generator writes a release and its
    next request together; the service plans once per pass), so grants come in bursts, as measured in
    the service. Returns each flow's error against its max-min allocation of what was served in
    [warmup, horizon) (demand: its clients' worth, as `flowshard.reference` for closed loops)."""
    cfg = config([{"priority": 0, "fairness": fairness}], max_inflight_requests=budget, max_queued_requests=None,
                 max_queued_bytes=None)
    m = Model(cfg, shards, seed=seed, ledger_factory=ledger_factory, check_every_step=False)
    rng = random.Random(seed)
    served = dict.fromkeys(clients, 0.0)
    releases: list[tuple[float, int, str]] = []
    with m.one_pass():
        for f, k in clients.items():
            for _ in range(k):
                m.admit(f, 0, 1000)
    m.settle()
    seen = 0
    while True:
        for rec in m.dispatches[seen:]:
            r = m.reqs[rec.id]
            if warmup <= m.now:
                served[r.flow] += r.size
            heapq.heappush(releases, (m.now + service + noise * rng.random(), rec.id, r.flow))
        seen = len(m.dispatches)
        if len(m.reqs) > 400:  # the model's oracles scan every request it knows: forget the finished ones
            for rid in [i for i, r in m.reqs.items() if r.outcome is not None and i not in m.tickets]:
                del m.reqs[rid]
        first = releases[0][0]
        if first >= horizon:
            break
        m.advance(first - m.now)
        with m.one_pass():
            while releases and releases[0][0] <= first + batch:
                _, rid, flow = heapq.heappop(releases)
                m.release(rid)
                m.admit(flow, 0, 1000)
        m.settle()
    assert m.overtakes == [] and m.violations == []
    m.drain()
    m.check_empty()
    total = sum(served.values())
    fair = max_min_fair([k * (horizon - warmup) / service * 1000 for k in clients.values()], total)
    return {f: served[f] / share - 1 for f, share in zip(clients, fair, strict=True)}


def worst(errors: dict[str, float]) -> float:
    return max(abs(e) for e in errors.values())


@pytest.mark.parametrize("clients", [FAIR_ALLOC, THIN_AND_HEAVY], ids=["fair-alloc", "thin-and-heavy"])
def test_thin_closed_loop_flows_keep_their_max_min_share_at_every_shard_count(clients):
    """Issue 12: thin closed-loop flows (each request alone in its queue, so the flow starts afresh,
    on whichever shard JSQ-Bytes picks, nearly every time) next to heavy ones, under drr: the worst
    flow's error against its max-min allocation at 2, 4 and 8 shards within 1.5x of one shard's. The rule
    before (negative control) put a returning thin flow behind every backlogged shard already served
    at the current virtual time (model: 4.5 % at one shard, 9-9.5 % at 4 and 8; now under 1 %). At 2
    shards fair-alloc's heavy 'seven' shares a shard with the thin flows: before their finish times
    left that shard with them, it paid for part of their service (model: -7.0 %, 'nine' +9.9 %; now
    within 1 %)."""
    one = worst(closed_loop_errors(1, clients))
    for shards in (2, 4, 8):
        assert worst(closed_loop_errors(shards, clients)) <= 1.5 * one, (shards, one)
    assert worst(closed_loop_errors(4, clients, ledger_factory=MinActiveStartLedger)) > 1.5 * one


def test_a_flow_that_empties_and_returns_at_once_gets_no_more_than_its_share():
    """The other side of starting a flow at the band's virtual clock: a flow whose requests are mostly
    alone in its queue (8 clients, each sending again in the pass that released its slot) would start
    at the clock each time, ahead of the backlogged shard, and keep more than its max-min share of 7 of
    14 slots (+10 % at 8 shards in the model) if its finish time were forgotten (negative control)."""
    clients = {"x": 8, "a": 20}
    one = worst(closed_loop_errors(1, clients))
    for shards in (4, 8):
        assert worst(closed_loop_errors(shards, clients)) <= 1.5 * one + 0.01, (shards, one)
    assert closed_loop_errors(8, clients, ledger_factory=ForgetfulLedger)["x"] > 0.05


def test_a_vtc_correction_moves_the_flows_finish_time_and_its_shards_virtual_time():
    """A released request's actual tokens differ from those declared: the flow's finish time moves (so
    it takes the corrected service with it when it empties), and its shard's virtual time with it;
    after the flow emptied ahead of the band's clock, its remembered finish time (its next start).
    (The always-fair ledger, whose flows start at 0 here; tests/test_ledger_lone.py has it after a re-base.)"""
    ledger = Ledger(config([{"priority": 0, "fairness": "vtc"}], max_inflight_requests=10), 2, lone=False)
    band = ledger.bands[0]
    a1, a2, b1 = (Pending(i, f, 0, 100, tokens=t) for i, f, t in ((1, "a", 1000), (2, "a", 1000), (3, "b", 3000)))
    ledger.enqueue(a1, 0)
    ledger.enqueue(a2, 0)
    ledger.enqueue(b1, 1)
    grants = ledger.plan_grants()
    assert sorted(g[0] for g in grants) == [0, 0, 1]
    for p in (a1, a2, b1):
        _, live = ledger.grant_answered(p.shard, p.size, dispatched=p)
        if p is a1:  # a2 still queued: a's finish time and shard 0's virtual time move by the correction
            vtime = band.shard_vtime[0]
            ledger.correct(0, 0, -900.0, "a")
            assert band.flows["a"].finish == 100.0 and band.shard_vtime[0] == vtime - 900.0
        ledger.leave(p, covered=live)
    assert band.vclock == 1000.0 and band.flow_finish == {"a": 1100.0, "b": 3000.0}  # both emptied ahead of it
    ledger.correct(0, 1, 500.0, "b")
    assert band.flow_finish["b"] == 3500.0


def test_a_correction_for_a_flow_forgotten_behind_the_clock_delays_its_next_start():
    """A flow that declared 1 token and was served 1,000 emptied behind the band's clock (its declared
    costs understated its service), so the ledger forgot it; the correction then arrives. It starts
    that much after the clock next time. It went to the virtual time of the shard that dispatched it,
    which held no other flow, and was lost (a review's reading of the code). A negative correction
    banks no credit."""
    ledger = Ledger(config([{"priority": 0, "fairness": "vtc"}], max_inflight_requests=10), 2, lone=False)
    band = ledger.bands[0]
    b = [Pending(i, "b", 0, 100, tokens=1000) for i in (1, 2, 3)]
    for p in b:
        ledger.enqueue(p, 0)
    h = Pending(4, "h", 0, 100, tokens=1)
    ledger.enqueue(h, 1)
    grants = ledger.plan_grants()
    assert sorted(g[0] for g in grants) == [0, 0, 0, 1]
    for p in (b[0], h):
        _, live = ledger.grant_answered(p.shard, p.size, dispatched=p)
        ledger.leave(p, covered=live)
    assert "h" not in band.flows and "h" not in band.flow_finish  # behind the clock: forgotten
    clock, vtimes = band.vclock, list(band.shard_vtime)
    ledger.correct(0, 1, 999.0, "h")
    assert band.flow_finish["h"] == clock + 999.0 and band.shard_vtime == vtimes
    ledger.correct(0, 1, -5000.0, "g")  # a forgotten flow served less: no credit, nothing moves
    assert "g" not in band.flow_finish and band.shard_vtime == vtimes
    again = Pending(5, "h", 0, 100, tokens=1000)
    ledger.enqueue(again, 1)
    assert band.flows["h"].finish == clock + 999.0


def test_a_ledger_correction_divides_by_the_requests_own_weight():
    """A flow sending weight 4: its correction moves its finish time by delta / 4, as the shard moves its
    counter, whether it is queued, remembered or forgotten (a review: the configured weight, 1, was used
    for the last two)."""
    ledger = Ledger(config([{"priority": 0, "fairness": "vtc"}], max_inflight_requests=10), 2, lone=False)
    band = ledger.bands[0]
    for i in (1, 2, 3):
        ledger.enqueue(Pending(i, "b", 0, 100, tokens=1000), 0)
    h = Pending(4, "h", 0, 100, tokens=1, weight=4.0)
    ledger.enqueue(h, 1)
    ledger.plan_grants()
    b1 = next(p for p in band.order.values() if p.flow == "b")
    for p in (b1, h):
        _, live = ledger.grant_answered(p.shard, p.size, dispatched=p)
        ledger.leave(p, covered=live)
    assert "h" not in band.flows and "h" not in band.flow_finish
    clock = band.vclock
    ledger.correct(0, 1, 1000.0, "h", 4.0)
    assert band.flow_finish["h"] == clock + 250.0
    ledger.correct(0, 1, 1000.0, "h", 4.0)
    assert band.flow_finish["h"] == clock + 500.0


def test_finish_times_kept_are_bounded():
    band = Ledger(config([{"priority": 0, "fairness": "drr"}]), 2).bands[0]
    band.vclock = 100.0
    cap = ledger_module._FINISH_MEMORY
    for i in range(cap):
        Ledger._remember(band, f"old{i}", 50.0 if i % 2 else 150.0, 1.0)  # half of them already passed
    assert len(band.flow_finish) == cap
    Ledger._remember(band, "new", 200.0, 1.0)
    assert len(band.flow_finish) <= cap // 2 and band.flow_finish["new"] == 200.0
    assert all(f > band.vclock for f in band.flow_finish.values())
    # a large debt is not washed out by flows each a little ahead, nor by ones far ahead at a tiny weight:
    # over the bound, those that owe the most service (lead times weight) stay
    Ledger._remember(band, "debt", 100.0 + 100_000.0, 1.0)
    for i in range(2 * cap):
        Ledger._remember(band, f"thin{i}", 101.0, 1.0)
        Ledger._remember(band, f"light{i}", 100.0 + 1e6, 1e-6)
    assert band.flow_finish["debt"] == 100_100.0 and len(band.flow_finish) <= cap
    assert len(band.finish_weight) == len(band.flow_finish)


# =========================================================================== invariant 3 at the moment of dispatch


def test_grant_in_flight_when_a_higher_band_arrives_is_narrowed_not_used_for_the_lower_band():
    """The audit's race (issue 9, item 5): a low-band grant is planned while nothing higher waits; a
    high request arrives (routed to another shard, no budget left to grant it) before the low grant
    reaches its shard. Dispatching low then is an inversion at that moment. The shard reads the
    distributor's band_waiting cells and hands the grant back; the freed budget goes to high."""
    for narrow in (False, True):
        m = Model(config(HI_LO, max_inflight_requests=1, fast_path=False), 2, narrow=narrow)
        (t,) = fill_budget(m, 1)
        lo = m.admit("l", 0, 10, shard=1)
        m.release(t)  # the one slot: a grant for band lo, to shard 1, in transit
        assert [type(msg).__name__ for msg, _ in m.shards[1].inbox] == ["Enqueue", "Grant"]
        hi = m.admit("h", 1, 10, shard=0)  # queued on shard 0; the budget is reserved by lo's grant
        m.deliver_all_to(1)
        if not narrow:  # negative control: the model's dispatch-time oracle sees the inversion, the ledger counts it
            assert m.reqs[lo].dispatches == 1 and len(m.dispatch_inversions) == 1, m.dispatch_inversions
            m.settle()
            assert m.ledger.inversions == [0, 1]
            continue
        assert m.reqs[lo].dispatches == 0 and not m.dispatch_inversions
        m.deliver_all_from(1)  # the GrantBack: the slot is free again, and band hi takes it
        m.settle()
        assert m.reqs[hi].outcome is D and m.reqs[lo].outcome is None
        m.drain()
        m.check_empty()


@MODEL_SETTINGS
@given(cfg=configs(scarce=True), seed=st.integers(0, 2**32 - 1), steps=st.integers(100, 400))
def test_no_inversion_at_the_moment_of_dispatch(cfg, seed, steps):
    """Invariant 3 checked when each request is dispatched (the model's ledger is the distributor's
    knowledge of what is queued, in transit included, and which grants cover it), through cancels,
    TTLs and displacement; the existing plan-time oracle keeps passing."""
    m = priority_model(cfg, seed, evictions=True, steps=steps)
    m.drain()
    assert not m.dispatch_inversions, m.dispatch_inversions[:3]
    assert not m.violations, m.violations[:3]
    assert not any(m.ledger.inversions), m.ledger.inversions  # the exact count agrees: none


def test_dispatch_time_oracle_negative_control():
    """Without the shard's narrowing, random schedules do dispatch lower bands while a higher band
    waits ungranted (what the audit measured at 4 shards); the oracle above must see it."""
    cfg = config(THREE_PLAIN, max_inflight_requests=3, max_queued_requests=12, fast_path=False)
    found = counted = 0
    for seed in range(6):
        m = Model(cfg, 4, seed=seed, narrow=False, weights={"cancel": 0, "advance": 0, "timer": 0})
        m.run(300)
        m.settle()
        found += len(m.dispatch_inversions)
        counted += sum(m.ledger.inversions)
        # the ledger's exact count is a subset: a dispatch while a higher band's work had no grant counts
        # only if the next plan also left it without one (no release in between gave it budget)
        assert sum(m.ledger.inversions) <= len(m.dispatch_inversions), (seed, m.ledger.inversions)
    assert found > 0 and counted > 0, (found, counted)


def test_global_fcfs_grants_the_shard_holding_the_oldest_uncovered_request():
    """global-fcfs across shards is arrival order: each grant goes to the shard whose oldest request no
    live grant covers. (Granting by bytes held starved a shard holding one small request next to
    shards that closed-loop flows kept refilling: 0 dispatches in 5 s at 4 shards.)"""
    cfg = config([{"priority": 0, "fairness": "global-fcfs"}], max_inflight_requests=None)
    ledger = Ledger(cfg, 3)
    # arrivals: a (shard 0, 1 x 10 B), then b and c (shards 1 and 2, 5 x 1000 B each), interleaved
    arrivals = [("a", 0, 10)] + [(f, n, 1000) for _ in range(5) for f, n in (("b", 1), ("c", 2))]
    for i, (flow, shard, size) in enumerate(arrivals):
        ledger.enqueue(Pending(i + 1, flow, 0, size), shard)
    grants = ledger.plan_grants()
    assert [g[0] for g in grants] == [n for _, n, _ in arrivals]


# =========================================================================== the exact inversion count


def _counting_ledger(budget: int, bands=HI_LO) -> tuple[Ledger, list[int]]:
    ledger = Ledger(config(bands, max_inflight_requests=budget, fast_path=False), 2)
    now = [0]
    ledger.clock = lambda: now[0]
    return ledger, now


def _queue(ledger: Ledger, rid: int, band: int, shard: int) -> Pending:
    p = Pending(rid, f"f{rid}", band, 10)
    ledger.enqueue(p, shard)
    return p


def _dispatch(ledger: Ledger, p: Pending, at: int) -> None:
    """Shard p.shard's Done for p, dispatched at `at` on its oldest grant."""
    band, live = ledger.grant_answered(p.shard, p.size, dispatched=p, dispatched_at=at)
    ledger.leave(p, covered=live and band == p.band)


@pytest.mark.parametrize("second_at, counted", [(30, 0), (22, 1)])
def test_an_inversion_needs_work_already_uncovered_at_the_dispatch_left_without_budget(second_at, counted):
    """Budget 2: a low grant is out; high's h1 is routed at 20 and low is dispatched at 25; h2 is routed
    at `second_at`; the plan at 40 grants one of them. At 25 high had h1 without a grant, and the plan had
    a slot for it: h2 routed after the dispatch is left waiting, but nothing high had at 25 was (not
    counted). With h2 routed before the dispatch, high had two without a grant at 25 and one is left:
    counted. (The count is by band: which of the two got the grant is the shards' fairness.)"""
    ledger, now = _counting_ledger(budget=2)
    low = _queue(ledger, 1, 1, 1)
    assert [g[:2] for g in ledger.plan_grants()] == [(1, 1)]
    assert ledger.close_window(10) == []
    now[0] = 20
    _queue(ledger, 2, 0, 0)
    now[0] = second_at
    _queue(ledger, 3, 0, 0)
    _dispatch(ledger, low, 25)
    assert [g[:2] for g in ledger.plan_grants()] == [(0, 0)]
    assert ledger.close_window(40) == [1] * counted
    assert ledger.inversions == [0, counted]


def test_a_shortfall_carries_over_plans_and_ends_when_the_work_is_granted():
    """Budget 1, in flight: high is short from its routing (20) through every plan that leaves it
    without budget; a low dispatch reported late is judged against the plan after it; after high is
    granted, a low dispatch is not counted."""
    ledger, now = _counting_ledger(budget=1)
    low = _queue(ledger, 1, 1, 1)
    more = _queue(ledger, 4, 1, 1)
    ledger.plan_grants()
    ledger.close_window(10)
    now[0] = 20
    high = _queue(ledger, 2, 0, 0)
    assert ledger.plan_grants() == []  # the slot is low's grant's
    assert ledger.close_window(30) == []
    assert ledger.close_window(40) == []  # a pass with nothing new: still short
    assert [(lo, hi) for lo, hi in ledger.bands[0].short] == [(20, 40)]
    _dispatch(ledger, low, 35)  # dispatched between the plans at 30 and 40, reported now
    assert ledger.close_window(50) == [1]
    ledger.release(low.size)
    assert [g[:2] for g in ledger.plan_grants()] == [(0, 0)]
    assert ledger.close_window(60) == []
    _dispatch(ledger, high, 65)
    assert ledger.close_window(70) == []
    ledger.release(high.size)
    assert [g[:2] for g in ledger.plan_grants()] == [(1, 1)]  # low's second request gets a grant ...
    ledger.close_window(75)
    _dispatch(ledger, more, 80)  # ... and is dispatched while nothing high waits
    assert ledger.close_window(90) == [] and ledger.inversions == [0, 1]


def test_a_higher_band_over_its_ceiling_at_the_grant_is_not_taken_from():
    """The shard narrows to a higher band only if it is eligible at the saturation the grant was
    planned at; the count asks the same: a band whose ceiling that saturation reached lost nothing."""
    bands = [{"priority": 1, "name": "hi", "ceiling": 0.5}, {"priority": 0, "name": "lo"}]
    ledger, now = _counting_ledger(budget=2, bands=bands)
    first, second = _queue(ledger, 1, 1, 1), _queue(ledger, 2, 1, 1)
    assert [round(g[3], 2) for g in ledger.plan_grants()] == [0.0, 0.5]
    ledger.close_window(10)
    now[0] = 20
    _queue(ledger, 3, 0, 0)  # high: no budget left
    _dispatch(ledger, first, 25)  # on the grant planned at 0.0: high was eligible there
    _dispatch(ledger, second, 26)  # on the grant planned at 0.5: high's ceiling
    ledger.plan_grants()
    assert ledger.close_window(30) == [1] and ledger.inversions == [0, 1]


def test_an_exit_without_its_grant_counts_grants_of_earlier_plans_as_stale() -> None:
    """A grant serves only requests whose Enqueue went before it on the link. The shard's link:
    E1 E2 G1 G2 E3 E4 E5 G3 E6 (two plans, budget 3). H1 and H2 expire before G1 and G2 arrive, so
    those two come back; G3 serves H3; H4, H5 and H6 have no grant that can serve them. After the
    ledger reads both expiries it must count 3 uncovered: not 2 (taking G1 and G2 as able to serve
    the requests queued after them: a lower band would then go first; a review of this round's first
    rule) nor 4 (every grant stale, the rule before: a phantom, re-granted and counted as inversions)."""
    config = make_config([{"priority": 0}], service=ServiceConfig(fast_path=False), max_inflight_requests=3,
                         default_ttl=0)
    ledger = Ledger(config, 1)
    h = [Pending(n, f"f{n}", 0, 100) for n in range(1, 7)]
    ledger.enqueue(h[0], 0)
    ledger.enqueue(h[1], 0)
    assert len(ledger.plan_grants()) == 2  # G1, G2
    for p in h[2:5]:
        ledger.enqueue(p, 0)
    assert len(ledger.plan_grants()) == 1  # G3: the budget's last
    ledger.enqueue(h[5], 0)
    band = ledger.bands[0]
    assert band.uncovered(0) == 3  # H4, H5, H6 by the counts (6 requests, 3 grants)
    ledger.leave(h[0])  # H1 expired on the shard
    ledger.leave(h[1])  # H2 too
    assert band.uncovered(0) == 3
    # the shard's answers, in order: G1 and G2 back, G3 dispatching H3
    ledger.grant_answered(0, None)
    ledger.grant_answered(0, None)
    assert band.uncovered(0) == 3
    served, live = ledger.grant_answered(0, h[2].size, 0, h[2])
    assert (served, live) == (0, True)
    ledger.leave(h[2], covered=True)
    assert band.uncovered(0) == 3 and band.shard_stale[0] == 0 and band.shard_granted[0] == 0


def _mixed_weight_run(last_weight: float) -> dict[int, int]:
    """Budget 1, vtc, two shards: flow `a` on shard 0 declares 4,096 tokens at weight 1 and is served 96
    (corrected at each release); its latest queued request says `last_weight`. Flow `v` on shard 1
    sends weight 4, 100 tokens, exact. The dispatches per shard of 200."""
    ledger = Ledger(config([{"priority": 0, "fairness": "vtc"}], fast_path=False, max_inflight_requests=1), 2,
                    lone=False)
    ids = iter(range(1, 10_000))
    queued: dict[int, list[Pending]] = {0: [], 1: []}

    def add(flow: str, shard: int, tokens: int, weight: float) -> None:
        p = Pending(next(ids), flow, 0, 100, tokens=tokens, weight=weight)
        ledger.enqueue(p, shard)
        queued[shard].append(p)

    for _ in range(300):
        add("a", 0, 4096, 1.0)
    add("a", 0, 4096, last_weight)
    for _ in range(300):
        add("v", 1, 100, 4.0)
    got = {0: 0, 1: 0}
    for _ in range(200):
        (shard, _, _, _), = ledger.plan_grants()
        p = queued[shard].pop(0)
        _, live = ledger.grant_answered(shard, p.size, dispatched=p)
        ledger.leave(p, covered=live)
        ledger.release(p.size)
        if p.flow == "a":
            ledger.correct(0, shard, float(96 - 4096), p.flow, p.weight)
        got[shard] += 1
    return got


def test_a_dispatch_is_charged_at_the_weight_its_correction_refunds():
    """The ledger charges a dispatch at the request's own weight, as its correction refunds it: charged
    at its flow's latest weight (4, its last queued request's) and refunded at its own (1), each of the
    flow's requests left its shard's finish time 3,000 lower, and that shard took every grant of the
    band (a review: {0: 200, 1: 0}; served 96 tokens per weight against the other's 25, the other flow is
    owed ~3.8 times the requests)."""
    baseline = _mixed_weight_run(1.0)
    assert baseline[1] > 2.5 * baseline[0], baseline
    mixed = _mixed_weight_run(4.0)
    assert mixed[1] > 2.5 * mixed[0], mixed


def _estimate_run(reenqueue_before_grantback: bool) -> dict[int, int]:
    """Shard 0: the attacker's request r (2^32 tokens declared at weight 1e-6) gets a grant; r leaves
    uncovered before the shard answers it (its TTL expired at the shard; the grant is in flight), so the
    grant comes back as a GrantBack. If the attacker's next request reaches the ledger between r's Done
    and the GrantBack, `enqueue` (first flow on the shard) sets shard 0's virtual time to `start`,
    dropping the grant's estimate (~4.3e15), and the GrantBack then subtracts it: shard 0 ends ~4.3e15
    below every other shard and takes every grant of the band."""
    ledger = Ledger(config([{"priority": 0, "fairness": "vtc"}], fast_path=False, max_inflight_requests=2), 2,
                    lone=False)
    ids = iter(range(1, 100_000))
    queued: dict[int, list[Pending]] = {0: [], 1: []}

    def add(flow, shard, tokens, weight=0.0):
        p = Pending(next(ids), flow, 0, 100, tokens=tokens, weight=weight)
        ledger.enqueue(p, shard)
        queued[shard].append(p)
        return p

    r = add("a", 0, (1 << 32), 1e-6)
    for _ in range(400):
        add("v", 1, 100)
    grants = ledger.plan_grants()
    assert sorted(g[0] for g in grants) == [0, 1], grants
    # shard 1 answers its grant normally
    p = queued[1].pop(0)
    _, live = ledger.grant_answered(1, p.size, dispatched=p)
    ledger.leave(p, covered=live)
    ledger.release(p.size)
    # r expires at shard 0 (Done: expired) while shard 0's grant is in flight
    queued[0].remove(r)
    ledger.leave(r)
    if not reenqueue_before_grantback:
        ledger.grant_answered(0, None)
    for _ in range(400):
        add("a2", 0, 100)  # the attacker's next flow: ordinary requests
    if reenqueue_before_grantback:
        ledger.grant_answered(0, None)  # the shard had nothing the grant could serve: handed back
    got = {0: 0, 1: 0}
    for _ in range(200):
        grants = ledger.plan_grants()
        for shard, *_ in grants:
            p = queued[shard].pop(0)
            _, live = ledger.grant_answered(shard, p.size, dispatched=p)
            ledger.leave(p, covered=live)
            ledger.release(p.size)
            got[shard] += 1
    return got


def test_grantback_before_the_next_enqueue_shares_equally():
    got = _estimate_run(reenqueue_before_grantback=False)
    assert abs(got[0] - got[1]) <= 4, got


def test_a_shard_that_gains_a_flow_with_a_grant_out_keeps_the_grants_estimate():
    """A shard's virtual time is its flows' mean finish time plus the estimates of its grants not yet
    answered: a flow reaching a shard emptied while a grant was out there keeps that grant's estimate,
    which its answer takes out again (a review: dropped, the shard ended far below the others)."""
    got = _estimate_run(reenqueue_before_grantback=True)
    assert abs(got[0] - got[1]) <= 4, got  # (it took every grant: a review)


def test_a_narrowed_grant_takes_its_bands_estimate_out_as_a_hand_back_does():
    """(A review.) Band 1 (vtc, low) holds flow x on shard 0 and y on shard 1. A band-1 grant to shard 0 is
    narrowed to a band-0 request there: band 1's flows on shard 0 were served nothing, but the grant's
    estimate stays in band 1's shard-0 virtual time (real = charge when served != the grant's band),
    while a hand-back would remove it. Shard 0's band-1 virtual time ends one charge above its mean."""
    ledger = Ledger(config([{"priority": 0, "fairness": "vtc"}, {"priority": 1, "fairness": "vtc"}], fast_path=False,
                           max_inflight_requests=1), 2, lone=False)
    x = Pending(1, "x", 1, 100, tokens=1000)
    y = Pending(2, "y", 1, 100, tokens=1000)
    ledger.enqueue(x, 0)
    ledger.enqueue(y, 1)
    x2 = Pending(4, "x", 1, 100, tokens=1000)
    ledger.enqueue(x2, 0)
    (shard, band, *_), = ledger.plan_grants()
    b1 = ledger.bands[1]
    assert band == 1
    h = Pending(3, "h", 0, 100, tokens=10)  # a high request reaches `shard`; the shard narrows the grant to it
    ledger.enqueue(h, shard)
    ledger.grant_answered(shard, h.size, dispatched=h)
    ledger.leave(h, covered=False)
    flows = [f for f in b1.flows.values() if f.shard == shard]
    mean = sum(f.weight * f.finish for f in flows) / sum(f.weight for f in flows)
    assert b1.shard_vtime[shard] == mean  # (it was the mean + the narrowed grant's charge: a review)


def _serve(ledger: Ledger, p: Pending) -> None:
    """`p`'s shard answers a grant with it (planned first if none is out there)."""
    while not ledger.outstanding_grants(p.shard):
        assert ledger.plan_grants()
    _, live = ledger.grant_answered(p.shard, p.size, dispatched=p)
    ledger.leave(p, covered=live)


@pytest.mark.parametrize("named", [True, False])
def test_a_refund_after_its_flow_came_back_takes_its_finish_time_back_to_the_clock_at_most(named):
    """f's request declared 2**32 tokens; f emptied far ahead of the clock (remembered), a was served on,
    and f came back while its request was in flight, starting at its remembered finish time. The refund
    (it used 10 tokens) then takes f's finish time back at most to the clock it came back at, less the
    lag it had when it emptied (what its declared cost held it back from): the whole refund put it 100,000
    tokens behind, f's shard took the band's grants for that long (a review
    of the shard's counter). A refund named by no request (-1, the old rule) is applied whole: the
    negative control."""
    ledger = Ledger(config([{"priority": 0, "fairness": "vtc"}], max_inflight_requests=10), 2, lone=False)
    band = ledger.bands[0]
    big = Pending(1, "f", 0, 100, tokens=2**32)
    ledger.enqueue(big, 1)
    a = [Pending(i, "a", 0, 100, tokens=1000) for i in range(2, 200)]
    for p in a:
        ledger.enqueue(p, 0)

    _serve(ledger, big)  # (in flight to the end)
    assert band.flow_finish["f"] == 2**32  # emptied ahead: remembered
    for p in a[:100]:
        _serve(ledger, p)
        ledger.release(p.size)
    back = Pending(500, "f", 0, 100, tokens=1000)
    clock = band.vclock
    assert clock >= 90_000
    ledger.enqueue(back, 1)
    assert band.flows["f"].finish == 2**32  # not lifted: ahead
    assert big.charged > 0
    ledger.correct(0, 1, 10.0 - 2**32, "f", 0.0, big.charged if named else -1)
    if named:  # back to the clock, less how far f stood behind it when it emptied (the clock ran ahead with
        # the grants planned for a meanwhile, 8 of 1,000 tokens: the lag it keeps, `Ledger._start`)
        assert clock - 8_000 <= band.flows["f"].finish <= clock and band.shard_vtime[1] >= clock - 8_000
    else:
        assert band.flows["f"].finish == 10.0 and band.shard_vtime[1] < clock - 80_000
    # a refund for a request charged since f came back is applied whole
    start = band.flows["f"].finish
    ledger.correct(0, 1, -990.0, "f", 0.0, ledger.charges + 1)
    assert band.flows["f"].finish == start - 990.0


@pytest.mark.parametrize("max_lag", [4096.0, 1000.0, 0.0])
@pytest.mark.parametrize("rebase", [False, True])
def test_a_flow_refunded_below_the_clock_while_remembered_starts_that_lag_below_it(max_lag, rebase):
    """f's request declared 5,000 tokens; f emptied ahead of the band's clock (remembered, with the clock
    then) and was refunded 4,990 while idle, so it stood behind that clock when it emptied. It comes back
    that far below the clock, at most the band's `max_lag` (0: at the clock, the paper's rule), and a
    re-base of the clock in between changes nothing (it shifts the remembered clock too)."""
    ledger = Ledger(config([{"priority": 0, "fairness": "vtc", "max_lag": max_lag}], max_inflight_requests=2),
                    2, lone=False)
    band = ledger.bands[0]
    f = Pending(1, "f", 0, 100, tokens=5000)
    ledger.enqueue(f, 1)
    a = [Pending(i, "a", 0, 100, tokens=1000) for i in range(2, 40)]
    for p in a:
        ledger.enqueue(p, 0)

    while not ledger.outstanding_grants(1):  # f's grant planned, then a served on: the clock moves on
        assert ledger.plan_grants()
    for p in a[:3]:
        _serve(ledger, p)
        ledger.release(p.size)
    _, live = ledger.grant_answered(1, f.size, dispatched=f)
    ledger.leave(f, covered=live)
    emptied = band.finish_clock["f"]
    assert band.flow_finish["f"] > emptied  # ahead: remembered
    for p in a[3:10]:
        _serve(ledger, p)
        ledger.release(p.size)
    ledger.correct(0, 1, -4990.0, "f", 0.0, f.charged)
    lag = emptied - band.flow_finish["f"]
    assert lag > 0
    if rebase:
        before = band.vclock
        ledger._rebase_clock(band)
        assert band.vclock == 0.0 and band.finish_clock["f"] == emptied - before
    clock = band.vclock
    ledger.enqueue(Pending(100, "f", 0, 100, tokens=1000), 1)
    assert band.flows["f"].finish == pytest.approx(clock - min(lag, max_lag))


def test_a_refund_from_before_a_return_moves_the_finish_time_at_most_max_lag_below_the_start():
    """A flow whose queue began after a charge (numbered 1) gets a refund of that charge: it may take the
    finish time below its start by the lag it kept, at most the band's `max_lag` (1,000), however large the
    lag the refund reveals (here 5,000 + 4,990)."""
    ledger = Ledger(config([{"priority": 0, "fairness": "vtc", "max_lag": 1000.0}], max_inflight_requests=10),
                    2, lone=False)
    band = ledger.bands[0]
    a = Pending(1, "a", 0, 100, tokens=1000)
    ledger.enqueue(a, 0)
    _serve(ledger, a)
    assert a.charged == 1
    ledger.enqueue(Pending(2, "f", 0, 100, tokens=1000), 1)
    usage = band.flows["f"]
    start = usage.finish
    assert usage.since == 1 and usage.lead == 0.0
    usage.lag = 5000.0  # (as if it had emptied that far behind the clock)
    ledger.correct(0, 1, -4990.0, "f", 0.0, a.charged)
    assert usage.lag == 9990.0 and usage.finish == start - 1000.0


def test_room_held_for_ended_requests_counts_at_the_limit_and_goes_to_a_displacing_request():
    """`hold_left` (requests ended while their stopped shard still holds them): their room counts at the
    queue's limit until `release_left`, and a displacing request takes it first, as from victims that
    evict no one (review 149: counted by no victim, one was rejected at a queue full of them, or
    displaced a live request beside them); it is retried when the last such room is back."""
    bands = [{"priority": 2, "name": "hi", "displacement": True}, {"priority": 0, "name": "lo"}]
    ledger = Ledger(config(bands, max_inflight_requests=None, max_queued_requests=2, max_queued_bytes=None), 2)
    ended, live = Pending(1, "a", 1, 10), Pending(2, "b", 1, 10)
    ledger.enqueue(ended, 0)
    ledger.enqueue(live, 1)
    ledger.leave(ended)  # ended while shard 0 is silent: out of the queue, its room held
    ledger.hold_left(ended)
    assert ledger.queued_items == 1 and ledger.check(Pending(3, "c", 1, 10)) is None  # (the limit holds)
    newcomer = Pending(4, "h", 0, 10)
    victims = ledger.check(newcomer)
    assert victims == [ended]  # the held room, not the live request
    ledger.mark_victims(newcomer, victims)
    assert ended.state == PendingState.DONE and live.state == PendingState.QUEUED and newcomer.victims_left == 1
    assert ledger.left_untaken == [{}, {}]  # (taken: a later newcomer does not look at it again, review 150)
    second = Pending(5, "h2", 0, 10)
    assert ledger.check(second) == [live]
    ledger.abandon(newcomer)  # (gave up: the room is untaken again)
    assert ledger.left_untaken[1] == {1: ended} and ended.displacer is None
    ledger.mark_victims(newcomer, ledger.check(newcomer) or [])
    assert ledger.release_left(ended) is newcomer  # its shard read again: the room is the newcomer's
    assert ledger.left == {} and ledger.reserved_items == 0 and ledger.check(newcomer) == []


def test_a_silent_shard_gets_no_grant_until_a_frame_of_its_is_read():
    """`Ledger.silent` (the service's: no heartbeat for a while): such a shard is planned no grant, even
    holding none, until a frame of its is read (review 150: until the service's next tick, 0.25 s, its
    work and every lower band's waited with budget free) or it dies."""
    ledger = Ledger(config([{"priority": 0}], max_inflight_requests=4, max_queued_requests=None,
                           max_queued_bytes=None), 2)
    ledger.timer = lambda: 100.0
    ledger.enqueue(Pending(1, "a", 0, 10), 0)
    ledger.silent = frozenset({0, 1})
    assert ledger.plan_grants() == []
    ledger.heard_from(0)  # (it runs)
    assert ledger.silent == {1} and [g[0] for g in ledger.plan_grants()] == [0]
    ledger.shard_failed(1)
    assert ledger.silent == frozenset()


def test_the_picks_of_one_plan_walk_the_arrival_order_once_and_find_what_a_fresh_walk_finds() -> None:
    """A global-fcfs (fcfs) band at N shards: a plan's picks go on from where the last one stopped
    (`_oldest_uncovered_in_plan`; each walked the band's order from its start: O(live grants) a pick,
    ~1 s for a plan of 4,000 grants, review 184). Each pick, granted, finds what a fresh walk finds."""
    import random

    from flowshard.config import BandConfig, BudgetConfig

    for trial in range(40):
        rnd = random.Random(trial)
        shards = rnd.choice([2, 3, 4])
        config = Config(bands=[BandConfig(priority=1, name="b", fairness="global-fcfs")],
                        budget=BudgetConfig(max_inflight_requests=1 << 20))
        ledger = Ledger(config, shards)
        band, live = ledger.bands[0], {}
        for step in range(150):
            if rnd.random() < 0.6 or not live:
                p = Pending(step + 1, f"f{step % 5}", 0, 100)
                ledger.enqueue(p, rnd.randrange(shards))
                live[p.id] = p
            else:
                ledger.leave(live.pop(rnd.choice(list(live))))
            band.shard_granted, band.shard_stale = [rnd.randrange(0, 3) for _ in range(shards)], [0] * shards
            ledger.plans += 1
            for _ in range(rnd.choice([1, 2, 5])):  # picks of one plan, each granted
                fresh = Ledger._oldest_uncovered(band, [math.inf] * shards, -math.inf)
                got = ledger._oldest_uncovered_in_plan(band, [math.inf] * shards, -math.inf)
                assert got == fresh, (trial, step)
                if got < 0:
                    break
                band.shard_granted[got] += 1
