"""Review 18: a proxied ticket's release from an acceptor carries the backend's reported usage unchecked."""

from __future__ import annotations

import asyncio

from distributor.front import Upstream
from flowshard.classify import usage_from_body
from flowshard.codec import BatchReader, FromAcceptor, LinkRelease


class _Transport:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return False


def test_a_proxied_release_with_an_absurd_usage_still_reaches_the_distributor() -> None:
    """An acceptor's proxy releases each ticket with `Exchange.actual` = prompt_tokens +
    completion_tokens as the backend reported them (`Proxy._settle_usage`, unbounded: msgspec
    decodes any 64-bit value). Two values of 2^64-1 sum past what msgpack carries: the link's
    BatchWriter drops the `LinkRelease` (`Upstream._dropped` answers only releases with a key, and a
    proxied release has none), so the distributor never releases the ticket. It is not leased:
    one budget slot is lost for the life of the acceptor, and the drain waits for it
    (`Acceptors.proxied_running`) until drain_timeout. The one-process proxy releases it fine."""
    usage = usage_from_body(b'{"usage":{"prompt_tokens":18446744073709551615,'
                            b'"completion_tokens":18446744073709551615}}')
    assert usage is not None
    actual = usage.prompt_tokens + usage.completion_tokens  # (Proxy._settle_usage)

    async def go() -> None:
        up = Upstream(0, asyncio.get_running_loop())
        transport = _Transport()
        up.connection_made(transport)  # type: ignore[arg-type]
        up.release(4242, actual)  # (Exchange._done)
        await asyncio.sleep(0)  # the flush at the end of the pass
        await asyncio.sleep(0)
        sent = BatchReader(FromAcceptor).feed(transport.data) if transport.data else []
        assert [m.ticket for m in sent if type(m) is LinkRelease] == [4242], "the release never left"

    asyncio.run(go())
