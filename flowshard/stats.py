"""Statistics shapes shared by the engine, the shared-memory layout and the reports."""

from __future__ import annotations

from bisect import bisect_left

# Upper bounds (seconds) of the wait-time histogram buckets; one more bucket holds everything above.
# The same bounds as the upstream flow controller's queue-duration histogram, so figures compare.
WAIT_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.0005,
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
N_WAIT_BUCKETS = len(WAIT_BUCKETS) + 1


def wait_bucket(seconds: float) -> int:
    """Index of the histogram bucket for a wait: the first bound >= the wait (Prometheus `le`)."""
    return bisect_left(WAIT_BUCKETS, seconds)
