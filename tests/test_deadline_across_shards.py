"""A global-fcfs band ordered by deadline (edf, slo-deadline) grants by deadline across shards.

Across shards a global-fcfs band's grant goes to the shard holding its best request no live grant
covers. That was the oldest by arrival whatever the band's ordering (review 180: at 2 and 4 shards a
flow's 20 requests with a 100 s TTL all went before another flow's 20 with a 20 s TTL that arrived
later, where one shard served the 20 s ones first; with a 0.8 s TTL those 10 expired). A real
Distributor and real ShardWorkers in one process, the frames handed over by the test."""

from __future__ import annotations

import asyncio

import pytest
from test_counts_through_kills import LOW, Rig

from flowshard.codec import Done
from flowshard.types import Outcome


def _dispatch_order(rig: Rig, flows_of: dict[int, str], dispatches: int) -> str:
    """Run passes, hand each window back and release each ticket, until `dispatches` were made: the
    flows in dispatch order."""
    order = ""
    while len(order) < dispatches:
        rig.run_pass()
        for n, t in enumerate(rig.transports):
            for window in t.unread:
                order += "".join(flows_of[m.id] for m in window
                                 if type(m) is Done and m.outcome == int(Outcome.DISPATCHED))
            rig.read(n)
        for ticket in list(rig.d.tickets):
            rig.d.release(ticket)
    return order


@pytest.mark.parametrize(("ordering", "late", "urgent"), [
    ("edf", {"ttl": 100.0}, {"ttl": 20.0}),
    ("slo-deadline", {"slo": 0.0}, {"slo": 5.0}),  # (no SLO sorts after every one that has one)
])
@pytest.mark.parametrize("shards", [1, 2, 4])
def test_the_earliest_deadline_goes_first_at_every_shard_count(
    ordering: str, late: dict[str, float], urgent: dict[str, float], shards: int
) -> None:
    async def main() -> None:
        rig = Rig(shards=shards, budget=1, fairness="global-fcfs", ordering=ordering)
        flows_of = {}
        for flow, times in (("l", late), ("u", urgent)):  # the late ones arrive first
            for _ in range(5):
                cid = rig.next_cid
                rig.d.admit(rig.tally, cid, flow, LOW, 100, times.get("ttl", 0.0), times.get("slo", 0.0), 0, 0.0,
                            False)
                rig.tally.band[cid] = 1
                rig.next_cid += 1
        flows_of = {p.id: p.flow for p in rig.d.pending.values()}
        assert shards == 1 or len({p.shard for p in rig.d.pending.values()}) == 2  # (spread: slack 0)
        assert _dispatch_order(rig, flows_of, 10) == "uuuuulllll"

    asyncio.run(main())


def test_the_deadline_pick_matches_a_brute_force_oracle_through_enqueues_leaves_and_plans() -> None:
    """`Ledger._earliest_uncovered` against the rule itself (review 184's oracle): each shard serves its
    first `covered` requests by (deadline, arrival), the grant goes to the shard whose first uncovered
    one is earliest, shards behind passed over; through enqueues, leaves (lazily dropped entries, heap
    rebuilds), TTL 0 and no SLO, and picks within one plan (its entries taken out once)."""
    import random

    from flowshard.config import BandConfig, BudgetConfig, Config
    from flowshard.ledger import Ledger, Pending

    inf = float("inf")
    for trial in range(60):
        rnd = random.Random(trial)
        shards = rnd.choice([2, 3, 4])
        config = Config(bands=[BandConfig(priority=1, name="b", fairness="global-fcfs",
                                          ordering=rnd.choice(["edf", "slo-deadline"]))],
                        budget=BudgetConfig(max_inflight_requests=1 << 20), default_ttl=rnd.choice([0.0, 5.0]))
        ledger = Ledger(config, shards)
        ledger.times_of = lambda p: p.payload
        band, live, t = ledger.bands[0], {}, 0.0
        for step in range(200):
            t += rnd.random() * 0.1
            if rnd.random() < 0.55 or not live:
                p = Pending(step + 1, f"f{step % 7}", 0, 100, received=round(t, 1),
                            payload=(rnd.choice([0.0, 0.5, 1.0, rnd.uniform(0, 3)]), rnd.choice([0.0, 0.3, 2.0])))
                ledger.enqueue(p, rnd.randrange(shards))
                live[p.id] = p
            else:
                ledger.leave(live.pop(rnd.choice(list(live))))
            band.shard_granted, band.shard_stale = [rnd.randrange(0, 4) for _ in range(shards)], [0] * shards
            asked, cutoff = [rnd.choice([inf, inf, 0.0]) for _ in range(shards)], rnd.choice([-inf, 1.0])
            ledger.plans += 1
            for _ in range(rnd.choice([1, 2, 3])):  # picks of one plan, each granted
                best, key = -1, (inf, 1 << 62)
                for n in range(shards):
                    mine = sorted((ledger.due(band, p), band.shard_order[n][p.id]) for p in live.values()
                                  if p.shard == n)
                    k = band.shard_granted[n]
                    if asked[n] >= cutoff and len(mine) > k and mine[k] < key:
                        best, key = n, mine[k]
                got = ledger._earliest_uncovered(band, asked, cutoff)
                assert got == best, (trial, step)
                if got < 0:
                    break
                band.shard_granted[got] += 1
