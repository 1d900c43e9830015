"""The HTTP/1.1 front of the distributor: httptools + uvloop, one `asyncio.Protocol` per connection.

Callback style throughout: a request is parsed by httptools callbacks, handed to the `Admission`,
and answered when the distributor calls `HttpConnection.deliver` — no Future or Task per request.
Responses leave strictly in request order (pipelining): each request takes a slot in a per-connection
queue and the head of the queue is written as soon as it is ready. Responses produced while one
`data_received` call is parsed are written with one `transport.write`; so are, in an acceptor, those
delivered while one read of its link is decoded (`HttpHub.defer`).

Every admission made on a connection is either answered (its response written) or, when the
connection is lost first or its client sends EOF, settled from `connection_lost` or `eof_received`
only — so the distributor is never re-entered from inside its own `deliver` call: one still pending
is cancelled exactly once with `admission.cancel(request_id)`, one dispatched but not yet written
(waiting behind an earlier response, or delivered to a closing connection) has its ticket released
with `admission.release`. At an EOF both are answered `evicted: cancelled`, so that the requests
after them are still answered in order (docs/service.md, "A client that half-closes").

A dispatched answer's ticket counts as delivered (`admission.delivered`) only as it is handed to the
transport; the answers of one read are collected and written together (`_spill`), and written before
a client is judged a slow reader.

Timeouts use one lazily re-armed timer per connection: the hot path only stores a time stamp, the
timer is moved only when a deadline moves earlier (roughly twice per `header_timeout` under load).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any, Final, NamedTuple, cast

import httptools
import msgspec

from distributor.api import CONN_CHECK, CONN_NORMAL, CONN_RESERVE, Admission, Audit, connection_verdict, probing_most
from distributor.guards import Guards
from distributor.sockets import MIN_READ_RATE, READ_WINDOW, TCP_ESTABLISHED, dead_peer, peer_state, reset, unsent
from flowshard.types import Outcome
from flowshard.validate import (
    ADMIT_ALIASES,
    ADMIT_FIELDS,
    MAX_TICKET,
    RELEASE_FIELDS,
    AdmitBody,
    ReleaseBody,
    body_problem,
    check_admit,
    check_release_tokens,
)

if TYPE_CHECKING:
    from distributor.proxy import Exchange, Proxy
    from flowshard.config import ServiceConfig

__all__ = ["ADMIN_PATHS", "ADMIN_RESERVE", "HttpConnection", "HttpLimits", "start_http_server"]

log = logging.getLogger(__name__)


ADMIN_RESERVE: Final = 16
# What a connection of the admin reserve may ask for: the probes and the scrapes.
ADMIN_PATHS: Final = frozenset({b"/healthz", b"/readyz", b"/metrics", b"/v1/stats"})


class HttpLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Resource limits of the HTTP front: what one client may cost before it is refused or dropped."""

    max_body_bytes: int = 65536
    max_header_bytes: int = 16384  # request line + headers
    max_connections: int = 4096  # further connections get 503 and are closed (but see admin_reserve)
    # Connections beyond max_connections kept for the admin paths (ADMIN_PATHS), so that monitoring
    # still sees a service flooded with connections; a request to another path on one gets 503.
    admin_reserve: int = ADMIN_RESERVE
    header_timeout: float = 10.0  # a request's headers and body must arrive within this (slowloris)
    idle_timeout: float = 75.0  # keep-alive connection with nothing pending
    max_pipelined: int = 64  # unanswered requests per connection before reading stops
    write_high: int = 64 << 10  # unsent responses beyond this stop the reading of the client's input
    write_buffer_limit: int = 1 << 20  # a client that lets this much pile up unread is dropped
    max_linger_bytes: int = 1 << 20  # input a closing connection may still send (read and discarded)

    @classmethod
    def of_service(cls, svc: ServiceConfig) -> HttpLimits:
        """The limits the `[service]` configuration sets (in the distributor, or in an acceptor: the
        connection limits are the service's, counted by the distributor)."""
        return cls(max_body_bytes=svc.max_body_bytes, max_connections=svc.max_connections,
                   header_timeout=svc.header_timeout, idle_timeout=svc.idle_timeout)

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes", "max_header_bytes", "max_connections", "max_pipelined", "write_high",
            "write_buffer_limit", "max_linger_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")
        if self.admin_reserve < 0:
            raise ValueError("admin_reserve: must be at least 0")
        for name in ("header_timeout", "idle_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: {value} must be a positive number of seconds")


# ---------------------------------------------------------------------------------------- wire bytes

_REASONS: Final = {
    100: "Continue", 200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 413: "Content Too Large", 422: "Unprocessable Content", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    503: "Service Unavailable", 505: "HTTP Version Not Supported",
}
_JSON_CT: Final = b"content-type: application/json\r\n"
_HEAD: Final = {code: b"HTTP/1.1 %d %s\r\n" % (code, reason.encode()) + _JSON_CT for code, reason in _REASONS.items()}
_H200: Final = _HEAD[200]
_CONN_CLOSE: Final = b"connection: close\r\n"
_CONN_KEEP: Final = b"connection: keep-alive\r\n"  # only for HTTP/1.0 clients that asked for it
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

# The lengths of the header names on_header looks at: content-length, connection, expect, transfer-encoding, host.
_HEADER_LENGTHS: Final = frozenset((14, 10, 6, 17, 4))
_ABSOLUTE_FORM: Final = re.compile(rb"[hH][tT][tT][pP][sS]?://[^/?#]*")  # a request target's scheme and authority

# `_head_raw` outside a request head, and in the piece of input where the head began.
_NOT_IN_HEAD: Final = -2
_HEAD_BEGUN: Final = -1
# A read is parsed this much at a time, so that a line that never ends is counted against the head's
# limit from the piece after the one it began in, whatever came before it in the same read (a whole
# read was left out: a 40 KB header or a 100 KB chunk extension in the read that began it passed, a review)
_PIECE: Final = 4096
# A connection's share of one event-loop pass: past this much time parsing and answering one read, the
# rest of the read waits for the next pass (`HttpConnection._yield_turn`), so that one connection's pipelined
# requests cannot hold every other client: a read answered whole kept the loop 1.7 s on 20 clients
# pipelining /healthz, and a fresh /healthz waited 11.6 s behind 20 pipelining /metrics (review 168)
TURN_BUDGET: Final = 0.002
_monotonic = time.monotonic

# How a response ends the connection (a slot's `close`).
_KEEP: Final = 0
_CLOSE: Final = 1  # the client asked: close after writing
_LINGER: Final = 2  # an error: write, send FIN, drain what the client still sends, then close

# While a connection's reading is paused, how often (s) to look whether its client reset or closed its side
PEER_CHECK_EVERY: Final = 0.5


def _render(head: bytes, body: bytes, conn: bytes = b"", extra: bytes = b"", *, no_body: bool = False) -> bytes:
    """One complete response; `head` is a pre-built status line plus content type."""
    return b"%b%b%bcontent-length: %d\r\n\r\n%b" % (head, extra, conn, len(body), b"" if no_body else body)


class _Error(msgspec.Struct):
    status: int
    message: str


class _ErrorBody(msgspec.Struct):
    error: _Error


class _AuditBody(msgspec.Struct):
    """`"audit"` in an admission's answer, when it asked: see distributor.api.Audit."""

    seq: int
    shard: int
    received: float
    enqueued: float
    dispatched: float
    decided: float


class _Dispatched(msgspec.Struct, omit_defaults=True):
    outcome: str
    ticket: int
    wait_ms: float
    lease_s: float
    audit: _AuditBody | None = None


class _Refused(msgspec.Struct, omit_defaults=True):
    outcome: str
    reason: str
    wait_ms: float
    retry_after: int
    audit: _AuditBody | None = None


_encode: Final = msgspec.json.Encoder().encode
_decode_admit: Final = msgspec.json.Decoder(AdmitBody).decode
_decode_release: Final = msgspec.json.Decoder(ReleaseBody).decode

_BUSY: Final = frozenset({Outcome.REJECTED_CAPACITY, Outcome.EVICTED_TTL, Outcome.EVICTED_DISPLACED})
# Outcome -> (pre-built head, status word, reason). `evicted: cancelled` is never delivered to a live
# connection by a correct distributor; if it is, a 503 keeps the pipeline from hanging.
_REFUSALS: Final = {
    o: (_HEAD[429 if o in _BUSY else 503], o.status, o.reason) for o in Outcome if o is not Outcome.DISPATCHED
}
_DISPATCHED: Final = Outcome.DISPATCHED


def _error(status: int, message: str, conn: bytes = b"", extra: bytes = b"", *, no_body: bool = False) -> bytes:
    return _render(_HEAD[status], _encode(_ErrorBody(_Error(status, message))), conn, extra, no_body=no_body)


def _cancelled(conn: bytes) -> bytes:
    """The answer of an admission its client abandoned by sending EOF before its answer was written
    (cancelled, or its dispatch released at once): the requests after it are still answered."""
    body = _encode(_Refused(Outcome.EVICTED_CANCELLED.status, Outcome.EVICTED_CANCELLED.reason, 0.0, 1))
    return _render(_HEAD[503], body, conn, b"retry-after: 1\r\n")


_RELEASED: Final = {conn: _render(_H200, b'{"released":true}', conn) for conn in (b"", _CONN_KEEP, _CONN_CLOSE)}
# An admission read before its client's EOF and parsed after it (past the requests in progress) is
# never admitted: an error, not an outcome, since it never became a request and no counter has it (a
# review: answered `evicted: cancelled`, it made the clients' tally of outcomes exceed the metrics')
_NOT_ADMITTED: Final = {conn: _error(503, "not admitted: the client closed its side (EOF) before this request was "
                                          "handled; it never became a request", conn, b"retry-after: 1\r\n")
                        for conn in (b"", _CONN_KEEP, _CONN_CLOSE)}
_TOO_MANY: Final = _error(503, "too many connections, retry later", _CONN_CLOSE, b"retry-after: 1\r\n")


# ---------------------------------------------------------------------------------------- routing

_Handler = Callable[["HttpConnection", bytes, bytes, int, bool], None]


class _Route(NamedTuple):
    method: bytes
    allow: bytes  # the 405 `Allow` header line
    handler: _Handler


class _Stop(Exception):
    """Raised inside a parser callback to stop parsing this connection's input (an error was queued)."""


def _continue_later() -> None:
    """A marker (never called): a 100 Continue waiting in `_later` behind requests parsed before it."""


class _Parsed(NamedTuple):
    """A complete request as parsed, for its handler: kept while the pipeline is full (`_later`)."""

    url: bytes
    body: bytes
    conn: bytes
    close: int
    method: bytes
    headers: list[tuple[bytes, bytes]] | None
    http10: bool


class _Slot:
    """One request's place in the response order. `data` is None until the response is known.

    A streamed (proxied) response is written piece by piece while its slot is at the head of the
    queue; pieces that arrive while an earlier response is still pending wait in `chunks`.
    """

    __slots__ = ("chunks", "close", "conn", "data", "exchange", "rid", "ticket", "turn")

    def __init__(self, conn: bytes, close: int, data: bytes | None = None) -> None:
        self.conn = conn
        self.close = close
        self.data = data
        self.rid: int | None = None  # the admission's request id, once `admit` has returned
        self.ticket = 0  # a dispatched response's ticket: released if the slot is never written
        self.chunks: list[bytes] | None = None  # a streamed response's pieces not yet written
        self.exchange: Exchange | None = None  # proxy mode: told when the client goes away
        self.turn: asyncio.Future[None] | None = None  # proxy mode: awaited until the slot heads the queue


class HttpHub:
    """What all connections of one server share; called, it makes a connection's protocol (a
    server's factory, or an acceptor's for the connections handed to it)."""

    __slots__ = (
        "admission", "deferred", "guards", "lease", "limits", "linger", "live", "loop", "on_close", "on_lost", "open",
        "probe",
        "probing", "probing_most", "proxy",
        "reserve", "unheld_at",
    )

    def __init__(
        self, admission: Admission, limits: HttpLimits, lease: float, loop: asyncio.AbstractEventLoop, guards: Guards,
        proxy: Proxy | None = None,
    ) -> None:
        self.admission = admission
        self.guards = guards
        self.proxy = proxy  # proxy mode: the OpenAI routes
        self.limits = limits
        self.lease = float(lease)
        self.loop = loop
        self.open = 0  # connections counted against max_connections
        self.reserve = 0  # connections of the admin reserve (beyond max_connections)
        # Told of every connection's end (an acceptor reports it to the distributor, which counts the
        # connections against the limits: distributor.front)
        self.on_close: Callable[[HttpConnection], None] | None = None
        self.on_lost: Callable[[HttpConnection], None] | None = None  # its socket is closed (acceptors)
        self.live: set[HttpConnection] = set()  # every connection whose socket is open (`stop_reading`)
        self.linger = max(0.05, min(2.0, limits.header_timeout))
        # After the client's EOF: how long to wait for the reset that says answers just written to it
        # were not delivered (a round trip; the reset of a closed peer comes at once).
        self.probe = min(self.linger, 0.25)
        self.probing = 0  # connections in that wait whose place was freed at the EOF (`_free_place`)
        self.probing_most = probing_most(limits.max_connections)
        # Reading resumes once a held connection's queue drops to this (hysteresis).
        self.unheld_at = max(0, limits.max_pipelined // 2)
        # Between defer() and flush_deferred(): connections with answers ready to write, written at
        # the flush, one write per connection (an acceptor holds its writes while it reads a batch of
        # answers from the distributor: the pipelined releases of one connection go out together)
        self.deferred: list[HttpConnection] | None = None

    def defer(self) -> None:
        """Hold the connections' writes of answers delivered from now until `flush_deferred`."""
        if self.deferred is None:
            self.deferred = []

    def flush_deferred(self) -> None:
        """Write what each connection holds since `defer` (in the order they were first delivered to)."""
        held, self.deferred = self.deferred, None
        if held:
            for conn in held:
                conn._deferred = False
                try:
                    conn._flush()
                except Exception:
                    log.exception("writing held answers failed")

    def transports(self) -> list[asyncio.Transport]:
        """The open connections' transports (`sockets.let_answers_leave`)."""
        return [conn._transport for conn in self.live if conn._transport is not None]

    def stop_reading(self) -> None:
        """The service stopped (`Admission.reading` is False): every connection reads again, paused or
        not, and drops what it reads, so that its close at the exit is a FIN after its answers (input
        left unread makes it a reset, which throws away the answers its kernel still holds: review
        155, `BinaryHub.stop_reading`)."""
        for conn in self.live:
            transport = conn._transport
            if not transport.is_closing() and not transport.is_reading():
                transport.resume_reading()

    def __call__(self, verdict: int = CONN_CHECK) -> HttpConnection:
        return HttpConnection(self, verdict)


# ---------------------------------------------------------------------------------------- connection


class _NoCallbacks:
    """The protocol of `_SPENT_PARSER`: no callbacks."""


# What a closed connection keeps as its parser: its own, which refers to it, would make the two a cycle
_SPENT_PARSER = httptools.HttpRequestParser(_NoCallbacks())


class HttpConnection(asyncio.Protocol):
    """One client connection: parser callbacks, the ordered response queue, and the `Waiter` side.

    States: parsing → `_stopped` (a closing response is queued; input is discarded but read, so EOF
    is still seen) → `_closing` (close requested, nothing more is written) → `_dead` (connection
    lost; every `deliver` is a no-op).
    """

    def __init__(self, shared: HttpHub, verdict: int = CONN_CHECK) -> None:
        self._sh = shared
        self._verdict = verdict  # how it counts against the limits (distributor.api), if decided already
        self._admission = shared.admission
        self._limits = shared.limits
        self._loop = shared.loop
        # Set in connection_made, before any other callback. After abort or a read error it drops
        # writes silently until connection_lost.
        self._transport: asyncio.Transport = cast(asyncio.Transport, None)
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[_Slot] = deque()
        self._out: list[bytes] | None = None  # responses collected during one data_received
        self._out_bytes = 0  # their size
        # Tickets of the dispatched answers in `_out`: given to the transport with them (`_spill`), or,
        # if the connection is dropped first, released (never written: nobody got them).
        self._out_tickets: list[int] = []
        self._end_kind = _KEEP  # a close decided during data_received, carried out after the write
        self._stopped = False
        self._closing = False
        self._dead = False
        self._lingering = False
        self._linger_left = 0  # lingering: what was unsent at the last look, and when (`_on_timer`)
        self._linger_at = 0.0
        self._discarded = 0  # input read and thrown away since the connection began to close
        self._counted = False
        self._reserve = False  # one of the admin reserve: only ADMIN_PATHS are served on it
        self._place_freed = False  # its place was freed at the client's EOF (`_free_place`)
        self._fresh = True  # no request seen yet: header_timeout, not idle_timeout, applies
        self._held: bytearray | None = None  # input kept unparsed while max_pipelined is reached
        # Requests parsed while max_pipelined were in progress (one read holds many): handled, in order,
        # as answers drain (`_unhold`), the input after them held meanwhile
        self._later: deque[_Parsed | Callable[[], None]] = deque()
        self._replaying = False  # handling them (`_handle_later`): answers take their turn as usual
        self._replay: _Parsed | None = None  # the one `on_message_complete` handles now, if from `_later`
        self._paused = False
        # While its reading is paused: the timer that looks whether the client is still there
        # (`_check_peer`), and whether it was found gone (reading is then never paused again)
        self._watch: asyncio.TimerHandle | None = None
        self._peer_gone = False
        self._wpaused = False  # reading paused because unsent responses passed write_high
        self._wpaused_at = 0.0  # since when (loop time), while `_wpaused`
        self._wpaused_size = 0  # `unsent` then, plus what was written since (less now: what the client read)
        self._writable: asyncio.Future[None] | None = None  # proxy mode: a stream waits here while paused
        # Tickets of dispatched answers written since the client last sent anything (a request it sent
        # before an answer was written proves nothing about that answer: pipelined in the same read)
        self._sent: list[int] = []
        self._probing = False  # the client sent EOF right after answers were written: were they delivered?
        self._eof_wait = False  # the client sent EOF; answers to its earlier requests are still on their way
        self._unhold_scheduled = False
        self._deferred = False  # in the hub's `deferred`: its answers are written at the hub's flush
        self._asking = False  # a /v1/stats or /metrics render asked of the distributor, not yet answered
        self._asks: deque[tuple[str, _Slot, bytes, bool]] = deque()  # the ones waiting behind it
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._last_active = 0.0
        # the request being parsed
        self._msg_at = 0.0  # loop time its first byte arrived; 0.0 when no request is in progress
        self._header_timeout = shared.limits.header_timeout
        self._idle_timeout = shared.limits.idle_timeout
        self._head_raw = _NOT_IN_HEAD  # bytes of a still incomplete head, counted per later chunk
        self._head_bytes = 0
        self._url = bytearray()  # appended in place: a dribbled URL or chunked body costs linear time
        self._body = bytearray()
        self._clen = -1
        self._chunked = False
        self._coding = b""  # a transfer coding other than chunked (501: it is not decoded)
        self._in_body = False  # the head is complete: a header now is a trailer
        self._ka_header = False
        self._expect = False
        self._hosts = 0  # Host header lines (RFC 9112 3.2: exactly one in an HTTP/1.1 request, at most one else)
        self._body_limit = shared.limits.max_body_bytes
        self._headers: list[tuple[bytes, bytes]] | None = [] if shared.proxy is not None else None

    # ------------------------------------------------------------------ transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self._transport = transport
        sh = self._sh
        sh.live.add(self)
        now = self._loop.time()
        self._last_active = now
        verdict = self._verdict or connection_verdict(
            sh.open, sh.reserve, self._limits.max_connections, self._limits.admin_reserve
        )
        if verdict != CONN_NORMAL:
            if verdict != CONN_RESERVE:
                sh.guards.hit("http", "too_many_connections")
                self._stopped = True
                transport.write(_TOO_MANY)
                self._linger(min(self._sh.linger, 0.25))  # short: a flood of these must not pile up sockets
                return
            # Kept for /metrics, /healthz, /readyz, /v1/stats (a request elsewhere: on_headers_complete)
            sh.guards.hit("http", "admin_reserve")
            sh.reserve += 1
            self._reserve = True
        else:
            sh.open += 1
            self._counted = True
        transport.set_write_buffer_limits(high=self._limits.write_high)
        self._arm(now + self._limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        if not self._admission.reading:  # the service has stopped: nothing more is parsed (`Admission.reading`),
            return  # but it is read, so that the exit's close is a FIN after the answers, not a reset losing them
        if self._stopped or self._held is not None or self._closing:
            held = self._held
            if held is not None and not self._stopped:
                if not self._peer_gone:  # (read after it was found gone: sent before, proves nothing)
                    self._sent.clear()  # it sent more after those answers were written: it is still there
                held += data
                if (len(held) > self._limits.max_header_bytes + self._limits.max_body_bytes and not self._paused
                        and not self._peer_gone):
                    self._paused = True
                    self._pause_reading()
            else:  # stopped or closing: discarded, but read, so that EOF is seen ...
                self._discarded += len(data)
                if self._discarded > self._limits.max_linger_bytes and not self._dead:
                    # ... up to a bound: reading junk costs this process CPU for as long as it lingers.
                    # Not `_dead`: connection_lost (after the reset) still frees its place among the
                    # connections and settles what it queued.
                    self._closing = True
                    self._discarded = -(1 << 62)  # counted once
                    self._sh.guards.hit("http", "linger_overflow")
                    reset(self._transport)
            return
        if not self._peer_gone:
            self._sent.clear()  # it sent more after those answers were written: it is still there
        self._parse(data)

    def _parse(self, data: bytes | bytearray | None) -> None:
        """Parse input read from the client (now, or kept while the pipeline was full), answering what
        can be answered at once with one write at the end; None: handle the requests parsed past
        max_pipelined (`_later`) instead, as far as the pipeline has room."""
        out: list[bytes] = []
        self._out = out
        try:
            if data is None:
                self._handle_later()
            elif len(data) <= _PIECE:
                self._parser.feed_data(data)
                if self._head_raw != _NOT_IN_HEAD:  # (usually not: a request per read)
                    self._count_head(len(data))
            else:
                view = memoryview(data)
                start = _monotonic()
                for at in range(0, len(data), _PIECE):
                    piece = view[at:at + _PIECE]
                    self._parser.feed_data(piece)
                    self._count_head(len(piece))
                    if self._stopped:
                        break
                    if at + _PIECE < len(data) and _monotonic() - start > TURN_BUDGET:
                        self._yield_turn(view[at + _PIECE:])
                        break
        except httptools.HttpParserUpgrade:
            # Upgrade / CONNECT is not supported; the request itself was answered. Close after it.
            self._respond(b"", _CLOSE)
        except httptools.HttpParserError as exc:
            if not self._stopped:  # not an error we raised on purpose
                self._msg_at = 0.0
                self._sh.guards.hit("http", "malformed")
                if str(exc) == "Pause on PRI/Upgrade":  # the HTTP/2 preface, prior knowledge (review 162)
                    error = self._error_for(505, "HTTP/2 is not supported: send HTTP/1.1 or HTTP/1.0", _CONN_CLOSE)
                else:
                    error = self._error_for(400, f"malformed HTTP request: {exc}", _CONN_CLOSE)
                self._respond(error, _LINGER)
        if out or self._out_tickets:  # usually nothing: an admission's answer comes later (measured)
            self._spill()
        self._out = None
        kind = self._end_kind
        if kind:
            self._end_kind = _KEEP
            self._finish(kind)
        elif not self._queue:
            if not self._msg_at and self._last_active + self._idle_timeout < self._timer_at:
                self._idle()
        elif self._held is None and (self._later or (len(self._queue) >= self._limits.max_pipelined
                                     and not self._stopped)):
            self._held = bytearray()  # (with requests waiting, `_unhold` handles them as answers drain)

    def _count_head(self, n: int) -> None:
        """`n` bytes were parsed and a head (or a chunk-size line, or trailers) is still incomplete:
        count them against the head's limit, unless it began in them (they may also hold the end of
        what came before it: left out, so the bound is the limit plus at most one piece)."""
        raw = self._head_raw
        if raw != _NOT_IN_HEAD and not self._stopped:
            if raw == _HEAD_BEGUN:
                self._head_raw = 0
            else:
                self._head_raw = raw = raw + n
                if raw > self._limits.max_header_bytes:
                    self._fail_head()

    def eof_received(self) -> bool:
        """The client closed its side: as far as admissions go it is gone (HTTP/1.1 gives a half-close
        no meaning for pending requests), but every request it sent before is answered, in order.

        If dispatched answers were written since its last request, it may have left before they
        arrived (fire and forget): then its kernel answers them with a reset. Keep the socket for a
        round trip and look (`_on_timer`): an undelivered answer releases its ticket at once.

        Answers that are not admissions' (a release's, /v1/stats, /metrics) and are still on their
        way are written first, as in the distributor's own process, where they are known before the
        EOF is read: in an acceptor they come a hop later, and a half-closing client (`curl` with
        `--no-keepalive`-style tools, a shell's `printf | nc`) got none of them, its release applied
        unconfirmed (review, 2026-12-05). Admissions are not waited for: their client is gone; one whose
        answer is not written yet is cancelled (a dispatch released) and answered `503 evicted:
        cancelled`, as is one read but not yet parsed (kept while the pipeline was full), which is
        never admitted; so a release after it is answered too, never applied unconfirmed (review 18,
        D3: the input kept unparsed at the EOF was thrown away, and the releases after a pending
        admission were applied without an answer). A proxied request is cancelled likewise (503);
        only one whose answer is being streamed cuts the connection there."""
        if not self._dead and self._answers_on_their_way():
            self._eof_wait = True
            self._arm(self._loop.time() + self._sh.linger, force=True)  # they come in ms; give up then
            return True  # keep the transport: our side still writes
        return self._end_after_eof()

    def _end_after_eof(self) -> bool:
        self._closing = True
        if self._sent and not self._dead:
            self._probing = True
            self._free_place()
            self._arm(self._loop.time() + self._sh.probe, force=True)
            return True
        return False

    def _free_place(self) -> None:
        """The client closed its side and has every answer: its place under `max_connections` (or in
        the admin reserve) is free now, not after the wait for a reset (`probe`, 0.25 s): a client
        that closes and connects again at once, at the limit, was refused 503 (review 125: 49 of 50
        at `max_connections = 1`, 40 of 50 with acceptors). At most `probing_most` connections wait so
        beyond the limit (the descriptors asked for count them): past that a flood of them keeps its
        places until its waits end."""
        sh = self._sh
        if self._place_freed or sh.probing >= sh.probing_most:
            return
        self._place_freed = True
        sh.probing += 1
        if self._counted:
            sh.open -= 1
        elif self._reserve:
            sh.reserve -= 1
        if sh.on_close is not None:
            sh.on_close(self)  # (with acceptors: reported to the distributor, which counts the places)

    def _answers_on_their_way(self) -> bool:
        """At the client's EOF: its admissions whose answers are not written are cancelled (a dispatched
        one released) and answered `evicted: cancelled`; likewise its proxied requests, but for one
        whose answer is being streamed (at the head): the queue is cut there, settled from it on.
        Says whether an answer is still on its way, or input is kept unparsed (then the connection
        waits for them, `_answered_after_eof`)."""
        q = self._queue
        admission = self._admission
        cut = len(q)
        for k, slot in enumerate(q):
            try:
                if slot.exchange is not None:
                    if slot.data is None:
                        if k == 0 and slot.exchange.started:
                            cut = 0  # its answer may be partly written: nothing after it can be
                            break
                        sent = slot.exchange.backend is not None  # (a try on a backend began)
                        slot.exchange.client_gone()
                        slot.chunks = None
                        slot.data = self._error_for(
                            503, "the client closed its side: cancelled at the backend before its answer began"
                            if sent else "the client closed its side: not forwarded",
                            slot.conn, path=b"/v1/", code="client_closed")
                elif slot.data is None:
                    if slot.rid is not None:
                        admission.cancel(slot.rid)
                        slot.data = _cancelled(slot.conn)
                elif slot.ticket:  # dispatched, its answer not yet written (behind one still on its way)
                    self._unclaim(slot)
            except Exception:
                log.exception("settling admission %s (ticket %s) at EOF failed", slot.rid, slot.ticket)
        if cut < len(q):
            gone = [q.pop() for _ in range(len(q) - cut)]
            gone.reverse()
            self._settle(gone)
            self._held = None  # nothing after the cut can be answered: not parsed, never applied
            self._later.clear()
        elif q and q[0].data is not None:
            self._flush()  # the head is ready now
        return not self._closing and (self._held is not None or any(slot.data is None for slot in q))

    def _eof_done(self) -> None:
        """After the client's EOF: once every answer is written and no input is kept unparsed, close."""
        if self._eof_wait and not self._queue and self._held is None and not self._closing:
            self._answered_after_eof()

    def _answered_after_eof(self) -> None:
        """The last answer waited for after the client's EOF is written: close as at the EOF."""
        self._eof_wait = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf
        if not self._end_after_eof():
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._dead:
            return
        self._dead = self._closing = True
        sh = self._sh
        sh.live.discard(self)
        if dead_peer(exc):
            sh.guards.hit("http", "dead_peer")
        if sh.on_lost is not None:
            sh.on_lost(self)
        if self._place_freed:
            sh.probing -= 1
        else:
            if self._counted:
                sh.open -= 1
            elif self._reserve:
                sh.reserve -= 1
            if sh.on_close is not None:
                sh.on_close(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if exc is not None:  # reset or broken pipe: the answers written since its last request are lost
            self._release_sent()
        self._settle(self._queue)  # nothing in it was written
        self._queue.clear()
        self._held = None
        self._later.clear()  # (never admitted)
        # What a request cut short had received, freed now rather than when the cyclic GC finds this
        # connection (it and its parser refer to each other): up to a proxied body each, 16 MiB by
        # default (a review: 1.7 GB held after rounds of uploads timed out, until a collection ran)
        self._body = bytearray()
        self._url = bytearray()
        # ... and the connection itself with it: its parser holds its callbacks, so the two were left for
        # the cyclic GC's oldest generation, run every ~30 min under a steady load (review 135: ~400
        # dead connections, 2.6 MB, at each peak). No input is parsed after the connection's end.
        self._parser = _SPENT_PARSER
        self._wake_writers()

    def _settle(self, slots: Iterable[_Slot]) -> None:
        """Slots that will never be written: cancel their admissions, release their tickets, tell
        their proxied exchanges the client is gone."""
        admission = self._admission
        for slot in slots:
            try:
                if slot.exchange is not None:
                    slot.exchange.client_gone()
                elif slot.data is None:
                    if slot.rid is not None:
                        admission.cancel(slot.rid)
                elif slot.ticket:  # dispatched, its answer never written: its client never had it
                    admission.unclaim(slot.ticket)
            except Exception:
                log.exception("settling admission %s (ticket %s) failed", slot.rid, slot.ticket)

    def pause_writing(self) -> None:
        """Responses wait unsent beyond write_high: stop reading the client's input (it makes no new
        work while it does not read); past write_buffer_limit drop it (admissions get cancelled)."""
        if self._closing:
            return
        if self._transport.get_write_buffer_size() > self._limits.write_buffer_limit:
            self._drop()
            return
        if not self._wpaused:
            self._wpaused_at = self._loop.time()
            self._wpaused_size = unsent(self._transport)
            self._arm(self._wpaused_at + self._limits.header_timeout)  # judged then (`_drop_if_stuck`)
        self._wpaused = True
        if not self._paused:
            self._pause_reading()

    def resume_writing(self) -> None:
        self._wake_writers()
        if self._wpaused:
            self._wpaused = False
            if not self._paused and not self._closing:
                self._resume_reading()

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if self._wpaused:
            self._write_paused(data)
        else:
            transport.write(data)
        if transport.get_write_buffer_size() > self._limits.write_buffer_limit:
            self._drop()

    def _write_paused(self, data: bytes) -> None:
        """Write while the writing is paused: what this adds to the unsent bytes is not taken from what
        the client reads meanwhile (`_drop_if_stuck`; a client reading 3 KiB/s while a stream wrote
        2.5 KiB/s more was dropped). All of it joins `unsent` (what the kernel takes at once is not
        acknowledged yet: counted as the client's reading, it let a client that reads nothing keep its
        connection while the kernel's buffer filled)."""
        self._transport.write(data)
        self._wpaused_size += len(data)

    def _drop(self, read_nothing: bool = False) -> None:
        """The client does not read: abort (a graceful close would wait for it). The answers written
        since its last request are not delivered: their tickets are released with its pending ones.

        What the kernel took is still sent (a client that reads, cut off for letting too much wait or
        for a scrape it could not take, gets those answers, tickets included: a reset threw megabytes
        of them away, a review), unless it read nothing for `READ_WINDOW` timeouts (`read_nothing`):
        then a reset, or the kernel kept them queued for a peer told nothing (FIN-WAIT-1, a review)."""
        if self._closing and not self._probing:
            return
        self._sh.guards.hit("http", "slow_reader")
        self._closing = self._stopped = True
        self._release_sent()
        if read_nothing:
            reset(self._transport)
        else:
            self._transport.abort()

    def _release_sent(self) -> None:
        sent, self._sent = self._sent, []
        for ticket in sent:
            try:
                self._admission.release_then(ticket, -1, self._undeliverable)
            except Exception:
                log.exception("releasing undelivered ticket %s failed", ticket)

    def _undeliverable(self, ticket: int, ok: bool) -> None:
        if ok:  # counted only when the release freed the ticket (the client had not released it)
            self._sh.guards.hit("http", "undeliverable")

    # ------------------------------------------------------------------ Waiter

    def deliver(
        self, cid: Any, request_id: int, outcome: Outcome, ticket: int, wait: float, retry_after: int,
        audit: Audit | None = None,
    ) -> None:
        """The outcome of the admission in slot `cid`: fill the slot, write the head of the queue."""
        slot: _Slot = cid
        if self._dead or slot.data is not None:
            return
        extra = None if audit is None else _AuditBody(*audit)
        if outcome == _DISPATCHED:
            body = _encode(_Dispatched("dispatched", ticket, int(wait * 1e6 + 0.5) / 1000.0, self._sh.lease, extra))
            slot.data = b"%b%bcontent-length: %d\r\n\r\n%b" % (_H200, slot.conn, len(body), body)
            slot.ticket = ticket
        else:
            head, status, reason = _REFUSALS[outcome]
            body = _encode(_Refused(status, reason, int(wait * 1e6 + 0.5) / 1000.0, retry_after, extra))
            slot.data = _render(head, body, slot.conn, b"retry-after: %d\r\n" % retry_after)
        # `_filled` inlined: once per admission (measured)
        if self._closing or self._transport.is_closing():  # is_closing: uvloop dropped it on a read error
            self._closing = True  # the slot stays queued, unwritten: connection_lost settles it
        elif self._queue[0] is slot:
            held = self._sh.deferred
            if held is None:
                self._flush()
            elif not self._deferred:
                self._deferred = True
                held.append(self)

    def revoke(self, ticket: int) -> None:
        """The service takes back a dispatch whose answer has waited out its lease here, unwritten
        behind earlier answers (`Distributor._revoke`): that request is answered `evicted: cancelled`
        in its turn, and its dispatch unclaimed (its client never had the ticket). Only while an
        answer before it is still to come: one about to be written (its turn come, in a batch of
        answers written together) is left to be (review 133: an acceptor stalled past the lease had
        a lone request's answer cancelled as it arrived). Written already (with acceptors, its
        report on its way): nothing."""
        if self._closing:
            return
        behind = False
        for slot in self._queue:
            if slot.ticket == ticket and slot.data is not None:
                if behind:
                    self._unclaim(slot)
                return
            behind = behind or slot.data is None

    def _unclaim(self, slot: _Slot) -> None:
        """A dispatched answer not written yet, given back: `evicted: cancelled` in its place, the
        dispatch unclaimed (not counted as a ticket released: its client never had it)."""
        ticket, slot.ticket = slot.ticket, 0
        slot.data = _cancelled(slot.conn)
        self._admission.unclaim(ticket)

    def _filled(self, slot: _Slot) -> None:
        """`slot` has its response: write it if it heads the queue."""
        if self._closing or self._transport.is_closing():  # is_closing: uvloop dropped it on a read error
            self._closing = True  # the slot stays queued, unwritten: connection_lost settles it
        elif self._queue[0] is slot:  # `_flush_ready` inlined: once or twice per request (measured)
            held = self._sh.deferred
            if held is None:
                self._flush()
            elif not self._deferred:
                self._deferred = True
                held.append(self)

    def _flush_ready(self) -> None:
        """The head of the queue is ready: write it now, or at the hub's flush while it defers."""
        held = self._sh.deferred
        if held is None:
            self._flush()
        elif not self._deferred:
            self._deferred = True
            held.append(self)

    def fail(self, cid: Any, message: str) -> None:
        slot: _Slot = cid
        if not self._dead and slot.data is None:
            slot.data = _error(500, message, slot.conn)
            if not self._closing and self._queue and self._queue[0] is slot:
                self._flush_ready()

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        """Per-request state was reset when the previous request completed (or at start)."""
        if self._stopped:
            raise _Stop  # a closing response is queued: the rest of this input is ignored
        limits = self._limits
        if self._out_bytes > limits.write_high:
            self._spill()  # what the client has not read is what the transport could not hand on
        if self._transport.get_write_buffer_size() > limits.write_buffer_limit:
            self._drop()  # it does not read what it asked for: render nothing more for it
            raise _Stop
        self._msg_at = self._last_active = now = self._loop.time()
        self._fresh = False
        self._head_raw = _HEAD_BEGUN
        due = now + self._header_timeout
        if due < self._timer_at:
            self._arm(due)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        n = len(name)
        self._head_bytes += n + len(value) + 4
        if self._in_body:  # a chunked body's trailer: it counts against the header limit
            if self._head_bytes > self._limits.max_header_bytes:
                self._fail_head()
                raise _Stop
            return
        if self._headers is not None:
            self._headers.append((name, value))
        if n not in _HEADER_LENGTHS:  # host, content-type, ...: one test instead of four (measured)
            return
        if n == 14:
            if name.lower() == b"content-length":
                self._clen = int(value)  # llhttp has checked the digits
        elif n == 10:
            if name.lower() == b"connection":
                self._ka_header = b"keep-alive" in value.lower()
        elif n == 6 and name.lower() == b"expect":
            self._expect = value.lower() == b"100-continue"
        elif n == 4 and name.lower() == b"host":
            self._hosts += 1
        elif n == 17 and name.lower() == b"transfer-encoding":
            self._chunked = True  # llhttp accepts a request's Transfer-Encoding only when it ends in chunked
            if value.strip().lower() != b"chunked":  # ... but a coding before it would go undecoded
                self._coding = value

    def on_headers_complete(self) -> None:
        self._head_raw = _NOT_IN_HEAD
        limits = self._limits
        if self._head_bytes > limits.max_header_bytes:
            self._fail_head()  # before _in_body is set: these are headers, not trailers
            raise _Stop
        hosts, self._hosts = self._hosts, 0
        version = self._parser.get_http_version()
        if version != "1.1" and version != "1.0":
            # llhttp takes a line without a version for HTTP/0.9 and accepts HTTP/2.0 (a review: the
            # first was told it lacked a Host header, the second served as HTTP/1.1); RFC 9110 15.6.6
            self._msg_at = 0.0
            self._sh.guards.hit("http", "malformed")
            self._respond(self._error_for(505, f"HTTP/{version} is not supported: send HTTP/1.1 or HTTP/1.0",
                                          _CONN_CLOSE), _LINGER)
            raise _Stop
        if hosts != 1 and (hosts or version != "1.0"):
            # RFC 9112 3.2: a 400 for an HTTP/1.1 request without Host and any request with two (a
            # review: both were served, and forwarded to a backend in proxy mode)
            self._msg_at = 0.0
            self._sh.guards.hit("http", "malformed")
            message = "more than one Host header" if hosts else "an HTTP/1.1 request must have a Host header"
            self._respond(self._error_for(400, message, _CONN_CLOSE, no_body=self._parser.get_method() == b"HEAD"),
                          _LINGER)
            raise _Stop
        url = self._url
        if url[:1] != b"/":
            absolute = _ABSOLUTE_FORM.match(url)
            if absolute is not None:  # RFC 9112 3.2.2: a server must accept it; the path is what follows
                # the authority (a review: `POST http://x/v1/chat/completions` was a 404)
                del url[:absolute.end()]
                if url[:1] != b"/":
                    url[0:0] = b"/"
        if self._reserve:
            q = self._url.find(b"?")
            path = bytes(self._url if q < 0 else self._url[:q])
            if path not in ADMIN_PATHS:
                # An admin-reserve connection asks for real work: refused as over max_connections
                # would have been, before its body is read.
                self._msg_at = 0.0
                self._sh.guards.hit("http", "too_many_connections")
                too_many = _TOO_MANY if self._sh.proxy is None else self._error_for(
                    503, "too many connections, retry later", _CONN_CLOSE, b"retry-after: 1\r\n", path=path)
                self._respond(too_many, _LINGER)
                raise _Stop
        if self._coding:  # RFC 9112 6.1: a coding the server does not understand is a 501
            self._msg_at = 0.0
            self._sh.guards.hit("http", "malformed")
            coding = self._coding.decode("latin-1")[:100]
            self._respond(self._error_for(501, f"transfer-encoding: {coding!r}: only chunked is supported",
                                          _CONN_CLOSE), _LINGER)
            raise _Stop
        if (self._clen > 0 or self._chunked) and self._parser.should_upgrade():
            # llhttp takes what follows an upgrade's head for the new protocol, so the body would be lost
            # and the request answered as if it had none (a review: a misleading "the body is empty").
            # Without a body the request is served and the connection closed after it, as before.
            self._msg_at = 0.0
            self._sh.guards.hit("http", "malformed")
            self._respond(self._error_for(400, "connection: upgrade is not supported on a request with a body; "
                                          "send it without (curl: --http1.1, not --http2)", _CONN_CLOSE), _LINGER)
            raise _Stop
        self._in_body = True
        if self._chunked:  # its first chunk-size line is counted as a head is, until a chunk's data comes:
            self._head_raw = _HEAD_BEGUN  # (a line that never ends, an extension, was not: 30 MB read, a review)
        proxy = self._sh.proxy
        if proxy is not None:
            q = self._url.find(b"?")
            self._body_limit = proxy.body_limit(bytes(self._url if q < 0 else self._url[:q])) or limits.max_body_bytes
        if self._clen > self._body_limit:
            self._msg_at = 0.0
            self._sh.guards.hit("http", "body_too_large")
            message = f"body of {self._clen} bytes is over the limit of {self._body_limit}"
            self._respond(self._error_for(413, message, _CONN_CLOSE), _LINGER)
            raise _Stop
        if self._expect and (self._clen > 0 or self._chunked):
            # An interim response: in its turn like a final one, never before an earlier request's answer
            # (behind requests waiting in `_later`, it waits there too: `_handle_later`)
            if self._later:
                self._later.append(_continue_later)
            else:
                self._respond(_CONTINUE, _KEEP)

    def on_chunk_header(self) -> None:
        """A chunk's size line: if it was the last one (size 0), trailers follow. Count the raw bytes
        from here on, as for an incomplete head, so that a never-ending trailer line is bounded too (and
        the next size line, whose extension could be as long)."""
        self._head_raw = _HEAD_BEGUN

    def on_chunk_complete(self) -> None:
        """A chunk's data ended: the next chunk-size line begins (its extension is bounded like a head)."""
        self._head_raw = _HEAD_BEGUN

    def on_body(self, chunk: bytes) -> None:
        self._head_raw = _NOT_IN_HEAD  # the chunk had data: not the last one
        self._body += chunk
        if len(self._body) > self._body_limit:  # chunked: no Content-Length to check up front
            self._msg_at = 0.0
            self._sh.guards.hit("http", "body_too_large")
            message = f"body over the limit of {self._body_limit} bytes"
            self._respond(self._error_for(413, message, _CONN_CLOSE), _LINGER)
            raise _Stop

    def on_message_complete(self) -> None:
        """A request is complete: route it to its handler (or answer it: 404, 405, an error). Also how a
        request kept in `_later` is handled (`_handle_later` sets `_replay`): one function, not a call
        more per request (measured)."""
        replay = self._replay
        if replay is None:
            self._msg_at = 0.0
            self._head_raw = _NOT_IN_HEAD
            self._in_body = False
            if self._parser.should_keep_alive():
                conn, close = (_CONN_KEEP if self._ka_header else b""), _KEEP
            else:
                conn, close = _CONN_CLOSE, _CLOSE
            url = bytes(self._url)
            body = bytes(self._body)
            self._url.clear()  # ready for the next request
            self._body.clear()
            self._head_bytes = 0
            self._clen = -1
            self._chunked = self._ka_header = self._expect = False
            self._coding = b""
            method = self._parser.get_method()
            headers = self._headers
            http10 = False  # (read for proxy mode only, where `headers` are kept)
            if headers is not None:
                self._headers = []
                http10 = self._parser.get_http_version() == "1.0"
            if self._later or (len(self._queue) >= self._limits.max_pipelined and not self._stopped):
                # max_pipelined requests in progress: this one waits, parsed, for the answers to drain (a
                # read is handled whole: one of 455 KB put 1,211 admissions in progress at once, a review)
                self._later.append(_Parsed(url, body, conn, close, method, headers, http10))
                if close:  # (nothing after it is parsed, as once it is handled: `on_message_begin`)
                    self._stopped = True
                return
        else:
            self._replay = None
            url, body, conn, close, method, headers, http10 = replay
        route = _ROUTES.get(url)  # the usual URL has no query string: no search for one (measured)
        if route is None:
            q = url.find(b"?")
            path = url if q < 0 else url[:q]
            route = _ROUTES.get(path)
        else:
            q, path = -1, url
        head = method == b"HEAD"
        if headers is not None:
            proxy = self._sh.proxy
            assert proxy is not None
            if route is None and (path in proxy.routes or proxy.serves(path)):
                if self._eof_wait:  # read before the client's EOF, parsed after it: not forwarded
                    self._respond(self._error_for(503, "the client closed its side: not forwarded", conn,
                                                  path=path, code="client_closed"), close)
                    return
                try:
                    proxy.handle(self, method, path, headers, body, conn, close, b"" if q < 0 else url[q:], http10)
                except Exception as exc:
                    log.exception("proxy handler for %s failed", path[:200])
                    self._respond(self._error_for(500, f"internal error: {type(exc).__name__}", conn, path=path), close)
                return
        if route is None:
            message = f"no such path: {url.decode('latin-1')[:200]}"
            self._respond(self._error_for(404, message, conn, no_body=head, path=path), close)
            return
        if method != route.method and not (head and route.method == b"GET"):
            message = f"method {method.decode('latin-1')} not allowed"
            self._respond(_error(405, message, conn, route.allow, no_body=head), close)
            return
        try:
            route.handler(self, body, conn, close, head)
        except Exception as exc:
            log.exception("HTTP handler for %s failed", url[:200])
            self._respond(_error(500, f"internal error: {type(exc).__name__}", conn), close)

    def _handle_later(self) -> None:
        """Handle the requests waiting in `_later`, in order, as far as the pipeline has room (an error
        answer found parsing after them waits there too: `_respond`)."""
        later = self._later
        self._replaying = True
        try:
            while later and len(self._queue) < self._limits.max_pipelined and not self._closing:
                item = later.popleft()
                if isinstance(item, _Parsed):
                    self._replay = item
                    self.on_message_complete()
                elif item is _continue_later:
                    # its request's 100 Continue: sent unless the request is complete already (its body came
                    # without it, and waits here too: then the 100 is no longer awaited)
                    if not any(isinstance(rest, _Parsed) for rest in later):
                        self._respond(_CONTINUE, _KEEP)
                else:
                    item()
        finally:
            self._replaying = False
            self._replay = None

    # ------------------------------------------------------------------ route handlers

    def _h_admit(self, body: bytes, conn: bytes, close: int, head: bool) -> None:
        try:
            a = _decode_admit(body)
        except (msgspec.DecodeError, RecursionError) as exc:  # malformed JSON, wrong types, unknown or missing fields
            why = body_problem(exc, body, ADMIT_FIELDS, aliases=ADMIT_ALIASES)
            self._respond(_error(400, f"invalid admit body: {why}", conn), close)
            return
        problem = check_admit(a.flow, a.priority, a.bytes, a.ttl, a.slo, a.tokens, a.weight)
        if problem is not None:
            self._respond(_error(422, problem, conn), close)
            return
        if self._eof_wait:  # read before the client's EOF, parsed after it: its client is gone
            self._respond(_NOT_ADMITTED[conn], close)
            return
        slot = _Slot(conn, close)  # `_open` inlined, here and in _h_release (measured)
        if close:
            self._stopped = True
        self._queue.append(slot)
        try:
            slot.rid = self._admission.admit(
                self, slot, a.flow, a.priority, a.bytes, a.ttl, a.slo, a.tokens, a.weight, True, a.audit,
            )
        except Exception as exc:
            log.exception("admission.admit failed")
            if slot.data is None:
                slot.data = _error(500, f"internal error: {type(exc).__name__}", slot.conn)
                if self._queue[0] is slot:
                    self._flush()

    def _h_release(self, body: bytes, conn: bytes, close: int, head: bool) -> None:
        try:
            r = _decode_release(body)
        except (msgspec.DecodeError, RecursionError) as exc:
            self._respond(_error(400, f"invalid release body: {body_problem(exc, body, RELEASE_FIELDS)}", conn), close)
            return
        problem = check_release_tokens(r.tokens)
        if problem is not None:
            self._respond(_error(422, problem, conn), close)
            return
        if not 0 < r.ticket <= MAX_TICKET:  # names no ticket (and an acceptor's link carries 64 bits only)
            self._respond(_error(404, f"ticket {r.ticket} is unknown or already released", conn), close)
            return
        slot = _Slot(conn, close)
        if close:
            self._stopped = True
        self._queue.append(slot)

        def answered(ticket: int, ok: bool) -> None:
            if self._dead or slot.data is not None:
                return
            if ok:
                slot.data = _RELEASED.get(conn) or _render(_H200, b'{"released":true}', conn)
            else:
                slot.data = _error(404, f"ticket {ticket} is unknown or already released", conn)
            self._filled(slot)

        def failed(message: str) -> None:  # (from an acceptor: the distributor raised on it)
            if not self._dead and slot.data is None:
                self.slot_respond(slot, _error(500, message, conn))

        try:
            self._admission.release_then(r.ticket, -1 if r.tokens is None else r.tokens, answered, failed)
        except Exception as exc:
            log.exception("release failed")
            failed(f"internal error: {type(exc).__name__}")

    def _not_reading(self) -> bool:
        """An expensive answer (stats, metrics) for a client that has not read write_high bytes of
        earlier answers: drop it instead of rendering (pipelined scrapes must not stall the loop)."""
        self._spill()  # the answers before it first: a client that reads takes them (review 18, D1)
        if self._closing or self._transport.get_write_buffer_size() > self._limits.write_high:
            self._drop()
            return True
        return False

    def _h_stats(self, body: bytes, conn: bytes, close: int, head: bool) -> None:
        if not self._not_reading():
            self._ask("stats", conn, close, head)

    def _h_metrics(self, body: bytes, conn: bytes, close: int, head: bool) -> None:
        if not self._not_reading():
            self._ask("metrics", conn, close, head)

    def _ask(self, what: str, conn: bytes, close: int, head: bool) -> None:
        """GET /v1/stats or /metrics: rendered by the distributor (in this process, or over an
        acceptor's link, when its answer keeps its place in the response order). An empty content
        type says the rendering failed (the body names the exception).

        One render per connection at a time: from an acceptor, the answer comes a hop later, and a
        client pipelining scrapes without reading had the distributor render every one it sent
        before its unread answers could be judged (~12 MiB of the distributor's memory per such
        client). The next is asked once the last is answered, after the same check as at parsing."""
        slot = self.slot_open(conn, close)
        if self._asking:
            self._asks.append((what, slot, conn, head))
        else:
            self._ask_now(what, slot, conn, head)

    def _ask_now(self, what: str, slot: _Slot, conn: bytes, head: bool) -> None:
        self._asking = True

        def answered(payload: bytes, ctype: str) -> None:
            if not ctype:
                self.slot_respond(slot, _error(500, f"internal error: {payload.decode('utf-8', 'replace')}", conn))
            else:
                status = b"HTTP/1.1 200 OK\r\ncontent-type: %b\r\n" % ctype.encode("latin-1")
                self.slot_respond(slot, _render(status, payload, conn, no_body=head))
            # Still asking till the next loop pass, so the next is rendered then: one render per connection
            # per pass (rendered in this process, each pipelined one came at once, in the same pass: 360
            # /metrics a pass for one client, every other client waiting; review 168)
            self._loop.call_soon(self._next_ask)

        try:
            self._admission.query(what, answered)
        except Exception as exc:
            log.exception("rendering %s failed", what)
            answered(type(exc).__name__.encode(), "")

    def _next_ask(self) -> None:
        """The next /v1/stats or /metrics asked on this connection (`_ask`), if it is still read."""
        self._asking = False
        if not self._asks:
            return
        if self._dead or self._closing:
            self._asks.clear()  # gone or going: its slots end with the connection
        elif self._transport.get_write_buffer_size() > self._limits.write_high:
            self._asks.clear()  # not reading: dropped, as at parsing (its slots end with it)
            self._drop()
        else:
            self._ask_now(*self._asks.popleft())

    def _h_healthz(self, body: bytes, conn: bytes, close: int, head: bool) -> None:
        self._respond(_render(_H200, b'{"status":"ok"}', conn, no_body=head), close)

    def _h_readyz(self, body: bytes, conn: bytes, close: int, head: bool) -> None:
        if self._admission.ready:
            self._respond(_render(_H200, b'{"ready":true}', conn, no_body=head), close)
        else:
            self._respond(_render(_HEAD[503], b'{"ready":false}', conn, no_body=head), close)

    # ------------------------------------------------------------------ proxy mode: slots it fills

    def slot_open(self, conn: bytes, close: int) -> _Slot:
        """A place in the response order for a proxied request, answered later through the slot_* calls."""
        slot = self._open(conn, close)
        slot.chunks = []
        return slot

    def _open(self, conn: bytes, close: int) -> _Slot:
        """A place in the response order for the request just parsed, its answer to come later."""
        slot = _Slot(conn, close)
        if close:
            self._stopped = True
        self._queue.append(slot)
        return slot

    def slot_respond(self, slot: _Slot, data: bytes) -> None:
        """The slot's complete response."""
        self.slot_end(slot, data)

    def slot_turn(self, slot: _Slot) -> asyncio.Future[None] | None:
        """None if `slot` heads the queue (what it writes goes out as it comes, with backpressure);
        else a future done when it does (`_flush`; if the client goes first, `_settle` cancels the
        request's task that awaits it). A large answer written
        before its turn would be kept whole and written at once then (a review: past
        write_buffer_limit, a client reading at full speed was dropped)."""
        if self._dead or (self._queue and self._queue[0] is slot and not self._closing):
            return None
        if slot.turn is None:  # (closing after an answer ahead of it, a 1.0 stream's: the turn never comes,
            # the close ends its task; a review: given it, a stream was read whole while the close went on)
            slot.turn = self._loop.create_future()
        return slot.turn

    def slot_write(self, slot: _Slot, data: bytes) -> asyncio.Future[None] | None:
        """A piece of a streamed response: written now if the slot is at the head, else kept.

        Returns None, or — while the client has write_high bytes unread — a future to await before
        the next piece, so a slow reader slows the stream (and the backend) instead of being dropped
        at write_buffer_limit."""
        if self._dead or slot.data is not None:
            return None
        if self._queue and self._queue[0] is slot and not self._closing and self._out is None:
            self._write(data)
        else:
            assert slot.chunks is not None
            slot.chunks.append(data)
        if not self._wpaused or self._closing:
            return None
        if self._writable is None:
            self._writable = self._loop.create_future()
        return self._writable

    def _wake_writers(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    def write_buffered(self) -> int:
        """Bytes written to the connection that its transport has not yet handed to the kernel."""
        return 0 if self._dead else self._transport.get_write_buffer_size()

    def slot_end(self, slot: _Slot, tail: bytes = b"", *, close: bool = False) -> None:
        """The last piece of the slot's response; the responses queued behind it may follow, or with
        `close` the connection is closed once it is written (the service is shutting down)."""
        if self._dead or slot.data is not None:
            return
        if close:
            slot.close = max(slot.close, _CLOSE)
            self._stopped = True
        chunks = slot.chunks
        slot.data = b"".join(chunks) + tail if chunks else tail
        slot.chunks = None
        self._filled(slot)

    # ------------------------------------------------------------------ response queue

    def _respond(self, data: bytes, close: int) -> None:
        """Answer the request just parsed: now if nothing is ahead of it, else in its turn (after the
        requests parsed before it and waiting in `_later`: it waits there too)."""
        if close:
            self._stopped = True
        if self._later and not self._replaying:
            self._later.append(partial(self._respond, data, close))
            return
        if self._queue:
            self._queue.append(_Slot(b"", close, data))
            return
        if data:
            self._emit(data)
        if close:
            self._finish(close)

    def _emit(self, data: bytes) -> None:
        out = self._out
        if out is not None:
            out.append(data)
            self._out_bytes += len(data)
        elif not self._closing:
            self._write(data)

    def _spill(self) -> None:
        """Hand the answers collected during this parse (`_out`) to the transport now, in order; or,
        once the connection is dropped, release the tickets among them: they were never written, and a
        ticket nobody got would hold the budget until its lease (review 18, D1)."""
        out = self._out
        tickets = self._out_tickets
        if out is None or not (out or tickets):
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_bytes = 0
        self._out_tickets = []
        if self._closing or self._transport.is_closing():
            for ticket in tickets:
                try:
                    self._admission.release_then(ticket, -1, self._undeliverable)
                except Exception:
                    log.exception("releasing unwritten ticket %s failed", ticket)
            return
        for ticket in tickets:
            self._admission.delivered(ticket)  # right before the write (distributor.deliverylog)
        self._sent.extend(tickets)
        if data:
            self._write(data)

    def _flush(self) -> None:
        """Write every ready response at the head of the queue, in order. Not once closing: what is
        still queued then was never written, and connection_lost settles it."""
        if self._closing:
            return
        q = self._queue
        out = self._out
        batch: list[bytes] = out if out is not None else []
        close = _KEEP
        while q:
            slot = q[0]
            data = slot.data
            if data is None:
                if slot.chunks:  # a streamed response reached the head: what it has so far, the rest follows
                    batch.extend(slot.chunks)
                    slot.chunks.clear()
                break
            q.popleft()
            if data:
                batch.append(data)
                if out is not None:
                    self._out_bytes += len(data)
                if slot.ticket:
                    if out is not None:
                        self._out_tickets.append(slot.ticket)  # delivered when `_spill` writes them
                    else:
                        self._sent.append(slot.ticket)
                        self._admission.delivered(slot.ticket)
            if data is _CONTINUE and not q:  # its request is still in progress: it waited for us till now
                self._msg_at = now = self._loop.time()
                self._arm(now + self._header_timeout)
            if slot.close:
                close = slot.close
                break
        if q and q[0].turn is not None and not close:  # its relay waits for its turn: it has it (not behind
            # a closing answer: it never comes; the close ends its task. A review: behind an HTTP/1.0
            # stream, a pipelined one was read whole into memory while the connection closed)
            turn, q[0].turn = q[0].turn, None
            if not turn.done():
                turn.set_result(None)
        if out is None:
            if batch:  # `_write` inlined, and `_idle` below: this runs once per request (measured)
                transport = self._transport
                data = batch[0] if len(batch) == 1 else b"".join(batch)
                if self._wpaused:
                    self._write_paused(data)
                else:
                    transport.write(data)
                if transport.get_write_buffer_size() > self._limits.write_buffer_limit:
                    self._drop()
                if self._eof_wait and not close:  # progress: the give-up time runs from the last answer
                    self._arm(self._loop.time() + self._sh.linger, force=True)
            if self._eof_wait and not q and self._held is None and not self._closing:
                self._answered_after_eof()
                return
            if not q and not self._msg_at and not self._stopped:
                self._last_active = now = self._loop.time()
                due = now + self._idle_timeout
                if due < self._timer_at:
                    self._arm(due)
        if close:
            self._finish(close)
        elif self._held is not None and len(q) <= self._sh.unheld_at and not self._unhold_scheduled:
            # Not inline: this may run inside the distributor's deliver, which must not be re-entered.
            self._unhold_scheduled = True
            self._loop.call_soon(self._unhold)

    def _yield_turn(self, rest: memoryview) -> None:
        """This read has had its share of the loop pass (`TURN_BUDGET`): the rest of it is kept unparsed,
        as while the pipeline is full (what is read meanwhile joins it, up to the same bound), and parsed
        in the next pass (`_unhold`). Reading is not paused for it: paused, a client's half-close was
        taken for its leaving (`_check_peer`) and its answers cut short (a review)."""
        self._held = bytearray(rest)
        if not self._unhold_scheduled:
            self._unhold_scheduled = True
            self._loop.call_soon(self._unhold)

    def _unhold(self) -> None:
        """Parse the input kept while the pipeline was full, and read again."""
        self._unhold_scheduled = False
        held = self._held
        if held is None or self._closing or not self._admission.reading:  # (stopped: kept unread, `Admission.reading`)
            return
        if self._later:
            self._parse(None)  # the requests parsed past max_pipelined first, in order
            if self._later or self._held is None or self._closing:  # (still full; or cut at the EOF)
                return
        self._held = None
        if self._paused:
            self._paused = False
            self._resume_reading()
        if self._msg_at:  # a request cut short by the hold: the wait was ours, its time starts again
            self._msg_at = self._loop.time()
        if held:
            self._parse(held)  # not `data_received`: read before the answers written since (not copied:
            # nothing else refers to it now, and a long one was copied again at every yield, a review)
        self._eof_done()

    def _finish(self, kind: int) -> None:
        """End the connection after what has been written; deferred to the end of data_received."""
        if self._out is not None:
            self._end_kind = max(self._end_kind, kind)
            return
        if self._closing:
            return
        if self._eof_wait:  # the client's EOF came first: close as after it (nothing more is read)
            self._answered_after_eof()
            return
        if kind == _LINGER:
            self._linger(self._sh.linger)
        else:
            self._close()

    def _close(self) -> None:
        """Close after what has been written: FIN now, the socket closed when the client closes its
        side or after the linger time, reset then if it has not read everything (`_close_now`)."""
        self._linger(self._sh.linger)

    def _close_now(self) -> None:
        """Close; if the client has not taken what was written (it does not read), reset rather than
        leave it queued in the kernel for as long as it does not read."""
        transport = self._transport
        if unsent(transport):
            self._sh.guards.hit("http", "close_timeout")
            reset(transport)
        else:
            transport.close()

    def _linger(self, seconds: float) -> None:
        """Send FIN after the error response and drain the client's input for a moment: closing
        with unread input would reset the connection and could destroy the response in flight."""
        transport = self._transport
        self._closing = self._lingering = True
        if self._paused:
            self._paused = False
            self._resume_reading()
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._linger_left, self._linger_at = unsent(transport), self._loop.time()
        self._arm(self._linger_at + seconds, force=True)

    def _error_for(self, status: int, message: str, conn: bytes = b"", extra: bytes = b"", *,
                   no_body: bool = False, path: bytes | None = None, code: str | None = None) -> bytes:
        """An error of this layer for the request being parsed (`path`: else from its URL so far). In
        proxy mode a path under /v1/ that is not one of ours is an OpenAI one: the error is OpenAI-shaped
        (`Proxy.http_error`), so an OpenAI client can read it; same status, headers, connection handling.
        Only on error paths: the routes' hot paths never call it."""
        proxy = self._sh.proxy
        if proxy is not None:
            if path is None:
                q = self._url.find(b"?")
                path = bytes(self._url if q < 0 else self._url[:q])
            if path.startswith(b"/v1/") and path not in _ROUTES:
                return proxy.http_error(status, message, conn, extra, no_body=no_body, code=code)
        return _error(status, message, conn, extra, no_body=no_body)

    def _fail_head(self) -> None:
        self._msg_at = 0.0
        self._head_raw = _NOT_IN_HEAD
        if self._in_body:
            self._sh.guards.hit("http", "trailers_too_large")
            message = f"request line, headers and trailers exceed {self._limits.max_header_bytes} bytes"
        else:
            self._sh.guards.hit("http", "headers_too_large")
            message = f"request line and headers exceed {self._limits.max_header_bytes} bytes"
        self._respond(self._error_for(431, message, _CONN_CLOSE), _LINGER)

    def _pause_reading(self) -> None:
        transport = self._transport
        if not transport.is_closing() and not self._peer_gone and self._admission.reading:
            transport.pause_reading()
            if self._watch is None:
                self._watch = self._loop.call_later(PEER_CHECK_EVERY, self._check_peer)

    def _check_peer(self) -> None:
        """Its reading is paused, so a reset or an EOF from the client goes unseen until it is read
        again; with nothing to write meanwhile (its answers wait behind an admission still queued) its
        admissions stayed queued until their TTL, every other client waiting (a review: a client
        pipelined 5,000 admissions without reading, then reset). The kernel knows: while paused, look
        every `PEER_CHECK_EVERY`, and once the client is gone read again, so that the reset or the EOF
        takes its usual path."""
        self._watch = None
        transport = self._transport
        if self._dead or transport.is_closing() or transport.is_reading():
            return
        peer = peer_state(transport)
        if peer is None or peer == TCP_ESTABLISHED:
            self._watch = self._loop.call_later(PEER_CHECK_EVERY, self._check_peer)
            return
        self._peer_gone = True  # (what it reads from now on it sent before: proves nothing about its answers)
        self._paused = False
        transport.resume_reading()

    def _resume_reading(self) -> None:
        if not self._wpaused and not self._transport.is_closing():
            self._transport.resume_reading()

    # ------------------------------------------------------------------ timer

    def _idle(self) -> None:
        """Nothing pending nor in progress: make sure the timer fires by the idle deadline (it fires
        later only when idle_timeout < header_timeout; otherwise this is a no-op)."""
        due = self._last_active + self._idle_timeout
        if due < self._timer_at:
            self._arm(due)

    def _arm(self, at: float, *, force: bool = False) -> None:
        if self._timer is not None:
            if not force and self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        """Fires at the earliest deadline it was armed for; re-arms for the one that is now due."""
        self._timer = None
        self._timer_at = math.inf
        if self._dead:
            return
        if self._eof_wait:
            # The answers the client's EOF waited for did not come (none for `linger` seconds; the
            # distributor is stuck): what remains is lost, the input kept unparsed is never applied.
            # Reset, not FIN, so that the client sees the cut (counted close_timeout).
            self._eof_wait = False
            self._closing = True
            self._held = None
            self._sh.guards.hit("http", "close_timeout")
            self._probe()  # as a closing connection does: answers its kernel refused are undelivered
            reset(self._transport)
            return
        if self._closing:
            if self._probing:
                self._probing = False
                self._probe()
                if unsent(self._transport):  # still taking its answers: as a closing connection, until the
                    self._linger(max(0.0, self._sh.linger - self._sh.probe))  # linger ends (review 158:
                else:  # reset at once, a client reading 30,000 answers slowly lost thousands)
                    self._close_now()
            elif self._lingering:
                # A client still taking its answers (`MIN_READ_RATE` over `READ_WINDOW` lingers, as an open
                # connection's slow reader is judged: its kernel acknowledges in steps, 6 KiB every 2.4 s
                # for one reading 2.5 KiB/s through a 4 KiB buffer, review 159) lingers on (review 158: a
                # half-closed client reading 3,000 answers at 500 KB/s was reset at 2 s, 753 taken)
                left, now = unsent(self._transport), self._loop.time()
                if left and self._linger_left - left >= MIN_READ_RATE * (now - self._linger_at):
                    self._linger_left, self._linger_at = left, now
                    self._arm(now + self._sh.linger, force=True)
                elif left and now - self._linger_at < READ_WINDOW * self._sh.linger:
                    self._arm(now + self._sh.linger, force=True)
                else:
                    self._close_now()
            return
        limits = self._limits
        now = self._loop.time()
        # Held input, or a 100 Continue queued behind earlier answers: the request waits on us.
        if self._msg_at and self._held is None and not (self._queue and self._queue[-1].data is _CONTINUE):
            due = self._msg_at + limits.header_timeout
            if now >= due and self._wpaused:  # its request waits on our reading, paused for its unread answers
                self._drop_if_stuck(now)
            elif now >= due:
                self._msg_at = 0.0
                self._head_raw = _NOT_IN_HEAD
                self._sh.guards.hit("http", "header_timeout")
                message = f"request not received within {limits.header_timeout:g} s"
                self._respond(self._error_for(408, message, _CONN_CLOSE), _LINGER)
            else:
                self._arm(due)
        elif self._wpaused and self._queue:
            # An answer in progress (a proxied stream or large body) waits on the client's reading:
            # judged as a slow reader (a review: a stream's client that stopped reading held its
            # request's budget until it closed, the relay waiting on it with no timeout)
            self._drop_if_stuck(now)
        elif self._queue or self._held is not None or self._stopped:
            self._arm(now + limits.idle_timeout)  # waiting on the distributor, not on the client
        else:
            due = self._last_active + (limits.header_timeout if self._fresh else limits.idle_timeout)
            if now >= due and self._wpaused:  # idle with its answers unread
                self._drop_if_stuck(now)
            elif now >= due:
                if self._fresh:  # it sent nothing at all: counted (an idle keep-alive closing is not)
                    self._sh.guards.hit("http", "silent_connection")
                self._closing = True
                self._close_now()
            else:
                self._arm(due)

    def _drop_if_stuck(self, now: float) -> None:
        """Its answers wait unread (the writing is paused): a slow reader, dropped as past
        write_buffer_limit, once they have waited so for `READ_WINDOW` header_timeouts. One that reads,
        if slowly (a long stream), resumes the writing meanwhile, and the timer then finds it so (a
        408, or idle); one that acknowledged `MIN_READ_RATE` a second or more since it was last judged
        is judged again from now (a review: a stream's client reading 3 KB/s was dropped, its pauses
        longer than header_timeout)."""
        size = unsent(self._transport)
        if self._wpaused_size - size >= MIN_READ_RATE * (now - self._wpaused_at):
            self._wpaused_size, self._wpaused_at = size, now
        stuck = self._wpaused_at + READ_WINDOW * self._limits.header_timeout
        if now >= stuck:
            self._drop(read_nothing=True)
        else:  # (looked at again each timeout: its request's own deadline, once it reads again)
            self._arm(min(stuck, now + self._limits.header_timeout))

    def _probe(self) -> None:
        """After the client's EOF: a pending socket error (its kernel reset the connection when our
        answers reached a socket it had closed, or one it closed without reading) means the answers
        written since its last request were not delivered: release their tickets."""
        try:
            err = self._transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except (OSError, AttributeError):
            err = errno.ECONNRESET  # the socket is gone already: so is the client
        if err:
            self._release_sent()


_ROUTES: Final[dict[bytes, _Route]] = {
    b"/v1/admit": _Route(b"POST", b"allow: POST\r\n", HttpConnection._h_admit),
    b"/v1/release": _Route(b"POST", b"allow: POST\r\n", HttpConnection._h_release),
    b"/v1/stats": _Route(b"GET", b"allow: GET, HEAD\r\n", HttpConnection._h_stats),
    b"/metrics": _Route(b"GET", b"allow: GET, HEAD\r\n", HttpConnection._h_metrics),
    b"/healthz": _Route(b"GET", b"allow: GET, HEAD\r\n", HttpConnection._h_healthz),
    b"/readyz": _Route(b"GET", b"allow: GET, HEAD\r\n", HttpConnection._h_readyz),
}


def listen_backlog(max_connections: int) -> int:
    """The HTTP listening socket's accept queue: room for a burst of max_connections, within bounds."""
    return min(4096, max(128, max_connections))


async def start_http_server(
    admission: Admission, host: str, port: int, limits: HttpLimits, *, lease: float, guards: Guards | None = None,
    proxy: Proxy | None = None, hubs: list[Any] | None = None,
) -> asyncio.Server:
    """Listen on (host, port) (port 0: any; read it from `server.sockets`). `lease` is reported to
    clients as `lease_s`: a dispatched ticket is released after it unless released earlier.
    `proxy`: also serve the OpenAI routes (proxy mode). The server's hub is added to `hubs` (the
    service stops their reading at its exit: `HttpHub.stop_reading`)."""
    loop = asyncio.get_running_loop()
    shared = HttpHub(admission, limits, lease, loop, guards if guards is not None else Guards(), proxy)
    if hubs is not None:
        hubs.append(shared)
    return await loop.create_server(
        shared, host, port, backlog=listen_backlog(limits.max_connections)
    )
