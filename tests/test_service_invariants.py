"""The guarantees of DESIGN.md §4 (and the README's service section) in one mixed real-process run
per shard count: `flowshard serve --shards N`, N = 1, 2, 4, 8.

Each case runs one service (two bands, `high` with displacement and `low` with a band limit; a
budget of BUDGET requests in flight; a global queue limit of CAP requests; a short drain timeout;
the idle fast path on at 1 and 4 shards, off at 2 and 8) through five phases:

A. mixed load: binary clients and HTTP clients over many flows and both bands, some admissions with
   TTLs short enough to expire while queued, dispatched tickets released after a short hold, and
   "victim" binary clients that close their connection while their admissions wait;
Q. a quiet point: no new work, releases held back, the budget full, no grant outstanding, nothing in
   flight between the processes. There a controlled victim's high-band admissions are placed (by
   the queue limit and displacement, counted exactly) and cancelled by closing its connection;
K. a worker crash: SIGKILL of the shard holding the most queued requests (with one shard, the only
   worker) while low-band admissions keep arriving, until the service has restarted it;
B. mixed load again (another victim), then quiescence: everything answered and released;
D. drain: the budget held, work queued on the shards, SIGTERM; late admissions on open connections,
   one release during the drain (exactly one queued request, of the high band, is dispatched), the
   rest evicted at the drain timeout; exit status 0.

Oracles, from raw client-side data and the service's own statistics:

- exactly one outcome per admission (invariant 1): every admission a live client sent resolves (no
  hang, no ConnectionClosed) with an outcome from the allowed set; no binary connection carries a
  second answer for one admission (`AnswerLog`: the Client itself would drop it silently); HTTP
  statuses (and Retry-After) match the outcome table; no live client ever hears `evicted:
  cancelled`; the service's outcome counters sum to exactly the number of admissions sent (a
  request counted twice, or never, breaks it), and equal the client-side tally label by label,
  except for the admissions lost with a closed client, which can only add to `dispatched`,
  `rejected: capacity` and `evicted: cancelled` (victims send only high-band, default-TTL work)
  and together add exactly their number;
- exact budget (invariant 2): the tickets the clients hold (dispatched and not yet released, summed
  over every client, binary and HTTP) never exceed BUDGET, and equal it at the quiet point, where the
  service says it is full; every release of a held ticket is accepted once (tickets outlive their
  shard's crash); sampled `/v1/stats`: in-flight plus outstanding grants never exceed BUDGET;
- exact queue limits (invariant 2): sampled `/v1/stats` (the distributor's ledger, exact): queued
  requests never exceed CAP, the low band never exceeds LOW_CAP; at the quiet point the controlled
  victim's admissions are placed, displace and are rejected exactly as the limits say;
- a crash evicts what the dead shard held and nothing else (README "Shards"): every request it held
  at the quiet point, and those routed to it meanwhile, end `evicted: shard_failure`; the other
  shards keep every queued request; the only outcomes counted meanwhile are shard failures and
  rejections; the worker is restarted once, under a new pid; its tickets stay valid;
- counters reconcile and nothing leaks (invariants 4, 6): at each quiet point (before and after the
  crash: the dead shard's counters reset) per-shard shared-memory queue counters = per band =
  global, in requests and bytes, and the counters account for every admission sent (answered or
  still queued); after quiescence queued, pending, in-flight, tickets and grants are all zero and
  the released-ticket count lies between the tickets the clients saw and the dispatches the
  service counted;
- drain (README "Shutdown"): admissions after SIGTERM on open connections are `rejected:
  shutting_down` (counted exactly so by the service), queued work is dispatched as the budget frees
  within the drain timeout, the rest ends `evicted: shutdown` no earlier than the timeout, the
  service exits 0, and none of its processes (the killed worker and its successor included: the
  harness tracks the whole tree every 20 ms) nor its shared-memory segment is left (`Service.
  leftovers`: no process of the tree alive, no /dev/shm/flowshard-<pid>-* segment; the `launch`
  fixture checks the same again after the test).

Why the crash happens at a quiet point: so that what the other shards and the distributor decide
meanwhile is known exactly (the counts themselves stay exact through a kill at any moment:
tests/test_counts_through_kills.py). Killed while nothing can be decided on a shard (the budget full,
no grant out, no TTL due, no cancellation in flight) the exact counter equality holds; admissions
still arrive and are routed to the dying shard meanwhile (only routing and rejections: decided by
the distributor), so requests in transit to it are part of the test. Not covered here, for the same
reason: a worker killed while it holds a grant (tests/test_service_faults.py has such cases).

Timing: nothing asserts a count that depends on scheduling, only conservation and bounds; the
counts at the quiet point are exact because nothing can change there.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from servicekit import (
    HttpConn,
    Service,
    admit_http,
    band_outcomes,
    launch,
    release_http,
    run,
    shard_queued,
    until,
)

from flowshard.client import AdmitResult, Client, ConnectionClosed
from flowshard.codec import Audited, Result
from flowshard.types import Outcome

__all__ = ["launch"]

D = Outcome.DISPATCHED
BUDGET = 3  # max_inflight_requests
CAP = 12  # max_queued_requests (global)
LOW_CAP = 8  # max_requests of the low band
DRAIN = 1.5  # drain_timeout, seconds
HI, LO = 10, 0
SHORT_TTL = 0.03  # expires while queued unless dispatched at once
BANDS = [
    {"priority": HI, "name": "high", "displacement": True},
    {"priority": LO, "name": "low", "max_requests": LOW_CAP},
]
LABELS = [o.label for o in Outcome]
HTTP_STATUS = {
    "dispatched": 200,
    "rejected:capacity": 429, "evicted:ttl": 429, "evicted:displaced": 429,
    "rejected:shutting_down": 503, "evicted:shard_failure": 503, "evicted:shutdown": 503,
}
# what an admission lost with its closed (victim) client may have ended as: victims send high-band,
# default-TTL admissions only (never displaced, never expired), and no worker dies while they wait
LOST_LABELS = {"dispatched", "rejected:capacity", "evicted:cancelled"}
CASES = [(1, True), (2, False), (4, True), (8, False)]  # (shards, fast_path)
CASE_IDS = [f"{n}shards-fast_path_{'on' if f else 'off'}" for n, f in CASES]


@dataclass
class Bin:
    """A binary client as the test sees it: the tickets it holds, whether it is a victim."""

    c: Client
    victim: bool = False
    tickets: set[int] = field(default_factory=set)
    answered: int = 0  # admissions whose future got an outcome


class AnswerLog:
    """Stands in for a Client's frame reader and records every answer frame's correlation id: the
    Client drops an answer for an id it no longer waits on, so an admission answered twice (or an
    answer for an id never sent) would otherwise go unseen."""

    def __init__(self, client: Client, problems: list[str]) -> None:
        self.client = client
        self.inner = client._reader
        self.problems = problems
        self.ids: set[int] = set()

    def feed(self, data: bytes, limit: int = 1 << 62) -> list[Any]:
        messages = self.inner.feed(data, limit)
        for m in messages:
            if type(m) is Result or type(m) is Audited:
                if m.id in self.ids or m.id >= self.client._next_id:
                    self.problems.append(f"answer {m} for an id answered before or never sent")
                self.ids.add(m.id)
        return messages


@dataclass
class Tally:
    """Raw client-side data over every client of one run."""

    sent: int = 0  # admissions sent (binary and HTTP, victims included)
    heard: Counter[str] = field(default_factory=Counter)  # outcomes heard by live clients
    lost: int = 0  # admissions whose (victim) connection was closed before an answer
    held: set[int] = field(default_factory=set)  # dispatched tickets not yet released, all clients
    peak: int = 0
    short_open: int = 0  # short-TTL admissions not answered yet
    http_open: int = 0  # HTTP admissions not answered yet
    http_releasing: int = 0
    releases: list[tuple[Bin, asyncio.Future[bool]]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def got(self, ticket: int) -> None:
        if ticket in self.held:
            self.violations.append(f"ticket {ticket} dispatched twice")
        self.held.add(ticket)
        self.peak = max(self.peak, len(self.held))
        if len(self.held) > BUDGET:
            self.violations.append(f"clients hold {len(self.held)} tickets > budget {BUDGET}")


def _reconciles(s: dict[str, Any]) -> None:
    """Invariant 4 at a quiescent moment: per shard (shared memory, enqueued - dequeued) summed = per
    band = global (the distributor's ledger), in requests and bytes."""
    shards, bands, t = s["shards"], s["bands"], s["totals"]
    for b, band in enumerate(bands):
        assert sum(x["queued_items"][b] for x in shards) == band["queued_items"], (b, shards, band)
        assert sum(x["queued_bytes"][b] for x in shards) == band["queued_bytes"], (b, shards, band)
    assert sum(b["queued_items"] for b in bands) == t["queued_items"], t
    assert sum(b["queued_bytes"] for b in bands) == t["queued_bytes"], t
    assert s["consistent"] is True


def _label(body: dict[str, Any]) -> str:
    return "dispatched" if body["outcome"] == "dispatched" else f"{body['outcome']}:{body['reason']}"


@pytest.mark.parametrize(("shards", "fast_path"), CASES, ids=CASE_IDS)
def test_mixed_run_with_crash_and_drain_keeps_every_guarantee(launch: Any, shards: int, fast_path: bool) -> None:
    svc: Service = launch(
        shards=shards, budget=BUDGET, max_queued_requests=CAP, bands=BANDS,
        service={"drain_timeout": DRAIN, "fast_path": fast_path},
    )
    port = svc.http_port
    rng = random.Random(1000 + shards)
    tally = Tally()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        paused = [False]  # releases held back (quiet point and crash)
        resume = asyncio.Event()
        resume.set()
        deferred: list[tuple[Bin, int]] = []
        bin_futs: list[asyncio.Future[AdmitResult]] = []
        http_tasks: list[asyncio.Future[None]] = []
        samples: list[dict[str, Any]] = []
        sampling = [True]

        # ---------------------------------------------------------------- sampling /v1/stats
        async def sampler() -> None:
            conn = await HttpConn.open(port)  # opened now: still answered while the service drains
            try:
                while sampling[0]:
                    try:
                        r = await conn.request("GET", "/v1/stats", timeout=5)
                    except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                        return  # the service exited (end of the drain)
                    s = r.json()
                    samples.append(s)
                    t = s["totals"]
                    if t["queued_items"] > CAP:
                        tally.violations.append(f"queued {t['queued_items']} > {CAP}")
                    if s["bands"][1]["queued_items"] > LOW_CAP:
                        tally.violations.append(f"low band queued {s['bands'][1]['queued_items']} > {LOW_CAP}")
                    if t["inflight"] + t["grants_outstanding"] > BUDGET:
                        tally.violations.append(f"inflight {t['inflight']} + grants {t['grants_outstanding']}")
                    await asyncio.sleep(0.01)
            finally:
                conn.close()

        # ---------------------------------------------------------------- binary clients
        async def connect(victim: bool = False) -> Bin:
            c = await Client.connect(svc.host, svc.binary_port)
            c._reader = AnswerLog(c, tally.violations)  # type: ignore[assignment]
            return Bin(c, victim)

        def release(bc: Bin, ticket: int) -> None:
            if bc.c.closed or ticket not in bc.tickets:
                return  # a victim's tickets went with its connection
            if paused[0]:
                deferred.append((bc, ticket))
                return
            bc.tickets.discard(ticket)
            tally.held.discard(ticket)  # before the release is sent: never counted short
            tally.releases.append((bc, bc.c.release(ticket)))

        def on_binary(bc: Bin, short: bool, fut: asyncio.Future[AdmitResult]) -> None:
            if short:
                tally.short_open -= 1
            exc = fut.exception()
            if exc is not None:
                if bc.victim and isinstance(exc, ConnectionClosed):
                    tally.lost += 1
                else:
                    tally.violations.append(f"admission without an outcome: {exc!r}")
                return
            r = fut.result()
            bc.answered += 1
            tally.heard[r.outcome.label] += 1
            if r.outcome is D:
                tally.got(r.ticket)
                bc.tickets.add(r.ticket)
                loop.call_later(rng.uniform(0.002, 0.015), release, bc, r.ticket)

        def submit(bc: Bin, flow: str, priority: int, ttl: float = 0.0) -> asyncio.Future[AdmitResult]:
            fut = bc.c.admit(flow, priority=priority, size=rng.randint(10, 2000), ttl=ttl)
            tally.sent += 1
            short = ttl == SHORT_TTL
            if short:
                tally.short_open += 1
            fut.add_done_callback(lambda f: on_binary(bc, short, f))
            bin_futs.append(fut)
            return fut

        async def close_victim(v: Bin) -> None:
            for t in v.tickets:
                tally.held.discard(t)  # released by the service when the connection closes
            v.tickets.clear()
            await v.c.close()

        async def binary_load(bc: Bin, stop: asyncio.Event) -> None:
            while not stop.is_set():
                for _ in range(2):
                    short = rng.random() < 0.25
                    submit(bc, f"f{rng.randrange(12)}", rng.choice((HI, LO, LO)), SHORT_TTL if short else 0.0)
                await asyncio.sleep(rng.uniform(0.005, 0.02))

        async def victim_burst() -> None:
            v = await connect(victim=True)
            for _ in range(6):
                submit(v, f"v{rng.randrange(3)}", HI)
            await asyncio.sleep(rng.uniform(0.005, 0.03))
            await close_victim(v)

        # ---------------------------------------------------------------- HTTP clients
        async def http_one(flow: str, priority: int, ttl: float = 0.0, hold: bool = True) -> None:
            tally.sent += 1
            tally.http_open += 1
            short = ttl == SHORT_TTL
            if short:
                tally.short_open += 1
            try:
                r = await admit_http(port, flow, priority=priority, bytes=rng.randint(10, 2000), ttl=ttl, timeout=30)
            finally:
                tally.http_open -= 1
                if short:
                    tally.short_open -= 1
            body = r.json()
            label = _label(body)
            tally.heard[label] += 1
            if HTTP_STATUS.get(label) != r.status or (r.status != 200) != ("retry-after" in r.headers):
                tally.violations.append(f"HTTP {r.status} for {label}: {r}")
            if r.status != 200 or not hold:
                return
            ticket = body["ticket"]
            tally.got(ticket)
            await asyncio.sleep(rng.uniform(0.002, 0.015))
            await resume.wait()
            tally.held.discard(ticket)
            tally.http_releasing += 1
            try:
                rr = await release_http(port, ticket)
            finally:
                tally.http_releasing -= 1
            if rr.status != 200:
                tally.violations.append(f"HTTP release of {ticket}: {rr}")

        async def http_load(stop: asyncio.Event) -> None:
            while not stop.is_set():
                short = rng.random() < 0.25
                await http_one(f"h{rng.randrange(4)}", rng.choice((HI, LO)), SHORT_TTL if short else 0.0)
                await asyncio.sleep(rng.uniform(0.0, 0.01))

        async def load(mains: list[Bin], seconds: float) -> None:
            """Binary and HTTP load over both bands for `seconds`, with one victim halfway."""
            stop = asyncio.Event()
            gens = [asyncio.ensure_future(binary_load(bc, stop)) for bc in mains]
            https = [asyncio.ensure_future(http_load(stop)) for _ in range(2)]
            http_tasks.extend(https)  # they may finish after `stop` (held at the quiet point)
            await asyncio.sleep(seconds / 2)
            await victim_burst()
            await asyncio.sleep(seconds / 2)
            stop.set()
            await asyncio.gather(*gens)

        def open_live(extra: tuple[Bin, ...] = ()) -> int:
            return sum(bc.c.in_flight for bc in (*mains, *extra)) + tally.http_open

        def quiet(s: dict[str, Any], extra: tuple[Bin, ...] = ()) -> bool:
            """Nothing can be decided on a shard: budget full, no grant, every pending request queued
            (none parked for displacement, none in transit to a client, none of a closed client)."""
            t = s["totals"]
            return (
                t["grants_outstanding"] == 0 and t["inflight"] == BUDGET
                and t["pending"] == t["queued_items"] == open_live(extra)
            )

        s = await svc.astats()  # the configuration as the service applies it
        assert [b["name"] for b in s["bands"]] == ["high", "low"] and s["bands"][1]["max_requests"] == LOW_CAP
        t = s["totals"]
        assert (t["max_queued_requests"], t["max_inflight_requests"]) == (CAP, BUDGET), t
        sampler_task = asyncio.ensure_future(sampler())
        mains = [await connect() for _ in range(3)]

        # ---------------------------------------------------------------- A: mixed load
        await load(mains, 1.0)

        # ---------------------------------------------------------------- Q: the quiet point
        paused[0] = True
        resume.clear()
        for i in range(BUDGET + 2 * shards):  # fill the budget, and queue work on the shards
            submit(mains[i % len(mains)], f"fill{i}", LO)
        await until(lambda: tally.short_open == 0 and tally.http_releasing == 0
                    and all(f.done() for _, f in tally.releases), 10)
        s = await svc.until_stats(quiet, 10)
        assert len(tally.held) == BUDGET, (tally.held, s["totals"])  # the clients' view = the service's
        assert s["totals"]["tickets"] == BUDGET
        _reconciles(s)

        # a controlled victim: 3 high-band admissions placed exactly as the limits say, then cancelled
        before = band_outcomes(s)
        free, low_queued = CAP - s["totals"]["queued_items"], s["bands"][1]["queued_items"]
        cv = await connect(victim=True)
        for i in range(3):
            submit(cv, f"cv{i}", HI)
        s = await svc.until_stats(lambda s: quiet(s, (cv,)), 10)  # placed, displaced or rejected: settled
        placed = cv.c.in_flight
        assert placed == min(3, free + low_queued), (placed, free, low_queued)
        after = band_outcomes(s)
        assert after["evicted:displaced"] - before["evicted:displaced"] == max(0, placed - free), (before, after)
        assert after["rejected:capacity"] - before["rejected:capacity"] == 3 - placed, (before, after)
        before = after
        await close_victim(cv)  # queued, no grant can come: each ends evicted:cancelled, exactly
        s = await svc.until_stats(lambda s: quiet(s) and band_outcomes(s)["evicted:cancelled"]
                                  == before["evicted:cancelled"] + placed, 10)
        assert band_outcomes(s) == {**before, "evicted:cancelled": before["evicted:cancelled"] + placed}
        # the service counted exactly what was answered: the rest is queued
        assert sum(band_outcomes(s).values()) == tally.sent - s["totals"]["pending"]
        _reconciles(s)
        before = band_outcomes(s)

        # ---------------------------------------------------------------- K: a worker crash
        per_shard = shard_queued(s)
        k = max(range(shards), key=lambda n: per_shard[n])
        doomed = per_shard[k]
        assert doomed > 0, per_shard
        old = s["shards"][k]["pid"]
        worker = next(p for p in svc.worker_procs() if p.pid == old)
        assert worker.role == f"worker{k}", worker
        sf_before = tally.heard["evicted:shard_failure"]

        stream_stop = asyncio.Event()

        async def stream() -> None:  # low band, default TTL: routed or rejected, decided by the distributor
            i = 0
            while not stream_stop.is_set():
                submit(mains[i % len(mains)], f"s{i % 5}", LO)
                if i % 10 == 0:
                    http_tasks.append(asyncio.ensure_future(http_one(f"hs{i % 3}", LO)))
                i += 1
                await asyncio.sleep(0.003)

        streaming = asyncio.ensure_future(stream())
        await asyncio.sleep(0.02)
        os.kill(old, signal.SIGKILL)
        s = await svc.until_stats(lambda s: s["shards"][k]["ready"] and s["shards"][k]["pid"] not in (0, old), 15)
        await asyncio.sleep(0.03)
        stream_stop.set()
        await streaming
        assert not worker.alive()
        new = s["shards"][k]["pid"]
        assert new in {p.pid for p in svc.worker_procs()}
        assert {old, new} <= set(svc.procs), "the no-leftover check must cover both workers"
        assert s["counters"]["worker_restarts"] == 1
        assert [x["restarts"] for x in s["shards"]] == [int(n == k) for n in range(shards)]
        # quiet again (the budget is still full): every request the dead shard held ended
        # evicted:shard_failure and was heard, the other shards lost nothing, only the distributor decided
        # (shard failures, rejections), and the dead shard's counters were reset to what it holds now
        s = await svc.until_stats(quiet, 10)
        assert tally.heard["evicted:shard_failure"] - sf_before >= doomed
        after = shard_queued(s)
        assert all(after[n] >= per_shard[n] for n in range(shards) if n != k), (per_shard, after, k)
        changed = {x for x, v in band_outcomes(s).items() if v != before[x]}
        assert changed <= {"evicted:shard_failure", "rejected:capacity"}, (before, band_outcomes(s))
        assert sum(band_outcomes(s).values()) == tally.sent - s["totals"]["pending"]
        _reconciles(s)

        # ---------------------------------------------------------------- B: load again, quiescence
        paused[0] = False
        resume.set()
        for bc, ticket in deferred:
            release(bc, ticket)
        deferred.clear()
        await load(mains, 0.8)
        await asyncio.wait_for(asyncio.gather(*bin_futs, return_exceptions=True), 20)
        await asyncio.wait_for(asyncio.gather(*http_tasks), 20)
        await until(lambda: all(f.done() for _, f in tally.releases) and not tally.held, 10)
        s = await svc.until_stats(lambda s: (
            s["totals"]["pending"], s["totals"]["inflight"], s["totals"]["tickets"], s["totals"]["queued_items"],
            s["totals"]["grants_outstanding"]) == (0, 0, 0, 0, 0), 10)

        for bc, f in tally.releases:  # every ticket is released once, whatever became of its shard
            if not bc.victim:
                assert f.result() is True, f
        assert not tally.violations, tally.violations[:10]
        heard, counted = tally.heard, band_outcomes(s)
        assert sum(heard.values()) + tally.lost == tally.sent  # each admission resolved once, client-side
        assert sum(counted.values()) == tally.sent, (counted, tally.sent)  # ... and counted once, service-side
        for bc in mains:  # every answer frame the connection carried was one admission's only answer
            assert len(bc.c._reader.ids) == bc.answered, (len(bc.c._reader.ids), bc.answered)  # type: ignore[attr-defined]
        assert heard["evicted:cancelled"] == 0, heard
        assert heard["rejected:shutting_down"] == heard["evicted:shutdown"] == 0, heard
        for label in LABELS:
            if label in LOST_LABELS:
                assert counted[label] >= heard[label], (label, counted, heard)
            else:
                assert counted[label] == heard[label], (label, counted, heard)
        assert sum(counted[x] - heard[x] for x in LOST_LABELS) == tally.lost
        assert heard["evicted:shard_failure"] >= doomed
        released = s["counters"]["tickets_released"]
        assert heard["dispatched"] <= released <= counted["dispatched"], (heard, released, counted)
        assert sum(shard_queued(s)) == 0 and s["consistent"] is True, s["shards"]
        assert all(b["queued_items"] == 0 for b in s["bands"])
        assert tally.peak == BUDGET
        summary = dict(heard, lost=tally.lost, sent=tally.sent, samples=len(samples), doomed=doomed,
                       placed=placed, cancelled=counted["evicted:cancelled"])

        # ---------------------------------------------------------------- D: drain
        holder = mains[0]
        holds: list[int] = []
        for _ in range(BUDGET):
            r = await holder.c.admit("drain-hold", priority=HI)
            assert r.outcome is D, r
            holds.append(r.ticket)
        queued_hi = [mains[i % 3].c.admit(f"d{i}", priority=HI) for i in range(4)]
        queued_lo = [mains[i % 3].c.admit(f"e{i}", priority=LO) for i in range(4)]
        queued_http = [asyncio.ensure_future(admit_http(port, f"dh{i}", priority=LO, timeout=30)) for i in range(2)]
        n_queued = 10
        sent = tally.sent + BUDGET + n_queued
        s = await svc.until_stats(lambda s: s["totals"]["queued_items"] == s["totals"]["pending"] == n_queued, 10)
        keep = await HttpConn.open(port)

        t0 = time.monotonic()
        svc.signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while (await keep.request("GET", "/v1/stats")).json()["accepting"]:
            assert time.monotonic() < deadline, "still accepting 5 s after SIGTERM"
            await asyncio.sleep(0.005)
        late = [bc.c.admit("late", priority=HI) for bc in mains]
        late_http = await keep.request("POST", "/v1/admit", {"flow": "late", "priority": HI})
        assert late_http.status == 503 and _label(late_http.json()) == "rejected:shutting_down", late_http
        for r in await asyncio.wait_for(asyncio.gather(*late), 5):
            assert r.outcome is Outcome.REJECTED_SHUTTING_DOWN, r
        sent += len(late) + 1
        s = (await keep.request("GET", "/v1/stats")).json()
        t = s["totals"]
        assert (t["queued_items"], t["pending"], t["inflight"]) == (n_queued, n_queued, BUDGET), t
        assert band_outcomes(s)["rejected:shutting_down"] == len(late) + 1
        assert sum(band_outcomes(s).values()) == sent - n_queued

        # one ticket freed during the drain: exactly one queued request (high band) is dispatched
        assert await holder.c.release(holds.pop())
        binary_drained = queued_hi + queued_lo
        done, _ = await asyncio.wait(binary_drained, timeout=DRAIN, return_when=asyncio.FIRST_COMPLETED)
        assert [f.result().outcome for f in done] == [D], done
        assert next(iter(done)) in queued_hi
        # the rest waits out the drain timeout (the budget is full again) and ends evicted:shutdown
        results = await asyncio.wait_for(asyncio.gather(*binary_drained), DRAIN + 10)
        http_results = await asyncio.wait_for(asyncio.gather(*queued_http), DRAIN + 10)
        elapsed = time.monotonic() - t0
        assert Counter(r.outcome for r in results) == {D: 1, Outcome.EVICTED_SHUTDOWN: 7}, results
        for h in http_results:
            assert h.status == 503 and _label(h.json()) == "evicted:shutdown", h
        assert elapsed >= DRAIN - 0.05, elapsed
        rc = await loop.run_in_executor(None, svc.wait, 15)
        assert rc == 0, svc.stderr()
        sampling[0] = False
        await sampler_task
        keep.close()
        for bc in mains:
            assert bc.c.in_flight == 0
            await bc.c.close()
        assert not tally.violations, tally.violations[:10]
        assert len(samples) >= 20 and any(not x["accepting"] for x in samples), len(samples)
        print(f"shards={shards}: {summary}")  # with -s: what the run covered

    run(main(), timeout=60)
    problems = svc.leftovers()
    assert not problems, problems
    assert "Traceback" not in svc.stderr(), svc.stderr()
