"""A client whose host dies (no FIN, no reset: a crash, a power cut, a cable pulled) must not keep its
lease. The connection is a binary client's lease, so before `dead_peer_timeout` such a client's
tickets held budget for as long as the service ran: nothing ever closed the connection.

The client runs in a network namespace of its own, joined to this one by a veth pair; taking its
end of the pair down makes its host vanish from the service's view exactly as a dead host does
(packets to it are dropped, nothing comes back). Needs root (namespaces, links); skipped without.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from proxykit import FakeOai, proxy_config
from servicekit import ROOT, Launcher, Service, config_text, launch, metric, wait_until

__all__ = ["launch"]  # (the fixture)

CLIENT = """
import asyncio, sys
from flowshard.client import Client

async def main():
    client = await Client.connect(sys.argv[1], int(sys.argv[2]))
    result = await client.admit("doomed")
    print(result.outcome.name, result.ticket, flush=True)
    await asyncio.sleep(120)  # holds its ticket; its host "dies" meanwhile

asyncio.run(main())
"""


class DeadHost:
    """A namespace with one address, 10.200.N.2, reachable from here at 10.200.N.1."""

    def __init__(self) -> None:
        n = os.getpid() % 250 + 1
        self.name = f"fsdp{os.getpid()}"
        self.here, self.there = f"10.200.{n}.1", f"10.200.{n}.2"
        self.client: subprocess.Popen[str] | None = None

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def create(self) -> None:
        self.ip("netns", "add", self.name)
        self.ip("link", "add", f"{self.name}h", "type", "veth", "peer", "name", f"{self.name}t")
        self.ip("link", "set", f"{self.name}t", "netns", self.name)
        self.ip("addr", "add", f"{self.here}/24", "dev", f"{self.name}h")
        self.ip("link", "set", f"{self.name}h", "up")
        self.ip("-n", self.name, "addr", "add", f"{self.there}/24", "dev", f"{self.name}t")
        self.ip("-n", self.name, "link", "set", f"{self.name}t", "up")

    def run_client(self, port: int) -> tuple[str, int]:
        """Start the client there; returns its admission's outcome and ticket."""
        self.client = subprocess.Popen(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", CLIENT, self.here, str(port)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.client.stdout is not None
        line = self.client.stdout.readline()
        assert line, f"the client failed: {self.client.stderr.read() if self.client.stderr else ''}"
        outcome, ticket = line.split()
        return outcome, int(ticket)

    def die(self) -> None:
        """The client's host is gone: its link is down, so nothing reaches it and nothing comes back."""
        self.ip("-n", self.name, "link", "set", f"{self.name}t", "down")

    def destroy(self) -> None:
        if self.client is not None:
            self.client.kill()  # (it lives on in its namespace otherwise, and keeps the pair alive)
            self.client.communicate()
        subprocess.run(["ip", "link", "del", f"{self.name}h"], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@pytest.fixture
def dead_host() -> Iterator[DeadHost]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (a network namespace for the client)")
    host = DeadHost()
    try:
        host.create()
    except subprocess.CalledProcessError as exc:
        host.destroy()
        pytest.skip(f"cannot make a network namespace here: {exc.stderr.strip()}")
    try:
        yield host
    finally:
        host.destroy()


def tickets(service: Service) -> int:
    return int(service.stats()["totals"]["tickets"])


@pytest.mark.parametrize("acceptors", [0, 2])
def test_a_binary_client_whose_host_dies_loses_its_tickets_within_dead_peer_timeout(
    launch: Launcher, dead_host: DeadHost, acceptors: int,
) -> None:
    service = launch(config_text(budget=1, service={"host": "0.0.0.0", "dead_peer_timeout": 2.0}),
                     acceptors=acceptors)
    outcome, ticket = dead_host.run_client(service.binary_port)
    assert outcome == "DISPATCHED" and ticket
    assert tickets(service) == 1  # it holds the whole budget
    dead_host.die()
    died = time.monotonic()
    wait_until(lambda: tickets(service) == 0, timeout=15.0, interval=0.1)
    # found within about the timeout (2 s: probes 1 s apart after 1 s of silence), not the kernel's hours
    assert time.monotonic() - died < 10.0
    assert service.stats()["totals"]["saturation"] == 0
    wait_until(lambda: metric(service.metrics(), "flowshard_protective_actions_total", front="binary",
                              action="dead_peer") == 1, timeout=5.0)  # (with acceptors: as they report)


def test_negative_control_without_dead_peer_timeout_the_dead_client_keeps_its_ticket(
    launch: Launcher, dead_host: DeadHost,
) -> None:
    """The same with the kernel's defaults: the ticket stays held (so the test above can fail)."""
    service = launch(config_text(budget=1, service={"host": "0.0.0.0", "dead_peer_timeout": 0}), acceptors=0)
    outcome, _ = dead_host.run_client(service.binary_port)
    assert outcome == "DISPATCHED"
    dead_host.die()
    time.sleep(6.0)
    assert tickets(service) == 1


def test_the_default_asks_the_kernel_to_find_a_dead_peer_within_a_minute() -> None:
    """What every listening socket gets by default (and passes on to the connections it accepts)."""
    import socket

    from flowshard.config import ServiceConfig
    from flowshard.keepalive import detect_dead_peers

    timeout = ServiceConfig().dead_peer_timeout
    assert timeout == 60.0
    with socket.create_server(("127.0.0.1", 0)) as listener:
        detect_dead_peers(listener, timeout)
        with socket.create_connection(listener.getsockname()) as _client:
            accepted, _ = listener.accept()
            with accepted:
                opts = [accepted.getsockopt(level, name) for level, name in (
                    (socket.SOL_SOCKET, socket.SO_KEEPALIVE), (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL), (socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                    (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))]
    # probes after 30 s of silence, 3 of them 10 s apart: gone by ~60 s; unacknowledged data: 60 s
    assert opts == [1, 30, 10, 3, 60_000]


def _stream_until_it_ends(service: Service, dead_host: DeadHost, within: float) -> tuple[bytes, float | None, int]:
    """A streamed chat completion through the proxy: read a few events, let the backend's host die,
    then read on for `within` seconds. Returns what came after the death, when the stream ended
    (seconds after the death; None: still open), and the service's tickets then, with the client
    still connected (counted after its close, the ticket of a stream still open was gone: flaky)."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000,
                       "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", service.http_port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n%b" % (len(body), body))
        got = b""
        while got.count(b"data: ") < 5:
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
        dead_host.die()
        died = time.monotonic()
        after = b""
        s.settimeout(0.2)
        while time.monotonic() - died < within:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except ConnectionError:
                return after, time.monotonic() - died, tickets(service)
            after += chunk
            if not chunk or after.endswith(b"\r\n0\r\n\r\n"):  # closed, or the chunked answer's end
                return after, time.monotonic() - died, tickets(service)
        return after, None, tickets(service)


@pytest.mark.parametrize("dead_peer_timeout", [2.0, 0.0], ids=["found-gone", "negative-control"])
def test_a_backend_whose_host_dies_mid_stream_is_found_gone_within_dead_peer_timeout(
    launch: Launcher, dead_host: DeadHost, dead_peer_timeout: float,
) -> None:
    """Proxy mode: a GPU node that crashes mid-generation says nothing more. Its connection was held
    until `read_timeout` (here 60 s; 10 minutes by default), the client's stream and its budget with
    it; now the kernel finds the host gone within about `dead_peer_timeout` and the stream ends with
    an error, its ticket released. The negative control (0: the kernel's defaults) is still waiting."""
    backend = FakeOai(prefix=("ip", "netns", "exec", dead_host.name), host=dead_host.there, ttft=0.01, itl=0.02)
    try:
        service = launch(proxy_config([backend.url], proxy={"read_timeout": 60.0, "retries": 0}, budget=1,
                                      service={"dead_peer_timeout": dead_peer_timeout}), acceptors=0)
        after, ended, held = _stream_until_it_ends(service, dead_host, within=8.0)
        if dead_peer_timeout:
            assert ended is not None and ended < 8.0, after[-300:]
            assert b"error" in after, after[-300:]
            wait_until(lambda: tickets(service) == 0, timeout=5.0, interval=0.1)
        else:
            assert ended is None, (ended, after[-300:])
            assert held == 1
    finally:
        backend.popen.kill()  # (its host is cut off: no point in a graceful stop)
        backend.popen.wait(5)


SILENT_SERVER = """
import socket, sys, time
server = socket.create_server((sys.argv[1], 0))
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()  # reads nothing, answers nothing: a service whose host is about to die
time.sleep(120)
"""


@pytest.mark.parametrize("dead_peer_timeout", [2.0, 0.0], ids=["found-gone", "negative-control"])
def test_the_client_finds_a_dead_service_host_within_dead_peer_timeout(
    dead_host: DeadHost, dead_peer_timeout: float,
) -> None:
    """`flowshard.client`: the service's host dies with an admission waiting on it. The admission
    fails with ConnectionClosed within about `dead_peer_timeout`; with 0 (the kernel's defaults) it
    waits on (it waited for ever)."""
    import asyncio

    from flowshard.client import Client, ConnectionClosed

    server = subprocess.Popen(["ip", "netns", "exec", dead_host.name, sys.executable, "-c", SILENT_SERVER,
                               dead_host.there], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())

        async def admit_then_lose_the_host() -> float | None:
            client = await Client.connect(dead_host.there, port, dead_peer_timeout=dead_peer_timeout)
            waiting = client.admit("a")
            await asyncio.sleep(0.3)  # (sent, and acknowledged by the host's kernel)
            dead_host.die()
            died = time.monotonic()
            try:
                await asyncio.wait_for(waiting, 8.0)
            except ConnectionClosed:
                return time.monotonic() - died
            except TimeoutError:
                return None
            finally:
                await client.close()
            raise AssertionError("the silent service answered")

        failed_after = asyncio.run(admit_then_lose_the_host())
        if dead_peer_timeout:
            assert failed_after is not None and failed_after < 8.0
        else:
            assert failed_after is None
    finally:
        server.kill()
        server.wait(5)


def test_where_an_option_is_missing_the_others_are_still_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review 88: the Python client may run where `socket.TCP_USER_TIMEOUT` is not (macOS): connecting
    failed with AttributeError, the socket left open. The options that exist are set; that one is not."""
    from flowshard.keepalive import detect_dead_peers

    monkeypatch.delattr(socket, "TCP_USER_TIMEOUT")
    with socket.socket() as sock:
        detect_dead_peers(sock, 60.0)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
        assert sock.getsockopt(socket.IPPROTO_TCP, 18) == 0  # (TCP_USER_TIMEOUT, by its number: untouched)
