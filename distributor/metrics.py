"""`GET /metrics` and `GET /v1/stats`: what the distributor and its shards are doing, per scrape.

Both views are built from one `_View`: ONE seqlock snapshot of shared memory (outcomes, wait-time
histograms, per-(band, shard) queues, dispatches, heartbeats: the shards' counters, DESIGN.md §5)
plus the distributor's own exact state (the ledger's queues and budget, supervision, tickets).
A custom collector renders it, not prometheus-client's multiprocess mode: the counters already
live in one segment with one writer per cell, so there are no per-process files to merge.

Cost per scrape: O(bands x shards x outcomes) numpy sums over a copy of the segment, plus the
top-K flow selection, which reads each queued flow's byte count once at C speed (see `_top_flows`;
~9 ms per 100k queued flows; a whole scrape of an idle service ~0.4 ms). Values per (band, flow) are
the ledger's, exact; `flow=""` per band is the band total minus the listed flows, so series are
capped at K + bands whatever the number of flows. Nothing here is per request.

The wait histogram counts the queue wait of dispatched requests (shards observe it when they
dispatch; the idle fast path observes 0): bucket counts and the waits' exact sum in whole µs, per
writer and band. (The sum was once estimated from the buckets' midpoints: a review measured it 8–52 %
above the clients' waits, so a mean wait from `_sum / _count` was biased.)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from distributor.guards import ACTIONS as GUARD_ACTIONS
from flowshard.stats import WAIT_BUCKETS
from flowshard.types import Outcome

if TYPE_CHECKING:
    from distributor.service import Distributor

__all__ = ["TOP_FLOWS", "FlowshardCollector", "render_metrics", "stats_snapshot"]

TOP_FLOWS: Final = 20  # per-flow series kept (by queued bytes); the rest are summed into flow=""
# The rest's label: the empty string, which no flow id can be (1 to 256 characters). It was "other",
# and a tenant that named its flow "other" was never listed: it hid in the rest (a review).
REST_FLOW: Final = ""
DISTRIBUTOR_SHARD: Final = "distributor"  # shard label of the distributor's own dispatches (idle fast path)

I64 = npt.NDArray[np.int64]

_LE: Final = [repr(float(b)) for b in WAIT_BUCKETS] + ["+Inf"]  # "0.0001", "1.0": as prometheus-client writes
_OUTCOMES: Final = list(Outcome)


@dataclasses.dataclass(frozen=True, slots=True)
class TopFlow:
    """One of the flows listed by name (the rest are summed as `flow=""`)."""

    band: int
    flow: str
    items: int
    bytes: int


@dataclasses.dataclass(frozen=True, slots=True)
class _View:
    """Everything one scrape reports, read once so /metrics and /v1/stats agree within themselves."""

    bands: list[str]  # band names, index = band (0 = highest priority)
    outcomes: I64  # [B, O], all writers summed
    wait: I64  # [B, H], all writers summed (non-cumulative)
    wait_us: I64  # [B]: the waits' sum, µs, all writers summed
    shard_items: I64  # [B, N], enq - deq
    shard_bytes: I64  # [B, N]
    dispatched: I64  # [N + 1], the last one the distributor's (fast path)
    inversions: I64  # [B] (the distributor's row): dispatches that took budget a higher band's waiting work needed
    narrowed: I64  # [B]: grants handed back for a higher band that waited uncovered
    heartbeat_age: list[float | None]  # per shard, seconds; None before the first heartbeat
    backlog: list[int]  # per shard: requests routed to it not read yet, in `shm.backlog_bytes` units
    consistent: bool
    top: list[TopFlow]
    other_items: list[int]  # per band: queued items of flows not in `top`
    other_bytes: list[int]
    uptime: float


def _top_flows(distributor: Distributor, k: int) -> tuple[list[TopFlow], list[int], list[int]]:
    """The k (band, flow) pairs with the most queued bytes, and per band what the others hold.

    Per band, one C-speed pass copies the queued bytes into numpy and `argpartition` picks the band's
    k largest (measured on a loaded 2-core box: ~9 ms per 100k queued flows, ~21 ms with `heapq.nlargest`);
    then the <= k x bands candidates are sorted. Among flows with equal bytes, which are listed is
    arbitrary.
    """
    bands = distributor.ledger.bands
    candidates: list[TopFlow] = []
    for b in bands:
        flows = b.flows
        count = len(flows)
        take = min(k, count)
        if take == 0:
            continue
        names = list(flows)
        if take < count:
            sizes = np.fromiter((u.queued_bytes for u in flows.values()), np.int64, count)
            names = [names[i] for i in np.argpartition(sizes, count - take)[count - take :].tolist()]
        for flow in names:
            usage = flows[flow]
            candidates.append(TopFlow(b.index, flow, usage.queued_items, usage.queued_bytes))
    candidates.sort(key=lambda t: (-t.bytes, -t.items, t.band, t.flow))
    top = candidates[:k]
    other_items = [b.queued_items for b in bands]
    other_bytes = [b.queued_bytes for b in bands]
    for t in top:
        other_items[t.band] -= t.items
        other_bytes[t.band] -= t.bytes
    return top, other_items, other_bytes


class _Pause:
    """The snapshot's retry hook: every 50th retry of a busy writer sleeps 1 ms. A writer preempted in
    the middle of its batch (its seq odd) can stay there for a scheduling quantum, longer than 1,000
    immediate retries last: then the figures read `consistent: false` though nothing was wrong (1-5 %
    of scrapes on a busy 2-core machine, review 2026-12-05). At most ~20 ms more per scrape, and only
    while a writer is caught mid-batch; a writer still mid-batch after that is stopped or dead.

    The bound is the scrape's, not each writer's: one hook serves the whole snapshot and, once it has
    let 1,000 retries (20 pauses) go by, it gives up on every writer still busy after its first look.
    With S shards stopped mid-batch a scrape blocked the event loop S x 20 ms (review 18); a shard
    merely preempted behind a stopped one has had those 20 ms to finish, so its first look reads it."""

    __slots__ = ("_retries",)

    RETRIES: Final = 1000  # over the whole snapshot: 20 pauses of 1 ms
    EVERY: Final = 50

    def __init__(self) -> None:
        self._retries = 0

    def __call__(self, writer: int) -> bool:
        """True (give up on ``writer``) once the snapshot's retries are spent; else maybe pause."""
        if self._retries >= self.RETRIES:
            return True
        self._retries += 1
        if self._retries % self.EVERY == 0:
            time.sleep(0.001)
        return False


def _view(distributor: Distributor, k: int = TOP_FLOWS) -> _View:
    layout = distributor.layout
    n, b = layout.shards, layout.bands
    shm = distributor.shm
    snap = shm.snapshot(on_retry=_Pause()) if shm is not None else distributor.final_snapshot
    if shm is not None and snap is not None:  # (as far as the frames read: never a count taken back later)
        shm.as_read(snap, [s.frames_from - s.frames_base for s in distributor.shards])
    if snap is not None:
        outcomes: I64 = snap["outcomes"].sum(axis=0)
        wait: I64 = snap["wait_hist"].sum(axis=0)
        wait_us: I64 = snap["wait_us"].sum(axis=0)
        shard_items: I64 = snap["band_enq_items"] - snap["band_deq_items"]
        shard_bytes: I64 = snap["band_enq_bytes"] - snap["band_deq_bytes"]
        dispatched: I64 = snap["dispatched"]
        inversions: I64 = snap["inversions"].sum(axis=0)
        narrowed: I64 = snap["narrowed"].sum(axis=0)
        beats = snap["heartbeat_ns"].tolist()
        backlog = (snap["shard_sent_bytes"] - snap["shard_taken_bytes"]).tolist()
        consistent = snap.consistent
    else:  # not started yet: no shared counters, report zeros
        outcomes = np.zeros((b, layout.outcomes), np.int64)
        wait = np.zeros((b, layout.hist_buckets), np.int64)
        wait_us = np.zeros(b, np.int64)
        shard_items = np.zeros((b, n), np.int64)
        shard_bytes = np.zeros((b, n), np.int64)
        dispatched = np.zeros(n + 1, np.int64)
        inversions = np.zeros(b, np.int64)
        narrowed = np.zeros(b, np.int64)
        beats = [0] * n
        backlog = [0] * n
        consistent = True
    now_ns = time.monotonic_ns()  # workers stamp CLOCK_MONOTONIC too: system-wide, comparable here
    ages = [max(0.0, (now_ns - beat) / 1e9) if beat else None for beat in beats]
    top, other_items, other_bytes = _top_flows(distributor, k)
    return _View(
        bands=[band.name for band in distributor.config.bands],
        outcomes=outcomes,
        wait=wait,
        wait_us=wait_us,
        shard_items=shard_items,
        shard_bytes=shard_bytes,
        dispatched=dispatched,
        inversions=inversions,
        narrowed=narrowed,
        heartbeat_age=ages,
        backlog=backlog,
        consistent=consistent,
        top=top,
        other_items=other_items,
        other_bytes=other_bytes,
        uptime=time.monotonic() - distributor.started,
    )


# ---------------------------------------------------------------------------------------------- Prometheus


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class FlowshardCollector(Collector):
    """A prometheus-client collector over one distributor; also registrable in a shared registry."""

    def __init__(self, distributor: Distributor, top_flows: int = TOP_FLOWS) -> None:
        self.distributor = distributor
        self.top_flows = top_flows

    def collect(self) -> Iterator[Metric]:
        d = self.distributor
        v = _view(d, self.top_flows)
        ledger = d.ledger
        budget = ledger.budget
        bands = v.bands
        shards = [str(i) for i in range(d.n_shards)]

        requests = CounterMetricFamily(
            "flowshard_requests",
            "Requests that reached a final outcome, by band, outcome and reason.",
            labels=["band", "outcome", "reason"],
        )
        for bi, band in enumerate(bands):
            row = v.outcomes[bi].tolist()
            for o in _OUTCOMES:
                requests.add_metric([band, o.status, o.reason], row[o])
        yield requests

        queue_size = GaugeMetricFamily(
            "flowshard_queue_size",
            "Requests queued per band, in transit to a shard included (exact).",
            labels=["band"],
        )
        queue_bytes = GaugeMetricFamily(
            "flowshard_queue_bytes", "Bytes queued per band, in transit to a shard included (exact).", labels=["band"]
        )
        queue_limit_requests = GaugeMetricFamily(
            "flowshard_queue_limit_requests", "Queued requests allowed per band (+Inf: unlimited).", labels=["band"]
        )
        queue_limit_bytes = GaugeMetricFamily(
            "flowshard_queue_limit_bytes", "Queued bytes allowed per band (+Inf: unlimited).", labels=["band"]
        )
        retry_after = GaugeMetricFamily(
            "flowshard_retry_after_seconds", "Retry-After currently sent with this band's 429s.", labels=["band"]
        )
        grants = GaugeMetricFamily(
            "flowshard_grants_outstanding", "Dispatch grants sent to shards and not yet answered.", labels=["band"]
        )
        for bi, band in enumerate(bands):
            lb = ledger.bands[bi]
            queue_size.add_metric([band], lb.queued_items)
            queue_bytes.add_metric([band], lb.queued_bytes)
            queue_limit_requests.add_metric([band], lb.max_items)
            queue_limit_bytes.add_metric([band], lb.max_bytes)
            retry_after.add_metric([band], d.retry[bi].value)
            grants.add_metric([band], lb.granted)
        yield from (queue_size, queue_bytes, queue_limit_requests, queue_limit_bytes)
        yield _gauge(
            "flowshard_queue_total_limit_requests",
            "Queued requests allowed overall (+Inf: unlimited).",
            ledger.max_items,
        )
        yield _gauge(
            "flowshard_queue_total_limit_bytes", "Queued bytes allowed overall (+Inf: unlimited).", ledger.max_bytes
        )

        shard_size = GaugeMetricFamily(
            "flowshard_shard_queue_size",
            "Requests queued per shard and band (shared memory: enq - deq).",
            labels=["shard", "band"],
        )
        shard_bytes = GaugeMetricFamily(
            "flowshard_shard_queue_bytes",
            "Bytes queued per shard and band (shared memory: enq - deq).",
            labels=["shard", "band"],
        )
        for bi, band in enumerate(bands):
            items, nbytes = v.shard_items[bi].tolist(), v.shard_bytes[bi].tolist()
            for si, shard in enumerate(shards):
                shard_size.add_metric([shard, band], items[si])
                shard_bytes.add_metric([shard, band], nbytes[si])
        yield from (shard_size, shard_bytes)

        backlog = GaugeMetricFamily(
            "flowshard_shard_input_backlog_bytes",
            "The requests routed to each shard that it has not read yet, each counted as its bytes and at least "
            "1 KiB: how far behind its input it is (JSQ-Bytes's slack sends a new flow to the lowest-numbered "
            "shard within jsq_slack_bytes of the least).",
            labels=["shard"],
        )
        for si, shard in enumerate(shards):
            backlog.add_metric([shard], v.backlog[si])
        yield backlog

        flow_size = GaugeMetricFamily(
            "flowshard_flow_queue_size",
            f'Requests queued per flow: the top {self.top_flows} flows by bytes, the rest summed as flow="".',
            labels=["band", "flow"],
        )
        flow_bytes = GaugeMetricFamily(
            "flowshard_flow_queue_bytes",
            f'Bytes queued per flow: the top {self.top_flows} flows by bytes, the rest summed as flow="".',
            labels=["band", "flow"],
        )
        for t in v.top:
            flow_size.add_metric([bands[t.band], t.flow], t.items)
            flow_bytes.add_metric([bands[t.band], t.flow], t.bytes)
        for bi, band in enumerate(bands):
            flow_size.add_metric([band, REST_FLOW], v.other_items[bi])
            flow_bytes.add_metric([band, REST_FLOW], v.other_bytes[bi])
        yield from (flow_size, flow_bytes)

        yield _gauge("flowshard_inflight_requests", "Dispatched requests holding a ticket.", budget.inflight)
        yield _gauge(
            "flowshard_inflight_bytes", "Bytes of dispatched requests holding a ticket.", budget.inflight_bytes
        )
        yield _gauge(
            "flowshard_inflight_limit_requests", "In-flight request limit (+Inf: unlimited).", budget.max_requests
        )
        yield _gauge("flowshard_inflight_limit_bytes", "In-flight byte limit (+Inf: unlimited).", budget.max_bytes)
        yield _gauge(
            "flowshard_saturation",
            "max(in-flight / limit) over requests and bytes, and in proxy mode the pool's utilization; 1 = saturated.",
            ledger.saturation(),
        )
        yield grants
        yield _gauge("flowshard_grants_reserved_bytes", "Bytes reserved by outstanding grants.", ledger.grants_bytes)
        yield _gauge("flowshard_pending_requests", "Admissions awaiting their final outcome.", len(d.pending))
        yield retry_after

        hist = HistogramMetricFamily(
            "flowshard_wait_seconds",
            "Queue wait of dispatched requests per band.",
            labels=["band"],
        )
        for bi, band in enumerate(bands):
            counts = v.wait[bi]
            cumulative = np.cumsum(counts).tolist()
            hist.add_metric([band], list(zip(_LE, cumulative, strict=True)), int(v.wait_us[bi]) / 1e6)
        yield hist

        dispatched = CounterMetricFamily(
            "flowshard_dispatched",
            'Dispatches per shard; shard="distributor" is the idle fast path.',
            labels=["shard"],
        )
        counts = v.dispatched.tolist()
        for si, shard in enumerate(shards):
            dispatched.add_metric([shard], counts[si])
        dispatched.add_metric([DISTRIBUTOR_SHARD], counts[d.n_shards])
        yield dispatched

        inversions = CounterMetricFamily(
            "flowshard_priority_inversions",
            "Dispatches of the band that took budget a higher band, eligible under its ceiling, was short of: "
            "some of its work already without a grant at the dispatch was left without one by the "
            "distributor's next plan (counted exactly by the distributor from its ledger).",
            labels=["band"],
        )
        narrowed = CounterMetricFamily(
            "flowshard_grants_narrowed",
            "Grants of the band a shard handed back because a higher band's work was waiting ungranted.",
            labels=["band"],
        )
        for bi, band in enumerate(bands):
            inversions.add_metric([band], int(v.inversions[bi]))
            narrowed.add_metric([band], int(v.narrowed[bi]))
        yield inversions
        yield narrowed

        restarts = CounterMetricFamily("flowshard_worker_restarts", "Worker restarts per shard.", labels=["shard"])
        spawn_failures = CounterMetricFamily(
            "flowshard_worker_spawn_failures",
            "Failed attempts to start a shard's worker (each is retried with back-off).",
            labels=["shard"],
        )
        up = GaugeMetricFamily(
            "flowshard_worker_up", "1 while the shard's worker is connected and ready.", labels=["shard"]
        )
        age = GaugeMetricFamily(
            "flowshard_worker_heartbeat_age_seconds",
            "Seconds since the shard's last heartbeat (absent before the first).",
            labels=["shard"],
        )
        for si, shard in enumerate(shards):
            s = d.shards[si]
            restarts.add_metric([shard], s.restarts)
            spawn_failures.add_metric([shard], s.spawn_failures)
            up.add_metric([shard], 1 if s.ready else 0)
            beat = v.heartbeat_age[si]
            if beat is not None:
                age.add_metric([shard], beat)
        yield from (restarts, spawn_failures, up, age)

        yield _gauge(
            "flowshard_acceptors",
            "Acceptor processes serving the client connections (serve --acceptors; 0: the distributor does).",
            d.n_acceptors,
        )
        yield _counter(
            "flowshard_acceptor_restarts",
            "Acceptor processes started again after they died (their clients' waits were cancelled).",
            d.counters["acceptor_restarts"],
        )

        guards = CounterMetricFamily(
            "flowshard_protective_actions",
            "Protective actions against clients and resource exhaustion (docs/service.md: Resource limits).",
            labels=["front", "action"],
        )
        for front, actions in GUARD_ACTIONS.items():
            for action in actions:
                guards.add_metric([front, action], d.guards[(front, action)])
        yield guards

        yield _counter(
            "flowshard_tickets_released",
            "Tickets released by clients (or their connection closing).",
            d.counters["tickets_released"],
        )
        yield _counter(
            "flowshard_tickets_expired", "Tickets whose lease expired unreleased.", d.counters["tickets_expired"]
        )
        yield _counter(
            "flowshard_dispatches_unclaimed",
            "Dispatches whose client had gone before their answer (cancelled while being dispatched, or an answer "
            "cut by the client's leaving): budget freed at once, not counted as a ticket released.",
            d.counters["dispatches_unclaimed"],
        )
        yield _gauge("flowshard_flow_slots_used", "Shared-memory flow slots owned by a flow.", len(d.slots))
        yield _gauge("flowshard_flow_slots_total", "Shared-memory flow slots configured.", d.slots.slots)
        yield _counter(
            "flowshard_flow_slots_shared",
            "Routings that used a hashed, shared slot because the table was full (routing approximate).",
            d.slots.shared,
        )
        yield _gauge(
            "flowshard_stats_consistent",
            "1 when every writer's shared-memory rows were read consistently.",
            1 if v.consistent else 0,
        )
        yield _gauge("flowshard_uptime_seconds", "Seconds since the distributor started.", v.uptime)
        if d.proxy is not None:
            yield from d.proxy.metrics()


def render_metrics(distributor: Distributor) -> tuple[bytes, str]:
    """(body, content type) for `GET /metrics`, in the Prometheus text exposition format."""
    return generate_latest(FlowshardCollector(distributor)), CONTENT_TYPE_LATEST


# ---------------------------------------------------------------------------------------------- /v1/stats


def _limit(value: float) -> int | None:
    """JSON has no infinity: an unlimited limit is null."""
    return None if math.isinf(value) else int(value)


# Keys of `GET /v1/stats` renamed to the configuration's names (and the Prometheus metrics'
# `_limit_requests`): the old key -> its new name. Both are sent for this release; the old ones
# are deprecated (docs/service.md, "GET /v1/stats") and go in the next.
DEPRECATED_TOTALS_KEYS: Final = {"max_queued_items": "max_queued_requests", "max_inflight": "max_inflight_requests"}
DEPRECATED_BAND_KEYS: Final = {"max_items": "max_requests"}


def stats_snapshot(distributor: Distributor, top_flows: int = TOP_FLOWS) -> dict[str, Any]:
    """The JSON document of `GET /v1/stats`: plain dicts, lists, ints, floats, strings and None.
    A limit has its configuration key's name (`max_queued_requests`, `max_inflight_requests`, a
    band's `max_requests`); DEPRECATED_*_KEYS are the old names, sent as well for now."""
    d = distributor
    v = _view(d, top_flows)
    ledger = d.ledger
    budget = ledger.budget
    now = time.monotonic()
    labels = [o.label for o in _OUTCOMES]
    bands: list[dict[str, Any]] = []
    for bi, bc in enumerate(d.config.bands):
        lb = ledger.bands[bi]
        counts = v.wait[bi].tolist()
        wait_sum = int(v.wait_us[bi]) / 1e6  # seconds, exact to the µs
        bands.append(
            {
                "index": bi,
                "priority": bc.priority,
                "name": bc.name,
                "fairness": bc.fairness,
                "ordering": bc.ordering,
                "queued_items": lb.queued_items,
                "queued_bytes": lb.queued_bytes,
                "max_requests": _limit(lb.max_items),  # the band's `max_requests`
                "max_bytes": _limit(lb.max_bytes),
                "active_flows": len(lb.flows),
                "grants_outstanding": lb.granted,
                "outcomes": dict(zip(labels, v.outcomes[bi].tolist(), strict=True)),
                "wait_hist": {
                    "bounds": list(WAIT_BUCKETS),  # upper bounds, seconds; counts has one more (overflow)
                    "counts": counts,
                    "count": sum(counts),
                    "sum": wait_sum,
                    "sum_estimate": wait_sum,  # (its name before the sum was exact; deprecated)
                },
                "retry_after": d.retry[bi].value,
                "priority_inversions": int(v.inversions[bi]),
                "grants_narrowed": int(v.narrowed[bi]),
                **{old: _limit(lb.max_items) for old in DEPRECATED_BAND_KEYS},
            }
        )
    dispatched = v.dispatched.tolist()
    shards: list[dict[str, Any]] = []
    for si, s in enumerate(d.shards):
        shards.append(
            {
                "shard": si,
                "ready": s.ready,
                "pid": s.pid,
                "restarts": s.restarts,
                "queued_items": v.shard_items[:, si].tolist(),  # per band, in the order of "bands"
                "queued_bytes": v.shard_bytes[:, si].tolist(),
                "dispatched": dispatched[si],
                "grants_outstanding": ledger.outstanding_grants(si),
                # its grants unanswered this long (s) since one was planned (0: none): from
                # ledger.ANSWER_TIMEOUT it gets no more until it answers
                "grants_unanswered_seconds": ledger.unanswered_for(si, now),
                "heartbeat_age_seconds": v.heartbeat_age[si],
                "input_backlog_bytes": v.backlog[si],  # sent to it, not read yet
                "frames_to": s.frames_to,  # frames sent to this shard, and received from it (bench.hops)
                "frames_from": s.frames_from,
            }
        )
    return {
        "uptime_seconds": v.uptime,
        "accepting": d.accepting,
        "ready": d.ready,
        "totals": {
            "queued_items": ledger.queued_items,
            "queued_bytes": ledger.queued_bytes,
            # room held within the queue limits but queued by none: for displacing requests waiting for
            # their victims, and for requests a stopped shard still holds after they were ended
            "held_items": ledger.reserved_items,
            "held_bytes": ledger.reserved_bytes,
            "max_queued_requests": _limit(ledger.max_items),
            "max_queued_bytes": _limit(ledger.max_bytes),
            "inflight": budget.inflight,
            "inflight_bytes": budget.inflight_bytes,
            "max_inflight_requests": _limit(budget.max_requests),
            "max_inflight_bytes": _limit(budget.max_bytes),
            "saturation": ledger.saturation(),
            "grants_outstanding": ledger.grants_out,
            "grants_reserved_bytes": ledger.grants_bytes,
            "pending": len(d.pending),
            "tickets": len(d.tickets),
            "dispatched": sum(dispatched),
            "fast_path_dispatched": dispatched[d.n_shards],
            # the old names, still sent this release (docs/service.md: deprecated)
            "max_queued_items": _limit(ledger.max_items),
            "max_inflight": _limit(budget.max_requests),
        },
        "bands": bands,
        "shards": shards,
        "top_flows": [
            {"flow": t.flow, "band": v.bands[t.band], "queued_items": t.items, "queued_bytes": t.bytes} for t in v.top
        ],
        "flow_slots": {"used": len(d.slots), "total": d.slots.slots, "shared": d.slots.shared},
        "counters": dict(d.counters),
        "acceptors": _acceptors(d),
        "consistent": v.consistent,
        **({"proxy": d.proxy.snapshot()} if d.proxy is not None else {}),
    }


def _acceptors(d: Distributor) -> list[dict[str, Any]]:
    """Per acceptor process: up (said hello and its link is open), pid, the connections it serves."""
    acceptors = d.acceptors
    if acceptors is None:
        return []
    out = []
    for index, link in enumerate(acceptors.links):
        up = link is not None and link.ready
        out.append({"index": index, "up": up, "pid": link.pid if link is not None else 0,
                    "connections": link.connections if link is not None else 0, "restarts": acceptors.restarts[index]})
    return out
