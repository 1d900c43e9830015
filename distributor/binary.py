"""The public binary protocol: many admissions in flight on one TCP connection (DESIGN §7, §8).

Next to HTTP/JSON this front exists for throughput: a client pipelines admissions on one connection,
each carrying its own correlation id, and the replies produced in one event-loop pass leave in one
`transport.write` (per-frame writes cost ~10x more CPU and wake-ups, see the machine-limits notes).

The connection is also the lease (DESIGN §6): when it closes, every admission still pending on it is
cancelled and every ticket it holds is released. One `asyncio.Protocol` per connection, callback
style: the distributor delivers outcomes by calling `deliver`, no Task or Future per request.

Replies (service -> client): `Result(id, outcome, ticket, wait, retry_after)` for an admission;
`Released(ticket, ok)` for a release; `Error(id, status, message)` where `status` is HTTP-like:
422 invalid field (the message names it), 400 duplicate in-flight id, 429 too many in flight on
this connection, 500 the distributor failed on this request. `Error(-1, ...)` is about the
connection, which is closed right after: 400 malformed or oversized frame, 503 too many connections.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, cast

from distributor.api import Admission
from flowshard.codec import Admit, Error, FrameError, FrameReader, FrameWriter, FromClient, Released, Result
from flowshard.types import Outcome
from flowshard.validate import check_admit

log = logging.getLogger(__name__)

_NOT_YET = -1  # request id of an admission whose `admit` call has not returned yet


@dataclass(frozen=True, slots=True)
class BinaryLimits:
    """What one service instance accepts from binary clients.

    `max_write_buffer`: replies queued for a client that does not read; beyond it the client is
    dropped (its tickets are released), rather than letting one slow reader hold service memory.
    The default holds the replies of a full in-flight window (~30 bytes each) twice over.
    """

    max_connections: int = 4096
    max_inflight_per_connection: int = 65536
    max_frame: int = 65536
    max_write_buffer: int = 4 << 20


class _Hub:
    """State shared by the connections of one server."""

    __slots__ = ("admission", "connections", "limits", "loop")

    def __init__(self, admission: Admission, limits: BinaryLimits, loop: asyncio.AbstractEventLoop) -> None:
        self.admission = admission
        self.limits = limits
        self.loop = loop
        self.connections = 0


async def start_binary_server(
    admission: Admission, host: str, port: int, limits: BinaryLimits | None = None
) -> asyncio.Server:
    """Listen for binary-protocol clients (port 0: any free port, see `server.sockets`)."""
    loop = asyncio.get_running_loop()
    hub = _Hub(admission, limits or BinaryLimits(), loop)
    return await loop.create_server(lambda: BinaryConnection(hub), host, port, backlog=1024)


class BinaryConnection(asyncio.Protocol):
    """One client connection; the distributor's `Waiter` for every admission it carries."""

    __slots__ = (
        "_admission", "_counted", "_flush_scheduled", "_hub", "_lost", "_max_inflight", "_open", "_out", "_pending",
        "_reader", "_transport",
    )

    def __init__(self, hub: _Hub) -> None:
        self._hub = hub
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

    # ------------------------------------------------------------ transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        hub = self._hub
        if hub.connections >= hub.limits.max_connections:
            self._send(Error(-1, 503, f"too many connections (limit {hub.limits.max_connections})"))
            self._flush()
            transport.close()
            return
        hub.connections += 1
        self._counted = True
        self._open = True
        transport.set_write_buffer_limits(high=hub.limits.max_write_buffer)

    def data_received(self, data: bytes) -> None:
        if not self._open:
            return
        try:
            messages = self._reader.feed(data)
        except FrameError as exc:
            self._fail(str(exc))
            return
        for msg in messages:
            if type(msg) is Admit:
                self._admit(msg)
            else:
                ticket = msg.ticket
                self._send(Released(ticket, self._admission.release(ticket)))

    def pause_writing(self) -> None:
        # Replies pile up beyond max_write_buffer: the client does not read. Drop it (abort: a
        # graceful close would wait for it to read); connection_lost releases what it holds.
        if self._open and self._transport is not None:
            log.warning("binary client %s does not read its replies: closing", self._peer())
            self._open = False
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._open = False
        if self._lost:
            return
        self._lost = True
        if not self._counted:  # refused in connection_made: it never admitted anything
            return
        self._hub.connections -= 1
        pending, self._pending = self._pending, {}
        admission = self._admission
        for request_id in pending.values():
            try:
                admission.cancel(request_id)
            except Exception:
                log.exception("cancel(%d) failed for a closed binary connection", request_id)
        try:
            admission.release_all(self)
        except Exception:
            log.exception("release_all failed for a closed binary connection")

    # ------------------------------------------------------------ Waiter

    def deliver(self, cid: Any, request_id: int, outcome: Outcome, ticket: int, wait: float, retry_after: int) -> None:
        """The outcome of admission `cid`, written with the other replies of this loop pass."""
        if self._pending.pop(cid, None) is None:
            if self._lost and ticket:
                # A dispatch delivered after the connection closed breaks the `cancel` contract;
                # release it anyway so no capacity leaks (invariant 6).
                log.error("dispatch of request %d delivered to a closed binary connection", request_id)
                self._admission.release(ticket)
            return
        if self._open:
            self._send(Result(cid, outcome, ticket, wait, retry_after))  # msgspec encodes an IntEnum as its value

    # ------------------------------------------------------------ internals

    def _admit(self, msg: Admit) -> None:
        cid = msg.id
        pending = self._pending
        if cid in pending:
            self._send(Error(cid, 400, f"id: {cid} is already in flight on this connection"))
            return
        if len(pending) >= self._max_inflight:
            limit = self._max_inflight
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
            request_id = self._admission.admit(
                self, cid=cid, flow=msg.flow, priority=msg.priority, size=msg.size, ttl=msg.ttl, slo=msg.slo,
                tokens=msg.tokens, weight=msg.weight, leased=False,
            )
        except Exception:
            log.exception("admit failed for a binary client")
            if pending.pop(cid, None) is not None and self._open:
                self._send(Error(cid, 500, "internal error while admitting"))
            return
        if cid in pending:
            pending[cid] = request_id

    def _send(self, message: Result | Error | Released) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._hub.loop.call_soon(self._flush)
        self._out.add(message)

    def _flush(self) -> None:
        """Write every reply of this loop pass in one call."""
        self._flush_scheduled = False
        transport = self._transport
        if self._out and transport is not None and not transport.is_closing():
            transport.write(self._out.take())

    def _fail(self, message: str) -> None:
        """A protocol error: say why, then close (pending admissions are cancelled on connection_lost)."""
        log.info("binary client %s: %s: closing", self._peer(), message)
        self._send(Error(-1, 400, message))
        self._flush()
        self._open = False
        if self._transport is not None:
            self._transport.close()

    def _peer(self) -> Any:
        return self._transport.get_extra_info("peername") if self._transport is not None else None
