"""The scenario format: parsing, validation messages, flow expansion and deterministic request streams."""

from __future__ import annotations

import statistics
from pathlib import Path

import msgspec
import pytest

from flowshard.config import ConfigError
from flowshard.scenario import (
    Bursts,
    Choice,
    Closed,
    Const,
    Constant,
    Exponential,
    FlowInstance,
    FlowSource,
    FlowSpec,
    LogNormal,
    Poisson,
    Scenario,
    Uniform,
    Workload,
    as_dist,
    expand_flows,
    flow_rng,
    load_scenario,
    scenario_from_data,
)
from flowshard.validate import MAX_TOKENS

SCENARIOS = Path(__file__).resolve().parent.parent / "bench" / "scenarios"

FULL = """
name = "full"
description = "every kind of field"

[server]
default_ttl = 5.0
[server.budget]
max_inflight_requests = 4
[[server.bands]]
priority = 1
fairness = "vtc"
[[server.bands]]
priority = 0

[workload]
duration = 10.0
seed = 3
warmup = 1.0
drain = true

[[workload.flows]]
id = "open"
priority = 1
weight = 2.5
arrival = { kind = "poisson", rate = 50 }
size = { dist = "lognormal", median = 1000, sigma = 0.5, max = 5000 }
tokens = { dist = "uniform", low = 10, high = 20 }
service = { dist = "exponential", mean = 0.1 }
service_per_token = 0.001
ttl = 2.0
slo = 0.5

[[workload.flows]]
id = "tick"
count = 3
arrival = { kind = "constant", rate = 10 }
size = 512
service = 0.05
start = 2.0
stop = 8.0

[[workload.flows]]
id = "burst"
arrival = { kind = "bursts", size = 100, every = 2.0, spread = 0.5 }
size = { dist = "choice", values = [100, 1000], weights = [9, 1] }
service = { dist = "const", value = 0.01 }

[[workload.flows]]
id = "agent"
arrival = { kind = "closed", concurrency = 4, think = { dist = "exponential", mean = 1.0 }, backoff = 0.5 }
service = 0.2
"""


def _minimal(**flow: object) -> dict[str, object]:
    base: dict[str, object] = {"id": "f", "arrival": {"kind": "poisson", "rate": 1.0}, "service": 0.1}
    base.update(flow)
    return {"workload": {"duration": 10.0, "flows": [base]}}


def _load(data: dict[str, object]) -> Scenario:
    return scenario_from_data(data, where="t")


def _error(data: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as info:
        _load(data)
    return str(info.value)


# ---------------------------------------------------------------------------------------- parsing


def test_full_scenario_parses_every_field() -> None:
    scenario = load_scenario(FULL)
    assert scenario.name == "full"
    assert [b.priority for b in scenario.server.bands] == [1, 0]
    w = scenario.workload
    assert (w.duration, w.seed, w.warmup, w.drain) == (10.0, 3, 1.0, True)
    open_, tick, burst, agent = w.flows
    assert open_.arrival == Poisson(rate=50.0)
    assert open_.size == LogNormal(median=1000.0, sigma=0.5, max=5000.0)
    assert open_.tokens == Uniform(low=10.0, high=20.0)
    assert open_.service == Exponential(mean=0.1)
    assert (open_.weight, open_.ttl, open_.slo, open_.service_per_token) == (2.5, 2.0, 0.5, 0.001)
    assert tick.arrival == Constant(rate=10.0) and tick.count == 3 and (tick.start, tick.stop) == (2.0, 8.0)
    assert tick.size == 512.0 and as_dist(tick.size) == Const(value=512.0)
    assert burst.arrival == Bursts(size=100, every=2.0, spread=0.5)
    assert burst.size == Choice(values=[100.0, 1000.0], weights=[9.0, 1.0])
    assert agent.arrival == Closed(concurrency=4, think=Exponential(mean=1.0), backoff=0.5)


def test_defaults() -> None:
    scenario = _load(_minimal())
    flow = scenario.workload.flows[0]
    assert (flow.count, flow.priority, flow.weight, flow.size, flow.tokens) == (1, 0, None, 1000.0, None)
    assert (flow.ttl, flow.slo, flow.start, flow.stop) == (0.0, 0.0, 0.0, None)
    assert (scenario.workload.seed, scenario.workload.warmup, scenario.workload.drain) == (0, 0.0, False)
    assert scenario.server.budget.max_inflight_requests == 100  # the config defaults apply


def test_shipped_scenarios_parse() -> None:
    names = sorted(p.stem for p in SCENARIOS.glob("*.toml"))
    expected = ["deep-queue", "demo", "displacement", "equal-flows", "fair-alloc", "flow-churn", "free-flow"]
    expected += ["free-flow-peak", "ordering"]
    expected += ["many-flows", "matrix-L0-P1-F10-W10", "matrix-L100-P1-F10-W5000", "matrix-L100-P8-F5000-W5000"]
    expected += ["priority-isolation", "through-shards", "through-shards-peak", "ttl-storm", "weighted-drr"]
    assert names == sorted([*expected, "weighted-vtc"])
    for path in SCENARIOS.glob("*.toml"):
        scenario = load_scenario(path.read_text(), where=path.name)
        assert scenario.name == path.stem
        assert path.read_text().startswith(f"# {path.stem} — "), f"{path.name} needs its comment header"


# ---------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("flow", "field", "needle"),
    [
        (
            {"size": {"dist": "gauss", "mean": 1}},
            "size.dist",
            "allowed: const, uniform, exponential, lognormal, choice",
        ),
        ({"arrival": {"kind": "periodic"}}, "arrival.kind", "allowed: poisson, constant, bursts, closed"),
        ({"size": -5}, "size", "got -5"),
        ({"size": {"dist": "uniform", "low": 10, "high": 5}}, "size", "high (5.0) must be at least low (10.0)"),
        ({"size": {"dist": "lognormal", "median": 1, "mean": 2, "sigma": 1}}, "size", "exactly one of median"),
        ({"size": {"dist": "exponential", "mean": 0}}, "size.mean", "got 0"),
        ({"size": {"dist": "choice", "values": [1, 2], "weights": [1]}}, "size", "1 weights for 2 values"),
        ({"arrival": {"kind": "poisson", "rate": 0}}, "arrival.rate", "got 0"),
        ({"arrival": {"kind": "bursts", "size": 10, "every": 1, "spread": 2}}, "arrival", "spread (2.0)"),
        ({"arrival": {"kind": "closed", "concurrency": 0}}, "arrival.concurrency", "got 0"),
        ({"arrival": {"kind": "closed", "concurrency": 1}, "service": 0}, "flows[0]", "time never advances"),
        ({"count": 0}, "count", "got 0"),
        ({"start": 5, "stop": 3}, "flows[0]", "stop (3.0) must be after start (5.0)"),
        ({"colour": "red"}, "flows[0]", "unknown key `colour`"),
        ({"arrival": {"kind": "closed", "concurrency": 1, "thinkk": 1}}, "flows[0].arrival",
         "unknown key `thinkk`; did you mean `think`?"),
        # what the service refuses from a client (review 82)
        ({"size": 1e13}, "flows[0]", "size: a mean of 1e+13 is above 2^40 bytes"),
        ({"tokens": {"dist": "exponential", "mean": 1e13}}, "flows[0]", "tokens: a mean of 1e+13 is above 2^32"),
        ({"priority": 1 << 31}, "flows[0].priority", "<= 2147483647"),
    ],
)
def test_flow_errors_name_field_value_and_allowed(flow: dict[str, object], field: str, needle: str) -> None:
    message = _error(_minimal(**flow))
    assert message.startswith(f"t: workload.flows[0].{field}") or message.startswith(f"t: workload.{field}")
    assert needle in message


def test_a_capped_distribution_is_judged_by_its_cap_and_every_draw_is_within_the_services_bounds() -> None:
    """Review 85: a mean far above 2^40 with a `max` below it was refused, though no draw passes the cap;
    and a distribution whose mean is within the bounds still draws no size or tokens beyond them."""
    scenario = _load(_minimal(size={"dist": "exponential", "mean": 2e12, "max": 1e6},
                              tokens={"dist": "lognormal", "median": 2e9, "sigma": 0.5}))
    [flow] = expand_flows(scenario.workload)
    source = FlowSource(flow, 1)
    draws = [source.next() for _ in range(2000)]
    assert max(size for _, size, _, _ in draws) <= 1_000_000
    assert max(tokens for _, _, tokens, _ in draws) == MAX_TOKENS  # (some draws clamped to it)


def test_workload_errors() -> None:
    data = _minimal()
    data["workload"]["warmup"] = 10.0  # type: ignore[index]
    assert "warmup (10.0) must be shorter than duration (10.0)" in _error(data)
    twice = {"workload": {"duration": 1.0, "flows": [_flow("a-1"), _flow("a", count=2)]}}
    assert "flow id 'a-1' appears twice" in _error(twice)
    assert "workload.flows" in _error({"workload": {"duration": 1.0, "flows": []}})
    assert "not a scenario: it has no [workload]" in _error({})


def test_a_plain_configuration_is_not_a_scenario() -> None:
    """`flowshard simulate my-config.toml` says what a scenario needs, not "unknown field default_ttl"."""
    message = _error({"default_ttl": 5.0, "budget": {"max_inflight_requests": 3}})
    assert message.startswith("t: not a scenario: budget, default_ttl belong to the service configuration")
    assert "under [server]" in message and "[workload]" in message and "config check" in message
    with_workload = _minimal()
    with_workload["max_queued_bytes"] = 5
    assert "max_queued_bytes belongs to the service configuration" in _error(with_workload)


def test_server_errors_come_from_the_config() -> None:
    data = _minimal()
    data["server"] = {"bands": [{"priority": 0, "fairness": "lottery"}]}
    message = _error(data)
    assert "server.bands[0]" in message and "lottery" in message


def test_not_toml() -> None:
    with pytest.raises(ConfigError, match=r"x\.toml: not valid TOML"):
        load_scenario("[workload\n", where="x.toml")


def test_a_value_nested_too_deeply_is_an_error_not_a_traceback() -> None:
    with pytest.raises(ConfigError, match=r"x\.toml: a value nests arrays or inline tables too deeply \(from line 1\)"):
        load_scenario("x = " + "[" * 3000 + "]" * 3000 + "\n", where="x.toml")


def _flow(flow_id: str, **extra: object) -> dict[str, object]:
    return {"id": flow_id, "arrival": {"kind": "poisson", "rate": 1.0}, "service": 0.1, **extra}


# ---------------------------------------------------------------------------------------- expansion, streams


def test_count_expands_to_numbered_flows_in_file_order() -> None:
    workload = load_scenario(FULL).workload
    ids = [f.id for f in expand_flows(workload)]
    assert ids == ["open", "tick-0", "tick-1", "tick-2", "burst", "agent"]
    assert [f.member for f in expand_flows(workload)] == [0, 0, 1, 2, 0, 0]


def _stream(
    spec: FlowSpec, seed: int = 1, flow_id: str | None = None, n: int = 5
) -> list[tuple[float, int, int, float]]:
    source = FlowSource(FlowInstance(flow_id or spec.id, spec, 0), seed)
    return [source.next() for _ in range(n)]


def _spec(**fields: object) -> FlowSpec:
    data: dict[str, object] = {
        "id": "f",
        "arrival": {"kind": "poisson", "rate": 10.0},
        "size": {"dist": "uniform", "low": 0, "high": 1000},
        "service": {"dist": "exponential", "mean": 1.0},
    }
    data.update(fields)
    return msgspec.convert(data, FlowSpec)


def test_streams_depend_on_seed_and_flow_id_only() -> None:
    spec = _spec()
    assert _stream(spec) == _stream(spec)
    assert _stream(spec) != _stream(spec, seed=2)
    assert _stream(spec, flow_id="a") != _stream(spec, flow_id="b")
    # adding a flow before another leaves the other's stream alone
    one = Workload(duration=1.0, seed=4, flows=[_spec(id="x")])
    two = Workload(duration=1.0, seed=4, flows=[_spec(id="new", count=5), _spec(id="x")])
    x1 = FlowSource(expand_flows(one)[0], 4)
    x2 = FlowSource(expand_flows(two)[-1], 4)
    assert [x1.next() for _ in range(20)] == [x2.next() for _ in range(20)]
    assert flow_rng(4, "x").random() == flow_rng(4, "x").random()


def test_draw_order_is_fixed_per_request() -> None:
    """Changing the service distribution must not move a flow's arrivals or sizes."""
    a = _stream(_spec(service=0.5), n=50)
    b = _stream(_spec(service={"dist": "exponential", "mean": 3.0}, tokens=7), n=50)
    assert [s[:2] for s in a] == [s[:2] for s in b]
    c, d = _stream(_spec(), n=50), _stream(_spec(size=10), n=50)
    assert [(s[0], s[3]) for s in c] == [(s[0], s[3]) for s in d]
    assert [s[1] for s in c] != [s[1] for s in d]


def test_samplers_match_their_distributions() -> None:
    n = 20000
    u = flow_rng(0, "stats").random
    exp = Exponential(mean=2.0).sampler()
    assert statistics.fmean(exp(u()) for _ in range(n)) == pytest.approx(2.0, rel=0.03)
    median = LogNormal(median=100.0, sigma=1.0).sampler()
    assert statistics.median(median(u()) for _ in range(n)) == pytest.approx(100.0, rel=0.05)
    mean = LogNormal(mean=100.0, sigma=0.5).sampler()
    assert statistics.fmean(mean(u()) for _ in range(n)) == pytest.approx(100.0, rel=0.03)
    assert LogNormal(mean=100.0, sigma=0.5).expected() == pytest.approx(100.0)
    capped = LogNormal(median=100.0, sigma=2.0, max=150.0).sampler()
    assert max(capped(u()) for _ in range(1000)) == 150.0
    uniform = Uniform(low=5.0, high=6.0).sampler()
    assert all(5.0 <= uniform(u()) <= 6.0 for _ in range(1000))
    choice = Choice(values=[1.0, 10.0], weights=[3.0, 1.0]).sampler()
    draws = [choice(u()) for _ in range(n)]
    assert set(draws) == {1.0, 10.0}
    assert draws.count(10.0) / n == pytest.approx(0.25, abs=0.02)
    assert Choice(values=[1.0, 10.0], weights=[3.0, 1.0]).expected() == pytest.approx(3.25)
    assert Const(value=7.0).sampler()(u()) == 7.0


def test_arrival_gaps() -> None:
    constant = _stream(_spec(arrival={"kind": "constant", "rate": 4.0}), n=4)
    assert [s[0] for s in constant] == [0.0, 0.25, 0.25, 0.25]
    bursts = _stream(_spec(arrival={"kind": "bursts", "size": 3, "every": 1.0, "spread": 0.3}), n=7)
    assert [s[0] for s in bursts] == pytest.approx([0.0, 0.1, 0.1, 0.8, 0.1, 0.1, 0.8])
    poisson = _stream(_spec(arrival={"kind": "poisson", "rate": 100.0}), n=5000)
    assert statistics.fmean(s[0] for s in poisson) == pytest.approx(0.01, rel=0.05)
    closed = _stream(_spec(arrival={"kind": "closed", "concurrency": 2, "think": 0.75}), n=3)
    assert [s[0] for s in closed] == [0.75, 0.75, 0.75]


def test_shapes_round_sizes_and_tokens_and_add_per_token_service() -> None:
    shapes = _stream(_spec(size=1000.4, tokens=0.2, service=0.5, service_per_token=0.25), n=3)
    assert all(s[1:] == (1000, 1, 0.75) for s in shapes)  # tokens at least 1 once declared
    undeclared = _stream(_spec(size=99.5), n=1)[0]
    assert undeclared[1:3] == (100, 0)


def test_a_flow_weight_has_the_services_bounds() -> None:
    """One scenario feeds both the simulator and the load generator (DESIGN §8): a weight the service
    refuses (below 1e-6, review 24) is refused here too, not simulated then answered 422 by the service."""
    assert "weight" in _error(_minimal(weight=1e-7))
    assert "weight" in _error(_minimal(weight=2e6))
    assert _load(_minimal(weight=1e-6)).workload.flows[0].weight == 1e-6
