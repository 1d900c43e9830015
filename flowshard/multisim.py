"""The N-shard service for the simulator: one distributor `Ledger` and N shard `Engine`s, in one process.

`ShardedService` composes the same core objects the real service runs, with the same logic as
`distributor/service.py` (admission: the idle fast path, the exact limits, displacement by parking
the newcomer and cancelling its victims, routing by flow affinity else JSQ-Bytes; `plan_grants`;
Done and GrantBack handling; ticket release) and `workers/worker.py` (Enqueue -> submit; each grant
-> `dispatch`, narrowed to a higher band that waits uncovered, answered by a Done or a GrantBack;
the TTL timer -> `expire`). It offers the budget-mode surface of a single `Engine` (`submit`, `pump`,
`release`, `expire`, `next_deadline`, `take_outbox`, `shutdown`, `collect_garbage`, `budget`), so
`flowshard.simulate` drives either one the same way and judges both with the same figures.

What it idealises: every hop takes zero time and is processed in one fixed order, so the run is
deterministic. A message to a shard is handled as soon as it is sent, and the shard's answers are
handled by the distributor at once, in the order the shard wrote them. Grants are planned once per
"pass" (`pump`: as the service plans at the end of an event-loop pass), delivered in the order the
ledger planned them (or, with `blocks=True`, as the distributor writes them: one block per shard, the
shards in `Distributor._flush`'s order); the next pass is planned when every grant of the previous one
was answered. So
no grant is ever in flight while a request arrives, and the cross-process races of the real service
(grants in transit, stale `band_waiting` cells, crashed shards) are not modelled here: the
random-interleaving model of `tests/multishard.py` covers those.
"""

from __future__ import annotations

import math
from typing import cast

from flowshard.budget import Budget
from flowshard.config import Config
from flowshard.engine import Engine
from flowshard.flow import FlowQueue
from flowshard.ledger import Ledger, Pending, PendingState
from flowshard.shm import pack_within_slack
from flowshard.types import Item, ItemState, Outcome, Request

_INF = math.inf
_DISPATCHED = Outcome.DISPATCHED
_DONE = ItemState.DONE
_MAX_PASSES = 1_000_000  # a pump that plans more passes than this is stuck: a bug, not a workload
FAST_PATH = -1  # the "shard" of a request dispatched at the distributor's idle fast path


class ShardedService:
    """The distributor and its N shards, as one budget-mode engine with zero-latency hops."""

    def __init__(self, config: Config, shards: int, *, track: bool = False, blocks: bool = False) -> None:
        """`blocks`: deliver a pass's grants as the distributor writes them (`Distributor._plan` and
        `_flush`): a shard's grants of the pass as one block, answered one after the other, the blocks
        in the order the distributor writes them (least work left uncovered first, ties in plan
        order), each worker taken to run when written. False (the default): one grant at a time in the
        ledger's plan order, interleaving the shards as one process would."""
        if shards < 1:
            raise ValueError(f"shards must be at least 1, not {shards}")
        self.config = config
        self.n = shards
        self.ledger = ledger = Ledger(config, shards)
        ledger.times_of = lambda p: (p.payload.ttl, p.payload.slo)  # (the request itself, `submit`)
        self.engines = [Engine(config, enforce_limits=False) for _ in range(shards)]
        self.bands = self.engines[0].bands  # band configs, as `Engine.bands` (counts: see `engines`)
        self.budget: Budget = ledger.budget
        self.fast_path = config.service.fast_path
        self._jsq_slack = config.service.jsq_slack_bytes
        self.ceilings = [b.ceiling for b in config.bands]
        self.default_ttl = config.default_ttl
        self.blocks = blocks
        self.outbox: list[Item] = []
        self.pending: dict[int, Pending] = {}
        # dispatched, not yet released (the tickets): request id -> (its shard, FAST_PATH: none; its
        # `Pending.charged`), which a cost correction names (`Distributor.release`)
        self._held: dict[int, tuple[int, int]] = {}
        # JSQ-Bytes, as the shared-memory counters hold it: queued bytes per flow id (all bands) and shard,
        # and per shard; in-transit counts as queued (enq at routing, deq when the shard posts the outcome)
        self._flow_bytes: dict[str, list[int]] = {}
        self._shard_bytes = [0] * shards
        self._rr = 0
        # band_waiting, as the distributor publishes it (set when it routes, recomputed after each plan)
        self._waiting = [False] * len(config.bands)
        # figures for the report
        self.routed = [0] * shards  # requests routed to each shard
        self.dispatched = [0] * shards  # requests each shard dispatched
        self.fast_paths = 0
        self.grantbacks = 0
        self.narrowed = 0
        self.flow_shards: dict[tuple[int, str], list[int]] = {}  # (band, flow) -> requests routed per shard
        # request id -> the shard that held it (FAST_PATH: none), kept only if asked (per-request records)
        self.where: dict[int, int] | None = {} if track else None

    # ------------------------------------------------------------------ the engine surface

    def band_index(self, priority: int) -> int:
        return self.ledger.band_index(priority)

    def submit(self, request: Request, now: float) -> Item:
        """A request reaches the distributor (`Distributor.admit`). Returns its item: queued on a shard
        (`state` QUEUED), or finished at once (`state` DONE: rejected; dispatched at the fast path, its
        outcome already in the outbox). A newcomer that displaces lower-band requests is settled here:
        its victims' cancels reach their shards and their outcomes come back before this returns."""
        band = self.ledger.band_index(request.priority)
        p = Pending(request.id, request.flow, band, request.size, received=now, tokens=request.tokens,
                    weight=request.weight)
        p.payload = request
        self.pending[request.id] = p
        self._admit(p, now)
        if p.state == PendingState.QUEUED:
            item = self.engines[p.shard].queued(request.id)
            assert item is not None
            return item
        item = self.outbox[-1]  # its outcome, decided here (after its victims' outcomes, if it displaced any)
        assert p.state == PendingState.DONE and item.request is request, "a parked newcomer outlived its victims"
        return item

    def pump(self, now: float) -> int:
        """The end of the distributor's pass: plan grants, deliver them in order, handle the answers;
        again until the ledger plans nothing more. Returns the requests the shards dispatched."""
        ledger = self.ledger
        before = sum(self.dispatched)
        for _ in range(_MAX_PASSES):
            grants = ledger.plan_grants()
            self._publish_waiting()
            if not grants:
                return sum(self.dispatched) - before
            if self.blocks and self.n > 1:
                grants = self._as_written(grants)
            for shard, band, max_bytes, saturation in grants:
                self._grant(shard, now, band, _INF if max_bytes < 0 else max_bytes, saturation)
        raise RuntimeError(f"pump did not settle after {_MAX_PASSES} passes")  # pragma: no cover

    def _as_written(self, grants: list[tuple[int, int, int, float]]) -> list[tuple[int, int, int, float]]:
        """A pass's grants in the order the shards carry them out when each gets its grants as one
        block (`Distributor._plan`) and the blocks are written least-left-first (`_flush`)."""
        per: dict[int, list[tuple[int, int, int, float]]] = {}
        for grant in grants:
            per.setdefault(grant[0], []).append(grant)
        order = list(per)  # first-grant (plan) order; a stable sort keeps it among ties
        order.sort(key=self.ledger.uncovered)
        return [grant for n in order for grant in per[n]]

    def release(self, item: Item, actual: int | None = None) -> None:
        """The client released the ticket of a dispatched request (`Distributor.release`). `actual`: its
        actual cost (tokens); as the service does, a difference from what it was charged goes to the
        shard that dispatched it (its engine's `correct`, by the item's `seq`, as `Charge` names it) and
        to the ledger (`Ledger.correct`, by its `Pending.charged`). The fast path charges none."""
        try:
            shard, charged = self._held.pop(item.request.id)
        except KeyError:
            raise ValueError(f"request {item.request.id} holds no budget (not dispatched, or released)") from None
        if actual is not None and shard != FAST_PATH and actual != item.cost:
            request = item.request
            delta = float(actual - item.cost)
            self.engines[shard].correct(request.flow, request.priority, delta, request.weight, item.seq)
            self.ledger.correct(request.priority, shard, delta, request.flow, request.weight, charged)
        self.ledger.release(item.request.size)

    def expire(self, now: float) -> int:
        """Every shard's TTL timer fires: expired requests end, in shard order."""
        n = 0
        for shard, engine in enumerate(self.engines):
            if engine.expire(now):
                n += self._answers(shard, now)
        return n

    def next_deadline(self) -> float:
        return min(engine.next_deadline() for engine in self.engines)

    def collect_garbage(self, now: float) -> int:
        return sum(engine.collect_garbage(now) for engine in self.engines)

    def shutdown(self, now: float, outcome: Outcome = Outcome.EVICTED_SHUTDOWN) -> int:
        """Every shard stops and evicts what it holds; the distributor ends those requests."""
        n = 0
        for shard, engine in enumerate(self.engines):
            n += engine.shutdown(now, outcome)
            self._answers(shard, now)
        for p in list(self.pending.values()):  # nothing is parked between events; kept for completeness
            self._finish(p, outcome, now)
        return n

    def take_outbox(self) -> list[Item]:
        out = self.outbox
        self.outbox = []
        return out

    # ------------------------------------------------------------------ distributor (service.py)

    def _admit(self, p: Pending, now: float) -> None:
        ledger = self.ledger
        if self.fast_path and ledger.can_dispatch_now(p):
            ledger.dispatched_directly(p)
            self.fast_paths += 1
            if self.where is not None:
                self.where[p.id] = FAST_PATH
            self._held[p.id] = (FAST_PATH, 0)
            self._finish(p, _DISPATCHED, now)
            return
        victims = ledger.check(p)
        if victims is None:
            self._finish(p, Outcome.REJECTED_CAPACITY, now)
        elif victims:
            ledger.mark_victims(p, victims)
            for victim in victims:  # Cancel frames: each victim's shard evicts it and answers at once
                if self.engines[victim.shard].cancel(victim.id, now, Outcome.EVICTED_DISPLACED):
                    self._answers(victim.shard, now)
        else:
            self._route(p, now)

    def _route(self, p: Pending, now: float) -> None:
        ledger = self.ledger
        n = self.n
        shard = 0 if n == 1 else ledger.affine_shard(p)
        if shard < 0:
            self._rr += 1
            shard = self._jsq_pick(p.flow)
        ledger.enqueue(p, shard)
        flow_bytes = self._flow_bytes.get(p.flow)
        if flow_bytes is None:
            flow_bytes = self._flow_bytes[p.flow] = [0] * n
        flow_bytes[shard] += p.size
        self._shard_bytes[shard] += p.size
        self._waiting[p.band] = True
        self.routed[shard] += 1
        key = (p.band, p.flow)
        counts = self.flow_shards.get(key)
        if counts is None:
            counts = self.flow_shards[key] = [0] * n
        counts[shard] += 1
        if self.where is not None:
            self.where[p.id] = shard
        # the Enqueue frame: the shard queues it at once (deadlines run from the arrival here)
        self.engines[shard].submit(cast(Request, p.payload), now, p.received)

    def _jsq_pick(self, flow: str) -> int:
        """JSQ-Bytes as `ShmStats.jsq_pick`: fewest queued bytes of this flow, then (with a slack) the
        lowest-numbered shard whose input backlog is within the slack of the least, else the fewest
        queued bytes of the shard, then round robin over the tied shards. Here a shard reads each
        Enqueue as it is sent, so every backlog is 0 and the slack packs onto the first tied shard:
        the service does the same while its shards keep up with their input."""
        queued = self._flow_bytes.get(flow)
        if queued is None:
            tied = list(range(self.n))
        else:
            best = min(queued)
            tied = [s for s, v in enumerate(queued) if v == best]
        if len(tied) > 1:
            if self._jsq_slack:
                return pack_within_slack(tied, [0] * len(tied), self._jsq_slack)
            low = min(self._shard_bytes[s] for s in tied)
            tied = [s for s in tied if self._shard_bytes[s] == low]
        return tied[self._rr % len(tied)]

    def _publish_waiting(self) -> None:
        """`Distributor._publish_waiting`: which bands have queued work no live grant covers."""
        if len(self._waiting) > 1:
            for band in self.ledger.bands[:-1]:
                self._waiting[band.index] = bool(band.queued_items) and band.grantable()

    def _answers(self, shard: int, now: float) -> int:
        """The distributor reads the Done frames shard `shard` just wrote (`on_worker_frames`)."""
        out = self.engines[shard].take_outbox()
        ledger = self.ledger
        flow_bytes = self._flow_bytes
        for item in out:
            request = item.request
            size = request.size
            queued = flow_bytes[request.flow]
            queued[shard] -= size
            self._shard_bytes[shard] -= size
            if not any(queued):
                del flow_bytes[request.flow]
            p = self.pending[request.id]
            covered = False
            if item.outcome == _DISPATCHED:
                band, live = ledger.grant_answered(shard, size, dispatched=p)
                covered = live and band == p.band
                self.dispatched[shard] += 1
                self._held[p.id] = (shard, p.charged)
            newcomer = ledger.leave(p, covered=covered)
            del self.pending[p.id]
            p.state = PendingState.DONE
            self.outbox.append(item)
            if newcomer is not None:
                self._retry_newcomer(newcomer, now)
        return len(out)

    def _retry_newcomer(self, p: Pending, now: float) -> None:
        """A parked newcomer's victims have left: admit it now, unless its TTL ran out meanwhile."""
        request = cast(Request, p.payload)
        ttl = request.ttl or self.default_ttl
        if ttl and now - p.received >= ttl:
            self._finish(p, Outcome.EVICTED_TTL, now)
        else:
            self._admit(p, now)

    def _finish(self, p: Pending, outcome: Outcome, now: float) -> None:
        """An outcome the distributor decides (fast path, rejection, a newcomer's TTL, shutdown)."""
        del self.pending[p.id]
        p.state = PendingState.DONE
        request = cast(Request, p.payload)
        item = Item(request, cast(FlowQueue, None), p.band, 0, 0.0, p.received, _INF, request.tokens or request.size,
                    state=_DONE, outcome=outcome, finished_at=now)
        self.outbox.append(item)

    # ------------------------------------------------------------------ shard (worker.py)

    def _grant(self, shard: int, now: float, band: int, max_bytes: float, saturation: float) -> None:
        """`ShardWorker._grant`: dispatch the best request of band <= `band` here, narrowed to a higher
        band that waits with no grant covering it; answered by its Done frames or a GrantBack."""
        top = band
        if band:
            waiting, ceilings = self._waiting, self.ceilings
            for h in range(band):
                if waiting[h] and ceilings[h] > saturation:
                    top = h
                    break
        engine = self.engines[shard]
        item = engine.dispatch(now, top, max_bytes, saturation)
        if engine.outbox:
            self._answers(shard, now)  # TTL evictions on the way, then the dispatch: in order
        if item is None:
            self.grantbacks += 1
            if top < band:
                self.narrowed += 1
                self.ledger.grant_answered(shard, None, 0)
            else:
                self.ledger.grant_answered(shard, None, engine.blocked_size)
