"""What happens to the HTTP tickets an acceptor was answering when it dies.

An acceptor reports the answers it wrote (`LinkDelivered`) at the end of each pass. When it dies the
distributor releases the tickets of answers it was sent and that were not reported (nobody got them)
and keeps the others for their lease. An answer written in the pass in which it died has no report
yet, although its client may hold the ticket; so the acceptor also writes each ticket to its delivery
log (`distributor.deliverylog`, shared memory) right before the answer, and the distributor keeps
the tickets it finds there. In-process: the acceptor's real `Upstream` and HTTP front with a raw
client socket; the distributor's real `AcceptorLink` with a recording service.
"""

from __future__ import annotations

import asyncio
import os
import socket
from types import SimpleNamespace
from typing import Any

import uvloop

from distributor.acceptors import AcceptorLink
from distributor.deliverylog import CAPACITY, DeliveryLog, create_fd
from distributor.front import Upstream
from distributor.http import HttpLimits, start_http_server
from flowshard.codec import BatchReader, BatchWriter, FromAcceptor, LinkAdmit, LinkDelivered, Result
from flowshard.types import Outcome

TICKET = 4242


def _pair() -> tuple[DeliveryLog, DeliveryLog]:
    """The acceptor's mapping and the distributor's, of one log (as each process maps it)."""
    fd = create_fd()
    try:
        return DeliveryLog(fd), DeliveryLog(fd)
    finally:
        os.close(fd)


def test_the_log_holds_what_was_written_and_the_last_capacity_tickets() -> None:
    writer, reader = _pair()
    try:
        assert reader.tickets() == set()
        for t in (11, 12, 13):
            writer.add(t)
        assert reader.tickets() == {11, 12, 13}
        for t in range(100, 100 + CAPACITY + 5):  # the oldest leave the ring
            writer.add(t)
        got = reader.tickets()
        assert len(got) == CAPACITY and 100 + CAPACITY + 4 in got and 104 not in got and 105 in got
    finally:
        writer.close()
        reader.close()


class RecordingLink:
    """The acceptor's end of its link: decodes what is written."""

    def __init__(self) -> None:
        self.reader = BatchReader(FromAcceptor)
        self.got: list[Any] = []

    def write(self, data: bytes) -> None:
        self.got += self.reader.feed(data)

    def is_closing(self) -> bool:
        return False


def test_an_answer_is_in_the_delivery_log_before_it_is_written_and_reported_at_the_end_of_the_pass() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        mine, theirs = _pair()
        upstream = Upstream(0, loop, delivery=mine)
        upstream._accepting = upstream._ready = True
        server = await start_http_server(upstream, "127.0.0.1", 0, HttpLimits(), lease=30.0)
        port = server.sockets[0].getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        link = RecordingLink()
        upstream.connection_made(link)  # type: ignore[arg-type]
        try:
            body = b'{"flow": "a"}'
            client.sendall(b"POST /v1/admit HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
            while not any(type(m) is LinkAdmit for m in link.got):
                await asyncio.sleep(0.002)
            (admit,) = [m for m in link.got if type(m) is LinkAdmit]
            answer = BatchWriter()
            answer.add(Result(admit.key, int(Outcome.DISPATCHED), TICKET, 0.001))
            upstream.data_received(answer.take())  # the distributor's answer: the front writes it now
            client.settimeout(2.0)
            seen = client.recv(65536, socket.MSG_PEEK)
            assert seen.startswith(b"HTTP/1.1 200") and str(TICKET).encode() in seen
            # the answer has left; no report yet (end of the pass): only the log knows
            assert not any(type(m) is LinkDelivered for m in link.got)
            assert theirs.tickets() == {TICKET}
            await asyncio.sleep(0.01)
            assert [m.tickets for m in link.got if type(m) is LinkDelivered] == [[TICKET]]
        finally:
            client.close()
            server.close()
            mine.close()
            theirs.close()

    uvloop.run(main())


def test_a_dead_acceptor_s_unreported_tickets_are_released_unless_its_log_says_they_were_written() -> None:
    released: list[int] = []
    leased: list[int] = []
    guards: list[tuple[str, str]] = []
    service = SimpleNamespace(
        release=lambda ticket, tokens=-1: released.append(ticket) or True,
        restart_lease=leased.append,
        release_all=lambda waiter: 0,
        cancel=lambda request_id: None,
        guards=SimpleNamespace(hit=lambda front, action: guards.append((front, action))),
        on_acceptor_lost=lambda link: None,
    )
    link = AcceptorLink(service, 0, b"")  # type: ignore[arg-type]
    mine, theirs = _pair()
    link.delivery = theirs
    link.unconfirmed.update({1, 2, 3})  # answers sent to it, none reported written
    mine.add(2)  # it wrote 2's answer in its last pass, then died before the report
    mine.close()
    link.connection_lost(None)
    assert sorted(released) == [1, 3]  # 2's client may hold its ticket: kept for its lease,
    assert leased == [2]  # which runs from now (its answer was written)
    assert guards == [("http", "undeliverable")] * 2
    assert link.delivery is None and not link.unconfirmed


def test_an_acceptor_answers_what_its_link_could_not_carry() -> None:
    """A message the link cannot encode (a value past 64 bits that validation let through) is logged and
    left out of the batch; whoever waited for its answer used to wait for good (review 2026-12-05: a
    release of ticket 2^64 over HTTP was never answered). Now the release is answered "unknown" and the
    admission fails (the fronts' 500), and the rest of the pass still goes."""

    class Waiter:
        def __init__(self) -> None:
            self.failed: list[tuple[Any, str]] = []

        def fail(self, cid: Any, message: str) -> None:
            self.failed.append((cid, message))

        def deliver(self, *args: Any) -> None:
            raise AssertionError("nothing is delivered here")

    async def main() -> None:
        upstream = Upstream(0, asyncio.get_running_loop())
        link = RecordingLink()
        upstream.connection_made(link)  # type: ignore[arg-type]
        waiter = Waiter()
        answers: list[tuple[int, bool]] = []
        upstream.release_then(1 << 64, -1, lambda ticket, ok: answers.append((ticket, ok)))
        upstream.admit(waiter, "c1", "flow", 1 << 70, 10, 0.0, 0.0, 0, 0.0, True)  # type: ignore[arg-type]
        upstream.admit(waiter, "c2", "flow", 0, 10, 0.0, 0.0, 0, 0.0, True)  # type: ignore[arg-type]
        await asyncio.sleep(0.01)  # the pass's flush
        assert answers == [(1 << 64, False)]
        assert [cid for cid, _ in waiter.failed] == ["c1"]
        assert "could not be forwarded" in waiter.failed[0][1]
        assert [m.flow for m in link.got if type(m) is LinkAdmit] == ["flow"]  # c2's went

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def test_a_ticket_asked_back_and_never_settled_expires_a_lease_later() -> None:
    """Review 134: an unwritten leased ticket asked back (`Distributor._revoke`) whose owner neither
    unclaimed it nor wrote it (a bug path: the take-back declined and the answer never written) was
    asked back at every lease end, for good: only its connection's end bounded it. A lease after the
    first time it is asked back it expires as any other ticket."""
    from conftest import make_config

    from distributor.service import Distributor, Ticket

    svc = Distributor(make_config(max_inflight_requests=4), 1)
    asked: list[int] = []
    owner = SimpleNamespace(revoke=asked.append)
    svc.ledger.budget.acquire(10)
    ticket = 77
    svc.tickets[ticket] = Ticket(ticket, 10, owner, 0.0, 0, "f", 0, 10, None, 1.0, -1, 0)
    svc.leases[ticket] = 0.0
    svc._unwritten[ticket] = False  # (dispatched, its answer not written yet)
    svc._revoke(ticket, 1.0)  # asked back once: kept, its lease renewed
    assert asked == [ticket] and ticket in svc.tickets and svc.ledger.budget.inflight == 1
    svc.leases.pop(ticket)  # (what `_housekeeping` does at the next lease end)
    svc._revoke(ticket, 2.0)  # still neither unclaimed nor written: expired
    assert asked == [ticket] and ticket not in svc.tickets and ticket not in svc._unwritten
    assert svc.ledger.budget.inflight == 0 and svc.counters["tickets_expired"] == 1
