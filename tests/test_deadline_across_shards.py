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
