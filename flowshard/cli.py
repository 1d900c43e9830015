"""The `flowshard` command line (serve, config check, simulate, bench) and its help texts.

The one module of the core that starts the service or the load generator: subcommands import their
implementation lazily, so `flowshard config check` never loads the service and the rest of the core
stays free of I/O imports.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from flowshard.config import (
    MAX_ACCEPTORS,
    MAX_SHARDS,
    Config,
    ConfigError,
    check_backend_url,
    convert,
    dump_config,
    parse_toml,
    read_toml_file,
)


def read_config(path: str | None) -> Config:
    """The configuration from a TOML file, or the built-in defaults when no file is given."""
    return _read_config(path)[0]


def _read_config(path: str | None) -> tuple[Config, dict[str, Any]]:
    """`read_config`, and the TOML document as written (empty without a file): what it leaves out."""
    if path is None:
        return Config(), {}
    try:
        text = read_toml_file(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    data = parse_toml(text, where=path)
    if "workload" in data:  # (a [server] table alone is a configuration's misspelt [service]: named below)
        raise ConfigError(f"{path}: a scenario, not a configuration: its configuration is its [server] table "
                          f"(`flowshard simulate {path}` validates the whole scenario)")
    return convert(data, Config, where=path), data


def _config_check(args: argparse.Namespace) -> int:
    config = read_config(args.file)
    sys.stdout.write(f"# {args.file}: valid. The effective configuration, every default filled in:\n"
                     + dump_config(config))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from distributor.service import serve

    config, written = _read_config(args.config)
    flags = {"host": args.host, "port": args.port, "binary_port": args.binary_port}
    overrides = {k: v for k, v in flags.items() if v is not None}
    for name in ("port", "binary_port"):
        port = overrides.get(name)
        if port is not None and not 0 <= port <= 65535:  # (the workers would refuse the configuration)
            raise ConfigError(f"--{name.replace('_', '-')}: {port} is not a port: 0 to 65535 (0 picks a free one)")
    if overrides:
        try:
            config.service = msgspec.structs.replace(config.service, **overrides)
        except ValueError as exc:  # (an empty --host; --port and --binary-port alike, or one equal to the file's)
            named = " ".join(f"--{name.replace('_', '-')}" for name in overrides)
            raise ConfigError(f"{named}: {exc}") from None
    if args.backend:
        try:
            backends = [check_backend_url(url) for url in args.backend]
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if len(set(backends)) != len(backends):
            raise ConfigError(f"--backend: {' '.join(args.backend)} names a backend twice")
        config.proxy.backends = backends
    if not 1 <= args.shards <= MAX_SHARDS:
        raise ConfigError(f"--shards: {args.shards} is not allowed; 1 to {MAX_SHARDS}")
    acceptors = _acceptors(args.acceptors, args.shards, proxy=bool(config.proxy.backends))
    if args.config is None:  # (after every flag is checked: a bad one is the only line, a review)
        sys.stderr.write("flowshard: no --config: on the built-in defaults, whose dispatch budget "
                         "(max_inflight_requests = 100) is a placeholder; set it to what your backends run at once "
                         "(README, \"Configuration\")\n")
    elif "max_inflight_requests" not in written.get("budget", {}):
        sys.stderr.write(f"flowshard: {args.config} sets no [budget] max_inflight_requests: the default of 100 is "
                         "a placeholder; set it to what your backends run at once (README, \"Configuration\")\n")
    # proxy mode: a backend connection per request relayed, at most the budget's (or one per client)
    budget = config.budget.max_inflight_requests
    proxied = (budget if isinstance(budget, int) else config.service.max_connections) if config.proxy.backends else 0
    _check_descriptors(config.service.max_connections, args.shards, acceptors, proxied)
    try:
        uvloop.run(serve(config, args.shards, acceptors))
    except OSError as exc:  # cannot listen (address in use, permission): one line, not a traceback
        svc = config.service
        sys.stderr.write(f"flowshard: cannot start the service on host {svc.host!r}, ports {svc.port} (HTTP) and "
                         f"{svc.binary_port} (binary): {exc.strerror or exc}\n")
        return 2
    return 0


def _check_descriptors(max_connections: int, shards: int, acceptors: int, proxied: int) -> None:
    """Raise the open-descriptor limit to what `max_connections` needs; say so when the hard limit stops it
    (past it new connections are closed at accept, long before `max_connections`)."""
    import resource

    from distributor.fdreserve import descriptors_needed, raise_descriptor_limit

    needed = descriptors_needed(max_connections, shards, acceptors, proxied)
    soft, hard = raise_descriptor_limit(needed)
    if soft != resource.RLIM_INFINITY and soft < needed:
        sys.stderr.write(f"flowshard: the open-descriptor limit is {soft} (ulimit -n, hard limit {hard}), below the "
                         f"{needed} that max_connections = {max_connections} on both ports needs"
                         f"{f' (and {proxied} backend connections)' if proxied else ''}: past it new "
                         "connections are closed at accept; raise the hard limit or lower [service] max_connections"
                         f"{' (or [budget] max_inflight_requests)' if proxied else ''}\n")


def _acceptors(given: str, shards: int, proxy: bool = False) -> int:
    """--acceptors: "auto" (what `distributor.acceptors.auto_acceptors` measured best) or a count."""
    from distributor.acceptors import auto_acceptors

    if given == "auto":
        return auto_acceptors(shards, os.cpu_count() or 1, proxy)
    try:
        count = int(given)
    except ValueError:
        raise ConfigError(f"--acceptors: {given!r} is not a number or \"auto\"") from None
    if not 0 <= count <= MAX_ACCEPTORS:
        raise ConfigError(f"--acceptors: {count} is not allowed; 0 to {MAX_ACCEPTORS}, or auto")
    return count


def _simulate(args: argparse.Namespace) -> int:
    from flowshard.simulate import main as simulate_main

    return simulate_main(args.scenario, json_path=args.json, records_path=args.records, force=args.force,
                         shards=args.shards)


def _bench(args: argparse.Namespace) -> int:
    from bench.cli import main as bench_main

    return bench_main(args)


_MAIN = """\
Flow control for a shared pool of inference backends (vLLM, SGLang, TGI, any OpenAI-compatible
server): clients ask flowshard, per request, if and when it may go to the backends. Strict priority
between bands, fair queuing between the flows (tenants) of a band, exact limits, one outcome per
request. Run `flowshard COMMAND --help` for each command.
"""
_MAIN_EPILOG = """\
examples:
  flowshard serve                                   # on the defaults: HTTP :8080, binary :8081
  flowshard serve --config examples/config.toml --port 9000 --binary-port 9001
  flowshard config check examples/config.toml       # validate; print the effective configuration
  flowshard simulate weighted-drr                   # a shipped scenario, in virtual time
  flowshard bench bench/scenarios/equal-flows.toml --shards 1,2 --runs 3

The README is the overview and the configuration's reference; docs/service.md has the HTTP and
binary APIs, the Python client and the metrics; docs/benchmarks.md has the measured figures.
"""
_SERVE = """\
Run the service: one distributor process (limits, the dispatch budget, tickets), --shards shard
worker processes (the queues and their policies), and --acceptors processes serving the client
connections (auto: none on a machine without spare cores, where the distributor serves them).
Without --config it runs on the built-in defaults; set [budget] max_inflight_requests to what your
backends run at once.

Ready: one line on stderr, once every shard is up (the ports it really listens on, so with
--port 0 or --binary-port 0, which pick a free port, read them from this line):
  flowshard ready: http=http://127.0.0.1:8080 binary=127.0.0.1:8081 shards=1 pid=1234 acceptors=0

Stopping: SIGTERM or SIGINT (Ctrl-C) drains. The listeners close (new connections are refused),
admissions on open connections are answered 503 rejected:shutting_down, queued requests get
[service] drain_timeout seconds (default 10) to be dispatched and the rest end evicted:shutdown;
then it exits 0. A second signal stops at once (a SIGINT ignored when it started, as in a script's
background job, stays ignored: SIGTERM then). Once it is ready, both are said on stderr (in proxy
mode the drain also waits for the responses being relayed, and says so):
  flowshard draining (SIGINT): 3 queued, 1 in flight; stopping once the queues are empty, within
    drain_timeout (10 s); a second signal stops now                                  (one line)
  flowshard stopped; outcomes since the start: dispatched 1200, evicted:shutdown 3
"""
_SERVE_EPILOG = """\
exit status: 0 after a drain, 2 for a bad configuration or an address it cannot listen on.
examples:
  flowshard serve --config examples/config.toml
  flowshard serve --port 0 --binary-port 0 2> serve.log   # free ports; see the ready line
"""
_CHECK = """\
Validate a configuration file (the TOML `serve --config` reads; in a scenario it is the [server]
table) and print the effective configuration: every key, defaults filled in, "unlimited" spelt out.
An invalid file gets one line naming the key, what it expects and the value given (exit 2).
"""
_SIMULATE = """\
Run a scenario (a [server] configuration plus a [workload] of flows) through the same engine in
virtual time: deterministic for its seed, tens of thousands of events per real second (a shipped
scenario's 30 virtual seconds in under a second). Use it to see what a configuration does to your
tenants before deploying it.

Output, per flow group and per band: requests submitted, dispatched, rejected and evicted by reason
(unfinished: still queued when the run stopped); wait p50/p90/p99/max in ms (enqueue to dispatch);
dispatches/s; the share of its band's service it got in the window [warmup, duration] next to
`fair`, the share a max-min fair reference following its *admitted* work would have given it (ratio
share / fair; that reference cannot see unfairness to closed-loop flows, whose admitted work shrinks
with the service they get). The fairness verdict is per band: Jain's index over each flow's measured
service / its max-min allocation of *intrinsic* demand (1 = perfectly fair), the largest error of one
(`max ref err`) and a `reference` line naming the flows off theirs by more than fair_margin; and the
largest service difference between backlogged flows, in the band's unit (requests, bytes or
tokens); priority inversions (always 0). --json writes every figure.

--shards N simulates the service as it runs with N shard processes: the distributor's exact ledger
(limits, displacement, budget, grants, fair shares across shards) routing by flow affinity and
JSQ-Bytes to N shard engines, with the same code as `flowshard serve`; messages between them take no
time and are handled in a fixed order, so the run stays deterministic. The report then says what
each shard queued and dispatched, and on which shards each flow queued.

Before running, it estimates the events the scenario makes: over ~10 s of simulation it says so and
shows progress; over ~2 minutes it refuses (--force runs it anyway) and says which flows to change.
"""


def _shipped_scenarios() -> str:
    """The shipped scenarios with their descriptions, for `simulate --help` (bench-only ones apart)."""
    from flowshard.simulate import shipped_scenarios

    try:
        shipped = shipped_scenarios()
    except ConfigError:
        return ""
    lines = ["shipped scenarios (give the name or the path bench/scenarios/NAME.toml):"]
    bench_only = []
    for name, description, simulates in shipped:
        if simulates:
            lines.append(f"  {name:28} {description}")
        else:
            bench_only.append(name)
    if bench_only:
        lines.append("bench-only (they measure the real service's own cost; `flowshard bench` runs them):")
        lines.append("  " + ", ".join(bench_only))
    lines += ["", "examples:", "  flowshard simulate                         # the demo: two bands, a flooding scraper",
              "  flowshard simulate weighted-drr --json out.json"]
    return "\n".join(lines) + "\n"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"flowshard {version('flowshard')}"
    except PackageNotFoundError:
        return "flowshard (version unknown: not installed as a package)"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog can be computed when help is shown, not at every start."""

    epilog_factory: Callable[[], str] | None = None

    def format_help(self) -> str:
        if self.epilog_factory is not None:
            self.epilog = self.epilog_factory()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    text = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="flowshard", description=_MAIN, epilog=_MAIN_EPILOG, formatter_class=text)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands",
                                parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the service in front of your backends (HTTP/JSON and binary APIs)",
                           description=_SERVE, epilog=_SERVE_EPILOG, formatter_class=text)
    serve.add_argument("--shards", type=int, default=1, metavar="N",
                       help=f"shard worker processes, 1 to {MAX_SHARDS} (default 1). More shards do not add "
                            "throughput today (README: \"How many shards\"); keep 1 unless `flowshard bench "
                            "--shards 1,2,4` on your machine shows otherwise")
    serve.add_argument("--acceptors", default="auto", metavar="K",
                       help=f"processes that accept and answer clients (HTTP and binary) next to the distributor, "
                            f"0 to {MAX_ACCEPTORS}; 0 runs them in the distributor. auto (default): 2 (in proxy mode "
                            "half the shard count, at least 2), within the cores left after the distributor and the "
                            "shards (so 0 on a 2-core machine, 2 on 16 cores; README: \"The service\")")
    serve.add_argument("--config", metavar="FILE", help="configuration TOML (default: the built-in defaults; "
                                                        "`flowshard config check FILE` shows what it means)")
    serve.add_argument("--host", help="listen address for both ports (default: [service] host, 127.0.0.1)")
    serve.add_argument("--port", type=int, metavar="PORT",
                       help="HTTP/JSON port (default: [service] port, 8080); 0 picks a free port")
    serve.add_argument("--binary-port", type=int, metavar="PORT",
                       help="binary-protocol port (default: [service] binary_port, 8081); 0 picks a free port")
    serve.add_argument("--backend", action="append", metavar="URL",
                       help="proxy mode: an OpenAI-compatible backend, e.g. http://10.0.0.5:8000 (repeatable; "
                            "replaces [proxy] backends; docs/proxy.md)")
    serve.set_defaults(func=_serve, command_parser=serve)

    config = sub.add_parser("config", help="check a configuration file and print what it means",
                            description=_CHECK, formatter_class=text)
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION", title="actions")
    check = config_sub.add_parser("check", help="validate a configuration file and print the effective configuration",
                                  description=_CHECK, formatter_class=text,
                                  epilog="example:\n  flowshard config check examples/config.toml > effective.toml\n")
    check.add_argument("file", metavar="FILE", help="the configuration TOML to check")
    check.set_defaults(func=_config_check, command_parser=check)

    simulate = sub.add_parser("simulate", help="run a scenario in virtual time: outcomes, waits and fairness per flow",
                              description=_SIMULATE, formatter_class=text)
    simulate.epilog_factory = _shipped_scenarios
    simulate.add_argument("scenario", nargs="?", default=None, metavar="SCENARIO",
                          help="scenario TOML file, or the name of a shipped scenario (default: demo)")
    simulate.add_argument("--json", metavar="FILE", help="also write every figure, per flow, as JSON")
    simulate.add_argument("--force", action="store_true", help="run even a scenario estimated to take minutes")
    simulate.add_argument("--records", metavar="FILE",
                          help="also write one record per request (JSON Lines, see flowshard/records.py)")
    simulate.add_argument("--shards", type=int, default=1, metavar="N",
                          help=f"simulate the service with N shards, 1 to {MAX_SHARDS} (default 1): the distributor's "
                               "ledger (limits, budget, grants, flow affinity, JSQ-Bytes) and N shard engines, "
                               "hops taking no time, in a fixed order. No shard falls behind then, so at the "
                               "default jsq_slack_bytes every flow stays on shard 0, as in a service that keeps "
                               "up; set [server.service] jsq_slack_bytes = 0 in the scenario to spread them")
    simulate.set_defaults(func=_simulate, command_parser=simulate)

    from bench.args import DESCRIPTION as BENCH
    from bench.args import EPILOG as BENCH_EPILOG
    from bench.args import add_arguments as bench_arguments

    bench = sub.add_parser("bench", help="run a scenario against the real service and measure it (load generator)",
                           description=BENCH, epilog=BENCH_EPILOG, formatter_class=text)
    bench_arguments(bench)
    bench.set_defaults(func=_bench, command_parser=bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # told by the command's own parser, whose usage lists what it takes (not the top level's)
            getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
        code: int = args.func(args)
    except ConfigError as exc:
        sys.stderr.write(f"flowshard: {exc}\n")
        return 2
    except KeyboardInterrupt:  # (before `serve` handles the signal itself, or in a command that does not)
        sys.stderr.write("flowshard: interrupted\n")
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
