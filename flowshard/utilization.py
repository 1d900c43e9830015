"""The utilization saturation detector: backend saturation from the backends' own metrics.

Why: the concurrency budget is open loop (it counts requests, not what they cost the GPU). The
backends say how loaded they are: their waiting queue and KV-cache use. Per backend

    saturation = max(waiting / queue_threshold, kv / kv_threshold)

(upstream defaults 5 and 0.8), metrics older than `staleness` (from the scrape's arrival, as
upstream's) count as saturated (1.0), and the pool's saturation is the mean over the backends of
each one's, capped at 1 (unlike upstream's plain mean: one backend far past its threshold, from
traffic not flowshard's or a small one, held the whole pool while another sat idle; a review).
It feeds the same per-band ceilings as the concurrency budget; a request needs room in both.

Beyond upstream (its open overshoot problem): between two scrapes the scraped queue does not show
the requests let through since. So each backend's figure is corrected with what the proxy itself
knows exactly: the requests it sent there since the scrape was sent, minus those that finished
there since, counted as waiting (the conservative guess of where they landed); and the KV use grows
by the KV share of an average running request for each. A scrape can also miss requests sent
before it left: still on their way (a burst sent just before the scrape, not yet read by the
backend), or done there and not yet seen done here. So a backend's waiting and running together
count at least what the proxy had in flight there when the scrape left (where the page gives both;
less its streams whose relay waited on a slow client: the backend may be done with them, so their
ends are not taken off either); what is missing counts as waiting (a review: a scrape showing 1 of
5 requests just sent let 5 more through, and the backend's queue reached 9 at a threshold of 5).
Requests admitted but not yet sent (grants still on their way to a shard) go to the backends with
room, which they fill together (`PoolUtilization.saturation`). The core has no clock: the shell passes
`now` to `scraped` and `expire`.
"""

from __future__ import annotations

import math
from collections import deque

import msgspec

__all__ = ["BackendLoad", "NoMetrics", "PoolUtilization", "ScrapeError", "Scraped", "parse_metrics"]

# Requests in flight at a backend that its scrapes do not show, more than were sent there in the last
# MISSING_RECENT seconds (so not on their way), for MISSING_PERSISTS seconds in a row: its metrics do
# not count what is sent to its URL (a load balancer over several servers): `PoolUtilization.missing_for`
MISSING_RECENT = 1.0
MISSING_PERSISTS = 5.0

# Metric names by engine. Waiting and running are summed over label sets (engines, models);
# the KV use is the highest of its label sets.
WAITING = (b"vllm:num_requests_waiting", b"sglang:num_queue_reqs", b"tgi_queue_size")
RUNNING = (b"vllm:num_requests_running", b"sglang:num_running_reqs", b"tgi_batch_current_size")
KV = (b"vllm:kv_cache_usage_perc", b"vllm:gpu_cache_usage_perc", b"sglang:token_usage")
_PREFIXES = WAITING + RUNNING + KV


class ScrapeError(ValueError):
    """A metrics page flowshard cannot read a saturation from."""


class NoMetrics(ScrapeError):
    """A backend that has no metrics flowshard knows (no page, or none of the known names): unlike a
    failing scrape, it will not pass (the shell says what to do)."""


class Scraped(msgspec.Struct, frozen=True):
    waiting: float
    running: float
    kv: float  # 0..1
    # the page gave both counts (waiting and running): every request the backend holds is in them
    both: bool = True


def parse_metrics(text: bytes) -> Scraped:
    """Read the waiting queue, running count and KV-cache use from a Prometheus text page.

    Only the lines of the known metrics are parsed (a vLLM page is mostly histograms), found by a
    search for each name rather than a split of the page into lines: the work is the page's bytes
    scanned, not a Python step per line (a review: a 0.9 MiB page of short lines cost 18 ms a parse,
    scraped every 50 ms). A page with neither a waiting queue nor a KV-cache metric cannot say
    anything: ScrapeError.
    """
    return read_lines(_known_lines(text))


def read_lines(lines: list[bytes]) -> Scraped:
    """The figures of the known metrics' lines, in order (`parse_metrics`)."""
    waiting = running = 0.0
    kv = -1.0
    seen_waiting = seen_running = False
    for line in lines:
        brace = line.find(b"}")
        name_end = line.find(b"{")
        if name_end < 0:
            name_end = line.find(b" ")
            fields = line[name_end:].split()
        else:
            fields = line[brace + 1 :].split()
        name = line[:name_end]
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            raise ScrapeError(f"{name.decode(errors='replace')}: value {fields[0][:40]!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise ScrapeError(f"{name.decode(errors='replace')}: value {value} is not a non-negative number")
        if name in WAITING:
            waiting += value
            seen_waiting = True
        elif name in RUNNING:
            running += value
            seen_running = True
        elif name in KV:
            kv = max(kv, value)
    if not seen_waiting and kv < 0:
        raise NoMetrics("no known saturation metric (vllm:num_requests_waiting, vllm:kv_cache_usage_perc, "
                          "sglang:num_queue_reqs, sglang:token_usage, tgi_queue_size)")
    return Scraped(waiting, running, min(max(kv, 0.0), 1.0), seen_waiting and seen_running)


def _known_lines(text: bytes) -> list[bytes]:
    """The lines of `text` that begin with a known metric's name, in the page's order (as a split on
    newlines gives them: the sums add in the same order, to the last bit)."""
    found: list[tuple[int, bytes]] = []
    for name in _PREFIXES:
        at = text.find(name)
        while at >= 0:
            if not at or text[at - 1] == 0x0A:  # at a line's start (not a HELP or TYPE line's name)
                end = text.find(b"\n", at)
                found.append((at, text[at:] if end < 0 else text[at:end]))
            at = text.find(name, at + len(name))
    found.sort()
    return [line for _, line in found]


class BackendLoad:
    """One backend's last scrape and the proxy's exact count of what changed there since."""

    __slots__ = ("at", "duration", "errors", "finished", "finished_base", "fresh_at", "held", "held_base",
                 "held_finished", "held_finished_base", "kv", "marks", "missing_since", "running", "sent", "sent_base",
                 "unseen", "waiting")

    def __init__(self) -> None:
        self.waiting = self.running = self.kv = 0.0
        self.at = -math.inf  # when the last good scrape was *sent* (its figures are at least that fresh)
        # ...and when it arrived: its age, for `staleness`, counts from then (a review: from its sending,
        # a backend whose metrics took half of `staleness` to come was stale for a moment before each
        # new scrape, and one taking `staleness` always, every request held, with nothing said)
        self.fresh_at = -math.inf
        self.duration = 0.0  # how long the last good scrape took (arrival - sending)
        self.sent = 0  # requests sent to this backend, ever
        self.finished = 0  # requests that ended there, ever
        # its streams in flight whose relay has waited on the client (the backend may be done with them)
        self.held = 0
        self.held_finished = 0  # ...and of those, the ones that ended (counted in `finished` too), ever
        # all at the moment the last good scrape was sent
        self.sent_base = self.finished_base = self.held_base = self.held_finished_base = 0
        self.unseen = 0.0  # in flight there when it left, not in its figures (`backend_saturation`)
        self.marks: deque[tuple[float, int]] = deque()  # (sent at, requests sent then) of recent good scrapes
        self.missing_since = math.inf  # since when the scrapes miss more than was sent lately (or inf)
        self.errors = 0  # scrapes that failed, ever


_BELOW_ONE = 1.0 - 1e-12  # the pool's figure while the backends still have room for a request


class PoolUtilization:
    """The pool's saturation from scraped metrics plus the dispatches not yet visible in them."""

    def __init__(self, backends: int, queue_threshold: float, kv_threshold: float, staleness: float) -> None:
        if backends < 1:
            raise ValueError("the utilization detector needs at least one backend")
        self.loads = [BackendLoad() for _ in range(backends)]
        self.queue_threshold = queue_threshold
        self.kv_threshold = kv_threshold
        self.staleness = staleness
        self._now = -math.inf  # the shell's clock at its last call (scraped / expire)
        # `saturations_kept` and `rooms_kept`, while nothing changed them: (changes then, the oldest
        # fresh scrape's arrival then); the rooms computed only when asked for
        self.changes = 0  # events that moved a backend's figures, ever
        self._kept_at: tuple[int, float] | None = None
        self._kept_saturations: list[float] = []
        self._kept_rooms: list[int] | None = None

    # ------------------------------------------------------------------ events from the shell

    def sent(self, backend: int) -> None:
        self.loads[backend].sent += 1
        self.changes += 1

    def finished(self, backend: int, held: bool = False) -> None:
        """A request sent there ended here (`held`: a stream that was `held`)."""
        load = self.loads[backend]
        load.finished += 1
        if held:
            load.held -= 1
            load.held_finished += 1
        self.changes += 1

    def held(self, backend: int) -> None:
        """A stream from there waits on its client for the first time: meanwhile the proxy reads nothing
        more of it, so the backend may be done with it long before it ends here."""
        self.loads[backend].held += 1
        self.changes += 1

    def add(self, backend: int, sent: int = 0, finished: int = 0, held: int = 0, held_finished: int = 0) -> None:
        """Several of the events above at once (another process's proxy's, as it reports them): `held`
        the streams now held less those held that ended, `held_finished` the latter."""
        if sent or finished or held or held_finished:
            load = self.loads[backend]
            load.sent += sent
            load.finished += finished
            load.held += held
            load.held_finished += held_finished
            self.changes += 1

    def scrape_started(self, backend: int) -> tuple[int, int, int, int]:
        """Call when the scrape request leaves; pass the result to `scraped` with its figures."""
        load = self.loads[backend]
        return load.sent, load.finished, load.held, load.held_finished

    def scraped(self, backend: int, sent_at: float, mark: tuple[int, int, int, int], figures: Scraped,
                arrived_at: float | None = None) -> bool:
        """A scrape sent at `sent_at` (with `mark` from `scrape_started`) came back at `arrived_at` (None:
        at once). Returns whether the pool's saturation fell (then held work may go: the caller re-plans
        its grants): whether this backend's did, which lowers the mean over any backends it is one of
        (those in rotation). The requests sent since count from `sent_at`; the figures' age from
        `arrived_at`."""
        arrived = sent_at if arrived_at is None else max(sent_at, arrived_at)
        self._now = max(self._now, arrived)  # (judged as of its arrival: it may have been stale before)
        before = self.backend_saturation(backend)
        load = self.loads[backend]
        if sent_at < load.at:  # an older scrape overtaken by a newer one
            return False
        load.waiting, load.running, load.kv = figures.waiting, figures.running, figures.kv
        load.at = sent_at
        load.fresh_at = arrived
        load.duration = arrived - sent_at
        load.sent_base, load.finished_base, load.held_base, load.held_finished_base = mark
        self.changes += 1
        # In flight there when the scrape left, yet not in its figures: not arrived yet (a backend may
        # take longer than a scrape interval to count a request: a long prompt's tokenizing), or done
        # there and not yet seen done here (then counted finished as well: the two cancel; a bound on
        # this term, tried, broke both: a review). Not the streams that waited on their client: the
        # backend may be done with them long before they end here (a review: counted, five streams
        # read slowly held every request for 12 s while the backend sat idle); nor is their end taken
        # off (a review: it hid as many requests sent since). Only where the page gave both counts.
        missing = (mark[0] - mark[1] - mark[2]) - (figures.waiting + figures.running)
        load.unseen = max(0.0, missing) if figures.both else 0.0
        self._judge_missing(load, sent_at, mark[0], load.unseen)
        return self.backend_saturation(backend) < before

    @staticmethod
    def _judge_missing(load: BackendLoad, at: float, sent: int, unseen: float) -> None:
        """A backend URL must be one server, whose metrics count what is sent to it: behind a load
        balancer each scrape shows one server's, and the others' requests count as unseen, for ever
        (the pool is held). Requests on their way are recent; more unseen than were sent there in the
        last MISSING_RECENT seconds are not, and when that lasts, `missing_for` says so."""
        marks = load.marks
        marks.append((at, sent))
        while len(marks) > 1 and marks[1][0] <= at - MISSING_RECENT:
            marks.popleft()  # (the newest mark at least MISSING_RECENT old stays first)
        then_at, then_sent = marks[0]
        if then_at <= at - MISSING_RECENT and unseen > sent - then_sent:
            load.missing_since = min(load.missing_since, at)
        else:
            load.missing_since = math.inf

    def missing_for(self, backend: int) -> float:
        """For how long this backend's scrapes have missed requests that are not on their way (0: they
        do not): past MISSING_PERSISTS the shell warns that its URL seems not to be one server."""
        since = self.loads[backend].missing_since
        return max(0.0, self._now - since) if since != math.inf else 0.0

    def scrape_failed(self, backend: int) -> None:
        self.loads[backend].errors += 1

    def expire(self, now: float) -> None:
        """Advance the detector's clock: metrics older than `staleness` now count as saturated."""
        self._now = max(self._now, now)

    # ------------------------------------------------------------------ saturation

    def stale(self, backend: int) -> bool:
        at = self.loads[backend].fresh_at
        return at == -math.inf or self._now - at > self.staleness  # never scraped: stale (-inf - -inf is nan)

    def age(self, backend: int) -> float:
        """Seconds since the last good scrape arrived."""
        return self._now - self.loads[backend].fresh_at

    def backend_saturation(self, backend: int) -> float:
        """max(waiting / queue_threshold, kv / kv_threshold) with the correction; 1.0 when stale."""
        return self._saturation(backend, 0)

    def _saturation(self, backend: int, more: float) -> float:
        """`backend_saturation` with `more` requests sent there besides: the same arithmetic, step for
        step, as once `sent` has counted them (so `room` and `full` never disagree by a rounding)."""
        if self.stale(backend):
            return 1.0
        return self._fresh_saturation(self.loads[backend], more)

    def _fresh_saturation(self, load: BackendLoad, more: float) -> float:
        """`_saturation` of a backend whose figures are fresh."""
        delta = self._delta(load, more)
        waiting = max(0.0, load.waiting + delta)
        kv = load.kv
        if delta > 0 and load.running > 0:
            kv += delta * load.kv / load.running  # each one takes an average running request's share
        return max(waiting / self.queue_threshold, kv / self.kv_threshold)

    @staticmethod
    def _delta(load: BackendLoad, more: float = 0) -> float:
        """What changed there since its scrape, as waiting requests: what the scrape missed (`unseen`,
        judged as it came back: `scraped`) and the requests sent since (with `more` besides), less
        those finished since (the held streams' ends are not taken off)."""
        finished = (load.finished - load.finished_base) - (load.held_finished - load.held_finished_base)
        return load.unseen + (load.sent - load.sent_base + more) - finished

    def room(self, backend: int, sat: float | None = None) -> int:
        """How many more requests the backend takes before it is full (`full`: its saturation at 1; 0
        when it is already, or stale): the picker sends it requests while it is below 1, so a room
        of 2.5 by its figures takes 3. By its queue (`queue_threshold` less what waits) or its KV
        cache (what it holds, and an average running request's share for each one more), whichever
        is less; near a whole number, checked with `_saturation` itself (the rounding of either
        must not make them disagree). `sat`: its saturation now, if the caller has it."""
        if (self._saturation(backend, 0) if sat is None else sat) >= 1.0:
            return 0
        load = self.loads[backend]
        delta = self._delta(load)
        queued = load.waiting + delta
        estimate = self.queue_threshold - queued
        exact = float(queued).is_integer() and float(self.queue_threshold).is_integer()  # (whole: no rounding)
        if load.running > 0 and load.kv > 0:  # (kv + max(0, delta + x) * kv / running reaches the threshold)
            by_kv = (self.kv_threshold - load.kv) * load.running / load.kv - delta
            if by_kv < estimate:
                estimate, exact = by_kv, False
        n = max(1, min(math.ceil(estimate - 1e-9), 1 << 20))
        if exact or abs(estimate - round(estimate)) > 1e-6:  # (the usual cases: no rounding can move it)
            return n
        while n > 1 and self._saturation(backend, n - 1) >= 1.0:
            n -= 1
        while self._saturation(backend, n) < 1.0 and n < 1 << 20:
            n += 1
        return n

    def saturations(self) -> list[float]:
        """Each backend's `backend_saturation` now, by index (for `saturation` and `full` at once)."""
        return [self.backend_saturation(b) for b in range(len(self.loads))]

    def saturations_kept(self) -> list[float]:
        """`saturations()`, computed again only once an event changed them or a backend's figures
        turned stale: a plan asks at each grant and admission (the list is the caller's to read, not
        to change)."""
        kept = self._kept_at
        if kept is not None and kept[0] == self.changes and self._now - kept[1] <= self.staleness:
            return self._kept_saturations
        sats: list[float] = []
        oldest = math.inf  # (the first of the fresh ones to turn stale: `stale`'s own test, on its arrival)
        for b, load in enumerate(self.loads):
            if self.stale(b):
                sats.append(1.0)
            else:
                sats.append(self._fresh_saturation(load, 0))
                oldest = min(oldest, load.fresh_at)
        self._kept_at = (self.changes, oldest)
        self._kept_saturations = sats
        self._kept_rooms = None
        return sats

    def rooms_kept(self) -> list[int]:
        """Each backend's `room` now, kept as `saturations_kept` is."""
        sats = self.saturations_kept()
        rooms = self._kept_rooms
        if rooms is None:
            rooms = self._kept_rooms = [self.room(b, sat) for b, sat in enumerate(sats)]
        return rooms

    def saturation(self, unsent: int = 0, out: frozenset[int] | set[int] = frozenset(),
                   now: list[float] | None = None, rooms: list[int] | None = None,
                   inflight: list[int] | None = None) -> float:
        """The pool's saturation: the mean over the backends in rotation (`out`: those that are not; none
        left: over all of them) of each one's capped at 1, so the pool is at 1 only when every one is
        (the picker sends to those with room first: `BackendPool.pick`); with `unsent` admitted requests
        not yet sent anywhere. A backend out takes no request, so its figures say nothing of what
        the pool can take: counted idle, it let the others be driven past their threshold (a review:
        one of two out, the other at 1.6, the pool at 0.8). The `unsent` go where the picker sends
        them, to the backends with room, which take them until each is full: the pool reaches 1 when
        they fill the room of all of them (`room`: what each takes while it is below 1), not sooner and
        not later; below that they are placed as the picker places them (`_spread`: fewest in flight
        first, `inflight` by backend if the caller has the picker's counts, else the detector's),
        those it may send to any of several backends tied at the last level counted where they
        raise the figure most, so that it is never below what the picker makes of them. (Counted in
        proportion to each one's room, a band's ceiling below 1 was passed, the pool at 0.65 for a
        ceiling of 0.5; spread evenly, by up to 0.37 where one backend had more in flight than
        another (reviews 121, 122); shared among the tied ones, by up to 0.10 (review 127); spread
        over all, the shares of full ones vanished under the cap: 10 sent where one backend of two
        had room for 5; capped one by one, rooms of 2 and 1 took 4; summed, a backend whose one
        running request held most of its KV cache took the others' room: 2 let through for 21 (three
        reviews).) `now`: `saturations()`, and `rooms`, each backend's `room`, if the caller has them."""
        backends = [b for b in range(len(self.loads)) if b not in out] or range(len(self.loads))
        sats = [self.backend_saturation(b) if now is None else now[b] for b in backends]
        if not unsent:  # (a backend below 1 keeps the mean below 1, whatever the rounding of the sum)
            mean = sum(min(1.0, sat) for sat in sats) / len(backends)
            return mean if mean < 1.0 or all(sat >= 1.0 for sat in sats) else _BELOW_ONE
        roomy = [(b, self.room(b, sat) if rooms is None else rooms[b], sat)
                 for b, sat in zip(backends, sats, strict=True) if sat < 1.0]
        if unsent >= sum(r for _, r, _ in roomy):
            return 1.0
        loads = self.loads
        levels = [(loads[b].sent - loads[b].finished if inflight is None else inflight[b]) for b, _, _ in roomy]
        shares, tied, left = self._spread(levels, [r for _, r, _ in roomy], unsent)

        figures = [min(1.0, self._saturation(b, n) if n else sat) for (b, _, sat), n in zip(roomy, shares, strict=True)]
        if left:  # the tied ones whose figure one more raises most (the picker's round robin may pick them)
            more = sorted(((min(1.0, self._saturation(roomy[k][0], shares[k] + 1)), k) for k in tied),
                          key=lambda x: x[0] - figures[x[1]], reverse=True)
            for figure, k in more[:left]:
                figures[k] = figure
        filled = sum(figures)
        # (below the rooms' sum it is below 1: a backend with room left keeps its figure below 1)
        return min((len(backends) - len(roomy) + filled) / len(backends), _BELOW_ONE)

    @staticmethod
    def _spread(inflight: list[int], rooms: list[int], unsent: int) -> tuple[list[int], list[int], int]:
        """Where the picker sends `unsent` requests among backends with room: it sends each to the one
        with the fewest in flight that is not full (`BackendPool.pick`), so water filling, each
        backend's level its requests in flight, each taking no more than its room. Returns each
        backend's share of the whole levels, the backends tied at the next level (any of which the
        picker's round robin may give one more) and how many requests are left for them (fewer
        than they are). `unsent` is below the rooms' sum."""
        # The level rises through the events: each backend joins at its in-flight count, leaves at that
        # plus its room (full); between two, the backends in take one request each per level.
        events = sorted([(f, 1) for f in inflight] + [(f + r, -1) for f, r in zip(inflight, rooms, strict=True)])
        low, active, taken = events[0][0], 0, 0
        for at, step in events:  # (`unsent` is below the rooms' sum: the filling stops before the last)
            if at > low:
                more = active * (at - low)
                if taken + more > unsent:
                    break
                taken += more
                low = at
            active += step
        low += (unsent - taken) // active  # the highest level whose filling takes no more than `unsent`
        shares = [min(r, max(0, low - f)) for f, r in zip(inflight, rooms, strict=True)]
        tied = [k for k, (f, r) in enumerate(zip(inflight, rooms, strict=True))
                if f + shares[k] == low and shares[k] < r]  # (the next level would raise them)
        return shares, tied, unsent - sum(shares)

    def full(self, backend: int) -> bool:
        """Whether `backend` is at or past its saturation (stale included): the picker sends elsewhere."""
        return self.backend_saturation(backend) >= 1.0
