"""Review 18: an acceptor's proxied admission that the distributor fails (`Error`) must be answered."""

from __future__ import annotations

import asyncio
from typing import Any

from distributor.front import Upstream
from distributor.proxy import Exchange
from flowshard.classify import Classified
from flowshard.codec import BatchWriter, Error


class _Conn:
    """Records what the exchange's client is sent."""

    def __init__(self) -> None:
        self.answers: list[bytes] = []

    def slot_respond(self, slot: Any, data: bytes) -> None:
        self.answers.append(data)

    def slot_end(self, slot: Any, tail: bytes = b"", *, close: bool = False) -> None:
        self.answers.append(tail)

    def fail(self, cid: Any, message: str) -> None:  # (the connection has it; the waiter is the Exchange)
        self.answers.append(message.encode())


def test_a_proxied_admission_the_distributor_failed_is_answered() -> None:
    """The distributor answers `Error(key)` when it fails on an acceptor's admission (AcceptorLink's
    except branch; and `Upstream._dropped` does the same for a frame it cannot encode). For an HTTP
    admit the waiter is the connection, which has `fail`: 500. For a proxied request the waiter is
    the `Exchange`, which has no `fail`: `_fail_admission` pops the entry and answers nothing, so the
    client's request (and every response pipelined behind it) waits until the client gives up."""

    async def go() -> None:
        loop = asyncio.get_running_loop()
        up = Upstream(0, loop)
        conn = _Conn()
        slot = object()
        item = Classified(flow="f", priority=0, slo=0.0, size=10, tokens=10, prompt_tokens=5, model="m",
                          stream=False, strip_usage=False, body=b"{}")
        ex = Exchange(None, conn, slot, "/v1/chat/completions", item, [], b"")  # type: ignore[arg-type]
        ex.rid = key = up.admit(ex, slot, "f", 0, 10, 0.0, 0.0, 10, 0.0, False, proxied=True)
        w = BatchWriter()
        w.add(Error(key, 500, "internal error while admitting"))
        up.data_received(w.take())
        assert conn.answers, "the proxied request got no answer (its slot waits forever)"

    asyncio.run(go())
