"""A worker killed at any moment leaves the service's counts exact (the old "known blur").

A worker counts what it decides in its shared-memory cells and writes its reports at the end of the
window of work that decided them (a read, a timer, a part of the drain). Killed after counting and
before its frames reached the distributor, its decisions were counted by it and again by the
distributor, which ends those requests `evicted: shard_failure` (review 169: 1-3 extra outcomes in 27
of 170 kills aimed at a read; up to a part of 512 or 2,000 while evicting). Now the worker copies its
rows before each window and writes a window as one frame, and decides nothing while a window's frames
wait in its process; the distributor, reading the dead link to its end, takes the unread window back
from the copy (`ShmStats.take_back_unreported`).

A real Distributor and real ShardWorkers in one process (as tests/test_unclaimed.py): the frames each
way are handed over by the test, so a kill can fall after any window, with its frame read or lost, or
inside one. The oracle is the clients' own tally: every outcome counted (the cells that `/metrics`,
`/v1/stats` and the exit line read) is one a client was told, band by band, and the wait histogram
counts exactly the dispatches."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_unclaimed import Link
from test_worker import FakeTransport

from distributor.service import Distributor
from flowshard.codec import Grant
from flowshard.config import BandConfig, BudgetConfig, Config, ServiceConfig
from flowshard.engine import Engine
from flowshard.shm import ShmStats
from flowshard.types import Outcome
from workers.worker import ShardWorker

HIGH, LOW = 10, 0  # priorities; band indices 0 and 1
BAND = {HIGH: 0, LOW: 1}


class Windows(FakeTransport):
    """A worker's end of its link: each write (one window's frame) kept apart, for the test to hand
    over or lose."""

    def __init__(self) -> None:
        super().__init__()
        self.unread: list[list[Any]] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        before = len(self.got)
        super().write(data)
        self.unread.append(self.got[before:])

    def abort(self) -> None:
        self.aborted = True


class DeadProc:
    """A killed worker's process, as `on_worker_lost` reaps it."""

    pid = 4242

    def wait(self, timeout: float | None = None) -> int:
        return -9

    def kill(self) -> None:
        pass


class Tally:
    """What the clients were told, per (band, outcome)."""

    def __init__(self) -> None:
        self.told: Counter[tuple[int, Outcome]] = Counter()
        self.band: dict[int, int] = {}
        self.answered: dict[int, Outcome] = {}

    def deliver(self, cid: Any, request_id: int, outcome: Outcome, ticket: int, *rest: Any) -> None:
        assert cid not in self.answered, f"request {cid} answered twice"
        self.answered[cid] = outcome
        self.told[(self.band[cid], outcome)] += 1


class Rig:
    """A Distributor and its shards' workers in one process, the frames handed over by the test (also
    tests/test_deadline_across_shards.py's)."""

    def __init__(self, shards: int, budget: int, **band: Any) -> None:
        config = Config(bands=[BandConfig(priority=HIGH, name="high", **band),
                               BandConfig(priority=LOW, name="low", **band)],
                        budget=BudgetConfig(max_inflight_requests=budget),
                        service=ServiceConfig(fast_path=False, jsq_slack_bytes=0), flow_slots=64)
        self.d = d = Distributor(config, shards=shards)
        d.shm = ShmStats(bytearray(d.layout.nbytes), d.layout, init=True)
        d._accepting = True
        d._loop = asyncio.get_running_loop()  # (its timers never run here: a restart is `_start`'s)
        self.config = config
        self.tally = Tally()
        self.links: list[Link] = []
        self.workers: list[ShardWorker] = []
        self.transports: list[Windows] = []
        self.departed: Counter[int] = Counter()  # per band: requests whose client left before an answer
        self.next_cid = 0
        for n in range(shards):
            self.links.append(Link())
            self._start(n)

    def _start(self, n: int) -> None:
        s = self.d.shards[n]
        s.ready = True
        s.link = self.links[n]  # type: ignore[assignment]
        s.proc = DeadProc()  # type: ignore[assignment]
        worker = ShardWorker(n, Engine(self.config, enforce_limits=False), self.d.shm,
                             asyncio.get_running_loop().create_future())
        transport = Windows()
        worker.connection_made(transport)  # type: ignore[arg-type]
        if n < len(self.workers):
            self.workers[n], self.transports[n] = worker, transport
        else:
            self.workers.append(worker)
            self.transports.append(transport)
        self.read(n)  # its Hello

    def admit(self, flow: str, priority: int, ttl: float = 0.0) -> int:
        cid = self.next_cid
        self.next_cid += 1
        self.tally.band[cid] = BAND[priority]
        self.d.admit(self.tally, cid, flow, priority, 100, ttl, 0.0, 0, 0.0, False)
        return cid

    def leave(self, cid: int) -> None:
        """The client of `cid` leaves before its answer (if it has none yet)."""
        if cid in self.tally.answered:
            return
        for p in list(self.d.pending.values()):
            if p.owner is not None and p.owner[1] == cid:
                self.d.cancel(p.id)
                self.departed[self.tally.band[cid]] += 1
                self.tally.answered[cid] = Outcome.EVICTED_CANCELLED  # (no answer: counted so by the service)

    def run_pass(self) -> None:
        """The distributor's pass (plan, grants, Enqueues), each shard's read of it: one window each."""
        self.d._plan_needed = True
        self.d._end_pass()
        for n, link in enumerate(self.links):
            for data in link.inbox:
                self.workers[n].data_received(data)
            link.inbox.clear()

    def read(self, n: int) -> None:
        """The distributor reads every window shard `n` has written."""
        t = self.transports[n]
        for window in t.unread:
            self.d.on_worker_frames(n, window)
        t.unread.clear()

    def kill(self, n: int, *, last_window_read: bool) -> None:
        """Shard `n`'s worker dies: every window it wrote but its last reached the distributor (a worker
        decides nothing while a window waits in its process), the last one too if `last_window_read`;
        then its link's end (`on_worker_lost`), and a successor."""
        t = self.transports[n]
        last = t.unread.pop() if t.unread and not last_window_read else None
        self.read(n)
        del last  # (died in the socket with the worker)
        self.workers[n].stop()
        self.d.on_worker_lost(n, self.links[n])  # type: ignore[arg-type]
        self._start(n)

    def counted(self) -> Counter[tuple[int, Outcome]]:
        by_band = self.d.shm.snapshot()["outcomes"].sum(axis=0)  # type: ignore[union-attr]
        return Counter({(band, Outcome(o)): int(n) for (band, o), n in np.ndenumerate(by_band) if n})

    def check(self) -> None:
        """Every outcome counted is one a client was told (or a departed client's cancel), and the
        wait histogram counts exactly the dispatches."""
        told = self.tally.told + Counter({(band, Outcome.EVICTED_CANCELLED): n for band, n in self.departed.items()})
        assert self.counted() == +told
        snap = self.d.shm.snapshot()  # type: ignore[union-attr]
        dispatched = sum(n for (_, o), n in told.items() if o == Outcome.DISPATCHED)
        assert int(snap["wait_hist"].sum()) == dispatched == int(snap["dispatched"].sum())


def test_a_worker_killed_after_dispatching_with_its_window_unread_counts_each_request_once() -> None:
    """The common case of the blur: a read dispatched (and evicted past their TTL) requests, counted
    them, and the worker died before its frame reached the distributor, which ends them
    `shard_failure`. Was: counted `dispatched` by the worker and `shard_failure` by the distributor."""

    async def main() -> None:
        rig = Rig(shards=1, budget=3)
        cids = [rig.admit(f"f{i % 3}", HIGH if i % 2 else LOW, ttl=0.002 if i == 5 else 0.0) for i in range(8)]
        time.sleep(0.003)  # request 5 is past its TTL: the next grant evicts it on its way
        rig.run_pass()  # Enqueues and 3 grants: dispatched and evicted in the worker's window
        assert len(rig.transports[0].unread[-1]) >= 3
        rig.kill(0, last_window_read=False)
        assert set(rig.tally.answered) == set(cids)
        assert set(rig.tally.answered.values()) == {Outcome.EVICTED_SHARD_FAILURE}
        rig.check()

    asyncio.run(main())


def test_a_worker_killed_with_its_last_window_read_takes_nothing_back() -> None:
    async def main() -> None:
        rig = Rig(shards=1, budget=2)
        for i in range(6):
            rig.admit(f"f{i % 2}", LOW)
        rig.run_pass()
        rig.kill(0, last_window_read=True)
        assert Counter(rig.tally.answered.values()) == {Outcome.DISPATCHED: 2, Outcome.EVICTED_SHARD_FAILURE: 4}
        rig.check()

    asyncio.run(main())


def test_a_worker_that_dies_inside_its_window_is_taken_back_to_the_window_start() -> None:
    """Killed between two cells of one dispatch (its seqlock odd, its frames never written): the
    whole window, half-counted, is undone."""

    async def main() -> None:
        rig = Rig(shards=1, budget=4)
        for i in range(5):
            rig.admit(f"f{i}", LOW)
        rig.run_pass()
        rig.read(0)  # that window reached the distributor: 4 dispatched, counted once
        worker = rig.workers[0]
        for ticket in list(rig.d.tickets):
            rig.d.release(ticket)
        rig.d._plan_needed = True
        rig.d._end_pass()  # a grant for the fifth
        worker._open_window()  # the worker's next read begins ...
        worker.engine.dispatch(time.monotonic(), BAND[LOW], float("inf"), 0.0, None)
        item = worker.engine.take_outbox()[0]
        worker.stats.add_outcome(0, item.band, item.outcome)  # ... and is killed between two of its cells
        assert worker.stats.seq[0] % 2 == 1
        rig.links[0].inbox.clear()
        rig.kill(0, last_window_read=True)
        assert Counter(rig.tally.answered.values()) == {Outcome.DISPATCHED: 4, Outcome.EVICTED_SHARD_FAILURE: 1}
        rig.check()

    asyncio.run(main())


def test_a_worker_that_fails_in_a_read_has_that_reads_counts_taken_back() -> None:
    """A frame no distributor means stops the worker in its read (`_fail_stop`: its frames aborted,
    never written): what that read had decided and counted before the bad frame is taken back."""

    async def main() -> None:
        rig = Rig(shards=1, budget=2)
        for i in range(4):
            rig.admit(f"f{i}", LOW)
        rig.d._end_pass()
        worker = rig.workers[0]
        for data in rig.links[0].inbox:  # Enqueues and two grants, then a grant for a band that is none
            worker.data_received(data + _grant_frame(band=7))
        rig.links[0].inbox.clear()
        assert rig.transports[0].aborted and not rig.transports[0].unread
        assert worker.stats.outcomes[0].sum() == 2  # it had dispatched two, counted
        rig.kill(0, last_window_read=True)
        assert set(rig.tally.answered.values()) == {Outcome.EVICTED_SHARD_FAILURE}
        rig.check()

    asyncio.run(main())


def _grant_frame(band: int) -> bytes:
    from flowshard.codec import BatchWriter

    w = BatchWriter()
    w.add(Grant(band, -1, 0.0, 1))
    return w.take()


def test_a_worker_whose_frames_wait_in_its_process_decides_nothing_until_they_leave() -> None:
    """What makes one window enough: while the kernel's buffer to the distributor is full (the link's
    writing paused), the worker reads nothing (the transport's reading paused) and its TTL timer waits;
    once the frames have left, the timer's window runs."""

    async def main() -> None:
        rig = Rig(shards=1, budget=1)
        worker, transport = rig.workers[0], rig.transports[0]
        assert transport.high == 0  # (paused as soon as a byte waits in the process)
        rig.admit("a", LOW)
        rig.admit("b", LOW, ttl=0.002)
        rig.run_pass()
        rig.read(0)
        worker.pause_writing()
        assert transport.reading is False
        time.sleep(0.003)
        seq = int(worker.stats.seq[0])
        worker._on_timer()  # "b" is past its TTL: nothing is decided while held
        assert int(worker.stats.seq[0]) == seq and not transport.unread
        worker.resume_writing()
        assert transport.reading is True
        assert [m.outcome for m in transport.unread[-1]] == [int(Outcome.EVICTED_TTL)]
        rig.read(0)
        rig.check()

    asyncio.run(main())


ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.integers(0, 3), st.sampled_from([HIGH, LOW]), st.sampled_from([0.0, 0.001])),
        st.tuples(st.just("pass")),
        st.tuples(st.just("read"), st.integers(0, 1)),
        st.tuples(st.just("release")),
        st.tuples(st.just("leave"), st.integers(0, 40)),
        st.tuples(st.just("timer"), st.integers(0, 1)),
        st.tuples(st.just("kill"), st.integers(0, 1), st.booleans()),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=ACTIONS, budget=st.integers(1, 4))
def test_counts_stay_exact_through_kills_at_any_window(actions: list[tuple[Any, ...]], budget: int) -> None:
    """Admissions, passes, releases, departures, TTL expiries and kills in any order at 2 shards, each
    kill after any window with that window's frame read or lost: once what is in flight has arrived,
    the counts are the clients' tally exactly."""

    async def main() -> None:
        rig = Rig(shards=2, budget=budget)
        for action in actions:
            kind = action[0]
            if kind == "admit":
                rig.admit(f"f{action[1]}", action[2], ttl=action[3])
            elif kind == "pass":
                rig.run_pass()
            elif kind == "read":
                rig.read(action[1])
            elif kind == "release":
                for ticket in list(rig.d.tickets)[:1]:
                    rig.d.release(ticket)
            elif kind == "leave":
                rig.leave(action[1])
            elif kind == "timer":
                time.sleep(0.0012)
                rig.workers[action[1]]._on_timer()
            else:
                rig.kill(action[1], last_window_read=action[2])
        for n in range(2):  # (what is in flight each way arrives: the departed clients' cancels)
            rig.read(n)
        rig.run_pass()
        for n in range(2):
            rig.read(n)
        rig.check()

    asyncio.run(main())


def test_what_the_counters_show_never_includes_a_window_that_could_be_taken_back() -> None:
    """Review 182: `/metrics` showed a window's counts as soon as the worker made them, and after its
    death the take-back made `flowshard_requests_total` and the other counters fall (558 -> 549), which
    Prometheus reads as a reset. A shard's counts are shown as of the frames the distributor has read of
    it: a window unread (or in progress) shows once read, and a series only ever grows."""
    from distributor.metrics import stats_snapshot

    def seen(rig: Rig) -> dict[tuple[str, str], int]:
        return {(b["name"], label): n for b in stats_snapshot(rig.d)["bands"] for label, n in b["outcomes"].items()}

    async def main() -> None:
        rig = Rig(shards=1, budget=3)
        for i in range(6):
            rig.admit(f"f{i % 3}", LOW)
        first = seen(rig)
        rig.run_pass()  # a window dispatched 3 and counted them; its frame is not read yet
        assert rig.workers[0].stats.outcomes[0].sum() == 3
        assert seen(rig) == first  # (was: the 3 dispatches, taken back below)
        rig.read(0)
        read = seen(rig)
        assert read[("low", "dispatched")] == 3
        for ticket in list(rig.d.tickets):
            rig.d.release(ticket)
        rig.run_pass()  # the next window: 3 more, unread as the worker dies
        unread = seen(rig)
        rig.kill(0, last_window_read=False)
        after = seen(rig)
        for series in (first, read, unread):
            assert all(after[k] >= v for k, v in series.items())  # never down
        assert unread == read and after[("low", "evicted:shard_failure")] == 3

    asyncio.run(main())
