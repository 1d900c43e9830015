"""The dispatch budget: a concurrency saturation detector over in-flight requests and bytes."""

from __future__ import annotations

import math


class Budget:
    """In-flight requests and bytes against their limits (an "unlimited" limit is math.inf).

    saturation = max(in-flight / max requests, in-flight bytes / max bytes), in [0, 1] while within
    limits. A band may dispatch while saturation < its ceiling; a request must also *fit*: one more
    request within the request limit, and its bytes within the byte limit — except that a request
    larger than the whole byte limit may run alone, so it is never stuck forever.
    """

    __slots__ = ("inflight", "inflight_bytes", "max_bytes", "max_requests")

    def __init__(self, max_requests: float | None = None, max_bytes: float | None = None) -> None:
        self.max_requests: float = math.inf if max_requests is None else max_requests
        self.max_bytes: float = math.inf if max_bytes is None else max_bytes
        self.inflight = 0
        self.inflight_bytes = 0

    def saturation(self) -> float:
        return max(self.inflight / self.max_requests, self.inflight_bytes / self.max_bytes)

    def fits(self, size: int) -> bool:
        if self.inflight >= self.max_requests:
            return False
        return self.inflight_bytes + size <= self.max_bytes or self.inflight == 0

    def acquire(self, size: int) -> None:
        self.inflight += 1
        self.inflight_bytes += size

    def release(self, size: int) -> None:
        if self.inflight <= 0 or self.inflight_bytes < size:
            raise ValueError("release without a matching dispatch")
        self.inflight -= 1
        self.inflight_bytes -= size
