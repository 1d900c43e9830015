"""`flowshard bench SCENARIO --proxy`: a scenario's flows as OpenAI requests through proxy mode.

Why: the scenarios describe tenants (flows, priorities, arrivals, sizes, service times); in proxy
mode the same tenants are clients of an OpenAI API. This plays them that way: `flowshard serve
--backend` with the scenario's `[server]` config in front of a fake OpenAI backend
(`bench.fakeoai`, a batch large enough never to be the limit, so flowshard's budget decides), every
request a streamed chat completion with `x-flowshard-flow` and `x-flowshard-priority` set to its
flow and priority, a prompt of its `size` bytes, and as many output tokens as its `service` time
takes at the fake's pace (`--proxy-ttft` to the first token, then `--proxy-itl` per token).

Open-loop flows (poisson, constant, bursts) send at their intended times; closed-loop clients send,
wait for the end of the stream (or back off after a refusal), think, and send again. When the
arrivals stop, what still waits is abandoned (`drain = false`) or waited for (`drain = true`, up to
`--drain-timeout`). Reported per flow: sent, completed, refused by reason
(`x-llm-d-request-dropped-reason`), unfinished, TTFT and total latency
p50 / p99 from the intended send time, streamed tokens per second; and the flowshard processes' CPU
per completed request. One run; the generator is this process (uvloop, one aiohttp session).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import uvloop

from bench.proxy import _FAKE_READY, _SERVE_READY, _cpu, _start, _stop, _tree
from flowshard.config import dump_config
from flowshard.scenario import Closed, FlowSource, Scenario, flow_sources

__all__ = ["run_proxy_scenario"]


class _FlowStats:
    __slots__ = ("band", "completed", "errors", "flow", "priority", "refused", "sent", "tokens", "total", "ttft",
                 "unfinished")

    def __init__(self, flow: str, priority: int) -> None:
        self.flow = flow
        self.priority = priority
        self.band = ""
        self.sent = self.completed = self.errors = self.tokens = self.unfinished = 0
        self.refused: dict[str, int] = {}
        self.ttft: list[float] = []
        self.total: list[float] = []


def _pct(values: list[float], q: float) -> float | None:
    """The q-quantile, or None where nothing completed (`–` in the table, null in the JSON)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _pcts(values: list[float]) -> str:
    """p50 / p99 for the table."""
    p50, p99 = _pct(values, 0.5), _pct(values, 0.99)
    return "– / –" if p50 is None or p99 is None else f"{p50:.1f} / {p99:.1f}"


class _Player:
    def __init__(self, scenario: Scenario, url: str, ttft: float, itl: float, drain_timeout: float) -> None:
        self.drain_timeout = drain_timeout
        self.scenario = scenario
        self.url = url + "/v1/chat/completions"
        self.ttft = ttft
        self.itl = itl
        self.sources = flow_sources(scenario.workload)
        self.stats = [_FlowStats(s.instance.id, s.instance.spec.priority) for s in self.sources]
        self.t0 = 0.0
        self.window = (scenario.workload.warmup, scenario.workload.duration)

    def _body(self, size: int, service: float) -> bytes:
        tokens = max(1, round((service - self.ttft) / self.itl) + 1) if self.itl > 0 else 1
        message = {"role": "user", "content": ""}
        head: dict[str, Any] = {"model": "fake-model", "stream": True, "max_tokens": tokens, "messages": [message]}
        message["content"] = "x" * max(0, size - len(json.dumps(head)))  # the body is about `size` bytes
        return msgspec.json.encode(head)

    async def _one(self, session: aiohttp.ClientSession, i: int, size: int, service: float,
                   intended: float) -> str:
        """Send one request; returns "" when it completed, else why not."""
        loop = asyncio.get_running_loop()
        st = self.stats[i]
        counted = self.window[0] <= intended - self.t0 < self.window[1]
        headers = {"content-type": "application/json", "x-flowshard-flow": st.flow,
                   "x-flowshard-priority": str(st.priority)}
        first = 0.0
        tokens = 0
        if counted:
            st.sent += 1
        try:
            async with session.post(self.url, data=self._body(size, service), headers=headers) as resp:
                if resp.status != 200:
                    await resp.read()
                    why = resp.headers.get("x-llm-d-request-dropped-reason", f"http-{resp.status}")
                    if counted:
                        st.refused[why] = st.refused.get(why, 0) + 1
                    return why
                async for chunk in resp.content.iter_any():
                    if not first:
                        first = loop.time()
                    tokens += chunk.count(b'"content":')
        except (aiohttp.ClientError, TimeoutError) as exc:
            if counted:
                st.errors += 1
            return type(exc).__name__
        except asyncio.CancelledError:  # still waiting when the run ended: the client goes away
            if counted:
                st.unfinished += 1
            raise
        if counted:
            end = loop.time()
            st.completed += 1
            st.tokens += tokens
            st.ttft.append((first - intended) * 1e3)
            st.total.append((end - intended) * 1e3)
        return ""

    async def _open(self, session: aiohttp.ClientSession, i: int, source: FlowSource, tasks: set[Any]) -> None:
        loop = asyncio.get_running_loop()
        spec = source.instance.spec
        stop = self.t0 + (spec.stop if spec.stop is not None else self.scenario.workload.duration)
        t = self.t0 + spec.start
        while True:
            gap, size, _tokens, service = source.next()
            t += gap
            if t >= stop:
                return
            delay = t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = loop.create_task(self._one(session, i, size, service, t))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _closed(self, session: aiohttp.ClientSession, i: int, source: FlowSource) -> None:
        loop = asyncio.get_running_loop()
        spec = source.instance.spec
        arrival = spec.arrival
        assert isinstance(arrival, Closed)
        stop = self.t0 + (spec.stop if spec.stop is not None else self.scenario.workload.duration)
        await asyncio.sleep(max(0.0, self.t0 + spec.start - loop.time()))
        while loop.time() < stop:
            gap, size, _tokens, service = source.next()
            await asyncio.sleep(gap)
            if loop.time() >= stop:
                return
            why = await self._one(session, i, size, service, loop.time())
            if why:
                await asyncio.sleep(arrival.backoff)

    async def play(self) -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[str]] = set()
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
            self.t0 = loop.time() + 0.2
            players: list[Coroutine[Any, Any, None]] = []
            for i, source in enumerate(self.sources):
                arrival = source.instance.spec.arrival
                if isinstance(arrival, Closed):
                    for _ in range(arrival.concurrency):
                        players.append(self._closed(session, i, FlowSource(source.instance, self.scenario.workload.seed
                                                                           + len(players))))
                else:
                    players.append(self._open(session, i, source, tasks))
            await asyncio.gather(*players)
            # drain = false: what is still waiting when the arrivals stop is left (the clients go away)
            grace = self.drain_timeout if self.scenario.workload.drain else 0.0
            if tasks:
                _done, pending = await asyncio.wait(set(tasks), timeout=grace)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)


def run_proxy_scenario(args: argparse.Namespace, scenario: Scenario) -> int:
    """Start the fake backend and flowshard, play the scenario through the proxy, print the figures."""
    itl, ttft = args.proxy_itl, args.proxy_ttft
    fake, fake_url = _start([sys.executable, "-m", "bench.fakeoai", "--ttft", str(ttft), "--itl", str(itl),
                             "--max-running", "100000", "--kv-tokens", str(1 << 40)], _FAKE_READY)
    player = _Player(scenario, "", ttft, itl, args.drain_timeout)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "server.toml"
            config.write_text(dump_config(scenario.server))
            serve, serve_url = _start([sys.executable, "-m", "flowshard.cli", "serve", "--config", str(config),
                                       "--port", "0", "--binary-port", "0", "--backend", fake_url], _SERVE_READY)
            try:
                player.url = serve_url + "/v1/chat/completions"
                procs = _tree(serve.pid)
                cpu0, wall0 = _cpu(procs), time.monotonic()
                uvloop.run(player.play())
                cpu, wall = _cpu(procs) - cpu0, time.monotonic() - wall0
            finally:
                _stop(serve)
    finally:
        _stop(fake)
    bands = {b.priority: b.name for b in scenario.server.bands}
    default = scenario.server.default_band.name
    rows = []
    lines = [f"scenario {scenario.name!r} through proxy mode (fake backend: TTFT {ttft * 1e3:g} ms, "
             f"{itl * 1e3:g} ms per token); window [{player.window[0]:g}, {player.window[1]:g}] s", "",
             "| flow | band | sent | completed | refused | unfinished | TTFT p50 / p99 ms | total p50 / p99 ms | "
             "tokens/s |", "|---|---|---|---|---|---|---|---|---|"]
    span = player.window[1] - player.window[0]
    completed = 0
    for st in player.stats:
        st.band = bands.get(st.priority, default)
        completed += st.completed
        refused = ", ".join(f"{k} {v}" for k, v in sorted(st.refused.items())) or "0"
        if st.errors:
            refused += f", errors {st.errors}"
        lines.append(f"| {st.flow} | {st.band} | {st.sent} | {st.completed} | {refused} | {st.unfinished} | "
                     f"{_pcts(st.ttft)} | {_pcts(st.total)} | {st.tokens / span:.0f} |")
        rows.append({"flow": st.flow, "band": st.band, "sent": st.sent, "completed": st.completed,
                     "refused": st.refused, "errors": st.errors, "unfinished": st.unfinished, "tokens": st.tokens,
                     "ttft_ms_p50": _pct(st.ttft, 0.5), "ttft_ms_p99": _pct(st.ttft, 0.99),
                     "total_ms_p50": _pct(st.total, 0.5), "total_ms_p99": _pct(st.total, 0.99)})
    lines.append(f"\nflowshard CPU: {cpu / max(completed, 1) * 1e6:.0f} µs per completed request "
                 f"({cpu / wall:.2f} cores over the run)")
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"scenario": scenario.name, "mode": "proxy", "flows": rows,
                                               "cpu_s": cpu, "wall_s": wall}, indent=1))
    return 0
