"""Per-request records (`flowshard simulate --records`) against the aggregates they summarise, and the
ordering-violation figure (`overtaken`) against a recount from the records."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from flowshard import records
from flowshard.analysis import overtakes
from flowshard.cli import main as cli_main
from flowshard.scenario import load_scenario
from flowshard.simulate import simulate

ROOT = Path(__file__).resolve().parent.parent


def test_overtakes_counts_dispatches_ahead_of_earlier_arrivals() -> None:
    flow = np.array([0, 0, 1, 0, 1, 1])
    seq = np.array([1, 0, 5, 2, 3, 4])
    assert overtakes(flow, seq).tolist() == [True, False, True, False, False, False]
    assert overtakes(np.zeros(0, np.int64), np.zeros(0, np.int64)).tolist() == []


@pytest.mark.parametrize("name", ["ttl-storm", "demo"])
def test_records_add_up_to_the_report(name: str, tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    assert cli_main(["simulate", str(ROOT / "bench" / "scenarios" / f"{name}.toml"), "--records", str(path)]) == 0
    head, rows = records.decode(path.read_bytes())
    assert head["format"] == records.FORMAT and head["columns"] == list(records.COLUMNS)
    report = simulate(load_scenario((ROOT / "bench" / "scenarios" / f"{name}.toml").read_text()))
    assert len(rows) == report.totals.counts.submitted
    assert sorted(r["seq"] for r in rows) == list(range(len(rows)))  # every request once
    by_flow = Counter((r["flow"], r["outcome"]) for r in rows)
    for f in report.flows:
        c = f.counts
        assert by_flow[(f.id, "dispatched")] == c.dispatched
        assert by_flow[(f.id, "unfinished")] == c.unfinished
        for reason, n in c.evicted.items():
            assert by_flow[(f.id, f"evicted:{reason}")] == n
        for reason, n in c.rejected.items():
            assert by_flow[(f.id, f"rejected:{reason}")] == n
    window = (report.warmup, report.duration)
    for band in report.bands:
        mine = [r for r in rows if r["band"] == band.name and r["outcome"] == "dispatched"]
        mine.sort(key=lambda r: (r["dispatch"], r["seq"]))
        ids = {f.id: i for i, f in enumerate(report.flows)}
        over = overtakes(np.array([ids[r["flow"]] for r in mine]), np.array([r["seq"] for r in mine]))
        inside = np.array([window[0] <= r["dispatch"] <= window[1] for r in mine])
        if inside.any():
            assert band.overtaken == pytest.approx(over[inside].mean(), abs=1e-6)
    for f in report.flows:  # measured service = the units its window dispatches carried
        unit = next(b.unit for b in report.bands if b.name == f.band)
        served = [r for r in rows if r["flow"] == f.id and r["outcome"] == "dispatched"
                  and window[0] <= r["dispatch"] <= window[1]]
        units = sum(1 if unit == "requests" else r["size"] if unit == "bytes" else (r["tokens"] or r["size"])
                    for r in served)
        assert f.measured == pytest.approx(units / (window[1] - window[0]), rel=1e-6, abs=1e-6)


def test_one_engine_never_reorders_a_flow() -> None:
    """One engine: fcfs, and edf with one TTL per flow, dispatch every flow in arrival order."""
    text = (ROOT / "bench" / "scenarios" / "ttl-storm.toml").read_text()
    for ordering in ("fcfs", "edf"):
        report = simulate(load_scenario(text.replace('ordering = "edf"', f'ordering = "{ordering}"')))
        assert report.bands[0].overtaken == 0.0, ordering


def test_engine_corrects_a_vtc_charge_at_release() -> None:
    from conftest import make_engine

    from flowshard.types import Request

    engine = make_engine([{"priority": 0, "fairness": "vtc"}], max_inflight_requests=1, default_ttl=0,
                         weights={"a": 2.0})
    engine.submit(Request(1, "a", tokens=1000), 0.0)
    engine.submit(Request(2, "a", tokens=1000), 0.0)
    engine.pump(0.0)
    (first,) = engine.take_outbox()
    flow = engine.bands[0].flows["a"]
    assert flow.vtc == 500.0  # 1000 / weight 2
    engine.release(first, actual=200)  # it really cost 200: the counter moves by -800 / 2
    assert flow.vtc == 100.0
    assert engine.correct("gone", 0, 5.0) is False  # an unknown flow: nothing to correct


def test_pairwise_service_difference_by_hand() -> None:
    from flowshard.analysis import pairwise_service_difference, union_intervals

    both = (np.array([0.0]), np.array([10.0]))
    served = {0: (np.array([1.0, 2, 3]), np.array([5.0, 5, 5])), 1: (np.array([4.0, 5, 6]), np.array([5.0, 5, 5]))}
    assert pairwise_service_difference({0: both, 1: both}, served) == 15.0  # f +15, then g catches up
    later = (np.array([5.0]), np.array([10.0]))
    assert pairwise_service_difference({0: both, 1: later}, served) == 10.0  # only [5, 10] is joint
    apart = (np.array([20.0]), np.array([30.0]))
    assert pairwise_service_difference({0: both, 1: apart}, served) == 0.0
    assert pairwise_service_difference({0: both}, served) is None  # no pair
    starts, ends = union_intervals(np.array([0.0, 1, 5, 6]), np.array([2.0, 3, 7, 6.5]))
    assert starts.tolist() == [0.0, 5.0] and ends.tolist() == [3.0, 7.0]


def test_pairwise_service_difference_is_a_function_of_time() -> None:
    """Review 181: dispatches of both flows at one instant were taken one by one in their sort order (the
    simulator's pass shares its virtual instant: `simulate fair-alloc` read 5 requests where, in time,
    there was none), and an overlap of one instant counted as an interval."""
    from flowshard.analysis import pairwise_service_difference

    both = (np.array([0.0]), np.array([10.0]))
    one_by_one = (np.array([1.0, 1, 1, 2]), np.array([1.0, 1, 1, 1]))
    tied = {0: one_by_one, 1: one_by_one}
    assert pairwise_service_difference({0: both, 1: both}, tied) == 0.0  # (one by one: 3)
    ahead = {0: (np.array([1.0, 1, 1]), np.array([1.0, 1, 1])), 1: (np.array([1.0, 2]), np.array([1.0, 1]))}
    assert pairwise_service_difference({0: both, 1: both}, ahead) == 2.0  # f 2 ahead after the instant 1
    touching = (np.array([10.0]), np.array([20.0]))  # backlogged together at the instant 10 only
    late = {0: (np.array([10.0]), np.array([4.0])), 1: (np.array([15.0]), np.array([1.0]))}
    assert pairwise_service_difference({0: both, 1: touching}, late) == 0.0


FLOODS = """
name = "floods"
[server]
default_ttl = 0
[server.budget]
max_inflight_requests = 4
[[server.bands]]
priority = 0
fairness = "{fairness}"
[workload]
duration = 60.0
warmup = 5.0
[[workload.flows]]
id = "a"
arrival = {{ kind = "poisson", rate = 300 }}
tokens = {{ dist = "uniform", low = 10, high = 100 }}
service = 0.02
[[workload.flows]]
id = "b"
arrival = {{ kind = "poisson", rate = 100 }}
tokens = {{ dist = "uniform", low = 10, high = 100 }}
service = 0.02
"""


def test_pairwise_service_difference_bounded_by_vtc_and_growing_without_fairness() -> None:
    vtc = simulate(load_scenario(FLOODS.format(fairness="vtc"))).bands[0]
    fcfs = simulate(load_scenario(FLOODS.format(fairness="global-fcfs"))).bands[0]
    assert vtc.service_diff is not None and vtc.service_diff <= 2 * 100  # the VTC bound: 2 x the largest cost
    assert fcfs.service_diff is not None and fcfs.service_diff > 100 * 100
