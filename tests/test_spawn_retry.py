"""A worker start that fails is retried with back-off until it succeeds, logged once per run of
failures, and counted (issue 8, defect 2). The distributor's spawn step is replaced by one that
fails a given number of times; the real-process case is in test_service_hardening."""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging

import pytest
import uvloop

from distributor import service
from distributor.fdreserve import FdReserve
from distributor.service import Distributor
from distributor.spawn import RestartBackoff
from flowshard.config import Config


def test_a_failed_spawn_is_retried_with_back_off_logged_once_and_counted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(service, "SPAWN_RETRY_MIN", 0.01)
    monkeypatch.setattr(service, "SPAWN_RETRY_MAX", 0.04)
    d = Distributor(Config(), shards=2)
    attempts: list[float] = []

    async def spawn(shard: int) -> None:
        attempts.append(asyncio.get_running_loop().time())
        if len(attempts) <= 5:
            raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(d, "_spawn", spawn)

    async def main() -> None:
        d._loop = asyncio.get_running_loop()
        with caplog.at_level(logging.WARNING, logger="distributor.service"):
            await asyncio.wait_for(d._respawn_until_started(1), 2.0)

    uvloop.run(main())
    assert len(attempts) == 6
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.009 and gaps[-1] >= 0.039 and max(gaps) < 0.2, gaps  # doubling, capped
    assert d.shards[1].spawn_failures == 5 and d.shards[1].failing_since == 0.0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "shard 1" in errors[0].getMessage()  # once per run of failures
    assert any("started after" in r.getMessage() for r in caplog.records)


def test_the_reserve_frees_descriptors_for_the_spawn_and_takes_them_back() -> None:

    reserve = FdReserve(8)
    assert len(reserve) == 8
    with reserve.use(spare=2):
        assert len(reserve) == 0
    assert len(reserve) == 6
    assert reserve.refill() == 8
    reserve.close()
    assert len(reserve) == 0


def test_a_child_that_keeps_dying_backs_off_per_run_of_deaths_not_over_its_life() -> None:
    """Review 90: the back-off's exponent was the restarts of the child's life, so after eight early
    deaths two deaths 0.5 s apart, however long after, cost a 5 s outage (453 admissions ended
    `shard_failure` in it). It counts the deaths in a row now, each within 10 s of the one before."""
    b = RestartBackoff()
    assert [b.died(t) for t in (0.0, 0.5, 1.0, 1.5)] == [0.0, 0.05, 0.1, 0.2]  # at once, then doubling
    for k in range(10):
        b.died(2.0 + k)
    assert b.died(13.0) == 5.0  # (capped)
    assert b.died(30.0) == 0.0  # quiet for 17 s: a new run, restarted at once
    assert b.died(30.5) == 0.05  # (the lifetime count gave 5 s here)
