"""A dispatch decided as its client left (review 2026-12-05, D4): the binary client closes while its
request is being dispatched; the distributor has cancelled it (nobody to answer) when the shard's
Done arrives. Its budget is returned at once, and it is counted, so that the service's own figures
add up: dispatched = tickets issued + unclaimed (it was counted dispatched and in no ticket counter:
3.5-6 % of dispatches under connection churn). A real Distributor and ShardWorker in one process,
the frames handed over by hand (as tests/test_write_order.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from test_worker import FakeTransport

from distributor.metrics import render_metrics
from distributor.service import Distributor
from flowshard.codec import Done
from flowshard.config import BandConfig, BudgetConfig, Config, ServiceConfig
from flowshard.engine import Engine
from flowshard.shm import ShmStats
from flowshard.types import Outcome
from workers.worker import ShardWorker


class Waiter:
    def __init__(self) -> None:
        self.got: list[Outcome] = []

    def deliver(self, cid: Any, request_id: int, outcome: Outcome, ticket: int, *rest: Any) -> None:
        self.got.append(outcome)


class Link:
    def __init__(self) -> None:
        self.transport = self
        self.inbox: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.inbox.append(data)


def test_a_dispatch_that_races_its_clients_departure_is_counted_and_frees_its_budget() -> None:
    async def main() -> None:
        config = Config(bands=[BandConfig(priority=0, name="p0")], budget=BudgetConfig(max_inflight_requests=1),
                        service=ServiceConfig(fast_path=False), flow_slots=64)
        d = Distributor(config, shards=1)
        d.shm = ShmStats(bytearray(d.layout.nbytes), d.layout, init=True)
        d._accepting = True
        link = Link()
        shard = d.shards[0]
        shard.ready = True
        shard.link = link  # type: ignore[assignment]
        worker = ShardWorker(0, Engine(config, enforce_limits=False), d.shm, asyncio.get_running_loop().create_future())
        transport = FakeTransport()
        worker.connection_made(transport)  # type: ignore[arg-type]
        transport.got.clear()  # the Hello
        waiter = Waiter()

        rid = d.admit(waiter, 1, "f", 0, 100, 0.0, 0.0, 0, 0.0, False)
        d._plan_needed = True
        d._end_pass()  # the Enqueue and its Grant go to the shard
        for data in link.inbox:
            worker.data_received(data)  # the shard dispatches it: its Done is on the way back
        link.inbox.clear()
        done = [m for m in transport.got if type(m) is Done]
        assert [m.outcome for m in done] == [int(Outcome.DISPATCHED)]
        d.cancel(rid)  # meanwhile its client closed the connection
        d.on_worker_frames(0, list(transport.got))
        assert waiter.got == []  # nobody to answer, no ticket
        assert d.ledger.budget.inflight == 0 and not d.tickets
        assert d.counters["dispatches_unclaimed"] == 1
        assert b"flowshard_dispatches_unclaimed_total 1.0" in render_metrics(d)[0]

    asyncio.run(main())
