"""The shard engine: priority bands of flow queues, capacity, TTL, cancellation and dispatch.

Sans-I/O: every method takes `now` (seconds, any monotonic origin) and nothing reads a clock,
a socket or a timer. Final outcomes are appended to `outbox` (one `Item` per request, exactly
once) for the shell to deliver; `take_outbox()` hands them over.

Two ways to drive dispatch:
- grants (`dispatch`): "dispatch the next request of band >= b now", for a distributor that owns
  the global budget and limits (construct with `enforce_limits=False`);
- the engine's own budget (`pump` / `release`), for the simulator and single-process use.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from flowshard.budget import Budget
from flowshard.capacity import shortfall
from flowshard.config import BandConfig, Config, limit
from flowshard.fairness import FAIRNESS, ArrivalFcfs, Fairness, VirtualTokenCounter
from flowshard.flow import FlowQueue
from flowshard.queues import ORDERINGS
from flowshard.stats import N_WAIT_BUCKETS, wait_bucket
from flowshard.types import N_OUTCOMES, Item, ItemState, Outcome, Request

_INF = math.inf
_DONE = ItemState.DONE
_DISPATCHED = Outcome.DISPATCHED
# the most idle flows one `collect_garbage` forgets, timed out or beyond `flow_slots` (a worker calls it
# every 0.1 s; 84,000 at once took 18 ms, a review)
GC_BATCH = 8192



class Band:
    """One priority band: its flows, policies, limits, counters and arrival-order item list."""

    __slots__ = (
        "ceiling",
        "config",
        "deq_bytes",
        "deq_items",
        "enq_bytes",
        "enq_items",
        "fairness",
        "flow_max_bytes",
        "flow_max_items",
        "flows",
        "flows_unlimited",
        "index",
        "max_bytes",
        "max_items",
        "newest",
        "oldest",
        "ordering",
        "outcomes",
        "priority",
        "wait_hist",
    )

    def __init__(self, index: int, config: BandConfig) -> None:
        self.index = index
        self.config = config
        self.priority = config.priority
        self.ceiling = config.ceiling
        self.fairness: Fairness
        if config.fairness == "global-fcfs" and config.ordering == "fcfs":
            self.fairness = ArrivalFcfs(self)  # the band's arrival list is the order: no heap
        else:
            self.fairness = FAIRNESS[config.fairness](config.quantum)
            if isinstance(self.fairness, VirtualTokenCounter):
                self.fairness.max_lag = config.max_lag
        self.ordering = ORDERINGS[config.ordering]
        self.max_bytes = limit(config.max_bytes)
        self.max_items = limit(config.max_requests)
        self.flow_max_bytes = limit(config.flow_max_bytes)
        self.flow_max_items = limit(config.flow_max_requests)
        self.flows_unlimited = self.flow_max_bytes == _INF and self.flow_max_items == _INF
        self.flows: dict[str, FlowQueue] = {}
        self.enq_items = self.enq_bytes = self.deq_items = self.deq_bytes = 0
        self.outcomes = [0] * N_OUTCOMES
        self.wait_hist = [0] * N_WAIT_BUCKETS
        self.oldest: Item | None = None
        self.newest: Item | None = None

    @property
    def queued_items(self) -> int:
        return self.enq_items - self.deq_items

    @property
    def queued_bytes(self) -> int:
        return self.enq_bytes - self.deq_bytes


class Engine:
    """One shard's flow-control state machine. Not thread-safe; one owner drives it."""

    def __init__(self, config: Config | None = None, *, enforce_limits: bool = True) -> None:
        self.config = config = config or Config()
        self.bands = [Band(i, bc) for i, bc in enumerate(config.bands)]
        self._band_of = {b.priority: b.index for b in self.bands}
        self._default_band = self._band_of[config.default_band.priority]
        self.enforce_limits = enforce_limits
        self.max_bytes = limit(config.max_queued_bytes)
        self.max_items = limit(config.max_queued_requests)
        self.default_ttl = config.default_ttl
        self.budget = Budget(limit(config.budget.max_inflight_requests), limit(config.budget.max_inflight_bytes))
        self.queued_items = 0
        self.queued_bytes = 0
        self.shutting_down = False
        self.outbox: list[Item] = []
        self.blocked_size = 0  # set by dispatch(): bytes the chosen request needed, when it did not fit
        self.vetoed = False  # set by dispatch(): `recheck` named a higher band at the last moment
        self._items: dict[int, Item] = {}
        self._no_ceilings = all(b.ceiling >= 1.0 for b in self.bands)
        self._held: set[int] = set()  # ids dispatched by pump() and not yet released
        self._expiry: list[tuple[float, int, Item]] = []
        self._timed = 0
        self._seq = 0
        self._idle: OrderedDict[FlowQueue, float] = OrderedDict()

    # ------------------------------------------------------------------ admission

    def band_index(self, priority: int) -> int:
        """The band a priority maps to; unconfigured priorities go to the default band."""
        return self._band_of.get(priority, self._default_band)

    def submit(self, request: Request, now: float, arrived: float | None = None) -> Item:
        """Admit a request: queue it, or finish it at once (rejected). Returns its item.

        `arrived` is when the request reached the service (default `now`): its TTL and SLO deadlines
        run from there, so a request that spent time in transit to this shard (the distributor's
        receive time travels with it) is ordered by its real arrival, and equal TTLs keep arrival order.
        With displacement on for the request's band, queued requests of lower bands (lowest band
        first, newest first) are evicted to make room under the global limits.
        """
        if arrived is None or arrived > now:
            arrived = now
        if request.id in self._items:
            raise ValueError(f"request id {request.id} is already queued")
        band = self.bands[self._band_of.get(request.priority, self._default_band)]
        flow = band.flows.get(request.flow)
        if flow is None:
            flow = self._new_flow(band, request.flow, now)
        size = request.size
        ttl = request.ttl or self.default_ttl
        deadline = arrived + ttl if ttl > 0 else _INF
        seq = self._seq
        self._seq = seq + 1
        cost = request.tokens or size or 1  # (vtc: a request that declares nothing still costs 1, as the
        # ledger charges it: at 0 its flow's counter never grew, and it starved every flow that declared)
        key = band.ordering.key(request, seq, arrived, deadline)
        item = Item(request, flow, band.index, seq, key, now, deadline, cost)
        if self.shutting_down:
            return self._reject(item, Outcome.REJECTED_SHUTTING_DOWN, now)
        if self.enforce_limits and not self._make_room(band, flow, size, now):
            return self._reject(item, Outcome.REJECTED_CAPACITY, now)

        # The latest admitted request's weight is the flow's, 0 its configured one: not the last non-zero
        # one, which stayed with the flow only while the shard remembered it (two reviews: a client's
        # share went from 4x to 1x as other tenants' new flows pushed its flow out)
        weight = request.weight
        was_weight = flow.weight
        flow.weight = weight if weight > 0 else flow.configured
        self._items[request.id] = item
        newest = band.newest
        item.prev = newest
        if newest is None:
            band.oldest = item
        else:
            newest.next = item
        band.newest = item
        band.enq_items += 1
        band.enq_bytes += size
        flow.queued_items += 1
        flow.queued_bytes += size
        self.queued_items += 1
        self.queued_bytes += size
        queue = flow.queue
        was_idle = queue.live == 0
        queue.push(item)
        if was_idle:
            self._idle.pop(flow, None)
            flow.since = seq
            band.fairness.activate(flow)
        elif band.fairness.tracks_heads and (queue.peek() is item or flow.weight != was_weight):
            band.fairness.head_changed(flow)  # (drr: a parked flow is woken by a new head or weight)
        if deadline != _INF:
            self._timed += 1
            heapq.heappush(self._expiry, (deadline, seq, item))
        return item

    def _new_flow(self, band: Band, flow_id: str, now: float) -> FlowQueue:
        idle = self._idle
        if len(idle) >= self.config.flow_slots:  # as many idle flows as the flow table holds: the oldest go
            self._forget_oldest_idle(2)  # (two a new flow: the excess shrinks, `collect_garbage` does the rest)
        flow = FlowQueue(flow_id, band.index, band.ordering.new_queue(), self.config.weights.get(flow_id, 1.0))
        flow.born = self._seq
        band.fairness.recall(flow)
        band.flows[flow_id] = flow
        idle[flow] = now  # collectable until it holds an item
        return flow

    def _forget_oldest_idle(self, n: int) -> None:
        """Forget the `n` flows idle longest (`collect_garbage`), also before their `flow_gc_timeout`
        once more than `flow_slots` are idle (`_new_flow`): a client giving every request
        a flow of its own made a shard remember each for 300 s, ~1.5 KiB apiece whatever their number
        (a soak review: 220 MB at 390 new flows a second). A flow that comes back starts afresh, as one
        back after its timeout does, but for a VTC counter still ahead (`VirtualTokenCounter.forget`)."""
        idle = self._idle
        bands = self.bands
        for _ in range(min(n, len(idle))):
            flow, _ = idle.popitem(last=False)
            band = bands[flow.band]
            band.fairness.forget(flow)
            del band.flows[flow.id]

    def _make_room(self, band: Band, flow: FlowQueue, size: int, now: float) -> bool:
        if (
            band.flows_unlimited
            and self.queued_bytes + size <= self.max_bytes
            and self.queued_items < self.max_items
            and band.enq_bytes - band.deq_bytes + size <= band.max_bytes
            and band.enq_items - band.deq_items < band.max_items
        ):
            return True  # the common case, without touching the flow's counters
        need = shortfall(size, flow, band, self, self.max_bytes, self.max_items)
        if need is None:
            return False
        need_bytes, need_items = need
        if need_bytes <= 0 and need_items <= 0:
            return True
        if not band.config.displacement:
            return False
        lower = self.bands[band.index + 1 :]
        if sum(b.queued_bytes for b in lower) < need_bytes or sum(b.queued_items for b in lower) < need_items:
            return False  # displacing everything below would not be enough: displace nothing
        for victim_band in reversed(lower):
            while (need_bytes > 0 or need_items > 0) and victim_band.newest is not None:
                victim = victim_band.newest
                need_bytes -= victim.request.size
                need_items -= 1
                self._remove(victim, Outcome.EVICTED_DISPLACED, now)
        return True

    def _reject(self, item: Item, outcome: Outcome, now: float) -> Item:
        item.state = _DONE
        item.outcome = outcome
        item.finished_at = now
        self.bands[item.band].outcomes[outcome] += 1
        self.outbox.append(item)
        return item

    # ------------------------------------------------------------------ exits

    def _finish(self, item: Item, outcome: int, now: float) -> None:
        """Account an item leaving the queues (any reason) and post its outcome. Exactly once."""
        item.state = _DONE
        item.outcome = outcome
        item.finished_at = now
        del self._items[item.request.id]
        band = self.bands[item.band]
        prev, nxt = item.prev, item.next
        if prev is None:
            band.oldest = nxt
        else:
            prev.next = nxt
        if nxt is None:
            band.newest = prev
        else:
            nxt.prev = prev
        item.prev = item.next = None
        size = item.request.size
        flow = item.flow
        band.deq_items += 1
        band.deq_bytes += size
        flow.queued_items -= 1
        flow.queued_bytes -= size
        self.queued_items -= 1
        self.queued_bytes -= size
        band.outcomes[outcome] += 1
        if outcome == _DISPATCHED:
            band.wait_hist[wait_bucket(now - item.enqueued_at)] += 1
        if item.deadline != _INF:
            self._timed = timed = self._timed - 1
            expiry = self._expiry
            if not timed:
                expiry.clear()  # all dead: they would keep their flows alive until their deadlines
            elif len(expiry) > 2 * timed + 1024:
                self._expiry = [e for e in expiry if e[2].state != _DONE]
                heapq.heapify(self._expiry)
        self.outbox.append(item)

    def _remove(self, item: Item, outcome: Outcome, now: float) -> None:
        """Evict a queued item from wherever it is in its flow's queue."""
        flow = item.flow
        fairness = self.bands[item.band].fairness
        was_head = fairness.tracks_heads and flow.queue.peek() is item
        self._finish(item, outcome, now)
        flow.queue.discard()
        if flow.queue.live == 0:
            fairness.deactivate(flow)
            self._idle[flow] = now
        elif was_head:
            fairness.head_changed(flow)

    def cancel(self, request_id: int, now: float, outcome: Outcome = Outcome.EVICTED_CANCELLED) -> bool:
        """Evict a queued request by id in O(1) (amortised); False if it is not queued here."""
        item = self._items.get(request_id)
        if item is None:
            return False
        self._remove(item, outcome, now)
        return True

    def evict_newest(self, band_index: int, now: float, outcome: Outcome = Outcome.EVICTED_DISPLACED) -> Item | None:
        """Evict the newest queued request of a band (displacement driven from outside)."""
        item = self.bands[band_index].newest
        if item is not None:
            self._remove(item, outcome, now)
        return item

    def expire(self, now: float) -> int:
        """Evict every queued request whose deadline is at or before `now`."""
        heap = self._expiry
        n = 0
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)[2]
            if item.state != _DONE:
                self._remove(item, Outcome.EVICTED_TTL, now)
                n += 1
        return n

    def next_deadline(self) -> float:
        """The earliest TTL deadline among queued requests (inf if none): when to call `expire`."""
        heap = self._expiry
        while heap and heap[0][2].state == _DONE:
            heapq.heappop(heap)
        return heap[0][0] if heap else _INF

    def shutdown(self, now: float, outcome: Outcome = Outcome.EVICTED_SHUTDOWN, at_most: int | None = None) -> int:
        """Stop admitting (later submits are rejected `shutting_down`) and evict what is queued: all of
        it, or at most `at_most` items (the oldest admitted first), so that a caller with a very large
        queue can report it in parts. Returns how many were evicted."""
        self.shutting_down = True
        values = self._items.values()
        items = list(values if at_most is None else itertools.islice(values, at_most))
        for item in items:
            self._remove(item, outcome, now)
        return len(items)

    @property
    def holds(self) -> int:
        """How many requests are queued here, in every band."""
        return len(self._items)

    def collect_garbage(self, now: float) -> int:
        """Forget flows that have held nothing for `flow_gc_timeout` seconds, and the longest idle beyond
        `flow_slots` of them, up to `GC_BATCH` a call, so that one call stays short (many flows emptied
        or timed out at once leave more for the next calls; `_new_flow` also forgets two per new flow;
        a review: 100,000 flows timed out together were forgotten in one 40 ms call). O(1) per flow."""
        idle = self._idle
        timeout = self.config.flow_gc_timeout
        over = len(idle) - self.config.flow_slots
        n = 0
        for since in idle.values():  # longest idle first
            if n >= GC_BATCH or (now - since < timeout and n >= over):
                break
            n += 1
        self._forget_oldest_idle(n)
        return n

    # ------------------------------------------------------------------ dispatch

    def _select(self, band: Band, now: float) -> Item | None:
        """The item the band's policies would dispatch next, evicting expired heads on the way."""
        fairness = band.fairness
        while True:
            flow = fairness.pick()
            if flow is None:
                return None
            head = flow.queue.peek()
            assert head is not None
            if head.deadline <= now:
                self._remove(head, Outcome.EVICTED_TTL, now)
                continue
            return head

    def _commit(self, item: Item, now: float) -> None:
        flow = item.flow
        fairness = self.bands[item.band].fairness
        flow.queue.pop()
        fairness.charge(flow, item)
        self._finish(item, _DISPATCHED, now)
        if flow.queue.live == 0:
            fairness.deactivate(flow)
            self._idle[flow] = now
        elif fairness.tracks_heads:
            fairness.head_changed(flow)

    def dispatch(
        self, now: float, band: int | None = None, max_bytes: float = _INF, saturation: float = -1.0,
        recheck: Callable[[int, float], int] | None = None,
    ) -> Item | None:
        """Grant mode: dispatch the next request of band index <= `band` (priority >= its priority).

        Strict priority: the highest band with work is served, skipping bands whose ceiling is
        at or below the grantor's `saturation` (as `pump` does with its own budget). If its chosen request is larger
        than `max_bytes`, nothing is dispatched (the grant is handed back) rather than serving a
        lower band out of order, and `blocked_size` says how many bytes that request needs.

        `recheck(b, saturation)`, when given, is asked right before a request of band b > 0 is
        committed (after the policies chose it, which is most of the call): the highest band <= b
        that may go now. If it names a higher band, nothing is dispatched and `vetoed` is set (the
        bands above b hold nothing here: the grant is for that band's work on another shard).
        """
        self.blocked_size = 0
        self.vetoed = False
        bands = self.bands if band is None else self.bands[: band + 1]
        for b in bands:
            if b.enq_items == b.deq_items or b.ceiling <= saturation:
                continue
            item = self._select(b, now)
            if item is None:
                continue
            if item.request.size > max_bytes:
                self.blocked_size = item.request.size
                return None
            if recheck is not None and item.band and recheck(item.band, saturation) < item.band:
                self.vetoed = True
                return None
            self._commit(item, now)
            return item
        return None

    def pump(self, now: float) -> int:
        """Budget mode: dispatch while the budget allows, strict priority, per-band ceilings.

        A band whose ceiling is reached is skipped (lower bands with a higher ceiling may still
        dispatch); when the chosen request does not fit the budget, dispatch stops there.
        """
        budget = self.budget
        n = 0
        held = self._held
        while True:
            if self._no_ceilings:  # every ceiling is 1: only "a limit is reached" matters, no division
                if budget.inflight >= budget.max_requests or budget.inflight_bytes >= budget.max_bytes:
                    return n
                saturation = 0.0
            else:
                saturation = budget.saturation()
            for b in self.bands:
                if b.enq_items == b.deq_items or saturation >= b.ceiling:
                    continue
                item = self._select(b, now)
                if item is None:
                    continue
                size = item.request.size
                if not budget.fits(size):
                    return n
                self._commit(item, now)
                budget.acquire(size)
                held.add(item.request.id)
                n += 1
                break
            else:
                return n

    def release(self, item: Item, actual: int | None = None) -> None:
        """Budget mode: the dispatched request finished; free its budget (then `pump`).

        `actual`: the cost it really had (tokens); the flow's fairness charge is corrected by the
        difference to what it was charged (see `correct`). Raises ValueError for an item pump() did
        not dispatch, or one already released.
        """
        try:
            self._held.remove(item.request.id)
        except KeyError:
            raise ValueError(f"request {item.request.id} holds no budget (not pump-dispatched, or released)") from None
        self.budget.release(item.request.size)
        if actual is not None:
            request = item.request
            self.correct(request.flow, request.priority, actual - item.cost, request.weight, item.seq)

    def correct(self, flow_id: str, priority: int, delta: float, weight: float = 0.0, seq: int | None = None) -> bool:
        """Correct a flow's fairness charge by `delta` cost units (VTC: its counter moves by delta /
        weight; `weight` the request's own, 0: the flow's configured one). False if the flow is no
        longer known here (collected after idling: VTC keeps a positive correction for its return).

        `seq`: the request's `Item.seq`, if known. A refund for one that arrived before its flow last
        became backlogged takes the counter back at most to where that return lifted it to, less the
        lag the flow kept (see `VirtualTokenCounter.correct`); for one from before this queue was made
        (the flow was forgotten since), at most to that lift point, with no lag: the queue holds its
        charge only if it took back a counter kept ahead (`recall`), as for a flow not known at all
        (reviews: banked as lag, then, dropped, the recalled flow paid all of it); None: treated as a
        request of the flow's present backlog."""
        band = self.bands[self.band_index(priority)]
        flow = band.flows.get(flow_id)
        if weight <= 0:
            weight = flow.configured if flow is not None else self.config.weights.get(flow_id, 1.0)
        if flow is None:
            band.fairness.correct_forgotten(flow_id, delta, weight)
            return False
        if seq is not None and seq < flow.born:  # (tested first: a queue not yet backlogged has `since` 0)
            band.fairness.correct_older(flow, delta, weight)
        else:
            band.fairness.correct(flow, delta, weight, seq is not None and seq < flow.since)
        return True

    # ------------------------------------------------------------------ reading

    def take_outbox(self) -> list[Item]:
        """The items that reached their final outcome since the last call, in order."""
        out = self.outbox
        self.outbox = []
        return out

    def queued(self, request_id: int) -> Item | None:
        return self._items.get(request_id)

    def flows(self) -> list[FlowQueue]:
        return [f for b in self.bands for f in b.flows.values()]

    def stats(self, top_flows: int = 20) -> dict[str, Any]:
        """A JSON-ready snapshot: totals, per band, and the flows with the most queued bytes."""
        outcome_names = [o.label for o in Outcome]
        bands = []
        for b in self.bands:
            bands.append(
                {
                    "priority": b.priority,
                    "name": b.config.name,
                    "queued_items": b.queued_items,
                    "queued_bytes": b.queued_bytes,
                    "active_flows": sum(1 for f in b.flows.values() if f.queue.live),
                    "outcomes": dict(zip(outcome_names, b.outcomes, strict=True)),
                    "wait_hist": list(b.wait_hist),
                }
            )
        flows = sorted(self.flows(), key=lambda f: -f.queued_bytes)[:top_flows]
        return {
            "queued_items": self.queued_items,
            "queued_bytes": self.queued_bytes,
            "inflight": self.budget.inflight,
            "inflight_bytes": self.budget.inflight_bytes,
            "saturation": self.budget.saturation(),
            "bands": bands,
            "top_flows": [
                {
                    "flow": f.id,
                    "priority": self.bands[f.band].priority,
                    "queued_items": f.queued_items,
                    "queued_bytes": f.queued_bytes,
                    "weight": f.weight,
                }
                for f in flows
            ],
        }
