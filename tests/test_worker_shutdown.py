"""A worker's timers are cancelled before its shared memory is closed (issue 8, defect 9).

The loop still runs the callbacks that fall due while it shuts down; a heartbeat that fired after
`ShmStats.close()` raised `AttributeError: 'ShmStats' object has no attribute '_q'`.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvloop

from distributor import segment
from flowshard.codec import BatchReader, FromWorker, Hello
from flowshard.config import Config
from flowshard.shm import ShmLayout, ShmStats
from flowshard.stats import N_WAIT_BUCKETS
from flowshard.types import N_OUTCOMES
from workers import worker


def test_no_callback_touches_shared_memory_after_the_worker_closed_it() -> None:
    config = Config()
    layout = ShmLayout(config.flow_slots, 1, len(config.bands), N_OUTCOMES, N_WAIT_BUCKETS)
    seg = segment.create(layout.nbytes)
    owner = ShmStats(seg.buf, layout, init=True)
    errors: list[dict[str, Any]] = []
    try:
        mine, theirs = socket.socketpair()
        mine.setblocking(False)

        async def main() -> None:
            asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
            task = asyncio.ensure_future(worker.run(0, theirs, seg.name, config))
            loop = asyncio.get_running_loop()
            reader = BatchReader(FromWorker)
            hello: list[Any] = []
            while not hello:
                hello = reader.feed(await loop.sock_recv(mine, 4096))
            assert type(hello[0]) is Hello
            await asyncio.sleep(0.05)  # a TTL-less worker: only the heartbeat is armed
            mine.close()  # EOF: the worker ends and closes its shared memory
            await task
            await asyncio.sleep(3 * worker.HEARTBEAT_INTERVAL)  # anything still armed fires now

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    finally:
        owner.close()
        segment.destroy(seg)
    assert errors == []
