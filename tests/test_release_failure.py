"""The distributor failing on a release (a bug) is answered as in one process, through an acceptor too.

In the distributor's own process the release call raises and the front answers: HTTP 500 (and the
requests pipelined behind it are answered), binary `Error(-1, 500)` and the connection closed.
Through an acceptor the distributor's link logged the error and answered nothing for a release
(only a failed admission got its `Error`): the HTTP client waited for good, with every request
behind it; a binary client's order-matched `Released` answers shifted. Now the link answers the
release's key with `Error`, and the acceptor's front answers as one process does (a review).
In-process: the real fronts, `Upstream` and `AcceptorLink`, wired by loop callbacks."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import pytest

from bench.inproc import MemoryTransport
from distributor.acceptors import AcceptorLink
from distributor.binary import BinaryHub, BinaryLimits
from distributor.front import Upstream
from distributor.guards import Guards
from distributor.http import HttpHub, HttpLimits
from distributor.service import Distributor
from flowshard.codec import Admit, Error, FrameReader, FrameWriter, Release, ToClient
from flowshard.config import Config


class _Client(MemoryTransport):
    def __init__(self) -> None:
        self.data = b""
        self.eof = False

    def write(self, data: bytes) -> None:
        self.data += data

    def write_eof(self) -> None:
        self.eof = True


class _Wire(MemoryTransport):
    """One end of the acceptor's link: what is written reaches the other side next loop turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop, to: Any) -> None:
        self.loop, self.to = loop, to

    def write(self, data: bytes) -> None:
        self.loop.call_soon(self.to.data_received, data)


def _admission(loop: asyncio.AbstractEventLoop, acceptor: bool) -> tuple[Any, Upstream | None]:
    d = Distributor(Config(), shards=1)

    def release(ticket: int, tokens: int = -1) -> bool:
        raise RuntimeError("injected")

    d.release = release  # type: ignore[method-assign]
    if not acceptor:
        return d, None
    upstream = Upstream(0, loop)
    upstream._accepting = upstream._ready = True
    link = AcceptorLink(d, 0, b"")
    upstream.connection_made(_Wire(loop, link))  # type: ignore[arg-type]
    link.transport = _Wire(loop, upstream)  # type: ignore[assignment]
    return upstream, upstream


async def _turns() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.mark.parametrize("acceptor", [False, True])
def test_http_a_failed_release_is_answered_500_and_what_follows_it_too(acceptor: bool) -> None:
    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        admission, upstream = _admission(loop, acceptor)
        hub = HttpHub(admission, HttpLimits(), 30.0, loop, Guards())
        if upstream is not None:
            upstream.http = hub
        client, conn = _Client(), hub()
        conn.connection_made(client)  # type: ignore[arg-type]
        body = b'{"ticket":77}'
        conn.data_received(b"POST /v1/release HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)
                           + b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        await _turns()
        conn.connection_lost(None)
        return re.findall(rb"HTTP/1\.1 \d{3} [^\r]*", client.data)

    logging.disable(logging.CRITICAL)
    try:
        assert asyncio.run(main()) == [b"HTTP/1.1 500 Internal Server Error", b"HTTP/1.1 200 OK"]
    finally:
        logging.disable(logging.NOTSET)


@pytest.mark.parametrize("acceptor", [False, True])
def test_binary_a_failed_release_fails_the_connection_with_500(acceptor: bool) -> None:
    async def main() -> tuple[list[Any], bool]:
        loop = asyncio.get_running_loop()
        admission, _ = _admission(loop, acceptor)
        client, conn = _Client(), BinaryHub(admission, BinaryLimits(), loop, Guards())()
        conn.connection_made(client)  # type: ignore[arg-type]
        writer = FrameWriter()
        writer.add(Release(77))
        conn.data_received(writer.take())
        await _turns()
        return FrameReader(ToClient).feed(client.data), client.eof

    logging.disable(logging.CRITICAL)
    try:
        answers, closed = asyncio.run(main())
    finally:
        logging.disable(logging.NOTSET)
    assert answers == [Error(-1, 500, "internal error while releasing")] and closed


def test_binary_nothing_after_a_failed_release_is_answered_through_an_acceptor_either() -> None:
    """One process stops at the failed release: a Release and an Admit sent after it in the same read
    are never handled. Through an acceptor they were already forwarded; their answers, which may come
    before the connection's barrier, are dropped, so the client sees what one process shows it."""
    async def main(acceptor: bool) -> list[Any]:
        loop = asyncio.get_running_loop()
        admission, _ = _admission(loop, acceptor)
        client, conn = _Client(), BinaryHub(admission, BinaryLimits(), loop, Guards())()
        conn.connection_made(client)  # type: ignore[arg-type]
        writer = FrameWriter()
        for message in (Release(77), Release(78), Admit(5, "f")):
            writer.add(message)
        conn.data_received(writer.take())
        await _turns()
        return FrameReader(ToClient).feed(client.data)

    logging.disable(logging.CRITICAL)
    try:
        one, through = asyncio.run(main(False)), asyncio.run(main(True))
    finally:
        logging.disable(logging.NOTSET)
    assert one == through == [Error(-1, 500, "internal error while releasing")]
