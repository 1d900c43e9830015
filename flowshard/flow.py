"""A flow's queue inside one band, with the counters its fairness policy and the statistics need."""

from __future__ import annotations

from flowshard.queues import ItemQueue
from flowshard.stats import WAIT_BUCKETS
from flowshard.types import N_OUTCOMES


class FlowQueue:
    """The requests of one flow (tenant, workload) in one priority band.

    Counters are monotonic enqueue/dequeue pairs, as in the shared-memory layout: queued = enq - deq.
    `deficit` (DRR) and `vtc`/`stamp` (VTC) belong to the band's fairness policy.
    """

    __slots__ = (
        "band",
        "deficit",
        "deq_bytes",
        "deq_items",
        "enq_bytes",
        "enq_items",
        "id",
        "outcomes",
        "queue",
        "stamp",
        "vtc",
        "wait_hist",
        "weight",
    )

    def __init__(self, flow_id: str, band: int, queue: ItemQueue, weight: float) -> None:
        self.id = flow_id
        self.band = band
        self.queue = queue
        self.weight = weight
        self.enq_items = 0
        self.enq_bytes = 0
        self.deq_items = 0
        self.deq_bytes = 0
        self.outcomes = [0] * N_OUTCOMES
        self.wait_hist = [0] * (len(WAIT_BUCKETS) + 1)
        self.deficit = 0.0
        self.vtc = 0.0
        self.stamp = 0

    @property
    def queued_items(self) -> int:
        return self.enq_items - self.deq_items

    @property
    def queued_bytes(self) -> int:
        return self.enq_bytes - self.deq_bytes

    def __repr__(self) -> str:
        return f"FlowQueue({self.id!r}, band={self.band}, queued={self.queued_items})"
