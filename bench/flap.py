"""The ledger's cost per request while a band flaps between one shard and two, lone against always fair.

A band keeps its fair state across shards only while its flows sit on two shards or more
(`Ledger._rebase`, `Ledger._settle`); a band that keeps coming back to two would pay a re-base,
O(its queued requests), each time, were it not for the hysteresis. This drives one `Ledger` alone
(no engine, no service): `--flows` flows kept `--depth` requests deep in total on shard 0, and a thin
flow's single request on shard 1 every `--period` dispatches; each grant is answered at once with a
dispatch from its shard and the ticket released. It prints the µs per dispatched request (this
driver's own work included, the same in both) and the re-bases, for the lone ledger (the service's)
and the always-fair one (`Ledger(lone=False)`), alternated, best of `--runs`.

    python -m bench.flap [--period 70] [--depth 1000] [--flows 4] [--requests 100000] [--runs 3]
    python -m bench.flap --pause [--depth 100000] [--flows 5000] [--runs 3]

`--pause`: how long the one enqueue that re-bases a lone band holding `--depth` requests of `--flows`
flows on shard 0 takes (a thin flow's first request, on shard 1): the distributor's loop stops that
long, once per spill.
"""

from __future__ import annotations

import argparse
import time
from collections import deque

from flowshard.config import BandConfig, BudgetConfig, Config
from flowshard.ledger import Ledger, LedgerBand, Pending


class _Counted(Ledger):
    """The ledger, counting its re-bases."""

    rebases = 0

    def _rebase(self, band: LedgerBand) -> None:
        self.rebases += 1
        super()._rebase(band)


def measure(lone: bool, period: int, depth: int, flows: int = 4, requests: int = 100_000, shards: int = 8,
            budget: int = 8) -> tuple[float, int]:
    """One run: (µs per dispatched request, re-bases)."""
    config = Config(bands=[BandConfig(priority=0, fairness="drr")], budget=BudgetConfig(max_inflight_requests=budget),
                    max_queued_requests=None, max_queued_bytes=None)
    ledger = _Counted(config, shards, lone=lone)
    queues: list[deque[Pending]] = [deque() for _ in range(shards)]
    held = {f"f{i}": 0 for i in range(flows)}
    rid = done = 0
    thin_due, thin_queued = period, False
    start = time.perf_counter()
    while done < requests:
        for flow in held:
            while held[flow] < depth // flows:
                rid += 1
                p = Pending(rid, flow, 0, 100 + rid % 50)
                ledger.enqueue(p, 0)
                queues[0].append(p)
                held[flow] += 1
        if done >= thin_due and not thin_queued:
            rid += 1
            p = Pending(rid, "thin", 0, 120)
            ledger.enqueue(p, 1)
            queues[1].append(p)
            thin_due, thin_queued = done + period, True
        for shard, _, _, _ in ledger.plan_grants():
            p = queues[shard].popleft()
            _, live = ledger.grant_answered(shard, p.size, dispatched=p)
            ledger.leave(p, covered=live)
            ledger.release(p.size)
            if p.flow in held:
                held[p.flow] -= 1
            else:
                thin_queued = False
            done += 1
    return (time.perf_counter() - start) / done * 1e6, ledger.rebases


def rebase_pause(depth: int, flows: int, shards: int = 8) -> float:
    """Seconds the enqueue that re-bases a lone drr band holding `depth` requests over `flows` flows takes."""
    config = Config(bands=[BandConfig(priority=0, fairness="drr")], budget=BudgetConfig(max_inflight_requests=100),
                    max_queued_requests=None, max_queued_bytes=None)
    ledger = _Counted(config, shards)
    for rid in range(depth):
        ledger.enqueue(Pending(rid, f"f{rid % flows}", 0, 100 + rid % 50), 0)
    ledger.plan_grants()
    thin = Pending(depth, "thin", 0, 120)
    start = time.perf_counter()
    ledger.enqueue(thin, 1)
    took = time.perf_counter() - start
    assert ledger.rebases == 1
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--period", type=int, default=70, help="dispatches between the thin flow's requests")
    parser.add_argument("--depth", type=int, help="requests queued on shard 0, in total (default 1000; "
                                                   "--pause: 100000)")
    parser.add_argument("--flows", type=int, help="flows holding them (default 4; --pause: 5000)")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pause", action="store_true", help="time one re-base instead (default --depth 100000 "
                                                              "--flows 5000)")
    args = parser.parse_args(argv)
    if args.depth is None:
        args.depth = 100_000 if args.pause else 1000
    if args.flows is None:
        args.flows = 5_000 if args.pause else 4
    for name, value in (("--period", args.period), ("--depth", args.depth), ("--flows", args.flows),
                        ("--requests", args.requests), ("--runs", args.runs)):
        if value < 1:
            parser.error(f"{name}: {value} is below 1")
    if args.pause:
        depth, flows = args.depth, args.flows
        took = [rebase_pause(depth, flows) for _ in range(args.runs)]
        print(f"re-base with {depth} queued in {flows} flows: {min(took) * 1e3:.2f} ms "
              f"({', '.join(f'{t * 1e3:.2f}' for t in took)})", flush=True)
        return 0
    runs: dict[bool, list[tuple[float, int]]] = {True: [], False: []}
    for _ in range(args.runs):
        for lone in (True, False):
            runs[lone].append(measure(lone, args.period, args.depth, args.flows, args.requests))
    for lone, name in ((True, "lone"), (False, "always fair")):
        best, rebases = min(runs[lone])
        print(f"{name}: {best:.2f} µs/request ({', '.join(f'{us:.2f}' for us, _ in runs[lone])}), {rebases} re-bases",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
