"""Markdown tables from `flowshard bench --json` files, for docs/benchmarks.md.

    python -m bench.mdtable FILE.json [FILE.json ...] [--figures F1,F2,...]

One table per file: a row per configuration (shard count, echo baseline, rate), the chosen figures as
median (min–max) over runs, and, when the file holds an echo baseline of the same rate, each
throughput as a percentage of the echo's and each latency as a multiple of it (medians). Why a
script: the published tables are then regenerated from the JSON, never retyped.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from bench.report import cell, fmt

__all__ = ["DEFAULT_FIGURES", "markdown"]

DEFAULT_FIGURES = [
    "answered/s", "latency p50 µs", "latency p99 µs", "latency p99.9 µs", "server CPU µs/req", "distributor µs/req",
    "workers µs/req (sum)", "loadgen µs/req", "other processes (cores)",
]
THROUGHPUT = {"answered/s", "dispatches/s"}
LATENCY = {"latency p50 µs", "latency p90 µs", "latency p99 µs", "latency p99.9 µs", "rtt p50 µs (from send)",
           "rtt p99 µs (from send)"}


def _echo_for(configs: Sequence[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any] | None:
    for c in configs:
        if c["kind"] == "echo" and c["rate"] == config["rate"] and c["transport"] == config["transport"]:
            return c
    return None


def markdown(doc: dict[str, Any], figures: Sequence[str] = DEFAULT_FIGURES) -> str:
    configs = doc["configs"]
    present = [f for f in figures if any(f in c["summary"] for c in configs)]
    header = ["configuration", *present]
    rows = []
    for c in configs:
        echo = _echo_for(configs, c) if c["kind"] != "echo" else None
        row = [c["label"]]
        for f in present:
            stat = c["summary"].get(f)
            text = cell(stat)
            base = echo["summary"].get(f) if echo else None
            if stat and base and base["median"]:
                ratio = stat["median"] / base["median"]
                if f in THROUGHPUT:
                    text += f" = {ratio:.0%} of echo"
                elif f in LATENCY:
                    text += f" = {ratio:.2f}× echo"
            row.append(text)
        rows.append(row)
    runs = max((len(c["runs"]) for c in configs), default=0)
    b = doc["bench"]
    when = f"{b['started']} to {b['date']}" if b.get("started") else f"finished {b['date']}"
    lines = [f"`{b['command']}` — {when}, {b['machine']['cpus']} CPUs ({b['machine']['model']}), "
             f"{runs} run(s) per configuration, median (min–max)", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    warnings = sorted({w for c in configs for r in c["runs"] for w in r["warnings"]})
    if warnings:
        lines.append("")
        lines += [f"- warning (some run): {w}" for w in warnings]
    return "\n".join(lines) + "\n"


def projection_markdown(doc: dict[str, Any]) -> str:
    """Projected requests/s on C cores per configuration, from each process's median CPU cost over its
    runs, as `flowshard bench` prints it (`bench.report.median_costs`; review 184: from the
    median-throughput run's alone, the markdown said 25,000/s where the report said 20,000/s)."""
    from bench.report import PROJECT_CORES, median_costs, project_all

    lines = []
    for c in doc["configs"]:
        costs = median_costs(c["runs"])
        if not costs:
            continue
        proj = project_all(costs)
        for scope in ("with_generator", "service_only"):
            if proj[scope]:
                cells = [f"{fmt(v['per_s'])} ({v['bottleneck']})" for v in proj[scope].values()]
                lines.append(f"| {c['label']} | {scope.replace('_', ' ')} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    head = "| configuration | scope | " + " | ".join(f"{n} cores" for n in PROJECT_CORES) + " |"
    return "\n".join([head, "|" + "---|" * (len(PROJECT_CORES) + 2), *lines]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mdtable", description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("files", nargs="+")
    p.add_argument("--figures", help="comma-separated figure names (as in the bench tables)")
    p.add_argument("--projection", action="store_true", help="also print the C-core projection table")
    args = p.parse_args(argv)
    figures = args.figures.split(",") if args.figures else DEFAULT_FIGURES
    for path in args.files:
        with open(path) as f:
            doc = json.load(f)
        sys.stdout.write(markdown(doc, figures) + "\n")
        if args.projection:
            sys.stdout.write(projection_markdown(doc) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
