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
    IDLE_CLOSE,
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


REOPEN_TIMEOUT = 10.0  # seconds a connection opened again after an idle close may take


class BinaryConn:
    """One binary-protocol connection; `admit` and `release` are batched into one write per loop pass.

    The service closes a connection that holds nothing and sent nothing for its idle_timeout (its
    header_timeout before a first frame), saying it read nothing it did not answer (`IDLE_CLOSE`): a
    new one is then opened when there is something to send, and the admissions and releases without
    an answer are sent on it again, as `flowshard.client` does (a scenario quiet on one connection
    for that long, or starting late, would otherwise lose it)."""

    def __init__(self, sink: Sink, loop: asyncio.AbstractEventLoop, audit: bool = True,
                 address: tuple[str, int] = ("", 0)) -> None:
        self._sink = sink
        self._audit = audit
        self._timer = sink.timer
        self._loop = loop
        self._address = address
        self._reader = FrameReader(ToClient)
        self._out = FrameWriter()
        self._flush_scheduled = False
        self._transport: asyncio.Transport | None = None
        self._link: _Link | None = None  # the connection's; one closed idle is ignored
        self._reopening = False
        # sent again after an idle close, in the order they were made (`_calls`: their places)
        self._calls = 0
        self._unanswered: dict[int, tuple[int, Admit]] = {}
        self._releasing: collections.deque[tuple[int, int]] = collections.deque()  # (answered in order)
        self.closed = loop.create_future()
        self.released = 0
        self.release_failed = 0
        self.reopened = 0  # connections opened again after an idle close
        self._closing = False

    def admit(self, rid: int, flow: str, priority: int, size: int, ttl: float, slo: float, tokens: int,
              weight: float) -> None:
        msg = Admit(rid, flow, priority, size, ttl, slo, tokens, weight, self._audit)
        self._calls += 1
        self._unanswered[rid] = (self._calls, msg)
        self._send(msg)

    def release(self, ticket: int) -> None:
        self._calls += 1
        self._releasing.append((self._calls, ticket))
        self._send(Release(ticket))

    def _send(self, msg: Admit | Release) -> None:
        if self._transport is None:  # closed idle: sent on the next connection (`_reopen`)
            self._reopen_soon()
            return
        self._out.add(msg)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        t = self._transport
        if self._out and t is not None and not t.is_closing():
            self._timer.work += 1
            t.write(self._out.take())

    def _data_received(self, data: bytes) -> None:
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
        unanswered = self._unanswered
        for msg in messages:
            kind = type(msg)
            if kind is Audited:
                unanswered.pop(msg.id, None)
                sink.on_result(msg.id, msg.outcome, msg.ticket, msg.wait,
                               (msg.seq, msg.shard, msg.received, msg.enqueued, msg.decided or msg.dispatched))
            elif kind is Result:
                unanswered.pop(msg.id, None)
                sink.on_result(msg.id, msg.outcome, msg.ticket, msg.wait)
            elif kind is Released:
                if self._releasing:
                    self._releasing.popleft()
                if msg.ok:
                    self.released += 1
                else:
                    self.release_failed += 1
            elif kind is Error:
                if msg.id >= 0:
                    unanswered.pop(msg.id, None)
                    sink.on_error(msg.id, msg.status, msg.message)
                elif msg.id == IDLE_CLOSE:
                    self._idle_closed()
                    return
                else:
                    sink.on_lost(f"binary connection refused: {msg.status} {msg.message}")

    def _idle_closed(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._transport = self._link = None
        self._reader = FrameReader(ToClient)
        self._out.take()  # (each of its frames is among those without an answer)
        if self._unanswered or self._releasing:
            self._reopen_soon()

    def _reopen_soon(self) -> None:
        if not self._reopening and not self._closing:
            self._reopening = True
            self._loop.create_task(self._reopen())

    async def _reopen(self) -> None:
        link = self._link = _Link(self)  # current from the start: its first bytes count (uvloop)
        try:
            transport, _ = await asyncio.wait_for(self._loop.create_connection(lambda: link, *self._address),
                                                  REOPEN_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            self._reopening = False
            self._link = None
            self._sink.on_lost(f"binary connection closed idle, and not opened again: {exc or 'timed out'}")
            self._closing = True
            if not self.closed.done():
                self.closed.set_result(None)
            return
        self._reopening = False
        self.reopened += 1
        self._transport = transport
        if self._closing or self._link is not link:
            transport.close()
            return
        calls: list[tuple[int, Admit | Release]] = [(n, msg) for n, msg in self._unanswered.values()]
        calls += [(n, Release(ticket)) for n, ticket in self._releasing]
        for _, msg in sorted(calls, key=lambda call: call[0]):
            self._out.add(msg)
        self._flush()

    def _connection_lost(self, exc: Exception | None) -> None:
        if not self._closing:
            self._sink.on_lost(f"binary connection lost: {exc or 'closed by the service'}")
        if not self.closed.done():
            self.closed.set_result(None)

    async def close(self) -> None:
        self._closing = True
        self._flush()
        if self._transport is not None:
            self._transport.close()
        elif not self._reopening and not self.closed.done():  # closed idle: nothing to wait for
            self.closed.set_result(None)
        await self.closed


class _Link(asyncio.Protocol):
    """One connection of a `BinaryConn` (it may open another after an idle close)."""

    def __init__(self, conn: BinaryConn) -> None:
        self._conn = conn

    def data_received(self, data: bytes) -> None:
        if self._conn._link is self:
            self._conn._data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn._link is self:
            self._conn._connection_lost(exc)


async def connect_binary(sink: Sink, host: str, port: int, audit: bool = True) -> BinaryConn:
    loop = asyncio.get_running_loop()
    conn = BinaryConn(sink, loop, audit, (host, port))
    link = conn._link = _Link(conn)
    conn._transport, _ = await loop.create_connection(lambda: link, host, port)
    return conn


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
_WARM = -2  # marks the reply to a connection's first request, a GET /healthz (`HttpPool.open`)
_TOO_MANY = b"too many connections"  # the service's 503 past its max_connections (distributor/http.py)
REFUSED_BACKOFF = 1.0  # after the service refused a connection, seconds before the pool opens another


class _HttpConn(asyncio.Protocol):
    """One keep-alive connection. Replies come back in request order: `_expect` holds their rids."""

    def __init__(self, pool: HttpPool, head: bytes, releaser: bool = False) -> None:
        self._pool = pool
        self._timer = pool.sink.timer
        self._head = head
        self.releaser = releaser  # the pool's release connection (its role, known before any reply)
        self.tickets: collections.deque[int] = collections.deque()  # a releaser's releases without an answer
        self.answered = False  # it carried an answer that was not a refusal
        self._parser = httptools.HttpResponseParser(self)
        self._body = bytearray()
        self._expect: collections.deque[int] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self.sent_body = b""
        self.used = pool.loop.time()  # when it last sent a request
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
        self.used = self._pool.loop.time()
        data = b"%bcontent-length: %d\r\n\r\n%b" % (self._head, len(body), body)
        if not batch:
            if self.alive:
                self._transport.write(data)  # type: ignore[union-attr]
            return
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._pool.loop.call_soon(self._flush)

    def warm(self, host: bytes) -> None:
        """A first request that asks nothing of the service (GET /healthz), so that it keeps the connection
        for its idle timeout (75 s by default) rather than closing it at its header timeout (10 s) as one
        that sent nothing; its answer also shows the connection was not refused."""
        if not self.alive:  # (refused and closed already: its 503 says so)
            return
        self._expect.append(_WARM)
        self.used = self._pool.loop.time()
        self._transport.write(b"GET /healthz HTTP/1.1\r\nhost: %b\r\n\r\n" % host)  # type: ignore[union-attr]

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
                 audit: bool = True, idle_within: float = math.inf) -> None:
        self.sink = sink
        self.loop = loop
        self._audit = audit
        self._host = host
        self._port = port
        self._max = self.max_conns = max(1, max_conns)
        # a connection idle this long is given nothing more: the service closes one idle for its
        # `idle_timeout` (and one that never sent a request at its `header_timeout`: each sends one
        # as it opens, `_HttpConn.warm`), and an admission sent on it as it closes is lost
        self._idle_within = idle_within
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
        # Once the service refused a connection (past its max_connections), the pool opens no more than
        # the service had accepted then, or has been seen to answer on at once since (`_max`), none for
        # REFUSED_BACKOFF after a refusal; it still replaces those lost (a review: stopped growing for
        # good, it shrank to nothing as the service closed idle ones, every admission left unsent).
        self._refused_ever = False
        self._grow_after = -math.inf
        self._regrow: asyncio.TimerHandle | None = None
        self._rel_backlog: collections.deque[int] = collections.deque()  # releases waiting for a releaser
        self._rel_opening = False
        self._rel_resent: set[int] = set()  # tickets sent again after their connection was lost
        self._shut = False  # closed whole (`close`): releases too
        self.pool_waits = 0
        self.connect_waits = 0
        self.connect_wait_most = 0.0  # seconds: the longest an admission waited for a connection to open
        self._asked: dict[int, float] = {}  # admissions waiting for a connection to open: since when
        self.refused = 0
        self.most_conns = 0
        self.released = 0
        self.release_failed = 0

    async def open(self, n: int, timeout: float = 10.0) -> None:
        """Open the release connection, then `n` admission connections (opening costs a round trip),
        each with a first request (`_HttpConn.warm`) whose answer puts it in the pool: a connection
        that had sent nothing was closed at the service's header timeout, the release connection's
        with every release after it lost and the service's budget held for the lease (a review).
        The release connection first: every generator process has one before the admission
        connections take what the service accepts."""
        releaser = self._releaser = await self._connect(self._release_head, releaser=True)
        releaser.warm(self._host.encode())
        conns = await asyncio.gather(*(self._connect(self._admit_head) for _ in range(min(n, self._max))))
        for conn in conns:
            conn.warm(self._host.encode())
        deadline = self.loop.time() + timeout
        while any(c.busy for c in (releaser, *conns) if c.alive) and self.loop.time() < deadline:
            await asyncio.sleep(0.005)

    async def _connect(self, head: bytes, releaser: bool = False) -> _HttpConn:
        _, conn = await self.loop.create_connection(lambda: _HttpConn(self, head, releaser), self._host, self._port)
        self._all.append(conn)
        self.most_conns = max(self.most_conns, self._admission_conns())
        return conn

    def admit(self, rid: int, flow: str, priority: int, size: int, ttl: float, slo: float, tokens: int,
              weight: float) -> None:
        body = _encode(_AdmitBody(flow, priority, size, ttl, slo, tokens, weight, self._audit))
        conn = self._usable()
        if conn is not None:
            conn.send(rid, body)
            return
        self._waiting.append((rid, body))
        if self._may_grow():
            self._opening += 1
            self.connect_waits += 1
            self._asked[rid] = self.loop.time()
            self.loop.create_task(self._grow())
        else:  # (the pool is at its max: it waits for an answer to free one, not for a connect)
            self.pool_waits += 1

    def _admission_conns(self) -> int:
        return len(self._all) - (self._releaser is not None and self._releaser in self._all)

    def _may_grow(self) -> bool:
        return self._admission_conns() + self._opening < self._max and self.loop.time() >= self._grow_after

    def _grow_for_waiting(self) -> None:
        """After a refusal's back-off: connections for the admissions still waiting, within the max."""
        self._regrow = None
        left = self._grow_after - self.loop.time()
        if left > 0 and not self._closing:  # (a later refusal moved the back-off on)
            self._regrow = self.loop.call_later(left, self._grow_for_waiting)
            return
        while self._open_for_waiting():
            pass

    def _open_for_waiting(self) -> bool:
        """Open a connection for an admission waiting that none being opened is for, within the max;
        whether it did."""
        if len(self._waiting) > self._opening and not self._closing and self._may_grow():
            self._opening += 1
            self.loop.create_task(self._grow())
            return True
        return False

    async def _grow(self) -> None:
        try:
            conn = await self._connect(self._admit_head)
        except OSError as exc:
            self.sink.on_lost(f"cannot open another HTTP connection: {exc}")
            return
        finally:
            self._opening -= 1
        if conn not in self._refused and conn.alive:  # (its 503 may have come before this resumed)
            self._idle(conn)
        else:  # (replaced: the one it was for waits)
            self._open_for_waiting()

    def _idle(self, conn: _HttpConn) -> None:
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
        """The admission connections it may use: `max_conns`, or once the service refused one, those it
        had accepted then, or the most it has seen carry answers at once since, if more."""
        return self._max

    def _usable(self) -> _HttpConn | None:
        """A free connection to send on: not one idle for nearly as long as the service keeps an idle
        connection (closed here, before the service closes it under a request)."""
        free = self._free
        while free:
            conn = free.pop()
            if not conn.alive:
                continue
            if self.loop.time() < conn.used + self._idle_within:
                return conn
            conn.close()
        return None

    def _refuse(self, conn: _HttpConn) -> None:
        """The service refused `conn` (past its `max_connections`: a 503 and a close, before or instead of
        an answer): it carries nothing more, and the pool keeps to the connections it has."""
        if conn in self._refused:
            return
        self._refused.add(conn)
        if conn in self._free:
            self._free.remove(conn)
        self._count_refusal()
        self._max = max(1, min(self._max, self._accepted()))
        if self._regrow is None and not self._closing:
            self._regrow = self.loop.call_later(REFUSED_BACKOFF, self._grow_for_waiting)

    def _count_refusal(self) -> None:
        """A connection refused (an admission connection or the release connection): no other opened
        for REFUSED_BACKOFF, and from now the pool keeps to the service's room (`_max`)."""
        self.refused += 1
        self._refused_ever = True
        self._grow_after = self.loop.time() + REFUSED_BACKOFF

    def _working(self) -> int:
        """Admission connections open that have carried an answer (the service's own, not a refusal)."""
        return sum(1 for c in self._all if c.answered and not c.releaser and c not in self._refused)

    def _accepted(self) -> int:
        """Admission connections open and not refused (an admin-reserve one may still be, at its first
        request: then the cap falls again)."""
        return sum(1 for c in self._all if c.alive and not c.releaser and c not in self._refused)

    def unsent(self) -> set[int]:
        """The admissions still waiting for a free connection: none of their bytes has left."""
        return {rid for rid, _ in self._waiting}

    def release(self, ticket: int) -> None:
        releaser = self._releaser
        if releaser is not None and releaser.alive and not self._rel_backlog:
            releaser.tickets.append(ticket)
            releaser.send(_RELEASE, b'{"ticket":%d}' % ticket, batch=True)
            return
        self._rel_backlog.append(ticket)  # (none open, or it was lost: sent once another is)
        self._start_releaser()

    async def _open_releaser(self) -> None:
        """A release connection, then the releases that waited for it (after a refusal's back-off)."""
        try:
            delay = self._grow_after - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                conn = await self._connect(self._release_head, releaser=True)
            except OSError as exc:
                self.sink.on_lost(f"cannot open the HTTP release connection: {exc}")
                if not self._shut:  # (tried again after the back-off: its releases free the budget)
                    self._grow_after = self.loop.time() + REFUSED_BACKOFF
                    self.loop.call_later(REFUSED_BACKOFF, self._start_releaser)
                return
        finally:
            self._rel_opening = False
        self._releaser = conn
        backlog, self._rel_backlog = self._rel_backlog, collections.deque()
        for ticket in backlog:
            self.release(ticket)

    def _start_releaser(self) -> None:
        """A release connection for the releases waiting, unless one is being opened."""
        if self._rel_backlog and not self._rel_opening and not self._shut:
            self._rel_opening = True
            self.loop.create_task(self._open_releaser())

    def _release_lost(self, conn: _HttpConn) -> None:
        """The release connection is gone (closed, or refused): its releases without an answer are sent
        again on another (one the service had applied is answered 404 then: counted released)."""
        if self._releaser is conn:
            self._releaser = None
        if conn.tickets and not self._shut:
            self._rel_resent.update(conn.tickets)
            self._rel_backlog.extendleft(reversed(conn.tickets))
            conn.tickets.clear()
            self._start_releaser()

    def releases_unanswered(self) -> int:
        """Releases sent or waiting to be, without an answer yet."""
        return len(self._rel_backlog) + sum(len(c.tickets) for c in self._all if c.releaser)

    def reply(self, conn: _HttpConn, rid: int, status: int, body: bytes) -> None:
        refusal = status == 503 and _TOO_MANY in body
        if rid == _WARM and not refusal:  # (the first request's answer: in the pool now)
            if not conn.releaser:
                conn.answered = True
                self._idle(conn)
            return
        if rid == _WARM:
            rid = _RELEASE  # (refused: as a 503 at accept)
        if conn.releaser:
            if refusal:  # (past its max_connections: what it carried is sent again once another opens,
                # in the place of an admission connection: releases free the budget admissions wait for)
                self._count_refusal()
                self._max = max(1, min(self._max, self._accepted()) - 1)
                if self._accepted() > self._max and (spare := self._usable()) is not None:
                    spare.close()
                conn.close()
                self._release_lost(conn)
                return
            ticket = conn.tickets.popleft() if conn.tickets else -1
            if status == 200 or (status == 404 and ticket in self._rel_resent):
                self.released += 1
            else:
                self.release_failed += 1
            self._rel_resent.discard(ticket)
            return
        if rid == _RELEASE or refusal:
            self._refuse(conn)  # (a 503 at accept arrives before any request: no rid waits for it)
            if rid != _RELEASE:  # never admitted: sent again, first, on another connection
                self._waiting.appendleft((rid, conn.sent_body))
                if (free := self._usable()) is not None:
                    self._idle(free)
            return
        if not conn.answered:
            conn.answered = True
            if self._refused_ever:  # (the service's room, as seen: the pool keeps to it)
                self._max = min(self.max_conns, max(self._max, self._working()))
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
        if conn.releaser:
            self._release_lost(conn)  # (an idle one closed by the service: reopened at the next release)
            return
        if not self._closing and conn.busy:  # (a server may close an idle keep-alive connection at any
            # time, RFC 9112 9.8: the pool opens another when it needs one)
            self.sink.on_lost(f"HTTP connection lost: {exc or 'closed by the service'}")
        self._open_for_waiting()  # (replaced, for one waiting)

    async def close_admissions(self) -> None:
        """Close the admission connections, so that the service cancels what is still queued on them
        rather than dispatching it to nobody; the release connection stays open."""
        self._closing = True
        await self._close([c for c in self._all if not c.releaser])

    async def close(self) -> None:
        self._closing = self._shut = True
        if self._regrow is not None:
            self._regrow.cancel()
        await self._close(list(self._all))

    @staticmethod
    async def _close(conns: list[_HttpConn]) -> None:
        for conn in conns:
            conn.close()
        await asyncio.gather(*(c.closed for c in conns))


