"""The flags of `flowshard bench`, apart from its implementation.

Why a module of its own: `flowshard`'s parser is built for every subcommand, and importing the bench
(numpy, the simulator, the runner) just to describe its flags would slow down `flowshard config check`.
"""

from __future__ import annotations

import argparse

__all__ = ["DESCRIPTION", "EPILOG", "add_arguments"]

DESCRIPTION = """\
Run a scenario (the TOML `flowshard simulate` reads) against real processes, real sockets and real
time, and measure it: how flowshard behaves on your workload, and how many shards to run.

For each configuration (each --shards count, the --baseline echo server, or a running service with
--target) and each --rate, it runs the scenario --runs times, alternating configurations run by run,
each run against a freshly started `flowshard serve` (stopped with SIGTERM after it, and checked for
leftover processes and shared memory). A load generator (--procs processes, binary protocol or
--http) plays the scenario's flows; a dispatched request holds its ticket for its sampled service
time, then releases it (the simulated backend).

It prints the effective window (figures count [warmup, duration]), a progress line per run, a table
per configuration (outcomes by reason, dispatches/s, admission latency from the intended send time,
CPU µs per request per process, fairness), a comparison across configurations, a projection of the
rate on C cores, and the simulator's prediction next to the measurement. --json writes every
figure; --plot draws them (needs matplotlib: pip install matplotlib; in a checkout
.venv/bin/pip install -e '.[plot]' or scripts/bootstrap.sh test).
"""
EPILOG = """\
examples:
  flowshard bench bench/scenarios/equal-flows.toml                     # one run, 1 shard
  flowshard bench bench/scenarios/equal-flows.toml --shards 1,2,4 --runs 3 --json out.json --plot out.png
  flowshard bench bench/scenarios/free-flow.toml --rate 5000,20000      # fixed offered loads (open loop)
  flowshard bench bench/scenarios/free-flow.toml --baseline --http      # also a bare HTTP echo server
  flowshard bench bench/scenarios/free-flow-peak.toml --procs 2 --target 127.0.0.1:8081   # a running service

docs/benchmarks.md explains every figure and publishes the shard comparison with its commands.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `bench` subcommand's flags (flowshard.cli builds the parser)."""
    p.add_argument("scenario", metavar="SCENARIO",
                   help="scenario TOML file, or the name of a shipped scenario (see `flowshard simulate --help`)")
    p.add_argument("--shards", default="1", help="comma-separated shard counts to start, e.g. 1,2,4 (default 1)")
    p.add_argument("--acceptors", default="auto", metavar="K,...",
                   help="serve --acceptors for each shard count: comma-separated counts (each configuration is run "
                        "with each), or auto (default: what serve chooses)")
    p.add_argument("--target", metavar="HOST:PORT", help="drive a running service (its binary port) instead")
    p.add_argument("--http-target", metavar="HOST:PORT", help="with --target: its HTTP address (default PORT-1)")
    p.add_argument("--http", action="store_true", help="use HTTP/JSON instead of the binary protocol")
    p.add_argument("--baseline", action="store_true",
                   help="also run the same generator against a bare echo server of the same transport")
    p.add_argument("--runs", type=int, default=1, help="runs per configuration (default 1; use >= 3 to compare)")
    p.add_argument("--rate", help="comma-separated total open-loop rates (req/s) to run at, scaling the "
                                  "scenario's open-loop flows; default: the scenario's own rates")
    p.add_argument("--concurrency", type=int,
                   help="closed-loop clients in all, shared among the scenario's closed flows as it shares them "
                        "(rounded per flow, at least one each: the total may come out above N; said on stderr)")
    p.add_argument("--duration", type=float, help="override the scenario's duration (seconds)")
    p.add_argument("--warmup", type=float, help="override the scenario's warmup (seconds)")
    p.add_argument("--procs", type=int, default=1, help="load-generator processes (default 1)")
    p.add_argument("--conns", type=int, default=0,
                   help="connections per generator process (default 0: binary 1 per 50,000 requests the run may "
                        "hold pending; HTTP: its share of the closed-loop clients and open-loop bursts + 16, "
                        "growing as needed)")
    p.add_argument("--max-conns", type=int, default=0,
                   help="HTTP: most admission connections per generator process (default 0, auto: the service's "
                        "max_connections, the scenario's [service] or 4,096, shared over --procs, within the "
                        "generator's descriptor limit; each waiting admission holds one; a --target that refuses "
                        "some lowers it)")
    p.add_argument("--timer-lead-us", type=float, default=60.0,
                   help="open loop: wake this early and poll to the exact send time (default 60; 0: off)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="drain = true: most seconds to wait for outcomes after the arrivals stop (default 30)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each run, wait up to S seconds for other processes to use < 0.25 cores "
                        "(default 0: no wait)")
    p.add_argument("--no-simulate", action="store_true", help="do not run the simulator for comparison")
    p.add_argument("--no-audit", action="store_true",
                   help="do not ask admissions for the service's view (arrival sequence, shard, times): "
                        "cheaper, but no ordering figure and client-side times for the service difference")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    p.add_argument("--records", metavar="FILE", help="write one record per request of every run (JSON Lines, "
                   "a header line per run; see flowshard/records.py)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw the figures (needs matplotlib: pip install matplotlib; in a checkout "
                        ".venv/bin/pip install -e '.[plot]' or scripts/bootstrap.sh test)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--proxy", action="store_true",
                   help="proxy mode: play the flows as streamed OpenAI requests through `flowshard serve --backend` "
                        "to a fake backend (bench/fakeoai.py); one run, one shard, per-flow latency and CPU "
                        "(docs/proxy.md); flags for several runs or configurations, --records and --plot are "
                        "refused with it")
    p.add_argument("--proxy-ttft", type=float, default=0.02,
                   help="--proxy: the fake backend's time to first token, seconds (default 0.02)")
    p.add_argument("--proxy-itl", type=float, default=0.02,
                   help="--proxy: the fake's seconds per token (default 0.02; a request's service time sets its "
                        "tokens)")
