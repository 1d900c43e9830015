"""A flow's queue inside one band, with the counters its fairness policy and the statistics need."""

from __future__ import annotations

from flowshard.queues import ItemQueue


class FlowQueue:
    """The requests of one flow (tenant, workload) in one priority band.

    `queued_items`/`queued_bytes` are what it holds now: two plain counters (the monotonic
    enqueue/dequeue pairs live in the shared-memory layout, not here), so a request touches two
    fields of the flow and no per-flow list. Outcomes and wait histograms are kept per band.
    `deficit` (DRR) and `vtc`/`stamp`/`lead`/`lag`/`shifted` (VTC) belong to the band's fairness policy.
    """

    __slots__ = (
        "band",
        "born",
        "configured",
        "deficit",
        "id",
        "lag",
        "lead",
        "queue",
        "queued_bytes",
        "queued_items",
        "shifted",
        "since",
        "stamp",
        "vtc",
        "weight",
    )

    def __init__(self, flow_id: str, band: int, queue: ItemQueue, weight: float) -> None:
        self.id = flow_id
        self.band = band
        self.queue = queue
        self.weight = weight
        self.configured = weight  # `[weights]`, else 1: the weight of a request that gives none (0)
        self.queued_items = 0
        self.queued_bytes = 0
        self.deficit = 0.0
        self.vtc = 0.0
        self.stamp = 0
        self.since = 0  # the engine's seq of the request that last made it backlogged
        self.born = 0  # the engine's seq when this queue was made (the flow was new, or forgotten before)
        self.lead = 0.0  # VTC: its counter less the lift point at its return (< 0: the lag it kept; `correct`)
        self.lag = 0.0  # VTC: how far it stood behind the least backlogged counter when it last emptied
        self.shifted = 0  # VTC: its policy's re-base total its counter is measured from (`VirtualTokenCounter._rebase`)

    def __repr__(self) -> str:
        return f"FlowQueue({self.id!r}, band={self.band}, queued={self.queued_items})"
