"""Tests of the shared-memory statistics layout (DESIGN.md §4 invariants 4-6, §5)."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowshard.shm import ARRAY_NAMES, HEADER_WORDS, MAGIC, ShmLayout, ShmStats, backlog_bytes


def make(f: int = 6, n: int = 3, b: int = 3, o: int = 8, h: int = 17) -> ShmStats:
    layout = ShmLayout(flow_slots=f, shards=n, bands=b, outcomes=o, hist_buckets=h)
    return ShmStats(bytearray(layout.nbytes), layout, init=True)


# ---------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("dims", [(1, 1, 1, 1, 1), (6, 3, 3, 8, 17), (1024, 4, 4, 8, 17), (7, 5, 2, 3, 9)])
def test_layout_offsets_aligned_disjoint_and_nbytes_exact(dims: tuple[int, ...]) -> None:
    f, n, b, o, h = dims
    layout = ShmLayout(f, n, b, o, h)
    expected = {
        "enq_bytes": (f, n), "enq_items": (f, n), "deq_bytes": (f, n), "deq_items": (f, n),
        "band_enq_bytes": (b, n), "band_enq_items": (b, n), "band_deq_bytes": (b, n), "band_deq_items": (b, n),
        "outcomes": (n + 1, b, o), "wait_hist": (n + 1, b, h), "wait_us": (n + 1, b),
        "dispatched": (n + 1,),
        "heartbeat_ns": (n,), "seq": (n + 1,), "shard_enq_bytes": (n,), "shard_deq_bytes": (n,),
        "shard_taken_bytes": (n,), "shard_sent_bytes": (n,),
        "band_waiting": (b,), "inversions": (n + 1, b), "narrowed": (n + 1, b),
        "reported": (n,), "ckpt_rows": (n, b * o + b * h + b + 1 + b), "ckpt_reported": (n,), "ckpt_valid": (n,),
    }  # fmt: skip
    assert {s.name: s.shape for s in layout.specs} == expected
    assert set(ARRAY_NAMES) == set(expected)

    spans = sorted((s.offset, s.offset + s.nbytes) for s in layout.specs)
    assert spans[0][0] >= HEADER_WORDS * 8
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start
    assert all(s.offset % 8 == 0 for s in layout.specs)
    assert all(s.offset % 64 == 0 for s in layout.specs)  # cache-line aligned, stricter than needed
    last_end = spans[-1][1]
    assert last_end <= layout.nbytes < last_end + 64 and layout.nbytes % 64 == 0
    # padding is small: at most one cache line per array and the header line
    payload = sum(s.nbytes for s in layout.specs)
    assert payload + HEADER_WORDS * 8 <= layout.nbytes <= payload + 64 * (len(layout.specs) + 1)


def test_views_cover_their_cells_only() -> None:
    """Fill every array with its own marker through numpy; no write may land in another array."""
    stats = make(f=5, n=3, b=2, o=4, h=5)
    base = np.frombuffer(stats._raw, dtype=np.uint8).ctypes.data
    for k, spec in enumerate(stats.layout.specs):
        arr = getattr(stats, spec.name)
        assert arr.dtype == np.int64 and arr.flags.c_contiguous and arr.flags.writeable
        assert arr.shape == spec.shape
        assert arr.ctypes.data - base == spec.offset
        arr[...] = 1000 + k
    for k, spec in enumerate(stats.layout.specs):
        assert (getattr(stats, spec.name) == 1000 + k).all(), spec.name
    assert stats._q[0] == MAGIC
    assert ShmLayout.from_buffer(stats._raw) == stats.layout


@pytest.mark.parametrize("bad", [(0, 1, 1), (1, 0, 1), (1, 1, -2), (1.5, 1, 1), (True, 1, 1)])
def test_layout_rejects_bad_dims(bad: tuple[object, ...]) -> None:
    with pytest.raises(ValueError):
        ShmLayout(*bad)  # type: ignore[arg-type]


def test_header_round_trip_and_mismatch() -> None:
    layout = ShmLayout(flow_slots=9, shards=2, bands=3, outcomes=8, hist_buckets=17)
    buf = bytearray(layout.nbytes + 100)  # a segment may be larger than the layout
    ShmStats(buf, layout, init=True).close()
    attached = ShmStats(buf)  # a worker attaches without the config
    assert attached.layout == layout and attached.layout.nbytes == layout.nbytes
    attached.close()
    with pytest.raises(ValueError, match="different layout"):
        ShmStats(buf, ShmLayout(flow_slots=9, shards=3, bands=3))
    with pytest.raises(ValueError, match="not a flowshard"):
        ShmStats(bytearray(layout.nbytes))
    with pytest.raises(ValueError, match="smaller"):
        ShmStats(bytearray(layout.nbytes - 8), layout)


# ---------------------------------------------------------------------------------------------- counters


def test_single_writer_counter_arithmetic_touches_only_its_cells() -> None:
    stats = make(f=6, n=3, b=3, o=8, h=17)
    lay = stats.layout
    exp = {s.name: np.zeros(s.shape, dtype=np.int64) for s in lay.specs}
    exp["ckpt_valid"][:] = 1  # a fresh segment's copies are whole (a worker dying before its first window)

    stats.add_enq(4, 2, 1, 300)
    stats.add_enq(4, 2, 1, 50)
    for nbytes in (3, 2, 2):  # three requests of 7 bytes in all
        stats.add_enq(0, 0, 2, nbytes)
    exp["enq_bytes"][4, 2] = 350
    exp["enq_items"][4, 2] = 2
    exp["band_enq_bytes"][1, 2] = 350
    exp["band_enq_items"][1, 2] = 2
    exp["enq_bytes"][0, 0] = 7
    exp["enq_items"][0, 0] = 3
    exp["band_enq_bytes"][2, 0] = 7
    exp["band_enq_items"][2, 0] = 3
    exp["shard_enq_bytes"][2] = 350
    exp["shard_enq_bytes"][0] = 7
    stats.add_sent(2, 2 * 1024)  # the pass's Enqueues written: each request its bytes, at least 1 KiB
    stats.add_sent(0, 3 * 1024)
    exp["shard_sent_bytes"][2] = 2 * 1024
    exp["shard_sent_bytes"][0] = 3 * 1024

    stats.add_deq(4, 2, 1, 300)
    exp["deq_bytes"][4, 2] = 300
    exp["deq_items"][4, 2] = 1
    exp["band_deq_bytes"][1, 2] = 300
    exp["band_deq_items"][1, 2] = 1
    stats.add_deq(0, 0, 2, 4, items=2)
    exp["deq_bytes"][0, 0] = 4
    exp["deq_items"][0, 0] = 2
    exp["band_deq_bytes"][2, 0] = 4
    exp["band_deq_items"][2, 0] = 2
    exp["shard_deq_bytes"][2] = 300
    exp["shard_deq_bytes"][0] = 4

    stats.add_outcome(1, 2, 5)
    stats.add_outcome(lay.distributor, 0, 7, n=4)
    exp["outcomes"][1, 2, 5] = 1
    exp["outcomes"][3, 0, 7] = 4
    stats.observe_wait(2, 1, 75.25)
    stats.observe_wait(2, 1, 60.0000004)  # above the last bound (60 s); the µs rounded
    stats.observe_wait(lay.distributor, 2, 0.0)
    stats.observe_no_wait(lay.distributor, 2)  # the idle fast path's: the same as a wait of 0 s
    exp["wait_hist"][2, 1, 16] = 2
    exp["wait_hist"][3, 2, 0] = 2
    exp["wait_us"][2, 1] = 135_250_000
    stats.add_dispatched(0)
    stats.add_dispatched(lay.distributor, 5)
    exp["dispatched"][0] = 1
    exp["dispatched"][3] = 5
    stats.set_heartbeat(1, 123_456_789)
    stats.set_heartbeat(1, 223_456_789)
    exp["heartbeat_ns"][1] = 223_456_789
    stats.begin_write(2)
    stats.end_write(2)
    exp["seq"][2] = 2
    stats.add_reported(1, 3)
    exp["reported"][1] = 3

    snap = stats.snapshot()
    assert snap.consistent
    for name, arr in exp.items():
        if not name.startswith("ckpt_"):  # (the copies are not snapshotted: only a dead shard's are read)
            np.testing.assert_array_equal(snap[name], arr, err_msg=name)
        np.testing.assert_array_equal(getattr(stats, name), arr, err_msg=name)
    assert snap.enq_bytes is snap["enq_bytes"]
    # a snapshot is a copy, not a view
    stats.add_enq(0, 0, 0, 1)
    assert snap.enq_bytes[0, 0] == 7


def test_queued_is_enq_minus_deq() -> None:
    stats = make(f=4, n=3, b=2)
    stats.add_enq(2, 0, 0, 100)
    stats.add_enq(2, 1, 0, 40)
    stats.add_enq(2, 1, 1, 60)
    stats.add_enq(3, 2, 1, 9)
    stats.add_deq(2, 1, 0, 40)
    np.testing.assert_array_equal(stats.queued_bytes(2), [100, 60, 0])
    np.testing.assert_array_equal(stats.queued_items(2), [1, 1, 0])
    np.testing.assert_array_equal(stats.queued_bytes(3), [0, 0, 9])
    np.testing.assert_array_equal(stats.shard_queued_bytes(), [100, 60, 9])
    assert not stats.flow_idle(2) and stats.flow_idle(0)
    stats.add_deq(2, 0, 0, 100)
    stats.add_deq(2, 1, 1, 60)
    assert stats.flow_idle(2)
    np.testing.assert_array_equal(stats.queued_bytes(2), [0, 0, 0])


# ---------------------------------------------------------------------------------------------- JSQ


def test_jsq_picks_fewest_flow_bytes_counting_in_transit() -> None:
    stats = make(f=4, n=4, b=2)
    for shard, nbytes in enumerate([500, 200, 300, 900]):
        stats.add_enq(1, shard, 0, nbytes)  # in transit: no deq yet, still counted
    assert stats.jsq_pick(1, 0) == 1
    assert stats.jsq_pick(1, 7) == 1  # the counter only matters on ties
    stats.add_deq(1, 0, 0, 500)  # shard 0 now holds nothing of flow 1
    assert stats.jsq_pick(1, 0) == 0
    # other flows' bytes do not matter while the flow's own bytes differ
    stats.add_enq(2, 0, 1, 10_000)
    assert stats.jsq_pick(1, 3) == 0


def test_jsq_tie_broken_by_total_shard_bytes() -> None:
    stats = make(f=4, n=3, b=2)
    # flow 0 has nothing anywhere: all three tie on flow bytes
    stats.add_enq(1, 0, 0, 50)
    stats.add_enq(2, 1, 1, 20)  # band 1 counts too: totals are over all bands
    stats.add_enq(3, 2, 0, 30)
    for rr in range(5):
        assert stats.jsq_pick(0, rr) == 1
    # the second level only considers the shards tied at the first level
    stats.add_enq(0, 1, 0, 1)
    for rr in range(5):
        assert stats.jsq_pick(0, rr) == 2


def test_jsq_round_robin_among_full_ties() -> None:
    stats = make(f=3, n=4, b=2)
    assert [stats.jsq_pick(0, rr) for rr in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    # shards 1 and 3 tie at both levels; 0 and 2 carry more total bytes
    stats.add_enq(1, 0, 0, 5)
    stats.add_enq(2, 2, 1, 5)
    picks = [stats.jsq_pick(0, rr) for rr in range(6)]
    assert picks == [1, 3, 1, 3, 1, 3]
    assert Counter(stats.jsq_pick(0, rr) for rr in range(100)) == {1: 50, 3: 50}


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 6),
    b=st.integers(1, 4),
    data=st.data(),
)
def test_jsq_matches_reference(n: int, b: int, data: st.DataObject) -> None:
    stats = make(f=3, n=n, b=b)
    for _ in range(data.draw(st.integers(0, 12))):
        slot, shard, band = data.draw(st.tuples(st.integers(0, 2), st.integers(0, n - 1), st.integers(0, b - 1)))
        nbytes = data.draw(st.integers(0, 3))
        stats.add_enq(slot, shard, band, nbytes)
        stats.add_sent(shard, backlog_bytes(nbytes))  # (the pass ended: it was written to the shard)
        if data.draw(st.booleans()):  # the shard read it (its input backlog shrinks)
            stats.add_taken(shard, backlog_bytes(nbytes))
            if data.draw(st.booleans()):  # it left again: counters equal but not zero (a flow afresh)
                stats.add_deq(slot, shard, band, nbytes)
    rr = data.draw(st.integers(0, 10**6))
    slack = data.draw(st.sampled_from([0, 0, 1, 2, 5]))
    flow_q = (stats.enq_bytes[0] - stats.deq_bytes[0]).tolist()
    total = (stats.band_enq_bytes - stats.band_deq_bytes).sum(axis=0).tolist()
    backlog = (stats.shard_sent_bytes - stats.shard_taken_bytes).tolist()  # sent, not read yet
    level1 = [s for s in range(n) if flow_q[s] == min(flow_q)]
    low = min(total[t] for t in level1)
    if slack and len(level1) > 1:
        least = min(backlog[t] for t in level1)
        expected = min(s for s in level1 if backlog[s] <= least + slack)
    else:
        level2 = [s for s in level1 if total[s] == low]
        expected = level2[rr % len(level2)]
    assert stats.jsq_pick(0, rr, slack) == expected
    if flow_q == [0] * n and (stats.enq_items[0] == stats.deq_items[0]).all():  # the caller may say so: the same
        assert stats.jsq_pick(0, rr, slack, fresh=True) == expected
    assert stats.jsq_pick_among(0, range(n), rr, slack) == expected  # the rule over every shard: the same
    live = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1)))  # over some (the live ones)
    level1 = [s for s in live if flow_q[s] == min(flow_q[t] for t in live)]
    if slack and len(level1) > 1:
        least = min(backlog[t] for t in level1)
        expected = min(s for s in level1 if backlog[s] <= least + slack)
    else:
        low = min(total[t] for t in level1)
        level2 = [s for s in level1 if total[s] == low]
        expected = level2[rr % len(level2)]
    assert stats.jsq_pick_among(0, live, rr, slack) == expected


def test_jsq_slack_packs_new_flows_onto_the_lowest_shard_until_it_falls_slack_bytes_behind() -> None:
    """With a slack, a flow starting afresh goes to the lowest-numbered shard whose input backlog
    (requests sent, not yet read: each its bytes, at least 1 KiB) is within `slack` of the least,
    whatever the round-robin counter: work packs onto shard 0 while it keeps up, and a shard that
    falls `slack` behind its input takes no new flow until it reads. What it has read and queues
    does not count."""
    stats = make(f=8, n=4, b=1)
    slack = 10_000
    assert {stats.jsq_pick(0, rr, slack) for rr in range(8)} == {0}
    def route(slot: int, shard: int, nbytes: int) -> None:  # routed, and its pass written
        stats.add_enq(slot, shard, 0, nbytes)
        stats.add_sent(shard, backlog_bytes(nbytes))

    route(1, 0, 10_000)  # shard 0 exactly `slack` behind: still within it
    assert stats.jsq_pick(0, 5, slack) == 0
    route(2, 0, 0)  # a request of no bytes counts 1 KiB: 11,024 behind, the next within is shard 1
    assert stats.shard_backlog_bytes().tolist() == [11_024, 0, 0, 0]
    assert {stats.jsq_pick(0, rr, slack) for rr in range(8)} == {1}
    route(3, 1, 6_000)
    route(4, 2, 3_000)  # backlogs 11,024, 6,000, 3,000, 0: within 10,000 of 0 -> 1 is the lowest
    assert stats.jsq_pick(0, 0, slack) == 1
    assert stats.jsq_pick(0, 0, 4_000) == 2
    assert stats.jsq_pick(0, 0, 0) == 3  # no slack: exact JSQ-Bytes over queued bytes
    stats.add_taken(0, 10_000 + 1_024)  # shard 0 read its input: it queues 10,000 bytes, and is behind by nothing
    assert stats.shard_backlog_bytes().tolist() == [0, 6_000, 3_000, 0]
    assert {stats.jsq_pick(0, rr, slack) for rr in range(8)} == {0}
    assert stats.jsq_pick(0, 0, 0) == 3  # (exact JSQ-Bytes still counts what it queues)
    # the flow's own bytes still come first: it is where its bytes are fewest, slack or not
    stats.add_enq(0, 0, 0, 0)
    stats.add_enq(0, 1, 0, 5)
    stats.add_enq(0, 2, 0, 5)
    stats.add_enq(0, 3, 0, 5)
    assert stats.jsq_pick(0, 0, 10**9) == 0


# ---------------------------------------------------------------------------------------------- seqlock


def test_snapshot_consistent_when_no_writer_is_busy() -> None:
    stats = make()
    stats.begin_write(0)
    stats.add_deq(1, 0, 0, 0)
    stats.end_write(0)
    calls: list[int] = []
    snap = stats.snapshot(on_retry=calls.append)
    assert snap.consistent and snap.inconsistent_writers == () and calls == []
    np.testing.assert_array_equal(snap.seq, [2, 0, 0, 0])


def test_snapshot_gives_up_on_a_writer_stuck_mid_write() -> None:
    stats = make(n=3)
    stats.begin_write(1)  # e.g. shard 1 died mid-batch: seq stays odd
    assert stats.seq[1] % 2 == 1
    calls: list[int] = []
    snap = stats.snapshot(max_retries=5, on_retry=calls.append)
    assert not snap.consistent
    assert snap.inconsistent_writers == (1,)
    assert calls == [1] * 5
    assert snap.seq[1] % 2 == 1


def test_snapshot_gives_up_on_a_writer_when_the_hook_says_so() -> None:
    """A hook returning True ends that writer's retries: the others still get their first look."""
    stats = make(n=3)
    stats.begin_write(0)
    stats.begin_write(1)
    stats.add_deq(2, 1, 0, 100)
    stats.end_write(1)
    stats.begin_write(1)  # shard 1 finished a batch and started the next: its seq moved and is odd
    calls: list[int] = []

    def spent(writer: int) -> bool:
        calls.append(writer)
        return True

    snap = stats.snapshot(max_retries=5, on_retry=spent)
    assert snap.inconsistent_writers == (0, 1) and calls == [0, 1]
    assert snap.seq[3] == 0  # the distributor's rows: read on their first look


def test_snapshot_retries_until_the_writer_finishes() -> None:
    stats = make(n=3)
    stats.add_enq(2, 1, 0, 100)  # the distributor sent an item to shard 1
    stats.begin_write(1)
    stats.add_deq(2, 1, 0, 100)  # shard 1 is mid-batch: its deq is half-published
    calls: list[int] = []

    def finish(writer: int) -> None:
        calls.append(writer)
        if len(calls) == 3:  # the writer finishes the batch while the reader spins
            stats.add_outcome(1, 0, 2)
            stats.end_write(1)

    snap = stats.snapshot(max_retries=10, on_retry=finish)
    assert snap.consistent
    assert calls == [1, 1, 1]
    assert snap.outcomes[1, 0, 2] == 1 and snap.deq_bytes[2, 1] == 100
    assert snap.seq[1] == 2


def test_snapshot_retries_when_the_writer_moves_during_the_copy() -> None:
    """A whole batch lands between the reader's copies of two arrays: the seq moved, so copy again."""

    class Racy(ShmStats):
        races = 1

        def _writer_cells(self, writer: int) -> Iterator[tuple[str, Any]]:
            for k, cell in enumerate(super()._writer_cells(writer)):
                yield cell  # the reader copies this array now
                if k == 0 and self.races:
                    self.races -= 1
                    self.begin_write(writer)
                    self.add_enq(0, 0, 0, 3)
                    self.end_write(writer)

    layout = ShmLayout(flow_slots=2, shards=1, bands=1)
    stats = Racy(bytearray(layout.nbytes), layout, init=True)
    stats.add_enq(0, 0, 0, 3)
    stats.begin_write(1)  # the distributor is mid-batch when the snapshot starts
    retries: list[int] = []

    def finish(writer: int) -> None:
        if not retries:
            stats.end_write(writer)
        retries.append(writer)

    snap = stats.snapshot(max_retries=5, on_retry=finish)
    assert stats.races == 0
    assert snap.consistent and retries == [1, 1]
    assert snap.enq_bytes[0, 0] == 6 and snap.enq_items[0, 0] == 2  # not 3 bytes with 2 items
    assert snap.seq[1] == 4


def test_snapshot_recopies_the_distributor_after_a_shard_so_queued_never_goes_negative() -> None:
    stats = make(n=2)
    stats.begin_write(0)

    def later(writer: int) -> None:
        # meanwhile the distributor sends a new item and shard 0 already dequeues it
        stats.begin_write(2)
        stats.add_enq(3, 0, 1, 77)
        stats.end_write(2)
        stats.add_deq(3, 0, 1, 77)
        stats.end_write(0)

    snap = stats.snapshot(max_retries=3, on_retry=later)
    assert snap.consistent
    assert snap.deq_bytes[3, 0] == 77
    assert snap.enq_bytes[3, 0] == 77  # the stale first copy of enq (0) was replaced
    rec = stats.reconcile(snap)
    assert rec.balanced and rec.empty, rec.mismatches()


def test_snapshot_never_tears_a_batch_under_a_concurrent_writer() -> None:
    """A thread writes batches keeping bytes == 3 * items; every consistent snapshot must see that."""
    stats = make(f=2, n=1, b=1)
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            stats.begin_write(1)
            stats.add_enq(0, 0, 0, 3)
            stats.add_dispatched(1)
            stats.end_write(1)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    consistent = 0
    try:
        for _ in range(3000):
            snap = stats.snapshot(max_retries=100_000)
            if not snap.consistent:
                continue
            consistent += 1
            items = snap.enq_items[0, 0]
            assert snap.enq_bytes[0, 0] == 3 * items
            assert snap.band_enq_bytes[0, 0] == 3 * items and snap.band_enq_items[0, 0] == items
            assert snap.dispatched[1] == items
            assert snap.seq[1] % 2 == 0
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)
    assert consistent > 0


# ---------------------------------------------------------------------------------------------- reset


def test_reset_shard_zeroes_only_that_shards_queued_counts() -> None:
    stats = make(f=4, n=3, b=2)
    for slot in range(4):
        for shard in range(3):
            stats.add_enq(slot, shard, slot % 2, 10 * (slot + 1) + shard)
            stats.add_sent(shard, backlog_bytes(10 * (slot + 1) + shard))
    stats.add_deq(0, 1, 0, 10)
    stats.add_deq(1, 0, 1, 20)
    stats.add_outcome(1, 0, 0)
    before = stats.snapshot()
    stats.begin_write(1)  # shard 1 died mid-batch

    stats.reset_shard(1)

    after = stats.snapshot()
    assert after.consistent and after.seq[1] % 2 == 0 and after.seq[1] > before.seq[1]
    rec = stats.reconcile(after)
    assert not rec.flow_shard_bytes[:, 1].any() and not rec.flow_shard_items[:, 1].any()
    assert not rec.band_shard_bytes[:, 1].any() and not rec.band_shard_items[:, 1].any()
    for name in ("deq_bytes", "deq_items", "band_deq_bytes", "band_deq_items"):
        np.testing.assert_array_equal(after[name][:, [0, 2]], before[name][:, [0, 2]], err_msg=name)
    np.testing.assert_array_equal(after.shard_deq_bytes[[0, 2]], before.shard_deq_bytes[[0, 2]])
    assert after.shard_deq_bytes[1] == after.shard_enq_bytes[1]
    # what was in transit to it is lost with it: its input backlog is gone too, the others' kept
    assert after.shard_taken_bytes.tolist() == [0, int(after.shard_sent_bytes[1]), 0]
    assert stats.shard_backlog_bytes().tolist()[1] == 0
    for name in ("enq_bytes", "enq_items", "band_enq_bytes", "band_enq_items", "shard_enq_bytes", "outcomes",
                 "dispatched"):
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    np.testing.assert_array_equal(stats.queued_bytes(0), [10, 0, 12])
    assert rec.balanced, rec.mismatches()

    # the restarted shard keeps counting from there
    stats.add_enq(2, 1, 0, 5)
    stats.add_deq(2, 1, 0, 5)
    assert stats.reconcile().flow_shard_bytes[2, 1] == 0
    with pytest.raises(IndexError):
        stats.reset_shard(3)


# ---------------------------------------------------------------------------------------------- reconcile


def test_reconcile_reports_a_table_that_disagrees() -> None:
    stats = make(f=3, n=2, b=2)
    stats.add_enq(0, 0, 0, 10)
    assert stats.reconcile().balanced
    stats.enq_bytes[1, 1] += 4  # a flow-table write with no band-table write
    rec = stats.reconcile()
    assert not rec.balanced and not rec.empty
    assert any("per-shard bytes" in m for m in rec.mismatches())
    stats.deq_items[2, 0] += 1  # a deq without an enq: negative queued
    assert any("negative" in m for m in stats.reconcile().mismatches())



def test_reconcile_reports_per_shard_totals_that_drift_from_the_band_table() -> None:
    """JSQ-Bytes's tie-break reads the per-shard totals; a write to them alone is caught."""
    stats = make(f=3, n=2, b=2)
    stats.add_enq(0, 1, 1, 10)
    stats.add_deq(0, 1, 1, 4)
    rec = stats.reconcile()
    assert rec.balanced and rec.shard_total_bytes.tolist() == [0, 6], rec.mismatches()
    stats.shard_deq_bytes[1] += 1
    assert stats.reconcile().mismatches() == ["per-shard bytes: totals [0, 5] != band table [0, 6]"]


_op = st.one_of(
    st.tuples(st.just("enq"), st.integers(0, 4), st.integers(0, 2), st.integers(0, 2), st.integers(0, 5000)),
    st.tuples(st.just("deq"), st.integers(0, 10**6)),
    st.tuples(st.just("reset"), st.integers(0, 2)),
)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(_op, max_size=80))
def test_reconcile_matches_a_python_model(ops: list[tuple[object, ...]]) -> None:
    stats = make(f=5, n=3, b=3)
    queued: list[tuple[int, int, int, int]] = []  # (slot, shard, band, nbytes) held by the shards
    for op in ops:
        if op[0] == "enq":
            _, slot, shard, band, nbytes = op
            assert isinstance(slot, int) and isinstance(shard, int)
            assert isinstance(band, int) and isinstance(nbytes, int)
            stats.add_enq(slot, shard, band, nbytes)
            queued.append((slot, shard, band, nbytes))
        elif op[0] == "deq" and queued:
            assert isinstance(op[1], int)
            slot, shard, band, nbytes = queued.pop(op[1] % len(queued))
            stats.begin_write(shard)
            stats.add_deq(slot, shard, band, nbytes)
            stats.end_write(shard)
        elif op[0] == "reset":
            assert isinstance(op[1], int)
            stats.reset_shard(op[1])
            queued = [it for it in queued if it[1] != op[1]]

    rec = stats.reconcile()
    assert rec.balanced, rec.mismatches()
    assert rec.empty == (not queued)

    def total(key: int, size: int, what: str) -> list[int]:
        out = [0] * size
        for it in queued:
            out[it[key]] += it[3] if what == "bytes" else 1
        return out

    assert rec.flow_bytes.tolist() == total(0, 5, "bytes")
    assert rec.flow_items.tolist() == total(0, 5, "items")
    assert rec.shard_bytes.tolist() == total(1, 3, "bytes")
    assert rec.shard_items.tolist() == total(1, 3, "items")
    assert rec.band_bytes.tolist() == total(2, 3, "bytes")
    assert rec.band_items.tolist() == total(2, 3, "items")
    assert rec.global_bytes == sum(it[3] for it in queued)
    assert rec.global_items == len(queued)
    for slot in range(5):
        want = [sum(it[3] for it in queued if it[0] == slot and it[1] == s) for s in range(3)]
        assert stats.queued_bytes(slot).tolist() == want


# ---------------------------------------------------------------------------------------------- processes


def _child_dequeues(name: str, shard: int, count: int, nbytes: int) -> None:
    """A worker: attach by name, read the layout from the header, count dequeues as shard ``shard``."""
    shm = shared_memory.SharedMemory(name=name)
    # multiprocessing children share the parent's resource tracker, where the name is already
    # registered once; a worker started any other way must unregister it (DESIGN.md §5).
    try:
        assert shm.buf is not None
        stats = ShmStats(shm.buf)
        for i in range(count):
            stats.begin_write(shard)
            stats.add_deq(i % stats.layout.flow_slots, shard, i % stats.layout.bands, nbytes)
            stats.add_outcome(shard, i % stats.layout.bands, 0)
            stats.end_write(shard)
        stats.set_heartbeat(shard, 42)
        stats.close()
    finally:
        shm.close()


def test_counters_cross_processes_through_real_shared_memory() -> None:
    layout = ShmLayout(flow_slots=4, shards=2, bands=3)
    shm = shared_memory.SharedMemory(create=True, size=layout.nbytes)
    name = shm.name
    try:
        assert shm.buf is not None
        stats = ShmStats(shm.buf, layout, init=True)
        count, nbytes = 50, 11
        for i in range(count):
            stats.add_enq(i % 4, 1, i % 3, nbytes)
        assert stats.reconcile().global_bytes == count * nbytes

        ctx = multiprocessing.get_context("spawn")
        child = ctx.Process(target=_child_dequeues, args=(name, 1, count, nbytes))
        child.start()
        child.join(timeout=120)
        assert child.exitcode == 0

        snap = stats.snapshot()
        assert snap.consistent and snap.seq[1] == 2 * count
        assert snap.deq_items[:, 1].sum() == count
        assert snap.deq_bytes[:, 1].sum() == count * nbytes
        assert not snap.deq_items[:, 0].any()
        assert snap.outcomes[1, :, 0].sum() == count and snap.heartbeat_ns[1] == 42
        rec = stats.reconcile(snap)
        assert rec.balanced and rec.empty, rec.mismatches()
        stats.close()
    finally:
        shm.close()  # raises BufferError if ShmStats still pinned the buffer
        shm.unlink()
    if os.path.isdir("/dev/shm"):
        assert not os.path.exists(os.path.join("/dev/shm", name.lstrip("/")))


def test_a_routed_request_is_input_backlog_only_once_its_pass_is_written() -> None:
    """`add_enq` counts a request queued on its shard; its input backlog grows when the distributor
    writes the pass's Enqueues (`add_sent`), as the shard takes them (`add_taken`)."""
    stats = make(f=2, n=2, b=1)
    stats.add_enq(0, 1, 0, 5_000)
    assert stats.shard_backlog_bytes().tolist() == [0, 0] and stats.shard_enq_bytes.tolist() == [0, 5_000]
    stats.add_sent(1, backlog_bytes(5_000))
    assert stats.shard_backlog_bytes().tolist() == [0, 5_000]
    stats.add_taken(1, backlog_bytes(5_000))
    assert stats.shard_backlog_bytes().tolist() == [0, 0]


def test_snapshots_leave_no_memory_behind() -> None:
    """Review 144: each snapshot (a /metrics or /v1/stats read) built a 20-tuple of array names, which
    CPython 3.11-3.12 parks on its tuple free list and never reuses (gh-121439), up to 2,000 of them:
    ~400 kB of a long-running distributor's memory. 3,000 snapshots now leave (almost) nothing."""
    import tracemalloc

    stats = make()
    stats.snapshot()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(3000):
            stats.snapshot()
        grown = sum(d.size_diff for d in tracemalloc.take_snapshot().compare_to(before, "filename")
                    if d.traceback[0].filename.endswith("shm.py"))
    finally:
        tracemalloc.stop()
    assert grown < 50_000, grown
