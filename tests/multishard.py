"""A deterministic, in-process model of the whole service: one `Ledger` and N shard `Engine`s.

The distributor half mirrors `distributor/service.py` (admit → check → reject / displace and park /
idle fast path / route; Done and GrantBack handling; `plan_grants` after every distributor event;
tickets and their release; cancellation by a client that went away; shard failure). The shard half
mirrors `workers/worker.py` (Enqueue → submit, Grant → dispatch then Done frames in order, or a
GrantBack; Cancel → cancel; the TTL timer → expire). Between them sit per-shard FIFO channels in
each direction, so a message reaches its peer in order but at any later moment: a scheduler driven
by a seeded random choice picks what happens next (deliver the head of some channel, or a client
operation, or a clock step, or a TTL timer, or a crash), which covers every legal interleaving.

Beside the service state, the model keeps its own ground truth — which request is really queued
where, which grants are really outstanding, what is really in flight — and checks after every step:

- invariant 2: queued bytes/items within the global, band and flow limits; in flight + outstanding
  grants within the request budget; in-flight bytes within the byte budget (except one oversized
  request running alone); the ledger's counters equal the model's independent counts;
- invariant 3: at every dispatch, the planning of the grant it used saw no request of a higher band
  that was queued (on any shard or in transit), eligible under its band's ceiling and holding no
  grant (`first_ungranted`, below); the idle fast path likewise;
- invariant 1: each request is finished exactly once, its client hears at most one outcome (exactly
  one unless it went away), nothing is dispatched twice.

`settle()` delivers everything in flight between the processes; `drain()` also releases every
ticket until nothing is left; `reconcile()` checks invariant 4 against what the engines really hold.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowshard.codec import Cancel, Done, Enqueue, Grant, GrantBack
from flowshard.config import Config
from flowshard.engine import Engine
from flowshard.ledger import Ledger, Pending, PendingState
from flowshard.shm import backlog_bytes
from flowshard.types import Outcome, Request

INF = math.inf
DISPATCHED = Outcome.DISPATCHED


class ModelError(AssertionError):
    """An invariant broke; the message carries the model's recent trace."""


class Choices:
    """The model's source of decisions: a seeded PRNG, after an optional prefix of explicit choices.

    `below(n)` is in [0, n). A prefix (e.g. drawn by hypothesis) makes schedules shrinkable: smaller
    numbers pick earlier options.
    """

    def __init__(self, seed: int = 0, prefix: Sequence[int] = ()) -> None:
        self.rng = random.Random(seed)
        self.prefix = list(prefix)
        self.used = 0

    def below(self, n: int) -> int:
        if n <= 1:
            return 0
        if self.used < len(self.prefix):
            value = self.prefix[self.used] % n
            self.used += 1
            return value
        return self.rng.randrange(n)

    def chance(self, p: float) -> bool:
        return self.below(1 << 20) < p * (1 << 20)

    def pick(self, options: Sequence[Any]) -> Any:
        return options[self.below(len(options))]


@dataclass(eq=False)
class GrantRecord:
    """One grant as the model saw it: planned (with the priority snapshot), processed, answered."""

    seq: int
    shard: int
    band: int
    reserve: int
    step: int
    stamp: int = 0  # send order
    saturation: float = 0.0  # what the planner saw just before planning it
    first_ungranted: float = INF  # the highest eligible band with queued ungranted work when planned
    why: str = ""
    served: int = 0  # the request id the shard dispatched on it (0: handed back / not yet processed)
    processed: bool = False


@dataclass(eq=False)
class DispatchRecord:
    step: int
    shard: int  # -1: the idle fast path
    id: int
    band: int
    grant: GrantRecord | None


@dataclass(eq=False)
class Req:
    """The model's ground truth about one request."""

    id: int
    flow: str
    priority: int
    band: int
    size: int
    ttl: float
    pending: Pending
    admitted_step: int
    abandoned: bool = False  # the client went away (cancel) while it was pending
    outcome: Outcome | None = None
    finishes: int = 0
    delivered: list[Outcome] = field(default_factory=list)
    routed: bool = False  # an Enqueue was sent and no Done came back yet (the distributor's "queued")
    shard: int = -1
    queued_step: int = -1  # when it was routed (last time)
    dispatches: int = 0
    victims: list[int] = field(default_factory=list)  # every victim ever chosen for it
    parked_until_step: int = -1  # last step it was parked for victims
    enq_stamp: int = 0  # send order of its (last) Enqueue
    cancel_stamp: int = 0  # send order of the first Cancel sent for it while routed (0: none)


class Shard:
    def __init__(self, index: int, config: Config) -> None:
        self.index = index
        self.engine = Engine(config, enforce_limits=False)
        self.inbox: deque[tuple[Any, GrantRecord | None]] = deque()  # distributor -> shard
        self.outbox: deque[Any] = deque()  # shard -> distributor
        self.alive = True  # False: crashed; the distributor has not noticed yet
        self.ready = True  # the distributor routes here (False while it handles the crash)
        self.seen: set[int] = set()  # ids the current engine posted an outcome for
        self.restarts = 0


class Model:
    """The service in one process. Public operations mirror what clients and the OS can do."""

    def __init__(
        self,
        config: Config,
        shards: int = 4,
        *,
        seed: int = 0,
        choices: Choices | None = None,
        ledger_factory: Callable[[Config, int], Ledger] = Ledger,
        fast_path: bool | None = None,
        flows: str = "abcde",
        sizes: tuple[int, int] = (1, 60),
        ttls: Sequence[float] = (0.0,),
        weights: dict[str, int] | None = None,
        check_every_step: bool = True,
        raise_on_priority_violation: bool = False,
        trace_len: int = 60,
        narrow: bool = True,
        answer_timer: bool = False,
    ) -> None:
        self.config = config
        self.n = shards
        self.ledger = ledger_factory(config, shards)
        self.ledger.times_of = lambda p: (p.payload[1], 0.0)  # (its requests carry a TTL, no SLO)
        if answer_timer:  # the service's rule for shards behind on their answers, on the model's clock
            self.ledger.timer = lambda: self.now
        self.shards = [Shard(i, config) for i in range(shards)]
        self.choices = choices or Choices(seed)
        self.fast_path = config.service.fast_path if fast_path is None else fast_path
        self.flows = flows
        self.sizes = sizes
        self.ttls = list(ttls)
        self.priorities = [b.priority for b in config.bands]
        self.ceilings = [b.ceiling for b in config.bands]
        self.max_requests = _lim(config.budget.max_inflight_requests)
        self.max_bytes = _lim(config.budget.max_inflight_bytes)
        self.weights = dict(_DEFAULT_WEIGHTS, **(weights or {}))
        self.check_every_step = check_every_step
        self.raise_on_priority_violation = raise_on_priority_violation
        self.now = 0.0
        self.step_no = 0
        self.next_id = 1
        self.grant_seq = 0
        self.stamp = 0  # send order of every distributor -> shard message
        self.rr = 0
        self.reqs: dict[int, Req] = {}
        self.pending: dict[int, Pending] = {}  # the distributor's pending table
        self.tickets: dict[int, int] = {}  # ticket (= request id) -> size, held by clients
        # global room held for a parked newcomer, by its id: [bytes, items] (DESIGN §6.3: it is admitted
        # once its victims' room is free, so no later arrival may take that room meanwhile)
        self.held: dict[int, list[int]] = {}
        self.victim_of: dict[int, int] = {}  # victim id -> the newcomer it makes room for
        self.parked: dict[int, Req] = {}  # newcomers waiting for victims: their band and flow room is held
        self.dist_inflight: dict[int, int] = {}  # dispatched as the distributor knows, not released
        self.dist_grants: list[deque[GrantRecord]] = [deque() for _ in range(shards)]
        self.inflight: dict[int, int] = {}  # ground truth: dispatched (by a shard or fast path), not released
        self.jsq_queued: dict[tuple[str, int], int] = defaultdict(int)  # shm-style enq - deq, per (flow, shard)
        # a crashed shard's unread Enqueues, and those sent to it since, until its loss is noticed: in the
        # service they stay in its input backlog (sent, never taken) until `reset_shard`
        self.lost_backlog = [0] * shards
        self.pass_sent = [0] * shards  # inside `one_pass()`: its Enqueues, not yet in the backlog (service._flush)
        self.dispatches: list[DispatchRecord] = []
        self.violations: list[str] = []  # invariant 3 (strict priority) broken at a dispatch
        self.ceiling_violations: list[str] = []  # a band dispatched at or above its ceiling
        self.overtakes: list[str] = []  # invariant 7: a dispatch ahead of an earlier request of its flow
        # invariant 3 at the moment of dispatch (not only when the grant was planned): a dispatch while a
        # higher eligible band had queued or in-transit work that no grant covered
        self.dispatch_inversions: list[str] = []
        self.narrow = narrow
        # the ledger's exact inversion count (Ledger.close_window), on a clock that ticks at every reading:
        # the model's events are sequential, so the stamps order them exactly
        self.ticks = 0
        self.ledger.clock = self._tick
        self._decided = 0
        self.fast_paths = 0
        self.displacements = 0
        self.cancels_sent = 0
        self.grantbacks = 0
        self.crashes = 0
        self.trace: deque[str] = deque(maxlen=trace_len)
        self._passing = False  # inside `one_pass()`: grants are planned once, at its end
        self._plan_wanted = False

    # ================================================================== client operations

    def admit(self, flow: str, priority: int, size: int, ttl: float = 0.0, *, shard: int | None = None) -> int:
        """A client admits a request (service.admit). Returns its id.

        `shard` pins where it is routed if it gets queued (scripted scenarios); default JSQ-Bytes.
        """
        rid = self.next_id
        self.next_id += 1
        band = self.ledger.band_index(priority)
        p = Pending(rid, flow, band, size, owner=("client", rid), received=self.now)
        p.payload = (priority, ttl, shard)
        self.pending[rid] = p
        self.reqs[rid] = Req(rid, flow, priority, band, size, ttl, p, self.step_no)
        self._log(f"admit #{rid} flow={flow} band={band} size={size} ttl={ttl}")
        self._admit(p)
        self._plan()
        return rid

    def cancel(self, rid: int) -> None:
        """The client went away (service.cancel): nobody to answer; free what it holds."""
        p = self.pending.get(rid)
        if p is None:
            return
        self._log(f"client cancels #{rid} state={PendingState(p.state).name}")
        self.reqs[rid].abandoned = True
        p.owner = None
        if p.state == PendingState.QUEUED:
            self._send(p.shard, Cancel(p.id, Outcome.EVICTED_CANCELLED))
        elif p.state == PendingState.NEW:
            if p.victims_left:  # parked: its held room goes back now (service._unpark)
                self._unpark(p)
            self._finish(p, Outcome.EVICTED_CANCELLED)

    def _unpark(self, p: Pending) -> None:
        """service._unpark: a parked newcomer gives up (cancelled, or its TTL ran out); the model's own
        account of the room held for it is dropped with it, and its victims owe it nothing."""
        self.ledger.abandon(p)
        self.held.pop(p.id, None)
        self.parked.pop(p.id, None)
        for victim in [v for v, n in self.victim_of.items() if n == p.id]:
            del self.victim_of[victim]

    def release(self, ticket: int) -> bool:
        """The client releases a dispatched request's ticket (service.release)."""
        size = self.tickets.pop(ticket, None)
        if size is None:
            return False
        self._log(f"release ticket #{ticket} ({size} B)")
        self.ledger.release(size)
        del self.dist_inflight[ticket]
        del self.inflight[ticket]
        self._plan()
        return True

    def advance(self, dt: float) -> None:
        self.now += dt
        self._log(f"clock +{dt} -> {self.now}")
        for p in [p for p in self.pending.values() if p.state == PendingState.NEW and p.victims_left]:
            ttl = p.payload[1] or self.config.default_ttl
            if ttl and self.now - p.received >= ttl:  # service._parked_expired: its timer in the distributor
                self._log(f"#{p.id} parked past its TTL")
                self._unpark(p)
                self._finish(p, Outcome.EVICTED_TTL)

    # ================================================================== distributor (service.py)

    def _admit(self, p: Pending) -> None:
        ledger = self.ledger
        req = self.reqs[p.id]
        if self.fast_path and ledger.can_dispatch_now(p):  # first: a request that never queues needs no room
            first, why = self.first_ungranted(self._saturation())
            if first < p.band:
                self._violation(f"fast path dispatched #{p.id} of band {p.band} while {why}")
            ledger.dispatched_directly(p)
            self.fast_paths += 1
            self.inflight[p.id] = p.size
            self.dist_inflight[p.id] = p.size
            req.dispatches += 1
            self.dispatches.append(DispatchRecord(self.step_no, -1, p.id, p.band, None))
            self._log(f"#{p.id} fast path")
            self._finish(p, DISPATCHED)
            return
        victims = ledger.check(p)
        if self.check_every_step:
            self._check_admission(p, victims)
        if victims is None:
            self._finish(p, Outcome.REJECTED_CAPACITY)
        elif victims:
            self._hold_for(p, victims)
            ledger.mark_victims(p, victims)
            req.victims.extend(v.id for v in victims)
            req.parked_until_step = self.step_no
            self._log(f"#{p.id} parked, displacing {[v.id for v in victims]}")
            for victim in victims:
                self.displacements += 1
                self._send(victim.shard, Cancel(victim.id, Outcome.EVICTED_DISPLACED))
        else:
            self._route(p)

    def _held_total(self) -> tuple[int, int]:
        return sum(h[0] for h in self.held.values()), sum(h[1] for h in self.held.values())

    def _hold_for(self, p: Pending, victims: list[Pending]) -> None:
        """Parking `p`: the global room free now is held for it at once (up to what it needs)."""
        held_bytes, held_items = self._held_total()
        routed = [r for r in self.reqs.values() if r.routed]
        free_bytes = _lim(self.config.max_queued_bytes) - held_bytes - sum(r.size for r in routed)
        free_items = _lim(self.config.max_queued_requests) - held_items - len(routed)
        self.held[p.id] = [int(max(0, min(p.size, free_bytes))), int(max(0, min(1, free_items)))]
        self.parked[p.id] = self.reqs[p.id]
        for v in victims:
            self.victim_of[v.id] = p.id

    def _victim_left(self, victim: Pending) -> None:
        """A victim left (any outcome): its room is held for its newcomer, until the newcomer's last
        victim leaves and the newcomer is checked again with all of it."""
        nid = self.victim_of.pop(victim.id, None)
        if nid is None:
            return
        if any(v == nid for v in self.victim_of.values()):
            self.held[nid][0] += victim.size
            self.held[nid][1] += 1
        else:
            del self.held[nid]
            del self.parked[nid]

    def _check_admission(self, p: Pending, victims: list[Pending] | None) -> None:
        """An oracle of the capacity rule (DESIGN §6.3) over the model's own counts: reject only over
        a band or flow limit, or over a global limit that displacing every queued (not already
        displaced) request of the lower bands could not cure; else the victims are exactly the
        shortest prefix of those, lowest band first, newest first, that makes room."""
        cfg = self.config
        bc = cfg.bands[p.band]
        held_bytes, held_items = self._held_total()
        if (self.ledger.reserved_bytes, self.ledger.reserved_items) != (held_bytes, held_items):
            self._fail(f"ledger holds {self.ledger.reserved_bytes} B / {self.ledger.reserved_items} for parked "
                       f"newcomers, expected {held_bytes} B / {held_items}")
        routed = [r for r in self.reqs.values() if r.routed]
        band = [r for r in routed if r.band == p.band] + [r for r in self.parked.values() if r.band == p.band]
        flow = [r for r in band if r.flow == p.flow]
        if (
            sum(r.size for r in band) + p.size > _lim(bc.max_bytes)
            or len(band) + 1 > _lim(bc.max_requests)
            or sum(r.size for r in flow) + p.size > _lim(bc.flow_max_bytes)
            or len(flow) + 1 > _lim(bc.flow_max_requests)
        ):
            expected: list[int] | None = None
        else:
            need_bytes = sum(r.size for r in routed) + p.size - (_lim(cfg.max_queued_bytes) - held_bytes)
            need_items = len(routed) + 1 - (_lim(cfg.max_queued_requests) - held_items)
            if need_bytes <= 0 and need_items <= 0:
                expected = []
            elif not bc.displacement:
                expected = None
            else:
                lower = [r for r in routed if r.band > p.band and r.pending.state == PendingState.QUEUED]
                lower.sort(key=lambda r: (-r.band, -r.enq_stamp))
                expected = None
                for k, r in enumerate(lower):
                    need_bytes -= r.size
                    need_items -= 1
                    if need_bytes <= 0 and need_items <= 0:
                        expected = [v.id for v in lower[: k + 1]]
                        break
        got = None if victims is None else [v.id for v in victims]
        if got != expected:
            self._fail(f"admission of #{p.id} (band {p.band}, {p.size} B): check() gave {got}, expected {expected}")

    def _route(self, p: Pending) -> None:
        priority, ttl, pinned = p.payload
        shard = self.ledger.affine_shard(p)  # as service._route: a backlogged flow stays on its shard
        if shard < 0:
            shard = self.jsq_pick(p.flow) if pinned is None else pinned
        if not self.shards[shard].ready:
            live = [s.index for s in self.shards if s.ready]
            if not live:
                self._finish(p, Outcome.EVICTED_SHARD_FAILURE)
                return
            shard = self.jsq_pick(p.flow, among=live)
        self.ledger.enqueue(p, shard)
        req = self.reqs[p.id]
        req.routed = True
        req.shard = shard
        req.queued_step = self.step_no
        self.jsq_queued[(p.flow, shard)] += p.size
        ttl = ttl or self.config.default_ttl
        if ttl:
            ttl = max(ttl - (self.now - p.received), 1e-9)
        self._log(f"#{p.id} -> shard {shard}")
        self._send(shard, Enqueue(p.id, p.flow, 0, priority, p.size, ttl, 0.0, 0, 0.0))

    def jsq_pick(self, flow: str, among: list[int] | None = None) -> int:
        """JSQ-Bytes as in shm.jsq_pick: fewest queued bytes of the flow, then (with a slack) the
        lowest-numbered shard whose input backlog (its Enqueues still in transit) is within the slack
        of the least, else the fewest queued bytes in total, then RR. `among`: over these shards only
        (the live ones, as `ShmStats.jsq_pick_among`)."""
        shards = list(range(self.n)) if among is None else among
        if among is None:
            self.rr += 1
        queued = {n: self.jsq_queued[(flow, n)] for n in shards}
        best = min(queued.values())
        tied = [n for n in shards if queued[n] == best]
        if len(tied) > 1:
            slack = self.config.service.jsq_slack_bytes
            if slack:
                backlog = {n: self.backlog(n) for n in tied}
                least = min(backlog.values())
                return min(n for n in tied if backlog[n] <= least + slack)
            totals = {n: sum(v for (_, m), v in self.jsq_queued.items() if m == n) for n in tied}
            low = min(totals.values())
            tied = [n for n in tied if totals[n] == low]
        return sorted(tied)[self.rr % len(tied)]

    def backlog(self, n: int) -> int:
        """Shard n's input backlog as `ShmStats.shard_backlog_bytes` has it: its Enqueues in transit
        (`backlog_bytes` each), and those a crash lost until the loss is noticed; not those of the pass
        under way (the service counts a pass's Enqueues as it writes them, at its end)."""
        return (self.lost_backlog[n] - self.pass_sent[n]
                + sum(backlog_bytes(m.size) for m, _ in self.shards[n].inbox if type(m) is Enqueue))

    def _finish(self, p: Pending, outcome: Outcome) -> None:
        """service._finish: the final outcome, delivered at most once; a dispatch nobody waits for is released."""
        req = self.reqs[p.id]
        req.finishes += 1
        if req.finishes != 1:
            self._fail(f"#{p.id} finished twice ({req.outcome!r}, then {outcome!r})")
        del self.pending[p.id]
        p.state = PendingState.DONE
        req.outcome = Outcome(outcome)
        self._log(f"#{p.id} finished {Outcome(outcome).label}{' (nobody waits)' if p.owner is None else ''}")
        if p.owner is None:
            if outcome == DISPATCHED:
                self.ledger.release(p.size)
                del self.dist_inflight[p.id]
                del self.inflight[p.id]
                self._plan()
            return
        req.delivered.append(Outcome(outcome))
        if outcome == DISPATCHED:
            self.tickets[p.id] = p.size

    def _retry_newcomer(self, p: Pending) -> None:
        self._log(f"#{p.id} victims gone, retrying admission")
        ttl = p.payload[1] or self.config.default_ttl
        if p.owner is None:
            self._finish(p, Outcome.EVICTED_CANCELLED)
        elif ttl and self.now - p.received >= ttl:  # parked past its TTL: never dispatched
            self._finish(p, Outcome.EVICTED_TTL)
        else:
            self._admit(p)

    def _on_shard_message(self, n: int, msg: Any) -> None:
        """service.on_worker_frames for one message, then plan."""
        ledger = self.ledger
        ledger.heard_from(n)
        if type(msg) is Done:
            p = self.pending.get(msg.id)
            if p is None:
                self._fail(f"Done for #{msg.id} from shard {n}, which is not pending")
            outcome = Outcome(msg.outcome)
            covered = False
            if outcome == DISPATCHED:
                band, live = ledger.grant_answered(n, p.size, dispatched=p, dispatched_at=msg.decided)
                covered = live and band == p.band
                rec = self.dist_grants[n].popleft()
                if rec.served != p.id:
                    self._fail(f"shard {n}: Done(dispatched #{p.id}) answers grant {rec.seq} that served #{rec.served}")
                self.dist_inflight[p.id] = p.size
            req = self.reqs[p.id]
            req.routed = False
            newcomer = ledger.leave(p, covered=covered)
            self._victim_left(p)
            self._finish(p, outcome)
            if newcomer is not None:
                self._retry_newcomer(newcomer)
        elif type(msg) is GrantBack:
            ledger.grant_answered(n, None, msg.need)
            rec = self.dist_grants[n].popleft()
            if rec.served or not rec.processed:
                self._fail(f"shard {n}: GrantBack answers grant {rec.seq} (served #{rec.served})")
            self.grantbacks += 1
        else:  # pragma: no cover
            self._fail(f"unknown message {msg!r}")
        self._plan()

    @contextlib.contextmanager
    def one_pass(self) -> Iterator[None]:
        """The client operations inside run in one pass of the distributor's event loop: the grants are
        planned once, at its end (service._end_pass), e.g. a closed-loop client's release and its next
        request, which arrive in one read."""
        self._passing = True
        try:
            yield
        finally:
            self._passing = False
            self.pass_sent = [0] * self.n
            if self._plan_wanted:
                self._plan_wanted = False
                self._plan()

    def _plan(self) -> None:
        """service._plan: send the grants the ledger plans, snapshotting strict priority for each; then
        the ledger, now planned, judges the dispatches it heard of (service._end_pass)."""
        if self._passing:
            self._plan_wanted = True
            return
        at = self._tick()
        for shard, band, max_bytes, saturation in self.ledger.plan_grants():
            self.grant_seq += 1
            rec = GrantRecord(self.grant_seq, shard, band, max_bytes, self.step_no)
            rec.saturation = self._saturation()
            rec.first_ungranted, rec.why = self.first_ungranted(rec.saturation)
            self.dist_grants[shard].append(rec)
            self._log(f"grant {rec.seq} -> shard {shard} band {band} max_bytes {max_bytes}")
            self._send(shard, Grant(band, max_bytes, saturation), rec)
        for band in self.ledger.close_window(at):
            self._log(f"the ledger counts an inversion of band {band}")

    def _tick(self) -> int:
        self.ticks += 1
        return self.ticks

    def _send(self, n: int, msg: Any, rec: GrantRecord | None = None) -> None:
        self.stamp += 1
        kind = type(msg)
        if kind is Enqueue:
            self.reqs[msg.id].enq_stamp = self.stamp
            if self._passing:
                self.pass_sent[n] += backlog_bytes(msg.size)
            self.reqs[msg.id].cancel_stamp = 0
        elif kind is Cancel:
            req = self.reqs[msg.id]
            req.cancel_stamp = req.cancel_stamp or self.stamp
        elif rec is not None:
            rec.stamp = self.stamp
        shard = self.shards[n]
        if not shard.alive:
            self._log(f"  (lost: {type(msg).__name__} to crashed shard {n})")
            if kind is Enqueue:
                self.lost_backlog[n] += backlog_bytes(msg.size)
            return
        if type(msg) is Cancel:
            self.cancels_sent += 1
        shard.inbox.append((msg, rec))

    def _saturation(self) -> float:
        """What the planner sees, from the model's own records (dispatched-known + grants outstanding)."""
        used = len(self.dist_inflight) + sum(len(g) for g in self.dist_grants)
        used_bytes = sum(self.dist_inflight.values()) + sum(max(r.reserve, 0) for g in self.dist_grants for r in g)
        return max(used / self.max_requests, used_bytes / self.max_bytes)

    # ================================================================== shard (worker.py)

    def deliver_to_shard(self, n: int) -> None:
        shard = self.shards[n]
        msg, rec = shard.inbox.popleft()
        engine = shard.engine
        kind = type(msg)
        if kind is Enqueue:
            engine.submit(
                Request(msg.id, msg.flow, msg.priority, msg.size, msg.ttl, msg.slo, msg.tokens, msg.weight), self.now
            )
            if engine.outbox:
                self._drain_engine(n)
        elif kind is Grant:
            assert rec is not None
            rec.processed = True
            # what the shard reads in the distributor's band_waiting cells at this moment (worker._grant)
            waiting = [h for h in range(msg.band) if self.ledger.bands[h].grantable()
                       and self.ceilings[h] > msg.saturation]
            top = waiting[0] if waiting and self.narrow else msg.band
            item = engine.dispatch(self.now, top, INF if msg.max_bytes < 0 else msg.max_bytes, msg.saturation)
            self._decided = self._tick() if item is not None else 0  # as worker._grant: after the commit
            if item is not None and waiting and waiting[0] < item.band:
                self.dispatch_inversions.append(
                    f"shard {n} dispatched #{item.id} of band {item.band} on grant {rec.seq} while band "
                    f"{waiting[0]} had work no grant covered")
                self._log(f"INVERSION: {self.dispatch_inversions[-1]}")
            if item is not None:
                rec.served = item.id
                self._on_shard_dispatch(n, item.id, item.band, rec)
                self._check_order(n, item)
            self._drain_engine(n)
            self._decided = 0
            if item is None:
                need = 0 if top < msg.band else engine.blocked_size  # as worker._grant
                self._log(f"shard {n} hands grant {rec.seq} back (need {need})")
                shard.outbox.append(GrantBack(msg.band, need))
        elif kind is Cancel:
            engine.cancel(msg.id, self.now, Outcome(msg.outcome))
            if engine.outbox:
                self._drain_engine(n)
        else:  # pragma: no cover
            self._fail(f"unknown message {msg!r}")

    def fire_timer(self, n: int) -> None:
        """The worker's TTL timer: expire everything due on shard n."""
        shard = self.shards[n]
        if not shard.alive:
            return
        engine = shard.engine
        if engine.expire(self.now):
            self._log(f"shard {n} TTL timer")
            self._drain_engine(n)

    def _drain_engine(self, n: int) -> None:
        shard = self.shards[n]
        for item in shard.engine.take_outbox():
            if item.id in shard.seen:
                self._fail(f"shard {n} posted a second outcome for #{item.id}")
            shard.seen.add(item.id)
            self.jsq_queued[(item.request.flow, n)] -= item.request.size
            decided = self._decided if item.outcome == DISPATCHED else 0
            shard.outbox.append(Done(item.id, item.outcome, item.finished_at - item.enqueued_at, 0.0, decided))

    def _on_shard_dispatch(self, n: int, rid: int, band: int, rec: GrantRecord) -> None:
        req = self.reqs[rid]
        req.dispatches += 1
        if req.dispatches != 1:
            self._fail(f"#{rid} dispatched twice")
        self.inflight[rid] = req.size
        self.dispatches.append(DispatchRecord(self.step_no, n, rid, band, rec))
        self._log(f"shard {n} dispatches #{rid} (band {band}) on grant {rec.seq} (band {rec.band})")
        if rec.saturation >= self.ceilings[band]:
            self._violation(
                f"shard {n} dispatched #{rid} of band {band} on grant {rec.seq} (band {rec.band}) planned at "
                f"saturation {rec.saturation:.3g}, not below band {band}'s ceiling {self.ceilings[band]}",
                kind="ceiling",
            )
        if rec.first_ungranted < band:
            self._violation(
                f"shard {n} dispatched #{rid} of band {band} on grant {rec.seq} planned at step {rec.step} "
                f"while {rec.why}"
            )

    def _check_order(self, n: int, item: Any) -> None:
        """Invariant 7: a dispatch must not overtake a request of its own flow (same band) queued on any
        shard or in transit to one: under `fcfs` an earlier arrival (lower id), under `edf` /
        `slo-deadline` a smaller (deadline key, id) as the engines computed it. A request that was
        parked for displacement is exempt: it re-enters the queue when its victims have left, after
        later arrivals (the same at one shard)."""
        req = self.reqs[item.id]
        fcfs = self.config.bands[item.band].ordering == "fcfs"
        mine = (item.key, item.id)
        earlier: list[int] = []
        for shard in self.shards:
            if not shard.alive:
                continue
            fq = shard.engine.bands[item.band].flows.get(req.flow)
            for other in fq.queue.items() if fq is not None else ():
                if (other.id < item.id) if fcfs else ((other.key, other.id) < mine):
                    earlier.append(other.id)
            if fcfs:
                earlier += [m.id for m, _ in shard.inbox if type(m) is Enqueue and m.id < item.id
                            and self.reqs[m.id].flow == req.flow and self.reqs[m.id].band == item.band]
        earlier = [i for i in earlier if not self.reqs[i].victims]
        if earlier:
            self.overtakes.append(f"shard {n} dispatched #{item.id} (flow {req.flow}, band {item.band}) ahead of "
                                  f"{sorted(earlier)} of its flow")
            self._log(f"ORDER: {self.overtakes[-1]}")

    # ================================================================== crashes

    def crash(self, n: int) -> None:
        """Shard n's worker dies: what it had not read is lost; what it wrote still arrives (then EOF)."""
        shard = self.shards[n]
        if not shard.alive:
            return
        shard.alive = False
        self.crashes += 1
        self._log(f"shard {n} crashes ({len(shard.inbox)} unread messages lost)")
        self.lost_backlog[n] = self.backlog(n)
        shard.inbox.clear()

    def notice_crash(self, n: int) -> list[int]:
        """service.on_worker_lost once shard n's last frames were read. Returns the ids it failed."""
        shard = self.shards[n]
        assert not shard.alive and not shard.outbox
        expected = sorted(r.id for r in self.reqs.values() if r.routed and r.shard == n)
        lost = self.ledger.shard_failed(n)
        got = sorted(p.id for p in lost)
        if got != expected:
            self._fail(f"shard_failed({n}) returned {got}, expected the requests routed there {expected}")
        if self.ledger.outstanding_grants(n):
            self._fail(f"shard_failed({n}) left {self.ledger.outstanding_grants(n)} grants outstanding")
        self.dist_grants[n].clear()
        shard.ready = False
        self._log(f"distributor notices shard {n} is gone: failing {got}")
        for p in lost:
            self.reqs[p.id].routed = False
            newcomer = self.ledger.leave(p)
            self._victim_left(p)
            self._finish(p, Outcome.EVICTED_SHARD_FAILURE)
            if newcomer is not None:
                self._retry_newcomer(newcomer)
        # restart: a fresh worker with empty queues; its shared-memory cells are reset
        restarts = shard.restarts + 1
        self.shards[n] = fresh = Shard(n, self.config)
        fresh.restarts = restarts
        for key in [k for k in self.jsq_queued if k[1] == n]:
            self.jsq_queued[key] = 0
        self.lost_backlog[n] = 0  # (reset_shard)
        self._plan()
        return got

    # ================================================================== invariant 3 snapshot

    def first_ungranted(self, saturation: float) -> tuple[float, str]:
        """The highest band with a request that is queued (on a shard or in transit), holds no grant and
        is eligible under its band's ceiling at `saturation`; (inf, "") if there is none.

        Judged from what the distributor knows when it plans (it wrote every message): per shard, in
        the order they were sent, the requests routed there that have not come back (Done), the
        grants not answered yet and the cancels sent. Replayed as the shard will process them, an
        Enqueue adds a request, a Cancel removes it, a Grant of band g takes one request of the
        highest band <= g present at that point (a request sent after the grant cannot take it),
        preferring one that a Cancel will remove anyway: the lenient reading, so any leftover
        surely holds no grant. Byte caps and TTLs are ignored (the distributor cannot see heads).
        """
        nb = len(self.ceilings)
        left = [0] * nb
        where: dict[int, list[str]] = defaultdict(list)
        events: list[list[tuple[int, int, Any]]] = [[] for _ in range(self.n)]
        for r in self.reqs.values():
            if r.routed:
                events[r.shard].append((r.enq_stamp, 0, r))
                if r.cancel_stamp:
                    events[r.shard].append((r.cancel_stamp, 1, r))
        for n in range(self.n):
            for rec in self.dist_grants[n]:
                events[n].append((rec.stamp, 2, rec))
        for n in range(self.n):
            present: list[list[int]] = [[] for _ in range(nb)]
            doomed = {r.id for r in self.reqs.values() if r.routed and r.shard == n and r.cancel_stamp}
            for _, kind, obj in sorted(events[n], key=lambda e: e[0]):
                if kind == 0:
                    present[obj.band].append(obj.id)
                elif kind == 1:
                    if obj.id in present[obj.band]:
                        present[obj.band].remove(obj.id)
                else:
                    for a in range(min(obj.band, nb - 1) + 1):
                        if present[a] and self.ceilings[a] > obj.saturation:
                            keep = [i for i in present[a] if i not in doomed]
                            present[a].remove(keep[0] if keep else present[a][0])
                            break
            for a in range(nb):
                if present[a]:
                    left[a] += len(present[a])
                    where[a].append(f"shard {n}: {present[a]}")
        for a in range(nb):
            if left[a] and saturation < self.ceilings[a]:
                return a, (
                    f"band {a} had {left[a]} eligible queued request(s) holding no grant "
                    f"({'; '.join(where[a])}; saturation {saturation:.3g} < ceiling {self.ceilings[a]})"
                )
        return INF, ""

    def _violation(self, text: str, kind: str = "priority") -> None:
        """Strict priority (or a band ceiling) broken at a dispatch: recorded, raised if asked to."""
        target = self.ceiling_violations if kind == "ceiling" else self.violations
        target.append(f"step {self.step_no}: {text}")
        if self.raise_on_priority_violation:
            self._fail(f"{'band ceiling' if kind == 'ceiling' else 'strict priority'} violated: {text}")

    # ================================================================== invariants 2 and 4

    def check(self) -> None:
        """Invariant 2 (limits, budget) and the ledger's counters against the model's own counts."""
        ledger = self.ledger
        routed = [r for r in self.reqs.values() if r.routed]
        # the ledger counts exactly the routed requests, per band, flow and shard
        nb = len(ledger.bands)
        items = [0] * nb
        bytes_ = [0] * nb
        shard_items = [[0] * self.n for _ in range(nb)]
        shard_bytes = [[0] * self.n for _ in range(nb)]
        flow_items: dict[tuple[int, str], int] = defaultdict(int)
        flow_bytes: dict[tuple[int, str], int] = defaultdict(int)
        for r in routed:
            items[r.band] += 1
            bytes_[r.band] += r.size
            shard_items[r.band][r.shard] += 1
            shard_bytes[r.band][r.shard] += r.size
            flow_items[(r.band, r.flow)] += 1
            flow_bytes[(r.band, r.flow)] += r.size
        self._expect(ledger.queued_items == sum(items), "ledger queued_items", ledger.queued_items, sum(items))
        self._expect(ledger.queued_bytes == sum(bytes_), "ledger queued_bytes", ledger.queued_bytes, sum(bytes_))
        if ledger.queued_items > ledger.max_items or ledger.queued_bytes > ledger.max_bytes:
            self._fail(f"global limit exceeded: {ledger.queued_items} items / {ledger.queued_bytes} B queued")
        for band in ledger.bands:
            i = band.index
            self._expect(band.queued_items == items[i], f"band {i} queued_items", band.queued_items, items[i])
            self._expect(band.queued_bytes == bytes_[i], f"band {i} queued_bytes", band.queued_bytes, bytes_[i])
            self._expect(band.shard_items == shard_items[i], f"band {i} shard_items", band.shard_items, shard_items[i])
            self._expect(band.shard_bytes == shard_bytes[i], f"band {i} shard_bytes", band.shard_bytes, shard_bytes[i])
            if band.queued_items > band.max_items or band.queued_bytes > band.max_bytes:
                self._fail(f"band {i} limit exceeded: {band.queued_items} items / {band.queued_bytes} B")
            flows = {f: (u.queued_items, u.queued_bytes) for f, u in band.flows.items()}
            truth = {f: (flow_items[(b, f)], flow_bytes[(b, f)]) for (b, f) in flow_items if b == i}
            self._expect(flows == truth, f"band {i} flows", flows, truth)
            for f, (n_items, n_bytes) in truth.items():
                if n_items > band.flow_max_items or n_bytes > band.flow_max_bytes:
                    self._fail(f"flow {f} of band {i} over its limit: {n_items} items / {n_bytes} B")
            granted = sum(1 for g in self.dist_grants for r in g if r.band == i)
            self._expect(band.granted == granted, f"band {i} granted", band.granted, granted)
            per_shard = [sum(1 for r in self.dist_grants[n] if r.band == i) for n in range(self.n)]
            self._expect(band.shard_granted == per_shard, f"band {i} shard_granted", band.shard_granted, per_shard)
        # the budget, as the distributor counts it
        budget = ledger.budget
        outstanding = sum(len(g) for g in self.dist_grants)
        self._expect(
            budget.inflight == len(self.dist_inflight), "budget.inflight", budget.inflight, len(self.dist_inflight)
        )
        dist_bytes = sum(self.dist_inflight.values())
        self._expect(budget.inflight_bytes == dist_bytes, "budget.inflight_bytes", budget.inflight_bytes, dist_bytes)
        self._expect(ledger.grants_out == outstanding, "grants_out", ledger.grants_out, outstanding)
        reserved = sum(max(r.reserve, 0) for g in self.dist_grants for r in g)
        self._expect(ledger.grants_bytes == reserved, "grants_bytes", ledger.grants_bytes, reserved)
        for n in range(self.n):
            got = ledger.outstanding_grants(n)
            self._expect(got == len(self.dist_grants[n]), f"outstanding_grants({n})", got, len(self.dist_grants[n]))
        if budget.inflight + ledger.grants_out > self.max_requests:
            self._fail(f"in flight {budget.inflight} + grants {ledger.grants_out} > {self.max_requests}")
        # the ground truth: really in flight, plus grants a shard has not used yet
        unused = sum(1 for s in self.shards for m, _ in s.inbox if type(m) is Grant)
        if len(self.inflight) + unused > self.max_requests:
            self._fail(f"really in flight {len(self.inflight)} + unused grants {unused} > {self.max_requests}")
        if len(self.inflight) + unused > budget.inflight + ledger.grants_out:
            self._fail("the ledger counts less in flight than there really is")
        really = sum(self.inflight.values())
        if really > self.max_bytes and len(self.inflight) > 1:
            self._fail(f"in-flight bytes {really} > {self.max_bytes} with {len(self.inflight)} requests in flight")
        # the engines hold only routed requests (queued on the right shard)
        for shard in self.shards:
            if not shard.alive:
                continue
            for b in shard.engine.bands:
                item = b.oldest
                while item is not None:
                    r = self.reqs[item.id]
                    if not r.routed or r.shard != shard.index:
                        self._fail(f"shard {shard.index} holds #{item.id}, which the distributor does not count there")
                    item = item.next

    def reconcile(self) -> None:
        """Invariant 4, at quiescence (nothing in transit): ledger total = bands = shards = flows = engines."""
        from conftest import reconcile as reconcile_engine

        if any(s.inbox or s.outbox for s in self.shards):
            self._fail("reconcile() needs quiescence: messages are in transit")
        ledger = self.ledger
        for shard in self.shards:
            reconcile_engine(shard.engine)
        self._expect(
            ledger.queued_items == sum(b.queued_items for b in ledger.bands),
            "ledger items = sum over bands",
            ledger.queued_items,
            sum(b.queued_items for b in ledger.bands),
        )
        self._expect(
            ledger.queued_bytes == sum(b.queued_bytes for b in ledger.bands),
            "ledger bytes = sum over bands",
            ledger.queued_bytes,
            sum(b.queued_bytes for b in ledger.bands),
        )
        self._expect(
            ledger.queued_items == sum(sum(b.shard_items) for b in ledger.bands),
            "ledger items = sum over shards",
            ledger.queued_items,
            sum(sum(b.shard_items) for b in ledger.bands),
        )
        self._expect(
            ledger.queued_bytes == sum(sum(b.shard_bytes) for b in ledger.bands),
            "ledger bytes = sum over shards",
            ledger.queued_bytes,
            sum(sum(b.shard_bytes) for b in ledger.bands),
        )
        self._expect(
            ledger.queued_items == sum(s.engine.queued_items for s in self.shards),
            "ledger items = engines",
            ledger.queued_items,
            [s.engine.queued_items for s in self.shards],
        )
        self._expect(
            ledger.queued_bytes == sum(s.engine.queued_bytes for s in self.shards),
            "ledger bytes = engines",
            ledger.queued_bytes,
            [s.engine.queued_bytes for s in self.shards],
        )
        for band in ledger.bands:
            i = band.index
            eng_items = [s.engine.bands[i].queued_items for s in self.shards]
            eng_bytes = [s.engine.bands[i].queued_bytes for s in self.shards]
            self._expect(band.shard_items == eng_items, f"band {i} per shard = engines", band.shard_items, eng_items)
            self._expect(band.shard_bytes == eng_bytes, f"band {i} per shard = engines", band.shard_bytes, eng_bytes)
            self._expect(band.queued_items == sum(eng_items), f"band {i} items", band.queued_items, eng_items)
            self._expect(band.queued_bytes == sum(eng_bytes), f"band {i} bytes", band.queued_bytes, eng_bytes)
            engine_flows: dict[str, list[int]] = defaultdict(lambda: [0, 0])
            for s in self.shards:
                for fq in s.engine.bands[i].flows.values():
                    if fq.queued_items:
                        engine_flows[fq.id][0] += fq.queued_items
                        engine_flows[fq.id][1] += fq.queued_bytes
            ledger_flows = {f: [u.queued_items, u.queued_bytes] for f, u in band.flows.items()}
            self._expect(
                ledger_flows == dict(engine_flows), f"band {i} flows = engines", ledger_flows, dict(engine_flows)
            )
            self._expect(
                band.queued_items == sum(u.queued_items for u in band.flows.values()),
                f"band {i} items = sum over flows",
                band.queued_items,
                ledger_flows,
            )
            self._expect(band.granted == 0, f"band {i} grants at quiescence", band.granted, 0)
        self._expect(ledger.grants_out == 0, "grants at quiescence", ledger.grants_out, 0)
        self._expect(ledger.grants_bytes == 0, "reserved bytes at quiescence", ledger.grants_bytes, 0)

    def check_empty(self) -> None:
        """After drain(): nothing queued, nothing in flight, every counter zero, everyone answered."""
        self.reconcile()
        ledger = self.ledger
        self._expect(ledger.queued_items == 0, "queued items after drain", ledger.queued_items, 0)
        self._expect(ledger.queued_bytes == 0, "queued bytes after drain", ledger.queued_bytes, 0)
        for band in ledger.bands:
            self._expect(not band.order and not band.flows, f"band {band.index} empty", (band.order, band.flows), ())
            self._expect(band.shard_items == [0] * self.n, f"band {band.index} shard items", band.shard_items, 0)
        self._expect(ledger.budget.inflight == 0, "in flight after drain", ledger.budget.inflight, 0)
        self._expect(ledger.budget.inflight_bytes == 0, "in-flight bytes", ledger.budget.inflight_bytes, 0)
        self._expect(not self.inflight and not self.tickets, "tickets after drain", self.tickets, {})
        self.check_outcomes(final=True)

    def check_outcomes(self, *, final: bool = False) -> None:
        """Invariant 1: one finish per request; the client hears exactly that one (none if it left)."""
        for r in self.reqs.values():
            if r.finishes > 1:
                self._fail(f"#{r.id} finished {r.finishes} times")
            if final and r.finishes != 1:
                self._fail(f"#{r.id} has no outcome (state {PendingState(r.pending.state).name})")
            if r.abandoned and r.delivered:
                self._fail(f"#{r.id}: outcome delivered to a client that went away: {r.delivered}")
            if not r.abandoned and r.finishes and r.delivered != [r.outcome]:
                self._fail(f"#{r.id}: delivered {r.delivered}, outcome {r.outcome!r}")
            if r.dispatches > 1 or (r.finishes and (r.dispatches == 1) != (r.outcome == DISPATCHED)):
                self._fail(f"#{r.id}: {r.dispatches} dispatch(es), outcome {r.outcome!r}")

    # ================================================================== the scheduler

    def step(self) -> None:
        """One random event: a delivery (either direction), a client operation, the clock, a timer."""
        c = self.choices
        w = self.weights
        to_shard = [s.index for s in self.shards if s.inbox]
        to_dist = [s.index for s in self.shards if s.outbox]
        options: list[tuple[int, Callable[[], None]]] = []
        if to_shard:
            options.append((w["to_shard"], lambda: self.deliver_to_shard(c.pick(to_shard))))
        if to_dist:
            options.append((w["to_dist"], lambda: self._deliver_to_dist(c.pick(to_dist))))
        options.append((w["admit"], self._random_admit))
        if self.tickets and w["release"]:
            options.append((w["release"], lambda: self.release(c.pick(sorted(self.tickets)))))
        if self.pending and w["cancel"]:
            options.append((w["cancel"], lambda: self.cancel(c.pick(sorted(self.pending)))))
        if w["advance"]:
            options.append((w["advance"], lambda: self.advance(c.pick((0.25, 0.5, 1.0, 2.0)))))
        if w["timer"]:
            options.append((w["timer"], lambda: self.fire_timer(c.below(self.n))))
        if w["crash"]:
            options.append((w["crash"], lambda: self.crash(c.below(self.n))))
        dead = [s.index for s in self.shards if not s.alive and not s.outbox]
        if dead:
            options.append((w["notice"], lambda: self.notice_crash(c.pick(dead))))
        total = sum(weight for weight, _ in options)
        x = c.below(total)
        for weight, action in options:
            if x < weight:
                action()
                break
            x -= weight
        self.step_no += 1
        if self.check_every_step:
            self.check()
            self.check_outcomes()

    def _deliver_to_dist(self, n: int) -> None:
        self._on_shard_message(n, self.shards[n].outbox.popleft())

    def _random_admit(self) -> None:
        c = self.choices
        flow = c.pick(self.flows)
        priority = c.pick([*self.priorities, _UNKNOWN_PRIORITY])
        lo, hi = self.sizes
        size = lo + c.below(hi - lo + 1)
        ttl = c.pick(self.ttls)
        self.admit(flow, priority, size, ttl)

    def run(self, steps: int) -> Model:
        for _ in range(steps):
            self.step()
        return self

    def settle(self, limit: int = 100_000) -> None:
        """Deliver everything in transit (random interleaving), noticing crashes; no client action."""
        c = self.choices
        for _ in range(limit):
            busy = [s.index for s in self.shards if s.inbox] + [-1 - s.index for s in self.shards if s.outbox]
            dead = [s.index for s in self.shards if not s.alive and not s.outbox]
            if dead:
                self.notice_crash(dead[0])
            elif not busy:
                return
            else:
                pick = c.pick(busy)
                if pick >= 0:
                    self.deliver_to_shard(pick)
                else:
                    self._deliver_to_dist(-1 - pick)
            self.step_no += 1
            if self.check_every_step:
                self.check()
        self._fail("settle() did not terminate")

    def drain(self, limit: int = 10_000) -> None:
        """Release every ticket and deliver everything until nothing is queued, parked or in flight."""
        for _ in range(limit):
            self.settle()
            for n in range(self.n):
                self.fire_timer(n)
            if self.tickets:
                self.release(self.choices.pick(sorted(self.tickets)))
                continue
            if any(s.outbox for s in self.shards):
                continue
            if self.ledger.queued_items or self.pending:
                self._fail(
                    f"stuck: nothing in flight or in transit, yet {self.ledger.queued_items} queued and "
                    f"{sorted(self.pending)[:10]} pending"
                )
            return
        self._fail("drain() did not terminate")

    # ================================================================== helpers

    def _expect(self, ok: bool, what: str, got: Any, expected: Any) -> None:
        if not ok:
            self._fail(f"{what}: got {got!r}, expected {expected!r}")

    def _fail(self, text: str) -> None:
        trace = "\n  ".join(self.trace)
        raise ModelError(f"step {self.step_no}: {text}\n recent events:\n  {trace}")

    def _log(self, text: str) -> None:
        self.trace.append(f"[{self.step_no}] {text}")

    # convenience for scripted scenarios
    def deliver_all_to(self, n: int) -> None:
        while self.shards[n].inbox:
            self.deliver_to_shard(n)

    def deliver_all_from(self, n: int) -> None:
        while self.shards[n].outbox:
            self._deliver_to_dist(n)

    def queued_on(self, n: int) -> list[int]:
        """Ids queued in shard n's engine, per band (highest first), oldest first."""
        out = []
        for b in self.shards[n].engine.bands:
            item = b.oldest
            while item is not None:
                out.append(item.id)
                item = item.next
        return out

    def outcomes(self, ids: Iterable[int] | None = None) -> dict[int, Outcome | None]:
        keys = self.reqs if ids is None else ids
        return {i: self.reqs[i].outcome for i in keys}


_UNKNOWN_PRIORITY = 99  # maps to the default band
_DEFAULT_WEIGHTS = {
    "to_shard": 30,
    "to_dist": 30,
    "admit": 22,
    "release": 10,
    "cancel": 5,
    "advance": 3,
    "timer": 3,
    "crash": 0,
    "notice": 20,
}


def _lim(value: int | None) -> float:
    return INF if value is None else value
