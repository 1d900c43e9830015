"""Fairness policies: which backlogged flow of a band is served next.

The engine tells a policy when a flow becomes backlogged (`activate`), when it empties
(`deactivate`), when a flow's head item changes (`head_changed`, only for policies with
`tracks_heads`) and what it dispatched (`charge`, called right after `pick` chose that flow).
Policies only ever see *active* flows, so a pick costs O(1) amortised (round robin, DRR) or
O(log F) (VTC, global FCFS) in the number of backlogged flows — never a scan of all flows.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from typing import ClassVar, NamedTuple, Protocol

from flowshard.flow import FlowQueue
from flowshard.heaps import COMPACT_SLACK, compacted
from flowshard.types import Item, ItemState

_DONE = ItemState.DONE
_heapreplace = heapq.heapreplace
_EPOCH = 1024  # adaptive DRR: dispatches per epoch of the quantum's size memory (its median, once an epoch)
_PARK_AFTER = 3  # DRR: a head needing more top-ups than this waits for its round parked, not visited in each
_REWAKE = 64  # DRR: flows parked before the quantum changed, woken a pick
_REWAKE_AT_ONCE = 256  # DRR: parked flows whose round has come, woken a pick at most
_MAX_PARK = float(1 << 60)  # DRR: top-ups beyond this (a weight near 0) are not counted: it waits for the rest
# VTC: once the least-served counter passes this, the band's counters are re-based to it (`_rebase`): a
# charge of up to 2**32 tokens at a weight down to 1e-6 moves a counter by up to 4.3e15, and past ~2**53
# a float no longer holds a request's charge (a review: 10,000 such requests from throw-away flows lifted
# every flow to 4.3e19, where charges of 1,000 tokens moved no counter, until a restart). 2**40 keeps
# charges to 1e-4 of a token.
_REBASE_AT = float(1 << 40)
_REBASE_EVERY = 64  # VTC: charges at least between two re-bases, so that an O(flows) re-base is amortised
# VTC: the default of a band's `max_lag`, the most of its lag (`deactivate`) a flow keeps when it comes back,
# in counter units (tokens at weight 1): about one long request. Unbounded, the lag grew with whatever the
# least backlogged flow beside it had been charged: a flow parked far ahead by one request of 2**32
# tokens, refunded later, gave a flow that emptied next to it 20,000 dispatches in a row against a
# steady tenant's none (a review).
MAX_LAG = 4096.0


class Fairness(Protocol):
    name: ClassVar[str]
    tracks_heads: ClassVar[bool]

    def activate(self, flow: FlowQueue) -> None: ...
    def deactivate(self, flow: FlowQueue) -> None: ...
    def head_changed(self, flow: FlowQueue) -> None: ...
    def pick(self) -> FlowQueue | None: ...
    def charge(self, flow: FlowQueue, item: Item) -> None: ...
    def correct(self, flow: FlowQueue, delta: float, weight: float, before: bool = False) -> None: ...
    def correct_older(self, flow: FlowQueue, delta: float, weight: float) -> None: ...
    def correct_forgotten(self, flow_id: str, delta: float, weight: float) -> None: ...
    def forget(self, flow: FlowQueue) -> None: ...
    def recall(self, flow: FlowQueue) -> None: ...


class _Memoryless:
    """A policy that keeps nothing of a flow beyond its backlog: forgetting a flow loses nothing."""

    __slots__ = ()

    def forget(self, flow: FlowQueue) -> None:
        pass

    def correct_forgotten(self, flow_id: str, delta: float, weight: float) -> None:
        pass

    def correct_older(self, flow: FlowQueue, delta: float, weight: float) -> None:
        pass

    def recall(self, flow: FlowQueue) -> None:
        pass


class RoundRobin(_Memoryless):
    """Backlogged flows take turns, one request each. Fair in turns, not in bytes."""

    name: ClassVar[str] = "round-robin"
    tracks_heads: ClassVar[bool] = False

    def __init__(self, quantum: int = 0) -> None:
        self._ring: OrderedDict[FlowQueue, None] = OrderedDict()

    def activate(self, flow: FlowQueue) -> None:
        self._ring[flow] = None

    def deactivate(self, flow: FlowQueue) -> None:
        del self._ring[flow]

    def head_changed(self, flow: FlowQueue) -> None:
        pass

    def correct(self, flow: FlowQueue, delta: float, weight: float, before: bool = False) -> None:
        pass  # charges turns or declared bytes: nothing to correct

    def pick(self) -> FlowQueue | None:
        return next(iter(self._ring)) if self._ring else None

    def charge(self, flow: FlowQueue, item: Item) -> None:
        self._ring.move_to_end(flow)


class _Parked(NamedTuple):
    """A drr flow waiting for the round its head fits in."""

    seq: int  # its heap entry's (an entry with another is stale)
    since: int  # the round it was parked in
    ups: int  # the top-ups it still needed then
    topup: float  # each at the quantum and weight of then
    due: int  # the round it fits in


class DeficitRoundRobin(_Memoryless):
    """Deficit round robin (Shreedhar & Varghese) in bytes, with per-flow weights.

    Each turn a flow may send up to its deficit; a flow whose head does not fit gets
    `quantum * weight` more and goes to the back. A flow that empties loses its deficit, so idle
    flows bank no credit.

    `quantum = 0` (the default) makes the quantum follow the request sizes actually dispatched: the
    median charge (size, at least 1) over its flow's weight, over this and the previous epoch of
    `_EPOCH` dispatches, taken at each epoch's end and at 1, 2, 4, ... dispatches in the first (before
    any, the smallest head seen). A turn is then one typical request, so max-min fairness holds for
    closed-loop flows too (per weight: a heavily weighted flow of large requests, which dispatches
    most, does not make every weight-1 flow's turn a burst; a review): a
    quantum above the typical request lets a flow with a deep queue send more than one a turn, while a
    flow with one or two requests outstanding empties and loses the rest of its turn. (It was the
    largest size seen: one 60 KB request among 1 KB ones made turns of ~60 requests, and a light flow
    next to a deep one got 7 % of its max-min share; a mean is no cure either: three 60 KB requests in
    an epoch of 1 KB ones make it 1.17 KB, and that light flow 11 % short; reviews.) A positive
    `quantum` is used as given.

    Rounds are counted, so a head that needs many top-ups does not cost a visit in each of those
    rounds: a flow whose head will not fit for m more rounds is parked until the round it fits in and
    given the m top-ups then (at the quantum and weight it was parked at), the same turns as visiting
    it every round
    (in a round, woken flows go after those already there). A pick is O(log parked) amortised
    whatever the sizes: with a typical-size quantum, a head far above it (or a tiny weight) needs
    many rounds, and visiting it in each made one dispatch walk every such flow (a review: 20,000
    flows of 63 KB heads next to 1 KB ones, 46 µs a dispatch and single picks of 63 ms).
    """

    name: ClassVar[str] = "drr"
    tracks_heads: ClassVar[bool] = True  # a parked flow whose head or weight changes is woken

    def __init__(self, quantum: int = 0) -> None:
        self._ring: OrderedDict[FlowQueue, int] = OrderedDict()  # flow -> the round it is visited in
        self._parked: list[tuple[int, int, FlowQueue]] = []  # (round it fits in, seq, flow); stale if not in:
        self._parked_at: dict[FlowQueue, _Parked] = {}
        self._regrown: list[FlowQueue] = []  # parked before the quantum changed: to wake a few a pick
        self._seq = 0
        self._round = 0  # the round being visited (the front flow's, or the last one's)
        self._fixed = quantum > 0
        self._quantum = float(quantum) if quantum > 0 else 1.0
        self._typical: float | None = None  # adaptive: the median charge per weight dispatched; None: none yet
        self._seen_head: float | None = None  # ... before it: the smallest head seen (per weight)
        self._epoch: list[float] = []  # ... the charges per weight dispatched in this epoch
        self._previous: list[float] = []  # ... and in the previous one

    @property
    def quantum(self) -> float:
        """The quantum a turn adds now (times the flow's weight)."""
        return self._quantum

    def activate(self, flow: FlowQueue) -> None:
        if self._typical is None and not self._fixed:
            head = flow.queue.peek()
            if head is not None:
                self._first_heads(head.request.size, flow.weight)
        flow.deficit = self._quantum * flow.weight  # its first turn starts now, at the back of the ring
        self._ring[flow] = self._tail()

    def _first_heads(self, size: int, weight: float) -> None:
        """Before the first dispatch the quantum is the smallest head seen (per weight): a large one
        would hand every flow activated meanwhile a deficit of many requests, banked (a weight-1000
        flow of 60 KB requests, with 60 KB for a quantum, sent 1,000 in a row; a review)."""
        cost = (size if size > 1 else 1) / weight
        if self._seen_head is None or cost < self._seen_head:
            self._seen_head = cost
            self._quantum = cost if cost > 1e-300 else 1e-300

    def deactivate(self, flow: FlowQueue) -> None:
        ring = self._ring
        stamp = ring.pop(flow, None)
        if stamp is None:
            if self._parked_at.pop(flow, None) is not None:  # (its heap entry is stale now)
                self._compact()
        elif not ring:
            self._round = stamp + 1  # its turn is over: a flow joining the empty ring starts the next round
            # (rounds went on only as flows missed, so one that came and went each turn never moved
            # them, and a parked flow waited for ever; and a stale round made one wait for every
            # round since)
        flow.deficit = 0.0

    def head_changed(self, flow: FlowQueue) -> None:
        """A parked flow's head changed (the one it waited for left, or one came before it) or its
        weight did (the engine calls this for both): back in the ring now, with the top-ups of the
        rounds it sat out at the weight and quantum it had then; parked again if it still does not fit
        (a review: parked at weight 1e-6 for a million rounds, it stayed so after its weight became 1)."""
        parked = self._parked_at.pop(flow, None)
        if parked is not None:
            self._unpark(flow, parked)
            self._compact()

    def _unpark(self, flow: FlowQueue, parked: _Parked) -> None:
        stamp = max(self._tail(), parked.since + 1)  # (not back in the round it was parked in: a second
        # turn there, with a second top-up; a review)
        flow.deficit += min(parked.ups, stamp - parked.since - 1) * parked.topup
        self._ring[flow] = stamp

    def _compact(self) -> None:
        """Drop the heap's stale entries once they outnumber the live ones: a parked flow that left or
        was woken early leaves its entry until its round, which can be a million rounds away (a review:
        20,000 throw-away flows kept 20,000 entries and their queues alive)."""
        at = self._parked_at
        if len(self._parked) > 2 * len(at) + COMPACT_SLACK:  # (rebuilt from the live ones, which `at` holds)
            self._parked = [(entry.due, entry.seq, flow) for flow, entry in at.items()]
            heapq.heapify(self._parked)

    def _requantum(self, quantum: float) -> None:
        """A new quantum: the flows parked before it had their rounds counted, and their top-ups sized,
        at the old one (grown, they would wait for rounds they no longer need; shrunk, they would be
        paid the old top-up for every round until their due one: a 20 MB head got 17 times its share,
        a review). They are woken a few a pick, with the top-ups of the rounds they sat out at the old,
        and parked again at the new; all at once, one pick walked 20,000 of them (a review: 33 ms)."""
        old, self._quantum = self._quantum, quantum
        if quantum != old and self._parked_at:
            self._regrown = list(self._parked_at)

    def _rewake(self) -> None:
        """Wake up to `_REWAKE` of the flows parked before the quantum changed."""
        regrown, at = self._regrown, self._parked_at
        for _ in range(min(_REWAKE, len(regrown))):
            flow = regrown.pop()
            parked = at.pop(flow, None)
            if parked is not None:
                self._unpark(flow, parked)
        self._compact()

    def correct(self, flow: FlowQueue, delta: float, weight: float, before: bool = False) -> None:
        pass  # charges turns or declared bytes: nothing to correct

    def _tail(self) -> int:
        """The round a flow joining the ring is visited in: after every flow there."""
        ring = self._ring
        return next(reversed(ring.values())) if ring else self._round

    def _live(self, seq: int, flow: FlowQueue) -> _Parked | None:
        """The parking a heap entry stands for, or None if it is stale (the flow left, or was woken)."""
        entry = self._parked_at.get(flow)
        return entry if entry is not None and entry.seq == seq else None

    def _earliest(self) -> int | None:
        """The round the earliest parked flow fits in (stale entries dropped), or None."""
        parked = self._parked
        while parked:
            due, seq, flow = parked[0]
            if self._live(seq, flow) is not None:
                return due
            heapq.heappop(parked)  # (stale)
        return None

    def _wake(self) -> None:
        """Parked flows whose round is next (or, with the ring empty, the earliest) join its back."""
        parked, at, ring = self._parked, self._parked_at, self._ring
        if ring:
            now = next(iter(ring.values()))
        else:
            earliest = self._earliest()
            if earliest is None:
                return
            now = max(self._round, earliest - 1)  # nothing in the ring: the rounds between pass at once
        self._round = now
        woken = 0
        while parked and parked[0][0] <= now + 1 and woken < _REWAKE_AT_ONCE:
            woken += 1  # (more due at once join on the next picks, a round late at most: one pick woke
            # 20,000 parked in the same round, 28 ms)
            _due, seq, flow = heapq.heappop(parked)
            entry = self._live(seq, flow)
            if entry is not None:
                del at[flow]
                self._unpark(flow, entry)

    def pick(self) -> FlowQueue | None:
        ring = self._ring
        if self._regrown:
            self._rewake()
        while True:
            if not ring:
                if not self._parked:
                    return None
                self._wake()  # (the rounds until the earliest parked flow's pass at once)
                if not ring:
                    return None
            parked = self._parked
            flow = next(iter(ring))
            if parked and parked[0][0] <= ring[flow] + 1:
                self._wake()  # (they join at the back: the front stays)
            head = flow.queue.peek()
            assert head is not None, "an active flow has a head"
            size = head.request.size
            if flow.deficit >= size:
                return flow
            if self._typical is None and not self._fixed:
                self._first_heads(size, flow.weight)
            topup = self._quantum * flow.weight
            deficit = flow.deficit = flow.deficit + topup
            stamp = ring[flow]
            need = (size - deficit) / topup if topup > 0 else math.inf
            if need <= _PARK_AFTER:  # fits within a few more turns: visited in each
                ring.move_to_end(flow)
                ring[flow] = stamp + 1
                continue
            del ring[flow]
            if need > _MAX_PARK:  # a weight near 0: more rounds than are counted
                earliest = self._earliest()
                if not ring and (earliest is None or earliest - stamp > _MAX_PARK):
                    # nobody counted waits behind it (only others like it, if any): it goes; parked
                    # again and again instead, a few such heads took a million wakes in one pick
                    flow.deficit = size
                    ring[flow] = stamp + 1
                    continue
                ups = int(_MAX_PARK)  # (served once the others are gone, as the weight says)
            else:
                ups = math.ceil(need)  # top-ups still needed: in rounds stamp+1 .. stamp+ups; it fits in the next
            if not ring:
                self._round = stamp + 1  # (as in `deactivate`)
            seq = self._seq = self._seq + 1
            due = stamp + ups + 1
            self._parked_at[flow] = _Parked(seq, stamp, ups, topup, due)
            heapq.heappush(self._parked, (due, seq, flow))

    def charge(self, flow: FlowQueue, item: Item) -> None:
        size = item.request.size
        cost = size if size > 1 else 1  # an empty request still costs a turn's worth
        flow.deficit -= cost
        if self._fixed:
            return
        epoch = self._epoch
        epoch.append(cost / flow.weight)  # (per unit of weight: a turn is one typical request at any weight)
        n = len(epoch)
        if n == _EPOCH:  # a new epoch: charges two epochs old no longer count
            both = sorted(self._previous + epoch)
            typical = both[len(both) // 2]
            self._previous, self._epoch = epoch, []
        elif not self._previous and n & (n - 1) == 0:  # the first epoch: at 1, 2, 4, ... dispatches
            typical = sorted(epoch)[n // 2]
        else:
            return
        self._typical = typical
        self._requantum(typical)


REMEMBERED_AHEAD = 4096  # per band: the counters of forgotten VTC flows still ahead (`VirtualTokenCounter.forget`)


def _stamped(entry: tuple[float, int, FlowQueue]) -> bool:
    """A vtc heap entry is live while it carries its flow's latest stamp."""
    return entry[1] == entry[2].stamp


def refund_bound(moved: float, lead: float, lag: float, max_lag: float) -> float:
    """How far a correction of `moved` (counter or finish-time units) for a request from before its flow
    last came back may move it: a refund at most `lead` (its distance above the lift point at that
    return) plus min(lag, `max_lag`) (how far it truly stood behind when it emptied: `lag` with this
    refund in it); a positive one whole. For the shard's VTC and the ledger's finish times alike."""
    if moved < 0:
        low = -min(lag, max_lag) if lag > 0.0 else 0.0
        if lead + moved < low:
            return low - lead if low < lead else 0.0
    return moved


def most_owed(owed: dict[str, float], keep: int) -> list[str]:
    """Of forgotten flows still ahead, the `keep` that owe the most (`owed`: each one's lead times its
    weight), to remember when there are too many: evicting the oldest let throw-away flows wash out a
    large debt, and ranking by the lead alone let throw-away requests at a tiny weight do it (reviews).
    For the shard's vtc counters and the ledger's finish times alike."""
    if len(owed) <= keep:
        return list(owed)
    return [name for name, _ in heapq.nlargest(keep, owed.items(), key=lambda e: e[1])]


class VirtualTokenCounter:
    """Virtual token counter (Sheng et al., OSDI'24): serve the backlogged flow with the least service.

    Each flow's counter grows by `cost / weight` per dispatch (weight: the request's own, 0: the flow's
    configured one; cost: the request's declared tokens,
    else its bytes). A flow that becomes backlogged again is lifted to the smallest counter among
    the backlogged flows (or, if none, to where the latest dispatch started), less the lag it had when
    it emptied (at most `max_lag`), so time spent idle is not banked as credit but credit earned while
    backlogged is kept (`deactivate`, `activate`). Keeps a heap of (counter, stamp, flow); stale
    entries are skipped.
    """

    name: ClassVar[str] = "vtc"
    tracks_heads: ClassVar[bool] = False

    def __init__(self, quantum: int = 0) -> None:
        self._heap: list[tuple[float, int, FlowQueue]] = []
        self._active = 0
        self._floor = 0.0
        self._shift = 0  # what `_rebase` has taken off the counters so far (exact: an int)
        self._charges = 0  # charges since the latest re-base
        self.max_lag = MAX_LAG  # (the band's `max_lag`, set by the engine's Band)
        self._tick = 0  # unique, increasing: valid-entry stamps and the tie-break (first come first)
        # forgotten flows' counters that were ahead (`forget`), and the weight each was charged at
        self._ahead: dict[str, tuple[float, float]] = {}

    def _stamp(self, flow: FlowQueue) -> int:
        self._tick += 1
        flow.stamp = self._tick
        return self._tick

    def _top(self) -> FlowQueue | None:
        heap = self._heap
        while heap:
            _, stamp, flow = heap[0]
            if stamp == flow.stamp:
                return flow
            heapq.heappop(heap)
        return None

    def activate(self, flow: FlowQueue) -> None:
        if flow.shifted != self._shift:
            self._sync(flow)
        lift = self._lift()
        lag = flow.lag  # (> 0: how far it stood behind when it emptied, at most max_lag kept; `correct`)
        cap = self.max_lag
        vtc = flow.vtc = max(flow.vtc, lift - (lag if lag < cap else cap) if lag > 0.0 else lift)
        flow.lead = vtc - lift  # how far above the lift point it stands (`correct`: before)
        self._active += 1
        self._renew(flow)

    def _renew(self, flow: FlowQueue) -> None:
        """A heap entry for `flow` at its counter now (an older one goes stale: compacted)."""
        heap = self._heap
        heapq.heappush(heap, (flow.vtc, self._stamp(flow), flow))
        self._heap = compacted(heap, self._active, _stamped)

    def deactivate(self, flow: FlowQueue) -> None:
        flow.stamp = 0  # no entry carries stamp 0: the flow's entry is now stale
        self._active -= 1
        if not self._active:
            self._heap.clear()  # stale entries only: they would keep forgotten flows alive
        flow.lag = self._lift() - flow.vtc  # (`correct`: before)

    def head_changed(self, flow: FlowQueue) -> None:
        pass

    def correct(self, flow: FlowQueue, delta: float, weight: float, before: bool = False) -> None:
        """A dispatched request's actual cost differed from its declared one by `delta`: move the flow's
        counter by delta / weight, `weight` the request's own, which it was charged at (as the VTC paper
        charges the tokens actually served, and APF corrects its virtual time with the measured
        service; divided by the flow's weight at release, a request charged at weight 4 and corrected
        after one at weight 1 was queued left the counter 7,490 below where it began: a review). A
        backlogged flow's entry is renewed.

        `before`: the request arrived before the flow last became backlogged. Had its cost been known at
        dispatch, the flow's counter would have stood that much lower when it emptied, and the lift at
        its return (`activate`) would have discarded any of that which put it behind the others then,
        as it discards the time a flow spends idle. So a refund of such a request takes the counter back
        at most to the lift point plus what the flow was charged since (`flow.lead`: its distance above
        that point), less how far the flow truly stood behind the least backlogged counter when it
        emptied (`flow.lag`, which the refunds of its requests then in flight reveal): the service its
        declared costs held it back from while it was backlogged, which an over-declaring flow that
        pauses between bursts was owed (a review: 0.181 of the tokens against 0.199 when it declared
        exactly, had that gone too). The whole refund would also bank the time the flow spent idle (a
        review: a request declaring 2**32 tokens, refunded after its flow came back, gave that flow
        1,007 dispatches in a row)."""
        if flow.shifted != self._shift:
            self._sync(flow)
        moved = delta / weight
        if before or not flow.stamp:  # (a refund of a request from before it emptied: it stood that much
            flow.lag -= moved  # further behind then; a positive correction, less)
        if before:
            moved = refund_bound(moved, flow.lead, flow.lag, self.max_lag)
            flow.lead += moved
        flow.vtc += moved
        if flow.stamp:  # (the old entry goes stale: compacted, as activate's are; a review saw 36,669
            # entries for 2 flows after 50,000 dispatches whose releases reported fewer tokens)
            self._renew(flow)

    def correct_older(self, flow: FlowQueue, delta: float, weight: float) -> None:
        """A correction for a request from before `flow`'s queue was made (the flow was forgotten while it
        ran): as `correct_forgotten` would have had it. Its counter holds that charge only if it took
        back a counter kept ahead (`recall`: then its `lead` at its return), so a refund goes at most to
        where its return was lifted to, and raises no lag; a positive one is applied whole, from where
        it would be lifted to if it has not come back yet."""
        moved = delta / weight
        if flow.vtc == -math.inf:  # (made, never backlogged: its first request was turned away)
            if moved > 0:
                flow.vtc = self._lift() + moved
                flow.shifted = self._shift
            return
        if flow.shifted != self._shift:
            self._sync(flow)
        if flow.since < flow.born:  # never backlogged since: as its kept counter (`activate` lifts it)
            flow.vtc += moved
            return
        moved = refund_bound(moved, flow.lead, 0.0, 0.0)
        flow.lead += moved
        flow.vtc += moved
        if flow.stamp:
            self._renew(flow)

    def forget(self, flow: FlowQueue) -> None:
        """The shard forgets `flow` (idle): its counter is kept if it is ahead of where the flow would be
        lifted to on its return, so a flow served ahead (an under-declared request, corrected at its
        release) still pays back when it comes back (a review: 8 throw-away flow ids pushed such a flow
        out of the shard's memory and its share of actual tokens went from 0.51 to 0.91). A flow at or
        behind that point loses nothing: it is lifted anyway. At most `REMEMBERED_AHEAD` per band
        (`_keep`); flows that arrive for nothing (throw-away ids) are never ahead."""
        if flow.shifted != self._shift:
            self._sync(flow)
        if flow.vtc > self._lift():
            self._keep(flow.id, flow.vtc, flow.weight)

    def _lift(self) -> float:
        """Where a flow that becomes backlogged now is lifted to (`activate`)."""
        low = self._top()
        return low.vtc if low is not None else self._floor

    def _keep(self, flow_id: str, vtc: float, weight: float) -> None:
        """Keep a forgotten flow's counter ahead. Over `REMEMBERED_AHEAD`: those no longer ahead go, then
        all but the half that owe the most service (`most_owed`; amortised O(log n)); 4,104 throw-away
        flows, each served one token, washed out a debt of 100,000 when the oldest went first."""
        ahead = self._ahead
        ahead[flow_id] = (vtc, weight)
        if len(ahead) > REMEMBERED_AHEAD:
            lift = self._lift()
            owed = {f: (v - lift) * w for f, (v, w) in ahead.items() if v > lift}
            self._ahead = {f: ahead[f] for f in most_owed(owed, REMEMBERED_AHEAD // 2)}

    def correct_forgotten(self, flow_id: str, delta: float, weight: float) -> None:
        """A correction for a flow forgotten since its request was dispatched (its only one, so it was
        idle, and collectable, while the request ran): kept for its return, as `forget` keeps a counter
        ahead (a review: pushed out during the generation, the correction was dropped). Served more than
        charged, it returns that much above where it would be lifted to; served less, nothing (idle
        time banks no credit)."""
        ahead = self._ahead
        entry = ahead.get(flow_id)
        if entry is not None:
            ahead[flow_id] = (entry[0] + delta / weight, entry[1])
        elif delta > 0:  # (at most delta / weight more than it would pay remembered: its counter is unknown)
            self._keep(flow_id, self._lift() + delta / weight, weight)

    def recall(self, flow: FlowQueue) -> None:
        """`flow` is known again (a new `FlowQueue`): its counter, if it was ahead when it was forgotten."""
        flow.shifted = self._shift  # (its kept counter is measured from now)
        entry = self._ahead.pop(flow.id, None)
        # (none: lifted wherever the least counter is, which a re-base and refunds can leave below 0)
        flow.vtc = entry[0] if entry is not None else -math.inf

    pick = _top  # the least-served backlogged flow

    def _rebase(self, base: float) -> None:
        """Take `base` (the least-served backlogged counter, past `_REBASE_AT`) off the band's counters: the
        order and the differences stay, and charges are held exactly again. The backlogged flows' now
        and the remembered ones' (those left behind the new floor are dropped: they would be lifted,
        unless refunds take the least counter back below them later: a review), O(backlogged +
        remembered) once every `_REBASE_EVERY` charges at most (a review: an attacker whose flows' counters
        stood 2**40 apart had one on every charge, 342 µs a dispatch with 3,600 flows); an idle flow's
        when it is next used (`_sync`, by `shifted`), so an idle flow costs nothing here."""
        whole = int(base)
        self._charges = 0
        self._shift += whole
        shift = self._shift
        live = []
        for _, stamp, flow in self._heap:
            if stamp == flow.stamp:
                flow.vtc -= whole
                flow.shifted = shift
                live.append((flow.vtc, stamp, flow))
        heapq.heapify(live)
        self._heap = live
        self._floor -= whole
        floor = self._lift()
        ahead = self._ahead
        self._ahead = {name: (vtc - whole, weight) for name, (vtc, weight) in ahead.items() if vtc - whole > floor}

    def _sync(self, flow: FlowQueue) -> None:
        """An idle flow's counter, measured from the latest re-base (`_rebase`)."""
        flow.vtc -= self._shift - flow.shifted
        flow.shifted = self._shift

    def charge(self, flow: FlowQueue, item: Item) -> None:
        self._floor = least = vtc = flow.vtc  # (the pick: the least served)
        weight = item.request.weight  # the request's own (0: the flow's configured), as `correct` divides by
        vtc += item.cost / (weight if weight > 0 else flow.configured)
        flow.vtc = vtc
        self._tick = tick = self._tick + 1
        flow.stamp = tick
        _heapreplace(self._heap, (vtc, tick, flow))
        if least > _REBASE_AT:
            self._charges += 1
            if self._charges >= _REBASE_EVERY:
                self._rebase(least)


class GlobalFcfs(_Memoryless):
    """No fairness: the best head across all flows by the band's ordering (upstream "global strict").

    Under FCFS ordering this is exact arrival order across the band; a flooding flow takes the
    share of its arrivals. Keeps a heap of heads keyed like the ordering; stale entries are skipped.
    """

    name: ClassVar[str] = "global-fcfs"
    tracks_heads: ClassVar[bool] = True

    def __init__(self, quantum: int = 0) -> None:
        self._heap: list[tuple[float, int, int, Item]] = []
        self._active = 0
        self._tick = 0  # a head can be pushed twice (EDF: it lost and regained the head): keep entries unique

    def _push_head(self, flow: FlowQueue) -> None:
        head = flow.queue.peek()
        assert head is not None, "an active flow has a head"
        self._tick += 1
        heapq.heappush(self._heap, (head.key, head.seq, self._tick, head))
        self._heap = compacted(self._heap, self._active, self._valid_entry)

    @classmethod
    def _valid_entry(cls, entry: tuple[float, int, int, Item]) -> bool:
        return cls._valid(entry[3])

    @staticmethod
    def _valid(item: Item) -> bool:
        if item.state == _DONE:
            return False
        return item.flow.queue.peek() is item

    def activate(self, flow: FlowQueue) -> None:
        self._active += 1
        self._push_head(flow)

    def deactivate(self, flow: FlowQueue) -> None:
        self._active -= 1
        if not self._active:
            self._heap.clear()  # stale entries only: they would keep finished items and their flows alive

    def head_changed(self, flow: FlowQueue) -> None:
        self._push_head(flow)

    def pick(self) -> FlowQueue | None:
        heap = self._heap
        while heap:
            item = heap[0][3]
            if self._valid(item):
                return item.flow
            heapq.heappop(heap)
        return None

    def charge(self, flow: FlowQueue, item: Item) -> None:
        heapq.heappop(self._heap)

    def correct(self, flow: FlowQueue, delta: float, weight: float, before: bool = False) -> None:
        pass  # no fairness: nothing to correct


class _ArrivalList(Protocol):
    oldest: Item | None


class ArrivalFcfs(_Memoryless):
    """Global FCFS under FCFS ordering, in O(1) with no heap: the band's oldest queued item goes next.

    The band already threads its queued items oldest first (for displacement); under FCFS the
    oldest item of the band is the head of its flow, so the heap of heads that `GlobalFcfs` keeps
    (two O(log F) operations and a tuple per dispatch) is not needed. The engine picks this class
    for `fairness = "global-fcfs"` with `ordering = "fcfs"`; deadline orderings keep `GlobalFcfs`.
    """

    name: ClassVar[str] = "global-fcfs"
    tracks_heads: ClassVar[bool] = False

    def __init__(self, band: _ArrivalList) -> None:
        self._band = band

    def activate(self, flow: FlowQueue) -> None:
        pass

    def deactivate(self, flow: FlowQueue) -> None:
        pass

    def head_changed(self, flow: FlowQueue) -> None:
        pass

    def correct(self, flow: FlowQueue, delta: float, weight: float, before: bool = False) -> None:
        pass  # charges turns or declared bytes: nothing to correct

    def pick(self) -> FlowQueue | None:
        oldest = self._band.oldest
        return None if oldest is None else oldest.flow

    def charge(self, flow: FlowQueue, item: Item) -> None:
        pass


FAIRNESS: dict[str, type[RoundRobin] | type[DeficitRoundRobin] | type[VirtualTokenCounter] | type[GlobalFcfs]] = {
    cls.name: cls for cls in (RoundRobin, GlobalFcfs, DeficitRoundRobin, VirtualTokenCounter)
}
