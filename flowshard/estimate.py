"""How much work a scenario is for the simulator, known before running it.

Why: a closed-loop flow with zero service time and a microsecond think time makes tens of millions of
requests per virtual second; simulated, that runs for hours with nothing to show. `estimate` counts
the requests each flow can make from the scenario alone (no engine, no clock), so `flowshard
simulate` can warn, or refuse, up front and say which flows to change.

The count is an upper bound: an open-loop flow makes `rate x active time` requests; a closed-loop
client at most one per think time + service time (a client whose request is queued makes fewer), or,
where its requests can be refused (a queue limit below what can wait at once: its clients, and the
open-loop flows' arrivals over their TTL) or evicted
(a TTL shorter than the service time), one per its back-off (a review: 200 clients retrying a
refusal every 1 ms ran 12 M events with no warning, estimated at 2,400 requests).
Each request is at most two events (its arrival and the end of its service). Simulating N > 1 shards
(the distributor's ledger, grants and N engines: flowshard.multisim) costs more per event.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import msgspec

from flowshard.config import Config, band_index
from flowshard.scenario import Bursts, Closed, Constant, FlowSpec, Poisson, Scenario, as_dist

__all__ = ["EVENTS_PER_SECOND", "SHARDED_COST", "Estimate", "FlowLoad", "estimate", "events_per_second"]

# Simulated events per second of wall time on the project machine (2 vCPU, measured on the shipped
# scenarios: 47k-194k events/s), taken low so the time estimate errs long.
EVENTS_PER_SECOND = 80_000.0
EVENTS_PER_REQUEST = 2
# Wall time per event with N > 1 shards over one engine's: each request is also admitted, routed and
# granted by the ledger, and answered back. Measured 1.4-2.5x at 2-8 shards on the shipped scenarios
# (deep-queue: 103k events/s at one shard, 56k at 2, 42k at 8); taken high so the estimate errs long.
SHARDED_COST = 2.5


def events_per_second(shards: int = 1) -> float:
    """The simulator's assumed speed for `shards` shards (one: the engine alone)."""
    return EVENTS_PER_SECOND if shards <= 1 else EVENTS_PER_SECOND / SHARDED_COST


class FlowLoad(msgspec.Struct, frozen=True):
    """One `[[workload.flows]]` entry's share of the work (all its `count` flows together)."""

    id: str
    requests: float  # at most, over the whole run
    per_second: float  # requests per virtual second while active
    why: str  # what makes it that many, in words


class Estimate(msgspec.Struct, frozen=True):
    """The scenario's requests and events (upper bounds) and what they cost in wall time."""

    requests: float
    events: float
    seconds: float  # wall-clock seconds at events_per_second(shards)
    flows: list[FlowLoad]  # heaviest first


def estimate(scenario: Scenario, shards: int = 1) -> Estimate:
    """Count the requests every flow entry can make during the run (wall time: at `shards` shards)."""
    workload = scenario.workload
    band_of = band_index(scenario.server)
    waiting = _can_wait(scenario, band_of)
    loads = sorted((_flow_load(spec, workload.duration, scenario.server, band_of, waiting)
                    for spec in workload.flows), key=lambda f: -f.requests)
    requests = sum(f.requests for f in loads)
    events = requests * EVENTS_PER_REQUEST
    return Estimate(requests, events, events / events_per_second(shards), loads)


def _can_wait(scenario: Scenario, band_of: Callable[[int], int]) -> dict[int, tuple[float, float]]:
    """The most requests, and bytes, that can wait at once per band index (-1: all bands): a closed-loop
    client's one request; an open-loop flow's arrivals over its TTL (no TTL: any number)."""
    server = scenario.server
    out: dict[int, tuple[float, float]] = {}
    for spec in scenario.workload.flows:
        arrival = spec.arrival
        size = as_dist(spec.size).expected()
        if isinstance(arrival, Closed):
            requests = float(arrival.concurrency * spec.count)
        else:
            ttl = spec.ttl or server.default_ttl
            if ttl <= 0:
                requests = math.inf
            elif isinstance(arrival, Poisson | Constant):
                requests = arrival.rate * ttl * spec.count
            else:  # a whole burst waits at once, however short the TTL (a review)
                requests = arrival.size * (1 + ttl / arrival.every) * spec.count
        for scope in (band_of(spec.priority), -1):
            had = out.get(scope, (0.0, 0.0))
            out[scope] = (had[0] + requests, had[1] + requests * size)
    return out


def _refusable(spec: FlowSpec, server: Config, band_index: int, waiting: dict[int, tuple[float, float]]) -> bool:
    """Whether a closed-loop flow's requests can be refused: a queue limit (the flow's, its band's or
    the global one, of requests or bytes) below what can wait there at once (a review: an open-loop
    flood filling the global limit refused the closed-loop clients too, 1.7 M events estimated at 44 k).
    A band that displaces others does so only when the global limits are full: counted by those."""
    assert isinstance(spec.arrival, Closed)
    band = server.bands[band_index]
    clients = float(spec.arrival.concurrency)
    size = as_dist(spec.size).expected()
    limits = ((band.flow_max_requests, clients), (band.flow_max_bytes, clients * size),
              (band.max_requests, waiting[band_index][0]), (band.max_bytes, waiting[band_index][1]),
              (server.max_queued_requests, waiting[-1][0]), (server.max_queued_bytes, waiting[-1][1]))
    return any(isinstance(limit, int) and limit < can for limit, can in limits)  # (None, "unlimited": no limit)


def _flow_load(spec: FlowSpec, duration: float, server: Config, band_of: Callable[[int], int],
               waiting: dict[int, tuple[float, float]]) -> FlowLoad:
    active = max(0.0, min(spec.stop if spec.stop is not None else duration, duration) - spec.start)
    arrival = spec.arrival
    n = spec.count
    flows = f"{n:,} flows" if n > 1 else "1 flow"
    if isinstance(arrival, Poisson | Constant):
        rate = arrival.rate * n
        why = f"{flows} at {_num(arrival.rate)} req/s"
    elif isinstance(arrival, Bursts):
        rate = arrival.size / arrival.every * n
        why = f"{flows}, bursts of {_num(arrival.size)} every {_secs(arrival.every)}"
    else:
        assert isinstance(arrival, Closed)
        think = as_dist(arrival.think).expected()
        tokens = as_dist(spec.tokens).expected() if spec.tokens is not None else 0.0
        service = as_dist(spec.service).expected() + spec.service_per_token * tokens
        cycle = think + service
        parts = f"think {_secs(think)} + service {_secs(service)}"
        ttl = spec.ttl or server.default_ttl
        retry = max(think, arrival.backoff)  # after a refusal or an eviction: at least its back-off
        if _refusable(spec, server, band_of(spec.priority), waiting) and retry < cycle:
            cycle, parts = retry, f"a refusal retried after {_secs(retry)}"
        if 0 < ttl < service and ttl + retry < cycle:
            cycle, parts = ttl + retry, f"evicted at its TTL {_secs(ttl)}, retried after {_secs(retry)}"
        clients = arrival.concurrency * n
        rate = clients / cycle if cycle > 0 else math.inf
        why = (f"{_num(clients)} closed-loop client{'s' if clients != 1 else ''}, each cycling every "
               f"{_secs(cycle)} ({parts})")
    return FlowLoad(spec.id, rate * active, rate, why)


def _num(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 or value == int(value) else f"{value:,.3g}"


def _secs(value: float) -> str:
    """A duration in the unit a person reads: µs, ms or s."""
    if value == 0:
        return "0 s"
    if value < 1e-3:
        return f"{value * 1e6:.3g} µs"
    if value < 1:
        return f"{value * 1e3:.3g} ms"
    return f"{value:.3g} s"
