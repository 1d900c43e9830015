"""Adaptive Retry-After (APF-style) and the flow-slot table, on a fake clock."""

from __future__ import annotations

import itertools

from flowshard.retry import MAX_RETRY_AFTER, MIN_RETRY_AFTER, RetryAfter
from flowshard.slots import SlotTable


def reject_at_rate(retry: RetryAfter, start: float, seconds: float, per_second: int) -> float:
    now = start
    for _ in range(int(seconds * per_second)):
        now += 1.0 / per_second
        retry.rejected(now)
    return now


def test_retry_after_starts_at_one_second_and_stays_there_under_light_rejection():
    retry = RetryAfter()
    assert retry.value == MIN_RETRY_AFTER
    now = reject_at_rate(retry, 0.0, 10.0, 2)  # 2/s < 3 x 1 s: not sustained
    assert retry.value == 1
    assert retry.tick(now) == 1


def test_retry_after_doubles_under_sustained_rejection_up_to_the_cap():
    retry = RetryAfter()
    now = 0.0
    seen = []
    for _ in range(12):
        now = reject_at_rate(retry, now, float(retry.value), 1000)
        seen.append(retry.value)
    assert seen[:5] == [2, 4, 8, 16, 32], seen
    assert max(seen) == MAX_RETRY_AFTER and retry.value == MAX_RETRY_AFTER


def test_retry_after_doubles_at_most_once_per_its_own_period():
    retry = RetryAfter()
    reject_at_rate(retry, 0.0, 0.5, 10_000)  # 5,000 rejections in half a second
    assert retry.value == 2, "one bump, then it must wait `value` seconds before the next"


def test_retry_after_relaxes_by_one_second_per_quiet_period():
    retry = RetryAfter()
    now = 0.0
    while retry.value < 8:
        now = reject_at_rate(retry, now, float(retry.value), 1000)
    values = []
    for _ in range(40):  # quiet: ticks only, once a second
        now += 1.0
        values.append(retry.tick(now))
    assert values[-1] == MIN_RETRY_AFTER
    steps = [a - b for a, b in itertools.pairwise(values)]
    assert set(steps) <= {0, 1}, "relaxes one second at a time, never jumps"
    assert values.index(MIN_RETRY_AFTER) > 7 - 1, "needs one quiet period per step"


def test_slot_table_reuses_idle_slots_and_shares_when_full():
    table = SlotTable(slots=2, gc_timeout=10.0)
    a = table.slot("a", 0.0)
    b = table.slot("b", 0.0)
    assert {a, b} == {0, 1} and table.slot("a", 1.0) == a, "a flow keeps its slot"
    shared = table.slot("c", 2.0)
    assert shared in (0, 1) and table.shared == 1, "full: a shared slot by hash, counted"
    assert table.slot("c", 2.5) == shared, "the hash is stable"
    assert len(table) == 2
    busy = {"a"}
    assert table.collect(5.0, busy.__contains__) == 0, "nothing idle for gc_timeout yet"
    assert table.collect(11.5, busy.__contains__) == 1, "b is idle past the timeout; a is busy"
    assert table.slot("d", 12.0) == b, "b's slot went to the next new flow"
    assert table.collect(100.0, lambda flow: False) == 2
    assert len(table) == 0


def test_slot_table_sweeps_a_full_table_over_several_calls():
    """Each collection looks at `SWEEP` flows at most (a full table walked whole every 0.25 s cost an
    idle distributor 0.6 % of a core); every idle flow is freed once the sweep has reached it."""
    from flowshard.slots import SWEEP

    n = 2 * SWEEP + 10
    table = SlotTable(slots=n, gc_timeout=10.0)
    for i in range(n):
        table.slot(f"f{i}", 0.0)
    freed = [table.collect(20.0, lambda flow: flow == "f0") for _ in range(3)]
    assert freed == [SWEEP, SWEEP, 9] and len(table) == 1  # f0 holds work: kept
    assert table.collect(21.0, lambda flow: False) == 1 and len(table) == 0  # a new sweep
