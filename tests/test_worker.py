"""The shard worker's frame handling, driven in-process (no subprocess): Grant blocks and the
narrowing of a grant when the distributor's cells say a higher band waits ungranted."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from conftest import make_config

from flowshard.codec import (
    BatchReader,
    BatchWriter,
    Cancel,
    Done,
    Enqueue,
    FromWorker,
    Grant,
    GrantBack,
    Shutdown,
    ToWorker,
)
from flowshard.engine import Engine
from flowshard.shm import ShmLayout, ShmStats
from flowshard.stats import N_WAIT_BUCKETS
from flowshard.types import N_OUTCOMES, Outcome
from workers.worker import EVICT_CHUNK, EVICT_PAUSE, ShardWorker


class FakeTransport:
    def __init__(self) -> None:
        self.reader = BatchReader(FromWorker)
        self.got: list[Any] = []
        self.writes: list[int] = []  # how many frames each write carried
        self.closed_after = -1  # the number of writes before the close
        self.buffered = 0  # what `get_write_buffer_size` says
        self.frames: list[list[int]] = []  # each write's batch frames, by their lengths

    def write(self, data: bytes) -> None:
        read = self.reader.feed(data)
        self.writes.append(len(read))
        self.frames.append(_frame_lengths(data))
        self.got += read

    def close(self) -> None:
        self.closed_after = len(self.writes)

    def is_closing(self) -> bool:
        return self.closed_after >= 0

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high: int) -> None:
        self.high = high

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def _frame_lengths(data: bytes) -> list[int]:
    """The lengths of the batch frames (a 4-byte big-endian length, then the body) that make `data`."""
    out, at = [], 0
    while at < len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        out.append(length)
        at += 4 + length
    return out


def frames(*messages: Any) -> bytes:
    w = BatchWriter()
    for m in messages:
        w.add(m)
    return w.take()


async def _worker(bands: int) -> tuple[ShardWorker, FakeTransport, ShmStats]:
    cfg = make_config([{"priority": bands - i} for i in range(bands)], max_inflight_requests=None)
    layout = ShmLayout(16, 2, bands, N_OUTCOMES, N_WAIT_BUCKETS)
    stats = ShmStats(bytearray(layout.nbytes), layout, init=True)
    worker = ShardWorker(1, Engine(cfg, enforce_limits=False), stats, asyncio.get_running_loop().create_future())
    transport = FakeTransport()
    worker.connection_made(transport)  # type: ignore[arg-type]
    transport.got.clear()  # the Hello
    return worker, transport, stats


def _enqueue(rid: int, priority: int) -> Enqueue:
    return Enqueue(rid, f"f{rid}", 0, priority, 10, 0.0, 0.0, 0, 0.0)


def test_a_grant_block_is_answered_grant_by_grant() -> None:
    async def main() -> None:
        worker, t, _ = await _worker(1)
        worker.data_received(frames(*[_enqueue(i, 1) for i in (1, 2, 3)], Grant(0, -1, 0.0, 5)))
        assert [type(m) for m in t.got] == [Done, Done, Done, GrantBack, GrantBack]
        assert [m.id for m in t.got[:3]] == [1, 2, 3] and all(m.outcome == Outcome.DISPATCHED for m in t.got[:3])

    asyncio.run(main())


def test_a_grant_for_a_lower_band_is_narrowed_while_a_higher_band_waits_ungranted() -> None:
    async def main() -> None:
        worker, t, stats = await _worker(2)
        stats.set_waiting(0, 1)  # the distributor: band 0 has work no grant covers (on another shard) since t=1 ns
        worker.data_received(frames(_enqueue(1, 1), Grant(1, -1, 0.0)))
        assert t.got == [GrantBack(1, 0)]  # handed back, for band 0
        assert int(stats.narrowed[1, 1]) == 1 and int(stats.inversions.sum()) == 0
        t.got.clear()
        worker.data_received(frames(_enqueue(2, 2), Grant(1, -1, 0.0)))  # band 0 work here: used for it
        assert [(type(m), m.id) for m in t.got] == [(Done, 2)]
        stats.set_waiting(0, 0)
        t.got.clear()
        worker.data_received(frames(Grant(1, -1, 0.0)))
        assert [(type(m), m.id) for m in t.got] == [(Done, 1)]  # nothing higher waits: band 1 served
        assert int(stats.narrowed.sum()) == 1 and int(stats.inversions.sum()) == 0

    asyncio.run(main())


def test_a_ceiling_reached_by_the_higher_band_does_not_narrow() -> None:
    async def main() -> None:
        worker, t, stats = await _worker(2)
        worker.ceilings = [0.5, 1.0]
        stats.set_waiting(0, 1)
        worker.data_received(frames(_enqueue(1, 1), Grant(1, -1, 0.6)))  # band 0 not eligible at 0.6
        assert [(type(m), m.id) for m in t.got] == [(Done, 1)]

    asyncio.run(main())


def test_a_dispatch_reports_when_it_was_committed() -> None:
    """Whether a dispatch was a priority inversion is the distributor's to judge (it knows what its
    plans left without budget): the shard reports the clock read right after its engine committed
    the dispatch (`Done.decided`, ns), and counts nothing itself. The top band's dispatches carry it
    too (the audit reports it)."""

    async def main() -> None:
        worker, t, stats = await _worker(2)
        dispatch = worker.engine.dispatch
        seen: list[int] = []

        def timed(*args: Any) -> Any:
            seen.append(time.monotonic_ns())
            item = dispatch(*args)
            seen.append(time.monotonic_ns())
            return item

        worker.engine.dispatch = timed  # type: ignore[method-assign]
        worker.data_received(frames(_enqueue(1, 1), _enqueue(2, 2), Grant(0, -1, 0.0), Grant(1, -1, 0.0)))
        high, low = t.got
        assert (high.id, low.id) == (2, 1)
        assert seen[1] <= high.decided <= seen[2] <= seen[3] <= low.decided <= time.monotonic_ns()
        assert int(stats.inversions.sum()) == 0

    asyncio.run(main())


def test_old_grant_frames_without_count_still_decode_as_one() -> None:
    import msgspec

    raw = msgspec.msgpack.encode([[2, 0, -1, 0.0]])  # a batch of one: tag, band, max_bytes, saturation
    (grant,) = BatchReader(ToWorker).feed(len(raw).to_bytes(4, "big") + raw)
    assert grant == Grant(0, -1, 0.0, 1)


def test_a_grant_checks_the_heads_deadline_at_its_own_clock_read_not_the_batchs(monkeypatch: Any) -> None:
    """A batch of frames is read at one clock; a grant in it reads the clock again, so a head whose TTL
    ran out while the batch was being handled (a long batch) is not dispatched: it ends `evicted: ttl`
    and the grant is handed back. (With the batch's clock it was dispatched past its deadline.)"""
    async def main() -> None:
        worker, t, _ = await _worker(1)
        now = [1000.0]
        monkeypatch.setattr("workers.worker.time.monotonic", lambda: now[0])
        worker.data_received(frames(Enqueue(1, "f", 0, 1, 10, 0.5, 0.0, 0, 0.0, 1000.0)))  # deadline 1000.5
        clocks = iter([1000.2, 1000.7])  # the next batch is read at 1000.2; its grant is taken at 1000.7
        monkeypatch.setattr("workers.worker.time.monotonic", lambda: next(clocks, 1000.7))
        t.got.clear()
        worker.data_received(frames(Grant(0, -1, 0.0, 1)))
        assert [(type(m), getattr(m, "outcome", None)) for m in t.got] == [
            (Done, int(Outcome.EVICTED_TTL)), (GrantBack, None)]

    asyncio.run(main())


def test_the_stamps_of_a_batch_never_run_backwards_after_a_grant_reads_its_clock(monkeypatch: Any) -> None:
    """A grant reads the clock as it is taken; the frames after it in the batch take that later clock,
    so a cancel read after a dispatch is not stamped before it (a review's note)."""
    async def main() -> None:
        worker, t, _ = await _worker(1)
        clock = iter(range(10**6))  # every read a tenth of a second after the last
        monkeypatch.setattr("workers.worker.time.monotonic", lambda: 1000.0 + next(clock) / 10)
        worker.data_received(frames(_enqueue(1, 1), _enqueue(2, 1)))
        t.got.clear()
        worker.data_received(frames(Grant(0, -1, 0.0, 1), Cancel(2, int(Outcome.EVICTED_CANCELLED))))
        done = [m for m in t.got if type(m) is Done]
        assert [(m.id, m.outcome) for m in done] == [(1, int(Outcome.DISPATCHED)), (2, int(Outcome.EVICTED_CANCELLED))]
        assert done[1].at >= done[0].at

    asyncio.run(main())


class AbortableTransport(FakeTransport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def test_a_failing_expiry_stops_the_worker_instead_of_losing_outcomes() -> None:
    """An error in the TTL timer's work (a bug) ends the worker, as an error reading its link does:
    the distributor then ends its requests `shard_failure` and starts another. Logged and carried on
    (as the loop does with a callback's error), the requests already taken out of the engine had no
    outcome, for good (a review)."""
    async def main() -> None:
        worker, _, _ = await _worker(1)
        transport = AbortableTransport()
        worker.transport = transport  # type: ignore[assignment]

        def failing(now: float) -> None:
            raise IndexError("injected")

        worker.engine.expire = failing  # type: ignore[method-assign]
        logging.disable(logging.CRITICAL)
        try:
            worker._on_timer()
        finally:
            logging.disable(logging.NOTSET)
        assert transport.aborted and worker.finished.done()

    asyncio.run(main())


def test_a_frame_out_of_range_stops_the_worker_before_it_touches_anything() -> None:
    """A slot, band or outcome no distributor sends (a bug on the link) stops the worker (fail-stop:
    the distributor then ends its requests `shard_failure` and starts another). Acted on, a negative
    slot indexed another flow's cells of shared memory and a negative band another band's queue,
    silently (a review: the worker took the distributor's frames unchecked)."""
    bad = [
        Enqueue(1, "f", -1, 1, 10, 0.0, 0.0, 0, 0.0),  # slot below the table
        Enqueue(1, "f", 16, 1, 10, 0.0, 0.0, 0, 0.0),  # slot past it (16 slots)
        Enqueue(1, "f", 0, 1, -5, 0.0, 0.0, 0, 0.0),  # a negative size
        Grant(-1, -1, 0.0, 1),  # band below the first
        Grant(2, -1, 0.0, 1),  # band past the last (2 bands)
        Cancel(1, 99),  # no such outcome
    ]
    for msg in bad:
        async def main(msg: Any = msg) -> None:
            worker, _, stats = await _worker(2)
            transport = AbortableTransport()
            worker.transport = transport  # type: ignore[assignment]
            before = bytes(stats._raw)
            logging.disable(logging.CRITICAL)
            try:
                worker.data_received(frames(msg))
            finally:
                logging.disable(logging.NOTSET)
            assert transport.aborted and worker.finished.done(), msg
            assert not worker.engine.outbox and not worker.slots, msg
            if type(msg) is not Cancel:
                # nothing counted (the seqlock's counter moved, nothing else)
                changed = [i for i, (a, b) in enumerate(zip(before, bytes(stats._raw), strict=True)) if a != b]
                assert len(changed) <= 8, (msg, changed)

        asyncio.run(main())


def test_frames_in_range_keep_the_worker_running() -> None:
    """The control: the last slot and band, and a Cancel with a real outcome, are taken."""
    async def main() -> None:
        worker, _, _ = await _worker(2)
        transport = AbortableTransport()
        worker.transport = transport  # type: ignore[assignment]
        worker.data_received(frames(Enqueue(1, "f", 15, 1, 10, 0.0, 0.0, 0, 0.0),
                                    Enqueue(2, "g", 0, 1, 0, 0.0, 0.0, 0, 0.0),
                                    Cancel(2, Outcome.EVICTED_CANCELLED), Grant(1, -1, 0.0, 1)))
        assert not transport.aborted and not worker.finished.done()

    asyncio.run(main())


def test_a_large_queue_is_evicted_at_shutdown_in_parts_each_written_before_the_next() -> None:
    """At `Shutdown` a worker evicts `EVICT_CHUNK` requests per loop pass and writes each part's `Done`
    frames before it takes the next, closing its link after the last. Evicted in one go, a very large
    queue (180,000) kept it from writing for longer than the distributor's `SHUTDOWN_SILENCE`: taken as
    stuck, it was killed and the distributor ended its requests again, its cells having counted them
    already (review 150: the exit line counted 330,209 for 180,000). A part waits while the link has
    not taken the last one; every request is evicted once and counted once."""
    async def main() -> None:
        worker, t, stats = await _worker(1)
        n = 2 * EVICT_CHUNK + 7
        worker.data_received(frames(*[_enqueue(i, 1) for i in range(1, n + 1)]))
        t.got.clear()
        t.writes.clear()
        worker.data_received(frames(Shutdown()))
        assert t.writes == [] and worker.engine.holds == n  # (the read's own outcomes first: none here)
        await asyncio.sleep(0)
        assert t.writes == [EVICT_CHUNK] and t.closed_after < 0  # the first part, written; the link open
        t.buffered = 100  # the link is behind: no part taken meanwhile
        await asyncio.sleep(EVICT_PAUSE * 5)
        assert t.writes == [EVICT_CHUNK] and worker.engine.holds == n - EVICT_CHUNK
        t.buffered = 0
        await until_closed(t)
        assert t.writes == [EVICT_CHUNK, EVICT_CHUNK, 7] and t.closed_after == 3
        assert sorted(m.id for m in t.got) == list(range(1, n + 1))
        assert {m.outcome for m in t.got} == {int(Outcome.EVICTED_SHUTDOWN)}
        assert int(stats.outcomes[:, :, Outcome.EVICTED_SHUTDOWN].sum()) == n and not worker.slots

    asyncio.run(main())


def test_a_shutdown_with_little_queued_closes_the_link_in_the_same_pass() -> None:
    """The control: what fits one part is evicted and written in the next loop pass, and the link
    closed in the pass after, as nothing is left."""
    async def main() -> None:
        worker, t, _ = await _worker(1)
        worker.data_received(frames(*[_enqueue(i, 1) for i in (1, 2, 3)]))
        t.got.clear()
        worker.data_received(frames(Shutdown()))
        await asyncio.sleep(0)
        assert [m.id for m in t.got] == [1, 2, 3] and t.writes[-1] == 3
        await asyncio.sleep(0)
        assert t.is_closing() and len(t.writes) == t.closed_after

    asyncio.run(main())


def test_what_the_shutdowns_read_decided_is_written_before_the_first_part() -> None:
    """A TTL passed and a Cancel read with the `Shutdown` are answered and written in that read; the
    queue is evicted from the next loop pass. A worker killed in the middle of a part then holds only
    `evicted: shutdown` outcomes unwritten, which the distributor reconciles from its cells (review 162:
    with the first part in the same read, those outcomes were counted twice)."""
    async def main() -> None:
        worker, t, _ = await _worker(1)
        expiring = Enqueue(1, "f1", 0, 1, 10, 0.001, 0.0, 0, 0.0)
        worker.data_received(frames(expiring, *[_enqueue(i, 1) for i in (2, 3, 4)]))
        t.got.clear()
        t.writes.clear()
        time.sleep(0.005)
        worker.data_received(frames(Cancel(2, Outcome.EVICTED_CANCELLED), Shutdown()))
        assert sorted((m.id, m.outcome) for m in t.got) == [(1, Outcome.EVICTED_TTL), (2, Outcome.EVICTED_CANCELLED)]
        assert t.writes == [2] and worker.engine.holds == 2
        await asyncio.sleep(0)
        assert t.writes == [2, 2] and {m.outcome for m in t.got[2:]} == {int(Outcome.EVICTED_SHUTDOWN)}

    asyncio.run(main())


async def until_closed(t: FakeTransport) -> None:
    for _ in range(1000):
        if t.is_closing():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"not closed: {t.writes}")
