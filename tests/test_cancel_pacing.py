"""Clients that leave with many requests queued: the shards are told to evict them CANCEL_BATCH at a
time, CANCEL_PAUSE apart (reviews 168, 175: 64,000 cancelled at once, over one connection or 128, held
every other client 0.6-1.2 s while the shards evicted them and their reports came back), while the
clients' side of each cancel is at once. A real Distributor and ShardWorker in one process, the frames
handed over by hand (as tests/test_unclaimed.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from test_unclaimed import Waiter, _one_shard

from distributor.service import CANCEL_BATCH, CANCEL_PAUSE, Distributor
from flowshard.codec import Done
from flowshard.types import Outcome


def _queue(d: Distributor, link: Any, worker: Any, transport: Any, waiter: Waiter, n: int) -> list[int]:
    """n admissions behind a budget of 1: the first dispatched, the others queued at the shard."""
    rids = [d.admit(waiter, i, f"f{i % 7}", 0, 100, 0.0, 0.0, 0, 0.0, False) for i in range(n)]
    d._plan_needed = True
    d._end_pass()
    _to_worker(link, worker)
    d.on_worker_frames(0, _from_worker(transport))
    assert waiter.got == [Outcome.DISPATCHED]
    return rids


def _to_worker(link: Any, worker: Any) -> None:
    for data in link.inbox:
        worker.data_received(data)
    link.inbox.clear()


def _from_worker(transport: Any) -> list[Any]:
    got = list(transport.got)
    transport.got.clear()
    return got


def _counted(d: Distributor, outcome: Outcome) -> int:
    assert d.shm is not None
    return int(d.shm.outcomes[:, 0, int(outcome)].sum())


def test_the_shards_are_told_of_departed_clients_a_part_at_a_time_and_every_request_ends_once() -> None:
    """The first part in the cancels' own pass (ahead of any grant the client's own tickets free), the
    rest CANCEL_PAUSE apart."""
    async def main() -> None:
        d, link, worker, transport = _one_shard()
        d._loop = asyncio.get_running_loop()
        waiter = Waiter()
        n = 2 * CANCEL_BATCH + 6
        rids = _queue(d, link, worker, transport, waiter, n)
        for rid in rids[1:]:
            d.cancel(rid)  # its client left
        d._end_pass()  # the cancels' own pass ends: its shard is told of the first part
        assert len(d._cancels) == n - 1 - CANCEL_BATCH and d._cancel_pacer is not None
        parts: list[int] = []
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while len(parts) < 3:
            await asyncio.sleep(CANCEL_PAUSE / 5)
            _to_worker(link, worker)
            done = _from_worker(transport)
            if done:
                assert all(type(m) is Done and m.outcome == int(Outcome.EVICTED_CANCELLED) for m in done)
                parts.append(len(done))
                d.on_worker_frames(0, done)
            assert loop.time() - t0 < 2.0, parts
        assert parts == [CANCEL_BATCH, CANCEL_BATCH, n - 1 - 2 * CANCEL_BATCH]
        assert loop.time() - t0 >= 2 * CANCEL_PAUSE  # (a pause before each later part)
        assert waiter.got == [Outcome.DISPATCHED]  # the clients that left are told nothing
        assert not d.pending and not d._told and not d._cancels and d.ledger.queued_items == 0
        assert _counted(d, Outcome.EVICTED_CANCELLED) == n - 1

    asyncio.run(main())


def test_requests_whose_shard_dies_before_it_is_told_count_as_cancelled_and_the_rest_are_skipped() -> None:
    """Review 175: cancelled by the front a part at a time, the requests of a client that had left were
    still its own when their shard died, and ended `evicted: shard_failure`; cancelled at once, they
    count as their client left, and the parts not yet sent are not sent for them."""

    async def main() -> None:
        d, link, worker, transport = _one_shard()
        d._loop = asyncio.get_running_loop()
        d._respawn = lambda shard: None  # type: ignore[method-assign]  # (no worker process here)
        waiter = Waiter()
        n = CANCEL_BATCH + 50
        rids = _queue(d, link, worker, transport, waiter, n)
        for rid in rids[1:]:
            d.cancel(rid)
        d.on_worker_lost(0, link)  # before any cancel reached it
        assert _counted(d, Outcome.EVICTED_CANCELLED) == n - 1
        assert _counted(d, Outcome.EVICTED_SHARD_FAILURE) == 0
        assert not d.pending and not d._told
        await asyncio.sleep(3 * CANCEL_PAUSE)
        assert not d._cancels and not link.inbox  # nothing sent for requests already ended

    asyncio.run(main())


def test_the_cancels_left_are_all_sent_before_the_shutdown() -> None:
    """At the drain's end the shards are told of every departed client first, so its requests count
    `cancelled`, not `shutdown`."""

    async def main() -> None:
        d, link, worker, transport = _one_shard()
        d._loop = asyncio.get_running_loop()
        waiter = Waiter()
        n = 3 * CANCEL_BATCH
        rids = _queue(d, link, worker, transport, waiter, n)
        for rid in rids[1:]:
            d.cancel(rid)
        d._send_cancels(every=True)
        d._end_pass()
        _to_worker(link, worker)
        done = _from_worker(transport)
        assert len(done) == n - 1 and {m.outcome for m in done} == {int(Outcome.EVICTED_CANCELLED)}
        assert d._cancel_pacer is None and not d._cancels

    asyncio.run(main())


def test_departed_requests_ended_while_their_shard_is_silent_are_still_told_to_it() -> None:
    """Review 177: the distributor ends a departed client's requests on a shard that has gone silent
    (stopped, under the watchdog) without waiting for it (`_end_on_silent`), keeping their room till the
    shard answers a cancel; the parts not yet sent then were skipped, and the shard kept those requests
    (and the service their room) for as long as it ran: 42,592 of 60,000 in a real service."""

    async def main() -> None:
        d, link, worker, transport = _one_shard()
        d._loop = asyncio.get_running_loop()
        n = 3 * CANCEL_BATCH
        rids = _queue(d, link, worker, transport, Waiter(), n)
        for rid in rids[1:]:
            d.cancel(rid)
        d._end_pass()  # the first part goes
        d._end_on_silent([0], 1e12)  # its shard judged silent: they leave the ledger, their room held
        assert d.ledger.reserved_items == n - 1  # (the shard has read none of the cancels yet)
        while d._cancels:
            await asyncio.sleep(CANCEL_PAUSE)
        d._end_pass()
        _to_worker(link, worker)  # the shard reads again: every cancel
        done = _from_worker(transport)
        assert len(done) == n - 1
        d.on_worker_frames(0, done)
        assert not d.pending and d.ledger.reserved_items == 0  # each ended once, its room free
        assert _counted(d, Outcome.EVICTED_CANCELLED) == n - 1

    asyncio.run(main())
