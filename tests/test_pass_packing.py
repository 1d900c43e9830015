"""JSQ-Bytes's slack judges a shard by its input backlog as the distributor's pass began.

A pass's Enqueues are counted into their shards' input backlogs when the pass is written
(`Distributor._flush`, `ShmStats.add_sent`), so every pick of a pass sees the backlogs the shards had
left unread before it: a pass that routes many new flows packs them all onto shard 0 when it keeps
up, and only a shard that did not read its input (a slow or stopped one) gets no new flow. (Counted
per request, a pass routing more than the slack spilled within itself: in the matrix shape, with
thousands of single-request flows, every pass spread its flows over several shards, which cost the
distributor a write, a wake-up and fair-share bookkeeping per extra shard.) A real Distributor in one
process, its shard links fakes that keep what is written."""

from __future__ import annotations

import asyncio
from typing import Any

from test_unclaimed import Link  # (a worker link that keeps what is written: the shard never reads it)

from distributor.service import Distributor
from flowshard.config import BandConfig, BudgetConfig, Config, ServiceConfig
from flowshard.shm import ShmStats, backlog_bytes
from flowshard.types import Outcome

KIB = 1024


class Waiter:
    def deliver(self, cid: Any, request_id: int, outcome: Outcome, *rest: Any) -> None:
        pass


def distributor(shards: int, slack: int) -> Distributor:
    config = Config(
        bands=[BandConfig(priority=0, name="p0", fairness="round-robin")],
        budget=BudgetConfig(max_inflight_requests=1),
        service=ServiceConfig(fast_path=False, jsq_slack_bytes=slack),
        flow_slots=256,
        max_queued_bytes=None,
    )
    d = Distributor(config, shards=shards)
    d.shm = ShmStats(bytearray(d.layout.nbytes), d.layout, init=True)
    d._accepting = True
    for s in d.shards:
        s.ready = True
        s.link = Link()  # type: ignore[assignment]
    return d


def test_a_pass_packs_its_new_flows_and_the_next_pass_sees_what_was_not_read() -> None:
    async def main() -> None:
        d = distributor(4, 10 * KIB)
        d._loop = asyncio.get_running_loop()
        waiter = Waiter()
        ids = iter(range(1, 10**6))

        def admit(flow: str, size: int) -> int:
            rid = d.admit(waiter, next(ids), flow, 0, size, 0.0, 0.0, 0, 0.0, False)
            return d.pending[rid].shard

        sizes = [0, 1, 1023, 1024, 1025, 5000] * 5  # 30 new flows, 61 KiB of backlog: six times the slack
        placed = [admit(f"a{i}", size) for i, size in enumerate(sizes)]  # one pass (no loop turn between)
        assert placed == [0] * 30
        assert d.shm is not None and d.shm.shard_backlog_bytes().tolist() == [0, 0, 0, 0]  # not written yet
        await asyncio.sleep(0)  # the pass ends: written, and counted as each shard will take them
        assert d.shm.shard_backlog_bytes().tolist() == [sum(map(backlog_bytes, sizes)), 0, 0, 0]
        assert admit("b", 100) == 1  # shard 0 has not read them: the slack behind, it gets no new flow
        assert admit("a0", 100) == 0  # (a flow already there stays: affinity)
        await asyncio.sleep(0)
        assert d.shm.shard_backlog_bytes().tolist() == [sum(map(backlog_bytes, sizes)) + KIB, KIB, 0, 0]
        d.shm.add_taken(0, int(d.shm.shard_backlog_bytes()[0]))  # shard 0 reads its input
        assert admit("c", 100) == 0

    asyncio.run(main())


def test_a_shard_lost_in_the_pass_that_routed_to_it_keeps_no_backlog() -> None:
    """The Enqueues of the pass go with the lost shard's writer: not counted after its reset, or the
    shard's replacement would look behind its input forever and get no new flow."""
    async def main() -> None:
        d = distributor(2, 10 * KIB)
        d._loop = asyncio.get_running_loop()
        rid = d.admit(Waiter(), 1, "a", 0, 50 * KIB, 0.0, 0.0, 0, 0.0, False)
        assert d.pending[rid].shard == 0 and d.shards[0].sent == 50 * KIB
        d._stopping = True  # (on_worker_lost's own part only: no respawn in this test)
        d.on_worker_lost(0, d.shards[0].link)  # type: ignore[arg-type]
        assert d.shards[0].sent == 0
        await asyncio.sleep(0)
        assert d.shm is not None and d.shm.shard_backlog_bytes().tolist() == [0, 0]

    asyncio.run(main())


def test_a_newcomer_freed_by_a_lost_shard_is_routed_by_counters_that_agree_with_the_ledger() -> None:
    """A shard dies holding the victim of a parked newcomer: the victim's leave frees the newcomer, which
    is routed at once. Its flow holds nothing now (the ledger's `slot_items`), so JSQ-Bytes does not
    read its counters (`fresh`): they must agree already, the dead shard's column reset first (they
    did not: the pick then differed from what the counters' rule gives; a review found it)."""
    config = Config(
        bands=[BandConfig(priority=1, displacement=True), BandConfig(priority=0)],
        budget=BudgetConfig(max_inflight_requests=1),
        service=ServiceConfig(fast_path=False, jsq_slack_bytes=10 * KIB),
        flow_slots=64, max_queued_requests=2, max_queued_bytes=None, default_ttl=0,
    )
    d = Distributor(config, shards=3)
    d.shm = shm = ShmStats(bytearray(d.layout.nbytes), d.layout, init=True)
    d._accepting = True
    for s in d.shards:
        s.ready = True
        s.link = Link()  # type: ignore[assignment]
    d._respawn = lambda shard: None  # type: ignore[method-assign]  (no worker process in this test)
    picks: list[tuple[bool, int, int]] = []
    pick = shm.jsq_pick

    def checked(slot: int, rr: int, slack: int = 0, fresh: bool = False) -> int:
        picks.append((fresh, pick(slot, rr, slack, fresh), pick(slot, rr, slack, False)))
        return picks[-1][1]

    shm.jsq_pick = checked  # type: ignore[method-assign]

    async def main() -> None:
        d._loop = asyncio.get_running_loop()
        waiter = Waiter()
        shm.add_sent(0, 50 * KIB)
        shm.add_sent(1, 50 * KIB)  # shards 0 and 1 behind their input: the victim goes to shard 2
        victim = d.admit(waiter, 1, "x", 0, 100, 0.0, 0.0, 0, 0.0, False)
        d.admit(waiter, 2, "y", 0, 100, 0.0, 0.0, 0, 0.0, False)
        await asyncio.sleep(0)
        assert d.pending[victim].shard == 2
        shm.add_taken(2, int(shm.shard_backlog_bytes()[2]))
        shm.add_taken(0, 35 * KIB)
        shm.add_taken(1, 45 * KIB)  # backlogs 15 KiB, 5 KiB, 0: shard 1 is within the slack of the least
        newcomer = d.admit(waiter, 3, "x", 1, 100, 0.0, 0.0, 0, 0.0, False)  # the queue is full: it displaces
        assert d.pending[newcomer].victims_left == 1
        picks.clear()
        d.on_worker_lost(2, d.shards[2].link)  # type: ignore[arg-type]
        assert picks == [(True, 1, 1)]  # the fresh pick is the counters' own
        assert d.pending[newcomer].shard == 1

    asyncio.run(main())


def test_a_pass_picks_once_for_its_new_flows_and_never_a_lost_shard() -> None:
    """With a slack, a flow starting afresh is placed by the shards' input backlogs alone, so the pass's
    first such pick is taken for the rest of the pass (`Distributor._fresh_pick`): a shard reading its
    input within the pass changes the next pass's picks, not this one's. A shard lost within the pass
    is never picked again, and a flow already queued somewhere is still picked for by its counters."""
    async def main() -> None:
        d = distributor(3, 10 * KIB)
        d._loop = asyncio.get_running_loop()
        d._respawn = lambda shard: None  # type: ignore[method-assign]  (no worker process in this test)
        shm = d.shm
        assert shm is not None
        waiter = Waiter()
        ids = iter(range(1, 10**6))

        def admit(flow: str, size: int = 100) -> int:
            rid = d.admit(waiter, next(ids), flow, 0, size, 0.0, 0.0, 0, 0.0, False)
            return d.pending[rid].shard

        shm.add_sent(0, 50 * KIB)  # shard 0 behind its input: new flows go to shard 1
        assert [admit(f"a{i}") for i in range(5)] == [1] * 5
        shm.add_taken(0, 50 * KIB)  # shard 0 reads it within the pass: this pass keeps its pick
        assert admit("b") == 1
        await asyncio.sleep(0)
        assert admit("c") == 0  # the next pass reads the backlogs again
        shm.add_sent(0, 50 * KIB)
        d.on_worker_lost(0, d.shards[0].link)  # type: ignore[arg-type]  (within the pass: shard 0 is gone)
        among = shm.jsq_pick_among
        calls: list[int] = []

        def counted(*args: Any) -> int:
            calls.append(among(*args))
            return calls[-1]

        shm.jsq_pick_among = counted  # type: ignore[method-assign]
        assert admit("d") == 1 and admit("e") == 1  # never the lost shard, whatever was picked before
        assert calls == [1]  # the pick over the live shards is made once too
        await asyncio.sleep(0)

    asyncio.run(main())


def test_without_a_slack_each_new_flow_is_picked_for_on_its_own() -> None:
    """Slack 0 is exact JSQ-Bytes over queued bytes (ties round robin): every pick reads the counters,
    which each pick of the pass moves, so nothing is reused (the control for the test above)."""
    async def main() -> None:
        d = distributor(3, 0)
        d._loop = asyncio.get_running_loop()
        waiter = Waiter()
        placed = [d.pending[d.admit(waiter, i + 1, f"f{i}", 0, 100, 0.0, 0.0, 0, 0.0, False)].shard
                  for i in range(6)]
        assert sorted(placed) == [0, 0, 1, 1, 2, 2]  # spread: one pass, three shards
        await asyncio.sleep(0)

    asyncio.run(main())
