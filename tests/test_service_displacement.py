"""Displacement against the real service when the victims cannot leave at once.

A higher-band request that must displace queued lower work waits, parked, until its victims have
left their shard; the room they free is held for it meanwhile. If the victims' shard is stopped
(here SIGSTOP: a wedged worker, killed only after 5 s of silence), the cancels wait in its socket.
The parked request's TTL must still end it on time (`evicted: ttl` at its deadline, not when the
worker is finally killed), and the room held for it must go back then.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from servicekit import launch, run

from flowshard.client import Client
from flowshard.types import Outcome

__all__ = ["launch"]

BANDS = [{"priority": 10, "name": "high", "displacement": True}, {"priority": 0, "name": "low"}]


def test_a_parked_newcomer_ends_at_its_ttl_while_its_victims_shard_is_stopped(launch: Any) -> None:
    svc = launch(shards=2, budget=1, bands=BANDS, max_queued_requests=4, service={"drain_timeout": 0.5})

    async def main() -> None:
        async with Client.connect(svc.host, svc.binary_port) as c:
            hold = await c.admit("hold", priority=10)  # the budget, so everything after it queues
            assert hold.outcome is Outcome.DISPATCHED
            lows = [c.admit("low", priority=0, size=10, ttl=60) for _ in range(4)]  # one flow: one shard
            s = await svc.until_stats(lambda s: s["totals"]["queued_items"] == 4)
            shard = next(i for i, sh in enumerate(s["shards"]) if sum(sh["queued_items"]))
            worker = s["shards"][shard]["pid"]
            os.kill(worker, signal.SIGSTOP)  # the victim's cancel will wait in its socket
            try:
                start = time.monotonic()
                high = await asyncio.wait_for(c.admit("high", priority=10, size=10, ttl=0.4), 4.0)
                took = time.monotonic() - start
                assert high.outcome is Outcome.EVICTED_TTL, high
                assert 0.35 <= took < 3.0, took  # at its deadline, not when the wedged worker is killed (5 s)
                assert 0.35 <= high.wait < 3.0, high.wait
            finally:
                os.kill(worker, signal.SIGCONT)
            outcomes = [(await asyncio.wait_for(f, 5.0)) for f in lows[3:]]
            assert [r.outcome for r in outcomes] == [Outcome.EVICTED_DISPLACED]  # the newest low, as chosen
            assert await c.release(hold.ticket)
            for f in lows[:3]:
                r = await asyncio.wait_for(f, 5.0)
                assert r.outcome is Outcome.DISPATCHED
                assert await c.release(r.ticket)
            s = await svc.astats()
            assert s["totals"]["queued_items"] == 0 and s["totals"]["inflight"] == 0

    run(main())


def test_parked_newcomers_end_at_their_ttl_never_before(launch: Any) -> None:
    """Review 155: a parked request's TTL timer, on the loop's millisecond clock, ended up to 0.9 ms
    before its deadline (9-17 of 40 such requests per run). It ends at its deadline or after: its
    reported wait (from its arrival) is never below its TTL."""
    n = 20
    svc = launch(shards=2, budget=1, bands=BANDS, max_queued_requests=n, service={"jsq_slack_bytes": 0})

    async def main() -> None:
        async with Client.connect(svc.host, svc.binary_port) as c:
            hold = await c.admit("hold", priority=10)
            assert hold.outcome is Outcome.DISPATCHED
            lows = [c.admit("low", priority=0, size=10, ttl=60) for _ in range(n)]  # one flow: one shard
            s = await svc.until_stats(lambda s: s["totals"]["queued_items"] == n)
            shard = next(i for i, sh in enumerate(s["shards"]) if sum(sh["queued_items"]))
            worker = s["shards"][shard]["pid"]
            os.kill(worker, signal.SIGSTOP)
            try:
                ttls = [0.05 + 0.013 * k for k in range(n)]
                highs = []
                for k, ttl in enumerate(ttls):
                    highs.append(c.admit(f"high{k}", priority=10, size=10, ttl=ttl))
                    await asyncio.sleep(0.002)
                answers = await asyncio.wait_for(asyncio.gather(*highs), 5.0)
            finally:
                os.kill(worker, signal.SIGCONT)
            assert {r.outcome for r in answers} == {Outcome.EVICTED_TTL}
            early = [(ttl, r.wait) for ttl, r in zip(ttls, answers, strict=True) if r.wait < ttl]
            assert not early, early
            assert await c.release(hold.ticket)
            for f in lows:
                r = await asyncio.wait_for(f, 5.0)
                if r.dispatched:
                    assert await c.release(r.ticket)

    run(main(), timeout=30)
