"""Proxy mode: the OpenAI-compatible routes of the HTTP front.

`POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings` are classified (flow, priority,
SLO, size, cost: `flowshard.classify`), admitted through the same path as `POST /v1/admit`, and,
once dispatched, forwarded to a backend (`distributor.backends`) with a pooled aiohttp client.
Server-sent events are relayed event by event as they arrive. The ticket is released when the
response ends, or at once when the client goes away — the upstream request is then closed, so the
backend stops generating. `GET /v1/models` and `GET /v1/models/{id}` are passed through without
admission.

Refusals become OpenAI-shaped errors: 429 (capacity, TTL, displacement) or 503 (shutting down,
shard failure), with `Retry-After` and `x-llm-d-request-dropped-reason`. Backend failures before
the response started are retried on another backend (`retries`), but for a backend that said
nothing for `read_timeout` (a 504: it may still be generating); a backend failing mid-stream
ends the stream with an SSE error event, which the openai client raises as an `APIError`, and so
does an unexpected exception of flowshard's own once the stream has begun (code `internal_error`;
before it began, a 500). A stream still running when the service's drain ends is ended the same
way (code `shutting_down`), a JSON answer still awaited then gets a 503 `shutting_down`; either way
its upstream request is closed and its connection closed after the answer.

Each proxied request is one asyncio task (the upstream call needs one); the response bytes are
copied in this front process (see docs/proxy.md for the measured cost per request and per chunk).
That is the distributor without acceptor processes, or each acceptor (`distributor.front`), whose
`Proxy` admits through its `Upstream` and sends the utilization detector's events to the
distributor (`BackendReport`); the distributor's own `Proxy` then serves no route: it scrapes, and
sums the acceptors' counters for /metrics and /v1/stats (`ProxyReport`, `view`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http
import logging
import math
import os
import socket
import urllib.parse
import weakref
import zlib
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import msgspec
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from yarl import URL

from distributor.api import Admission, Audit
from distributor.backends import FAIL_AT_ONCE, LOCAL_SHORTAGE, Backend, BackendPool, Scraper, failure_kind
from flowshard.classify import (
    Classified,
    ClassifyError,
    SseUsage,
    Usage,
    classify,
    done_end,
    read_headers,
    usage_from_body,
    usage_problem,
)
from flowshard.codec import LinkBackends
from flowshard.config import Config
from flowshard.keepalive import detect_dead_peers
from flowshard.types import Outcome
from flowshard.utilization import PoolUtilization

if TYPE_CHECKING:
    from distributor.http import HttpConnection, _Slot

__all__ = ["Proxy"]

log = logging.getLogger(__name__)
# A failure of a request retried on another backend (`Proxy.forward`): the backend, the failure's kind,
# whether the backend was `clean` before it, and its `changes` after it (`BackendPool.forgive`)
Suspect = tuple[Backend, str, bool, int]

POST_ROUTES: Final = frozenset({b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings"})
GET_ROUTES: Final = frozenset({b"/v1/models"})
ROUTES: Final = POST_ROUTES | GET_ROUTES
# GET /v1/models/{id} (the openai client's models.retrieve): passed through like /v1/models; one route
# label for every id (the metrics' label sets stay bounded).
MODEL_PREFIX: Final = b"/v1/models/"
MODEL_ROUTE: Final = "/v1/models/{id}"
# Not forwarded upstream: hop-by-hop headers, what aiohttp sets itself, and accept-encoding (the
# usage is read from the stream, so it must come uncompressed).
_DROP_REQUEST: Final = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host",
    "content-length", "accept-encoding", "expect", "proxy-authorization",
})
_DROP_RESPONSE: Final = frozenset({
    "connection", "keep-alive", "transfer-encoding", "content-length", "date", "server", "trailer", "upgrade",
    "proxy-connection",
})
_BUSY: Final = frozenset({Outcome.REJECTED_CAPACITY, Outcome.EVICTED_TTL, Outcome.EVICTED_DISPLACED})
_WHY: Final = {
    Outcome.REJECTED_CAPACITY: "the queue is full",
    Outcome.EVICTED_TTL: "it waited in the queue past its TTL",
    Outcome.EVICTED_DISPLACED: "higher-priority work displaced it from the queue",
    Outcome.REJECTED_SHUTTING_DOWN: "flowshard is shutting down",
    Outcome.EVICTED_SHARD_FAILURE: "the shard holding it failed",
    Outcome.EVICTED_SHUTDOWN: "flowshard shut down while it was queued",
    Outcome.EVICTED_CANCELLED: "the request was cancelled",
}

_encode = msgspec.json.Encoder().encode
_CHUNKED: Final = b"transfer-encoding: chunked\r\n"
_CONN_CLOSE: Final = b"connection: close\r\n"
_FLUSH_AT_CLOSE: Final = 0.5  # the most close() waits for the answers it ended to leave this process
_PIECE: Final = 1 << 16  # a non-streamed answer larger than this is written in pieces of it (backpressure)
# after `data: [DONE]` the client has its whole answer: the backend's end of the response is awaited this
# long (to keep its connection), then the response is closed (the backend is not counted as failing)
_DONE_GRACE: Final = 1.0
# `GET /v1/models[/{id}]` is passed through without admission: one at a time per client connection (its
# answers go in order anyway) and at most this many at once per process, so a client pipelining them cannot
# open a backend connection each (a review: 3 connections opened 3,000, and at `ulimit -n` every other
# client was reset)
MAX_PASSTHROUGHS: Final = 32



@functools.lru_cache(maxsize=256)
def _encoded_base(url: str) -> str:
    """A backend's base URL in yarl's encoded form, once per backend (a request's path and query are
    appended as received and not quoted again)."""
    return str(URL(url))

class _ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail


def error_response(status: int, message: str, type_: str, code: str | None, param: str | None = None,
                   conn: bytes = b"", extra: bytes = b"", *, no_body: bool = False) -> bytes:
    """A complete OpenAI-style error response: `{"error": {"message", "type", "param", "code"}}`.
    `no_body`: the answer to a HEAD (its content-length still that of the body it does not carry)."""
    body = _encode(_ErrorBody(_ErrorDetail(message, type_, param, code)))
    return b"%b%bcontent-type: application/json\r\n%b%bcontent-length: %d\r\n\r\n%b" % (
        _status_line(status), extra, conn, b"", len(body), b"" if no_body else body)


# With no backend up, how long the requests waiting for their admission's outcome wait for one back before
# they are answered 503 `no_backend` (`Proxy._none_up`): a scrape round or a few, for a connect refused
# for a moment (review 165: 4 of 6 answered 503 for a 0.15 s blip, the backend back 50 ms later)
NONE_UP_GRACE: Final = 0.5

# The errors of the HTTP layer itself (distributor.http) on the OpenAI paths: status -> (type, code).
_HTTP_ERRORS: Final = {
    400: ("invalid_request_error", "malformed_request"),
    404: ("invalid_request_error", "unknown_url"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    431: ("invalid_request_error", "headers_too_large"),
    500: ("server_error", "internal_error"),
    503: ("service_unavailable", "too_many_connections"),
    505: ("invalid_request_error", "http_version_not_supported"),
}


def http_error(status: int, message: str, conn: bytes = b"", extra: bytes = b"", *, no_body: bool = False,
               code: str | None = None) -> bytes:
    """An error of the HTTP layer (malformed request, body or headers too large, timeout, unknown
    path, wrong method) on an OpenAI path, OpenAI-shaped: same status, message and headers as
    flowshard's own shape would have, so the openai client raises its class for the status. `code`:
    where the status alone does not say it (a 503 for a client that closed its side is not one for
    too many connections: review 116)."""
    type_, by_status = _HTTP_ERRORS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return error_response(status, message, type_, code or by_status, None, conn, extra, no_body=no_body)


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return b"HTTP/1.1 %d %b\r\n" % (status, phrase.encode("latin-1"))


def _connection_named(headers: list[tuple[str, str]]) -> frozenset[str]:
    """The header names a `connection` header lists (lower case): hop-by-hop, not forwarded."""
    values = [v for n, v in headers if n == "connection"]
    if not values:
        return frozenset()
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


def _sendable(value: str) -> str:
    """A header value aiohttp can send: bytes that were not UTF-8 (surrogate escapes) as U+FFFD."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _response_head(status: int, headers: list[tuple[str, str]], conn: bytes, framing: bytes) -> bytes:
    """A response's head; `headers` as aiohttp reads a backend's (UTF-8, surrogate escapes for other
    bytes): written back as the bytes it read (as latin-1, `€` came out as `?`: a review)."""
    lines = [_status_line(status)]
    for name, value in headers:
        lines.append(b"%b: %b\r\n" % (name.encode("utf-8", "surrogateescape"),
                                       value.encode("utf-8", "surrogateescape")))
    lines.append(conn)
    lines.append(framing)
    lines.append(b"\r\n")
    return b"".join(lines)


class ProxyStats:
    """Counters for metrics and /v1/stats (bounded label sets: routes, status codes, error kinds)."""

    def __init__(self) -> None:
        self.responses: dict[tuple[str, int], int] = {}  # (route, status) -> count
        self.dropped: dict[str, int] = {}  # outcome label -> count
        self.client_disconnects = 0
        self.retries = 0
        self.no_backend = 0
        self.midstream_failures = 0
        self.internal_errors = 0  # proxied requests ended by an unexpected exception of flowshard's own
        self.tokens = {"estimated": 0, "prompt": 0, "completion": 0}
        self.chunks = 0

    def response(self, route: str, status: int) -> None:
        key = (route, status)
        self.responses[key] = self.responses.get(key, 0) + 1


class BackendFigures(msgspec.Struct, array_like=True):
    """One backend as one proxy sees it (its own in-flight count and passive health)."""

    inflight: int = 0
    requests: int = 0
    up: bool = True
    errors: dict[str, int] = msgspec.field(default_factory=dict)
    last_error: str = ""


class ProxyReport(msgspec.Struct, array_like=True):
    """One proxy's counters, or several proxies' summed: what /metrics and /v1/stats render. With
    acceptor processes each acceptor's proxy sends its own (`LinkProxyReport`) when the distributor
    renders, and the distributor sums them (`Proxy.view`)."""

    responses: list[tuple[str, int, int]] = msgspec.field(default_factory=list)  # (route, status, count)
    dropped: dict[str, int] = msgspec.field(default_factory=dict)
    client_disconnects: int = 0
    retries: int = 0
    no_backend: int = 0
    midstream_failures: int = 0
    internal_errors: int = 0
    tokens: dict[str, int] = msgspec.field(default_factory=lambda: {"estimated": 0, "prompt": 0, "completion": 0})
    chunks: int = 0
    active: int = 0
    backends: list[BackendFigures] = msgspec.field(default_factory=list)

    def add(self, other: ProxyReport, *, gauges: bool = True) -> None:
        """Sum `other` into this one; `gauges` False: its counters only (an acceptor that exited: its
        requests in flight and its view of the backends' health went with it)."""
        responses = {(route, status): n for route, status, n in self.responses}
        for route, status, n in other.responses:
            responses[route, status] = responses.get((route, status), 0) + n
        self.responses = [(route, status, n) for (route, status), n in sorted(responses.items())]
        for label, n in other.dropped.items():
            self.dropped[label] = self.dropped.get(label, 0) + n
        for kind, n in other.tokens.items():
            self.tokens[kind] = self.tokens.get(kind, 0) + n
        self.client_disconnects += other.client_disconnects
        self.retries += other.retries
        self.no_backend += other.no_backend
        self.midstream_failures += other.midstream_failures
        self.internal_errors += other.internal_errors
        self.chunks += other.chunks
        if gauges:
            self.active += other.active
        for mine, theirs in zip(self.backends, other.backends, strict=False):
            mine.requests += theirs.requests
            for kind, n in theirs.errors.items():
                mine.errors[kind] = mine.errors.get(kind, 0) + n
            if gauges:
                mine.inflight += theirs.inflight
                mine.up = mine.up and theirs.up
                mine.last_error = mine.last_error or theirs.last_error


_encode_report = msgspec.msgpack.Encoder().encode
_decode_report = msgspec.msgpack.Decoder(ProxyReport).decode


class BackendReport:
    """In an acceptor process: the backends its pool takes out of rotation or back (the distributor
    tells the other acceptors: `LinkPeersDown`), and with the utilization detector on (`counts`) the
    detector's events (requests sent to a backend and finished there, dispatches no longer waiting to
    be sent): they are the proxy's, the detector is the distributor's (one view for the one ledger).
    They go there as one `LinkBackends` frame at the end of each pass in which any happened (without
    the detector, only of a pass in which its pool's health changed)."""

    __slots__ = ("_down", "_loop", "_scheduled", "_send", "counts", "finished_counts", "held_counts",
                 "held_finished_counts", "marked", "pool", "sent_counts", "sent_total")

    def __init__(self, backends: int, send: Callable[[Any], None], loop: asyncio.AbstractEventLoop,
                 counts: bool = True) -> None:
        self.counts = counts  # the detector is on: its events are reported too
        self.sent_counts = [0] * backends
        self.sent_total = [0] * backends  # every send reported (and to be), per backend: the picker's `full`
        self.finished_counts = [0] * backends
        self.held_counts = [0] * backends
        self.held_finished_counts = [0] * backends
        self.marked: list[int] = []
        self._send = send
        self._loop = loop
        self._scheduled = False
        self.pool: BackendPool | None = None  # the proxy's (set by it): which backends it keeps out
        self._down = [-math.inf] * backends  # their `down_until` as last reported (as a pool starts)

    def sent(self, backend: int) -> None:
        if self.counts:
            self.sent_counts[backend] += 1
            self.sent_total[backend] += 1
        self._schedule()

    def finished(self, backend: int, held: bool = False) -> None:
        if self.counts:
            self.finished_counts[backend] += 1
            if held:
                self.held_finished_counts[backend] += 1
        self._schedule()

    def held(self, backend: int) -> None:
        if self.counts:
            self.held_counts[backend] += 1
            self._schedule()

    def mark(self, ticket: int) -> None:
        if self.counts:
            self.marked.append(ticket)
            self._schedule()

    def health_changed(self) -> None:
        """The pool took a backend out or back outside its requests' own events (the distributor's
        scraper said so, or a strike made at another backend's head): report it in this pass, or the
        distributor keeps it out until the old back-off ends (a review), or hears of it only at the
        answering request's end (review 147)."""
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        n = len(self.sent_counts)
        down_for: list[float] = []
        if self.pool is not None:  # (a failure comes with its request's events: reported in their pass)
            down = [b.down_until for b in self.pool.backends]
            if down != self._down:
                self._down = down
                now = self._loop.time()
                down_for = [max(0.0, until - now) for until in down]
        if not self.counts:  # (its requests' events only scheduled this: a failure changes its pool in their pass)
            if down_for:
                self._send(LinkBackends([0] * n, [0] * n, [], down_for, [], []))
            return
        held, ended = (self.held_counts, self.held_finished_counts) if any(self.held_counts) or any(
            self.held_finished_counts) else ([], [])
        self._send(LinkBackends(self.sent_counts, self.finished_counts, self.marked, down_for, held, ended))
        self.sent_counts, self.finished_counts, self.marked = [0] * n, [0] * n, []
        self.held_counts, self.held_finished_counts = [0] * n, [0] * n


class Exchange:
    """One proxied request: the admission's waiter, the upstream call, the client's response slot."""

    __slots__ = ("actual", "backend", "chunked", "conn", "conn_hdr", "gone", "head", "headers", "held", "item", "path",
                 "proxy", "refused", "rid", "route", "sized", "slot", "started", "task", "ticket", "unsent", "working")

    def __init__(self, proxy: Proxy, conn: HttpConnection, slot: _Slot, route: str, item: Classified,
                 headers: list[tuple[str, str]], conn_hdr: bytes, path: str = "", head: bool = False,
                 chunked: bool = True) -> None:
        self.proxy = proxy
        self.conn = conn
        self.slot = slot
        self.route = route  # the route's name (metrics, stats, logs)
        self.path = path or route  # what is asked of the backend
        self.item = item
        self.headers = headers
        self.conn_hdr = conn_hdr
        self.head = head  # a HEAD: its answers, errors included, carry no body (RFC 9110 9.3.2; a review)
        # A stream's framing: chunked, or (an HTTP/1.0 client, which cannot be sent Transfer-Encoding,
        # RFC 9112 6.1: a review saw chunk sizes in a 1.0 client's stream) ended by closing the connection
        self.chunked = chunked
        self.rid: int | None = None
        self.ticket = 0
        self.task: asyncio.Task[None] | None = None
        self.gone = False
        self.refused = False
        self.unsent = False  # dispatched, not yet sent to a backend: counted by the utilization detector
        self.started = False  # the response head went to the client (a stream is being relayed)
        self.sized = False  # ... with a content-length (a large JSON body written in pieces): no tail can end it
        self.backend: Backend | None = None
        self.working = -1  # the backend counted as working on it (utilization detector), -1: none
        self.held = False  # ...and its stream's relay has waited on the client (`PoolUtilization.held`)
        self.actual = -1  # the tokens the backend reported using (prompt + completion); -1: not known

    # ------------------------------------------------------------------ Waiter (called by the distributor)

    def deliver(
        self, cid: Any, request_id: int, outcome: Outcome, ticket: int, wait: float, retry_after: int,
        audit: Audit | None = None,
    ) -> None:
        proxy = self.proxy  # (a proxied request never asks for an audit)
        proxy.waiting.discard(self)
        if outcome == Outcome.DISPATCHED:
            self.ticket = ticket
            self.unsent = True
            proxy.unsent += 1
            task = proxy.loop.create_task(proxy.forward(self))
            self.task = task
            proxy.active.add(self)
            task.add_done_callback(self._done)  # never inside deliver: done callbacks run later
            return
        self.refused = True
        status = 429 if outcome in _BUSY else 503
        label = outcome.label
        proxy.stats.dropped[label] = proxy.stats.dropped.get(label, 0) + 1
        proxy.stats.response(self.route, status)
        reason = f"{outcome.status}-{outcome.reason.replace('_', '-')}"
        message = f"flowshard: {label}: {_WHY[outcome]}; retry after {retry_after} s"
        extra = b"retry-after: %d\r\nx-llm-d-request-dropped-reason: %b\r\n" % (retry_after, reason.encode())
        kind = "rate_limit_exceeded" if status == 429 else "service_unavailable"
        self.conn.slot_respond(
            self.slot, error_response(status, message, kind, outcome.label.replace(":", "_"), None, self.conn_hdr,
                                      extra))

    def fail(self, cid: Any, message: str) -> None:
        """The admission failed on an internal error (in an acceptor: the distributor answered `Error`,
        or the link could not carry the admission): no outcome will come. A 500, as the one-process
        proxy answers when its admission raises, counted as an internal error. Once: a request already
        answered or dispatched is not answered again."""
        if self.refused or self.task is not None:
            return
        self.refused = True  # answered: nothing left to cancel if the client goes
        self.proxy.waiting.discard(self)
        self.proxy.stats.internal_errors += 1
        log.error("admitting a proxied %s failed: %s", self.route, message)
        if not self.gone:
            self.conn.slot_respond(self.slot, error_response(500, f"flowshard: {message}", "server_error",
                                                             "internal_error", None, self.conn_hdr))

    # ------------------------------------------------------------------ lifecycle

    def client_gone(self) -> None:
        """The client's connection was lost: stop the upstream call, or cancel the admission."""
        if self.gone:
            return
        self.gone = True
        self.proxy.waiting.discard(self)
        if self.task is not None:
            if not self.task.done():
                self.proxy.stats.client_disconnects += 1
                self.task.cancel()  # closes the upstream response; _done releases the ticket
        elif self.rid is not None and not self.refused:
            self.proxy.stats.client_disconnects += 1
            self.proxy.admission.cancel(self.rid)

    def _done(self, task: asyncio.Task[None]) -> None:
        proxy = self.proxy
        proxy.active.discard(self)
        if proxy._last_passthrough.get(self.conn) is task:  # (its traceback would keep the connection alive)
            del proxy._last_passthrough[self.conn]
        proxy.mark_sent(self)
        if task.cancelled():
            if proxy.closing and not self.gone:  # the drain ended with it still running
                proxy.end_at_close(self)
        elif (exc := task.exception()) is not None:  # a bug of ours (forward() handles the backend's failures)
            proxy.stats.internal_errors += 1
            log.error("proxying %s failed", self.route, exc_info=exc)
            if self.gone:
                pass
            elif self.started:  # the head went out: end the stream as a backend failing mid-stream does
                proxy._end_stream_with_error(
                    self, f"flowshard: internal error while relaying the stream ({type(exc).__name__}); the "
                    "response is incomplete", "server_error", "internal_error", close=True)
            else:
                self.conn.slot_respond(self.slot, error_response(500, "flowshard: internal error", "server_error",
                                                                 "internal_error", None, self.conn_hdr,
                                                                 no_body=self.head))
        self.give_back()

    def piece(self, data: bytes) -> bytes:
        """A piece of its streamed answer, framed: a chunk, or as it is (closed at the end)."""
        return b"%x\r\n%b\r\n" % (len(data), data) if self.chunked and data else data

    def end_stream(self, tail: bytes, *, close: bool = False) -> None:
        """Its streamed answer's last piece and end: the last chunk, or the connection's close."""
        if self.chunked:
            self.conn.slot_end(self.slot, self.piece(tail) + b"0\r\n\r\n", close=close)
        else:
            self.conn.slot_end(self.slot, tail, close=True)

    def give_back(self) -> None:
        """Its ticket goes back, once: unclaimed if its client left before any backend had it, else
        released with the actual usage, so vtc charges what was served, not the estimate."""
        ticket, self.ticket = self.ticket, 0
        if ticket:
            if self.gone and self.backend is None:
                self.proxy.admission.unclaim(ticket)
            else:
                self.proxy.admission.release(ticket, self.actual)


class Proxy:
    """The OpenAI routes, the backend pool, the scraper and the upstream connection pool."""

    def __init__(self, config: Config, admission: Admission, on_room: Callable[[], None], *,
                 report: BackendReport | None = None) -> None:
        """`admission`: the distributor (one process) or the acceptor's `Upstream`. `on_room`: the
        scraper found the pool's saturation lower (the distributor re-plans its grants). `report`:
        in an acceptor, where the detector's events go (the detector itself is the distributor's,
        whose Proxy then serves no route: it scrapes, and sums the acceptors' counters)."""
        self.config = config
        self.pc = config.proxy
        self.admission = admission
        self.default_priority = config.default_band.priority
        self.pool = BackendPool(self.pc.backends, self.pc.backoff, self.pc.max_backoff)
        self.pool.probes = not self.pc.utilization  # (with it, a good scrape brings a backend back)
        self.report_to = report
        if report is not None:
            report.pool = self.pool
        self.utilization = (
            PoolUtilization(len(self.pc.backends), self.pc.queue_threshold, self.pc.kv_threshold, self.pc.staleness)
            if self.pc.utilization and report is None else None
        )
        # where the requests sent to and finished at each backend are counted: the detector, or the report
        self.counts: PoolUtilization | BackendReport | None = report if report is not None else self.utilization
        self.on_health: Callable[[int], None] | None = None  # the distributor with acceptors: tell them
        # ...and each backend's room by its detector (`_push_rooms`), as last told; in an acceptor, as the
        # distributor last told it (`LinkBackendsFull`), with how many of this one's sends it counts: `_full`
        self.on_full: Callable[[list[int]], None] | None = None
        self.rooms: list[int] | None = None
        self._rooms_from: list[int] | None = None  # (the distributor) the detector's rooms it told last
        self.counted: list[int] = []  # (in an acceptor) how many of its sends to each backend `rooms` counts
        self.remote: dict[int, ProxyReport] = {}  # the distributor with acceptors: each one's last report
        # ... and, per backend, until when (this loop's clock) each one's proxy keeps it out of rotation
        self.remote_down: dict[int, list[float]] = {}
        # ... and the counters of those that exited: one entry per configured backend, as every report
        # has (`ProxyReport.add` sums backend by backend; with none here theirs were dropped)
        self.retired = ProxyReport(backends=[BackendFigures() for _ in self.pc.backends])
        self.routes = ROUTES
        self.stats = ProxyStats()
        self.active: set[Exchange] = set()
        self.waiting: set[Exchange] = set()  # admitted, no outcome yet (`_none_up`)
        self._none_up_timer: asyncio.TimerHandle | None = None
        self._none_up_since = -math.inf  # when the last backend last went out (`_none_up`)
        self.unsent = 0  # dispatched requests whose task has not sent them to a backend yet
        self._on_room = on_room
        self.pool.on_all_out = self._none_up
        self._replan: asyncio.TimerHandle | None = None  # a plan pass when a backend's back-off ends
        self._replan_at = math.inf
        self._passthroughs = asyncio.Semaphore(MAX_PASSTHROUGHS)
        # each connection's latest passthrough: the next one waits for it
        self._last_passthrough: weakref.WeakKeyDictionary[HttpConnection, asyncio.Task[None]] = (
            weakref.WeakKeyDictionary())
        self.session: aiohttp.ClientSession | None = None
        self.scrape_session: aiohttp.ClientSession | None = None
        self.scraper: Scraper | None = None
        self.closing = False  # close() began: what it cancels is answered `shutting_down` (end_at_close)
        self.why = "drain"  # ... and why: the drain ended, a second signal cut it short, or the service stopped
        self.loop = asyncio.get_running_loop()  # constructed by the distributor's start()

    async def start(self) -> None:
        self.session = self._client_session(limit=0)
        if self.utilization is not None:
            # Its own session, one connection per backend: sharing the requests' pool, a scrape every
            # 50 ms took the idle connection longest unused (aiohttp's pool is first in, first out),
            # so none stayed idle for the keep-alive timeout and the pool never shrank after a peak (a
            # soak review: 15 connections to the backend held 80 s after the load)
            self.scrape_session = self._client_session(limit=100, limit_per_host=1)
            self.scraper = Scraper(self.pool, self.utilization, self.scrape_session, self.pc, self._on_room,
                                   self._scrape_health)
            self.scraper.start()

    def _client_session(self, limit: int, limit_per_host: int = 0) -> aiohttp.ClientSession:
        """A session to the backends, its connector's limits as given (0: none): bodies kept as they come
        (usage is read from them, streams are re-framed; a compressed one is passed through)."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.pc.connect_timeout,
                                        sock_read=self.pc.read_timeout)
        # Idle connections are closed after `keepalive_timeout`, below the backends' own (vLLM's and
        # SGLang's servers close theirs after 5 s): a request sent on a connection the backend is closing
        # fails as a `reset`, after it may have been read.
        connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit_per_host, ttl_dns_cache=300,
                                         keepalive_timeout=self.pc.keepalive_timeout,
                                         socket_factory=self._backend_socket)
        # (no header of aiohttp's own: the client's are forwarded as they came, `Accept: */*` was added to
        # a request without one: a review)
        return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                     skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"))

    def _backend_socket(self, addr_info: Any) -> socket.socket:
        """A backend connection's socket, which finds its backend's host gone (a GPU node that crashed,
        or lost power, mid-generation) within `dead_peer_timeout`, as the fronts find a client's: it
        was `read_timeout` (10 minutes), the client's stream and its budget held all that time."""
        family, kind, proto, _, _ = addr_info
        sock = socket.socket(family=family, type=kind, proto=proto)
        detect_dead_peers(sock, self.config.service.dead_peer_timeout)
        return sock

    async def close(self, *, why: str = "drain") -> None:
        """The service is stopping (`why`: "drain", its drain ended; "signal", a second signal cut the
        drain short; "stopped", it stopped otherwise, e.g. on an error): end what is still running.
        Each exchange's task is cancelled, which closes its upstream request (the backend stops
        generating); its done callback answers the client (`end_at_close`), saying why, and releases the
        ticket. Then wait, briefly, for those answers to be sent."""
        self.closing = True
        self.why = why
        if self._replan is not None:
            self._replan.cancel()
            self._replan = None
        if self._none_up_timer is not None:
            self._none_up_timer.cancel()
            self._none_up_timer = None
        if self.scraper is not None:
            await self.scraper.stop()
        running = list(self.active)
        if running:
            log.warning("%d proxied request(s) still running %s: ending them (shutting_down)", len(running),
                        self.ended_when())
        for exchange in running:
            if exchange.task is not None:
                exchange.task.cancel()
        for exchange in running:
            if exchange.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await exchange.task
        # what was written is in the transports' buffers only while a client reads slowly; at exit it
        # would be lost (the kernel's send queue is not: the socket's close still sends it)
        until = self.loop.time() + _FLUSH_AT_CLOSE
        while any(ex.conn.write_buffered() for ex in running) and self.loop.time() < until:
            await asyncio.sleep(0.01)
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self.scrape_session is not None:
            await self.scrape_session.close()
            self.scrape_session = None

    def _scrape_health(self, index: int) -> None:
        if self.on_health is not None:
            self.on_health(index)

    def scrape_down_for(self, index: int) -> float:
        """How long the scraper has taken backend `index` out for (0: it has not)."""
        b = self.pool.backends[index]
        return max(0.0, b.down_until - self.loop.time()) if b.last_kind == "scrape" else 0.0

    def scrape_health(self, index: int, down_for: float, detail: str) -> None:
        """In an acceptor: the distributor's scraper took a backend out (`down_for` seconds: nothing
        listens there), or back in (0). Applied to this proxy's pool as its scraper would, without
        counting the error again (the distributor counted it)."""
        if not 0 <= index < len(self.pool.backends):
            return
        b = self.pool.backends[index]
        now = self.loop.time()
        if down_for > 0:
            self.pool.mark_failed(b)  # (a failure of its own, as one process's scraper counts it: `failed`)
            if self.pool.up(b, now):  # (out here already: its own back-off stands, as one process's scraper takes
                b.down_until = now + down_for  # out only a backend up; review 147: the scrape's, told
                b.last_kind = "scrape"  # over it, brought back one failing every request at the next good scrape)
                b.last_error = detail[:300]
                b.proven = False  # (as `_take_out` has it: not up for the last-up rule until it answers;
                # a review: a dead backend counted up in the acceptors, the last working one went out)
                self.pool.tell_if_all_out(now)
        elif b.last_kind == "scrape" and not self.pool.up(b, now):
            self.pool.succeeded(b)
        if self.report_to is not None:
            self.report_to.health_changed()  # (the distributor counts what this pool keeps out)

    def saturation(self, grants: int) -> float:
        """The utilization detector's input to the ledger: requests admitted but not yet sent anywhere
        (grants on their way to a shard, dispatches whose task has not run yet) count too."""
        util = self.utilization
        assert util is not None
        now = self.loop.time()
        util.expire(now)  # staleness as of this decision, not as of the last scrape round
        sats = util.saturations_kept()  # (unchanged within a plan: once for its grants)
        unsent = grants + self.unsent
        rooms: list[int] | None = None
        if self.on_full is not None:  # with acceptors: their pickers count against the rooms
            rooms = util.rooms_kept()
            self._push_rooms(rooms)
            inflight = None  # (the detector's counts: the sum of theirs, each picking by its own)
        else:  # one process: the picker's own counts, which it fills by (the detector's end a request
            # at its answer's end, the picker's at its try's, and count no pass-through GET)
            rooms = util.rooms_kept() if unsent else None
            inflight = [b.inflight for b in self.pool.backends]
        return util.saturation(unsent, self._out_of_rotation(now), sats, rooms, inflight)

    def refresh_rooms(self) -> bool:
        """(The distributor with acceptors) each backend's room now: told to every acceptor if it
        changed (`_push_rooms`; a review: told only to the acceptor whose report changed it, the others
        kept the old rooms and sent to a full backend beside an idle one). Whether it was told."""
        util = self.utilization
        assert util is not None
        util.expire(self.loop.time())
        before = self.rooms
        self._push_rooms(util.rooms_kept())
        return self.rooms is not before

    def _push_rooms(self, rooms: list[int]) -> None:
        """With acceptors: tell them each backend's room (`PoolUtilization.room`) when that changed,
        judged as each admission decision is (a dispatch follows a decision) and as each of their
        reports comes (`refresh_rooms`); their pickers send to one with room first, counting their own
        sends against it. A backend whose metrics are stale is told as -1 (full, and stale: a retry
        ranks it last, `BackendPool.pick`). (`rooms` is the detector's kept list, new whenever a
        backend's staleness may have changed: one it told already is not looked at again.)"""
        if rooms is self._rooms_from:
            return
        self._rooms_from = rooms
        util = self.utilization
        assert util is not None
        told = [-1 if util.stale(b) else room for b, room in enumerate(rooms)]
        if told != self.rooms:
            self.rooms = told
            assert self.on_full is not None
            self.on_full(told)

    def told_rooms(self, rooms: list[int], counted: list[int]) -> None:
        """(In an acceptor) the distributor's rooms, and how many of this one's sends they count."""
        self.rooms = rooms
        self.counted = counted

    def _full(self) -> Callable[[int], bool] | None:
        """The picker's `full`: this process's detector's, or in an acceptor the distributor's rooms
        less this one's sends they do not count yet (the other acceptors' such sends are not seen:
        a backend may take, beyond its room, what they sent before their reports reached the
        distributor and its new rooms came back)."""
        if self.utilization is not None:
            return self.utilization.full
        rooms, report = self.rooms, self.report_to
        if rooms is None or report is None or len(rooms) != len(self.pool.backends):
            return None
        return self._told_full

    def _stale(self) -> Callable[[int], bool] | None:
        """The picker's `stale`: this process's detector's, or in an acceptor the rooms told (-1)."""
        if self.utilization is not None:
            return self.utilization.stale
        rooms = self.rooms
        if rooms is None or len(rooms) != len(self.pool.backends):
            return None
        return lambda backend: rooms[backend] < 0

    def _told_full(self, backend: int) -> bool:
        """(In an acceptor) full by the rooms last told, read as it picks (a retry picks after rooms
        may have come: review 124)."""
        rooms, counted, report = self.rooms, self.counted, self.report_to
        assert rooms is not None and report is not None
        return report.sent_total[backend] - (counted[backend] if backend < len(counted) else 0) >= rooms[backend]

    def _out_of_rotation(self, now: float) -> set[int]:
        """The backends that take no request now (failed, backing off), as the pool's picker sees them:
        this process's, and with acceptors any one's (each keeps its own pool: out in one, a backend
        is out for a share of the requests, and soon for all, as the others meet its failures too).

        A backend comes back when its back-off ends, an event no one reports: the pool's figure may
        fall then, so a plan pass is asked for at the first such moment (a review: a request held on a
        pool back under its ceiling waited 20 s, for an unrelated scrape)."""
        pool = self.pool
        out: set[int] = set()
        back = math.inf
        for b in pool.backends:
            if not pool.up(b, now):
                out.add(b.index)
                back = min(back, b.down_until)
        for down in self.remote_down.values():
            for index, until in enumerate(down):
                if until > now:
                    out.add(index)
                    back = min(back, until)
        if back < self._replan_at:
            if self._replan is not None:
                self._replan.cancel()
            self._replan_at = back
            self._replan = self.loop.call_at(back, self._back_in_rotation)
        return out

    def _back_in_rotation(self) -> None:
        self._replan, self._replan_at = None, math.inf
        self._on_room()

    def remote_health(self, acceptor: int, down_for: list[float]) -> None:
        """An acceptor's proxy took backends out of rotation, or back (`LinkBackends.down_for`)."""
        now = self.loop.time()
        self.remote_down[acceptor] = [now + d if d > 0 else 0.0 for d in down_for]
        self._on_room()  # (one may be back: the pool's figure may have fallen)

    def peers_down_for(self, acceptor: int) -> list[float]:
        """(The distributor) per backend, for how long the acceptors other than `acceptor` keep it out
        of rotation (`LinkPeersDown`): the longest of theirs, 0 where none does."""
        now = self.loop.time()
        longest = [0.0] * len(self.pool.backends)
        for other, down in self.remote_down.items():
            if other != acceptor:
                for index, until in enumerate(down[:len(longest)]):
                    longest[index] = max(longest[index], until - now)
        return longest

    def peers_health(self, down_for: list[float]) -> None:
        """(An acceptor) the other acceptors keep these backends out (`LinkPeersDown`): this one's picker
        sends them nothing while another is up, as one proxy would whose pool had them out. Its own
        health, and what it reports, are unchanged (a peer's back-off told back would come back later
        with each hop's delay added: the two would keep a backend out for each other), and the last
        backend it has up still takes requests (`BackendPool.strike`'s last-up rule)."""
        now = self.loop.time()
        pool = self.pool
        until = [now + d if d > 0 else 0.0 for d in down_for[:len(pool.backends)]]
        pool.peers_out(now)  # (forgets the back-offs all past)
        before = pool.peers_until or [0.0] * len(until)
        pool.peers_until = until if any(until) else None
        # a take-out there ends a back-off of at least `backoff` past the last one's end (it is out till
        # then): beyond half of that, a new one, not the same one told again (each report's delay moves it)
        again = pool.backoff / 2
        for backend, t, was in zip(pool.backends, until, before, strict=False):
            if t > now and (was <= now or t > was + again):  # taken out there: not up for the last-up rule
                backend.proven = False  # until it answers here, as one taken out here (`_take_out`; review
                # 138: proven still once the others' back-off ended, it held in a backend failing every
                # request; only as it goes out: review 140, a stale report re-marked one the scraper
                # had just brought back; and as it goes out again: review 141, taken out there again
                # within a report's delay of its last back-off's end, it stayed proven here)

    def mark_sent(self, ex: Exchange) -> None:
        if ex.unsent:
            ex.unsent = False
            self.unsent -= 1
            if self.report_to is not None:
                self.report_to.mark(ex.ticket)

    # ------------------------------------------------------------------ the HTTP front calls these

    http_error = staticmethod(http_error)  # for the HTTP front, which does not import this module

    @staticmethod
    def serves(path: bytes) -> bool:
        """A proxied path that is not in `routes`: `GET /v1/models/{id}` (asked only about paths that
        are not the HTTP front's own routes, nor in `routes`). Not one with a `.` or `..` segment,
        encoded or not: a backend, or a proxy before it, that resolves them would serve another path
        than a model's, unadmitted (a review: `/v1/models/../../metrics` went through as sent)."""
        if not (path.startswith(MODEL_PREFIX) and len(path) > len(MODEL_PREFIX)):
            return False
        try:  # as a server behind may read it: percent-decoded, as UTF-8 (overlong forms are not)
            model = urllib.parse.unquote_to_bytes(path[len(MODEL_PREFIX):]).decode("utf-8")
        except UnicodeDecodeError:
            return False
        # not: encoded twice (`%252e`), a fragment (dropped on the way, a review: `x/..#f`), a control
        # character (`..%00`); `\` is a separator to some servers, `;` starts a path parameter to others
        if "%" in model or "#" in model or not model.isprintable():
            return False
        segments = model.replace("\\", "/").split("/")
        return not any(segment.split(";", 1)[0] in (".", "..") for segment in segments)

    def body_limit(self, path: bytes) -> int | None:
        """The body limit of a proxied route (prompts are large), None for other paths."""
        return self.pc.max_body_bytes if path in POST_ROUTES else None

    def handle(self, conn: HttpConnection, method: bytes, path: bytes, raw_headers: list[tuple[bytes, bytes]],
               body: bytes, conn_hdr: bytes, close: int, query: bytes = b"", http10: bool = False) -> None:
        """`query`: the request's query string with its `?`, as received (b"": none); a passed-through
        GET forwards it unchanged. `http10`: an HTTP/1.0 request (a stream to it is ended by closing)."""
        slot = conn.slot_open(conn_hdr, close)
        try:
            self._handle(conn, slot, method, path, raw_headers, body, conn_hdr, query, http10)
        except Exception as exc:  # a bug of ours: the slot must still be answered, or the connection stalls
            log.exception("proxy handler for %r failed", path[:200])
            if slot.exchange is None or slot.exchange.task is None:  # (a no-op if the slot was answered)
                self.stats.internal_errors += 1  # as an acceptor's failed admission is (Exchange.fail)
                conn.slot_respond(slot, error_response(500, f"flowshard: internal error: {type(exc).__name__}",
                                                       "server_error", "internal_error", None, conn_hdr,
                                                       no_body=method == b"HEAD"))

    def _handle(self, conn: HttpConnection, slot: _Slot, method: bytes, path: bytes,
                raw_headers: list[tuple[bytes, bytes]], body: bytes, conn_hdr: bytes, query: bytes,
                http10: bool) -> None:
        route = path.decode("latin-1")
        # values as UTF-8, as aiohttp reads and writes them (bytes that are not: surrogate escapes); read
        # as latin-1 they reached the backend re-encoded (`café` as `cafÃ©`: a review)
        headers = [(n.decode("latin-1").lower(), v.decode("utf-8", "surrogateescape")) for n, v in raw_headers]
        model = path not in ROUTES  # (the front sends only ROUTES and what `serves`)
        if model or path in GET_ROUTES:
            if model:
                route = MODEL_ROUTE
            if method not in (b"GET", b"HEAD"):
                conn.slot_respond(slot, http_error(405, f"method {method.decode('latin-1')} not allowed", conn_hdr,
                                                   b"allow: GET, HEAD\r\n"))
                return
            # the path and query as received (llhttp let only printable ASCII through): forward() sends
            # them unchanged, not re-quoted
            exchange = Exchange(self, conn, slot, route, _PASSTHROUGH, headers, conn_hdr,
                                (path + query).decode("latin-1"), head=method == b"HEAD", chunked=not http10)
            slot.exchange = exchange
            before = self._last_passthrough.get(conn)
            exchange.task = self.loop.create_task(self._pass_through(exchange, method.decode(), before))
            self._last_passthrough[conn] = exchange.task
            self.active.add(exchange)
            exchange.task.add_done_callback(exchange._done)
            return
        if method != b"POST":
            conn.slot_respond(slot, http_error(405, f"method {method.decode('latin-1')} not allowed", conn_hdr,
                                               b"allow: POST\r\n", no_body=method == b"HEAD"))
            return
        try:
            item = classify(self.pc, route, read_headers(self.pc, headers), body, self.default_priority)
        except ClassifyError as exc:
            self.stats.response(route, exc.status)
            conn.slot_respond(slot, error_response(exc.status, exc.message, "invalid_request_error", None,
                                                   exc.param, conn_hdr))
            return
        now = self.loop.time()
        if not self.pool.any_up(now) and not self.pool.probe_ready(now):  # every backend is failing: say so
            # now, not after waiting a TTL
            self.stats.response(route, 503)
            self.stats.no_backend += 1
            conn.slot_respond(slot, error_response(503, "flowshard: no backend is available (all failed recently)",
                                                   "service_unavailable", "no_backend", None, conn_hdr,
                                                   self._retry_after(now)))
            return
        self.stats.tokens["estimated"] += item.tokens
        exchange = Exchange(self, conn, slot, route, item, headers, conn_hdr, (path + query).decode("latin-1"),
                            chunked=not http10)
        slot.exchange = exchange
        # leased=False: the proxy itself releases the ticket when the response ends (or the client leaves)
        exchange.rid = self.admission.admit(exchange, slot, item.flow, item.priority, item.size, 0.0, item.slo,
                                            item.tokens, 0.0, False, proxied=True)
        if exchange.task is None and not exchange.refused:  # (not dispatched or refused at once)
            self.waiting.add(exchange)

    def _none_up(self) -> None:
        """No backend is up (the last one just went out): if none is back within `NONE_UP_GRACE` (or
        half the back-off, if shorter), the requests then waiting for their admission's outcome are
        answered 503 `no_backend`, as one arriving is, their admissions cancelled (`_answer_waiting`).
        The utilization detector counts the backends' stale metrics full, so those it held waited out
        their TTL (60 s by default) while every later request was answered at once (review 160). The
        wait: a connect refused for a moment (a scrape's; the next good one brings the backend back)
        answered every waiting request 503 at once (review 165)."""
        self._none_up_since = self.loop.time()  # (a backend back and out again: the grace runs from now)
        if self.waiting and self._none_up_timer is None and not self.closing:
            self._none_up_timer = self.loop.call_later(self._none_up_grace(), self._answer_waiting)

    def _none_up_grace(self) -> float:
        return min(NONE_UP_GRACE, self.pc.backoff / 2)

    def _answer_waiting(self) -> None:
        """(`_none_up`) None up since the last backend went out, a grace ago: the waiting requests are
        answered 503 `no_backend`. Not while a probe may go (the detector off: one of them may be it).
        If the last one went out later (a backend back and out again meanwhile: review 166), the wait
        goes on from then."""
        self._none_up_timer = None
        now = self.loop.time()
        if not self.waiting or self.closing or self.pool.any_up(now) or self.pool.probe_ready(now):
            return
        left = self._none_up_since + self._none_up_grace() - now
        if left > 0:
            self._none_up_timer = self.loop.call_later(left, self._answer_waiting)
            return
        waiting, self.waiting = self.waiting, set()
        for ex in waiting:
            if ex.refused or ex.task is not None or ex.gone:
                continue
            ex.refused = True
            if ex.rid is not None:
                self.admission.cancel(ex.rid)
            self._no_backend(ex)

    def _no_backend(self, ex: Exchange) -> None:
        self.stats.no_backend += 1
        self._respond_error(ex, 503, "flowshard: no backend is available (all failed recently)",
                            "service_unavailable", "no_backend", extra=self._retry_after(self.loop.time()))

    def _retry_after(self, now: float) -> bytes:
        """A `no_backend` answer's `Retry-After`: until the first backend is back (at least 1 s; a review:
        after the retries it was always 1)."""
        return b"retry-after: %d\r\n" % max(1, math.ceil(self.pool.next_up(now)))

    # ------------------------------------------------------------------ upstream

    async def _pass_through(self, ex: Exchange, method: str, before: asyncio.Task[None] | None) -> None:
        """A GET passed through: after the connection's previous one, within `MAX_PASSTHROUGHS` in this process."""
        if before is not None and not before.done():
            await asyncio.wait([before])  # (however it ended)
        async with self._passthroughs:
            await self.forward(ex, method)

    async def forward(self, ex: Exchange, method: str = "POST") -> None:
        """Send the request to a backend (another after a failure before its answer, or a 5xx); relay the answer."""
        assert self.session is not None
        pc = self.pc
        loop = self.loop
        named = _connection_named(ex.headers)  # hop-by-hop too, for this connection (RFC 9110 7.6.1)
        headers = [(n, v if v.isascii() else _sendable(v)) for n, v in ex.headers
                   if n not in _DROP_REQUEST and n not in named]
        if method == "POST":
            headers = [(n, v) for n, v in headers if n != "content-type"] + [("content-type", "application/json")]
        # the answer uncompressed (its usage is read, a stream re-framed); one compressed anyway keeps its
        # `content-encoding` (passed through)
        headers.append(("accept-encoding", "identity"))
        tried: set[int] = set()
        # The failures of this request that are retried (before any byte reached the client), counted
        # against their backends' failures in a row only if another backend then answers it: one that
        # fails everywhere is likely its own cause (a review: one such request, retried by its client,
        # took every backend out); each with whether the backend was `clean` before, and its `changes` after
        suspects: list[Suspect] = []
        attempt = 0
        util = self.utilization
        full = self._full()
        while True:
            now = loop.time()
            if util is not None:
                util.expire(now)  # (staleness as of this pick)
            peers = self.pool.peers_out(now)  # (out in the other acceptors: as if out here, but as a last resort)
            stale = self._stale() if tried else None  # (a retry ranks a backend with stale metrics last)
            backend = (self.pool.pick(now, tried, full, peers, advance=not tried, stale=stale)
                       or self.pool.pick(now, full=full, shun=peers, advance=False, stale=stale))
            # (none up: one out, now and then; a try as any other, within `retries`: review 156)
            # (not a passed-through GET: its answer proves nothing of how the backend serves requests,
            # and brought one answering 500 to every POST back: review 157)
            probe = backend is None and self.pool.probes and method == "POST"
            if probe:
                backend = self.pool.probe(now, tried, ex)
            if backend is None:
                if attempt < pc.retries:
                    attempt += 1
                    self.stats.retries += 1
                    await asyncio.sleep(min(self.pool.next_up(loop.time()), 0.05 * 2**attempt))
                    continue
                self._no_backend(ex)
                return
            tried.add(backend.index)
            # the last try: no retry left, or no other backend up (then the client gets this one's answer)
            # (out in the others: not counted here, unless this one is too: then it is as good as they are)
            others = self.pool.any_up(now, tried | peers if peers and backend.index not in peers else tried)
            # (a probe's failure is answered as no backend up: 503 `no_backend`, after any retry left)
            last = not probe and (attempt >= pc.retries or not others)
            # (its only try, no retry left while others are up: nothing will show whose failure it is;
            # judged at once: a review, with `retries = 0` none was ever out. Not a request that failed
            # before: the last of its tries would be struck, a review, with more backends than tries)
            judge = last and others and len(tried) == 1
            try:
                answered = await self._attempt(ex, backend, method, headers, last, suspects, judge=judge)
            finally:
                if probe:
                    self.pool.unprobe(backend, ex, loop.time())
            if answered is None and probe and attempt >= pc.retries:  # its last try, a probe: none is up
                self._no_backend(ex)
                answered = False
            if answered is not None:
                if not answered and suspects and suspects[-1][0] is backend:  # it failed everywhere it went:
                    for failed, _, was_clean, changes in suspects:  # likely its own doing (review 145)
                        self.pool.forgive(failed, was_clean, changes)
                return
            attempt += 1
            self.stats.retries += 1

    async def _attempt(self, ex: Exchange, backend: Backend, method: str, headers: list[tuple[str, str]],
                       last: bool, suspects: list[Suspect], judge: bool = False) -> bool | None:
        """One try on `backend`. None: it failed before any byte reached the client (try another), the
        failure counted and added to `suspects` (`forward`: struck when another backend answers the
        request, at its head; `judge`: struck at once); True: the backend answered (not a 5xx); False:
        the client got an error answer (the backend's 5xx on the last try, or flowshard's)."""
        assert self.session is not None
        util = self.counts
        counted = method == "POST"
        backend.inflight += 1
        backend.requests += 1
        self.mark_sent(ex)
        if util is not None and counted:
            util.sent(backend.index)
            ex.working = backend.index
        ex.backend = backend
        resp: aiohttp.ClientResponse | None = None
        try:
            # the path and query as the client sent them, not re-quoted (`?api-version=...` and the like)
            url = URL(_encoded_base(backend.url) + ex.path, encoded=True)
            try:
                # (a redirect is the client's to follow: passed through, not re-sent with its body and
                # credentials to wherever the backend says; a review)
                resp = await self.session.request(method, url, data=ex.item.body or None, headers=headers,
                                                  allow_redirects=False)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                return self._failed_before_answer(ex, backend, exc, last, suspects, judge)
            if resp.status < 200:  # (100 and 103 are read past by aiohttp) an upgrade nobody asked for
                resp.close()
                self._suspect(backend, "protocol", f"a {resp.status} answer to a {method}", suspects, judge)
                if last:
                    self._respond_error(ex, 502, f"flowshard: backend {backend.name} answered {resp.status}",
                                        "server_error", "backend_failed")
                    return False
                return None
            stream = resp.content_type == "text/event-stream" and method != "HEAD" and resp.status not in (204, 304)
            first = b""
            if resp.status >= 500:
                self._suspect(backend, f"http_{resp.status}", f"HTTP {resp.status}", suspects, judge)
                if not last:
                    return None
            else:
                # answered here: the backends that failed this request before did so on their own
                # (struck at its head, not its end: a review, a long stream let 60 more go to a failing
                # one; nor at a stream's first bytes: review 137, 19 of 20 went to one during a 2 s
                # prefill, and review 140 as many for failures after a head; so a request whose stream
                # every backend ends before any byte strikes all it tried but the last: left, review 148)
                # A stream's head says less: until its first bytes the answering backend may fail too
                # (review 152: a request whose stream every backend ends after its head took 3 of 4
                # healthy backends out, striking each it tried but the last). Its suspects are struck
                # at its first bytes (or when they do not come within `read_timeout`); meanwhile each
                # is `suspected`, picked after the others for `SUSPECT_FOR` (review 137: unstruck, a
                # backend resetting everything took 19 of 20 during another's 2 s prefill); and if this
                # stream fails before its first bytes too, they are suspects again, with it.
                held = [sus for sus in suspects if sus[0] is not backend] if stream else []
                if stream:
                    at = self.loop.time()
                    for sus in held:
                        sus[0].suspected += 1
                        sus[0].suspect_since = at
                else:
                    self._strike(suspects, backend)
                suspects.clear()
                if stream:
                    # A stream's head is held until its first bytes: a backend fails a long prefill after
                    # sending it (vLLM sends it at once), and until the first bytes nothing has reached
                    # the client, so that is a failure before the answer, tried on another backend; so
                    # is a stream that ends before any byte (an empty 200 was relayed: review 137)
                    try:
                        first = await resp.content.readany()
                        if not first:
                            raise aiohttp.ClientPayloadError("the stream ended before its first bytes")
                    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                        resp.close()
                        if isinstance(exc, aiohttp.SocketTimeoutError):  # (it answered; no retry follows)
                            self._strike(self._unsuspect(held), backend)
                        else:
                            suspects.extend(self._unsuspect(held))
                        return self._failed_before_answer(ex, backend, exc, last, suspects, judge)
                    except BaseException:  # (the client left, the drain ended: judged by nothing)
                        self._unsuspect(held)
                        raise
                    self._strike(self._unsuspect(held), backend)
                self.pool.answered(backend, proves=counted)
            if stream:
                whole = await self._relay_stream(ex, backend, resp, first)
            else:
                whole = await self._relay_body(ex, backend, resp, head_only=method == "HEAD")
            if whole and resp.status < 500 and counted:  # (an admitted request's: a passed-through GET's
                self.pool.completed(backend)            # answer says nothing of how it serves them: a review)
            return resp.status < 500
        except BaseException:  # the client left (cancelled), the drain ended, or a bug of ours
            if resp is not None:
                resp.close()  # drop the connection (not back to the pool): the backend stops
            raise
        finally:
            if resp is not None and not resp.closed:
                resp.release()
            backend.inflight -= 1
            self._backend_done(ex)

    def _failed_before_answer(self, ex: Exchange, backend: Backend, exc: BaseException, last: bool,
                              suspects: list[Suspect], judge: bool) -> bool | None:
        """A try failed before any byte reached the client (`_attempt`'s None: try another; False: the
        client got an error answer)."""
        code = getattr(exc, "errno", None)
        if code in LOCAL_SHORTAGE:  # ours: no backend is to blame, none is tried
            log.error("connecting to backend %s: %s (not counted as the backend's)", backend.name, exc)
            why = os.strerror(code)  # (not the backend's address: the client is told only what)
            self._respond_error(ex, 503, f"flowshard: cannot open a connection to a backend: {why}",
                                "service_unavailable", "local_resources", extra=b"retry-after: 1\r\n")
            return False
        if isinstance(exc, aiohttp.SocketTimeoutError):
            # The request was sent and the backend said nothing for `read_timeout`: it may still
            # be generating. Not tried again: another backend would take as long, and the
            # client would wait `read_timeout` once per backend (a long generation run on each)
            # (not a suspect: it is not tried again, and a backend that hangs must go out)
            self.pool.failed(backend, self.loop.time(), "timeout", f"no answer within {self.pc.read_timeout:g} s")
            self._respond_error(ex, 504, f"flowshard: backend {backend.name} did not answer within "
                                f"read_timeout ({self.pc.read_timeout:g} s)", "server_error",
                                "backend_timeout")
            return False
        kind = failure_kind(exc)
        self._suspect(backend, kind, f"{type(exc).__name__}: {exc}", suspects, judge)
        if last:
            code = "backend_unreachable" if kind == "connect" else "backend_failed"
            self._respond_error(ex, 502, f"flowshard: backend {backend.name} failed: {type(exc).__name__}",
                                "server_error", code)
            return False
        return None

    def _strike(self, suspects: list[Suspect], answering: Backend) -> None:
        """`answering` answered the request: its failures before, on other backends, were theirs."""
        now = self.loop.time()
        took_out = False
        for failed, kind, _, _ in suspects:
            if failed is not answering:
                took_out = self.pool.strike(failed, now, kind) or took_out
        if took_out and self.report_to is not None:
            self.report_to.health_changed()  # (now: review 147, else at this request's end)

    @staticmethod
    def _unsuspect(held: list[Suspect]) -> list[Suspect]:
        """The suspects held at a stream's head, judged now (struck, or suspects again): no longer
        `suspected` for it."""
        for sus in held:
            sus[0].suspected -= 1
        return held

    def _suspect(self, backend: Backend, kind: str, detail: str, suspects: list[Suspect],
                 judge: bool = False) -> None:
        """A failure of a request before its answer: counted; one that nothing was sent for (`connect`)
        takes the backend out at once, and so may one judged at once (`judge`); the others wait in
        `suspects` for another backend's answer (`_attempt`)."""
        if kind in FAIL_AT_ONCE or judge:
            self.pool.failed(backend, self.loop.time(), kind, detail)
        else:
            was_clean = backend.clean
            self.pool.failed(backend, self.loop.time(), kind, detail, in_a_row=False)
            suspects.append((backend, kind, was_clean, backend.changes))

    def _backend_done(self, ex: Exchange) -> None:
        """The backend has answered all of `ex` (or failed it): the detector stops counting it there.
        Counted as the answer is read, not after it reached the client: a backend's scrape no longer
        shows what it has finished, and a request counted there after it was done (relayed to a slow
        reader) would count as waiting."""
        if ex.working >= 0:
            assert self.counts is not None
            self.counts.finished(ex.working, ex.held)
            ex.working, ex.held = -1, False

    async def _wait_on_client(self, ex: Exchange, reading: Awaitable[Any]) -> None:
        """Wait for the client (to read, or for its turn). The first time, the stream is counted held at
        its backend: meanwhile nothing more is read from it, and the backend may finish it without us."""
        if ex.working >= 0 and not ex.held:
            ex.held = True
            assert self.counts is not None
            self.counts.held(ex.working)
        await reading

    def _response_headers(self, resp: aiohttp.ClientResponse) -> list[tuple[str, str]]:
        headers = [(k.lower(), v) for k, v in resp.headers.items()]
        named = _connection_named(headers)
        return [(k, v) for k, v in headers if k not in _DROP_RESPONSE and k not in named]

    async def _relay_body(self, ex: Exchange, backend: Backend, resp: aiohttp.ClientResponse,
                          head_only: bool = False) -> bool:
        """A whole answer: its body with its length, or none where the status has none (1xx, 204, 304:
        RFC 9110 forbids the length on a 204, and on a 304 it would be the 200's) and, to a HEAD, the
        length the backend gave (a review: `content-length: 0` where the backend said 174)."""
        try:
            data = await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            resp.close()
            self._backend_done(ex)
            self.pool.failed(backend, self.loop.time(), "midstream", f"{type(exc).__name__}: {exc}")
            self._respond_error(ex, 502, f"flowshard: backend {backend.name} failed while answering: "
                                f"{type(exc).__name__}", "server_error", "backend_failed")
            return False
        self._backend_done(ex)
        if resp.status == 200 and ex.item.size:
            self._settle_usage(ex, backend, usage_from_body(data))
        self.stats.response(ex.route, resp.status)
        if resp.status in (204, 304):
            framing, data = b"", b""
        elif head_only:
            length = resp.headers.get("content-length", "")
            framing, data = (b"content-length: %d\r\n" % int(length) if length.isdigit() else b""), b""
        else:
            framing = b"content-length: %d\r\n" % len(data)
        head = _response_head(resp.status, self._response_headers(resp), ex.conn_hdr, framing)
        if len(data) <= _PIECE:
            ex.conn.slot_respond(ex.slot, head + data)
            return True
        # A large body goes in pieces, each after the client has read enough of the last (as a stream
        # does): written whole, more than write_buffer_limit of it unsent at once dropped a client that
        # was reading at full speed as a slow reader (a review: a 1.5 MB answer cut at 200 KB).
        conn, slot = ex.conn, ex.slot
        turn = conn.slot_turn(slot)
        if turn is not None:  # behind an answer still in progress: its pieces would pile up unwritten
            await turn
        ex.started = ex.sized = True
        unread = conn.slot_write(slot, head)
        with memoryview(data) as view:
            for at in range(0, len(data), _PIECE):
                if unread is not None:
                    await unread
                unread = conn.slot_write(slot, bytes(view[at:at + _PIECE]))
        conn.slot_end(slot)
        return True

    async def _relay_stream(self, ex: Exchange, backend: Backend, resp: aiohttp.ClientResponse,
                            first: bytes) -> bool:
        """The stream relayed, `first` its bytes read already (`_attempt`; b"": none were, a 5xx's); False
        if the backend cut it short (counted as its failure)."""
        conn, slot = ex.conn, ex.slot
        turn = conn.slot_turn(slot)
        if turn is not None:  # behind an answer still in progress: read nothing until it is this one's
            # turn (its ticket held meanwhile, which bounds what the proxy keeps: read at once, five
            # pipelined 60 MiB streams were held whole behind a slow one, each ticket back at its
            # [DONE]; a review)
            await self._wait_on_client(ex, turn)
        relay = SseUsage(ex.item.strip_usage)
        # a stream the backend compressed though asked not to (`accept-encoding: identity`) is relayed as
        # it comes, with its content-encoding (review 179: read as events, none was ever complete; the
        # client got only an error event and the backend was taken out for a failure mid-stream). gzip
        # and deflate (zlib) are read on the side from a decompressed copy: its [DONE] ends the response
        # once the compressed data has ended too (review 184: unseen, a backend that kept the response
        # open after it held the ticket until read_timeout), its usage is read, and data that ends before
        # the compressed data does is a cut (taken for a whole answer before); another encoding goes to
        # its end unread (its usage not read: the admission's estimate stands)
        encoding = resp.headers.get("content-encoding", "identity").strip().lower()
        encoded = encoding not in ("", "identity")
        inflate = zlib.decompressobj(32 + zlib.MAX_WBITS) if encoding in ("gzip", "x-gzip", "deflate") else None
        seen_done = False
        self.stats.response(ex.route, resp.status)
        ex.started = True
        ex.sized = encoded  # (a compressed body cut short cannot be ended with an event in plain text)
        headers = self._response_headers(resp)
        conn.slot_write(slot, _response_head(resp.status, headers, ex.conn_hdr, _CHUNKED) if ex.chunked
                        else _response_head(resp.status, headers, _CONN_CLOSE, b""))
        stats = self.stats
        ended = False
        before_last = last = b""  # (the last two reads passed on: a stream ended without [DONE] is whole if
        data = first  # a choice's finish_reason is there, the last read perhaps the usage's alone)
        try:
            while data or (data := await resp.content.readany()):  # (`iter_any`, after the first bytes)
                if encoded:
                    stats.chunks += 1
                    unread = conn.slot_write(slot, ex.piece(data))
                    if inflate is not None:
                        try:
                            seen_done = done_end(relay.feed(inflate.decompress(data))) >= 0 or seen_done
                        except zlib.error:  # (not what it says it is: relayed as it comes, to its end)
                            inflate = None
                    data = b""
                    if unread is not None:
                        await self._wait_on_client(ex, unread)
                    if seen_done and inflate is not None:  # the rest of the compressed data, briefly
                        await self._end_compressed(ex, resp, inflate, relay)
                        ended = True
                        self._end_at_done(ex, backend, resp, relay, b"")
                        break
                    continue
                out, data = relay.feed(data), b""
                if out:
                    stats.chunks += 1
                    before_last, last = last, out
                    done = done_end(out)  # OpenAI's end of stream, wherever it falls in this read (a review:
                    # followed by another event in the same read, or ended by CRLF or CRs, it was not seen,
                    # and the client waited for read_timeout)
                    if done >= 0:  # the client has all it needs: end its response now
                        ended = True
                        self._end_at_done(ex, backend, resp, relay, out[:done])  # (what follows: nobody's)
                        break
                    unread = conn.slot_write(slot, ex.piece(out))
                    if unread is not None:  # the client reads slower than the backend writes
                        await self._wait_on_client(ex, unread)
            if ended and not encoded:  # what may follow [DONE] is owed to nobody: the response's end, awaited briefly
                try:
                    async with asyncio.timeout(_DONE_GRACE):
                        async for data in resp.content.iter_any():
                            relay.feed(data)
                except TimeoutError:
                    # The backend keeps the response open after [DONE] (a review: its ticket was held for
                    # read_timeout, 600 s by default, and the backend then counted as failing): closed
                    # here, its connection dropped; not a failure, the client had its whole answer.
                    resp.close()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            resp.close()
            self._backend_done(ex)
            if ended:  # after [DONE]: the client had its whole answer, and the backend did not fail it
                return True
            self._failed_midstream(ex, backend, f"{type(exc).__name__}: {exc}",
                                   f"failed mid-stream ({type(exc).__name__})")
            return False
        self._backend_done(ex)
        if encoded:
            if ended:  # (at its [DONE]: settled and answered there)
                return True
            if inflate is not None and not inflate.eof:  # its data ended before its compressed stream did
                resp.close()
                self._failed_midstream(ex, backend, "the compressed stream ended short",
                                       "ended the compressed stream short")
                return False
            if resp.status == 200 and inflate is not None:
                self._settle_usage(ex, backend, relay.usage)
            ex.end_stream(b"")  # (unknown encodings: its end is all that can be told of it)
            return True
        if not ended:  # (ended at [DONE]: settled and answered there)
            if resp.status == 200 and not any(b'"finish_reason":"' in x or b'"finish_reason": "' in x
                                              for x in (before_last, last)):
                # ended cleanly, but before its [DONE] and before any choice's finish_reason: cut short
                # (review 152: relayed as a whole answer, 2 tokens of 5, no error, and the backend,
                # failing fast, took the most requests); a failure of the backend's, as a cut is
                self._failed_midstream(ex, backend, "the stream ended before [DONE]", "ended the stream before [DONE]")
                return False
            rest = relay.end()
            if resp.status == 200:
                self._settle_usage(ex, backend, relay.usage)
            ex.end_stream(rest)
        return True

    def _end_at_done(self, ex: Exchange, backend: Backend, resp: aiohttp.ClientResponse, relay: SseUsage,
                     tail: bytes) -> None:
        """A stream's [DONE] was read: the client's response ends with `tail`, its usage is settled (a
        stream's usage comes before its [DONE]), and its budget goes back now, not after the backend's
        end (a review: 1 s)."""
        self._backend_done(ex)
        ex.end_stream(tail)
        if resp.status == 200:
            self._settle_usage(ex, backend, relay.usage)
        ex.give_back()

    async def _end_compressed(self, ex: Exchange, resp: aiohttp.ClientResponse, inflate: Any,
                              relay: SseUsage) -> None:
        """A compressed stream's [DONE] was read: what is left of its compressed data (the end of the
        gzip member: without it the client cannot check what it got) is relayed, for `_DONE_GRACE` at
        most; then the response is closed if the backend keeps it open."""
        try:
            async with asyncio.timeout(_DONE_GRACE):
                while not inflate.eof and (data := await resp.content.readany()):
                    unread = ex.conn.slot_write(ex.slot, ex.piece(data))
                    with contextlib.suppress(zlib.error):
                        relay.feed(inflate.decompress(data))
                    if unread is not None:
                        await self._wait_on_client(ex, unread)
        except TimeoutError:
            pass
        if not inflate.eof or not resp.content.at_eof():
            resp.close()

    def _failed_midstream(self, ex: Exchange, backend: Backend, detail: str, what: str) -> None:
        """The backend failed a stream after its first bytes reached the client (`what` it did): counted
        as its failure (`midstream`), and the client's stream ends with an error event."""
        self.stats.midstream_failures += 1
        self.pool.failed(backend, self.loop.time(), "midstream", detail)
        self._end_stream_with_error(ex, f"flowshard: backend {backend.name} {what}; the response is incomplete",
                                    "server_error", "backend_failed")

    def _end_stream_with_error(self, ex: Exchange, message: str, type_: str, code: str, *,
                               close: bool = False) -> None:
        """End a stream whose head went out: an SSE error event (OpenAI-shaped, which the openai client
        raises as `APIError`), then the chunked end. What the relay still holds is an event cut short
        (`SseUsage.feed` passes every complete one): it is dropped, as a server-sent-events reader drops
        an unterminated event, rather than glued to the error. A no-op once the response has ended."""
        if ex.sized:  # a body with a content-length cut short: closing is all that can tell the client
            ex.conn.slot_end(ex.slot, close=True)
            return
        tail = b"data: " + _encode(_ErrorBody(_ErrorDetail(message, type_, None, code))) + b"\n\n"
        ex.end_stream(tail, close=close)

    def ended_when(self) -> str:
        """When, in words, the running requests were ended (`close`'s `why`)."""
        if self.why == "signal":
            return "when a second signal forced the stop during the drain"
        if self.why == "drain":
            return f"at the end of the drain (drain_timeout {self.config.service.drain_timeout:g} s)"
        return "when the service stopped (not a drain: see its log)"

    def end_at_close(self, ex: Exchange) -> None:
        """The service stopped (`close`) with `ex` running (its task cancelled: the upstream request is
        closed). A stream ends as one whose backend failed mid-stream does, with the reason; an answer
        not started is a 503. Either way the connection is closed after it: the service is exiting."""
        when = self.ended_when()
        if ex.started:
            message = f"flowshard: the service is shutting down: stream ended {when}; the response is incomplete"
            self._end_stream_with_error(ex, message, "service_unavailable", "shutting_down", close=True)
        else:
            message = f"flowshard: the service is shutting down: the request was still in progress {when}"
            self.stats.response(ex.route, 503)
            ex.conn.slot_end(ex.slot, error_response(503, message, "service_unavailable", "shutting_down", None,
                                                     _CONN_CLOSE, b"retry-after: 1\r\n",
                                                     no_body=ex.head),
                             close=True)

    def _respond_error(self, ex: Exchange, status: int, message: str, type_: str, code: str,
                       extra: bytes = b"") -> None:
        self.stats.response(ex.route, status)
        ex.conn.slot_respond(ex.slot, error_response(status, message, type_, code, None, ex.conn_hdr, extra,
                                                     no_body=ex.head))

    def _settle_usage(self, ex: Exchange, backend: Backend, usage: Usage | None) -> None:
        """The request's actual tokens: counted, and kept for the release, which corrects the flow's
        fairness charge from the admission estimate to what the backend served. A usage out of range
        (`usage_problem`: negative, or past 2^32 tokens) is taken as none reported (the estimate
        stands), counted as the backend's error of kind `usage` (it stays up) and logged once per
        backend: believed, it would skew the flow's charge without bound and, with acceptor
        processes, make the release unencodable on the link (review 18)."""
        if usage is not None and (problem := usage_problem(usage)) is not None:
            count = backend.errors.get("usage", 0) + 1
            backend.errors["usage"] = count
            if count == 1:
                log.warning("backend %s reported a usage out of range (%s): taken as no usage reported; "
                            "counted in flowshard_backend_errors_total{kind=\"usage\"}, not logged again",
                            backend.name, problem)
            usage = None
        if usage is not None:
            self.stats.tokens["prompt"] += usage.prompt_tokens
            self.stats.tokens["completion"] += usage.completion_tokens
            ex.actual = usage.prompt_tokens + usage.completion_tokens

    # ------------------------------------------------------------------ observability

    def report(self) -> ProxyReport:
        """This proxy's own counters and its view of the backends."""
        st = self.stats
        now = self.loop.time()
        return ProxyReport(
            [(route, status, n) for (route, status), n in sorted(st.responses.items())], dict(st.dropped),
            st.client_disconnects, st.retries, st.no_backend, st.midstream_failures, st.internal_errors,
            dict(st.tokens), st.chunks, len(self.active),
            [BackendFigures(b.inflight, b.requests, self.pool.up(b, now), dict(b.errors), b.last_error)
             for b in self.pool.backends],
        )

    def encoded_report(self) -> bytes:
        return _encode_report(self.report())

    def remote_report(self, acceptor: int, body: bytes) -> None:
        """An acceptor's proxy sent its counters (cumulative since it started)."""
        self.remote[acceptor] = _decode_report(body)

    def acceptor_exited(self, acceptor: int) -> bool:
        """Its counters as last reported stay counted (what it counted after that, at most one heartbeat's
        worth, `distributor.front.REPORT_INTERVAL`, is lost with it). Returns whether it kept backends
        out (then the others are told they are back: `LinkPeersDown`)."""
        kept_out = self.remote_down.pop(acceptor, None) is not None
        if kept_out:
            self._on_room()  # (what it kept out counts again)
        last = self.remote.pop(acceptor, None)
        if last is not None:
            self.retired.add(last, gauges=False)
        return kept_out

    def view(self) -> ProxyReport:
        """What /metrics and /v1/stats show: this proxy's counters, plus, with acceptor processes, the
        sum of theirs (as last reported, and those of acceptors that exited). A backend is up when no
        proxy has it out after a failure."""
        view = self.report()
        view.add(self.retired, gauges=False)
        for report in self.remote.values():
            view.add(report)
        return view

    def metrics(self) -> Iterator[Metric]:
        st = self.view()
        now = self.loop.time()
        responses = CounterMetricFamily("flowshard_proxy_responses", "Proxied responses by route and HTTP status.",
                                        labels=["route", "code"])
        for route, status, count in st.responses:
            responses.add_metric([route, str(status)], count)
        yield responses
        dropped = CounterMetricFamily("flowshard_proxy_dropped", "Proxied requests refused by flow control.",
                                      labels=["outcome"])
        for label, count in sorted(st.dropped.items()):
            dropped.add_metric([label], count)
        yield dropped
        yield CounterMetricFamily("flowshard_proxy_client_disconnects", "Clients that left before their response "
                                  "ended (the upstream request was closed).", value=st.client_disconnects)
        yield CounterMetricFamily("flowshard_proxy_internal_errors", "Proxied requests ended by an internal "
                                  "error of flowshard (logged with its traceback).", value=st.internal_errors)
        yield CounterMetricFamily("flowshard_proxy_retries", "Requests tried again on another backend.",
                                  value=st.retries)
        yield CounterMetricFamily("flowshard_proxy_no_backend", "Requests answered 503 because no backend was up.",
                                  value=st.no_backend)
        yield CounterMetricFamily("flowshard_proxy_stream_chunks", "Streamed chunks relayed to clients.",
                                  value=st.chunks)
        tokens = CounterMetricFamily("flowshard_proxy_tokens", "Tokens: the admission estimate, and the actual "
                                     "prompt and completion tokens the backends reported.", labels=["kind"])
        for kind, count in st.tokens.items():
            tokens.add_metric([kind], count)
        yield tokens
        inflight = GaugeMetricFamily("flowshard_backend_inflight_requests", "Requests in flight to the backend.",
                                     labels=["backend"])
        up = GaugeMetricFamily("flowshard_backend_up", "0 while the backend is out after a failure (passive "
                               "health; with acceptor processes, out in any of them), else 1.", labels=["backend"])
        errors = CounterMetricFamily("flowshard_backend_errors", "Backend failures by kind (connect, reset, "
                                     "protocol, timeout, http_<status> (a 5xx answer: http_503), midstream, "
                                     "scrape; usage: a usage out of range, ignored).",
                                     labels=["backend", "kind"])
        for b, fig in zip(self.pool.backends, st.backends, strict=True):
            inflight.add_metric([b.name], fig.inflight)
            up.add_metric([b.name], 1 if fig.up else 0)
            for kind, count in sorted(fig.errors.items()):
                errors.add_metric([b.name, kind], count)
        yield from (inflight, up, errors)
        util = self.utilization
        if util is None:
            return
        util.expire(now)
        sat = GaugeMetricFamily("flowshard_backend_saturation", "Per-backend saturation from its metrics: "
                                "max(waiting / queue_threshold, kv / kv_threshold) with the dispatches since "
                                "the scrape; 1 when stale.", labels=["backend"])
        age = GaugeMetricFamily("flowshard_backend_metrics_age_seconds", "Seconds since the backend's last good "
                                "scrape arrived.", labels=["backend"])
        took = GaugeMetricFamily("flowshard_backend_scrape_duration_seconds", "How long the backend's last good "
                                 "scrape took to arrive (over staleness: the backend counts as saturated between "
                                 "scrapes).", labels=["backend"])
        stale = GaugeMetricFamily("flowshard_backend_metrics_stale", "1 when the backend's metrics are older than "
                                  "the staleness limit (it counts as saturated).", labels=["backend"])
        scrape_errors = CounterMetricFamily("flowshard_backend_scrape_errors", "Failed metric scrapes.",
                                            labels=["backend"])
        waiting = GaugeMetricFamily("flowshard_backend_waiting_requests", "Waiting queue at the last scrape.",
                                    labels=["backend"])
        kv = GaugeMetricFamily("flowshard_backend_kv_cache_usage", "KV-cache use (0..1) at the last scrape.",
                               labels=["backend"])
        for b in self.pool.backends:
            load = util.loads[b.index]
            sat.add_metric([b.name], util.backend_saturation(b.index))
            if load.fresh_at > float("-inf"):
                age.add_metric([b.name], util.age(b.index))
                took.add_metric([b.name], load.duration)
            stale.add_metric([b.name], 1 if util.stale(b.index) else 0)
            scrape_errors.add_metric([b.name], load.errors)
            waiting.add_metric([b.name], load.waiting)
            kv.add_metric([b.name], load.kv)
        yield from (sat, age, took, stale, scrape_errors, waiting, kv)
        pool = util.saturation(out=self._out_of_rotation(self.loop.time()))
        yield GaugeMetricFamily("flowshard_pool_saturation", "Mean saturation of the backends in rotation (the "
                                "utilization detector).", value=pool)

    def snapshot(self) -> dict[str, Any]:
        """The `proxy` part of `GET /v1/stats`."""
        st = self.view()
        now = self.loop.time()
        util = self.utilization
        if util is not None:
            util.expire(now)
        backends = []
        for b, fig in zip(self.pool.backends, st.backends, strict=True):
            entry: dict[str, Any] = {"url": b.name, "inflight": fig.inflight, "requests": fig.requests,
                                     "up": fig.up, "errors": dict(fig.errors), "last_error": fig.last_error}
            if util is not None:
                load = util.loads[b.index]
                entry.update(saturation=util.backend_saturation(b.index), stale=util.stale(b.index),
                             waiting=load.waiting, running=load.running, kv=load.kv, held=load.held,
                             scrape_errors=load.errors,
                             scrape_seconds=load.duration if load.fresh_at > float("-inf") else None,
                             last_scrape_error=self.scraper.errors[b.index] if self.scraper else "")
            backends.append(entry)
        return {
            "active": st.active,
            # dispatched, not yet sent to a backend (the detector counts them; with acceptors, as they report)
            "unsent": self.unsent,
            "pool_saturation": util.saturation(out=self._out_of_rotation(now)) if util is not None else None,
            "responses": {f"{route} {status}": n for route, status, n in st.responses},
            "dropped": dict(st.dropped), "client_disconnects": st.client_disconnects, "retries": st.retries,
            "no_backend": st.no_backend, "midstream_failures": st.midstream_failures,
            "internal_errors": st.internal_errors, "tokens": dict(st.tokens),
            "chunks": st.chunks, "backends": backends,
        }


# A GET passed through: nothing to classify, nothing admitted, no body.
_PASSTHROUGH: Final = Classified(flow="", priority=0, slo=0.0, size=0, tokens=0, prompt_tokens=0, model="",
                                 stream=False, strip_usage=False, body=b"")
