"""The distributor process: admission, routing, grants, tickets, supervision, drain.

It sees every request, so it enforces the global limits and the dispatch budget exactly (through
the core's `Ledger`), routes queued work to shards by JSQ-Bytes over the shared-memory counters,
and grants dispatches strictly by band. Shards own the queues and the per-item policies.

Every admission ends in exactly one delivered outcome, or — when its client left first — in a
cancel that frees whatever it held. Nothing here blocks the event loop; frames to each shard are
written once per loop pass.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, cast

import msgspec

from distributor import segment
from distributor.api import Audit, Waiter
from distributor.fdreserve import FdReserve
from distributor.guards import Guards
from distributor.sockets import let_answers_leave
from distributor.spawn import RestartBackoff, spawn_linked
from flowshard.codec import (
    BatchReader,
    BatchWriter,
    Cancel,
    Charge,
    Done,
    Enqueue,
    FromWorker,
    Grant,
    GrantBack,
    Hello,
    Shutdown,
    config_preamble,
)
from flowshard.config import Config, host_port
from flowshard.keepalive import detect_dead_peers
from flowshard.ledger import Ledger, Pending, PendingState
from flowshard.retry import RetryAfter
from flowshard.shm import MIN_BACKLOG_BYTES, ShmLayout, ShmSnapshot, ShmStats
from flowshard.slots import SlotTable
from flowshard.stats import N_WAIT_BUCKETS
from flowshard.types import N_OUTCOMES, OUTCOMES, Outcome
from flowshard.validate import MAX_TICKET

_DISPATCHED = Outcome.DISPATCHED
_SHUTDOWN = Outcome.EVICTED_SHUTDOWN
_CANCELLED = Outcome.EVICTED_CANCELLED
_REJECTED_CAPACITY = Outcome.REJECTED_CAPACITY
_INF = math.inf
_monotonic = time.monotonic  # (module globals: a read of `time.monotonic` is two lookups, once or twice a request)
_monotonic_ns = time.monotonic_ns
_DONE = PendingState.DONE  # (a module global: an enum class attribute costs ~75 ns a read on 3.11)
log = logging.getLogger(__name__)
WORKER_START_TIMEOUT = 30.0
SPAWN_RETRY_MIN = 0.1  # a failed worker start is retried after this, doubling up to SPAWN_RETRY_MAX
SPAWN_RETRY_MAX = 5.0
HOUSEKEEPING_INTERVAL = 0.25
SELF_STALL = 0.5  # housekeeping ticks this far apart: this process did not run (stopped, or its host paused)
HEARTBEAT_STALE = 5.0
# A worker whose heartbeat is this old (5 of its beats) is silent: stopped or wedged, its TTL timers do not
# fire nor does it read cancels, so the distributor ends those of its queued requests (`Distributor._end_on_silent`)
SHARD_SILENT = 0.5
# At the end of the drain: a worker that has sent nothing for this long after `Shutdown` is not waited
# for (a healthy one reports its evictions and closes its link within milliseconds)
SHUTDOWN_SILENCE = 0.25
# Cancels sent to the shards in a pass, the rest CANCEL_BATCH at a time CANCEL_PAUSE seconds apart
# (`Distributor.cancel`, `_send_cancels`): clients that left with 64,000 queued (one connection, or 128
# of 500) held every other client 0.6-1.2 s while the shards evicted them, ~16 us each, and their
# reports came back in reads of thousands (reviews 168, 175). The clients' side of a cancel is at once
# (no answer, `_told`); only the shards' evictions are paced: 64,000 take ~1 s, as they took in one go.
CANCEL_BATCH = 512
CANCEL_PAUSE = 0.005


class Ticket(msgspec.Struct, gc=False):
    """A dispatched request's hold on the budget until it is released."""

    id: int
    size: int
    owner: Any
    deadline: float  # lease expiry (inf: held until the connection closes)
    shard: int = -1  # the shard that dispatched it (-1: the idle fast path), for a cost correction
    flow: str = ""
    priority: int = 0
    cost: int = 0  # what fairness charged at dispatch: declared tokens, else bytes
    # not leased: its owner's set in `Distributor._owned` (read by its release without a lookup; a set
    # leaves `_owned` only once empty, so the set of a ticket still held is its owner's there)
    owned: set[int] | None = None
    weight: float = 0.0  # the request's own weight (0: its flow's configured one), for a cost correction
    seq: int = -1  # its shard's `Done.seq`, which the correction names (`Charge.seq`)
    charged: int = -1  # its `Pending.charged`, which the ledger's correction names


# Tickets are capabilities: random, so a client can release only a ticket it was given (on any of its
# connections: clients pool them), never another client's by guessing. 53 bits: exact as a JSON number.
_TICKET_MASK = MAX_TICKET


class WorkerLink(asyncio.Protocol):
    """The distributor's end of one shard's socket pair. The first bytes it writes are the worker's
    configuration (`workers.worker.read_config`): on the command line a large `[weights]` table would
    pass the kernel's limit on one argument (128 KiB), and anyone could read it in `ps`."""

    def __init__(self, service: Distributor, shard: int, config_preamble: bytes) -> None:
        self.service = service
        self.shard = shard
        self.reader = BatchReader(FromWorker)
        self.transport: asyncio.Transport | None = None
        self._preamble = config_preamble

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.transport.write(self._preamble)

    def data_received(self, data: bytes) -> None:
        self.service.on_worker_frames(self.shard, self.reader.feed(data))

    def connection_lost(self, exc: Exception | None) -> None:
        self.service.on_worker_lost(self.shard, self)


def _times_of(p: Pending) -> tuple[float, float]:
    """A request's TTL and SLO (seconds, 0: none) from what the distributor forwards of it (`admit`)."""
    payload = p.payload
    return payload[1], payload[2]


def _exit_words(status: int | None) -> str:
    """How a worker ended, in words, from its exit status (None: it was still running, and was killed)."""
    if status is None:
        return "closed its link"
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


class Shard:
    """Supervision state of one worker process."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.link: WorkerLink | None = None
        self.writer = BatchWriter()
        self.ready = False
        self.restarts = 0
        self.backoff = RestartBackoff()
        self.pid = 0
        self.spawn_failures = 0  # failed attempts to start this shard's worker, ever
        self.spawned_at = 0.0  # when its worker last started (monotonic): its Hello is due within WORKER_START_TIMEOUT
        self.failing_since = 0.0  # monotonic time the current run of failed attempts began; 0: none
        self.frames_to = 0  # frames sent to and received from this shard, for `bench.hops`
        self.frames_from = 0
        self.frames_base = 0  # `frames_from` when its current worker started (what it wrote is counted from 0)
        # this pass's Enqueues to it, in `shm.backlog_bytes` units: its input backlog (`add_sent`) grows by
        # them when the pass ends (`Distributor._flush`), so every pick of a pass sees it as it began
        self.sent = 0


class Distributor:
    """Implements `distributor.api.Admission` for the HTTP and binary front-ends."""

    def __init__(self, config: Config, shards: int, acceptors: int = 0) -> None:
        if shards < 1:
            raise ValueError("--shards must be at least 1")
        if acceptors < 0:
            raise ValueError("--acceptors must be 0 or more")
        self.config = config
        self._worker_config = config_preamble(config)  # encoded once, written first to every worker
        self.n_shards = shards
        self.n_acceptors = acceptors  # 0: the fronts run in this process (distributor.acceptors)
        self.acceptors: Any = None  # distributor.acceptors.Acceptors when n_acceptors > 0
        self.ledger = Ledger(config, shards)
        self.ledger.times_of = _times_of
        # per band: the ceilings (below 1) of the bands above it, where a Grant block is cut (`_plan`)
        self._cuts = [[b.ceiling for b in self.ledger.bands[:i] if b.ceiling < 1.0]
                      for i in range(len(self.ledger.bands))]
        self._budget = self.ledger.budget  # (release reads it once per request)
        self._bands = len(config.bands)
        self._multiband = self._bands > 1
        self._band_of, self._default_band = self.ledger.band_of, self.ledger.default_band  # (admit reads them)
        self._fast_path = config.service.fast_path
        self._single = shards == 1
        self._lease = config.service.lease
        if self._bands > 1:  # the exact inversion count (Ledger.close_window) needs the events' times
            self.ledger.clock = time.monotonic_ns
        if shards > 1:  # a shard that stops answering its grants gets no more (ledger.ANSWER_TIMEOUT)
            self.ledger.timer = time.monotonic
        self._waiting = [0] * self._bands  # what band_waiting in shared memory says (ns since, 0: no)
        self.slots = SlotTable(config.flow_slots, config.flow_gc_timeout)
        self.layout = ShmLayout(config.flow_slots, shards, len(config.bands), N_OUTCOMES, N_WAIT_BUCKETS)
        self.shards = [Shard(i) for i in range(shards)]
        self.retry = [RetryAfter() for _ in config.bands]
        self.pending: dict[int, Pending] = {}
        self._parked_ttl: dict[int, asyncio.TimerHandle] = {}  # parked newcomer (or one held behind it) -> TTL timer
        # A flow's order (DESIGN §4.7) across displacement: per (band, flow), its request parked until its
        # victims leave, and the requests of the flow that arrived after it, held (in arrival order, each
        # admitted: its room held, its victims marked) until it is queued or ended, so none of them is
        # queued (or dispatched) ahead of it (`_admit`, `_unblock`, `_release_held`)
        self._parked_of: dict[tuple[int, str], Pending] = {}
        self._held: dict[tuple[int, str], dict[int, Pending]] = {}
        self._releasing: set[tuple[int, str]] = set()  # keys whose held requests go at the end of this pass
        self.tickets: dict[int, Ticket] = {}
        self._owned: dict[Any, set[int]] = {}  # waiter -> its tickets, so a closing connection frees them fast
        # leased ticket -> deadline, in deadline order (an acceptor link reads it: is a ticket leased?)
        self.leases: OrderedDict[int, float] = OrderedDict()
        # leased tickets whose answer is not written yet (`restart_lease`) -> asked back a lease ago (`_revoke`)
        self._unwritten: dict[int, bool] = {}
        # queued requests whose client was told (or, gone, would be told) their outcome before their shard
        # decided one (`_end_on_silent`, `cancel`): what the distributor counts if it ends them itself
        self._told: dict[int, Outcome] = {}
        self._cancels: deque[int] = deque()  # queued requests whose shard is yet to be told to evict them
        self._cancel_pacer: asyncio.Handle | None = None  # (`_send_cancels` scheduled)
        self._cancel_burst = 0  # cancels sent in this pass (`cancel`)
        # the flows of requests ended while their shard was silent, which it may still hold (their slots
        # stay theirs: review 146, reused, the shard's later counts would land on another flow's cells)
        self._left_flows: dict[str, int] = {}
        self._next_id = 1
        self._random = array.array("Q")  # pooled random words for tickets (from the OS's CSPRNG)
        self._rr = 0
        self._jsq_slack = config.service.jsq_slack_bytes
        # With a slack, JSQ-Bytes's pick for a flow starting afresh reads only the shards' input backlogs,
        # which change within a pass only as shards read: the pass's first such pick is its others' (-1:
        # none yet; reset by `_flush` and when a shard goes down or comes up)
        self._fresh_pick = -1
        self._pass_scheduled = False
        self._plan_needed = False
        self._woken: list[int] = []  # this pass's granted shards, in the order to write them (_flush)
        self._written: set[int] = set()  # the shards with frames waiting to be written (_flush)
        self._accepting = False
        self._stopping = False
        self.reading = True  # (`Admission.reading`) False from the moment the exit line's counts are final
        self._hubs: list[Any] = []  # the fronts' hubs in this process (`stop_reading` at the exit)
        self._stop_now = False  # a second signal came: the exit waits for nothing more
        self._started = False
        self.stop_requested = False  # a signal arrived before start() finished
        self._stop_early = asyncio.Event()  # ...set then, so that start() stops waiting (`_ready_or_stopped`)
        self.started = time.monotonic()
        self._checked = self.started  # the last _check_heartbeats
        self.counters = {"tickets_expired": 0, "tickets_released": 0, "worker_restarts": 0, "fast_path": 0,
                         "acceptor_restarts": 0, "dispatches_unclaimed": 0}
        self.guards = Guards()  # protective actions of the fronts (distributor/guards.py)
        self.fd_reserve: FdReserve | None = None  # descriptors kept for worker restarts (fdreserve.py)
        self.segment: Any = None
        self.shm: ShmStats | None = None
        # the shared counters as the workers left them, read once they stopped (`close`): what /metrics and
        # /v1/stats still report after the segment is gone (counters must not fall back to 0: a review)
        self.final_snapshot: ShmSnapshot | None = None
        self.servers: list[asyncio.Server] = []
        self.addresses: dict[str, tuple[str, int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._all_ready: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None
        self._housekeeper: asyncio.TimerHandle | None = None
        self.proxy: Any = None  # distributor.proxy.Proxy in proxy mode (backends configured)

    # ------------------------------------------------------------------ Admission interface

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def ready(self) -> bool:
        return self._accepting and self.shards_ready

    @property
    def shards_ready(self) -> bool:
        return all(s.ready for s in self.shards)

    def _state_changed(self) -> None:
        """Accepting or ready changed: acceptor processes answer /readyz and refuse work from it."""
        if self.acceptors is not None:
            self.acceptors.push_state()

    def on_acceptor_hello(self, link: Any) -> None:
        self.acceptors.hello(link)

    def on_acceptor_lost(self, link: Any) -> None:
        if self.acceptors is not None:
            self.acceptors.lost(link)
        self._schedule_plan()

    def admit(
        self, waiter: Waiter, cid: Any, flow: str, priority: int, size: int, ttl: float, slo: float,
        tokens: int, weight: float, leased: bool, audit: bool = False, *, proxied: bool = False,
    ) -> int:
        request_id = self._next_id  # also the arrival sequence number an audit reports
        self._next_id = request_id + 1
        now = _monotonic()
        # the band: `Ledger.band_index`, its table read here (once per request)
        p = Pending(request_id, flow, self._band_of.get(priority, self._default_band), size,
                    owner=(waiter, cid, leased, audit), payload=(priority, ttl, slo, tokens, weight), received=now,
                    tokens=tokens, weight=weight)
        self.pending[request_id] = p
        try:
            if self._accepting:
                self._admit(p, now)
            else:
                self._finish(p, Outcome.REJECTED_SHUTTING_DOWN, 0.0)
        except Exception:
            self._abandon(request_id)
            raise
        return request_id

    def _abandon(self, request_id: int) -> None:
        """`admit` raised: its caller answers the client 500 and awaits no outcome (Waiter.fail), so
        whatever of the request was queued is ended as a cancelled one (a dispatch that meets it is
        released at once): one outcome per request, and no ticket held until its connection or
        acceptor is gone. `_admit` adds a queued request's Enqueue right after the ledger counts it,
        so the shard gets the cancel's request; only a failure inside `Ledger.enqueue` (arithmetic)
        would leave the ledger counting one the shard never gets."""
        try:
            self.cancel(request_id)
        except Exception:
            log.exception("ending request %d after its admission failed", request_id)

    def cancel(self, request_id: int) -> None:
        p = self.pending.get(request_id)
        if p is None:
            return
        p.owner = None  # nobody to answer; a dispatch that races with this releases at once
        if p.state == PendingState.QUEUED:
            # its shard is told in this pass, as are CANCEL_BATCH a pass (ahead of the grants the client's
            # own tickets free: review 177), the rest CANCEL_BATCH at a time (`_send_cancels`); until then
            # it may dispatch it, which releases at once (`dispatches_unclaimed`)
            if self._cancel_pacer is None and (self._cancel_burst < CANCEL_BATCH or self._loop is None):
                self._cancel_burst += 1
                self._send(p.shard, Cancel(p.id, Outcome.EVICTED_CANCELLED))
            else:
                self._cancels.append(p.id)
                if self._cancel_pacer is None and self._loop is not None:
                    self._cancel_pacer = self._loop.call_later(CANCEL_PAUSE, self._send_cancels)
            # (counted so, not `shard_failure`, if its shard dies before it reads this; not if its client
            # was told it expired first: `_end_on_silent`)
            self._told.setdefault(p.id, Outcome.EVICTED_CANCELLED)
        elif p.state == PendingState.NEW:
            if self._take_held(p) or p.victims_left:  # held, or parked for displacement: its room goes back now
                self._unpark(p)
            self._finish(p, Outcome.EVICTED_CANCELLED, 0.0)
            self._unblock(p)  # (if it was its flow's parked request, those held behind it go)

    def _send_cancels(self, every: bool = False) -> None:
        """Tell the shards to evict the next CANCEL_BATCH requests whose clients left (`cancel`); `every`:
        all of them (at the drain's end, before `Shutdown`: they count `cancelled`, as their clients left)."""
        if self._cancel_pacer is not None:
            self._cancel_pacer.cancel()
            self._cancel_pacer = None
        cancels, pending, queued = self._cancels, self.pending, PendingState.QUEUED
        for _ in range(len(cancels) if every else min(CANCEL_BATCH, len(cancels))):
            p = pending.get(cancels.popleft())
            # still at its shard: queued, or ended here while the shard was silent (`_end_on_silent`:
            # out of the ledger, its room held till the shard's answer to this ends it; review 177:
            # skipped, the shard kept it for ever), not displaced or ended by the shard meanwhile
            if p is not None and (p.state == queued or p.state == _DONE):
                self._send(p.shard, Cancel(p.id, Outcome.EVICTED_CANCELLED))
        if cancels and self._loop is not None:
            self._cancel_pacer = self._loop.call_later(CANCEL_PAUSE, self._send_cancels)

    def release(self, ticket: int, tokens: int = -1, counted: str = "tickets_released") -> bool:
        held = self.tickets.pop(ticket, None)
        if held is None:
            return False
        if tokens >= 0 and held.shard >= 0 and tokens != held.cost:
            # the flow's VTC counter lives on the shard that dispatched it (the fast path charges none); not
            # if that worker has died since (seq -1: its successor's counters never held the charge)
            if held.seq >= 0:
                self._send(held.shard, Charge(held.flow, held.priority, float(tokens - held.cost), held.weight,
                                              held.seq))
            self.ledger.correct(held.priority, held.shard, float(tokens - held.cost), held.flow, held.weight,
                                held.charged)
        # `_disown`, inline (once per request)
        if held.deadline != _INF:  # leased (HTTP)
            self.leases.pop(ticket, None)
            self._unwritten.pop(ticket, None)
            unconfirmed = getattr(held.owner, "unconfirmed", None)  # (distributor.acceptors)
            if unconfirmed:
                unconfirmed.discard(ticket)
        else:  # binary or proxied
            owned = held.owned
            if owned is not None:
                owned.discard(ticket)
                if not owned:
                    del self._owned[held.owner]
        # `Ledger.release` (the budget's own `release`), inline: once per request
        budget, size = self._budget, held.size
        if budget.inflight <= 0 or budget.inflight_bytes < size:
            raise ValueError("release without a matching dispatch")
        budget.inflight -= 1
        budget.inflight_bytes -= size
        self.counters[counted] += 1
        self._plan_needed = True  # (`_schedule_plan`, inline: once per request)
        if not self._pass_scheduled and self._loop is not None:
            self._pass_scheduled = True
            self._loop.call_soon(self._end_pass)
        return True

    def unclaim(self, ticket: int) -> None:
        self.release(ticket, counted="dispatches_unclaimed")  # (so dispatched = tickets issued + these)

    def release_then(
        self, ticket: int, tokens: int, done: Callable[[int, bool], None],
        failed: Callable[[str], None] | None = None,
    ) -> None:
        done(ticket, self.release(ticket, tokens))  # (raising, if it fails: the caller answers)

    def after(self, done: Callable[[], None]) -> None:
        done()  # every call before this one was handled, and answered, when it returned

    def query(self, what: str, done: Callable[[bytes, str], None]) -> None:
        if self.proxy is not None and self.acceptors is not None:
            # proxy mode with acceptors: their proxies' counters first (a round trip to each)
            self.acceptors.gather_proxy_reports(lambda: self._answer_later(what, done))
        else:
            self._answer(what, done)

    def _answer_later(self, what: str, done: Callable[[bytes, str], None]) -> None:
        """`_answer` from a link's frame or a timer: a failure is answered (the caller is not the link)."""
        try:
            if self.shm is None:  # closed while the acceptors' reports were awaited
                done(b"the service stopped", "")  # (an empty content type: failed)
            else:
                self._answer(what, done)
        except Exception as exc:
            log.exception("rendering %s failed", what)
            done(type(exc).__name__.encode(), "")

    def _answer(self, what: str, done: Callable[[bytes, str], None]) -> None:
        if what == "metrics":
            done(*self.metrics())
        else:
            done(msgspec.json.encode(self.stats()), "application/json")

    def delivered(self, ticket: int) -> None:
        """The answer carrying this leased ticket is being written to its client (in this process; with
        acceptors, `LinkDelivered`): its lease runs from now."""
        self.restart_lease(ticket)

    def _revoke(self, ticket: int, now: float) -> None:
        """A leased ticket whose answer has waited out its lease unwritten, behind earlier answers on
        its connection (its client never had it): its front answers that request `evicted: cancelled`
        in its turn and unclaims the dispatch (in this process at once; with acceptors when their
        `LinkUnclaimed` comes, the lease renewed meanwhile). Renewed for good, such an answer held
        the budget the request before it waited for: a deadlock (review 132); expired as any other,
        its client got a dead ticket while another request took its budget (review 126)."""
        held = self.tickets.get(ticket)
        if held is None:  # (gone meanwhile: nothing is held)
            self._unwritten.pop(ticket, None)
            return
        if self._unwritten.get(ticket):  # asked back a lease ago, and neither unclaimed nor written since:
            # expired as any other (review 134: else nothing but its connection's end bounded it)
            del self._unwritten[ticket]
            del self.tickets[ticket]
            self._expire(held)
            return
        self._unwritten[ticket] = True
        self.leases[ticket] = now + self._lease  # (until it is unclaimed, or its write is reported)
        try:
            held.owner.revoke(ticket)
        except Exception:
            log.exception("taking back the unwritten answer of ticket %d failed", ticket)

    def _expire(self, held: Ticket) -> None:
        """A leased ticket's lease ended (taken out of `tickets` by the caller): its budget is free."""
        self._disown(held)
        self.ledger.release(held.size)
        self.counters["tickets_expired"] += 1
        self._schedule_plan()

    def restart_lease(self, ticket: int) -> None:
        """An HTTP ticket's lease runs from the moment its answer is written, not from its dispatch: a
        pipelined admission's answer waits behind the ones before it on its connection, and one that
        waited out its lease there reached its client dead (released 404), its budget given to another
        request while the client used it (review 126: 40-55 % of a soak's pipelined releases). Until
        then it is `_unwritten`; an answer still unwritten when its lease ends is taken back
        (`_revoke`), one never written is released by its front (its connection lost) or, with
        acceptors, when its acceptor is lost (`AcceptorLink`)."""
        self._unwritten.pop(ticket, None)
        leases = self.leases
        if ticket in leases:
            leases[ticket] = _monotonic() + self._lease
            leases.move_to_end(ticket)  # (the deadlines stay in order: each is the latest)

    def release_all(self, waiter: Waiter) -> int:
        mine = list(self._owned.get(waiter, ()))
        for ticket in mine:
            self.release(ticket)
        return len(mine)

    def holds(self, waiter: Waiter) -> bool:
        return waiter in self._owned  # (a set leaves `_owned` once empty)

    def _new_ticket(self) -> int:
        tickets = self.tickets
        while True:
            if not self._random:  # one getrandom() system call per 512 tickets, not one per ticket
                self._random = array.array("Q", os.urandom(8 * 512))
            ticket = self._random.pop() & _TICKET_MASK
            if ticket and ticket not in tickets:
                return ticket

    def _disown(self, held: Ticket) -> None:
        if held.deadline != math.inf:  # leased: an acceptor's link may await its written-report
            unconfirmed = getattr(held.owner, "unconfirmed", None)  # (distributor.acceptors)
            if unconfirmed is not None:
                unconfirmed.discard(held.id)
            return  # (a leased ticket is never in `_owned`: `_finish` files only the others there)
        owned = held.owned
        if owned is not None:
            owned.discard(held.id)
            if not owned:
                del self._owned[held.owner]

    def stats(self) -> dict[str, Any]:
        from distributor.metrics import stats_snapshot

        return stats_snapshot(self)

    def metrics(self) -> tuple[bytes, str]:
        from distributor.metrics import render_metrics

        return render_metrics(self)

    # ------------------------------------------------------------------ admission internals

    def _admit(self, p: Pending, now: float) -> None:
        """`now`: the clock read with the admission (one read per request, not one per step)."""
        ledger = self.ledger
        if self._stopping:
            self._finish(p, Outcome.REJECTED_SHUTTING_DOWN, 0.0)
            return
        # An earlier request of its flow (and band) parked until its victims leave: p is admitted as
        # any request (rejected at once if it cannot fit; else its room held, its victims marked) but
        # waits behind it, so the flow's requests reach their shard in arrival order (`_release_held`)
        parked = self._parked_of
        behind = bool(parked) and parked.get((p.band, p.flow), p) is not p
        # The fast path first: a request dispatched at once never queues, so the queue limits do not
        # apply to it (a full queue of a lower band must not turn away work the backends have room for).
        if not behind and self._fast_path and ledger.can_dispatch_now(p):
            ledger.dispatched_directly(p)
            self.counters["fast_path"] += 1
            self._finish(p, _DISPATCHED, 0.0)
            return
        victims = ledger.check(p)
        if victims is None:
            self._finish(p, Outcome.REJECTED_CAPACITY, 0.0)
            return
        if victims or behind:
            ledger.mark_victims(p, victims)  # (its room held: what is free now, and each victim's as it leaves)
            for victim in victims:
                if victim.state != _DONE:  # (not one ended already, its room held: `Ledger.hold_left`)
                    self._send(victim.shard, Cancel(victim.id, Outcome.EVICTED_DISPLACED))
            if behind:
                self._held.setdefault((p.band, p.flow), {})[p.id] = p
            else:
                parked[(p.band, p.flow)] = p
            ttl = p.payload[1] or self.config.default_ttl
            if ttl and self._loop is not None:  # parked (or held): its TTL runs here, not on a shard
                delay = max(0.0, p.received + ttl - now)
                self._parked_ttl[p.id] = self._loop.call_later(delay, self._parked_expired, p)
            return
        # It fits: routed to a shard and queued there (inline, not a function of its own: once per request)
        shm = self.shm
        assert shm is not None
        flow, band = p.flow, p.band
        # `SlotTable.slot`'s common case (the flow has its slot), inline: once per queued request
        slots = self.slots
        slot = slots.slot_of.get(flow)
        if slot is None:
            slot = slots.slot(flow, now)
        else:
            slots.last_used[flow] = now
        # Flow affinity keeps a backlogged flow on one shard (its order is that shard's to keep); the
        # shard is live: a dead shard's requests are all ended, so no flow is left pointing at it.
        single = self._single  # one shard: no choice to make, nothing read from shared memory
        shard = -1
        if not single:  # `Ledger.affine_shard`, inline
            usage = ledger.bands[band].flows.get(flow)
            if usage is not None:
                shard = usage.shard
        if shard < 0:  # the flow starts afresh: JSQ-Bytes over the shared-memory counters
            fresh = not single and not ledger.slot_items[slot]  # type: ignore[index]
            if single:
                shard = 0
            elif fresh and self._fresh_pick >= 0:
                shard = self._fresh_pick
            else:
                self._rr += 1
                shard = shm.jsq_pick(slot, self._rr, self._jsq_slack, fresh)
            if not self.shards[shard].ready:  # (a shard restarting): the same rule over the live ones
                live = [s.index for s in self.shards if s.ready]
                if not live:
                    self._finish(p, Outcome.EVICTED_SHARD_FAILURE, 0.0)
                    return
                shard = shm.jsq_pick_among(slot, live, self._rr, self._jsq_slack)
            if fresh and self._jsq_slack:  # a live shard: the pass's other fresh flows go there too
                self._fresh_pick = shard
        p.slot = slot
        priority, ttl, slo, tokens, weight = p.payload
        ledger.enqueue(p, shard)
        # The Enqueue right after the ledger counts it queued (written at the end of the pass, after the
        # counters below): from here a failure (`_abandon`) can cancel it on its shard. TTL and SLO
        # deadlines run from the arrival here: the shard gets the receive time, so the gaps between
        # arrivals survive the hop and equal TTLs keep arrival order under edf.
        s = self.shards[shard]  # `_send` and `_schedule_plan`, inline: once per queued request
        s.writer.add(Enqueue(p.id, flow, slot, priority, p.size, ttl, slo, tokens, weight, p.received))
        size = p.size
        shm.add_enq(slot, shard, band, size)
        s.sent += size if size > MIN_BACKLOG_BYTES else MIN_BACKLOG_BYTES  # (`shm.backlog_bytes`, inline)
        if self._multiband and not self._waiting[band]:  # queued from now on, and no grant covers it yet
            self._waiting[band] = since = _monotonic_ns()
            shm.set_waiting(band, since)
        s.frames_to += 1
        self._written.add(shard)
        self._plan_needed = True
        if not self._pass_scheduled and self._loop is not None:
            self._pass_scheduled = True
            self._loop.call_soon(self._end_pass)

    def _finish(
        self, p: Pending, outcome: Outcome, wait: float, counted_by_shard: bool = False, at: float = 0.0,
        decided: int = 0, seq: int = -1,
    ) -> None:
        """Deliver the final outcome of `p` (exactly once), or release what it holds if nobody waits.

        Outcome counters are single-writer: a shard counts what it decided, the distributor the rest.
        `at`: the shard's time of the outcome, when a shard decided it.
        """
        del self.pending[p.id]
        p.state = _DONE
        told = self._told
        if told:  # (its client was told, or would have been, before this: the distributor counts that)
            said = told.pop(p.id, None)
            if said is not None and not counted_by_shard:
                outcome = said
        shm = self.shm
        if shm is not None and not counted_by_shard:
            writer = self.n_shards
            shm.add_outcome(writer, p.band, outcome)
            if outcome == _DISPATCHED:
                shm.observe_no_wait(writer, p.band)
                shm.add_dispatched(writer)
        owner = p.owner
        if owner is None:
            if outcome == _DISPATCHED:  # the client left while this was being dispatched: no ticket
                self.ledger.release(p.size)
                self.counters["dispatches_unclaimed"] += 1  # (so dispatched = tickets issued + these)
                self._schedule_plan()
            return
        waiter, cid, leased, audit = owner
        ticket = 0
        retry_after = 0
        if outcome == _DISPATCHED:
            # `_new_ticket`'s common case, inline (a pooled random word, not taken): once per dispatch
            pool, tickets, size = self._random, self.tickets, p.size
            ticket = pool.pop() & _TICKET_MASK if pool else 0
            if not ticket or ticket in tickets:
                ticket = self._new_ticket()
            if leased:  # HTTP: held until released or the lease ends, whatever becomes of the connection
                deadline, owned = _monotonic() + self._lease, None
                self.leases[ticket] = deadline
                self._unwritten[ticket] = False
            else:  # binary: the connection is the lease (release_all when it closes)
                deadline, owned = _INF, self._owned.get(waiter)
                if owned is None:
                    owned = self._owned[waiter] = set()
                owned.add(ticket)
            tickets[ticket] = Ticket(ticket, size, waiter, deadline, p.shard, p.flow, p.payload[0],
                                     p.tokens or size or 1, owned, p.weight, seq, p.charged)
        elif outcome != _CANCELLED:
            retry = self.retry[p.band]
            retry_after = retry.rejected(_monotonic()) if outcome == _REJECTED_CAPACITY else retry.value
        if audit:
            waiter.deliver(cid, p.id, outcome, ticket, wait, retry_after, self._audit(p, outcome, wait, at, decided))
        else:
            waiter.deliver(cid, p.id, outcome, ticket, wait, retry_after)

    def _end_on_silent(self, silent: list[int], now: float) -> None:
        """The silent shards (no heartbeat for SHARD_SILENT: stopped or wedged) fire no TTL timer and read
        no cancel: their queued requests whose TTL has passed are answered `evicted: ttl` here, as the
        shard would have, and those whose client left (`cancel`) end here (review 143: a 1 s TTL ended
        at 5.2 s, `shard_failure`, when the shard was killed, and meanwhile their band held every lower
        band back on every shard, as a cancelled one's did). Each leaves the ledger now (its band's claim
        on strict priority goes) though its shard still holds it, so its room stays held (`Ledger.
        hold_left`: review 146, the queue refilled at each tick) and its flow's slot kept: the shard's
        engine evicts an expired one as it reads again, never dispatching it, and one whose cancel it
        reads; its answer then ends the request here quietly and frees its room (`on_worker_frames`,
        its state DONE); a restart or the drain does (`on_worker_lost`, `close`). It is counted as its
        client was told, or would have been (`_told`). Only a dispatch the shard committed before the
        deadline or the cancel and reported after it (stopped in between) reaches nobody then:
        released at once (`dispatches_unclaimed`)."""
        if not any(band.shard_items[s] for band in self.ledger.bands for s in silent):
            return  # (nothing queued there: no scan of every request pending)
        default = self.config.default_ttl
        queued, told = PendingState.QUEUED, self._told
        ended = False
        for p in [p for p in self.pending.values() if p.state == queued and p.shard in silent]:
            owner = p.owner
            if owner is None:  # its client left: the cancel waits unread on the shard
                if p.id not in told:
                    continue
            else:
                ttl = p.payload[1] or default
                if not ttl or now - p.received < ttl:
                    continue
                p.owner = None  # (its shard's answer, when it comes, ends it quietly)
                told[p.id] = Outcome.EVICTED_TTL
                waiter, cid, _, audit = owner
                wait, retry_after = now - p.received, self.retry[p.band].value
                if audit:
                    waiter.deliver(cid, p.id, Outcome.EVICTED_TTL, 0, wait, retry_after,
                                   self._audit(p, Outcome.EVICTED_TTL, wait, now, 0))
                else:
                    waiter.deliver(cid, p.id, Outcome.EVICTED_TTL, 0, wait, retry_after)
            ended = True
            newcomer = self.ledger.leave(p)
            self.ledger.hold_left(p)  # (its room stays held while its shard may hold it)
            self._left_flows[p.flow] = self._left_flows.get(p.flow, 0) + 1  # (its slot too: `_flow_busy`)
            if newcomer is not None:  # (it was the last victim a displacing request waited for)
                self._retry_newcomer(newcomer)
        if ended:
            self._schedule_plan()

    def _release_left(self, p: Pending) -> Pending | None:
        """An ended request of a silent shard (`_end_on_silent`) is gone from it too: its room goes back
        (to a displacing request waiting for it, if any: returned, to retry)."""
        left = self._left_flows
        n = left.pop(p.flow) - 1
        if n:
            left[p.flow] = n
        return self.ledger.release_left(p)

    @staticmethod
    def _audit(p: Pending, outcome: Outcome, wait: float, at: float, decided: int) -> Audit:
        """What the service knows of `p`: decided by its shard (`at`; `decided`, ns, when it committed
        a dispatch), or here (fast path, rejection)."""
        if at:
            if outcome != _DISPATCHED:
                return Audit(p.id, p.shard, p.received, at - wait, 0.0)
            return Audit(p.id, p.shard, p.received, at - wait, at, decided / 1e9)
        if outcome != _DISPATCHED:
            return Audit(p.id, -1, p.received, 0.0, 0.0)
        now = time.monotonic()
        return Audit(p.id, -1, p.received, 0.0, now, now)

    # ------------------------------------------------------------------ shard frames

    def on_worker_frames(self, shard: int, messages: list[Any]) -> None:
        self.shards[shard].frames_from += len(messages)
        ledger = self.ledger
        if not self._single:
            ledger.heard_from(shard)  # (ledger.ANSWER_TIMEOUT)
        pending = self.pending
        for msg in messages:
            kind = type(msg)
            if kind is Done:
                p = pending.get(msg.id)
                if p is None:  # already ended by the distributor (shutdown); nothing is owed
                    continue
                outcome = OUTCOMES[msg.outcome]
                if p.state == _DONE:  # out of the ledger already, its shard silent then (`_end_on_silent`)
                    if outcome == _DISPATCHED:  # (committed before its deadline: its grant is answered)
                        ledger.grant_answered(shard, p.size, 0, p, msg.decided)
                    newcomer = self._release_left(p)
                    self._finish(p, outcome, msg.wait, True, msg.at, msg.decided, msg.seq)
                    if newcomer is not None:
                        self._retry_newcomer(newcomer)
                    continue
                covered = False
                if outcome == _DISPATCHED:
                    # (positional arguments: keywords cost ~10 ns each call)
                    band, live = ledger.grant_answered(shard, p.size, 0, p, msg.decided)
                    covered = live and band == p.band
                newcomer = ledger.leave(p, covered)
                self._finish(p, outcome, msg.wait, True, msg.at, msg.decided, msg.seq)  # (counted_by_shard, at, ...)
                if newcomer is not None:
                    self._retry_newcomer(newcomer)
            elif kind is GrantBack:
                ledger.grant_answered(shard, None, msg.need)
            elif kind is Hello:
                self._on_hello(shard, msg)
        self._schedule_plan()

    def _parked_expired(self, p: Pending) -> None:
        """A parked newcomer's TTL ran out before its victims left (one held on a stopped shard, say):
        it ends `evicted: ttl` at its deadline, as a queued request would, and its held room goes back.
        (Or one held behind a parked request of its flow: it ends so too, alone.)"""
        self._parked_ttl.pop(p.id, None)
        now = time.monotonic()
        deadline = p.received + (p.payload[1] or self.config.default_ttl)
        if now < deadline and p.state == PendingState.NEW and self._loop is not None:
            # (the loop's timers run on a millisecond clock: fired up to 1 ms early, review 155)
            self._parked_ttl[p.id] = self._loop.call_later(deadline - now + 0.0005, self._parked_expired, p)
            return
        if p.state == PendingState.NEW and (self._take_held(p) or p.victims_left):
            self._unpark(p)
            self._finish(p, Outcome.EVICTED_TTL, now - p.received)
            self._unblock(p)  # (if it was its flow's parked request, those held behind it go)

    def _take_held(self, p: Pending) -> bool:
        """Take p out of the requests held behind its flow's parked one. Whether it was there."""
        key = (p.band, p.flow)
        held = self._held.get(key)
        if held is None or held.pop(p.id, None) is None:
            return False
        if not held:
            del self._held[key]
        return True

    def _unblock(self, p: Pending) -> None:
        """p, its flow's parked request, is not parked now (queued, dispatched or ended): the requests
        held behind it go, at the end of this pass (`_release_held`): a client that leaves has all of
        its requests cancelled first, so none of them is admitted for nobody meanwhile."""
        key = (p.band, p.flow)
        if self._parked_of.get(key) is not p or (p.state == PendingState.NEW and p.victims_left):
            return  # (not its flow's parked request; or parked again: its retry found more victims)
        if key in self._releasing:
            return
        self._releasing.add(key)
        if self._loop is not None:
            self._loop.call_soon(self._release_held, key)
        else:
            self._release_held(key)

    def _release_held(self, key: tuple[int, str]) -> None:
        """The requests held behind a flow's parked request, which is not parked any more, in arrival
        order: each was admitted as it arrived (its room held, its victims marked); one whose victims
        have not all left is the flow's parked request from now on, and the rest stay behind it; the
        others are queued (or dispatched) in turn, as their room, held until now, allows."""
        self._releasing.discard(key)
        if self._stopping:
            return
        del self._parked_of[key]  # (`_unblock` saw it not parked; nothing parks it again)
        held = self._held.get(key)
        while held:
            q = held.pop(next(iter(held)))
            if not held:
                del self._held[key]
            if q.victims_left:  # still waiting for its own victims: the flow's parked request now
                self._parked_of[key] = q
                return
            try:
                self.ledger.abandon(q)  # its room goes back, and is what admits it again below
                self._retry_newcomer(q, unblock=False)
            except Exception:  # as `admit`'s caller does: the request ends, and its client is answered 500
                log.exception("admitting request %d, held behind its flow's displacing request", q.id)
                owner = q.owner  # (every waiter's `fail` ignores a request it was answered for)
                self._abandon(q.id)
                if owner is not None:
                    owner[0].fail(owner[1], "internal error while admitting")
            if key in self._parked_of:  # it had to displace in turn: the rest wait behind it
                return

    def _unpark(self, p: Pending) -> None:
        self._forget_parked_ttl(p)
        self.ledger.abandon(p)

    def _forget_parked_ttl(self, p: Pending) -> None:
        timer = self._parked_ttl.pop(p.id, None)
        if timer is not None:
            timer.cancel()

    def _retry_newcomer(self, p: Pending, unblock: bool = True) -> None:
        """A request parked for displacement: its victims have left; admit it now (or give up). (Or
        one held behind its flow's parked request: released, `_release_held`; or still held, whose
        own victims have left: it stays, its room held again.)

        Its TTL timer, armed when it was parked, is cancelled; if the TTL ran out meanwhile (the
        timer not run yet) it ends `evicted: ttl` here, never dispatched (the fast path does not look
        at TTLs). Then, unless it parked again, the requests of its flow held behind it go
        (`unblock`: not when `_release_held` itself retries them, one after the other)."""
        if p.id in self._held.get((p.band, p.flow), ()):
            self.ledger.mark_victims(p, [])  # (its victims gone, its room back: held again, as it waits)
            return
        self._forget_parked_ttl(p)
        if p.owner is None:
            self._finish(p, Outcome.EVICTED_CANCELLED, 0.0)
        else:
            ttl = p.payload[1] or self.config.default_ttl
            now = time.monotonic()
            waited = now - p.received
            if ttl and waited >= ttl:
                self._finish(p, Outcome.EVICTED_TTL, waited)
            else:
                self._admit(p, now)
        if unblock and self._parked_of:
            self._unblock(p)

    def _on_hello(self, shard: int, hello: Hello) -> None:
        s = self.shards[shard]
        s.ready = True
        s.pid = hello.pid
        self._fresh_pick = -1
        if self._all_ready is not None and all(x.ready for x in self.shards):
            self._all_ready.set()
        self._state_changed()

    def on_worker_lost(self, shard: int, link: WorkerLink) -> None:
        """A worker's socket closed: it died (or was told to stop). Fail what it held; restart it."""
        s = self.shards[shard]
        if s.link is not link:
            return
        s.link = None
        s.ready = False
        self._fresh_pick = -1
        s.writer = BatchWriter()
        s.sent = 0  # (its Enqueues go with the writer; what was counted sent, reset_shard takes as read)
        if self._stopping:  # (`close` killed it and waited for it, or it finished: nothing writes its cells)
            self._take_back_unreported(shard)
            return
        self._state_changed()
        status = None
        if s.proc is not None:  # reaped first: a worker still running could write its cells after the reset
            try:  # (its link closes as it exits: a dying worker is reaped within moments)
                status = s.proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:  # still running, its link lost: killed here
                with contextlib.suppress(ProcessLookupError):
                    s.proc.kill()
                s.proc.wait()
        now = time.monotonic()
        lost = self.ledger.shard_failed(shard)
        for held in self.tickets.values():  # its tickets' charges died with it: no correction goes to its
            if held.shard == shard:  # successor, whose counters start afresh (a refund of a charge it
                held.seq = -1  # never made would bank; `release`)
        # (said once per death: a killed or crashed worker was restarted without a line in the log; a review)
        log.error("shard %d: its worker (pid %d) %s: %d queued request(s) end evicted: shard_failure; restarting it",
                  shard, s.proc.pid if s.proc is not None else s.pid, _exit_words(status), len(lost))
        # Its cells first (it is reaped: nothing writes them now), so that a newcomer a lost victim frees
        # below is routed by counters that agree with the ledger (JSQ-Bytes's `fresh` pick needs them to)
        assert self.shm is not None
        self._take_back_unreported(shard)
        self.shm.reset_shard(shard)
        self.shm.heartbeat_ns[shard] = 0  # the dead worker's last beat must not condemn its successor
        for p in lost:
            newcomer = self.ledger.leave(p)
            self._finish(p, Outcome.EVICTED_SHARD_FAILURE, now - p.received, at=now)  # (audit: its shard)
            if newcomer is not None:
                self._retry_newcomer(newcomer)
        for p in [p for p in self.pending.values() if p.state == _DONE and p.shard == shard]:  # (`_end_on_silent`:
            newcomer = self._release_left(p)  # out of the ledger, its room held till now, its client told)
            self._finish(p, Outcome.EVICTED_SHARD_FAILURE, now - p.received, at=now)
            if newcomer is not None:
                self._retry_newcomer(newcomer)
        s.restarts += 1
        self.counters["worker_restarts"] += 1
        assert self._loop is not None
        # back off when a worker keeps dying (e.g. at start-up): 0.05 s doubling to 5 s
        self._loop.call_later(s.backoff.died(now), self._respawn, shard)
        self._schedule_plan()

    def _take_back_unreported(self, shard: int) -> None:
        """Shard `shard`'s worker is dead and what it wrote read to the end: what it counted in its cells
        and never wrote (its last window: `workers.worker`) is taken back, so that the requests it held
        are counted once, as they end here (`shard_failure`, or `shutdown` at the exit). Its successor's
        frames are counted from here."""
        s = self.shards[shard]
        if self.shm is None:
            return
        read = s.frames_from - s.frames_base
        written = self.shm.reported_frames(shard)
        if self.shm.take_back_unreported(shard, read) is None:
            log.warning("shard %d: its worker counted %d frames and %d were read; what it counted in the rest "
                        "cannot be taken back exactly, so its outcome counts may count those requests twice",
                        shard, written, read)
        s.frames_base = s.frames_from

    def _respawn(self, shard: int) -> None:
        if not self._stopping and self._loop is not None:
            self._loop.create_task(self._respawn_until_started(shard))

    async def _respawn_until_started(self, shard: int) -> None:
        """Start the shard's worker, retrying with back-off until it starts (or the service stops).

        A failure (out of descriptors, processes or memory) is logged once per run of failures and
        counted (`flowshard_worker_spawn_failures_total`); the recovery is logged too."""
        s = self.shards[shard]
        delay = SPAWN_RETRY_MIN
        while not self._stopping:
            try:
                await self._spawn(shard)
            except OSError as exc:
                s.spawn_failures += 1
                if not s.failing_since:
                    s.failing_since = time.monotonic()
                    log.error("shard %d: cannot start its worker (%s); retrying with back-off", shard, exc)
                await asyncio.sleep(delay)
                delay = min(SPAWN_RETRY_MAX, delay * 2)
                continue
            if s.failing_since:
                log.warning(
                    "shard %d: worker started after %.1f s of failed attempts",
                    shard, time.monotonic() - s.failing_since,
                )
                s.failing_since = 0.0
            return

    # ------------------------------------------------------------------ grants and writes

    # One callback at the end of each event-loop pass plans the grants and then writes each shard's
    # frames: a shard gets its enqueues and the grants for them in one write (and one wake-up), the
    # shards with grants first (_flush).

    def _schedule_plan(self) -> None:
        self._plan_needed = True
        self._schedule_pass()

    def _schedule_pass(self) -> None:
        if not self._pass_scheduled and self._loop is not None:
            self._pass_scheduled = True
            self._loop.call_soon(self._end_pass)

    def _end_pass(self) -> None:
        if self._plan_needed:
            self._plan_needed = False
            at = time.monotonic_ns() if self._bands > 1 else 0  # before the plan: what it judges is older
            self._plan()
            if self._bands > 1:
                self._publish_waiting()
                self._count_inversions(at)
        self._pass_scheduled = False
        self._cancel_burst = 0
        self._flush()

    def _publish_waiting(self) -> None:
        """Tell the shards which bands have queued work no live grant covers (one cell per band, this
        process its only writer). A grant planned before such work arrived may still be on its way;
        the shard narrows it to the higher band at the moment it dispatches (workers.worker), which
        keeps strict priority exact at that moment, not only when the grant was planned."""
        shm = self.shm
        if shm is None:  # closed (the segment is gone); a pass scheduled before close() still runs
            return
        waiting = self._waiting
        now_ns = 0
        for band in self.ledger.bands[:-1]:  # the lowest band is never above another
            b = band.index
            if band.queued_items and band.grantable():
                if not waiting[b]:
                    now_ns = now_ns or time.monotonic_ns()
                    waiting[b] = now_ns
                    shm.set_waiting(b, now_ns)
            elif waiting[b]:
                waiting[b] = 0
                shm.set_waiting(b, 0)

    def _count_inversions(self, at: int) -> None:
        """The ledger is planned: it judges the dispatches it was told of since the last plan (exactly,
        from what its plans left without budget; see Ledger.close_window). This process is the only
        writer of the distributor's row of `inversions`."""
        inverted = self.ledger.close_window(at)
        shm = self.shm
        if inverted and shm is not None:
            for band in inverted:
                shm.add_inversion(self.n_shards, band)

    def _plan(self) -> None:
        """Send the grants the ledger plans. A shard's consecutive grants for the same band and byte cap
        go as one block (one frame, answered grant by grant, in the order the ledger expects). The
        block carries one saturation, the highest of its grants': the band the ledger chose for each
        of them is below its ceiling even there. The shard judges the bands above the grant's by it
        too (which of them it may serve or narrow the grant to), so a grant whose saturation reaches
        the ceiling of a band above starts a new block: every saturation in a block gives those bands
        the same eligibility. (One saturation for the whole block kept a band eligible for the early
        grants from them: low requests were dispatched while it waited; a white-box review.)"""
        if self._stopping:  # past the drain: what close() releases (ended streams) must not dispatch what
            return  # is still queued, which ends `evicted: shutdown`
        blocks: dict[int, list[Any]] = {}  # shard -> its open block: [band, max_bytes, saturation, count]
        last, block = -1, None  # the previous grant's shard and its block (a plan's runs go to one shard)
        cuts = self._cuts
        for shard, band, max_bytes, saturation in self.ledger.plan_grants():
            if shard != last:
                last, block = shard, blocks.get(shard)
            if block is not None and block[0] == band and block[1] == max_bytes and (
                not cuts[band] or not any(block[2] < c <= saturation for c in cuts[band])
            ):
                block[2] = saturation
                block[3] += 1
                continue
            if block is not None:
                self._send(shard, Grant(*block))
            else:
                self._woken.append(shard)
            blocks[shard] = block = [band, max_bytes, saturation, 1]
        for shard, block in blocks.items():
            self._send(shard, Grant(*block))
        woken = self._woken
        if len(woken) > 1:  # least left waiting first, then in plan order (a stable sort keeps it)
            woken.sort(key=self.ledger.uncovered)

    def _send(self, shard: int, message: Any) -> None:
        s = self.shards[shard]
        s.writer.add(message)
        s.frames_to += 1
        self._written.add(shard)
        self._schedule_pass()

    def _flush(self) -> None:
        """Write each shard what this pass left for it: first the shards granted in this pass, those
        left with the least work no grant covers first (ties: the order of their first grant, the
        ledger's fair order), then the rest.

        Each write wakes a sleeping worker, and the workers (more of them than cores) dispatch, answer
        and so free their clients about in the order they are woken; with constant service times the
        clients freed first release first in the next burst of releases too, and the requests they
        send then are queued before the others' arrive, for the budget that burst frees. A shard this
        pass empties holds flows whose every request is being dispatched (a thin closed-loop flow's
        clients, back only once freed): woken first, their next requests are there for the next burst;
        a shard that keeps a backlog loses nothing by waiting its turn (its flows wait for budget
        anyway). Writing in shard index order instead put the low shards first in every pass: on
        fair-alloc at 8 shards, the heavy flows on shards 0 and 1 and the thin `three` on 2-7 (JSQ-Bytes),
        6-7 % of `three`'s requests missed their burst and waited a whole service time (50 ms), none at
        one shard (docs/benchmarks.md, "The thin flow at 8 shards, traced").

        Only the shards given frames since the last write are looked at (`_written`), not every shard:
        with the work packed on one shard a pass costs what it does at one shard. A shard whose link
        is down keeps its frames, and its place there, until the link is back.

        Before any write, each shard's input backlog grows by the Enqueues this pass routed to it
        (`Shard.sent`), written to it or kept: the picks of the next pass see them."""
        self._fresh_pick = -1  # the next pass reads the backlogs this one leaves
        shards = self.shards
        shm = self.shm
        if shm is not None:
            for n in self._written:
                s = shards[n]
                if s.sent:
                    shm.add_sent(n, s.sent)
                    s.sent = 0
        woken = self._woken
        if woken:
            self._woken = []
            for n in woken:
                s = shards[n]
                if s.writer and s.link is not None and s.link.transport is not None:
                    s.link.transport.write(s.writer.take())
        written = self._written
        if not written:
            return
        order = sorted(written)  # (the rest in shard index order, as before)
        written.clear()
        for n in order:
            s = shards[n]
            if s.writer:
                if s.link is not None and s.link.transport is not None:
                    s.link.transport.write(s.writer.take())
                else:
                    written.add(n)

    # ------------------------------------------------------------------ lifecycle

    async def _spawn(self, shard: int) -> None:
        """Start the shard's worker. Raises OSError (having left nothing open) if it cannot."""
        s = self.shards[shard]
        link = WorkerLink(self, shard, self._worker_config)
        s.link = link
        s.spawned_at = time.monotonic()  # (before the await: a check meanwhile must not judge the old start)
        try:
            s.proc, _ = await spawn_linked(
                lambda fds: ["workers", "--shard", str(shard), "--fd", str(fds[0]), "--shm", self.segment.name],
                link, self.fd_reserve,
            )
        except BaseException:
            s.link = None
            raise

    async def start(self) -> None:
        """Create shared memory, start the workers, wait until each says hello, open the listeners."""
        self._loop = asyncio.get_running_loop()
        self._all_ready = asyncio.Event()
        self._stopped = asyncio.Event()
        segment.remove_stale()
        self.fd_reserve = FdReserve()
        self.segment = segment.create(self.layout.nbytes)
        self.shm = ShmStats(self.segment.buf, self.layout, init=True)
        for n in range(self.n_shards):
            await self._spawn(n)
            if self.stop_requested:
                return
        if not await self._ready_or_stopped(self._all_ready, "shard workers"):
            return
        # Render both once now: their first rendering imports and opens what it needs (prometheus-client,
        # /proc), which a service out of descriptors could not, and monitoring got 500 `OSError` then (a
        # review: a flood of 900 connections under `ulimit -n 600`)
        self.stats()
        self.metrics()
        await self._start_proxy()
        if self.n_acceptors:
            await self._start_acceptors()
        else:
            await self._start_fronts()
        if self.stop_requested:
            return
        self._accepting = True
        self._started = True
        if self.acceptors is not None:
            self._state_changed()
            self.acceptors.listen()
        self._housekeeper = self._loop.call_later(HOUSEKEEPING_INTERVAL, self._housekeeping)

    async def _start_proxy(self) -> None:
        """Proxy mode: this process's `Proxy`. Without acceptors it serves the OpenAI routes of the HTTP
        front here; with them each acceptor runs its own for its connections, and this one serves no
        route: it scrapes the backends for the utilization detector (one view for the one ledger),
        and sums the acceptors' counters for /metrics and /v1/stats (distributor.acceptors)."""
        if self.config.proxy.backends:
            from distributor.proxy import Proxy

            self.proxy = Proxy(self.config, self, self._schedule_plan)
            await self.proxy.start()
            if self.proxy.utilization is not None:
                self.ledger.external_saturation = self.proxy.saturation

    async def _start_fronts(self) -> None:
        """The HTTP and binary fronts in this process (with proxy mode's routes, if any)."""
        from distributor.binary import BinaryLimits, start_binary_server
        from distributor.http import HttpLimits, start_http_server

        svc = self.config.service
        http = await start_http_server(
            self, svc.host, svc.port,
            HttpLimits.of_service(svc),
            lease=svc.lease, guards=self.guards, proxy=self.proxy, hubs=self._hubs,
        )
        binary = await start_binary_server(self, svc.host, svc.binary_port, BinaryLimits.of_service(svc), self.guards,
                                           self._hubs)
        for listener in (*http.sockets, *binary.sockets):  # (as `_start_acceptors` does for its own)
            detect_dead_peers(listener, svc.dead_peer_timeout)
        self.servers = [http, binary]
        self.addresses = {"http": http.sockets[0].getsockname()[:2], "binary": binary.sockets[0].getsockname()[:2]}

    async def _start_acceptors(self) -> None:
        """The fronts in acceptor processes: this process listens and accepts, and hands each
        connection to an acceptor (distributor.acceptors); it waits for every acceptor's hello."""
        from distributor.acceptors import Acceptors
        from distributor.binary import LISTEN_BACKLOG
        from distributor.http import listen_backlog

        svc = self.config.service
        http = socket.create_server((svc.host, svc.port), backlog=listen_backlog(svc.max_connections))
        binary = socket.create_server((svc.host, svc.binary_port), backlog=LISTEN_BACKLOG)
        for listener in (http, binary):  # (the connections accepted from them inherit it)
            detect_dead_peers(listener, svc.dead_peer_timeout)
        self.acceptors = Acceptors(self, self.n_acceptors, http, binary, self._worker_config)
        if self.proxy is not None:
            self.proxy.on_health = self.acceptors.backend_health
            if self.proxy.utilization is not None:
                self.proxy.on_full = self.acceptors.backends_full
        await self.acceptors.start()
        await self._ready_or_stopped(self.acceptors.all_ready, "acceptors")
        self.addresses = {"http": http.getsockname()[:2], "binary": binary.getsockname()[:2]}

    async def _ready_or_stopped(self, ready: asyncio.Event, what: str) -> bool:
        """Wait for `ready` (every worker's or acceptor's hello) up to WORKER_START_TIMEOUT, or for a
        signal (`begin_drain` while starting): True once ready, False if a stop was asked for (nothing
        is served yet: `serve` says so and closes). Review 128: a Ctrl-C, and a second one, while a
        worker hung in its start did nothing for 30 s, then a traceback."""
        waits = [asyncio.ensure_future(ready.wait()), asyncio.ensure_future(self._stop_early.wait())]
        try:
            await asyncio.wait(waits, timeout=WORKER_START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if self.stop_requested:
            return False
        if not ready.is_set():
            await self.close()
            raise RuntimeError(f"{what} did not start within {WORKER_START_TIMEOUT:.0f} s")
        return True

    def _housekeeping(self) -> None:
        """Periodic, off the hot path: lease expiry, Retry-After relaxation, slot GC, heartbeats."""
        assert self._loop is not None and self.shm is not None
        now = time.monotonic()
        leases = self.leases
        revoke: list[int] = []
        while leases:
            ticket, deadline = next(iter(leases.items()))
            if deadline > now:
                break
            leases.popitem(last=False)
            if ticket in self._unwritten:  # its answer waited out the lease behind others: taken back
                revoke.append(ticket)
                continue
            held = self.tickets.pop(ticket, None)
            if held is not None:
                self._expire(held)
        for ticket in revoke:
            self._revoke(ticket, now)
        for retry in self.retry:
            retry.tick(now)
        stalled = self._check_heartbeats(time.monotonic_ns())
        if self.acceptors is not None:
            self.acceptors.check_heartbeats(stalled)
        self.slots.collect(now, self._flow_busy)
        self._housekeeper = self._loop.call_later(HOUSEKEEPING_INTERVAL, self._housekeeping)

    def _check_heartbeats(self, now_ns: int) -> bool:
        """A worker that stopped beating is wedged: kill it, and the crash path restarts it. So is a
        restarted one still without its Hello WORKER_START_TIMEOUT after its start (it hung before
        serving: its shard stayed down, and at one shard every request that would queue failed).

        Returns whether this process itself had stalled since the last check (stopped, or its host
        paused it): then nothing is judged, since what was sent meanwhile (a Hello, an acceptor's
        heartbeat) is still unread; the acceptors' check is told so too."""
        assert self.shm is not None
        now = now_ns / 1e9
        stalled, self._checked = now - self._checked > SELF_STALL, now
        if stalled:
            return True
        silent: list[int] = []
        for s in self.shards:
            if s.proc is None or s.link is None:
                continue
            if s.ready:
                beat = int(self.shm.heartbeat_ns[s.index])
                if beat and now_ns - beat > SHARD_SILENT * 1e9:
                    silent.append(s.index)
                if not (beat and now_ns - beat > HEARTBEAT_STALE * 1e9):
                    continue
                log.error("shard %d: its worker stopped beating for %.0f s: killing it", s.index, HEARTBEAT_STALE)
            elif now - s.spawned_at > WORKER_START_TIMEOUT:
                log.error("shard %d: its worker not started within %.0f s: killing it", s.index, WORKER_START_TIMEOUT)
            else:
                continue
            with contextlib.suppress(ProcessLookupError):
                s.proc.kill()
        if silent:
            self._end_on_silent(silent, now)
        ledger = self.ledger
        if set(silent) != ledger.silent:  # (no grants for a silent shard: `Ledger.plan_grants`; back, it may get some)
            ledger.silent = frozenset(silent)
            self._schedule_plan()
        return False

    def _flow_busy(self, flow: str) -> bool:
        return flow in self._left_flows or any(flow in band.flows for band in self.ledger.bands)

    def begin_drain(self) -> bool:
        """SIGTERM/SIGINT: stop accepting; let queued work finish until the drain timeout; then stop.
        Whether this began the drain (not: still starting, or a second signal, which stops now)."""
        if not self._started:
            self.stop_requested = True  # still starting: start() returns at once, and serve() stops
            self._stop_early.set()
            return False
        assert self._loop is not None
        if not self._accepting:
            if self._stopped is not None and not self._stopping:
                self._loop.create_task(self.close(why="signal"))  # a second signal: stop now
            self._stop_now = True  # (and the exit waits no more for clients taking their last answers)
            return False
        self._accepting = False
        for server in self.servers:
            server.close()
        if self.acceptors is not None:
            self.acceptors.stop_listening()
        self._loop.create_task(self._drain_then_close())
        return True

    async def _drain_then_close(self) -> None:
        deadline = time.monotonic() + self.config.service.drain_timeout
        while (self.ledger.queued_items or self._parked() or self._proxied_running()) and (
            time.monotonic() < deadline
        ):
            await asyncio.sleep(0.02)
        await self.close(why="drain")

    def _proxied_running(self) -> bool:
        """Proxy mode: a proxied request is being relayed, here or in an acceptor (its ticket held)."""
        if self.proxy is None:
            return False
        return bool(self.proxy.active) or (self.acceptors is not None and self.acceptors.proxied_running())

    def _parked(self) -> bool:
        return any(p.state == PendingState.NEW for p in self.pending.values())

    async def close(self, *, why: str = "stopped") -> None:
        """End everything queued with `evicted: shutdown`, stop the workers, remove shared memory.
        `why`: "drain" (the drain ended), "signal" (a second signal cut it short) or "stopped" (anything
        else: a failed start, an error); proxy mode says which to the streams it ends."""
        if self._stopping:
            return
        self._stopping = True
        self._accepting = False
        if self._housekeeper is not None:
            self._housekeeper.cancel()
        for server in self.servers:
            server.close()
        if self.proxy is not None:
            if self.acceptors is not None:  # theirs end their streams as this one would (LinkStop)
                self.acceptors.stop_proxies(why)
            await self.proxy.close(why=why)  # ends the responses still streaming; their tickets are released
        self._send_cancels(every=True)
        for s in self.shards:
            if s.link is not None:
                self._send(s.index, Shutdown())
        self._flush()
        await self._await_workers_reports(2.0)
        # A worker that has not finished reporting is killed now, before what it holds is ended below: one
        # resuming meanwhile (stopped) counted in its cells what is ended here (review 149). (One merely busy
        # evicting a very large queue, silent past SHUTDOWN_SILENCE, has counted some already: review 150)
        behind = [s.proc for s in self.shards if s.link is not None and s.proc is not None]
        for proc in behind:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for proc in behind:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
        if behind:
            await self._read_dead_links(0.5)
        for s in self.shards:  # (killed, its link not read to its end in time: taken back as it stands)
            if s.link is not None and s.proc is not None and s.proc in behind:
                self._take_back_unreported(s.index)
        for timer in self._parked_ttl.values():
            timer.cancel()
        self._parked_ttl.clear()
        self._parked_of.clear()
        self._held.clear()
        for p in list(self.pending.values()):  # anything a worker did not report (it died, or never got it;
            # what a killed one counted of it is taken back: `_take_back_unreported`)
            if p.state in (PendingState.QUEUED, PendingState.DISPLACING):
                self.ledger.leave(p)
            elif p.state == _DONE:  # (ended while its shard was silent, its client told: `_end_on_silent`;
                self._release_left(p)  # its shard ended it as it read the Shutdown: expired or cancelled)
            self._finish(p, _SHUTDOWN, time.monotonic() - p.received)
        if self.acceptors is not None:  # every outcome is delivered: the acceptors pass on the last ones
            await self.acceptors.close(cut=lambda: self._stop_now)  # (their clients' last answers: not after
            # a second signal, review 159)
        # From here to the final count nothing waits: the fronts here handle nothing more (what they
        # handled is answered and counted; a client's later requests are read and dropped, never
        # admitted, so are owed no outcome), and the exit line counts every outcome a client was given
        # (a review: admissions read between this count and the exit were rejected uncounted, 32-77 %
        # of a drain's)
        self.reading = False
        for hub in self._hubs:  # (what the clients send from here is read and dropped: a FIN at the exit)
            hub.stop_reading()
        if self._hubs:
            await let_answers_leave(lambda: [t for hub in self._hubs for t in hub.transports()],
                                    cut=lambda: self._stop_now)
        for s in self.shards:
            stuck = s.link is not None  # it did not finish reporting: stopped, wedged or far behind
            if s.link is not None and s.link.transport is not None:
                s.link.transport.close()
            if s.proc is not None:
                if stuck:
                    with contextlib.suppress(ProcessLookupError):
                        s.proc.kill()
                try:
                    s.proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    s.proc.kill()
                    s.proc.wait()
        if self.fd_reserve is not None:
            self.fd_reserve.close()
        if self.shm is not None:
            self.final_snapshot = self.shm.snapshot(max_retries=10)
            self.shm.close()
            self.shm = None
        if self.segment is not None:
            segment.destroy(self.segment)
            self.segment = None
        if self._stopped is not None:
            self._stopped.set()

    async def _read_dead_links(self, limit: float) -> None:
        """What the workers just killed had written is still in their sockets: read to its end (their
        EOF, `on_worker_lost`), for at most `limit` seconds, so that what they counted and reported is
        not ended and counted again here (review 156: a worker busy evicting at the 2 s limit had
        written 10,000 `Done`s the distributor had not read yet; the exit line counted them twice).
        What a worker counted and had not written when it was killed (its last window) is not there: it
        is taken back (`_take_back_unreported`)."""
        start = time.monotonic()
        while any(s.link is not None for s in self.shards) and time.monotonic() - start < limit:
            await asyncio.sleep(0.005)

    async def _await_workers_reports(self, limit: float) -> None:
        """After `Shutdown`: wait until every worker has reported what it evicted and closed its link,
        for at most `limit` seconds, and no longer once every worker still open has been silent for
        `SHUTDOWN_SILENCE` seconds: a stopped or wedged worker would otherwise hold the answers it
        owes, and the exit, for all of `limit` (what it held then ends `evicted: shutdown` here)."""
        start = time.monotonic()
        heard = {s.index: (s.frames_from, start) for s in self.shards}
        while True:
            now = time.monotonic()
            waiting = [s for s in self.shards if s.link is not None]
            if not waiting or now - start >= limit:
                return
            silent = True
            for s in waiting:
                frames, since = heard[s.index]
                if s.frames_from != frames:
                    heard[s.index] = (s.frames_from, now)
                    silent = False
                elif now - since < SHUTDOWN_SILENCE:
                    silent = False
            if silent:
                return
            await asyncio.sleep(0.01)

    async def run_until_stopped(self) -> None:
        assert self._stopped is not None
        await self._stopped.wait()


def stopped_summary(snapshot: ShmSnapshot | None) -> str:
    """Every outcome counted since the start, by label (`dispatched 120, evicted:shutdown 3`), the
    ones that never happened left out."""
    if snapshot is None:
        return "none"
    totals = snapshot["outcomes"].sum(axis=(0, 1)).tolist()
    said = [f"{o.label} {n}" for o, n in zip(OUTCOMES, totals, strict=True) if n]
    return ", ".join(said) if said else "none"


async def serve(config: Config, shards: int, acceptors: int = 0) -> None:
    """`flowshard serve`: run until SIGTERM/SIGINT, then drain and exit."""
    loop = asyncio.get_running_loop()
    stopped_by: list[str] = []
    service: Distributor | None = None

    def on_signal(sig: signal.Signals) -> None:
        stopped_by.append(sig.name)
        # said, or Ctrl-C looks like a hang for up to drain_timeout (a review)
        if service is not None and service.begin_drain():
            ledger = service.ledger
            until = "the queues are empty" if service.proxy is None else (
                "the queues are empty and every proxied response has ended")  # (`_drain_then_close`)
            sys.stderr.write(f"flowshard draining ({sig.name}): {ledger.queued_items} queued, "
                             f"{ledger.budget.inflight} in flight; stopping once {until}, within "
                             f"drain_timeout ({config.service.drain_timeout:g} s); a second signal stops now\n")
            sys.stderr.flush()

    # Before anything starts, the Distributor's construction included: no window without a drain. (Until
    # then asyncio's runner takes a Ctrl-C as a cancel of this task, which an await may swallow: a test
    # saw one signal lost under load, the service then ready and running.)
    # A SIGINT ignored when it started (a background job of a script, as a shell starts one) stays ignored,
    # as the interpreter left it until here: obeyed from here on, a Ctrl-C was lost in the first half second
    # and stopped it after (review 136). SIGTERM stops it then.
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    signals = (signal.SIGTERM,) if ignored else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    service = Distributor(config, shards, acceptors)  # (no signal callback runs before it is there)
    task = asyncio.current_task()
    try:
        await service.start()
        if task is not None and task.cancelling():  # (interrupted before the handlers were in place)
            stopped_by.append("SIGINT")
            service.stop_requested = True
        if service.stop_requested:  # (a review: a Ctrl-C while it started ended it without a word)
            sys.stderr.write(f"flowshard stopped before it was ready ({stopped_by[0]}): nothing was served\n")
            return
        http, binary = (host_port(*service.addresses[k][:2]) for k in ("http", "binary"))
        sys.stderr.write(
            f"flowshard ready: http=http://{http} binary={binary} "
            f"shards={shards} pid={os.getpid()} acceptors={acceptors}\n"
        )
        if service.proxy is not None:
            from distributor.backends import redacted

            backends = ", ".join(redacted(url) for url in config.proxy.backends)
            detector = "on" if config.proxy.utilization else "off"
            sys.stderr.write(f"flowshard proxy: OpenAI routes on the HTTP port -> {backends} "
                             f"(utilization detector {detector})\n")
        sys.stderr.flush()
        await service.run_until_stopped()
        # what ended how, said at the exit: the drain's `evicted: shutdown`s come ~10 ms before it,
        # where no scraper sees them (a review: a scrape every 10 ms missed them)
        sys.stderr.write(f"flowshard stopped; outcomes since the start: {stopped_summary(service.final_snapshot)}\n")
    finally:
        await service.close()
