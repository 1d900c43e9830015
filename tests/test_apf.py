"""Kubernetes APF's fairness cases (TestFairAlloc and friends) for every fairness policy on its *default*
configuration: closed-loop clients on a fake clock, fixed service times (as APF's fake-clock tests),
per-flow average concurrency compared with the water-filling of the flows' intrinsic demands
(clients x service / (service + think)), margin 1 %. global-fcfs is the negative control: it must fail.
"""

from __future__ import annotations

import pytest
from conftest import make_engine, share_error
from fairsim import FlowSpec, run

from flowshard.analysis import max_min_fair
from flowshard.fairness import DeficitRoundRobin

MARGIN = 0.01
WARMUP, DURATION = 20.0, 520.0
FAIR = ["round-robin", "drr", "vtc"]
CASES = {  # name: (clients per flow, slots, request size range)
    "fair-alloc-3-7-9-1": ([3, 7, 9, 1], 14, 1000),
    "24-vs-8-on-8": ([24, 8], 8, 1000),
    "24-vs-8-mixed-sizes": ([24, 8], 8, (500, 1500)),
    "equal": ([5, 5, 5], 6, 1000),
}


def concurrency(fairness: str, clients: list[int], slots: int, size, think: float = 0.0):
    """(measured average concurrency per flow, water-filled allocation of the intrinsic demands)."""
    engine = make_engine([{"priority": 0, "fairness": fairness}], max_inflight_requests=slots, default_ttl=0)
    specs = [FlowSpec(f"f{i}", clients=c, size=size, think=think) for i, c in enumerate(clients)]
    result = run(engine, specs, duration=DURATION, service=1.0)
    unit = "bytes" if fairness == "drr" and not isinstance(size, int) else "requests"
    served = result.served(WARMUP, DURATION, unit)
    measured = [served.get(s.flow, 0.0) for s in specs]
    if unit == "bytes":  # byte-fair: the allocation is of bytes; demands in bytes per second of a slot
        window = DURATION - WARMUP
        demands = [c * sum(size) / 2 / (1.0 + think) * window for c in clients]
        return measured, max_min_fair(demands, sum(measured))  # capacity: the bytes the slots carried
    window = DURATION - WARMUP
    demands = [c * 1.0 / (1.0 + think) for c in clients]
    return [m / window for m in measured], max_min_fair(demands, slots)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fairness", FAIR)
def test_default_policies_meet_apf_margin(fairness, case):
    clients, slots, size = CASES[case]
    measured, alloc = concurrency(fairness, clients, slots, size)
    errors = [share_error(m, a) for m, a in zip(measured, alloc, strict=True)]
    assert max(errors) <= MARGIN, (measured, alloc)


def test_fair_alloc_reference_is_apfs():
    assert max_min_fair([3, 7, 9, 1], 14) == [3, 5, 5, 1]
    assert max_min_fair([24, 8], 8) == [4, 4]


@pytest.mark.parametrize("case", ["fair-alloc-3-7-9-1", "24-vs-8-on-8"])
def test_negative_control_global_fcfs_fails_the_margin(case):
    clients, slots, size = CASES[case]
    measured, alloc = concurrency("global-fcfs", clients, slots, size)
    assert max(share_error(m, a) for m, a in zip(measured, alloc, strict=True)) > 0.2


def test_negative_control_drr_with_a_large_fixed_quantum_fails():
    """The old default (16 KiB for 1 KB requests): deep queues send bursts, thin flows forfeit turns."""
    engine = make_engine([{"priority": 0, "fairness": "drr", "quantum": 16384}], max_inflight_requests=8,
                         default_ttl=0)
    result = run(engine, [FlowSpec("a", clients=24, size=1000), FlowSpec("b", clients=8, size=1000)],
                 duration=DURATION, service=1.0)
    served = result.served(WARMUP, DURATION)
    assert share_error(served["b"] / (DURATION - WARMUP), 4.0) > 0.1


def test_adaptive_quantum_follows_the_sizes_seen():
    engine = make_engine([{"priority": 0, "fairness": "drr"}], default_ttl=0)
    drr = engine.bands[0].fairness
    assert isinstance(drr, DeficitRoundRobin)
    from flowshard.types import Request

    rid = 0

    def burst(size: int, n: int) -> None:
        nonlocal rid
        for _ in range(n):
            rid += 1
            engine.submit(Request(rid, f"f{rid % 3}", size=size), 0.0)
        while engine.dispatch(0.0) is not None:
            pass

    burst(5000, 10)
    assert drr.quantum == 5000
    burst(700, 1024)  # the epoch that saw 5000 is still remembered ...
    assert drr.quantum == 5000
    burst(700, 2048)  # ... two epochs later it is forgotten
    assert drr.quantum == 700
