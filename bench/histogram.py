"""A log-linear (HDR-style) latency histogram: bounded memory, mergeable across processes.

Why not keep every sample: a generator process records tens of thousands of latencies per second
for minutes, and several processes must be merged into one distribution. Why not fixed buckets:
latencies span 10 µs to seconds, and a percentile should be equally precise at both ends.

Values are integers (the load generator records nanoseconds). Values below `2 * 2**bits` each get
their own bucket; above that, every power-of-two range [2**k, 2**(k+1)) is cut into `2**bits`
equal buckets, so a bucket is never wider than 1/2**bits of its lower bound. A percentile is reported
as the midpoint of its bucket, clamped to the exact min and max seen: its relative error is at most
1 / 2**(bits+1) (0.39 % with the default 7 bits). Values above `2**max_exponent` are clamped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["Histogram"]


class Histogram:
    """Counts of integer values in log-linear buckets; `record` is O(1) and allocation-free."""

    __slots__ = ("_top", "bits", "count", "counts", "max", "max_exponent", "min", "sum")

    def __init__(self, bits: int = 7, max_exponent: int = 40) -> None:
        if not 1 <= bits <= 16 or not bits + 1 < max_exponent <= 62:
            raise ValueError(f"bits {bits} / max_exponent {max_exponent}: need 1 <= bits <= 16 < max_exponent <= 62")
        self.bits = bits
        self.max_exponent = max_exponent
        self._top = (1 << max_exponent) - 1
        self.counts = [0] * (self._index(self._top) + 1)
        self.count = 0
        self.sum = 0
        self.min = 0
        self.max = 0

    def _index(self, value: int) -> int:
        shift = value.bit_length() - self.bits - 1
        if shift <= 0:
            return value
        return (shift << self.bits) + (value >> shift)

    def _bounds(self, index: int) -> tuple[int, int]:
        """[low, high] of the values that land in bucket `index`."""
        sub = 1 << self.bits
        if index < 2 * sub:
            return index, index
        shift = (index >> self.bits) - 1
        low = (index - (shift << self.bits)) << shift
        return low, low + (1 << shift) - 1

    def record(self, value: int, n: int = 1) -> None:
        """Count `value` (negative values count as 0, values beyond the top are clamped) `n` times."""
        if value < 0:
            value = 0
        elif value > self._top:
            value = self._top
        shift = value.bit_length() - self.bits - 1
        self.counts[value if shift <= 0 else (shift << self.bits) + (value >> shift)] += n
        if self.count == 0:
            self.min = self.max = value
        elif value < self.min:
            self.min = value
        elif value > self.max:
            self.max = value
        self.count += n
        self.sum += value * n

    def merge(self, other: Histogram) -> None:
        """Add another histogram of the same shape into this one."""
        if (other.bits, other.max_exponent) != (self.bits, self.max_exponent):
            raise ValueError("cannot merge histograms of different shapes")
        if other.count == 0:
            return
        counts = self.counts
        for i, c in enumerate(other.counts):
            if c:
                counts[i] += c
        self.min = other.min if self.count == 0 else min(self.min, other.min)
        self.max = other.max if self.count == 0 else max(self.max, other.max)
        self.count += other.count
        self.sum += other.sum

    def percentile(self, q: float) -> float:
        """The q-quantile (0..1), nearest rank; nan when empty."""
        if self.count == 0:
            return math.nan
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                low, high = self._bounds(index)
                return min(max((low + high) / 2, self.min), self.max)
        return float(self.max)

    def percentiles(self, qs: Iterable[float]) -> list[float]:
        """Several quantiles in one pass over the buckets."""
        qs = list(qs)
        if self.count == 0:
            return [math.nan] * len(qs)
        order = sorted(range(len(qs)), key=lambda i: qs[i])
        out = [float(self.max)] * len(qs)
        seen = 0
        k = 0
        for index, c in enumerate(self.counts):
            if not c:
                continue
            seen += c
            while k < len(order) and seen >= max(1, math.ceil(qs[order[k]] * self.count)):
                low, high = self._bounds(index)
                out[order[k]] = min(max((low + high) / 2, self.min), self.max)
                k += 1
            if k == len(order):
                break
        return out

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else math.nan

    @property
    def relative_error(self) -> float:
        """The largest relative error of a reported percentile."""
        return 1.0 / (1 << (self.bits + 1))

    def buckets(self) -> list[tuple[int, int, int]]:
        """(low, high, count) of every non-empty bucket, for plots."""
        return [(*self._bounds(i), c) for i, c in enumerate(self.counts) if c]

    # ------------------------------------------------------------ across processes

    def to_dict(self) -> dict[str, Any]:
        """A compact, JSON/msgpack-friendly form: only the non-empty buckets."""
        nz = [(i, c) for i, c in enumerate(self.counts) if c]
        return {
            "bits": self.bits,
            "max_exponent": self.max_exponent,
            "index": [i for i, _ in nz],
            "counts": [c for _, c in nz],
            "count": self.count,
            "sum": self.sum,
            "min": self.min,
            "max": self.max,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Histogram:
        h = cls(int(data["bits"]), int(data["max_exponent"]))
        for i, c in zip(data["index"], data["counts"], strict=True):
            h.counts[int(i)] = int(c)
        h.count = int(data["count"])
        h.sum = int(data["sum"])
        h.min = int(data["min"])
        h.max = int(data["max"])
        return h

    @classmethod
    def merged(cls, histograms: Iterable[Histogram], bits: int = 7, max_exponent: int = 40) -> Histogram:
        out = cls(bits, max_exponent)
        for h in histograms:
            out.merge(h)
        return out
