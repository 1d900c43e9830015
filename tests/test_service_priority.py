"""Strict priority at the moment of dispatch, against the real service (DESIGN §4.3).

A grant is planned when no higher band waits; a higher request may arrive while that grant is on
its way to a shard. The shard must not then use it for the lower band: it reads the distributor's
`band_waiting` cells and hands the grant back, so the freed budget goes to the higher band. The
race is made wide and deterministic by stopping the low shard's worker (SIGSTOP) while the grant
is in its socket, admitting the high request meanwhile, and letting the worker go on (SIGCONT).
On the code before this check (`6927e17`) the test fails: low is dispatched on the old grant and high
waits for low's ticket (a real inversion, of the kind the audit measured 41–61 µs wide at 4 shards).
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from servicekit import launch, metric, run

from flowshard.client import Client
from flowshard.types import Outcome

__all__ = ["launch"]

D = Outcome.DISPATCHED
BANDS = [{"priority": 10, "name": "high"}, {"priority": 0, "name": "low"}]


def test_low_grant_in_flight_when_high_arrives_goes_to_high(launch: Any) -> None:
    svc = launch(shards=2, budget=1, bands=BANDS, service={"drain_timeout": 0.2, "fast_path": False})

    async def main() -> None:
        async with Client.connect(svc.host, svc.binary_port) as c:
            hold = await c.admit("hold", priority=10)
            assert hold.outcome is D
            low = c.admit("low", priority=0, size=100)
            s = await svc.until_stats(lambda s: s["totals"]["queued_items"] == 1)
            low_shard = next(i for i, sh in enumerate(s["shards"]) if sum(sh["queued_items"]))
            worker = s["shards"][low_shard]["pid"]
            order: list[str] = []
            low.add_done_callback(lambda f: order.append("low"))
            os.kill(worker, signal.SIGSTOP)  # the grant for low will wait in its socket
            try:
                assert await c.release(hold.ticket)
                await svc.until_stats(lambda s: s["totals"]["grants_outstanding"] == 1)
                high = c.admit("high", priority=10, size=100)  # JSQ-Bytes: the other (empty) shard
                high.add_done_callback(lambda f: order.append("high"))
                s = await svc.until_stats(lambda s: s["totals"]["queued_items"] == 2)
                assert sum(s["shards"][1 - low_shard]["queued_items"]) == 1
            finally:
                os.kill(worker, signal.SIGCONT)
            r = await asyncio.wait_for(high, 5)
            assert r.outcome is D and order == ["high"], order  # low's grant was handed back to high
            assert await c.release(r.ticket)
            r = await asyncio.wait_for(low, 5)
            assert r.outcome is D and await c.release(r.ticket)
            assert order == ["high", "low"]
            samples = await svc.ametrics()
            assert metric(samples, "flowshard_grants_narrowed_total", band="low") == 1
            assert metric(samples, "flowshard_priority_inversions_total", band="low") == 0
            s = await svc.astats()
            assert [b["grants_narrowed"] for b in s["bands"]] == [0, 1]

    run(main())
