"""Arithmetic of `flowshard bench`: the C-core projection, fair shares, splitting flows over generator
processes, scenario adjustments, and the client-side fairness and priority figures (no timing)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.cli import adjust
from bench.fairness import apparent_inversions, fair_shares, service_difference
from bench.loadgen import part_of
from bench.report import project, project_all
from flowshard.config import ConfigError
from flowshard.scenario import Bursts, Closed, Constant, Poisson, load_scenario, offered_rate

SCENARIO = """
name = "t"
[workload]
duration = 4.0
warmup = 1.0
[[workload.flows]]
id = "a"
count = 2
arrival = { kind = "poisson", rate = 100 }
service = 0.01
[[workload.flows]]
id = "b"
arrival = { kind = "bursts", size = 10, every = 1.0, spread = 0.5 }
service = 0.01
[[workload.flows]]
id = "c"
arrival = { kind = "closed", concurrency = 5, think = 0.1 }
service = 0.01
[[workload.flows]]
id = "d"
arrival = { kind = "constant", rate = 50 }
service = 0.01
"""


def test_projection_single_process_bound() -> None:
    # distributor 20 µs/req caps one core at 50k/s; together 35 µs/req on 2 cores allow 57k/s
    costs = {"distributor": 20.0, "worker0": 5.0, "loadgen0": 10.0}
    rate, neck = project(costs, 2, spread=["loadgen0"])
    assert rate == pytest.approx(50_000) and neck == "distributor"


def test_projection_shared_cores_bound() -> None:
    costs = {"distributor": 20.0, "worker0": 15.0, "worker1": 15.0, "loadgen0": 30.0}
    rate, neck = project(costs, 2, spread=["loadgen0"])
    assert rate == pytest.approx(2e6 / 80) and neck == "all 2 cores"
    rate, neck = project(costs, 16, spread=["loadgen0"])
    assert rate == pytest.approx(50_000) and neck == "distributor"


def test_projection_spread_generator_never_single_bound() -> None:
    rate, neck = project({"distributor": 10.0, "loadgen0": 40.0}, 16, spread=["loadgen0"])
    assert rate == pytest.approx(100_000) and neck == "distributor"
    rate, neck = project({"distributor": 10.0, "loadgen0": 40.0}, 16)
    assert rate == pytest.approx(25_000) and neck == "loadgen0"
    with pytest.raises(ValueError):
        project({"x": 1.0}, 0)


def test_project_all_scopes() -> None:
    out = project_all({"distributor": 20.0, "worker0": 5.0, "loadgen0": 25.0})
    assert out["with_generator"]["2"] == {"per_s": 40_000.0, "bottleneck": "all 2 cores"}
    assert out["service_only"]["2"] == {"per_s": 50_000.0, "bottleneck": "distributor"}
    assert set(out["with_generator"]) == {"2", "4", "8", "16"}


def test_projection_ratios_pair_the_runs_of_one_round() -> None:
    """The k-th run of each configuration against the k-th of the first: the machine's drift between
    rounds (here the second round twice as fast) cancels, which a ratio of medians would not show."""
    from bench.report import projection_ratios, render_projection_ratios

    def run(distributor_us: float) -> dict[str, Any]:
        return {"projection": project_all({"distributor": distributor_us, "worker0": distributor_us / 10})}

    one = [run(10.0), run(5.0), run(20.0)]  # a noisy machine: the rounds differ 4x
    eight = [run(11.0), run(5.5), run(22.0)]  # ... and 8 shards always 10 % dearer
    ratios = projection_ratios([("shards=1", one), ("shards=8", eight)])
    assert len(ratios) == 4 and all(r == pytest.approx([1 / 1.1] * 3, rel=1e-3) for r in ratios)
    text = render_projection_ratios([("shards=1", one), ("shards=8", eight)])
    assert text.splitlines()[-1].startswith("shards=8 / shards=1  0.909")
    assert render_projection_ratios([("shards=1", one)]) == ""
    missing = [{"projection": None}, run(5.0)]  # a run without a projection is left out of its round
    assert projection_ratios([("a", [run(10.0), run(10.0)]), ("b", missing)])[0] == [pytest.approx(2.0)]


def test_the_projection_table_is_made_from_each_process_s_median_cost_over_the_runs() -> None:
    """Review 181: the table projected the median-throughput run's costs alone (with 2 runs, the slower
    one's: 8 shards 0.71x of one where the medians printed above gave 0.83x). Each process's cost is
    now its median over the runs, as the tables print it."""
    from bench.report import render_projection

    def run(rate: float, distributor_us: float) -> dict[str, Any]:
        return {"throughput": {"dispatches_per_s": rate},
                "projection": project_all({"distributor": distributor_us, "worker0": 1.0})}

    # the run with the median rate (the second of three) is the costliest; the medians are 100 µs
    text = render_projection([("shards=1", [run(900.0, 100.0), run(1000.0, 200.0), run(1100.0, 90.0)])])
    row = next(line for line in text.splitlines() if line.startswith("shards=1") and "service only" in line)
    assert "10,000 [distributor]" in row, text  # 1e6 / 100 µs (the median run's 200 µs: 5,000)
    assert "median over the runs" in text


def test_window_demands_are_the_reference_s_when_there_is_one() -> None:
    from bench.fairness import window_demands
    from flowshard.reference import FlowRef

    refs = [FlowRef(demand=d, seconds=0.01, byte_seconds=0.0, weight=1.0) for d in (50.0, 10.0)]
    assert window_demands([0.0, 7.0], refs, 0.7) == pytest.approx([35.0, 7.0])  # a backlog from before counts
    assert window_demands([0.0, 7.0], None, 0.7) == [0.0, 7.0]  # no reference (truncated log): the arrivals


def test_fair_shares_max_min() -> None:
    # capacity 14 over demands 3, 7, 9, 1 -> 3, 5, 5, 1 (the analysis.max_min_fair example)
    shares, fairs, jain = fair_shares([3, 5, 5, 1], [3, 7, 9, 1], [1, 1, 1, 1])
    assert fairs == pytest.approx([3 / 14, 5 / 14, 5 / 14, 1 / 14])
    assert shares == pytest.approx(fairs) and jain == pytest.approx(1.0)
    _, _, unfair = fair_shares([1, 9], [10, 10], [1, 1])
    assert unfair is not None and unfair < 0.7
    assert fair_shares([0, 0], [1, 1], [1, 1]) == ([None, None], [None, None], None)


def test_part_of_splits_each_arrival_kind() -> None:
    s = load_scenario(SCENARIO)
    a, b, c, d = s.workload.flows
    parts = [part_of(a, i, 3) for i in range(3)]
    assert all(p is not None and isinstance(p.arrival, Poisson) and p.arrival.rate == pytest.approx(100 / 3)
               for p in parts)
    sizes = [p.arrival.size if p is not None and isinstance(p.arrival, Bursts) else 0
             for p in (part_of(b, i, 3) for i in range(3))]
    assert sizes == [4, 3, 3]
    clients = [p.arrival.concurrency if p is not None and isinstance(p.arrival, Closed) else 0
               for p in (part_of(c, i, 7) for i in range(7))]
    assert clients == [1, 1, 1, 1, 1, 0, 0] and part_of(c, 6, 7) is None
    starts = [p.start for p in (part_of(d, i, 2) for i in range(2)) if p is not None]
    assert starts == pytest.approx([0.0, 0.02])  # interleaved: together one request every 1/50 s
    assert all(isinstance(p.arrival, Constant) for p in (part_of(d, i, 2) for i in range(2)) if p is not None)
    assert part_of(a, 0, 1) is a


def test_adjust_rate_concurrency_duration() -> None:
    s = load_scenario(SCENARIO)
    assert offered_rate(s) == pytest.approx(200 + 10 + 50)
    t = adjust(s, rate=520.0, concurrency=10, duration=2.0)
    assert offered_rate(t) == pytest.approx(520.0)
    assert t.workload.duration == 2.0 and t.workload.warmup == 1.0
    closed = [f.arrival for f in t.workload.flows if isinstance(f.arrival, Closed)]
    assert [a.concurrency for a in closed] == [10]
    assert adjust(s, duration=0.5).workload.warmup == pytest.approx(0.1)
    only_closed = load_scenario(
        '[workload]\nduration = 1.0\n[[workload.flows]]\nid = "c"\n'
        'arrival = { kind = "closed", concurrency = 2, think = 0.1 }\nservice = 0.01\n'
    )
    with pytest.raises(ConfigError):
        adjust(only_closed, rate=10.0)


def _log(rows: list[tuple[int, float, float, int, int]]) -> dict[str, np.ndarray]:
    """rows: (flow, sent, done, outcome, size)."""
    a = np.array(rows, dtype=np.float64).reshape(-1, 5)
    return {"flow": a[:, 0].astype(np.int32), "intended": a[:, 1], "sent": a[:, 1], "done": a[:, 2],
            "outcome": a[:, 3].astype(np.int8), "size": a[:, 4].astype(np.int64),
            "tokens": np.zeros(len(a), np.int64), "wait": np.zeros(len(a), np.float32),
            "service": np.zeros(len(a), np.float32)}


def test_service_difference_between_backlogged_flows() -> None:
    # flows 0 and 1 both backlogged over [0, 10]; flow 0 gets 3 dispatches before flow 1 gets any
    rows = [(0, 0.0, t, 0, 1) for t in (1.0, 2.0, 3.0)] + [(1, 0.0, 4.0, 0, 1), (1, 0.0, 9.0, 0, 1)]
    log = _log(rows)
    diff = service_difference(log, np.array([0, 1], np.int32), {0: 1.0, 1: 1.0}, "requests", (0.0, 10.0))
    assert diff == pytest.approx(3.0)
    weighted = service_difference(log, np.array([0, 1], np.int32), {0: 3.0, 1: 1.0}, "requests", (0.0, 10.0))
    assert weighted == pytest.approx(1.0)
    assert service_difference(log, np.array([0], np.int32), {0: 1.0}, "requests", (0.0, 10.0)) is None


def test_apparent_inversions_need_overlap_beyond_tolerance() -> None:
    band_of = np.array([0, 1], np.int32)  # flow 0 in the higher band
    # a high request outstanding over [0, 1]; low dispatches answered at 0.5 (inside), 1.5 (after), 0.9995 (edge)
    log = _log([(0, 0.0, 1.0, 0, 1), (1, 0.4, 0.5, 0, 1), (1, 1.4, 1.5, 0, 1), (1, 0.99, 0.9995, 0, 1)])
    assert apparent_inversions(log, band_of, 2, (0.0, 2.0), 0.005) == [0, 1]
    # a high request shorter than twice the tolerance never counts
    short = _log([(0, 0.0, 0.004, 0, 1), (1, 0.0, 0.002, 0, 1)])
    assert apparent_inversions(short, band_of, 2, (0.0, 1.0), 0.005) == [0, 0]
    assert not math.isnan(sum(apparent_inversions(short, band_of, 2, (0.0, 1.0), 0.0)))


def test_plot_without_matplotlib_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from bench.plot import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    message = plot(str(tmp_path / "p.png"), {"configs": [], "runs": {}})
    assert "not installed" in message and not (tmp_path / "p.png").exists()


def test_adjust_validates_like_a_file() -> None:
    s = load_scenario(SCENARIO)
    with pytest.raises(ConfigError, match=r"--warmup: -1 is not allowed"):  # named by its flag
        adjust(s, warmup=-1.0)
    with pytest.raises(ConfigError, match=r"workload.flows\[0\].arrival.rate"):
        adjust(s, rate=1e12)  # beyond what a flow's rate may be


def test_shard_and_rate_lists_drop_repeats_in_order() -> None:
    from bench.cli import _list

    assert _list("4,1,4,2,1", int, "--shards") == [4, 1, 2]
    with pytest.raises(ConfigError, match="--rate: expected positive numbers"):
        _list("100,0", float, "--rate")


def _run(dispatched: int, rejected: int, ttl: int) -> dict[str, object]:
    return {"counts": {"submitted": dispatched + rejected + ttl, "dispatched": dispatched,
                       "rejected": {"capacity": rejected, "shutting_down": 0},
                       "evicted": {"ttl": ttl, "cancelled": 0, "displaced": 0, "shard_failure": 0, "shutdown": 0},
                       "errors": 0, "unfinished": 0}}


def test_aggregate_shows_outcome_reasons_that_occurred() -> None:
    from bench.report import aggregate

    agg = aggregate([_run(10, 0, 3), _run(12, 0, 0), _run(11, 0, 1)])
    assert agg["submitted"] == {"min": 12, "median": 12, "max": 13, "n": 3}
    assert agg["dispatched"]["median"] == 11
    assert agg["evicted:ttl"] == {"min": 0, "median": 1, "max": 3, "n": 3}
    assert "rejected:capacity" not in agg and "evicted:displaced" not in agg and "errors" not in agg


def test_simulator_comparison_gives_differences() -> None:
    from bench.simcompare import comparison
    from flowshard.simulate import simulate

    report = simulate(load_scenario(SCENARIO))
    g = report.groups[0]
    assert g.share is not None and g.wait.p50 is not None and g.wait.p99 is not None
    measured = {"id": g.id, "share": g.share + 0.05, "flows": 2,
                "wait_ms": {"p50": g.wait.p50 * 1000 + 2.0, "p99": None},
                "counts": {"dispatched": 7, "rejected": {"capacity": 1}, "evicted": {"ttl": 0}}}
    runs = [{"groups": [measured], "bands": []}]
    cmp = comparison(report, runs)
    first = next(c for c in cmp["groups"] if c["id"] == g.id)
    assert first["diff"]["share_pp"] == pytest.approx(5.0)
    assert first["diff"]["wait_p50_ms"] == pytest.approx(2.0)
    assert first["diff"]["wait_p99_ms"] is None  # nothing measured: no difference claimed
    assert first["measured"]["rejected"] == 1
    others = [c for c in cmp["groups"] if c["id"] != g.id]
    assert others and all(c["measured"]["share"] is None and c["diff"]["share_pp"] is None for c in others)


def test_latency_counts_unanswered_requests_at_their_age_and_marks_lower_bounds() -> None:
    """Survivorship: 100 answered requests at 1..100 ms and 300 unanswered for 500+ ms. The answered-only
    p50 is 50 ms; counting every request sent in the window, p50 falls among the unanswered: >= 500 ms."""
    from bench.histogram import Histogram
    from bench.loadgen import UNFINISHED
    from bench.report import aggregate, bounded_latency_figures, cell, latency_with_unanswered

    answered = Histogram()
    for ms in range(1, 101):
        answered.record(ms * 1_000_000)
    # unanswered at the end (t = 10 s): 300 sent at 9.5 s (waited 500 ms), one at 0.5 s (before the window)
    n = 300
    log = {"outcome": np.array([UNFINISHED] * (n + 1) + [0], dtype=np.int8),
           "intended": np.array([9.5] * n + [0.5, 5.0]), "done": np.array([10.0] * (n + 1) + [5.001])}
    h, youngest = latency_with_unanswered(log, answered, 1.0, 10.0, n)
    assert h.count == 100 + n and youngest == pytest.approx(500e6, rel=1e-6)
    assert answered.count == 100  # the answered-only histogram is left as it was
    fig = bounded_latency_figures(h, youngest, n)
    assert fig["p50"] == pytest.approx(500_000, rel=0.01)  # µs: not the survivors' 50 ms
    assert {"p50", "p90", "p99", "p999"} <= set(fig["lower_bounds"]) and fig["unanswered"] == n
    agg = aggregate([{"latency_us": fig}])
    assert cell(agg["latency p50 µs"]).startswith("≥ ")
    # all answered: exact figures, no marks
    h2, youngest2 = latency_with_unanswered(log | {"outcome": np.zeros(n + 2, dtype=np.int8)}, answered, 1.0, 10.0, 0)
    fig2 = bounded_latency_figures(h2, youngest2, 0)
    assert youngest2 is None and fig2["lower_bounds"] == [] and fig2["p50"] == pytest.approx(50_000, rel=0.01)
    assert not cell(aggregate([{"latency_us": fig2}])["latency p50 µs"]).startswith("≥")
    # only the slowest few unanswered: p50 stays exact, p99 is a lower bound
    few = {k: np.concatenate([v[:3], v[-1:]]) for k, v in log.items()}
    h3, youngest3 = latency_with_unanswered(few, answered, 1.0, 10.0, 3)
    fig3 = bounded_latency_figures(h3, youngest3, 3)
    assert "p50" not in fig3["lower_bounds"] and "p99" in fig3["lower_bounds"]
    # a truncated log that lacks some of them: they count at age 0, and every percentile is a lower bound
    h4, youngest4 = latency_with_unanswered(few, answered, 1.0, 10.0, 10)
    assert h4.count == 110 and youngest4 == 0
    assert set(bounded_latency_figures(h4, youngest4, 10)["lower_bounds"]) >= {"p50", "p99"}


def test_counts_print_as_whole_numbers_and_their_median_is_a_run_s() -> None:
    from bench.report import UNANSWERED_ROW, aggregate, cell, fmt

    runs = [{"counts": {"submitted": 12, "dispatched": 7, "unfinished": 3}, "unanswered_in_window": 1,
             "throughput": {"dispatches_per_s": 2.5}, "server": {"priority_inversions": 0, "grants_narrowed": 1}},
            {"counts": {"submitted": 13, "dispatched": 8, "unfinished": 4}, "unanswered_in_window": 2,
             "throughput": {"dispatches_per_s": 3.5}, "server": {"priority_inversions": 0, "grants_narrowed": 4}}]
    agg = aggregate(runs)
    assert cell(agg["submitted"]) == "12 (12–13)" and cell(agg["unfinished"]) == "3 (3–4)"
    # the service's own counts too (they printed "2.50 (1–4)", and "1.00" for 1 and 1)
    assert cell(agg["grants narrowed (service)"]) == "1 (1–4)" and cell(agg["priority inversions (service)"]) == "0"
    assert cell(agg[UNANSWERED_ROW[0]]) == "1 (1–2)"
    assert agg["dispatches/s"]["median"] == 3.0  # rates keep the true median
    assert fmt(12) == "12" and fmt(5) == "5" and fmt(1234567) == "1,234,567" and fmt(12.0) == "12.0"


def test_server_figures_carry_the_services_own_priority_counts() -> None:
    """The exact inversion count (and narrowed grants) from /v1/stats, summed over bands; absent
    (None) for a service that does not report them, so no zero is claimed for it."""
    from bench.report import _server_stats

    stats = {"totals": {}, "shards": [], "bands": [
        {"name": "hi", "priority_inversions": 0, "grants_narrowed": 0},
        {"name": "lo", "priority_inversions": 2, "grants_narrowed": 5},
    ]}
    got = _server_stats(stats, since_start=False)
    assert got is not None and (got["priority_inversions"], got["grants_narrowed"]) == (2, 5)
    old = _server_stats({"totals": {}, "shards": [], "bands": [{"name": "hi"}]}, since_start=False)
    assert old is not None and old["priority_inversions"] is None


def test_a_target_gets_no_server_cost_and_its_own_cpu_is_not_called_a_disturbance() -> None:
    """A --target's processes are not ours to read: no "server CPU µs/req 0", and the cores the
    service under test used are not reported as other processes disturbing the figures."""
    from types import SimpleNamespace

    from bench.procstat import CpuSample, MachineSample, ProcId
    from bench.report import _cpu

    def record(procs: dict[ProcId, float]) -> Any:
        return SimpleNamespace(
            window=1.0, cpu_start={p: CpuSample(0.0, 0.0) for p in procs},
            cpu_end={p: CpuSample(cpu, 0.0) for p, cpu in procs.items()},
            machine_start=MachineSample(0.0, 0.0, 0.0), machine_end=MachineSample(1.5, 0.5, 0.0),
        )

    gen = ProcId(1, 1, "loadgen0")
    warnings: list[str] = []
    target = _cpu(record({gen: 0.5}), 1000, warnings, {})
    assert target["server_us_per_req"] is None and target["projection"] is None
    assert len(warnings) == 1 and "--target service's own included" in warnings[0] and "disturbed" not in warnings[0]
    warnings = []
    own = _cpu(record({gen: 0.5, ProcId(2, 2, "distributor"): 0.4}), 1000, warnings, {})
    assert own["server_us_per_req"] == pytest.approx(400.0) and own["projection"] is not None
    assert [w for w in warnings if "ticks" not in w] == [w for w in warnings if "figures are disturbed" in w]
    assert len(warnings) == 2  # (and the distributor's 0.4 s said coarse: below)
    # review 181: a figure from 0.04 s of CPU was printed to five figures; now the ±, on the processes
    # that matter (a tenth of the busiest or more: 8 shards' idle workers say nothing)
    warnings = []
    _cpu(record({gen: 0.5, ProcId(2, 2, "distributor"): 0.04, ProcId(3, 3, "worker0"): 0.003}), 1000, warnings, {})
    coarse = [w for w in warnings if "ticks" in w]
    assert len(coarse) == 1 and coarse[0].startswith("1 server process(es) used under 1 s") and "±25 %" in coarse[0]
    warnings = []
    _cpu(record({gen: 0.5, ProcId(2, 2, "distributor"): 4.0}), 1000, warnings, {})
    assert not [w for w in warnings if "ticks" in w]


def test_the_server_cpu_counts_the_acceptor_processes() -> None:
    """With acceptors the server's CPU per request is the distributor's, the workers' and the
    acceptors' (it left the acceptors out, so a configuration with acceptors looked cheaper)."""
    from types import SimpleNamespace

    from bench.procstat import CpuSample, MachineSample, ProcId
    from bench.report import _cpu

    procs = {ProcId(1, 1, "distributor"): 0.4, ProcId(2, 2, "worker0"): 0.2, ProcId(3, 3, "acceptor0"): 0.1,
             ProcId(4, 4, "acceptor1"): 0.15, ProcId(5, 5, "loadgen0"): 0.3}
    rec = SimpleNamespace(window=1.0, cpu_start={p: CpuSample(0.0, 0.0) for p in procs},
                          cpu_end={p: CpuSample(cpu, 0.0) for p, cpu in procs.items()},
                          machine_start=MachineSample(0.0, 0.0, 0.0), machine_end=MachineSample(1.15, 0.0, 0.0))
    got = _cpu(rec, 1000, [], {})
    assert got["server_us_per_req"] == pytest.approx(850.0)
    assert got["kinds"]["acceptors"] == {"processes": 2, "cpu_s": 0.25, "util": 0.25, "us_per_req": 250.0}


def test_blocked_by_higher_is_the_time_a_band_above_had_work_waiting() -> None:
    """Strict priority's share for the reference: a request waits from its arrival at the service to its
    dispatch (the audit's times; else sent and answered), an unfinished one until the end; rejections
    never wait; a band above with a lower ceiling leaves room above it, so it does not count."""
    import numpy as np

    from bench.fairness import blocked_by_higher
    from bench.loadgen import UNFINISHED

    nan = float("nan")
    log = {  # flows 0, 1 in band 0; flow 2 in band 1; flow 3 in band 2
        "flow": np.array([0, 1, 0, 1, 2, 3]),
        "outcome": np.array([0, 0, 1, UNFINISHED, 0, 0]),
        "sent": np.array([0.9, 2.5, 7.0, 8.0, 0.0, 0.0]),
        "done": np.array([4.2, 6.3, 7.1, 10.0, 9.0, 9.0]),
        "s_recv": np.array([1.0, nan, 7.0, nan, 0.0, 0.0]),
        "s_disp": np.array([4.0, nan, nan, nan, 9.0, 9.0]),
    }
    band_of_flow = np.array([0, 0, 1, 2])
    # band 0 waited [1, 4] and [2.5, 6.3] (no audit: sent to answer) and [8, 10] (unfinished): 7.3 of 10 s;
    # the rejection at 7 never waited. Band 1 waited [0, 9].
    assert blocked_by_higher(log, band_of_flow, [1.0, 1.0, 1.0], (0.0, 10.0)) == pytest.approx([0.0, 0.73, 1.0])
    # band 0's ceiling 0.5 is below the others': it leaves them the upper half, so only band 1 counts for 2
    assert blocked_by_higher(log, band_of_flow, [0.5, 1.0, 1.0], (0.0, 10.0)) == pytest.approx([0.0, 0.0, 0.9])
    # clipped to the window
    assert blocked_by_higher(log, band_of_flow, [1.0, 1.0, 1.0], (5.0, 10.0)) == pytest.approx([0.0, 0.66, 1.0])


def test_a_slot_is_held_until_the_generator_released_it_not_for_the_nominal_service() -> None:
    """`slot_holds`: the answer's way back, as long again for the release's way in, and how late the
    generator's timer ended the service (a fair split read 2.4-4 % below its allocation on every flow
    while that lateness went uncounted); a request never released in the run adds no lateness; one
    a timer ended early (set from the loop's cached time) held its slot that much less."""
    import numpy as np

    from bench.fairness import slot_holds

    nan = float("nan")
    log = {  # flow 0: two dispatches, 1 ms back each, released 0.3 ms and 0.1 ms late; flow 1: one, not released
        "flow": np.array([0, 0, 1, 1]),
        "outcome": np.array([0, 0, 0, 1]),
        "s_disp": np.array([1.0, 2.0, 3.0, nan]),
        "sent": np.array([0.99, 1.99, 2.99, 3.99]),
        "wait": np.array([0.0, 0.0, 0.0, 0.0], dtype=np.float32),
        "done": np.array([1.001, 2.001, 3.002, 4.0]),
        "service": np.array([0.004, 0.004, 0.004, 0.004], dtype=np.float32),
        "released": np.array([1.0053, 2.0051, nan, nan]),
    }
    holds = slot_holds(log, 2)
    assert holds == pytest.approx([0.002 + 0.0002, 0.004], abs=1e-7)
    log["released"] = np.array([1.0049, 2.0049, nan, nan])  # ended 0.1 ms early
    assert slot_holds(log, 2) == pytest.approx([0.002 - 0.0001, 0.004], abs=1e-7)
    # review 181: without the audit (no dispatch time) the way back is half the round trip less the wait
    log["s_disp"] = np.array([nan, nan, nan, nan])
    log["sent"] = np.array([0.996, 1.99, 2.99, 3.99])
    log["wait"] = np.array([0.003, 0.006, 0.008, 0.0], dtype=np.float32)
    holds = slot_holds(log, 2)  # flow 0: trips 2 and 5 ms (less the waits), ways back 1 and 2.5 ms, each
    # released 0.1 ms early: holds 1.9 and 4.9 ms; flow 1: a trip of 4 ms, 2 ms back, not released: 4 ms
    assert holds == pytest.approx([(0.0019 + 0.0049) / 2, 0.004], abs=1e-6)


def test_a_service_configured_unlike_the_scenario_is_named() -> None:
    """Review 2026-12-05 (D8): `bench --target` judged a service on the built-in defaults (budget 100,
    round-robin) by the scenario's [server] (budget 16, drr) and called it UNFAIR, silently."""
    from bench.report import config_mismatch
    from flowshard.config import BandConfig, BudgetConfig, Config

    scenario = Config(bands=[BandConfig(priority=0, fairness="drr")], budget=BudgetConfig(max_inflight_requests=16))
    same = {"totals": {"max_inflight_requests": 16, "max_inflight_bytes": None},
            "bands": [{"priority": 0, "fairness": "drr", "ordering": "fcfs"}]}
    assert config_mismatch(scenario, same) == ""
    assert config_mismatch(scenario, {}) == ""  # an echo server: nothing to compare
    other = {"totals": {"max_inflight_requests": 100, "max_inflight_bytes": None},
             "bands": [{"priority": 0, "fairness": "round-robin", "ordering": "fcfs"}]}
    assert config_mismatch(scenario, other) == (
        "max_inflight_requests 100, the scenario's 16; bands 0 round-robin/fcfs, the scenario's 0 drr/fcfs")


def test_a_configurations_warnings_are_said_once_each_with_the_runs_they_came_up_in() -> None:
    """Review 167: three runs of a configuration printed each of their warnings, 27 lines for three
    configurations, the same words with each run's figures."""
    from bench.report import _warnings_once

    runs = [{"warnings": ["the generator sent late: send lag p99 1.20 ms", "other processes used 0.40 cores"]},
            {"warnings": ["the generator sent late: send lag p99 3.50 ms", "other processes used 0.40 cores"]},
            {"warnings": ["the generator sent late: send lag p99 2.00 ms", "a run's own",
                          "load generator 0: HTTP connection lost", "load generator 0: HTTP connection lost"]}]
    assert _warnings_once(runs) == [
        "a run's own",
        "load generator 0: HTTP connection lost",  # (twice in one run: once here, not "in 2 of 3 runs")
        "other processes used 0.40 cores (in 2 of 3 runs)",
        "the generator sent late: send lag p99 3.50 ms (in 3 of 3 runs; the figures of the worst)",
    ]
    # whose a warning is stays apart (review 171: generator 1's was hidden behind generator 0's)
    apart = [{"warnings": ["load generator 0: HTTP connection lost", "load generator 1: HTTP connection lost",
                           "loadgen1 was 99% busy", "loadgen0 was 97% busy"]}]
    assert len(_warnings_once(apart)) == 4


def test_the_markdown_projection_is_the_reports() -> None:
    """Review 184: `bench.mdtable` (the tables in docs/benchmarks.md) still projected the median-throughput
    run's costs: 25,000/s in the markdown where the report said 20,000/s."""
    from bench.mdtable import projection_markdown
    from bench.report import render_projection

    runs = [{"throughput": {"dispatches_per_s": 1000.0},
             "projection": project_all({"distributor": 40.0, "shard0": 30.0, "loadgen0": 20.0})},
            {"throughput": {"dispatches_per_s": 1100.0},
             "projection": project_all({"distributor": 60.0, "shard0": 30.0, "loadgen0": 20.0})}]
    report = render_projection([("two", runs)])
    markdown = projection_markdown({"configs": [{"label": "two", "runs": runs}]})
    assert "20,000 [distributor]" in report and "20,000 (distributor)" in markdown
