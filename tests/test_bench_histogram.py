"""The load generator's log-linear histogram: percentiles within its stated error, merging, transport."""

from __future__ import annotations

import math
import random

import pytest

from bench.histogram import Histogram
from flowshard.analysis import percentile


def _data(seed: int, n: int = 20_000) -> list[int]:
    rng = random.Random(seed)
    return [int(rng.lognormvariate(math.log(150_000), 1.2)) for _ in range(n)]  # ns: ~150 µs, heavy tail


@pytest.mark.parametrize("bits", [4, 7, 10])
def test_percentiles_within_relative_error(bits: int) -> None:
    values = _data(bits)
    h = Histogram(bits=bits)
    for v in values:
        h.record(v)
    ordered = sorted(values)
    for q in (0.0, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0):
        exact = percentile(ordered, q)
        assert abs(h.percentile(q) - exact) <= exact * h.relative_error + 0.5, q
    got = h.percentiles([0.99, 0.5, 0.9])
    assert got == [h.percentile(0.99), h.percentile(0.5), h.percentile(0.9)]
    assert h.count == len(values) and h.min == min(values) and h.max == max(values) and h.sum == sum(values)


def test_small_values_are_exact_and_extremes_clamped() -> None:
    h = Histogram(bits=3, max_exponent=20)
    for v in range(16):
        h.record(v)
    assert [h.percentile((v + 1) / 16) for v in range(16)] == list(range(16))
    h.record(-5)
    h.record(1 << 30)
    assert h.min == 0 and h.max == (1 << 20) - 1


def test_merge_equals_recording_everything_in_one() -> None:
    a, b, both = Histogram(), Histogram(), Histogram()
    for i, v in enumerate(_data(1)):
        (a if i % 3 else b).record(v)
        both.record(v)
    merged = Histogram.merged([a, b])
    assert merged.counts == both.counts
    assert (merged.count, merged.sum, merged.min, merged.max) == (both.count, both.sum, both.min, both.max)
    with pytest.raises(ValueError):
        a.merge(Histogram(bits=5))


def test_round_trip_through_dict_and_bounded_size() -> None:
    h = Histogram()
    for v in _data(2):
        h.record(v)
    again = Histogram.from_dict(h.to_dict())
    assert again.counts == h.counts and again.percentile(0.99) == h.percentile(0.99)
    assert len(h.counts) < 5000  # bounded whatever is recorded
    assert sum(c for _, _, c in h.buckets()) == h.count


def test_empty() -> None:
    h = Histogram()
    assert math.isnan(h.percentile(0.5)) and math.isnan(h.mean)
    assert all(math.isnan(x) for x in h.percentiles([0.5, 0.99]))
    h.merge(Histogram())
    assert h.count == 0
