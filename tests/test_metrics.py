"""`/metrics` and `/v1/stats` of a real, unstarted Distributor driven through the ledger and shared memory.

The exposition is parsed back with prometheus-client's own parser, so a malformed or duplicated
series fails here, not in a Prometheus server.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections import Counter
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from distributor.metrics import (
    DEPRECATED_BAND_KEYS,
    DEPRECATED_TOTALS_KEYS,
    TOP_FLOWS,
    FlowshardCollector,
    render_metrics,
    stats_snapshot,
)
from distributor.service import Distributor
from flowshard.config import BandConfig, BudgetConfig, Config
from flowshard.ledger import Pending
from flowshard.shm import ShmStats
from flowshard.stats import WAIT_BUCKETS
from flowshard.types import Outcome

HIGH, LOW = 0, 1  # band indices: config sorts bands by priority, highest first
DIST = 2  # the distributor's writer index with 2 shards

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def make_distributor(max_requests: int | None = 4, max_bytes: int | None = 1000) -> Distributor:
    config = Config(
        bands=[BandConfig(priority=0, name="low", max_bytes=50_000), BandConfig(priority=10, name="high")],
        budget=BudgetConfig(max_inflight_requests=max_requests, max_inflight_bytes=max_bytes),
        flow_slots=64,
    )
    d = Distributor(config, shards=2)
    d.shm = ShmStats(bytearray(d.layout.nbytes), d.layout, init=True)
    return d


@pytest.fixture
def dist() -> Distributor:
    return make_distributor()


_ids = itertools.count(1)


def enqueue(d: Distributor, flow: str, band: int, size: int, shard: int) -> Pending:
    """What `Distributor._route` does: count the request in the ledger and in shared memory."""
    assert d.shm is not None
    p = Pending(next(_ids), flow, band, size)
    p.slot = d.slots.slot(flow, 0.0)
    d.ledger.enqueue(p, shard)
    d.shm.add_enq(p.slot, shard, band, size)
    return p


def leave(d: Distributor, p: Pending) -> None:
    """The shard reports `p` gone from its queue (shared memory), then the distributor hears of it."""
    assert d.shm is not None
    d.shm.add_deq(p.slot, p.shard, p.band, p.size)
    d.ledger.leave(p)


def scrape(d: Distributor) -> Samples:
    body, content_type = render_metrics(d)
    assert content_type == CONTENT_TYPE_LATEST
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        assert family.name.startswith("flowshard_"), family.name
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


# ---------------------------------------------------------------------------------------------- outcomes


def test_requests_total_sums_every_writer_row_per_band_outcome_and_reason(dist: Distributor) -> None:
    shm = dist.shm
    assert shm is not None
    shm.add_outcome(0, HIGH, Outcome.DISPATCHED, 3)
    shm.add_outcome(1, HIGH, Outcome.DISPATCHED, 2)
    shm.add_outcome(DIST, HIGH, Outcome.DISPATCHED, 1)  # the idle fast path
    shm.add_outcome(DIST, LOW, Outcome.REJECTED_CAPACITY, 4)
    shm.add_outcome(1, LOW, Outcome.EVICTED_TTL, 5)
    s = scrape(dist)
    assert value(s, "flowshard_requests_total", band="high", outcome="dispatched", reason="") == 6
    assert value(s, "flowshard_requests_total", band="low", outcome="rejected", reason="capacity") == 4
    assert value(s, "flowshard_requests_total", band="low", outcome="evicted", reason="ttl") == 5
    assert value(s, "flowshard_requests_total", band="low", outcome="dispatched", reason="") == 0
    # Every (band, outcome) pair is exported, zeros included, so rate() has a series from the start.
    assert len(series(s, "flowshard_requests_total")) == 2 * len(Outcome)
    assert sum(series(s, "flowshard_requests_total").values()) == 15


# ---------------------------------------------------------------------------------------------- queues


def test_queue_per_band_from_ledger_and_per_shard_from_shared_memory(dist: Distributor) -> None:
    a = enqueue(dist, "a", HIGH, 100, shard=0)
    enqueue(dist, "a", HIGH, 50, shard=1)
    enqueue(dist, "b", LOW, 30, shard=1)
    enqueue(dist, "c", LOW, 7, shard=1)
    leave(dist, a)
    s = scrape(dist)
    assert value(s, "flowshard_queue_size", band="high") == 1
    assert value(s, "flowshard_queue_bytes", band="high") == 50
    assert value(s, "flowshard_queue_size", band="low") == 2
    assert value(s, "flowshard_queue_bytes", band="low") == 37
    assert value(s, "flowshard_shard_queue_size", shard="0", band="high") == 0
    assert value(s, "flowshard_shard_queue_size", shard="1", band="high") == 1
    assert value(s, "flowshard_shard_queue_bytes", shard="1", band="high") == 50
    assert value(s, "flowshard_shard_queue_bytes", shard="1", band="low") == 37
    assert value(s, "flowshard_shard_queue_size", shard="1", band="low") == 2
    assert len(series(s, "flowshard_shard_queue_bytes")) == 2 * 2
    # The two sources agree once every enqueue has been counted in both.
    for band in ("high", "low"):
        per_shard = sum(value(s, "flowshard_shard_queue_bytes", shard=n, band=band) for n in ("0", "1"))
        assert per_shard == value(s, "flowshard_queue_bytes", band=band)
    assert value(s, "flowshard_queue_limit_bytes", band="low") == 50_000
    assert value(s, "flowshard_queue_limit_bytes", band="high") == math.inf
    assert value(s, "flowshard_queue_total_limit_requests") == 100_000


def test_per_flow_series_capped_at_top_k_plus_the_rest_per_band(dist: Distributor) -> None:
    n_low = TOP_FLOWS + 15
    for i in range(n_low):  # low-band flow i holds 10 * (i + 1) bytes in two requests
        enqueue(dist, f"low-{i}", LOW, 5 * (i + 1), shard=i % 2)
        enqueue(dist, f"low-{i}", LOW, 5 * (i + 1), shard=(i + 1) % 2)
    enqueue(dist, "big", HIGH, 10_000, shard=0)
    enqueue(dist, "tiny", HIGH, 1, shard=1)
    # a real flow named "other" is listed by its name like any flow (it was hidden in the rest, which
    # was labelled "other": a review); the rest is flow="", an id no flow can have
    enqueue(dist, "other", HIGH, 9_000, shard=1)
    s = scrape(dist)
    sizes, nbytes = series(s, "flowshard_flow_queue_size"), series(s, "flowshard_flow_queue_bytes")
    assert sizes.keys() == nbytes.keys()
    named = {dict(k)["flow"]: v for k, v in nbytes.items() if dict(k)["flow"] != ""}
    assert len(named) == TOP_FLOWS
    assert len(nbytes) == TOP_FLOWS + 2  # one rest per band
    expected = {"big", "other"} | {f"low-{i}" for i in range(n_low - TOP_FLOWS + 2, n_low)}
    assert set(named) == expected
    assert named["big"] == 10_000 and named["other"] == 9_000
    assert named[f"low-{n_low - 1}"] == 10 * n_low
    assert value(s, "flowshard_flow_queue_size", band="low", flow=f"low-{n_low - 1}") == 2
    # the rest of its band: the per-flow series of a band sum to the band's queue.
    low_rest = sum(10 * (i + 1) for i in range(n_low - TOP_FLOWS + 2))
    assert value(s, "flowshard_flow_queue_bytes", band="low", flow="") == low_rest
    assert value(s, "flowshard_flow_queue_size", band="low", flow="") == 2 * (n_low - TOP_FLOWS + 2)
    assert value(s, "flowshard_flow_queue_bytes", band="high", flow="") == 1
    assert value(s, "flowshard_flow_queue_size", band="high", flow="") == 1
    top = {t["flow"]: t["queued_bytes"] for t in stats_snapshot(dist)["top_flows"]}
    assert top.keys() == expected and top["other"] == 9_000  # /v1/stats lists it too
    for band in ("high", "low"):
        in_band = [v for k, v in nbytes.items() if dict(k)["band"] == band]
        assert sum(in_band) == value(s, "flowshard_queue_bytes", band=band)
        items = [v for k, v in sizes.items() if dict(k)["band"] == band]
        assert sum(items) == value(s, "flowshard_queue_size", band=band)


def test_a_flow_named_other_is_listed_like_any_flow_and_the_rest_is_unnamed(dist: Distributor) -> None:
    """The rest of a band was labelled flow="other", and a real flow of that name was never listed,
    in /metrics or /v1/stats: a tenant could hide from top-flow dashboards by its name (a review).
    The rest is flow="" now, which no flow id can be."""
    for flow, size in (("other", 100), ("a", 90), ("b", 80), ("c", 70), ("d", 1)):
        enqueue(dist, flow, LOW, size, shard=0)
    enqueue(dist, "h", HIGH, 5, shard=1)
    body = generate_latest(FlowshardCollector(dist, top_flows=3)).decode()
    flows = {
        (s.labels["band"], s.labels["flow"]): s.value
        for family in text_string_to_metric_families(body)
        if family.name == "flowshard_flow_queue_bytes"
        for s in family.samples
    }
    assert flows == {("low", "other"): 100, ("low", "a"): 90, ("low", "b"): 80, ("low", ""): 71, ("high", ""): 5}
    top = stats_snapshot(dist, top_flows=3)["top_flows"]
    assert [(t["flow"], t["queued_bytes"]) for t in top] == [("other", 100), ("a", 90), ("b", 80)]


def test_per_flow_rest_is_zero_when_nothing_is_queued(dist: Distributor) -> None:
    s = scrape(dist)
    assert series(s, "flowshard_flow_queue_bytes") == {
        frozenset({("band", "high"), ("flow", "")}): 0,
        frozenset({("band", "low"), ("flow", "")}): 0,
    }


# ---------------------------------------------------------------------------------------------- budget


def test_inflight_limits_saturation_and_grants(dist: Distributor) -> None:
    ledger = dist.ledger
    enqueue(dist, "f0", LOW, 300, shard=0)
    [(shard, band, reserve, _)] = ledger.plan_grants()  # twice the typical size: 600 of the idle 1000 bytes
    assert (band, reserve) == (LOW, 600)
    s = scrape(dist)
    assert value(s, "flowshard_grants_outstanding", band="low") == 1
    assert value(s, "flowshard_grants_outstanding", band="high") == 0
    assert value(s, "flowshard_grants_reserved_bytes") == 600
    assert value(s, "flowshard_inflight_requests") == 0
    ledger.grant_answered(shard, 300)  # the shard dispatched a 300-byte request
    s = scrape(dist)
    assert value(s, "flowshard_grants_outstanding", band="low") == 0
    assert value(s, "flowshard_grants_reserved_bytes") == 0
    assert value(s, "flowshard_inflight_requests") == 1
    assert value(s, "flowshard_inflight_bytes") == 300
    assert value(s, "flowshard_inflight_limit_requests") == 4
    assert value(s, "flowshard_inflight_limit_bytes") == 1000
    assert value(s, "flowshard_saturation") == pytest.approx(0.3)  # max(1/4, 300/1000)
    for i in (1, 2):
        enqueue(dist, f"f{i}", LOW, 100, shard=i % 2)
    more = ledger.plan_grants()
    assert more
    s = scrape(dist)
    assert value(s, "flowshard_grants_outstanding", band="low") == len(more)
    assert value(s, "flowshard_grants_reserved_bytes") == sum(g[2] for g in more)
    ledger.grant_answered(more[0][0], 10)
    assert value(scrape(dist), "flowshard_saturation") == pytest.approx(0.5)  # max(2/4, 310/1000)


def test_unlimited_budget_exports_inf_limits_and_zero_saturation() -> None:
    d = make_distributor(max_requests=None, max_bytes=None)
    s = scrape(d)
    assert value(s, "flowshard_inflight_limit_requests") == math.inf
    assert value(s, "flowshard_inflight_limit_bytes") == math.inf
    assert value(s, "flowshard_saturation") == 0


# ---------------------------------------------------------------------------------------------- histogram


def test_wait_histogram_is_cumulative_and_consistent(dist: Distributor) -> None:
    shm = dist.shm
    assert shm is not None
    for _ in range(2):
        shm.observe_wait(DIST, HIGH, 0.0)  # fast path: 0 s
    waits = [0.0011, 0.002, 0.003, 0.004, 0.005, 0.0049]  # (0.001, 0.005]
    for k, w in enumerate(waits):
        shm.observe_wait(k % 2, HIGH, w)
    shm.observe_wait(1, HIGH, 61.5)  # above the last bound
    for w in (0.51, 0.6, 0.7, 1.0):  # (0.5, 1.0]
        shm.observe_wait(0, LOW, w)
    s = scrape(dist)
    high = {dict(k)["le"]: v for k, v in series(s, "flowshard_wait_seconds_bucket").items() if ("band", "high") in k}
    assert len(high) == len(WAIT_BUCKETS) + 1
    les = sorted(high, key=float)
    assert les[-1] == "+Inf"
    counts = [high[le] for le in les]
    assert counts == sorted(counts)  # cumulative
    assert high["0.0001"] == 2
    assert high["0.001"] == 2
    assert high["0.005"] == 8
    assert high["60.0"] == 8
    assert high["+Inf"] == 9 == value(s, "flowshard_wait_seconds_count", band="high")
    # the sum is the waits' own, not the buckets' midpoints (6 * 0.003 + 60 for these), to the µs
    assert value(s, "flowshard_wait_seconds_sum", band="high") == pytest.approx(sum(waits) + 61.5, abs=1e-9)
    assert value(s, "flowshard_wait_seconds_count", band="low") == 4
    assert value(s, "flowshard_wait_seconds_sum", band="low") == pytest.approx(2.81, abs=1e-9)
    assert value(s, "flowshard_wait_seconds_bucket", band="low", le="0.5") == 0
    assert value(s, "flowshard_wait_seconds_bucket", band="low", le="1.0") == 4


# ---------------------------------------------------------------------------------------------- shards


def test_dispatches_workers_and_heartbeats_per_shard(dist: Distributor) -> None:
    shm = dist.shm
    assert shm is not None
    shm.add_dispatched(0, 7)
    shm.add_dispatched(1, 2)
    shm.add_dispatched(DIST, 3)
    dist.shards[0].ready = True
    dist.shards[1].restarts = 2
    shm.set_heartbeat(0, time.monotonic_ns() - 3_000_000_000)
    s = scrape(dist)
    assert value(s, "flowshard_dispatched_total", shard="0") == 7
    assert value(s, "flowshard_dispatched_total", shard="1") == 2
    assert value(s, "flowshard_dispatched_total", shard="distributor") == 3
    assert value(s, "flowshard_worker_up", shard="0") == 1
    assert value(s, "flowshard_worker_up", shard="1") == 0
    assert value(s, "flowshard_worker_restarts_total", shard="0") == 0
    assert value(s, "flowshard_worker_restarts_total", shard="1") == 2
    assert 3.0 <= value(s, "flowshard_worker_heartbeat_age_seconds", shard="0") < 4.0
    assert ("flowshard_worker_heartbeat_age_seconds", frozenset({("shard", "1")})) not in s  # never beat


def test_service_counters_slots_retry_after_and_uptime(dist: Distributor) -> None:
    dist.counters["tickets_released"] = 11
    dist.counters["tickets_expired"] = 2
    dist.retry[LOW].value = 8
    for flow in ("a", "b", "c"):
        dist.slots.slot(flow, 0.0)
    dist.started -= 5.0
    s = scrape(dist)
    assert value(s, "flowshard_tickets_released_total") == 11
    assert value(s, "flowshard_tickets_expired_total") == 2
    assert value(s, "flowshard_retry_after_seconds", band="low") == 8
    assert value(s, "flowshard_retry_after_seconds", band="high") == 1
    assert value(s, "flowshard_flow_slots_used") == 3
    assert value(s, "flowshard_flow_slots_total") == 64
    assert value(s, "flowshard_flow_slots_shared_total") == 0
    assert value(s, "flowshard_stats_consistent") == 1
    assert 5.0 <= value(s, "flowshard_uptime_seconds") < 60.0


def test_scrape_without_shared_memory_reports_zeros(dist: Distributor) -> None:
    dist.shm = None  # before start() or after close()
    enqueue_free = Pending(next(_ids), "x", LOW, 9)
    dist.ledger.enqueue(enqueue_free, 0)
    s = scrape(dist)
    assert value(s, "flowshard_queue_bytes", band="low") == 9  # the ledger is still exact
    assert value(s, "flowshard_shard_queue_bytes", shard="0", band="low") == 0
    assert value(s, "flowshard_wait_seconds_count", band="low") == 0
    assert stats_snapshot(dist)["totals"]["queued_bytes"] == 9


# ---------------------------------------------------------------------------------------------- /v1/stats


def test_stats_snapshot_encodes_and_totals_are_consistent(dist: Distributor) -> None:
    shm = dist.shm
    assert shm is not None
    for i in range(TOP_FLOWS + 5):
        enqueue(dist, f"f{i}", LOW, i + 1, shard=i % 2)
    enqueue(dist, "h", HIGH, 500, shard=1)
    shm.add_outcome(0, LOW, Outcome.DISPATCHED, 4)
    shm.add_outcome(DIST, LOW, Outcome.REJECTED_CAPACITY, 1)
    for _ in range(4):
        shm.observe_wait(0, LOW, 0.0007)
    shm.add_dispatched(0, 4)
    shm.add_dispatched(DIST, 1)
    dist.ledger.plan_grants()
    dist.ledger.grant_answered(0 if dist.ledger.outstanding_grants(0) else 1, 500)
    dist.shards[1].pid = 4242

    stats = stats_snapshot(dist)
    decoded = msgspec.json.decode(msgspec.json.encode(stats))
    assert decoded == stats  # plain JSON types only: nothing lost in the round trip

    totals = stats["totals"]
    assert totals["queued_items"] == sum(b["queued_items"] for b in stats["bands"]) == TOP_FLOWS + 6
    assert totals["queued_bytes"] == sum(b["queued_bytes"] for b in stats["bands"])
    for bi, band in enumerate(stats["bands"]):
        assert band["queued_items"] == sum(s["queued_items"][bi] for s in stats["shards"])
        assert band["queued_bytes"] == sum(s["queued_bytes"][bi] for s in stats["shards"])
    assert [(b["name"], b["priority"]) for b in stats["bands"]] == [("high", 10), ("low", 0)]
    assert totals["inflight"] == 1 and totals["inflight_bytes"] == 500
    assert totals["max_inflight_requests"] == 4 and totals["max_inflight_bytes"] == 1000
    assert totals["saturation"] == pytest.approx(0.5)
    assert totals["dispatched"] == 5 and totals["fast_path_dispatched"] == 1
    assert stats["bands"][0]["max_bytes"] is None  # unlimited is null, never Infinity
    assert totals["grants_outstanding"] == sum(s["grants_outstanding"] for s in stats["shards"])

    low = stats["bands"][LOW]
    assert low["outcomes"]["dispatched"] == 4
    assert low["outcomes"]["rejected:capacity"] == 1
    assert set(low["outcomes"]) == {o.label for o in Outcome}
    assert low["wait_hist"]["counts"][2] == 4 and low["wait_hist"]["count"] == 4
    assert len(low["wait_hist"]["counts"]) == len(low["wait_hist"]["bounds"]) + 1
    assert low["retry_after"] == 1

    shard1 = stats["shards"][1]
    assert shard1["pid"] == 4242 and shard1["ready"] is False and shard1["heartbeat_age_seconds"] is None
    top = stats["top_flows"]
    assert len(top) == TOP_FLOWS
    assert top[0] == {"flow": "h", "band": "high", "queued_items": 1, "queued_bytes": 500}
    assert [t["queued_bytes"] for t in top] == sorted((t["queued_bytes"] for t in top), reverse=True)
    assert stats["flow_slots"] == {"used": TOP_FLOWS + 6, "total": 64, "shared": 0}
    assert stats["counters"] == dist.counters


SERVICE = (Path(__file__).resolve().parent.parent / "docs" / "service.md").read_text()  # the stats' reference


def test_stats_limits_have_the_configuration_keys_names_and_the_old_names_stay_for_now() -> None:
    config = Config(
        max_queued_requests=123, max_queued_bytes=4567,
        bands=[BandConfig(priority=0, name="low", max_requests=11, max_bytes=50_000),
               BandConfig(priority=10, name="high")],
        budget=BudgetConfig(max_inflight_requests=7, max_inflight_bytes=None),
    )
    d = Distributor(config, shards=1)
    d.shm = ShmStats(bytearray(d.layout.nbytes), d.layout, init=True)
    stats = stats_snapshot(d)
    totals = stats["totals"]
    # the configuration's names, with the configured values
    assert (totals["max_queued_requests"], totals["max_queued_bytes"]) == (123, 4567)
    assert (totals["max_inflight_requests"], totals["max_inflight_bytes"]) == (7, None)
    assert [(b["name"], b["max_requests"], b["max_bytes"]) for b in stats["bands"]] == [
        ("high", None, None), ("low", 11, 50_000)]
    # the old names: the same values, for this release
    for old, new in DEPRECATED_TOTALS_KEYS.items():
        assert totals[old] == totals[new], old
    for band in stats["bands"]:
        for old, new in DEPRECATED_BAND_KEYS.items():
            assert band[old] == band[new], old
    # the Prometheus gauges of the same limits say the same
    s = scrape(d)
    assert value(s, "flowshard_queue_total_limit_requests") == 123
    assert value(s, "flowshard_inflight_limit_requests") == 7
    assert value(s, "flowshard_queue_limit_requests", band="low") == 11


def test_the_reference_documents_every_stats_key_and_the_deprecated_ones(dist: Distributor) -> None:
    section = SERVICE.split("### `GET /v1/stats`", 1)[1].split("\n## ", 1)[0]
    table, deprecated = section.split("**Deprecated**", 1)
    stats = stats_snapshot(dist)
    documented = set(re.findall(r"`([a-z_.\[\]]+)`", table))

    def named(key: str, prefix: str) -> bool:
        return f"{prefix}.{key}" in documented or key in documented

    new_totals = set(stats["totals"]) - set(DEPRECATED_TOTALS_KEYS)
    assert {k for k in new_totals if not named(k, "totals")} == set()
    new_band = set(stats["bands"][0]) - set(DEPRECATED_BAND_KEYS)
    assert {k for k in new_band if not named(k, "bands[]")} == set()
    top = {d.split(".")[0].removesuffix("[]") for d in documented} | set(re.findall(r"`([a-z_]+)`", section))
    assert set(stats) - top == set()
    rows = set(re.findall(r"^\| `([a-z_.\[\]]+)` \| `([a-z_.\[\]]+)` \|$", deprecated, re.M))
    expected = {(f"totals.{o}", f"totals.{n}") for o, n in DEPRECATED_TOTALS_KEYS.items()}
    expected |= {(f"bands[].{o}", f"bands[].{n}") for o, n in DEPRECATED_BAND_KEYS.items()}
    assert rows == expected
    for old in [*DEPRECATED_TOTALS_KEYS, *DEPRECATED_BAND_KEYS]:
        assert not named(old, "totals") and not named(old, "bands[]")  # not offered as a current key


def test_metric_and_stats_views_agree(dist: Distributor) -> None:
    shm = dist.shm
    assert shm is not None
    enqueue(dist, "a", HIGH, 40, shard=0)
    enqueue(dist, "b", LOW, 60, shard=1)
    shm.add_outcome(1, HIGH, Outcome.EVICTED_DISPLACED, 3)
    s, stats = scrape(dist), stats_snapshot(dist)
    for band in stats["bands"]:
        assert value(s, "flowshard_queue_bytes", band=band["name"]) == band["queued_bytes"]
        for o in Outcome:
            sample = value(s, "flowshard_requests_total", band=band["name"], outcome=o.status, reason=o.reason)
            assert sample == band["outcomes"][o.label]
    families = Counter(n for n, _ in s)
    assert families["flowshard_flow_queue_bytes"] == 2 + 2  # a, b, and one "other" per band


def test_the_stats_snapshot_waits_for_a_writer_caught_mid_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard preempted in the middle of its batch (seq odd) for longer than 1,000 immediate retries made
    a scrape read `consistent: false` on a healthy service (review 2026-12-05, D5): the retries now
    pause (1 ms every 50th), and a writer that finishes meanwhile is read consistently."""
    import distributor.metrics as metrics
    from flowshard.shm import ShmLayout, ShmStats

    layout = ShmLayout(8, 2, 1)
    shm = ShmStats(bytearray(layout.nbytes), layout, init=True)
    shm.begin_write(1)  # shard 1 mid-batch
    slept: list[float] = []
    resumes = [3]  # the writer is scheduled again during the third pause (then: never)

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == resumes[0]:
            shm.end_write(1)

    monkeypatch.setattr(metrics.time, "sleep", sleep)
    assert shm.snapshot(on_retry=metrics._Pause()).consistent
    assert slept == [0.001] * 3
    shm.begin_write(1)  # stopped for good: still reported, after at most 20 pauses
    slept.clear()
    resumes[0] = 0
    assert not shm.snapshot(on_retry=metrics._Pause()).consistent
    assert len(slept) == 20


def test_the_snapshot_pause_is_bounded_per_scrape_not_per_stuck_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pause bound was per stuck writer (review 18): `ShmStats.snapshot` retried each busy writer
    up to 1,000 times and `_Pause` slept 1 ms every 50th retry, so with S shards stopped mid-batch (a
    SIGSTOP of the process group, a host stall) one /metrics or /v1/stats blocked the distributor's
    event loop S x 20 ms (16 shards: 320 ms per scrape, during which no admission is decided). Now the
    20 pauses are the scrape's, and a shard preempted behind the stopped ones is still read on its
    first look."""
    import distributor.metrics as metrics
    from flowshard.shm import ShmLayout, ShmStats

    layout = ShmLayout(8, 16, 1)
    shm = ShmStats(bytearray(layout.nbytes), layout, init=True)
    for shard in range(16):
        shm.begin_write(shard)  # every shard stopped mid-batch
    slept: list[float] = []
    monkeypatch.setattr(metrics.time, "sleep", slept.append)
    snap = shm.snapshot(on_retry=metrics._Pause())
    assert not snap.consistent and snap.inconsistent_writers == tuple(range(16))
    assert sum(slept) <= 0.025, f"{len(slept)} pauses, {sum(slept) * 1000:.0f} ms of the distributor's loop"
    assert len(slept) == 20  # one stuck writer's bound, as before

    shm.end_write(9)  # shard 9 was only preempted: it finished while the reader waited on shard 0
    slept.clear()
    snap = shm.snapshot(on_retry=metrics._Pause())
    assert snap.inconsistent_writers == tuple(s for s in range(16) if s != 9) and len(slept) == 20
