"""The exit's counts when a worker is killed in the middle of its drain's eviction.

At `Shutdown` a worker evicts its queue in parts of `EVICT_CHUNK`, each counted in its cells and then
written. One killed at the report limit (or stopped, past `SHUTDOWN_SILENCE`) in the middle of a part
has counted requests whose `Done`s the distributor never reads; it ends them itself, `evicted:
shutdown`, and counted them a second time (the last round's left item: up to 2,000 in the exit line).
It now ends what the killed worker counted beyond the `Done`s it read without counting it again. A
real Distributor and ShardWorker in one process (as tests/test_unclaimed.py); the worker is "killed"
by never handing its last frames over."""

from __future__ import annotations

import asyncio
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


def _run_drain(handed_over: int) -> tuple[Waiter, Any, int]:
    """`n` requests queued on the one shard, its worker stopped after the first part of its eviction
    (counted in its cells, written to its link) with only `handed_over` of that part's `Done`s read by
    the distributor; then the drain's report limit kills it. The waiter, the exit's snapshot, `n`."""
    n = EVICT_CHUNK + 5

    async def main() -> tuple[Waiter, Any]:
        d, link, worker, transport = _one_shard()
        shard = d.shards[0]
        shard.link.__class__ = ClosableLink  # (its transport is itself: the exit closes it)
        shard.proc = KilledProc()  # type: ignore[assignment]
        waiter = Waiter()
        for i in range(n):
            d.admit(waiter, i, f"f{i % 7}", 0, 100, 0.0, 0.0, 0, 0.0, False)
        d._end_pass()  # their Enqueues (and a grant: one is dispatched)
        for data in link.inbox:
            worker.data_received(data)
        link.inbox.clear()
        d.on_worker_frames(0, list(transport.got))
        transport.got.clear()
        closing = asyncio.ensure_future(d.close(why="drain"))
        await asyncio.sleep(0)  # the Shutdown is written
        transport.buffered = 1  # the worker's link stays behind from here: it takes no second part
        for data in link.inbox:
            worker.data_received(data)  # the first part: counted, written
        evicted = [m for m in transport.got if type(m) is Done]
        assert len(evicted) == EVICT_CHUNK and {m.outcome for m in evicted} == {int(Outcome.EVICTED_SHUTDOWN)}
        d.on_worker_frames(0, evicted[:handed_over])  # the rest is in the socket as the worker dies
        await closing
        return waiter, d.final_snapshot

    waiter, snapshot = asyncio.run(main())
    return waiter, snapshot, n


def _counted(snapshot: Any) -> dict[str, int]:
    totals = snapshot["outcomes"].sum(axis=(0, 1)).tolist()
    return {o.label: int(v) for o, v in zip(Outcome, totals, strict=False) if v}


def test_what_a_killed_worker_counted_and_did_not_write_is_not_counted_again() -> None:
    for handed_over in (0, 700, EVICT_CHUNK):
        waiter, snapshot, n = _run_drain(handed_over)
        assert len(waiter.got) == n  # every client told once ...
        told = {o.label: waiter.got.count(o) for o in set(waiter.got)}
        assert told == {"dispatched": 1, "evicted:shutdown": n - 1}
        assert _counted(snapshot) == told, handed_over  # ... and counted once (was: + the unwritten part)
