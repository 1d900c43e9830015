"""A binary ticket released through an acceptor leaves its connection's set, whichever way it goes.

An acceptor keeps the binary tickets of its connections (`Upstream._owned`), released for a
connection when it closes (the connection is the lease). A release that asked the distributor (two
or more acceptors, or one with another release's answer pending) kept the ticket in the set: the
set grew by every ticket the connection ever released (~94 B each, for the life of the
connection), its close sent a release for each of them again, and with one acceptor a second
release of the ticket took the no-round-trip shortcut and was answered released (True) where the
distributor, and one process, answer False. In-process: the acceptor's real `Upstream` and binary
front, the distributor's link answers given by the test (a review's scenario)."""

from __future__ import annotations

import asyncio
from typing import Any

from bench.inproc import MemoryTransport
from distributor.binary import BinaryHub, BinaryLimits
from distributor.front import Upstream
from distributor.guards import Guards
from flowshard.codec import (
    Admit,
    BatchReader,
    BatchWriter,
    FrameReader,
    FrameWriter,
    FromAcceptor,
    LinkAdmit,
    LinkRelease,
    LinkReleased,
    Release,
    Released,
    Result,
    ToClient,
)
from flowshard.types import Outcome


class _Recorder(MemoryTransport):
    def __init__(self, reader: Any) -> None:
        self.got: list[Any] = []
        self._reader = reader

    def write(self, data: bytes) -> None:
        self.got += self._reader.feed(data)


def _frames(*messages: Any) -> bytes:
    writer = FrameWriter()
    for message in messages:
        writer.add(message)
    return writer.take()


def _batch(*messages: Any) -> bytes:
    writer = BatchWriter()
    for message in messages:
        writer.add(message)
    return writer.take()


def _wired(sole: bool) -> tuple[Upstream, Any, _Recorder, _Recorder]:
    """An acceptor's Upstream (its link recorded) and one binary connection on it (its client recorded)."""
    loop = asyncio.get_running_loop()
    upstream = Upstream(0, loop, sole=sole)
    upstream._accepting = upstream._ready = True
    link = _Recorder(BatchReader(FromAcceptor))
    upstream.connection_made(link)  # type: ignore[arg-type]
    conn = BinaryHub(upstream, BinaryLimits(), loop, Guards())()
    client = _Recorder(FrameReader(ToClient))
    conn.connection_made(client)  # type: ignore[arg-type]
    return upstream, conn, link, client


def _run(sole: bool, rounds: int) -> tuple[Upstream, Any, _Recorder, _Recorder]:
    async def main() -> tuple[Upstream, Any, _Recorder, _Recorder]:
        upstream, conn, link, client = _wired(sole)
        for i in range(rounds):
            ticket = 1000 + i
            conn.data_received(_frames(Admit(i, "f")))
            await asyncio.sleep(0)
            (admit,) = [m for m in link.got if type(m) is LinkAdmit]
            link.got.clear()
            upstream.data_received(_batch(Result(admit.key, int(Outcome.DISPATCHED), ticket)))
            # a release of an unknown ticket pipelined first: the real one's answer is then asked for
            conn.data_received(_frames(Release(999), Release(ticket)))
            await asyncio.sleep(0)
            asked = [m for m in link.got if type(m) is LinkRelease]
            link.got.clear()
            upstream.data_received(_batch(*(LinkReleased(m.key, m.ticket == ticket) for m in asked if m.key)))
            await asyncio.sleep(0)
        return upstream, conn, link, client

    return asyncio.run(main())


async def _close(conn: Any) -> None:
    conn.connection_lost(None)
    await asyncio.sleep(0)


def test_a_released_ticket_leaves_the_connection_whichever_acceptor_count() -> None:
    for sole in (False, True):
        upstream, conn, link, client = _run(sole, 50)
        assert [(m.ticket, m.ok) for m in client.got if type(m) is Released] == \
            [(t, ok) for i in range(50) for t, ok in ((999, False), (1000 + i, True))]
        assert not upstream._owner and not upstream._owned  # nothing left to release at its close

        asyncio.run(_close(conn))
        assert not [m for m in link.got if type(m) is LinkRelease]  # nothing released twice


def test_a_second_release_of_a_released_ticket_is_asked_not_assumed() -> None:
    """One acceptor: after a release that asked, releasing the same ticket again must ask too (the
    shortcut is only for a ticket the connection still holds), and is answered False as in one process."""
    async def main() -> None:
        upstream, conn, link, client = _wired(True)
        conn.data_received(_frames(Admit(1, "f")))
        await asyncio.sleep(0)
        (admit,) = [m for m in link.got if type(m) is LinkAdmit]
        upstream.data_received(_batch(Result(admit.key, int(Outcome.DISPATCHED), 77)))
        link.got.clear()
        conn.data_received(_frames(Release(999), Release(77)))  # the second waits behind the first's answer
        await asyncio.sleep(0)
        asked = [m for m in link.got if type(m) is LinkRelease]
        assert [m.ticket for m in asked] == [999, 77] and all(m.key for m in asked)
        link.got.clear()
        upstream.data_received(_batch(*(LinkReleased(m.key, m.ticket == 77) for m in asked)))
        conn.data_received(_frames(Release(77)))  # again: no answer pending, but the ticket is not ours now
        await asyncio.sleep(0)
        (again,) = [m for m in link.got if type(m) is LinkRelease]
        assert again.key  # asked
        upstream.data_received(_batch(LinkReleased(again.key, False)))
        await asyncio.sleep(0)
        assert [(m.ticket, m.ok) for m in client.got if type(m) is Released] == [(999, False), (77, True), (77, False)]

    asyncio.run(main())
