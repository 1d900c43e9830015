"""The distributor's side of its acceptor processes (`distributor.front`): links, the handing over
of accepted connections, and supervision.

The distributor accepts every client connection and hands it at once to the acceptor with the
fewest open (SCM_RIGHTS over a SOCK_SEQPACKET pair): accepting costs it one system call per
connection, and the connections are spread evenly whatever their number (a listening socket shared
by the acceptors lets whichever wakes first take them, which piles a few busy connections onto one
acceptor). The connection limits stay the service's: the distributor counts every front's open
connections (handed, minus those the acceptor reports closed) and hands each new one with its
verdict, served, in the HTTP admin reserve or refused, which the acceptor's front carries out.
Each acceptor runs the client fronts and speaks for all its clients on one socket pair. Here an
`AcceptorLink` is, for the distributor, one more `Waiter`: every admission its acceptor forwards is
admitted exactly as a client's would be, with the acceptor's key as correlation id, and its outcome
goes back as a `Result` frame. The acceptor's death is a connection's death, times many: what it was
waiting for is cancelled and its binary tickets are released (HTTP tickets are leased: they stay
until released through another acceptor or the lease ends). Then it is started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

from distributor.api import (
    CONN_NORMAL,
    CONN_REFUSED,
    CONN_RESERVE,
    COUNTED,
    HANDED_BINARY,
    HANDED_HTTP,
    Audit,
    connection_verdict,
)
from distributor.deliverylog import DeliveryLog, create_fd
from distributor.spawn import RestartBackoff, spawn_linked
from flowshard.codec import (
    Audited,
    BatchReader,
    BatchWriter,
    Error,
    FromAcceptor,
    Hello,
    LinkAdmit,
    LinkAnswer,
    LinkBackendHealth,
    LinkBackends,
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
)
from flowshard.types import Outcome

if TYPE_CHECKING:
    from distributor.service import Distributor

log = logging.getLogger(__name__)
_NOT_YET = -1  # request id of an admission whose `admit` call has not returned yet
RESPAWN_MIN = 0.05  # a failed start of an acceptor is tried again after this, doubling up to RESPAWN_MAX
RESPAWN_MAX = 5.0


def auto_acceptors(shards: int, cpus: int, proxy: bool = False) -> int:
    """How many acceptor processes `serve --shards N` starts by default (`--acceptors auto`).

    2 (one HTTP acceptor costs about as much per request as the distributor), within the cores left
    after the distributor and the shards: an acceptor without a core of its own only adds a hop, so
    a small machine (2 cores) runs none, as before acceptors existed. Not more for more shards: the
    distributor reads each link, so more acceptors mean smaller batches per link and more reads per
    request for it. 3 measured below 2 at 1 and 2 shards (HTTP, binary), and 4 against 2 at 8 shards
    was worse for HTTP and no better for binary or the matrix (docs/benchmarks.md, "Issue 12, fifth
    round: HTTP through acceptors" and "Issue 12, seventh round: against the baseline"). Proxy mode
    keeps half the shard count, at least 2: there the acceptors relay every streamed chunk (~0.1 ms
    of CPU each), which is their work, not the distributor's."""
    wanted = max(2, (shards + 1) // 2) if proxy else 2
    return max(0, min(wanted, cpus - shards - 1))


class AcceptorLink(asyncio.Protocol):
    """The distributor's end of one acceptor's socket pair; the `Waiter` of all its admissions."""

    def __init__(self, service: Distributor, index: int, preamble: bytes) -> None:
        self.service = service
        self.index = index
        self._preamble = preamble
        self._reader = BatchReader(FromAcceptor)
        self._writer = BatchWriter()
        self._flush_scheduled = False
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, int] = {}  # key -> request id, for every admission without an outcome
        # leased tickets answered through this acceptor and not yet reported written to their client:
        # released if it dies (an answer it never wrote must not hold the budget for the lease)
        self.unconfirmed: set[int] = set()
        # proxy mode: its proxied admissions not yet answered (keys), their tickets until released (the
        # drain waits for them; its death releases them, as a binary connection's), and of those the
        # ones not yet sent to a backend (the utilization detector's `unsent`); per backend, the
        # requests it sent there and not yet reported finished (finished when it dies: the backend
        # saw their connections close)
        self.proxied_keys: set[int] = set()
        self.proxied: set[int] = set()
        self.unsent: set[int] = set()
        self.backend_open: list[int] = []  # (sized at its first LinkBackends)
        self.backend_sent: list[int] = []  # every send of its proxy's the detector counted, per backend
        self.backend_held: list[int] = []  # its streams in flight that waited on their clients (`LinkBackends.held`)
        self.ready = False  # said Hello: its fronts serve
        self.lost = False
        self.pid = 0
        self.handover: socket.socket | None = None  # where its connections are handed (SOCK_SEQPACKET)
        self.delivery: DeliveryLog | None = None  # the answers it wrote, read once it is gone (deliverylog)
        # per (front, verdict) counted against the limits (COUNTED): connections handed to it, and
        # how many of them it reported closed (LinkConns); the difference is open (or on its way)
        self.handed = dict.fromkeys(COUNTED, 0)
        self.closed = dict.fromkeys(COUNTED, 0)
        self.refused = {HANDED_HTTP: 0, HANDED_BINARY: 0}  # handed to be refused (not counted)
        self.heard = time.monotonic()  # when it last sent anything (it reports every 0.25 s: a heartbeat)
        self.dropped = 0  # connections handed to it that came without their descriptor (LinkConns.dropped)
        # Out of descriptors once (LinkConns.dropped): handed no more sockets than it held then
        # (`cap`: its sockets as it reports them, and those handed since, `sockets_now`), but one past
        # it at `probe_at` to find out whether it has room for more (then `cap` doubles), the probes
        # further apart while they fail (`probe_every`, DESCRIPTORS_PROBE doubling up to a second).
        # `probe`: the hand-overs it will have read when the probe's result is known (`seen`); 0 if
        # none is out.
        self.sockets = 0  # its client sockets, closing ones included, as last reported
        self.seen = 0  # the hand-overs it had read then (LinkConns.received + dropped)
        self.cap: int | None = None
        self.dropped_at = 0.0  # when it last said it dropped one
        self.probe_at = 0.0
        self.probe_every = DESCRIPTORS_PROBE
        self.probe = 0

    def open(self, key: tuple[bytes, int]) -> int:
        """Its connections of a front and verdict, from the hand-over until it reports them closed."""
        return self.handed[key] - self.closed[key]

    def load(self, kind: bytes) -> int:
        """Its open connections of a front, the admin reserve's included."""
        return sum(self.open(key) for key in COUNTED if key[0] == kind)

    @property
    def connections(self) -> int:
        return self.load(HANDED_HTTP) + self.load(HANDED_BINARY)

    def closed_report(self, msg: LinkConns) -> None:
        """Counts only grow and never pass what was handed (whatever the frame says)."""
        handed, closed = self.handed, self.closed
        for key, count in zip(COUNTED, (msg.http_closed, msg.http_reserve_closed, msg.binary_closed), strict=True):
            closed[key] = min(max(count, closed[key]), handed[key])
        now = time.monotonic()
        self.sockets = max(0, msg.sockets)
        self.seen = max(self.seen, msg.dropped + msg.received)
        if msg.dropped > self.dropped:  # out of descriptors: as many sockets as it holds now, no more
            if self.cap is None:
                self.probe_every = DESCRIPTORS_PROBE
            self.cap = self.sockets  # (0: none but probes)
            self.dropped_at = now
            self.probe_at = now + self.probe_every
            self.probe = 0
        elif self.probe and self.seen >= self.probe and self.cap is not None:
            # The probe came with its descriptor (it dropped none since). Only a report of more sockets
            # at once than the cap shows room past it: then the cap doubles; a probe that found a
            # descriptor some close had freed shows nothing more, and the probes stay as far apart
            # (review 130: doubled on that, the cap overshot again and again, ~220 lost a second).
            self.probe = 0
            if now - self.dropped_at > CAP_LIFTED_AFTER:  # none dropped for long, and a probe found room
                self.cap = None  # (review 134: under churn a cap could stay for good)
            elif self.sockets > self.cap:
                self.cap = max(2 * self.cap, self.sockets + 1)
                self.probe_every = DESCRIPTORS_PROBE
                self.probe_at = now
        self.dropped = max(self.dropped, msg.dropped)

    def hand_overs(self) -> int:
        """Connections handed to it, ever (counted or refused)."""
        return sum(self.handed.values()) + sum(self.refused.values())

    def sockets_now(self) -> int:
        """Its sockets as last reported, and those handed to it since that it had not read then."""
        return self.sockets + max(0, self.hand_overs() - self.seen)

    def has_room(self) -> bool:
        """Below its cap (or never out of descriptors)."""
        return self.cap is None or self.sockets_now() < self.cap

    def probe_due(self, now: float) -> bool:
        """At its cap, and time to hand it one more to find out whether it has room: first in line
        (else, while the others take every connection, one that got its descriptors back would never
        be tried)."""
        return not self.has_room() and not self.probe and now >= self.probe_at

    def took(self, now: float) -> None:
        """A connection was handed to it (counted in `handed` or `refused`): past its cap, a probe."""
        cap = self.cap
        if cap is None or self.sockets_now() <= cap:
            return
        self.probe = self.hand_overs()
        self.probe_at = now + self.probe_every
        self.probe_every = min(1.0, 2 * self.probe_every)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._preamble)

    def data_received(self, data: bytes) -> None:
        self.heard = time.monotonic()
        svc = self.service
        pending = self.pending
        for msg in self._reader.feed(data):
            try:
                # A request's two messages are handled here, inline (one call less for each); `_handle`
                # has the others.
                kind = type(msg)
                if kind is LinkAdmit:
                    key = msg.key
                    pending[key] = _NOT_YET
                    if msg.proxied:
                        self.proxied_keys.add(key)
                    request_id = svc.admit(self, key, msg.flow, msg.priority, msg.size, msg.ttl, msg.slo,
                                           msg.tokens, msg.weight, msg.leased, msg.audit)
                    if key in pending:
                        pending[key] = request_id
                elif kind is LinkRelease:
                    if self.proxied:
                        self._proxied_released(msg.ticket)
                    ok = svc.release(msg.ticket, msg.tokens)
                    if msg.key:  # `send`, inline: once per HTTP release
                        self._writer.add(LinkReleased(msg.key, ok))
                        if not self._flush_scheduled:
                            self._flush_scheduled = True
                            asyncio.get_running_loop().call_soon(self.flush)
                else:
                    self._handle(msg)
            except Exception:  # a bug must not cut off every client of this acceptor
                log.exception("acceptor %d: handling %s failed", self.index, type(msg).__name__)
                if type(msg) is LinkAdmit:
                    self.fail(msg.key, "internal error while admitting")
                elif type(msg) is LinkRelease and msg.key:  # its answer is awaited: the front says 500
                    self.send(Error(msg.key, 500, "internal error while releasing"))

    def _handle(self, msg: Any) -> None:
        """Any message but an admission or a release (`data_received` handles those)."""
        svc = self.service
        pending = self.pending
        kind = type(msg)
        if kind is LinkDelivered:
            self.unconfirmed.difference_update(msg.tickets)  # (a discard each, in C)
            for ticket in msg.tickets:
                svc.restart_lease(ticket)
        elif kind is LinkBackends:
            self._backend_events(msg)
        elif kind is LinkProxyReport:
            if svc.acceptors is not None:
                svc.acceptors.proxy_report(self, msg.key, msg.body)
        elif kind is LinkUnclaimed:
            if self.proxied:
                self._proxied_released(msg.ticket)
            svc.unclaim(msg.ticket)
        elif kind is LinkCancel:
            self.proxied_keys.discard(msg.key)
            request_id = pending.pop(msg.key, _NOT_YET)
            if request_id != _NOT_YET:
                svc.cancel(request_id)
        elif kind is LinkQuery:
            answer = _Answer(self, msg.key)
            try:
                svc.query(msg.what, answer)
            except Exception as exc:
                log.exception("rendering %s failed", msg.what)
                answer(type(exc).__name__.encode(), "")  # an empty content type: failed
        elif kind is LinkGuard:
            svc.guards.hit(msg.front, msg.action)
        elif kind is LinkConns:
            self.closed_report(msg)
            acceptors = svc.acceptors
            if acceptors is not None and acceptors.refusing:
                acceptors.recheck_refusing()
        elif kind is Hello:
            self.pid = msg.pid
            self.ready = True
            svc.on_acceptor_hello(self)

    def fail(self, cid: Any, message: str) -> None:
        """Admission `cid` failed here: no outcome will come, its acceptor answers its client (`Error`).
        A proxied one is no longer awaited (the drain does not wait for it)."""
        self.proxied_keys.discard(cid)
        if self.pending.pop(cid, None) is not None:
            self.send(Error(cid, 500, message))

    def _proxied_released(self, ticket: int) -> None:
        self.proxied.discard(ticket)
        self._proxied_sent(ticket)

    def _proxied_sent(self, ticket: int) -> None:
        """Its proxy sent this dispatch to a backend (or released it): the detector no longer counts
        it as dispatched but not yet sent."""
        if ticket in self.unsent:
            self.unsent.discard(ticket)
            self.service.proxy.unsent -= 1

    def _backend_events(self, msg: LinkBackends) -> None:
        """Its proxy's pool took backends out or back (with the detector or without: the other acceptors
        are told), or sent requests to backends and saw some finish: the detector counts them as the
        one-process proxy does (`PoolUtilization.sent` / `finished`, `Proxy.unsent`)."""
        proxy = self.service.proxy
        if proxy is None:
            return
        if msg.down_for:  # (with the detector or without)
            proxy.remote_health(self.index, msg.down_for)
            self.service.acceptors.peers_down()  # (the others keep them out too)
        util = proxy.utilization
        if util is None:
            return
        opened, counted = self.backend_open, self.backend_sent
        if not opened:
            opened = self.backend_open = [0] * len(util.loads)
            counted = self.backend_sent = [0] * len(util.loads)
        for b, (sent, finished) in enumerate(zip(msg.sent, msg.finished, strict=False)):
            if b < len(util.loads):
                util.add(b, sent, finished)
                opened[b] += sent - finished
                counted[b] += sent
        if msg.held or msg.held_finished:
            held = self.backend_held
            if not held:
                held = self.backend_held = [0] * len(util.loads)
            for b, (began, ended) in enumerate(zip(msg.held, msg.held_finished, strict=False)):
                if b < len(util.loads):
                    util.add(b, held=began - ended, held_finished=ended)
                    held[b] += began - ended
        for ticket in msg.marked:
            self._proxied_sent(ticket)
        told = (any(msg.sent) or any(msg.finished)) and proxy.refresh_rooms()  # (every acceptor, if they changed)
        if any(msg.sent) and not told:  # unchanged rooms, but what they count of its sends moved: its
            assert proxy.rooms is not None  # picker counts against them only what they do not count
            self.send(LinkBackendsFull(proxy.rooms, list(counted)))  # (a copy: encoded at the pass's end)

    def _proxied_lost(self) -> None:
        """Its process is gone: its requests in flight to the backends are over (their connections
        closed with it), its unsent dispatches are released (release_all)."""
        self.proxied.clear()
        self.proxied_keys.clear()
        if not (self.unsent or self.backend_open):  # no detector here, or it never sent anything
            return
        proxy = self.service.proxy
        util = proxy.utilization
        for b, count in enumerate(self.backend_open):
            util.add(b, finished=max(0, count))
        for b, count in enumerate(self.backend_held):  # (ended too: their ends are not taken off either)
            util.add(b, held=-count, held_finished=count)
        proxy.unsent -= len(self.unsent)
        self.backend_open = []
        self.backend_held = []
        self.unsent.clear()

    def close_delivery(self) -> None:
        if self.delivery is not None:
            self.delivery.close()
            self.delivery = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.ready = False
        self.transport = None
        if self.handover is not None:
            self.handover.close()
        svc = self.service
        pending, self.pending = self.pending, {}
        for request_id in pending.values():
            if request_id != _NOT_YET:
                svc.cancel(request_id)
        self._proxied_lost()
        svc.release_all(self)  # its binary connections' tickets and its proxied requests' (not leased)
        # Answers it was sent and did not report written: those not in its delivery log never left it
        # (nobody holds their tickets: released now); those in it may have reached their clients in
        # its last pass (kept for their lease: released under a client, in flight would pass the budget)
        written = self.delivery.tickets() if self.delivery is not None and self.unconfirmed else set()
        self.close_delivery()
        for ticket in list(self.unconfirmed):
            if ticket not in written:
                if svc.release(ticket):
                    svc.guards.hit("http", "undeliverable")
            else:
                svc.restart_lease(ticket)  # (written: its lease runs)
        self.unconfirmed.clear()
        svc.on_acceptor_lost(self)

    def revoke(self, ticket: int) -> None:
        """`Distributor._revoke`: its acceptor takes the unwritten answer back (LinkUnclaimed follows),
        or has written it (LinkDelivered)."""
        self.send(LinkRevoke(ticket))

    def deliver(
        self, cid: Any, request_id: int, outcome: Outcome, ticket: int, wait: float, retry_after: int,
        audit: Audit | None = None,
    ) -> None:
        if self.pending.pop(cid, None) is None:
            if self.lost and ticket:  # as a closed binary connection: no capacity may leak
                self.service.release(ticket)
            return
        if ticket and ticket in self.service.leases:  # leased (HTTP): confirmed when written
            self.unconfirmed.add(ticket)
        if self.proxied_keys and cid in self.proxied_keys:
            self.proxied_keys.discard(cid)
            if ticket:  # held until its proxy releases it (or this acceptor dies)
                self.proxied.add(ticket)
                proxy = self.service.proxy
                if proxy is not None and proxy.utilization is not None:  # unsent until LinkBackends says
                    self.unsent.add(ticket)
                    proxy.unsent += 1
        # `send`, inline: once per request
        self._writer.add(Result(cid, outcome, ticket, wait, retry_after) if audit is None
                         else Audited(cid, outcome, ticket, wait, retry_after, *audit))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def send(self, message: Any) -> None:
        self._writer.add(message)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._writer and self.transport is not None and not self.transport.is_closing():
            self.transport.write(self._writer.take())


class _Answer:
    """Sends the answer to one acceptor query back over its link."""

    __slots__ = ("key", "link")

    def __init__(self, link: AcceptorLink, key: int) -> None:
        self.link = link
        self.key = key

    def __call__(self, body: bytes, ctype: str) -> None:
        self.link.send(LinkAnswer(self.key, body, ctype))


ACCEPT_BATCH = 64  # connections accepted per readiness callback (then the loop serves the rest)
ACCEPT_PAUSE = 0.1  # after an accept error (out of descriptors): listen again after this
HANDOVER_RETRY = 0.005  # every live acceptor's hand-over queue full (a burst of connections): try again then
HANDOVER_QUIET = 1.0  # an acceptor not heard from this long gets no new connection
# An acceptor out of descriptors closes each connection handed to it (the client sees an EOF). Once it
# says so (LinkConns.dropped), it is handed no more sockets than it held then (`AcceptorLink.cap`),
# and one more now and then to find out whether it has room again: this long after, then twice as
# long each time, up to a second; none is accepted while no live acceptor may take one (they wait in
# the listen backlog, as without acceptors: `_accept`'s pause). Review 127: a pause of a second for
# any drop stalled acceptors that were merely near their limit (47 answers a second, from 7,000).
DESCRIPTORS_PROBE = 0.1
CAP_LIFTED_AFTER = 10.0  # an acceptor's cap is lifted at a probe that found room this long after its last drop
# A connection over `max_connections` waits this long for a close its acceptor has not reported yet
# before it is put in the admin reserve or refused (`Acceptors._refusing`); at most REFUSE_GRACE_MAX
# per front wait so at once
REFUSE_GRACE = 0.05
REFUSE_GRACE_MAX = 64
HEARTBEAT_STALE = 5.0  # nor heard from this long: hung; killed, and started again (as a worker)
START_TIMEOUT = 30.0  # a restarted acceptor without its Hello this long after its start: hung; killed too
PROXY_REPORT_WAIT = 1.0  # proxy mode: the most /metrics and /v1/stats wait for the acceptors' counters


class Acceptors:
    """Starts, watches and restarts the acceptor processes; accepts the clients' connections and
    hands each to the least loaded one; tells them the service's state."""

    def __init__(self, service: Distributor, count: int, http: socket.socket, binary: socket.socket,
                 preamble: bytes) -> None:
        from distributor.http import ADMIN_RESERVE

        self.service = service
        self.count = count
        self.listeners = {HANDED_HTTP: http, HANDED_BINARY: binary}
        # per front: (max_connections, admin reserve), service-wide, as the fronts have them without acceptors
        max_connections = service.config.service.max_connections
        self.limits = {HANDED_HTTP: (max_connections, ADMIN_RESERVE), HANDED_BINARY: (max_connections, 0)}
        self._preamble = preamble
        self.links: list[AcceptorLink | None] = [None] * count
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self.restarts = [0] * count
        self._backoff = [RestartBackoff() for _ in range(count)]
        self._last_start = [-math.inf] * count
        self._state: tuple[bool, bool] | None = None
        self._listening = False
        self._stopping = False
        self.all_ready: asyncio.Event = asyncio.Event()
        self._asks: dict[int, tuple[set[int], Callable[[], None]]] = {}  # proxy reports awaited, per query
        self._next_ask = 1
        # Connections accepted that no acceptor could take yet (each live one's hand-over queue full: a
        # burst of connections), handed in order as the queues drain; meanwhile nothing more is
        # accepted, and the rest wait in the listen backlog, as they do for one process
        self._waiting: deque[tuple[bytes, socket.socket]] = deque()
        self._retry_timer: asyncio.TimerHandle | None = None
        # Connections over the limit, per front, waiting up to REFUSE_GRACE for a close on its way from
        # an acceptor (reported at the end of its pass): a client that closes and connects again at once
        # was refused, where one process, which sees the close first, serves it (a review: 89-111 of
        # 200 sequential clients at max_connections = 1). Each with the time it is refused at.
        self._refusing: dict[bytes, deque[tuple[socket.socket, float]]] = {
            HANDED_HTTP: deque(), HANDED_BINARY: deque()}
        self._refuse_timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        for index in range(self.count):
            await self._spawn(index)

    async def _spawn(self, index: int) -> None:
        link = AcceptorLink(self.service, index, self._preamble)
        self.links[index] = link
        reserve = self.service.fd_reserve
        # the delivery log's descriptor and its mapping's, inside the reserve: a restart must not fail
        # for want of descriptors when clients hold all the others
        with reserve.use() if reserve is not None else contextlib.nullcontext():
            fd = create_fd()
            try:
                link.delivery = DeliveryLog(fd)
            except BaseException:
                os.close(fd)
                self.links[index] = None
                raise
        try:
            proc, (link.handover,) = await spawn_linked(
                lambda fds: ["distributor.front", "--index", str(index), "--acceptors", str(self.count),
                             "--fd", str(fds[0]), "--handover-fd", str(fds[1]), "--delivered-fd", str(fd)],
                link, self.service.fd_reserve, (socket.SOCK_STREAM, socket.SOCK_SEQPACKET), (fd,),
            )
        except BaseException:
            self.links[index] = None
            link.close_delivery()
            raise
        finally:
            os.close(fd)
        self.procs[index] = proc
        self._last_start[index] = time.monotonic()

    # ------------------------------------------------------------ connections

    def listen(self) -> None:
        """Start accepting (once every acceptor said hello and the service accepts work)."""
        for sock in self.listeners.values():
            sock.setblocking(False)
        self._listening = True
        self._read_listeners()

    def _read_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        for kind, sock in self.listeners.items():
            if self._listening and sock.fileno() >= 0:
                loop.add_reader(sock.fileno(), self._accept, kind, sock)

    def _accept(self, kind: bytes, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: the connection waits in the backlog meanwhile
                log.warning("accepting a connection failed (%s); pausing %.1f s", exc, ACCEPT_PAUSE)
                self._pause(kind, sock)
                return
            if not self._hand_or_keep(kind, conn):
                self._hold(kind, conn)
                return

    def _pause(self, kind: bytes, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())

        def resume() -> None:
            if self._listening and not self._waiting and sock.fileno() >= 0:
                loop.add_reader(sock.fileno(), self._accept, kind, sock)

        loop.call_later(ACCEPT_PAUSE, resume)

    def _hand_or_keep(self, kind: bytes, conn: socket.socket) -> bool:
        """Hand `conn` (`_hand`) and close this process's copy: the acceptor holds its own now (or, none
        up, the client sees the close); an error handing it closes it too, logged. False: every live
        acceptor's queue is full, and `conn` stays open, to be tried again. One over `max_connections`
        (for the admin reserve, or refused) waits a moment first (`_refusing`), as do those after it
        while any does."""
        refusing = self._refusing[kind]
        if (not self._stopping and len(refusing) < REFUSE_GRACE_MAX
                and (refusing or self.verdict(kind) != CONN_NORMAL)):
            refusing.append((conn, time.monotonic() + REFUSE_GRACE))
            if self._refuse_timer is None:
                self._refuse_timer = asyncio.get_running_loop().call_later(REFUSE_GRACE, self.recheck_refusing)
            return True
        return self._hand_now(kind, conn)

    @property
    def refusing(self) -> bool:
        """Connections over the limits wait for a close on its way (`_hand_or_keep`)."""
        return bool(self._refusing[HANDED_HTTP] or self._refusing[HANDED_BINARY])

    def recheck_refusing(self) -> None:
        """Hand the connections waiting over the limits, in order, as places free (an acceptor reported
        closes, or one died) or their grace ends (then refused)."""
        self._refuse_timer = None
        now = time.monotonic()
        for kind, refusing in self._refusing.items():
            while refusing:
                conn, until = refusing[0]
                if not self._stopping and until > now and self.verdict(kind) != CONN_NORMAL:
                    break
                if not self._hand_now(kind, conn):  # every queue full: again on the timer
                    break
                refusing.popleft()
        if any(self._refusing.values()) and self._refuse_timer is None:
            first = min(q[0][1] for q in self._refusing.values() if q)
            self._refuse_timer = asyncio.get_running_loop().call_later(
                max(HANDOVER_RETRY, first - now), self.recheck_refusing)

    def _hand_now(self, kind: bytes, conn: socket.socket) -> bool:
        """`_hand_or_keep` without the grace."""
        try:
            if not self._hand(kind, conn):
                return False
        except Exception:
            log.exception("handing a connection to an acceptor failed: closed")
        conn.close()
        return True

    def _hold(self, kind: bytes, conn: socket.socket) -> None:
        """No live acceptor can take `conn` now (a burst filled their hand-over queues): keep it, accept
        nothing more until it and any kept before it are handed (`_retry`). Closing it (as before) gave
        clients of a burst well within `max_connections` an EOF unanswered (a review: 1,022 of 3,000
        connections opened at once with 2 acceptors; none without acceptors, where they wait in the
        listen backlog)."""
        self._waiting.append((kind, conn))
        loop = asyncio.get_running_loop()
        for sock in self.listeners.values():
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock.fileno())
        if self._retry_timer is None:
            self._retry_timer = loop.call_later(HANDOVER_RETRY, self._retry)

    def _retry(self) -> None:
        """Hand the kept connections, oldest first, while the acceptors' queues take them; then accept again."""
        self._retry_timer = None
        waiting = self._waiting
        while waiting:
            kind, conn = waiting[0]
            if not self._hand_or_keep(kind, conn):
                self._retry_timer = asyncio.get_running_loop().call_later(HANDOVER_RETRY, self._retry)
                return
            waiting.popleft()
        self._read_listeners()

    def _drop_waiting(self) -> None:
        """Stopping: the connections still kept are closed (as a listen backlog is when its port closes)."""
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        while self._waiting:
            self._waiting.popleft()[1].close()
        if self._refuse_timer is not None:
            self._refuse_timer.cancel()
            self._refuse_timer = None
        for refusing in self._refusing.values():
            while refusing:
                refusing.popleft()[0].close()

    def verdict(self, kind: bytes) -> int:
        """How a new connection of a front counts (distributor.api), by the connections of that front
        open in every acceptor: handed and not yet reported closed. An acceptor's are forgotten when it
        dies (its process held them: they are closed)."""
        links = [link for link in self.links if link is not None]
        limit, reserve = self.limits[kind]
        normal, reserved = (kind, CONN_NORMAL), (kind, CONN_RESERVE)
        return connection_verdict(sum(link.open(normal) for link in links),
                                  sum(link.open(reserved) for link in links) if reserve else 0, limit, reserve)

    def _hand(self, kind: bytes, conn: socket.socket) -> bool:
        """To the live acceptor with the fewest open connections of this front, with the verdict the
        front applies (served, in the admin reserve, or refused as over the limits); none live:
        closed (a dead one is restarted). False: every live one's hand-over queue is full (try again)."""
        verdict = self.verdict(kind)
        message = kind + bytes((verdict,))
        now = time.monotonic()
        quiet = now - HANDOVER_QUIET  # an acceptor silent this long may be hung: none for it
        ready = [link for link in self.links if link is not None and link.ready]
        # All quiet: more likely this process did not run (its links hold their heartbeats unread)
        # than that every acceptor hung; a hung one's queue refuses the send, and it is killed later.
        live = [link for link in ready if link.heard > quiet] or ready
        # (out of descriptors once: `cap`) a connection to be refused is never a probe (any acceptor
        # can answer its 503: review 129), and the others go to one at its cap only as a probe
        takers = [link for link in live if link.has_room()]
        if verdict != CONN_REFUSED or not takers:
            takers += [link for link in live if link.probe_due(now)]
        if live and not takers and not self._stopping:
            return False  # kept (`_hold`), and nothing accepted, until one may take it
        live = sorted(takers or live, key=lambda x: (not x.probe_due(now), x.load(kind), x.refused[kind]))
        full = False
        for link in live:
            if link.handover is None:
                continue
            try:
                socket.send_fds(link.handover, [message], [conn.fileno()])
            except BlockingIOError:  # its queue is full (behind on a burst, or stuck): the next one
                full = True
                continue
            except OSError:  # it is gone: the next one
                continue
            if verdict == CONN_REFUSED:
                link.refused[kind] += 1
            else:
                link.handed[kind, verdict] += 1
            link.took(now)
            return True
        if full and not self._stopping:
            return False
        log.warning("no acceptor could take a connection: closed")
        return True

    # ------------------------------------------------------------ state and supervision

    def hello(self, link: AcceptorLink) -> None:
        self._state = None  # tell the newcomer
        self.push_state()
        proxy = self.service.proxy
        if proxy is not None:  # and which backends the scraper has out
            for index in range(len(proxy.pool.backends)):
                if proxy.scrape_down_for(index) > 0:
                    link.send(self._health(index))
            if proxy.rooms is not None:
                link.send(LinkBackendsFull(proxy.rooms, list(link.backend_sent)))
            if proxy.remote_down:  # and which the others keep out
                link.send(LinkPeersDown(proxy.peers_down_for(link.index)))
        if all(x is not None and x.ready for x in self.links):
            self.all_ready.set()

    def push_state(self) -> None:
        """Send (accepting, ready) to every acceptor when it changed (or to a newcomer)."""
        state = (self.service.accepting, self.service.shards_ready)
        if state == self._state:
            return
        self._state = state
        for link in self._ready():
            link.send(LinkState(*state))

    def _ready(self) -> Iterator[AcceptorLink]:
        """The acceptors that said hello and are not lost: what the distributor tells them goes there."""
        return (link for link in self.links if link is not None and link.ready)

    # ------------------------------------------------------------ proxy mode

    def gather_proxy_reports(self, then: Callable[[], None]) -> None:
        """Ask every live acceptor for its proxy's counters (`LinkProxyAsk`), then call `then` once all
        have answered, or after PROXY_REPORT_WAIT with the reports of those that did (the others'
        last ones are kept: `Proxy.remote`). A counter an acceptor had counted when it was asked is
        in the answer: a client that saw its response end and then asks sees it counted."""
        waiting = {link.index for link in self.links if link is not None and link.ready}
        if not waiting:
            then()
            return
        key = self._next_ask
        self._next_ask = key + 1
        self._asks[key] = (waiting, then)
        for index in waiting:
            link = self.links[index]
            assert link is not None
            link.send(LinkProxyAsk(key))
        asyncio.get_running_loop().call_later(PROXY_REPORT_WAIT, self._answered, key, None)

    def proxy_report(self, link: AcceptorLink, key: int, body: bytes) -> None:
        proxy = self.service.proxy
        if proxy is not None and self.links[link.index] is link:
            try:
                proxy.remote_report(link.index, body)
            except (ValueError, TypeError) as exc:  # msgspec's DecodeError is a ValueError
                log.error("acceptor %d: unreadable proxy report: %s", link.index, exc)
        self._answered(key, link.index)

    def _answered(self, key: int, index: int | None) -> None:
        entry = self._asks.get(key)
        if entry is None:
            return
        waiting, then = entry
        if index is not None:
            waiting.discard(index)
            if waiting:
                return
        del self._asks[key]
        then()

    def _health(self, index: int) -> LinkBackendHealth:
        proxy = self.service.proxy
        return LinkBackendHealth(index, proxy.scrape_down_for(index), proxy.pool.backends[index].last_error)

    def backends_full(self, rooms: list[int]) -> None:
        """The distributor's detector has other rooms at the backends: every acceptor's picker too."""
        for link in self._ready():
            link.send(LinkBackendsFull(rooms, list(link.backend_sent)))

    def backend_health(self, index: int) -> None:
        """The distributor's scraper took backend `index` out or back in: every acceptor's proxy too."""
        message = self._health(index)
        for link in self._ready():
            link.send(message)

    def peers_down(self) -> None:
        """An acceptor's proxy took backends out or back, or one exited: tell every acceptor which
        backends the others keep out (`LinkPeersDown`; each one's own, not its own back-offs again)."""
        proxy = self.service.proxy
        if proxy is None:
            return
        for link in self._ready():
            link.send(LinkPeersDown(proxy.peers_down_for(link.index)))

    def proxied_running(self) -> bool:
        """A proxied request holds a ticket in some acceptor (the drain waits for them)."""
        return any(link is not None and link.proxied for link in self.links)

    def stop_proxies(self, why: str) -> None:
        """The service stops: each acceptor's proxy ends what it still relays, saying why (LinkStop)."""
        for link in self._ready():
            link.send(LinkStop(why))
            link.flush()

    def lost(self, link: AcceptorLink) -> None:
        index = link.index
        if self.links[index] is not link:
            return
        kept_out = False
        if self.service.proxy is not None:
            kept_out = self.service.proxy.acceptor_exited(index)
            for key in list(self._asks):
                self._answered(key, index)
        self.links[index] = None
        if kept_out:
            self.peers_down()  # (what it kept out is back in the others' rotation)
        proc = self.procs[index]
        if proc is not None:  # reaped first, so its pid is not left a zombie
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            self.procs[index] = None
        if self._stopping:
            return
        if self.refusing:  # its connections' places are free now (review 102: they waited out the grace)
            self.recheck_refusing()
        log.error("acceptor %d exited; starting it again", index)
        self.restarts[index] += 1
        self.service.counters["acceptor_restarts"] += 1
        asyncio.get_running_loop().call_later(self._backoff[index].died(time.monotonic()), self._respawn, index)

    def _respawn(self, index: int) -> None:
        if not self._stopping and self.links[index] is None:
            asyncio.get_running_loop().create_task(self._respawn_until_started(index))

    async def _respawn_until_started(self, index: int) -> None:
        delay = RESPAWN_MIN
        while not self._stopping:
            try:
                await self._spawn(index)
                return
            except OSError as exc:
                log.error("acceptor %d: cannot start (%s); retrying", index, exc)
                await asyncio.sleep(delay)
                delay = min(RESPAWN_MAX, delay * 2)

    def check_heartbeats(self, stalled: bool) -> None:
        """Kill an acceptor that has said nothing for HEARTBEAT_STALE (its link's loss restarts it),
        or a restarted one still without its Hello START_TIMEOUT after its start (it hung before
        serving: its place was kept, and with one acceptor every new connection closed, for good).

        Silence counts only while this process runs: after a stall of its own (`stalled`, judged by
        `Distributor._check_heartbeats`: stopped, or the host paused it) the heartbeats wait unread in
        its links, so every acceptor's silence starts again from then (it killed healthy acceptors
        after a 5 s pause of the distributor)."""
        now = time.monotonic()
        if stalled:
            for link in self.links:
                if link is not None:
                    link.heard = max(link.heard, now)
            return
        stale = now - HEARTBEAT_STALE
        for index, link in enumerate(self.links):
            proc = self.procs[index]
            if link is None or proc is None:
                continue
            if link.ready and link.heard < stale:
                log.error("acceptor %d silent for %.0f s: killing it", index, HEARTBEAT_STALE)
            elif not link.ready and now - self._last_start[index] > START_TIMEOUT:
                log.error("acceptor %d not started within %.0f s: killing it", index, START_TIMEOUT)
            else:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    def stop_listening(self) -> None:
        """Draining: no new connections (the port closes); the acceptors keep serving theirs. Those over
        the limits waiting for a close are handed now, with the verdict they have (a review: closed at
        the end of a short drain instead, without their 503)."""
        self.push_state()
        for kind, refusing in self._refusing.items():
            while refusing and self._hand_now(kind, refusing[0][0]):
                refusing.popleft()
        if self._listening:
            self._listening = False
            loop = asyncio.get_running_loop()
            for sock in self.listeners.values():
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(sock.fileno())
        for sock in self.listeners.values():
            sock.close()

    def _silent_since(self, index: int, since: float) -> bool:
        """Acceptor `index` has sent nothing for HANDOVER_QUIET, counted from `since` at the earliest:
        stopped or hung (it reports every REPORT_INTERVAL until, FLUSH_GRACE after `Shutdown`, it
        closes its hand-over; what it does after that, its proxy's close, is bounded by `LinkStop`
        having come before)."""
        link = self.links[index]
        heard = link.heard if link is not None else -math.inf
        return time.monotonic() - max(heard, since) > HANDOVER_QUIET

    async def close(self, cut: Callable[[], bool] = lambda: False) -> None:
        """After the distributor has delivered every outcome: tell each acceptor to finish (its last
        answers leave), wait for it, and kill one that does not exit (at once once every one left
        has been silent for HANDOVER_QUIET, or `cut` says so: a second signal)."""
        self.stop_listening()
        self._stopping = True
        self._drop_waiting()
        for link in self.links:
            if link is not None:
                link.send(Shutdown())
                link.flush()
        start = time.monotonic()
        deadline = start + 3.0  # an acceptor exits FLUSH_GRACE (0.5 s) after Shutdown
        while time.monotonic() < deadline:
            running = [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]
            if not running or all(self._silent_since(i, start) for i in running) or cut():
                break  # (a stopped or hung one, left alone, kept the exit waiting 3 s: a review)
            await asyncio.sleep(0.02)  # not proc.wait(): the loop must go on writing their last answers
        for index, proc in enumerate(self.procs):
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                self.procs[index] = None
        for link in self.links:
            if link is not None and link.transport is not None:
                link.transport.close()
