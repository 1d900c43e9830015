"""Lean client transports for the load generator: binary frames and HTTP/1.1, callback style.

Why not `flowshard.client.Client`: it creates a Future per admission, which the generator does not
need; here every reply calls `sink.on_result(rid, outcome, ticket, wait)` directly, so the generator
spends as little CPU per request as it can and leaves the cores to the service it measures.

- `BinaryConn`: pipelined Admit/Release frames on one TCP connection, one write per loop pass.
- `HttpPool`: HTTP/1.1 keep-alive connections with at most one admission outstanding each (a
  pipelined admission would wait behind a queued one: head-of-line blocking would distort the
  waits being measured). Releases go over one extra connection, pipelined (they never block).
  When every connection is busy, admissions wait in a FIFO for a free one, each opening another up to
  `max_conns`; the generator counts those that found the pool at its `max_conns` (`pool_waits`: they
  wait for an answer) apart from those that waited for a connection to open (`connect_waits`, and
  the longest such wait: 2,000 opened at once took ~0.6 s), and every wait shows in the latency
  measured from the intended send time. A connection the service refuses (past its
  `max_connections`: a 503 and a close) carries nothing: an admission it was given goes back to the
  head of the FIFO, and the pool keeps to the connections it has (`refused`).

Reads and batched writes bump `sink.timer.work`, so that the precise timer does not count the loop
passes that ran them as spin (see bench.timer).
"""

from __future__ import annotations

import asyncio
import collections
import math
from typing import Protocol, cast

import httptools
import msgspec

from bench.timer import PreciseTimer
from flowshard.codec import (
    Admit,
    Audited,
    Error,
    FrameError,
    FrameReader,
    FrameWriter,
    Release,
    Released,
    Result,
    ToClient,
)
from flowshard.types import Outcome

__all__ = ["OUTCOME_BY_LABEL", "BinaryConn", "HttpPool", "Sink", "connect_binary"]

OUTCOME_BY_LABEL = {(o.status, o.reason): int(o) for o in Outcome}
OUTCOME_BY_LABEL[("dispatched", "")] = int(Outcome.DISPATCHED)


# the service's audit: seq, shard, received, enqueued, dispatched (its commit time, `decided`, when the
# service sends it: a strict order within a shard's pass, where the pass's start time ties)
View = tuple[int, int, float, float, float]


class Sink(Protocol):
    """Where a transport delivers replies (the generator)."""

    timer: PreciseTimer

    def on_result(self, rid: int, outcome: int, ticket: int, wait: float, view: View | None = None) -> None: ...

    def on_error(self, rid: int, status: int, message: str) -> None: ...

    def on_lost(self, message: str) -> None: ...

    def on_sent(self, rid: int) -> None: ...


# ---------------------------------------------------------------------------------------- binary


class BinaryConn(asyncio.Protocol):
    """One binary-protocol connection; `admit` and `release` are batched into one write per loop pass."""

    def __init__(self, sink: Sink, loop: asyncio.AbstractEventLoop, audit: bool = True) -> None:
        self._sink = sink
        self._audit = audit
        self._timer = sink.timer
        self._loop = loop
        self._reader = FrameReader(ToClient)
        self._out = FrameWriter()
        self._flush_scheduled = False
        self._transport: asyncio.Transport | None = None
        self.closed = loop.create_future()
        self.released = 0
        self.release_failed = 0
        self._closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def admit(self, rid: int, flow: str, priority: int, size: int, ttl: float, slo: float, tokens: int,
              weight: float) -> None:
        self._out.add(Admit(rid, flow, priority, size, ttl, slo, tokens, weight, self._audit))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def release(self, ticket: int) -> None:
        self._out.add(Release(ticket))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        t = self._transport
        if self._out and t is not None and not t.is_closing():
            self._timer.work += 1
            t.write(self._out.take())

    def data_received(self, data: bytes) -> None:
        self._timer.work += 1
        sink = self._sink
        try:
            messages = self._reader.feed(data)
        except FrameError as exc:  # not flowshard's protocol (the run's check at the start says so first)
            messages = exc.messages
            sink.on_lost(f"binary connection: not flowshard's binary protocol: {exc}")
            self._closing = True  # ended here, said once (not again as "closed by the service")
            if self._transport is not None:
                self._transport.abort()
        for msg in messages:
            kind = type(msg)
            if kind is Audited:
                sink.on_result(msg.id, msg.outcome, msg.ticket, msg.wait,
                               (msg.seq, msg.shard, msg.received, msg.enqueued, msg.decided or msg.dispatched))
            elif kind is Result:
                sink.on_result(msg.id, msg.outcome, msg.ticket, msg.wait)
            elif kind is Released:
                if msg.ok:
                    self.released += 1
                else:
                    self.release_failed += 1
            elif kind is Error:
                if msg.id >= 0:
                    sink.on_error(msg.id, msg.status, msg.message)
                else:
                    sink.on_lost(f"binary connection refused: {msg.status} {msg.message}")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closing:
            self._sink.on_lost(f"binary connection lost: {exc or 'closed by the service'}")
        if not self.closed.done():
            self.closed.set_result(None)

    async def close(self) -> None:
        self._closing = True
        self._flush()
        if self._transport is not None:
            self._transport.close()
        await self.closed


async def connect_binary(sink: Sink, host: str, port: int, audit: bool = True) -> BinaryConn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: BinaryConn(sink, loop, audit), host, port)
    return proto


# ---------------------------------------------------------------------------------------- HTTP


class _AdmitBody(msgspec.Struct, omit_defaults=True):
    flow: str
    priority: int
    bytes: int
    ttl: float
    slo: float
    tokens: int
    weight: float
    audit: bool = False  # true: the answer carries the service's view (left out when false)


class _AuditReply(msgspec.Struct):
    seq: int
    shard: int
    received: float
    enqueued: float
    dispatched: float
    decided: float = 0.0  # (older services: absent)


class _ErrorDetail(msgspec.Struct):
    status: int = 0
    message: str = ""


class _Reply(msgspec.Struct):
    outcome: str = ""
    reason: str = ""
    ticket: int = 0
    wait_ms: float = 0.0
    released: bool = False
    error: _ErrorDetail | None = None
    audit: _AuditReply | None = None


_encode = msgspec.json.Encoder().encode
_decode_reply = msgspec.json.Decoder(_Reply).decode
_RELEASE = -1  # marks a release reply in a connection's queue of expected replies
_TOO_MANY = b"too many connections"  # the service's 503 past its max_connections (distributor/http.py)


class _HttpConn(asyncio.Protocol):
    """One keep-alive connection. Replies come back in request order: `_expect` holds their rids."""

    def __init__(self, pool: HttpPool, head: bytes) -> None:
        self._pool = pool
        self._timer = pool.sink.timer
        self._head = head
        self._parser = httptools.HttpResponseParser(self)
        self._body = bytearray()
        self._expect: collections.deque[int] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self.sent_body = b""
        self.opened = pool.loop.time()
        self.closed: asyncio.Future[None] = pool.loop.create_future()

    @property
    def busy(self) -> bool:
        return bool(self._expect)

    @property
    def alive(self) -> bool:
        """Open (a connection the service closed can wait a loop pass for its `connection_lost`)."""
        return self._transport is not None and not self._transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def send(self, rid: int, body: bytes, *, batch: bool = False) -> None:
        self._expect.append(rid)
        self.sent_body = body  # (an admission connection carries one at a time: sent again if refused)
        data = b"%bcontent-length: %d\r\n\r\n%b" % (self._head, len(body), body)
        if not batch:
            if self._transport is not None:
                self._transport.write(data)
            return
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._pool.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self._transport is not None and not self._transport.is_closing():
            self._timer.work += 1
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def data_received(self, data: bytes) -> None:
        self._timer.work += 1
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._pool.sink.on_lost(f"malformed HTTP reply: {exc}")
            if self._transport is not None:
                self._transport.close()

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        body = bytes(self._body)
        self._body.clear()
        rid = self._expect.popleft() if self._expect else _RELEASE
        self._pool.reply(self, rid, status, body)

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool.lost(self, exc)
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class HttpPool:
    """Keep-alive connections to the HTTP front: `admit` on a free one, `release` on a dedicated one."""

    def __init__(self, sink: Sink, loop: asyncio.AbstractEventLoop, host: str, port: int, max_conns: int,
                 audit: bool = True, first_within: float = math.inf) -> None:
        self.sink = sink
        self.loop = loop
        self._audit = audit
        self._host = host
        self._port = port
        self._max = self.max_conns = max(1, max_conns)
        # a connection that has carried nothing is given nothing this long after it opened: the service
        # closes one whose first request has not come within its `header_timeout` (a burst's
        # connections opened before the run and unused for 10 s were closed under it)
        self._first_within = first_within
        self._admit_head = b"POST /v1/admit HTTP/1.1\r\nhost: %b\r\ncontent-type: application/json\r\n" % host.encode()
        self._release_head = (
            b"POST /v1/release HTTP/1.1\r\nhost: %b\r\ncontent-type: application/json\r\n" % host.encode()
        )
        self._free: list[_HttpConn] = []
        self._all: list[_HttpConn] = []
        self._waiting: collections.deque[tuple[int, bytes]] = collections.deque()
        self._opening = 0
        self._releaser: _HttpConn | None = None
        self._closing = False
        self._refused: set[_HttpConn] = set()
        self._growing = True  # more connections may be opened (until the service refuses one)
        self._accepted_most = 0  # then: the most admission connections it had accepted at once
        self.pool_waits = 0
        self.connect_waits = 0
        self.connect_wait_most = 0.0  # seconds: the longest an admission waited for a connection to open
        self._asked: dict[int, float] = {}  # admissions waiting for a connection to open: since when
        self.refused = 0
        self.most_conns = 0
        self.released = 0
        self.release_failed = 0

    async def open(self, n: int) -> None:
        """Open the release connection and `n` admission connections up front (opening costs a round trip)."""
        self._releaser = await self._connect(self._release_head)
        conns = await asyncio.gather(*(self._connect(self._admit_head) for _ in range(min(n, self._max))))
        self._free.extend(conns)

    async def _connect(self, head: bytes) -> _HttpConn:
        _, conn = await self.loop.create_connection(lambda: _HttpConn(self, head), self._host, self._port)
        self._all.append(conn)
        self.most_conns = max(self.most_conns, len(self._all) - 1)
        return conn

    def admit(self, rid: int, flow: str, priority: int, size: int, ttl: float, slo: float, tokens: int,
              weight: float) -> None:
        body = _encode(_AdmitBody(flow, priority, size, ttl, slo, tokens, weight, self._audit))
        conn = self._usable()
        if conn is not None:
            conn.send(rid, body)
            return
        self._waiting.append((rid, body))
        if self._growing and len(self._all) - 1 + self._opening < self._max:
            self._opening += 1
            self.connect_waits += 1
            self._asked[rid] = self.loop.time()
            self.loop.create_task(self._grow())
        else:  # (the pool is at `max_conns`: it waits for an answer to free one, not for a connect)
            self.pool_waits += 1

    async def _grow(self) -> None:
        try:
            conn = await self._connect(self._admit_head)
        except OSError as exc:
            self.sink.on_lost(f"cannot open another HTTP connection: {exc}")
            return
        finally:
            self._opening -= 1
        if conn not in self._refused:  # (its 503 may have come before this resumed)
            self._idle(conn)

    def _idle(self, conn: _HttpConn) -> None:
        if not self._growing:
            self._accepted_most = max(self._accepted_most, len(self._all) - 1 - len(self._refused))
        if self._waiting and not self._closing:
            rid, body = self._waiting.popleft()
            asked = self._asked.pop(rid, None)
            if asked is not None:
                self.connect_wait_most = max(self.connect_wait_most, self.loop.time() - asked)
            conn.send(rid, body)
            self.sink.on_sent(rid)  # (it waited here: it leaves now, not when it was asked for)
        else:
            self._free.append(conn)

    @property
    def most_allowed(self) -> int:
        """The admission connections it may use: `max_conns`, or once the service refused one, those open."""
        return self.max_conns if self._growing else self._accepted_most

    def _usable(self) -> _HttpConn | None:
        """A free connection to send on: not one that has carried nothing since it opened longer ago than
        the service waits for a first request (closed here, before the service closes it under a request)."""
        free = self._free
        while free:
            conn = free.pop()
            if not conn.alive:
                continue
            if conn.sent_body or self.loop.time() < conn.opened + self._first_within:
                return conn
            conn.close()
        return None

    def _refuse(self, conn: _HttpConn) -> None:
        """The service refused `conn` (past its `max_connections`: a 503 and a close, before or instead of
        an answer): it carries nothing more, and the pool keeps to the connections it has."""
        if conn in self._refused:
            return
        self._refused.add(conn)
        self.refused += 1
        if conn in self._free:
            self._free.remove(conn)
        self._growing = False  # (set from how many are open as it came, the cap fell to 1 while the
        # connections opened before the run were still coming: review 170's --target, 1 request sent)

    def unsent(self) -> set[int]:
        """The admissions still waiting for a free connection: none of their bytes has left."""
        return {rid for rid, _ in self._waiting}

    def release(self, ticket: int) -> None:
        if self._releaser is not None:
            self._releaser.send(_RELEASE, b'{"ticket":%d}' % ticket, batch=True)

    def reply(self, conn: _HttpConn, rid: int, status: int, body: bytes) -> None:
        if conn is not self._releaser and (rid == _RELEASE or (status == 503 and _TOO_MANY in body)):
            self._refuse(conn)  # (a 503 at accept arrives before any request: no rid waits for it)
            if rid != _RELEASE:  # never admitted: sent again, first, on another connection
                self._waiting.appendleft((rid, conn.sent_body))
                if (free := self._usable()) is not None:
                    self._idle(free)
            return
        if rid == _RELEASE:
            if status == 200:
                self.released += 1
            else:
                self.release_failed += 1
            return
        self._idle(conn)
        try:
            r = _decode_reply(body)
        except msgspec.DecodeError:
            self.sink.on_error(rid, status, f"undecodable reply body: {body[:100]!r}")
            return
        if r.error is not None or not r.outcome:
            message = r.error.message if r.error is not None else body[:100].decode("latin-1")
            self.sink.on_error(rid, status, message)
            return
        outcome = OUTCOME_BY_LABEL.get((r.outcome, r.reason))
        if outcome is None:
            self.sink.on_error(rid, status, f"unknown outcome {r.outcome}:{r.reason}")
            return
        a = r.audit
        self.sink.on_result(rid, outcome, r.ticket, r.wait_ms / 1000.0,
                            None if a is None else (a.seq, a.shard, a.received, a.enqueued, a.decided or a.dispatched))

    def lost(self, conn: _HttpConn, exc: Exception | None) -> None:
        if conn in self._free:
            self._free.remove(conn)
        if conn in self._all:
            self._all.remove(conn)
        if conn in self._refused:  # (counted as refused; what it was given is waiting again)
            self._refused.discard(conn)
            return
        if not self._closing and (conn.busy or conn is self._releaser):  # (a server may close an idle
            # keep-alive connection at any time, RFC 9112 9.8: the pool opens another when it needs one)
            self.sink.on_lost(f"HTTP connection lost: {exc or 'closed by the service'}")

    async def close_admissions(self) -> None:
        """Close the admission connections, so that the service cancels what is still queued on them
        rather than dispatching it to nobody; the release connection stays open."""
        self._closing = True
        await self._close([c for c in self._all if c is not self._releaser])

    async def close(self) -> None:
        self._closing = True
        await self._close(list(self._all))

    @staticmethod
    async def _close(conns: list[_HttpConn]) -> None:
        for conn in conns:
            conn.close()
        await asyncio.gather(*(c.closed for c in conns))


