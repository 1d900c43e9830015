"""Tests of the async client against the real binary server over 127.0.0.1 (DESIGN §8).

`FakeAdmission` (from test_binary) decides outcomes by flow name and records the server's calls.
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

import pytest
import uvloop
from test_binary import HOLD, FakeAdmission, Raw, WriteSpy, on_loop, serving, until

from distributor.binary import BinaryLimits
from flowshard.client import AdmitResult, Client, ConnectionClosed, FlowshardError
from flowshard.codec import Error, FromClient, Result
from flowshard.types import Outcome

LOOPS = pytest.mark.parametrize("factory", [uvloop.new_event_loop, asyncio.new_event_loop], ids=["uvloop", "asyncio"])


def run(factory: Any, test: Any) -> None:
    on_loop(factory)(test)()


@LOOPS
def test_admit_dispatched_then_release(factory: Any) -> None:
    async def test() -> None:
        fake = FakeAdmission()
        async with serving(fake) as addr, Client.connect(*addr) as c:
            r = await c.admit("a", priority=2, size=4096, ttl=1.0, tokens=10)
            assert r == AdmitResult(Outcome.DISPATCHED, 1001, 0.25, 0)
            assert r.dispatched and fake.ticket_size == {1001: 4096}
            assert await c.release(r.ticket) is True
            assert await c.release(r.ticket) is False
            assert fake.releases == [1001, 1001]

    run(factory, test)


@pytest.mark.parametrize(
    ("flow", "outcome"),
    [
        ("capacity", Outcome.REJECTED_CAPACITY),
        ("draining", Outcome.REJECTED_SHUTTING_DOWN),
        ("ttl", Outcome.EVICTED_TTL),
        ("displaced", Outcome.EVICTED_DISPLACED),
        ("shard-failure", Outcome.EVICTED_SHARD_FAILURE),
    ],
)
@on_loop()
async def test_other_outcomes(flow: str, outcome: Outcome) -> None:
    fake = FakeAdmission()
    async with serving(fake) as addr, Client.connect(*addr) as c:
        r = await c.admit(flow)
        assert r.outcome is outcome and not r.dispatched
        assert (r.ticket, r.retry_after) == (0, 3)


@on_loop()
async def test_await_connect_and_async_with_on_the_client() -> None:
    fake = FakeAdmission()
    async with serving(fake) as addr:
        c = await Client.connect(*addr)
        async with c:
            assert (await c.admit("a")).dispatched
        assert c.closed
        with pytest.raises(ConnectionClosed):
            c.admit("a")
        await until(lambda: len(fake.release_alls) == 1)
        assert fake.tickets == {}  # closing released the ticket


@on_loop()
async def test_a_dead_peer_timeout_the_kernel_would_refuse_is_refused_before_connecting() -> None:
    """Review 87: 70000 s (EINVAL), NaN or inf raised only after the connection was open, and left it
    open. Now a ValueError, raised before connecting."""
    fake = FakeAdmission()
    async with serving(fake) as addr:
        for bad in (70000.0, 0.5, math.nan, math.inf, -1.0):
            with pytest.raises(ValueError, match="dead_peer_timeout"):
                await Client.connect(*addr, dead_peer_timeout=bad)
        async with Client.connect(*addr, dead_peer_timeout=0) as c:  # off: the kernel's defaults
            assert (await c.admit("a")).dispatched


@on_loop()
async def test_1000_pipelined_admits_answered_out_of_order() -> None:
    fake = FakeAdmission()
    async with serving(fake) as addr, Client.connect(*addr) as c:
        futures = [c.admit(HOLD, size=i) for i in range(1000)]
        assert c.in_flight == 1000
        await fake.wait_held(1000)
        order = list(fake.held)
        random.Random(7).shuffle(order)
        for k, rid in enumerate(order):
            fake.complete(rid, Outcome.DISPATCHED if k % 3 else Outcome.EVICTED_TTL)
            if k % 100 == 0:
                await asyncio.sleep(0)  # spread the outcomes over several loop passes
        results = await asyncio.gather(*futures)
        for size, r in enumerate(results):
            if r.dispatched:
                assert fake.ticket_size[r.ticket] == size
            else:
                assert r.outcome is Outcome.EVICTED_TTL and r.ticket == 0
        assert sum(r.dispatched for r in results) == 666
        assert c.in_flight == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"size": -1}, "size"), ({"flow": ""}, "flow"), ({"ttl": math.nan}, "ttl"), ({"priority": 1 << 40}, "priority")],
)
@on_loop()
async def test_invalid_admit_raises_422_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    fake = FakeAdmission()
    async with serving(fake) as addr, Client.connect(*addr) as c:
        args = {"flow": "a", **kwargs}
        with pytest.raises(FlowshardError) as info:
            await c.admit(**args)
        assert info.value.status == 422 and info.value.message.startswith(f"{field}:"), info.value
        assert (await c.admit("a")).dispatched  # the connection still serves


@on_loop()
async def test_unencodable_arguments_raise_locally_and_do_not_break_the_connection() -> None:
    fake = FakeAdmission()
    async with serving(fake) as addr, Client.connect(*addr) as c:
        with pytest.raises(TypeError, match="size"):
            c.admit("a", size=1.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="ttl"):
            c.admit("a", ttl="1")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="flow"):
            c.admit(7)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="tokens"):
            c.admit("a", tokens=1 << 70)
        with pytest.raises(TypeError, match="ticket"):
            c.release("1")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="audit: expected True or False, got 'yes'"):
            c.admit("a", audit="yes")  # type: ignore[arg-type]  # (a review: taken as True)
        with pytest.raises(UnicodeEncodeError):
            c.admit("\ud800")  # a lone surrogate: not UTF-8, so not on the wire either
        assert c.in_flight == 0  # nothing left waiting for an answer that cannot come
        r = await c.admit("a", size=True, ttl=2, weight=1)  # coerced: bool and ints are numbers
        assert r.dispatched and fake.ticket_size == {1001: 1}
        assert c.in_flight == 0


@on_loop()
async def test_too_many_in_flight_raises_429_for_that_admit_only() -> None:
    fake = FakeAdmission()
    async with serving(fake, BinaryLimits(max_inflight_per_connection=2)) as addr, Client.connect(*addr) as c:
        held = [c.admit(HOLD), c.admit(HOLD)]
        with pytest.raises(FlowshardError) as info:
            await c.admit("a")
        assert info.value.status == 429
        for rid in list(fake.held):
            fake.complete(rid)
        assert all(r.dispatched for r in await asyncio.gather(*held))


@on_loop()
async def test_close_with_pending_admits_fails_them_and_the_server_cancels_them() -> None:
    fake = FakeAdmission()
    async with serving(fake) as addr:
        c = await Client.connect(*addr)
        ticket = (await c.admit("a")).ticket
        pending = [c.admit(HOLD) for _ in range(5)]
        await fake.wait_held(5)
        await c.close()
        for fut in pending:
            with pytest.raises(ConnectionClosed):
                await fut
        await until(lambda: bool(fake.release_alls))
        assert sorted(fake.cancels) == [2, 3, 4, 5, 6]
        assert len(fake.release_alls) == 1 and ticket not in fake.tickets
        await c.close()  # idempotent


@on_loop()
async def test_closing_with_admits_nobody_awaits_logs_nothing() -> None:
    """Review 75: leaving `async with Client` with admissions pending printed "Future exception was never
    retrieved" and a traceback for each; the caller closed, so they are quiet (awaited, they raise)."""
    fake = FakeAdmission()
    async with serving(fake) as addr:
        c = await Client.connect(*addr)
        pending = [c.admit(HOLD) for _ in range(3)]
        await fake.wait_held(3)
        await c.close()
        assert all(fut.done() for fut in pending)
        assert all(not getattr(fut, "_log_traceback", False) for fut in pending)  # (asyncio's own flag)
        with pytest.raises(ConnectionClosed):
            await pending[0]


@on_loop()
async def test_service_closing_fails_pending_calls_with_connection_closed() -> None:
    fake = FakeAdmission()
    async with serving(fake) as addr, Client.connect(*addr) as c:
        pending = c.admit(HOLD)
        await fake.wait_held(1)
        fake.waiters[0]._transport.close()
        with pytest.raises(ConnectionClosed):
            await pending
        with pytest.raises(ConnectionClosed):
            c.admit("a")
        assert c.closed


@on_loop()
async def test_too_many_connections_is_connection_closed_503() -> None:
    fake = FakeAdmission()
    async with serving(fake, BinaryLimits(max_connections=1)) as addr, Client.connect(*addr) as first:
        assert (await first.admit("a")).dispatched
        async with Client.connect(*addr) as second:
            # The 503 may arrive before or after the call: it fails either way.
            with pytest.raises(ConnectionClosed) as info:
                await second.admit("a")
            assert info.value.status == 503
        assert (await first.admit("a")).dispatched


@on_loop()
async def test_connection_error_from_the_service_fails_every_pending_call() -> None:
    # A raw service that reads two admits and a release, then reports a connection error (id -1)
    # and leaves the connection open: the client fails everything pending and closes it.
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Raw(reader, writer, FromClient)
        await peer.recv(3)
        await peer.send(Error(-1, 400, "malformed frame"))
        await peer.recv_until_eof()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server, Client.connect("127.0.0.1", server.sockets[0].getsockname()[1]) as c:
        pending: list[asyncio.Future[Any]] = [c.admit("a"), c.admit("b"), c.release(5)]
        for fut in pending:
            with pytest.raises(ConnectionClosed) as info:
                await fut
            assert (info.value.status, info.value.message) == (400, "malformed frame")
        assert c.closed


@on_loop()
async def test_replies_with_unknown_ids_are_ignored_and_unknown_outcomes_fail_one_call() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Raw(reader, writer, FromClient)
        first, second = await peer.recv(2)
        await peer.send(
            Error(first.id + 100, 422, "stray"), Result(first.id + 7, 0, 5),
            Error(first.id, 429, "busy"), Result(second.id, 99),
        )
        await peer.recv_until_eof()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server, Client.connect("127.0.0.1", server.sockets[0].getsockname()[1]) as c:
        first, second = c.admit("a"), c.admit("b")
        with pytest.raises(FlowshardError) as info:
            await first
        assert (info.value.status, info.value.message) == (429, "busy")
        with pytest.raises(FlowshardError) as info:
            await second
        assert info.value.status == 502
        assert not c.closed and c.in_flight == 0


@on_loop()
async def test_cancelled_admit_that_gets_dispatched_is_released() -> None:
    fake = FakeAdmission()
    async with serving(fake) as addr, Client.connect(*addr) as c:
        fut = c.admit(HOLD)
        await fake.wait_held(1)
        fut.cancel()
        [rid] = fake.held
        fake.complete(rid)
        await until(lambda: bool(fake.releases))
        assert fake.releases == [1000 + rid] and fake.tickets == {}
        assert await c.release(424242) is False  # the Released of the automatic release was consumed


@on_loop()
async def test_calls_of_one_loop_pass_leave_in_one_write() -> None:
    fake = FakeAdmission()
    async with serving(fake) as addr, Client.connect(*addr) as c:
        await c.admit("a")
        spy = WriteSpy(c._transport)  # type: ignore[arg-type]
        c._transport = spy  # type: ignore[assignment]
        futures = [c.admit("a", size=i) for i in range(100)]
        released = c.release(1001)
        results = await asyncio.gather(*futures)
        assert await released is True
        assert len(spy.writes) == 1
        assert [fake.ticket_size[r.ticket] for r in results] == list(range(100))
