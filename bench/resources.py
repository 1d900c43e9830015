"""What one connection, queued request, flow, ticket and worker cost a running service: the figures
of the resource table in docs/service.md, measured, not estimated.

Each probe starts `flowshard serve` (built-in defaults unless it needs a different budget), makes N
connections or requests of one kind, and reads the processes' resident memory (VmRSS) and open
descriptors (/proc/PID/fd) before and after: the difference divided by N. RSS moves in pages and
the allocator keeps freed memory, so read the figures to ~10 %.

    python -m bench.resources [PROBE ...]      # probes: connections reserve partial nonreaders queued tickets workers
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flowshard.client import Client
from flowshard.codec import FrameWriter, Release

__all__ = ["PROBES", "Service", "main"]

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"http=http://\S+:(\d+) binary=\S+:(\d+) shards=\d+ pid=(\d+)")


class Service:
    """`flowshard serve` on free ports with a config text; stopped with SIGTERM."""

    def __init__(self, config: str = "", shards: int = 1) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(config)
        self.config = f.name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flowshard.cli", "serve", "--shards", str(shards), "--config", self.config,
             "--port", "0", "--binary-port", "0"],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.proc.stderr is not None
        lines = []
        while True:
            line = self.proc.stderr.readline().decode()
            lines.append(line)
            if not line:
                raise RuntimeError("the service did not start:\n" + "".join(lines))
            m = READY.search(line)
            if m:
                self.http, self.binary, self.pid = int(m[1]), int(m[2]), int(m[3])
                break
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()

    def workers(self) -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                    if ppid == self.pid and b"workers" in Path(f"/proc/{entry}/cmdline").read_bytes():
                        pids.append(int(entry))
        return sorted(pids)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.unlink(self.config)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def rss_kib(pid: int, settle: float = 0.5) -> float:
    """Resident memory of `pid` in KiB, after `settle` seconds for the service to catch up."""
    time.sleep(settle)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1])
    return 0.0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1]


def _queued(svc: Service) -> int:
    import json

    return int(json.loads(_get(svc.http, "/v1/stats"))["totals"]["queued_items"])


def _each(n: int, before: float, after: float) -> str:
    per = (after - before) / n
    return f"{per:.1f} KiB" if per >= 1 else f"{per * 1024:.0f} B"


Report = Callable[[str, str], None]


def connections(report: Report, n: int = 2000) -> None:
    """Idle connections: accepted, nothing sent yet."""
    with Service() as svc:
        for name, port in (("HTTP", svc.http), ("binary", svc.binary)):
            r0, f0 = rss_kib(svc.pid), fds(svc.pid)
            conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
            r1, f1 = rss_kib(svc.pid), fds(svc.pid)
            report(f"idle {name} connection", f"{_each(n, r0, r1)}, {(f1 - f0) / n:.2f} descriptor")
            for c in conns:
                c.close()
            time.sleep(0.5)


def reserve(report: Report, max_connections: int = 200) -> None:
    """The admin reserve: with max_connections held, what one more connection costs while /healthz is
    answered on it (ADMIN_RESERVE of them; the next one gets 503 at once, as an over-limit one did)."""
    from distributor.http import ADMIN_RESERVE

    with Service(f"[service]\nmax_connections = {max_connections}\n") as svc:
        flood = [socket.create_connection(("127.0.0.1", svc.http)) for _ in range(max_connections)]
        r0, f0 = rss_kib(svc.pid), fds(svc.pid)
        admin = []
        for _ in range(ADMIN_RESERVE):
            c = socket.create_connection(("127.0.0.1", svc.http), timeout=10)
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            if not c.recv(4096).startswith(b"HTTP/1.1 200"):
                raise RuntimeError("/healthz was not answered on a connection of the admin reserve")
            admin.append(c)
        r1, f1 = rss_kib(svc.pid), fds(svc.pid)
        with socket.create_connection(("127.0.0.1", svc.http), timeout=10) as c:
            refused = c.recv(4096).startswith(b"HTTP/1.1 503")
        report(f"HTTP connection of the admin reserve ({ADMIN_RESERVE}, /healthz answered; the next: "
               f"{'503' if refused else 'NOT refused'})",
               f"{_each(ADMIN_RESERVE, r0, r1)}, {(f1 - f0) / ADMIN_RESERVE:.2f} descriptor")
        for c in flood + admin:
            c.close()


def partial(report: Report, n: int = 500) -> None:
    """Connections holding the most a request may be before it is complete (until header_timeout)."""
    cases = [
        ("HTTP connection with a 16 KB head not yet complete", "http",
         b"POST /v1/admit HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * 16000),
        ("HTTP connection with a 64 KiB body not yet complete", "http",
         b"POST /v1/admit HTTP/1.1\r\nHost: t\r\nContent-Length: 65536\r\n\r\n" + b"a" * 65000),
        ("binary connection with a 64 KiB frame not yet complete", "binary",
         struct.pack(">I", 65536) + b"\0" * 65500),
    ]
    with Service() as svc:
        for label, front, data in cases:
            r0 = rss_kib(svc.pid)
            conns = []
            for _ in range(n):
                c = socket.create_connection(("127.0.0.1", svc.http if front == "http" else svc.binary))
                c.sendall(data)
                conns.append(c)
            report(label, _each(n, r0, rss_kib(svc.pid)))
            for c in conns:
                c.close()
            time.sleep(0.5)


def nonreaders(report: Report, n: int = 100, seconds: float = 8.0) -> None:
    """Clients that send as fast as they can and never read a reply: the peak while they are served
    (the binary front drops them after write_timeout; the HTTP front stops reading them)."""
    w = FrameWriter()
    for _ in range(20000):
        w.add(Release(1))
    cases = [("binary", w.take()), ("HTTP", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 5000)]
    with Service() as svc:
        for front, data in cases:
            r0 = rss_kib(svc.pid)
            conns = []
            for _ in range(n):
                c = socket.socket()
                c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                c.connect(("127.0.0.1", svc.binary if front == "binary" else svc.http))
                c.setblocking(False)
                conns.append(c)
            peak = r0
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                for c in conns:
                    with contextlib.suppress(OSError):
                        c.send(data)
                peak = max(peak, rss_kib(svc.pid, 0.02))
            report(f"{front} connection that does not read (peak, {n} of them)", _each(n, r0, peak))
            for c in conns:
                c.close()
            time.sleep(1)


def queued(report: Report, n: int = 50_000) -> None:
    """Queued requests (budget 1, held): in one flow, and each in its own flow."""
    config = "max_queued_requests = 1000000\n[budget]\nmax_inflight_requests = 1\n"
    with Service(config) as svc:

        async def main() -> None:
            worker = svc.workers()[0]
            hold = await Client.connect("127.0.0.1", svc.binary)
            await hold.admit("hold")
            for flows, label in ((1, "one flow"), (n, "a flow each")):
                d0, w0 = rss_kib(svc.pid), rss_kib(worker)
                c = await Client.connect("127.0.0.1", svc.binary)
                futs = [c.admit(f"{label}-{i % flows}", size=100) for i in range(n)]
                while _queued(svc) < n:
                    await asyncio.sleep(0.2)
                d1, w1 = rss_kib(svc.pid), rss_kib(worker)
                report(f"queued request ({label})", f"distributor {_each(n, d0, d1)}, worker {_each(n, w0, w1)}")
                await c.close()
                for f in futs:
                    if f.done():
                        f.exception()
                    else:
                        f.cancel()
                while _queued(svc):
                    await asyncio.sleep(0.2)
            await hold.close()

        asyncio.run(main())


def tickets(report: Report, n: int = 50_000) -> None:
    """Dispatched requests holding their tickets (binary connection, unlimited budget)."""
    with Service('[budget]\nmax_inflight_requests = "unlimited"\n') as svc:

        async def main() -> None:
            d0 = rss_kib(svc.pid)
            c = await Client.connect("127.0.0.1", svc.binary)
            results = await asyncio.gather(*(c.admit("t", size=100) for _ in range(n)))
            assert all(r.dispatched for r in results)
            report("ticket (dispatched, not yet released)", f"distributor {_each(n, d0, rss_kib(svc.pid))}")
            await c.close()

        asyncio.run(main())


def workers(report: Report) -> None:
    """Descriptors and memory one more shard costs."""
    seen: list[tuple[int, list[int], list[float]]] = []
    for shards in (1, 4):
        with Service(shards=shards) as svc:
            time.sleep(0.5)
            ws = svc.workers()
            seen.append((fds(svc.pid), [fds(w) for w in ws], [rss_kib(w) for w in ws]))
    (f1, wf, wr), (f4, _, _) = seen
    report("worker", f"distributor +{(f4 - f1) / 3:.0f} descriptor; the worker {wf[0]} descriptors, "
           f"{wr[0] / 1024:.0f} MiB RSS idle; distributor with 1 shard: {f1} descriptors (16: the spawn reserve)")


PROBES: dict[str, Callable[..., None]] = {
    f.__name__: f for f in (connections, reserve, partial, nonreaders, queued, tickets, workers)
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.resources", description=__doc__.split("\n\n")[0])
    parser.add_argument("probes", nargs="*", metavar="PROBE", help=f"any of {', '.join(PROBES)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [p for p in args.probes if p not in PROBES]
    if unknown:
        parser.error(f"unknown probe {unknown[0]!r}; choose from {', '.join(PROBES)}")

    def report(what: str, figure: str) -> None:
        print(f"| {what} | {figure} |", flush=True)

    print("| what | measured |\n|---|---|")
    for name in args.probes or PROBES:
        PROBES[name](report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

