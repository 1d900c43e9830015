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

from test_unclaimed import Link

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
        data, self.seen[shard] = link.inbox[self.seen[shard]:], len(link.inbox)
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
        t2 = svc.admit("t2", "t", 1)  # the same flow, later: admitted (it displaces the other) but held behind t1
        await asyncio.sleep(0)
        assert d.pending[t1].victims_left == 1 and d.pending[t2].victims_left == 1
        assert [d.pending[rid].state for rid in low] == [PendingState.DISPLACING] * 2  # no grant can take them
        cancels = [m.id for n in (0, 1) for m in svc.sent(n) if type(m) is Cancel]
        assert sorted(cancels) == sorted(low)
        svc.evicted(on[low[0]], low[0])  # t2's victim leaves first: t2 still waits behind t1, its room held
        await asyncio.sleep(0)
        assert d.pending[t2].state == PendingState.NEW and d.pending[t2].victims_left == 0
        assert d._held[(0, "t")] == {t2: d.pending[t2]} and d.ledger.reserved_items == 1
        svc.evicted(on[low[1]], low[1])  # t1's victim leaves: t1 is queued, then (end of the pass) t2
        for _ in range(2):  # (t2's Enqueue is written at the end of the pass that released it)
            await asyncio.sleep(0)
        assert d.pending[t1].state == PendingState.QUEUED and d.pending[t2].state == PendingState.QUEUED
        assert d.pending[t2].shard == d.pending[t1].shard
        enqueued = [m.id for n in (0, 1) for m in svc.sent(n) if type(m) is Enqueue]
        assert enqueued == [t1, t2]  # in arrival order, on one shard (affinity)
        assert not d._parked_of and not d._held and d.ledger.reserved_items == 0

    asyncio.run(main())


def test_a_request_held_behind_is_admitted_as_it_arrives_and_may_end_alone() -> None:
    """A request held behind its flow's parked one is admitted when it arrives: turned away at once
    if it cannot fit (not held for nothing: the queue limits bound what is held), its victims marked
    (no lower band takes the budget meanwhile). One whose TTL runs out ends alone."""
    async def main() -> None:
        svc = Service(shards=2)
        d = svc.d
        low = [svc.admit(f"l{i}", f"low{i}", 0) for i in range(2)]
        await asyncio.sleep(0)
        t1 = svc.admit("t1", "t", 1)
        t2 = svc.admit("t2", "t", 1, ttl=30.0)
        t3 = svc.admit("t3", "t", 1)  # nothing left to displace: rejected at once, as without t1 parked
        assert svc.waiter.outcomes["t3"] == Outcome.REJECTED_CAPACITY and t3 not in d.pending
        d._parked_expired(d.pending[t2])  # (its TTL timer, run by hand): it ends alone
        assert svc.waiter.outcomes["t2"] == Outcome.EVICTED_TTL and not d._held
        assert d.pending[t1].victims_left == 1 and d._parked_of[(0, "t")] is d.pending[t1]
        for victim in low:  # both are evicted all the same (t2's too)
            svc.evicted(d.pending[victim].shard, victim)
        await asyncio.sleep(0)
        assert d.pending[t1].state == PendingState.QUEUED and not d._parked_of and not d._held
        assert d.ledger.reserved_items == 0 and d.ledger.queued_items == 1

    asyncio.run(main())


def test_a_client_that_leaves_has_none_of_its_held_requests_admitted_for_nobody() -> None:
    """The fronts cancel a closing client's requests one by one, oldest first: the parked one's cancel
    must not admit the ones held behind it (they would be queued, or dispatched, for nobody). They go
    at the end of the pass, by when their own cancels have ended them."""
    async def main() -> None:
        svc = Service(shards=2)
        d = svc.d
        low = [svc.admit(f"l{i}", f"low{i}", 0) for i in range(2)]
        await asyncio.sleep(0)
        for n in (0, 1):
            svc.sent(n)
        t1 = svc.admit("t1", "t", 1)
        t2 = svc.admit("t2", "t", 1)
        d.cancel(t1)
        d.cancel(t2)
        await asyncio.sleep(0)
        assert t1 not in d.pending and t2 not in d.pending and not svc.waiter.outcomes
        assert not [m for n in (0, 1) for m in svc.sent(n) if type(m) is Enqueue]
        assert not d._parked_of and not d._held and d.ledger.reserved_items == 0
        assert d.ledger.queued_items == 2  # the two victims, evicted all the same
        assert [d.pending[rid].state for rid in low] == [PendingState.DISPLACING] * 2

    asyncio.run(main())
