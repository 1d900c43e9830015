"""The scenario format: a server configuration plus a synthetic workload (TOML).

One format feeds both `flowshard simulate` (virtual time) and `flowshard bench` (real time), so this
module only *describes* load: the validated Structs, flow expansion (`count = N`) and each flow's
deterministic request stream (`FlowSource`). Driving an engine or a socket is the caller's job.

Determinism: every expanded flow draws from its own `random.Random`, seeded from the scenario seed and
the flow's id (not its position), so adding, removing or reordering flows never changes the stream
of another flow. Each request consumes exactly four uniform draws, in one fixed order (gap or think
time, size, tokens, service time), each turned into its value by an inverse CDF: the k-th request of
a flow has the same shape whatever the server does with it, and changing one field's distribution
changes no other field's values.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Callable
from statistics import NormalDist
from typing import Annotated, Any, ClassVar

import msgspec

from flowshard.config import Config, ConfigError, Priority, convert, parse_toml
from flowshard.validate import MAX_SIZE, MAX_TOKENS, MAX_WEIGHT, MIN_WEIGHT

NonNegative = Annotated[float, msgspec.Meta(ge=0, le=1e15)]
Positive = Annotated[float, msgspec.Meta(gt=0, le=1e15)]
Duration = Annotated[float, msgspec.Meta(gt=0, le=7 * 86400)]
Offset = Annotated[float, msgspec.Meta(ge=0, le=7 * 86400)]
Sampler = Callable[[float], float]  # a uniform draw u in [0, 1) -> a value (inverse CDF)

MAX_FLOWS = 1_000_000
_TINY = 2.0**-60  # stands in for a uniform draw of exactly 0, where an inverse CDF is infinite


# ---------------------------------------------------------------------------------------- distributions


class _Dist(msgspec.Struct, tag_field="dist", forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A non-negative random quantity, written `{ dist = "...", ... }` (a bare number means const)."""

    def sampler(self) -> Sampler:
        """The inverse CDF: maps a uniform draw in [0, 1) to a value of this distribution."""
        raise NotImplementedError

    def expected(self) -> float:
        """The mean (before any `max` cap); used to reject workloads that could never advance time."""
        raise NotImplementedError


class Const(_Dist, tag="const", frozen=True):
    value: NonNegative

    def sampler(self) -> Sampler:
        value = self.value
        return lambda u: value

    def expected(self) -> float:
        return self.value


class Uniform(_Dist, tag="uniform", frozen=True):
    low: NonNegative
    high: NonNegative

    def __post_init__(self) -> None:
        if self.high < self.low:
            raise ValueError(f"uniform: high ({self.high}) must be at least low ({self.low})")

    def sampler(self) -> Sampler:
        low, width = self.low, self.high - self.low
        return lambda u: low + width * u

    def expected(self) -> float:
        return (self.low + self.high) / 2


class Exponential(_Dist, tag="exponential", frozen=True):
    mean: Positive
    max: Positive | None = None

    def sampler(self) -> Sampler:
        mean, cap = self.mean, self.max
        if cap is None:
            return lambda u: -mean * math.log(1.0 - u)
        return lambda u: min(cap, -mean * math.log(1.0 - u))

    def expected(self) -> float:
        return self.mean


class LogNormal(_Dist, tag="lognormal", frozen=True):
    """Heavy-ish tail; give exactly one of `median` (e^mu) or `mean` (e^(mu + sigma^2/2))."""

    sigma: Annotated[float, msgspec.Meta(ge=0, le=4)]
    median: Positive | None = None
    mean: Positive | None = None
    max: Positive | None = None

    def __post_init__(self) -> None:
        if (self.median is None) == (self.mean is None):
            raise ValueError("lognormal: give exactly one of median or mean")

    def _mu(self) -> float:
        if self.median is not None:
            return math.log(self.median)
        assert self.mean is not None
        return math.log(self.mean) - self.sigma * self.sigma / 2

    def sampler(self) -> Sampler:
        mu, sigma, cap = self._mu(), self.sigma, self.max
        inv_cdf = NormalDist().inv_cdf

        def lognormal(u: float) -> float:
            value = math.exp(mu + sigma * inv_cdf(u if u > 0.0 else _TINY))
            return value if cap is None else min(cap, value)

        return lognormal

    def expected(self) -> float:
        return math.exp(self._mu() + self.sigma * self.sigma / 2)


class Choice(_Dist, tag="choice", frozen=True):
    """One of `values`, with relative `weights` (default: equally likely)."""

    values: Annotated[list[NonNegative], msgspec.Meta(min_length=1, max_length=100_000)]
    weights: list[Positive] | None = None

    def __post_init__(self) -> None:
        if self.weights is not None and len(self.weights) != len(self.values):
            raise ValueError(f"choice: {len(self.weights)} weights for {len(self.values)} values; give one per value")

    def _cumulative(self) -> list[float]:
        weights = self.weights or [1.0] * len(self.values)
        total = 0.0
        cumulative = []
        for w in weights:
            total += w
            cumulative.append(total)
        return cumulative

    def sampler(self) -> Sampler:
        values = list(self.values)
        cumulative = self._cumulative()
        total, last = cumulative[-1], len(values) - 1
        return lambda u: values[min(last, bisect_right(cumulative, u * total))]

    def expected(self) -> float:
        cumulative = self._cumulative()
        weights = [b - a for a, b in zip([0.0, *cumulative], cumulative, strict=False)]
        return sum(v * w for v, w in zip(self.values, weights, strict=True)) / cumulative[-1]


Dist = Const | Uniform | Exponential | LogNormal | Choice
DistField = NonNegative | Dist
DIST_NAMES = ("const", "uniform", "exponential", "lognormal", "choice")


def as_dist(field: DistField) -> Dist:
    """A distribution field as a Dist: a bare number is a constant."""
    return Const(value=float(field)) if isinstance(field, int | float) else field


# ---------------------------------------------------------------------------------------- arrivals


class _Arrival(msgspec.Struct, tag_field="kind", forbid_unknown_fields=True, frozen=True, kw_only=True):
    """How a flow's requests arrive, written `arrival = { kind = "...", ... }`."""

    closed: ClassVar[bool] = False


class Poisson(_Arrival, tag="poisson", frozen=True):
    """Open loop: exponential gaps, `rate` requests per second."""

    rate: Annotated[float, msgspec.Meta(gt=0, le=1e7)]


class Constant(_Arrival, tag="constant", frozen=True):
    """Open loop: one request every 1/`rate` seconds, the first one at the flow's start."""

    rate: Annotated[float, msgspec.Meta(gt=0, le=1e7)]


class Bursts(_Arrival, tag="bursts", frozen=True):
    """Open loop: `size` requests every `every` seconds, spread evenly over `spread` seconds (0: at once)."""

    size: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)]
    every: Duration
    spread: Offset = 0.0

    def __post_init__(self) -> None:
        if self.spread > self.every:
            raise ValueError(f"bursts: spread ({self.spread}) must not exceed every ({self.every})")


class Closed(_Arrival, tag="closed", frozen=True):
    """Closed loop: `concurrency` clients; each sends its next request `think` seconds after the last one
    ended (completed its service, or was rejected or evicted — then after at least `backoff` seconds)."""

    closed: ClassVar[bool] = True
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
    think: DistField = 0.0
    backoff: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 0.1


Arrival = Poisson | Constant | Bursts | Closed
ARRIVAL_NAMES = ("poisson", "constant", "bursts", "closed")


# ---------------------------------------------------------------------------------------- flows, workload


class FlowSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One `[[workload.flows]]` entry; `count = N` makes N flows `id-0` .. `id-(N-1)` alike."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    count: Annotated[int, msgspec.Meta(ge=1, le=MAX_FLOWS)] = 1
    priority: Priority = 0
    weight: Annotated[float, msgspec.Meta(ge=MIN_WEIGHT, le=MAX_WEIGHT)] | None = None  # None: server `weights`, else 1
    arrival: Arrival
    size: DistField = 1000.0  # bytes
    tokens: DistField | None = None  # None: not declared (fairness then charges bytes)
    service: DistField  # seconds the request holds its dispatch slot
    service_per_token: NonNegative = 0.0  # seconds added per declared token
    ttl: Offset = 0.0  # 0: the server's default_ttl
    slo: Offset = 0.0  # 0: none
    start: Offset = 0.0
    stop: Duration | None = None  # None: the workload's duration

    def __post_init__(self) -> None:
        # what the service accepts from a client (flowshard.validate); draws beyond are clamped to it
        for name, most, words in (("size", MAX_SIZE, "2^40 bytes"), ("tokens", MAX_TOKENS, "2^32 tokens")):
            field = getattr(self, name)
            if field is None:
                continue
            dist = as_dist(field)
            cap = getattr(dist, "max", None)  # (a capped distribution's mean is judged as capped: a review)
            mean = dist.expected() if cap is None else min(dist.expected(), cap)
            if mean > most:
                raise ValueError(f"{name}: a mean of {mean:g} is above {words}, the most a request may declare")
        if self.stop is not None and self.stop <= self.start:
            raise ValueError(f"stop ({self.stop}) must be after start ({self.start})")
        if isinstance(self.arrival, Closed):
            think = as_dist(self.arrival.think).expected()
            if think + as_dist(self.service).expected() <= 0:
                raise ValueError("a closed-loop flow needs a positive think or service time, or time never advances")

    def flow_ids(self) -> list[str]:
        """The ids this entry expands to."""
        if self.count == 1:
            return [self.id]
        return [f"{self.id}-{i}" for i in range(self.count)]


class Workload(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """`[workload]`: how long, which seed, which flows; `warmup` seconds are left out of fairness figures.

    `drain = false`: at `duration` the run stops, and what is still queued is reported `unfinished`.
    `drain = true`: arrivals stop at `duration`, and the run goes on until every request has an outcome.
    """

    duration: Duration
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0
    warmup: Offset = 0.0
    drain: bool = False
    fair_margin: Annotated[float, msgspec.Meta(gt=0, le=10)] = 0.05  # a flow off its reference by more is named
    flows: Annotated[list[FlowSpec], msgspec.Meta(min_length=1)]

    def __post_init__(self) -> None:
        if self.warmup >= self.duration:
            raise ValueError(f"warmup ({self.warmup}) must be shorter than duration ({self.duration})")
        total = sum(spec.count for spec in self.flows)
        if total > MAX_FLOWS:
            raise ValueError(f"flows expand to {total} flows; at most {MAX_FLOWS} are allowed")
        seen: set[str] = set()
        for spec in self.flows:
            for flow_id in spec.flow_ids():
                if flow_id in seen:
                    raise ValueError(f"flow id {flow_id!r} appears twice; each flow needs its own id")
                seen.add(flow_id)


class Scenario(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A whole scenario file: `[server]` is the service configuration, `[workload]` the load."""

    name: str = ""
    description: str = ""
    server: Config = msgspec.field(default_factory=Config)
    workload: Workload


def load_scenario(text: str, *, where: str = "scenario") -> Scenario:
    """Parse and validate a scenario document (the contents of a TOML file)."""
    return scenario_from_data(parse_toml(text, where=where), where=where)


def scenario_from_data(data: dict[str, Any], *, where: str = "scenario") -> Scenario:
    """Validate an already parsed scenario document."""
    stray = sorted(set(data) & set(Config.__struct_fields__))
    if stray or "workload" not in data:
        hint = (f"{', '.join(stray)} belong{'s' if len(stray) == 1 else ''} to the service configuration"
                if stray else "it has no [workload]")
        raise ConfigError(
            f"{where}: not a scenario: {hint}. A scenario puts the configuration under [server] and the load "
            "under [workload] with its [[workload.flows]] (see bench/scenarios/*.toml and docs/tools.md, "
            "\"Scenario format\"); `flowshard config check` reads a plain configuration")
    try:
        return convert(data, Scenario, where=where)
    except ConfigError as exc:
        raise ConfigError(_name_allowed(str(exc))) from None


def offered_rate(scenario: Scenario) -> float:
    """Nominal open-loop request rate of the scenario in req/s (closed-loop flows are not counted)."""
    total = 0.0
    for f in scenario.workload.flows:
        a = f.arrival
        if isinstance(a, Poisson | Constant):
            total += a.rate * f.count
        elif isinstance(a, Bursts):
            total += a.size / a.every * f.count
    return total


def closed_clients(scenario: Scenario) -> int:
    """How many closed-loop clients the scenario runs in all."""
    return sum(f.count * f.arrival.concurrency for f in scenario.workload.flows if isinstance(f.arrival, Closed))


def _name_allowed(message: str) -> str:
    """msgspec names a bad tag value but not the choices; add them."""
    head, _, rest = message.partition(": Invalid value ")
    if not rest:
        return message
    if head.endswith(".dist"):
        return f"{message}; allowed: {', '.join(DIST_NAMES)}"
    if head.endswith(".kind"):
        return f"{message}; allowed: {', '.join(ARRIVAL_NAMES)}"
    return message


# ---------------------------------------------------------------------------------------- request streams


class FlowInstance(msgspec.Struct, frozen=True):
    """One expanded flow: its id, the entry it came from and its position among that entry's flows."""

    id: str
    spec: FlowSpec
    member: int  # 0 .. spec.count - 1


def expand_flows(workload: Workload) -> list[FlowInstance]:
    """Every flow of the workload, `count` expanded, in file order."""
    return [
        FlowInstance(flow_id, spec, member) for spec in workload.flows for member, flow_id in enumerate(spec.flow_ids())
    ]


def flow_weights(scenario: Scenario) -> dict[str, float]:
    """Every flow's weight as the server applies it: the flow entry's own `weight` (sent with each of
    its requests), else the server's `weights` for its id, else 1."""
    configured = scenario.server.weights
    return {i.id: i.spec.weight or configured.get(i.id, 1.0) for i in expand_flows(scenario.workload)}


def flow_rng(seed: int, flow_id: str) -> random.Random:
    """The flow's own generator: depends on the seed and the flow id only (str seeds hash with SHA-512)."""
    return random.Random(f"{seed}/{flow_id}")


def _gap_sampler(arrival: Arrival) -> Sampler:
    """Seconds before the next request (open loop) or the client's think time (closed loop)."""
    if isinstance(arrival, Poisson):
        return Exponential(mean=1.0 / arrival.rate).sampler()
    if isinstance(arrival, Constant):
        period = 1.0 / arrival.rate
        first = [True]

        def constant(u: float) -> float:
            if first[0]:
                first[0] = False
                return 0.0
            return period

        return constant
    if isinstance(arrival, Bursts):
        return _burst_gaps(arrival)
    return as_dist(arrival.think).sampler()


def _burst_gaps(bursts: Bursts) -> Sampler:
    size, every = bursts.size, bursts.every
    step = bursts.spread / size
    state = [0, 0.0]  # requests generated, offset of the last one

    def gap(u: float) -> float:
        k = state[0]
        state[0] = k + 1
        at = (k // size) * every + (k % size) * step
        previous = state[1]
        state[1] = at
        return at - previous

    return gap


class Shapes(msgspec.Struct, frozen=True):
    """The stateless samplers of one flow entry (size, tokens, service), shared by its `count` flows."""

    size: Sampler
    tokens: Sampler | None
    service: Sampler
    per_token: float

    @classmethod
    def of(cls, spec: FlowSpec) -> Shapes:
        tokens = None if spec.tokens is None else as_dist(spec.tokens).sampler()
        return cls(as_dist(spec.size).sampler(), tokens, as_dist(spec.service).sampler(), spec.service_per_token)


class FlowSource:
    """The request stream of one expanded flow: `next()` -> (gap, size bytes, tokens, service seconds).

    Open loop: `gap` is the time since the previous arrival (the first: since the flow's start).
    Closed loop: `gap` is the think time before the request is sent.
    Declared tokens are at least 1 (0 would mean "not declared").
    """

    __slots__ = ("_gap", "_per_token", "_service", "_size", "_tokens", "instance", "rng")

    def __init__(self, instance: FlowInstance, seed: int, shapes: Shapes | None = None) -> None:
        spec = instance.spec
        shapes = shapes or Shapes.of(spec)
        self.instance = instance
        self.rng = flow_rng(seed, instance.id)
        self._gap = _gap_sampler(spec.arrival)  # per flow: bursts and constant rates keep state
        self._size = shapes.size
        self._tokens = shapes.tokens
        self._service = shapes.service
        self._per_token = shapes.per_token

    def next(self) -> tuple[float, int, int, float]:
        draw = self.rng.random
        gap = self._gap(draw())
        size = min(MAX_SIZE, int(self._size(draw()) + 0.5))
        u = draw()  # drawn even when tokens are not declared: the draw order never changes
        tokens = 0 if self._tokens is None else max(1, min(MAX_TOKENS, int(self._tokens(u) + 0.5)))
        service = self._service(draw()) + self._per_token * tokens
        return gap, size, tokens, service


def flow_sources(workload: Workload) -> list[FlowSource]:
    """One request stream per expanded flow, in file order (samplers built once per entry)."""
    sources = []
    for spec in workload.flows:
        shapes = Shapes.of(spec)
        sources += [FlowSource(FlowInstance(i, spec, m), workload.seed, shapes) for m, i in enumerate(spec.flow_ids())]
    return sources
