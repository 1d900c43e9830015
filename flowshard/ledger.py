"""The distributor's ledger: exact global limits, displacement and dispatch grants across shards.

The distributor sees every request, so it alone decides admission (limits are never partitioned
across shards) and owns the dispatch budget. Shards hold the queues and run the per-item
fairness and ordering policies; the ledger only counts what each (band, shard) holds, including
requests still in transit to a shard, and hands out grants:

- the highest band with ungranted work whose ceiling is not reached is granted first;
- among the shards holding that band's work, the one with the smallest virtual time (fair shares
  by the weight of the flows each holds, `_shard_rank`; global-fcfs: the oldest uncovered request);
  a band whose flows all sit on one shard (the packed case) grants that one and keeps no fair state,
  as at one shard, until a flow of it goes to a second shard (`_rebase`, `_settle`);
- a grant reserves one request slot of the budget, and under a byte budget a number of bytes
  (twice the band's average queued size on that shard, or what the shard said its head needs);
  the shard answers each grant, in order, with one dispatch or one hand-back.

Counting reserved grants as in flight keeps in-flight <= limit exact, and granting strictly by band
keeps priority strict across shards: no lower band is granted while a higher band has work that
holds no grant and is eligible under its ceiling, or may be once its `unsure` grants are answered.

Priority inversions are counted here too, exactly, from the ledger's own decisions (DESIGN §4.3; the
definition and its proof are in docs/architecture.md, "Strict priority"): a grant travels, so a shard
can use a lower band's grant after a higher band's work arrived. Such a dispatch at time t is an
inversion iff the first plan after t left some of a higher band's work that was already without a
live grant at t still without one (the budget went elsewhere), the higher band being eligible at
the saturation the lower grant was planned at. The shell stamps the events that leave work
uncovered (through the injected `clock`, CLOCK_MONOTONIC ns in the service) and each plan
(`close_window`); the shard stamps its dispatch.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from itertools import compress, islice
from typing import Any

import msgspec

from flowshard.budget import Budget
from flowshard.capacity import NOTHING_HELD, shortfall
from flowshard.config import Config, limit
from flowshard.fairness import most_owed, refund_bound

_INF = math.inf
_TURNS, _BYTES, _TOKENS, _ARRIVALS = range(4)
# The unit in which each fairness policy shares a band between flows (global-fcfs: none, it serves
# arrivals in order, so shards are granted in proportion to what they hold).
_COST_KIND = {"round-robin": _TURNS, "drr": _BYTES, "vtc": _TOKENS, "global-fcfs": _ARRIVALS}
# How far back a band's shortfall intervals are kept, for a dispatch reported late (a worker that does not
# beat for 5 s is killed, so its reports are never older than that plus a pass).
SHORTFALL_HORIZON_NS = 10_000_000_000
_MAX_INTERVALS = 4096
# Finish times kept per band for flows that emptied ahead of the band's virtual clock (Ledger._remember).
_FINISH_MEMORY = 4096
# Once a fair band's virtual clock passes this, its virtual times are re-based to it (`_rebase_clock`):
# as the shards' VTC counters (fairness._REBASE_AT), past ~2**53 a float no longer holds a grant's charge
# (a review: requests of 2**32 tokens at weight 1e-6 took the clock to 2.1e19, where two shards' virtual
# times stayed one float apart and the one behind took every grant, until a restart).
_REBASE_AT = float(1 << 40)
# Requests that leave a fair band while it sits on one shard (or none) before it drops its fair state
# (Ledger._settle), at least; and at least as many as it holds queued, which its next re-base costs. A
# band that comes back to two shards within that many is still fair, so one whose flows keep spilling
# over and back pays no re-base each time (and forgets no finish time), and however it flaps a re-base
# costs O(1) per request that left it, amortised.
_CALM = 64
# `plan_grants` grants a run of grants to one band and shard without choosing the band for each (the same
# grants: tests/test_ledger_lone.py turns it off and compares).
_RUNS = True
# N shards, with `Ledger.timer` set: a shard that has answered none of its grants for this long (s)
# since one was planned gets no more until it answers one (`Ledger.asked_at`). A stopped or wedged
# worker answers nothing until the watchdog kills it (5 s): with no bound it took every grant a plan
# had to give (its queue stays uncovered) and the other shards, their higher bands included, waited
# for budget that sat in its grants (a review: 14-20 of a budget of 20 for ~5 s). A shard at work
# answers within micro- to milliseconds. (A bound on the plans it may be ahead, tried first, took
# grants from healthy shards whose answers were merely on their way: plans come every pass.)
ANSWER_TIMEOUT = 0.1
# ... and one that holds half the request budget or more in grants it has not answered (or half the byte
# budget in their reserves) gets no more once it has answered none for this long: in `ANSWER_TIMEOUT` a
# stopped worker took every grant that the releases of requests held briefly freed (review 155: 4 of a
# budget of 4 with 10 ms holds; nothing was dispatched anywhere for 5 s; review 158: the same in bytes). A
# shard at work holding that much has its frames read every pass.
HOARD_TIMEOUT = 0.005


class PendingState(enum.IntEnum):
    NEW = 0  # admitted by no one yet (parked while its displacement victims leave)
    QUEUED = 1  # routed to a shard (possibly still in transit)
    DISPLACING = 2  # queued, chosen as a displacement victim, cancel sent
    DONE = 3


# The members the hot path sets, as plain names: on Python 3.11 `PendingState.QUEUED` goes through the
# enum class's attribute lookup, ~75 ns a read against ~9 for a module global (timeit), 2-3 per request.
_QUEUED = PendingState.QUEUED
_DONE = PendingState.DONE


def _no_times(p: Pending) -> tuple[float, float]:
    """No TTL or SLO known (a shell that does not say): the default TTL for every request."""
    return 0.0, 0.0


class Pending(msgspec.Struct, gc=False):
    """A request the distributor is answerable for, from admission to its final outcome."""

    id: int
    flow: str
    band: int
    size: int
    slot: int = -1
    shard: int = -1
    state: int = PendingState.NEW
    owner: Any = None  # the shell's waiter (connection and correlation id)
    payload: Any = None  # the shell's request message, to forward to the shard
    received: float = 0.0
    displacer: Pending | None = None  # the newcomer waiting for this victim to leave
    victims_left: int = 0
    reserved_bytes: int = 0  # global room held for this parked newcomer (see Ledger.mark_victims)
    reserved_items: int = 0
    tokens: int = 0  # declared tokens (0: none): a vtc band's cost, as in the engine
    weight: float = 0.0  # the request's own weight (0: the flow's configured weight), as in the engine
    # in a fair band: what its dispatch costs its flow (LedgerBand.cost), set when queued while fair; 0 when
    # queued while the band kept no fair state (then computed where needed)
    cost: int = 0
    # the grant plans made before it was queued (`Ledger.plans`): a grant planned since is written to its
    # shard after its Enqueue and may serve it; one planned before may not (`LedgerBand.shard_late`)
    plans: int = 0
    # dispatched in a fair band: the number of its charge to its flow's finish time (`Ledger.charges`);
    # 0: not charged. A refund names it (`Ledger.correct`)
    charged: int = 0


class FlowUsage(msgspec.Struct, gc=False):
    """What one flow of a band holds: its queued (or in-transit) requests, and the shard they are on.
    (A struct, not a class with `__slots__`: made in C, ~50 ns against ~115 for an `__init__`, and in the
    matrix shape every request makes one.)"""

    shard: int = -1  # while it holds anything, every request of the flow is on this shard
    queued_bytes: int = 0
    queued_items: int = 0
    # its share under drr/vtc (round-robin: 1), as the shard's engine has it; 0: the configured weight (a
    # band keeping no fair state records only a request's own weight, for its re-base: Ledger._rebase)
    weight: float = 0.0
    finish: float = 0.0  # its own virtual finish time: its start plus what it was served, per weight
    since: int = 0  # the ledger's charges (`Ledger.charges`) when it was made: earlier ones are from before it
    lead: float = 0.0  # its start less the band's clock then (< 0: the lag it kept, `_start`), less refunds since
    # how far it stood behind the band's clock when it last emptied (`correct`): known only for a flow that
    # emptied ahead of the clock (remembered) and was refunded below it since; one that emptied behind the
    # clock keeps none here (the shard's counters keep it: docs/fairness.md §7)
    lag: float = 0.0


_NO_USAGE = FlowUsage()  # what a flow with nothing queued holds, for `Ledger.check` (read only)


class QueuedSizes:
    """The sizes of the requests queued on one (band, shard), for the largest of them (byte budgets only):
    a count per size and a max-heap of sizes, cleaned lazily (amortised O(log n) per request)."""

    __slots__ = ("count", "heap")

    def __init__(self) -> None:
        self.count: dict[int, int] = {}
        self.heap: list[int] = []  # sizes, negated; one whose count is gone is stale

    def add(self, size: int) -> None:
        count = self.count
        n = count.get(size, 0)
        count[size] = n + 1
        if not n:
            heap = self.heap
            heapq.heappush(heap, -size)
            if len(heap) > 2 * len(count) + 64:  # stale entries below the top: rebuilt from the counts
                self.heap = heap = [-s for s in count]
                heapq.heapify(heap)

    def remove(self, size: int) -> None:
        count = self.count
        n = count[size] - 1
        if n:
            count[size] = n
        else:
            del count[size]

    def largest(self) -> int:
        heap, count = self.heap, self.count
        while heap and -heap[0] not in count:
            heapq.heappop(heap)
        return -heap[0] if heap else 0


class LedgerBand:
    """Counts for one band: totals, per flow, per shard, grants outstanding, arrival order."""

    __slots__ = (
        "bounded",
        "calm",
        "ceiling",
        "cost_kind",
        "counts_home",
        "displacement",
        "due_plan",
        "due_taken",
        "enqueued",
        "fair",
        "fair_since",
        "finish_clock",
        "finish_weight",
        "flow_finish",
        "flow_held",
        "flow_max_bytes",
        "flow_max_items",
        "flows",
        "granted",
        "held",
        "home",
        "index",
        "lone_cost",
        "max_bytes",
        "max_items",
        "max_lag",
        "order",
        "ordering",
        "queued_bytes",
        "queued_items",
        "rises",
        "served",
        "shard_bytes",
        "shard_cost",
        "shard_due",
        "shard_fresh",
        "shard_granted",
        "shard_items",
        "shard_late",
        "shard_order",
        "shard_planned",
        "shard_sizes",
        "shard_stale",
        "shard_tags",
        "shard_vtime",
        "shard_weight",
        "sharing",
        "short",
        "spread",
        "unsure",
        "vclock",
        "walk",
        "walk_left",
        "walk_plan",
    )

    def __init__(self, index: int, config: Config, shards: int, *, lone: bool = True) -> None:
        bc = config.bands[index]
        self.index = index
        self.ceiling = bc.ceiling
        self.displacement = bc.displacement
        self.max_bytes = limit(bc.max_bytes)
        self.max_items = limit(bc.max_requests)
        self.flow_max_bytes = limit(bc.flow_max_bytes)
        self.flow_max_items = limit(bc.flow_max_requests)
        self.max_lag = bc.max_lag  # vtc: the most of its lag a flow keeps (`Ledger._start`, `correct`)
        # some limit of the band or of its flows is set (`Ledger.check` needs `shortfall` in full only then)
        self.bounded = (self.max_bytes, self.max_items, self.flow_max_bytes, self.flow_max_items) != (_INF,) * 4
        self.flows: dict[str, FlowUsage] = {}
        # room of this band, and of its flows, held for parked newcomers: (bytes, requests)
        self.held = NOTHING_HELD
        self.flow_held: dict[str, tuple[int, int]] = {}
        self.order: OrderedDict[int, Pending] = OrderedDict()  # queued requests, newest last
        # global-fcfs at N shards: per shard, its queued requests' ids -> the band's enqueue count then
        # (`enqueued`), in its order, so that `Ledger._oldest_uncovered` can pass over a shard behind on
        # its answers without scanning its requests
        self.enqueued = 0
        self.shard_order: list[dict[int, int]] | None = (
            [{} for _ in range(shards)] if shards > 1 and _COST_KIND[bc.fairness] == _ARRIVALS
            else None)
        # ... and ordered by deadline (edf, slo-deadline), per shard its queued requests as a heap of
        # (deadline, `enqueued`, id), those that left dropped as they surface: a shard serves its
        # earliest deadline first, so the band's best uncovered request is found by deadline, not by
        # arrival (review 180: by arrival, a flow's 20 requests with a 100 s TTL went before another's
        # 20 with 20 s at 2 shards, all 20 in order at one; with a 0.8 s TTL those 10 expired)
        self.ordering = bc.ordering
        self.shard_due: list[list[tuple[float, int, int]]] | None = (
            [[] for _ in range(shards)] if self.shard_order is not None and bc.ordering != "fcfs" else None)
        # ... and what one plan took out of them, per shard its queued ones in order (`_earliest_uncovered`:
        # each pick of the plan reads on from there; put back at the next plan's first pick)
        self.due_taken: list[list[tuple[float, int, int]]] = [[] for _ in range(shards)] if self.shard_due else []
        self.due_plan = -1
        # global-fcfs (fcfs) at N shards: one plan's walk through `order` (`Ledger._oldest_uncovered_in_plan`)
        self.walk_plan = -1
        self.walk: Iterator[Pending] = iter(())  # (over `order`'s values)
        self.walk_left: list[int] = []
        self.queued_items = self.queued_bytes = 0
        self.shard_items = [0] * shards
        self.shard_bytes = [0] * shards
        # Under a byte budget, the sizes queued here (their largest: a grant of at least that many bytes
        # cannot be handed back for its head's size); and the band's grants out whose bytes may fall
        # short of their head, while the bands below wait (`Ledger._plan`)
        self.shard_sizes = ([QueuedSizes() for _ in range(shards)]
                            if config.budget.max_inflight_bytes is not None else None)
        self.unsure = 0
        self.shard_granted = [0] * shards
        self.shard_stale = [0] * shards  # the oldest grants outstanding here that no queued request may need
        # Of the requests here, those queued since the band's latest grant to the shard was planned (in
        # plan number `shard_planned`): behind every grant outstanding there on the link, so none can
        # serve them. An exit that leaves grants unused counts as stale those the others cannot use.
        self.shard_late = [0] * shards
        self.shard_planned = [0] * shards
        # grants planned here by plan `shard_planned` (those still out: at most `shard_granted` of them)
        self.shard_fresh = [0] * shards
        self.granted = 0
        # Fair shares across shards (see Ledger._shard_rank): what each shard's queued requests cost in
        # the band's fairness unit, the weight of the flows it holds, and its virtual time.
        self.cost_kind = _COST_KIND[bc.fairness]
        self.sharing = shards > 1 and self.cost_kind != _ARRIVALS  # one shard: nothing to share (lean)
        # The fair state is kept only while the band's flows sit on two shards or more (and for _CALM
        # requests after): on one, the grant's shard is that one (Ledger._rebase, Ledger._settle).
        # `lone` False keeps it always (the reference the tests compare with).
        self.fair = self.sharing and not lone
        # While not fair, the shard holding all of the band's work (any, while it holds none); -1: the
        # band keeps no such shard (fair; global-fcfs at N shards while its work is on two or more: it
        # picks by arrival, `Ledger._oldest_uncovered`).
        self.home = 0 if shards == 1 or lone else -1
        # global-fcfs at N shards: its home is counted (`spread`) rather than kept by the lone ledger's
        # transitions: whatever shards its work is on, the oldest uncovered request is on one of them
        self.counts_home = shards > 1 and self.cost_kind == _ARRIVALS and lone
        self.spread = 0  # while fair, the shards holding its flows; counts_home: the shards holding its work
        self.calm = 0  # while fair: the requests that left it since it last held flows on two shards
        self.served = False  # while not fair: granted since it last took a home (Ledger._rebase)
        # while not fair, of a drr or vtc band at N shards: what its queued requests cost, summed (their
        # own `Pending.cost` is left 0 then), so a re-base need not visit each of them (Ledger._rebase)
        self.lone_cost = 0
        self.shard_cost = [0] * shards
        self.shard_weight = [0.0] * shards
        self.shard_vtime = [0.0] * shards
        self.shard_tags = [0.0] * shards  # the finish times of the flows it holds, summed by weight
        # Exact inversion count (Ledger.close_window): the stamps (ns) of this pass's rises of the work no
        # live grant covers (one per request), and the intervals [lo, hi] (ns) in which the band was short.
        self.rises: list[int] = []
        self.short: deque[tuple[int, int]] = deque()
        # The band's virtual clock: the virtual time at which its latest grant started (SFQ's v(t)), and
        # the finish times of flows that emptied while ahead of it (see Ledger._start).
        self.vclock = 0.0
        self.fair_since = 0  # the ledger's charges when its fair state was last rebuilt (`Ledger._rebase`)
        self.flow_finish: dict[str, float] = {}
        self.finish_weight: dict[str, float] = {}  # their weights, to rank what they owe (`Ledger._remember`)
        self.finish_clock: dict[str, float] = {}  # the band's clock when each emptied (`Ledger._start`)

    def cost(self, p: Pending) -> int:
        """What dispatching `p` costs its flow under this band's fairness: turns, bytes or tokens."""
        kind = self.cost_kind
        if kind == _TURNS:
            return 1
        if kind == _TOKENS and p.tokens:
            return p.tokens
        return max(p.size, 1)

    def grantable(self) -> bool:
        """Some shard holds more of this band's requests than live grants (per shard, not in total).

        Looks only at the shards holding some of the band's work (`compress`, in C), so a band whose
        work sits on one shard costs what it does at one shard: a shard holding nothing is never
        grantable (its live grants, granted - stale, are never negative)."""
        if not self.queued_items:
            return False
        items = self.shard_items
        if not self.granted:  # no grant out: any request is uncovered
            return True
        granted, stale = self.shard_granted, self.shard_stale
        for n in compress(range(len(items)), items):  # noqa: SIM110 (a loop: no generator made per call)
            if items[n] > granted[n] - stale[n]:
                return True
        return False

    def uncovered(self, shard: int) -> int:
        """The band's requests on `shard` (in transit included) that no live grant covers."""
        return max(0, self.shard_items[shard] - self.shard_granted[shard] + self.shard_stale[shard])

    def short_at(self, at: int) -> bool:
        """Was the band short at `at` (ns): some of its work then without a live grant was left without
        one by the first plan after `at`? (Intervals newest last; a lookup is usually the newest.)"""
        for lo, hi in reversed(self.short):
            if hi < at:
                return False
            if lo <= at:
                return True
        return False


class Ledger:
    """All of the distributor's admission and dispatch bookkeeping; no I/O, no clock."""

    # (slots: past 30 attributes an instance's dict stops sharing its keys on Python 3.11, and every
    # attribute read on the hot path got slower: +3-4 % of the distributor's Python, measured. A
    # `__dict__` too, for what is not listed: tests replace a method on one ledger.)
    __slots__ = (
        "__dict__",
        "_calm",
        "_grants",
        "_lowest",
        "_need",
        "_to_judge",
        "_weights",
        "asked_at",
        "band_of",
        "bands",
        "budget",
        "clock",
        "config",
        "default_band",
        "external_saturation",
        "grants_bytes",
        "grants_out",
        "inversions",
        "max_bytes",
        "max_items",
        "plans",
        "queued_bytes",
        "queued_items",
        "release",
        "reserved_bytes",
        "reserved_items",
        "shards",
        "slot_items",
        "timer",
        "times_of",
        "window_start",
    )

    def __init__(self, config: Config, shards: int, *, lone: bool = True) -> None:
        self.config = config
        self.shards = shards
        # a request's (TTL, SLO) in seconds, 0: none given (the shell's to say: it keeps them in the
        # request it forwards); what a global-fcfs band ordered by deadline grants by across shards (`due`)
        self.times_of: Callable[[Pending], tuple[float, float]] = _no_times
        self.bands = [LedgerBand(i, config, shards, lone=lone) for i in range(len(config.bands))]
        self._calm = _CALM if lone else _INF
        self.band_of = {b.priority: i for i, b in enumerate(config.bands)}  # priority -> band index
        self.default_band = self.band_of[config.default_band.priority]  # of a priority that has no band
        self.max_bytes = limit(config.max_queued_bytes)
        self.max_items = limit(config.max_queued_requests)
        self.queued_items = self.queued_bytes = 0
        # N shards: per shared-memory flow slot (`Pending.slot`), its requests queued or in transit, all
        # bands: 0 tells the shell the slot holds nothing on any shard (its enq and deq counters agree:
        # a shard counts a request's deq before it reports it, and it leaves here only then), so
        # JSQ-Bytes need not read the slot's counters (`ShmStats.jsq_pick`, `fresh`). None at one shard.
        self.slot_items: list[int] | None = [0] * config.flow_slots if shards > 1 else None
        self.reserved_items = self.reserved_bytes = 0  # global room held for parked newcomers
        self.left: dict[int, Pending] = {}  # requests ended while their shard may hold them (`hold_left`)
        # ...per band, those whose room no displacing request has taken yet (`check` looks only at these:
        # review 150, a scan of every one per admission at a full queue cost 2 ms at 40,000)
        self.left_untaken: list[dict[int, Pending]] = [{} for _ in self.bands]
        self.budget = Budget(limit(config.budget.max_inflight_requests), limit(config.budget.max_inflight_bytes))
        # A dispatched request's ticket was released: the budget's own `release`, bound here rather than
        # wrapped in a method (one call less per request)
        self.release: Callable[[int], None] = self.budget.release
        self.grants_out = 0
        # the dispatches charged to a flow's finish time so far (each `Pending.charged` its number): a refund
        # is judged by when its request was charged (`correct`)
        self.charges = 0
        self.grants_bytes = 0
        # N shards: the clock (monotonic s) that judges a shard behind on its answers (`ANSWER_TIMEOUT`;
        # None: never judged), and per shard when a grant was first planned for it since it was last
        # heard from (`heard_from`; inf: none since)
        self.timer: Callable[[], float] | None = None
        self.asked_at = [_INF] * shards
        # shards the service found silent (no heartbeat for a while: stopped or wedged): behind on their
        # answers whatever grants they hold (review 149: one holding none got the next grant, and the
        # budget it held, until it was killed)
        self.silent: frozenset[int] = frozenset()
        self._heard: set[int] = set()  # shards heard from since the last plan (`heard_from`)
        # per shard, its grants outstanding in the order it answers them: (band, reserve, charge, saturation, unsure)
        self._grants: list[deque[tuple[int, int, float, float, bool]]] = [deque() for _ in range(shards)]
        self.plans = 0  # grant plans made so far (`Pending.plans`, `LedgerBand.shard_planned`)
        self._weights = config.weights
        self._need: dict[tuple[int, int], int] = {}
        # A second saturation detector (proxy mode's utilization detector), given the grants still
        # outstanding (admitted, not yet dispatched); the saturation is the larger of the two.
        self.external_saturation: Callable[[int], float] | None = None
        # Exact inversion count: the stamp (ns) of the last plan (close_window), the dispatches of a band
        # below the top waiting to be judged after the next plan: (stamp, band, grant's saturation)
        self.clock: Callable[[], int] | None = None  # set (ns): track what the exact inversion count needs
        self.window_start = 0
        self._lowest = len(self.bands) - 1
        self._to_judge: list[tuple[int, int, float]] = []
        self.inversions = [0] * len(self.bands)

    def band_index(self, priority: int) -> int:
        return self.band_of.get(priority, self.default_band)

    # ------------------------------------------------------------------ admission

    def check(self, p: Pending) -> list[Pending] | None:
        """Can `p` be queued? [] if it fits now; victims to displace first; None if rejected.

        Victims come from the lowest band with queued work upwards, newest first, skipping those
        already being displaced; they are chosen only if together they free enough.
        """
        band = self.bands[p.band]
        if band.bounded:  # the band or its flows have limits: the shared rule in full
            flow = band.flows.get(p.flow) or _NO_USAGE  # a flow starting afresh holds nothing (no object made)
            need = shortfall(p.size, flow, band, self, self.max_bytes - self.reserved_bytes,
                             self.max_items - self.reserved_items, band.held, band.flow_held.get(p.flow, NOTHING_HELD))
            if need is None:
                return None
            need_bytes, need_items = need
        else:  # none can refuse it: `shortfall`'s global part alone, the same arithmetic, inline (once per request)
            need_bytes = self.queued_bytes + p.size - (self.max_bytes - self.reserved_bytes)
            need_items = self.queued_items + 1 - (self.max_items - self.reserved_items)
        if need_bytes <= 0 and need_items <= 0:
            return []
        if not band.displacement:
            return None
        victims: list[Pending] = []
        # First the room held for lower bands' requests already ended (`hold_left`): it frees when their
        # shard reads again or dies, evicting no one (review 149: counted by no victim, a newcomer was
        # rejected at a queue full of them, or displaced a live request beside them)
        for untaken in reversed(self.left_untaken[p.band + 1 :]):
            for left in reversed(untaken.values()):
                if need_bytes <= 0 and need_items <= 0:
                    return victims
                victims.append(left)
                need_bytes -= left.size
                need_items -= 1
        for lower in reversed(self.bands[p.band + 1 :]):
            for victim in reversed(lower.order.values()):
                if need_bytes <= 0 and need_items <= 0:
                    return victims
                if victim.state != PendingState.QUEUED:
                    continue
                victims.append(victim)
                need_bytes -= victim.size
                need_items -= 1
        return victims if need_bytes <= 0 and need_items <= 0 else None

    def mark_victims(self, newcomer: Pending, victims: list[Pending]) -> None:
        """Park `newcomer` until the victims (now being cancelled by the shell) have left.

        The global room it will need is held for it meanwhile: the room free now at once, and each
        victim's room as that victim leaves. Otherwise a later arrival could take it, and the
        newcomer would be rejected after its victims were evicted for nothing.
        """
        for victim in victims:
            if victim.state == PendingState.QUEUED:
                victim.state = PendingState.DISPLACING
            else:  # (one ended already, its room held: `hold_left`)
                del self.left_untaken[victim.band][victim.id]
            victim.displacer = newcomer
        newcomer.victims_left = len(victims)
        free_bytes = self.max_bytes - self.reserved_bytes - self.queued_bytes
        free_items = self.max_items - self.reserved_items - self.queued_items
        self._reserve(newcomer, int(max(0, min(newcomer.size, free_bytes))), int(max(0, min(1, free_items))))
        self._hold_in_band(newcomer, 1)

    def abandon(self, newcomer: Pending) -> None:
        """A parked newcomer gives up before its victims have left (its TTL ran out, or its client
        left): the room held for it goes back now, and its victims, already being cancelled, owe it
        nothing when they leave. Without this a victim held on a stopped shard kept the newcomer
        waiting past its TTL, and the room held with it, until that shard was killed (seconds).
        While some of its victims have not left, scans the bands below the newcomer's (where they
        are): rare. With none left (a request held behind its flow's parked one whose victims have
        all gone, released in turn) no victim points at it and nothing is scanned: one such release
        per held request scanned every lower band's queue (a review: 400 held behind 40,000 queued
        below, 0.56 s in one callback)."""
        if newcomer.victims_left:  # (each victim that left cleared its pointer: `leave`, `release_left`)
            for band in self.bands[newcomer.band + 1 :]:
                for victim in band.order.values():
                    if victim.displacer is newcomer:
                        victim.displacer = None
            for victim in self.left.values():
                if victim.displacer is newcomer:
                    victim.displacer = None
                    self.left_untaken[victim.band][victim.id] = victim  # (untaken again)
        newcomer.victims_left = 0
        self._reserve(newcomer, -newcomer.reserved_bytes, -newcomer.reserved_items)
        self._hold_in_band(newcomer, -1)

    def hold_left(self, p: Pending) -> None:
        """`p` left the queue here (`leave`) while its shard may still hold it (stopped: the distributor
        ended it, `Distributor._end_on_silent`): its room stays held, as a parked newcomer's is
        (`mark_victims`), until `release_left`, so that the queue limits still bound what is held
        (review 146: given back, a stopped shard's queue refilled at each housekeeping tick, 3,200
        pending for a limit of 200)."""
        self._reserve(p, p.size, 1)
        self._hold_in_band(p, 1)
        self.left[p.id] = p
        self.left_untaken[p.band][p.id] = p

    def release_left(self, p: Pending) -> Pending | None:
        """The room `hold_left` held for `p` goes back: its shard answered for it, or died. Returns a
        parked newcomer now free to retry, as `leave` does (its room went to it: `check`)."""
        del self.left[p.id]
        self.left_untaken[p.band].pop(p.id, None)
        self._reserve(p, -p.reserved_bytes, -p.reserved_items)
        self._hold_in_band(p, -1)
        return self._victim_gone(p)

    def _victim_gone(self, p: Pending) -> Pending | None:
        """`p`'s room is free: if a parked newcomer waits for it (its displacer), it is the newcomer's;
        the newcomer, once its last victim is gone, is returned to retry (its room handed back for its
        own check)."""
        newcomer = p.displacer
        if newcomer is None:
            return None
        p.displacer = None
        newcomer.victims_left -= 1
        if newcomer.victims_left == 0:
            self._reserve(newcomer, -newcomer.reserved_bytes, -newcomer.reserved_items)
            self._hold_in_band(newcomer, -1)
            return newcomer
        self._reserve(newcomer, p.size, 1)
        return None

    def _hold_in_band(self, newcomer: Pending, sign: int) -> None:
        """Hold (sign 1) or give back (-1) the newcomer's room in its band and flow: it passed their
        limits when parked, and a later arrival of the same band or flow must not take that room."""
        band = self.bands[newcomer.band]
        nbytes, items = sign * newcomer.size, sign
        band.held = (band.held[0] + nbytes, band.held[1] + items)
        fb, fi = band.flow_held.get(newcomer.flow, NOTHING_HELD)
        if fi + items:
            band.flow_held[newcomer.flow] = (fb + nbytes, fi + items)
        else:
            band.flow_held.pop(newcomer.flow, None)

    def _reserve(self, newcomer: Pending, nbytes: int, items: int) -> None:
        newcomer.reserved_bytes += nbytes
        newcomer.reserved_items += items
        self.reserved_bytes += nbytes
        self.reserved_items += items

    def can_dispatch_now(self, p: Pending) -> bool:
        """The idle fast path: nothing queued at this band or above, and the budget has room."""
        for band in self.bands[: p.band + 1]:
            if band.queued_items:
                return False
        budget = self.budget
        used = budget.inflight + self.grants_out
        used_bytes = budget.inflight_bytes + self.grants_bytes
        saturation = max(used / budget.max_requests, used_bytes / budget.max_bytes)
        if self.external_saturation is not None:
            saturation = max(saturation, self.external_saturation(self.grants_out))
        if saturation >= self.bands[p.band].ceiling:
            return False
        return used < budget.max_requests and (used_bytes + p.size <= budget.max_bytes or used == 0)

    def dispatched_directly(self, p: Pending) -> None:
        p.state = _DONE
        self.budget.acquire(p.size)

    def uncovered(self, shard: int) -> int:
        """The requests on `shard`, over all bands, that no live grant covers: a pass writes its granted
        shards least first (`Distributor._flush`, and the N-shard simulation's `blocks`). A pass sorts
        its granted shards by it, so it is O(bands) per granted shard: a band with nothing queued has
        nothing uncovered (skipped), the others' counts are read inline (no call per band)."""
        n = 0
        for band in self.bands:
            if band.queued_items:
                left = band.shard_items[shard] - band.shard_granted[shard] + band.shard_stale[shard]
                if left > 0:
                    n += left
        return n

    def affine_shard(self, p: Pending) -> int:
        """The shard `p` must go to so its flow is served in order, or -1 if any shard will do.

        Flow affinity: while a flow holds anything queued or in transit, all of it is on one shard,
        whose own ordering policy then orders the whole flow exactly (DESIGN §4.7). A flow with
        nothing left anywhere (every earlier request has its outcome) may start afresh on any shard.
        """
        flow = self.bands[p.band].flows.get(p.flow)
        return flow.shard if flow is not None else -1

    def enqueue(self, p: Pending, shard: int) -> None:
        """`p` is being sent to `shard`; from now on it counts as queued there."""
        p.shard = shard
        p.state = _QUEUED
        name, size = p.flow, p.size  # (read once)
        band = self.bands[p.band]
        fair = band.fair
        flow = band.flows.get(name)
        if flow is None:  # the shell routes the flow's next requests to `shard` (affine_shard)
            if not fair and band.home != shard and band.sharing:  # a flow of a lone band away from its home
                fair = self._spread_to(band, shard)
            if not fair:
                flow = band.flows[name] = FlowUsage(shard)
            else:
                weight = self._weights.get(name, 1.0) if band.cost_kind != _TURNS else 1.0
                start, lag = self._start(band, shard, name)
                flow = band.flows[name] = FlowUsage(shard, 0, 0, weight, start, self.charges, start - band.vclock, lag)
                if not band.shard_items[shard]:  # the shard's first flow of the band (counted: a weight can be tiny)
                    # plus the estimates of the band's grants still out there (a request that left without
                    # its grant: the answer takes its estimate out again; a review: lost here, the shard's
                    # virtual time fell by it, as far as the estimate is large, and it took every grant)
                    band.shard_vtime[shard] = start + (sum(g[2] for g in self._grants[shard] if g[0] == band.index)
                                                       if band.shard_granted[shard] else 0.0)
                    band.shard_weight[shard] = weight
                    band.shard_tags[shard] = weight * start
                    band.spread += 1
                    if band.spread > 1:
                        band.calm = 0
                else:
                    self._reweigh(band, shard, weight, weight * start)
        if fair:
            if band.cost_kind != _TURNS:  # the latest request's weight is the flow's (0: the configured one)
                weight = p.weight if p.weight > 0 else self._weights.get(name, 1.0)
                if weight != flow.weight:
                    self._reweigh(band, shard, weight - flow.weight, (weight - flow.weight) * flow.finish)
                    flow.weight = weight
            p.cost = cost = band.cost(p)
            band.shard_cost[shard] += cost
        else:
            flow.weight = p.weight  # the latest request's weight is the flow's (0: the configured; for a re-base)
            kind = band.cost_kind  # (`LedgerBand.cost`, inline; round-robin's is the count of requests)
            if band.sharing and kind != _TURNS:
                band.lone_cost += (p.tokens or size or 1) if kind == _TOKENS else size or 1
        flow.queued_items += 1
        flow.queued_bytes += size
        band.order[p.id] = p
        if band.shard_order is not None:
            band.enqueued += 1
            band.shard_order[shard][p.id] = band.enqueued
            if band.shard_due is not None:
                self._push_due(band, shard, p)
        band.queued_items += 1
        band.queued_bytes += size
        if band.counts_home and not band.shard_items[shard]:  # global-fcfs, its first request on `shard`
            band.spread = spread = band.spread + 1
            band.home = shard if spread == 1 else -1
        sizes = band.shard_sizes
        if sizes is not None:
            sizes[shard].add(size)
        band.shard_items[shard] += 1
        band.shard_late[shard] += 1  # (behind any grant outstanding there)
        p.plans = self.plans
        band.shard_bytes[shard] += size
        self.queued_items += 1
        self.queued_bytes += size
        slot_items = self.slot_items
        if slot_items is not None:
            slot_items[p.slot] += 1
        clock = self.clock
        if (
            clock is not None and band.index < self._lowest
            and band.shard_items[shard] > band.shard_granted[shard] - band.shard_stale[shard]
        ):
            band.rises.append(clock())  # one more request no live grant covers

    def leave(self, p: Pending, covered: bool = False) -> Pending | None:
        """`p` left its shard's queue (any outcome). Returns a parked newcomer now free to retry.

        `covered`: p left through a dispatch answering a live grant of its own band on its shard.
        Any other exit (cancel, TTL, displacement, a dispatch on another band's grant) may leave a
        grant outstanding there that was meant for p: the grants the band's other requests there
        cannot use count as stale, so a request arriving later is not taken as covered by them (that
        would let a lower band go first). A grant serves only requests whose Enqueue went before it
        on the link. The grants of the band's latest plan there (`shard_fresh`) follow every request
        queued before that plan (all but `shard_late`): they are counted usable up to those requests'
        number; grants of earlier plans may precede requests queued since, so they are counted stale
        (never taken as covering what they cannot serve; at worst a phantom the next answers clear).
        (Every grant outstanding counted stale, the first rule, took the others as uncovered too: a
        TTL expiry or a cancel made the next plan grant them again, lower bands' grants were narrowed
        for work that had its grants, and the inversion counter counted their dispatches; the latest
        plan's limit alone, the second, took earlier plans' grants as serving requests queued after
        them: a lower band could go first. Reviews.) A covered exit is never a late request: the
        grant that served it was written after its Enqueue.
        """
        band = self.bands[p.band]
        shard, size = p.shard, p.size  # (read once: each is used up to 8 times below)
        # Only an uncovered exit can leave more work uncovered: a covered one takes a request and its
        # live grant together (the shard's items fall by one, its live grants are already counted
        # down by `grant_answered`), so its uncovered count cannot rise and is not computed.
        clock = self.clock if not covered else None
        before = band.uncovered(shard) if clock is not None else 0
        if not covered:
            if p.plans >= band.shard_planned[shard]:  # queued after the latest grant there was planned
                band.shard_late[shard] -= 1
            self._need.pop((p.band, shard), None)
        name = p.flow
        flow = band.flows[name]
        flow.queued_items = left = flow.queued_items - 1
        flow.queued_bytes -= size
        del band.order[p.id]
        if band.shard_order is not None:
            del band.shard_order[shard][p.id]
        band.queued_items -= 1
        band.queued_bytes -= size
        band.shard_items[shard] -= 1
        sizes = band.shard_sizes
        if sizes is not None:
            sizes[shard].remove(size)
        if not covered:  # the grants outstanding there beyond the requests that may use them are stale
            granted = band.shard_granted[shard]
            # beyond the requests queued before the latest plan; and every grant of an earlier plan (it
            # may precede those queued since): the latest plan's are answered last, at most `granted` out
            unusable = max(granted - band.shard_items[shard] + band.shard_late[shard],
                           granted - min(band.shard_fresh[shard], granted))
            if unusable > band.shard_stale[shard]:
                band.shard_stale[shard] = unusable if unusable < granted else granted
        if band.counts_home and not band.shard_items[shard]:  # global-fcfs, its last request on `shard`
            band.spread -= 1
            if band.spread == 1:  # all of its work on one shard again: that one is its home
                items = band.shard_items
                band.home = next(compress(range(len(items)), items))
        band.shard_bytes[shard] -= size
        self.queued_items -= 1
        self.queued_bytes -= size
        slot_items = self.slot_items
        if slot_items is not None:
            slot_items[p.slot] -= 1
        p.state = _DONE
        if band.fair:
            band.shard_cost[shard] -= p.cost or band.cost(p)
            if not left:  # it takes its finish time, so its service with it
                if not band.shard_items[shard]:  # no flow left there (counted, not inferred from float weights)
                    band.shard_weight[shard] = band.shard_tags[shard] = 0.0
                    band.spread -= 1
                else:
                    self._reweigh(band, shard, -flow.weight, -flow.weight * flow.finish)
                del band.flows[name]
                if flow.finish > band.vclock:
                    self._remember(band, name, flow.finish, flow.weight or 1.0)
            if band.spread < 2:  # on one shard (or none): after a while (_CALM), it keeps no fair state
                band.calm += 1
                if band.calm >= self._calm and band.calm >= band.queued_items:
                    self._settle(band)
        else:
            kind = band.cost_kind
            if band.sharing and kind != _TURNS:
                band.lone_cost -= (p.tokens or size or 1) if kind == _TOKENS else size or 1
            if not left:
                del band.flows[name]
                if not band.queued_items:  # empty: its next home starts at the clock (as the always-fair ledger's)
                    band.served = False
        if clock is not None:
            rise = band.uncovered(shard) - before
            if rise > 0:  # (usually none: a dispatch on its own grant uncovers nothing)
                self._rose(band, rise)
        if p.displacer is None:  # (the common case, without a call: once per request)
            return None
        return self._victim_gone(p)

    # ------------------------------------------------------------------ grants

    def _unsure_answering(self, band: int, cutoff: float) -> bool:
        """Whether an unsure grant of `band` is out on a shard not behind on its answers (`_plan`)."""
        asked_at = self.asked_at
        return any(g[4] and g[0] == band for n, queue in enumerate(self._grants) if asked_at[n] >= cutoff
                   for g in queue)

    def plan_grants(self) -> list[tuple[int, int, int, float]]:
        """Grants to send now, as (shard, band, max_bytes or -1 for any, saturation); already reserved.

        The saturation goes with the grant so the shard skips bands at or above their ceiling. With N
        shards and `timer` set, a shard that has answered none of its grants for `ANSWER_TIMEOUT`
        since one was planned gets none (it may be stopped): a fair band's other shards are granted
        without it, and a band whose uncovered work is only there waits for it, as every band below
        does (strict priority; a band whose work is all there likewise; a global-fcfs band passes
        over its requests for the oldest elsewhere: `_oldest_uncovered`).
        """
        timer = self.timer  # (None at one shard: the service sets it with more)
        if timer is None:
            if self.silent:  # (the one shard is silent: no grant, the budget stays free for the idle fast
                return []  # path; review 150: it went to the stopped worker)
            return self._plan(-_INF)
        now = timer()
        asked_at = self.asked_at
        if self._heard:  # a shard that answered and still holds grants (sent after what it read) is asked
            for shard in self._heard:  # again from now: one that stops then is judged behind in its turn
                if self._grants[shard] and asked_at[shard] == _INF:  # (a review: it never was)
                    asked_at[shard] = now
            self._heard.clear()
        judged = self.silent
        half, half_bytes = self.budget.max_requests / 2, self.budget.max_bytes / 2
        if half != _INF or half_bytes != _INF:  # (a shard holding half the budget unanswered, in requests
            hoard = now - HOARD_TIMEOUT  # or in bytes, not heard from for HOARD_TIMEOUT)
            for n, queue in enumerate(self._grants):
                if asked_at[n] < hoard and n not in judged and (
                        len(queue) >= half or (half_bytes != _INF and sum(g[1] for g in queue) >= half_bytes)):
                    judged = judged | {n}
        if judged:  # (judged behind for this plan: as if asked long ago)
            self.asked_at = [-_INF if n in judged else t for n, t in enumerate(asked_at)]
            try:
                out = self._plan(now - ANSWER_TIMEOUT)
            finally:
                self.asked_at = asked_at
        else:
            out = self._plan(now - ANSWER_TIMEOUT)
        if out:
            for shard in {grant[0] for grant in out}:
                if asked_at[shard] == _INF:
                    asked_at[shard] = now
        return out

    def _plan(self, cutoff: float) -> list[tuple[int, int, int, float]]:
        budget = self.budget
        max_requests, max_bytes = budget.max_requests, budget.max_bytes
        bands, grants, external = self.bands, self._grants, self.external_saturation  # (read once per plan)
        self.plans = plans = self.plans + 1
        single = self.shards == 1
        out: list[tuple[int, int, int, float]] = []
        # A fair band's shards that hold more requests than live grants, ranked (`_open_shards`); built
        # at the band's first look in this plan, then only the granted shard's rank changes.
        open_shards: dict[int, list[tuple[float, float, int]]] = {}
        heap: list[tuple[float, float, int]] = []
        # a shard behind on its answers (ANSWER_TIMEOUT: a grant planned for it before `cutoff`, none
        # answered since) gets no grant in this plan
        asked_at = self.asked_at
        behind = not single and min(asked_at) < cutoff
        if not behind:
            cutoff = -_INF  # (so the picks below take their paths for no shard behind)
        unsure_live: dict[int, bool] = {}  # per band above its ceiling: an unsure grant out on a shard answering
        while True:
            used = budget.inflight + self.grants_out
            if used >= max_requests:
                return out
            used_bytes = budget.inflight_bytes + self.grants_bytes
            # max() of the two, written out (a call less per grant)
            saturation = used / max_requests
            if used_bytes / max_bytes > saturation:
                saturation = used_bytes / max_bytes
            if external is not None:
                saturation = max(saturation, external(self.grants_out))
            band = None
            for candidate in bands:
                if saturation >= candidate.ceiling:
                    # above its ceiling, but perhaps by a grant of its own that may come back (`unsure`):
                    # that brings it under again, its work uncovered, so the bands below wait for it
                    # too (a review: they went ahead, and the saturation they took kept it out); not for
                    # one on a shard behind on its answers (perhaps stopped: a review, every band below
                    # held until the watchdog), as a band above its ceiling holds nothing for its work there
                    if candidate.unsure and behind:  # (once per band in a plan, until it gets an unsure grant)
                        answering = unsure_live.get(candidate.index)
                        if answering is None:
                            answering = unsure_live[candidate.index] = self._unsure_answering(candidate.index, cutoff)
                        if answering:
                            return out
                    elif candidate.unsure:
                        return out
                    continue
                if candidate.fair:
                    heap = open_shards.get(candidate.index)  # type: ignore[assignment]
                    if heap is None:
                        heap = open_shards[candidate.index] = self._open_shards(candidate, cutoff)
                    if heap:
                        band = candidate
                        break
                    if behind and candidate.grantable():  # its uncovered work is on shards behind: it waits
                        return out
                elif (  # `grantable()`, inline at one shard and where the band's work is on one (once per grant)
                    candidate.shard_items[0] > candidate.shard_granted[0] - candidate.shard_stale[0] if single
                    else candidate.shard_items[home] > candidate.shard_granted[home] - candidate.shard_stale[home]
                    if (home := candidate.home) >= 0 else candidate.grantable()
                ):
                    band = candidate
                    break
                if candidate.unsure:  # its grants may come back for their heads' sizes: the bands below wait
                    return out
            if band is None:
                return out
            index, fair = band.index, band.fair
            # A fair band with one open shard (its work on one shard, the packed case) grants it and
            # leaves it in its heap: its rank is compared with nothing, so it is not recomputed.
            alone = fair and len(heap) == 1
            if alone:
                shard = heap[0][2]
            elif fair:
                shard = heapq.heappop(heap)[2]
            elif single:
                shard = 0
            else:  # (`home` is the band's, read as it was chosen)
                shard = home if home >= 0 else (
                    self._oldest_uncovered_in_plan(band, asked_at, cutoff) if band.shard_due is None
                    else self._earliest_uncovered(band, asked_at, cutoff))
                if behind and (shard < 0 or asked_at[shard] < cutoff):  # its work is on shards behind: it waits
                    return out
                band.served = True
            reserve = -1
            unsure = False
            if max_bytes != _INF:
                hint = max(self._need.get((index, shard), 0), self._typical_size(band, shard))
                room = max_bytes - used_bytes
                largest = band.shard_sizes[shard].largest()  # type: ignore[index]  # (a byte budget: kept)
                if used == 0:  # (at least its largest: what it dispatches fits, a request larger than the
                    # budget alone; not the whole room, which one grant to a stopped shard held until the
                    # watchdog while nothing was dispatched anywhere: review 158)
                    reserve = int(max(min(room, 2 * hint), largest))
                elif room >= hint:
                    reserve = int(min(room, 2 * hint))
                    # A reserve below a request queued there may be handed back for its head's size, with
                    # the band counted covered meanwhile: a lower band granted then went ahead of it on
                    # another shard (a review: 334-byte grants for a 500-byte head, the mean of 500, 0
                    # and 0; 1,202 bytes free). Such a grant is `unsure`: until it is answered the bands
                    # below get no grant. (Reserving the largest instead cut a backlog of 100-byte
                    # requests to one grant a plan for as long as a 90 kB one was queued, or, kept as
                    # a bound that fell only as the queue emptied, for ever after: a review.)
                    unsure = reserve < largest
                else:
                    return out  # the head likely does not fit: wait for releases (strict priority)
            charge = 0.0
            if fair:  # the typical cost of a request there, per unit of weight
                charge = band.shard_cost[shard] / band.shard_items[shard] / (band.shard_weight[shard] or 1.0)
                start = band.shard_vtime[shard]
                if start > band.vclock:
                    band.vclock = start
                band.shard_vtime[shard] = start + charge
            band.granted += 1
            band.shard_granted[shard] += 1
            band.shard_late[shard] = 0  # every request there now is ahead of this grant on the link
            if band.shard_planned[shard] != plans:
                band.shard_fresh[shard] = 0
            band.shard_fresh[shard] += 1
            band.shard_planned[shard] = plans
            self.grants_out += 1
            if reserve > 0:
                self.grants_bytes += reserve
            grants[shard].append((index, reserve, charge, saturation, unsure))
            out.append((shard, index, reserve, saturation))
            if unsure:
                band.unsure += 1
                unsure_live.pop(index, None)  # (a "none answering" judged above is stale now: a review)
            if not fair and max_bytes == _INF and external is None and (single or home >= 0) and _RUNS:
                # A run (at one shard, or a band on its home shard, with no byte budget and no second
                # detector): the loop would choose this band and shard again while that shard holds more
                # of its requests than live grants and the saturation stays below its ceiling. A band
                # above it skipped for its ceiling stays skipped (the saturation only grows in a plan),
                # one with nothing grantable gets nothing here. So the same grants, without the choice
                # of a band for each (once per grant); the loop goes on where the run stops.
                items, granted, stale = band.shard_items, band.shard_granted, band.shard_stale
                queue, ceiling = grants[shard], band.ceiling
                while items[shard] > granted[shard] - stale[shard]:
                    used = budget.inflight + self.grants_out
                    if used >= max_requests:
                        return out
                    saturation = used / max_requests  # (the bytes' term is 0: no byte budget)
                    if saturation >= ceiling:
                        break
                    band.granted += 1
                    granted[shard] += 1
                    band.shard_fresh[shard] += 1
                    self.grants_out += 1
                    queue.append((index, -1, 0.0, saturation, False))
                    out.append((shard, index, -1, saturation))
            elif fair:
                live = band.shard_granted[shard] - band.shard_stale[shard]
                if band.shard_items[shard] <= live:
                    if alone:
                        heap.clear()
                elif not alone:
                    heapq.heappush(heap, (*self._shard_rank(band, shard, live), shard))

    def _open_shards(self, band: LedgerBand, cutoff: float) -> list[tuple[float, float, int]]:
        """A fair band's shards holding more requests than live grants, as a heap by `_shard_rank`
        (then by index): its next grant goes to the first. O(N) once per plan, O(log N) per grant,
        where a scan of the shards per grant made a plan O(N) per grant (measured: it grew the
        distributor's cost per request with the shard count). A shard asked before `cutoff` is
        behind on its answers and left out (`plan_grants`)."""
        if band.vclock > _REBASE_AT:
            self._rebase_clock(band)
        ranked = []
        items, granted, stale, asked_at = band.shard_items, band.shard_granted, band.shard_stale, self.asked_at
        for n in compress(range(len(items)), items):  # only the shards holding some (in C): see grantable
            live = granted[n] - stale[n]
            if items[n] > live:
                if asked_at[n] >= cutoff:
                    ranked.append((*self._shard_rank(band, n, live), n))
                elif band.shard_vtime[n] < band.vclock:
                    # behind on its answers, so passed over: its virtual time keeps up with the band's,
                    # as an idle shard's does when it comes back, so that once it answers it does not
                    # take every grant until it has caught up with the service the others had meanwhile
                    # (a review: the healthy shards got nothing for 2 s after a 4.5 s stop)
                    band.shard_vtime[n] = band.vclock
        if len(ranked) > 1:
            heapq.heapify(ranked)
        return ranked

    @staticmethod
    def _rebase_clock(band: LedgerBand) -> None:
        """Take the band's virtual clock off every virtual time it holds (`_REBASE_AT`): its flows' finish
        times, the shards' virtual times and weighted sums, the remembered finish times (those left
        behind the clock are dropped: they would start at the clock anyway). Order and differences
        stay. O(flows queued + remembered + shards), before a plan ranks the shards; the clock must
        pass 2**40 again for the next (or the flows remembered ahead be re-based each time: each is
        at most one request's charge ahead)."""
        base = band.vclock
        band.vclock = 0.0
        for flow in band.flows.values():
            flow.finish -= base
        vtime, tags, weight = band.shard_vtime, band.shard_tags, band.shard_weight
        for n in range(len(vtime)):
            vtime[n] -= base
            tags[n] -= base * weight[n]
        emptied = band.finish_clock
        kept = {name: finish - base for name, finish in band.flow_finish.items()
                if finish > base or finish < emptied.get(name, finish)}  # (ahead, or keeping a lag: `_start`)
        band.flow_finish = kept
        band.finish_weight = {name: w for name, w in band.finish_weight.items() if name in kept}
        band.finish_clock = {name: emptied[name] - base for name in kept if name in emptied}

    @staticmethod
    def _shard_rank(band: LedgerBand, shard: int, live: int) -> tuple[float, float]:
        """Where `shard` stands for a fair band's next grant (smaller goes first), given its `live` grants.

        With flow affinity each flow is on one shard, whose policy shares that shard's grants among
        its flows by weight; so the shards must share the band's grants by the weight of the flows
        they hold. Each shard has a virtual time that a grant advances by the typical cost of a
        request there (turns, bytes or tokens, as the band's fairness counts) divided by the weight
        of its flows; the shard with the smallest virtual time goes next (weighted fair queueing over
        shards; `grant_answered` replaces the typical cost by the real one). Ties go to the shard
        holding the most bytes per live grant. (Every tie to the thinnest shard instead measured
        better for thin closed-loop flows but let one take two grants in a row: twice the service
        difference of one shard in the N-shard simulation; see docs/architecture.md.) A rank depends
        on its own shard's counts only, so granting one shard leaves the others' ranks as they were.
        """
        items = band.shard_items[shard]
        return band.shard_vtime[shard], -(band.shard_bytes[shard] / (live + 1) + 1e-9 * (items - live))

    def due(self, band: LedgerBand, p: Pending) -> float:
        """The deadline a shard orders `p` by in `band` (edf: its arrival + TTL; slo-deadline: its arrival
        + SLO; none: inf, after every one that has one), as the engine keys it (`flowshard.queues`)."""
        ttl, slo = self.times_of(p)
        if band.ordering == "edf":
            ttl = ttl or self.config.default_ttl
            return p.received + ttl if ttl > 0 else _INF
        return p.received + slo if slo > 0 else _INF

    def _push_due(self, band: LedgerBand, shard: int, p: Pending) -> None:
        assert band.shard_due is not None and band.shard_order is not None
        heap, queued = band.shard_due[shard], band.shard_order[shard]
        heapq.heappush(heap, (self.due(band, p), band.enqueued, p.id))
        if len(heap) > 2 * len(queued) + 64:  # mostly requests that left: rebuilt from those queued
            heap[:] = [e for e in heap if e[2] in queued]
            heapq.heapify(heap)

    def _earliest_uncovered(self, band: LedgerBand, asked_at: list[float], cutoff: float) -> int:
        """`_oldest_uncovered` for a band ordered by deadline: each shard serves its earliest deadlines
        first, so its first `covered` by deadline are covered; the shard whose first uncovered one is
        the earliest (ties: the earlier arrival) gets the grant. Each shard's earliest are taken out of
        its heap once a plan, in order (`LedgerBand.due_taken`), and each pick of the plan reads on from
        there: O((live grants + picks) log queued + N) a plan (review 184: taken out and put back at each
        pick, a plan of 4,000 grants cost 22.6 s against 1.5 s for fcfs)."""
        assert band.shard_due is not None and band.shard_order is not None
        taken = band.due_taken
        if band.due_plan != self.plans:  # a new plan: what the last one took out goes back first
            band.due_plan = self.plans
            for heap, mine in zip(band.shard_due, taken, strict=True):
                for entry in mine:
                    heapq.heappush(heap, entry)
                mine.clear()
        covered = [g - s for g, s in zip(band.shard_granted, band.shard_stale, strict=True)]
        best, best_key = -1, (_INF, 1 << 62)
        for n, heap in enumerate(band.shard_due):
            queued = band.shard_order[n]
            k = covered[n]
            if len(queued) <= k or asked_at[n] < cutoff:
                continue
            mine = taken[n]
            while len(mine) <= k and heap:
                entry = heapq.heappop(heap)
                if entry[2] in queued:  # (one that left: dropped for good)
                    mine.append(entry)
            if len(mine) > k and (mine[k][0], mine[k][1]) < best_key:
                best, best_key = n, (mine[k][0], mine[k][1])
        return best

    def _oldest_uncovered_in_plan(self, band: LedgerBand, asked_at: list[float], cutoff: float) -> int:
        """`_oldest_uncovered` for the picks of one plan: with no shard behind, one walk through the
        band's arrival order serves them all, each pick going on from where the last stopped (the request
        it found is the one its grant covers: a pick that grants nothing ends the plan), O(live grants +
        picks) a plan; it was O(live grants) a pick, so a plan of 4,000 grants over 4 shards of 50,000
        cost ~1 s (review 184)."""
        if cutoff != -_INF and band.shard_order is not None:  # (a shard behind: its own path)
            return self._oldest_uncovered(band, asked_at, cutoff)
        if band.walk_plan != self.plans:
            band.walk_plan = self.plans
            band.walk_left = [g - s for g, s in zip(band.shard_granted, band.shard_stale, strict=True)]
            band.walk = iter(band.order.values())
        left = band.walk_left
        for p in band.walk:
            n: int = p.shard
            if left[n] > 0:
                left[n] -= 1
            else:
                return n
        return -1

    @staticmethod
    def _oldest_uncovered(band: LedgerBand, asked_at: list[float], cutoff: float) -> int:
        """global-fcfs across shards (it shares by nothing but arrival; fair bands rank their shards
        instead, `_shard_rank`, and a lone band grants its `home`, as does a global-fcfs band whose
        work is on one shard, `LedgerBand.counts_home`): the shard of the band's oldest
        queued request not covered by a live grant. A shard answers its grants with its own oldest
        requests (its policy is global-fcfs too), so its first `live grants` requests in arrival
        order are covered. Costs O(live grants of the band) per pick. (Granting by bytes held instead
        starved a shard holding one small request next to shards that closed-loop flows kept
        refilling.) A shard behind on its answers (a grant for it planned before `cutoff`, none
        answered since: `plan_grants`) is passed over: its requests cannot be served, and waiting on
        them stalled the band, and every band below, with budget free (a review). Then each other
        shard's oldest uncovered request is found in its own order (`LedgerBand.shard_order`), O(live
        grants + N): scanning the band's order past a stopped shard's backlog cost 1.6 ms a plan at
        50,000 (a second review). -1: none (its uncovered work is all on shards behind)."""
        covered = [g - s for g, s in zip(band.shard_granted, band.shard_stale, strict=True)]
        if cutoff == -_INF or band.shard_order is None:  # no shard behind in this plan
            for p in band.order.values():
                n = p.shard
                if covered[n] > 0:
                    covered[n] -= 1
                else:
                    return n
            return -1
        best, oldest = -1, _INF
        for n, queued in enumerate(band.shard_order):
            if len(queued) <= covered[n] or asked_at[n] < cutoff:
                continue
            at = next(islice(queued.values(), covered[n], None))  # its first request no live grant covers
            if at < oldest:
                best, oldest = n, at
        return best

    @staticmethod
    def _start(band: LedgerBand, shard: int, flow: str) -> tuple[float, float]:
        """The virtual start time of a flow that starts afresh (nothing queued or in transit) on `shard`:
        the band's virtual clock (the virtual time of its latest grant), or the flow's own finish time
        if that is later — start-time fair queueing (Goyal et al.) per flow, although the ledger's
        fair state is per shard. A shard gaining its first flow starts at that time, so time it spent
        idle is neither banked as credit nor held against it, and a thin flow that empties after each
        request and is placed afresh next time is not put behind backlogged shards that were served
        at the current virtual time already (the rule before, the smallest virtual time of the shards
        holding flows, with ties to the shard holding more bytes, did: fair-alloc's 3-client flow got
        4-8 % less than its max-min allocation at 4 and 8 shards against 1-3 % at one); while a flow that
        empties and comes back at once cannot take the grant ahead of them each time (its finish
        time is remembered: `_remember`). `shard` is unused here (a subclass may use it).
        With its lag (`FlowUsage.lag`): how far its remembered finish time stands behind the clock when it
        emptied (0: not remembered)."""
        band.finish_weight.pop(flow, None)
        clock = band.vclock
        emptied = band.finish_clock.pop(flow, None)
        if emptied is None:
            return clock, 0.0
        finish = band.flow_finish.pop(flow)
        lag = emptied - finish
        if lag > 0.0:  # refunds since it emptied: it stood behind the clock then, held back by its declared
            return clock - min(lag, band.max_lag), lag  # costs, and keeps that
        return max(clock, finish), lag

    @staticmethod
    def _remember(band: LedgerBand, flow: str, finish: float, weight: float) -> None:
        """Keep the finish time of a flow that emptied ahead of the band's virtual clock, for its next
        start. An entry is needed only until the clock passes it; at most _FINISH_MEMORY per band are
        kept (over that, the ones the clock passed go, then all but the half that owe the most service,
        their lead times their weight: those flows would start at the clock, a lead of at most what
        they were ahead; the oldest went first before, so throw-away flows each a request ahead could
        push out a large debt, and ranked by the lead alone, throw-away requests at a tiny weight
        could, a review). Amortised O(log n)."""
        memory = band.flow_finish
        memory[flow] = finish
        band.finish_weight[flow] = weight
        band.finish_clock[flow] = band.vclock
        if len(memory) > _FINISH_MEMORY:
            clock, weights, emptied = band.vclock, band.finish_weight, band.finish_clock
            owed = {name: (f - clock) * weights.get(name, 1.0) for name, f in memory.items() if f > clock}
            kept = most_owed(owed, _FINISH_MEMORY // 2)
            band.flow_finish = {name: memory[name] for name in kept}
            band.finish_weight = {name: weights.get(name, 1.0) for name in kept}
            band.finish_clock = {name: emptied.get(name, clock) for name in kept}

    @staticmethod
    def _reweigh(band: LedgerBand, shard: int, weight: float, tags: float) -> None:
        """A flow joins the shard (`weight` > 0, `tags` its weight times its finish time), leaves it
        (both negative) or changes its weight: the shard's virtual time moves as the mean finish time
        of its flows does. A flow that empties after a few requests (a thin closed-loop flow) takes
        its service with it, so the flows that stay there are not charged for it (they were, at the
        weight of the flows queued at each dispatch: fair-alloc's 'seven' got 8.3 % less at 2 shards)."""
        old_weight, old_tags = band.shard_weight[shard], band.shard_tags[shard]
        new_weight, new_tags = old_weight + weight, old_tags + tags
        if new_weight < 1e-9:  # no flow left there (and no float dust)
            band.shard_weight[shard] = band.shard_tags[shard] = 0.0
            return
        band.shard_weight[shard], band.shard_tags[shard] = new_weight, new_tags
        if old_weight:
            band.shard_vtime[shard] += new_tags / new_weight - old_tags / old_weight

    def _spread_to(self, band: LedgerBand, shard: int) -> bool:
        """A band keeping no fair state gets a flow on `shard`, which is not its home: if it holds
        nothing, `shard` becomes its home; else its flows are on two shards from now, and it is fair
        (`_rebase`). Returns whether it is."""
        if not band.queued_items:
            band.home, band.served = shard, False
            return False
        self._rebase(band)
        return True

    def _rebase(self, band: LedgerBand) -> None:
        """Rebuild the fair state of a band whose flows all sit on its home shard, from what the ledger
        holds, as the always-fair ledger holds a band on one shard: if it was granted there (`served`),
        the latest grant started at the band's virtual clock (where the flow about to join elsewhere
        starts, `_start`), so the home shard's virtual time is one typical charge ahead of it, else at
        it; its flows share one finish time, that less an estimate for each of the band's grants
        outstanding there (now their charge, as `plan_grants` would have set it). Exact in what it
        keeps (weights, costs, grants); what it cannot know is how the flows' finish times differed,
        and how far ahead of the clock those that emptied were (`_settle`).
        O(flows + grants outstanding on its home), once per spread: not O(its queued requests), whose
        costs are summed as they come and go (`lone_cost`), each computed where it is needed."""
        home, index, clock = band.home, band.index, band.vclock
        shards = len(band.shard_items)
        band.fair, band.home, band.spread, band.calm = True, -1, 1, 0
        band.fair_since = self.charges  # (the finish times below hold no charge made before: `correct`)
        band.shard_cost, band.shard_weight, band.shard_tags = [0] * shards, [0.0] * shards, [0.0] * shards
        cost = band.queued_items if band.cost_kind == _TURNS else band.lone_cost
        configured, turns, weight = self._weights, band.cost_kind == _TURNS, 0.0
        for name, flow in band.flows.items():
            flow.weight = 1.0 if turns else flow.weight or configured.get(name, 1.0)
            weight += flow.weight
        charge = cost / band.queued_items / weight
        outstanding = band.shard_granted[home]  # (the band's grants there, stale ones included)
        if outstanding:
            grants = self._grants[home]
            self._grants[home] = deque((b, r, charge if b == index else c, s, u) for b, r, c, s, u in grants)
        vtime = clock + charge if band.served else clock
        finish = vtime - outstanding * charge
        for flow in band.flows.values():
            flow.finish = finish
        band.shard_cost[home] = cost
        band.shard_weight[home] = weight
        band.shard_tags[home] = weight * finish
        band.shard_vtime[home] = vtime

    @staticmethod
    def _settle(band: LedgerBand) -> None:
        """A fair band has sat on one shard (or none) for a while (_CALM): it keeps no fair state until
        its flows are on two shards again (`_rebase`), as at one shard, where the grant's shard is
        its home. What it forgets: how far its flows' finish times were apart, and those of the
        flows that emptied ahead of its clock (each ahead by about its last request's cost over its
        weight at most; docs/architecture.md, "Fairness across shards")."""
        band.fair, band.served = False, band.queued_items > 0  # (settled as it emptied: its next home starts afresh)
        band.flow_finish.clear()
        band.finish_weight.clear()
        band.finish_clock.clear()
        items = band.shard_items
        band.home = home = next(compress(range(len(items)), items), 0)
        band.lone_cost = band.shard_cost[home]  # (every queued request is there)

    @staticmethod
    def _typical_size(band: LedgerBand, shard: int) -> int:
        items = band.shard_items[shard]
        return math.ceil(band.shard_bytes[shard] / items) if items else 0

    def grant_answered(
        self, shard: int, dispatched_size: int | None, need: int = 0, dispatched: Pending | None = None,
        dispatched_at: int = 0,
    ) -> tuple[int, bool]:
        """The shard answered its oldest grant: a dispatch of `dispatched_size` bytes, or a hand-back.

        Returns (the grant's band, whether the grant was live). Grants are answered in order, so
        the stale ones of a band on a shard are the first to come back. `dispatched`, the request it
        served (when known), puts its real cost in the shard's virtual time instead of the typical one.
        With the clock set: the band's work this grant covered and no longer does (a hand-back, or a
        grant another band's request used) joins its uncovered work; and the dispatch of `dispatched`
        at `dispatched_at` (ns, the shard's clock read after its engine committed it; 0: not known)
        is judged after the next plan (`close_window`).
        """
        band_index, reserve, charge, saturation, unsure = self._grants[shard].popleft()
        band = self.bands[band_index]
        if unsure:
            band.unsure -= 1
        served = dispatched.band if dispatched is not None else -1  # (read once)
        # a dispatch of the grant's own band on a live grant leaves it covered (`leave(covered=True)`): no rise
        track = self.clock is not None and served != band_index
        before = band.uncovered(shard) if track else 0
        tags = -1.0  # what the dispatch adds to its shard's weighted finish times (below), if its flow is known
        if dispatched is not None and dispatched_size is not None:
            owner = self.bands[served]  # a narrowed grant serves a higher band's request
            if owner.fair:
                flow = owner.flows.get(dispatched.flow)
                if flow is not None:
                    self.charges = dispatched.charged = self.charges + 1
                    cost = dispatched.cost or owner.cost(dispatched)
                    # vtc: charged at the request's own weight (0: the configured one), as the shard's engine
                    # charges it and as `correct` refunds it: at its flow's latest weight, a request's
                    # refund at its own let one request of a flow mixing weights take a shard's finish
                    # time far below the others, and every grant of the band with it (a review); drr: at
                    # the flow's latest weight, as the shard's engine gives it its quantum x that weight
                    # (review 180: at its own, a flow whose weight fell from 4 to 1 got 72 of 100 across
                    # shards and 51 at one; drr has no refunds)
                    weight = flow.weight
                    kind = owner.cost_kind
                    own = 1.0 if kind == _TURNS else weight if kind == _BYTES else (
                        dispatched.weight if dispatched.weight > 0 else self._weights.get(dispatched.flow, 1.0))
                    if own == weight or not weight:  # (the common case, in the same float steps as ever)
                        flow.finish += cost / (weight or 1.0)
                        tags = float(cost)
                        owner.shard_tags[shard] += cost if weight else 0.0
                    else:
                        moved = cost / own
                        flow.finish += moved
                        tags = weight * moved
                        owner.shard_tags[shard] += tags
                    if owner is not band and owner.shard_weight[shard]:  # a narrowed grant served it here
                        owner.shard_vtime[shard] += tags / owner.shard_weight[shard]
        if charge:
            weight = band.shard_weight[shard]
            real = charge
            if served == band_index and weight and dispatched is not None:  # (served: -1 without one)
                real = (tags if tags >= 0 else dispatched.cost or band.cost(dispatched)) / weight
            elif served >= 0 and served != band_index:  # narrowed: it served none of this band, as a hand-back
                real = 0.0  # (its estimate stayed: the band's flows there lost a turn per narrowed grant, a review)
            band.shard_vtime[shard] += (real if dispatched_size is not None else 0.0) - charge
        live = band.shard_stale[shard] == 0
        if not live:
            band.shard_stale[shard] -= 1
        band.granted -= 1
        band.shard_granted[shard] -= 1
        self.grants_out -= 1
        if reserve > 0:
            self.grants_bytes -= reserve
        if dispatched_size is not None:
            budget = self.budget  # (`Budget.acquire`, inline: once per dispatch)
            budget.inflight += 1
            budget.inflight_bytes += dispatched_size
            if self._need:  # (usually empty: no key tuple built per dispatch then)
                self._need.pop((band_index, shard), None)
        elif need:
            self._need[(band_index, shard)] = need
        if track:
            rise = band.uncovered(shard) - before
            if rise > 0:
                self._rose(band, rise)
        if dispatched_at and served > 0:  # (a dispatch below the top band)
            self._to_judge.append((dispatched_at, served, saturation))
        return band_index, live

    def saturation(self) -> float:
        """What the band ceilings are compared with: the concurrency budget's saturation, or the
        external detector's (grants outstanding counted) when that is higher."""
        saturation = self.budget.saturation()
        if self.external_saturation is not None:
            saturation = max(saturation, self.external_saturation(self.grants_out))
        return saturation

    def correct(
        self, priority: int, shard: int, delta: float, flow: str, weight: float = 0.0, charged: int = -1,
    ) -> None:
        """A released request's actual cost differed from its charge by `delta` (vtc: tokens): move its
        flow's finish time, and the virtual time of the shard holding it, as that shard moves the
        flow's counter, so the shares across shards follow the corrected service too, not only the
        order within a shard. A flow that emptied since: its remembered finish time (its next start).
        One forgotten (it emptied behind the clock): served more than it was charged, it starts that
        much after the clock next time (remembered as a finish time); served less, nothing (idle time
        banks no credit). Its declared costs understated its service, which may be why it fell
        behind. (The virtual time of the shard that dispatched it was moved instead: holding no other
        flow of the band, it dropped the correction; holding others, it charged them for the service.)
        `weight`: the request's own (0: the flow's configured one), as the shard divides by it.
        `charged`: the request's `Pending.charged` (-1: not known, applied whole). A refund of a dispatch
        never charged in the band's present fair state (0: dispatched while the band kept none, or
        before it was last rebuilt: `_rebase`) is dropped: the finish times hold no charge to refund (a
        review: a 2**32-token request dispatched while its band sat on one shard, refunded once it was
        spread, took its shard's virtual time 4.3e9 below the others, and its flow every grant). A
        positive one is applied (an under-declarer pays for what it was served). One charged before
        its flow's queued requests began (it was dispatched, the flow emptied and came back: `since`)
        refunds at most the flow's `lead` (how far its start was ahead of the clock, which its declared
        cost had kept it) plus min(lag, `max_lag`) (how far it stood behind the clock when it emptied,
        which that refund raises). The whole refund would take its finish time below the clock by the
        time it spent empty (a review: 848 grants in a row at 4 shards), where its start would have
        been the clock had the cost been known at dispatch; the shard's counter is bounded alike."""
        band = self.bands[self.band_index(priority)]
        if band.fair and band.cost_kind == _TOKENS and 0 <= shard < len(band.shard_vtime):
            own = weight if weight > 0 else self._weights.get(flow, 1.0) or 1.0
            moved = delta / own
            if moved < 0 and 0 <= charged <= band.fair_since:  # (0: never charged)
                return
            usage = band.flows.get(flow)
            if usage is None:
                if flow in band.flow_finish:  # emptied ahead of the clock: its next start moves
                    band.flow_finish[flow] += moved
                elif delta > 0:  # forgotten: its next start, from the clock
                    self._remember(band, flow, band.vclock + moved, own)
                return
            if 0 <= charged <= usage.since:  # (charged before it came back: as the shard's VTC bounds it)
                usage.lag -= moved
                moved = refund_bound(moved, usage.lead, usage.lag, band.max_lag)
                usage.lead += moved
            usage.finish += moved  # still queued: its finish time, and its shard's mean with it
            shard = usage.shard
            if usage.weight:
                band.shard_tags[shard] += usage.weight * moved
                total = band.shard_weight[shard]
                if total:
                    band.shard_vtime[shard] += usage.weight * moved / total

    def shard_failed(self, shard: int) -> list[Pending]:
        """Forget a dead shard's grants; return the requests it held (to end as shard failures)."""
        self.silent = self.silent - {shard}  # (its successor is not silent)
        for band_index, reserve, _, _, unsure in self._grants[shard]:
            band = self.bands[band_index]
            band.unsure -= unsure
            band.granted -= 1
            band.shard_granted[shard] -= 1
            self.grants_out -= 1
            self.grants_bytes -= max(reserve, 0)
        self._grants[shard].clear()
        self.asked_at[shard] = _INF
        for band in self.bands:
            band.shard_stale[shard] = 0
            band.shard_fresh[shard] = 0
        for key in [k for k in self._need if k[1] == shard]:
            del self._need[key]
        lost = [p for band in self.bands for p in band.order.values() if p.shard == shard]
        return lost

    def outstanding_grants(self, shard: int) -> int:
        return len(self._grants[shard])

    def heard_from(self, shard: int) -> None:
        """The shard answered (its frames of a pass, read): it is not behind on its answers. (Once per
        read, not per grant answered: a worker reads its link in order, so any answer shows it has
        read the grants before it; ~0.08 µs a request saved at one shard, measured.) The grants it
        still holds then are asked again from the next plan (`plan_grants`)."""
        self.asked_at[shard] = _INF
        if self.timer is not None:
            self._heard.add(shard)
        if self.silent and shard in self.silent:  # (it runs: review 150, grants waited for the next tick)
            self.silent = self.silent - {shard}

    def unanswered_for(self, shard: int, now: float) -> float:
        """How long (s) `shard` has answered none of its grants since one was planned (0: none out)."""
        asked = self.asked_at[shard]
        return max(0.0, now - asked) if asked != _INF and self._grants[shard] else 0.0

    # ------------------------------------------------------------------ exact inversion count

    def _rose(self, band: LedgerBand, n: int) -> None:
        """`n` more of the band's requests are without a live grant, from now (the clock read after the change)."""
        if n > 0 and self.clock is not None and band.index < self._lowest:  # the lowest band is above none
            band.rises.extend([self.clock()] * n)

    def close_window(self, at: int) -> list[int]:
        """Call right after each plan, with `at` (ns) read before it: the ledger is now planned.

        For each band above the lowest: `short` = its work no live grant covers now (if any); the
        dispatches between the previous plan and this one that this plan judges are those at a time t
        with more of that work left than rose since t (so some of the work already uncovered at t was
        left without a grant). Those t form one interval [lo, at]: lo is the `short`-th latest rise of
        this pass, or the previous plan if fewer rose (the shortfall carries on from before). Then the
        dispatches waiting for this plan are judged. Returns the bands of the inversions counted."""
        start = self.window_start + 1
        horizon = at - SHORTFALL_HORIZON_NS
        for band in self.bands[:-1]:
            rises = band.rises
            short = 0
            if band.queued_items:  # (only the shards holding some of the band's work: see grantable)
                items, granted, stale = band.shard_items, band.shard_granted, band.shard_stale
                for n in compress(range(len(items)), items):
                    uncovered = items[n] - granted[n] + stale[n]
                    if uncovered > 0:
                        short += uncovered
            intervals = band.short
            if short:
                lo = start if len(rises) < short else rises[len(rises) - short]
                if intervals and intervals[-1][1] + 1 >= lo:
                    intervals[-1] = (intervals[-1][0], at)
                else:
                    intervals.append((lo, at))
            while intervals and (intervals[0][1] < horizon or len(intervals) > _MAX_INTERVALS):
                intervals.popleft()
            rises.clear()
        self.window_start = at
        if not self._to_judge:
            return []
        judged = [j for j in self._to_judge if j[0] <= at]
        self._to_judge = [j for j in self._to_judge if j[0] > at]
        return [band for t, band, saturation in judged if self._inverted(band, t, saturation)]

    def _inverted(self, band: int, at: int, saturation: float) -> bool:
        """A dispatch of `band` at `at` on a grant planned at `saturation`: was a higher band, eligible
        there (the shard would have narrowed the grant to it), short then? Counts it if so."""
        for higher in self.bands[:band]:
            if higher.ceiling > saturation and higher.short_at(at):
                self.inversions[band] += 1
                return True
        return False
