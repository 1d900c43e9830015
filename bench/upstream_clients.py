"""Which HTTP client should the proxy use upstream? CPU per streamed request, measured.

Starts `bench.fakeoai` (no delays), then for each candidate client (aiohttp, httpx) runs
`--requests` streamed chat completions of `--tokens` tokens with `--concurrency` in flight over one
pooled client, on uvloop, and reports this process's CPU µs per request and per chunk (from
`resource.getrusage`), alternating the candidates `--runs` times.

    python -m bench.upstream_clients --requests 2000 --concurrency 8 --tokens 16 --runs 3 [--itl 0.002]

httpx is not a dependency of the project (the measurement chose aiohttp): `pip install httpx` first,
or the candidate is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import uvloop

_READY = re.compile(r"fakeoai ready: (http://\S+) pid=(\d+)")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _body(tokens: int) -> bytes:
    return (b'{"model":"m","stream":true,"max_tokens":%d,"messages":[{"role":"user","content":"hello"}]}' % tokens)


async def _aiohttp(url: str, n: int, conc: int, tokens: int) -> int:
    import aiohttp

    chunks = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one() -> None:
            nonlocal chunks
            async with session.post(url + "/v1/chat/completions", data=_body(tokens),
                                    headers={"content-type": "application/json"}) as resp:
                async for _ in resp.content.iter_any():
                    chunks += 1
        await _drive(one, n, conc)
    return chunks


async def _httpx(url: str, n: int, conc: int, tokens: int) -> int:
    import httpx

    chunks = 0
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=64)) as client:
        async def one() -> None:
            nonlocal chunks
            async with client.stream("POST", url + "/v1/chat/completions", content=_body(tokens),
                                     headers={"content-type": "application/json"}) as resp:
                async for _ in resp.aiter_raw():
                    chunks += 1
        await _drive(one, n, conc)
    return chunks


async def _drive(one: Callable[[], Awaitable[None]], n: int, conc: int) -> None:
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    await asyncio.gather(*(worker() for _ in range(conc)))


CANDIDATES = {"aiohttp": _aiohttp, "httpx": _httpx}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream_clients", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--itl", type=float, default=0.0, help="the fake's inter-token delay (0: chunks coalesce)")
    args = parser.parse_args(argv)
    fake = subprocess.Popen([sys.executable, "-m", "bench.fakeoai", "--ttft", "0", "--itl", str(args.itl)],
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert fake.stderr is not None
        m = _READY.search(fake.stderr.readline().decode())
        assert m, "fakeoai did not start"
        url = m[1]
        candidates = {name: fn for name, fn in CANDIDATES.items() if importlib.util.find_spec(name) is not None}
        for missing in CANDIDATES.keys() - candidates.keys():
            print(f"{missing}: not installed, skipped")
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in candidates}
        for _ in range(args.runs):
            for name, fn in candidates.items():
                cpu0, t0 = _cpu(), time.perf_counter()
                chunks = uvloop.run(fn(url, args.requests, args.concurrency, args.tokens))
                cpu, wall = _cpu() - cpu0, time.perf_counter() - t0
                results[name].append((cpu / args.requests * 1e6, cpu / max(chunks, 1) * 1e6))
                print(f"{name:8s} {args.requests / wall:8.0f} req/s  {cpu / args.requests * 1e6:7.1f} µs CPU/request  "
                      f"{cpu / max(chunks, 1) * 1e6:6.1f} µs CPU/chunk  ({chunks / args.requests:.1f} chunks/request)")
        for name, rows in results.items():
            per_req = statistics.median(r[0] for r in rows)
            per_chunk = statistics.median(r[1] for r in rows)
            print(f"median {name:8s} {per_req:7.1f} µs/request {per_chunk:6.1f} µs/chunk "
                  f"(min {min(r[0] for r in rows):.1f}, max {max(r[0] for r in rows):.1f})")
    finally:
        fake.terminate()
        fake.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
