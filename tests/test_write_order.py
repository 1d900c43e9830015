"""The order in which the distributor writes to its shards at the end of a pass (`Distributor._flush`):
the shards granted in the pass first, those left with the least work no grant covers first (ties: the
order the ledger planned their first grant), then the rest.

Each write wakes a sleeping worker, and the workers dispatch (and so free their clients) about in the
order they are woken. In shard index order, the low shards' grants went first in every pass, and with
constant service times their clients released first in every later burst too: on fair-alloc at 8
shards the thin flow on a high shard missed a whole service time for 6-7 % of its requests
(docs/benchmarks.md, "The thin flow at 8 shards, traced"). A real Distributor and real ShardWorkers in
one process (as tests/test_inversions.py), the frames handed over by hand."""

from __future__ import annotations

import asyncio
from typing import Any

from test_worker import FakeTransport

from distributor.service import Distributor
from flowshard.codec import BatchReader, Grant, ToWorker
from flowshard.config import BandConfig, BudgetConfig, Config, ServiceConfig
from flowshard.engine import Engine
from flowshard.shm import ShmStats
from flowshard.types import Outcome
from workers.worker import ShardWorker


class Waiter:
    def __init__(self) -> None:
        self.tickets: list[int] = []

    def deliver(self, cid: Any, request_id: int, outcome: Outcome, ticket: int, *rest: Any) -> None:
        assert outcome == Outcome.DISPATCHED
        self.tickets.append(ticket)


class Link:
    """A worker link whose transport notes which shard each write went to, and hands the bytes on."""

    def __init__(self, n: int, log: list[int], inbox: list[bytes]) -> None:
        self.transport = self
        self.n, self.log, self.inbox = n, log, inbox

    def write(self, data: bytes) -> None:
        self.log.append(self.n)
        self.inbox.append(data)


def test_shards_are_written_in_the_order_their_grants_were_planned() -> None:
    async def main() -> None:
        shards = 4
        config = Config(
            bands=[BandConfig(priority=0, name="p0", fairness="drr")],
            budget=BudgetConfig(max_inflight_requests=2),
            service=ServiceConfig(fast_path=False, jsq_slack_bytes=0),  # flows spread over the shards
            flow_slots=64,
        )
        d = Distributor(config, shards=shards)
        d.shm = ShmStats(bytearray(d.layout.nbytes), d.layout, init=True)
        d._accepting = True
        log: list[int] = []
        inboxes: list[list[bytes]] = [[] for _ in range(shards)]
        loop = asyncio.get_running_loop()
        workers, transports = [], []
        for n, s in enumerate(d.shards):
            s.ready = True
            s.link = Link(n, log, inboxes[n])  # type: ignore[assignment]
            w = ShardWorker(n, Engine(config, enforce_limits=False), d.shm, loop.create_future())
            t = FakeTransport()
            w.connection_made(t)  # type: ignore[arg-type]
            d.on_worker_frames(n, list(t.got))  # its Hello: read, as the counts shown count from it
            t.got.clear()
            workers.append(w)
            transports.append(t)
        waiter = Waiter()

        def admit(flow: str, rr: int) -> int:
            d._rr = rr - 1  # JSQ-Bytes' round robin among the tied empty shards picks sorted(tied)[rr % len]
            rid = d.admit(waiter, rid_of[0], flow, 0, 100, 0.0, 0.0, 0, 0.0, False)
            rid_of[0] += 1
            return d.pending[rid].shard

        def end_pass() -> list[int]:
            log.clear()
            d._plan_needed = True
            d._end_pass()
            return list(log)

        def deliver(n: int) -> None:
            for data in inboxes[n]:
                workers[n].data_received(data)
            inboxes[n].clear()
            got = transports[n].got
            messages, got[:] = list(got), []
            d.on_worker_frames(n, messages)

        rid_of = [1]
        heavy = [admit("heavy", 0) for _ in range(3)]  # a backlogged flow on shard 0
        assert heavy == [0, 0, 0]
        assert end_pass() == [0]
        deliver(0)  # both slots dispatched to it; a third request still queued there
        assert len(waiter.tickets) == 2
        # A burst of releases, and a thin flow's request in the same pass (a closed-loop client writes its
        # release and its next request together): the thin flow starts afresh on an empty shard, at the
        # band's virtual clock, behind which the backlogged shard already is; so it is planned first, and
        # its shard is left with nothing waiting (the backlogged one with a request): written first.
        for ticket in waiter.tickets:
            assert d.release(ticket)
        thin = admit("thin", 2)  # sorted([1, 2, 3])[2 % 3]
        assert thin == 3
        plan = d.ledger.plan_grants
        planned: list[int] = []

        def noting() -> list[tuple[int, int, int, float]]:
            grants = plan()
            planned.extend(g[0] for g in grants)
            return grants

        d.ledger.plan_grants = noting  # type: ignore[method-assign]
        assert end_pass() == [3, 0]
        assert planned == [3, 0]
        grants = [[m for m in BatchReader(ToWorker).feed(b"".join(inboxes[n])) if type(m) is Grant] for n in (3, 0)]
        assert [len(g) for g in grants] == [1, 1]

    asyncio.run(main())
