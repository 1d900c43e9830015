"""A dispatch decided as its client left (review 2026-12-05, D4): the binary client closes while its
request is being dispatched; the distributor has cancelled it (nobody to answer) when the shard's
Done arrives. Its budget is returned at once, and it is counted, so that the service's own figures
add up: dispatched = tickets issued + unclaimed (it was counted dispatched and in no ticket counter:
3.5-6 % of dispatches under connection churn). The same path ends a request whose admission raised
after it was queued. A real Distributor and ShardWorker in one process, the frames handed over by
hand (as tests/test_write_order.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from test_worker import FakeTransport

from distributor.acceptors import AcceptorLink
from distributor.metrics import render_metrics
from distributor.service import Distributor
from flowshard.codec import BatchReader, BatchWriter, Done, Error, LinkAdmit, ToAcceptor
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


def _one_shard() -> tuple[Distributor, Link, ShardWorker, FakeTransport]:
    """A Distributor and its one shard's worker; the frames each way are handed over by the test."""
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
    d.on_worker_frames(0, list(transport.got))  # its Hello
    transport.got.clear()
    return d, link, worker, transport


def test_a_dispatch_that_races_its_clients_departure_is_counted_and_frees_its_budget() -> None:
    async def main() -> None:
        d, link, worker, transport = _one_shard()
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


class FailsOnce(set[int]):
    """The distributor's set of shards written to this pass, whose first `add` raises: a failure in
    `admit` after the request was queued (its Enqueue written)."""

    def add(self, shard: int) -> None:
        super().add(shard)
        if not getattr(self, "failed", False):
            self.failed = True
            raise RuntimeError("injected")


class AcceptorEnd:
    """The acceptor's end of an `AcceptorLink`: what the distributor sent it."""

    def __init__(self) -> None:
        self.got: list[Any] = []
        self._reader = BatchReader(ToAcceptor)

    def write(self, data: bytes) -> None:
        self.got += self._reader.feed(data)

    def is_closing(self) -> bool:
        return False


def test_an_admission_that_raises_after_queueing_a_proxied_request_ends_it_and_holds_no_ticket() -> None:
    """If `Distributor.admit` raised after queueing a request from an acceptor (a proxied one here), the
    acceptor answered its client 500 but the request stayed queued: its dispatch met no waiting key,
    and its ticket was held by the link until that acceptor died. Now what was queued is cancelled:
    one outcome (the 500), the budget back, no ticket."""

    async def main() -> None:
        d, link, worker, transport = _one_shard()
        acceptor = AcceptorLink(d, 0, b"")
        end = AcceptorEnd()
        acceptor.transport = end  # type: ignore[assignment]
        d._written = FailsOnce()
        w = BatchWriter()
        w.add(LinkAdmit(7, "f", 0, 100, 0.0, 0.0, 0, 0.0, False, False, True))
        acceptor.data_received(w.take())
        await asyncio.sleep(0)  # the link's answers leave
        assert [(type(m), m.id, m.status) for m in end.got] == [(Error, 7, 500)]
        assert not acceptor.proxied_keys  # not awaited by a drain
        for _ in range(3):  # the shard's frames and the distributor's passes, until quiet
            d._plan_needed = True
            d._end_pass()
            for data in link.inbox:
                worker.data_received(data)
            link.inbox.clear()
            d.on_worker_frames(0, list(transport.got))
            transport.got.clear()
            await asyncio.sleep(0)
        assert [type(m) for m in end.got] == [Error]  # nothing after its 500
        assert not d.pending and not d.tickets and not acceptor.proxied
        assert d.ledger.budget.inflight == 0 and d.ledger.queued_items == 0

    asyncio.run(main())
