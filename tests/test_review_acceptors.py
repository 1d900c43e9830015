"""Review of acceptor mode (`serve --acceptors K`): regression tests for the connection limits that
README "Resource limits" promised held service-wide "to within K - 1 connections" (since then the
distributor counts every front's connections and decides each one's verdict: they are exact, and
these tests check that), and for two statements about acceptors that were not true.

3. An HTTP admission dispatched while its acceptor is hung (SIGSTOP) is never answered: the acceptor
   is killed after 5 s silent and the client's connection is closed, but the ticket of that
   undelivered answer stays in flight until its lease ends (300 s by default), holding the budget.
   With --acceptors 0 an answer that cannot be delivered releases its ticket at once (README: "if
   it was being dispatched at that moment, its budget is released at once").

The first three fail on 50867a3 (and pass with --acceptors 0); the last two are documentation checks
that also fail on 50867a3 (README denies the acceptor heartbeat that 866d44a added; `serve --help`
describes `--acceptors auto` differently from `auto_acceptors`).

1. The admin reserve (16 connections beyond `max_connections`) shrinks to ceil(16 / K) service-wide:
   an acceptor reports `http.open + binary.connections` as its load (distributor/front.py, the
   `Handover(..., lambda: http.open + binary.connections)` line), which leaves out its admin-reserve
   connections (`HttpHub.reserve`), so with equal `open` counts every reserve connection goes to the
   same acceptor (the lowest index: `sorted(..., key=load)` in `Acceptors._hand`) until its share
   ceil(16 / K) is full; the other acceptors' shares are never used. Measured: 8 of 16 with K = 2
   (16 with --acceptors 0).
2. The distributor balances by one combined count (HTTP + binary connections) but each acceptor's
   limit is per port (ceil(max_connections / K) HTTP and as many binary). With max_connections = 4 and
   K = 2, clients that open HTTP, binary, HTTP, binary leave acceptor 0 with 2 HTTP (its HTTP share
   full) and acceptor 1 with 2 binary; the loads tie, so every further HTTP connection is handed to
   acceptor 0 and refused (503 too many connections) while acceptor 1 has 2 free HTTP slots: 2
   HTTP connections served of 4, not within K - 1 = 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

from servicekit import HttpConn, band_outcomes, launch, run
from test_service_acceptors import acceptor_pids, http_conns_on

from flowshard.client import Client

__all__ = ["launch"]


async def _admit_on(conn: HttpConn) -> int:
    r = await conn.request("POST", "/v1/admit", {"flow": "c"}, timeout=5)
    if r.status == 200:
        assert (await conn.request("POST", "/v1/release", {"ticket": r.json()["ticket"]}, timeout=5)).status == 200
    return r.status


async def _settled(conn: HttpConn, expected: int, at_most: float) -> None:
    """Wait until the distributor counts `expected` connections (HTTP and binary, the admin reserve's
    included: the acceptors' "connections" in /v1/stats, polled on `conn`), for at most `at_most`
    seconds: the fixed wait this replaces (the acceptors reported their counts every 0.25 s). The
    distributor now counts a connection when it hands it over, so this returns at once; a code where
    the counts lag waits as long as before. (The wait for the start's /healthz connection stays a
    fixed one: it comes before any connection of the test, and which acceptor gets the first one
    depends on it.)"""
    deadline = time.monotonic() + at_most
    while time.monotonic() < deadline:
        r = await conn.request("GET", "/v1/stats", timeout=5)
        assert r.status == 200, r
        if sum(a["connections"] for a in r.json()["acceptors"]) == expected:
            return
        await asyncio.sleep(0.01)


def test_admin_reserve_is_the_whole_reserve_with_acceptors(launch: Any) -> None:
    """README: the admin reserve is 16 connections beyond max_connections, service-wide, whatever K."""
    svc = launch(shards=1, acceptors=2, budget=None, service={"max_connections": 2})

    async def body() -> None:
        work: list[HttpConn] = []
        await asyncio.sleep(0.6)  # the start's /healthz connection is closed and reported by then
        for _ in range(2):
            conn = await HttpConn.open(svc.http_port)
            assert await _admit_on(conn) == 200
            work.append(conn)
            await _settled(work[0], len(work), 0.3)  # (the acceptors used to report their counts every 0.25 s)
        admin: list[HttpConn] = []
        for _ in range(20):
            conn = await HttpConn.open(svc.http_port)
            try:
                status = (await conn.request("GET", "/healthz", timeout=3)).status
            except (ConnectionError, TimeoutError):
                status = 0
            if status == 200:
                admin.append(conn)
            else:
                conn.close()
            await _settled(work[0], len(work) + len(admin), 0.3)
        for conn in work + admin:
            conn.close()
        assert len(admin) == 16, f"admin-reserve connections served: {len(admin)} (README: 16)"

    run(body(), timeout=60)


def test_http_connections_are_not_refused_while_another_acceptor_has_room(launch: Any) -> None:
    """README: max_connections holds per front, service-wide, whatever the mix of HTTP and binary
    clients over the acceptors: 4 HTTP connections admit, the rest do not."""
    svc = launch(shards=1, acceptors=2, budget=None, service={"max_connections": 4})

    async def body() -> None:
        http: list[HttpConn] = []
        binary: list[Client] = []
        refused = 0
        await asyncio.sleep(0.6)  # the start's /healthz connection is closed and reported by then
        for kind in "hbhbhhhh":
            if kind == "b":
                client = await Client.connect("127.0.0.1", svc.binary_port)
                r = await asyncio.wait_for(client.admit("b"), 5)
                assert await client.release(r.ticket)
                binary.append(client)
            else:
                conn = await HttpConn.open(svc.http_port)
                if await _admit_on(conn) == 200:
                    http.append(conn)
                else:
                    refused += 1
                    conn.close()
            await _settled(http[0], len(http) + len(binary), 0.3)  # (the acceptors' reports, every 0.25 s)
        for conn in http:
            conn.close()
        for client in binary:
            await client.close()
        assert (len(http), refused) == (4, 2), (
            f"HTTP connections served: {len(http)} of max_connections = 4 ({refused} refused with 503) "
            "with 2 binary connections open"
        )

    run(body(), timeout=60)


def test_readme_does_not_deny_the_acceptor_heartbeat() -> None:
    """866d44a added the acceptor heartbeat (silent 1 s: no new connections; 5 s: killed and
    restarted; verified with SIGSTOP), but README "Resource limits" still says a hung acceptor "keeps
    receiving its share of new ones: there is no acceptor heartbeat yet"."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for doc in (root / "README.md", root / "docs" / "service.md"):
        assert "no acceptor heartbeat" not in " ".join(doc.read_text().split()), doc


def test_serve_help_describes_auto_acceptors_as_the_code_computes_it() -> None:
    """`serve --help` says auto is "0 with one shard", but `auto_acceptors(1, cpus)` is 2 on a machine
    with 4+ cores (README: "2 with 1-4 shards ... on 16 cores")."""
    import subprocess
    import sys

    from distributor.acceptors import auto_acceptors

    assert auto_acceptors(1, 16) == 2
    out = subprocess.run(
        [sys.executable, "-m", "flowshard.cli", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "0 with one shard" not in " ".join(out.split())


def test_undelivered_http_ticket_of_a_hung_acceptor_does_not_hold_the_budget_for_the_lease(launch: Any) -> None:
    """Budget 1, held; an HTTP admission waits on acceptor 0's connection; acceptor 0 hangs (SIGSTOP);
    the held ticket is released through acceptor 1, so the waiter is dispatched, but its answer cannot
    reach the client. After the restart (5 s silent) the client's connection is gone and nobody holds
    that ticket: the budget must come back (not after `lease` = 300 s)."""
    import os
    import signal

    svc = launch(shards=1, acceptors=2, budget=1)

    async def body() -> None:
        pids = acceptor_pids(svc, 2)
        conns, where = await http_conns_on(svc, 4)
        hung = next(c for c, w in zip(conns, where, strict=True) if w == 0)
        other = next(c for c, w in zip(conns, where, strict=True) if w == 1)
        held = await other.request("POST", "/v1/admit", {"flow": "hold"}, timeout=5)
        assert held.status == 200
        hung.send("POST", "/v1/admit", {"flow": "w", "ttl": 60})
        deadline = time.monotonic() + 5
        while (await other.request("GET", "/v1/stats")).json()["totals"]["queued_items"] != 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        os.kill(pids[0], signal.SIGSTOP)
        try:
            assert (await other.request("POST", "/v1/release", {"ticket": held.json()["ticket"]})).status == 200
            deadline = time.monotonic() + 15
            while True:  # restarted: a new pid for acceptor 0
                stats = (await other.request("GET", "/v1/stats")).json()
                if stats["acceptors"][0]["up"] and stats["acceptors"][0]["pid"] not in (0, pids[0]):
                    break
                assert time.monotonic() < deadline, stats["acceptors"]
                await asyncio.sleep(0.1)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[0], signal.SIGCONT)
        got = b""
        with contextlib.suppress(ConnectionError):  # the client never gets its answer: EOF or reset
            async with asyncio.timeout(3.0):
                while chunk := await hung.reader.read(65536):
                    got += chunk
        assert got == b"", got
        deadline = time.monotonic() + 1.0  # as long as the fixed wait here was; the lease is 300 s
        while True:
            stats = (await other.request("GET", "/v1/stats")).json()
            if stats["totals"]["inflight"] == 0 or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        for c in conns:
            c.close()
        assert band_outcomes(stats)["dispatched"] == 2, band_outcomes(stats)  # "w" was dispatched (not a lull before)
        assert stats["totals"]["inflight"] == 0, (
            f"inflight {stats['totals']['inflight']}, tickets {stats['totals']['tickets']}: the undelivered "
            "answer's ticket holds the budget until its lease ends"
        )

    run(body(), timeout=60)


def test_a_release_of_a_ticket_beyond_64_bits_is_answered_with_acceptors(launch: Any) -> None:
    """Review 2026-12-05 (D1): with acceptors, `POST /v1/release {"ticket": 2**64}` was never answered
    (its LinkRelease could not be encoded: logged and dropped), and the connection, pending forever,
    kept its place in max_connections. Now 404 as without acceptors, and the connection serves on."""
    svc = launch(shards=1, acceptors=1, budget=None)

    async def body() -> None:
        conn = await HttpConn.open(svc.http_port)
        for ticket in (1 << 64, -(1 << 63) - 1):
            r = await conn.request("POST", "/v1/release", {"ticket": ticket}, timeout=5)
            assert r.status == 404 and "unknown or already released" in r.json()["error"]["message"], r
        assert await _admit_on(conn) == 200  # the same connection still serves
        conn.close()

    run(body(), timeout=30)


def test_a_half_closed_http_connection_gets_the_answers_of_its_requests_with_acceptors(launch: Any) -> None:
    """Review 2026-12-05 (F1): with acceptors, a client that sent its request and then half-closed
    (shutdown(SHUT_WR)) got no answer from the distributor (a release, /v1/stats): only the acceptor's
    own (/healthz). Without acceptors it got them all. Now both."""
    svc = launch(shards=1, acceptors=1, budget=None)

    async def body() -> None:
        conn = await HttpConn.open(svc.http_port)
        r = await conn.request("POST", "/v1/admit", {"flow": "c"}, timeout=5)
        ticket = r.json()["ticket"]
        conn.send("POST", "/v1/release", {"ticket": ticket})
        conn.send("GET", "/v1/stats")
        conn.send("GET", "/healthz")
        conn.writer.write_eof()
        answers = [await conn.response(timeout=5) for _ in range(3)]
        assert [a.status for a in answers] == [200, 200, 200], answers
        assert answers[0].json() == {"released": True} and "bands" in answers[1].json()
        assert await conn.reader.read() == b""  # then closed
        conn.close()
        for request in (("POST", "/v1/release", {"ticket": 5}), ("GET", "/metrics", None)):
            c = await HttpConn.open(svc.http_port)
            c.send(*request)
            c.writer.write_eof()
            assert (await c.response(timeout=5)).status in (404, 200)
            c.close()

    run(body(), timeout=30)


def test_auto_acceptors_is_two_whatever_the_shards_but_half_the_shards_in_proxy_mode() -> None:
    """4 acceptors at 8 shards measured no better than 2 for binary and the matrix and worse for HTTP
    (docs/benchmarks.md): `auto` starts 2 at every shard count, within the cores left; proxy mode,
    whose acceptors relay every chunk, keeps half the shard count (at least 2)."""
    from distributor.acceptors import auto_acceptors
    from flowshard.cli import _acceptors

    assert [auto_acceptors(n, 16) for n in (1, 2, 4, 8)] == [2, 2, 2, 2]
    assert [auto_acceptors(n, 16, proxy=True) for n in (1, 2, 4, 8)] == [2, 2, 2, 4]
    assert auto_acceptors(1, 2) == 0 and auto_acceptors(2, 4) == 1 and auto_acceptors(8, 32, proxy=True) == 4
    assert auto_acceptors(12, 16) == 2 and auto_acceptors(14, 16) == 1 and auto_acceptors(15, 16) == 0
    assert _acceptors("auto", 8, proxy=True) == auto_acceptors(8, os.cpu_count() or 1, proxy=True)
