"""Shared helpers for the core tests: config builders, an id source and the engine-wide checkers.

The checkers are plain functions (imported as `from conftest import ...`) so hypothesis tests and
state machines, which cannot take function-scoped fixtures, use the same code as the unit tests.
"""

from __future__ import annotations

import itertools
import math
import signal
import socket
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from flowshard.config import BandConfig, BudgetConfig, Config
from flowshard.engine import Engine
from flowshard.types import Item, Outcome, Request

FAIRNESS_NAMES = ("round-robin", "global-fcfs", "drr", "vtc")

# The services the tests start take SIGINT as one started from a terminal does. A suite run as a
# background job of a script (as a CI runner may run it) has SIGINT ignored, which every child
# inherits, and `flowshard serve` keeps an inherited ignore (review 136): its SIGINT tests would see
# it ignored. The test processes take Python's default back; their children then start with it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def refused_url() -> Iterator[str]:
    """`http://127.0.0.1:P` where nothing listens, for the whole test: P stays bound (never listening,
    so connections are refused), so a service another test starts meanwhile (`--port 0`, the suite
    runs in two processes) cannot take it, as it could a port bound and closed (a review)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"
ORDERING_NAMES = ("fcfs", "edf", "slo-deadline")


def make_config(
    bands: Iterable[dict[str, Any]] | None = None,
    *,
    max_inflight_requests: int | None = None,
    max_inflight_bytes: int | None = None,
    **kw: Any,
) -> Config:
    """A Config from band keyword dicts; the budget is unlimited unless given (tests pump freely)."""
    band_list = [BandConfig(**b) for b in (bands if bands is not None else [{"priority": 0}])]
    return Config(
        bands=band_list,
        budget=BudgetConfig(max_inflight_requests=max_inflight_requests, max_inflight_bytes=max_inflight_bytes),
        **kw,
    )


def make_engine(bands: Iterable[dict[str, Any]] | None = None, *, enforce_limits: bool = True, **kw: Any) -> Engine:
    return Engine(make_config(bands, **kw), enforce_limits=enforce_limits)


class Ids:
    """Hands out request ids and builds requests."""

    def __init__(self) -> None:
        self._next = itertools.count(1)

    def req(self, flow: str = "a", **kw: Any) -> Request:
        return Request(id=next(self._next), flow=flow, **kw)


def submit(engine: Engine, ids: Ids, flow: str = "a", now: float = 0.0, **kw: Any) -> Item:
    return engine.submit(ids.req(flow, **kw), now)


def drain(engine: Engine, now: float = 0.0, limit: int = 100_000) -> list[Item]:
    """Grant-dispatch everything queued (no band restriction, no byte cap), in dispatch order."""
    out: list[Item] = []
    for _ in range(limit):
        item = engine.dispatch(now)
        if item is None:
            return out
        out.append(item)
    raise AssertionError("drain did not terminate")


def flows_of(items: Iterable[Item]) -> str:
    """The flow ids of items as one string (flows are named by single letters in the tests)."""
    return "".join(i.request.flow for i in items)


def reconcile(engine: Engine) -> None:
    """Invariant 4: engine = sum of bands = sum of flows = what the queues really hold."""
    total_items = total_bytes = 0
    for band in engine.bands:
        band_items = band_bytes = 0
        for flow in band.flows.values():
            held = flow.queue.items()
            assert flow.queue.live == len(held), (flow, flow.queue.live, len(held))
            assert flow.queued_items == len(held), (flow, flow.queued_items, len(held))
            assert flow.queued_bytes == sum(i.request.size for i in held), flow
            assert flow.queued_items >= 0 and flow.queued_bytes >= 0
            for item in held:
                assert item.flow is flow and item.band == band.index
                assert engine.queued(item.id) is item
            band_items += flow.queued_items
            band_bytes += flow.queued_bytes
        assert band.queued_items == band_items, (band.index, band.queued_items, band_items)
        assert band.queued_bytes == band_bytes, (band.index, band.queued_bytes, band_bytes)
        # The band's arrival-order list holds exactly the queued items, oldest first.
        chain: list[Item] = []
        node = band.oldest
        while node is not None:
            chain.append(node)
            node = node.next
        assert len(chain) == band_items
        assert [i.seq for i in chain] == sorted(i.seq for i in chain)
        assert (band.newest is None) == (band.oldest is None)
        if chain:
            assert band.newest is chain[-1]
        total_items += band_items
        total_bytes += band_bytes
    assert engine.queued_items == total_items, (engine.queued_items, total_items)
    assert engine.queued_bytes == total_bytes, (engine.queued_bytes, total_bytes)


def check_limits(engine: Engine) -> None:
    """Invariant 2: queued never exceeds the global, band and flow limits; in-flight its budget."""
    assert engine.queued_items <= engine.max_items
    assert engine.queued_bytes <= engine.max_bytes
    for band in engine.bands:
        assert band.queued_items <= band.max_items
        assert band.queued_bytes <= band.max_bytes
        for flow in band.flows.values():
            assert flow.queued_items <= band.flow_max_items
            assert flow.queued_bytes <= band.flow_max_bytes
    budget = engine.budget
    assert 0 <= budget.inflight <= budget.max_requests
    assert budget.inflight_bytes >= 0
    # Bytes may exceed the limit only when one oversized request runs alone.
    assert budget.inflight_bytes <= budget.max_bytes or budget.inflight == 1


class Ledger:
    """Every outcome the engine posts, by request id: invariant 1 (exactly one outcome)."""

    def __init__(self) -> None:
        self.submitted: set[int] = set()
        self.outcome: dict[int, Outcome] = {}
        self.items: dict[int, Item] = {}

    def submit(self, engine: Engine, request: Request, now: float) -> Item:
        self.submitted.add(request.id)
        item = engine.submit(request, now)
        self.absorb(engine)
        return item

    def absorb(self, engine: Engine) -> list[Item]:
        out = engine.take_outbox()
        for item in out:
            rid = item.id
            assert rid in self.submitted, f"outcome for unknown request {rid}"
            assert rid not in self.outcome, f"request {rid} has a second outcome {Outcome(item.outcome).label}"
            assert item.outcome >= 0
            self.outcome[rid] = Outcome(item.outcome)
            self.items[rid] = item
        return out

    def pending(self) -> set[int]:
        return self.submitted - self.outcome.keys()

    def check_open(self, engine: Engine) -> None:
        """Requests without an outcome are exactly the queued ones."""
        queued = {rid for rid in self.submitted if engine.queued(rid) is not None}
        assert queued == self.pending(), queued ^ self.pending()

    def check_closed(self) -> None:
        assert not self.pending(), f"requests without an outcome: {sorted(self.pending())[:10]}"


def share_error(measured: float, expected: float) -> float:
    """Relative error of a measured share against the analytic one."""
    if expected == 0:
        return math.inf if measured else 0.0
    return abs(measured - expected) / expected


@pytest.fixture
def ids() -> Ids:
    return Ids()


def past_kernel_buffers() -> int:
    """Bytes a client must send to be sure they cannot all sit in the kernel's buffers of one loopback
    connection (each end's autotunes up to its tcp_rmem/tcp_wmem maximum: 32 MiB on some machines):
    past them only the peer's reading, or its reset, lets the sending go on."""
    total = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        try:
            with open(f"/proc/sys/net/ipv4/{name}") as f:
                total += int(f.read().split()[2])
        except (OSError, IndexError, ValueError):
            total += 6 << 20
    return max(4 << 20, 2 * total)
