"""An acceptor writes the answers one read of its link brings once per HTTP connection.

The distributor's answers reach an acceptor in batches (one read of its link); before, each answer
was written to its client as it was decoded, so a connection's pipelined requests answered in the
same batch (a load generator's releases on one connection, say) cost one `write()` each. Now the
acceptor's HTTP connections hold their writes while the batch is read (`HttpHub.defer`) and write
what is ready once each at its end (`HttpHub.flush_deferred`): same bytes, same order, fewer calls.
In-process: the acceptor's real `Upstream` and HTTP front, with recording transports.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvloop

from bench.inproc import MemoryTransport
from distributor.front import Upstream
from distributor.guards import Guards
from distributor.http import HttpHub, HttpLimits
from flowshard.codec import BatchReader, BatchWriter, FromAcceptor, LinkAdmit, LinkRelease, LinkReleased, Result
from flowshard.types import Outcome


class _Recorder(MemoryTransport):
    """A transport that keeps every write (the client's socket, or the acceptor's link)."""

    def __init__(self, link: bool = False) -> None:
        self.writes: list[bytes] = []
        self.got: list[Any] = []
        self._reader = BatchReader(FromAcceptor) if link else None

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        if self._reader is not None:
            self.got += self._reader.feed(data)


def _post(path: bytes, body: bytes) -> bytes:
    return b"POST %b HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n%b" % (path, len(body), body)


def test_the_answers_of_one_link_read_leave_in_one_write_per_connection() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        upstream = Upstream(0, loop)
        upstream._accepting = upstream._ready = True
        link = _Recorder(link=True)
        upstream.connection_made(link)  # type: ignore[arg-type]
        hub = HttpHub(upstream, HttpLimits(), 30.0, loop, Guards())
        upstream.http = hub
        releaser, admitter = _Recorder(), _Recorder()
        rconn, aconn = hub(), hub()
        rconn.connection_made(releaser)  # type: ignore[arg-type]
        aconn.connection_made(admitter)  # type: ignore[arg-type]
        try:
            # three pipelined releases on one connection, an admission on another
            rconn.data_received(b"".join(_post(b"/v1/release", b'{"ticket":%d}' % t) for t in (7, 8, 9)))
            aconn.data_received(_post(b"/v1/admit", b'{"flow":"a"}'))
            await asyncio.sleep(0)  # the link's flush (end of the pass)
            releases = [m for m in link.got if type(m) is LinkRelease]
            (admit,) = [m for m in link.got if type(m) is LinkAdmit]
            assert [m.ticket for m in releases] == [7, 8, 9]
            # the distributor's answers, in one batch: the releases' (the second one unknown) and the admission's
            batch = BatchWriter()
            for m, ok in zip(releases, (True, False, True), strict=True):
                batch.add(LinkReleased(m.key, ok))
            batch.add(Result(admit.key, int(Outcome.DISPATCHED), 4242, 0.001))
            upstream.data_received(batch.take())
            assert len(releaser.writes) == 1  # was 3: one per answer
            answers = releaser.writes[0]
            assert answers.count(b"HTTP/1.1 ") == 3
            first, second, third = answers.split(b"HTTP/1.1 ")[1:]
            assert first.startswith(b"200") and b'{"released":true}' in first
            assert second.startswith(b"404") and b"ticket 8 is unknown" in second
            assert third.startswith(b"200") and b'{"released":true}' in third
            assert len(admitter.writes) == 1 and admitter.writes[0].startswith(b"HTTP/1.1 200")
            assert b'"ticket":4242' in admitter.writes[0]
            assert hub.deferred is None  # nothing held after the read
            # an answer outside a hold (the front alone, as in the distributor's process) is written at once
            rconn.data_received(_post(b"/v1/release", b'{"ticket":10}'))
            await asyncio.sleep(0)
            (last,) = [m for m in link.got if type(m) is LinkRelease and m.ticket == 10]
            upstream._received(_answer(LinkReleased(last.key, True)))
            assert len(releaser.writes) == 2
        finally:
            rconn.connection_lost(None)
            aconn.connection_lost(None)

    uvloop.run(main())


def _answer(message: Any) -> bytes:
    batch = BatchWriter()
    batch.add(message)
    return batch.take()
