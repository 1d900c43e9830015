"""The simulator never looks hung: an up-front estimate refuses or announces long runs (naming the flows
and what to change), long runs show progress, and every shipped scenario simulates in seconds or says
why it is bench-only."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pytest

from flowshard import cli
from flowshard.config import ConfigError
from flowshard.estimate import estimate
from flowshard.scenario import load_scenario, scenario_from_data
from flowshard.simulate import WARN_SECONDS, Watch, _Simulation, check_size, simulate

SCENARIOS = Path(__file__).resolve().parent.parent / "bench" / "scenarios"


def _scenario(**flow: Any) -> Any:
    spec = {"id": "f", "service": 0.01, "arrival": {"kind": "poisson", "rate": 10}, **flow}
    return scenario_from_data({"workload": {"duration": 10.0, "flows": [spec]}})


def test_estimate_counts_open_and_closed_loops() -> None:
    assert estimate(_scenario()).requests == pytest.approx(100)
    assert estimate(_scenario(count=3, start=5.0)).requests == pytest.approx(150)
    bursts = estimate(_scenario(arrival={"kind": "bursts", "size": 50, "every": 2.0}))
    assert bursts.requests == pytest.approx(250)
    closed = estimate(_scenario(arrival={"kind": "closed", "concurrency": 4, "think": 0.09}, service=0.01))
    assert closed.requests == pytest.approx(400) and closed.events == pytest.approx(800)
    assert "4 closed-loop clients, each cycling every 100 ms (think 90 ms + service 10 ms)" in closed.flows[0].why


def test_closed_loop_clients_that_can_be_refused_or_evicted_are_counted_at_their_back_off() -> None:
    """A review: 200 clients, service 5 s, a per-flow queue limit of 1 and a 1 ms back-off retry each
    refusal every millisecond (12 M events in 60 s), where the estimate said one request per 5 s."""
    def closed(server: dict[str, Any], **flow: Any) -> Any:
        spec = {"id": "f", "service": 5.0, "arrival": {"kind": "closed", "concurrency": 200, "backoff": 0.001},
                **flow}
        return scenario_from_data({"server": server, "workload": {"duration": 60.0, "flows": [spec]}})

    unlimited = closed({})
    assert estimate(unlimited).requests == pytest.approx(200 * 60 / 5)  # nothing refuses it: its service time
    for server in ({"bands": [{"priority": 0, "flow_max_requests": 1}]},
                   {"bands": [{"priority": 0, "max_requests": 150}]}, {"max_queued_requests": 100}):
        refused = estimate(closed(server))
        assert refused.requests == pytest.approx(200 * 60 / 0.001), server
        assert "each cycling every 1 ms (a refusal retried after 1 ms)" in refused.flows[0].why
    evicted = estimate(closed({"default_ttl": 0.5}))  # a TTL shorter than its service: evicted, then again
    assert evicted.requests == pytest.approx(200 * 60 / 0.501)
    assert "(evicted at its TTL 500 ms, retried after 1 ms)" in evicted.flows[0].why
    think = estimate(closed({"max_queued_requests": 100}, arrival={"kind": "closed", "concurrency": 200,
                                                                     "think": 0.2, "backoff": 0.001}))
    assert think.requests == pytest.approx(200 * 60 / 0.2)  # the retry comes after its think time at least
    # an open-loop flood that can fill the global limit (2,000/s over a 60 s TTL against 300) refuses the
    # closed-loop clients too, though they alone fit (a review: 1.7 M events run, 44 k estimated)
    flood = {"id": "flood", "service": 1.0, "arrival": {"kind": "poisson", "rate": 2000}}
    mixed = scenario_from_data({"server": {"max_queued_requests": 300}, "workload": {"duration": 60.0, "flows": [
        flood, {"id": "f", "service": 1.0, "arrival": {"kind": "closed", "concurrency": 200, "backoff": 0.001}}]}})
    assert estimate(mixed).requests == pytest.approx(2000 * 60 + 200 * 60 / 0.001)
    fits = scenario_from_data({"server": {"max_queued_requests": 300}, "workload": {"duration": 60.0, "flows": [
        {**flood, "ttl": 0.05}, {"id": "f", "service": 1.0,
                                 "arrival": {"kind": "closed", "concurrency": 200, "backoff": 0.001}}]}})
    assert estimate(fits).requests == pytest.approx(2000 * 60 + 200 * 60 / 1.0)  # 100 + 200 wait at most: fits


def test_a_huge_scenario_is_refused_up_front_with_the_count_and_what_to_change(capsys: pytest.CaptureFixture[str]
                                                                               ) -> None:
    t0 = time.monotonic()
    assert cli.main(["simulate", str(SCENARIOS / "free-flow-peak.toml")]) == 2
    assert time.monotonic() - t0 < 2  # refused before any simulation
    err = capsys.readouterr().err
    assert "about 768,000,000 events to simulate" in err and "hours" in err and "not run (--force" in err
    assert "client: 64 closed-loop clients, each cycling every 1 µs (think 1 µs + service 0 s)" in err
    assert "lengthen think or service times" in err and "flowshard bench" in err


def test_a_long_scenario_is_announced_and_force_lifts_the_refusal() -> None:
    long = _scenario(arrival={"kind": "poisson", "rate": 100_000})  # 1 M requests: about 25 s
    warning = check_size(long, "long.toml")
    assert warning is not None and warning.startswith("long.toml: about 2,000,000 events")
    assert "progress below" in warning
    huge = _scenario(arrival={"kind": "poisson", "rate": 10_000_000})
    with pytest.raises(ConfigError, match="not run"):
        check_size(huge, "huge.toml")
    assert check_size(huge, "huge.toml", force=True) is not None
    assert check_size(_scenario(), "small.toml") is None


def test_progress_is_reported_during_the_run_and_shown_after_two_seconds() -> None:
    calls: list[tuple[float, int]] = []
    simulate(_scenario(arrival={"kind": "poisson", "rate": 3000}), lambda now, events: calls.append((now, events)))
    assert len(calls) >= 5
    assert calls == sorted(calls) and 0 < calls[-1][0] <= 10.0 and calls[-1][1] > calls[0][1]

    clock = iter([100.0, 101.0, 102.5, 103.0, 113.0]).__next__  # start, then one reading per call
    out = io.StringIO()
    watch = Watch(10.0, out, clock)
    watch(1.0, 1000)  # 1 s in: silent
    watch(2.5, 2500)  # 2.5 s in: first line
    watch(3.0, 3000)  # too soon for the next line (not a terminal: one every 10 s)
    watch(9.0, 9000)
    lines = out.getvalue().splitlines()
    assert lines == ["simulate: 2.5 of 10 virtual s (25%), 2,500 events, 2 s so far, about 8 s left",
                     "simulate: 9 of 10 virtual s (90%), 9,000 events, 13 s so far, about 1 s left"]


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_scenario_simulates_in_seconds_or_says_it_is_bench_only(path: Path) -> None:
    scenario = load_scenario(path.read_text(), where=path.name)
    est = estimate(scenario)
    if est.seconds > WARN_SECONDS:
        assert "Bench-only: `flowshard simulate` refuses it" in path.read_text()
        with pytest.raises(ConfigError, match="flowshard bench"):
            check_size(scenario, path.name)
        return
    assert "Bench-only" not in path.read_text()
    sim = _Simulation(scenario)
    t0 = time.monotonic()
    sim.run()
    assert time.monotonic() - t0 < 8.0
    assert est.events / 3 <= sim.events <= est.events * 1.5  # the estimate is the right size




def test_bench_announces_a_long_comparison_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import simcompare

    seen: list[object] = []
    def simulate(scenario: object, progress: object = None, shards: int = 1) -> str:
        seen.append(progress)
        return "report"

    monkeypatch.setattr(simcompare, "simulate", simulate)
    long = _scenario(arrival={"kind": "poisson", "rate": 100_000})  # 1 M requests: simulated, announced
    err = io.StringIO()
    assert simcompare.predict(long, err) == ("report", "")
    assert err.getvalue() == ("simulating the scenario for the comparison: about 2,000,000 events "
                              "(--no-simulate skips it)\n")
    assert isinstance(seen[-1], Watch)
    assert simcompare.predict(_scenario(), err) == ("report", "") and seen[-1] is None  # short: silent
    huge = _scenario(arrival={"kind": "poisson", "rate": 1_000_000})
    assert simcompare.predict(huge, err)[1].startswith("simulation skipped: about 10,000,000 virtual requests")


def test_progress_of_a_long_run_reads_whole_seconds_not_an_exponent() -> None:
    """Review 167: a 3,000-second scenario said `1.96e+03 of 3000 virtual s`."""
    clock = iter([0.0, 3.0]).__next__
    out = io.StringIO()
    watch = Watch(3000.0, out, clock)
    watch(1962.4, 937_983)
    assert out.getvalue().startswith("simulate: 1,962 of 3,000 virtual s (65%), 937,983 events")
