"""Proxy mode's backends: which one gets a request, passive health, and the metrics scraper.

flowshard is not an endpoint picker, but the proxy must send each request somewhere: the healthy
backend with the fewest requests in flight (ties round robin), one with room by the utilization
detector first; a retry goes first to one that has not failed since its last whole answer. Health
is passive: a backend that cannot be connected to is taken out for `backoff` seconds, doubling per
take-out in a row up to `max_backoff`; one that had the request and failed it only at the third
such failure in a row shown to be its own (a stream cut short, a timeout; a reset, not HTTP or a
5xx once another backend answered that request: `Proxy.forward`); an answer brings it back. The
scraper reads every backend's Prometheus metrics each `scrape_interval` into the core's
`PoolUtilization` and calls `on_room` when the pool's saturation fell, so held work is granted at
once rather than at the next release.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
from collections.abc import Callable
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from flowshard.config import ProxyConfig
from flowshard.utilization import (
    MISSING_PERSISTS,
    MISSING_RECENT,
    NoMetrics,
    PoolUtilization,
    ScrapeError,
    parse_metrics,
)

__all__ = ["LOCAL_SHORTAGE", "SCRAPE_CONNECT_TIMEOUT", "Backend", "BackendPool", "Scraper", "failure_kind"]

log = logging.getLogger(__name__)
# A backend's metrics body past this is a scrape error: parsed every `scrape_interval` (0.05 s by
# default), a 20 MB one kept the distributor at 98 % CPU (a review); vLLM's and SGLang's are ~100 KB.
MAX_METRICS_BYTES = 1 << 20
# How long a backend a request failed on stays `suspect` once another backend's stream head came for
# that request, its first bytes not yet (`Backend.suspected`; `BackendPool.pick` ranks it after the
# others): long enough for a prefill of a few seconds to show whose failure it was by then (review 137:
# not suspect, a backend failing everything fast took 19 of 20 requests during another's 2 s prefill),
# short enough that a hung answering backend does not keep a healthy one starved (review 157: for the
# whole `read_timeout`, every request went to the hung one)
SUSPECT_FOR: Final = 1.0
# Failures in a row of requests the backend had (5xx answers, resets, timeouts, streams cut short: any
# but `connect`) that take it out (`BackendPool.failed`)
ERROR_ANSWERS_TO_FAIL = 3
# The kinds of failure that take a backend out at once: nothing was sent (no connection to it), which
# one request cannot cause
FAIL_AT_ONCE: Final = frozenset({"connect", "scrape"})


def redacted(url: str) -> str:
    """`url` without the secret of its user-info part (`http://u:secret@h` -> `http://u:***@h`; a lone
    `http://token@h` -> `http://***@h`). The URL was validated at load (config.check_backend_url)."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=f"{user + ':***' if colon else '***'}@{host}"))


class Backend:
    """One backend: its URL, what it holds now, and its health."""

    __slots__ = (
        "changes", "clean", "down_until", "error_answers", "errors", "failures", "index", "inflight", "last_error",
        "last_kind", "name", "probe_after", "prober", "proven", "requests", "suspect_since", "suspected", "url",
    )

    def __init__(self, index: int, url: str) -> None:
        self.index = index
        self.url = url
        self.name = redacted(url)  # what logs, metrics and stats show: never a password in the URL
        self.inflight = 0
        self.failures = 0  # consecutive
        self.error_answers = 0  # failures of requests it had, in a row (no success between)
        self.down_until = -math.inf
        self.requests = 0  # sent, ever
        self.errors: dict[str, int] = {}  # kind -> count
        self.last_error = ""
        self.last_kind = ""  # the kind of the last failure ("scrape": its metrics could not be reached)
        # it has answered (a head that is not a 5xx) since it was last taken out, or never was: up for
        # the last-up rule (`BackendPool.strike`)
        self.proven = True
        self.clean = True  # no failure since its last whole answer: a retry ranks it first (`BackendPool.pick`)
        # its failures so far, of every kind (suspects too, strikes, a scrape's take-out): what
        # `BackendPool.forgive` judges by (review 151: another request's failure waiting for its answer
        # must not be forgiven with a request that failed everywhere)
        self.changes = 0
        # (the detector off) while every backend is out, a request may try it no sooner than this, and
        # not while another does: the one trying it, until it answers or the try ends (`BackendPool.probe`)
        self.probe_after = -math.inf
        self.prober: object | None = None
        # requests it failed whose streams on other backends have a head and not yet their first bytes
        # (`Proxy._attempt`): struck at those, or not if those fail too; meanwhile picked after the others
        # as good, for `SUSPECT_FOR`
        self.suspected = 0
        self.suspect_since = -math.inf  # the latest such head; a whole answer here ends its effect (`suspect`)


class BackendPool:
    """The picker and the passive health checks; `now` is the caller's monotonic clock."""

    def __init__(self, urls: list[str], backoff: float, max_backoff: float) -> None:
        self.backends = [Backend(i, url) for i, url in enumerate(urls)]
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.probes = False  # while every backend is out, a request tries one now and then (`probe`)
        self._rr = 0
        # (an acceptor's pool) until when the other acceptors keep each backend out (`peers_out`); None:
        # they keep none out
        self.peers_until: list[float] | None = None
        self.on_all_out: Callable[[], None] | None = None  # a take-out left no backend up (`Proxy._none_up`)

    def stagger(self, index: int) -> None:
        """(Acceptor `index`'s picker) its round robin starts `index` backends on: the acceptors' pickers
        break ties each by its own, and starting alike they stepped in lockstep, two clients on two
        acceptors sent to one backend while another sat idle 99 % of the time (review 131)."""
        self._rr = index % len(self.backends)

    def up(self, backend: Backend, now: float) -> bool:
        return backend.down_until <= now

    def peers_out(self, now: float) -> frozenset[int]:
        """The backends the other acceptors keep out now (`Proxy.peers_health`): this pool's own health
        has them up (it has not seen them fail), but they count as out wherever another backend up is
        asked for (the picker's first choice, the last-up rule, a request's last try), as they would in
        one proxy's pool; the picker falls back to them only when no other is up."""
        until = self.peers_until
        if until is None:
            return frozenset()
        out = frozenset(index for index, t in enumerate(until) if t > now)
        if not out:
            self.peers_until = None  # (every one's back-off has ended)
        return out

    def pick(self, now: float, exclude: frozenset[int] | set[int] = frozenset(),
             full: Callable[[int], bool] | None = None, shun: frozenset[int] = frozenset(),
             advance: bool = True, stale: Callable[[int], bool] | None = None) -> Backend | None:
        """The healthy backend with the fewest requests in flight, ties round robin; None if none is up.
        `full` (the utilization detector's): a backend at its saturation, or stale, is picked only when
        every healthy one is (a review: by in-flight alone, one whose queue was long with other
        traffic, or whose metrics were stale, got half the requests while another sat idle); one in
        `shun` (out in the other acceptors: `peers_out`) only when every other healthy one is too, in
        the same pass (review 138: a second pass moved the round robin by two, and with an even count
        the same one won every tie). A backend `suspect` (a stream's head came elsewhere for a request it
        failed, its first bytes not yet, within `SUSPECT_FOR`) goes after the others as good by the
        ranks above, first tries too. `advance` False (a request's retry): the round robin is not moved,
        a request takes one turn (review 140: each retry took one more, and with two backends a
        failing one won the first try of 9 requests in 10). A retry ranks each backend that failed a
        request since its last whole answer (not `clean`) after the others, before room and in-flight
        counts: one failing fast has the fewest in flight, so with more failing backends than a
        request's tries every try went to one of them, and as no other backend answered the request
        their failures never counted (three of four answering 500 at once: 81 % of the requests got
        a 500, and one of the three was never out). Not before a backend whose metrics are `stale`
        (the detector's, where the caller knows it apart from full), which a retry ranks last: it may
        be hung, never failing but answering nothing (review 145: clean, it took a retry for
        `read_timeout`, then a 504, where the backend that failed once answered at once)."""
        backends = self.backends
        n = len(backends)
        if advance:  # (by one per request, whatever it picks: set to the one picked, the acceptors' pickers
            self._rr = (self._rr + 1) % n  # fell into lockstep after any round all picked alike: review 142)
        best: Backend | None = None
        # (shunned, stale on a retry, failed lately on a retry, full, suspect)
        best_key = (True, True, True, True, True)
        retry = not advance
        for k in range(n):
            b = backends[(self._rr + k) % n]
            if b.down_until > now or b.index in exclude:
                continue
            key = (b.index in shun, retry and stale is not None and stale(b.index), retry and not b.clean,
                   full is not None and full(b.index), b.suspected > 0 and now - b.suspect_since < SUSPECT_FOR)
            if best is None or key < best_key or (key == best_key and b.inflight < best.inflight):
                best, best_key = b, key
        return best

    def any_up(self, now: float, exclude: frozenset[int] | set[int] = frozenset()) -> bool:
        return any(b.down_until <= now and b.index not in exclude for b in self.backends)

    def probe(self, now: float, exclude: frozenset[int] | set[int] = frozenset(),
              by: object = True) -> Backend | None:
        """(`probes`: the detector off, so no scrape brings a backend back) While no backend is up, the
        one out that comes back first, if no request tried it in the last `backoff` seconds (nor since
        it was taken out) and none is trying it now; it is tried by `by` (its `prober` until it answers,
        `answered`, or the try ends: the caller's `unprobe`). Its
        back-off, doubled at each take-out in a row, outlasted the outage: nothing brought the pool
        back before it ended (review 152: both backends back after an 18 s outage, 13 s more of 503
        `no_backend`). A failure to connect while it is out adds nothing to its back-off (`_take_out`);
        an answer brings it back. At most one request per backend per `backoff` seconds tries a pool
        still down, and waits for the connection at most `connect_timeout`."""
        best = self._probe_candidate(now, exclude)
        if best is not None:
            best.prober = by
            best.probe_after = now + self.backoff
        return best

    def _probe_candidate(self, now: float, exclude: frozenset[int] | set[int] = frozenset()) -> Backend | None:
        """The backend `probe` would give now, not taken."""
        if not self.probes:
            return None
        best: Backend | None = None
        for b in self.backends:
            if b.down_until <= now:
                return None  # (one is up: no probing)
            if b.prober is not None or b.probe_after > now or b.index in exclude:
                continue
            if best is None or b.down_until < best.down_until:
                best = b
        return best

    def unprobe(self, backend: Backend, by: object, now: float) -> None:
        """`by`'s try of `backend` ended (if it is still the one trying it): the next no sooner than
        `backoff` from now (review 157: from the start of a try that waited out `read_timeout` on a
        hung backend, the next request tried it at once, and waited as long)."""
        if backend.prober is by:
            backend.prober = None
            backend.probe_after = max(backend.probe_after, now + self.backoff)

    def probe_ready(self, now: float) -> bool:
        """Whether `probe` would give a backend now (without taking it)."""
        return self._probe_candidate(now) is not None

    def failed(self, backend: Backend, now: float, kind: str, detail: str, in_a_row: bool = True) -> None:
        """Counted; taken out for its back-off (doubling per failure in a row) at once where nothing was
        sent (`FAIL_AT_ONCE`), else at the `ERROR_ANSWERS_TO_FAIL`-th failure in a row of requests it
        had. One request's own failure, retried on each backend, took every one out at its first (a
        review: one such request a second, answered with a 5xx, or later with a reset, kept a healthy
        pool out, 155-158 of 158 other requests answered 503 `no_backend`; two long generations past
        `read_timeout` took out both backends); a backend failing everything is out at its third.
        `in_a_row` False: only counted; the proxy strikes it (`strike`) if another backend then answers
        the request, which shows the failure was this backend's, not the request's (a review: a
        client's retries of one request that every backend reset took the pool out)."""
        self._count(backend, kind, detail)
        self.mark_failed(backend)
        if kind in FAIL_AT_ONCE:
            self._take_out(backend, now, kind)
        elif in_a_row:
            self.strike(backend, now, kind)

    def strike(self, backend: Backend, now: float, kind: str) -> bool:
        """One more failure in a row of a request it had (counted already): out at the
        `ERROR_ANSWERS_TO_FAIL`-th, unless it is the last backend up. Requests' failures never take out
        the last one (the next failure once another is up does): out, every request would be refused
        503 `no_backend` for its back-off, where in it passes on what it answers (a review: one request
        slower than `read_timeout`, retried by its client, took a lone backend out). Whether it took the
        backend out."""
        backend.error_answers += 1
        self.mark_failed(backend)  # (review 148: a request failing everywhere must not `forgive` it this one)
        peers = self.peers_out(now) if self.peers_until is not None else frozenset()
        if backend.error_answers >= ERROR_ANSWERS_TO_FAIL and any(
                b is not backend and b.down_until <= now and b.proven and b.index not in peers for b in self.backends):
            return self._take_out(backend, now, kind)  # (another is up, and has answered since it came back:
            # a dead one whose back-off had ended counted, and a healthy one went out: a review; and not
            # only once it answered a request whole, which kept a failing one in for a stream's length)
        return False

    @staticmethod
    def mark_failed(backend: Backend) -> None:
        """A failure there (`failed`, `strike`; in an acceptor the distributor's scraper's take-out,
        `Proxy.scrape_health`, even where it was out already): a retry ranks it after the others until
        its next whole answer, and `forgive` sees that something happened there."""
        backend.changes += 1
        backend.clean = False

    def forgive(self, backend: Backend, was_clean: bool, changes: int) -> None:
        """A request failed on every backend it tried (no other answered it): likely its own doing, so
        its failure here does not rank the backend after the others on a retry (`clean` as it was, if
        no other failure came there since, another request's included, which may be the backend's
        own: review 151; review 145: a poison request's failures sent retries to a hung backend rather
        than to one that answers). Overlapping such requests leave it not clean: the safe side."""
        if backend.changes == changes:
            backend.clean = backend.clean or was_clean

    def _take_out(self, backend: Backend, now: float, kind: str) -> bool:
        """Out for its back-off; whether it was up."""
        if backend.down_until > now:  # out already: one event (ten streams cut at once) is one failure
            return False
        backend.proven = False
        backend.failures += 1
        backend.last_kind = kind
        backend.down_until = now + min(self.max_backoff, self.backoff * 2 ** min(backend.failures - 1, 30))
        backend.probe_after = now + self.backoff
        self.tell_if_all_out(now)
        return True

    def tell_if_all_out(self, now: float) -> None:
        """After a take-out (this pool's, or one told by the distributor's scraper): `on_all_out` if no
        backend is up."""
        if self.on_all_out is not None and not self.any_up(now):
            self.on_all_out()

    @staticmethod
    def _count(backend: Backend, kind: str, detail: str) -> None:
        backend.errors[kind] = backend.errors.get(kind, 0) + 1
        backend.last_error = detail[:300]

    def succeeded(self, backend: Backend) -> None:
        """Back in rotation, its failures forgotten (`answered` and `completed`)."""
        self.answered(backend)
        self.completed(backend)

    def answered(self, backend: Backend, proves: bool = True) -> None:
        """It answered (a head that is not a 5xx, or its metrics when a good scrape brings it back): back
        in rotation, and (`proves`: an admitted request's head, not a passed-through GET's, a review)
        up for the last-up rule."""
        backend.down_until = -math.inf
        backend.prober = None  # (back: a probe of it, if one it was, is over; review 156: held for its answer's
        # length, a take-out during a long stream could not be probed until it ended)
        if proves:
            backend.proven = True

    def completed(self, backend: Backend) -> None:
        """It answered a request to its end: its failures in a row end, its back-off starts afresh, and a
        retry ranks it with the others again. Not at the answer's head (a review: a backend that cut
        every stream was never out, each head clearing the count its cut had made; and then its
        back-off never grew)."""
        backend.error_answers = backend.failures = 0
        backend.clean = True
        backend.suspect_since = -math.inf  # (it answers whole: whatever failed on it before, not suspect now)

    def next_up(self, now: float) -> float:
        """Seconds until the first backend is back, or may be tried (`probe`; not one being tried: review
        156, its `probe_after` passed during a try longer than `backoff`, a request's retries waited 0 s
        each and `Retry-After` said 1); 0 if one is up now."""
        if self.probes:  # (one being tried may be back after it: a `backoff` from now, review 157)
            return max(0.0, min(min(b.down_until, b.probe_after if b.prober is None else
                                    max(b.probe_after, now + self.backoff)) for b in self.backends) - now)
        return max(0.0, min(b.down_until for b in self.backends) - now)


# the longest a metrics scrape waits for its connection (TLS included) before the backend counts as one
# that cannot be connected to (or `connect_timeout`, if shorter)
SCRAPE_CONNECT_TIMEOUT: Final = 2.0  # (past Linux's first SYN retransmit, at 1 s: one lost SYN is not a dead host)
# what failing to connect means is short here, not the backend's fault: no backend is taken out for it
# (not EADDRNOTAVAIL: besides a local port shortage it is what an IPv6 backend gives on a host without IPv6,
# a failure of that backend's for good, which must take it out: a review)
LOCAL_SHORTAGE: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Scrapes in a row whose connection was reset or closed, or answered with what is not HTTP, that take the
# backend out as one that cannot be connected to does (`Scraper._scrape`)
BROKEN_SCRAPES_TO_FAIL: Final = 3


def failure_kind(exc: BaseException) -> str:
    """What a failed request to a backend, before its answer's head, is counted as: `connect` (no
    connection: the backend never had the request), `reset` (the connection was closed or reset after
    the request was written: the backend may have read it) or `protocol` (the backend's answer was not
    HTTP). Each is tried on another backend (`retries`): an inference request changes nothing but the
    backend's load, and a `reset` is also what a connection the backend closed while idle gives."""
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return "connect"
    if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError)):
        return "reset"  # (a payload error: a stream's connection ended before its first bytes, `Proxy._attempt`)
    return "protocol"


class Scraper:
    """Scrapes each backend's metrics every `scrape_interval`, each backend in a loop of its own: one
    whose metrics are slow to come, or never come, does not delay the others' (a review: scraped in
    rounds that awaited every backend, a hung `/metrics` made a healthy backend's figures stale in 20 %
    of the samples and held 13 % of the requests)."""

    def __init__(
        self, pool: BackendPool, utilization: PoolUtilization, session: aiohttp.ClientSession, config: ProxyConfig,
        on_room: Callable[[], None], on_health: Callable[[int], None] | None = None,
    ) -> None:
        self.pool = pool
        self.on_health = on_health  # a backend was taken out, or back in, by a scrape (its index)
        self.utilization = utilization
        self.session = session
        self.config = config
        self.on_room = on_room
        self.errors: list[str] = ["" for _ in pool.backends]  # the last scrape error per backend
        self.hinted = [False for _ in pool.backends]  # its run of errors was logged with `_no_metrics_hint`
        self.missing_warned = [False for _ in pool.backends]  # its run of missed requests was logged
        self.slow_warned = [False for _ in pool.backends]  # its run of slow scrapes was logged
        self.broken = [0 for _ in pool.backends]  # its scrapes in a row that the connection failed (reset)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(b.index)) for b in self.pool.backends]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        interval = config.scrape_interval
        # A connection not made (TLS included) within SCRAPE_CONNECT_TIMEOUT (or `connect_timeout` if
        # shorter) is one that cannot be made, a host that drops the SYNs: counted so
        # (`ConnectionTimeoutError`), as a refused one is. Under the whole scrape's timeout (`staleness`)
        # alone it was a plain timeout, the backend was never taken out, and a request paid
        # `connect_timeout` (5 s) before trying another, once per back-off (a review). Not a share of
        # `staleness`: half of 0.2 s took out an https backend whose handshake took 0.13 s (a review).
        connect = min(config.connect_timeout, SCRAPE_CONNECT_TIMEOUT)
        timeout = aiohttp.ClientTimeout(total=connect + config.staleness, sock_connect=connect)
        while True:
            started = loop.time()
            await self._scrape(index, timeout)
            self.utilization.expire(loop.time())
            await asyncio.sleep(max(0.0, started + interval - loop.time()))

    async def _scrape(self, index: int, timeout: aiohttp.ClientTimeout) -> None:
        loop = asyncio.get_running_loop()
        url = self.pool.backends[index].url + self.config.metrics_path
        mark = self.utilization.scrape_started(index)
        sent_at = loop.time()
        try:
            # (no redirect followed: the backend's own metrics or none; a 3xx is an error)
            async with self.session.get(url, timeout=timeout, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise (NoMetrics if resp.status == 404 else ScrapeError)(f"HTTP {resp.status}")
                body = await _read_at_most(resp, MAX_METRICS_BYTES)
            figures = parse_metrics(body)
        except (aiohttp.ClientError, TimeoutError, ScrapeError, OSError) as exc:
            self.utilization.scrape_failed(index)
            detail = f"{type(exc).__name__}: {exc}"[:300]
            backend = self.pool.backends[index]
            hint = _no_metrics_hint(exc)
            # logged as the scrapes turn bad (counted each time), not each time; and again when they turn
            # into an answer without metrics (a review: a backend started after flowshard failed first to
            # connect, and its 404s that followed were not logged, nor the way out)
            if not self.errors[index] or (hint and not self.hinted[index]):
                log.warning("backend %s: metrics scrape failed (%s): its saturation counts as 1 once its "
                            "last good scrape is older than staleness%s", backend.name, detail, hint)
                self.hinted[index] = bool(hint)
            self.errors[index] = detail
            kind = "protocol" if isinstance(exc, ScrapeError) else failure_kind(exc)
            cannot_connect = kind == "connect"
            if getattr(exc, "errno", None) in LOCAL_SHORTAGE:  # ours (descriptors, ports): not the backend's
                cannot_connect = False
            # A backend that takes the connection and then resets it, or closes it, or answers what is
            # not HTTP, at every scrape is as dead as one that refuses it (a review: its requests'
            # failures no longer took it out at once, its stale metrics kept every request away from it,
            # so it was never out, and counted full in the pool's mean for ever). Not a scrape that times
            # out (a busy backend's metrics may be slow: it counts stale, saturated, meanwhile) nor one
            # answered with an error or unreadable metrics (ScrapeError: the server is up).
            # (TimeoutError is an OSError, which `failure_kind` calls a reset: a review)
            broken = not isinstance(exc, TimeoutError) and (
                kind == "reset" or (kind == "protocol" and not isinstance(exc, ScrapeError)))
            self.broken[index] = self.broken[index] + 1 if broken else 0
            if self.broken[index] >= BROKEN_SCRAPES_TO_FAIL:
                cannot_connect = True
            if cannot_connect and self.pool.up(backend, loop.time()):
                # Nothing listens there: a health signal as good as a failed request, and the only one
                # while its stale metrics keep every request from being sent to it.
                self.pool.failed(backend, loop.time(), "scrape", detail)
                if self.on_health is not None:
                    self.on_health(index)
            return
        backend = self.pool.backends[index]
        self.broken[index] = 0
        if self.errors[index]:
            log.warning("backend %s: metrics scrapes succeed again", backend.name)
        self.errors[index] = ""
        self.hinted[index] = False
        back = backend.last_kind == "scrape" and not self.pool.up(backend, loop.time())
        if back:
            self.pool.succeeded(backend)  # it answers again: back at once, not after its back-off
            if self.on_health is not None:
                self.on_health(index)
        fell = self.utilization.scraped(index, sent_at, mark, figures, loop.time())
        self._warn_if_slow(index)
        self._warn_if_missing(index)
        if fell or back:  # (back: the pool's mean is over the backends in rotation, and it is one again)
            self.on_room()

    def _warn_if_slow(self, index: int) -> None:
        """Warn, once a run, when a backend's metrics take more than half of `staleness` to come: a scrape
        is sent when the last one came (or `scrape_interval` after it was sent), so one taking longer
        than `staleness` leaves the backend stale, saturated, between its arrivals (a review: silent,
        every request waited out its TTL)."""
        took = self.utilization.loads[index].duration
        staleness = self.config.staleness
        if took <= staleness / 4:  # (a run ends well below the mark: one warning per run, not per crossing)
            self.slow_warned[index] = False
            return
        if took > staleness / 2 and not self.slow_warned[index]:
            self.slow_warned[index] = True
            log.warning("backend %s: its metrics took %.3f s to come, over half of staleness (%g s): a backend "
                        "whose last scrape arrived more than staleness ago counts as saturated, and the next is "
                        "sent when the last arrives, so metrics slower than staleness would hold it between "
                        "scrapes; raise [proxy] staleness well above what they take "
                        "(flowshard_backend_scrape_duration_seconds)", self.pool.backends[index].name, took, staleness)

    def _warn_if_missing(self, index: int) -> None:
        """Warn, once a run, when a backend's metrics keep missing requests sent to it that are not on
        their way: its URL is likely several servers (the detector counts them as waiting)."""
        missing_for = self.utilization.missing_for(index)
        if missing_for < MISSING_PERSISTS:
            if not missing_for:
                self.missing_warned[index] = False
            return
        if not self.missing_warned[index]:
            self.missing_warned[index] = True
            log.warning("backend %s: for %.0f s its metrics have counted fewer requests than flowshard has in "
                        "flight there, more than it sent there in the last %g s, so not on their way: they count "
                        "as waiting, and hold requests back. A backend URL must be one server: if this one is a "
                        "load balancer, list its servers as backends, or set [proxy] utilization = false",
                        self.pool.backends[index].name, missing_for, MISSING_RECENT)


def _no_metrics_hint(exc: BaseException) -> str:
    """What to do about a backend that has no metrics flowshard can read (a review: a newcomer's
    OpenAI server without them held every request until its TTL, with one log line to say why)."""
    if isinstance(exc, NoMetrics):
        return ("; while no backend in rotation can be read, every request waits (until its TTL). A backend "
                "without vLLM, SGLang or TGI metrics: set [proxy] utilization = false (the concurrency budget "
                "alone gates), or metrics_path to where they are")
    return ""


async def _read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or ScrapeError once it passes `limit` bytes (declared or read)."""
    if resp.content_length is not None and resp.content_length > limit:
        raise ScrapeError(f"metrics body of {resp.content_length} bytes is over {limit}")
    body = bytearray()
    async for chunk in resp.content.iter_chunked(1 << 16):
        body += chunk
        if len(body) > limit:
            raise ScrapeError(f"metrics body is over {limit} bytes")
    return bytes(body)
