"""The in-process engine benchmark (`python -m bench.engine`): structure, not speed.

Performance is measured by running the benchmark, not asserted in tests: nothing here looks at a rate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.engine import (
    POLICIES,
    Coordinate,
    coordinates,
    main,
    make_config,
    measure,
    measure_group,
    zipf_table,
)
from flowshard.engine import Engine


def test_matrix_follows_the_upstream_skip_rule() -> None:
    coords = coordinates()
    names = {c.name for c in coords}
    assert len(coords) == 16
    assert all(c.ingress <= 100 for c in coords if c.limit == 0)
    assert all(c.ingress > c.limit for c in coords if c.limit > 0)
    assert "L=0 P=1 F=10 W=10" in names
    assert "L=0 P=1 F=10 W=5000" not in names  # free flow only with little ingress
    assert "L=100 P=8 F=5000 W=10" not in names  # a limit only when W exceeds it
    for c in coords:  # every F=10 coordinate has its F=5000 twin, for the ratio
        assert c.matching(5000 if c.flows == 10 else 10) in coords


def test_zipf_table_is_deterministic_and_skewed() -> None:
    table = zipf_table(5000)
    assert len(table) == 32768  # next power of two >= 4F
    assert table == zipf_table(5000)
    counts: dict[str, int] = {}
    for name in table:
        counts[name] = counts.get(name, 0) + 1
    assert max(counts, key=lambda k: counts[k]) == "flow-0"
    assert counts["flow-0"] > 10 * counts.get("flow-100", 0)
    assert set(zipf_table(10)) <= {f"flow-{k}" for k in range(10)}


def test_config_has_one_band_per_priority_and_the_limit() -> None:
    config = make_config(Coordinate(100, 8, 10, 5000), "vtc")
    assert sorted(b.priority for b in config.bands) == list(range(8))
    assert {b.fairness for b in config.bands} == {"vtc"}
    assert config.budget.max_inflight_requests == 100
    free = Engine(make_config(Coordinate(0, 1, 10, 10), "drr"))
    assert free.budget.saturation() == 0.0  # L=0: never saturated


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(
    ("coord", "asked", "expected"),
    [
        (Coordinate(1, 8, 5000, 10), 250, 250),  # one dispatch per pump: exact
        (Coordinate(100, 1, 10, 5000), 150, 200),  # 100 per pump: rounded up to whole pumps
        (Coordinate(0, 8, 10, 10), 95, 100),  # free flow: everything queued goes at once
    ],
)
def test_measure_counts_every_request(policy: str, coord: Coordinate, asked: int, expected: int) -> None:
    m = measure(coord, policy, asked, warmup=50)
    assert m.dispatches == expected
    assert m.dispatched == m.warmup + m.dispatches
    assert m.submitted == m.dispatched + m.queued  # no item lost
    assert m.queued == coord.ingress  # W kept in the system
    assert m.inflight == 0  # every slot released
    assert m.other_outcomes == 0
    assert m.seconds > 0 and m.cpu_seconds >= 0


def test_group_interleaves_coordinates_with_exact_counts() -> None:
    group = [Coordinate(100, 8, 10, 5000), Coordinate(100, 8, 5000, 5000)]
    few, many = measure_group(group, "global-fcfs", 1000, warmup=200, slices=3)
    for m, coord in ((few, group[0]), (many, group[1])):
        assert m.coordinate == coord.name
        assert m.dispatches == 1000 and m.warmup == 200
        assert m.submitted == m.dispatched + m.queued and m.queued == 5000
        assert m.inflight == 0 and m.other_outcomes == 0


def test_quick_run_reports_every_coordinate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    argv = ["--quick", "--json", str(out), "--limits", "1,100", "--bands", "8", "--ingress", "5000"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    doc: dict[str, Any] = json.loads(out.read_text())

    expected = {c.name for c in coordinates([1, 100], [8], [10, 5000], [5000])}
    assert len(expected) == 4
    got = {(r["coordinate"]["name"], r["policy"]) for r in doc["results"]}
    assert got == {(c, p) for c in expected for p in POLICIES}
    for name in expected:
        assert f"| {name} |" in printed
    for result in doc["results"]:
        for run in result["runs"]:
            assert run["dispatches"] == doc["parameters"]["dispatches"] == 1000
            assert run["submitted"] == run["dispatched"] + run["queued"]
            assert run["queued"] == 5000 and run["inflight"] == 0 and run["other_outcomes"] == 0
    assert doc["lost"] == 0
    for clock in ("wall", "cpu"):
        pairs = {(r["coordinate"], r["policy"]) for r in doc["ratios"][clock]}
        assert len(pairs) == 2 * len(POLICIES)  # L=1 and L=100, each policy
        assert set(doc["targets"][clock]) >= {"rate_met", "ratio_met", "rate_min", "ratio_min"}
    assert doc["machine"]["python"]


def test_repeat_keeps_every_round(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["--quick", "--repeat", "2", "--json", str(out), "--limits", "0", "--bands", "1", "--policies", "drr"]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert [len(r["runs"]) for r in doc["results"]] == [2, 2]  # F=10 and F=5000, two rounds each
    assert [len(r["per_round"]) for r in doc["ratios"]["wall"]] == [2]


def test_no_coordinate_left_is_an_error() -> None:
    assert main(["--quick", "--limits", "100", "--ingress", "10"]) == 2


def test_benchmark_one_coordinate(benchmark: Any) -> None:
    """pytest-benchmark entry (run once under the default --benchmark-disable)."""
    m = benchmark(measure, Coordinate(100, 1, 5000, 5000), "drr", 1000, 1000)
    assert m.dispatches == 1000
    assert m.submitted == m.dispatched + m.queued
