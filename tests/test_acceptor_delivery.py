"""An acceptor reports an HTTP ticket's answer as delivered before the answer leaves for its client.

On the acceptor's death the distributor releases the tickets of answers never reported (nobody got
them) and keeps the others for their lease. So the report must reach the link (the kernel's socket
buffer, which outlives the process) before the answer reaches the client's socket: else an answer
written in the pass in which the acceptor died is released while its client holds the ticket, and
the service dispatches above its budget. In-process: the acceptor's real `Upstream` and HTTP front,
a recording link, and a raw client socket that is peeked at the moment the report is written.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvloop

from distributor.front import Upstream
from distributor.http import HttpLimits, start_http_server
from flowshard.codec import BatchReader, BatchWriter, FromAcceptor, LinkAdmit, LinkDelivered, Result
from flowshard.types import Outcome

TICKET = 4242


class RecordingLink:
    """The acceptor's end of its link: records each write, and what the client had received then."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.reader = BatchReader(FromAcceptor)
        self.writes: list[tuple[list[Any], bytes]] = []

    def write(self, data: bytes) -> None:
        try:
            seen = self.client.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            seen = b""
        self.writes.append((self.reader.feed(data), seen))

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


def test_the_delivered_report_is_on_the_link_before_the_answer_reaches_the_client() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        upstream = Upstream(0, loop)
        upstream._accepting = upstream._ready = True
        server = await start_http_server(upstream, "127.0.0.1", 0, HttpLimits(), lease=30.0)
        port = server.sockets[0].getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        link = RecordingLink(client)
        upstream.connection_made(link)  # type: ignore[arg-type]
        try:
            body = b'{"flow": "a"}'
            client.sendall(b"POST /v1/admit HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
            while not any(type(m) is LinkAdmit for msgs, _ in link.writes for m in msgs):
                await asyncio.sleep(0.002)
            (admit,) = [m for msgs, _ in link.writes for m in msgs if type(m) is LinkAdmit]
            answer = BatchWriter()
            answer.add(Result(admit.key, int(Outcome.DISPATCHED), TICKET, 0.001))
            upstream.data_received(answer.take())  # the distributor's answer: the front writes it
            reports = [(m, seen) for msgs, seen in link.writes for m in msgs if type(m) is LinkDelivered]
            assert [m.tickets for m, _ in reports] == [[TICKET]]
            early = reports[0][1]
            assert early == b"", f"the client had the answer before the report was on the link: {early!r}"
            client.settimeout(2.0)
            got = b""
            while b"}" not in got:
                got += client.recv(65536)
            assert got.startswith(b"HTTP/1.1 200") and str(TICKET).encode() in got
        finally:
            client.close()
            server.close()

    uvloop.run(main())
