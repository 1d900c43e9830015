"""Deadlines through the real service (one shard): edf and slo-deadline deadlines run from the request's
arrival at the distributor, so equal TTLs (or SLOs) give exact arrival order and unequal ones their
deadline order. Requests are pipelined on one binary connection (one write), queued behind a held
ticket (budget 1), then released one at a time: the order of the dispatches is the service's order.
fcfs is the control: arrival order by construction.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
from servicekit import launch, run, until

from flowshard.client import Client
from flowshard.types import Outcome

__all__ = ["launch"]

N = 40


def dispatch_order(svc: Any, fields: list[dict[str, Any]]) -> list[int]:
    """Admit one request per entry of `fields` (in one write, behind a held ticket); the order of dispatch."""

    async def main() -> list[int]:
        async with Client.connect(svc.host, svc.binary_port) as c:
            hold = await c.admit("hold")
            assert hold.outcome is Outcome.DISPATCHED
            futures = [c.admit("f", size=100, **kw) for kw in fields]  # sent in one write
            await svc.until_stats(lambda s: s["totals"]["queued_items"] == len(fields))
            order: list[int] = []
            held = deque([hold.ticket])
            while len(order) < len(fields):
                assert await c.release(held.popleft())
                await until(lambda: sum(f.done() for f in futures) > len(order))
                done = [i for i, f in enumerate(futures) if f.done() and i not in order]
                assert len(done) == 1, done
                result = futures[done[0]].result()
                assert result.outcome is Outcome.DISPATCHED, result
                order.append(done[0])
                held.append(result.ticket)
            return order

    return run(main())


@pytest.mark.parametrize("ordering", ["fcfs", "edf", "slo-deadline"])
def test_equal_deadlines_keep_arrival_order(launch: Any, ordering: str) -> None:
    svc = launch(shards=1, budget=1, bands=[{"priority": 0, "ordering": ordering}])
    order = dispatch_order(svc, [{"ttl": 30.0, "slo": 5.0}] * N)
    assert order == list(range(N)), order


@pytest.mark.parametrize("ordering", ["edf", "slo-deadline"])
def test_unequal_deadlines_go_by_deadline(launch: Any, ordering: str) -> None:
    svc = launch(shards=1, budget=1, bands=[{"priority": 0, "ordering": ordering}])
    # later arrivals get earlier deadlines (1 s apart: far beyond the gaps between arrivals)
    fields = [{"ttl": 100.0 - i, "slo": 50.0 - i} if ordering == "edf" else {"ttl": 100.0, "slo": 50.0 - i}
              for i in range(N)]
    order = dispatch_order(svc, fields)
    assert order == list(reversed(range(N))), order


@pytest.mark.parametrize("ordering", ["edf", "slo-deadline"])
def test_engine_deadlines_run_from_the_arrival_not_the_shards_read(ordering: str) -> None:
    """Deterministic core of the above: a shard that reads two requests at the same moment (or the later
    arrival first) orders them by their arrival at the service, which the distributor passes along."""
    from conftest import make_engine

    from flowshard.types import Request

    engine = make_engine([{"priority": 0, "ordering": ordering}], default_ttl=0)
    engine.submit(Request(2, "f", ttl=30.0, slo=5.0), 10.0, arrived=2.0)  # read first, arrived later
    engine.submit(Request(1, "f", ttl=30.0, slo=5.0), 10.0, arrived=1.0)
    first = engine.dispatch(10.0)
    assert first is not None and first.id == 1
    assert first.deadline == 31.0  # the TTL runs from the arrival
