"""The wire codec: length-prefixed msgspec msgpack frames, written in batches.

One module serves both hops: distributor <-> worker (over a Unix socket pair) and the public binary
protocol (clients <-> distributor over TCP). A frame is a 4-byte big-endian length followed by one
msgpack message; messages are tagged-union Structs encoded as arrays (no field names on the wire).

`FrameWriter` appends frames to a buffer so the shell writes once per event-loop pass;
`FrameReader` decodes every complete frame a read brought and keeps the rest.

The internal links (distributor <-> shard workers, distributor <-> acceptors) carry a pass's messages
as one frame holding a msgpack array of them (`BatchWriter`, `BatchReader`): one encode and one decode
call per pass instead of one per message, which is most of what a message cost to frame in Python
(`python -m bench.inproc`). The public binary protocol keeps one message per frame (DESIGN §7).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Annotated, Any, Final, get_args

import msgspec

from flowshard.config import Config
from flowshard.validate import shape_problem

_LEN = struct.Struct(">I")
MAX_FRAME = 1 << 20  # a frame larger than this is a protocol error, not a request
# Internal links: a batch frame holds at most BATCH_MESSAGES messages (a big pass is cut into several
# frames, bounding each encode); the peer is this service's own process, so the bound on a frame is
# only against a corrupted stream.
BATCH_MESSAGES = 1024
MAX_BATCH_FRAME = 1 << 28


class FrameError(ValueError):
    """The peer sent bytes that are not a valid frame; the connection must be closed. `messages`: the
    complete messages `FrameReader.feed` decoded before it in the same call (theirs to answer).
    `http`: the bytes read as a frame's length are the start of an HTTP message (a request, or an
    answer: `HTTP`): the peer speaks HTTP, and is likely on the other port."""

    messages: list[Any] = []  # noqa: RUF012 - replaced, never mutated
    http = False


# What the first four bytes of an HTTP/1.x message are (a method and its space, or the start of a
# status line): read as a frame's length, each is far over any limit, so it is seen where that is
_HTTP_STARTS = frozenset({b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC",
                          b"HTTP", b"PRI "})


# ---------------------------------------------------------------- the worker's configuration

PREAMBLE_HEADER = _LEN.size


def config_preamble(config: Config) -> bytes:
    """The first bytes on a worker's socket, before any frame: its configuration as length-prefixed
    JSON (any size: unlike a command-line argument, which the kernel caps at 128 KiB)."""
    blob = msgspec.json.encode(config)
    return _LEN.pack(len(blob)) + blob


def preamble_length(header: bytes) -> int:
    """The length of the configuration that follows a PREAMBLE_HEADER-byte header."""
    length: int = _LEN.unpack(header)[0]
    return length


def decode_config(blob: bytes) -> Config:
    try:
        return msgspec.json.decode(blob, type=Config)
    except msgspec.DecodeError as exc:  # malformed or invalid: either way not from our distributor
        raise FrameError(f"bad worker configuration: {exc}") from None


# ---------------------------------------------------------------- distributor -> worker


class Enqueue(msgspec.Struct, tag=1, array_like=True, gc=False):
    """Queue a request on a shard. `slot` is its flow's shared-memory slot.

    `arrived` is the distributor's receive time (`time.monotonic()`, system-wide on Linux, so the
    shard's clock reads the same): TTL and SLO deadlines run from it, not from the shard's read.
    0: unknown, the shard's read time.
    """

    id: int
    flow: str
    slot: int
    priority: int
    size: int
    ttl: float
    slo: float
    tokens: int
    weight: float
    arrived: float = 0.0


class Grant(msgspec.Struct, tag=2, array_like=True, gc=False):
    """Dispatch the next request of band index <= `band` whose size is <= `max_bytes` (-1: any);
    `count` such grants in one frame, each answered on its own (a dispatch or a GrantBack).

    Bands whose ceiling is at or below `saturation` (the distributor's, when it granted) are skipped.
    """

    band: int
    max_bytes: int
    saturation: float = 0.0
    count: int = 1


class Cancel(msgspec.Struct, tag=3, array_like=True, gc=False):
    """Evict a queued request with the given outcome (cancelled, displaced, ...), if still queued."""

    id: int
    outcome: int


class Charge(msgspec.Struct, tag=8, array_like=True, gc=False):
    """Correct a flow's fairness charge by `delta` cost units: a released request reported its actual
    cost (tokens), and VTC had charged what it declared. Sent to the shard that dispatched it."""

    flow: str
    priority: int
    delta: float
    weight: float = 0.0  # the request's own weight, which it was charged at (0: the flow's configured one)
    seq: int = -1  # the shard's `Item.seq` of the request (its `Done.seq`; -1: not known)


class Shutdown(msgspec.Struct, tag=4, array_like=True, gc=False):
    """Evict everything queued with `evicted: shutdown`, report it, then exit."""


# ---------------------------------------------------------------- worker -> distributor


class Done(msgspec.Struct, tag=5, array_like=True, gc=False):
    """A request left the shard's queues with this outcome (dispatched or an eviction)."""

    id: int
    outcome: int
    wait: float
    at: float = 0.0  # the shard's time.monotonic() of the outcome (0: not given)
    # a dispatch: the shard's CLOCK_MONOTONIC ns read right after its engine committed it, for the
    # distributor's exact inversion count (Ledger.close_window) and the audit (`Audited.decided`)
    decided: int = 0
    seq: int = -1  # a dispatch: the shard engine's `Item.seq`, which a later `Charge` for it names


class GrantBack(msgspec.Struct, tag=6, array_like=True, gc=False):
    """A grant the shard could not use: no eligible request (`need` 0), or the head needs `need` bytes."""

    band: int
    need: int


class Hello(msgspec.Struct, tag=7, array_like=True, gc=False):
    """The first frame of a worker: it is attached to shared memory and ready."""

    shard: int
    pid: int


# ---------------------------------------------------------------- public binary protocol


class Admit(msgspec.Struct, tag=10, array_like=True, gc=False):
    """Client -> service: admit a request. `id` is the client's correlation id on this connection:
    0 or more, so that `Error(-1, ...)` (about the connection) can never be mistaken for an answer
    to an Admit; a negative id fails to decode (a malformed frame)."""

    id: Annotated[int, msgspec.Meta(ge=0)]
    flow: str
    priority: int = 0
    size: int = 0
    ttl: float = 0.0
    slo: float = 0.0
    tokens: int = 0
    weight: float = 0.0
    audit: bool = False  # answer with `Audited` (what the service knows of the request), not `Result`


class Release(msgspec.Struct, tag=11, array_like=True, gc=False):
    """Client -> service: the dispatched request finished; free its ticket. `tokens` >= 0: its actual
    cost, which corrects the flow's VTC counter by the difference to what it declared (-1: none)."""

    ticket: int
    tokens: int = -1


class Result(msgspec.Struct, tag=12, array_like=True, gc=False):
    """Service -> client: the outcome of an Admit. `ticket` is set when dispatched (else 0)."""

    id: int
    outcome: int
    ticket: int = 0
    wait: float = 0.0
    retry_after: int = 0


class Audited(msgspec.Struct, tag=15, array_like=True, gc=False):
    """Service -> client: a `Result` for an Admit that asked for `audit`, with what the service knows.

    `seq`: the request's arrival sequence number at the distributor (increasing in arrival order);
    `shard`: the shard that held it (-1: none, e.g. the idle fast path or a rejection); `received`,
    `enqueued`, `dispatched`: the service's time.monotonic() seconds when the distributor received it,
    when its shard queued it and when it was dispatched (0: did not happen); `decided` (a trailing
    field: 0 from older services): the same clock read right after the dispatch was committed, the
    instant the service's own priority-inversion count judges it by (`dispatched` is when the
    shard's pass began).
    """

    id: int
    outcome: int
    ticket: int
    wait: float
    retry_after: int
    seq: int
    shard: int
    received: float
    enqueued: float
    dispatched: float
    decided: float = 0.0


# The id of the Error that closes a connection holding nothing (no ticket, no call without its answer):
# every frame its client has no answer for was not read, and may be sent on a new connection
IDLE_CLOSE = -2


class Error(msgspec.Struct, tag=13, array_like=True, gc=False):
    """Service -> client: an Admit failed (`id` >= 0: that Admit's), or the connection did (`id` -1:
    it is closed right after; `IDLE_CLOSE`: closed idle, nothing unanswered was read)."""

    id: int
    status: int
    message: str


class Released(msgspec.Struct, tag=14, array_like=True, gc=False):
    """Service -> client: answer to Release; `ok` false for an unknown or already released ticket."""

    ticket: int
    ok: bool


class ReleaseRefused(msgspec.Struct, tag=14, array_like=True, gc=False):
    """Service -> client: the answer to a Release that is not valid (a field out of range, as HTTP's
    422): a `Released(ticket, false)` (the ticket is not released) with two trailing fields, the
    HTTP-like `status` and a `message` naming the field. A peer that knows only `Released` (the
    Python client's decoder) reads `Released(ticket, false)`: trailing fields are ignored. Sent, never
    decoded, by the service."""

    ticket: int
    ok: bool
    status: int
    message: str


# ---------------------------------------------------------------- acceptor <-> distributor
#
# An acceptor process (`distributor.front`) serves the client connections the distributor accepted
# and handed to it (HTTP and binary), and speaks for all of them on one socket pair to the
# distributor, which keeps the exact ledger. `key` names one admission of that acceptor (1 and up);
# answers to admissions are `Result`/`Audited` with `id` = key.


class LinkAdmit(msgspec.Struct, tag=20, array_like=True, gc=False):
    """Acceptor -> distributor: admit a request its client sent (already validated)."""

    key: int
    flow: str
    priority: int
    size: int
    ttl: float
    slo: float
    tokens: int
    weight: float
    leased: bool
    audit: bool = False
    proxied: bool = False  # a proxied request (proxy mode): the distributor counts it unsent until `LinkBackends`


class LinkCancel(msgspec.Struct, tag=21, array_like=True, gc=False):
    """Acceptor -> distributor: the client of admission `key` went away (Admission.cancel)."""

    key: int


class LinkUnclaimed(msgspec.Struct, tag=35, array_like=True, gc=False):
    """Acceptor -> distributor: `ticket`, a dispatch whose client had gone before its answer was
    written (its admission cancelled as it was dispatched, its answer cut by the client's EOF or
    reset, a proxied request no backend had yet), is released unclaimed (Admission.unclaim)."""

    ticket: int


class LinkRelease(msgspec.Struct, tag=22, array_like=True, gc=False):
    """Acceptor -> distributor: release `ticket`; `key` > 0 asks for a `LinkReleased` answer."""

    ticket: int
    tokens: int = -1
    key: int = 0


class LinkQuery(msgspec.Struct, tag=23, array_like=True, gc=False):
    """Acceptor -> distributor: `what` is "stats" (GET /v1/stats) or "metrics" (GET /metrics)."""

    key: int
    what: str


class LinkGuard(msgspec.Struct, tag=24, array_like=True, gc=False):
    """Acceptor -> distributor: the acceptor's front took a protective action (distributor.guards)."""

    front: str
    action: str


class LinkConns(msgspec.Struct, tag=28, array_like=True, gc=False):
    """Acceptor -> distributor: of the connections handed to it, how many have closed so far, per
    front and by the verdict they came with (`distributor.api`): HTTP within max_connections, HTTP
    in the admin reserve, binary. The distributor counts every front's open connections (handed,
    minus reported closed) and decides each new connection's verdict by them, so the limits hold
    service-wide. Sent at the end of every pass in which a connection closed, and four times a
    second whatever happened (the acceptor's heartbeat); the counts only grow. `dropped`: the
    connections handed to it that arrived without their descriptor (it was out of them), ever
    (sent at once at each), `received` those that came with theirs, and `sockets` the client
    sockets it holds now (closing ones included: a place under max_connections can be free while
    its socket waits): the distributor learns from them how many it can hold (`AcceptorLink.cap`).
    For 10 s after a drop every change of them is sent at once, and later each new peak of sockets
    (`Handover._changed_after_drop`)."""

    http_closed: int
    http_reserve_closed: int
    binary_closed: int
    dropped: int = 0
    received: int = 0
    sockets: int = 0


class LinkDelivered(msgspec.Struct, tag=29, array_like=True, gc=False):
    """Acceptor -> distributor, once per pass: leased (HTTP) tickets whose answers were written to
    their clients. Those not reported when the acceptor dies are released then, unless its delivery
    log (distributor.deliverylog) shows them written in its last pass."""

    tickets: list[int]


class LinkBackends(msgspec.Struct, tag=30, array_like=True, gc=False):
    """Acceptor -> distributor, at the end of a pass in which its proxy sent requests to backends or
    saw them finish (proxy mode with the utilization detector): per backend, requests sent and
    requests finished since the last report (the detector's between-scrapes correction, kept in the
    distributor), and the tickets of proxied dispatches no longer waiting to be sent (sent, or ended
    before: the detector's `unsent` term). With the detector off, only in a pass in which its pool's
    health changed, its counts all 0 (`down_for`: the other acceptors are told, `LinkPeersDown`)."""

    sent: list[int]
    finished: list[int]
    marked: list[int]
    # per backend, how long its proxy keeps it out of rotation from now (seconds; 0: in rotation), when
    # that changed since its last report; empty when it did not (the pool's saturation counts only
    # the backends in rotation: `Proxy.out_of_rotation`)
    down_for: list[float] = []
    # per backend, streams that waited on their client for the first time, and such streams that ended
    # (`PoolUtilization.held`); both empty when there were none
    held: list[int] = []
    held_finished: list[int] = []


class LinkProxyAsk(msgspec.Struct, tag=31, array_like=True, gc=False):
    """Distributor -> acceptor: send your proxy's counters (`LinkProxyReport`); asked while the
    distributor renders GET /metrics or GET /v1/stats in proxy mode."""

    key: int


class LinkProxyReport(msgspec.Struct, tag=32, array_like=True, gc=False):
    """Acceptor -> distributor: the answer to `LinkProxyAsk` (or, with `key` 0, pushed with its
    heartbeat when they changed): its proxy's counters, msgpack (`distributor.proxy.ProxyReport`),
    cumulative since the acceptor started."""

    key: int
    body: bytes


class LinkStop(msgspec.Struct, tag=33, array_like=True, gc=False):
    """Distributor -> acceptor: the service stops (`why`: "drain", "signal" or "stopped", as
    `Proxy.close`): end the proxied requests still running, saying why. `Shutdown` follows."""

    why: str


class LinkBackendHealth(msgspec.Struct, tag=34, array_like=True, gc=False):
    """Distributor -> acceptor (proxy mode with the utilization detector): the distributor's scraper
    could not connect to `backend` (nothing listens there: out for `down_for` seconds, as a failed
    request takes it out) or, `down_for` 0, reached it again after that; sent on each change and to
    an acceptor that starts. The acceptor's proxy applies it to its own pool (`Proxy.scrape_health`)."""

    backend: int
    down_for: float
    detail: str = ""


class LinkRevoke(msgspec.Struct, tag=37, array_like=True, gc=False):
    """Distributor -> acceptor: the answer carrying leased `ticket` has waited out its lease unwritten
    (behind earlier answers on its connection): if it still is, its connection answers that request
    `evicted: cancelled` instead and the dispatch comes back unclaimed (LinkUnclaimed); if it was
    written, its LinkDelivered is on its way (`Distributor.restart_lease`)."""

    ticket: int


class LinkPeersDown(msgspec.Struct, tag=38, array_like=True, gc=False):
    """Distributor -> acceptor (proxy mode, with the utilization detector or without): per backend, for how long
    (seconds from now; 0: not) the *other* acceptors' proxies keep it out of rotation after failures
    of their own (`LinkBackends.down_for`); sent to every acceptor when one of them reports a change,
    when one exits, and to an acceptor that starts. The acceptor's picker sends nothing there while
    another backend is up (`Proxy.peers_health`): with each acceptor's passive health its own, a
    backend out in one stayed up in the others, which sent it requests until they met its failures
    too, each retried on the backends left beyond the rooms the detector gave them."""

    down_for: list[float]


class LinkBackendsFull(msgspec.Struct, tag=36, array_like=True, gc=False):
    """Distributor -> acceptor (proxy mode with the utilization detector): per backend, how many more
    requests it takes before the distributor's detector (the one view of what every acceptor sent)
    has it at its saturation (`PoolUtilization.room`; 0: full; -1: its metrics stale, full too, and a
    retry ranks it last: `BackendPool.pick`'s `stale`); sent to every acceptor when an
    admission decision or an acceptor's report changes it, to an acceptor whose sends it has just
    counted, and to an acceptor that starts. With it, `counted`:
    per backend, how many sends of this acceptor's (its `LinkBackends.sent`, summed) those rooms
    already count. The acceptor's picker sends to a backend with room first (`BackendPool.pick`), as
    the distributor's own does, counting against that room its own sends the distributor had not
    counted yet: told only which backends were full, two acceptors sent 10 of a burst of 21 to one
    with room for 1 (review 121); counting every send since the last message, one whose requests
    ended between two saw a backend with room as full (review 122)."""

    room: list[int]
    counted: list[int] = []


class LinkReleased(msgspec.Struct, tag=25, array_like=True, gc=False):
    """Distributor -> acceptor: the answer to a `LinkRelease` that asked for one."""

    key: int
    ok: bool


class LinkAnswer(msgspec.Struct, tag=26, array_like=True, gc=False):
    """Distributor -> acceptor: the answer to a `LinkQuery` (body and content type)."""

    key: int
    body: bytes
    ctype: str


class LinkState(msgspec.Struct, tag=27, array_like=True, gc=False):
    """Distributor -> acceptor: whether the service accepts work (false once draining) and is ready
    (every shard up: GET /readyz). Sent first and on every change."""

    accepting: bool
    ready: bool


ToWorker = Enqueue | Grant | Cancel | Shutdown | Charge
FromWorker = Done | GrantBack | Hello
FromClient = Admit | Release
ToClient = Result | Error | Released | Audited
FromAcceptor = (LinkAdmit | LinkCancel | LinkRelease | LinkQuery | LinkGuard | LinkConns | LinkDelivered | Hello
                | LinkBackends | LinkProxyReport | LinkUnclaimed)
ToAcceptor = (Result | Audited | Error | LinkReleased | LinkAnswer | LinkState | Shutdown | LinkProxyAsk | LinkStop
              | LinkBackendHealth | LinkBackendsFull | LinkRevoke | LinkPeersDown)


class FrameWriter:
    """Accumulates frames in one buffer; `take()` returns the bytes to write and starts afresh."""

    __slots__ = ("_buf", "_encoder")

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._buf = bytearray()

    def add(self, message: Any) -> None:
        buf = self._buf
        start = len(buf)
        buf += b"\0\0\0\0"
        try:
            self._encoder.encode_into(message, buf, start + 4)
        except BaseException:
            del buf[start:]  # never leave a half frame in the stream
            raise
        _LEN.pack_into(buf, start, len(buf) - start - 4)

    def __bool__(self) -> bool:
        return bool(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def take(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data


class BatchWriter:
    """An internal link's writer: collects the messages of a pass; `take()` encodes them as batch
    frames (a length, then a msgpack array of up to BATCH_MESSAGES messages).

    A message that cannot be encoded (a bug upstream: an integer past 64 bits, a wrong type) is left
    out and handed to `on_drop` (by default logged as an error); the pass's other messages still go."""

    __slots__ = ("_encoder", "_frame_messages", "_messages", "add", "dropped", "on_drop")

    def __init__(self, on_drop: Callable[[Any, Exception], None] | None = None,
                 frame_messages: int = BATCH_MESSAGES) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._frame_messages = frame_messages  # (a shard worker's: one frame per window, `WINDOW_FRAMES`)
        self._messages: list[Any] = []
        # add(message): the list's own append, no Python layer (a link carries one or more per request;
        # measured). So `take` keeps this list and empties it.
        self.add: Callable[[Any], None] = self._messages.append
        self.on_drop = on_drop or log_drop
        self.dropped = 0

    def __bool__(self) -> bool:
        return bool(self._messages)

    def __len__(self) -> int:
        """Messages waiting."""
        return len(self._messages)

    def take(self) -> bytes:
        if not self._messages:
            return b""
        messages = self._messages.copy()
        self._messages.clear()  # before encoding: what `on_drop` adds goes with the next take
        buf = bytearray()
        step = self._frame_messages
        for first in range(0, len(messages), step):
            self._frame(buf, messages[first : first + step])
        return bytes(buf)

    def _frame(self, buf: bytearray, messages: list[Any]) -> None:
        start = len(buf)
        buf += b"\0\0\0\0"
        try:
            self._encoder.encode_into(messages, buf, start + 4)
        except (TypeError, ValueError, OverflowError):
            del buf[start:]
            good = []
            for m in messages:
                problem = _encode_problem(self._encoder, m)
                if problem is None:
                    good.append(m)
                else:
                    self.dropped += 1
                    self.on_drop(m, problem)
            if good:
                self._frame(buf, good)
            return
        _LEN.pack_into(buf, start, len(buf) - start - 4)


def log_drop(message: Any, problem: Exception) -> None:
    """The default `BatchWriter.on_drop`: an error in the log, naming the message and why."""
    logging.getLogger(__name__).error("%s not sent: it cannot be encoded (%s)", type(message).__name__, problem)


def _encode_problem(encoder: msgspec.msgpack.Encoder, message: Any) -> Exception | None:
    try:
        encoder.encode(message)
    except (TypeError, ValueError, OverflowError) as exc:
        return exc
    return None


class BatchReader:
    """An internal link's reader: decodes the batch frames a read brought (one decode call each) and
    keeps an incomplete one."""

    __slots__ = ("_buf", "_decoder", "_max")

    def __init__(self, message_type: Any, max_frame: int = MAX_BATCH_FRAME) -> None:
        self._decoder: msgspec.msgpack.Decoder[list[Any]] = msgspec.msgpack.Decoder(list[message_type])
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[Any]:
        """Every message of the complete frames now available, in order. Raises FrameError on a
        malformed stream."""
        buf = self._buf
        if not buf:  # the usual case: a read holds whole frames, often one; decoded without a copy
            end = len(data)
            if end >= 4:
                (n,) = _LEN.unpack_from(data, 0)
                if n + 4 == end and n <= self._max:
                    return self._decode(memoryview(data)[4:])
            buf += data
        else:
            buf += data
        out: list[Any] = []
        pos = 0
        end = len(buf)
        view = memoryview(buf)
        try:
            while end - pos >= 4:
                (n,) = _LEN.unpack_from(buf, pos)
                if n > self._max:
                    raise FrameError(f"batch frame of {n} bytes exceeds the {self._max}-byte limit")
                if end - pos - 4 < n:
                    break
                out += self._decode(view[pos + 4 : pos + 4 + n])
                pos += 4 + n
        finally:
            view.release()
        if pos:
            del buf[:pos]
        return out

    def _decode(self, frame: memoryview) -> list[Any]:
        try:
            return self._decoder.decode(frame)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise FrameError(f"malformed batch frame: {exc}") from None
        finally:
            frame.release()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)


# msgpack's integer forms after their type byte: (struct format, big-endian) by type byte
_INT_FORMS: Final = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}


def _peek_tag(frame: memoryview) -> int | None:
    """A frame's message type, read from its first bytes (a non-empty array's header, then an integer),
    so that a frame that does not decode at all, even as plain msgpack (nested too deep for it, cut short
    after the bad field), still names its message's fields (a review: `[2]: expected a string`). None
    when the frame does not begin so."""
    if not frame:
        return None
    head = frame[0]
    if 0x91 <= head <= 0x9F:
        at = 1
    elif head in (0xDC, 0xDD):
        at = 3 if head == 0xDC else 5
        if not any(frame[1:at]):  # (an empty array has no type; a frame too short for its header, below)
            return None
    else:
        return None
    if len(frame) <= at:
        return None
    tag = frame[at]
    if tag <= 0x7F or tag >= 0xE0:
        return tag if tag <= 0x7F else tag - 0x100  # a fixint, positive or negative
    form = _INT_FORMS.get(tag)
    if form is None or len(frame) < at + 1 + struct.calcsize(form):
        return None
    return int(struct.unpack_from(form, frame, at + 1)[0])


def _too_large(head: bytes, n: int, most: int) -> FrameError:
    """The error for a frame over the limit, saying so when its "length" is the start of HTTP (a review:
    a client on the wrong port was told of a frame of 1,195,725,856 bytes)."""
    if head in _HTTP_STARTS:
        error = FrameError(f"the peer speaks HTTP ({head.decode()!r}...), not flowshard's binary protocol: "
                           "is this the HTTP port? (the binary port is another: 8081 by default)")
        error.http = True
        return error
    return FrameError(f"frame of {n} bytes exceeds the {most}-byte limit")


class FrameReader:
    """Decodes the frames in a byte stream, typed by the union this side expects to receive."""

    __slots__ = ("_buf", "_decoder", "_layouts", "_max")

    def __init__(self, message_type: Any, max_frame: int = MAX_FRAME) -> None:
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(message_type)
        self._buf = bytearray()
        self._max = max_frame
        # tag -> (message name, its fields): to name the field of a frame that does not decode
        self._layouts: dict[Any, tuple[str, tuple[str, ...]]] = {
            t.__struct_config__.tag: (t.__name__, t.__struct_fields__)
            for t in get_args(message_type) or (message_type,)
        }

    def feed(self, data: bytes, limit: int = 1 << 62) -> list[Any]:
        """Every complete message now available, or the first `limit` of them (the rest stay buffered:
        `feed(b"", limit)` goes on). Raises FrameError on a malformed stream, carrying the messages
        before the bad frame (`FrameError.messages`)."""
        buf = self._buf
        buf += data
        out: list[Any] = []
        pos = 0
        end = len(buf)
        if end < 4 or limit <= 0:
            return out
        # the per-frame loop is the binary front's hottest Python: names bound once, one bound check
        unpack, decode, append, most = _LEN.unpack_from, self._decoder.decode, out.append, self._max
        left = limit
        view = memoryview(buf)
        try:
            while pos + 4 <= end:
                n = unpack(buf, pos)[0]
                if n > most:
                    raise _too_large(bytes(buf[pos:pos + 4]), n, most)
                stop = pos + 4 + n
                if stop > end:
                    break
                try:
                    append(decode(view[pos + 4 : stop]))
                except msgspec.DecodeError as exc:
                    raise FrameError(f"malformed frame: {self._problem(exc, view[pos + 4 : stop])}") from None
                except RecursionError:  # (arrays nested ~1,000 deep in an ignored trailing field: review 153,
                    # uncaught, it ended the connection unanswered, the frames before it lost, a traceback each)
                    raise FrameError("malformed frame: nested too deeply") from None
                pos = stop
                left -= 1
                if not left:
                    break
        except FrameError as exc:
            exc.messages = out
            raise
        finally:
            view.release()
        if pos:
            del buf[:pos]
        return out

    def _problem(self, exc: msgspec.DecodeError, frame: memoryview) -> str:
        """Why a frame did not decode, naming the message and field (`Admit.flow: expected a string,
        got an integer`) rather than msgspec's array position (`$[2]`)."""
        message = str(exc)
        if message == "Input data was truncated":
            return "the frame ends inside its message" if len(frame) else "the frame is empty"
        if message == "Invalid UTF-8 encoded string":
            return "a string is not valid UTF-8"
        syntax, sep, detail = message.partition("MessagePack data is malformed: ")
        if sep and not syntax:
            return f"not valid msgpack: {detail}"
        tag = _peek_tag(frame)
        layout = self._layouts.get(tag) if isinstance(tag, int) else None
        if layout is None:
            if isinstance(tag, int) and not isinstance(tag, bool):
                known = ", ".join(f"{t} ({name})" for t, (name, _) in self._layouts.items())
                return f"message type: {tag} is not one of {known}"
            return shape_problem(exc, positions=("message type",), what="a frame",
                                 want_root="a msgpack array (a tagged message)")
        name, fields = layout
        return shape_problem(exc, positions=("message type", *(f"{name}.{f}" for f in fields)),
                             what=f"the {name} frame", want_root="a msgpack array")

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)
