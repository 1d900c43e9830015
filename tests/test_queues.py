"""Item queues (FIFO, heap) and the ordering policies that key them, alone and against a model."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowshard.flow import FlowQueue
from flowshard.queues import ORDERINGS, EarliestDeadline, Fcfs, FifoQueue, HeapQueue, SloDeadline
from flowshard.types import Item, ItemState, Request

DONE = ItemState.DONE


def make_item(queue, seq: int, key: float | None = None, size: int = 1) -> Item:
    flow = FlowQueue("f", 0, queue, 1.0)
    return Item(Request(seq, "f", size=size), flow, 0, seq, float(seq) if key is None else key, 0.0, math.inf, size)


def kill(queue, item: Item) -> None:
    """What the engine does when an item leaves from the middle: mark it done, then discard()."""
    item.state = DONE
    queue.discard()


# --------------------------------------------------------------------------- orderings


def test_ordering_registry_names():
    assert set(ORDERINGS) == {"fcfs", "edf", "slo-deadline"}
    for name, cls in ORDERINGS.items():
        assert cls.name == name


def test_fcfs_keys_by_arrival_sequence_and_uses_a_fifo():
    assert Fcfs.key(Request(1, "f", ttl=5, slo=1), 7, 100.0, 105.0) == 7.0
    assert isinstance(Fcfs.new_queue(), FifoQueue)


def test_edf_keys_by_absolute_deadline_and_uses_a_heap():
    assert EarliestDeadline.key(Request(1, "f"), 3, 10.0, 12.5) == 12.5
    assert EarliestDeadline.key(Request(1, "f"), 3, 10.0, math.inf) == math.inf
    assert isinstance(EarliestDeadline.new_queue(), HeapQueue)


def test_slo_deadline_keys_by_received_time_plus_slo_and_no_slo_last():
    assert SloDeadline.key(Request(1, "f", slo=0.25), 3, 10.0, 99.0) == 10.25
    assert SloDeadline.key(Request(1, "f"), 3, 10.0, 99.0) == math.inf
    assert isinstance(SloDeadline.new_queue(), HeapQueue)


def test_new_queue_returns_a_fresh_queue_each_time():
    for cls in ORDERINGS.values():
        assert cls.new_queue() is not cls.new_queue()


# --------------------------------------------------------------------------- FIFO


def test_fifo_serves_in_push_order():
    q = FifoQueue()
    assert q.peek() is None and q.live == 0 and q.items() == []
    items = [make_item(q, s) for s in range(5)]
    for i in items:
        q.push(i)
    assert q.live == 5 and q.items() == items
    out = []
    while q.peek() is not None:
        head = q.peek()
        assert q.pop() is head
        out.append(head)
    assert out == items and q.live == 0


def test_fifo_skips_items_marked_done():
    q = FifoQueue()
    items = [make_item(q, s) for s in range(4)]
    for i in items:
        q.push(i)
    kill(q, items[0])
    kill(q, items[2])
    assert q.live == 2
    assert q.items() == [items[1], items[3]]
    assert q.peek() is items[1]
    assert q.pop() is items[1]
    assert q.peek() is items[3]
    kill(q, items[3])
    assert q.peek() is None and q.live == 0 and q.items() == []


def test_fifo_compacts_when_dead_items_outnumber_live_ones():
    q = FifoQueue()
    items = [make_item(q, s) for s in range(300)]
    for i in items:
        q.push(i)
    for i in items[1:-1:2] + items[2:200:2]:  # from the middle, never the head
        kill(q, i)
    live = [i for i in items if i.state != DONE]
    assert q.live == len(live) and q.items() == live
    assert len(q._q) <= q.live + 65, "dead items are not held once they outnumber live ones"
    assert q._dead == len(q._q) - q.live
    assert q.peek() is items[0]


# --------------------------------------------------------------------------- heap


def test_heap_serves_smallest_key_then_sequence():
    q = HeapQueue()
    spec = [(0, 5.0), (1, 1.0), (2, 5.0), (3, math.inf), (4, 1.0), (5, 0.5)]
    items = {s: make_item(q, s, key) for s, key in spec}
    for item in items.values():
        q.push(item)
    order = []
    while q.peek() is not None:
        order.append(q.pop().seq)
    assert order == [5, 1, 4, 0, 2, 3]


def test_heap_skips_done_items_and_compacts():
    q = HeapQueue()
    items = [make_item(q, s, key=float(300 - s)) for s in range(300)]
    for i in items:
        q.push(i)
    for i in items[:250]:  # the largest keys: never the head until the end
        kill(q, i)
    assert q.live == 50
    assert len(q._h) <= q.live + 65
    assert q._dead == len(q._h) - q.live
    assert sorted(q.items(), key=lambda i: i.seq) == items[250:]
    assert q.peek() is items[-1]
    kill(q, items[-1])
    assert q.peek() is items[-2]


# --------------------------------------------------------------------------- model-based


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 5)),
        st.tuples(st.just("pop"), st.just(0)),
        st.tuples(st.just("kill"), st.integers(0, 1000)),
    ),
    max_size=250,
)


@pytest.mark.parametrize("queue_cls", [FifoQueue, HeapQueue])
@settings(max_examples=60, deadline=None)
@given(ops=_ops)
def test_queue_matches_a_sorted_list_model(queue_cls, ops):
    q = queue_cls()
    model: list[Item] = []  # live items in service order
    seq = 0

    def order(item: Item):
        return item.seq if queue_cls is FifoQueue else (item.key, item.seq)

    for op, arg in ops:
        if op == "push":
            item = make_item(q, seq, key=float(arg))
            seq += 1
            q.push(item)
            model.append(item)
            model.sort(key=order)
        elif op == "pop" and model:
            assert q.peek() is model[0]
            assert q.pop() is model.pop(0)
        elif op == "kill" and model:
            victim = model.pop(arg % len(model))
            kill(q, victim)
        assert q.live == len(model)
        assert q.peek() is (model[0] if model else None)
        assert sorted(q.items(), key=order) == model
        storage = q._q if queue_cls is FifoQueue else q._h
        assert q._dead == len(storage) - q.live, "the dead count matches what the storage holds"
        if op == "kill":
            # discard() compacts once the dead outnumber the live (and exceed 64). Pops do not
            # compact, so between discards dead items behind the head may outnumber live ones.
            assert len(storage) <= 2 * q.live + 65, "dead items are compacted away"
