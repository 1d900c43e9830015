"""Invariant 7 against the real service: a flow's requests are dispatched in order at every shard count.

With a budget of one request and its ticket held, everything queues; releasing one ticket at a time
then lets exactly one request be dispatched at a time, so the order of the service's own dispatch
answers on the connection *is* its dispatch order (no clock, no client-side guess). Several flows
with random sizes are interleaved so that, without flow affinity, JSQ-Bytes spreads each flow over
the shards and the byte-proportional grants serve them out of order (the negative control: this
test on the code before flow affinity, `6927e17`, counted 24 / 39 / 45 of the 72 dispatches
overtaking under fcfs at 2 / 4 / 8 shards, and 31 / 41 / 55 under edf).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from servicekit import launch, run, until

from flowshard.client import AdmitResult, Client
from flowshard.types import Outcome

__all__ = ["launch"]

D = Outcome.DISPATCHED
FLOWS, PER_FLOW = 3, 24


def overtakes(order: list[tuple[str, float, int]]) -> int:
    """Dispatches that went ahead of an earlier-ranked request of their own flow.

    `order`: (flow, rank key, arrival index) in dispatch order; under fcfs the key is the arrival
    index, under edf the deadline."""
    n = 0
    for k, (flow, key, idx) in enumerate(order):
        if any(f == flow and (kk, ii) < (key, idx) for f, kk, ii in order[k + 1 :]):
            n += 1
    return n


@pytest.mark.parametrize("ordering", ["fcfs", "edf"])
@pytest.mark.parametrize("shards", [1, 2, 4, 8])
def test_each_flow_is_dispatched_in_order(launch: Any, shards: int, ordering: str) -> None:
    svc = launch(shards=shards, budget=1, bands=[{"priority": 0, "fairness": "drr", "ordering": ordering,
                                                  "quantum": 4096}],
                 service={"drain_timeout": 0.2, "fast_path": False}, max_queued_requests=1000)
    rng = random.Random(shards)
    sizes = [rng.randint(1, 4000) for _ in range(FLOWS * PER_FLOW)]
    # distinct, whole seconds apart: the µs a request spends in transit cannot reorder them (equal TTLs
    # can swap: the shard computes a deadline from its own enqueue time, issue 9 carries the arrival)
    ttls = [float(t) for t in rng.sample(range(20, 400), len(sizes))]

    async def main() -> None:
        async with Client.connect(svc.host, svc.binary_port) as c:
            hold = await c.admit("hold", size=1)
            assert hold.outcome is D
            order: list[tuple[str, float, int]] = []
            tickets: list[int] = []
            bad: list[AdmitResult] = []

            def on_done(flow: str, key: float, idx: int) -> Any:
                def cb(fut: asyncio.Future[AdmitResult]) -> None:
                    r = fut.result()
                    if r.outcome is not D:
                        bad.append(r)
                    else:
                        order.append((flow, key, idx))
                        tickets.append(r.ticket)
                return cb

            for i, (size, ttl) in enumerate(zip(sizes, ttls, strict=True)):
                flow = f"f{i % FLOWS}"
                fut = c.admit(flow, size=size, ttl=ttl)
                fut.add_done_callback(on_done(flow, ttl if ordering == "edf" else i, i))
            s = await svc.until_stats(lambda s: s["totals"]["queued_items"] == len(sizes))
            if shards > 1:  # the flows are spread over shards (one flow each), not piled on one
                assert sum(1 for sh in s["shards"] if sum(sh["queued_items"])) == min(shards, FLOWS)
            assert await c.release(hold.ticket)
            for i in range(len(sizes)):  # one dispatch at a time: the answers come in dispatch order
                await until(lambda i=i: len(order) > i or bad)
                assert not bad, bad
                assert await c.release(tickets[i])
            assert overtakes(order) == 0, [(k, o) for k, o in enumerate(order)
                                           if any(f == o[0] and (kk, ii) < o[1:] for f, kk, ii in order[k + 1 :])]

    run(main(), timeout=40)


def test_overtake_count_sees_an_out_of_order_dispatch() -> None:
    """The counter of the test above, on a hand-made order (negative control)."""
    assert overtakes([("a", 0, 0), ("b", 1, 1), ("a", 2, 2)]) == 0
    assert overtakes([("a", 2, 2), ("a", 0, 0), ("b", 1, 1)]) == 1
    assert overtakes([("a", 2, 2), ("a", 1, 1), ("a", 0, 0)]) == 2
