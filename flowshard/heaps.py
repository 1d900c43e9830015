"""Heaps with lazily deleted entries: the one rule for when to drop the stale ones.

Why here: several heaps (vtc's counters, global-fcfs's heads, the reference's finish times) push a
new entry when a key changes and leave the old one to be skipped when popped. An entry above every
live key is never popped, so each such heap would grow for good without a compaction; this module
is the one place that says when it is due and how it is done.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, TypeVar

if TYPE_CHECKING:
    from _typeshed import SupportsRichComparison

__all__ = ["COMPACT_SLACK", "compacted"]

# Stale entries tolerated beyond the live ones' count before a compaction: a heap of a few entries is
# not rebuilt on every push (the compaction is O(n), so amortised O(1) a push once it is due)
COMPACT_SLACK: Final = 64

_Entry = TypeVar("_Entry", bound="SupportsRichComparison")


def compacted(heap: list[_Entry], live: int, keep: Callable[[_Entry], bool]) -> list[_Entry]:
    """`heap`, or once its stale entries outnumber the `live` ones (by `COMPACT_SLACK`), a new heap of
    the entries `keep` accepts."""
    if len(heap) <= 2 * live + COMPACT_SLACK:
        return heap
    kept = [entry for entry in heap if keep(entry)]
    heapq.heapify(kept)
    return kept
