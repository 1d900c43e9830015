"""Integration tests: `flowshard serve` as a real subprocess, over real HTTP and binary sockets.

Each test starts the service (distributor + N shard workers, own process group) through the
`launch` fixture of `servicekit`, which after the test stops it with SIGTERM if it still runs and
asserts that no process of its tree and no `/dev/shm/flowshard-<pid>-*` segment is left.

Budgets are tiny (usually one in-flight request) so a held ticket keeps everything else queued,
which makes outcomes and orders deterministic without sleeps.

Covered here: the happy path (HTTP and binary, health, stats, metrics), every outcome that does not
need a fault (dispatched, rejected:capacity, evicted:ttl, evicted:displaced, evicted:cancelled,
rejected:shutting_down, evicted:shutdown), strict priority across 4 shards, JSQ-Bytes spreading,
exact limits under concurrent load with reconciliation, graceful drain, and ticket release when a
binary connection closes. Faults (worker crash, distributor SIGKILL, bad input) are in
`test_service_faults.py`.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter, deque
from typing import Any

import pytest
from servicekit import (
    HttpConn,
    admit_http,
    ahttp,
    band_outcomes,
    config_text,
    launch,
    metric,
    release_http,
    run,
    shard_queued,
    shard_queued_bytes,
    until,
)

from flowshard.client import AdmitResult, Client
from flowshard.types import Outcome

__all__ = ["launch"]  # the fixture, re-exported so pytest finds it here

D = Outcome.DISPATCHED

TWO_BANDS = [
    {"priority": 10, "name": "high"},
    {"priority": 0, "name": "low"},
]


async def _queued(svc: Any, n: int, timeout: float = 5.0) -> dict[str, Any]:
    """Wait until /v1/stats shows exactly n queued (ledger and shared-memory shard counters)."""
    return await svc.until_stats(
        lambda s: s["totals"]["queued_items"] == n and sum(shard_queued(s)) == n, timeout
    )


# ---------------------------------------------------------------------------------------------- happy path


def test_happy_path_http_admit_release_health_stats_metrics(launch: Any) -> None:
    svc = launch(shards=2, budget=4)
    port = svc.http_port

    async def main() -> None:
        r = await ahttp(port, "GET", "/healthz")
        assert (r.status, r.json()) == (200, {"status": "ok"})
        r = await ahttp(port, "GET", "/readyz")
        assert (r.status, r.json()) == (200, {"ready": True})

        r = await admit_http(port, "tenant-a", bytes=123, ttl=5.0, priority=0)
        assert r.status == 200, r
        body = r.json()
        assert body["outcome"] == "dispatched" and body["ticket"] > 0, body
        assert body["lease_s"] == 300.0 and body["wait_ms"] >= 0
        ticket = body["ticket"]

        s = await svc.astats()
        assert s["accepting"] is True and s["ready"] is True
        assert s["totals"]["inflight"] == 1 and s["totals"]["inflight_bytes"] == 123
        assert s["totals"]["tickets"] == 1 and s["totals"]["queued_items"] == 0
        assert s["totals"]["max_inflight_requests"] == 4
        assert s["totals"]["max_inflight"] == 4  # the old name, deprecated, still sent this release
        assert [sh["ready"] for sh in s["shards"]] == [True, True]
        assert all(sh["pid"] > 0 for sh in s["shards"])
        assert {sh["pid"] for sh in s["shards"]} == {p.pid for p in svc.worker_procs()}
        assert band_outcomes(s)["dispatched"] == 1

        r = await release_http(port, ticket)
        assert (r.status, r.json()) == (200, {"released": True})
        s = await svc.astats()
        assert s["totals"]["inflight"] == 0 and s["totals"]["tickets"] == 0
        assert s["counters"]["tickets_released"] == 1

        r = await ahttp(port, "GET", "/metrics")
        assert r.status == 200 and r.headers["content-type"].startswith("text/plain"), r
        text = r.body.decode()
        assert "flowshard_requests_total" in text
        samples = await svc.ametrics()
        assert metric(samples, "flowshard_requests_total", band="p0", outcome="dispatched", reason="") == 1
        assert metric(samples, "flowshard_requests_total", band="p0", outcome="rejected", reason="capacity") == 0
        assert metric(samples, "flowshard_inflight_requests") == 0
        assert metric(samples, "flowshard_tickets_released_total") == 1
        assert metric(samples, "flowshard_worker_up", shard="0") == 1
        assert metric(samples, "flowshard_worker_up", shard="1") == 1

    run(main())
    assert svc.terminate() == 0


def test_happy_path_binary_admit_release(launch: Any) -> None:
    svc = launch(shards=2, budget=2)

    async def main() -> None:
        async with Client.connect(svc.host, svc.binary_port) as c:
            r = await c.admit("tenant-b", priority=0, size=4096, ttl=2.0)
            assert r.outcome is D and r.ticket > 0, r
            r2 = await c.admit("tenant-b", size=1)
            assert r2.outcome is D and r2.ticket not in (0, r.ticket)
            s = await svc.astats()
            assert s["totals"]["inflight"] == 2 and s["totals"]["inflight_bytes"] == 4097
            assert await c.release(r.ticket) is True
            assert await c.release(r.ticket) is False  # double release
            assert await c.release(r2.ticket) is True
            s = await svc.astats()
            assert s["totals"]["inflight"] == 0 and s["counters"]["tickets_released"] == 2
            # many in flight on one connection, all through the fast path, all released
            results = await asyncio.gather(*(c.admit(f"f{i % 3}", size=10) for i in range(2)))
            assert all(x.outcome is D for x in results)
            assert all(await asyncio.gather(*(c.release(x.ticket) for x in results)))

    run(main())
    assert svc.terminate() == 0


# ---------------------------------------------------------------------------------------------- outcomes


def test_rejected_capacity_429_with_retry_after(launch: Any) -> None:
    svc = launch(shards=2, budget=1, max_queued_requests=1)
    port = svc.http_port

    async def main() -> None:
        hold = (await admit_http(port, "hold")).json()
        assert hold["outcome"] == "dispatched"
        queued = asyncio.ensure_future(admit_http(port, "q", bytes=10))
        await _queued(svc, 1)
        r = await admit_http(port, "r", bytes=10)
        assert r.status == 429, r
        assert r.json()["outcome"] == "rejected" and r.json()["reason"] == "capacity", r
        assert int(r.headers["retry-after"]) >= 1 and r.json()["retry_after"] == int(r.headers["retry-after"])
        assert not queued.done()
        assert (await release_http(port, hold["ticket"])).status == 200
        q = await queued
        assert q.status == 200 and q.json()["outcome"] == "dispatched", q
        assert q.json()["wait_ms"] > 0
        assert (await release_http(port, q.json()["ticket"])).status == 200
        s = await svc.astats()
        assert band_outcomes(s)["rejected:capacity"] == 1 and band_outcomes(s)["dispatched"] == 2

    run(main())


def test_the_wait_histograms_sum_is_the_clients_waits_not_the_buckets_midpoints(launch: Any) -> None:
    """`flowshard_wait_seconds_sum` (and `/v1/stats`' `wait_hist.sum`) add the waits themselves: a review
    found the sum estimated from bucket midpoints 8-52 % above what the clients waited. Here each wait
    is ~0.12 s apart, in buckets whose midpoints are tens of ms away from them."""
    svc = launch(shards=2, budget=1)
    port = svc.http_port

    async def main() -> None:
        hold = (await admit_http(port, "hold")).json()
        queued = [asyncio.ensure_future(admit_http(port, f"q{k}", bytes=10)) for k in range(4)]
        await _queued(svc, 4)
        answers = [hold]
        waiting = set(queued)
        for _ in range(4):  # one request in flight at a time: each release dispatches the next
            await asyncio.sleep(0.12)
            assert (await release_http(port, answers[-1]["ticket"])).status == 200
            (done,), waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            answers.append(done.result().json())
            assert answers[-1]["outcome"] == "dispatched", answers[-1]
        assert (await release_http(port, answers[-1]["ticket"])).status == 200
        waits = [a["wait_ms"] / 1000 for a in answers]
        assert sorted(waits)[-1] > 0.4, waits
        samples = await svc.ametrics()
        assert metric(samples, "flowshard_wait_seconds_count", band="p0") == 5
        got = metric(samples, "flowshard_wait_seconds_sum", band="p0")
        assert got == pytest.approx(sum(waits), abs=1e-9), (got, waits)  # both the wait rounded to the µs
        (band,) = (await svc.astats())["bands"]
        assert band["wait_hist"]["sum"] == got

    run(main())


def test_evicted_ttl_429(launch: Any) -> None:
    svc = launch(shards=2, budget=1)
    port = svc.http_port

    async def main() -> None:
        hold = (await admit_http(port, "hold")).json()
        t0 = time.monotonic()
        r = await admit_http(port, "t", bytes=10, ttl=0.2)
        elapsed = time.monotonic() - t0
        assert r.status == 429, r
        assert (r.json()["outcome"], r.json()["reason"]) == ("evicted", "ttl"), r
        assert "retry-after" in r.headers
        assert 0.19 <= elapsed < 2.0, elapsed
        assert r.json()["wait_ms"] >= 190
        s = await _queued(svc, 0)
        assert band_outcomes(s)["evicted:ttl"] == 1
        assert (await release_http(port, hold["ticket"])).status == 200

    run(main())


def test_evicted_displaced_by_higher_band_when_global_limit_full(launch: Any) -> None:
    bands = [{"priority": 10, "name": "high", "displacement": True}, {"priority": 0, "name": "low"}]
    svc = launch(shards=2, budget=1, max_queued_requests=2, bands=bands)
    port = svc.http_port

    async def main() -> None:
        hold = (await admit_http(port, "hold", priority=10)).json()
        low1 = asyncio.ensure_future(admit_http(port, "l", priority=0, bytes=10))
        await _queued(svc, 1)
        low2 = asyncio.ensure_future(admit_http(port, "l", priority=0, bytes=10))
        await _queued(svc, 2)
        high = asyncio.ensure_future(admit_http(port, "h", priority=10, bytes=10))
        r = await low2  # the newest of the lowest band makes room
        assert r.status == 429, r
        assert (r.json()["outcome"], r.json()["reason"]) == ("evicted", "displaced")
        assert "retry-after" in r.headers
        s = await _queued(svc, 2)
        assert [b["queued_items"] for b in s["bands"]] == [1, 1]
        assert not low1.done() and not high.done()
        # release: the high band goes first, then the remaining low one
        assert (await release_http(port, hold["ticket"])).status == 200
        h = await high
        assert h.status == 200 and h.json()["outcome"] == "dispatched"
        assert not low1.done()
        assert (await release_http(port, h.json()["ticket"])).status == 200
        lo = await low1
        assert lo.status == 200
        assert (await release_http(port, lo.json()["ticket"])).status == 200
        s = await svc.astats()
        assert s["bands"][1]["outcomes"]["evicted:displaced"] == 1
        assert band_outcomes(s)["dispatched"] == 3

    run(main())


def test_evicted_cancelled_when_http_client_disconnects_frees_capacity(launch: Any) -> None:
    svc = launch(shards=2, budget=1, max_queued_requests=1)
    port = svc.http_port

    async def main() -> None:
        hold = (await admit_http(port, "hold")).json()
        conn = await HttpConn.open(port)
        conn.send("POST", "/v1/admit", {"flow": "gone", "bytes": 50})
        await _queued(svc, 1)
        # the queue is full: a newcomer is rejected
        assert (await admit_http(port, "x")).status == 429
        conn.close()  # the client leaves while its request is queued
        s = await svc.until_stats(
            lambda s: s["totals"]["queued_items"] == 0 and s["totals"]["pending"] == 0
            and band_outcomes(s)["evicted:cancelled"] == 1
        )
        assert sum(shard_queued(s)) == 0 and sum(shard_queued_bytes(s)) == 0
        # capacity was freed: a new request fits (queued, not rejected), and dispatches on release
        newcomer = asyncio.ensure_future(admit_http(port, "new", bytes=5))
        await _queued(svc, 1)
        assert not newcomer.done()
        assert (await release_http(port, hold["ticket"])).status == 200
        r = await newcomer
        assert r.status == 200 and r.json()["outcome"] == "dispatched", r
        assert (await release_http(port, r.json()["ticket"])).status == 200
        s = await svc.astats()
        assert s["totals"]["inflight"] == 0
        assert band_outcomes(s) == {**band_outcomes(s), "dispatched": 2, "rejected:capacity": 1,
                                    "evicted:cancelled": 1}

    run(main())


def test_binary_evicted_cancelled_when_connection_closes(launch: Any) -> None:
    svc = launch(shards=2, budget=1)

    async def main() -> None:
        async with Client.connect(svc.host, svc.binary_port) as holder:
            hold = await holder.admit("hold")
            c = await Client.connect(svc.host, svc.binary_port)
            futs = [c.admit(f"q{i}", size=10) for i in range(6)]
            await _queued(svc, 6)
            await c.close()
            for f in futs:
                with pytest.raises(ConnectionError):
                    await f
            # (shards count the outcome before their reports reach the distributor's ledger)
            await svc.until_stats(
                lambda s: band_outcomes(s)["evicted:cancelled"] == 6
                and s["totals"]["queued_items"] == 0 and s["totals"]["pending"] == 0
            )
            assert await holder.release(hold.ticket)

    run(main())


def test_http_and_binary_outcomes_share_one_budget(launch: Any) -> None:
    """A ticket held over HTTP blocks binary admissions and vice versa (one global budget)."""
    svc = launch(shards=2, budget=1)
    port = svc.http_port

    async def main() -> None:
        async with Client.connect(svc.host, svc.binary_port) as c:
            h = (await admit_http(port, "h")).json()
            b = c.admit("b", size=1)
            await _queued(svc, 1)
            assert (await release_http(port, h["ticket"])).status == 200
            rb = await b
            assert rb.outcome is D
            http_waiter = asyncio.ensure_future(admit_http(port, "h2"))
            await _queued(svc, 1)
            assert await c.release(rb.ticket)
            r = await http_waiter
            assert r.status == 200
            assert (await release_http(port, r.json()["ticket"])).status == 200

    run(main())


# ---------------------------------------------------------------------------------------------- priority


@pytest.mark.parametrize("budget", [1, 3])
def test_strict_priority_across_four_shards(launch: Any, budget: int) -> None:
    svc = launch(shards=4, budget=budget, bands=TWO_BANDS, service={"drain_timeout": 0.2})
    n = 40

    async def main() -> None:
        async with Client.connect(svc.host, svc.binary_port) as c:
            holds = [await c.admit("hold", priority=10) for _ in range(budget)]
            assert all(h.outcome is D for h in holds)
            order: list[int] = []  # priority of each dispatch, in order
            held: deque[int] = deque(h.ticket for h in holds)
            max_held = [len(held)]
            bad: list[Any] = []

            def on_done(priority: int) -> Any:
                def cb(fut: asyncio.Future[AdmitResult]) -> None:
                    r = fut.result()
                    if r.outcome is not D:
                        bad.append(r)
                        return
                    order.append(priority)
                    held.append(r.ticket)
                    max_held[0] = max(max_held[0], len(held))

                return cb

            futs = []
            for i in range(n):  # low first, over several flows
                f = c.admit(f"low-{i % 5}", priority=0, size=100 + i)
                f.add_done_callback(on_done(0))
                futs.append(f)
            await svc.until_stats(lambda s: s["bands"][1]["queued_items"] == n)
            for i in range(n):
                f = c.admit(f"high-{i % 5}", priority=10, size=100 + i)
                f.add_done_callback(on_done(10))
                futs.append(f)
            s = await _queued(svc, 2 * n)
            per_shard = shard_queued(s)
            assert sum(1 for q in per_shard if q) >= 3, per_shard  # the work really is spread
            assert [b["queued_items"] for b in s["bands"]] == [n, n]

            inflight_seen: list[int] = []

            async def sample() -> None:
                while True:
                    st = await svc.astats()
                    inflight_seen.append(st["totals"]["inflight"] + st["totals"]["grants_outstanding"])
                    await asyncio.sleep(0.005)

            sampler = asyncio.ensure_future(sample())
            try:
                for i in range(2 * n):
                    ticket = held.popleft()
                    assert await c.release(ticket) is True
                    await until(lambda i=i: len(order) >= i + 1 or bad)
                    assert len(order) == i + 1 and not bad, (len(order), bad)
            finally:
                sampler.cancel()
            assert order == [10] * n + [0] * n, order
            assert max_held[0] <= budget, max_held
            assert inflight_seen and max(inflight_seen) <= budget, max(inflight_seen)
            while held:
                assert await c.release(held.popleft())
            s = await svc.astats()
            assert s["totals"]["inflight"] == 0 and s["totals"]["queued_items"] == 0
            assert band_outcomes(s)["dispatched"] == 2 * n + budget
            assert s["bands"][0]["outcomes"]["dispatched"] == n + budget
            assert s["bands"][1]["outcomes"]["dispatched"] == n

    run(main(), timeout=40)


def test_band_ceiling_across_shards(launch: Any) -> None:
    """A band with ceiling 0.5 under a budget of 4 dispatches only while saturation < 0.5 (two in
    flight), however many shards hold its work; the band above still gets the rest of the budget."""
    bands = [{"priority": 10, "name": "high"}, {"priority": 0, "name": "low", "ceiling": 0.5}]
    svc = launch(shards=4, budget=4, bands=bands, service={"drain_timeout": 0.2})

    async def main() -> None:
        async with Client.connect(svc.host, svc.binary_port) as c:
            lows = [c.admit(f"l{i % 3}", priority=0, size=10) for i in range(10)]
            s = await _queued(svc, 8)
            await until(lambda: sum(f.done() for f in lows) >= 2)
            done = [f.result() for f in lows if f.done()]
            assert len(done) == 2 and all(r.outcome is D for r in done), done
            assert s["totals"]["inflight"] == 2
            assert sum(1 for x in shard_queued(s) if x) >= 3, shard_queued(s)
            high = await c.admit("h", priority=10, size=10)  # the high band may use the rest
            assert high.outcome is D
            high2 = await c.admit("h", priority=10, size=10)
            assert high2.outcome is D
            await asyncio.sleep(0.05)
            assert sum(f.done() for f in lows) == 2
            assert await c.release(done[0].ticket)  # 3 in flight: saturation 0.75, no low
            await asyncio.sleep(0.05)
            assert sum(f.done() for f in lows) == 2
            assert await c.release(high.ticket)  # 2 in flight: 0.5, still no low
            await asyncio.sleep(0.05)
            assert sum(f.done() for f in lows) == 2
            assert await c.release(high2.ticket)  # 1 in flight: 0.25 -> exactly one low
            await until(lambda: sum(f.done() for f in lows) == 3)
            await asyncio.sleep(0.05)
            assert sum(f.done() for f in lows) == 3
            s = await svc.astats()
            assert s["totals"]["inflight"] == 2 and s["totals"]["queued_items"] == 7

    run(main())


def test_http_pipelined_responses_keep_request_order(launch: Any) -> None:
    svc = launch(shards=2, budget=1, max_queued_requests=1)
    port = svc.http_port

    async def main() -> None:
        hold = (await admit_http(port, "hold")).json()
        conn = await HttpConn.open(port)
        conn.send("POST", "/v1/admit", {"flow": "first"})  # queued
        conn.send("POST", "/v1/admit", {"flow": "second"})  # rejected at once, answered in turn
        conn.send("GET", "/healthz")
        await _queued(svc, 1)
        with pytest.raises(TimeoutError):
            await conn.response(timeout=0.2)  # nothing may overtake the queued first request
        assert (await release_http(port, hold["ticket"])).status == 200
        first, second, health = [await conn.response() for _ in range(3)]
        assert first.status == 200 and first.json()["outcome"] == "dispatched", first
        assert second.status == 429 and second.json()["reason"] == "capacity", second
        assert health.status == 200 and health.json() == {"status": "ok"}
        assert (await conn.request("POST", "/v1/release", {"ticket": first.json()["ticket"]})).status == 200
        conn.close()

    run(main())


# ---------------------------------------------------------------------------------------------- JSQ-Bytes


def test_jsq_bytes_places_new_flows_and_a_backlogged_flow_stays_on_its_shard(launch: Any) -> None:
    """JSQ-Bytes places a flow when it starts afresh; while it holds queued work it stays on its
    shard (flow affinity, DESIGN §4.7), so it is the flows that spread over the shards."""
    bands = [{"priority": 1, "name": "mixed"}, {"priority": 0, "name": "equal"}]
    svc = launch(shards=4, budget=1, bands=bands, service={"drain_timeout": 0.2})
    rng = random.Random(7)
    sizes = [rng.randint(1, 5000) for _ in range(40)]

    async def main() -> None:
        async with Client.connect(svc.host, svc.binary_port) as c:
            hold = await c.admit("hold", priority=1)
            assert hold.outcome is D
            equal = [c.admit(f"eq{i % 8}", priority=0, size=1000) for i in range(40)]  # 8 flows x 5
            s = await _queued(svc, 40)
            counts = [sh["queued_items"][1] for sh in s["shards"]]
            assert counts == [10, 10, 10, 10], counts  # two whole flows per shard
            flows = {f["flow"]: f for f in s["top_flows"] if f["band"] == "equal"}
            assert len(flows) == 8 and all(f["queued_items"] == 5 for f in flows.values()), flows

            mixed = [c.admit(f"m{i}", priority=1, size=size) for i, size in enumerate(sizes)]  # 40 new flows
            s = await _queued(svc, 80)
            mb = [sh["queued_bytes"][0] for sh in s["shards"]]
            assert sum(mb) == sum(sizes)
            # greedy join-shortest-queue by bytes: shards differ by at most one request's size
            assert max(mb) - min(mb) <= max(sizes), (mb, max(sizes))
            assert min(mb) > 0
            # the metrics say the same as /v1/stats
            samples = await svc.ametrics()
            for i in range(4):
                assert metric(samples, "flowshard_shard_queue_bytes", shard=str(i), band="mixed") == mb[i]
                assert metric(samples, "flowshard_shard_queue_size", shard=str(i), band="equal") == counts[i]
        # closing the client cancelled them all
        assert all(isinstance(x, ConnectionError) for x in await asyncio.gather(*equal, *mixed, return_exceptions=True))
        await _queued(svc, 0)

    run(main())


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_jsq_slack_packs_new_flows_onto_shard_0_until_it_falls_the_slack_behind(launch: Any) -> None:
    """With `jsq_slack_bytes`, a flow starting afresh goes to the lowest-numbered shard whose input
    backlog (requests routed to it, not read yet: each its bytes, at least 1 KiB) is within the
    slack of the least when the distributor's pass began: work packs onto shard 0 while it keeps
    up, however much it queues (a queue waiting for budget is not load), and a shard that falls more
    than the slack behind its input (here: stopped) gets no new flow until it reads, also when the
    requests declare no bytes.
    Flows already placed stay where they are (affinity)."""
    kib = 1024
    svc = launch(shards=4, budget=1, service={"drain_timeout": 0.2, "jsq_slack_bytes": 10 * kib})

    def items(s: dict[str, Any]) -> list[int]:
        return [sh["queued_items"][0] for sh in s["shards"]]

    def backlogs(s: dict[str, Any]) -> list[int]:
        return [sh["input_backlog_bytes"] for sh in s["shards"]]

    async def main() -> None:
        async with Client.connect(svc.host, svc.binary_port) as c:
            hold = await c.admit("hold")
            assert hold.outcome is D
            deep: list[asyncio.Future[AdmitResult]] = []
            for k in range(3):  # 30 queued, all on shard 0: each 10 KiB within the slack once it read the last
                deep += [c.admit(f"d{k}{i}", size=kib) for i in range(10)]
                s = await _queued(svc, 10 * (k + 1))
                s = await svc.until_stats(lambda s: s["shards"][0]["input_backlog_bytes"] == 0)
            assert items(s) == [30, 0, 0, 0]
            worker = s["shards"][0]["pid"]
            os.kill(worker, signal.SIGSTOP)  # shard 0 stops reading its input
            try:
                while not _stopped(worker):
                    await asyncio.sleep(0.001)
                # requests of no bytes count 1 KiB each: 11 reach a stopped shard 0 (its backlog at most 10 KiB
                # when any of their passes began: within), then it is 11 KiB behind and the next flows, in a
                # later pass, go to shard 1, which reads them
                behind = [c.admit(f"b{i}", size=0) for i in range(11)]
                s = await _queued(svc, 41)
                assert items(s) == [41, 0, 0, 0]
                await svc.until_stats(lambda s: backlogs(s)[0] == 11 * kib)
                behind += [c.admit(f"b{i}", size=0) for i in range(11, 14)]
                s = await _queued(svc, 44)
                assert items(s) == [41, 3, 0, 0]
                # shard 0 stays 11 KiB behind; shard 1 reads its three (not necessarily by the time they count)
                await svc.until_stats(lambda s: backlogs(s) == [11 * kib, 0, 0, 0])
                again = [c.admit("d00", size=kib)]  # a flow placed on shard 0 stays there, stopped or not
                s = await _queued(svc, 45)
                assert items(s) == [42, 3, 0, 0]
            finally:
                os.kill(worker, signal.SIGCONT)
            await svc.until_stats(lambda s: s["shards"][0]["input_backlog_bytes"] == 0)
            after = [c.admit(f"a{i}", size=kib) for i in range(3)]  # it caught up: new flows pack there again
            s = await _queued(svc, 48)
            assert items(s) == [45, 3, 0, 0]
            # (queued counts them as routed; shard 0 reads them a moment later: a CI run scraped between)
            await svc.until_stats(lambda s: s["shards"][0]["input_backlog_bytes"] == 0)
            samples = await svc.ametrics()
            assert metric(samples, "flowshard_shard_input_backlog_bytes", shard="0") == 0
        assert all(isinstance(x, ConnectionError)
                   for x in await asyncio.gather(*deep, *behind, *again, *after, return_exceptions=True))
        await _queued(svc, 0)

    run(main())


def test_a_request_lost_with_its_shard_is_audited_with_that_shard(launch: Any) -> None:
    """A queued request that ends `evicted: shard_failure` (its worker killed) was queued on a shard:
    its audit says which, and when it was queued (on arrival), as a TTL or shutdown eviction's does,
    not -1 (the idle fast path's, a rejection's)."""
    svc = launch(shards=2, budget=1, service={"drain_timeout": 0.2, "jsq_slack_bytes": 0})

    async def main() -> None:
        async with Client.connect(svc.host, svc.binary_port) as c:
            hold = await c.admit("hold")
            assert hold.outcome is D
            queued = c.admit("q", size=100, audit=True)
            s = await _queued(svc, 1)
            shard = next(i for i, sh in enumerate(s["shards"]) if sum(sh["queued_items"]))
            os.kill(s["shards"][shard]["pid"], signal.SIGKILL)
            r = await asyncio.wait_for(queued, 5)
            assert r.outcome is Outcome.EVICTED_SHARD_FAILURE
            assert r.service is not None and r.service.shard == shard
            assert r.service.enqueued == r.service.received and r.service.dispatched == 0.0

    run(main())


# ---------------------------------------------------------------------------------------------- exact limits


LIMIT_BANDS = [
    {"priority": 5, "name": "hi", "max_requests": 8, "flow_max_requests": 3},
    {"priority": 0, "name": "lo", "flow_max_bytes": 6000},
]
MAX_ITEMS, MAX_BYTES = 30, 24000


def _check_limits(s: dict[str, Any]) -> list[str]:
    t = s["totals"]
    bad = []
    if t["queued_items"] > MAX_ITEMS or t["queued_bytes"] > MAX_BYTES:
        bad.append(f"global {t['queued_items']} items / {t['queued_bytes']} bytes")
    if sum(shard_queued(s)) > MAX_ITEMS or sum(shard_queued_bytes(s)) > MAX_BYTES:
        bad.append(f"shards {shard_queued(s)} / {shard_queued_bytes(s)}")
    if s["bands"][0]["queued_items"] > 8:
        bad.append(f"band hi {s['bands'][0]['queued_items']}")
    for f in s["top_flows"]:
        if f["band"] == "hi" and f["queued_items"] > 3:
            bad.append(f"flow {f}")
        if f["band"] == "lo" and f["queued_bytes"] > 6000:
            bad.append(f"flow {f}")
    if t["inflight"] > 1:
        bad.append(f"inflight {t['inflight']}")
    return bad


def test_exact_limits_under_concurrent_load_and_totals_reconcile(launch: Any) -> None:
    svc = launch(
        shards=2, budget=1, max_queued_requests=MAX_ITEMS, max_queued_bytes=MAX_BYTES, bands=LIMIT_BANDS,
        service={"drain_timeout": 0.2},
    )
    port = svc.http_port
    rng = random.Random(12)

    def size() -> int:  # small and large, so that either global limit (requests, bytes) may bind
        return rng.randint(1, 50) if rng.random() < 0.6 else rng.randint(1500, 3000)

    async def main() -> None:
        clients = [await Client.connect(svc.host, svc.binary_port) for _ in range(4)]
        seen: Counter[str] = Counter()  # outcomes as the clients saw them
        violations: list[str] = []
        samples: list[dict[str, Any]] = []
        releasing = asyncio.Event()
        tasks: list[asyncio.Future[Any]] = []

        hold = await clients[0].admit("hold", priority=5)
        assert hold.outcome is D

        def binary_done(c: Client) -> Any:
            def cb(fut: asyncio.Future[AdmitResult]) -> None:
                r = fut.result()
                seen[r.outcome.label] += 1
                if r.outcome is D:
                    if not releasing.is_set():
                        violations.append(f"dispatched while the budget was held: {r}")
                    tasks.append(c.release(r.ticket))

            return cb

        async def http_admit(flow: str, priority: int, size: int, ttl: float) -> None:
            r = await admit_http(port, flow, priority=priority, bytes=size, ttl=ttl, timeout=20)
            body = r.json()
            label = body["outcome"] if body["outcome"] == "dispatched" else f"{body['outcome']}:{body['reason']}"
            seen[label] += 1
            if r.status == 200:
                assert (await release_http(port, body["ticket"])).status == 200
            else:
                assert r.status == 429, r

        async def sampler() -> None:
            while True:
                s = await svc.astats()
                samples.append(s)
                violations.extend(_check_limits(s))
                await asyncio.sleep(0.002)

        sampling = asyncio.ensure_future(sampler())
        futs: list[asyncio.Future[AdmitResult]] = []
        submitted = 0
        for _round in range(4):
            for c in clients:
                for _ in range(25):
                    f = c.admit(
                        f"f{rng.randrange(6)}", priority=rng.choice((5, 0, 0)), size=size(),
                        ttl=rng.choice((0.3, 0.0, 0.0)),
                    )
                    f.add_done_callback(binary_done(c))
                    futs.append(f)
                    submitted += 1
            for _ in range(6):
                tasks.append(asyncio.ensure_future(http_admit(
                    f"f{rng.randrange(6)}", rng.choice((5, 0)), size(), rng.choice((0.3, 0.0)))))
                submitted += 1
            await asyncio.sleep(0.01)
        # quiescent: every admission is either answered or queued
        await svc.until_stats(lambda s: sum(seen.values()) + s["totals"]["queued_items"] == submitted, 10)
        await asyncio.sleep(0.4)  # the 0.3 s TTLs run out
        releasing.set()
        assert await clients[0].release(hold.ticket)
        await asyncio.wait_for(asyncio.gather(*futs), 20)
        await until(lambda: sum(seen.values()) == submitted, 20)
        while tasks:
            await tasks.pop()
        sampling.cancel()
        s = await svc.until_stats(lambda s: s["totals"]["inflight"] == 0 and s["totals"]["pending"] == 0)
        violations.extend(_check_limits(s))
        assert not violations, violations[:20]
        assert len(samples) >= 10
        # the limits were really reached (sanity: these runs are deterministic enough to reach them)
        assert seen["rejected:capacity"] > 0, seen
        assert max(x["totals"]["queued_items"] for x in samples) >= MAX_ITEMS - 5
        assert max(x["bands"][0]["queued_items"] for x in samples) >= 6
        # reconcile: submitted = dispatched + rejected + evicted by reason, and the service agrees
        assert sum(seen.values()) == submitted
        service_seen = band_outcomes(s)
        assert service_seen["dispatched"] == seen["dispatched"] + 1  # + the hold
        for label in ("rejected:capacity", "evicted:ttl", "evicted:cancelled", "evicted:displaced",
                      "rejected:shutting_down", "evicted:shard_failure", "evicted:shutdown"):
            assert service_seen[label] == seen[label], (label, service_seen, seen)
        assert set(seen) <= {"dispatched", "rejected:capacity", "evicted:ttl"}, seen
        assert s["counters"]["tickets_released"] == seen["dispatched"] + 1
        t = s["totals"]
        assert (t["queued_items"], t["queued_bytes"], t["inflight"], t["inflight_bytes"], t["tickets"]) == (0,) * 5
        assert sum(shard_queued(s)) == 0 and sum(shard_queued_bytes(s)) == 0
        assert all(b["queued_items"] == 0 and b["active_flows"] == 0 for b in s["bands"])
        assert t["dispatched"] == seen["dispatched"] + 1
        for c in clients:
            await c.close()

    run(main(), timeout=50)


def test_byte_budget_exact_across_four_shards_under_churn(launch: Any) -> None:
    """max_inflight_bytes across 4 shards: what clients hold never exceeds it (an oversized request
    only runs alone), and everything is dispatched in the end (no stuck grant)."""
    limit = 10_000
    svc = launch(shards=4, budget=None, budget_bytes=limit, service={"drain_timeout": 0.2})
    rng = random.Random(5)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        clients = [await Client.connect(svc.host, svc.binary_port) for _ in range(3)]
        held: dict[int, int] = {}  # ticket -> size, as the clients hold them
        violations: list[str] = []
        releases: list[asyncio.Future[bool]] = []
        peak = [0]

        def on_done(c: Client, size: int) -> Any:
            def cb(fut: asyncio.Future[AdmitResult]) -> None:
                r = fut.result()
                if r.outcome is not D:
                    violations.append(f"{size}: {r}")
                    return
                held[r.ticket] = size
                total = sum(held.values())
                peak[0] = max(peak[0], total)
                if total > limit and len(held) > 1:
                    violations.append(f"held {total} bytes in {len(held)} tickets")

                def release() -> None:
                    del held[r.ticket]
                    releases.append(c.release(r.ticket))

                loop.call_later(rng.random() * 0.01, release)

            return cb

        futs = []
        for i in range(150):
            c = clients[i % 3]
            size = 15_000 if i in (40, 90, 140) else rng.randint(100, 4000)
            f = c.admit(f"f{i % 7}", size=size)
            f.add_done_callback(on_done(c, size))
            futs.append(f)
            if i % 10 == 9:
                await asyncio.sleep(0.003)
        await asyncio.wait_for(asyncio.gather(*futs), 20)
        await until(lambda: not held, 5)
        assert all(await asyncio.gather(*releases))
        assert not violations, violations[:10]
        assert peak[0] > limit // 2  # the budget was really used in parallel
        s = await svc.until_stats(lambda s: s["totals"]["inflight"] == 0)
        t = s["totals"]
        assert (t["inflight_bytes"], t["grants_outstanding"], t["grants_reserved_bytes"], t["queued_items"]) == (
            0, 0, 0, 0)
        assert band_outcomes(s)["dispatched"] == 150 and s["counters"]["tickets_released"] == 150
        for c in clients:
            await c.close()

    run(main(), timeout=40)


CHURN_BANDS = [
    {"priority": 10, "name": "high", "displacement": True},
    {"priority": 5, "name": "mid", "max_requests": 8},
    {"priority": 0, "name": "low", "flow_max_requests": 5},
]


def test_churn_with_displacement_ttl_and_disconnects_reconciles(launch: Any) -> None:
    """Dispatches, releases, displacement, TTLs, rejections and clients vanishing with work queued,
    all at once over 3 shards: limits hold at every sample, every admission ends exactly once, the
    service's outcome counters equal what the clients saw, and nothing leaks (budget, tickets, queues)."""
    max_items, max_bytes = 20, 30_000
    svc = launch(
        shards=3, budget=2, max_queued_requests=max_items, max_queued_bytes=max_bytes, bands=CHURN_BANDS,
        service={"drain_timeout": 0.2},
    )
    rng = random.Random(3)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        clients = [await Client.connect(svc.host, svc.binary_port) for _ in range(5)]
        seen: Counter[str] = Counter()
        lost = [0]  # admissions whose connection we closed before an outcome
        releases: list[asyncio.Future[bool]] = []
        violations: list[str] = []
        futs: list[asyncio.Future[AdmitResult]] = []

        def on_done(c: Client) -> Any:
            def cb(fut: asyncio.Future[AdmitResult]) -> None:
                if fut.exception() is not None:
                    lost[0] += 1
                    return
                r = fut.result()
                seen[r.outcome.label] += 1
                if r.outcome is D and not c.closed:
                    loop.call_later(rng.random() * 0.02, lambda: c.closed or releases.append(c.release(r.ticket)))

            return cb

        async def sampler() -> None:
            while True:
                st = await svc.astats()
                t = st["totals"]
                if t["queued_items"] > max_items or t["queued_bytes"] > max_bytes:
                    violations.append(f"global {t}")
                if st["bands"][1]["queued_items"] > 8:
                    violations.append(f"mid band {st['bands'][1]['queued_items']}")
                if t["inflight"] + t["grants_outstanding"] > 2:
                    violations.append(f"inflight {t['inflight']} + grants {t['grants_outstanding']}")
                for f in st["top_flows"]:
                    if f["band"] == "low" and f["queued_items"] > 5:
                        violations.append(f"flow {f}")
                await asyncio.sleep(0.003)

        sampling = asyncio.ensure_future(sampler())
        for rnd in range(8):
            live = [c for c in clients if not c.closed]
            for c in live:
                for _ in range(12):
                    f = c.admit(
                        f"f{rng.randrange(4)}", priority=rng.choice((10, 5, 0, 0)), size=rng.randint(100, 3000),
                        ttl=rng.choice((0.05, 0.0, 0.0)),
                    )
                    f.add_done_callback(on_done(c))
                    futs.append(f)
            await asyncio.sleep(0.02)
            if rnd in (3, 5):
                await live[-1].close()  # leaves with admissions queued and tickets held
        await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 20)
        await until(lambda: all(r.done() for r in releases), 5)
        sampling.cancel()
        s = await svc.until_stats(
            lambda s: s["totals"]["inflight"] == 0 and s["totals"]["pending"] == 0 and s["totals"]["tickets"] == 0
        )
        assert not violations, violations[:10]
        assert seen["evicted:displaced"] > 0 and seen["rejected:capacity"] > 0 and seen["evicted:ttl"] > 0, seen
        service_seen = {k: v for k, v in band_outcomes(s).items() if v}
        assert sum(service_seen.values()) == len(futs) == sum(seen.values()) + lost[0]
        # per outcome, the service counted what the clients heard, plus what the closed clients never
        # heard (answered after they left, cancelled, or dispatched and released at once)
        for label, count in seen.items():
            assert service_seen.get(label, 0) >= count, (label, service_seen, seen)
        assert service_seen.get("evicted:cancelled", 0) <= lost[0]
        assert set(service_seen) <= {"dispatched", "rejected:capacity", "evicted:ttl", "evicted:displaced",
                                     "evicted:cancelled"}, service_seen
        t = s["totals"]
        assert (t["queued_items"], t["queued_bytes"], t["inflight_bytes"], t["grants_outstanding"]) == (0, 0, 0, 0)
        assert sum(shard_queued(s)) == 0 and sum(shard_queued_bytes(s)) == 0
        for c in clients:
            await c.close()

    run(main(), timeout=40)


# ---------------------------------------------------------------------------------------------- drain


def test_graceful_drain_sigterm(launch: Any) -> None:
    svc = launch(shards=2, budget=1, bands=TWO_BANDS, service={"drain_timeout": 1.0})
    port = svc.http_port

    async def refused(p: int) -> bool:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", p)
        except (ConnectionRefusedError, ConnectionResetError):  # a listener closing resets its backlog
            return True
        w.close()
        return False

    async def main() -> None:
        holder = await Client.connect(svc.host, svc.binary_port)
        waiter = await Client.connect(svc.host, svc.binary_port)
        idle = await Client.connect(svc.host, svc.binary_port)
        keep = await HttpConn.open(port)
        assert (await keep.request("GET", "/healthz")).status == 200
        hold = await holder.admit("hold", priority=10)
        queued = [waiter.admit("q", priority=10, size=10) for _ in range(3)]
        http_queued = asyncio.ensure_future(admit_http(port, "hq", priority=0, bytes=10))  # served last
        await _queued(svc, 4)

        t0 = time.monotonic()
        svc.signal(signal.SIGTERM)
        # stops accepting new connections (both ports)
        deadline = time.monotonic() + 0.5
        while not (await refused(port) and await refused(svc.binary_port)):
            assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
            await asyncio.sleep(0.01)
        # existing connections: new admissions are rejected (shutting down), health says not ready
        r = await keep.request("POST", "/v1/admit", {"flow": "late"})
        assert r.status == 503, r
        assert (r.json()["outcome"], r.json()["reason"]) == ("rejected", "shutting_down")
        assert "retry-after" in r.headers
        assert (await keep.request("GET", "/readyz")).status == 503
        late = await idle.admit("late", priority=10)
        assert late.outcome is Outcome.REJECTED_SHUTTING_DOWN
        # queued work still gets dispatched as the budget frees within the drain timeout
        assert await holder.release(hold.ticket)
        done, rest = await asyncio.wait(queued, timeout=1, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1, (done, rest)
        first = done.pop().result()
        assert first.outcome is D
        assert await waiter.release(first.ticket)
        done, rest = await asyncio.wait(rest, timeout=1, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1, (done, rest)
        second = done.pop().result()
        assert second.outcome is D  # held until the end: the rest waits out the drain timeout
        # the rest is evicted at the drain timeout
        (last,) = rest
        third = await asyncio.wait_for(last, 3)
        hq = await asyncio.wait_for(http_queued, 3)
        elapsed = time.monotonic() - t0
        assert third.outcome is Outcome.EVICTED_SHUTDOWN, third
        assert hq.status == 503 and (hq.json()["outcome"], hq.json()["reason"]) == ("evicted", "shutdown"), hq
        assert 0.9 <= elapsed < 3.0, elapsed
        for c in (holder, waiter, idle):
            await c.close()
        keep.close()

    run(main())
    assert svc.wait(5) == 0
    assert "Traceback" not in svc.stderr(), svc.stderr()


def test_drain_ends_as_soon_as_the_queue_is_empty(launch: Any) -> None:
    """drain_timeout is an upper bound: once nothing is queued the service stops (tickets still held
    by clients do not keep it alive)."""
    svc = launch(shards=2, budget=1, service={"drain_timeout": 10.0})

    async def main() -> None:
        async with Client.connect(svc.host, svc.binary_port) as c:
            hold = await c.admit("hold")
            queued = c.admit("q")
            await _queued(svc, 1)
            svc.signal(signal.SIGTERM)
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            assert await c.release(hold.ticket)
            r = await asyncio.wait_for(queued, 2)
            assert r.outcome is D
            rc = await asyncio.get_running_loop().run_in_executor(None, svc.wait, 5)
            assert rc == 0
            assert time.monotonic() - t0 < 2.0

    run(main())


def test_sigterm_idle_service_exits_zero_quickly(launch: Any) -> None:
    svc = launch(shards=4, budget=1, service={"drain_timeout": 5.0})
    assert svc.stats()["ready"] is True
    t0 = time.monotonic()
    assert svc.terminate() == 0
    assert time.monotonic() - t0 < 3.5  # nothing queued: no need to wait for the drain timeout (5 s)


# ---------------------------------------------------------------------------------------------- binary tickets


def test_binary_connection_close_releases_its_tickets(launch: Any) -> None:
    svc = launch(shards=2, budget=2)

    async def main() -> None:
        async with Client.connect(svc.host, svc.binary_port) as waiter:
            owner = await Client.connect(svc.host, svc.binary_port)
            a = await owner.admit("own", size=10)
            b = await owner.admit("own", size=20)
            assert a.outcome is D and b.outcome is D
            pending = [waiter.admit("w", size=1) for _ in range(2)]
            await _queued(svc, 2)
            s = await svc.astats()
            assert s["totals"]["inflight"] == 2 and s["totals"]["tickets"] == 2
            await owner.close()  # its two tickets are released: both waiting requests dispatch
            results = await asyncio.wait_for(asyncio.gather(*pending), 2)
            assert [r.outcome for r in results] == [D, D]
            s = await svc.astats()
            assert s["counters"]["tickets_released"] == 2
            assert s["totals"]["inflight"] == 2 and s["totals"]["inflight_bytes"] == 2
            # a released ticket of the closed connection cannot be released again
            assert await waiter.release(a.ticket) is False
            for r in results:
                assert await waiter.release(r.ticket)

        # and the waiter's own close released nothing more (already released)
        s = await svc.astats()
        assert s["totals"]["inflight"] == 0 and s["counters"]["tickets_released"] == 4

    run(main())


def test_binary_connection_reset_releases_its_tickets(launch: Any) -> None:
    svc = launch(shards=1, budget=1)

    async def main() -> None:
        async with Client.connect(svc.host, svc.binary_port) as waiter:
            owner = await Client.connect(svc.host, svc.binary_port)
            a = await owner.admit("own")
            assert a.outcome is D
            w = waiter.admit("w")
            await _queued(svc, 1)
            owner._transport.abort()  # RST, as when the client process dies
            r = await asyncio.wait_for(w, 2)
            assert r.outcome is D
            assert await waiter.release(r.ticket)

    run(main())


def test_http_lease_expiry_frees_budget(launch: Any) -> None:
    svc = launch(shards=1, budget=1, service={"lease": 0.3})
    port = svc.http_port

    async def main() -> None:
        t0 = time.monotonic()  # before the lease starts (at the dispatch), however late its answer arrives
        r = (await admit_http(port, "leased")).json()
        assert r["lease_s"] == 0.3
        w = await admit_http(port, "next")  # dispatched once the lease runs out
        assert w.status == 200, w
        assert time.monotonic() - t0 >= 0.29  # (libuv timers have ms granularity)
        assert (await release_http(port, r["ticket"])).status == 404  # expired: unknown now
        s = await svc.astats()
        assert s["counters"]["tickets_expired"] == 1
        assert (await release_http(port, w.json()["ticket"])).status == 200

    run(main())


@pytest.mark.parametrize("shards", [1, 2])
def test_the_largest_limits_allowed_still_dispatch_queued_work(launch: Any, shards: int) -> None:
    """Every limit at the most the configuration accepts (2^62): a queued request is dispatched when
    budget frees. (A review: a byte budget of 2^64 was accepted, and the grant carrying it could not
    be encoded for the shard, so nothing queued was ever dispatched again.)"""
    most = 1 << 62
    svc = launch(config_text(budget=1, budget_bytes=most, max_queued_requests=most, max_queued_bytes=most,
                             bands=[{"priority": 0, "max_bytes": most, "max_requests": most,
                                     "flow_max_bytes": most, "flow_max_requests": most}]), shards=shards)

    async def scenario() -> None:
        async with Client.connect("127.0.0.1", svc.binary_port) as client:
            first = await client.admit("a", size=100)
            assert first.outcome is Outcome.DISPATCHED
            queued = [client.admit(f"f{i}", size=100) for i in range(3)]
            await asyncio.sleep(0.2)
            assert not any(q.done() for q in queued)
            await client.release(first.ticket)
            for q in queued:
                result = await asyncio.wait_for(q, 10.0)
                assert result.outcome is Outcome.DISPATCHED
                await client.release(result.ticket)

    run(scenario())
