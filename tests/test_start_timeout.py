"""A restarted worker or acceptor that hangs before its Hello is killed (and so started again).

The heartbeat checks judged only processes that had said Hello: one that hung while starting (a
restart, after a crash) kept its place for good. A shard stayed down (at one shard every request
that would queue ended `evicted: shard_failure`), an acceptor's index stayed taken (with one
acceptor every new connection was closed). Now each is killed once it has been starting longer
than the first start may take (30 s), as a wedged one is. In-process: the checks on a real
Distributor and Acceptors, the processes fakes that record a kill (a review's finding)."""

from __future__ import annotations

import logging
import socket
import time

from distributor.acceptors import START_TIMEOUT, AcceptorLink, Acceptors
from distributor.service import WORKER_START_TIMEOUT, Distributor
from flowshard.config import Config
from flowshard.shm import ShmStats


class FakeProc:
    def __init__(self) -> None:
        self.killed = 0

    def kill(self) -> None:
        self.killed += 1


def _distributor() -> Distributor:
    d = Distributor(Config(), shards=2)
    d.shm = ShmStats(bytearray(d.layout.nbytes), d.layout, init=True)
    return d


def test_a_worker_hung_before_its_hello_is_killed_once_its_start_has_taken_too_long() -> None:
    d = _distributor()
    now = time.monotonic()
    procs = [FakeProc(), FakeProc()]
    for s, proc, started in zip(d.shards, procs, (now - WORKER_START_TIMEOUT - 1, now - 1), strict=True):
        s.proc = proc  # type: ignore[assignment]
        s.link = object()  # type: ignore[assignment]  (its link is up: it is starting, not lost)
        s.ready = False
        s.spawned_at = started
    d._check_heartbeats(time.monotonic_ns())
    assert [p.killed for p in procs] == [1, 0]  # the one starting for 31 s; not the one for 1 s


def test_a_ready_worker_is_judged_by_its_heartbeat_not_its_start() -> None:
    d = _distributor()
    assert d.shm is not None
    now_ns = time.monotonic_ns()
    procs = [FakeProc(), FakeProc()]
    for s, proc in zip(d.shards, procs, strict=True):
        s.proc = proc  # type: ignore[assignment]
        s.link = object()  # type: ignore[assignment]
        s.ready = True
        s.spawned_at = now_ns / 1e9 - 3600  # started long ago
    d.shm.heartbeat_ns[0] = now_ns - 6 * 10**9  # silent for 6 s
    d.shm.heartbeat_ns[1] = now_ns - 10**9
    d._check_heartbeats(now_ns)
    assert [p.killed for p in procs] == [1, 0]


def test_an_acceptor_hung_before_its_hello_is_killed_once_its_start_has_taken_too_long() -> None:
    d = _distributor()
    with socket.socket() as http, socket.socket() as binary:
        acceptors = Acceptors(d, 3, http, binary, b"")
        now = time.monotonic()
        procs = [FakeProc(), FakeProc(), FakeProc()]
        for index, proc in enumerate(procs):
            acceptors.links[index] = AcceptorLink(d, index, b"")
            acceptors.procs[index] = proc  # type: ignore[call-overload]
        acceptors._last_start = [now - START_TIMEOUT - 1, now - 1, now - START_TIMEOUT - 1]
        ready = acceptors.links[2]
        assert ready is not None
        ready.ready = True  # said Hello long ago, and heard from just now: healthy
        acceptors.check_heartbeats(False)
        assert [p.killed for p in procs] == [1, 0, 0]


def test_after_a_stall_of_the_distributor_nothing_is_judged_until_it_has_read_what_came_meanwhile() -> None:
    """A check that follows a stall of the distributor itself (stopped, or its host paused) kills
    nothing: the Hello of a worker that started meanwhile may wait unread in its link (uvloop runs a
    due timer before the reads of the same turn). The next check judges as usual."""
    d = _distributor()
    now = time.monotonic()
    proc = FakeProc()
    s = d.shards[0]
    s.proc = proc  # type: ignore[assignment]
    s.link = object()  # type: ignore[assignment]
    s.ready = False
    s.spawned_at = now - WORKER_START_TIMEOUT - 1
    d._checked = now - 40.0  # the previous check was 40 s ago: this process did not run
    d._check_heartbeats(time.monotonic_ns())
    assert proc.killed == 0
    d._check_heartbeats(time.monotonic_ns())  # a tick later: still no Hello, so it is hung
    assert proc.killed == 1


def test_a_kept_connection_that_cannot_be_handed_is_closed_and_accepting_goes_on() -> None:
    """A connection kept for the acceptors (`_hold`, a burst) whose hand-over raises (a bug) is closed,
    as `_accept` closes one, and the listeners are read again: the service does not stop accepting."""
    import asyncio

    async def main() -> None:
        loop = asyncio.get_running_loop()
        d = _distributor()
        with socket.create_server(("127.0.0.1", 0)) as http, socket.create_server(("127.0.0.1", 0)) as binary:
            acceptors = Acceptors(d, 1, http, binary, b"")
            acceptors._listening = True
            kept, _ = socket.socketpair()

            def broken(kind: bytes, conn: socket.socket) -> bool:
                raise RuntimeError("injected")

            acceptors._hand = broken  # type: ignore[method-assign]
            acceptors._hold(b"h", kept)
            assert not loop.remove_reader(http.fileno())  # not read while a connection is kept
            await asyncio.sleep(0.05)
            assert not acceptors._waiting and kept.fileno() == -1  # closed
            assert loop.remove_reader(http.fileno()) and loop.remove_reader(binary.fileno())  # read again
            _.close()

    logging.disable(logging.CRITICAL)
    try:
        asyncio.run(main())
    finally:
        logging.disable(logging.NOTSET)
