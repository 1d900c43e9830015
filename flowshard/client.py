"""The async Python client of the binary protocol (asyncio or uvloop).

    async with Client.connect("127.0.0.1", 8081) as c:      # or: c = await Client.connect(...)
        r = await c.admit("tenant-a", priority=1, size=2048)
        if r.dispatched:
            try:
                ...                                             # call the backend
            finally:
                await c.release(r.ticket)

One connection carries any number of admissions in flight: each gets a correlation id, and the
frames produced in one event-loop pass go out in one write. `admit` and `release` return Futures
(no Task, no coroutine per call), so thousands can be pipelined cheaply with `asyncio.gather` or
done-callbacks.

The connection is the lease: when it closes (`close()`, leaving the `async with`, the process
dying), the service cancels the admissions still pending on it and releases every ticket it holds.
Keep the client open for as long as you hold tickets.

The service closes a connection that holds nothing (no ticket, no call waiting) and has sent nothing
for its `idle_timeout` (75 s; its `header_timeout`, 10 s, before the first call), saying that it read
nothing it did not answer (`Error(-2, 408)`): the client then opens a new connection when it next has
something to send, and sends again whatever had crossed the close on its way, in the order the calls
were made, unseen by its callers — unless that connection is refused (past the service's
max_connections: ConnectionClosed, status 503) or not opened within `dead_peer_timeout`.
"""

from __future__ import annotations

import asyncio
import collections
import operator
from collections.abc import Generator
from types import TracebackType
from typing import Any

import msgspec

from flowshard.codec import (
    IDLE_CLOSE,
    Admit,
    Audited,
    FrameError,
    FrameReader,
    FrameWriter,
    Release,
    Released,
    Result,
    ToClient,
)
from flowshard.keepalive import detect_dead_peers
from flowshard.types import Outcome

__all__ = ["AdmitResult", "Client", "ConnectionClosed", "FlowshardError", "ServiceView"]

_OUTCOMES = {int(o): o for o in Outcome}
_I64 = 1 << 63


class ServiceView(msgspec.Struct, frozen=True, gc=False):
    """What the service knows of an admission (`admit(..., audit=True)`): its arrival sequence number
    at the distributor, the shard that held it (-1: none), and the service's time.monotonic() seconds
    when the distributor received it, its shard queued it and it was dispatched (0: never), and when
    that dispatch was committed (`decided`: the instant the service's priority-inversion count judges
    it by; 0 from a service that does not send it)."""

    seq: int
    shard: int
    received: float
    enqueued: float
    dispatched: float
    decided: float = 0.0


class AdmitResult(msgspec.Struct, frozen=True, gc=False):
    """The outcome of an admission. `ticket` (dispatched only) must be released when the work ends;
    `retry_after` (seconds, rejections and evictions) is the service's back-off hint; `service` is set
    when the admission asked for an audit."""

    outcome: Outcome
    ticket: int = 0
    wait: float = 0.0
    retry_after: int = 0
    service: ServiceView | None = None

    @property
    def dispatched(self) -> bool:
        return self.outcome is Outcome.DISPATCHED


class FlowshardError(Exception):
    """The service refused one call: `status` is HTTP-like (422 invalid field, 429 too many in flight,
    400 duplicate id, 500 service failure); `message` says why (and names the field for 422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class ConnectionClosed(ConnectionError):
    """The connection is gone; every call pending on it (and any later call) fails with this.
    `status`/`message` are set when the service said why (400 malformed frame, 503 too many
    connections); `status` is 0 for a local close or a lost connection."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message


class Client:
    """One binary-protocol connection. Create it with `Client.connect(host, port)`."""

    __slots__ = ("_address", "_admits", "_calls", "_closed", "_flush_scheduled", "_loop", "_lost", "_next_id",
                 "_out", "_protocol", "_reader", "_reason", "_redial", "_releases", "_transport")

    def __init__(self, loop: asyncio.AbstractEventLoop, address: tuple[str, int, float] = ("", 0, 0.0)) -> None:
        """Internal: use `Client.connect`."""
        self._loop = loop
        self._address = address  # host, port, dead_peer_timeout: where a connection closed idle is opened again
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None  # the connection's; callbacks from an earlier one are ignored
        self._redial: asyncio.Task[None] | None = None  # opening a connection after an idle close
        self._reader = FrameReader(ToClient)
        self._out = FrameWriter()
        self._flush_scheduled = False
        self._next_id = 0
        # Every call without its reply, with its frame and its place among the calls (sent again, in
        # their order, after an idle close)
        self._calls = 0
        self._admits: dict[int, tuple[asyncio.Future[AdmitResult], Admit, int]] = {}
        # Released replies come in the order of the Release frames: FIFO, None for our own releases
        self._releases: collections.deque[tuple[asyncio.Future[bool] | None, Release, int]] = collections.deque()
        self._closed = False
        self._reason: ConnectionClosed | None = None
        self._lost: asyncio.Future[None] = loop.create_future()

    @staticmethod
    def connect(host: str, port: int, *, dead_peer_timeout: float = 60.0) -> _Connecting:
        """Open a connection: `c = await Client.connect(h, p)` or `async with Client.connect(h, p) as c:`.

        `dead_peer_timeout`: if the service's host stops answering (it crashed, or the network is cut),
        the connection fails within about this many seconds, and every call still waiting on it
        raises ConnectionClosed (0: the kernel's defaults, under which they waited for ever); so does
        a connection opened again after an idle close that is not open within it."""
        return _Connecting(host, port, dead_peer_timeout)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ------------------------------------------------------------ calls

    def admit(
        self, flow: str, priority: int = 0, size: int = 0, ttl: float = 0.0, slo: float = 0.0, tokens: int = 0,
        weight: float = 0.0, audit: bool = False,
    ) -> asyncio.Future[AdmitResult]:
        """Ask to admit a request of `size` bytes; the Future resolves when it has an outcome.

        `ttl`/`slo` in seconds (0: the configured default TTL / no SLO), `tokens` 0: not declared,
        `weight` 0: the flow's configured weight (a flow has its latest request's weight);
        `audit`: the result carries the service's view of the request (`AdmitResult.service`). The
        Future raises FlowshardError when the service refuses the call (invalid field: 422) and
        ConnectionClosed when the connection is gone; the
        call itself raises TypeError/ValueError for values the wire cannot carry. Cancelling the
        Future does not cancel the admission (the protocol has no such message); if it is then
        dispatched, its ticket is released at once.
        """
        if self._closed:
            raise self._closed_error()
        if not (
            type(flow) is str and type(priority) is int and type(size) is int and type(tokens) is int
            and type(ttl) is float and type(slo) is float and type(weight) is float
            and -_I64 <= priority < _I64 and -_I64 <= size < _I64 and -_I64 <= tokens < _I64
        ):
            # An unencodable value would corrupt the stream and cost every call on the connection.
            flow, priority, size, ttl, slo, tokens, weight = _coerce(flow, priority, size, ttl, slo, tokens, weight)
        if audit is not True and audit is not False:  # (a review: `audit="yes"` was taken as True)
            if audit not in (True, False):  # (1, 0 and numpy's booleans are True and False: as ints elsewhere)
                raise TypeError(f"audit: expected True or False, got {audit!r:.40}")
            audit = bool(audit)
        cid = self._next_id
        self._next_id = cid + 1
        # encoded first: a flow id the wire cannot carry (a lone surrogate) raises with nothing registered
        msg = Admit(cid, flow, priority, size, ttl, slo, tokens, weight, audit)
        self._send(msg)
        fut: asyncio.Future[AdmitResult] = self._loop.create_future()
        self._calls += 1
        self._admits[cid] = (fut, msg, self._calls)
        return fut

    def release(self, ticket: int, tokens: int | None = None) -> asyncio.Future[bool]:
        """Free a dispatched request's ticket; resolves to False if it was unknown or already released.

        `tokens`: the request's actual cost (e.g. tokens generated); the service corrects its flow's VTC
        counter by the difference to the declared cost."""
        if self._closed:
            raise self._closed_error()
        ticket = _int("ticket", ticket)
        actual = -1
        if tokens is not None:
            actual = _int("tokens", tokens)
            if not 0 <= actual <= 1 << 32:
                raise ValueError(f"tokens: {actual} is outside [0, 2^32]")
        fut: asyncio.Future[bool] = self._loop.create_future()
        msg = Release(ticket, actual)
        self._calls += 1
        self._releases.append((fut, msg, self._calls))
        self._send(msg)
        return fut

    async def close(self) -> None:
        """Close the connection and wait until it is closed. The service releases every ticket this
        client holds; admissions still pending fail with ConnectionClosed."""
        if not self._closed:
            self._flush()
            self._shut(ConnectionClosed("client closed"), quiet=True)
        await asyncio.shield(self._lost)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def in_flight(self) -> int:
        """Admissions sent and not yet answered."""
        return len(self._admits)

    # ------------------------------------------------------------ protocol side

    def _data_received(self, data: bytes) -> None:
        try:
            messages = self._reader.feed(data)
        except FrameError as exc:
            self._shut(ConnectionClosed(f"malformed reply from the service: {exc}"))
            return
        admits = self._admits
        for msg in messages:
            kind = type(msg)
            if kind is Result or kind is Audited:
                entry = admits.pop(msg.id, None)
                if entry is None:
                    continue
                fut = entry[0]
                if fut.done():  # cancelled by the caller: do not keep a ticket nobody will release
                    if msg.ticket and msg.outcome == Outcome.DISPATCHED:
                        release = Release(msg.ticket)
                        self._calls += 1
                        self._releases.append((None, release, self._calls))
                        self._send(release)
                    continue
                outcome = _OUTCOMES.get(msg.outcome)
                if outcome is None:
                    fut.set_exception(FlowshardError(502, f"unknown outcome {msg.outcome} from the service"))
                    continue
                view = None
                if kind is Audited:
                    view = ServiceView(msg.seq, msg.shard, msg.received, msg.enqueued, msg.dispatched, msg.decided)
                fut.set_result(AdmitResult(outcome, msg.ticket, msg.wait, msg.retry_after, view))
            elif kind is Released:
                if not self._releases:
                    continue
                rfut = self._releases.popleft()[0]
                if rfut is not None and not rfut.done():
                    rfut.set_result(msg.ok)
            elif msg.id >= 0:
                entry = admits.pop(msg.id, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_exception(FlowshardError(msg.status, msg.message))
            elif msg.id == IDLE_CLOSE:  # it held nothing: what it has not answered it has not read
                self._idle_closed()
                return
            else:  # about the connection; the service closes it after this frame
                self._shut(ConnectionClosed(msg.message, msg.status))
                return

    def _idle_closed(self) -> None:
        """The service closed the connection idle: a new one is opened when there is something to send
        (now, if calls crossed the close on their way: they were not read)."""
        if self._transport is not None:
            self._transport.close()
        self._transport = self._protocol = None  # (its connection_lost is ignored: `_Protocol`)
        self._reader = FrameReader(ToClient)
        if self._unsent():
            self._dial_again()

    def _unsent(self) -> list[Admit | Release]:
        """The frames of the calls without their reply, in the order they were made (those whose caller
        cancelled the Future are dropped: never read, nobody waits for them)."""
        for cid in [cid for cid, (fut, _, _) in self._admits.items() if fut.done()]:
            del self._admits[cid]
        calls = [(n, msg) for _, msg, n in self._admits.values()] + [(n, msg) for _, msg, n in self._releases]
        return [msg for _, msg in sorted(calls, key=operator.itemgetter(0))]

    def _dial_again(self) -> None:
        if self._redial is None and not self._closed:
            self._redial = self._loop.create_task(self._reopen())

    async def _reopen(self) -> None:
        """Open a connection again after an idle close and send every call without its reply, in their
        order. If it cannot be opened within `dead_peer_timeout` (as a lost connection fails within it),
        the client is closed with the reason; if the service refuses it (503, max_connections), so are
        the calls waiting, as they would be on a first connect."""
        host, port, timeout = self._address
        if not self._unsent():  # (cancelled since it was asked for)
            self._redial = None
            return
        protocol = self._protocol = _Protocol(self)  # current from the start: its first bytes count (uvloop)
        opened: asyncio.Transport | None = None
        try:
            connecting = self._loop.create_connection(lambda: protocol, host, port)
            transport, _ = await asyncio.wait_for(connecting, timeout or None)
            opened = transport
            sock = transport.get_extra_info("socket")
            if sock is not None:
                detect_dead_peers(sock, timeout)
        except (OSError, TimeoutError) as exc:
            if opened is not None:  # (open, but its keepalive could not be set)
                opened.close()
            self._redial = None
            if self._protocol is protocol:
                self._protocol = None
            why = exc if str(exc) else f"no answer within {timeout:g} s"
            self._shut(ConnectionClosed(f"could not connect again after the service closed the idle connection: {why}"))
            return
        self._redial = None
        if self._closed or self._protocol is not protocol:  # closed meanwhile (or refused: `_shut`)
            transport.close()
            return
        frames = self._unsent()
        if not frames:  # every call waiting was cancelled meanwhile: no connection held for nothing
            self._protocol = None
            transport.close()
            return
        self._transport = transport
        self._out.take()  # (frames of calls made meanwhile: each is among those)
        for msg in frames:
            self._out.add(msg)
        self._flush()

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._reason is None:
            self._reason = ConnectionClosed(f"connection lost: {exc}" if exc else "connection closed by the service")
        self._closed = True
        self._fail_pending()
        if not self._lost.done():
            self._lost.set_result(None)

    def _send(self, message: Admit | Release) -> None:
        if self._transport is None:  # closed idle: opened again (`_reopen`)
            self._dial_again()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        self._out.add(message)

    def _flush(self) -> None:
        """Write every frame of this loop pass in one call."""
        self._flush_scheduled = False
        transport = self._transport
        if self._out and transport is not None and not transport.is_closing():
            transport.write(self._out.take())

    def _shut(self, reason: ConnectionClosed, quiet: bool = False) -> None:
        if self._reason is None:
            self._reason = reason
        self._closed = True
        if self._transport is not None:
            self._transport.close()
        elif not self._lost.done():  # no connection to lose (closed idle; one opening is closed when open)
            self._lost.set_result(None)
        self._fail_pending(quiet)

    def _fail_pending(self, quiet: bool = False) -> None:
        """Fail the calls still without a reply. `quiet`: the caller closed the client with them pending,
        so one nobody awaits is not logged as "Future exception was never retrieved" (a review: one line
        and a traceback per pending admission); whoever awaits one still gets the ConnectionClosed."""
        admits, self._admits = self._admits, {}
        releases, self._releases = self._releases, collections.deque()
        for fut, _, _ in (*admits.values(), *releases):
            if fut is not None and not fut.done():
                fut.set_exception(self._closed_error())
                if quiet:
                    fut.exception()  # (marks it retrieved)

    def _closed_error(self) -> ConnectionClosed:
        """A fresh exception per call (one shared instance would collect every caller's traceback)."""
        reason = self._reason or ConnectionClosed("client closed")
        return ConnectionClosed(reason.message, reason.status)


class _Protocol(asyncio.Protocol):
    """Forwards transport callbacks, so the public Client shows no Protocol methods."""

    __slots__ = ("_client",)

    def __init__(self, client: Client) -> None:
        self._client = client

    def data_received(self, data: bytes) -> None:
        if self._client._protocol is self:  # (not one closed idle)
            self._client._data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._client._protocol is self:
            self._client._connection_lost(exc)


class _Connecting:
    """What `Client.connect` returns: awaitable, or an async context manager that closes the client."""

    __slots__ = ("_client", "_dead_peer_timeout", "_host", "_port")

    def __init__(self, host: str, port: int, dead_peer_timeout: float) -> None:
        self._host = host
        self._port = port
        self._dead_peer_timeout = dead_peer_timeout
        self._client: Client | None = None

    async def _open(self) -> Client:
        timeout = self._dead_peer_timeout
        if not (timeout == 0 or 1 <= timeout <= 3600):  # (also false for NaN; the kernel refuses more)
            raise ValueError(f"dead_peer_timeout: {timeout!r} is neither 0 (off) nor 1 to 3600 seconds")
        loop = asyncio.get_running_loop()
        client = Client(loop, (self._host, self._port, timeout))
        protocol = client._protocol = _Protocol(client)
        transport, _ = await loop.create_connection(lambda: protocol, self._host, self._port)
        client._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                detect_dead_peers(sock, timeout)
            except OSError:
                transport.close()
                raise
        return client

    def __await__(self) -> Generator[Any, None, Client]:
        return self._open().__await__()

    async def __aenter__(self) -> Client:
        self._client = await self._open()
        return self._client

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._client is not None:
            await self._client.close()


def _int(name: str, value: Any) -> int:
    try:
        value = operator.index(value)  # int, bool, numpy integers; not floats or strings
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}") from None
    if not -_I64 <= value < _I64:
        raise ValueError(f"{name}: {value} does not fit in 64 bits")
    return int(value)


def _float(name: str, value: Any) -> float:
    if not isinstance(value, str | bytes | bytearray):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise TypeError(f"{name}: expected a number, got {type(value).__name__}")


def _coerce(
    flow: Any, priority: Any, size: Any, ttl: Any, slo: Any, tokens: Any, weight: Any
) -> tuple[str, int, int, float, float, int, float]:
    """The slow path of `admit`: plain Python types for everything msgspec must encode."""
    if not isinstance(flow, str):
        raise TypeError(f"flow: expected a string, got {type(flow).__name__}")
    return (
        str(flow), _int("priority", priority), _int("size", size), _float("ttl", ttl), _float("slo", slo),
        _int("tokens", tokens), _float("weight", weight),
    )
