"""The flags of `flowshard bench`, apart from its implementation.

Why a module of its own: `flowshard`'s parser is built for every subcommand, and importing the bench
(numpy, the simulator, the runner) just to describe its flags would slow down `flowshard config check`.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `bench` subcommand's flags (flowshard.cli builds the parser)."""
    p.add_argument("scenario", help="scenario TOML (the format `flowshard simulate` reads)")
    p.add_argument("--shards", default="1", help="comma-separated shard counts to start, e.g. 1,2,4 (default 1)")
    p.add_argument("--target", metavar="HOST:PORT", help="drive a running service (its binary port) instead")
    p.add_argument("--http-target", metavar="HOST:PORT", help="with --target: its HTTP address (default PORT-1)")
    p.add_argument("--http", action="store_true", help="use HTTP/JSON instead of the binary protocol")
    p.add_argument("--baseline", action="store_true",
                   help="also run the same generator against a bare echo server of the same transport")
    p.add_argument("--runs", type=int, default=1, help="runs per configuration (default 1; use >= 3 to compare)")
    p.add_argument("--rate", help="comma-separated total open-loop rates (req/s) to run at, scaling the "
                                  "scenario's open-loop flows; default: the scenario's own rates")
    p.add_argument("--concurrency", type=int, help="total closed-loop clients, scaling the scenario's closed flows")
    p.add_argument("--duration", type=float, help="override the scenario's duration (seconds)")
    p.add_argument("--warmup", type=float, help="override the scenario's warmup (seconds)")
    p.add_argument("--procs", type=int, default=1, help="load-generator processes (default 1)")
    p.add_argument("--conns", type=int, default=0,
                   help="connections per generator process (default: binary 1 per 50,000 requests the run may "
                        "hold pending; HTTP: closed-loop clients + 16, growing as needed)")
    p.add_argument("--max-conns", type=int, default=512, help="HTTP: most connections per generator process")
    p.add_argument("--timer-lead-us", type=float, default=60.0,
                   help="open loop: wake this early and poll to the exact send time (default 60; 0: off)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="drain = true: most seconds to wait for outcomes after the arrivals stop")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each run, wait up to S seconds for other processes to use < 0.25 cores")
    p.add_argument("--no-simulate", action="store_true", help="do not run the simulator for comparison")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw the figures (needs matplotlib: pip install .[plot])")
    p.add_argument("--quiet", action="store_true", help="no progress output")
