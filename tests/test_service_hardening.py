"""Issue 8 against the real service (`flowshard serve` subprocess, real sockets): a worker that dies
while the distributor is out of descriptors is restarted (defect 2), fire-and-forget HTTP clients do
not keep tickets (defect 3), and the protective actions show in /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import resource
import signal
import socket
import struct
import threading
import time
from collections import Counter
from typing import Any

import pytest
from servicekit import (
    HttpConn,
    _request_bytes,
    admit_http,
    ahttp,
    config_text,
    launch,
    metric,
    parse_metrics,
    release_http,
    run,
    status_then_close,
)
from test_service_acceptors import acceptor_of

from distributor.http import ADMIN_RESERVE
from flowshard.client import Client
from flowshard.codec import Admit, Error, FrameReader, FrameWriter, ToClient
from flowshard.types import Outcome

__all__ = ["launch"]


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_worker_that_dies_while_clients_hold_every_descriptor_is_restarted(launch: Any) -> None:
    svc = launch(shards=2)
    headroom = 40
    resource.prlimit(svc.pid, resource.RLIMIT_NOFILE, (_fds(svc.pid) + headroom, _fds(svc.pid) + headroom))
    held: list[socket.socket] = []
    try:
        # Idle binary connections until the distributor has no descriptor left to accept with.
        for _ in range(headroom * 2):
            s = socket.create_connection((svc.host, svc.binary_port))
            held.append(s)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # settle: every accept the distributor could make is made
            before = _fds(svc.pid)
            time.sleep(0.2)
            if _fds(svc.pid) == before:
                break
        worker0 = next(p for p in svc.worker_procs() if p.role == "worker0")
        os.kill(worker0.pid, signal.SIGKILL)
        # Restarted while the clients still hold every descriptor: the reserve is for this.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if any(p.role == "worker0" and p.pid != worker0.pid and p.alive() for p in svc.worker_procs()):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("worker 0 was not restarted while descriptors were exhausted")
    finally:
        for s in held:
            s.close()

    async def main() -> None:
        deadline = time.monotonic() + 5
        while True:  # the descriptors are freed as the distributor sees the closes
            with contextlib.suppress(ConnectionError):
                if (await ahttp(svc.http_port, "GET", "/readyz")).status == 200:
                    break
            assert time.monotonic() < deadline, "/readyz never came back"
            await asyncio.sleep(0.05)
        samples = parse_metrics((await ahttp(svc.http_port, "GET", "/metrics")).body.decode())
        assert metric(samples, "flowshard_worker_restarts_total", shard="0") == 1
        assert metric(samples, "flowshard_worker_spawn_failures_total", shard="0") == 0

    run(main())


def _fire_and_forget(port: int, how: str) -> None:
    body = b'{"flow":"ff"}'
    request = b"POST /v1/admit HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(request)
    if how == "reset":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    elif how == "half-close":
        s.shutdown(socket.SHUT_WR)
        time.sleep(0.01)
    s.close()


def test_fire_and_forget_http_clients_do_not_keep_tickets(launch: Any) -> None:
    svc = launch(shards=1, budget=100)
    for how in ("close", "reset", "half-close"):
        for _ in range(10):
            _fire_and_forget(svc.http_port, how)

    async def main() -> None:
        deadline = time.monotonic() + 3
        while True:
            stats = (await ahttp(svc.http_port, "GET", "/v1/stats")).json()
            if stats["totals"]["inflight"] == 0:
                break
            assert time.monotonic() < deadline, f"{stats['totals']['inflight']} tickets still held"
            await asyncio.sleep(0.05)
        samples = parse_metrics((await ahttp(svc.http_port, "GET", "/metrics")).body.decode())
        assert metric(samples, "flowshard_protective_actions_total", front="http", action="undeliverable") == 30
        # A client that reads its answer keeps its ticket for the lease.
        r = await admit_http(svc.http_port, "reader")
        assert r.status == 200
        await asyncio.sleep(0.5)
        assert (await ahttp(svc.http_port, "GET", "/v1/stats")).json()["totals"]["inflight"] == 1

    run(main())


def test_binary_frame_timeout_and_malformed_frames_show_in_metrics(launch: Any) -> None:
    svc = launch(shards=1, service={"header_timeout": 0.3})

    async def main() -> None:
        r, w = await asyncio.open_connection(svc.host, svc.binary_port)
        w.write(struct.pack(">I", 1000) + b"\x93")  # a frame that never completes
        t0 = time.monotonic()
        [err] = FrameReader(ToClient).feed(await asyncio.wait_for(r.read(), 3))  # then EOF
        assert type(err) is Error and (err.id, err.status) == (-1, 408), err
        assert time.monotonic() - t0 < 2
        w.close()
        r, w = await asyncio.open_connection(svc.host, svc.binary_port)
        fw = FrameWriter()
        fw.add([Admit.__struct_config__.tag, -1, "a", 0, 0, 0.0, 0.0, 0, 0.0])
        w.write(fw.take())
        await asyncio.wait_for(r.read(), 3)
        w.close()
        samples = parse_metrics((await ahttp(svc.http_port, "GET", "/metrics")).body.decode())
        assert metric(samples, "flowshard_protective_actions_total", front="binary", action="frame_timeout") == 1
        assert metric(samples, "flowshard_protective_actions_total", front="binary", action="malformed") == 1
        with contextlib.suppress(Exception):
            w.close()

    run(main())


@pytest.mark.parametrize("acceptors", [0, 2])
def test_monitoring_answers_a_service_out_of_descriptors(launch: Any, acceptors: int) -> None:
    """Review 76: under `ulimit -n 600` with 900 connections opened, /v1/stats and /metrics on a
    connection opened before answered `500 internal error: OSError` until they had been rendered
    once: their first rendering imports and opens files. They are rendered once at start now."""
    svc = launch(shards=1, acceptors=acceptors, budget=10)
    headroom = 20

    async def main() -> None:
        admin = await HttpConn.open(svc.http_port)
        limit = _fds(svc.pid) + headroom
        resource.prlimit(svc.pid, resource.RLIMIT_NOFILE, (limit, limit))
        held = []
        try:
            for _ in range(headroom * 3):  # binary connections until the distributor has no descriptor left
                held.append(socket.create_connection((svc.host, svc.binary_port)))
            await asyncio.sleep(0.5)
            for path in ("/v1/stats", "/metrics", "/v1/stats"):
                r = await admin.request("GET", path)
                assert r.status == 200, (path, r)
        finally:
            for s in held:
                s.close()
        admin.close()

    run(main())


def test_monitoring_sees_a_service_flooded_with_connections(launch: Any) -> None:
    """max_connections held by a flood: /healthz, /readyz, /metrics and /v1/stats still answer on
    fresh connections (the admin reserve), an admission on one gets 503 and is closed, and the
    reserve itself is bounded."""
    svc = launch(shards=1, budget=10, service={"max_connections": 4})
    port = svc.http_port

    def actions(samples: Any, action: str) -> float:
        return metric(samples, "flowshard_protective_actions_total", front="http", action=action)

    async def main() -> None:
        flood = [await HttpConn.open(port) for _ in range(4)]
        for conn in flood:  # max_connections, surely accepted and counted
            assert (await conn.request("GET", "/healthz")).status == 200
        for path in ("/healthz", "/readyz", "/v1/stats"):
            conn = await HttpConn.open(port)  # a fresh connection each: the flood still holds its places
            r = await conn.request("GET", path)
            assert r.status == 200, (path, r)
            conn.close()
        await asyncio.sleep(0.1)
        scraper = await HttpConn.open(port)
        r = await scraper.request("GET", "/metrics")
        assert r.status == 200
        samples = parse_metrics(r.body.decode())
        assert actions(samples, "admin_reserve") == 4 and actions(samples, "too_many_connections") == 0
        assert (await scraper.request("GET", "/v1/stats")).json()["totals"]["dispatched"] == 0  # keep-alive

        worker = await HttpConn.open(port)  # real work on a reserve connection: 503, closed
        r = await worker.request("POST", "/v1/admit", {"flow": "a"})
        assert r.status == 503 and r.headers["connection"] == "close" and r.headers["retry-after"] == "1", r
        assert r.json() == {"error": {"status": 503, "message": "too many connections, retry later"}}
        assert await worker.closed_by_peer()
        worker.close()

        await asyncio.sleep(0.1)
        held = [await HttpConn.open(port) for _ in range(ADMIN_RESERVE - 1)]  # the rest of the reserve
        for conn in held:
            assert (await conn.request("GET", "/healthz")).status == 200
        beyond = await HttpConn.open(port)  # max_connections + the reserve: refused without asking
        r = await beyond.response()
        assert r.status == 503 and await beyond.closed_by_peer()
        beyond.close()

        samples = parse_metrics((await scraper.request("GET", "/metrics")).body.decode())
        assert actions(samples, "admin_reserve") == 5 + ADMIN_RESERVE - 1
        assert actions(samples, "too_many_connections") == 2
        s = (await scraper.request("GET", "/v1/stats")).json()
        assert s["totals"]["dispatched"] == 0 and s["totals"]["pending"] == 0  # the refused admit never was one

        for conn in [*flood, *held, scraper]:
            conn.close()
        await asyncio.sleep(0.1)
        r = await admit_http(port, "after")  # the flood gone: work is admitted again
        assert r.status == 200, r

    run(main())


# ---------------------------------------------------------------------------------------------- review 18


@pytest.mark.parametrize("acceptors", [0, 1])
def test_a_pipelining_client_that_reads_gets_its_answers_and_the_budget_comes_back(launch: Any, acceptors: int) -> None:
    """Review 18, D1: with `--acceptors 0` one connection sending 8 x [admit, GET /metrics] (reading
    all along) got no answer, was dropped as a slow reader, and its 8 dispatches kept the whole
    budget (8) until the lease; with acceptors it got them all. Now both modes answer all 16."""
    svc = launch(shards=1, acceptors=acceptors, budget=8)

    async def main() -> None:
        conn = await HttpConn.open(svc.http_port)
        for _ in range(8):
            conn.send("POST", "/v1/admit", {"flow": "a"})
            conn.send("GET", "/metrics")
        answers = [await conn.response(timeout=5) for _ in range(16)]
        assert [a.status for a in answers] == [200] * 16
        assert all(b"flowshard_inflight_requests" in a.body for a in answers[1::2])
        for a in answers[::2]:
            conn.send("POST", "/v1/release", {"ticket": a.json()["ticket"]})
        assert [(await conn.response(timeout=5)).status for _ in range(8)] == [200] * 8
        conn.close()
        stats = (await ahttp(svc.http_port, "GET", "/v1/stats")).json()
        assert stats["totals"]["inflight"] == 0
        samples = parse_metrics((await ahttp(svc.http_port, "GET", "/metrics")).body.decode())
        assert metric(samples, "flowshard_protective_actions_total", front="http", action="slow_reader") == 0

    run(main())


@pytest.mark.parametrize("acceptors", [0, 1])
def test_a_half_closed_large_pipeline_is_answered_in_full(launch: Any, acceptors: int) -> None:
    """Review 18, D3: with acceptors, 2000 pipelined requests (releases of known and unknown tickets,
    /v1/stats, /healthz, 422 and 400 bodies, and admissions) then shutdown(SHUT_WR) got 1607 answers
    then FIN: the input kept unparsed at the EOF was dropped, its releases never applied, nothing
    said so. Now every request read before the EOF is answered, in order, in both modes; the
    admissions parsed after the EOF are answered `evicted: cancelled` and not admitted."""
    svc = launch(shards=1, acceptors=acceptors, budget=None)

    async def main() -> None:
        conn = await HttpConn.open(svc.http_port)
        for _ in range(50):
            conn.send("POST", "/v1/admit", {"flow": "pre"})
        tickets = [(await conn.response(timeout=5)).json()["ticket"] for _ in range(50)]
        conn.close()
        kinds = []
        parts = []
        for i in range(2000):
            k = i % 8
            if k == 0 and tickets:
                parts.append(_request_bytes("POST", "/v1/release", {"ticket": tickets.pop()}))
            elif k in (0, 1):
                parts.append(_request_bytes("POST", "/v1/release", {"ticket": 7 + i}))
                k = 1
            elif k == 2:
                parts.append(_request_bytes("GET", "/v1/stats"))
            elif k == 3:
                parts.append(_request_bytes("GET", "/healthz"))
            elif k == 4:
                parts.append(_request_bytes("POST", "/v1/admit", {"flow": "x", "bytes": -1}))
            elif k == 5:
                parts.append(_request_bytes("POST", "/v1/admit", b'{"flow": "x", '))
            elif k == 6 and i % 400 == 6:
                parts.append(_request_bytes("POST", "/v1/admit", {"flow": "late"}))
            else:
                parts.append(_request_bytes("GET", "/healthz"))
                k = 3
            kinds.append(k)
        conn = await HttpConn.open(svc.http_port)
        conn.send_raw(b"".join(parts))
        conn.writer.write_eof()
        statuses = []
        with contextlib.suppress(ConnectionError):
            while len(statuses) < 2000:
                statuses.append((await conn.response(timeout=5)).status)
        assert len(statuses) == 2000, f"{len(statuses)} of 2000 answered"
        allowed = {0: {200}, 1: {404}, 2: {200}, 3: {200}, 4: {422}, 5: {400}, 6: {200, 503}}
        wrong = [(i, kinds[i], s) for i, s in enumerate(statuses) if s not in allowed[kinds[i]]]
        assert not wrong, wrong[:5]
        assert await conn.closed_by_peer()
        conn.close()
        # Every known ticket was released through the pipeline (none left); the admissions answered
        # dispatched hold theirs.
        stats = (await ahttp(svc.http_port, "GET", "/v1/stats")).json()
        assert stats["totals"]["inflight"] == sum(1 for i, s in enumerate(statuses) if kinds[i] == 6 and s == 200)

    run(main())


@pytest.mark.parametrize("acceptors", [0, 2])
def test_a_client_flooding_requests_answered_at_once_without_reading_is_dropped_as_a_slow_reader(
    launch: Any, acceptors: int,
) -> None:
    """A client pipelining 422s (answered at once, by the front) and reading none: its reading stops at
    write_high, so the request it was sending when it stopped waited on us, and it was counted as a
    header_timeout (408) then close_timeout — not as what it is. Whatever is in progress, a client
    whose answers wait unread at a deadline is dropped as a slow reader, as one whose answers reach
    the 1 MiB bound."""
    svc = launch(shards=1, acceptors=acceptors, service={"header_timeout": 1.0})
    request = (b"POST /v1/admit HTTP/1.1\r\nhost: x\r\nx-pad: %s\r\ncontent-length: 13\r\n\r\n"
               b'{"flow": ""}\n' % (b"p" * 37))
    # More 422s than the kernel can take: a client that reads nothing first fills the connection's send
    # buffer, autotuned up to tcp_wmem's maximum (4 MiB here; ~3 MB taken on loopback), and only then do
    # the answers wait in the service (20,000 requests, ~3 MB of answers, passed unjudged when the kernel
    # took them all: the connection was idle, nothing waited in the service). It ends mid-request anywhere.
    with open("/proc/sys/net/ipv4/tcp_wmem") as f:
        wmem_max = int(f.read().split()[2])
    if wmem_max > 16 << 20:
        pytest.skip(f"tcp_wmem's maximum ({wmem_max} bytes) would need a flood of over 100,000 requests")
    data = request * ((wmem_max + (2 << 20)) // 150)  # each 422 is ~150 bytes: 2 MiB more than the kernel takes
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((svc.host, svc.http_port))
    sock.setblocking(False)
    sent, deadline = 0, time.monotonic() + 8.0
    dropped = False
    while time.monotonic() < deadline and not dropped:
        try:
            sent += sock.send(data[sent : sent + (1 << 16)])
        except BlockingIOError:
            time.sleep(0.02)
        except OSError:  # reset: dropped
            dropped = True
        if sent >= len(data):
            time.sleep(0.05)
    sock.close()

    async def main() -> None:
        samples = parse_metrics((await ahttp(svc.http_port, "GET", "/metrics")).body.decode())
        actions = {a: metric(samples, "flowshard_protective_actions_total", front="http", action=a)
                   for a in ("slow_reader", "header_timeout", "close_timeout")}
        assert actions == {"slow_reader": 1, "header_timeout": 0, "close_timeout": 0}, (actions, sent)

    run(main())


@pytest.mark.parametrize("acceptors", [0, 2])
def test_a_binary_client_that_half_closes_gets_the_answers_decided_before_its_eof(launch: Any, acceptors: int) -> None:
    """Admit (dispatched at once) then EOF; Release then EOF: the Result and the Released come, then
    FIN, in both modes. Through acceptors the answers come a round trip after the EOF, and the
    connection was closed at the EOF: both were dropped (a review), the release applied unanswered.
    Its queued admission is cancelled without an answer, and its ticket released with the lease."""
    from flowshard.codec import Release, Released, Result

    svc = launch(shards=2, acceptors=acceptors, budget=1)

    async def half_closed(*messages: Any) -> list[Any]:
        r, w = await asyncio.open_connection(svc.host, svc.binary_port)
        fw = FrameWriter()
        for m in messages:
            fw.add(m)
        w.write(fw.take())
        w.write_eof()
        frames = FrameReader(ToClient).feed(await asyncio.wait_for(r.read(), 5))  # up to the FIN
        w.close()
        return frames

    async def scenario() -> None:
        r, w = await asyncio.open_connection(svc.host, svc.binary_port)  # holds the budget's one ticket
        fw = FrameWriter()
        fw.add(Admit(7, "held"))
        w.write(fw.take())
        reader = FrameReader(ToClient)
        held: list[Any] = []
        while not held:
            held = reader.feed(await asyncio.wait_for(r.read(4096), 5))
        ticket = held[0].ticket
        assert type(held[0]) is Result and ticket
        # released from another connection, which then half-closes: answered, true
        assert await half_closed(Release(ticket)) == [Released(ticket, True)]
        # dispatched at once (the budget is free again), the next one queued behind it: cancelled unanswered
        [first] = await half_closed(Admit(1, "a"), Admit(2, "b"))
        assert type(first) is Result and first.id == 1 and first.outcome == 0 and first.ticket, first
        w.close()

    asyncio.run(scenario())
    deadline = time.monotonic() + 5
    def settled(s: dict[str, Any]) -> bool:  # a's lease ended at its FIN; b's cancel reached its shard
        outcomes = {k: v for k, v in s["bands"][0]["outcomes"].items() if v}
        return (s["totals"]["inflight"], s["totals"]["pending"]) == (0, 0) and outcomes == {
            "dispatched": 2, "evicted:cancelled": 1}

    while not settled(s := svc.stats()):
        assert time.monotonic() < deadline, (s["totals"], s["bands"][0]["outcomes"])
        time.sleep(0.02)


@pytest.mark.parametrize("acceptors", [0, 2])
def test_an_http_dispatch_answered_cancelled_at_the_clients_eof_counts_unclaimed(launch: Any, acceptors: int) -> None:
    """An admission then EOF: through an acceptor the dispatch (at once, the budget free) reaches it
    after the EOF, so its client is answered `evicted: cancelled` and the ticket is released. It was
    counted a ticket released, so the service's counters and the client's answer disagreed (a
    review); now it is a dispatch unclaimed, as one its client left while it was dispatched, and
    what the clients were told adds up to the counters in both modes."""
    svc = launch(shards=1, acceptors=acceptors, budget=4)
    body = b'{"flow": "m", "bytes": 1}'
    told = {"dispatched": 0, "cancelled": 0}
    for _ in range(10):
        with socket.create_connection((svc.host, svc.http_port), timeout=5) as c:
            c.sendall(b"POST /v1/admit HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
            c.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := c.recv(4096):
                answer += chunk
        payload = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        if payload["outcome"] == "dispatched":
            told["dispatched"] += 1
            assert asyncio.run(release_http(svc.http_port, payload["ticket"])).status == 200
        else:
            assert (payload["outcome"], payload["reason"]) == ("evicted", "cancelled"), payload
            told["cancelled"] += 1
    def settled() -> bool:  # (an unclaimed dispatch reaches the distributor a round trip after its answer)
        s = svc.stats()
        counters, outcomes = s["counters"], {k: v for k, v in s["bands"][0]["outcomes"].items() if v}
        return (s["totals"]["inflight"] == 0 and counters["tickets_released"] == told["dispatched"]
                and counters["dispatches_unclaimed"] + outcomes.get("evicted:cancelled", 0) == told["cancelled"])

    deadline = time.monotonic() + 5
    while not settled():
        assert time.monotonic() < deadline, (svc.stats()["counters"], told)
        time.sleep(0.02)
    if acceptors:
        assert told["cancelled"] > 0  # (the race this is about: usually every one)


@pytest.mark.parametrize("acceptors", [0, 2])
@pytest.mark.parametrize("how", ["fin", "rst"])
def test_a_dispatch_whose_answer_a_leaving_client_never_had_counts_unclaimed(
    launch: Any, acceptors: int, how: str
) -> None:
    """A pipelined connection's second admission (a higher band) is dispatched while its first still
    waits, so its answer waits behind the first's; then the client leaves. By FIN it was counted
    unclaimed, by RST a ticket released (a review): its client had it neither way. Now unclaimed both."""
    svc = launch(shards=1, acceptors=acceptors, budget=1, bands=[{"priority": 0}, {"priority": 5}])

    def admit(flow: str, priority: int) -> bytes:
        body = json.dumps({"flow": flow, "priority": priority, "bytes": 10}).encode()
        return b"POST /v1/admit HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)

    async def main() -> None:
        ticket = (await admit_http(svc.http_port, "holder")).json()["ticket"]
        r, w = await asyncio.open_connection(svc.host, svc.http_port)
        w.write(admit("low", 0) + admit("high", 5))
        await w.drain()
        await asyncio.sleep(0.3)
        assert (await release_http(svc.http_port, ticket)).status == 200
        deadline = time.monotonic() + 5
        while svc.stats()["totals"]["inflight"] != 1:  # "high" dispatched; its answer waits behind "low"'s
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        if how == "rst":
            w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.close()
        else:
            w.write_eof()
            await asyncio.wait_for(r.read(), 5)
            w.close()

    asyncio.run(main())
    deadline = time.monotonic() + 5
    while (c := svc.stats()["counters"])["dispatches_unclaimed"] != 1 or svc.stats()["totals"]["inflight"]:
        assert time.monotonic() < deadline, c
        time.sleep(0.02)
    assert c["tickets_released"] == 1  # the holder's


def test_a_binary_client_half_closing_while_the_distributor_is_stalled_is_not_held_for_ever(launch: Any) -> None:
    """Through an acceptor the answers due before a binary client's EOF take a round trip; with the
    distributor stopped the connection stayed open as long as it was (a review). Reset after
    close_timeout, as HTTP's wait after an EOF is bounded."""
    svc = launch(shards=1, acceptors=1, budget=4)
    c = socket.create_connection((svc.host, svc.binary_port), timeout=5)
    # handed to the acceptor (waited for, not a fixed 0.3 s: on a loaded machine the distributor, stopped
    # before it accepted, would keep the connection in its backlog and the recv below time out)
    acceptor_of(svc, svc.binary_port, c.getsockname()[1], timeout=10.0)
    os.kill(svc.pid, signal.SIGSTOP)
    try:
        c.shutdown(socket.SHUT_WR)
        c.settimeout(6.0)
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            while c.recv(4096):
                pass
        took = time.monotonic() - started
    finally:
        os.kill(svc.pid, signal.SIGCONT)
        c.close()
    assert took < 4.0, took  # close_timeout (2 s), not the stall


@pytest.mark.parametrize("acceptors", [0, 2])
@pytest.mark.parametrize("how", ["rst", "fin"])
@pytest.mark.parametrize("flood", [500, 1500])
def test_a_client_that_pipelines_without_reading_then_leaves_gives_everything_back(
    launch: Any, acceptors: int, how: str, flood: int,
) -> None:
    """Review 76: one connection pipelined 5,000 admissions without reading (a small receive buffer, so
    little of their answers fits). A read is handled whole, so over 1,000 were in progress at once,
    where the README bounds it at 64. Then it reset (or half-closed) while its reading was paused,
    which nothing saw: its admissions stayed queued until their TTL, its tickets held until the
    lease, and every other client waited. Now at most 64 are in progress, and within about a
    second of its leaving its queued admissions are cancelled. 500 (~50 KB; its reading is never
    paused), 1,500 (~165 KB: its reading paused once 80 KB wait unparsed, the kernel's look at the
    connection sees it leave; all of it sent before it leaves, or its FIN would wait behind what the
    service has not read). Its tickets are not asserted: its input read after their answers were
    written counts as its having read them, and they stay for the lease (README)."""
    svc = launch(shards=2, acceptors=acceptors, budget=20)
    admit = _request_bytes("POST", "/v1/admit", {"flow": "pipe", "bytes": 10, "ttl": 60})

    async def main() -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)  # (500: all sent at once, before any
        s.connect(("127.0.0.1", svc.http_port))  # answer is written: what it sends later proves it read them)
        s.setblocking(False)
        data, sent = admit * flood, 0
        deadline = time.monotonic() + 10
        while sent < len(data) and time.monotonic() < deadline:
            try:
                sent += s.send(data[sent:sent + 65536])
            except BlockingIOError:
                await asyncio.sleep(0.01)
        assert sent == len(data)
        await asyncio.sleep(1.0)
        totals = (await ahttp(svc.http_port, "GET", "/v1/stats")).json()["totals"]
        assert 0 < totals["pending"] <= 64 and totals["inflight"] == 20, totals
        if how == "rst":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        else:
            s.shutdown(socket.SHUT_WR)
        left = time.monotonic()
        while True:
            totals = (await ahttp(svc.http_port, "GET", "/v1/stats")).json()["totals"]
            if totals["pending"] == 0:
                break
            assert time.monotonic() - left < 3.0, (totals["pending"], totals["inflight"])
            await asyncio.sleep(0.05)
        if how == "fin":
            s.close()

    run(main())


@pytest.mark.parametrize("acceptors", [0, 1])
def test_a_100_continue_behind_requests_past_64_comes_in_its_turn(launch: Any, acceptors: int) -> None:
    """Review 80: 65 admissions (the 65th waits, parsed), then a request with `Expect: 100-continue`
    whose body the client sends only after the 100 (as aiohttp's expect100 does): the 100 was never
    sent, and the request ended 408 after header_timeout. It comes in its turn again."""
    svc = launch(shards=1, acceptors=acceptors, budget=1)

    async def main() -> None:
        assert (await admit_http(svc.http_port, flow="holder", ttl=60)).status == 200  # the budget held
        conn = await HttpConn.open(svc.http_port)
        admit = _request_bytes("POST", "/v1/admit", {"flow": "x", "ttl": 0.3})
        body = b'{"flow":"y","ttl":0.3}'
        head = (b"POST /v1/admit HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\n"
                b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(body))
        conn.send_raw(admit * 65 + head)
        statuses, continued = [], False
        while len(statuses) < 66:
            r = await conn.response(timeout=5)
            if r.status == 100:
                continued = True
                conn.send_raw(body)
            else:
                statuses.append(r.status)
        assert continued and statuses == [429] * 66  # (each waited its TTL for the budget held)
        conn.close()

    run(main())


@pytest.mark.parametrize("acceptors", [0, 1])
@pytest.mark.parametrize("last", ["malformed", "close"])
def test_requests_past_64_in_progress_are_answered_in_order_before_what_follows_them(
    launch: Any, acceptors: int, last: str,
) -> None:
    """A read holds more than 64 requests: those past 64 wait, parsed, and are handled as answers
    drain. What the same read has after them must wait too: a malformed request's 400 (with its
    close) comes after all 100 answers, and a request asking to close is answered last. Answering the
    400 at once put it after the first 64 and closed the connection on the other 36 unanswered."""
    svc = launch(shards=1, acceptors=acceptors, budget=1)

    async def main() -> None:
        conn = await HttpConn.open(svc.http_port)
        parts = [_request_bytes("POST", "/v1/admit", {"flow": "x", "ttl": 0.2}) for _ in range(99)]
        if last == "malformed":
            parts.append(_request_bytes("POST", "/v1/admit", {"flow": "x", "ttl": 0.2}))
            parts.append(b"NOT HTTP AT ALL\r\n\r\n")
        else:
            parts.append(_request_bytes("POST", "/v1/admit", {"flow": "x", "ttl": 0.2}, keep_alive=False))
        conn.send_raw(b"".join(parts))
        statuses = []
        with contextlib.suppress(ConnectionError):
            while len(statuses) < 101:
                statuses.append((await conn.response(timeout=5)).status)
        assert statuses[0] == 200 and set(statuses[1:100]) == {429}, statuses
        assert statuses[100:] == ([400] if last == "malformed" else []), statuses[95:]
        assert await conn.closed_by_peer()
        conn.close()

    run(main())


@pytest.mark.parametrize("acceptors", [0, 2])
def test_counters_never_fall_back_during_a_drain_to_its_last_scrape(launch: Any, acceptors: int) -> None:
    """Review 76: on a keep-alive connection opened before SIGTERM, the scrapes after the workers had
    exited reported every `flowshard_requests_total` and `flowshard_dispatched_total` as 0 (the shared
    counters were gone), so the drain's last outcomes (`evicted: shutdown`) were never seen and
    Prometheus counters fell. Now the counters as the workers left them are read once they stop."""
    svc = launch(shards=2, acceptors=acceptors, budget=1, service={"drain_timeout": 0.5})

    def total(samples: dict[Any, float], name: str) -> float:
        return sum(v for (n, _), v in samples.items() if n == name)

    async def main() -> None:
        async with Client.connect("127.0.0.1", svc.binary_port) as c:
            assert (await c.admit("held")).dispatched
            queued = c.admit("queued")
            await svc.until_stats(lambda st: st["totals"]["pending"] == 1)
            conn = await HttpConn.open(svc.http_port)
            seen: list[tuple[float, float, float]] = []
            svc.signal(signal.SIGTERM)
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError, AssertionError):
                while True:
                    conn.send("GET", "/metrics")
                    r = await conn.response(timeout=2)
                    if r.status != 200:
                        break
                    samples = parse_metrics(r.body.decode())
                    seen.append((total(samples, "flowshard_requests_total"),
                                 total(samples, "flowshard_dispatched_total"),
                                 metric(samples, "flowshard_requests_total", band="p0", outcome="evicted",
                                        reason="shutdown")))
                    await asyncio.sleep(0.005)
            assert (await queued).outcome == Outcome.EVICTED_SHUTDOWN
        assert len(seen) > 3, seen
        for before, after in itertools.pairwise(seen):
            assert after[0] >= before[0] and after[1] >= before[1], seen
        svc.wait()

    run(main())


@pytest.mark.parametrize("acceptors", [0, 2])
def test_a_half_closing_pipeliner_is_told_apart_what_became_a_request_and_what_did_not(
    launch: Any, acceptors: int
) -> None:
    """A review: 100 admissions pipelined, then EOF; every one was answered `evicted: cancelled`, but
    only the 64 in progress had become requests (the counters said 64): a client's tally of outcomes
    exceeded the service's. Those parsed after the EOF are answered with an error now, not an outcome,
    so the outcomes a client sees are exactly what the counters add."""
    svc = launch(shards=1, acceptors=acceptors, budget=1)

    def outcomes(samples: dict[Any, float]) -> dict[str, float]:
        return {dict(labels)["outcome"] + ":" + dict(labels)["reason"]: v
                for (name, labels), v in samples.items() if name == "flowshard_requests_total" and v}

    async def main() -> None:
        async with Client.connect("127.0.0.1", svc.binary_port) as c:
            held = await c.admit("held")  # the budget taken: the pipelined admissions queue
            assert held.dispatched
            before = outcomes(await svc.ametrics())
            conn = await HttpConn.open(svc.http_port)
            conn.send_raw(b"".join(_request_bytes("POST", "/v1/admit", {"flow": "p", "bytes": 10}) for _ in range(100)))
            await svc.until_stats(lambda s: s["totals"]["pending"] >= 64)
            conn.writer.write_eof()
            answers = [await conn.response() for _ in range(100)]
            assert await conn.closed_by_peer()
            seen: dict[str, float] = {}
            errors = 0
            for a in answers:
                body = a.json()
                if "outcome" in body:
                    label = body["outcome"] + ":" + body.get("reason", "")
                    seen[label] = seen.get(label, 0) + 1
                else:
                    assert a.status == 503 and body["error"]["message"].startswith("not admitted"), body
                    errors += 1
            assert errors > 0 and sum(seen.values()) + errors == 100, (seen, errors)
            after = await svc.until_stats(lambda s: s["totals"]["pending"] == 0)
            assert after["totals"]["queued_items"] == 0
            now = outcomes(await svc.ametrics())
            assert {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)} == seen
            await c.release(held.ticket)

    run(main())


def _connections_ended_unanswered(host: str, port: int, seconds: float, clients: int = 1) -> tuple[int, int, int]:
    """`clients` clients, each connecting in a loop for `seconds`, one /healthz per connection:
    (answered, closed without an answer, not answered within 0.3 s)."""
    counts = [0, 0, 0]
    until = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < until:
            with socket.create_connection((host, port), timeout=1.0) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                s.settimeout(0.3)
                try:
                    got = s.recv(100)
                except TimeoutError:
                    counts[2] += 1
                    continue
                except ConnectionResetError:
                    got = b""
                counts[0 if got.startswith(b"HTTP/1.1 200") else 1] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts[0], counts[1], counts[2]


def test_an_acceptor_out_of_descriptors_is_handed_no_more_than_it_can_hold(launch: Any) -> None:
    """Review 120: an acceptor out of descriptors closed every connection handed to it (the kernel
    drops the descriptor on its way), and the distributor, seeing that acceptor with the fewest
    connections, kept handing it nearly all of them: ~13,700 connections a second accepted and
    closed unanswered. It says so now (LinkConns.dropped), and is handed no more open connections
    than it held then, but a probe now and then (review 127: a pause of a second for any drop
    stalled acceptors merely near their limit). Near the limit the clients are served, few lose
    a connection; with every acceptor out, they wait in the listen backlog."""
    svc = launch(shards=1, acceptors=2)
    procs = {p.role: p for p in svc.acceptor_procs()}
    for p in procs.values():  # room for 6 connections each
        limit = _fds(p.pid) + 6
        resource.prlimit(p.pid, resource.RLIMIT_NOFILE, (limit, limit))
    answered, closed, waited = _connections_ended_unanswered(svc.host, svc.http_port, 2.0, clients=24)
    # (before: about as many closed as answered; a pause per drop: ~50 answered a second)
    assert answered > 500 and closed <= answered // 20, (answered, closed, waited)
    # (below what it has open: it keeps those, and every descriptor handed to it is dropped)
    resource.prlimit(procs["acceptor0"].pid, resource.RLIMIT_NOFILE, (8, 8))
    answered, closed, waited = _connections_ended_unanswered(svc.host, svc.http_port, 2.0)
    assert answered > 50 and closed <= 10 and waited == 0, (answered, closed, waited)  # (before: ~22,000)
    resource.prlimit(procs["acceptor1"].pid, resource.RLIMIT_NOFILE, (8, 8))
    answered, closed, waited = _connections_ended_unanswered(svc.host, svc.http_port, 2.0)
    # (probes each 0.1 s, then twice as long each time, up to a second; their first ones as they
    # drop, a round trip's worth)
    assert answered == 0 and closed <= 16 and waited >= 3, (answered, closed, waited)


def _keep_alive_clients(host: str, port: int, n: int, timeout: float) -> tuple[list[socket.socket], list[float]]:
    """`n` clients at once, each a keep-alive connection with one /healthz answered, kept open:
    (their sockets, the seconds each waited for its answer; those without one are left out)."""
    socks: list[socket.socket] = []
    waits: list[float] = []
    t0 = time.monotonic()

    def one() -> None:
        with contextlib.suppress(OSError):
            s = socket.create_connection((host, port), timeout=timeout)
            socks.append(s)
            s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            if s.recv(100).startswith(b"HTTP/1.1 200"):
                waits.append(time.monotonic() - t0)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return socks, waits


def test_an_acceptor_that_has_its_descriptors_again_takes_new_clients_at_once(launch: Any) -> None:
    """Review 129: its cap grew by one with each probe, a probe's result came with the next heartbeat
    (0.25 s), so once its descriptors were back keep-alive clients waited 13 s (p50, 100 clients).
    Its cap doubles with each probe that finds room, and while it recently dropped one it reports
    every change at once: they wait for the next probe (at most a second after the last failed)."""
    svc = launch(shards=1, acceptors=1)
    (acceptor,) = svc.acceptor_procs()
    _, hard = resource.prlimit(acceptor.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(acceptor.pid, resource.RLIMIT_NOFILE, (_fds(acceptor.pid) + 4, hard))
    held, _ = _keep_alive_clients(svc.host, svc.http_port, 10, 2.0)  # (some dropped: it is capped)
    resource.prlimit(acceptor.pid, resource.RLIMIT_NOFILE, (hard, hard))
    more, waits = _keep_alive_clients(svc.host, svc.http_port, 100, 30.0)
    try:
        assert len(waits) == 100 and max(waits) < 3.0, (len(waits), max(waits, default=None))
    finally:
        for s in held + more:
            s.close()


def test_closing_connections_within_the_descriptors_asked_for_lose_none(launch: Any) -> None:
    """Review 129: an acceptor's cap counted places, and a place is free while its socket still waits
    0.25 s after a client's close (c1e6964): under a flood of admit-and-close clients at the limit
    serve asks for (`descriptors_needed`) it kept dropping connections (260 closed unanswered in
    3 s, well within max_connections). Its sockets are what it reports and is capped by now, and
    the closing connections freed early are counted in what serve asks for: none is lost."""
    from distributor.fdreserve import descriptors_needed

    svc = launch(shards=1, acceptors=1, budget=None, service={"max_connections": 300})
    (acceptor,) = svc.acceptor_procs()
    _, hard = resource.prlimit(acceptor.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(acceptor.pid, resource.RLIMIT_NOFILE, (descriptors_needed(300, 1, 1), hard))
    admit = _request_bytes("POST", "/v1/admit", {"flow": "a"}, keep_alive=False)
    statuses: Counter[str] = Counter()
    until = time.monotonic() + 2.0

    def flood() -> None:
        while time.monotonic() < until:
            try:
                statuses[str(status_then_close(svc.host, svc.http_port, admit, 2.0) or "closed")] += 1
            except OSError as exc:
                statuses[type(exc).__name__] += 1

    threads = [threading.Thread(target=flood) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # (503: past the closing connections one process frees early, they keep their places)
    assert set(statuses) <= {"200", "503"} and statuses["200"] > 500, statuses


def test_connections_over_the_limit_get_their_503_beside_an_acceptor_out_of_descriptors(launch: Any) -> None:
    """Review 129: a connection to be refused went to the acceptor out of descriptors whenever its
    probe was due, and did not count as one: 4-5 of 60-460 such clients got a reset, not their 503.
    Any acceptor can refuse one: it goes to one with room."""
    svc = launch(shards=1, acceptors=2, service={"max_connections": 1})
    starved = next(p for p in svc.acceptor_procs() if p.role == "acceptor0")
    resource.prlimit(starved.pid, resource.RLIMIT_NOFILE, (8, 8))
    held: list[socket.socket] = []
    try:
        for _ in range(200):  # the place and the admin reserve taken (a few of the first are dropped)
            socks, waits = _keep_alive_clients(svc.host, svc.http_port, 1, 2.0)
            if waits:
                held += socks
            else:
                for s in socks:
                    s.close()
            if len(held) == 1 + ADMIN_RESERVE:
                break
        got: Counter[str] = Counter()
        until = time.monotonic() + 3.0

        def client() -> None:
            while time.monotonic() < until:
                with socket.create_connection((svc.host, svc.http_port), timeout=2.0) as s:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    try:
                        got[s.recv(12).decode() or "closed"] += 1
                    except ConnectionResetError:
                        got["reset"] += 1

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # (the first few a round trip lets through before the acceptor says it is out)
        assert got["HTTP/1.1 503"] > 100 and got["closed"] + got["reset"] <= 3, got
    finally:
        for s in held:
            s.close()


@pytest.mark.parametrize("acceptors", [0, 2])
def test_an_http_lease_runs_from_the_answer_not_from_the_dispatch(launch: Any, acceptors: int) -> None:
    """Review 126: a pipelined HTTP admission dispatched while its answer waited behind an earlier one
    still queued on its connection had its lease run out there: its client got `dispatched` with a
    dead ticket (released: 404), its budget already given to another request (40-55 % of a soak's
    pipelined releases). The lease runs from the answer's write now."""
    svc = launch(config_text(budget=3, service={"lease": 1.5}, bands=[
        {"priority": 10}, {"priority": 0, "ceiling": 0.5}]), shards=1, acceptors=acceptors)

    async def main() -> None:
        holder = await Client.connect(svc.host, svc.binary_port)
        held = [await holder.admit("holder", priority=10) for _ in range(2)]  # 2 of 3: the low band's ceiling
        conn = await HttpConn.open(svc.http_port)
        t0 = time.monotonic()
        conn.send("POST", "/v1/admit", {"flow": "low", "priority": 0, "ttl": 1.0})  # waits out its TTL
        conn.send("POST", "/v1/admit", {"flow": "high", "priority": 10})  # dispatched at once; answered after it
        first = await conn.response(timeout=10)
        second = await conn.response(timeout=10)
        assert first.json()["reason"] == "ttl" and second.json()["outcome"] == "dispatched", (first, second)
        await asyncio.sleep(max(0.0, t0 + 2.1 - time.monotonic()))  # past dispatch + lease, within write + lease
        conn.send("POST", "/v1/release", {"ticket": second.json()["ticket"]})
        released = await conn.response()
        assert released.status == 200, released  # (was 404: its lease had ended before its answer came)
        for result in held:
            await holder.release(result.ticket)
        await holder.close()
        conn.close()

    run(main())


@pytest.mark.parametrize("acceptors", [0, 2])
def test_an_answer_that_waits_out_its_lease_unwritten_is_taken_back(launch: Any, acceptors: int) -> None:
    """Review 132: renewed while unwritten, a dispatched answer stuck behind a queued admission on its
    connection held the budget that admission waited for: a deadlock, for as long as the connection
    stayed open. When its lease ends unwritten it is taken back now: that request is answered
    `evicted: cancelled` (its client never had the ticket), the dispatch unclaimed, and the one
    before it gets the budget."""
    svc = launch(config_text(budget=1, service={"lease": 1.0}, bands=[{"priority": 10}, {"priority": 0}]),
                 shards=1, acceptors=acceptors)

    async def main() -> None:
        holder = await HttpConn.open(svc.http_port)
        holder.send("POST", "/v1/admit", {"flow": "holder", "priority": 10})
        ticket = (await holder.response()).json()["ticket"]
        conn = await HttpConn.open(svc.http_port)
        conn.send("POST", "/v1/admit", {"flow": "low", "priority": 0})  # no TTL: waits for the budget
        conn.send("POST", "/v1/admit", {"flow": "high", "priority": 10})  # takes it; answered after the first
        await asyncio.sleep(0.2)
        holder.send("POST", "/v1/release", {"ticket": ticket})
        assert (await holder.response()).status == 200
        first = await conn.response(timeout=10)
        second = await conn.response(timeout=10)
        assert first.json()["outcome"] == "dispatched", first
        assert second.status == 503 and second.json()["reason"] == "cancelled", second
        conn.send("POST", "/v1/release", {"ticket": first.json()["ticket"]})
        assert (await conn.response()).status == 200
        stats = (await holder_stats(svc.http_port))["totals"]
        assert stats["inflight"] == 0, stats
        holder.close()
        conn.close()

    async def holder_stats(port: int) -> Any:
        return (await ahttp(port, "GET", "/v1/stats")).json()

    run(main())


def test_an_acceptor_at_its_cap_under_churn_keeps_its_cap(launch: Any) -> None:
    """Review 130: a probe past an acceptor's cap that found a descriptor some close had freed doubled
    the cap, and the distributor handed it twice what it could hold: under connect-and-close churn
    the cap swung 200 -> 400 -> 200 and ~220 connections a second were lost. Only a report of more
    sockets at once than the cap raises it now. (Under load this count cannot tell the defect from a
    busy machine: review 170 saw it pass with the defect back in 6 of 7 runs, and a CI run beside other
    services closed 240 without it. The rule is tested deterministically in tests/test_acceptor_conns.py;
    this is the end-to-end check that the cap holds under churn.)"""
    svc = launch(shards=1, acceptors=1)
    (acceptor,) = svc.acceptor_procs()
    _, hard = resource.prlimit(acceptor.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(acceptor.pid, resource.RLIMIT_NOFILE, (_fds(acceptor.pid) + 200, hard))
    answered, closed, waited = _connections_ended_unanswered(svc.host, svc.http_port, 3.0, clients=300)
    # (the first round trip's burst past its room, then about one probe a second)
    assert answered > 1000 and closed <= 300, (answered, closed, waited)


def test_an_answer_not_behind_another_is_not_taken_back_when_its_acceptor_stalls(launch: Any) -> None:
    """Review 133: an acceptor stalled past the lease (under its 5 s heartbeat) got a lone request's
    answer and the distributor's take-back together, and cancelled it though it never waited behind
    another. Only an answer behind one still to come is taken back: this one is written, its lease
    running from then."""
    svc = launch(config_text(budget=1, service={"lease": 1.0}), shards=1, acceptors=1)

    async def main() -> None:
        await admit_http(svc.http_port, "holder")  # written: its lease runs out in ~1 s, never released
        conn = await HttpConn.open(svc.http_port)
        conn.send("POST", "/v1/admit", {"flow": "x", "ttl": 20.0})  # alone on its connection: waits for it
        await asyncio.sleep(0.2)
        (acceptor,) = svc.acceptor_procs()
        os.kill(acceptor.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(2.6)  # the holder expires, x is dispatched, its lease passes unwritten
        finally:
            os.kill(acceptor.pid, signal.SIGCONT)
        answer = await conn.response(timeout=10)
        assert answer.status == 200 and answer.json()["outcome"] == "dispatched", answer
        conn.send("POST", "/v1/release", {"ticket": answer.json()["ticket"]})
        assert (await conn.response()).status == 200
        conn.close()

    run(main())
