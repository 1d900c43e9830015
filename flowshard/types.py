"""Requests, queued items and outcomes: the vocabulary every other module speaks."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from flowshard.flow import FlowQueue


class Outcome(enum.IntEnum):
    """The final outcome of a request. Values index statistics arrays; names are stable label values."""

    DISPATCHED = 0
    REJECTED_CAPACITY = 1
    REJECTED_SHUTTING_DOWN = 2
    EVICTED_TTL = 3
    EVICTED_CANCELLED = 4
    EVICTED_DISPLACED = 5
    EVICTED_SHARD_FAILURE = 6
    EVICTED_SHUTDOWN = 7

    @property
    def status(self) -> str:
        """`dispatched`, `rejected` or `evicted`."""
        return _STATUS[self]

    @property
    def reason(self) -> str:
        """The reason label (`capacity`, `ttl`, ...); empty for `dispatched`."""
        return _REASON[self]

    @property
    def label(self) -> str:
        """`status` or `status:reason`, the form used in tables and JSON."""
        return self.status if self is Outcome.DISPATCHED else f"{self.status}:{self.reason}"


_STATUS = {o: o.name.split("_", 1)[0].lower() for o in Outcome}
_REASON = {o: (o.name.split("_", 1)[1].lower() if "_" in o.name else "") for o in Outcome}
N_OUTCOMES = len(Outcome)
OUTCOMES = tuple(Outcome)  # OUTCOMES[value]: a tuple index costs a fraction of `Outcome(value)` (hot paths)
assert all(o.value == i for i, o in enumerate(OUTCOMES))


class Request(msgspec.Struct, frozen=True, gc=False):
    """What a client asks to admit. Validated at the boundary before it reaches the engine.

    `ttl` and `slo` are seconds (0: use the configured default TTL / no SLO). `weight` 0 means
    "use the flow's configured weight" (a flow has its latest request's weight). `tokens` 0 means "not
    declared".
    """

    id: int
    flow: str
    priority: int = 0
    size: int = 0
    ttl: float = 0.0
    slo: float = 0.0
    tokens: int = 0
    weight: float = 0.0


class ItemState(enum.IntEnum):
    QUEUED = 0
    DONE = 1


class Item(msgspec.Struct, gc=False):
    """A queued request with the engine's bookkeeping.

    `key` orders items within a flow (and across flows under global FCFS); `seq` breaks ties and
    makes every key unique. `prev`/`next` thread the item through its band's arrival-order list so
    displacement can take the newest item and any exit can unlink it in O(1).
    """

    request: Request
    flow: FlowQueue
    band: int  # band index, 0 = highest priority
    seq: int
    key: float
    enqueued_at: float
    deadline: float  # absolute expiry time; inf when the request has no TTL
    cost: int  # what fairness charges: declared tokens, else bytes
    state: int = ItemState.QUEUED
    outcome: int = -1  # an Outcome once final
    finished_at: float = 0.0
    prev: Item | None = None
    next: Item | None = None

    @property
    def id(self) -> int:
        return self.request.id

    @property
    def size(self) -> int:
        return self.request.size

    @property
    def wait(self) -> float:
        """Seconds from enqueue to the final outcome."""
        return self.finished_at - self.enqueued_at
