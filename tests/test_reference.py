"""The fair reference (flowshard.reference): water-filling under both budget limits, intrinsic demands,
and the real-time capacity the bench uses."""

from __future__ import annotations

import math
from typing import Any

import pytest

from flowshard.reference import FlowRef, Verdict, judge, water_fill
from flowshard.scenario import expand_flows, load_scenario
from flowshard.simulate import reference_line


def refs(*demands: float, weights: tuple[float, ...] = ()) -> list[FlowRef]:
    w = weights or (1.0,) * len(demands)
    return [FlowRef(demand=d, seconds=1.0, byte_seconds=0.0, weight=x) for d, x in zip(demands, w, strict=True)]


def test_water_fill_is_apfs_fair_alloc() -> None:
    flows = refs(3, 7, 9, 1)
    water_fill(flows, 14, math.inf)
    assert [f.allocation for f in flows] == pytest.approx([3, 5, 5, 1])


def test_water_fill_weights_and_unequal_costs() -> None:
    flows = refs(100, 100, 100, weights=(1, 2, 3))
    water_fill(flows, 12, math.inf)
    assert [f.allocation for f in flows] == pytest.approx([2, 4, 6])
    # round robin's unit is requests: a flow of 2 s requests uses twice the slots per request
    mixed = [FlowRef(demand=100, seconds=s, byte_seconds=0, weight=1) for s in (1.0, 2.0)]
    water_fill(mixed, 9, math.inf)
    assert [f.allocation for f in mixed] == pytest.approx([3, 3])  # 3 req/s each: 3 + 6 slots


def test_water_fill_the_byte_budget_binds_too() -> None:
    flows = [FlowRef(demand=10, seconds=0.1, byte_seconds=100.0, weight=1) for _ in range(2)]
    water_fill(flows, 100, 1000)  # slots would allow 500 each; bytes allow 5 each
    assert [f.allocation for f in flows] == pytest.approx([5, 5])


def test_underloaded_flows_get_their_demand() -> None:
    flows = refs(1, 2)
    water_fill(flows, 10, math.inf)
    assert [f.allocation for f in flows] == [1, 2]


OPEN = """
name = "open"
[server.budget]
max_inflight_requests = 10
[[server.bands]]
priority = 0
ceiling = 0.5
[workload]
duration = 10.0
[[workload.flows]]
id = "a"
count = 2
arrival = { kind = "poisson", rate = 10 }
service = 1.0
"""


def _judge(offered: list[list[float]], busy: list[float]) -> tuple[list[FlowRef], list[Any]]:
    scenario = load_scenario(OPEN)
    specs = [i.spec for i in expand_flows(scenario.workload)]
    return judge(scenario, ["requests"], [0, 0], ["a-0", "a-1"], specs, [1.0, 1.0], offered, busy,
                 [(b, 0.0) for b in busy])


def test_capacity_is_the_ceiling_share_or_what_a_held_back_band_used() -> None:
    refs, verdicts = _judge([[20.0], [20.0]], [20.0, 20.0])  # 4 slots wanted, the ceiling allows 5
    assert verdicts[0].slots == 5 and [r.allocation for r in refs] == pytest.approx([2, 2])
    assert verdicts[0].fair is True
    refs, verdicts = _judge([[100.0], [100.0]], [20.0, 25.0])  # 20 wanted, 4.5 used: held to 5
    assert verdicts[0].slots == 5 and [r.allocation for r in refs] == pytest.approx([2.5, 2.5])
    assert verdicts[0].fair is False  # 2.0 and 2.5 of 2.5: identical requests, no noise allowed
    refs, verdicts = _judge([[100.0], [100.0]], [40.0, 44.0])  # it got 8.4 slots: more than averages say
    assert verdicts[0].slots == pytest.approx(8.4) and [r.allocation for r in refs] == pytest.approx([4.2, 4.2])


def test_sampling_noise_widens_the_margin_only_for_varying_requests() -> None:
    from flowshard.reference import allowance

    assert allowance(0.01, 0.0, 100) == 0.01  # identical requests: the margin alone
    assert allowance(0.05, 1.0, 900) == pytest.approx(0.05 + 3 / 30)  # exponential service, 900 requests


def test_a_fair_verdict_does_not_claim_the_bare_margin_when_noise_let_a_larger_error_through() -> None:
    """weighted-drr on the real service: max error 5.9 % judged fair (sampling noise), yet the line said
    "every flow within 5%"."""
    noisy = reference_line("p0", "drr", "bytes", Verdict(margin=0.05, slots=20.0, max_error=0.059, off=[], fair=True))
    assert "every flow within 5% of" not in noisy
    assert "sampling noise" in noisy and "5.9%" in noisy
    exact = reference_line("p0", "drr", "bytes", Verdict(margin=0.05, slots=20.0, max_error=0.01, off=[], fair=True))
    assert "every flow within 5% of its max-min allocation" in exact
