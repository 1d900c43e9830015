"""`python -m bench.servicediff`: a band's service difference broken down by pair, from records.

Two backlogged flows served in bursts of 10 (5 each, as fair-alloc's heavy flows at 4 and 8 shards):
when each burst gives one flow its 5 and then the other its 5, in an order that flips from burst to
burst, the VTC service difference is 10 requests although every burst is shared 5:5; counted between
bursts it is 0. Served alternately (as one shard's drr does) it is 1 request.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import servicediff
from flowshard import records
from flowshard.scenario import flow_weights, load_scenario
from flowshard.simulate import audit_header, read_scenario

SIZE = 1000


def _rows(order: str, bursts: int = 20) -> list[list[object]]:
    """Flows f and g, each with 7 requests queued from t=0 and one more sent at each dispatch (closed
    loop); burst k at 50 ms * (k + 1) dispatches 5 of each, 0.1 ms apart, in `order`."""
    rows: list[list[object]] = []
    seq = 0
    for k in range(bursts):
        t0 = 0.05 * (k + 1)
        if order == "blocks":
            who = ["f"] * 5 + ["g"] * 5 if k % 2 == 0 else ["g"] * 5 + ["f"] * 5
        else:
            who = ["f", "g"] * 5
        for i, flow in enumerate(who):
            seq += 1
            at = t0 + i * 1e-4
            rows.append([flow, "p0", seq, 0.0 if k == 0 else t0 - 0.04, at, at + 0.05, 0, "dispatched", SIZE, 0, 0.05])
    for flow in ("f", "g"):  # still waiting at the end: backlogged throughout
        seq += 1
        rows.append([flow, "p0", seq, 0.0, None, 0.05 * (bursts + 1), 0, "unfinished", SIZE, 0, None])
    return rows


def _decoded(rows: list[list[object]]) -> list[dict[str, object]]:
    return records.decode(records.encode("bench", "t", rows))[1]


@pytest.mark.parametrize(("order", "pairwise", "between", "run"), [("blocks", 10, 0, 10), ("alternate", 1, 0, 1)])
def test_breakdown_of_bursts_served_in_blocks_or_alternately(order: str, pairwise: int, between: int,
                                                             run: int) -> None:
    (band,) = servicediff.breakdown(_decoded(_rows(order))).values()
    assert band == {"f/g": {"pairwise": pairwise * SIZE, "between_bursts": between * SIZE, "longest_run": run}}


def test_a_burst_that_one_flow_misses_counts_between_bursts_too() -> None:
    """g gets nothing in one burst while both wait: that is a difference between bursts as well."""
    rows = [r for r in _rows("alternate") if not (r[0] == "g" and isinstance(r[4], float) and 0.30 <= r[4] < 0.31)]
    (band,) = servicediff.breakdown(_decoded(rows)).values()
    assert band["f/g"]["between_bursts"] == 5 * SIZE  # the burst g missed
    assert band["f/g"]["pairwise"] == 6 * SIZE  # and f's first dispatch of a neighbouring burst


def test_a_request_served_last_in_its_burst_is_not_a_difference_between_bursts() -> None:
    """A thin flow's request that arrives just before a burst and is dispatched last in it waited
    through the heavy flow's block of 5: 5 requests by the paper's definition, none between bursts."""
    rows: list[list[object]] = []
    for k in range(10):
        t0 = 0.05 * (k + 1)
        for i in range(5):
            rows.append(["heavy", "p0", len(rows), 0.0, t0 + i * 1e-4, t0 + 0.05, 0, "dispatched", SIZE, 0, 0.05])
        rows.append(["thin", "p0", len(rows), t0 - 1e-4, t0 + 5e-4, t0 + 0.05, 1, "dispatched", SIZE, 0, 0.05])
    rows.append(["heavy", "p0", len(rows), 0.0, None, 0.6, 0, "unfinished", SIZE, 0, None])
    (band,) = servicediff.breakdown(_decoded(rows)).values()
    assert band["heavy/thin"] == {"pairwise": 5 * SIZE, "between_bursts": 0.0, "longest_run": 5}


def test_cli_prints_each_run_and_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(records.encode("bench", "t", _rows("blocks"), label="shards=4", run=0))
    assert servicediff.main([str(path), "--burst-gap", "5"]) == 0
    out = capsys.readouterr().out
    assert "== source=bench label=shards=4 run=0" in out
    assert "f/g" in out and "10,000" in out


def test_cli_takes_the_flows_own_weights_from_the_scenario(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A flow's `weight` in `[[workload.flows]]` is its weight, as the server and the bench apply it (a
    review: only `[server.weights]` was read, so weighted differences came out 100-400 times too large).
    Flow f (weight 2) is served twice as often as g, both backlogged throughout: fair by weight."""
    rows: list[list[object]] = []
    for k in range(60):
        for i, flow in enumerate(("f", "f", "g")):
            at = 0.01 * (k + 1) + i * 1e-3
            rows.append([flow, "p0", 3 * k + i + 1, 0.0, at, at + 0.01, 0, "dispatched", SIZE, 0, 0.01])
    for n, flow in enumerate(("f", "g")):
        rows.append([flow, "p0", 1000 + n, 0.0, None, 0.7, 0, "unfinished", SIZE, 0, None])
    path = tmp_path / "r.jsonl"
    path.write_bytes(records.encode("bench", "t", rows, run=0))
    scenario = tmp_path / "s.toml"
    flow = 'arrival = { kind = "poisson", rate = 10 }\nsize = 1000\nservice = 0.01\n'
    scenario.write_text('[[server.bands]]\npriority = 0\nfairness = "drr"\n\n[workload]\nduration = 0.7\n\n'
                        f'[[workload.flows]]\nid = "f"\nweight = 2.0\n{flow}\n[[workload.flows]]\nid = "g"\n{flow}')

    def worst() -> float:
        line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("f/g"))
        return float(line.split()[1].replace(",", ""))

    assert servicediff.main([str(path), "--window", "0", "0.7"]) == 0
    unweighted = worst()
    assert servicediff.main([str(path), "--scenario", str(scenario), "--window", "0", "0.7"]) == 0
    weighted = worst()
    assert unweighted >= 50 * SIZE and weighted <= 2 * SIZE, (unweighted, weighted)
    # the records alone: their header says the weights (as `flowshard simulate` and `bench` write it)
    head = audit_header(load_scenario(scenario.read_text()))
    assert head == {"units": {"p0": "bytes"}, "weights": {"f": 2.0}, "window": [0.0, 0.7]}
    path.write_bytes(records.encode("bench", "t", rows, run=0, **head))
    assert servicediff.main([str(path)]) == 0
    assert worst() == weighted


def test_simulated_records_carry_the_scenarios_units_weights_and_window(tmp_path: Path) -> None:
    """`flowshard simulate --records` writes what an audit needs of the scenario in the header (the
    records have no weight column): an auditor with the records alone judges weighted flows."""
    from flowshard.cli import main as cli

    path = tmp_path / "r.jsonl"
    assert cli(["simulate", "weighted-drr", "--records", str(path)]) == 0
    head, rows = records.decode(path.read_bytes())
    scenario = read_scenario("weighted-drr")
    assert head["units"] == {b.name: "bytes" for b in scenario.server.bands}
    assert head["weights"] and head["weights"] == {f: w for f, w in flow_weights(scenario).items() if w != 1.0}
    assert head["window"] == [scenario.workload.warmup, scenario.workload.duration]
    assert {r["flow"] for r in rows} >= set(head["weights"])


def test_the_window_is_the_records_own_before_the_scenarios(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Review 170: with `--scenario` (for units and weights, as the README shows it) the scenario file's
    (warmup, duration) replaced the header's window, which is the run's own after the bench's
    `--duration` and `--warmup` (its figures used it). `--window` first, then the header's, then the
    scenario's."""
    rows = _rows("blocks")
    path = tmp_path / "r.jsonl"
    path.write_bytes(records.encode("bench", "t", rows, run=0, window=[0.0, 0.06]))
    scenario = tmp_path / "s.toml"
    flow = 'arrival = { kind = "poisson", rate = 10 }\nsize = 1000\nservice = 0.01\n'
    scenario.write_text('[[server.bands]]\npriority = 0\nfairness = "drr"\n\n[workload]\nduration = 30\n'
                        f'warmup = 0.5\n\n[[workload.flows]]\nid = "f"\n{flow}\n[[workload.flows]]\nid = "g"\n{flow}')

    def out(*flags: str) -> str:
        assert servicediff.main([str(path), *flags]) == 0
        return "\n".join(line for line in capsys.readouterr().out.splitlines() if line.startswith("  "))

    told = out("--window", "0", "0.06")
    assert out() == told and out("--scenario", str(scenario)) == told
    assert out("--window", "0.5", "30") != told  # (the scenario's window: a different figure, so the check can fail)
