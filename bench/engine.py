"""In-process steady-state benchmark of the shard engine: dispatches per second per coordinate.

The shape of the upstream flow controller's `BenchmarkFlowController_PerformanceMatrix`, without
sockets or processes, so it measures the engine alone: W requests are kept in the system against
L dispatch slots (L = 0: free flow, never saturated); each `pump` dispatches while the engine's own
budget allows, every dispatched item is released at once and replaced by a new request. Flows are
Zipf-skewed (s = 1.1 over F flows, from a precomputed table with a fixed seed), request i has
priority i % P and 100 B–9 KB (Knuth hash of i). `now` is a virtual clock advanced per pump; only
the steady-state loop, after a warm-up, is timed with the wall clock (and this thread's CPU clock).
Coordinates that differ only in F run side by side, their timed loops interleaved in slices, so the
F=5000/F=10 ratio is not at the mercy of this shared VM's slow phases.

    python -m bench.engine [--json FILE] [--quick] [--repeat N]

As upstream, L = 0 runs only with W <= 100 and L > 0 only with W > L.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import itertools
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.procstat import cpu_model
from flowshard.config import BandConfig, BudgetConfig, Config
from flowshard.engine import Engine
from flowshard.fairness import FAIRNESS
from flowshard.types import Outcome, Request

LIMITS: tuple[int, ...] = (0, 1, 100)
BANDS: tuple[int, ...] = (1, 8)
FLOWS: tuple[int, ...] = (10, 5000)
INGRESS: tuple[int, ...] = (10, 5000)
POLICIES: tuple[str, ...] = ("round-robin", "global-fcfs", "drr", "vtc")

DISPATCHES = 50_000  # timed dispatches per measurement (about 0.3-1 s here)
SLICES = 5  # a group's timed loops alternate in this many slices
QUICK_DISPATCHES = 1_000
TTL = 300.0  # upstream's 5 min: every request carries a deadline (the expiry heap is exercised), none expires
TICK = 1e-6  # virtual seconds per pump round
ZIPF_S = 1.1
ZIPF_V = 1.0
SEED = 1

TARGET_RATE = 100_000.0  # dispatches/s for L=100, F=10
TARGET_RATIO = 0.70  # F=5000 rate / matching F=10 rate


@dataclass(frozen=True, order=True)
class Coordinate:
    """One point of the matrix: L dispatch slots (0: free flow), P bands, F flows, W requests in the system."""

    limit: int
    bands: int
    flows: int
    ingress: int

    @property
    def name(self) -> str:
        return f"L={self.limit} P={self.bands} F={self.flows} W={self.ingress}"

    @property
    def batch(self) -> int:
        """Dispatches per pump in steady state: every slot frees before the next pump."""
        return self.ingress if self.limit == 0 else min(self.limit, self.ingress)

    def matching(self, flows: int) -> Coordinate:
        return Coordinate(self.limit, self.bands, flows, self.ingress)


def runs(limit: int, ingress: int) -> bool:
    """Upstream's skip rule: free flow only with little ingress, a limit only when W exceeds it."""
    return ingress <= 100 if limit == 0 else ingress > limit


def coordinates(
    limits: Iterable[int] = LIMITS,
    bands: Iterable[int] = BANDS,
    flows: Iterable[int] = FLOWS,
    ingress: Iterable[int] = INGRESS,
) -> list[Coordinate]:
    """The matrix in a stable order, with upstream's skipped coordinates left out."""
    return sorted(
        Coordinate(lim, p, f, w) for lim, p, f, w in itertools.product(limits, bands, flows, ingress) if runs(lim, w)
    )


def table_size(flows: int) -> int:
    """The Zipf table's length: the next power of two >= 4F, as upstream (indexed with a bit mask)."""
    return 1 << max(2, (4 * flows - 1).bit_length())


def zipf_table(flows: int, seed: int = SEED) -> list[str]:
    """Flow ids for a power-of-two table (>= 4F entries) drawn with P(k) ∝ (v + k)^-s, like upstream's rand.Zipf.

    Precomputed so the hot loop pays one list index per request, not a random draw.
    """
    size = table_size(flows)
    cum = list(itertools.accumulate((ZIPF_V + k) ** -ZIPF_S for k in range(flows)))
    rng = random.Random(seed)
    total = cum[-1]
    names = [f"flow-{k}" for k in range(flows)]
    return [names[min(bisect.bisect_left(cum, rng.random() * total), flows - 1)] for _ in range(size)]


def make_config(coord: Coordinate, policy: str) -> Config:
    """P bands (priorities 0..P-1) with the policy under test, FCFS, limits that never bind, a long TTL."""
    return Config(
        max_queued_bytes=10_000_000_000,
        max_queued_requests=max(coord.ingress, 100_000),
        default_ttl=TTL,
        budget=BudgetConfig(max_inflight_requests=coord.limit or None, max_inflight_bytes=None),
        bands=[BandConfig(priority=p, fairness=policy, ordering="fcfs") for p in range(coord.bands)],
    )


@dataclass
class Measurement:
    """One coordinate and policy measured once (all its timed slices), with the books that prove nothing was lost."""

    coordinate: str
    policy: str
    dispatches: int  # timed dispatches
    seconds: float  # wall clock (perf_counter) around the timed loop
    rate: float  # dispatches per wall-clock second
    cpu_seconds: float  # this thread's CPU time (thread_time) over the same loop
    cpu_rate: float  # dispatches per CPU second: what the rate would be with the core to itself
    warmup: int
    submitted: int  # over the whole run, fill and warm-up included
    dispatched: int  # over the whole run
    queued: int  # still queued at the end
    inflight: int  # dispatched and not released at the end (0: every slot was freed)
    other_outcomes: int  # anything that ended other than dispatched (0 expected)


class Pipeline:
    """One engine in steady state: W requests in the system, each dispatch released and replaced at once."""

    def __init__(self, coord: Coordinate, policy: str) -> None:
        self.coord = coord
        self.policy = policy
        self.engine = Engine(make_config(coord, policy))
        self.table = zipf_table(coord.flows)
        self.now = 0.0
        self.next_id = 0
        self.dispatched = 0  # counted from pump()'s return
        self.finished = 0  # counted from the outbox
        self.warmup = 0
        self.timed = 0
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        mask = len(self.table) - 1
        for i in range(coord.ingress):
            self.engine.submit(Request(i, self.table[i & mask], i % coord.bands, _size(i)), 0.0)
        self.next_id = coord.ingress

    def batches(self, count: int) -> int:
        """`count` rounded up to whole pumps (a pump dispatches `coord.batch` in steady state)."""
        batch = self.coord.batch
        return -(-count // batch) * batch

    def run(self, count: int) -> int:
        """Pump, release each dispatched item at once and submit a replacement, until `count` dispatches."""
        engine = self.engine
        submit, pump, take_outbox, release = engine.submit, engine.pump, engine.take_outbox, engine.release
        table = self.table
        mask = len(table) - 1
        prios = self.coord.bands
        i = self.next_id
        t = self.now
        done = 0
        finished = 0
        while done < count:
            t += TICK
            done += pump(t)
            out = take_outbox()
            finished += len(out)
            for item in out:
                release(item)
                size = 100 + (i * 2654435769 & 0xFFFFFFFF) % 9000  # _size(i), inlined: this is the timed loop
                submit(Request(i, table[i & mask], i % prios, size), t)
                i += 1
        self.next_id = i
        self.now = t
        self.dispatched += done
        self.finished += finished
        return done

    def warm(self, count: int) -> None:
        self.warmup += self.run(self.batches(count))

    def timed_run(self, count: int) -> None:
        """Run `count` dispatches under the wall clock and this thread's CPU clock."""
        cpu_start = time.thread_time()
        start = time.perf_counter()
        done = self.run(count)
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.thread_time() - cpu_start
        self.timed += done

    def measurement(self) -> Measurement:
        """The figures, after checking the engine's own books against what the loop saw."""
        engine = self.engine
        dispatched = sum(b.outcomes[Outcome.DISPATCHED] for b in engine.bands)
        ended = sum(sum(b.outcomes) for b in engine.bands)
        assert self.dispatched == dispatched, "pump's count disagrees with the engine's outcome counters"
        assert self.finished == ended, "every final outcome reaches the outbox exactly once"
        return Measurement(
            coordinate=self.coord.name,
            policy=self.policy,
            dispatches=self.timed,
            seconds=self.seconds,
            rate=self.timed / self.seconds if self.seconds > 0 else float("inf"),
            cpu_seconds=self.cpu_seconds,
            cpu_rate=self.timed / self.cpu_seconds if self.cpu_seconds > 0 else float("inf"),
            warmup=self.warmup,
            submitted=self.next_id,
            dispatched=dispatched,
            queued=engine.queued_items,
            inflight=engine.budget.inflight,
            other_outcomes=ended - dispatched,
        )


def _size(i: int) -> int:
    """Request i's bytes: upstream's Knuth hash `100 + uint32(i) * 2654435769 % 9000` (100 B to 9 KB)."""
    return 100 + (i * 2654435769 & 0xFFFFFFFF) % 9000


def default_warmup(coord: Coordinate) -> int:
    """One pass over the Zipf table (so every flow the workload uses exists), and at least W."""
    return max(table_size(coord.flows), coord.ingress, 1000)


def measure_group(
    coords: Sequence[Coordinate], policy: str, dispatches: int, warmup: int | None = None, slices: int = SLICES
) -> list[Measurement]:
    """Measure several coordinates interleaved: their timed loops alternate in `slices` slices.

    Coordinates that differ only in F are compared as a ratio; interleaving them in slices of
    ~50 ms spreads this VM's slow phases over both instead of over one. Counts are rounded up
    to whole pumps, so each coordinate gets exactly that many timed dispatches.
    """
    pipes = [Pipeline(c, policy) for c in coords]
    for p in pipes:
        p.warm(default_warmup(p.coord) if warmup is None else warmup)
    plans = []
    for p in pipes:
        total = p.batches(max(dispatches, 1)) // p.coord.batch
        plans.append([(total * (k + 1) // slices - total * k // slices) * p.coord.batch for k in range(slices)])
    for k in range(slices):
        order = list(zip(pipes, plans, strict=True))
        for p, plan in order if k % 2 == 0 else reversed(order):
            if plan[k]:
                p.timed_run(plan[k])
    return [p.measurement() for p in pipes]


def measure(coord: Coordinate, policy: str, dispatches: int, warmup: int | None = None) -> Measurement:
    """Fill W requests, warm up, then time the steady-state loop for `dispatches` dispatches (one coordinate)."""
    return measure_group([coord], policy, dispatches, warmup)[0]


@dataclass
class Cell:
    """Every repetition of one coordinate and policy; the report uses the median."""

    coordinate: Coordinate
    policy: str
    runs: list[Measurement] = field(default_factory=list)

    def rates(self, clock: str = "wall") -> list[float]:
        return [m.rate if clock == "wall" else m.cpu_rate for m in self.runs]

    def median(self, clock: str = "wall") -> float:
        return statistics.median(self.rates(clock))


Cells = dict[tuple[Coordinate, str], Cell]


def run_matrix(
    coords: Sequence[Coordinate],
    policies: Sequence[str],
    dispatches: int,
    repeat: int = 1,
    warmup: int | None = None,
    progress: Callable[[Measurement], None] | None = None,
) -> Cells:
    """Measure every cell `repeat` times, in rounds over the whole matrix so slow phases hit all cells alike.

    The cells that differ only in F are measured together, interleaved (`measure_group`), so the
    F=5000/F=10 ratios compare figures taken in the same moments: this VM has slow phases.
    """
    cells = {(c, p): Cell(c, p) for c in sorted(coords) for p in policies}
    groups: dict[tuple[int, int, int, str], list[Cell]] = {}
    for (c, p), cell in cells.items():
        groups.setdefault((c.limit, c.bands, c.ingress, p), []).append(cell)
    for round_ in range(repeat):
        for group in groups.values():
            ordered = group if round_ % 2 == 0 else group[::-1]
            results = measure_group([cell.coordinate for cell in ordered], ordered[0].policy, dispatches, warmup)
            for cell, m in zip(ordered, results, strict=True):
                cell.runs.append(m)
                if progress is not None:
                    progress(m)
    return cells


def ratios(cells: Cells, clock: str = "wall") -> list[dict[str, Any]]:
    """F=max / F=min rate for every matching (L, P, W, policy) measured with both flow counts.

    Each round's pair (taken back to back) gives one ratio; the report uses their median.
    """
    flows = sorted({c.flows for c, _ in cells})
    if len(flows) < 2:
        return []
    low, high = flows[0], flows[-1]
    out = []
    for (coord, policy), few in cells.items():
        many = cells.get((coord.matching(high), policy))
        if coord.flows != low or many is None:
            continue
        per_round = [m / f for f, m in zip(few.rates(clock), many.rates(clock), strict=True)]
        out.append(
            {
                "pair": f"L={coord.limit} P={coord.bands} F={high}/{low} W={coord.ingress}",
                "coordinate": coord.name,
                "matching": many.coordinate.name,
                "policy": policy,
                "ratio": statistics.median(per_round),
                "per_round": per_round,
            }
        )
    return out


def targets(cells: Cells, ratio_rows: list[dict[str, Any]], clock: str = "wall") -> dict[str, Any]:
    """The issue's two targets: rate at L=100, F=10 and the F=5000/F=10 ratios."""
    rate_cells = [cell for (c, _), cell in cells.items() if c.limit == 100 and c.flows == 10]
    min_rate = min((cell.median(clock) for cell in rate_cells), default=None)
    min_ratio = min((r["ratio"] for r in ratio_rows), default=None)
    return {
        "clock": clock,
        "rate_target": TARGET_RATE,
        "rate_min": min_rate,
        "rate_met": None if min_rate is None else min_rate >= TARGET_RATE,
        "ratio_target": TARGET_RATIO,
        "ratio_min": min_ratio,
        "ratio_met": None if min_ratio is None else min_ratio >= TARGET_RATIO,
        "ratio_misses": [f"{r['pair']} {r['policy']}" for r in ratio_rows if r["ratio"] < TARGET_RATIO],
    }


def machine() -> dict[str, Any]:
    """What the figures depend on: cores, CPU model, Python."""
    model = cpu_model()
    return {
        "nproc": os.cpu_count(),
        "cpu": model if model != "unknown" else platform.processor() or model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }


def _fmt_rate(rate: float) -> str:
    return f"{rate:,.0f}"


def table(cells: Cells, policies: Sequence[str], clock: str = "wall") -> str:
    """Markdown table: coordinate rows x policy columns, median dispatches/s (min–max when repeated)."""
    coords = sorted({c for c, _ in cells})
    repeated = any(len(cell.runs) > 1 for cell in cells.values())
    lines = ["| coordinate | " + " | ".join(policies) + " |", "|---|" + "---:|" * len(policies)]
    for coord in coords:
        row = []
        for policy in policies:
            cell = cells[coord, policy]
            rates = cell.rates(clock)
            text = _fmt_rate(cell.median(clock))
            if repeated:
                text += f" ({_fmt_rate(min(rates))}–{_fmt_rate(max(rates))})"
            row.append(text)
        lines.append(f"| {coord.name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def ratio_table(ratio_rows: list[dict[str, Any]], policies: Sequence[str]) -> str:
    """Markdown table of F=5000/F=10 per matching coordinate and policy; `*` marks a miss of the target."""
    by_coord: dict[str, dict[str, float]] = {}
    for r in ratio_rows:
        by_coord.setdefault(r["pair"], {})[r["policy"]] = r["ratio"]
    lines = ["| ratio | " + " | ".join(policies) + " |", "|---|" + "---:|" * len(policies)]
    for name, row in by_coord.items():
        cols = []
        for p in policies:
            v = row.get(p)
            cols.append("–" if v is None else f"{v:.2f}" + ("" if v >= TARGET_RATIO else " *"))
        lines.append(f"| {name} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def lost_requests(cells: Cells) -> list[Measurement]:
    """Measurements whose books do not balance: submitted != dispatched + queued, a slot left taken, or a
    request that ended other than dispatched."""
    return [
        m
        for cell in cells.values()
        for m in cell.runs
        if m.submitted != m.dispatched + m.queued or m.inflight or m.other_outcomes
    ]


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _policies(text: str) -> tuple[str, ...]:
    names = tuple(text.split(","))
    for name in names:
        if name not in FAIRNESS:
            raise argparse.ArgumentTypeError(f"unknown policy {name!r}; allowed: {', '.join(FAIRNESS)}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.engine", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--json", metavar="FILE", help="write every figure (each repetition, both clocks) as JSON")
    ap.add_argument("--quick", action="store_true", help=f"CI smoke: {QUICK_DISPATCHES} dispatches, short warm-up")
    ap.add_argument("--dispatches", type=int, help=f"timed dispatches per measurement (default {DISPATCHES})")
    ap.add_argument("--warmup", type=int, help="warm-up dispatches (default: one pass over the Zipf table, >= W)")
    ap.add_argument("--repeat", type=int, default=1, help="measure the whole matrix N times; report medians")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="figures from wall time (default) or from this thread's CPU time (immune to other processes)",
    )
    ap.add_argument("--limits", type=_ints, default=LIMITS, help="L values, comma-separated (0: free flow)")
    ap.add_argument("--bands", type=_ints, default=BANDS, help="P values")
    ap.add_argument("--flows", type=_ints, default=FLOWS, help="F values")
    ap.add_argument("--ingress", type=_ints, default=INGRESS, help="W values")
    ap.add_argument("--policies", type=_policies, default=POLICIES, help="fairness policies, comma-separated")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each measurement as it finishes")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.dispatches is not None and args.dispatches < 1:
        ap.error("--dispatches must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the matrix, print the tables and the target verdicts; exit 1 if any request went missing."""
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    dispatches = args.dispatches or (QUICK_DISPATCHES if args.quick else DISPATCHES)
    warmup = args.warmup if args.warmup is not None else (100 if args.quick else None)
    clock = args.clock
    coords = coordinates(args.limits, args.bands, args.flows, args.ingress)
    if not coords:
        print("no coordinate left after the skip rule (L=0 needs W<=100, L>0 needs W>L)", file=sys.stderr)
        return 2

    def progress(m: Measurement) -> None:
        print(
            f"  {m.coordinate:<24} {m.policy:<12} {_fmt_rate(m.rate):>9} d/s wall {_fmt_rate(m.cpu_rate):>9} d/s cpu",
            file=sys.stderr,
            flush=True,
        )

    started = datetime.datetime.now(datetime.UTC)
    cells = run_matrix(coords, args.policies, dispatches, args.repeat, warmup, progress if args.verbose else None)
    ratio_rows = ratios(cells, clock)
    verdict = targets(cells, ratio_rows, clock)
    lost = lost_requests(cells)
    runs = [m for cell in cells.values() for m in cell.runs]
    utilisation = sum(m.cpu_seconds for m in runs) / sum(m.seconds for m in runs)
    info = machine()

    print(
        f"python -m bench.engine {' '.join(argv)}\n"
        f"{started:%Y-%m-%d %H:%M} UTC; {info['nproc']} CPUs, {info['cpu']}; Python {info['python']}; "
        f"{dispatches:,} timed dispatches per cell, median of {args.repeat} round(s)\n"
        f"dispatches per second ({clock} clock; CPU time / wall time over all timed loops: {utilisation:.2f})\n"
    )
    print(table(cells, args.policies, clock))
    if ratio_rows:
        print()
        print(ratio_table(ratio_rows, args.policies))
    print()
    if verdict["rate_min"] is not None:
        ok = "met" if verdict["rate_met"] else "MISSED"
        print(f"target L=100 F=10 >= {TARGET_RATE:,.0f} d/s: {ok} (lowest {_fmt_rate(verdict['rate_min'])})")
    if verdict["ratio_min"] is not None:
        ok = "met" if verdict["ratio_met"] else "MISSED: " + ", ".join(verdict["ratio_misses"])
        print(f"target F=5000/F=10 >= {TARGET_RATIO:.2f}: {ok} (lowest {verdict['ratio_min']:.2f})")
    if utilisation < 0.95:
        print(f"note: the timed loops had {utilisation:.0%} of a core; other processes competed (see --clock cpu)")
    if lost:
        print(f"ERROR: {len(lost)} measurement(s) lost requests or left slots taken", file=sys.stderr)

    if args.json:
        doc = {
            "command": " ".join(["python -m bench.engine", *argv]),
            "date": started.isoformat(timespec="seconds"),
            "machine": info,
            "parameters": {
                "dispatches": dispatches,
                "warmup": warmup,
                "repeat": args.repeat,
                "clock": clock,
                "ttl": TTL,
                "tick": TICK,
                "zipf": {"s": ZIPF_S, "v": ZIPF_V, "seed": SEED},
                "policies": list(args.policies),
                "coordinates": [asdict(c) | {"name": c.name} for c in coords],
            },
            "utilisation": utilisation,
            "results": [
                {
                    "coordinate": asdict(cell.coordinate) | {"name": cell.coordinate.name},
                    "policy": cell.policy,
                    "median": cell.median("wall"),
                    "min": min(cell.rates("wall")),
                    "max": max(cell.rates("wall")),
                    "cpu_median": cell.median("cpu"),
                    "runs": [asdict(m) for m in cell.runs],
                }
                for cell in cells.values()
            ],
            "ratios": {"wall": ratios(cells, "wall"), "cpu": ratios(cells, "cpu")},
            "targets": {
                "wall": targets(cells, ratios(cells, "wall"), "wall"),
                "cpu": targets(cells, ratios(cells, "cpu"), "cpu"),
            },
            "lost": len(lost),
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
