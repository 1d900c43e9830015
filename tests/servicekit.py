"""Helpers for the integration tests that run `flowshard serve` as a real subprocess.

- `Service`: start `python -m flowshard.cli serve` in its own process group, parse the ready line,
  (`acceptors`: `--acceptors K`; by default the environment variable FLOWSHARD_TEST_ACCEPTORS,
  else 0, so the whole service suite can be run again in acceptor mode),
  watch its process tree (every process the distributor ever started, restarted workers and the
  multiprocessing resource tracker included), stop it with SIGTERM (graceful drain), and check that
  nothing is left behind: no process of the tree alive, no `/dev/shm/flowshard-<pid>-*` segment.
- `launch` (pytest fixture): starts services for a test and, after it, stops what still runs,
  asserts the no-leftover rule and cleans up by pid (never by name pattern).
- HTTP helpers over raw asyncio streams (`HttpConn`, `ahttp`) and http.client (`http`), so no new
  dependency; Prometheus text parsing; polling helpers.

Processes are identified by (pid, start time from /proc/<pid>/stat), so a recycled pid is never
mistaken for one of ours, and never signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(
    r"flowshard ready: http=http://(?P<hhost>[^:\s]+):(?P<hport>\d+) binary=(?P<bhost>[^:\s]+):(?P<bport>\d+) "
    r"shards=(?P<shards>\d+) pid=(?P<pid>\d+)"
)
ACCEPTORS_ENV = "FLOWSHARD_TEST_ACCEPTORS"  # --acceptors for tests that do not choose (default 0)
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
GONE_TIMEOUT = 3.0  # after the distributor exited: how long its children may take to follow
ACCEPTOR_CLOSE_REPORT = 0.1  # acceptor mode: ample time for a closed connection to stop counting

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- processes


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("latin-1")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = data[data.rindex(")") + 2 :].split()  # after "pid (comm) "
    return fields[0], int(fields[19])


@dataclass(frozen=True)
class Proc:
    """A process identity: pid plus start time, so a reused pid is not taken for this process."""

    pid: int
    start: int
    role: str = ""

    @classmethod
    def of(cls, pid: int, role: str = "") -> Proc | None:
        st = _stat(pid)
        return None if st is None else cls(pid, st[1], role)

    def alive(self) -> bool:
        """Running (or stopped): exists, is the same process, and is not a zombie."""
        st = _stat(self.pid)
        return st is not None and st[1] == self.start and st[0] not in ("Z", "X")

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def children(pid: int) -> list[int]:
    """Direct children of `pid` (every thread's children list)."""
    out: list[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError):
            out.extend(int(x) for x in Path(path).read_text().split())
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def role_of(pid: int) -> str:
    cmd = cmdline(pid)
    if "-m workers" in cmd:
        m = re.search(r"--shard (\d+)", cmd)
        return f"worker{m.group(1) if m else '?'}"
    if "resource_tracker" in cmd:
        return "resource-tracker"
    if "-m distributor.front" in cmd:
        m = re.search(r"--index (\d+)", cmd)
        return f"acceptor{m.group(1) if m else '?'}"
    return "child"


def default_acceptors() -> int | str:
    """--acceptors when a test does not choose: $FLOWSHARD_TEST_ACCEPTORS ("auto" or a count), else 0."""
    value = os.environ.get(ACCEPTORS_ENV, "").strip()
    if not value:
        return 0
    return value if value == "auto" else int(value)


def segments(pid: int) -> list[str]:
    """The shared-memory segments named after distributor `pid`."""
    return sorted(glob.glob(f"/dev/shm/flowshard-{pid}-*"))


def wait_until(cond: Callable[[], Any], timeout: float, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------- service


class Service:
    """One `flowshard serve` subprocess (own process group) and everything it starts."""

    def __init__(
        self, config_path: Path, shards: int, on_ready: Callable[[Service], None] | None = None,
        port: int = 0, binary_port: int = 0, acceptors: int | str | None = None,
    ) -> None:
        if acceptors is None:
            acceptors = default_acceptors()
        self.acceptors = acceptors  # --acceptors (an int, or "auto")
        self.on_ready = on_ready  # called from the stderr reader the moment the ready line is read
        self.config_path = config_path
        self.shards = shards
        self.ports = (port, binary_port)
        self.popen: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.http_port = 0
        self.binary_port = 0
        self.host = "127.0.0.1"
        self.lines: list[str] = []
        self.procs: dict[int, Proc] = {}  # every process of the tree ever seen (pid -> identity)
        self._ready = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self.returncode: int | None = None
        self.signalled = False  # the test sent a signal: finish() waits instead of signalling again

    # ------------------------------------------------------------------ start / stop

    def start(self, timeout: float = START_TIMEOUT) -> Service:
        """Spawn and wait for the ready line (and, unless `on_ready` is set, one served request)."""
        self.spawn()
        return self.wait_ready(timeout)

    def spawn(self) -> None:
        cmd = [
            sys.executable, "-m", "flowshard.cli", "serve", "--shards", str(self.shards),
            "--config", str(self.config_path), "--port", str(self.ports[0]), "--binary-port", str(self.ports[1]),
            "--acceptors", str(self.acceptors),
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.popen = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, env=env,
        )
        self.pid = self.popen.pid
        me = Proc.of(self.pid, "distributor")
        if me is not None:
            self.procs[self.pid] = me
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> Service:
        assert self.popen is not None
        if not self._ready.wait(timeout):
            self.force_cleanup()
            raise AssertionError(f"service not ready within {timeout} s; stderr:\n{self.stderr()}")
        if not self.http_port:
            rc = self.popen.wait()
            raise AssertionError(f"service exited ({rc}) before it was ready; stderr:\n{self.stderr()}")
        if self.on_ready is None:
            # Served by the event loop: past the point where the service installs its signal handlers
            # (the ready line comes before that; see test_sigterm_right_after_ready_line_...).
            r = http(self.http_port, "GET", "/healthz")
            assert r.status == 200, r
            if self.acceptors not in (0, "0"):
                # That connection counts against max_connections until the service has seen it close:
                # in one process at once, with acceptors once the close report of the acceptor that
                # served it reached the distributor, a hop later (milliseconds, more on a busy machine).
                # Tests that count connections from the start must not find it still there.
                time.sleep(ACCEPTOR_CLOSE_REPORT)
        self.track()
        return self

    def _read_stderr(self) -> None:
        assert self.popen is not None and self.popen.stderr is not None
        for raw in self.popen.stderr:
            line = raw.decode(errors="replace")
            with self._lock:
                self.lines.append(line)
            m = READY.search(line)
            if m and not self._ready.is_set():
                assert int(m["pid"]) == self.pid, (m["pid"], self.pid)
                self.host = m["hhost"]
                self.http_port = int(m["hport"])
                self.binary_port = int(m["bport"])
                if self.on_ready is not None:
                    self.on_ready(self)
                self._ready.set()
        self._done.set()
        self._ready.set()  # EOF before the ready line: wake the starter (it checks poll())

    def _watch(self) -> None:
        """Record the distributor's process tree every 20 ms while it runs (catches restarted workers)."""
        assert self.popen is not None
        while self.popen.poll() is None:
            self.track()
            time.sleep(0.02)

    def track(self) -> list[Proc]:
        """Record the current descendants of the distributor; returns them."""
        found: list[Proc] = []
        todo = [self.pid]
        seen: set[int] = set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            for child in children(pid):
                todo.append(child)
                proc = Proc.of(child, role_of(child))
                if proc is None:
                    continue
                with self._lock:
                    known = self.procs.get(child)
                    # a child seen between fork and exec still shows the parent's command line
                    if known is None or known.start != proc.start or (known.role != proc.role != "child"):
                        self.procs[child] = proc
                found.append(proc)
        return found

    def worker_procs(self) -> list[Proc]:
        return [p for p in self.track() if p.role.startswith("worker")]

    def acceptor_procs(self) -> list[Proc]:
        """The live acceptor processes (`--acceptors K`), by index."""
        return sorted((p for p in self.track() if p.role.startswith("acceptor") and p.alive()), key=lambda p: p.role)

    def stderr(self) -> str:
        with self._lock:
            return "".join(self.lines)

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Signal the distributor (only while it is unreaped: its pid cannot have been reused)."""
        assert self.popen is not None
        if self.popen.poll() is None:
            self.track()
            os.kill(self.pid, sig)
            self.signalled = True

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM (graceful drain) and wait for the exit status."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        assert self.popen is not None
        try:
            self.returncode = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            message = f"service {self.pid} did not exit within {timeout} s; stderr:\n{self.stderr()}"
            raise AssertionError(message) from None
        self._done.wait(2.0)
        return self.returncode

    def kill_group(self) -> None:
        """SIGKILL the whole process group, before the distributor is reaped (the group cannot be reused)."""
        assert self.popen is not None
        if self.popen.poll() is None:
            self.track()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)

    # ------------------------------------------------------------------ leftovers

    def alive(self) -> list[Proc]:
        with self._lock:
            procs = list(self.procs.values())
        return [p for p in procs if p.alive()]

    def leftovers(self, timeout: float = GONE_TIMEOUT) -> list[str]:
        """What is left of this (stopped) service after `timeout`: live processes, segments."""
        problems: list[str] = []
        if self.running:
            problems.append(f"distributor {self.pid} still running")
        alive = wait_until(lambda: not self.alive(), timeout) or self.alive()
        if alive is not True:
            problems += [f"{p.role or 'process'} pid {p.pid} still alive ({cmdline(p.pid)[:120]})" for p in alive]
        segs = wait_until(lambda: not segments(self.pid), timeout) or segments(self.pid)
        if segs is not True:
            problems += [f"shared-memory segment {s} left behind" for s in segs]
        return problems

    def force_cleanup(self) -> None:
        """Kill everything of ours by pid (identity checked), reap, unlink our segments."""
        if self.popen is not None and self.popen.poll() is None:
            self.kill_group()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5)
        for p in self.alive():
            p.kill()
        for s in segments(self.pid):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(s)

    def finish(self) -> list[str]:
        """After a test: stop gracefully if still running, then report (and clean) leftovers."""
        problems: list[str] = []
        if self.running:
            try:
                rc = self.wait() if self.signalled else self.terminate()
                if rc != 0:
                    problems.append(f"exit status {rc} after SIGTERM")
            except AssertionError as exc:
                problems.append(str(exc))
        problems += self.leftovers()
        self.force_cleanup()
        return problems

    # ------------------------------------------------------------------ convenience

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.http_port}{path}"

    def stats(self) -> dict[str, Any]:
        r = http(self.http_port, "GET", "/v1/stats")
        assert r.status == 200, r
        return r.json()

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        r = http(self.http_port, "GET", "/metrics")
        assert r.status == 200, r
        return parse_metrics(r.body.decode())

    async def astats(self) -> dict[str, Any]:
        r = await ahttp(self.http_port, "GET", "/v1/stats")
        assert r.status == 200, r
        return r.json()

    async def ametrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        r = await ahttp(self.http_port, "GET", "/metrics")
        assert r.status == 200, r
        return parse_metrics(r.body.decode())

    async def until_stats(self, cond: Callable[[dict[str, Any]], Any], timeout: float = 5.0) -> dict[str, Any]:
        """Poll /v1/stats until `cond(stats)` holds; the last stats in the failure message."""
        deadline = time.monotonic() + timeout
        while True:
            s = await self.astats()
            if cond(s):
                return s
            if time.monotonic() >= deadline:
                raise AssertionError(f"stats condition not reached within {timeout} s: {json.dumps(s)[:3000]}")
            await asyncio.sleep(0.01)


def config_text(
    *,
    budget: int | None = 1,
    budget_bytes: int | None = None,
    max_queued_requests: int | str = "unlimited",
    max_queued_bytes: int | str = "unlimited",
    bands: list[dict[str, Any]] | None = None,
    service: dict[str, Any] | None = None,
    extra: str = "",
) -> str:
    """A small TOML config. `bands`: dicts of band keys (priority required)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)

    lines = [f"max_queued_requests = {value(max_queued_requests)}", f"max_queued_bytes = {value(max_queued_bytes)}"]
    lines.append(extra)
    lines.append("[budget]")
    lines.append(f"max_inflight_requests = {value(budget if budget is not None else 'unlimited')}")
    lines.append(f"max_inflight_bytes = {value(budget_bytes if budget_bytes is not None else 'unlimited')}")
    svc: dict[str, Any] = {"drain_timeout": 1.0, "jsq_slack_bytes": 0}  # exact JSQ-Bytes: flows spread over shards
    svc.update(service or {})
    lines.append("[service]")
    lines += [f"{k} = {value(v)}" for k, v in svc.items()]
    for band in bands or [{"priority": 0}]:
        lines.append("[[bands]]")
        lines += [f"{k} = {value(v)}" for k, v in band.items()]
    return "\n".join(lines) + "\n"


class Launcher:
    """What the `launch` fixture yields: `launch(config_text, shards=N[, acceptors=K])` -> a started
    Service (acceptors: None -> `default_acceptors()`)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.services: list[Service] = []

    def __call__(
        self, config: str | None = None, shards: int = 1, on_ready: Callable[[Service], None] | None = None,
        **kw: Any,
    ) -> Service:
        return self.prepare(config, shards, on_ready, **kw).start()

    def prepare(
        self, config: str | None = None, shards: int = 1, on_ready: Callable[[Service], None] | None = None,
        port: int = 0, binary_port: int = 0, acceptors: int | str | None = None, **kw: Any,
    ) -> Service:
        """A Service not yet started, checked and cleaned up after the test like the others."""
        text = config if config is not None else config_text(**kw)
        path = self.tmp_path / f"config-{len(self.services)}.toml"
        path.write_text(text)
        service = Service(path, shards, on_ready, port, binary_port, acceptors)
        self.services.append(service)
        return service

    def finish(self) -> list[str]:
        problems: list[str] = []
        for s in self.services:
            problems += [f"service {s.pid}: {p}" for p in s.finish()]
        return problems


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    """Start services with `launch(...)`; after the test: no process and no segment may be left."""
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        problems = launcher.finish()
    assert not problems, "left behind:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------- HTTP


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.headers}, {self.body[:400]!r})"


def _request_bytes(method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                   keep_alive: bool = True) -> bytes:
    if body is None:
        data = b""
    elif isinstance(body, bytes):
        data = body
    elif isinstance(body, str):
        data = body.encode()
    else:
        data = json.dumps(body).encode()
    head = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1"]
    if data or method == "POST":
        head.append(f"content-length: {len(data)}")
        head.append("content-type: application/json")
    if not keep_alive:
        head.append("connection: close")
    for k, v in (headers or {}).items():
        head.append(f"{k}: {v}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def http(port: int, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Response:
    """One blocking request on a fresh connection (http.client)."""
    conn = HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes | str) or body is None else json.dumps(body)
        hdrs = {"content-type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=hdrs)
        r = conn.getresponse()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


class HttpConn:
    """A keep-alive HTTP/1.1 connection over asyncio streams (responses parsed by content-length)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> HttpConn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def send(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> None:
        self.writer.write(_request_bytes(method, path, body, headers))

    async def response(self, timeout: float = 10.0, head: bool = False) -> Response:
        return await asyncio.wait_for(self._response(head), timeout)

    async def _response(self, head: bool = False) -> Response:
        """`head`: the answer to a HEAD, whose content-length is that of a body it does not carry."""
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("connection closed before a response")
        parts = status_line.decode("latin-1").split(" ", 2)
        status = int(parts[1])
        headers: dict[str, str] = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        n = 0 if head else int(headers.get("content-length", "0"))
        body = await self.reader.readexactly(n) if n else b""
        return Response(status, headers, body)

    async def request(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Response:
        self.send(method, path, body)
        return await self.response(timeout, head=method == "HEAD")

    async def closed_by_peer(self, timeout: float = 3.0) -> bool:
        """True when the server closes the connection (EOF or reset) within `timeout`; data is discarded."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    chunk = await self.reader.read(65536)
                    if not chunk:
                        return True
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        """Close with a reset (nothing more is sent)."""
        transport = self.writer.transport
        transport.abort()


async def ahttp(port: int, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Response:
    """One request on a fresh connection, asynchronously."""
    conn = await HttpConn.open(port)
    try:
        conn.send_raw(_request_bytes(method, path, body, keep_alive=False))
        return await conn.response(timeout)
    finally:
        conn.close()


def status_then_close(host: str, port: int, request: bytes, timeout: float | None = None) -> int:
    """One request on a new connection: its answer's status, read whole, then a close (a FIN, not a
    reset); 0 if the connection closed without one."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(request)
        got = b""
        while not got.endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return int(got.split(b" ", 2)[1]) if got else 0


async def admit_http(port: int, flow: str = "a", timeout: float = 10.0, **fields: Any) -> Response:
    return await ahttp(port, "POST", "/v1/admit", {"flow": flow, **fields}, timeout)


async def release_http(port: int, ticket: int) -> Response:
    return await ahttp(port, "POST", "/v1/release", {"ticket": ticket})


# ---------------------------------------------------------------------------------------------- metrics


_SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>(?:[^"}]|"(?:[^"\\]|\\.)*")*)\})?\s+(?P<value>\S+)$'
)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text exposition -> {(name, labels): value}."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"unparsable metrics line: {line!r}"
        labels = frozenset(_LABEL.findall(m["labels"] or ""))
        out[(m["name"], labels)] = float(m["value"])
    return out


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


# ---------------------------------------------------------------------------------------------- stats


def band_outcomes(stats: dict[str, Any]) -> dict[str, int]:
    """Outcome counts summed over bands."""
    total: dict[str, int] = {}
    for band in stats["bands"]:
        for k, v in band["outcomes"].items():
            total[k] = total.get(k, 0) + v
    return total


def shard_queued(stats: dict[str, Any]) -> list[int]:
    """Queued items per shard (all bands)."""
    return [sum(s["queued_items"]) for s in stats["shards"]]


def shard_queued_bytes(stats: dict[str, Any]) -> list[int]:
    return [sum(s["queued_bytes"]) for s in stats["shards"]]


# ---------------------------------------------------------------------------------------------- loops


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run one test coroutine on a fresh uvloop loop, with an overall timeout."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return uvloop.run(bounded())


async def until(cond: Callable[[], Any], timeout: float = 5.0, interval: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not reached within {timeout} s")
        await asyncio.sleep(interval)


async def gather_settled(aws: list[Awaitable[T]]) -> list[T | BaseException]:
    return await asyncio.gather(*aws, return_exceptions=True)
