"""Adaptive Retry-After, after Kubernetes API Priority and Fairness' dropped-requests tracker.

Starts at 1 s. Under sustained rejection (at least 3 x value rejections within the last `value`
seconds, and `value` seconds since the last change) it doubles, up to 32 s; once rejections fall
below `value` per `value` seconds, it relaxes by 1 s per `value` seconds, like TCP's AIMD in
reverse: back off fast, recover gently.
"""

from __future__ import annotations

from collections import deque

MIN_RETRY_AFTER = 1
MAX_RETRY_AFTER = 32


class RetryAfter:
    __slots__ = ("_changed", "_drops", "value")

    def __init__(self) -> None:
        self.value = MIN_RETRY_AFTER
        self._drops: deque[float] = deque()
        self._changed = float("-inf")

    def _trim(self, now: float) -> int:
        drops = self._drops
        horizon = now - self.value
        while drops and drops[0] <= horizon:
            drops.popleft()
        return len(drops)

    def rejected(self, now: float) -> int:
        """Record a rejection; returns the Retry-After (seconds) to send with it."""
        self._drops.append(now)
        recent = self._trim(now)
        if recent >= 3 * self.value and now - self._changed >= self.value and self.value < MAX_RETRY_AFTER:
            self.value = min(MAX_RETRY_AFTER, 2 * self.value)
            self._changed = now
        return self.value

    def tick(self, now: float) -> int:
        """Called periodically: relax when rejections have slowed down."""
        recent = self._trim(now)
        if recent < self.value and now - self._changed >= self.value and self.value > MIN_RETRY_AFTER:
            self.value -= 1
            self._changed = now
        return self.value
