"""Tests of the binary-protocol server (DESIGN §6 tickets, §7 batched frames, §8 binary protocol).

Real sockets on 127.0.0.1 against `FakeAdmission`, which decides outcomes by flow name and records
every call the server makes. Raw frames here, so the server is tested without the client library.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
import uvloop
from fakes import AnswersAtOnce

from distributor.binary import BinaryConnection, BinaryLimits, start_binary_server
from flowshard.codec import (
    Admit,
    Audited,
    Error,
    FrameError,
    FrameReader,
    FrameWriter,
    Release,
    Released,
    ReleaseRefused,
    Result,
    ToClient,
)
from flowshard.types import Outcome

TIMEOUT = 2.0

# Flows that the fake answers with something other than an immediate dispatch.
FLOW_OUTCOMES = {
    "capacity": Outcome.REJECTED_CAPACITY,
    "draining": Outcome.REJECTED_SHUTTING_DOWN,
    "ttl": Outcome.EVICTED_TTL,
    "displaced": Outcome.EVICTED_DISPLACED,
    "shard-failure": Outcome.EVICTED_SHARD_FAILURE,
}
HOLD = "hold"  # the fake keeps these pending until the test completes them
BOOM = "boom"  # the fake raises in admit


class FakeAdmission(AnswersAtOnce):
    """An `Admission` that records everything. Tickets are 1000 + request id."""

    accepting = True
    ready = True

    def __init__(self) -> None:
        self.next_id = 1
        self.held: dict[int, tuple[Any, Any, int]] = {}  # request id -> (waiter, cid, size)
        self.tickets: dict[int, Any] = {}  # live ticket -> waiter
        self.ticket_size: dict[int, int] = {}
        self.waiters: list[Any] = []
        self.cancels: list[int] = []
        self.releases: list[int] = []
        self.release_alls: list[Any] = []
        self.seen = asyncio.Event()  # set at every admit

    def admit(
        self,
        waiter: Any,
        cid: Any,
        flow: str,
        priority: int,
        size: int,
        ttl: float,
        slo: float,
        tokens: int,
        weight: float,
        leased: bool,
        audit: bool = False,
    ) -> int:
        assert leased is False
        rid = self.next_id
        self.next_id += 1
        if waiter not in self.waiters:
            self.waiters.append(waiter)
        self.seen.set()
        if flow == BOOM:
            raise RuntimeError("boom")
        if flow == HOLD:
            self.held[rid] = (waiter, cid, size)
        else:
            self._finish(rid, waiter, cid, size, FLOW_OUTCOMES.get(flow, Outcome.DISPATCHED))
        return rid

    def complete(self, rid: int, outcome: Outcome = Outcome.DISPATCHED) -> None:
        waiter, cid, size = self.held.pop(rid)
        self._finish(rid, waiter, cid, size, outcome)

    def _finish(self, rid: int, waiter: Any, cid: Any, size: int, outcome: Outcome) -> None:
        ticket = 0
        if outcome is Outcome.DISPATCHED:
            ticket = 1000 + rid
            self.tickets[ticket] = waiter
            self.ticket_size[ticket] = size
        retry_after = 0 if outcome is Outcome.DISPATCHED else 3
        waiter.deliver(cid, rid, outcome, ticket, 0.25, retry_after)

    def cancel(self, request_id: int) -> None:
        self.cancels.append(request_id)
        self.held.pop(request_id, None)

    def release(self, ticket: int, tokens: int = -1) -> bool:
        self.releases.append(ticket)
        return self.tickets.pop(ticket, None) is not None

    def release_all(self, waiter: Any) -> int:
        self.release_alls.append(waiter)
        mine = [t for t, w in self.tickets.items() if w is waiter]
        for t in mine:
            del self.tickets[t]
        return len(mine)

    def holds(self, waiter: Any) -> bool:
        return any(w is waiter for w in self.tickets.values())

    def stats(self) -> dict[str, Any]:
        return {}

    def metrics(self) -> tuple[bytes, str]:
        return b"", "text/plain"

    async def wait_held(self, n: int) -> None:
        while len(self.held) < n:
            self.seen.clear()
            await self.seen.wait()


def on_loop(factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop) -> Any:
    """Run an async test on a fresh loop (uvloop unless told), failing it after TIMEOUT seconds."""

    def decorate(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(asyncio.wait_for(fn(*args, **kwargs), TIMEOUT))

        return wrapper

    return decorate


@contextlib.asynccontextmanager
async def serving(
    admission: Any, limits: BinaryLimits | None = None, guards: Any = None
) -> AsyncIterator[tuple[str, int]]:
    server = await start_binary_server(admission, "127.0.0.1", 0, limits, guards)
    try:
        yield "127.0.0.1", server.sockets[0].getsockname()[1]
    finally:
        server.close()


class Raw:
    """A peer speaking raw frames: for what the client library (or the server) would never send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, kind: Any = ToClient) -> None:
        self.reader = reader
        self.writer = writer
        self.frames = FrameReader(kind)
        self.got: list[Any] = []

    @classmethod
    async def open(cls, addr: tuple[str, int]) -> Raw:
        return cls(*await asyncio.open_connection(*addr))

    async def send(self, *messages: Any) -> None:
        w = FrameWriter()
        for m in messages:
            w.add(m)
        await self.send_bytes(w.take())

    async def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, n: int) -> list[Any]:
        """The next n replies."""
        while len(self.got) < n:
            data = await self.reader.read(4096)
            assert data, f"connection closed after {self.got}"
            self.got += self.frames.feed(data)
        out, self.got = self.got[:n], self.got[n:]
        return out

    async def recv_until_eof(self) -> list[Any]:
        """Every reply until the service closes the connection."""
        while data := await self.reader.read(4096):
            self.got += self.frames.feed(data)
        self.writer.close()
        out, self.got = self.got, []
        return out

    def close(self) -> None:
        self.writer.close()


async def until(cond: Callable[[], bool]) -> None:
    while not cond():
        await asyncio.sleep(0.001)


# ---------------------------------------------------------------------------------------------- admit


@on_loop()
async def test_admit_dispatched_and_other_outcomes() -> None:
    fake = FakeAdmission()
    async with serving(fake) as addr:
        raw = await Raw.open(addr)
        await raw.send(Admit(7, "a", size=100), Admit(8, "capacity"), Admit(9, "ttl", ttl=1.5))
        replies = {r.id: r for r in await raw.recv(3)}
        assert replies[7] == Result(7, int(Outcome.DISPATCHED), 1001, 0.25, 0)
        assert replies[8] == Result(8, int(Outcome.REJECTED_CAPACITY), 0, 0.25, 3)
        assert replies[9] == Result(9, int(Outcome.EVICTED_TTL), 0, 0.25, 3)
        assert fake.ticket_size == {1001: 100}
        raw.close()


@pytest.mark.parametrize(
    ("admit", "field"),
    [
        (Admit(1, "a", size=-1), "size"),
        (Admit(1, ""), "flow"),
        (Admit(1, "a", ttl=math.nan), "ttl"),
        (Admit(1, "a", slo=-1.0), "slo"),
        (Admit(1, "a", weight=math.inf), "weight"),
        (Admit(1, "a", priority=1 << 40), "priority"),
        (Admit(1, "x" * 300), "flow"),
    ],
)
@on_loop()
async def test_invalid_admit_is_422_naming_the_field_and_the_connection_serves_on(admit: Admit, field: str) -> None:
    fake = FakeAdmission()
    async with serving(fake) as addr:
        raw = await Raw.open(addr)
        await raw.send(admit)
        [err] = await raw.recv(1)
        assert type(err) is Error and err.id == 1 and err.status == 422
        assert err.message.startswith(f"{field}:"), err.message
        assert fake.next_id == 1  # never became a request
        await raw.send(Admit(2, "a"))
        [ok] = await raw.recv(1)
        assert type(ok) is Result and ok.id == 2 and ok.outcome == Outcome.DISPATCHED
        raw.close()


@on_loop()
async def test_duplicate_in_flight_id_is_400_and_reusable_once_answered() -> None:
    fake = FakeAdmission()
    async with serving(fake) as addr:
        raw = await Raw.open(addr)
        await raw.send(Admit(5, HOLD), Admit(5, "a"))
        [err] = await raw.recv(1)
        assert type(err) is Error and (err.id, err.status) == (5, 400)
        assert list(fake.held) == [1] and fake.next_id == 2  # the duplicate was not admitted
        fake.complete(1)
        [res] = await raw.recv(1)
        assert type(res) is Result and res.id == 5 and res.ticket == 1001
        await raw.send(Admit(5, "a"))  # answered: the id is free again
        [res] = await raw.recv(1)
        assert type(res) is Result and res.id == 5 and res.ticket == 1002
        raw.close()


@on_loop()
async def test_too_many_in_flight_is_429() -> None:
    from distributor.guards import Guards

    fake = FakeAdmission()
    guards = Guards()
    async with serving(fake, BinaryLimits(max_inflight_per_connection=3), guards) as addr:
        raw = await Raw.open(addr)
        await raw.send(*(Admit(i, HOLD) for i in range(4)))
        [err] = await raw.recv(1)
        assert type(err) is Error and (err.id, err.status) == (3, 429)
        assert len(fake.held) == 3
        assert guards[("binary", "too_many_pending")] == 1  # a protective action, counted (review 2026-12-05)
        fake.complete(1)
        await raw.recv(1)
        await raw.send(Admit(9, "a"))  # room again
        [res] = await raw.recv(1)
        assert type(res) is Result and res.id == 9
        raw.close()


@on_loop()
async def test_admit_that_raises_is_500_and_the_connection_serves_on() -> None:
    fake = FakeAdmission()
    async with serving(fake) as addr:
        raw = await Raw.open(addr)
        await raw.send(Admit(1, BOOM), Admit(2, "a"))
        err, res = await raw.recv(2)
        assert type(err) is Error and (err.id, err.status) == (1, 500)
        assert type(res) is Result and res.id == 2
        raw.close()
        await until(lambda: bool(fake.release_alls))
        assert fake.cancels == []  # the failed admission is not pending


@on_loop()
async def test_release_ok_then_false() -> None:
    fake = FakeAdmission()
    async with serving(fake) as addr:
        raw = await Raw.open(addr)
        await raw.send(Admit(1, "a"))
        [res] = await raw.recv(1)
        await raw.send(Release(res.ticket), Release(res.ticket), Release(424242))
        assert await raw.recv(3) == [Released(res.ticket, True), Released(res.ticket, False), Released(424242, False)]
        raw.close()


class ReleasedFull(msgspec.Struct, tag=14, array_like=True):
    """A Released frame as a peer reading its trailing fields sees it (a refused Release's status and
    message: `flowshard.codec.ReleaseRefused`)."""

    ticket: int
    ok: bool
    status: int = 0
    message: str = ""


FULL = Result | Error | ReleasedFull | Audited  # what a raw peer reads, trailing fields included


class LinkLike(FakeAdmission):
    """Answers releases and `after` later, in order, when the test says (`answer`): as an acceptor's
    link does, a round trip after (distributor.front.Upstream)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Callable[[], None]] = []

    def release_then(self, ticket: int, tokens: int, done: Any, failed: Any = None) -> None:
        self.waiting.append(lambda: done(ticket, self.release(ticket)))

    def after(self, done: Any) -> None:
        self.waiting.append(done)

    def answer(self) -> None:
        waiting, self.waiting = self.waiting, []
        for answer in waiting:
            answer()


@pytest.mark.parametrize("link", [False, True], ids=["answered-at-once", "answered-later"])
@on_loop()
async def test_release_tokens_out_of_range_is_refused_422_naming_the_field_as_http_does(link: bool) -> None:
    """Review 18: binary took any 64-bit Release.tokens (and dropped it silently); HTTP answers 422
    outside [0, 2^32] and keeps the ticket. The binary answer is Released(ticket, false) with a 422 and
    the message as trailing fields, in its turn among the connection's releases; -1 is "none"."""
    fake = LinkLike() if link else FakeAdmission()
    async with serving(fake) as addr:
        raw = Raw(*await asyncio.open_connection(*addr), kind=FULL)
        await raw.send(Admit(1, "a"))
        [res] = await raw.recv(1)
        t = res.ticket
        bad = [2**32 + 1, -5, 2**40, 2**63 - 1, -(2**63)]
        await raw.send(Release(424242), *(Release(t, tokens) for tokens in bad))
        if link:
            await until(lambda: len(fake.waiting) == 1 + len(bad))
            fake.answer()
        replies = await raw.recv(1 + len(bad))
        assert replies[0] == ReleasedFull(424242, False)
        for tokens, reply in zip(bad, replies[1:], strict=True):
            assert reply == ReleasedFull(t, False, 422, f"tokens: {tokens} is outside [0, 2^32]")
        w = FrameWriter()  # what a peer that knows only Released (the Python client) reads
        w.add(ReleaseRefused(t, False, 422, "tokens: -5 is outside [0, 2^32]"))
        assert FrameReader(ToClient).feed(w.take()) == [Released(t, False)]
        assert fake.releases == [424242] and t in fake.tickets  # not released
        await raw.send(Release(t, 2**32), Release(t, -1))
        if link:
            await until(lambda: len(fake.waiting) == 2)
            fake.answer()
        assert await raw.recv(2) == [ReleasedFull(t, True), ReleasedFull(t, False)]
        raw.close()


@pytest.mark.parametrize("link", [False, True], ids=["answered-at-once", "answered-later"])
@on_loop()
async def test_frames_before_a_malformed_one_in_the_same_read_are_handled_and_answered_first(link: bool) -> None:
    """Review 18: an Admit in the same read as a following malformed frame got no answer (the reader
    raised and lost it). Every frame before the bad one is handled in order; the answers decided then
    go out before Error(-1, 400), with acceptors too (after their round trip); an admission left
    waiting is cancelled with the connection."""
    fake = LinkLike() if link else FakeAdmission()
    async with serving(fake) as addr:
        raw = await Raw.open(addr)
        await raw.send(Admit(1, "a"))
        [first] = await raw.recv(1)
        w = FrameWriter()
        for m in (Admit(2, "a"), Release(first.ticket), Admit(3, HOLD), Admit(4, "capacity")):
            w.add(m)
        await raw.send_bytes(w.take() + b"\x00\x00\x00\x02\x91\x63")  # then [99]: not a message
        if link:
            await until(lambda: len(fake.waiting) == 2)  # the release, then the error's barrier
            fake.answer()
        replies = await raw.recv_until_eof()
        *answers, err = replies  # (an Admit's answer and a Release's may come in either order)
        assert sorted(map(repr, answers)) == sorted(map(repr, [
            Result(2, int(Outcome.DISPATCHED), 1002, 0.25, 0), Released(first.ticket, True),
            Result(4, int(Outcome.REJECTED_CAPACITY), 0, 0.25, 3)])), replies
        assert type(err) is Error and (err.id, err.status) == (-1, 400)
        assert err.message == "malformed frame: message type: 99 is not one of 10 (Admit), 11 (Release)"
        await until(lambda: bool(fake.release_alls))
        assert fake.cancels == [3]


# ---------------------------------------------------------------------------------------------- protocol errors

_ADMIT = msgspec.msgpack.encode(Admit(7, "a"))
_DEEP = bytes([_ADMIT[0] + 1]) + _ADMIT[1:] + b"\x91" * 5000 + b"\x90"  # one more field: [[[...]]]


@pytest.mark.parametrize(
    ("garbage", "message"),
    [
        (b"\x00\x00\x00\x03abc", "a frame must be a msgpack array (a tagged message), got an integer"),
        (b"\x00\x00\x00\x02\x91\x63", "message type: 99 is not one of 10 (Admit), 11 (Release)"),
        (b"\x00\x00\x00\x00", "the frame is empty"),
        (b"\x00\x00\x00\x01\xc1", "not valid msgpack: invalid opcode '\\xc1' (byte 0)"),
        (b"\x00\x00\x00\x03\x92\x0b\xa0", "Release.ticket: expected an integer, got a string"),  # [11, ""]
        (b"\x00\x00\x00\x03\x92\x0a\x01", "the Admit frame must be a msgpack array of at least length 3, got 2"),
        (b"\x00\x00\x00\x04\x93\x0a\x01\x05", "Admit.flow: expected a string, got an integer"),
        (b"\x00\x00\x00\x05\x93\x0a\x01\xa1\xff", "a string is not valid UTF-8"),
        (b"\xff" * 64, "frame of 4294967295 bytes exceeds the 65536-byte limit"),
        # frames that do not decode even as plain msgpack still name the field (a review: `[2]: ...`)
        (b"\x00\x00\x03\xec\x93\x0a\x01" + b"\x91" * 1000 + b"\xc0", "Admit.flow: expected a string, got an array"),
        (b"\x00\x00\x00\x05\x94\x0b\x05\xa1x", "Release.tokens: expected an integer, got a string"),  # cut short
        (b"\x00\x00\x00\x02\x91\xff", "message type: -1 is not one of 10 (Admit), 11 (Release)"),
        (b"\x00\x00\x00\x05\x93\xcc\x0a\x01\x02", "Admit.flow: expected a string, got an integer"),  # tag as uint8
        (b"\x00\x00\x00\x02\x90\x0a",  # an empty array, then a stray byte: no type
         "a frame must be a msgpack array (a tagged message) of at least length 1, got 0"),
        # arrays nested 5,000 deep in a trailing field (ignored, were it decodable): review 153, the
        # decoder's RecursionError ended the connection with no answer, its traceback logged each time
        (len(_DEEP).to_bytes(4, "big") + _DEEP, "nested too deeply"),
    ],
    ids=["not-a-message", "unknown-tag", "empty", "bad-msgpack", "wrong-type", "too-short", "wrong-type-admit",
         "invalid-utf8", "huge-length", "nested-too-deep", "cut-after-bad-field", "negative-tag", "uint8-tag",
         "empty-array", "nested-in-a-trailing-field"],
)
@on_loop()
async def test_malformed_frame_gets_error_then_close_and_others_are_served(garbage: bytes, message: str) -> None:
    fake = FakeAdmission()
    async with serving(fake) as addr:
        good = await Raw.open(addr)
        bad = await Raw.open(addr)
        await bad.send(Admit(1, HOLD))
        await fake.wait_held(1)
        await bad.send_bytes(garbage)
        replies = await bad.recv_until_eof()
        assert len(replies) == 1 and type(replies[0]) is Error, replies
        assert (replies[0].id, replies[0].status) == (-1, 400)
        prefix = "" if message.startswith("frame of") else "malformed frame: "
        assert replies[0].message == prefix + message  # named in our words, not msgspec's `$[2]`
        await until(lambda: bool(fake.release_alls))
        assert fake.cancels == [1]  # the pending admission of the closed connection
        await good.send(Admit(1, "a"))
        [res] = await good.recv(1)
        assert type(res) is Result and res.outcome == Outcome.DISPATCHED
        good.close()


@on_loop()
async def test_an_http_client_on_the_binary_port_is_told_in_http() -> None:
    """Review 107: curl on the binary port got an Error frame ("Received HTTP/0.9"), flowshard's client
    on the HTTP port "a frame of 1213486160 bytes". An HTTP request as a connection's first bytes is
    answered in HTTP, naming the ports; mid-stream, after frames of its own, it stays a frame error."""
    fake = FakeAdmission()
    async with serving(fake) as addr:
        reader, writer = await asyncio.open_connection(*addr)
        writer.write(b"GET /v1/stats HTTP/1.1\r\nhost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5.0)  # (to its EOF)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"connection: close" in head, answer
        assert body.startswith(b"this is flowshard's binary port") and b"HTTP port" in body, answer
        writer.close()
        late = await Raw.open(addr)
        await late.send(Admit(1, HOLD))
        await fake.wait_held(1)
        await late.send_bytes(b"POST / HTTP/1.1\r\n\r\n")
        [err] = await late.recv_until_eof()
        assert type(err) is Error and err.status == 400 and "the peer speaks HTTP ('POST'...)" in err.message, err
    reader = FrameReader(ToClient)
    with pytest.raises(FrameError) as caught:
        reader.feed(b"HTTP/1.1 400 Bad Request\r\n")
    assert caught.value.http and "speaks HTTP ('HTTP'...), not flowshard's binary protocol" in str(caught.value)


@on_loop()
async def test_result_frame_from_a_client_is_malformed() -> None:
    fake = FakeAdmission()
    async with serving(fake) as addr:
        raw = await Raw.open(addr)
        await raw.send(Result(1, 0))  # a valid frame of the other direction's union
        [err] = await raw.recv_until_eof()
        assert type(err) is Error and (err.id, err.status) == (-1, 400)
        assert err.message == "malformed frame: message type: 12 is not one of 10 (Admit), 11 (Release)"


@on_loop()
async def test_oversized_frame_closes_the_connection() -> None:
    fake = FakeAdmission()
    async with serving(fake, BinaryLimits(max_frame=1024)) as addr:
        raw = await Raw.open(addr)
        await raw.send(Admit(1, "x" * 300))  # under the frame limit: an ordinary 422 (flow too long)
        [err] = await raw.recv(1)
        assert err.status == 422
        await raw.send(Admit(2, "x" * 2000))  # 2 KiB frame: over it
        [err] = await raw.recv_until_eof()
        assert type(err) is Error and (err.id, err.status) == (-1, 400)
        assert "limit" in err.message
        assert fake.next_id == 1


@on_loop()
async def test_too_many_connections_get_503_and_close() -> None:
    fake = FakeAdmission()
    async with serving(fake, BinaryLimits(max_connections=2)) as addr:
        a, b = await Raw.open(addr), await Raw.open(addr)
        await a.send(Admit(1, "a"))
        await b.send(Admit(1, "a"))
        await a.recv(1)
        await b.recv(1)
        c = await Raw.open(addr)
        [err] = await c.recv_until_eof()
        assert type(err) is Error and (err.id, err.status) == (-1, 503)
        a.close()
        await until(lambda: len(fake.release_alls) == 1)
        assert len(fake.release_alls) == 1  # the refused connection releases nothing
        d = await Raw.open(addr)  # a slot is free again
        await d.send(Admit(1, "a"))
        [res] = await d.recv(1)
        assert type(res) is Result
        b.close()
        d.close()


# ---------------------------------------------------------------------------------------------- connection loss


@on_loop()
async def test_close_cancels_every_pending_admission_once_then_releases_all() -> None:
    fake = FakeAdmission()
    async with serving(fake) as addr:
        raw = await Raw.open(addr)
        await raw.send(Admit(0, "a"), *(Admit(i, HOLD) for i in range(1, 11)))
        await fake.wait_held(10)
        [res] = await raw.recv(1)
        fake.complete(2)  # one of the held ones is answered before the close
        await raw.recv(1)
        conn = fake.waiters[0]
        raw.close()
        await until(lambda: bool(fake.release_alls))
        await asyncio.sleep(0.01)
        assert sorted(fake.cancels) == [3, 4, 5, 6, 7, 8, 9, 10, 11]
        assert fake.release_alls == [conn]
        assert res.ticket not in fake.tickets and 1002 not in fake.tickets  # both tickets released
        # A (contract-breaking) dispatch delivered afterwards writes nothing and leaks nothing.
        conn.deliver(99, 3, Outcome.DISPATCHED, 5555, 0.0, 0)
        conn.deliver(98, 4, Outcome.EVICTED_TTL, 0, 0.0, 0)
        assert fake.releases == [5555]


@on_loop()
async def test_client_that_does_not_read_is_dropped() -> None:
    fake = FakeAdmission()
    async with serving(fake, BinaryLimits(max_write_buffer=64 * 1024)) as addr:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, addr)
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        raw = Raw(reader, writer)
        await raw.send(Admit(1, "a"))
        await until(lambda: bool(fake.waiters))
        conn = fake.waiters[0]
        conn._transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        # Releases answered and never read: the replies pile up until the server gives up.
        chunk = FrameWriter()
        for _ in range(10_000):
            chunk.add(Release(1))
        data = chunk.take()
        with contextlib.suppress(ConnectionError):
            while not fake.release_alls:
                writer.write(data)
                await writer.drain()
        await until(lambda: bool(fake.release_alls))
        assert fake.release_alls == [conn] and fake.tickets == {}
        writer.close()


# ---------------------------------------------------------------------------------------------- batching


class WriteSpy:
    """Stands in for a transport and counts writes."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.writes: list[int] = []

    def write(self, data: bytes) -> None:
        self.writes.append(len(data))
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


@on_loop()
async def test_replies_of_one_loop_pass_leave_in_one_write() -> None:
    fake = FakeAdmission()
    async with serving(fake) as addr:
        raw = await Raw.open(addr)
        await raw.send(*(Admit(i, HOLD) for i in range(50)))
        await fake.wait_held(50)
        conn: BinaryConnection = fake.waiters[0]
        spy = WriteSpy(conn._transport)
        conn._transport = spy  # type: ignore[assignment]
        for rid in list(fake.held)[:40]:  # 40 outcomes in one pass
            fake.complete(rid)
        replies = await raw.recv(40)
        assert len(spy.writes) == 1
        assert sorted(r.id for r in replies) == list(range(40))
        for rid in list(fake.held)[:5]:  # then 5 outcomes in 5 passes
            fake.complete(rid)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        await raw.recv(5)
        assert len(spy.writes) == 6
        raw.close()


@on_loop()
async def test_immediate_outcomes_of_one_read_leave_in_one_write() -> None:
    fake = FakeAdmission()
    async with serving(fake) as addr:
        raw = await Raw.open(addr)
        await raw.send(Admit(0, "a"))
        await raw.recv(1)
        conn: BinaryConnection = fake.waiters[0]
        spy = WriteSpy(conn._transport)
        conn._transport = spy  # type: ignore[assignment]
        await raw.send(*(Admit(i, "a") for i in range(1, 101)))  # ~2 KiB: one segment, one read
        replies = await raw.recv(100)
        assert [r.id for r in replies] == list(range(1, 101))
        assert len(spy.writes) == 1
        raw.close()
