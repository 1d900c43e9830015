"""The flow-id -> shared-memory slot table, owned by the distributor.

Shared memory has a fixed number of flow slots. A flow keeps its slot while it has work and for
`gc_timeout` seconds after; then the slot is free for another flow (its counters are balanced, so
queued = enq - deq stays right for the next owner). When every slot is taken, a new flow shares a
slot chosen by a stable hash: routing for it becomes approximate, limits stay exact (those are
the ledger's), and nothing is rejected for want of a slot.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

# the flows one `collect` call looks at: a full table is swept over several calls (the distributor's
# housekeeping, every 0.25 s), not copied and walked whole each time (0.6 % of an idle core with the
# default 16,384 slots taken, a soak review)
SWEEP = 2048


class SlotTable:
    def __init__(self, slots: int, gc_timeout: float) -> None:
        self.slots = slots
        self.gc_timeout = gc_timeout
        # (public: the distributor reads them inline in its admission, `slot`'s common case)
        self.slot_of: dict[str, int] = {}
        self.last_used: dict[str, float] = {}
        self._free = list(range(slots - 1, -1, -1))
        self.shared = 0  # routings that used a shared (hashed) slot because the table was full
        self._sweep: list[str] = []  # the flows `collect` has still to look at in this sweep

    def slot(self, flow: str, now: float) -> int:
        slot = self.slot_of.get(flow)
        if slot is None:
            if not self._free:
                self.shared += 1
                return zlib.crc32(flow.encode()) % self.slots
            slot = self.slot_of[flow] = self._free.pop()
        self.last_used[flow] = now
        return slot

    def collect(self, now: float, busy: Callable[[str], bool]) -> int:
        """Free the slots of flows unused for `gc_timeout` that hold no work. Periodic: each call looks at
        the next `SWEEP` flows of a sweep over the table (a new sweep starts where one ends), so a
        slot is freed within `gc_timeout` plus one or two sweeps' calls (two when it was looked at just
        before its timeout and comes last in the next sweep)."""
        if not self._sweep:
            self._sweep = list(self.last_used)
        sweep, last_used = self._sweep, self.last_used
        freed = 0
        for _ in range(min(SWEEP, len(sweep))):
            flow = sweep.pop()
            last = last_used.get(flow)
            if last is not None and now - last >= self.gc_timeout and not busy(flow):
                del last_used[flow]
                self._free.append(self.slot_of.pop(flow))
                freed += 1
        return freed

    def __len__(self) -> int:
        return len(self.slot_of)
