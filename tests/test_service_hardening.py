"""Issue 8 against the real service (`flowshard serve` subprocess, real sockets): a worker that dies
while the distributor is out of descriptors is restarted (defect 2), fire-and-forget HTTP clients do
not keep tickets (defect 3), and the protective actions show in /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import struct
import time
from typing import Any

from servicekit import admit_http, ahttp, launch, metric, parse_metrics, run

from flowshard.codec import Admit, Error, FrameReader, FrameWriter, ToClient

__all__ = ["launch"]


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_worker_that_dies_while_clients_hold_every_descriptor_is_restarted(launch: Any) -> None:
    svc = launch(shards=2)
    headroom = 40
    resource.prlimit(svc.pid, resource.RLIMIT_NOFILE, (_fds(svc.pid) + headroom, _fds(svc.pid) + headroom))
    held: list[socket.socket] = []
    try:
        # Idle binary connections until the distributor has no descriptor left to accept with.
        for _ in range(headroom * 2):
            s = socket.create_connection((svc.host, svc.binary_port))
            held.append(s)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # settle: every accept the distributor could make is made
            before = _fds(svc.pid)
            time.sleep(0.2)
            if _fds(svc.pid) == before:
                break
        worker0 = next(p for p in svc.worker_procs() if p.role == "worker0")
        os.kill(worker0.pid, signal.SIGKILL)
        # Restarted while the clients still hold every descriptor: the reserve is for this.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if any(p.role == "worker0" and p.pid != worker0.pid and p.alive() for p in svc.worker_procs()):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("worker 0 was not restarted while descriptors were exhausted")
    finally:
        for s in held:
            s.close()

    async def main() -> None:
        deadline = time.monotonic() + 5
        while True:  # the descriptors are freed as the distributor sees the closes
            with contextlib.suppress(ConnectionError):
                if (await ahttp(svc.http_port, "GET", "/readyz")).status == 200:
                    break
            assert time.monotonic() < deadline, "/readyz never came back"
            await asyncio.sleep(0.05)
        samples = parse_metrics((await ahttp(svc.http_port, "GET", "/metrics")).body.decode())
        assert metric(samples, "flowshard_worker_restarts_total", shard="0") == 1
        assert metric(samples, "flowshard_worker_spawn_failures_total", shard="0") == 0

    run(main())


def _fire_and_forget(port: int, how: str) -> None:
    body = b'{"flow":"ff"}'
    request = b"POST /v1/admit HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(request)
    if how == "reset":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    elif how == "half-close":
        s.shutdown(socket.SHUT_WR)
        time.sleep(0.01)
    s.close()


def test_fire_and_forget_http_clients_do_not_keep_tickets(launch: Any) -> None:
    svc = launch(shards=1, budget=100)
    for how in ("close", "reset", "half-close"):
        for _ in range(10):
            _fire_and_forget(svc.http_port, how)

    async def main() -> None:
        deadline = time.monotonic() + 3
        while True:
            stats = (await ahttp(svc.http_port, "GET", "/v1/stats")).json()
            if stats["totals"]["inflight"] == 0:
                break
            assert time.monotonic() < deadline, f"{stats['totals']['inflight']} tickets still held"
            await asyncio.sleep(0.05)
        samples = parse_metrics((await ahttp(svc.http_port, "GET", "/metrics")).body.decode())
        assert metric(samples, "flowshard_protective_actions_total", front="http", action="undeliverable") == 30
        # A client that reads its answer keeps its ticket for the lease.
        r = await admit_http(svc.http_port, "reader")
        assert r.status == 200
        await asyncio.sleep(0.5)
        assert (await ahttp(svc.http_port, "GET", "/v1/stats")).json()["totals"]["inflight"] == 1

    run(main())


def test_binary_frame_timeout_and_malformed_frames_show_in_metrics(launch: Any) -> None:
    svc = launch(shards=1, service={"header_timeout": 0.3})

    async def main() -> None:
        r, w = await asyncio.open_connection(svc.host, svc.binary_port)
        w.write(struct.pack(">I", 1000) + b"\x93")  # a frame that never completes
        t0 = time.monotonic()
        [err] = FrameReader(ToClient).feed(await asyncio.wait_for(r.read(), 3))  # then EOF
        assert type(err) is Error and (err.id, err.status) == (-1, 408), err
        assert time.monotonic() - t0 < 2
        w.close()
        r, w = await asyncio.open_connection(svc.host, svc.binary_port)
        fw = FrameWriter()
        fw.add([Admit.__struct_config__.tag, -1, "a", 0, 0, 0.0, 0.0, 0, 0.0])
        w.write(fw.take())
        await asyncio.wait_for(r.read(), 3)
        w.close()
        samples = parse_metrics((await ahttp(svc.http_port, "GET", "/metrics")).body.decode())
        assert metric(samples, "flowshard_protective_actions_total", front="binary", action="frame_timeout") == 1
        assert metric(samples, "flowshard_protective_actions_total", front="binary", action="malformed") == 1
        with contextlib.suppress(Exception):
            w.close()

    run(main())
