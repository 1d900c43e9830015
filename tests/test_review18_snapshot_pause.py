"""Review 18: the stats snapshot's pause bound (metrics._Pause) is per stuck writer, not per scrape."""

from __future__ import annotations

import pytest


def test_the_snapshot_pause_is_bounded_per_scrape_not_per_stuck_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_Pause` documents "at most ~20 ms more per scrape". `ShmStats.snapshot` retries each bad writer
    up to max_retries (1,000) times and the one `_Pause` sleeps 1 ms every 50th retry overall, so
    with S shards stopped mid-batch (a SIGSTOP of the process group, a host stall) one /metrics or
    /v1/stats blocks the distributor's event loop S x 20 ms (16 shards: 320 ms per scrape, during
    which no admission is decided)."""
    import distributor.metrics as metrics
    from flowshard.shm import ShmLayout, ShmStats

    layout = ShmLayout(8, 16, 1)
    shm = ShmStats(bytearray(layout.nbytes), layout, init=True)
    for shard in range(16):
        shm.begin_write(shard)  # every shard stopped mid-batch
    slept: list[float] = []
    monkeypatch.setattr(metrics.time, "sleep", slept.append)
    assert not shm.snapshot(on_retry=metrics._Pause()).consistent
    assert sum(slept) <= 0.025, f"{len(slept)} pauses, {sum(slept) * 1000:.0f} ms of the distributor's loop"
