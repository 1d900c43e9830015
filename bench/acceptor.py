"""An acceptor's own Python cost per HTTP request, with no system call and no other process: its real
`Upstream` (the link to the distributor) and real HTTP front (`HttpConnection`) in one process, driven
closed-loop by in-memory HTTP clients shaped as `flowshard bench --http`'s load generator, against
an in-memory distributor that answers at once.

Why: in `flowshard bench --http --acceptors K` the acceptors bound the projection, and their CPU
there mixes their Python with the kernel's (a read and a write per client message, wake-ups). This
measures the first alone, repeatably, so a change to the acceptor's hot path can be judged directly.

The clients: `--clients` keep-alive connections, each `POST /v1/admit` then the next admission as
soon as the answer came; the tickets are released as the load generator releases them, pipelined
on `--releasers` connections of their own (`POST /v1/release`, all of a pass's in one send). The
distributor: each batch the acceptor writes on its link is decoded and answered in the next pass,
in one batch (`Result` dispatched for each `LinkAdmit`, `LinkReleased` for each `LinkRelease`).
Bytes cross encoded both ways. The clients' and the distributor's work is timed apart and left out.

    python -m bench.acceptor [--requests 200000] [--clients 64] [--releasers 2] [--runs 3] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time

from bench.inproc import MemoryTransport, run_once
from distributor.front import Upstream
from distributor.guards import Guards
from distributor.http import HttpConnection, HttpHub, HttpLimits
from flowshard.codec import (
    BatchReader,
    BatchWriter,
    FromAcceptor,
    LinkAdmit,
    LinkDelivered,
    LinkRelease,
    LinkReleased,
    Result,
)
from flowshard.types import Outcome


class _Clock:
    """CPU time spent outside the acceptor (clients, distributor)."""

    spent = 0.0


class _Distributor(MemoryTransport):
    """The link's far end: answers every admission (dispatched) and release (ok) in the next pass."""

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: _Clock) -> None:
        self.loop, self.clock = loop, clock
        self.reader = BatchReader(FromAcceptor)
        self.upstream: Upstream | None = None
        self.ticket = 0
        self.delivered = 0
        self.released = 0

    def write(self, data: bytes) -> None:
        t = time.thread_time()
        out = BatchWriter()
        for msg in self.reader.feed(data):
            kind = type(msg)
            if kind is LinkAdmit:
                self.ticket += 1
                out.add(Result(msg.key, int(Outcome.DISPATCHED), self.ticket, 0.0001))
            elif kind is LinkRelease:
                self.released += 1
                if msg.key:
                    out.add(LinkReleased(msg.key, True))
            elif kind is LinkDelivered:
                self.delivered += len(msg.tickets)
        if out:
            self.loop.call_soon(self._answer, out.take())
        self.clock.spent += time.thread_time() - t

    def _answer(self, data: bytes) -> None:
        assert self.upstream is not None
        self.upstream.data_received(data)


def _responses(buf: bytearray) -> list[bytes]:
    """The complete responses' bodies in `buf` (removed from it)."""
    out: list[bytes] = []
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return out
        at = buf.find(b"content-length: ", 0, end)
        length = int(buf[at + 16 : buf.find(b"\r\n", at)]) if at >= 0 else 0
        if len(buf) < end + 4 + length:
            return out
        out.append(bytes(buf[end + 4 : end + 4 + length]))
        del buf[: end + 4 + length]


class _Load:
    """The clients: counts, the release connections, the end."""

    def __init__(self, loop: asyncio.AbstractEventLoop, requests: int, clock: _Clock) -> None:
        self.loop, self.left, self.clock = loop, requests, clock
        self.sent = 0
        self.answered = 0
        self.done: asyncio.Future[None] = loop.create_future()
        self.releasers: list[_Releaser] = []

    def admit_one(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        self.sent += 1
        return True

    def answered_one(self) -> None:
        self.answered += 1
        if self.answered >= self.sent and self.left <= 0 and not self.done.done():
            self.done.set_result(None)


class _Client(MemoryTransport):
    """One admission connection: admit, and again as soon as the answer came (in the next pass)."""

    def __init__(self, load: _Load, flow: str, releaser: _Releaser) -> None:
        self.load, self.releaser = load, releaser
        self.conn: HttpConnection | None = None
        self.body = b'{"flow":"%b","priority":0,"bytes":2000,"ttl":0.0,"slo":0.0,"tokens":0,"weight":0.0,' \
                    b'"audit":false}' % flow.encode()
        self.request = (b"POST /v1/admit HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n%b" % (len(self.body), self.body))
        self._in = bytearray()

    def admit(self) -> None:
        if self.load.admit_one():
            self.load.loop.call_soon(self._send)

    def _send(self) -> None:
        assert self.conn is not None
        self.conn.data_received(self.request)

    def write(self, data: bytes) -> None:
        t = time.thread_time()
        self._in += data
        for body in _responses(self._in):
            at = body.find(b'"ticket":')
            ticket = int(body[at + 9 : body.find(b",", at)])
            self.releaser.release(ticket)
            self.load.answered_one()
            self.admit()
        self.load.clock.spent += time.thread_time() - t


class _Releaser(MemoryTransport):
    """A release connection: a pass's releases in one send, pipelined."""

    def __init__(self, load: _Load) -> None:
        self.load = load
        self.conn: HttpConnection | None = None
        self._out: list[bytes] = []
        self._in = bytearray()

    def release(self, ticket: int) -> None:
        body = b'{"ticket":%d}' % ticket
        if not self._out:
            self.load.loop.call_soon(self._send)
        self._out.append(b"POST /v1/release HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%b" % (len(body), body))

    def _send(self) -> None:
        assert self.conn is not None
        data, self._out = b"".join(self._out), []
        self.conn.data_received(data)

    def write(self, data: bytes) -> None:
        t = time.thread_time()
        self._in += data
        _responses(self._in)
        self.load.clock.spent += time.thread_time() - t


async def _run(requests: int, clients: int, releasers: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    clock = _Clock()
    upstream = Upstream(0, loop)
    upstream._accepting = upstream._ready = True
    far = _Distributor(loop, clock)
    far.upstream = upstream
    upstream.connection_made(far)  # type: ignore[arg-type]
    hub = HttpHub(upstream, HttpLimits(), 30.0, loop, Guards())
    upstream.http = hub
    load = _Load(loop, requests, clock)
    conns: list[HttpConnection] = []
    rel = []
    for _ in range(max(1, releasers)):
        r = _Releaser(load)
        r.conn = hub()
        r.conn.connection_made(r)  # type: ignore[arg-type]
        conns.append(r.conn)
        rel.append(r)
    cl = []
    for i in range(clients):
        c = _Client(load, f"client-{i % 16}", rel[i % len(rel)])
        c.conn = hub()
        c.conn.connection_made(c)  # type: ignore[arg-type]
        conns.append(c.conn)
        cl.append(c)
    gc.collect()
    t0 = time.thread_time()
    for c in cl:
        c.admit()
    await load.done
    await asyncio.sleep(0)  # the last releases
    await asyncio.sleep(0)
    elapsed = time.thread_time() - t0
    for conn in conns:
        conn.connection_lost(None)
    n = load.answered
    return {"requests": n, "releases": far.released, "acceptor_us": (elapsed - clock.spent) / n * 1e6,
            "outside_us": clock.spent / n * 1e6}


def measure(requests: int = 200_000, clients: int = 64, releasers: int = 2, profile: bool = False) -> dict[str, float]:
    return run_once(_run(requests, clients, releasers), profile)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.acceptor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--releasers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="best of RUNS")
    parser.add_argument("--profile", action="store_true", help="cProfile one run")
    args = parser.parse_args(argv)
    for name in ("requests", "clients", "releasers", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: {getattr(args, name)} is below 1")
    if args.profile:
        measure(args.requests, args.clients, args.releasers, profile=True)
        return 0
    runs = [measure(args.requests, args.clients, args.releasers) for _ in range(args.runs)]
    best = min(r["acceptor_us"] for r in runs)
    each = ", ".join(f"{r['acceptor_us']:.2f}" for r in runs)
    print(f"acceptor {best:.2f} µs/request (runs {each}); clients and distributor {runs[0]['outside_us']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
