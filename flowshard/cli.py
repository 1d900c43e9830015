"""The `flowshard` command line: the one place in the core that dispatches to the shells.

Subcommands import their implementation lazily, so `flowshard config check` never loads the
service and the core stays free of I/O imports.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec

from flowshard.config import MAX_SHARDS, Config, ConfigError, dump_config, load_config


def read_config(path: str | None) -> Config:
    """The configuration from a TOML file, or the built-in defaults when no file is given."""
    if path is None:
        return Config()
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return load_config(text, where=path)


def _config_check(args: argparse.Namespace) -> int:
    config = read_config(args.file)
    sys.stdout.write(f"# {args.file}: valid. The effective configuration, every default filled in:\n"
                     + dump_config(config))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from distributor.service import serve

    config = read_config(args.config)
    flags = {"host": args.host, "port": args.port, "binary_port": args.binary_port}
    overrides = {k: v for k, v in flags.items() if v is not None}
    if overrides:
        config.service = msgspec.structs.replace(config.service, **overrides)
    if not 1 <= args.shards <= MAX_SHARDS:
        raise ConfigError(f"--shards: {args.shards} is not allowed; 1 to {MAX_SHARDS}")
    try:
        uvloop.run(serve(config, args.shards))
    except OSError as exc:  # cannot listen (address in use, permission): one line, not a traceback
        sys.stderr.write(f"flowshard: cannot start the service: {exc.strerror or exc}\n")
        return 2
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from flowshard.simulate import main as simulate_main

    return simulate_main(args.scenario, json_path=args.json)


def _bench(args: argparse.Namespace) -> int:
    from bench.cli import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowshard", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser("check", help="validate a config file and print the effective config")
    check.add_argument("file")
    check.set_defaults(func=_config_check)

    serve = sub.add_parser("serve", help="run the service: a distributor and N shard workers")
    serve.add_argument("--shards", type=int, default=1, help="shard worker processes (default 1)")
    serve.add_argument("--config", metavar="FILE", help="config TOML (default: built-in defaults)")
    serve.add_argument("--host", help="listen address (default from config: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default from config: 8080; 0 picks a free one)")
    serve.add_argument("--binary-port", type=int, help="binary-protocol port (default from config: 8081)")
    serve.set_defaults(func=_serve)

    simulate = sub.add_parser("simulate", help="run a scenario in deterministic virtual time")
    simulate.add_argument("scenario", nargs="?", default=None, help="scenario TOML (default: built-in demo)")
    simulate.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    simulate.set_defaults(func=_simulate)

    from bench.args import add_arguments as bench_arguments

    bench = sub.add_parser("bench", help="run a scenario against real processes and report (see docs/benchmarks.md)")
    bench_arguments(bench)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        sys.stderr.write(f"flowshard: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
