"""Per-flow queues and the ordering policies that key them.

An ordering policy is a key function: the queue serves the item with the smallest `(key, seq)`.
FCFS keys by arrival sequence, so a plain deque serves it in O(1); deadline orderings need a heap.

Items leave a queue from the middle (cancel, TTL, displacement) by being marked done; the queue
skips done items when it reaches them and compacts itself once they outnumber the live ones, so
every operation stays O(1) or O(log n) amortised and no dead item is held for long. A queue whose
last live item leaves drops every dead one at once: an item points back at its flow, so a dead item
left in an idle flow's queue would keep that flow (and, `gc=False`, itself) alive for good.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import ClassVar, Protocol

from flowshard.types import Item, ItemState, Request

_DONE = ItemState.DONE
_COMPACT_MIN = 64


class Ordering(Protocol):
    """Within-flow ordering: how an item's key is derived, and which queue serves it."""

    name: ClassVar[str]

    @staticmethod
    def key(request: Request, seq: int, arrived: float, deadline: float) -> float:
        """The item's key; `arrived`: when the request reached the service, `deadline`: its TTL expiry."""

    @staticmethod
    def new_queue() -> ItemQueue: ...


class ItemQueue(Protocol):
    live: int

    def push(self, item: Item) -> None: ...
    def peek(self) -> Item | None: ...
    def pop(self) -> Item: ...
    def discard(self) -> None: ...
    def items(self) -> list[Item]: ...


class FifoQueue:
    """Arrival order. `discard()` is called after an item in the queue was marked done elsewhere."""

    __slots__ = ("_dead", "_q", "live")

    def __init__(self) -> None:
        self._q: deque[Item] = deque()
        self.live = 0
        self._dead = 0

    def push(self, item: Item) -> None:
        self._q.append(item)
        self.live += 1

    def peek(self) -> Item | None:
        q = self._q
        while q:
            head = q[0]
            if head.state != _DONE:
                return head
            q.popleft()
            self._dead -= 1
        return None

    def pop(self) -> Item:
        """Remove and return the head; the caller has just peeked it (so it is live)."""
        self.live -= 1
        head = self._q.popleft()
        if not self.live:
            self._q.clear()  # dead items behind the head: see the module docstring
            self._dead = 0
        return head

    def discard(self) -> None:
        self.live -= 1
        self._dead += 1
        if not self.live:
            self._q.clear()
            self._dead = 0
        elif self._dead > _COMPACT_MIN and self._dead > self.live:
            self._q = deque(i for i in self._q if i.state != _DONE)
            self._dead = 0

    def items(self) -> list[Item]:
        return [i for i in self._q if i.state != _DONE]


class HeapQueue:
    """Smallest `(key, seq)` first, for deadline orderings."""

    __slots__ = ("_dead", "_h", "live")

    def __init__(self) -> None:
        self._h: list[tuple[float, int, Item]] = []
        self.live = 0
        self._dead = 0

    def push(self, item: Item) -> None:
        heapq.heappush(self._h, (item.key, item.seq, item))
        self.live += 1

    def peek(self) -> Item | None:
        h = self._h
        while h:
            head = h[0][2]
            if head.state != _DONE:
                return head
            heapq.heappop(h)
            self._dead -= 1
        return None

    def pop(self) -> Item:
        self.live -= 1
        head = heapq.heappop(self._h)[2]
        if not self.live:
            self._h.clear()
            self._dead = 0
        return head

    def discard(self) -> None:
        self.live -= 1
        self._dead += 1
        if not self.live:
            self._h.clear()
            self._dead = 0
        elif self._dead > _COMPACT_MIN and self._dead > self.live:
            self._h = [e for e in self._h if e[2].state != _DONE]
            heapq.heapify(self._h)
            self._dead = 0

    def items(self) -> list[Item]:
        return [e[2] for e in self._h if e[2].state != _DONE]


class Fcfs:
    """First come, first served: exact arrival order at this engine."""

    name: ClassVar[str] = "fcfs"

    @staticmethod
    def key(request: Request, seq: int, arrived: float, deadline: float) -> float:
        return float(seq)

    @staticmethod
    def new_queue() -> ItemQueue:
        return FifoQueue()


class EarliestDeadline:
    """Earliest deadline first, deadline = arrival at the service + TTL; no TTL sorts last (then FCFS)."""

    name: ClassVar[str] = "edf"

    @staticmethod
    def key(request: Request, seq: int, arrived: float, deadline: float) -> float:
        return deadline

    @staticmethod
    def new_queue() -> ItemQueue:
        return HeapQueue()


class SloDeadline:
    """Earliest SLO deadline first, deadline = arrival at the service + the request's SLO (e.g. target TTFT).

    Requests without an SLO sort after every request with one, in arrival order.
    """

    name: ClassVar[str] = "slo-deadline"

    @staticmethod
    def key(request: Request, seq: int, arrived: float, deadline: float) -> float:
        return arrived + request.slo if request.slo > 0 else math.inf

    @staticmethod
    def new_queue() -> ItemQueue:
        return HeapQueue()


ORDERINGS: dict[str, type[Fcfs] | type[EarliestDeadline] | type[SloDeadline]] = {
    cls.name: cls for cls in (Fcfs, EarliestDeadline, SloDeadline)
}
