"""A shard worker process: one engine, driven by frames from the distributor over a socket pair.

The worker owns its shard's queues and policies, TTL expiry and displacement victims; it
dispatches only when granted, answers every grant in order (one dispatch or one hand-back), and
mirrors every exit from its queues into its own shared-memory cells (single writer).

Its counts survive its death exactly. It decides and counts in *windows* (a read of the link, a
timer's expiries, a part of the drain's eviction), each under its seqlock and written as one batch
frame, counted in `reported`; before a window that follows new frames it copies its rows
(`ShmStats.checkpoint`); and it decides nothing more while a window's frames wait in this process
for the kernel (the link's writing paused: it stops reading, its timer waits). So when it dies, what
it counted and the distributor never read is exactly its last window, which the distributor takes
back from the copy (`ShmStats.take_back_unreported`) before it ends those requests itself.

It exits when the distributor goes away: the socket closes (EOF), or the parent-death signal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import math
import mmap
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import cast

import uvloop

from flowshard.codec import (
    PREAMBLE_HEADER,
    BatchReader,
    BatchWriter,
    Cancel,
    Charge,
    Done,
    Enqueue,
    Grant,
    GrantBack,
    Hello,
    Shutdown,
    ToWorker,
    decode_config,
    preamble_length,
)
from flowshard.config import Config
from flowshard.engine import Engine
from flowshard.shm import MIN_BACKLOG_BYTES, ShmStats
from flowshard.types import Outcome, Request

log = logging.getLogger(__name__)
_DISPATCHED = Outcome.DISPATCHED
HEARTBEAT_INTERVAL = 0.1
EVICT_CHUNK = 2000  # requests evicted per loop pass at shutdown (a few ms of work: `_evict_rest`)
EVICT_PAUSE = 0.001  # s: the wait for the link to take the last part's frames
WINDOW_FRAMES = 1 << 20  # a window's frames go as one batch frame (whole, or not at all, at a death) up to this
GC_INTERVAL = 5.0


class FrameError(ValueError):
    """A frame the distributor cannot have meant (a slot or band out of range): a bug on the link.
    The worker stops (fail-stop) rather than act on it: a negative slot or band would index another
    cell of shared memory or another band's queue, silently."""


class ShardWorker(asyncio.Protocol):
    """The protocol on the worker's end of the socket pair."""

    def __init__(self, shard: int, engine: Engine, stats: ShmStats, finished: asyncio.Future[None]) -> None:
        self.shard = shard
        self.engine = engine
        self.stats = stats
        self.finished = finished
        self.reader = BatchReader(ToWorker)
        self.writer = BatchWriter(frame_messages=WINDOW_FRAMES)
        self.slots: dict[int, int] = {}  # request id -> flow slot, for the dequeue counters
        self.ceilings = [b.ceiling for b in engine.bands]
        self._recheck = lambda band, saturation: stats.waiting_above(band, self.ceilings, saturation)
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._decided = 0  # the dispatch _grant is reporting: when it was committed (ns)
        self._beat: asyncio.TimerHandle | None = None
        self._closing = False
        self._evicting: asyncio.Handle | None = None  # the next part of the eviction at shutdown
        self._stopped = False
        self._n_slots = stats.layout.flow_slots
        self._n_bands = len(engine.bands)
        self._reported = 0  # frames written (`stats.reported`, this worker's)
        self._checkpointed = 0  # `_reported` at the last checkpoint
        self._held = False  # frames wait in this process for the kernel: decide nothing (`pause_writing`)
        self._timer_due = False  # the TTL timer fired while held

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.transport.set_write_buffer_limits(high=0)  # (`pause_writing` as soon as a byte waits here)
        self.writer.add(Hello(self.shard, os.getpid()))
        self._reported += 1
        self.stats.add_reported(self.shard, 1)  # (counts nothing else: outside any window)
        self.transport.write(self.writer.take())

    def pause_writing(self) -> None:
        """A window's frames wait in this process: the kernel's buffer to the distributor is full. Until
        they have left, read nothing and decide nothing (the timer waits), so that no second window's
        frames can die with this process: what dies unread is then exactly one window's, which the
        distributor takes back (module docstring). The distributor always reads its links, so this
        only waits for it to catch up."""
        self._held = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._held = False
        if self._stopped or self.transport is None or self.transport.is_closing():
            return
        self.transport.resume_reading()
        if self._timer_due:
            self._timer_due = False
            self._on_timer()

    def _open_window(self) -> None:
        """Begin a window of decisions and counts: its rows copied first if frames (and so counts) went
        out since the last copy, then the seqlock's write."""
        if self._reported != self._checkpointed:
            self.stats.checkpoint(self.shard)
            self._checkpointed = self._reported
        self.stats.begin_write(self.shard)

    def _close_window(self) -> bytes:
        """End the window: its frames encoded as one batch frame and counted in `reported`, then the
        seqlock's write ended. The bytes to write (after this, outside the window)."""
        writer = self.writer
        frames = len(writer)
        data = b""
        if frames:
            data = writer.take()
            self._reported += frames
            self.stats.add_reported(self.shard, frames)
        self.stats.end_write(self.shard)
        return data

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None:
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            self.finished.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        now = time.monotonic()
        engine = self.engine
        stats = self.stats
        self._open_window()
        taken = 0  # the Enqueues read, in `backlog_bytes` units: the input backlog JSQ-Bytes's slack packs by
        out = b""  # the window's frames
        try:
            for msg in self.reader.feed(data):
                kind = type(msg)
                if kind is Enqueue:
                    if not (0 <= msg.slot < self._n_slots and msg.size >= 0):
                        raise FrameError(f"Enqueue {msg.id}: slot {msg.slot} or size {msg.size} out of range")
                    taken += msg.size if msg.size > MIN_BACKLOG_BYTES else MIN_BACKLOG_BYTES  # `backlog_bytes`, inline
                    self.slots[msg.id] = msg.slot
                    engine.submit(
                        Request(msg.id, msg.flow, msg.priority, msg.size, msg.ttl, msg.slo, msg.tokens, msg.weight),
                        now,
                        msg.arrived or None,  # deadlines run from the arrival at the distributor
                    )
                elif kind is Grant:
                    if not 0 <= msg.band < self._n_bands:
                        raise FrameError(f"Grant: band {msg.band} out of range")
                    max_bytes = math.inf if msg.max_bytes < 0 else msg.max_bytes
                    for _ in range(msg.count):  # a block: each grant answered in order, each at its own clock
                        # read (not the batch's): a head's deadline is checked as it is dispatched, exactly;
                        # what follows in the batch takes the later clock (its stamps never run backwards)
                        now = time.monotonic()
                        self._grant(now, msg.band, max_bytes, msg.saturation)
                    continue
                elif kind is Cancel:
                    engine.cancel(msg.id, now, Outcome(msg.outcome))
                elif kind is Charge:
                    engine.correct(msg.flow, msg.priority, msg.delta, msg.weight, msg.seq if msg.seq >= 0 else None)
                elif kind is Shutdown:
                    self._closing = True
                    now = time.monotonic()
                    engine.expire(now)  # (past their TTL, in this read or before: `ttl`, as the distributor
                    # may have told their clients already: review 146)
                    engine.shutdown(now, at_most=0)  # (admits no more; the queue goes from the next loop pass,
                    # `_evict_rest`: what this read decided is written first, so a part cut by a kill holds
                    # only evictions)
                if engine.outbox:
                    self._drain()
        except (FrameError, ValueError):  # (ValueError: a Cancel's outcome that is none)
            self._fail_stop("reading a frame")
            return
        finally:
            if taken:
                stats.add_taken(self.shard, taken)
            out = self._close_window()
        self._write(out)
        if self._closing:
            if self._evicting is None:  # (not while a part is scheduled: one chain of parts)
                self._evicting = self.loop.call_soon(self._evict_rest)
        else:
            self._arm_timer()

    def _grant(self, now: float, band: int, max_bytes: float, saturation: float) -> None:
        """Answer one grant: dispatch the best request of band index <= `band` here, or hand it back.

        Strict priority at the moment of dispatch: the grant was planned when no higher band waited,
        but one may have arrived since (on any shard, or in transit). If the distributor's cells say
        a higher band, eligible at this saturation, waits with no grant covering it, the grant is
        narrowed to that band: used for it if this shard holds some, else handed back so the
        distributor can grant it where that work is. The cells are read before the engine's
        selection and again right before its commit (`recheck`): the selection is most of the
        call (tens of µs on a loaded machine), and a higher band published meanwhile narrows the
        grant too. A dispatch carries the clock read right after the engine committed it
        (`Done.decided`): for a band below the top, the distributor, which knows what its plans left
        without budget, decides from it whether it was an inversion; an audited admission reports it
        (`decided`), so an outside check can judge by the same instant."""
        engine, stats = self.engine, self.stats
        top = stats.waiting_above(band, self.ceilings, saturation) if band else 0
        item = engine.dispatch(now, top, max_bytes, saturation, self._recheck if top else None)
        self._decided = time.monotonic_ns() if item is not None else 0
        self._drain()  # TTL evictions on the way, then the dispatch: in order
        self._decided = 0
        if item is None:
            if top < band or engine.vetoed:  # the higher band's need is for its own grant to find out
                stats.add_narrowed(self.shard, band)
                self.writer.add(GrantBack(band, 0))
            else:
                self.writer.add(GrantBack(band, engine.blocked_size))

    def _drain(self) -> None:
        """Turn finished items into Done frames and shared-memory counter updates."""
        stats = self.stats
        shard = self.shard
        slots = self.slots
        add = self.writer.add
        for item in self.engine.take_outbox():
            request = item.request
            outcome = item.outcome
            wait = item.finished_at - item.enqueued_at
            if outcome == _DISPATCHED:
                add(Done(request.id, outcome, wait, item.finished_at, self._decided, item.seq))
            else:
                add(Done(request.id, outcome, wait, item.finished_at))
            stats.add_deq(slots.pop(request.id), shard, item.band, request.size)
            stats.add_outcome(shard, item.band, outcome)
            if outcome == _DISPATCHED:
                stats.observe_wait(shard, item.band, wait)
                stats.add_dispatched(shard)

    def _evict_rest(self) -> None:
        """After `Shutdown`: evict what is still queued, `EVICT_CHUNK` requests per loop pass, each part
        counted and written before the next is taken, then close the link. The distributor takes a
        worker that writes nothing for `SHUTDOWN_SILENCE` as stuck and kills it, ending what it held
        itself: evicted in one go, a very large queue (180,000) kept this one silent past that while
        its cells counted what it evicted, so the exit line counted those twice (review 150). A part
        waits for the last one's frames to leave this process (`get_write_buffer_size`): each part
        is a window (module docstring), so one killed in a part is taken back whole."""
        self._evicting = None
        transport = self.transport
        if self._stopped or transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size():  # the link is behind: the part written waits for it
            self._evicting = self.loop.call_later(EVICT_PAUSE, self._evict_rest)
            return
        if not self.engine.holds:
            transport.close()
            return
        if self._work_reported(lambda now: self.engine.shutdown(now, at_most=EVICT_CHUNK), "evicting at shutdown"):
            self._evicting = self.loop.call_soon(self._evict_rest)

    def _work_reported(self, work: Callable[[float], object], what: str) -> bool:
        """Engine work outside a frame (a TTL timer's, a part of the shutdown's eviction) at the clock
        read now: what it ends is drained into frames and counted in one write of this shard's cells,
        then written; a failure stops the worker (`_fail_stop`). Whether it went through."""
        now = time.monotonic()
        data = b""
        try:
            self._open_window()
            try:
                work(now)
                self._drain()
            finally:
                data = self._close_window()
        except Exception:
            self._fail_stop(what)
            return False
        self._write(data)
        return True

    def _arm_timer(self) -> None:
        """Keep one timer at the earliest TTL deadline, so expiries are reported promptly."""
        if self._stopped:
            return
        deadline = self.engine.next_deadline()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline != math.inf:
            self._timer = self.loop.call_later(max(0.0, deadline - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        if self._stopped:
            return
        if self._held:  # (a window's frames still wait here: `resume_writing` runs this)
            self._timer_due = True
            return
        if self._work_reported(self.engine.expire, "expiring requests"):
            self._arm_timer()

    def _fail_stop(self, what: str) -> None:
        """A bug in a timer's work, or a frame no distributor means: end this worker, as an error
        reading the link does (the loop closes it), so the distributor ends what it held
        (`shard_failure`) and starts another. Logged and carried on, the requests taken out of the
        engine would have had no outcome, for good (a review: a failing expiry left them unanswered
        and their shared-memory counts queued)."""
        log.exception("shard %d: %s failed: stopping", self.shard, what)
        if self.transport is not None:
            self.transport.abort()
        if not self.finished.done():
            self.finished.set_result(None)

    def heartbeat(self, parent: int) -> None:
        self._beat = None
        if self._stopped:
            return
        if os.getppid() != parent and not self.finished.done():
            self.finished.set_result(None)  # orphaned: the distributor is gone
            return
        self.stats.set_heartbeat(self.shard, time.monotonic_ns())
        self.engine.collect_garbage(time.monotonic())
        self._beat = self.loop.call_later(HEARTBEAT_INTERVAL, self.heartbeat, parent)

    def stop(self) -> None:
        """Cancel the timers before shared memory is closed: the loop still runs callbacks that are
        due while it shuts down, and one touching closed shared memory would raise."""
        self._stopped = True
        for handle in (self._beat, self._timer, self._evicting):
            if handle is not None:
                handle.cancel()
        self._beat = self._timer = self._evicting = None
        self._timer_at = math.inf


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux prctl PR_SET_PDEATHSIG).

    With the distributor gone there is nobody to report to, so nothing is lost by dying at once.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)


def attach_segment(name: str) -> tuple[mmap.mmap, int]:
    """Map the distributor's segment from /dev/shm without the resource tracker.

    multiprocessing's SharedMemory would register the segment with a tracker that unlinks it when
    this process exits (Python 3.11); mapping the file directly leaves ownership with the distributor.
    """
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        return mmap.mmap(fd, size), size
    finally:
        os.close(fd)


def read_config(sock: socket.socket) -> Config | None:
    """The configuration the distributor writes first on our socket (see codec.config_preamble),
    read before the event loop starts; None if the distributor went away before sending it."""

    def exactly(n: int) -> bytes | None:
        data = bytearray()
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return bytes(data)

    header = exactly(PREAMBLE_HEADER)
    blob = exactly(preamble_length(header)) if header is not None else None
    return decode_config(blob) if blob is not None else None


async def run(shard: int, sock: socket.socket, shm_name: str, config: Config) -> None:
    loop = asyncio.get_running_loop()
    parent = os.getppid()
    segment, _ = attach_segment(shm_name)
    stats = ShmStats(segment)
    finished: asyncio.Future[None] = loop.create_future()
    engine = Engine(config, enforce_limits=False)
    worker = ShardWorker(shard, engine, stats, finished)
    transport, _ = await loop.create_unix_connection(lambda: worker, sock=sock)
    worker.heartbeat(parent)
    try:
        await finished
    finally:
        worker.stop()
        transport.close()
        stats.close()
        with contextlib.suppress(BufferError):
            segment.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowshard-worker", description="one flowshard shard (started by serve)")
    parser.add_argument("--shard", type=int, required=True)
    parser.add_argument("--fd", type=int, required=True, help="this end of the socket pair")
    parser.add_argument("--shm", required=True, help="shared-memory segment name")
    args = parser.parse_args(argv)
    sock, config = attach_to_distributor(args.fd)
    if config is None:  # the distributor is gone already: nobody to serve
        return 1
    uvloop.run(run(args.shard, sock, args.shm, config))
    return 0


def attach_to_distributor(fd: int) -> tuple[socket.socket, Config | None]:
    """The start of a process the distributor spawned (a worker, an acceptor): its socket to the
    distributor and the configuration read from it (None: the distributor is gone already).

    Ctrl-C, `timeout` and systemd signal the whole process group: the distributor drains us (a
    Shutdown frame), so we ignore them and end on that, on our socket's EOF, or with our parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    sock = socket.socket(fileno=fd)
    return sock, read_config(sock)


if __name__ == "__main__":
    sys.exit(main())
