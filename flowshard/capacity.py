"""The admission rule for queued capacity, shared by the engine and the distributor's ledger.

Limits apply per flow (within its band), per band and globally, in bytes and in requests.
Displacement of lower-band work can only make room under the *global* limit: evicting another
band's requests frees nothing in this band or this flow.
"""

from __future__ import annotations

from typing import Protocol


class Usage(Protocol):
    @property
    def queued_bytes(self) -> int: ...
    @property
    def queued_items(self) -> int: ...


class BandUsage(Usage, Protocol):
    max_bytes: float
    max_items: float
    flow_max_bytes: float
    flow_max_items: float


NOTHING_HELD = (0, 0)


def shortfall(
    size: int, flow: Usage, band: BandUsage, total: Usage, max_bytes: float, max_items: float,
    band_held: tuple[int, int] = NOTHING_HELD, flow_held: tuple[int, int] = NOTHING_HELD,
) -> tuple[float, float] | None:
    """What must be freed globally to queue a request of `size` bytes.

    None: the request exceeds its flow's or its band's limit (nothing to displace can help).
    Otherwise (bytes, requests) still missing under the global limits; both <= 0 means it fits.
    `band_held`/`flow_held`: (bytes, requests) of the band and flow held for requests not queued yet
    (the distributor's newcomers waiting for displacement victims to leave).
    """
    if (band.queued_bytes + band_held[0] + size > band.max_bytes
            or band.queued_items + band_held[1] + 1 > band.max_items):
        return None
    if (flow.queued_bytes + flow_held[0] + size > band.flow_max_bytes
            or flow.queued_items + flow_held[1] + 1 > band.flow_max_items):
        return None
    return total.queued_bytes + size - max_bytes, total.queued_items + 1 - max_items
