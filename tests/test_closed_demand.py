"""A closed-loop flow's demand in the bench's verdict: its clients' measured cycle less their waits at the
service (`bench.fairness.closed_cycles`), not the model's service + think + round trip.

The per-request logs here are constructed, as the generator writes them (times from the run's start,
the service's audit view of each answer), and judged by the bench's own path (`bench.report._reference`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from bench.fairness import closed_cycles
from bench.loadgen import LOG_COLUMNS, UNFINISHED
from bench.report import _reference
from flowshard.config import band_index
from flowshard.reference import Verdict
from flowshard.scenario import Scenario, expand_flows, load_scenario

NAN = math.nan
_DTYPES = {"i": np.int32, "d": np.float64, "b": np.int8, "q": np.int64, "f": np.float32}


def _scenario(budget: str, fairness: str, clients: tuple[int, int], service: float, duration: float) -> Scenario:
    flows = "".join(
        f'[[workload.flows]]\nid = "{name}"\narrival = {{ kind = "closed", concurrency = {c}, think = 0.000001 }}\n'
        f"size = 1000\nservice = {service}\n"
        for name, c in zip(("big", "small"), clients, strict=True)
    )
    return load_scenario(
        f'name = "t"\n[server]\ndefault_ttl = 0\n[server.budget]\nmax_inflight_requests = {budget}\n'
        f'[[server.bands]]\npriority = 0\nfairness = "{fairness}"\n'
        f"[workload]\nduration = {duration}\nwarmup = 1.0\n{flows}"
    )


def _clients(flow: int, clients: int, *, cycle: float, way_in: float, wait: float, way_back: float,
             service: float, end: float, hop: float = 0.0) -> list[tuple[Any, ...]]:
    """Rows of `clients` closed-loop clients, each sending every `cycle` seconds (phases spread): a
    request reaches the service after `way_in`, its shard's queue `hop` later (the service's own way),
    waits `wait` there, its answer takes `way_back`; it is held `service`; the rest of the cycle is the
    generator's own (its loop, think). A request still without an answer at `end` is logged
    unfinished, as the generator logs it."""
    rows: list[tuple[Any, ...]] = []
    for k in range(clients):
        sent = cycle * k / clients
        while sent < end:
            recv = sent + way_in
            disp = recv + hop + wait
            done = disp + way_back
            if done < end:
                rows.append((flow, sent, done, 0, wait, service, recv, recv + hop, disp))
            else:
                rows.append((flow, sent, end, UNFINISHED, 0.0, service, NAN, NAN, NAN))
            sent += cycle
    return rows


def _log(rows: list[tuple[Any, ...]]) -> dict[str, np.ndarray]:
    """rows: (flow, sent, done, outcome, wait, service, s_recv, s_enq, s_disp), 1,000 bytes each."""
    cols = list(zip(*rows, strict=True))
    n = len(rows)
    given = {"flow": cols[0], "intended": cols[1], "sent": cols[1], "done": cols[2], "outcome": cols[3],
             "wait": cols[4], "service": cols[5], "s_recv": cols[6], "s_enq": cols[7], "s_disp": cols[8],
             "size": [1000] * n, "tokens": [0] * n, "seq": [-1] * n, "shard": [0] * n,
             "released": [math.nan] * n}  # (not released in the log: no timer lateness)
    return {name: np.asarray(given[name], dtype=_DTYPES[code]) for name, code in LOG_COLUMNS.items()}


def _verdict(scenario: Scenario, log: dict[str, np.ndarray]) -> tuple[Verdict, dict[str, float]]:
    """The band's verdict and each flow's error, as `flowshard bench` computes them from its log."""
    instances = expand_flows(scenario.workload)
    n = len(instances)
    lo, hi = scenario.workload.warmup, scenario.workload.duration
    resolve = band_index(scenario.server)
    band_of = np.array([resolve(i.spec.priority) for i in instances], dtype=np.int32)
    win = []
    for f in range(n):  # served (requests, bytes, cost) answered in the window, offered sent in it
        served = int(np.count_nonzero((log["flow"] == f) & (log["outcome"] == 0) & (log["done"] >= lo)
                                      & (log["done"] < hi)))
        offered = int(np.count_nonzero((log["flow"] == f) & (log["intended"] >= lo) & (log["intended"] < hi)))
        win.append([served, served * 1000.0, served * 1000.0, offered, offered * 1000.0, offered * 1000.0])
    refs, verdicts, _ = _reference(scenario, log, win, band_of, [1.0] * n, instances, False)
    assert refs is not None and verdicts is not None
    errors = {i.id: (r.measured - r.allocation) / r.allocation for i, r in zip(instances, refs, strict=True)}
    return verdicts[0], errors


@pytest.mark.parametrize("hop", [0.0, 0.0015])
def test_a_generator_saturated_by_its_own_loop_does_not_make_a_fair_peak_run_unfair(hop: float) -> None:
    """The review's peak run (docs/fairness.md): 48 and 8 clients, round robin, unlimited budget, service 0,
    nothing waiting at the service; each client's cycle is twice its round trip (the rest: the
    generator's loop between an answer and the next send). Each flow got service in proportion to its
    clients, all it asked for. The round-trip model owed the 8-client flow 8 / round trip and called it
    UNFAIR (-50 %); its measured cycle owes it what it sent. With `hop`, the idle fast path off: 1.5 ms
    of the cycle from the service's receipt to its shard's queue, which is the service's own way, not
    a wait (the old round trip took it out as one)."""
    scenario = _scenario('"unlimited"', "round-robin", (48, 8), 0.0, 3.0)
    timing = {"cycle": 0.010, "way_in": 0.002 - hop, "hop": hop, "wait": 0.0, "way_back": 0.003, "service": 0.0,
              "end": 3.0}
    log = _log(_clients(0, 48, **timing) + _clients(1, 8, **timing))
    verdict, errors = _verdict(scenario, log)
    assert verdict.fair, verdict.off
    assert abs(errors["small"]) < 0.02 and abs(errors["big"]) < 0.02
    # the demand is the measured cycle: 10 ms for both, no wait to take out
    cycles = closed_cycles(log, [48, 8], [(1.0, 3.0)] * 2, [0.1, 0.1])
    assert cycles == pytest.approx([0.010, 0.010], rel=0.01)


def test_a_fifo_band_with_unequal_clients_on_a_limited_budget_is_still_unfair() -> None:
    """Negative control: global-fcfs, 24 and 8 clients on 8 slots, service 0.1 s: every request waits the
    same 0.306 s at the service, so each flow gets slots by its clients (6 and 2) where max-min owes
    4 and 4. The waits are taken out of the measured cycle (0.102 s left), so the demand stays what the
    clients could have sent: both above their share, and the verdict names both flows."""
    scenario = _scenario("8", "global-fcfs", (24, 8), 0.1, 3.0)
    timing = {"cycle": 0.408, "way_in": 0.0005, "wait": 0.306, "way_back": 0.001, "service": 0.1, "end": 3.0}
    log = _log(_clients(0, 24, **timing) + _clients(1, 8, **timing))
    assert closed_cycles(log, [24, 8], [(1.0, 3.0)] * 2, [0.1, 0.1]) == pytest.approx([0.102, 0.102], rel=0.05)
    verdict, errors = _verdict(scenario, log)
    assert not verdict.fair
    assert errors["small"] == pytest.approx(-0.5, abs=0.06) and errors["big"] == pytest.approx(0.5, abs=0.06)


def test_a_flow_made_to_wait_far_longer_than_the_other_is_unfair() -> None:
    """Negative control: the small flow's requests wait 1 s at the service, the big flow's 0.235 s (a
    policy that serves the big flow first): measured over 9 s, its unwaited cycle is the same 0.102 s,
    so it is owed half the slots and got about a tenth."""
    scenario = _scenario("8", "round-robin", (24, 8), 0.1, 10.0)
    base = {"way_in": 0.0005, "way_back": 0.001, "service": 0.1, "end": 10.0}
    log = _log(_clients(0, 24, cycle=0.337, wait=0.235, **base) + _clients(1, 8, cycle=1.102, wait=1.0, **base))
    verdict, errors = _verdict(scenario, log)
    assert not verdict.fair
    assert errors["small"] < -0.7 and errors["big"] > 0.7


def test_a_flow_starved_all_window_is_still_unfair() -> None:
    """Negative control: the big flow holds all 8 slots; the small flow's 8 clients each sent one request
    at the start that was never dispatched. Too few sends to measure a cycle: its demand is the model's
    (service + think), and it is named, as before."""
    scenario = _scenario("8", "round-robin", (24, 8), 0.1, 3.0)
    log = _log(_clients(0, 24, cycle=0.306, way_in=0.0005, wait=0.204, way_back=0.001, service=0.1, end=3.0)
               + [(1, 0.01 * k, 3.0, UNFINISHED, 0.0, 0.1, NAN, NAN, NAN) for k in range(8)])
    assert closed_cycles(log, [24, 8], [(1.0, 3.0)] * 2, [0.1, 0.1])[1] is None
    verdict, errors = _verdict(scenario, log)
    assert not verdict.fair
    assert errors["small"] == pytest.approx(-1.0)


def test_closed_cycles_take_out_waits_and_failed_cycles() -> None:
    """One client over [0, 10]: three dispatches (queue waits reported: 1 s, 2 s from the audit's
    `enqueued`, not from `received`: the way to the shard is not a wait; no audit: 0.5 s from the
    send), a rejection answered after 0.2 s then backing off 0.3 s (its whole cycle is the service's),
    a request unfinished from 9 s (its wait clipped to the window). Left: 10 - 1 - 2 - 0.5 - 0.5 - 1 =
    5 s over the 4 sends that did not fail. An open-loop flow (0 clients) has none."""
    rows = [
        (0, 0.0, 1.5, 0, 1.0, 0.0, 0.1, 0.3, 1.3),
        (0, 2.0, 4.2, 0, 2.0, 0.0, 2.0, 2.05, 4.05),
        (0, 5.0, 5.6, 0, 0.5, 0.0, NAN, NAN, NAN),
        (0, 6.0, 6.2, 1, 0.0, 0.0, 6.05, NAN, NAN),
        (0, 9.0, 12.0, UNFINISHED, 0.0, 0.0, NAN, NAN, NAN),
        (1, 3.0, 3.1, 0, 0.0, 0.0, NAN, NAN, NAN),
    ]
    log = _log(rows)
    got = closed_cycles(log, [1, 0], [(0.0, 10.0), (0.0, 10.0)], [0.3, 0.0], min_sends=1)
    assert got[0] == pytest.approx(5.0 / 4) and got[1] is None
    assert closed_cycles(log, [1, 0], [(0.0, 10.0)] * 2, [0.3, 0.0], min_sends=5)[0] is None  # too few sends
