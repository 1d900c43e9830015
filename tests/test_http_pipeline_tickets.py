"""The HTTP front's tickets and answers around a client's reset and half-close, in the cases a
review of the sixth round found wrong (a full pipeline, a proxied request queued at the head)."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import pytest
from proxykit import fake_backend, proxy_config
from servicekit import HttpConn, launch, run
from test_http import HOLD, TICKET_BASE, Client, FakeAdmission, admit, serve, until

__all__ = ["fake_backend", "launch"]  # the fixtures


@pytest.mark.parametrize("pipeline_full", [False, True], ids=["pipeline_open", "pipeline_full"])
def test_an_answer_the_client_read_before_sending_more_is_not_released_at_its_reset(pipeline_full: bool) -> None:
    """`HttpConnection._sent` is "tickets of dispatched answers written since the client last sent
    anything": data read from the client clears it (data_received). Data read while the pipeline is
    full goes into `_held` and returns before that clear, so an answer the client read, and then
    sent more after, is still taken as undelivered: its ticket is released at the client's reset
    while the client holds it (in flight under-counted), and `_sent` grows for as long as the
    client keeps the pipeline full."""

    async def t(port: int, fake: FakeAdmission) -> None:
        c = await Client.open(port)
        c.send(b"".join(admit(HOLD) for _ in range(4)))
        await until(lambda: len(fake.admits) == 4)
        conn = fake.admits[0]["waiter"]
        assert (conn._held is not None) == pipeline_full
        fake.finish(1)  # dispatched: written at once (3 left unanswered: the pipeline stays held when full)
        r = await c.response()
        assert r.json()["ticket"] == TICKET_BASE + 1  # the client has read it
        c.send(admit(HOLD))  # ... and sends more after it: it is still there
        await asyncio.sleep(0.05)
        assert not conn._sent  # the client sent more after reading them: nothing written is undelivered
        sock = c.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # RST
        await until(lambda: len(fake.cancels) >= 3)
        await asyncio.sleep(0.05)
        assert fake.released == [], f"ticket(s) {fake.released} released while the client holds them"

    serve(t, max_pipelined=4 if pipeline_full else 64)


@pytest.mark.parametrize("acceptors", [0, 1])
def test_half_close_answers_a_release_behind_a_queued_proxied_request_at_the_head(
    launch: Any, fake_backend: Any, acceptors: int
) -> None:
    """`_answers_on_their_way` cuts the queue at a proxied request at its head whose answer is not in
    (`k == 0`), "its answer may be partly written", though nothing of it was written while it waits
    for its admission (`Exchange.started` False). The docstring's rule: only one being streamed cuts.
    So a release pipelined behind a queued proxied request is applied, unanswered (review 18, D3)."""
    from test_proxy import MSG, settled

    fake = fake_backend(ttft=0.005, itl=0.001)
    svc = launch(proxy_config([fake.url], budget=1), acceptors=acceptors)

    async def main() -> None:
        held = await HttpConn.open(svc.http_port)
        ticket = (await held.request("POST", "/v1/admit", {"flow": "hold"}, timeout=5)).json()["ticket"]
        conn = await HttpConn.open(svc.http_port)
        conn.send("POST", "/v1/chat/completions", {"model": "m", "messages": MSG, "max_tokens": 2})  # queued
        conn.send("POST", "/v1/release", {"ticket": 5})  # names no ticket: 404, after the proxied one
        conn.send("GET", "/healthz")
        await asyncio.sleep(0.3)  # the proxied request queued in the distributor (the budget, 1, is held)
        conn.writer.write_eof()
        rest = await asyncio.wait_for(conn.reader.read(), 5)
        # expected: 503 (the proxied request, its client gone), 404 (the release), 200 (healthz)
        assert rest.count(b"HTTP/1.1 ") == 3, rest
        conn.close()
        assert (await held.request("POST", "/v1/release", {"ticket": ticket}, timeout=5)).status == 200
        held.close()

    run(main())
    settled(svc)
