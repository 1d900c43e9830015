"""A flow's order across displacement (DESIGN §4.7): its requests reach their shard in arrival order.

A request that displaces lower-band work is parked until its victims have left their shards. A
later request of the same flow must not be queued ahead of it: not when the later one's own
victims leave first (on another shard, or a faster one), nor when room frees up for it meanwhile.
So a later request of a flow with a request parked waits behind it (`Distributor._hold_behind`) and
is admitted once the parked one is queued or has ended. (Found by a black-box review: at 2 shards
and more, 3-28 of ~1,400 dispatches of a displacing flow overtook an earlier request of it.)

A real Distributor in one process; its shards are fakes that keep what they are sent, and their
answers (`Done`) are handed to the distributor by the test."""

from __future__ import annotations

import asyncio
from typing import Any

from test_pass_packing import Link

from distributor.service import Distributor
from flowshard.codec import BatchReader, Cancel, Done, Enqueue, ToWorker
from flowshard.config import BandConfig, BudgetConfig, Config, ServiceConfig
from flowshard.ledger import PendingState
from flowshard.shm import ShmStats
from flowshard.types import Outcome


class Waiter:
    def __init__(self) -> None:
        self.outcomes: dict[Any, Outcome] = {}

    def deliver(self, cid: Any, request_id: int, outcome: Outcome, *rest: Any) -> None:
        self.outcomes[cid] = outcome


class Service:
    """A distributor at N shards, high band 1 (displacement, fcfs) over low band 0, room for 2 queued."""

    def __init__(self, shards: int = 2) -> None:
        config = Config(
            bands=[BandConfig(priority=1, name="high", displacement=True),
                   BandConfig(priority=0, name="low")],
            budget=BudgetConfig(max_inflight_requests=1),
            service=ServiceConfig(fast_path=False, jsq_slack_bytes=0),  # flows spread over the shards
            flow_slots=64,
            max_queued_requests=2,
        )
        self.d = d = Distributor(config, shards=shards)
        d.shm = ShmStats(bytearray(d.layout.nbytes), d.layout, init=True)
        d._accepting = True
        d._loop = asyncio.get_running_loop()
        self.links = []
        for s in d.shards:
            s.ready = True
            s.link = link = Link()  # type: ignore[assignment]
            self.links.append(link)
        self.waiter = Waiter()
        self.seen = [0] * shards  # frames of each shard's link already read

    def admit(self, name: str, flow: str, priority: int, ttl: float = 0.0) -> int:
        return self.d.admit(self.waiter, name, flow, priority, 100, ttl, 0.0, 0, 0.0, False)

    def sent(self, shard: int) -> list[Any]:
        """What the distributor wrote to `shard` since last asked."""
        link = self.links[shard]
        data, self.seen[shard] = link.written[self.seen[shard]:], len(link.written)
        return BatchReader(ToWorker).feed(b"".join(data))

    def evicted(self, shard: int, rid: int) -> None:
        """The shard answers a Cancel: the request left its queue, displaced."""
        self.d.on_worker_frames(shard, [Done(rid, int(Outcome.EVICTED_DISPLACED), 0.01)])


def test_a_later_request_of_a_parked_flow_is_queued_after_it_though_its_victim_leaves_first() -> None:
    async def main() -> None:
        svc = Service(shards=2)
        d = svc.d
        low = [svc.admit(f"l{i}", f"low{i}", 0) for i in range(2)]  # the queue is full: one per shard
        await asyncio.sleep(0)
        on = {rid: d.pending[rid].shard for rid in low}
        assert sorted(on.values()) == [0, 1]
        for n in (0, 1):
            svc.sent(n)
        t1 = svc.admit("t1", "t", 1)  # displaces the newest low request: parked until it leaves
        t2 = svc.admit("t2", "t", 1)  # the same flow, later: held behind t1 (it displaces nobody yet)
        await asyncio.sleep(0)
        assert d.pending[t1].victims_left == 1 and d.pending[t2].state == PendingState.NEW
        cancels = [m.id for n in (0, 1) for m in svc.sent(n) if type(m) is Cancel]
        assert cancels == [low[1]]  # only t1's victim; before the fix t2 took low[0] too
        svc.evicted(on[low[1]], low[1])  # t1's victim leaves: t1 is queued, then t2 displaces low[0]
        await asyncio.sleep(0)
        assert d.pending[t1].state == PendingState.QUEUED and d.pending[t2].victims_left == 1
        svc.evicted(on[low[0]], low[0])
        await asyncio.sleep(0)
        assert d.pending[t2].state == PendingState.QUEUED and d.pending[t2].shard == d.pending[t1].shard
        enqueued = [m.id for n in (0, 1) for m in svc.sent(n) if type(m) is Enqueue]
        assert enqueued == [t1, t2]  # in arrival order, on one shard (affinity)
        assert not d._parked_of and not d._held

    asyncio.run(main())


def test_requests_held_behind_a_parked_one_go_when_it_ends_and_one_held_may_end_alone() -> None:
    """The parked request's client leaves: the ones held behind it are admitted in order (the first
    displaces again, the next waits behind it). A held request whose TTL runs out, or whose client
    leaves, ends alone; nothing of the ledger is held for it."""
    async def main() -> None:
        svc = Service(shards=2)
        d = svc.d
        low = [svc.admit(f"l{i}", f"low{i}", 0) for i in range(2)]
        await asyncio.sleep(0)
        t1 = svc.admit("t1", "t", 1)
        t2 = svc.admit("t2", "t", 1, ttl=30.0)
        t3 = svc.admit("t3", "t", 1)
        t4 = svc.admit("t4", "t", 1)
        assert [d.pending[r].state for r in (t2, t3, t4)] == [PendingState.NEW] * 3
        d._parked_expired(d.pending[t2])  # (its TTL timer, run by hand): it ends alone
        assert svc.waiter.outcomes["t2"] == Outcome.EVICTED_TTL
        d.cancel(t1)  # the parked one's client leaves: its room goes back, t3 is admitted and parks in turn
        assert svc.waiter.outcomes.get("t1") is None and t1 not in d.pending  # (nobody to answer)
        assert d.pending[t3].victims_left == 1 and d.pending[t4].state == PendingState.NEW
        assert d._parked_of[(0, "t")] is d.pending[t3] and list(d._held[(0, "t")]) == [d.pending[t4]]
        d.cancel(t4)  # a held one's client leaves
        assert t4 not in d.pending and not d._held
        assert d.ledger.queued_items == 2  # the two low requests, one of them now t3's victim
        for victim in low:
            if d.pending[victim].state == PendingState.DISPLACING:
                svc.evicted(d.pending[victim].shard, victim)
        await asyncio.sleep(0)
        assert d.pending[t3].state == PendingState.QUEUED and not d._parked_of and not d._held

    asyncio.run(main())
