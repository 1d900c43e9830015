"""An acceptor process: the HTTP and binary fronts, run next to the distributor instead of inside it.

Why: the distributor is one Python process, the bottleneck at every shard count, and parsing,
validating and answering HTTP clients was a quarter to a half of its CPU per HTTP request (for binary clients the
link costs it about what the front did: docs/benchmarks.md, "Acceptor processes"). `flowshard serve
--acceptors K` starts K of these processes. The distributor still accepts every connection (it
owns the listening sockets, so drain and port 0 work as before) and hands it at once to the least
loaded acceptor over a SOCK_SEQPACKET socket (SCM_RIGHTS), with its verdict (served, admin
reserve, refused: the distributor counts the connections against the limits, service-wide); the
acceptor runs the same `distributor.binary` and `distributor.http` fronts on it, which apply that
verdict, reports each connection's end, and speaks for all its clients on one socket pair to the
distributor, which keeps the one exact ledger (limits, budget, grants, tickets).
So the ledger stays exact and in one place while the per-connection work spreads over cores.

`Upstream` is the fronts' `Admission` here: each call becomes a frame to the distributor
(`flowshard.codec` Link* frames, written once per event-loop pass); answers come back as frames and
are handed to the front's waiter. Leases stay the distributor's: a binary connection's tickets are
released when it closes (this process sends the releases); HTTP tickets outlive their connection
and even this process (released by the client on any connection, or by the lease). If this process
dies, the distributor cancels what its clients were waiting for and releases their binary tickets,
then starts a new one; if the distributor goes away, this process exits.

In proxy mode each acceptor also runs the OpenAI routes for its connections with its own
`distributor.proxy.Proxy` (backend pool, upstream connections, relay), admitting through `Upstream`
(not leased: the proxy releases each ticket when its exchange ends; the distributor releases them
if this process dies). It answers `LinkProxyAsk` with its counters, sends the detector's events
(`LinkBackends`), applies the distributor's scrape health (`LinkBackendHealth`) and ends what it
relays on `LinkStop`, as the one-process proxy does at the end of a drain.

    python -m distributor.front --index K --acceptors N --fd FD --handover-fd FD --delivered-fd FD   (by serve)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import uvloop

from distributor.api import (
    CONN_NORMAL,
    CONN_REFUSED,
    CONN_RESERVE,
    COUNTED,
    HANDED_BINARY,
    HANDED_HTTP,
    Audit,
    Waiter,
)
from distributor.deliverylog import DeliveryLog
from distributor.guards import Guards
from distributor.sockets import let_answers_leave
from flowshard.codec import (
    Audited,
    BatchReader,
    BatchWriter,
    Error,
    Hello,
    LinkAdmit,
    LinkAnswer,
    LinkBackendHealth,
    LinkBackendsFull,
    LinkCancel,
    LinkConns,
    LinkDelivered,
    LinkGuard,
    LinkPeersDown,
    LinkProxyAsk,
    LinkProxyReport,
    LinkQuery,
    LinkRelease,
    LinkReleased,
    LinkRevoke,
    LinkState,
    LinkStop,
    LinkUnclaimed,
    Result,
    Shutdown,
    ToAcceptor,
    log_drop,
)
from flowshard.config import Config
from flowshard.types import OUTCOMES
from workers.worker import attach_to_distributor

if TYPE_CHECKING:
    from distributor.binary import BinaryHub
    from distributor.http import HttpHub
    from distributor.proxy import Proxy

log = logging.getLogger(__name__)
FLUSH_GRACE = 0.5  # after Shutdown: how long the last answers get to leave before the process exits


class LinkGuards(Guards):
    """Protective actions are counted by the distributor (one /metrics): each hit is also sent there."""

    def __init__(self, upstream: Upstream) -> None:
        super().__init__()
        self._upstream = upstream

    def hit(self, front: str, action: str) -> None:
        super().hit(front, action)
        self._upstream.send(LinkGuard(front, action))


class Upstream(asyncio.Protocol):
    """The acceptor's end of its socket pair to the distributor, and the fronts' `Admission`."""

    def __init__(
        self, index: int, loop: asyncio.AbstractEventLoop, sole: bool = False, delivery: DeliveryLog | None = None,
    ) -> None:
        self.index = index
        self._sole = sole  # the only acceptor: every release passes through this process
        self._loop = loop
        self._reader = BatchReader(ToAcceptor)
        self._writer = BatchWriter(on_drop=self._dropped)
        self._transport: asyncio.Transport | None = None
        self._flush_scheduled = False
        self._next_key = 1
        self._admissions: dict[int, tuple[Waiter, Any, bool]] = {}  # key -> (waiter, cid, leased)
        # key -> (ticket, answer, what to do if the distributor failed on it: `release_then`)
        self._releases: dict[int, tuple[int, Callable[[int, bool], None], Callable[[str], None] | None]] = {}
        self._queries: dict[int, Callable[[bytes, str], None]] = {}
        self._owned: dict[Any, set[int]] = {}  # binary waiter -> its tickets (the connection is the lease)
        self._owner: dict[int, Any] = {}  # and back
        self._unwritten: dict[int, Any] = {}  # leased tickets delivered to a waiter, not yet written: its waiter
        self._delivered: list[int] = []  # leased tickets whose answers were written this pass
        self._delivery = delivery
        self._accepting = False
        self.reading = True  # (`Admission.reading`) False from `Shutdown`: only the last answers leave then
        self._ready = False
        self.http: HttpHub | None = None  # its HTTP connections hold their writes while a batch is read
        self.binary: BinaryHub | None = None  # (both: their reading stopped at `Shutdown`, `stop_reading`)
        self.finishing: asyncio.Task[None] | None = None  # after `Shutdown`: the last answers leaving
        self.proxy: Proxy | None = None  # proxy mode: this process's own (distributor.proxy)
        self.proxy_closing: asyncio.Task[None] | None = None  # its close(), once the distributor said LinkStop
        self.finished: asyncio.Future[None] = loop.create_future()

    # ------------------------------------------------------------ link

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        http = self.http
        if http is None:
            self._received(data)
            return
        # The answers of this read are written once per connection, after it: a connection's
        # pipelined requests answered together (its releases, say) leave in one write, not one each
        http.defer()
        try:
            self._received(data)
        finally:
            http.flush_deferred()

    def _received(self, data: bytes) -> None:
        for msg in self._reader.feed(data):
            kind = type(msg)
            if kind is Result or kind is Audited:
                self._answered(msg)
            elif kind is Error:  # the distributor failed on this admission or release (a bug): the front says 500
                if msg.id in self._releases:
                    self._fail_release(msg.id, msg.message)
                else:
                    self._fail_admission(msg.id, msg.message)
            elif kind is LinkReleased:  # `_answer_release` inlined: one per HTTP release (measured)
                waiting = self._releases.pop(msg.key, None)
                if waiting is not None:
                    waiting[1](waiting[0], msg.ok)
            elif kind is LinkAnswer:
                answer = self._queries.pop(msg.key, None)
                if answer is not None:
                    answer(msg.body, msg.ctype)
            elif kind is LinkState:
                self._accepting, self._ready = msg.accepting, msg.ready
            elif kind is LinkProxyAsk:
                if self.proxy is not None:
                    self.send(LinkProxyReport(msg.key, self.proxy.encoded_report()))
            elif kind is LinkBackendHealth:
                if self.proxy is not None:
                    self.proxy.scrape_health(msg.backend, msg.down_for, msg.detail)
            elif kind is LinkBackendsFull:
                if self.proxy is not None:
                    self.proxy.told_rooms(list(msg.room), list(msg.counted))
            elif kind is LinkPeersDown:
                if self.proxy is not None:
                    self.proxy.peers_health(list(msg.down_for))
            elif kind is LinkRevoke:
                waiter = self._unwritten.pop(msg.ticket, None)
                if waiter is not None:
                    waiter.revoke(msg.ticket)
            elif kind is LinkStop:
                if self.proxy is not None and self.proxy_closing is None:
                    self.proxy_closing = self._loop.create_task(self.proxy.close(why=msg.why))
            elif kind is Shutdown:  # every outcome is delivered: what clients send from now on is not handled
                # (forwarded, it was answered after the distributor's counts were final, or not at all:
                # the exit line counted rejections no client got, a review)
                self.reading = False
                hubs = [hub for hub in (self.http, self.binary) if hub is not None]
                for hub in hubs:  # (read and dropped from here: a FIN at the exit)
                    hub.stop_reading()
                self.finishing = self._loop.create_task(self._finish_when_answers_left(hubs))

    def connection_lost(self, exc: Exception | None) -> None:
        """The distributor is gone: nobody can decide anything any more; end the process."""
        self._transport = None
        self._finish()

    async def _finish_when_answers_left(self, hubs: list[HttpHub | BinaryHub]) -> None:
        """`FLUSH_GRACE` for the last answers to leave, and longer while clients are still taking them."""
        await let_answers_leave(lambda: [t for hub in hubs for t in hub.transports()], FLUSH_GRACE)
        self._finish()

    def _finish(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)

    def _dropped(self, message: Any, problem: Exception) -> None:
        """A message the link could not encode (a value validation let through): logged, and whoever
        waits for its answer is answered here, as if the distributor had failed on it, instead of
        never (the client's request, and its connection's place, held for good). A release with a
        tokens correction goes again without it (next pass): the ticket is released uncorrected
        rather than held, a proxied one (no key, no answer awaited) for the life of this process."""
        log_drop(message, problem)
        kind = type(message)
        if kind is LinkAdmit:
            self._fail_admission(message.key, f"internal error: the request could not be forwarded ({problem})")
        elif kind is LinkRelease:
            if message.tokens != -1:
                self.send(LinkRelease(message.ticket, -1, message.key))
            elif message.key:
                self._answer_release(message.key, False)

    def _fail_admission(self, key: int, message: str) -> None:
        entry = self._admissions.pop(key, None)
        if entry is not None:  # every waiter answers its client (a proxied `Exchange` too: review 18)
            waiter, cid, _ = entry
            waiter.fail(cid, message)

    def _answer_release(self, key: int, ok: bool) -> None:
        waiting = self._releases.pop(key, None)
        if waiting is not None:
            ticket, done, _ = waiting
            done(ticket, ok)

    def _fail_release(self, key: int, message: str) -> None:
        """The distributor raised on this release: the front answers as when the call raises in one
        process (HTTP 500; the binary connection fails), or, asked without `failed`, not released."""
        ticket, done, failed = self._releases.pop(key)
        if failed is not None:
            failed(message)
        else:
            done(ticket, False)

    def send(self, message: Any) -> None:
        self._writer.add(message)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._delivered:
            self._writer.add(LinkDelivered(self._delivered))
            self._delivered = []
        if self._writer and self._transport is not None and not self._transport.is_closing():
            self._transport.write(self._writer.take())

    def _answered(self, msg: Result | Audited) -> None:
        entry = self._admissions.pop(msg.id, None)
        if entry is None:  # cancelled: its client went away; a dispatch that raced with it is released
            if msg.ticket:
                self.send(LinkUnclaimed(msg.ticket))
            return
        waiter, cid, leased = entry
        audit = None
        if type(msg) is Audited:
            audit = Audit(msg.seq, msg.shard, msg.received, msg.enqueued, msg.dispatched, msg.decided)
        if msg.ticket and not leased:
            owned = self._owned.get(waiter)
            if owned is None:
                owned = self._owned[waiter] = set()
            owned.add(msg.ticket)
            self._owner[msg.ticket] = waiter
        elif msg.ticket:
            self._unwritten[msg.ticket] = waiter  # (LinkRevoke)
        waiter.deliver(cid, msg.id, OUTCOMES[msg.outcome], msg.ticket, msg.wait, msg.retry_after, audit)

    # ------------------------------------------------------------ Admission

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def ready(self) -> bool:
        return self._accepting and self._ready

    def admit(
        self, waiter: Waiter, cid: Any, flow: str, priority: int, size: int, ttl: float, slo: float,
        tokens: int, weight: float, leased: bool, audit: bool = False, *, proxied: bool = False,
    ) -> int:
        key = self._next_key
        self._next_key = key + 1
        self._admissions[key] = (waiter, cid, leased)
        # `send` inlined here, in release_then and in delivered: once or twice per request (measured)
        self._writer.add(LinkAdmit(key, flow, priority, size, ttl, slo, tokens, weight, leased, audit, proxied))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return key

    def cancel(self, request_id: int) -> None:
        if self._admissions.pop(request_id, None) is not None:
            self.send(LinkCancel(request_id))

    def unclaim(self, ticket: int) -> None:
        self._disown(ticket)
        self.send(LinkUnclaimed(ticket))

    def release(self, ticket: int, tokens: int = -1) -> bool:
        """Sent, not answered: True means only that the release is on its way (use release_then)."""
        self._disown(ticket)
        self.send(LinkRelease(ticket, tokens))
        return True

    def release_then(
        self, ticket: int, tokens: int, done: Callable[[int, bool], None],
        failed: Callable[[str], None] | None = None,
    ) -> None:
        if self._sole and not self._releases and ticket in self._owner:
            # A binary ticket of one of our connections: the distributor holds it until it is released
            # through us or that connection closes (no lease), so the answer is known: no round trip.
            # Only when we are the only acceptor: else another one may have released it (its client
            # holds the ticket too), and only the distributor knows. And only when no release waits
            # for its answer: a binary client matches the answers with its releases by their order.
            self._disown(ticket)
            self.send(LinkRelease(ticket, tokens))
            done(ticket, True)
            return
        # Asked: whatever the answer, the ticket is released (now, or before) and no connection of
        # ours holds it any more (kept, its connection's close released it again, and a later release
        # of it took the shortcut above: True where the distributor says False; a review)
        self._disown(ticket)
        key = self._next_key
        self._next_key = key + 1
        self._releases[key] = (ticket, done, failed)
        self._writer.add(LinkRelease(ticket, tokens, key))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def after(self, done: Callable[[], None]) -> None:
        """A release naming no ticket (0, never issued) as a barrier: the distributor handles this
        link's messages in order and answers a release (False here) right as it handles it, after
        the answers it decided at once for the messages before."""
        key = self._next_key
        self._next_key = key + 1
        self._releases[key] = (0, lambda _ticket, _ok: done(), None)
        self.send(LinkRelease(0, -1, key))

    def _disown(self, ticket: int) -> None:
        self._unwritten.pop(ticket, None)
        waiter = self._owner.pop(ticket, None)
        if waiter is not None:
            owned = self._owned[waiter]
            owned.discard(ticket)
            if not owned:
                del self._owned[waiter]

    def delivered(self, ticket: int) -> None:
        """The answer carrying this leased ticket is about to be written to its client: in the delivery
        log at once (read by the distributor if this process dies before its report), and reported
        on the link at the end of the pass (see distributor.deliverylog)."""
        self._unwritten.pop(ticket, None)
        if self._delivery is not None:
            self._delivery.add(ticket)
        self._delivered.append(ticket)  # sent as one LinkDelivered at the end of the pass
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def release_all(self, waiter: Waiter) -> int:
        mine = self._owned.pop(waiter, set())
        for ticket in mine:
            del self._owner[ticket]
            self.send(LinkRelease(ticket))
        return len(mine)

    def holds(self, waiter: Waiter) -> bool:
        return waiter in self._owned  # (a set leaves `_owned` once empty: `_disown`)

    def query(self, what: str, done: Callable[[bytes, str], None]) -> None:
        key = self._next_key
        self._next_key = key + 1
        self._queries[key] = done
        self.send(LinkQuery(key, what))


REPORT_INTERVAL = 0.25  # how often the acceptor reports its closed connections anyway (its heartbeat)
# connections taken from the hand-over queue per wake-up: between two takes the ones taken are served
# (a reset one is closed and reported); the rest wait in the queue, then in the distributor's listen
# backlog, uncounted (taken all at once, a flood of connect-and-reset outran their closing, and the
# connections counted open filled max_connections: a review)
HANDOVER_BATCH = 64
RECENT_DROP = 10.0  # seconds after a dropped descriptor during which every change of sockets is reported
DROPPED_LOG_INTERVAL = 10.0  # seconds between two warnings of connections handed without their descriptor
_VERDICTS = frozenset((CONN_NORMAL, CONN_RESERVE, CONN_REFUSED))


class Handover:
    """Receives the client connections the distributor accepted and hands to this acceptor (one per
    SOCK_SEQPACKET message: the front's byte and the connection's verdict, with the descriptor by
    SCM_RIGHTS), gives each to its front's protocol with that verdict, and reports the end of every
    connection the distributor counts (within max_connections or in the admin reserve): at the end
    of the pass in which it ended, so that its place is free again service-wide at once."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop, upstream: Upstream,
                 http: HttpHub, binary: BinaryHub) -> None:
        self._sock = sock
        self._loop = loop
        self._upstream = upstream
        self._fronts: dict[bytes, Callable[[int], asyncio.Protocol]] = {HANDED_HTTP: http, HANDED_BINARY: binary}
        http.on_close = binary.on_close = self._ended
        http.on_lost = binary.on_lost = self._socket_closed
        self.closed = dict.fromkeys(COUNTED, 0)  # (front, verdict) -> connections ended so far
        self._open: dict[asyncio.Protocol, tuple[bytes, int]] = {}  # counted connections not yet ended
        self._report_scheduled = False
        self._dropped = 0  # connections handed without their descriptor, not yet said (`_descriptor_dropped`)
        self.dropped_total = 0  # ...and ever (LinkConns.dropped)
        self.received = 0  # ...and those that came with theirs (LinkConns.received)
        self.sockets = 0  # client sockets held open now, closing ones included (LinkConns.sockets)
        self._socketed: set[object] = set()  # their protocols (each counted down once)
        self._peak = 0  # the most sockets held at once since the last drop
        self._dropped_at = -math.inf  # the last drop: until RECENT_DROP after it, every change is reported
        self._dropped_said = -math.inf
        self._dropped_timer: asyncio.TimerHandle | None = None
        self._proxy_report = b""  # proxy mode: the counters last pushed (`_report`)
        self._proxy_pushed = 0.0
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._receive)
        self._timer: asyncio.TimerHandle | None = loop.call_later(REPORT_INTERVAL, self._report)

    def _receive(self) -> None:
        for _ in range(HANDOVER_BATCH):  # (more waiting: the reader fires again after what was taken runs)
            try:
                data, fds, flags, _ = socket.recv_fds(self._sock, 2, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # the distributor is gone (the link's EOF ends the process)
                log.warning("connection handover failed: %s", exc)
                self.close()
                return
            if not data and not fds:  # EOF
                self.close()
                return
            kind, verdict = data[:1], data[1] if len(data) == 2 else -1
            if kind not in self._fronts or verdict not in _VERDICTS or flags & socket.MSG_TRUNC:
                log.error("handed connection with a malformed message %r: closed", data[:8])
                for fd in fds:
                    os.close(fd)
                continue
            key = (kind, verdict)
            if not fds:  # its descriptor was dropped (this process is out of them): it is closed
                self._descriptor_dropped()
                if key in self.closed:
                    self._count_end(key)
                continue
            self.received += 1
            try:
                conn = socket.socket(fileno=fds[0])
            except OSError as exc:  # not a socket
                log.error("handed descriptor refused: %s", exc)
                os.close(fds[0])
                if key in self.closed:
                    self._count_end(key)
                continue
            self.sockets += 1
            protocol = self._fronts[kind](verdict)
            self._socketed.add(protocol)
            self._changed_after_drop()
            if key in self.closed:
                self._open[protocol] = key
            self._loop.create_task(self._serve(conn, protocol))

    def _descriptor_dropped(self) -> None:
        """Said at once, then at most every `DROPPED_LOG_INTERVAL` with how many since (the last of
        them too, when the interval ends): one line per connection, a client connecting in a loop at
        an acceptor out of descriptors wrote 69,000 lines, 6 MB of stderr in 5 s (review 116)."""
        self._dropped += 1
        self.dropped_total += 1
        self._dropped_at = time.monotonic()
        self._peak = self.sockets
        self._report_soon()  # (the distributor learns how many this one can hold: LinkConns)
        wait = self._dropped_said + DROPPED_LOG_INTERVAL - time.monotonic()
        if wait <= 0:
            self._say_dropped()
        elif self._dropped_timer is None:
            self._dropped_timer = self._loop.call_later(wait, self._say_dropped)

    def _say_dropped(self) -> None:
        self._dropped_timer = None
        if self._dropped:
            log.warning("%d handed connection(s) arrived without their descriptor (this acceptor is out of "
                        "descriptors): closed; said again at most every %g s", self._dropped, DROPPED_LOG_INTERVAL)
            self._dropped, self._dropped_said = 0, time.monotonic()

    async def _serve(self, conn: socket.socket, protocol: asyncio.Protocol) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: protocol, conn)
        except Exception as exc:  # the client left already
            log.debug("handed connection not served: %s", exc)
            conn.close()
            self._ended(protocol)
            self._socket_closed(protocol)

    def _socket_closed(self, protocol: object) -> None:
        if protocol in self._socketed:
            self._socketed.discard(protocol)
            self.sockets -= 1
            self._changed_after_drop()

    def _changed_after_drop(self) -> None:
        """Shortly after a drop the distributor holds this acceptor to what it can hold, and learns
        from its reports whether it has room again: a change then is reported at once, not with the
        heartbeat (review 129: a capped acceptor's room grew 4 a second, new clients waited 13 s)."""
        if not self.dropped_total:  # (never out of descriptors: nothing to say, no clock read per connection)
            return
        if time.monotonic() - self._dropped_at < RECENT_DROP:
            self._report_soon()
        elif self.sockets > self._peak:  # (later, a probe's result: review 130)
            self._peak = self.sockets
            self._report_soon()

    def _ended(self, protocol: object) -> None:
        """A connection's protocol is lost (or was never served): counted once, reported this pass."""
        key = self._open.pop(cast(asyncio.Protocol, protocol), None)
        if key is not None:
            self._count_end(key)

    def _count_end(self, key: tuple[bytes, int]) -> None:
        self.closed[key] += 1
        self._report_soon()

    def _report_soon(self) -> None:
        if not self._report_scheduled:
            self._report_scheduled = True
            self._loop.call_soon(self._report)

    def _report(self) -> None:
        # sent every REPORT_INTERVAL even when unchanged: it is also this process's heartbeat (the
        # distributor restarts an acceptor that stops sending, and hands it nothing meanwhile)
        self._report_scheduled = False
        closed = self.closed
        upstream = self._upstream
        http, reserve, binary = (closed[key] for key in COUNTED)
        upstream.send(LinkConns(http, reserve, binary, self.dropped_total, self.received, self.sockets))
        proxy = upstream.proxy
        if proxy is not None and self._loop.time() - self._proxy_pushed >= REPORT_INTERVAL:
            # Its proxy's counters, pushed when they changed (besides the answers to LinkProxyAsk), so
            # that a SIGKILL loses at most this interval's: asked for only at a scrape, an acceptor
            # killed between two took every count since the last one with it (a review: 26 of 40)
            self._proxy_pushed = self._loop.time()
            report = proxy.encoded_report()
            if report != self._proxy_report:
                self._proxy_report = report
                upstream.send(LinkProxyReport(0, report))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._loop.call_later(REPORT_INTERVAL, self._report)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._dropped_timer is not None:
            self._dropped_timer.cancel()
            self._say_dropped()  # (what was not said yet)
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


async def run(
    index: int, sock: socket.socket, handover: socket.socket, config: Config, acceptors: int,
    delivery: DeliveryLog | None = None,
) -> None:
    from distributor.binary import BinaryHub, BinaryLimits
    from distributor.http import HttpHub, HttpLimits

    loop = asyncio.get_running_loop()
    upstream = Upstream(index, loop, sole=acceptors == 1, delivery=delivery)
    transport, _ = await loop.create_unix_connection(lambda: upstream, sock=sock)
    guards = LinkGuards(upstream)
    svc = config.service
    # max_connections and the admin reserve are the service's: the distributor counts every front's
    # connections and hands each with its verdict (distributor.acceptors); the fronts apply it as
    # they would decide it in the distributor's process, and name the service's limit when refusing
    proxy = None
    if config.proxy.backends:  # proxy mode: this process relays its own clients' requests (distributor.proxy)
        from distributor.proxy import BackendReport, Proxy

        # (without the detector, only its pool's health: the distributor tells the other acceptors)
        report = BackendReport(len(config.proxy.backends), upstream.send, loop, counts=config.proxy.utilization)
        proxy = upstream.proxy = Proxy(config, upstream, lambda: None, report=report)
        proxy.pool.stagger(index)
        await proxy.start()
    http = HttpHub(upstream, HttpLimits.of_service(svc), svc.lease, loop, guards, proxy)
    upstream.http = http
    binary = upstream.binary = BinaryHub(upstream, BinaryLimits.of_service(svc), loop, guards)
    handed = Handover(handover, loop, upstream, http, binary)
    upstream.send(Hello(index, os.getpid()))
    try:
        await upstream.finished
    finally:
        handed.close()
        if proxy is not None:  # told to stop (LinkStop): its close ends the streams; else the distributor is gone
            await (upstream.proxy_closing or proxy.close(why="stopped"))
        transport.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowshard-acceptor", description="one flowshard acceptor (started by serve)")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--acceptors", type=int, required=True, help="how many acceptors serve (1: this one alone)")
    parser.add_argument("--fd", type=int, required=True, help="this end of the socket pair to the distributor")
    parser.add_argument("--handover-fd", type=int, required=True, help="where the distributor hands connections")
    parser.add_argument("--delivered-fd", type=int, default=-1, help="the delivery log (distributor.deliverylog)")
    args = parser.parse_args(argv)
    sock, config = attach_to_distributor(args.fd)  # as a worker: drained by the distributor, not by signals
    if config is None:
        return 1
    handover = socket.socket(fileno=args.handover_fd)
    delivery = None
    if args.delivered_fd >= 0:
        delivery = DeliveryLog(args.delivered_fd)
        os.close(args.delivered_fd)
    uvloop.run(run(args.index, sock, handover, config, max(1, args.acceptors), delivery))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="flowshard acceptor: %(levelname)s %(message)s")
    sys.exit(main())
