"""`flowshard bench SCENARIO.toml`: the scenario against real processes, real sockets, real time.

For every configuration (each `--shards` count, the `--baseline` echo server, or a `--target`) and
every `--rate`, it runs the scenario `--runs` times, alternating configurations run by run (so slow
phases of the machine hit all of them alike), each run against a freshly started service. Then it
prints a table per configuration, a comparison across them, the C-core projection from per-process
CPU costs, and the simulator's prediction next to the measurement; `--json` writes every figure,
`--plot` draws them (matplotlib, optional).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from bench import simcompare
from bench.args import add_arguments
from bench.procstat import cpu_count, cpu_model, machine_sample
from bench.progress import Progress
from bench.report import (
    aggregate,
    fmt,
    record_rows,
    render_comparison,
    render_config,
    render_projection,
    render_projection_ratios,
    run_figures,
)
from bench.runner import BenchError, Options, RunRecord, Server, run_once
from flowshard import records
from flowshard.config import MAX_ACCEPTORS, MAX_SHARDS, ConfigError
from flowshard.scenario import (
    Bursts,
    Closed,
    Constant,
    Poisson,
    Scenario,
    closed_clients,
    offered_rate,
    scenario_from_data,
)
from flowshard.simulate import audit_header, check_writable, read_scenario

__all__ = ["main", "standalone"]


# ---------------------------------------------------------------------------------------- scenario tweaks


def adjust(scenario: Scenario, *, rate: float | None = None, concurrency: int | None = None,
           duration: float | None = None, warmup: float | None = None) -> Scenario:
    """The scenario with its open-loop rate, closed-loop clients, duration or warmup overridden."""
    replace = msgspec.structs.replace
    workload = scenario.workload
    flows = list(workload.flows)
    if rate is not None:
        nominal = offered_rate(scenario)
        if nominal <= 0:
            raise ConfigError("--rate: the scenario has no open-loop flows to scale")
        k = rate / nominal
        for i, f in enumerate(flows):
            a = f.arrival
            if isinstance(a, Poisson | Constant):
                flows[i] = replace(f, arrival=replace(a, rate=a.rate * k))
            elif isinstance(a, Bursts):
                every = a.every / k
                flows[i] = replace(f, arrival=replace(a, every=every, spread=min(a.spread, every)))
    if concurrency is not None:
        if concurrency < 1:
            raise ConfigError(f"--concurrency: {concurrency} is not a number of clients; at least 1")
        clients = closed_clients(scenario)
        if clients <= 0:
            raise ConfigError("--concurrency: the scenario has no closed-loop flows")
        for i, f in enumerate(flows):
            a = f.arrival
            if isinstance(a, Closed):
                share = max(1, round(a.concurrency * concurrency / clients))
                flows[i] = replace(f, arrival=replace(a, concurrency=share))
    if duration is not None and not 0 < duration < math.inf:
        raise ConfigError(f"--duration: {duration:g} is not allowed; seconds above 0")
    if warmup is not None and not 0 <= warmup < math.inf:
        raise ConfigError(f"--warmup: {warmup:g} is not allowed; 0 seconds or more")
    end = workload.duration if duration is None else duration
    if warmup is not None and warmup >= end:
        raise ConfigError(f"--warmup: {warmup:g} s is not shorter than the run ({end:g} s"
                          f"{'' if duration is not None else ', the scenario' + chr(39) + 's duration'})")
    changes: dict[str, Any] = {"flows": flows}
    if duration is not None:
        changes["duration"] = duration
    if warmup is not None:
        changes["warmup"] = warmup
    elif duration is not None and workload.warmup >= duration:
        changes["warmup"] = duration / 5
    adjusted = replace(scenario, workload=replace(workload, **changes))
    # `replace` skips the field constraints: validate the result as if it had been read from a file
    return scenario_from_data(msgspec.to_builtins(adjusted), where="the scenario after --rate/--concurrency/"
                              "--duration/--warmup")


def window_note(base: Scenario, scenario: Scenario, warmup_flag: float | None) -> str:
    """The effective run length and measuring window, and where the warmup came from."""
    w, was = scenario.workload, base.workload.warmup
    if warmup_flag is not None:
        source = "--warmup"
    elif w.warmup != was:
        source = (f"the scenario's {was:g} s does not fit in --duration {w.duration:g}, so duration / 5; "
                  "--warmup sets it")
    else:
        source = "the scenario's"
    return (f"window: each run sends for {w.duration:g} s; figures count [{w.warmup:g} s, {w.duration:g} s] "
            f"({w.duration - w.warmup:g} s), after a warmup of {w.warmup:g} s ({source})")


def _list(text: str, kind: type, name: str) -> list[Any]:
    """Comma-separated positive numbers, each once, in the order given."""
    try:
        values = [kind(x) for x in text.split(",")]  # (an empty item, as in "1,,2", is not a number)
    except ValueError:
        raise ConfigError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < v < math.inf for v in values):
        raise ConfigError(f"{name}: expected positive numbers, got {text!r}")
    return list(dict.fromkeys(values))


# ---------------------------------------------------------------------------------------- the runs


class Config(msgspec.Struct, frozen=True):
    """One configuration the comparison covers: what runs, on which transport, at which rate."""

    kind: str  # flowshard | echo | target
    shards: int
    transport: str
    rate: float | None
    acceptors: str = "auto"  # serve --acceptors

    @property
    def label(self) -> str:
        served = f"shards={self.shards}" + ("" if self.acceptors == "auto" else f" acc={self.acceptors}")
        base = {"flowshard": served, "echo": f"echo-{self.transport}", "target": "target"}[self.kind]
        return base if self.rate is None else f"{base} @{self.rate:g}/s"


def foreign_load(seconds: float = 0.5) -> float:
    """Cores used by everything on the machine during `seconds` (nothing of ours runs between runs)."""
    a = machine_sample()
    time.sleep(seconds)
    b = machine_sample()
    return (b.busy - a.busy) / seconds


def wait_quiet(limit: float, threshold: float = 0.25) -> float:
    deadline = time.monotonic() + limit
    load = foreign_load()
    while load > threshold and time.monotonic() < deadline:
        time.sleep(1.0)
        load = foreign_load()
    return load


def _start(config: Config, scenario: Scenario, args: argparse.Namespace, workdir: str) -> Server:
    if config.kind == "flowshard":
        return Server.start_flowshard(scenario, config.shards, workdir, config.acceptors)
    if config.kind == "echo":
        return Server.start_echo()
    return Server.attach(args.target, args.http_target, "http" if args.http else "binary")


def run_all(args: argparse.Namespace, base: Scenario, records_out: BinaryIO | None = None) -> dict[str, Any]:
    """Every run of every configuration; each run's per-request records go to `records_out` if given."""
    transport = "http" if args.http else "binary"
    rates: list[float | None] = list(_list(args.rate, float, "--rate")) if args.rate else [None]
    configs: list[Config] = []
    for rate in rates:
        if args.target:
            configs.append(Config("target", 0, transport, rate))
        else:
            shards = _list(args.shards, int, "--shards")
            if max(shards) > MAX_SHARDS:
                raise ConfigError(f"--shards: {max(shards)} is not allowed; 1 to {MAX_SHARDS}")
            accs = [a.strip() for a in args.acceptors.split(",")]
            if any(a != "auto" and not a.isdigit() for a in accs):
                raise ConfigError(f"--acceptors: {args.acceptors!r}: expected counts like 0,2 or auto")
            too_many = [a for a in accs if a != "auto" and int(a) > MAX_ACCEPTORS]
            if too_many:
                raise ConfigError(f"--acceptors: {too_many[0]} is not allowed; 0 to {MAX_ACCEPTORS}, or auto")
            configs += [Config("flowshard", n, transport, rate, a) for n in shards for a in accs]
        if args.baseline:
            configs.append(Config("echo", 0, transport, rate))
    if args.runs < 1 or args.procs < 1:
        raise ConfigError("--runs and --procs must be at least 1")
    scenarios = {
        rate: adjust(base, rate=rate, concurrency=args.concurrency, duration=args.duration, warmup=args.warmup)
        for rate in rates
    }
    options = Options(transport=transport, procs=args.procs, conns=args.conns, max_conns=args.max_conns,
                      lead=max(0.0, args.timer_lead_us) * 1e-6, drain_timeout=args.drain_timeout,
                      audit=not args.no_audit)
    # alternate: run r goes through the configurations rotated by r, so none always runs first
    order = [(r, configs[(i + r) % len(configs)]) for r in range(args.runs) for i in range(len(configs))]
    progress = Progress(len(order), enabled=not args.quiet)
    window = window_note(base, next(iter(scenarios.values())), args.warmup)
    if not args.quiet:
        sys.stderr.write(window + "\n")
    if args.concurrency is not None and (clients := closed_clients(next(iter(scenarios.values())))) != args.concurrency:
        # (review 181: 1 gave 4 clients, 10 gave 11, and no report line said so)
        sys.stderr.write(f"--concurrency {args.concurrency}: {clients} closed-loop clients (shared among the closed "
                         "flows as the scenario shares them, rounded, at least one each)\n")
    runs: dict[Config, list[dict[str, Any]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="flowshard-bench-") as workdir:
        for r, config in order:
            scenario = scenarios[config.rate]
            before = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else foreign_load(0.3)
            progress.start(config.label, scenario.workload.duration)
            server = _start(config, scenario, args, workdir)
            problems: list[str] = []
            try:
                record: RunRecord = asyncio.run(run_once(scenario, server, options, progress.update))
            finally:
                problems = server.stop()
            record.problems += problems
            meta = {"label": config.label, "kind": config.kind, "shards": config.shards, "transport": transport,
                    "rate": config.rate, "run": r, "foreign_cores_before": round(before, 3)}
            fig = run_figures(record, scenario, meta)
            if records_out is not None:
                records_out.write(records.encode("bench", scenario.name, record_rows(record.results, scenario),
                                                 **{k: meta[k] for k in ("label", "kind", "shards", "transport",
                                                                         "rate", "run")}, **audit_header(scenario)))
            runs[config].append(fig)
            t = fig["throughput"]
            lat = fig["latency_us"]
            ge = {k: "≥ " if k in lat.get("lower_bounds", ()) else "" for k in ("p50", "p99")}
            progress.finish(f"{fmt(t['dispatches_per_s'])} dispatches/s, latency p50 {ge['p50']}{fmt(lat['p50'])} µs, "
                            f"p99 {ge['p99']}{fmt(lat['p99'])} µs" + (" (warnings)" if fig["warnings"] else ""))
    sims: dict[str, Any] = {}
    if not args.no_simulate:
        for rate, scenario in scenarios.items():
            # each shard count is predicted by the N-shard simulation (a target or echo: one shard)
            counts = sorted({c.shards if c.kind == "flowshard" else 1 for c in configs if c.rate == rate})
            by_shards: dict[int, Any] = {}
            for n in counts:
                report, why = simcompare.predict(scenario, None if args.quiet else sys.stderr, n)
                by_shards[n] = (report, why)
            first, why = by_shards[counts[0]]
            sims[rate_key(rate)] = {"report": simcompare.encode(first), "skipped": why, "_report": first,
                               "_by_shards": {n: r for n, (r, _) in by_shards.items()},
                               "by_shards": {str(n): simcompare.encode(r) for n, (r, _) in by_shards.items()
                                             if n != counts[0]}}
    return {"configs": configs, "runs": runs, "sims": sims, "scenarios": scenarios, "window": window}


# ---------------------------------------------------------------------------------------- output


def _one_stream() -> bool:
    """stdout and stderr are the same terminal or file."""
    try:
        out, err = os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):  # (replaced by objects without a descriptor: tests)
        return False
    return (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino)


def machine() -> dict[str, Any]:
    return {"cpus": cpu_count(), "model": cpu_model(), "kernel": platform.release(),
            "python": platform.python_version(), "host": platform.node()}


def render(result: dict[str, Any], window_said: bool = False) -> str:
    """The report; `window_said`: its window line was written where the report goes, before the runs
    (stderr and stdout one terminal or file), so it is not repeated (a review read it twice)."""
    configs: list[Config] = result["configs"]
    runs = result["runs"]
    parts = [*([] if window_said else [result["window"]]), *(render_config(c.label, runs[c]) for c in configs)]
    labelled = [(c.label, runs[c]) for c in configs]
    if len(configs) > 1:
        parts.append(render_comparison(labelled))
    proj = render_projection(labelled)
    if proj:
        parts.append(proj)
        ratios = render_projection_ratios(labelled)
        if ratios:
            parts.append(ratios)
    for rate, sim in result["sims"].items():
        if sim["_report"] is None:
            parts.append(sim["skipped"])
            continue
        for c in configs:
            if rate_key(c.rate) == rate and c.kind != "echo":
                report = _sim_for(sim, c)
                if report is not None:
                    parts.append(simcompare.render(c.label, simcompare.comparison(report, runs[c])))
    return "\n\n".join(parts) + "\n"


def rate_key(rate: float | None) -> str:
    """The key of a rate's simulation in `--json`: the --rate given, or "scenario" (its own rates)."""
    return "scenario" if rate is None else str(rate)


def _sim_for(sim: dict[str, Any], config: Config) -> Any:
    """The simulation at the configuration's shard count (a target's: one shard)."""
    shards = config.shards if config.kind == "flowshard" else 1
    return sim["_by_shards"].get(shards, sim["_report"])


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def to_json(result: dict[str, Any], args: argparse.Namespace, command: str) -> bytes:
    configs: list[Config] = result["configs"]
    doc = {
        "bench": {"command": command, "started": result.get("started"), "date": _now(),
                  "machine": machine(), "pid": os.getpid()},
        "scenario": {"path": args.scenario, "name": result["scenarios"][configs[0].rate].name},
        "configs": [
            {"label": c.label, "kind": c.kind, "shards": c.shards, "transport": c.transport, "rate": c.rate,
             "summary": aggregate(result["runs"][c]), "runs": result["runs"][c]}
            for c in configs
        ],
        "simulation": {
            rate: {"report": s["report"], "skipped": s["skipped"] or None,
                   "by_shards": s["by_shards"],  # the reports at the other shard counts ("report": the first)
                   "comparison": {c.label: simcompare.comparison(_sim_for(s, c), result["runs"][c])
                                  for c in configs if rate_key(c.rate) == rate and c.kind != "echo"
                                  and _sim_for(s, c) is not None}
                   if s["_report"] is not None else None}
            for rate, s in result["sims"].items()
        },
    }
    return msgspec.json.encode(doc)


def check_numbers(args: argparse.Namespace) -> None:
    """The numeric flags in range (finite, at least their least value), before anything starts."""
    for flag, value, low in (("--conns", args.conns, 0), ("--max-conns", args.max_conns, 0),
                             ("--timer-lead-us", args.timer_lead_us, 0), ("--drain-timeout", args.drain_timeout, 0),
                             ("--wait-quiet", args.wait_quiet, 0), ("--proxy-ttft", args.proxy_ttft, 0),
                             ("--proxy-itl", args.proxy_itl, 0)):
        if value is not None and not low <= value < math.inf:
            raise ConfigError(f"{flag}: {value:g} is not allowed; a number, {low} or more")


def check_proxy_flags(args: argparse.Namespace) -> None:
    """`--proxy` runs once, one shard, its own generator: a flag it would ignore is refused, not dropped
    (review 167: `--plot`, `--records`, `--shards 1,2`, `--runs 3` ran and exited 0 without them)."""
    ignored = [flag for flag, given in (
        ("--shards", args.shards != "1"), ("--acceptors", args.acceptors != "auto"), ("--target", args.target),
        ("--http-target", args.http_target), ("--http", args.http), ("--baseline", args.baseline),
        ("--runs", args.runs != 1), ("--rate (more than one)", args.rate and "," in args.rate),
        ("--procs", args.procs != 1), ("--conns", args.conns), ("--max-conns", args.max_conns),
        ("--timer-lead-us", args.timer_lead_us != 60.0), ("--wait-quiet", args.wait_quiet),
        ("--no-audit", args.no_audit), ("--records", args.records), ("--plot", args.plot),
    ) if given]
    if ignored:
        raise ConfigError(f"--proxy runs once, through one shard, with its own generator: {', '.join(ignored)} "
                          "cannot go with it (docs/proxy.md)")


def main(args: argparse.Namespace, command: str | None = None) -> int:
    """`flowshard bench`: run, print the tables, write JSON and the plot if asked."""
    command = command or "flowshard " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    check_numbers(args)
    base = read_scenario(args.scenario)
    for flag, path in (("--json", args.json), ("--plot", args.plot), ("--records", args.records)):
        check_writable(flag, path)
    if args.proxy:
        check_proxy_flags(args)
    if args.plot:
        from bench.plot import plot_missing

        if (missing := plot_missing()) is not None:  # (said after the whole run, it cost the run)
            raise ConfigError(f"--plot: {missing}")
    if args.proxy:
        from bench.proxyscenario import run_proxy_scenario

        rate = _list(args.rate, float, "--rate")[0] if args.rate else None
        return run_proxy_scenario(args, adjust(base, rate=rate, concurrency=args.concurrency,
                                               duration=args.duration, warmup=args.warmup))
    started = _now()
    try:
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(_open(args.records)) if args.records else None
            result = run_all(args, base, out)
    except BenchError as exc:
        sys.stderr.write(f"flowshard bench: {exc}\n")
        return 1
    result["started"] = started
    sys.stdout.write(render(result, window_said=not args.quiet and _one_stream()))
    sys.stdout.flush()
    if args.json:
        try:
            Path(args.json).write_bytes(to_json(result, args, command) + b"\n")
        except OSError as exc:
            raise ConfigError(f"{args.json}: cannot write: {exc.strerror}") from None
    if args.plot:
        from bench.plot import plot

        message = plot(args.plot, result)
        sys.stderr.write(message + "\n")
    return 0


def _open(path: str) -> BinaryIO:
    try:
        return open(path, "wb")
    except OSError as exc:
        raise ConfigError(f"--records: cannot write {path}: {exc.strerror}") from None


def standalone(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.cli ...` (the same as `flowshard bench ...`)."""
    parser = argparse.ArgumentParser(prog="flowshard bench", description=__doc__.splitlines()[0] if __doc__ else None)
    add_arguments(parser)
    args = parser.parse_args(argv)
    command = "flowshard bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        return main(args, command)
    except ConfigError as exc:
        sys.stderr.write(f"flowshard: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(standalone())
