"""A tiny fake-clock closed-loop harness for the fairness tests (APF style), driving one Engine in budget mode.

Each flow has N clients that submit a request, wait for its outcome (and, if dispatched, for its fixed
service time), think, and submit again; or it is an open-loop source at a fixed rate. The engine's
budget (max in-flight requests) is the server's L slots. Everything runs in virtual time with a seeded
RNG, so results are exact and repeatable. Independent of `flowshard/simulate.py` on purpose.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field

from flowshard.engine import Engine
from flowshard.types import Item, Outcome, Request

Range = int | tuple[int, int]


@dataclass
class FlowSpec:
    flow: str
    clients: int = 0  # closed loop: concurrent clients (think 0: always one request outstanding each)
    think: float = 0.0
    rate: float = 0.0  # open loop: requests per second, evenly spaced
    size: Range = 100  # bytes: fixed or an inclusive uniform range
    tokens: Range = 0  # declared tokens (VTC cost): fixed or an inclusive uniform range
    priority: int = 0
    start: float = 0.0
    stop: float = math.inf  # no new requests at or after this time


@dataclass
class Dispatch:
    time: float
    flow: str
    size: int
    cost: int


@dataclass
class Result:
    dispatches: list[Dispatch] = field(default_factory=list)
    outcomes: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    submitted: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def served(self, start: float = 0.0, end: float = math.inf, by: str = "requests") -> dict[str, float]:
        """Service per flow dispatched in [start, end): requests, bytes or cost."""
        out: dict[str, float] = defaultdict(float)
        for d in self.dispatches:
            if start <= d.time < end:
                out[d.flow] += 1 if by == "requests" else d.size if by == "bytes" else d.cost
        return dict(out)

    def rates(self, start: float, end: float, by: str = "requests") -> dict[str, float]:
        return {f: v / (end - start) for f, v in self.served(start, end, by).items()}


def _draw(rng: random.Random, value: Range) -> int:
    return value if isinstance(value, int) else rng.randint(*value)


def run(
    engine: Engine,
    specs: list[FlowSpec],
    *,
    duration: float,
    service: float = 1.0,
    jitter: float = 0.0,
    seed: int = 0,
) -> Result:
    """Run the closed/open-loop workload against `engine` (budget mode) until `duration`.

    Each dispatched request holds its slot for `service` seconds, or uniformly within +- `jitter` of it.
    """
    rng = random.Random(seed)
    result = Result()
    ids = itertools.count(1)
    tie = itertools.count()
    events: list[tuple[float, int, str, object]] = []  # (time, tie, kind, payload)
    spec_of: dict[int, int] = {}  # request id -> spec index

    def at(t: float, kind: str, payload: object) -> None:
        if t < duration:
            heapq.heappush(events, (t, next(tie), kind, payload))

    for index, spec in enumerate(specs):
        for _ in range(spec.clients):
            at(spec.start, "arrive", index)
        if spec.rate > 0:
            at(spec.start, "tick", index)

    def next_request(index: int, t: float) -> None:
        spec = specs[index]
        if t >= spec.stop:
            return
        request = Request(next(ids), spec.flow, spec.priority, _draw(rng, spec.size), tokens=_draw(rng, spec.tokens))
        spec_of[request.id] = index
        result.submitted[spec.flow] += 1
        engine.submit(request, t)

    def client_done(item: Item, t: float, served: bool) -> None:
        index = spec_of.pop(item.id)
        spec = specs[index]
        if spec.clients:  # closed loop: this client comes back after its think time (a refusal: after backing off)
            at(t + (spec.think if served else max(spec.think, service)), "arrive", index)

    while events:
        now = events[0][0]
        while events and events[0][0] == now:
            _, _, kind, payload = heapq.heappop(events)
            if kind == "arrive":
                next_request(payload, now)  # type: ignore[arg-type]
            elif kind == "tick":
                index = payload
                next_request(index, now)  # type: ignore[arg-type]
                at(now + 1.0 / specs[index].rate, "tick", index)  # type: ignore[index]
            else:  # "done": service finished
                item = payload
                engine.release(item)  # type: ignore[arg-type]
                client_done(item, now, True)  # type: ignore[arg-type]
        engine.pump(now)
        for item in engine.take_outbox():
            result.outcomes[item.request.flow][Outcome(item.outcome).label] += 1
            if item.outcome == Outcome.DISPATCHED:
                result.dispatches.append(Dispatch(now, item.request.flow, item.size, item.cost))
                hold = service + (rng.uniform(-jitter, jitter) if jitter else 0.0)
                at(now + hold, "done", item)
            else:
                client_done(item, now, False)
    return result
