"""The public binary protocol: many admissions in flight on one TCP connection (DESIGN §7, §8).

Next to HTTP/JSON this front exists for throughput: a client pipelines admissions on one connection,
each carrying its own correlation id, and the replies produced in one event-loop pass leave in one
`transport.write` (per-frame writes cost ~10x more CPU and wake-ups, see the machine-limits notes).

The connection is also the lease (DESIGN §6): when it closes, every admission still pending on it is
cancelled and every ticket it holds is released. One `asyncio.Protocol` per connection, callback
style: the distributor delivers outcomes by calling `deliver`, no Task or Future per request.

Replies (service -> client): `Result(id, outcome, ticket, wait, retry_after)` for an admission;
`Released(ticket, ok)` for a release, in the order of the releases (`ReleaseRefused`, a Released with
status 422 and a message, for one whose `tokens` is out of range: the ticket is kept, as HTTP's 422);
`Error(id, status, message)` where `status` is HTTP-like:
422 invalid field (the message names it), 400 duplicate in-flight id, 429 too many in flight on
this connection, 500 the distributor failed on this request. An Admit's id is 0 or more (a negative
id is a malformed frame), so `Error(-1, ...)` is always about the connection, which is closed right
after: 400 malformed or oversized frame, 408 a frame not completed in time, 503 too many connections.
`Error(IDLE_CLOSE, 408)` (-2) closes a connection that holds nothing and sent no frame for
`idle_timeout` (none at all within `frame_timeout` of opening): it read nothing it did not answer, so its
client may send again on a new connection what it has no answer for (`_close_idle`).
The frames before a malformed one are handled first, and the answers decided for them then are sent
before that Error (with acceptors, after a round trip: `Admission.after`).

What one connection may cost is bounded (docs/service.md, "Resource limits"): an incomplete frame must
complete within `frame_timeout`; replies the client does not read stop the reading of its input
once `write_high` bytes wait, unsent or on their way (releases and admissions whose answers have not
come: with acceptors a round trip; it cannot make more work while it does not read), and it is dropped
when they pass `max_write_buffer` or stay above `write_high` for `READ_WINDOW` write_timeouts while
it reads less than `MIN_READ_RATE` a second (slowly is fine, not at all is not): a reset; a
connection condemned by a protocol error is aborted if its last bytes are not read within
`close_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from distributor.api import CONN_CHECK, CONN_NORMAL, Admission, Audit, connection_verdict
from distributor.guards import Guards
from distributor.sockets import MIN_READ_RATE, READ_WINDOW, dead_peer, reset, unsent
from flowshard.codec import (
    IDLE_CLOSE,
    Admit,
    Audited,
    Error,
    FrameError,
    FrameReader,
    FrameWriter,
    FromClient,
    Release,
    Released,
    ReleaseRefused,
    Result,
)
from flowshard.types import Outcome
from flowshard.validate import MAX_TOKENS, check_admit, check_release_tokens

if TYPE_CHECKING:
    from flowshard.config import ServiceConfig

log = logging.getLogger(__name__)

_NOT_YET = -1  # request id of an admission whose `admit` call has not returned yet
# Frames handled between checks of the replies waiting and of the time taken: bounds what one read can
# make a client that does not read cost (BATCH replies of at most ~100 bytes) while costing a big read
# next to nothing.
BATCH = 64
# A connection's share of one event-loop pass: past this much time handling one read (checked every
# BATCH frames), the rest is kept for the next pass, reading paused (`_process`). 20 clients streaming
# releases without reading held a fresh request 0.24 s at the median, handled whole (review 168: 0.46 s,
# up to 1.2 s); 75 ms with a 2 ms share (HTTP's, `distributor.http.TURN_BUDGET`: there the renders per
# pass set the pace), 22 ms with this one and BATCH 64. Its cost where nobody floods (`bench.inproc
# --shards 1`, closed-loop clients, three alternated runs): the distributor's CPU per request 1.27-1.30x
# the workers' before, 1.26-1.29x after.
TURN_BUDGET = 0.0005
LISTEN_BACKLOG = 1024  # the listening socket's accept queue
# What a reply still to come weighs against write_high and max_write_buffer: a Release's answer (a
# Released frame, its ticket at 64 bits). With acceptor processes a release, or an admission decided
# at once, is answered a round trip after it is read, so replies waiting counts those on their way as
# well as those unsent (docs/service.md; admissions against write_high only, until shown queued).
_w = FrameWriter()
_w.add(Released(1 << 63, False))
REPLY_BYTES = len(_w.take())
# ... and what a reply on its way weighs: not its frame's bytes but what it holds in this process meanwhile
# (its waiter and key, the message on the link, the answer decoded): at 14 bytes each, a client that sent
# releases and never read had ~4,700 on their way per connection through an acceptor, ~2 MiB of its memory
# against 0.3 MiB in one process (review 153)
ON_THE_WAY_BYTES = 256
del _w
_monotonic = time.monotonic


@dataclass(frozen=True, slots=True)
class BinaryLimits:
    """What one service instance accepts from binary clients.

    `write_high`: replies waiting for a client beyond this pause the reading of its input.
    `max_write_buffer`: beyond this the client is dropped (its tickets are released), rather than
    letting one slow reader hold service memory; `write_timeout`: likewise when its replies stay
    above `write_high` `READ_WINDOW` times this long while it reads less than `MIN_READ_RATE` bytes a
    second. Safe at `max_connections`: see the resource table in docs/service.md.
    """

    max_connections: int = 4096
    max_inflight_per_connection: int = 65536
    max_frame: int = 65536
    write_high: int = 64 << 10
    max_write_buffer: int = 1 << 20
    write_timeout: float = 10.0
    frame_timeout: float = 10.0
    close_timeout: float = 2.0
    max_linger_bytes: int = 1 << 20  # input a closing connection may still send (read and discarded)
    # A connection that holds nothing (`BinaryConnection._holds_nothing`) and sent no frame for this
    # long is closed with IDLE_CLOSE (within frame_timeout if it never sent one: `silent_connection`)
    idle_timeout: float = 75.0

    @classmethod
    def of_service(cls, svc: ServiceConfig) -> BinaryLimits:
        """The limits the `[service]` configuration sets (frames complete within its header_timeout, a
        connection holding nothing is closed after its idle_timeout, as HTTP's keep-alive ones)."""
        return cls(max_connections=svc.max_connections, frame_timeout=svc.header_timeout,
                   idle_timeout=svc.idle_timeout)


# The answer to a client whose first bytes are an HTTP request (curl, a browser, an HTTP client on the
# wrong port): in HTTP, so that it shows (a binary Error frame read as HTTP was "Received HTTP/0.9")
_WRONG_BODY = (b"this is flowshard's binary port (length-prefixed msgpack frames); its HTTP API is on the "
               b"HTTP port (8080 by default: serve --port)\n")
_WRONG_PORT = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
               b"connection: close\r\n\r\n%s" % (len(_WRONG_BODY), _WRONG_BODY))


class BinaryHub:
    """State shared by the connections of one server; called, it makes a connection's protocol
    (a server's factory, or an acceptor's for the connections handed to it)."""

    __slots__ = ("admission", "connections", "guards", "limits", "live", "loop", "on_close", "on_lost")

    def __init__(
        self, admission: Admission, limits: BinaryLimits, loop: asyncio.AbstractEventLoop, guards: Guards
    ) -> None:
        self.admission = admission
        self.limits = limits
        self.loop = loop
        self.guards = guards
        self.connections = 0
        # Told of every connection's end (an acceptor reports it to the distributor, which counts the
        # connections against the limits: distributor.front)
        self.on_close: Callable[[BinaryConnection], None] | None = None
        self.on_lost: Callable[[BinaryConnection], None] | None = None  # its socket is closed (acceptors)
        self.live: set[BinaryConnection] = set()  # every connection whose socket is open (`stop_reading`)

    def __call__(self, verdict: int = CONN_CHECK) -> BinaryConnection:
        return BinaryConnection(self, verdict)

    def transports(self) -> list[asyncio.Transport]:
        """The open connections' transports (`sockets.let_answers_leave`)."""
        return [conn._transport for conn in self.live if conn._transport is not None]

    def stop_reading(self) -> None:
        """The service stopped (`Admission.reading` is False): every connection reads again, paused or
        not, and drops what it reads, so that its close at the exit is a FIN after its answers.
        Input left unread makes the close a reset, which throws away the answers its kernel still
        holds (review 155: a client reading its 20,000 answers slowly sent one admission as the drain
        ended, while its reading was paused behind them, and lost 6,560-12,534 of them)."""
        for conn in self.live:
            conn._reading()


async def start_binary_server(
    admission: Admission, host: str, port: int, limits: BinaryLimits | None = None, guards: Guards | None = None,
    hubs: list[Any] | None = None,
) -> asyncio.Server:
    """Listen for binary-protocol clients (port 0: any free port, see `server.sockets`); the server's
    hub is added to `hubs` (the service stops their reading at its exit: `BinaryHub.stop_reading`)."""
    loop = asyncio.get_running_loop()
    hub = BinaryHub(admission, limits or BinaryLimits(), loop, guards if guards is not None else Guards())
    if hubs is not None:
        hubs.append(hub)
    return await loop.create_server(hub, host, port, backlog=LISTEN_BACKLOG)


class BinaryConnection(asyncio.Protocol):
    """One client connection; the distributor's `Waiter` for every admission it carries.

    One lazily re-armed timer covers the three deadlines (incomplete frame, stuck replies, close):
    the hot path only notes a time stamp when a frame is left incomplete, and the timer is armed
    only when none is.
    """

    __slots__ = (
        "_active_at", "_admission", "_asked", "_awaiting", "_closing_at", "_counted", "_covered", "_discarded",
        "_ended", "_eof_wait", "_failing", "_flush_scheduled", "_frame_at", "_framed", "_fresh", "_hub", "_input_held",
        "_last_id", "_lost", "_max_inflight", "_open", "_out", "_pending", "_reader", "_resume_scheduled",
        "_stalled_at", "_stalled_unsent", "_sure", "_timer", "_transport", "_verdict",
    )

    def __init__(self, hub: BinaryHub, verdict: int = CONN_CHECK) -> None:
        self._hub = hub
        self._verdict = verdict  # how it counts against max_connections (distributor.api), if decided already
        self._admission = hub.admission
        self._transport: asyncio.Transport | None = None
        self._reader = FrameReader(FromClient, hub.limits.max_frame)
        self._out = FrameWriter()
        self._flush_scheduled = False
        # correlation id -> request id of every admission without an outcome yet
        self._pending: dict[int, int] = {}
        self._max_inflight = hub.limits.max_inflight_per_connection
        self._counted = False  # accepted within max_connections
        self._open = False  # serving: from an accepted connection_made until closing starts
        self._lost = False
        self._ended = False  # its lease ended: pending admissions cancelled, tickets released
        self._discarded = 0  # input read and thrown away since the connection began to close
        self._timer: asyncio.TimerHandle | None = None
        self._frame_at = 0.0  # loop time the incomplete frame now held began; 0.0: none
        self._stalled_at = 0.0  # loop time replies went over write_high unread; 0.0: they did not
        self._stalled_unsent = 0  # `unsent` then, plus what was written since (less now: what the client read)
        self._closing_at = 0.0  # loop time a close began that waits for the client to read; 0.0: none
        self._eof_wait: asyncio.TimerHandle | None = None  # the client's EOF: how long its answers may take
        self._input_held = False  # complete frames kept unread in the reader while replies wait
        self._resume_scheduled = False  # `_resume_soon`
        # Releases read whose answers have not come yet (never more than for a moment in the
        # distributor's process; a round trip with acceptors): replies waiting as much as those unsent
        self._awaiting = 0
        # Admissions whose answers may be on their way (decided at once by the distributor, not yet
        # come: a round trip with acceptors) count as replies waiting too, until a round trip asked
        # with `Admission.after` shows the rest queued (`_confirm`). Request ids increase: those
        # above `_sure` are fresh, and those up to `_asked` are covered by the round trip asked.
        self._fresh = 0
        self._covered = 0
        self._sure = _NOT_YET
        self._asked = _NOT_YET  # _NOT_YET: no round trip asked
        self._last_id = _NOT_YET
        self._failing = False  # a protocol error waits for the answers to what came before it
        self._framed = False  # a frame was read (a protocol error is not an HTTP client on the wrong port)
        self._active_at = 0.0  # loop time of its last read, or of the last time it was found holding something

    # ------------------------------------------------------------ transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        hub = self._hub
        hub.live.add(self)
        verdict = self._verdict or connection_verdict(hub.connections, 0, hub.limits.max_connections, 0)
        if verdict != CONN_NORMAL:
            hub.guards.hit("binary", "too_many_connections")
            self._send(Error(-1, 503, f"too many connections (limit {hub.limits.max_connections})"))
            self._close()
            return
        hub.connections += 1
        self._counted = True
        self._open = True
        transport.set_write_buffer_limits(high=hub.limits.write_high)
        self._active_at = now = hub.loop.time()
        self._arm(now + hub.limits.frame_timeout)  # its first frame within header_timeout (`_on_timer`)

    def data_received(self, data: bytes) -> None:
        if not self._admission.reading:  # the service has stopped: nothing more is handled (`Admission.reading`),
            return  # but it is read, so that the exit's close is a FIN after the answers, not a reset losing them
        self._active_at = self._hub.loop.time()
        if not self._open:
            # Closing: discarded, but read so that EOF is seen; up to a bound, since reading junk
            # costs this process CPU for as long as the connection lingers.
            self._discarded += len(data)
            transport = self._transport
            if self._discarded > self._hub.limits.max_linger_bytes and transport is not None and not self._lost:
                self._discarded = -(1 << 62)  # counted once
                self._hub.guards.hit("binary", "linger_overflow")
                reset(transport)
            return
        if self._input_held:  # read before the pause took effect: after what is kept, in order
            self._reader.feed(data, 0)
            return
        self._process(data)

    def _process(self, data: bytes = b"") -> None:
        """Handle the complete frames in `data` and the reader's buffer, BATCH at a time; once the
        replies waiting pass write_high, keep the rest unread until they have gone out."""
        reader = self._reader
        held = reader.pending
        progressed = False
        write_high = self._hub.limits.write_high
        start = _monotonic()
        while True:
            try:
                messages = reader.feed(data, BATCH)
            except FrameError as exc:
                # the frames before the bad one are handled, in order, as if read before it; their
                # answers decided then go out before Error(-1, 400) (`_fail`)
                self._handle(exc.messages)
                self._hub.guards.hit("binary", "malformed")
                if self._open:
                    # (HTTP from its first bytes: no frame read before)
                    self._fail(400, str(exc), http=exc.http and not exc.messages and not self._framed)
                return
            data = b""
            if messages:
                self._framed = True
            self._handle(messages)
            if not self._open:
                break
            if self._waiting() > write_high:
                self._input_held = True
                self._frame_at = 0.0  # an incomplete frame's clock stops: the time held is the service's
                self._reading()
                self._confirm()
                return
            if len(messages) < BATCH:
                break
            progressed = True
            if _monotonic() - start > TURN_BUDGET:  # this read has had its share of the loop pass: the
                self._input_held = True  # rest is kept, the reading paused, and handled in the next pass
                self._frame_at = 0.0
                self._reading()
                self._resume_soon()
                return
        # a new frame is incomplete, or one kept while the input was held: its clock starts
        if reader.pending and (messages or progressed or not held or not self._frame_at):
            self._frame_at = self._hub.loop.time()
            self._arm(self._frame_at + self._hub.limits.frame_timeout)  # (kept if an earlier one is set)

    def _handle(self, messages: list[Any]) -> None:
        """Admit and Release frames, in order (the front's hottest loop: no call per frame but its own)."""
        admit, release = self._admit, self._release
        for msg in messages:
            if type(msg) is Admit:
                admit(msg)
            else:
                release(msg)
                if not self._open:  # the release failed (a bug), and with it the connection: nothing after it
                    return

    def _waiting(self) -> int:
        """Bytes of replies waiting in this process: unsent, and on their way (releases in flight,
        admissions not yet known to be queued)."""
        return len(self._out) + (self._awaiting + self._fresh) * ON_THE_WAY_BYTES

    def _confirm(self) -> None:
        """The input is held: ask a round trip (one at a time), after which the fresh admissions still
        without an answer are known to be queued and count no more (in the distributor's process the
        answers decided at once are written at once, and a queued admission is no reply waiting)."""
        if self._fresh and self._asked == _NOT_YET:
            self._asked = self._last_id
            self._covered = self._fresh
            self._admission.after(self._confirmed)

    def _confirmed(self) -> None:
        if self._asked == _NOT_YET:  # the lease ended meanwhile
            return
        self._fresh -= self._covered
        self._covered = 0
        self._sure, self._asked = self._asked, _NOT_YET
        if self._input_held:
            if self._waiting() > self._hub.limits.write_high:
                # admissions read after the ask (the reading resumed meanwhile) hold it: ask again, or
                # nothing would (they may be queued behind a release kept unread)
                self._confirm()
            else:
                self._resume_soon()

    def _answered(self, request_id: int) -> None:
        """An admission counted fresh has its answer."""
        self._fresh -= 1
        if request_id <= self._asked:
            self._covered -= 1

    def _release(self, msg: Release) -> None:
        tokens = msg.tokens
        self._awaiting += 1
        if tokens != -1 and not 0 <= tokens <= MAX_TOKENS:
            # As HTTP's 422: refused, naming the field, and the ticket not released; answered in its
            # turn among this connection's releases (whose answers may be on their way: `after`).
            # -1 is the wire's "none reported" (what an absent field decodes to, as HTTP's absent field).
            problem = check_release_tokens(tokens) or "tokens: out of range"
            ticket = msg.ticket
            self._admission.after(lambda: self._refused(ticket, problem))
            return
        try:
            self._admission.release_then(msg.ticket, tokens, self._released, self._release_failed)
        except Exception:
            log.exception("release failed for a binary client")
            self._release_failed("internal error while releasing")

    def _released(self, ticket: int, ok: bool) -> None:
        self._awaiting -= 1
        if not self._lost and (self._open or self._failing):
            self._send(Released(ticket, ok))

    def _release_failed(self, message: str) -> None:
        """The distributor failed on a release (a bug): nothing more is read, the answers before it
        go out, then `Error(-1, 500)` and the close (in one process the exception closed the
        connection unanswered; from an acceptor nothing answered it and later answers shifted)."""
        self._awaiting -= 1
        if self._open:
            self._fail(500, message)
            # Nothing after it is answered, as in one process (where it stops the reading at once):
            # through an acceptor, the frames after it were already forwarded, and their answers (and
            # those of admissions still queued) may come before the barrier `_fail` waits for
            self._failing = False

    def _refused(self, ticket: int, problem: str) -> None:
        self._awaiting -= 1
        if not self._lost and (self._open or self._failing):
            self._send(ReleaseRefused(ticket, False, 422, problem))

    def _reading(self) -> None:
        """Read while neither replies wait beyond write_high nor complete frames are kept unread; and
        once the service has stopped, whatever waits (what is read is dropped: `BinaryHub.stop_reading`)."""
        transport = self._transport
        if self._open and transport is not None and not transport.is_closing():
            if (self._input_held or self._stalled_at) and self._admission.reading:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _resume_soon(self) -> None:
        """`_resume_input` in the next loop pass, once however many ask (asked per yield and per flush,
        each pass made more passes' worth: 20 clients streaming releases held the loop ~0.3 s a pass)."""
        if not self._resume_scheduled:
            self._resume_scheduled = True
            self._hub.loop.call_soon(self._resume_held)

    def _resume_held(self) -> None:
        self._resume_scheduled = False
        self._resume_input()

    def _resume_input(self) -> None:
        if not (self._input_held and self._open and not self._stalled_at) or not self._admission.reading:
            return  # (the service stopped: what was kept is not read, `Admission.reading`)
        if self._waiting() <= self._hub.limits.write_high:
            self._input_held = False
            self._reading()
            self._process()
        else:
            self._confirm()  # still held by admissions not known queued: a round trip shows which are

    def pause_writing(self) -> None:
        """Replies wait beyond `write_high`: stop reading (the client makes no new work while it does
        not read) and start the clock; `_flush` and the timer drop it past the hard limits."""
        if self._open and self._transport is not None:
            self._stalled_at = now = self._hub.loop.time()
            self._stalled_unsent = unsent(self._transport)  # (what `_flush` is writing included)
            self._reading()
            self._arm(now + READ_WINDOW * self._hub.limits.write_timeout)

    def resume_writing(self) -> None:
        self._stalled_at = 0.0
        if self._input_held:
            self._resume_input()
        else:
            self._reading()

    def eof_received(self) -> bool | None:
        """The client half-closed: nothing more comes. What it sent before is answered, then FIN, and
        its lease ends (admissions still queued are cancelled without an answer, tickets released), as
        in one process, where those answers are decided within the reads before the EOF. Through an
        acceptor they come a round trip later (`Admission.after`): closed at once, they were dropped,
        so an admission dispatched at once or a release (applied) went unanswered (a review)."""
        if self._lost:
            return None
        if not self._open:  # a protocol error waits for its answers (`_fail`), or it was dropped
            return True if self._failing else None
        self._open = False
        self._failing = True  # the answers on their way still go out
        self._admission.after(self._half_closed)
        if self._failing:  # (through an acceptor: a round trip) bounded, as HTTP's wait after an EOF is
            self._eof_wait = self._hub.loop.call_later(self._hub.limits.close_timeout, self._half_close_stuck)
        return True  # the transport stays open for them (`_half_closed` closes it)

    def _half_close_stuck(self) -> None:
        """The answers to what came before the EOF did not come within close_timeout: the distributor or
        the link is stuck. Reset (not a FIN that would look complete) and end the lease, rather than hold
        the connection for as long as it stays stuck (a review)."""
        self._eof_wait = None
        if self._failing and not self._lost:
            self._failing = False
            self._hub.guards.hit("binary", "close_timeout")
            if self._transport is not None:
                reset(self._transport)
            self._end_lease()

    def _half_closed(self) -> None:
        self._failing = False
        if self._eof_wait is not None:
            self._eof_wait.cancel()
            self._eof_wait = None
        if self._lost:
            return
        self._end_lease()
        self._flush()
        transport = self._transport
        if transport is not None and not unsent(transport):
            transport.close()
        else:  # the client has not read them all yet: FIN after them, reset past close_timeout
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._open = False
        self._hub.live.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lost:
            return
        self._lost = True
        hub = self._hub
        if dead_peer(exc):
            hub.guards.hit("binary", "dead_peer")
            log.info("binary client %s: gone (%s): its lease ends", self._peer(), exc)
        if hub.on_close is not None:
            hub.on_close(self)
        if hub.on_lost is not None:
            hub.on_lost(self)
        if not self._counted:  # refused in connection_made: it never admitted anything
            return
        hub.connections -= 1
        self._end_lease()

    def _end_lease(self) -> None:
        """The connection is the lease of its tickets: cancel what it waits for, release what it holds.
        Once, at its loss or as soon as a protocol error is answered (nothing of it is read then)."""
        if self._ended:
            return
        self._ended = True
        self._fresh = self._covered = 0
        self._asked = _NOT_YET
        pending, self._pending = self._pending, {}
        admission = self._admission
        for request_id in pending.values():  # (each one a few dict operations: the shards' evictions
            try:  # that follow are paced by the distributor, `Distributor.cancel`)
                admission.cancel(request_id)
            except Exception:
                log.exception("cancel(%d) failed for a closed binary connection", request_id)
        try:
            admission.release_all(self)
        except Exception:
            log.exception("release_all failed for a closed binary connection")

    # ------------------------------------------------------------ Waiter

    def deliver(
        self, cid: Any, request_id: int, outcome: Outcome, ticket: int, wait: float, retry_after: int,
        audit: Audit | None = None,
    ) -> None:
        """The outcome of admission `cid`, written with the other replies of this loop pass."""
        counted = self._pending.pop(cid, None)  # the request id it was counted under
        if counted is None:
            if self._ended and ticket:
                # A dispatch delivered after the connection's lease ended breaks the `cancel` contract;
                # release it anyway so no capacity leaks (invariant 6).
                log.error("dispatch of request %d delivered to a closed binary connection", request_id)
                self._admission.release(ticket)
            return
        if counted > self._sure:
            self._answered(counted)
        if self._open or self._failing:
            if audit is None:
                self._send(Result(cid, outcome, ticket, wait, retry_after))  # msgspec encodes an IntEnum as its value
            else:
                self._send(Audited(cid, outcome, ticket, wait, retry_after, *audit))

    def fail(self, cid: Any, message: str) -> None:
        request_id = self._pending.pop(cid, None)
        if request_id is None:
            return
        if request_id > self._sure:
            self._answered(request_id)
        if self._open or self._failing:
            self._send(Error(cid, 500, message))

    # ------------------------------------------------------------ internals

    def _admit(self, msg: Admit) -> None:
        cid = msg.id
        pending = self._pending
        if cid in pending:
            self._send(Error(cid, 400, f"id: {cid} is already in flight on this connection"))
            return
        if len(pending) >= self._max_inflight:
            limit = self._max_inflight
            self._hub.guards.hit("binary", "too_many_pending")
            self._send(Error(cid, 429, f"too many admissions in flight on this connection (limit {limit})"))
            return
        problem = check_admit(
            msg.flow, msg.priority, msg.size, msg.ttl, msg.slo, msg.tokens, msg.weight, size_field="size"
        )
        if problem is not None:
            self._send(Error(cid, 422, problem))
            return
        pending[cid] = _NOT_YET
        try:
            # The outcome may be delivered before admit returns (rejections, the idle fast path).
            request_id = self._admission.admit(  # positional: this is the front's hottest call
                self, cid, msg.flow, msg.priority, msg.size, msg.ttl, msg.slo, msg.tokens, msg.weight, False,
                msg.audit,
            )
        except Exception:
            log.exception("admit failed for a binary client")
            if pending.pop(cid, None) is not None and self._open:
                self._send(Error(cid, 500, "internal error while admitting"))
            return
        if cid in pending:
            pending[cid] = self._last_id = request_id
            self._fresh += 1

    def _send(self, message: Result | Audited | Error | Released | ReleaseRefused) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._hub.loop.call_soon(self._flush)
        self._out.add(message)

    def _flush(self) -> None:
        """Write every reply of this loop pass in one call."""
        self._flush_scheduled = False
        transport = self._transport
        if self._out and transport is not None and not transport.is_closing():
            data = self._out.take()
            stalled = self._stalled_at  # (a pause this write starts counts it already: a review)
            transport.write(data)
            if stalled:
                self._stalled_unsent += len(data)
            waiting = transport.get_write_buffer_size() + self._awaiting * ON_THE_WAY_BYTES  # (and on their way)
            if self._open and waiting > self._hub.limits.max_write_buffer:
                self._drop(f"{waiting} bytes of replies unread")
        if self._input_held and not self._stalled_at:  # the kernel took the replies: go on
            self._resume_soon()

    def _drop(self, why: str) -> None:
        """The client does not read its replies: abort (a graceful close would wait for it to read);
        connection_lost cancels and releases what it holds."""
        log.warning("binary client %s does not read its replies (%s): dropping it", self._peer(), why)
        self._hub.guards.hit("binary", "slow_reader")
        self._open = False
        if self._transport is not None:
            # a reset: closed plainly, the kernel kept megabytes of replies queued for a peer told
            # nothing (FIN-WAIT-1, until its user timeout: a review)
            reset(self._transport)

    def _fail(self, status: int, message: str, http: bool = False) -> None:
        """A protocol error: nothing more is read; once the answers decided for what came before it
        have been sent (with acceptors they come a round trip later: `Admission.after`), say why,
        then close; the connection's lease ends with that answer (`_failed`). `http`: the client
        began with an HTTP request, and is answered in HTTP (`_WRONG_PORT`)."""
        log.info("binary client %s: %s: closing", self._peer(), message)
        self._open = False
        self._failing = True
        error = Error(-1, status, message)
        self._admission.after(lambda: self._failed(error, http))

    def _failed(self, error: Error, http: bool = False) -> None:
        """Answered and half-closed: the lease ends now, not when the client closes or the linger
        ends (its tickets held ~close_timeout longer by a client that keeps its socket open)."""
        self._failing = False
        if not self._lost:
            if http and self._transport is not None:
                self._flush()
                self._transport.write(_WRONG_PORT)
            else:
                self._send(error)
            self._close()
            self._end_lease()

    def _close(self) -> None:
        """Send the last replies and FIN; if the client has not taken them within close_timeout,
        reset (a plain close would leave them queued in the kernel for as long as it does not read)."""
        self._flush()
        transport = self._transport
        if transport is None:
            return
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._closing_at = now = self._hub.loop.time()
        self._arm(now + self._hub.limits.close_timeout)

    def _arm(self, at: float) -> None:
        timer = self._timer
        if timer is not None:
            if timer.when() <= at:
                return
            timer.cancel()
        self._timer = self._hub.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        """Fires at the earliest deadline it was armed for; acts on what is due, re-arms for the rest."""
        self._timer = None
        if self._lost or self._transport is None:
            return
        limits = self._hub.limits
        now = self._hub.loop.time()
        due = math.inf
        if self._closing_at:
            if now >= self._closing_at + limits.close_timeout:
                if unsent(self._transport):
                    self._hub.guards.hit("binary", "close_timeout")
                    reset(self._transport)
                else:
                    self._transport.close()
                return
            due = self._closing_at + limits.close_timeout
        if not self._open:
            if due != math.inf:
                self._arm(due)
            return
        if self._stalled_at:
            window = READ_WINDOW * limits.write_timeout
            if now >= self._stalled_at + window:
                left = unsent(self._transport)
                if self._stalled_unsent - left < MIN_READ_RATE * (now - self._stalled_at):
                    self._drop(f"under {MIN_READ_RATE} bytes a second read for {window:g} s")
                    return
                self._stalled_at, self._stalled_unsent = now, left  # it reads, if slowly: judged again from now
            due = min(due, self._stalled_at + window)
        if self._frame_at and self._reader.pending and not self._input_held:
            if now >= self._frame_at + limits.frame_timeout:
                self._hub.guards.hit("binary", "frame_timeout")
                self._fail(408, f"frame not completed within {limits.frame_timeout:g} s")
                return
            due = min(due, self._frame_at + limits.frame_timeout)
        quiet = limits.idle_timeout if self._framed else limits.frame_timeout
        if now >= self._active_at + quiet:
            if self._holds_nothing():
                self._close_idle(quiet)
                return
            self._active_at = now  # it holds something: judged again a whole period from now
        self._arm(min(due, self._active_at + quiet))

    def _holds_nothing(self) -> bool:
        """No admission waits for its answer, no release for its own, no ticket is held, no frame is
        begun or kept unread and no reply waits unsent: closing loses nothing, and every frame the
        client sent that it has no answer for is unread (`IDLE_CLOSE`)."""
        transport = self._transport
        return not (
            self._pending or self._awaiting or self._reader.pending or self._out or self._input_held
            or self._stalled_at or transport is None or unsent(transport) or self._admission.holds(self)
        )

    def _close_idle(self, quiet: float) -> None:
        """An idle connection, or a silent one (no frame since it opened), holds a place among
        max_connections for nothing (review 168: 340 connects that never sent a byte shut out every
        binary client for as long as they stayed): closed, as HTTP's are, with `IDLE_CLOSE`."""
        self._open = False
        if self._framed:
            log.debug("binary client %s: idle for %g s, holding nothing: closing", self._peer(), quiet)
            why = f"idle for {quiet:g} s, holding nothing"
        else:
            self._hub.guards.hit("binary", "silent_connection")
            why = f"no frame within {quiet:g} s"
        self._send(Error(IDLE_CLOSE, 408, f"{why}: closed; nothing unanswered was read (send it on a new connection)"))
        self._close()
        self._end_lease()

    def _peer(self) -> Any:
        return self._transport.get_extra_info("peername") if self._transport is not None else None
