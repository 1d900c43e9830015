"""A fake OpenAI-compatible backend (vLLM-like) for flowshard's proxy tests and benchmarks.

Why: proxy mode must be tested and measured end to end without a GPU. This server answers like
vLLM's OpenAI server, with a load model that makes its `/metrics` move the way vLLM's do:

- `POST /v1/chat/completions`, `/v1/completions` (streaming as server-sent events or not, `usage`,
  `stream_options.include_usage`), `POST /v1/embeddings`, `GET /v1/models`, `GET /v1/models/{id}`;
- at most `max_running` requests generate at once (the batch); the rest wait in a FIFO queue. A
  running request waits `ttft` seconds, then emits one token every `itl` seconds (`max_tokens`
  tokens, else `tokens`). `GET /metrics` reports `vllm:num_requests_waiting`,
  `vllm:num_requests_running` and `vllm:kv_cache_usage_perc` = (prompt + generated tokens of the
  running requests) / `kv_tokens`;
- fault switches, on the command line or at run time with `POST /fake/config` (JSON, any subset):
  `ttft`/`itl` (slow), `status` (answer every request with that HTTP status, e.g. 503), `refuse`
  (drop each request's connection without an answer), `die_after` (drop the connection after that
  many streamed tokens), `end_after` (end the stream cleanly, without `[DONE]`, after that many),
  `max_running`, `metrics_status` (fail `/metrics` with that status);
- `GET /fake/stats`: requests, running, waiting, completed, aborted (the client went away before
  the end: how a test sees that the proxy closed the upstream request), peak running and waiting,
  `model_paths`: the path and query, as received, of the last 64 `GET /v1/models…` requests, and
  `post_paths`: the same for the last 64 POSTs (completions, embeddings).

`python -m bench.fakeoai [--port 0] [--ttft S] [--itl S] ...` prints
`fakeoai ready: http://HOST:PORT pid=PID` on stderr; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
from collections import deque
from typing import Any, Final

import msgspec
import uvloop
from aiohttp import web

from flowshard.config import host_port

__all__ = ["FakeBackend", "FakeConfig", "main"]


class FakeConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The fake's behaviour; every field may be changed at run time through `POST /fake/config`."""

    model: str = "fake-model"
    ttft: float = 0.02  # seconds from the start of generation to the first token
    itl: float = 0.005  # seconds between tokens
    tokens: int = 16  # output tokens when the request sets no max_tokens
    max_running: int = 64  # the batch: requests generating at once; the rest wait
    kv_tokens: int = 100_000  # the KV cache's size in tokens
    status: int = 0  # non-zero: answer every inference request with this status
    refuse: bool = False  # drop every inference request's connection without an answer
    die_after: int = -1  # >= 0: drop a streamed response's connection after that many tokens
    end_after: int = -1  # >= 0: end a streamed response cleanly (no [DONE]) after that many tokens
    metrics_status: int = 0  # non-zero: answer /metrics with this status


# what each of `FakeConfig`'s switches does, for `--help` (review 154: it listed them bare)
_HELP: Final = {
    "model": "the model name it serves",
    "ttft": "seconds from the start of generation to the first token",
    "itl": "seconds between tokens",
    "tokens": "output tokens when a request sets no max_tokens",
    "max_running": "the batch: requests generating at once; the rest wait in a queue",
    "kv_tokens": "the KV cache's size in tokens (vllm:kv_cache_usage_perc)",
    "status": "non-zero: answer every inference request with this HTTP status (e.g. 503)",
    "refuse": "drop every inference request's connection without an answer",
    "die_after": ">= 0: drop a streamed response's connection after that many tokens",
    "end_after": ">= 0: end a streamed response cleanly, without [DONE], after that many tokens",
    "metrics_status": "non-zero: answer /metrics with this HTTP status",
}

_encode = msgspec.json.encode
_decode = msgspec.json.decode


def _prompt_tokens(body: dict[str, Any]) -> int:
    """About 4 characters per token, like the estimate flowshard itself makes."""
    chars = 0
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p.get("text", "")) for p in content if isinstance(p, dict))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        chars += len(prompt)
    elif isinstance(prompt, list):
        chars += sum(len(p) for p in prompt if isinstance(p, str))
    return max(1, math.ceil(chars / 4))


class FakeBackend:
    """The server's state: the batch, the waiting queue, the counters."""

    def __init__(self, config: FakeConfig) -> None:
        self.config = config
        self.running = 0
        self.kv_used = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.counts = {"requests": 0, "completed": 0, "aborted": 0, "peak_running": 0, "peak_waiting": 0,
                       "metrics_scrapes": 0}
        self._id = 0
        self.model_paths: deque[str] = deque(maxlen=64)  # the raw request targets of GET /v1/models...
        self.post_paths: deque[str] = deque(maxlen=64)  # ... and of the POSTs

    # ------------------------------------------------------------------ the batch

    async def _enter(self) -> None:
        if self.running < self.config.max_running and not self.waiters:
            self.running += 1
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            self.counts["peak_waiting"] = max(self.counts["peak_waiting"], len(self.waiters))
            try:
                await fut  # _leave passed its slot on to us (running already counts us)
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._leave()  # woken and cancelled at once: give the slot on
                else:
                    self.waiters.remove(fut)
                raise
        self.counts["peak_running"] = max(self.counts["peak_running"], self.running)

    def _leave(self) -> None:
        self.running -= 1
        self._admit_waiters()

    def _admit_waiters(self) -> None:
        while self.waiters and self.running < self.config.max_running:
            fut = self.waiters.popleft()
            if not fut.done():
                self.running += 1
                fut.set_result(None)

    # ------------------------------------------------------------------ handlers

    async def models(self, request: web.Request) -> web.Response:
        self.model_paths.append(request.raw_path)
        data = {"object": "list", "data": [{"id": self.config.model, "object": "model", "created": 0,
                                            "owned_by": "fakeoai"}]}
        return web.Response(body=_encode(data), content_type="application/json")

    async def model(self, request: web.Request) -> web.Response:
        """`GET /v1/models/{id}` (the id percent-decoded: the openai client sends `org%2Fname`)."""
        self.model_paths.append(request.raw_path)
        name = request.match_info["model"]
        if name != self.config.model:
            error = {"error": {"message": f"The model `{name}` does not exist.", "type": "invalid_request_error",
                               "param": "model", "code": "model_not_found"}}
            return web.Response(status=404, body=_encode(error), content_type="application/json")
        data = {"id": self.config.model, "object": "model", "created": 0, "owned_by": "fakeoai"}
        return web.Response(body=_encode(data), content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        self.counts["metrics_scrapes"] += 1
        if self.config.metrics_status:
            return web.Response(status=self.config.metrics_status, text="metrics unavailable\n")
        labels = f'{{engine="0",model_name="{self.config.model}"}}'
        kv = min(1.0, self.kv_used / self.config.kv_tokens)
        text = (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{labels} {float(self.running)}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{labels} {float(len(self.waiters))}\n"
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f"vllm:kv_cache_usage_perc{labels} {kv}\n"
            "# HELP vllm:request_success_total Count of successfully processed requests.\n"
            "# TYPE vllm:request_success_total counter\n"
            f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="{self.config.model}"}} '
            f"{float(self.counts['completed'])}\n"
        )
        return web.Response(text=text, content_type="text/plain")

    async def stats(self, request: web.Request) -> web.Response:
        data = dict(self.counts, running=self.running, waiting=len(self.waiters), model_paths=list(self.model_paths),
                    post_paths=list(self.post_paths))
        return web.Response(body=_encode(data), content_type="application/json")

    async def set_config(self, request: web.Request) -> web.Response:
        try:
            changes = _decode(await request.read())
            self.config = msgspec.convert(msgspec.structs.asdict(self.config) | changes, FakeConfig)
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError) as exc:
            return web.Response(status=400, text=f"bad config: {exc}\n")
        self._admit_waiters()  # a larger batch admits waiters at once
        return web.Response(body=_encode(self.config), content_type="application/json")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        self.post_paths.append(request.raw_path)
        early = await self._faults(request)
        if early is not None:
            return early
        body = _decode(await request.read())
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        prompt = sum(max(1, math.ceil(len(str(x)) / 4)) for x in items)
        self.counts["requests"] += 1
        data = {
            "object": "list", "model": body.get("model", self.config.model),
            "data": [{"object": "embedding", "index": i, "embedding": [0.125 * (i + 1)] * 8}
                     for i in range(len(items))],
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }
        self.counts["completed"] += 1
        return web.Response(body=_encode(data), content_type="application/json")

    async def _faults(self, request: web.Request) -> web.StreamResponse | None:
        config = self.config
        if config.refuse:
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # nothing more to do for this request
        if config.status:
            error = {"error": {"message": f"fake backend fault: status {config.status}", "type": "server_error",
                               "param": None, "code": None}}
            return web.Response(status=config.status, body=_encode(error), content_type="application/json")
        return None

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self.post_paths.append(request.raw_path)
        early = await self._faults(request)
        if early is not None:
            return early
        try:
            body = _decode(await request.read())
        except msgspec.DecodeError as exc:
            error = {"error": {"message": f"invalid JSON: {exc}", "type": "invalid_request_error"}}
            return web.Response(status=400, body=_encode(error), content_type="application/json")
        chat = request.path.endswith("/chat/completions")
        self.counts["requests"] += 1
        prompt = _prompt_tokens(body)
        n = body.get("max_completion_tokens") or body.get("max_tokens") or self.config.tokens
        stream = bool(body.get("stream"))
        usage_wanted = bool((body.get("stream_options") or {}).get("include_usage"))
        self._id += 1
        rid = f"{'chatcmpl' if chat else 'cmpl'}-fake{self._id}"
        model = body.get("model", self.config.model)
        await self._enter()
        self.kv_used += prompt
        held = prompt
        try:
            config = self.config
            if not stream:
                await asyncio.sleep(config.ttft + config.itl * max(0, n - 1))
                self.kv_used += n
                held += n
                text = " tok" * n
                choice: dict[str, Any] = (
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                    if chat else {"index": 0, "text": text, "finish_reason": "length"}
                )
                data = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": 0,
                        "model": model, "choices": [choice],
                        "usage": {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}}
                self.counts["completed"] += 1
                return web.Response(body=_encode(data), content_type="application/json")
            resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
            await resp.prepare(request)
            obj = "chat.completion.chunk" if chat else "text_completion"
            extra = b',"usage":null' if usage_wanted else b""
            head = b'data: {"id":"%b","object":"%b","created":0,"model":%b,"choices":[' % (
                rid.encode(), obj.encode(), _encode(model))
            await asyncio.sleep(config.ttft)
            for i in range(n):
                if i:
                    await asyncio.sleep(config.itl)
                if 0 <= self.config.die_after <= i:
                    if request.transport is not None:
                        request.transport.abort()
                    self.counts["aborted"] += 1
                    return resp
                if 0 <= self.config.end_after <= i:
                    await resp.write_eof()
                    return resp
                self.kv_used += 1
                held += 1
                last = i == n - 1
                finish = b'"length"' if last else b"null"
                if chat:
                    delta = b'{"role":"assistant","content":" tok"}' if i == 0 else b'{"content":" tok"}'
                    choice_b = b'{"index":0,"delta":%b,"finish_reason":%b}' % (delta, finish)
                else:
                    choice_b = b'{"index":0,"text":" tok","finish_reason":%b}' % finish
                await resp.write(head + choice_b + b"]" + extra + b"}\n\n")
            if usage_wanted:
                usage = b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (prompt, n, prompt + n)
                await resp.write(head + b"],\"usage\":" + usage + b"}\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            self.counts["completed"] += 1
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            self.counts["aborted"] += 1
            raise
        finally:
            self.kv_used -= held
            self._leave()


def build_app(backend: FakeBackend) -> web.Application:
    app = web.Application(client_max_size=64 << 20)
    app.router.add_get("/v1/models", backend.models)
    app.router.add_get("/v1/models/{model:.+}", backend.model)
    app.router.add_get("/metrics", backend.metrics)
    app.router.add_get("/fake/stats", backend.stats)
    app.router.add_post("/fake/config", backend.set_config)
    app.router.add_post("/v1/chat/completions", backend.completions)
    app.router.add_post("/v1/completions", backend.completions)
    app.router.add_post("/v1/embeddings", backend.embeddings)
    return app


async def serve(config: FakeConfig, host: str, port: int) -> None:
    backend = FakeBackend(config)
    # handler_cancellation: a client that goes away cancels its handler, as vLLM aborts the request
    runner = web.AppRunner(build_app(backend), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = site._server
    assert server is not None
    bound = server.sockets[0].getsockname()  # type: ignore[attr-defined]
    sys.stderr.write(f"fakeoai ready: http://{host_port(bound[0], bound[1])} pid={os.getpid()}\n")
    sys.stderr.flush()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fakeoai", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="0 (default): a free port, printed on the ready line")
    defaults = FakeConfig()
    for name in FakeConfig.__struct_fields__:
        value = getattr(defaults, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true", default=value, help=_HELP[name])
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"{_HELP[name]} (default: {value})")
    args = parser.parse_args(argv)
    config = FakeConfig(**{name: getattr(args, name) for name in FakeConfig.__struct_fields__})
    uvloop.run(serve(config, args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
