"""Per-hop costs of the service: CPU µs, read()/write() calls and frames per dispatched request, per process.

Why: the bench's projection says *which* process saturates; this says what each one does per request
(how many system calls, how many frames), so a change to the distributor–shard split can be judged
hop by hop. System calls come from `/proc/<pid>/io` (`syscr`, `syscw`: every read/write-family call
the process made, sockets included), CPU from `/proc/<pid>/stat`, frames from the distributor's own
counters in `GET /v1/stats` (frames to and from each shard; a shard's frames in and out are the same
frames seen from its side). Everything is sampled at the start and the end of the whole run
(warm-up included) and divided by the requests dispatched in between.

    python -m bench.hops SCENARIO.toml [--shards 1,2,4,8] [--procs 2] [--acceptors K] [--http] [--no-audit]
                         [--duration S] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from typing import Any

from bench.cli import adjust
from bench.procstat import ProcId, sample
from bench.runner import BenchError, Options, Server, run_once
from flowshard.config import ConfigError
from flowshard.simulate import read_scenario

__all__ = ["main", "measure"]


def _io(proc: ProcId) -> tuple[int, int]:
    """(read calls, write calls) of a process so far; (0, 0) if it cannot be read."""
    try:
        with open(f"/proc/{proc.pid}/io") as f:
            fields = dict(line.split(": ") for line in f.read().splitlines())
    except OSError:
        return 0, 0
    return int(fields["syscr"]), int(fields["syscw"])


def _snapshot(server: Server) -> dict[str, tuple[float, int, int]]:
    out: dict[str, tuple[float, int, int]] = {}
    for proc in server.processes():
        if proc.role == "tracker":
            continue
        cpu = sample(proc)
        reads, writes = _io(proc)
        out[proc.role] = (cpu.cpu if cpu else 0.0, reads, writes)
    return out


def _dispatched(stats: dict[str, Any] | None) -> int:
    if not stats:
        return 0
    return sum(b["outcomes"].get("dispatched", 0) for b in stats["bands"])


def _frames(stats: dict[str, Any] | None) -> tuple[int, int]:
    if not stats:
        return 0, 0
    return (sum(s.get("frames_to", 0) for s in stats["shards"]), sum(s.get("frames_from", 0) for s in stats["shards"]))


async def measure(path: str, shards: int, procs: int, duration: float | None, acceptors: str = "auto",
                  http: bool = False, audit: bool = True) -> dict[str, Any]:
    scenario = adjust(read_scenario(path), duration=duration)
    with tempfile.TemporaryDirectory(prefix="flowshard-hops-") as tmp:
        server = Server.start_flowshard(scenario, shards, tmp, acceptors)
        try:
            before, stats0 = _snapshot(server), await server.stats()
            await run_once(scenario, server, Options(procs=procs, transport="http" if http else "binary", audit=audit))
            after, stats1 = _snapshot(server), await server.stats()
        finally:
            server.stop()
    n = max(1, _dispatched(stats1) - _dispatched(stats0))
    to0, from0 = _frames(stats0)
    to1, from1 = _frames(stats1)
    per: dict[str, dict[str, float]] = {}
    for role, (cpu, reads, writes) in after.items():
        c0, r0, w0 = before.get(role, (0.0, 0, 0))
        per[role] = {"cpu_us": (cpu - c0) / n * 1e6, "reads": (reads - r0) / n, "writes": (writes - w0) / n}
    workers = [v for k, v in per.items() if k.startswith("worker")]
    per["workers (sum)"] = {k: sum(w[k] for w in workers) for k in ("cpu_us", "reads", "writes")}
    fronts = [v for k, v in per.items() if k.startswith("acceptor")]
    if fronts:
        per["acceptors (sum)"] = {k: sum(w[k] for w in fronts) for k in ("cpu_us", "reads", "writes")}
    return {"shards": shards, "dispatched": n, "frames_to_shards": (to1 - to0) / n,
            "frames_from_shards": (from1 - from0) / n, "per_process": per}


def _shard_list(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected shard counts like 1,2,4, got {text!r}") from None
    if not all(1 <= n <= 256 for n in counts):
        raise argparse.ArgumentTypeError(f"each shard count must be in 1..256, got {text!r}")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hops", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario")
    parser.add_argument("--shards", default="1,2,4,8", type=_shard_list, help="comma-separated, each 1..256")
    parser.add_argument("--procs", type=int, default=2, help="load-generator processes (default 2)")
    parser.add_argument("--acceptors", default="auto", help="serve --acceptors (default auto)")
    parser.add_argument("--http", action="store_true", help="HTTP/JSON clients instead of binary ones")
    parser.add_argument("--no-audit", action="store_true", help="admissions without the service's view")
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    results = []
    for n in args.shards:
        try:
            r = asyncio.run(measure(args.scenario, n, args.procs, args.duration, args.acceptors, args.http,
                                    not args.no_audit))
        except (ConfigError, BenchError) as exc:
            print(f"python -m bench.hops: {exc}", file=sys.stderr)
            return 2
        results.append(r)
        d, w = r["per_process"]["distributor"], r["per_process"]["workers (sum)"]
        print(f"shards={n}: {r['dispatched']:,} dispatched; distributor {d['cpu_us']:.1f} µs, "
              f"{d['reads']:.2f} reads, {d['writes']:.2f} writes; workers (sum) {w['cpu_us']:.1f} µs, "
              f"{w['reads']:.2f} reads, {w['writes']:.2f} writes; frames to/from shards "
              f"{r['frames_to_shards']:.2f} / {r['frames_from_shards']:.2f} per request"
              + (f"; acceptors (sum) {a['cpu_us']:.1f} µs, {a['reads']:.2f} reads, {a['writes']:.2f} writes"
                 if (a := r["per_process"].get("acceptors (sum)")) else ""), flush=True)
        for role, p in r["per_process"].items():
            if role.startswith("acceptor") and not role.startswith("acceptors"):
                print(f"  {role}: {p['cpu_us']:.1f} µs, {p['reads']:.2f} reads, {p['writes']:.2f} writes", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
