"""Bare echo servers of the two transports: the baseline `flowshard bench --baseline` measures.

Why: on this machine the transport itself (sockets, parsing, the event loop) costs a large part of
each admission. Driving an echo server with the same generator gives the transport's own limit, so
the service's figures can be read as a fraction of it. Each server does the least a correct peer of
the generator must do, with the same libraries and batching as the service (uvloop, the msgspec
frame codec, httptools), and no admission logic:

- binary: every `Admit` frame is answered with `Result(id, dispatched, ticket)`, every `Release`
  with `Released(ticket, true)`; replies of one read go out in one write.
- HTTP: `POST /v1/admit` gets a fixed dispatched JSON body, `POST /v1/release` `{"released":true}`;
  in-order keep-alive responses, one write per read.

`python -m bench.echo [--host H] [--port P] [--binary-port B]` serves both (free ports by default)
and prints, like `flowshard serve`, `echo ready: http=http://H:P binary=H:P pid=PID` on stderr;
SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import cast

import httptools
import uvloop

from flowshard.codec import Admit, FrameReader, FrameWriter, FromClient, Released, Result
from flowshard.config import host_port

__all__ = ["BinaryEcho", "HttpEcho", "serve_echo"]

_DISPATCHED = 0


class BinaryEcho(asyncio.Protocol):
    """Answers every Admit at once as dispatched (ticket = a counter), every Release as released."""

    def __init__(self) -> None:
        self._reader = FrameReader(FromClient)
        self._out = FrameWriter()
        self._transport: asyncio.Transport | None = None
        self._ticket = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        out = self._out
        for msg in self._reader.feed(data):
            if type(msg) is Admit:
                self._ticket += 1
                out.add(Result(msg.id, _DISPATCHED, self._ticket, 0.0, 0))
            else:
                out.add(Released(msg.ticket, True))
        if out and self._transport is not None:
            self._transport.write(out.take())


_ADMIT_BODY = b'{"outcome":"dispatched","ticket":1,"wait_ms":0.0,"lease_s":300.0}'
_ADMIT_REPLY = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (
    len(_ADMIT_BODY), _ADMIT_BODY)
_RELEASE_BODY = b'{"released":true}'
_RELEASE_REPLY = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (
    len(_RELEASE_BODY), _RELEASE_BODY)
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"


class HttpEcho(asyncio.Protocol):
    """httptools parser callbacks; a fixed response per path, written once per `data_received`."""

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._out: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()
            return
        if self._out and self._transport is not None:
            self._transport.write(b"".join(self._out))
            self._out.clear()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_message_complete(self) -> None:
        url, self._url = self._url, b""
        if url == b"/v1/admit":
            self._out.append(_ADMIT_REPLY)
        elif url == b"/v1/release":
            self._out.append(_RELEASE_REPLY)
        else:
            self._out.append(_NOT_FOUND)


async def serve_echo(host: str = "127.0.0.1", http_port: int = 0, binary_port: int = 0) -> None:
    """Serve both echo protocols until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    http = await loop.create_server(HttpEcho, host, http_port, backlog=1024)
    binary = await loop.create_server(BinaryEcho, host, binary_port, backlog=1024)
    h = http.sockets[0].getsockname()
    b = binary.sockets[0].getsockname()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stderr.write(f"echo ready: http=http://{host_port(h[0], h[1])} binary={host_port(b[0], b[1])} "
                     f"pid={os.getpid()}\n")
    sys.stderr.flush()
    await stop.wait()
    http.close()
    binary.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="HTTP port (default: any free one)")
    parser.add_argument("--binary-port", type=int, default=0, help="binary port (default: any free one)")
    args = parser.parse_args(argv)
    uvloop.run(serve_echo(args.host, args.port, args.binary_port))


if __name__ == "__main__":
    main()
