"""The distributor's own Python cost per request, with no system call, no other process and no clock
drift: a real Distributor, its real binary front (`BinaryConnection`) and N real `ShardWorker`s wired
in one process by in-memory transports, driven closed-loop (each answer admits the next request).

Why: on a shared 2-core machine `flowshard bench` moves ±30 % between runs, and the distributor's
CPU there mixes its Python work with the kernel's (writes, wake-ups, context switches). This
measures the first alone, to a few percent, so a change to the hot path can be judged directly;
`flowshard bench` and `bench.hops` remain the judges of the whole service.

Bytes still cross every hop encoded, as in the service: the client's frames are decoded by the
binary front, the shard's frames by its worker and the worker's by the distributor's `WorkerLink`.
`--link`: the clients are behind an acceptor process (`serve --acceptors`): the distributor's side
is its `AcceptorLink`, fed the batch frames an acceptor writes (`LinkAdmit`, `LinkRelease`).
`--http`: each client is a keep-alive HTTP/1.1 connection to the real HTTP front (`POST /v1/admit`,
then `POST /v1/release` of its ticket, then the next admission). `--http-link`: the same HTTP
clients behind an acceptor, as the distributor sees them on the link: leased admissions, the
acceptor's `LinkDelivered` reports, releases that ask for an answer (`LinkReleased`), the next
admission after it.
Time spent inside the workers (a shard's own process in the service) is measured apart and left out
of the distributor's figure; the client's encoding and decoding (the load generator's) too. All of it
is CPU time (`time.thread_time`), so other processes on a busy machine do not inflate it.

`--spread --budget N --fairness drr` gives the upstream matrix scenarios' shape: a closed-loop
client per flow, flows spread over the bands, a budget far below the clients (a deep queue, grants
planned across bands), e.g. `--clients 5000 --flows 5000 --bands 8 --spread --budget 100 --fairness
drr` for matrix L100 P8 F5000 W5000.

    python -m bench.inproc [--shards 1,4,8] [--requests 200000] [--clients 64] [--flows 16]
                           [--bands 1] [--spread] [--budget N] [--fairness round-robin] [--jsq-slack BYTES]
                           [--link | --http | --http-link] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import pstats
import random
import sys
import time
from collections.abc import Coroutine
from typing import Any

import uvloop

from distributor.acceptors import AcceptorLink
from distributor.binary import BinaryConnection, BinaryHub, BinaryLimits
from distributor.guards import Guards
from distributor.http import HttpConnection, HttpHub, HttpLimits
from distributor.service import Distributor, WorkerLink
from flowshard.codec import (
    Admit,
    BatchReader,
    BatchWriter,
    FrameReader,
    FrameWriter,
    LinkAdmit,
    LinkDelivered,
    LinkRelease,
    LinkReleased,
    Release,
    Result,
    ToAcceptor,
    ToClient,
)
from flowshard.config import BandConfig, BudgetConfig, Config, ServiceConfig
from flowshard.engine import Engine
from flowshard.shm import ShmStats
from workers.worker import ShardWorker

__all__ = ["main", "measure"]


class _Clock:
    """Seconds spent in the code it wraps (the workers', the client's), to leave out."""

    def __init__(self) -> None:
        self.spent = 0.0


class _Tally:
    """The closed loop's count, shared by its clients: admissions left to send, dispatches seen; done
    once every admission was dispatched."""

    def __init__(self, loop: asyncio.AbstractEventLoop, total: int) -> None:
        self.total = self.left = total
        self.dispatched = 0
        self.done = loop.create_future()

    def admit_one(self) -> bool:
        """True: send one more admission. False: none is left (and the loop is done once all were
        dispatched)."""
        if self.left <= 0:
            if self.dispatched >= self.total and not self.done.done():
                self.done.set_result(None)
            return False
        self.left -= 1
        return True

    def result(self, shards: int, elapsed: float, outside: _Clock) -> dict[str, float]:
        n = self.dispatched
        return {"shards": shards, "requests": n, "distributor_us": 1e6 * (elapsed - outside.spent) / n,
                "outside_us": 1e6 * outside.spent / n}


class MemoryTransport:
    """What the protocols call on a transport besides `write`: nothing to do in memory (never full,
    never closing). Shared by the in-process benchmarks and tests."""

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class _ToWorker(MemoryTransport):
    """The distributor's end of a shard's socket pair: what is written arrives at the worker in the next
    loop pass (one read, as over a socket pair)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, worker: ShardWorker, clock: _Clock) -> None:
        self.loop, self.worker, self.clock = loop, worker, clock

    def write(self, data: bytes) -> None:
        self.loop.call_soon(self._arrive, data)

    def _arrive(self, data: bytes) -> None:
        t = time.thread_time()
        self.worker.data_received(data)
        self.clock.spent += time.thread_time() - t


class _ToDistributor(MemoryTransport):
    """The worker's end: its frames arrive at the distributor's WorkerLink in the next pass."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.link: WorkerLink | None = None

    def write(self, data: bytes) -> None:
        if self.link is not None:
            self.loop.call_soon(self.link.data_received, data)


class _Client(MemoryTransport):
    """Closed-loop clients on one binary connection: each Result releases its ticket and admits the next
    request (in the next pass, as a client would). Its own work is timed apart."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, clients: int, flows: int, tally: _Tally, clock: _Clock, link: bool,
        leased: bool = False, bands: int = 1,
    ) -> None:
        self.loop, self.tally, self.clock, self.link = loop, tally, clock, link
        self.leased = leased  # HTTP clients behind the acceptor (--http-link)
        self.release_key = 0
        # behind an acceptor: its link's batch frames; else the public protocol's frames
        self.reader: BatchReader | FrameReader = BatchReader(ToAcceptor) if link else FrameReader(ToClient)
        self.writer: BatchWriter | FrameWriter = BatchWriter() if link else FrameWriter()
        self.conn: BinaryConnection | AcceptorLink | None = None
        self.flows = [f"client-{i}" for i in range(flows)]
        self.flow_of: dict[int, int] = {}  # --spread: request id -> its flow's index
        self.bands = bands  # --spread: flow i asks for band i % bands (priority bands - i % bands); else priority 0
        self.rng = random.Random(6)
        self.clients = clients
        self.next_id = 0
        self._scheduled = False

    # the connection's transport
    def write(self, data: bytes) -> None:
        t = time.thread_time()
        messages = self.reader.feed(data)
        if self.leased:
            self._leased(messages)
        else:
            for msg in messages:
                if type(msg) is Result:
                    if msg.ticket:
                        self.tally.dispatched += 1
                        self.writer.add(LinkRelease(msg.ticket, -1, 0) if self.link else Release(msg.ticket, -1))
                    self._admit_one(msg.id)
        self._schedule()
        self.clock.spent += time.thread_time() - t

    def _leased(self, messages: list[Any]) -> None:
        """As an HTTP acceptor: each answer written (reported in one `LinkDelivered` per pass), its
        client's release a pass later asking for an answer, the next admission after that answer."""
        tickets = [msg.ticket for msg in messages if type(msg) is Result and msg.ticket]
        if tickets:
            self.writer.add(LinkDelivered(tickets))
        for msg in messages:
            kind = type(msg)
            if kind is Result:
                if msg.ticket:
                    self.tally.dispatched += 1
                    self.release_key += 1
                    self.writer.add(LinkRelease(msg.ticket, -1, self.release_key))
                else:
                    self._admit_one()
            elif kind is LinkReleased:
                self._admit_one()

    def _admit_one(self, after: int = 0) -> None:
        """The next request: with --spread, of the flow of the request `after` ended (a closed-loop client
        per flow, as the matrix scenarios have it), else of the next flow in turn."""
        if not self.tally.admit_one():
            return
        self.next_id += 1
        index = self.next_id % len(self.flows)
        if self.bands:
            index = self.flow_of.pop(after, index)
            self.flow_of[self.next_id] = index
        flow = self.flows[index]
        priority = self.bands - index % self.bands if self.bands else 0
        size = self.rng.randint(500, 4000)
        if self.link:  # binary clients: not leased (the connection is the lease); HTTP clients: leased
            self.writer.add(LinkAdmit(self.next_id, flow, priority, size, 0.0, 0.0, 0, 0.0, self.leased))
        else:
            self.writer.add(Admit(self.next_id, flow, priority, size, 0.0, 0.0, 0, 0.0, False))

    def start(self, conn: BinaryConnection | AcceptorLink) -> None:
        self.conn = conn
        for _ in range(self.clients):
            self._admit_one()
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and self.writer:
            self._scheduled = True
            self.loop.call_soon(self._send)

    def _send(self) -> None:
        self._scheduled = False
        assert self.conn is not None
        self.conn.data_received(self.writer.take())


class _HttpClient(MemoryTransport):
    """One closed-loop client on its own keep-alive HTTP connection (the connection's transport):
    admit, release the ticket, admit again. Its own parsing is timed apart."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, flow: str, rng: random.Random, tally: _Tally, clock: _Clock,
    ) -> None:
        self.loop, self.flow, self.rng, self.tally, self.clock = loop, flow, rng, tally, clock
        self.conn: HttpConnection | None = None
        self._in = bytearray()
        self._next = b""

    def start(self, conn: HttpConnection) -> None:
        self.conn = conn
        self._admit()

    def _admit(self) -> None:
        if not self.tally.admit_one():
            return
        body = b'{"flow":"%b","priority":0,"bytes":%d}' % (self.flow.encode(), self.rng.randint(500, 4000))
        self._send(b"POST /v1/admit HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                   b"content-length: %d\r\n\r\n%b" % (len(body), body))

    def _send(self, request: bytes) -> None:
        self._next = request
        self.loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        assert self.conn is not None
        self.conn.data_received(self._next)

    # the connection's transport
    def write(self, data: bytes) -> None:
        t = time.thread_time()
        buf = self._in
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = bytes(buf[:end]).lower()
            at = head.find(b"content-length: ")
            length = int(head[at + 16 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(buf) < end + 4 + length:
                break
            body = bytes(buf[end + 4 : end + 4 + length])
            del buf[: end + 4 + length]
            answer = json.loads(body)
            if "ticket" in answer:  # dispatched: release it
                self.tally.dispatched += 1
                released = b'{"ticket":%d}' % answer["ticket"]
                self._send(b"POST /v1/release HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                           b"content-length: %d\r\n\r\n%b" % (len(released), released))
            else:
                self._admit()
        self.clock.spent += time.thread_time() - t


def _config(bands: int, flows: int, budget: int | None = None, fairness: str = "round-robin",
            jsq_slack: int | None = None) -> Config:
    service = ServiceConfig(fast_path=False)
    if jsq_slack is not None:
        service = ServiceConfig(fast_path=False, jsq_slack_bytes=jsq_slack)
    return Config(
        bands=[BandConfig(priority=bands - i, fairness=fairness) for i in range(bands)],
        budget=BudgetConfig(max_inflight_requests=budget),
        service=service,
        flow_slots=max(64, 2 * flows),
        default_ttl=60.0,
    )


async def _run(
    shards: int, requests: int, clients: int, flows: int, bands: int, link: bool, http: bool, leased: bool = False,
    budget: int | None = None, fairness: str = "round-robin", spread: bool = False, jsq_slack: int | None = None,
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    config = _config(bands, flows, budget, fairness, jsq_slack)
    d = Distributor(config, shards)
    d.shm = ShmStats(bytearray(d.layout.nbytes), d.layout, init=True)
    d._loop = loop
    d._accepting = True
    outside = _Clock()
    for n, s in enumerate(d.shards):
        back = _ToDistributor(loop)
        worker = ShardWorker(n, Engine(config, enforce_limits=False), d.shm, loop.create_future())
        worker.connection_made(back)  # type: ignore[arg-type]
        worker_link = WorkerLink(d, n, b"")  # (not `link`: that is the clients' mode, the parameter)
        worker_link.transport = _ToWorker(loop, worker, outside)  # type: ignore[assignment]
        back.link = worker_link
        s.link = worker_link
        s.ready = True
    if http:
        return await _run_http(d, loop, requests, clients, flows, outside)
    tally = _Tally(loop, requests)
    client = _Client(loop, clients, flows, tally, outside, link or leased, leased, bands if spread else 0)
    conn: BinaryConnection | AcceptorLink
    if link or leased:
        conn = AcceptorLink(d, 0, b"")
        conn.transport = client  # type: ignore[assignment]
    else:
        conn = BinaryHub(d, BinaryLimits(), loop, Guards())()
        conn.connection_made(client)  # type: ignore[arg-type]
    await asyncio.sleep(0)  # the workers' Hellos
    gc.collect()
    t0 = time.thread_time()
    client.start(conn)
    await tally.done
    return tally.result(shards, time.thread_time() - t0, outside)


async def _run_http(
    d: Distributor, loop: asyncio.AbstractEventLoop, requests: int, clients: int, flows: int, outside: _Clock,
) -> dict[str, float]:
    tally = _Tally(loop, requests)
    hub = HttpHub(d, HttpLimits(), 300.0, loop, Guards())
    rng = random.Random(6)
    pairs = []
    for i in range(clients):
        client = _HttpClient(loop, f"client-{i % flows}", rng, tally, outside)
        conn = hub()
        conn.connection_made(client)  # type: ignore[arg-type]
        pairs.append((client, conn))
    await asyncio.sleep(0)  # the workers' Hellos
    gc.collect()
    t0 = time.thread_time()
    for client, conn in pairs:
        client.start(conn)
    await tally.done
    elapsed = time.thread_time() - t0
    for _, conn in pairs:  # their timers
        conn.connection_lost(None)
    return tally.result(d.n_shards, elapsed, outside)


def measure(shards: int, requests: int = 200_000, clients: int = 64, flows: int = 16, bands: int = 1,
            link: bool = False, profile: bool = False, http: bool = False, leased: bool = False,
            budget: int | None = None, fairness: str = "round-robin", spread: bool = False,
            jsq_slack: int | None = None) -> dict[str, float]:
    """Run the closed loop once; the distributor's µs per dispatched request (and the rest's)."""
    return run_once(_run(shards, requests, clients, flows, bands, link, http, leased, budget, fairness, spread,
                         jsq_slack), profile)


def run_once(run: Coroutine[Any, Any, dict[str, float]], profile: bool) -> dict[str, float]:
    """Run one closed loop on a fresh uvloop loop; with `profile`, under cProfile, its 30 costliest
    functions printed. (`bench.acceptor` runs its loops this way too.)"""
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run)
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inproc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default="1,4,8")
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--flows", type=int, default=16)
    parser.add_argument("--bands", type=int, default=1)
    parser.add_argument("--spread", action="store_true",
                        help="flow i asks for band i %% BANDS (default: every request priority 0: the default band)")
    parser.add_argument("--budget", type=int, default=None,
                        help="max_inflight_requests (default: unlimited, so nothing waits for budget)")
    parser.add_argument("--fairness", default="round-robin", choices=("round-robin", "drr", "vtc", "global-fcfs"))
    parser.add_argument("--jsq-slack", type=int, default=None, metavar="BYTES",
                        help="service.jsq_slack_bytes (default: the service's; 1073741824 packs every flow "
                             "onto shard 0, 0 spreads them)")
    parser.add_argument("--runs", type=int, default=3, help="best of RUNS per shard count")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--link", action="store_true", help="the clients behind an acceptor (its link)")
    mode.add_argument("--http", action="store_true", help="HTTP/1.1 clients on the HTTP front")
    mode.add_argument("--http-link", action="store_true", help="HTTP clients behind an acceptor (its link)")
    parser.add_argument("--profile", action="store_true", help="cProfile one run per shard count")
    args = parser.parse_args(argv)
    try:
        counts = [int(s) for s in args.shards.split(",")]
    except ValueError:
        parser.error(f"--shards: {args.shards!r} is not a comma-separated list of integers")
    for name, value, low, high in (("--shards", min(counts), 1, 256), ("--shards", max(counts), 1, 256),
                                   ("--requests", args.requests, 1, 10**9), ("--clients", args.clients, 1, 10**6),
                                   ("--flows", args.flows, 1, 10**6), ("--bands", args.bands, 1, 64),
                                   ("--runs", args.runs, 1, 1000), ("--budget", args.budget or 1, 1, 10**9)):
        if not low <= value <= high:
            parser.error(f"{name}: {value} is outside {low}..{high}")
    for shards in counts:
        if args.profile:
            measure(shards, args.requests, args.clients, args.flows, args.bands, args.link, True, args.http,
                    args.http_link, args.budget, args.fairness, args.spread, args.jsq_slack)
            continue
        runs = [measure(shards, args.requests, args.clients, args.flows, args.bands, args.link, http=args.http,
                        leased=args.http_link, budget=args.budget, fairness=args.fairness, spread=args.spread,
                        jsq_slack=args.jsq_slack)
                for _ in range(args.runs)]
        best = min(runs, key=lambda r: r["distributor_us"])
        print(f"shards={shards}: distributor {best['distributor_us']:.2f} µs/request "
              f"(runs {', '.join(format(r['distributor_us'], '.2f') for r in runs)}); "
              f"workers and client {best['outside_us']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
