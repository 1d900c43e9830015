"""A drr flow's weight is its latest request's at every shard count.

One shard's drr gives a flow its quantum x the flow's weight, the latest request's (README). Across
shards the ledger charged each dispatch at its request's own weight (review 180: flow a's first 60
requests at weight 4, its last 140 at 1, next to b's 200 at 1: a got 51 of the first 100 at one shard,
72-73 at 2 and 4; the other way round, 39 of the first 50 at one and 25 at 2 and 4). vtc charges each
request at its own weight at every shard count, as documented. A real Distributor and real ShardWorkers
in one process, the frames handed over by the test."""

from __future__ import annotations

import asyncio

import pytest
from test_counts_through_kills import LOW, Rig
from test_deadline_across_shards import _dispatch_order


@pytest.mark.parametrize("shards", [1, 2, 4])
@pytest.mark.parametrize(("first", "then", "a_of_50"), [(4.0, 0.0, (22, 28)), (0.0, 4.0, (36, 42))])
def test_a_drr_flow_is_served_at_its_latest_weight(shards: int, first: float, then: float,
                                                    a_of_50: tuple[int, int]) -> None:
    async def main() -> None:
        rig = Rig(shards=shards, budget=4, fairness="drr")
        for flow, weights in (("a", [first] * 30 + [then] * 70), ("b", [0.0] * 100)):
            for weight in weights:
                cid = rig.next_cid
                rig.tally.band[cid] = 1
                rig.d.admit(rig.tally, cid, flow, LOW, 100, 0.0, 0.0, 0, weight, False)
                rig.next_cid += 1
        flows_of = {p.id: p.flow for p in rig.d.pending.values()}
        assert shards == 1 or len({p.shard for p in rig.d.pending.values()}) == 2  # (spread: slack 0)
        got = _dispatch_order(rig, flows_of, 50)[:50].count("a")
        assert a_of_50[0] <= got <= a_of_50[1], got  # (1:1 after the change, 4:1 the other way: 25, 40)

    asyncio.run(main())
