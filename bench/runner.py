"""Processes of one benchmark run: the service (or an echo baseline) and the generator processes.

`Server.start_flowshard` runs `flowshard serve --shards N` on free ports and waits for its ready
line; `Server.start_echo` does the same for `bench.echo`; `Server.attach` wraps a `--target` we do
not own (nothing is started or stopped, and no CPU is read: its pids are unknown). `run_once` starts
the generators, gives them one common start time, reads every process's CPU at the window's start
and end (one reader, the same instants), fetches the service's `/v1/stats`, and collects results.

Everything we start gets `PR_SET_PDEATHSIG`, is ended by its pid (SIGTERM, then SIGKILL of its own
session after a timeout) and, for flowshard, its `/dev/shm/flowshard-<pid>-*` segment is checked.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import glob
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from bench.loadgen import GenResult, GenSpec
from bench.procstat import CpuSample, MachineSample, ProcId, children, cmdline, machine_sample, sample
from flowshard.codec import Error, FrameError, FrameReader, FrameWriter, Release, Released, ToClient
from flowshard.config import ConfigError, dump_config
from flowshard.scenario import Bursts, Scenario, closed_clients, offered_rate

__all__ = ["BenchError", "Options", "RunRecord", "Server", "run_once"]

# (an IPv6 host comes in brackets, `[::1]:8080`: the brackets are not the host's)
READY = re.compile(r"(?:flowshard|echo) ready: http=http://\[?(\S+?)\]?:(\d+) binary=\[?(\S+?)\]?:(\d+)"
                   r"(?: shards=(\d+))? pid=(\d+)")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
_PR_SET_PDEATHSIG = 1


class BenchError(Exception):
    """A run could not be made (a process did not start, died, or did not finish): said in one line,
    after the processes' own stderr."""


CHECK_TIMEOUT = 5.0  # the whole protocol check of a --target


def _recv(conn: socket.socket, deadline: float) -> bytes:
    """What `conn` gives next, within the check's whole `deadline` (TimeoutError past it)."""
    conn.settimeout(max(0.001, deadline - time.monotonic()))
    return conn.recv(65536)


def _ended(exc: OSError) -> str:
    return f"ended the connection ({exc.strerror or exc}) without an answer: is it flowshard?"


def _speaks_binary(conn: socket.socket, deadline: float) -> str:
    """"" if the service at `conn` answers flowshard's binary protocol, else what it did instead. Asks
    with a release of ticket 0, which no admission is ever given: answered `Released(0, false)`, and
    counted nowhere."""
    writer = FrameWriter()
    writer.add(Release(0))
    conn.sendall(writer.take())
    reader, got = FrameReader(ToClient), b""
    try:
        while not (replies := reader.feed(chunk := _recv(conn, deadline))):
            if not chunk:
                return "closed the connection: is it flowshard's binary port (8081 by default)?"
            got += chunk
    except FrameError:
        got += chunk
        return f"does not speak flowshard's binary protocol (it answered {got[:40]!r}): its HTTP port?"
    reply = replies[0]
    if type(reply) is Released:
        return ""
    if type(reply) is Error and reply.id < 0:  # flowshard, refusing the connection (503: at max_connections)
        return f"refused the connection: {reply.status} {reply.message}"
    return f"answered {reply!r} to a release of ticket 0, not Released: is it flowshard?"


_BINARY_PORT_SAYS = b"this is flowshard's binary port"  # (distributor.binary's answer to HTTP)


def _speaks_http(conn: socket.socket, deadline: float) -> str:
    """"" if the service at `conn` answers HTTP (`GET /healthz`), else what it did instead."""
    conn.sendall(b"GET /healthz HTTP/1.1\r\nhost: flowshard\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got and len(got) < 65536 and (chunk := _recv(conn, deadline)):
        got += chunk
    if _BINARY_PORT_SAYS in got:  # (flowshard's binary port answers an HTTP request so, in HTTP)
        return f"is flowshard's binary port (it says so): {_HTTP_PORT_HINT}"
    if got.startswith(b"HTTP/1."):
        return ""
    if not got:
        return f"closed the connection without an answer: is it flowshard's HTTP port? {_HTTP_PORT_HINT}"
    return f"does not answer HTTP (it answered {got[:40]!r}): its binary port? {_HTTP_PORT_HINT}"


# (review 154: it said 8080 by default, where with `--target` alone the HTTP port taken is PORT-1)
_HTTP_PORT_HINT = ("flowshard's HTTP port (8080 by default, beside binary 8081) is taken as the binary port "
                   "minus 1 unless --http-target names it")


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if the bench process dies (no orphans on Ctrl-C or a crash), and
    ignores SIGINT: a Ctrl-C is the bench's to handle (it stops its children), where each load generator
    printed a traceback (a review). A service started so keeps ignoring it (stopped with SIGTERM)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Server:
    """A service the generators drive: flowshard, an echo baseline, or an external target."""

    kind: str  # "flowshard" | "echo" | "target"
    http: tuple[str, int]
    binary: tuple[str, int]
    shards: int = 0
    proc: subprocess.Popen[bytes] | None = None
    pid: int = 0
    stderr_tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=50))
    config_path: str = ""

    # ------------------------------------------------------------ start / stop

    @classmethod
    def start_flowshard(cls, scenario: Scenario, shards: int, workdir: str, acceptors: str = "auto") -> Server:
        config_path = os.path.join(workdir, f"config-{shards}.toml")
        Path(config_path).write_text(dump_config(scenario.server))
        # -P (here and for the echo server and the generators): the installed modules, never a `bench`
        # or `workers` package in the directory `flowshard bench` was started from
        argv = [sys.executable, "-P", "-m", "flowshard.cli", "serve", "--shards", str(shards), "--config", config_path,
                "--port", "0", "--binary-port", "0", "--acceptors", acceptors]
        server = cls._start("flowshard", argv)
        server.config_path = config_path
        return server

    @classmethod
    def start_echo(cls) -> Server:
        return cls._start("echo", [sys.executable, "-P", "-m", "bench.echo"])

    @classmethod
    def attach(cls, target: str, http_target: str | None, transport: str) -> Server:
        """`--target HOST:PORT` is the binary port; the HTTP address defaults to HOST:PORT-1
        (flowshard's defaults are 8080/8081) unless `--http-target` names it. The address the
        run will use must accept a connection now: a clear error beats a generator that dies."""
        host, port = _hostport(target, "--target")
        http = _hostport(http_target, "--http-target") if http_target else (host, port - 1)
        if transport == "http":
            used, flag = http, ("--http-target" if http_target else "--target (HTTP at PORT-1)")
        else:
            used, flag = (host, port), "--target"
        deadline = time.monotonic() + CHECK_TIMEOUT
        try:
            conn = socket.create_connection(used, timeout=CHECK_TIMEOUT)
        except (ConnectionResetError, ConnectionAbortedError) as exc:
            # A listener took the connection and reset it before the connect call returned (the reset
            # can land first on a loaded machine): it did connect, so say what the target did.
            problem = _ended(exc)
        except OSError as exc:
            raise ConfigError(f"{flag}: cannot connect to {used[0]}:{used[1]}: {exc.strerror or exc}") from None
        else:
            with conn:
                try:
                    problem = _speaks_http(conn, deadline) if transport == "http" else _speaks_binary(conn, deadline)
                except TimeoutError:
                    problem = f"did not answer within {CHECK_TIMEOUT:g} s: is it flowshard?"
                except OSError as exc:  # (connected, then reset)
                    problem = _ended(exc)
        if problem:  # (a review: pointed at the other port, a run "succeeded" with nothing dispatched)
            raise ConfigError(f"{flag}: {used[0]}:{used[1]} {problem}")
        return cls("target", http=http, binary=(host, port))

    @classmethod
    def _start(cls, kind: str, argv: list[str]) -> Server:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=die_with_parent,
        )
        assert proc.stderr is not None
        tail: collections.deque[str] = collections.deque(maxlen=50)
        ready: list[re.Match[str]] = []
        got = threading.Event()

        def pump() -> None:  # keeps reading stderr for the whole run, so the pipe never fills
            assert proc.stderr is not None
            for raw in proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip()
                tail.append(line)
                m = READY.search(line)
                if m and not ready:
                    ready.append(m)
                    got.set()
            got.set()

        threading.Thread(target=pump, daemon=True).start()
        if not got.wait(START_TIMEOUT) or not ready:
            _terminate(proc)
            raise BenchError(f"{kind} did not become ready:\n" + "\n".join(tail))
        m = ready[0]
        return cls(kind, http=(m.group(1), int(m.group(2))), binary=(m.group(3), int(m.group(4))),
                   shards=int(m.group(5) or 0), proc=proc, pid=int(m.group(6)), stderr_tail=tail)

    def stop(self) -> list[str]:
        """SIGTERM (flowshard drains), wait, SIGKILL its session if needed; returns problems found."""
        problems: list[str] = []
        if self.proc is None:
            return problems
        tree = self.processes()
        code = _terminate(self.proc)
        if code is None:
            problems.append(f"{self.kind} pid {self.pid} did not stop within {STOP_TIMEOUT:g} s: killed")
        elif code not in (0, -signal.SIGTERM):
            problems.append(f"{self.kind} pid {self.pid} exited with {code}")
        deadline = time.monotonic() + 3.0
        while any(sample(p) is not None and _alive(p.pid) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        for p in tree:
            if sample(p) is not None and _alive(p.pid):
                problems.append(f"{p.role} pid {p.pid} outlived the service: killed")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        if self.kind == "flowshard":
            for seg in glob.glob(f"/dev/shm/flowshard-{self.pid}-*"):
                problems.append(f"shared-memory segment {seg} left behind: removed")
                with contextlib.suppress(OSError):
                    os.unlink(seg)
        self.proc = None
        return problems

    # ------------------------------------------------------------ introspection

    def processes(self) -> list[ProcId]:
        """The service's processes with their roles (distributor, worker<k>, tracker, echo)."""
        if self.proc is None:
            return []
        out: list[ProcId] = []
        main = ProcId.of(self.pid, "distributor" if self.kind == "flowshard" else "echo")
        if main is not None:
            out.append(main)
        for child in children(self.pid):
            cmd = cmdline(child)
            m = re.search(r"--shard (\d+)", cmd)
            a = re.search(r"distributor\.front --index (\d+)", cmd)
            if m:
                role = f"worker{m.group(1)}"
            elif a:
                role = f"acceptor{a.group(1)}"
            else:
                role = "tracker" if "resource_tracker" in cmd else "child"
            p = ProcId.of(child, role)
            if p is not None:
                out.append(p)
        return out

    def address(self, transport: str) -> tuple[str, int]:
        return self.binary if transport == "binary" else self.http

    async def stats(self) -> dict[str, Any] | None:
        """`GET /v1/stats` of a flowshard service (None for echo, or when it cannot be read)."""
        if self.kind == "echo":
            return None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*self.http), 5.0)
            writer.write(b"GET /v1/stats HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 10.0)
            writer.close()
        except (TimeoutError, OSError):
            return None
        _, _, body = data.partition(b"\r\n\r\n")
        try:
            parsed: dict[str, Any] = json.loads(body)
        except ValueError:
            return None
        return parsed


def _hostport(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{flag}: expected HOST:PORT with a port in 1..65535, got {text!r}")
    return host or "127.0.0.1", int(port)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _terminate(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM by pid; after STOP_TIMEOUT, SIGKILL the session we gave it. The exit code, or None if killed."""
    if proc.poll() is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session (start_new_session): only what it started
        proc.wait()
        return None


# ---------------------------------------------------------------------------------------- one run


class Options(msgspec.Struct, kw_only=True):
    """How to drive the service (the CLI's flags)."""

    transport: str = "binary"
    procs: int = 1
    conns: int = 0  # 0: `_binary_conns`, `_http_conns`
    max_conns: int = 0  # HTTP; 0: `http_max_conns`
    lead: float = 60e-6
    drain_timeout: float = 30.0
    log_limit: int = 2_000_000
    audit: bool = True  # ask every admission for the service's view (ordering figures need it)


@dataclass
class RunRecord:
    """Raw material of one run, turned into figures by `bench.report`."""

    server: Server
    window: float
    results: list[GenResult]
    cpu_start: dict[ProcId, CpuSample]
    cpu_end: dict[ProcId, CpuSample]
    machine_start: MachineSample
    machine_end: MachineSample
    stats: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)
    wall_start: float = 0.0


MAX_PENDING_PER_CONN = 50_000  # the service allows 65,536 admissions in flight per binary connection


def _binary_conns(scenario: Scenario, procs: int) -> int:
    """Enough connections that no one carries more admissions in flight than the service allows:
    with a deep queue, every open-loop request of the run and every closed-loop client may be
    pending at once."""
    most = (offered_rate(scenario) * scenario.workload.duration + closed_clients(scenario)) / procs
    return max(1, min(64, math.ceil(most / MAX_PENDING_PER_CONN)))


def _http_conns(scenario: Scenario, procs: int) -> int:
    """HTTP admission connections a generator process opens before the run: a queued admission holds
    one until its outcome, so its share of the closed-loop clients and of the open-loop bursts (2,000
    opened as a burst came took ~0.6 s, its requests sent that late), and a few more. It opens more
    as admissions find them all busy, up to `--max-conns`."""
    bursts = sum(f.count * f.arrival.size for f in scenario.workload.flows if isinstance(f.arrival, Bursts))
    return -(-(closed_clients(scenario) + bursts) // procs) + 16


def http_max_conns(scenario: Scenario, procs: int) -> int:
    """`--max-conns` 0 (auto): each generator process's share of what the service accepts (its
    `max_connections`, the scenario's or the default; one each kept for releases). An HTTP admission
    holds its connection until its outcome, so a burst of 2,000 queued requests needs 2,000 of them:
    a fixed 512 a process made `ttl-storm`'s storm wait in the generator and its verdict judge that
    (review 161). The pool opens them only as admissions wait, and the generator's descriptor limit
    bounds them too (`bench.loadgen`)."""
    return max(1, scenario.server.service.max_connections // procs - 1)


async def run_once(
    scenario: Scenario, server: Server, options: Options, progress: Callable[[float, int, int], None] | None = None
) -> RunRecord:
    """Drive `server` with `options.procs` generator processes for the scenario's duration."""
    payload = msgspec.json.encode(scenario)
    host, port = server.address(options.transport)
    procs: list[asyncio.subprocess.Process] = []
    with tempfile.TemporaryDirectory(prefix="flowshard-bench-") as tmp:
        specs = []
        max_conns = options.max_conns or http_max_conns(scenario, options.procs)
        for i in range(options.procs):
            if options.conns:
                conns = options.conns
            elif options.transport == "binary":
                conns = _binary_conns(scenario, options.procs)
            else:
                conns = _http_conns(scenario, options.procs)
            spec = GenSpec(
                index=i, procs=options.procs, scenario=payload, transport=options.transport, host=host, port=port,
                conns=conns, max_conns=max_conns, lead=options.lead, drain_timeout=options.drain_timeout,
                log_limit=options.log_limit, result_path=os.path.join(tmp, f"result-{i}.msgpack"),
                audit=options.audit,
            )
            path = os.path.join(tmp, f"spec-{i}.msgpack")
            Path(path).write_bytes(msgspec.msgpack.encode(spec))
            specs.append((spec, path))
        try:
            for _, path in specs:
                procs.append(await asyncio.create_subprocess_exec(
                    sys.executable, "-P", "-m", "bench.loadgen", path, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    preexec_fn=die_with_parent,
                ))
            return await _drive(scenario, server, options, procs, specs, progress)
        finally:
            for p in procs:
                if p.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
                    await p.wait()


async def _drive(
    scenario: Scenario, server: Server, options: Options, procs: list[asyncio.subprocess.Process],
    specs: list[tuple[GenSpec, str]], progress: Callable[[float, int, int], None] | None,
) -> RunRecord:
    workload = scenario.workload
    for p in procs:
        assert p.stdout is not None
        line = await asyncio.wait_for(p.stdout.readline(), START_TIMEOUT)
        if line.strip() != b"ready":
            raise BenchError(f"load generator {p.pid} did not start (its stderr is above)")
    me = ProcId.of(os.getpid(), "bench")
    tracked = [p for p in (*server.processes(), me) if p is not None]
    tracked += [q for i, p in enumerate(procs) if (q := ProcId.of(p.pid, f"loadgen{i}")) is not None]
    counts = [[0, 0] for _ in procs]

    async def follow(i: int, p: asyncio.subprocess.Process) -> None:
        assert p.stdout is not None
        async for raw in p.stdout:
            parts = raw.split()
            if parts and parts[0] == b"p" and len(parts) == 3:
                counts[i] = [int(parts[1]), int(parts[2])]

    t0 = time.monotonic() + 0.05
    wall_start = time.time() + 0.05
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(f"go {t0!r}\n".encode())
        await p.stdin.drain()
    followers = [asyncio.create_task(follow(i, p)) for i, p in enumerate(procs)]

    def tick() -> None:
        if progress is not None:
            progress(time.monotonic() - t0, sum(c[0] for c in counts), sum(c[1] for c in counts))

    async def until(when: float) -> None:
        while (left := when - time.monotonic()) > 0:
            await asyncio.sleep(min(0.25, left))
            tick()

    await until(t0 + workload.warmup)
    cpu_start = {p: s for p in tracked if (s := sample(p)) is not None}
    m_start = machine_sample()
    await until(t0 + workload.duration)
    cpu_end = {p: s for p in tracked if (s := sample(p)) is not None}
    m_end = machine_sample()
    stats = await server.stats()
    limit = options.drain_timeout + 30.0
    try:
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), limit)
    except TimeoutError:
        raise BenchError(f"load generators did not finish within {limit:g} s of the run's end") from None
    tick()
    for t in followers:
        await t
    problems = [f"load generator {i} exited with {p.returncode}" for i, p in enumerate(procs) if p.returncode]
    missing = [spec.index for spec, _ in specs if not Path(spec.result_path).is_file()]
    if missing:
        raise BenchError(f"load generator(s) {missing} left no result; {'; '.join(problems)} (stderr above)")
    results = [msgspec.msgpack.decode(Path(spec.result_path).read_bytes(), type=GenResult) for spec, _ in specs]
    return RunRecord(
        server=server, window=workload.duration - workload.warmup, results=results, cpu_start=cpu_start,
        cpu_end=cpu_end, machine_start=m_start, machine_end=m_end, stats=stats, problems=problems,
        wall_start=wall_start,
    )
