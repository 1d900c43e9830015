"""One load-generator process: drives its part of every flow of a scenario against the service.

Run as `python -m bench.loadgen SPEC_FILE` by the bench runner, which starts one or more of these so
that the generator is not the bottleneck. Each process takes part `index` of `procs` of *every* flow
(Poisson and constant rates divided, bursts and closed-loop clients split; flows with fewer clients
or burst requests than processes go whole to one process each, see `part_of`), so the load is spread
evenly whatever the flow mix; part 0 of 1 replays exactly the request stream the simulator sees.

Protocol with the runner (stdout lines): `ready` once connected; then it reads `go T0` on stdin (T0:
the common start, `time.monotonic()`, which is system-wide); `p SUBMITTED COMPLETED` every 0.25 s;
`done` after the result is written to the spec's `result_path` (msgpack).

Measurement:
- Open loop: each request is sent at its absolute intended time (a precise timer, `bench.timer`);
  latency is measured from the *intended* time, so a generator that falls behind shows it as latency
  (no coordinated omission). `rtt` (from the actual send) and `lag` (actual - intended) are kept too.
- Closed loop: each client sends, waits for the outcome, holds a dispatched request's ticket for its
  service time, releases it, thinks, and sends again; a refused request backs off first.
- The backend is simulated: a dispatched request holds its ticket for its sampled service time
  (`loop.call_later`, millisecond precision), then the generator releases it.
- Figures for [warmup, duration] (the window): latencies of requests *intended* in it, service of
  dispatches *answered* in it. Outcome counts cover the whole run; at the end, what is still pending
  is `unfinished` (drain = false: at once; drain = true: after waiting for outcomes, releasing the
  tickets of finished services meanwhile so that queued requests can still be dispatched).
- A per-request log (flow, times, outcome, units) goes back to the runner for the fairness figures
  that need every process's requests on one time line (capped at `log_limit` rows per process). A
  request still pending at the end is logged as `UNFINISHED`, answered at the end: it was backlogged
  until then, which the service difference and the apparent inversions must see.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import os
import resource
import sys
import time
from array import array
from collections.abc import Callable
from typing import Any

import msgspec
import uvloop

from bench.histogram import Histogram
from bench.timer import PreciseTimer
from bench.wire import BinaryConn, HttpPool, connect_binary
from distributor.fdreserve import raise_descriptor_limit
from flowshard.config import band_index
from flowshard.scenario import (
    Bursts,
    Closed,
    Constant,
    FlowInstance,
    FlowSource,
    FlowSpec,
    Poisson,
    Scenario,
    Shapes,
)
from flowshard.types import N_OUTCOMES, Outcome

__all__ = ["LOG_COLUMNS", "UNFINISHED", "UNSENT", "GenResult", "GenSpec", "part_of", "run_generator"]

_DISPATCHED = int(Outcome.DISPATCHED)
_REJECTED = frozenset({int(Outcome.REJECTED_CAPACITY), int(Outcome.REJECTED_SHUTTING_DOWN)})
_ERROR = -1  # log outcome of a request the service refused as invalid
UNFINISHED = -2  # log outcome of a request still pending when the run ended (`done`: the end)
# ... of one still waiting here for a free HTTP connection then (`HttpPool`): the service never saw it, so
# it is no backlog or demand of the service's (a review: 221 of them made `ttl-storm` over HTTP read
# "UNFAIR: storm +59 %", a service difference of 191,000 B against 3,000 without them)
UNSENT = -3
MAX_SENDS_PER_PASS = 512  # a late generator catches up in slices, so replies are still read
PROGRESS_EVERY = 0.25
NEXT_PASS = 50e-6  # a think/service time shorter than this ends on the next loop pass (no timer)
# column name -> array typecode of the per-request log
# seq, shard, s_recv, s_enq, s_disp: the service's view of the request from its answer (see
# flowshard.codec.Audited; times relative to T0 on the same clock): -1, -2, nan when it gave none.
# released: when the generator released a dispatched request's ticket, its service time over (a
# timer fires late, ~0.1-0.2 ms here, and the slot is held until then); nan if it did not in the run
LOG_COLUMNS = {"flow": "i", "intended": "d", "sent": "d", "done": "d", "outcome": "b", "size": "q", "tokens": "q",
               "wait": "f", "service": "f", "seq": "q", "shard": "i", "s_recv": "d", "s_enq": "d", "s_disp": "d",
               "released": "d"}
NO_VIEW = (-1, -2, math.nan, math.nan, math.nan)


class GenSpec(msgspec.Struct, kw_only=True):
    """What one generator process is told to do (written by the runner, read by the process)."""

    index: int
    procs: int
    scenario: bytes  # msgspec JSON of the Scenario (already adjusted: rate, duration)
    transport: str  # "binary" | "http"
    host: str
    port: int
    conns: int  # binary connections, or HTTP admission connections opened up front
    max_conns: int  # HTTP: most admission connections
    lead: float  # seconds the precise timer wakes early (see bench.timer)
    drain_timeout: float
    log_limit: int
    result_path: str
    audit: bool = True  # ask for the service's view of every admission


class GenResult(msgspec.Struct, kw_only=True):
    """Everything one generator process measured; the runner merges the results of all processes."""

    index: int
    pid: int
    flows_submitted: list[int]
    flows_outcomes: list[list[int]]  # [flow][Outcome]
    flows_unfinished: list[int]
    flows_errors: list[int]
    window: list[list[float]]  # [flow] -> [served req, bytes, tokens, offered req, bytes, tokens] in the window
    inflight_at_end: int
    answered_in_window: int
    unanswered_in_window: int  # intended in the window, still without an outcome at the end
    sent_in_window: int
    dispatched_in_window: int
    histograms: dict[str, dict[str, Any]]
    log: dict[str, bytes]
    log_rows: int
    log_truncated: bool
    errors: list[str]
    precise_timer: bool
    spun: float
    spun_window: float  # of which inside the window
    pool_waits: int
    unsent: int  # of them, still waiting for a connection when the run ended (`UNSENT`)
    connect_waits: int = 0  # HTTP: admissions that waited for a connection to open (`HttpPool`)
    connect_wait_most: float = 0.0  # the longest of those waits, seconds
    refused: int = 0  # HTTP connections the service refused (past its max_connections)
    max_conns: int = 0  # HTTP: the admission connections it allowed itself (`--max-conns` within its descriptors)
    most_conns: int
    released: int
    release_failed: int


def part_of(spec: FlowSpec, part: int, parts: int, member: int = 0) -> FlowSpec | None:
    """Part `part` of `parts` of the load of flow `member` of an entry (None: this part sends nothing for it).

    Rates are divided, burst sizes and closed-loop clients split, so every part gets a share of every
    flow. When a burst has fewer requests, or a flow fewer clients, than there are parts (`count = 8`
    flows of one client each), that leaves parts idle: then each flow goes whole to part `member % parts`.
    """
    if parts == 1:
        return spec
    a = spec.arrival
    replace = msgspec.structs.replace
    if isinstance(a, Poisson):
        return replace(spec, arrival=replace(a, rate=a.rate / parts))
    if isinstance(a, Constant):
        start = spec.start + part / a.rate
        if spec.stop is not None and start >= spec.stop:
            return None
        return replace(spec, arrival=replace(a, rate=a.rate / parts), start=start)
    units = a.size if isinstance(a, Bursts) else a.concurrency
    if units < parts and spec.count > units:
        return spec if member % parts == part else None
    share = units // parts + (1 if part < units % parts else 0)
    if not share:
        return None
    if isinstance(a, Bursts):
        return replace(spec, arrival=replace(a, size=share))
    return replace(spec, arrival=replace(a, concurrency=share))


def part_seed(seed: int, part: int) -> int:
    """Part 0 keeps the scenario's seed (the simulator's exact streams); other parts draw their own."""
    return seed if part == 0 else (seed + 1_000_003 * part) % (1 << 63)


class _Flow:
    __slots__ = ("band", "closed", "id", "index", "priority", "slo", "source", "stop", "ttl", "weight")

    def __init__(self, index: int, source: FlowSource, band: int, stop: float) -> None:
        spec = source.instance.spec
        self.index = index
        self.id = source.instance.id
        self.source = source
        self.band = band
        self.priority = spec.priority
        self.ttl = float(spec.ttl)
        self.slo = float(spec.slo)
        self.weight = float(spec.weight or 0.0)
        self.stop = stop
        self.closed = spec.arrival if isinstance(spec.arrival, Closed) else None


# descriptors a generator process keeps for itself beside its HTTP admission connections (its release
# connection, its result file, the interpreter's own)
SPARE_FDS = 64


def descriptors_for(max_conns: int) -> int:
    """`max_conns` HTTP admission connections, or as many as this process's descriptor limit allows
    once raised as far as its hard limit lets it (a soft limit of 1,024 is common)."""
    soft, _ = raise_descriptor_limit(max_conns + SPARE_FDS)
    if soft == resource.RLIM_INFINITY:
        return max_conns
    return max(1, min(max_conns, soft - SPARE_FDS))


class Generator:
    """The event-driven generator of one process. Times are `time.monotonic()` seconds."""

    def __init__(self, spec: GenSpec, loop: asyncio.AbstractEventLoop) -> None:
        self.spec = spec
        self.loop = loop
        scenario = msgspec.json.decode(spec.scenario, type=Scenario)
        self.scenario = scenario
        workload = scenario.workload
        self.duration = workload.duration
        self.warmup = workload.warmup
        self.drain = workload.drain
        bands = band_index(scenario.server)
        self.n_bands = len(scenario.server.bands)
        self.flows: list[_Flow | None] = []
        seed = part_seed(workload.seed, spec.index)
        for entry in workload.flows:
            shapes = Shapes.of(entry)  # parts differ in their arrivals only
            for member, flow_id in enumerate(entry.flow_ids()):
                part = part_of(entry, spec.index, spec.procs, member)
                if part is None:
                    self.flows.append(None)
                    continue
                source = FlowSource(FlowInstance(flow_id, part, member), seed, shapes)
                stop = min(part.stop or workload.duration, workload.duration)
                self.flows.append(_Flow(len(self.flows), source, bands(entry.priority), stop))
        n = len(self.flows)
        self.submitted = [0] * n
        self.outcomes = [[0] * N_OUTCOMES for _ in range(n)]
        self.unfinished = [0] * n
        self.unsent = 0  # of them, still waiting for a free HTTP connection at the end (`UNSENT`)
        self.errors_by_flow = [0] * n
        self.win = [[0.0] * 6 for _ in range(n)]
        self.pending: dict[int, tuple[_Flow, float, float, int, int, float]] = {}
        self.next_rid = 0
        self.tickets: set[int] = set()  # dispatched, still in (simulated) service
        self.spun_window = 0.0
        self.completed = 0
        self.answered_in_window = 0  # outcomes (and errors) received inside the window
        self.sent_in_window = 0  # requests whose intended send time is inside the window
        self.dispatched_in_window = 0
        self.unanswered_in_window = 0
        self.arrivals_stopped = False  # no more sends: the run's end, or the drain's start
        self.finished = False  # outcomes no longer awaited: services still running keep their tickets
        self.t0 = 0.0
        self.errors: list[str] = []
        self.n_errors = 0
        # histograms (ns)
        self.h_latency = Histogram()
        self.h_rtt = Histogram()
        self.h_lag = Histogram()
        self.h_band_latency = [Histogram() for _ in range(self.n_bands)]
        self.h_band_wait = [Histogram() for _ in range(self.n_bands)]
        self.log: dict[str, array[Any]] = {name: array(code) for name, code in LOG_COLUMNS.items()}
        self.log_rows = 0
        self.log_truncated = False
        self.heap: list[tuple[float, int, int, tuple[float, int, int, float]]] = []
        self.seq = 0
        self.timer = PreciseTimer(loop, self._fire, spec.lead)
        self.binary: list[BinaryConn] = []
        self.http: HttpPool | None = None
        self._admit: Callable[[int, str, int, int, float, float, int, float], None] = self._no_transport
        self._release: Callable[[int], None] = self._no_release

    # ------------------------------------------------------------ set-up

    def _no_transport(self, *args: Any) -> None:
        raise RuntimeError("no transport")

    def _no_release(self, ticket: int) -> None:
        raise RuntimeError("no transport")

    async def connect(self) -> None:
        spec = self.spec
        if spec.transport == "binary":
            self.binary = [await connect_binary(self, spec.host, spec.port, spec.audit)
                           for _ in range(max(1, spec.conns))]
            conns = self.binary
            if len(conns) == 1:
                self._admit = conns[0].admit
                self._release = conns[0].release
            else:
                n = len(conns)

                def admit(rid: int, *args: Any) -> None:
                    conns[rid % n].admit(rid, *args)

                self._admit = admit
                self._release = conns[0].release  # tickets are global: any connection may release one
        else:
            idle_within = self.scenario.server.service.idle_timeout * 0.8  # (the service's, as the scenario has it)
            pool = HttpPool(self, self.loop, spec.host, spec.port, descriptors_for(spec.max_conns), spec.audit,
                            idle_within)
            await pool.open(spec.conns)
            self.http = pool
            self._admit = pool.admit
            self._release = pool.release

    def start(self, t0: float) -> None:
        """Schedule every flow's first request relative to the common start `t0`."""
        self.t0 = t0
        loop = self.loop
        for flow in self.flows:
            if flow is None:
                continue
            start = t0 + flow.source.instance.spec.start
            if flow.closed is not None:
                for _ in range(flow.closed.concurrency):
                    shape = flow.source.next()
                    if start + shape[0] - t0 < flow.stop:
                        at = loop.time() + (start + shape[0] - time.monotonic())
                        loop.call_at(at, self._send_closed, flow, shape)
            else:
                shape = flow.source.next()
                if start + shape[0] - t0 < flow.stop:
                    self._push(start + shape[0], flow.index, shape)
        if self.heap:
            self.timer.arm(self.heap[0][0])

    def _push(self, at: float, flow: int, shape: tuple[float, int, int, float]) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, self.seq, flow, shape))

    # ------------------------------------------------------------ sending

    def _fire(self) -> None:
        """Send every open-loop request that is due (in slices), then re-arm for the next one."""
        if self.arrivals_stopped:
            return
        heap = self.heap
        flows = self.flows
        now = time.monotonic()
        t0 = self.t0
        sent = 0
        while heap and heap[0][0] <= now and sent < MAX_SENDS_PER_PASS:
            at, _, index, shape = heapq.heappop(heap)
            flow = flows[index]
            assert flow is not None
            self._submit(flow, shape, at, now)
            sent += 1
            nxt = flow.source.next()
            if at + nxt[0] - t0 < flow.stop:
                self._push(at + nxt[0], index, nxt)
        if heap:
            self.timer.arm(heap[0][0])

    def _send_closed(self, flow: _Flow, shape: tuple[float, int, int, float]) -> None:
        self.timer.work += 1
        if self.arrivals_stopped:
            return
        now = time.monotonic()
        if now - self.t0 >= flow.stop:
            return
        self._submit(flow, shape, now, now)

    def _submit(self, flow: _Flow, shape: tuple[float, int, int, float], intended: float, now: float) -> None:
        _, size, tokens, service = shape
        rid = self.next_rid
        self.next_rid = rid + 1
        self.submitted[flow.index] += 1
        self.pending[rid] = (flow, intended, now, size, tokens, service)
        rel = intended - self.t0
        if self.warmup <= rel < self.duration:
            self.sent_in_window += 1
        self.h_lag.record(int((now - intended) * 1e9))
        self._admit(rid, flow.id, flow.priority, size, flow.ttl, flow.slo, tokens, flow.weight)

    # ------------------------------------------------------------ replies (Sink)

    def on_result(self, rid: int, outcome: int, ticket: int, wait: float,
                  view: tuple[int, int, float, float, float] | None = None) -> None:
        rec = self.pending.pop(rid, None)
        if rec is None:
            if outcome == _DISPATCHED:  # abandoned at the end: nothing will release its ticket later
                self._release(ticket)
            return
        done = time.monotonic()
        flow, intended, sent, size, tokens, service = rec
        index = flow.index
        self.outcomes[index][outcome] += 1
        self.completed += 1
        t0 = self.t0
        rel_intended = intended - t0
        rel_done = done - t0
        in_window = self.warmup <= rel_intended < self.duration
        win = self.win[index]
        cost = tokens or size
        if in_window:
            latency = int((done - intended) * 1e9)
            self.h_latency.record(latency)
            self.h_rtt.record(int((done - sent) * 1e9))
            self.h_band_latency[flow.band].record(latency)
            if outcome not in _REJECTED:
                win[3] += 1
                win[4] += size
                win[5] += cost
        if view is None:
            view = NO_VIEW
        else:
            seq, shard, received, enqueued, dispatched = view
            view = (seq, shard, received - t0, enqueued - t0 if enqueued else math.nan,
                    dispatched - t0 if dispatched else math.nan)
        self._log(index, rel_intended, sent - t0, rel_done, outcome, size, tokens, wait, service, view)
        done_in_window = self.warmup <= rel_done < self.duration
        self.answered_in_window += done_in_window
        if outcome == _DISPATCHED:
            self.h_band_wait[flow.band].record(int(wait * 1e9))
            if done_in_window:
                self.dispatched_in_window += 1
                win[0] += 1
                win[1] += size
                win[2] += cost
            self.tickets.add(ticket)
            row = -1 if self.log_truncated else self.log_rows - 1  # (its row, logged just above)
            if service >= NEXT_PASS:
                self.loop.call_later(service, self._end_service, flow, ticket, row)
            elif service > 0:
                self.loop.call_soon(self._end_service, flow, ticket, row)
            else:
                self._end_service(flow, ticket, row)
        elif flow.closed is not None:
            self._next_closed(flow, failed=True)

    def on_error(self, rid: int, status: int, message: str) -> None:
        rec = self.pending.pop(rid, None)
        self._note(f"{status}: {message}")
        if rec is None:
            return
        flow, intended, sent, size, tokens, service = rec
        self.errors_by_flow[flow.index] += 1
        self.completed += 1
        t0 = self.t0
        done = time.monotonic() - t0
        self.answered_in_window += self.warmup <= done < self.duration
        self._log(flow.index, intended - t0, sent - t0, done, _ERROR, size, tokens, 0.0, service, NO_VIEW)
        if flow.closed is not None:
            self._next_closed(flow, failed=True)

    def on_lost(self, message: str) -> None:
        self._note(message)

    def on_sent(self, rid: int) -> None:
        """An HTTP admission that waited for a free connection is written now: its `sent` is now (what
        the service's backlog of it starts from, where no answer carries the service's own time: one
        unanswered at the end; a review: counted from when it was asked for, the generator's wait for a
        connection read as the service's, `ttl-storm` over HTTP a service difference of 191,000 B)."""
        rec = self.pending.get(rid)
        if rec is not None:
            self.pending[rid] = (rec[0], rec[1], time.monotonic(), *rec[3:])

    def _note(self, message: str) -> None:
        """A problem for the report: the first five are kept, the others counted."""
        self.n_errors += 1
        if len(self.errors) < 5:
            self.errors.append(message)

    def _end_service(self, flow: _Flow, ticket: int, row: int) -> None:
        self.timer.work += 1
        if self.finished:
            return  # still held at the end: `in flight at end`, released in `_finish`
        self.tickets.discard(ticket)
        if row >= 0:
            self.log["released"][row] = time.monotonic() - self.t0
        self._release(ticket)
        if flow.closed is not None:
            self._next_closed(flow, failed=False)

    def _next_closed(self, flow: _Flow, *, failed: bool) -> None:
        if self.arrivals_stopped:
            return
        closed = flow.closed
        assert closed is not None
        shape = flow.source.next()
        gap = max(shape[0], closed.backoff) if failed else shape[0]
        if gap <= 0:
            self._send_closed(flow, shape)
        elif gap < NEXT_PASS:
            self.loop.call_soon(self._send_closed, flow, shape)
        else:
            self.loop.call_later(gap, self._send_closed, flow, shape)

    def _log(self, flow: int, intended: float, sent: float, done: float, outcome: int, size: int, tokens: int,
             wait: float, service: float, view: tuple[int, int, float, float, float]) -> None:
        if self.log_rows >= self.spec.log_limit:
            self.log_truncated = True
            return
        self.log_rows += 1
        log = self.log
        log["flow"].append(flow)
        log["intended"].append(intended)
        log["sent"].append(sent)
        log["done"].append(done)
        log["outcome"].append(outcome)
        log["size"].append(size)
        log["tokens"].append(tokens)
        log["wait"].append(wait)
        log["service"].append(service)
        seq, shard, received, enqueued, dispatched = view
        log["seq"].append(seq)
        log["shard"].append(shard)
        log["s_recv"].append(received)
        log["s_enq"].append(enqueued)
        log["s_disp"].append(dispatched)
        log["released"].append(math.nan)

    # ------------------------------------------------------------ the run

    async def run(self, t0: float, progress: Callable[[int, int], None]) -> GenResult:
        self.start(t0)
        end = t0 + self.duration
        spun_at_start = [0.0]

        def window_opens() -> None:
            spun_at_start[0] = self.timer.spun

        self.loop.call_later(max(0.0, t0 + self.warmup - time.monotonic()), window_opens)
        while time.monotonic() < end:
            await asyncio.sleep(min(PROGRESS_EVERY, max(0.0, end - time.monotonic())))
            progress(self.next_rid, self.completed)
        self.arrivals_stopped = True
        self.spun_window = self.timer.spun - spun_at_start[0]
        self.timer.cancel()
        if self.drain:
            limit = time.monotonic() + self.spec.drain_timeout
            while self.pending and time.monotonic() < limit:
                await asyncio.sleep(0.05)
                progress(self.next_rid, self.completed)
            if self.pending:
                self._note(f"drain: {len(self.pending)} requests still had no outcome after "
                           f"{self.spec.drain_timeout:g} s (--drain-timeout); counted as unfinished")
        self.finished = True
        ended = time.monotonic() - t0
        never_sent = self.http.unsent() if self.http is not None else set()
        for rid, (flow, intended, sent, size, tokens, service) in self.pending.items():
            self.unfinished[flow.index] += 1
            if rid in never_sent:  # (counted unfinished, and in the latency: not the service's backlog)
                self.unsent += 1
                self._log(flow.index, intended - t0, sent - t0, ended, UNSENT, size, tokens, 0.0, service, NO_VIEW)
                self.unanswered_in_window += self.warmup <= intended - t0 < self.duration
                continue
            self._log(flow.index, intended - t0, sent - t0, ended, UNFINISHED, size, tokens, 0.0, service, NO_VIEW)
            if self.warmup <= intended - t0 < self.duration:
                self.unanswered_in_window += 1
                win = self.win[flow.index]
                win[3] += 1
                win[4] += size
                win[5] += tokens or size
        self.pending.clear()
        progress(self.next_rid, self.completed)
        return await self._finish()

    async def _finish(self) -> GenResult:
        inflight = len(self.tickets)
        pool = self.http
        if pool is not None:  # binary: closing the connection releases them
            # first, so that the capacity freed below is not given to admissions still queued on them
            await pool.close_admissions()
            for ticket in self.tickets:
                self._release(ticket)
        released = failed = 0
        for conn in self.binary:
            await conn.close()
            released += conn.released
            failed += conn.release_failed
        if pool is not None:
            limit = time.monotonic() + 2.0
            while pool.releases_unanswered() and time.monotonic() < limit:
                await asyncio.sleep(0.01)  # let the last release replies arrive
            released, failed = pool.released, pool.release_failed
            unanswered = pool.releases_unanswered()
            if unanswered:  # (the service holds their tickets, and budget, until their lease ends)
                self._note(f"{unanswered} releases had no answer at the end: the service may hold their tickets "
                          "until their lease ends")
            await pool.close()
        self.timer.close()
        hist = {"latency": self.h_latency, "rtt": self.h_rtt, "lag": self.h_lag}
        for b in range(self.n_bands):
            hist[f"latency:{b}"] = self.h_band_latency[b]
            hist[f"wait:{b}"] = self.h_band_wait[b]
        return GenResult(
            index=self.spec.index,
            pid=os.getpid(),
            flows_submitted=self.submitted,
            flows_outcomes=self.outcomes,
            flows_unfinished=self.unfinished,
            flows_errors=self.errors_by_flow,
            window=self.win,
            inflight_at_end=inflight,
            answered_in_window=self.answered_in_window,
            unanswered_in_window=self.unanswered_in_window,
            sent_in_window=self.sent_in_window,
            dispatched_in_window=self.dispatched_in_window,
            histograms={k: h.to_dict() for k, h in hist.items()},
            log={k: v.tobytes() for k, v in self.log.items()},
            log_rows=self.log_rows,
            log_truncated=self.log_truncated,
            errors=self.errors if self.n_errors <= len(self.errors) else [*self.errors, f"... {self.n_errors} in all"],
            precise_timer=self.timer.precise,
            spun=self.timer.spun,
            spun_window=self.spun_window,
            pool_waits=pool.pool_waits if pool is not None else 0,
            unsent=self.unsent,
            connect_waits=pool.connect_waits if pool is not None else 0,
            connect_wait_most=pool.connect_wait_most if pool is not None else 0.0,
            refused=pool.refused if pool is not None else 0,
            max_conns=pool.most_allowed if pool is not None else 0,
            most_conns=pool.most_conns if pool is not None else len(self.binary),
            released=released,
            release_failed=failed,
        )


async def _main(spec: GenSpec) -> GenResult:
    loop = asyncio.get_running_loop()
    gen = Generator(spec, loop)
    await gen.connect()
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    line = sys.stdin.readline().split()  # blocking on purpose: nothing else runs before the start
    if len(line) != 2 or line[0] != "go":
        raise SystemExit(f"bench.loadgen: expected 'go T0', got {line!r}")

    def progress(submitted: int, completed: int) -> None:
        out.write(f"p {submitted} {completed}\n")
        out.flush()

    return await gen.run(float(line[1]), progress)


def run_generator(spec_path: str) -> None:
    """Entry point of a generator process."""
    with open(spec_path, "rb") as f:
        spec = msgspec.msgpack.decode(f.read(), type=GenSpec)
    result = uvloop.run(_main(spec))
    with open(spec.result_path, "wb") as f:
        f.write(msgspec.msgpack.encode(result))
    sys.stdout.write("done\n")
    sys.stdout.flush()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m bench.loadgen SPEC_FILE")
    run_generator(sys.argv[1])
