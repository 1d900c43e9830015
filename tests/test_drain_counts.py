"""The exit's counts when a worker is killed in the middle of its drain's eviction.

At `Shutdown` a worker evicts its queue in parts of `EVICT_CHUNK`, each a window: counted in its cells,
then written as one frame. One killed at the report limit (or stopped, past `SHUTDOWN_SILENCE`) with a
part written to its link but not read by the distributor has counted requests whose `Done`s the
distributor never reads; it ends them itself, `evicted: shutdown`, and once counted them a second time
(up to 2,000 in the exit line). What the killed worker counted in that window is taken back now
(`ShmStats.take_back_unreported`). A real Distributor and ShardWorker in one process (as
tests/test_unclaimed.py); the worker is "killed" by never handing its last frame over."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from test_unclaimed import Link, Waiter, _one_shard

from flowshard.codec import Done
from flowshard.types import Outcome
from workers.worker import EVICT_CHUNK


class ClosableLink(Link):
    def close(self) -> None:
        pass


class KilledProc:
    """A worker process the distributor kills at the exit: it is gone at once."""

    pid = 4242

    def kill(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> int:
        return -9


def _run_drain(handed_over: bool, *, expiring: int = 0, cancel_last: bool = False,
               dies_itself: bool = False) -> tuple[Waiter, Any, int]:
    """`n` requests queued on the one shard (the first dispatched; the next `expiring` with a TTL that
    passes before the drain; the last one's client leaving as it starts, if `cancel_last`), its worker stopped after
    the first part of its eviction (counted in its cells, written to its link as one frame), which the
    distributor reads (`handed_over`) or not (what the `Shutdown`'s read itself decided is read: it was
    written before the part); then the drain's report limit kills it, or it died on its own first
    (`dies_itself`: an OOM kill, an operator's). The waiter, the exit's snapshot, `n`."""
    n = EVICT_CHUNK + 5 + expiring + cancel_last

    async def main() -> tuple[Waiter, Any]:
        d, link, worker, transport = _one_shard()
        shard = d.shards[0]
        shard.link.__class__ = ClosableLink  # (its transport is itself: the exit closes it)
        shard.proc = KilledProc()  # type: ignore[assignment]
        waiter = Waiter()
        ids = [d.admit(waiter, i, f"f{i % 7}", 0, 100, 0.02 if 0 < i <= expiring else 0.0, 0.0, 0, 0.0, False)
               for i in range(n)]
        d._end_pass()  # their Enqueues (and a grant: one is dispatched)
        for data in link.inbox:
            worker.data_received(data)
        link.inbox.clear()
        d.on_worker_frames(0, list(transport.got))
        transport.got.clear()
        if cancel_last:
            d.cancel(ids[-1])  # its Cancel goes with the Shutdown
        if expiring:
            time.sleep(0.03)  # past their TTL (the worker's timer has not run: it expires them at Shutdown)
        closing = asyncio.ensure_future(d.close(why="drain"))
        await asyncio.sleep(0)  # the Shutdown is written
        for data in link.inbox:
            worker.data_received(data)
        d.on_worker_frames(0, list(transport.got))  # what that read decided: written, read
        transport.got.clear()
        await asyncio.sleep(0)  # the first part: counted, written
        transport.buffered = 1  # the worker's link stays behind from here: it takes no second part
        evicted = [m for m in transport.got if type(m) is Done]
        assert len(evicted) == EVICT_CHUNK and {m.outcome for m in evicted} == {int(Outcome.EVICTED_SHUTDOWN)}
        assert transport.writes[-1] == EVICT_CHUNK and len(transport.frames[-1]) == 1  # (one frame: whole or lost)
        if handed_over:
            d.on_worker_frames(0, evicted)  # (else it dies in the socket with the worker)
        if dies_itself:
            d.on_worker_lost(0, shard.link)  # (its link's end, before the exit's own kill)
        await closing
        return waiter, d.final_snapshot

    waiter, snapshot = asyncio.run(main())
    return waiter, snapshot, n


def _counted(snapshot: Any) -> dict[str, int]:
    totals = snapshot["outcomes"].sum(axis=(0, 1)).tolist()
    return {o.label: int(v) for o, v in zip(Outcome, totals, strict=False) if v}


def _told(waiter: Waiter) -> dict[str, int]:
    return {o.label: waiter.got.count(o) for o in set(waiter.got)}


def test_what_a_killed_worker_counted_and_did_not_write_is_not_counted_again() -> None:
    for handed_over in (False, True):
        waiter, snapshot, n = _run_drain(handed_over)
        assert len(waiter.got) == n  # every client told once ...
        assert _told(waiter) == {"dispatched": 1, "evicted:shutdown": n - 1}
        assert _counted(snapshot) == _told(waiter), handed_over  # ... and counted once (was: + the unwritten part)


def test_a_worker_dead_on_its_own_in_a_part_and_the_shutdowns_own_outcomes_count_once() -> None:
    """Review 162: a worker that died on its own in the middle of a part (its link ended before the
    exit's kill) was not reconciled (3,304 counted for 2,004 told); and the TTLs and Cancels read with
    the `Shutdown` were in the first part, so a kill there counted them twice too. The read's own
    outcomes are written before the first part now, and every shard is reconciled at the exit."""
    waiter, snapshot, n = _run_drain(False, expiring=30, cancel_last=True, dies_itself=True)
    told = _told(waiter)
    assert told == {"dispatched": 1, "evicted:ttl": 30, "evicted:shutdown": n - 32}  # (the cancelled: nobody)
    assert _counted(snapshot) == {**told, "evicted:cancelled": 1}
