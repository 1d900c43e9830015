"""The latency flowshard's proxy mode adds, and its CPU per proxied request and per streamed chunk.

Starts one fake OpenAI backend (`bench.fakeoai`) and one `flowshard serve --backend` in front of it,
then plays open-loop Poisson arrivals of streamed chat completions at a light rate and at a rate
near the backend's capacity (90 % of `max_running` / service time). Each arrival goes straight at
the backend ("direct") or through flowshard ("proxy") at random, in the same window: on a noisy
machine both see the same moment, and the backend's load is the total rate either way. Latency
counts from each request's *intended* send time: time to first token (the first streamed bytes)
and total time. The figure reported is proxy minus direct at p50 and p99.

CPU per proxied request is the flowshard processes' CPU (from /proc) over the measured window,
divided by the proxied requests completed in it; the CPU per chunk is the slope between two output
lengths (`--tokens` and `--long-tokens`, the long run at a rate with as many requests in flight).

    python -m bench.proxy --runs 3 --json proxy.json
    python -m bench.proxy --sequential 2000      # one request at a time, alternating: the bare added time

The generator runs on the same machine (its own CPU is reported); all processes are stopped by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from bench.procstat import ProcId, children, sample
from bench.runner import die_with_parent

_FAKE_READY = re.compile(r"fakeoai ready: (http://\S+) pid=(\d+)")
_SERVE_READY = re.compile(r"flowshard ready: http=(http://\S+) ")


@dataclass
class Result:
    mode: str  # direct | proxy
    load: str  # light | near-saturation | long
    rate: float  # offered, req/s
    tokens: int
    completed: int = 0
    errors: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    chunks: int = 0
    flowshard_cpu_s: float = 0.0
    distributor_cpu_s: float = 0.0  # of which the distributor process's (the rest: workers, acceptors)
    generator_cpu_s: float = 0.0
    window_s: float = 0.0

    def pct(self, which: str, q: float) -> float:
        values: list[float] = sorted(getattr(self, which))
        if not values:
            return math.nan
        return values[min(len(values) - 1, int(q * len(values)))]

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("ttft_ms", "total_ms")}
        for which in ("ttft_ms", "total_ms"):
            out[f"{which}_p50"] = self.pct(which, 0.5)
            out[f"{which}_p99"] = self.pct(which, 0.99)
        out["flowshard_cpu_us_per_request"] = self.flowshard_cpu_s / max(self.completed, 1) * 1e6
        out["distributor_cpu_us_per_request"] = self.distributor_cpu_s / max(self.completed, 1) * 1e6
        return out


def _start(cmd: list[str], ready: re.Pattern[str]) -> tuple[subprocess.Popen[bytes], str]:
    # with the bench's own death (SIGTERM from a CI timeout) it gets SIGTERM too: the service drains
    # and removes its segment, the fake backend exits (they were left running before)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=die_with_parent)
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline().decode(errors="replace")
        if not line:
            break
        m = ready.search(line)
        if m:
            return proc, m[1]
    _stop(proc)
    raise RuntimeError(f"{' '.join(cmd[:4])} did not start")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _tree(pid: int) -> list[ProcId]:
    out: list[ProcId] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        ident = ProcId.of(p, "flowshard")
        if ident is not None:
            out.append(ident)
        todo.extend(children(p))
    return out


def _cpu(procs: list[ProcId]) -> float:
    total = 0.0
    for p in procs:
        s = sample(p)
        if s is not None:
            total += s.cpu
    return total


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, intended: float, r: Result,
               measuring: bool) -> None:
    loop = asyncio.get_running_loop()
    first = 0.0
    chunks = 0
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
            if resp.status != 200:
                await resp.read()
                raise RuntimeError(f"HTTP {resp.status}")
            async for _ in resp.content.iter_any():
                chunks += 1
                if not first:
                    first = loop.time()
    except (aiohttp.ClientError, RuntimeError, TimeoutError):
        if measuring:
            r.errors += 1
        return
    end = loop.time()
    if measuring:
        r.completed += 1
        r.chunks += chunks
        r.ttft_ms.append((first - intended) * 1e3)
        r.total_ms.append((end - intended) * 1e3)


async def _play(urls: list[str], results: list[Result], rate: float, duration: float, warmup: float, seed: int,
                flowshard: list[ProcId]) -> None:
    """Open-loop Poisson arrivals at `rate` for warmup + duration, each to one of `urls` (and its
    result) at random; only the measured window counts."""
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    tokens = results[0].tokens
    body = json.dumps({"model": "fake-model", "stream": True, "max_tokens": tokens,
                       "messages": [{"role": "user", "content": "Say something about flow control. " * 4}]}).encode()
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        start = loop.time()
        t = start
        cpu0 = gen0 = dist0 = 0.0
        measuring = False
        while True:
            t += rng.expovariate(rate)
            if t - start > warmup + duration:
                break
            if not measuring and t - start >= warmup:
                measuring = True
                cpu0, gen0, dist0 = _cpu(flowshard), _self_cpu(), _cpu(flowshard[:1])
                window_start = loop.time()
            delay = t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            way = rng.randrange(len(urls))
            task = loop.create_task(_one(session, urls[way], body, t, results[way], measuring))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        for r in results:
            r.window_s = loop.time() - window_start
            r.flowshard_cpu_s = _cpu(flowshard) - cpu0  # all of it is the proxied requests'
            r.distributor_cpu_s = _cpu(flowshard[:1]) - dist0  # (_tree lists the distributor first)
            r.generator_cpu_s = _self_cpu() - gen0


async def _sequential(urls: dict[str, str], n: int, tokens: int) -> dict[str, list[float]]:
    """One request at a time, alternating direct and proxy: whole-request times in ms (first 10 % dropped)."""
    body = json.dumps({"model": "fake-model", "stream": True, "max_tokens": tokens,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    times: dict[str, list[float]] = {name: [] for name in urls}
    async with aiohttp.ClientSession() as session:
        for i in range(n):
            for name, url in urls.items():
                t0 = time.perf_counter()
                async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
                    async for _ in resp.content.iter_any():
                        pass
                if i >= n // 10:
                    times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def _config(budget: int, utilization: bool) -> str:
    limit = budget or '"unlimited"'
    return (f"[budget]\nmax_inflight_requests = {limit}\n[proxy]\nutilization = {str(utilization).lower()}\n"
            "[service]\ndrain_timeout = 1.0\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per configuration")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--light-rate", type=float, default=20.0)
    parser.add_argument("--heavy-rate", type=float, default=0.0,
                        help="req/s near saturation (default: 90%% of max_running / service time)")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--long-tokens", type=int, default=128, help="second output length for the per-chunk cost")
    parser.add_argument("--ttft", type=float, default=0.02)
    parser.add_argument("--itl", type=float, default=0.005)
    parser.add_argument("--max-running", type=int, default=8, help="the fake backend's batch")
    parser.add_argument("--budget", type=int, default=0,
                        help="flowshard's max_inflight_requests (default unlimited: flowshard only passes through; "
                             "the backend's batch makes flowshard hold the queue instead of the backend)")
    parser.add_argument("--utilization", action="store_true", help="also gate on the scraped metrics")
    parser.add_argument("--sequential", type=int, default=0, metavar="N",
                        help="instead: N requests one at a time each way (backend without delays)")
    parser.add_argument("--acceptors", default="0", help="serve --acceptors (the relay in K acceptor processes)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    service_time = args.ttft + args.itl * (args.tokens - 1)
    heavy = args.heavy_rate or round(0.9 * args.max_running / service_time)
    budget = args.budget
    long_time = args.ttft + args.itl * (args.long_tokens - 1)
    long_rate = args.light_rate * service_time / long_time  # as many requests in flight as the light load

    if args.sequential:
        args.ttft = args.itl = 0.0
    fake, fake_url = _start([sys.executable, "-m", "bench.fakeoai", "--ttft", str(args.ttft), "--itl", str(args.itl),
                             "--max-running", str(args.max_running), "--kv-tokens", "10000000"], _FAKE_READY)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "proxy.toml"
        config.write_text(_config(budget, args.utilization))
        serve, serve_url = _start([sys.executable, "-m", "flowshard.cli", "serve", "--config", str(config),
                                   "--port", "0", "--binary-port", "0", "--backend", fake_url,
                                   "--acceptors", str(args.acceptors)], _SERVE_READY)
        results: list[Result] = []
        try:
            if args.sequential:
                urls = {"direct": fake_url + "/v1/chat/completions", "proxy": serve_url + "/v1/chat/completions"}
                times = uvloop.run(_sequential(urls, args.sequential, args.tokens))
                for name, values in times.items():
                    values.sort()
                    print(f"{name:6s} p50 {values[len(values) // 2]:.3f}  p90 {values[int(0.9 * len(values))]:.3f}  "
                          f"p99 {values[int(0.99 * len(values))]:.3f} ms  ({len(values)} requests)")
                return 0
            flowshard = _tree(serve.pid)
            plan = [("light", args.light_rate, args.tokens), ("near-saturation", heavy, args.tokens),
                    ("long", long_rate, args.long_tokens)]
            for run in range(args.runs):
                for step, (load, rate, tokens) in enumerate(plan):
                    modes = [("proxy", serve_url)] if load == "long" else [("direct", fake_url), ("proxy", serve_url)]
                    batch = [Result(mode, load, rate, tokens) for mode, _ in modes]
                    uvloop.run(_play([url + "/v1/chat/completions" for _, url in modes], batch, rate, args.duration,
                                     args.warmup, seed=run * 100 + step, flowshard=flowshard))
                    results += batch
                    for r in batch:
                        mode = r.mode
                        s = r.summary()
                        print(f"run {run + 1} {load:15s} {mode:6s} {rate:6.1f} req/s tokens {tokens:3d}: "
                              f"{r.completed / r.window_s:6.1f} done/s, errors {r.errors}, "
                              f"TTFT p50 {s['ttft_ms_p50']:7.2f} p99 {s['ttft_ms_p99']:7.2f} ms, "
                              f"total p50 {s['total_ms_p50']:7.2f} p99 {s['total_ms_p99']:7.2f} ms"
                              + (f", flowshard {s['flowshard_cpu_us_per_request']:.0f} µs CPU/request"
                                 f" (distributor {s['distributor_cpu_us_per_request']:.0f})"
                                 if mode == "proxy" else ""), flush=True)
        finally:
            _stop(serve)
            _stop(fake)
    report = _report(results, args)
    print(report["text"])
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": [r.summary() for r in results],
                                               "summary": report["summary"]}, indent=1))
    return 0


def _report(results: list[Result], args: argparse.Namespace) -> dict[str, Any]:
    """Medians over runs of: proxy minus direct at p50 / p99, CPU per request, CPU per chunk."""
    lines = ["", "| load | rate req/s | added TTFT p50 / p99 ms | added total p50 / p99 ms | "
                 "flowshard CPU µs/request | of which distributor | chunks/request |", "|---|---|---|---|---|---|---|"]
    summary: dict[str, Any] = {}
    for load in ("light", "near-saturation"):
        direct = [r for r in results if r.load == load and r.mode == "direct"]
        proxy = [r for r in results if r.load == load and r.mode == "proxy"]
        added: dict[str, float] = {}
        for which in ("ttft_ms", "total_ms"):
            for q, name in ((0.5, "p50"), (0.99, "p99")):
                diffs = [p.pct(which, q) - d.pct(which, q) for d, p in zip(direct, proxy, strict=True)]
                added[f"{which}_{name}"] = statistics.median(diffs)
        cpu = statistics.median(p.flowshard_cpu_s / max(p.completed, 1) * 1e6 for p in proxy)
        dist = statistics.median(p.distributor_cpu_s / max(p.completed, 1) * 1e6 for p in proxy)
        chunks = statistics.median(p.chunks / max(p.completed, 1) for p in proxy)
        summary[load] = {"rate": proxy[0].rate, "added": added, "cpu_us_per_request": cpu,
                         "distributor_cpu_us_per_request": dist, "chunks": chunks}
        lines.append(f"| {load} | {proxy[0].rate:.0f} | {added['ttft_ms_p50']:.2f} / {added['ttft_ms_p99']:.2f} | "
                     f"{added['total_ms_p50']:.2f} / {added['total_ms_p99']:.2f} | {cpu:.0f} | {dist:.0f} | "
                     f"{chunks:.1f} |")
    short = [r for r in results if r.load == "light" and r.mode == "proxy"]
    long = [r for r in results if r.load == "long"]
    slopes = []
    for s, lg in zip(short, long, strict=True):
        dc = lg.chunks / max(lg.completed, 1) - s.chunks / max(s.completed, 1)
        if dc > 0:
            slopes.append((lg.flowshard_cpu_s / max(lg.completed, 1) - s.flowshard_cpu_s / max(s.completed, 1))
                          / dc * 1e6)
    per_chunk = statistics.median(slopes) if slopes else math.nan
    summary["cpu_us_per_chunk"] = per_chunk
    lines.append(f"\nflowshard CPU per streamed chunk (slope between {args.tokens} and {args.long_tokens} tokens, "
                 f"same requests in flight): {per_chunk:.1f} µs")
    return {"text": "\n".join(lines), "summary": summary}


if __name__ == "__main__":
    raise SystemExit(main())
