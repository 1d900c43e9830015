"""Proxy mode served by acceptor processes (`serve --backend URL --acceptors K`): each acceptor relays
its own clients' requests through its own `Proxy`, admitting through the distributor's one ledger.

Real processes and sockets: the official `openai` client -> `flowshard serve --acceptors 2` -> the
fake OpenAI backend (`bench.fakeoai`). (The rest of the proxy suite runs with acceptors too:
FLOWSHARD_TEST_ACCEPTORS=2, and its key tests are parametrized over 0 and 2.)
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from typing import Any

import openai
import pytest
from proxykit import fake_backend, proxy_config
from servicekit import band_outcomes, launch, metric

__all__ = ["fake_backend", "launch"]

MSG = [{"role": "user", "content": "hello there, how are you"}]
ROUTE = "/v1/chat/completions"


def client(service: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.url("/v1"), api_key="sk-test", max_retries=0, timeout=10)


def until(cond: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    return value


def settled(svc: Any) -> dict[str, Any]:
    def quiet() -> dict[str, Any] | None:
        s = svc.stats()
        t = s["totals"]
        return s if (t["inflight"], t["pending"], t["tickets"], s["proxy"]["active"]) == (0, 0, 0, 0) else None

    return until(quiet)  # type: ignore[no-any-return]


def outcomes(s: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in band_outcomes(s).items() if v}


def acceptors_up(svc: Any, restarts: int) -> bool:
    try:
        s = svc.stats()
    except OSError:  # handed to the acceptor being killed, before the distributor knew
        return False
    return all(a["up"] for a in s["acceptors"]) and s["counters"]["acceptor_restarts"] == restarts


def test_an_acceptor_killed_mid_stream_has_its_proxied_tickets_released(launch: Any, fake_backend: Any) -> None:
    """SIGKILL an acceptor while it relays two streams (another relays two more): the distributor
    releases the dead one's tickets at once (in flight 4 -> 2), the backend sees those requests
    closed, every request keeps exactly one outcome (dispatched), nothing stays counted unsent,
    the acceptor is started again and serves proxied requests."""
    fake = fake_backend(ttft=0.01, itl=0.05)
    proxy = {"utilization": True, "scrape_interval": 0.05, "queue_threshold": 50}
    svc = launch(proxy_config([fake.url], budget=4, proxy=proxy), acceptors=2)
    streams = []
    for _ in range(4):  # one client (one connection) each: the distributor hands them 2 and 2
        stream = client(svc).chat.completions.create(model="m", messages=MSG, max_tokens=400, stream=True)
        pieces = iter(stream)
        next(pieces)
        streams.append((stream, pieces))
    s = svc.stats()
    assert s["totals"]["inflight"] == 4 and s["proxy"]["active"] == 4, s["totals"]
    assert sorted(a["connections"] for a in s["acceptors"]) in ([2, 2], [2, 3]), s["acceptors"]  # (+ this query's)
    victim = svc.acceptor_procs()[0]
    victim.kill()
    cut = 0
    for _stream, pieces in streams:
        try:
            for _ in range(20):  # (what reached this client before the kill is read first: 1 s of stream)
                next(pieces)
        except Exception:  # its connection died with the acceptor, mid-stream
            cut += 1
    assert cut == 2
    until(lambda: svc.stats()["totals"]["inflight"] == 2)  # released by the distributor, not by a lease
    until(lambda: fake.stats()["aborted"] == 2)  # the dead acceptor's upstream connections closed
    for stream, _pieces in streams:
        with contextlib.suppress(Exception):
            stream.close()  # the two left: their clients leave
    s = settled(svc)
    assert outcomes(s) == {"dispatched": 4}, outcomes(s)  # exactly one outcome each
    assert s["counters"]["tickets_released"] == 4 and s["counters"]["tickets_expired"] == 0
    assert s["proxy"]["unsent"] == 0
    until(lambda: fake.stats()["aborted"] == 4 and fake.stats()["running"] == 0)
    until(lambda: acceptors_up(svc, 1))
    for _ in range(4):  # both acceptors (the new one too) relay again; the budget of 4 is all free
        assert client(svc).chat.completions.create(model="m", messages=MSG, max_tokens=2).choices[0].message.content
    s = settled(svc)
    assert outcomes(s) == {"dispatched": 8} and s["proxy"]["unsent"] == 0


def test_an_acceptor_killed_with_streams_held_on_their_clients_holds_none_any_more(
    launch: Any, fake_backend: Any
) -> None:
    """Streams whose relay waits on a client that does not read are reported held (the detector does not
    take them for requests a scrape may miss); the acceptors relaying them die: they are held no more."""
    fake = fake_backend(ttft=0.01, itl=0.0)
    proxy = {"utilization": True, "scrape_interval": 0.05, "queue_threshold": 50}
    svc = launch(proxy_config([fake.url], budget=4, proxy=proxy), acceptors=2)
    big = json.dumps({"model": "m" * 8000, "messages": MSG, "max_tokens": 800, "stream": True}).encode()
    stalled = []
    try:
        for _ in range(2):  # one connection each: one per acceptor
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", svc.http_port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: %d\r\n\r\n%b" % (len(big), big))
            stalled.append(s)
        until(lambda: held(svc) == 2)
        for proc in svc.acceptor_procs():  # (both: which one relays which stream is the distributor's choice)
            proc.kill()
        until(lambda: held(svc) == 0)  # (the clients still connected: released by the deaths alone)
    finally:
        for s in stalled:
            s.close()
    until(lambda: acceptors_up(svc, 2))
    assert svc.stats()["proxy"]["backends"][0]["inflight"] == 0


def held(svc: Any) -> int:
    try:
        return int(svc.stats()["proxy"]["backends"][0]["held"])
    except OSError:  # handed to the acceptor being killed, before the distributor knew
        return -1


def test_the_acceptors_proxy_counters_show_in_metrics_and_stats(launch: Any, fake_backend: Any) -> None:
    """Counted in the acceptors, rendered by the distributor: /metrics and /v1/stats, asked on any
    connection (any acceptor), sum every acceptor's proxy; an acceptor that exits keeps what it had
    reported counted (the counters do not go back)."""
    fake = fake_backend(ttft=0.0, itl=0.0)
    svc = launch(proxy_config([fake.url], budget=4), acceptors=2)
    for n in range(4):  # one connection each: both acceptors relay some
        c = client(svc)
        if n % 2:
            assert c.chat.completions.create(model="m", messages=MSG, max_tokens=3).choices[0].message.content
        else:
            assert len(list(c.chat.completions.create(model="m", messages=MSG, max_tokens=3, stream=True))) >= 3
    for _ in range(3):  # each on a new connection
        samples = svc.metrics()
        assert metric(samples, "flowshard_proxy_responses_total", route=ROUTE, code="200") == 4
        assert metric(samples, "flowshard_proxy_stream_chunks_total") >= 2  # (coalesced: no delay)
        assert metric(samples, "flowshard_proxy_tokens_total", kind="completion") == 12
        assert metric(samples, "flowshard_backend_up", backend=fake.url) == 1
    s = svc.stats()["proxy"]
    assert s["responses"] == {f"{ROUTE} 200": 4} and s["backends"][0]["requests"] == 4, s
    svc.acceptor_procs()[0].kill()
    until(lambda: acceptors_up(svc, 1))
    samples = svc.metrics()
    assert metric(samples, "flowshard_proxy_responses_total", route=ROUTE, code="200") == 4
    assert metric(samples, "flowshard_proxy_tokens_total", kind="completion") == 12


def test_an_acceptor_killed_between_scrapes_keeps_what_it_had_counted(launch: Any, fake_backend: Any) -> None:
    """Each acceptor pushes its proxy's counters when they change (every 0.25 s at most), not only when
    a scrape asks: killed with no scrape since it relayed, it keeps them counted. Asked only at a
    scrape, such an acceptor took every count since the last one with it (a review: 14 of 40)."""
    fake = fake_backend(ttft=0.0, itl=0.0)
    svc = launch(proxy_config([fake.url], budget=4), acceptors=2)
    for _ in range(6):  # one connection each: both acceptors relay some
        assert client(svc).chat.completions.create(model="m", messages=MSG, max_tokens=3).choices[0].message.content
    time.sleep(0.6)  # (two pushes' time)
    for victim in svc.acceptor_procs():
        victim.kill()
    until(lambda: acceptors_up(svc, 2), timeout=15.0)
    samples = svc.metrics()
    assert metric(samples, "flowshard_proxy_responses_total", route=ROUTE, code="200") == 6
    assert metric(samples, "flowshard_proxy_tokens_total", kind="completion") == 18


def test_proxy_reports_sum_counters_and_an_exited_acceptor_keeps_only_its_counters() -> None:
    from distributor.proxy import BackendFigures, ProxyReport, _decode_report, _encode_report

    a = ProxyReport([(ROUTE, 200, 3)], {"rejected:capacity": 1}, chunks=5, active=2,
                    backends=[BackendFigures(2, 10, True, {"connect": 1}, "")])
    b = ProxyReport([(ROUTE, 200, 1), (ROUTE, 429, 2)], chunks=1, active=1,
                    backends=[BackendFigures(1, 4, False, {"connect": 2, "midstream": 1}, "boom")])
    b = _decode_report(_encode_report(b))  # as it crosses the link
    view = ProxyReport(backends=[BackendFigures()])
    view.add(a)
    view.add(b)
    assert view.responses == [(ROUTE, 200, 4), (ROUTE, 429, 2)] and view.chunks == 6 and view.active == 3
    assert view.dropped == {"rejected:capacity": 1}
    fig = view.backends[0]
    assert (fig.inflight, fig.requests, fig.up, fig.errors, fig.last_error) == (
        3, 14, False, {"connect": 3, "midstream": 1}, "boom")  # out in one acceptor: shown out
    retired = ProxyReport(backends=[BackendFigures()])
    retired.add(b, gauges=False)  # an acceptor that exited: its counters, not its in-flight nor its health
    assert retired.active == 0 and retired.backends[0].inflight == 0 and retired.backends[0].up
    assert retired.backends[0].requests == 4 and retired.responses == [(ROUTE, 200, 1), (ROUTE, 429, 2)]


def test_an_exited_acceptors_backend_counters_stay_counted() -> None:
    """An acceptor reported 7 requests and 3 connect errors on backend 0, then exited: /metrics'
    `flowshard_backend_errors` (a counter) and /v1/stats' per-backend `requests` must keep them
    (`acceptor_exited`). `Proxy.retired` started with no backends (review 18), so `ProxyReport.add`'s
    zip over them dropped these: the counters went backwards when an acceptor was restarted."""
    import asyncio

    from distributor.proxy import BackendFigures, Proxy, ProxyReport
    from flowshard.config import Config, ProxyConfig

    async def go() -> None:
        config = Config(proxy=ProxyConfig(backends=["http://127.0.0.1:9", "http://127.0.0.1:10"], utilization=False))
        proxy = Proxy(config, None, lambda: None)  # type: ignore[arg-type]
        report = ProxyReport(responses=[(ROUTE, 200, 7)],
                             backends=[BackendFigures(inflight=1, requests=7, errors={"connect": 3}),
                                       BackendFigures(requests=2)])
        proxy.remote[0] = report
        before = proxy.view().backends
        assert [(b.requests, b.errors) for b in before] == [(7, {"connect": 3}), (2, {})]
        proxy.acceptor_exited(0)
        view = proxy.view()
        assert view.responses == [(ROUTE, 200, 7)]  # the route counters are kept ...
        after = view.backends  # ... the backend ones too (not its in-flight: that went with it)
        assert [(b.inflight, b.requests, b.errors) for b in after] == [(0, 7, {"connect": 3}), (0, 2, {})], after

    asyncio.run(go())


def test_a_proxied_admission_the_distributor_failed_is_answered_500() -> None:
    """The distributor answers `Error(key)` when it fails on an acceptor's admission (AcceptorLink's
    except branch; `Upstream._dropped` does the same for a frame it cannot encode). For an HTTP admit
    the waiter is the connection, which had `fail`: 500. For a proxied request the waiter is the
    `Exchange`, which had none (review 18): `_fail_admission` popped the entry and answered nothing,
    so the client's request, and every response pipelined behind it, waited until the client gave
    up; and the distributor kept the key among the proxied admissions it waits for."""
    import asyncio
    import logging

    from distributor.acceptors import AcceptorLink
    from distributor.front import Upstream
    from distributor.proxy import Exchange, Proxy
    from flowshard.classify import Classified
    from flowshard.codec import BatchWriter, Error, LinkAdmit
    from flowshard.config import Config, ProxyConfig

    class Conn:  # what the exchange's client is sent
        def __init__(self) -> None:
            self.answers: list[bytes] = []

        def slot_respond(self, slot: Any, data: bytes) -> None:
            self.answers.append(data)

    class Failing:  # the distributor's admit raises (a bug)
        def admit(self, *args: Any, **kw: Any) -> int:
            raise RuntimeError("boom")

    async def go() -> None:
        # the distributor's side: the failed proxied admission is answered, and no longer awaited
        link = AcceptorLink(Failing(), 0, b"")  # type: ignore[arg-type]
        sent: list[Any] = []
        link.send = sent.append  # type: ignore[method-assign]
        w = BatchWriter()
        w.add(LinkAdmit(7, "f", 0, 10, 0.0, 0.0, 10, 0.0, False, False, True))
        logging.disable(logging.ERROR)
        try:
            link.data_received(w.take())
        finally:
            logging.disable(logging.NOTSET)
        assert [(type(m), m.id) for m in sent] == [(Error, 7)] and not link.proxied_keys and not link.pending

        # the acceptor's side: the exchange answers its client 500, as the one-process proxy does
        up = Upstream(0, asyncio.get_running_loop())
        proxy = Proxy(Config(proxy=ProxyConfig(backends=["http://127.0.0.1:9"], utilization=False)), up,
                      lambda: None)
        conn, slot = Conn(), object()
        item = Classified(flow="f", priority=0, slo=0.0, size=10, tokens=10, prompt_tokens=5, model="m",
                          stream=False, strip_usage=False, body=b"{}")
        ex = Exchange(proxy, conn, slot, ROUTE, item, [], b"")  # type: ignore[arg-type]
        ex.rid = key = up.admit(ex, slot, "f", 0, 10, 0.0, 0.0, 10, 0.0, False, proxied=True)
        w.add(Error(key, 500, sent[0].message))  # what the distributor's side sent, to this admission
        logging.disable(logging.ERROR)
        try:
            up.data_received(w.take())
        finally:
            logging.disable(logging.NOTSET)
        assert len(conn.answers) == 1, "the proxied request got no answer (its slot waits forever)"
        head, _, body = conn.answers[0].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 500") and b'"internal_error"' in body, conn.answers
        assert proxy.report().internal_errors == 1
        ex.client_gone()  # answered: nothing to cancel, nothing answered twice
        assert len(conn.answers) == 1

    asyncio.run(go())


def test_a_proxied_release_the_link_cannot_carry_goes_again_without_its_tokens() -> None:
    """An acceptor's proxy releases each ticket with the backend's reported usage (review 18: then
    unchecked; `Proxy._settle_usage` now refuses one out of range, test_proxy). Two values of 2^64-1
    summed past what msgpack carries: the link's BatchWriter dropped the `LinkRelease`, and
    `Upstream._dropped` answered only releases with a key, which a proxied release has not, so the
    distributor never released the ticket (not leased: one budget slot lost for the life of the
    acceptor, and the drain waited for it until drain_timeout). Now it goes again, uncorrected."""
    import asyncio
    import logging

    from distributor.front import Upstream
    from flowshard.codec import BatchReader, BatchWriter, FromAcceptor, LinkRelease, LinkReleased

    class Transport:
        def __init__(self) -> None:
            self.data = b""

        def write(self, data: bytes) -> None:
            self.data += data

        def is_closing(self) -> bool:
            return False

    async def go() -> None:
        up = Upstream(0, asyncio.get_running_loop())
        transport = Transport()
        up.connection_made(transport)  # type: ignore[arg-type]
        answers: list[tuple[int, bool]] = []
        logging.disable(logging.ERROR)  # (the drop is logged)
        try:
            up.release(4242, 2 * (2**64 - 1))  # (Exchange._done, with what the backend had reported)
            up.release_then(4343, 2**64, lambda ticket, ok: answers.append((ticket, ok)))  # (POST /v1/release)
            for _ in range(4):  # the flush at the end of the pass, and the one after the drop
                await asyncio.sleep(0)
        finally:
            logging.disable(logging.NOTSET)
        sent = BatchReader(FromAcceptor).feed(transport.data) if transport.data else []
        releases = [(m.ticket, m.tokens) for m in sent if type(m) is LinkRelease]
        assert releases == [(4242, -1), (4343, -1)], "the release never left"
        key = next(m.key for m in sent if type(m) is LinkRelease and m.ticket == 4343)
        assert key and not answers  # the one that awaits an answer still does: the distributor's
        w = BatchWriter()
        w.add(LinkReleased(key, True))
        up.data_received(w.take())
        assert answers == [(4343, True)]

    asyncio.run(go())


def test_acceptors_in_proxy_mode_follow_the_rule_without_backends() -> None:
    """`--acceptors auto` no longer means 0 in proxy mode, and a count is no longer refused."""
    import os

    from distributor.acceptors import auto_acceptors
    from flowshard.cli import _acceptors

    assert _acceptors("auto", 1) == auto_acceptors(1, os.cpu_count() or 1)  # (0 on this 2-core machine)
    assert _acceptors("2", 1) == 2


@pytest.mark.parametrize("acceptors", [0, 2])
def test_the_detector_counts_what_the_proxies_sent_and_finished_since_the_scrape(
    launch: Any, fake_backend: Any, acceptors: int
) -> None:
    """One scrape, then none for the test (scrape_interval 30 s): the pool's saturation moves only by
    what the proxies (the distributor's, or the acceptors' through LinkBackends) report sent and
    finished. Requests one at a time all pass (each finish is counted); two streams open make it
    2 / queue_threshold = 1, so a third waits until one of them ends."""
    fake = fake_backend(ttft=0.0, itl=0.05)
    proxy = {"utilization": True, "scrape_interval": 30.0, "staleness": 60.0, "queue_threshold": 2}
    svc = launch(proxy_config([fake.url], proxy=proxy, budget="unlimited", extra="default_ttl = 20.0"),
                 acceptors=acceptors)
    until(lambda: not svc.stats()["proxy"]["backends"][0]["stale"])
    for _ in range(4):
        assert client(svc).chat.completions.create(model="m", messages=MSG, max_tokens=2).choices[0].message.content
        until(lambda: svc.stats()["proxy"]["pool_saturation"] == 0)
    streams = []
    for _ in range(2):
        pieces = iter(client(svc).chat.completions.create(model="m", messages=MSG, max_tokens=40, stream=True))
        next(pieces)
        streams.append(pieces)
    s = until(lambda: (lambda s: s if s["proxy"]["pool_saturation"] >= 1.0 else None)(svc.stats()))
    assert s["proxy"]["unsent"] == 0 and s["proxy"]["backends"][0]["inflight"] == 2
    t0 = time.monotonic()
    assert client(svc).chat.completions.create(model="m", messages=MSG, max_tokens=1).choices[0].message.content
    held = time.monotonic() - t0
    assert 0.8 < held < 8.0, held  # the streams take 2 s (40 tokens, 50 ms apart)
    for pieces in streams:
        assert len(list(pieces)) >= 38
    s = settled(svc)
    assert outcomes(s) == {"dispatched": 7} and s["proxy"]["unsent"] == 0


def test_an_acceptor_reports_a_backend_the_scraper_put_back_without_a_request_of_its_own() -> None:
    """Review 85: an acceptor reported which backends its pool keeps out only in a pass with requests
    of its own; the distributor's scraper putting a backend back (`LinkBackendHealth`, applied by
    `Proxy.scrape_health`) changed that pool with none, so the distributor kept the backend out of
    the pool's figure until its old back-off ended."""
    import asyncio

    from distributor.backends import BackendPool
    from distributor.proxy import BackendReport
    from flowshard.codec import LinkBackends

    async def go() -> list[LinkBackends]:
        sent: list[LinkBackends] = []
        report = BackendReport(2, sent.append, asyncio.get_running_loop())
        report.pool = pool = BackendPool(["http://a", "http://b"], 1.0, 30.0)
        now = asyncio.get_running_loop().time()
        pool.backends[0].down_until = now + 20.0  # out, as its scrapes failed
        report.health_changed()
        await asyncio.sleep(0)
        pool.succeeded(pool.backends[0])  # back: its scrapes succeed again
        report.health_changed()
        await asyncio.sleep(0)
        report.health_changed()  # nothing changed: nothing to report
        await asyncio.sleep(0)
        return sent

    sent = asyncio.run(go())
    assert [m.down_for[0] > 19.0 for m in sent[:1]] == [True]
    assert sent[1].down_for == [0.0, 0.0]
    assert sent[2].down_for == []


def test_an_acceptor_reports_a_take_out_a_strike_made_in_the_pass_it_made_it() -> None:
    """Review 147: a backend struck out at another backend's head was reported (so told to the other
    acceptors) only at the acceptor's next request event: here at the end of the answering stream,
    1.5 s later. It is reported in the pass of the take-out now."""
    import asyncio
    import contextlib

    from aiohttp import web
    from servicekit import run
    from test_proxy import _RecordingAdmission
    from test_proxy_hostile import _post, backend

    from distributor.http import HttpLimits, start_http_server
    from distributor.proxy import BackendReport, Proxy
    from flowshard.config import Config, ProxyConfig

    async def fails(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response({"error": "no"}, status=500)

    async def streams(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
        await asyncio.sleep(1.5)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def go() -> None:
        async with contextlib.AsyncExitStack() as stack:
            urls = [await stack.enter_async_context(backend([("POST", "/v1/chat/completions", handler)]))
                    for handler in (fails, streams)]
            loop = asyncio.get_running_loop()
            frames: list[tuple[float, Any]] = []
            report = BackendReport(2, lambda m: frames.append((loop.time(), m)), loop, counts=False)
            admission = _RecordingAdmission()
            px = Proxy(Config(proxy=ProxyConfig(backends=urls, utilization=False, retries=1, backoff=30.0)),
                       admission, lambda: None, report=report)
            await px.start()
            server = await start_http_server(admission, "127.0.0.1", 0, HttpLimits(), lease=300.0, proxy=px)
            try:
                pool = px.pool
                f = pool.backends[0]
                pick = pool.pick

                def first_to_f(now: float, exclude: Any = frozenset(), *args: Any, **kw: Any) -> Any:
                    return f if kw.get("advance", True) else pick(now, exclude, *args, **kw)

                pool.pick = first_to_f  # type: ignore[method-assign]
                writers = []
                for _ in range(3):  # each fails at f, then streams from g: g's third head strikes f out
                    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
                    writer.write(_post(stream=True))
                    await reader.readuntil(b"\r\n\r\n")
                    writers.append(writer)
                out_at = loop.time()
                assert not pool.up(f, out_at)
                await asyncio.sleep(0.3)
                told = [at for at, m in frames if m.down_for and m.down_for[0] > 0]
                assert told and told[0] <= out_at + 0.05, (told, out_at)
                for writer in writers:
                    writer.close()
            finally:
                server.close()
                await px.close()

    run(go(), timeout=30.0)


def test_without_the_detector_an_acceptor_reports_only_its_pools_health() -> None:
    """Without the utilization detector an acceptor reports no sends (nothing counts them), but its
    pool's take-outs and returns still go to the distributor, which tells the other acceptors: a frame
    only in a pass in which they changed."""
    import asyncio

    from distributor.backends import BackendPool
    from distributor.proxy import BackendReport
    from flowshard.codec import LinkBackends

    async def go() -> list[LinkBackends]:
        sent: list[LinkBackends] = []
        report = BackendReport(2, sent.append, asyncio.get_running_loop(), counts=False)
        report.pool = pool = BackendPool(["http://a", "http://b"], 1.0, 30.0)
        report.sent(0)
        report.mark(7)
        report.finished(0)
        await asyncio.sleep(0)  # a pass of requests, no change of health: nothing
        report.sent(1)
        pool.failed(pool.backends[1], asyncio.get_running_loop().time(), "connect", "refused")
        report.finished(1)
        await asyncio.sleep(0)  # b out in that pass: reported
        report.sent(0)
        report.finished(0)
        await asyncio.sleep(0)
        return sent

    sent = asyncio.run(go())
    assert len(sent) == 1 and sent[0].down_for[0] == 0.0 and sent[0].down_for[1] > 0.5
    assert sent[0].sent == sent[0].finished == [0, 0] and sent[0].marked == []


@pytest.mark.parametrize("detector", [True, False])
def test_a_backend_one_acceptor_took_out_gets_nothing_from_the_others(
    launch: Any, fake_backend: Any, detector: bool
) -> None:
    """Each acceptor's passive health is its own: a backend one took out after its failures stayed up
    in the others, which kept sending it requests (each failed there, then retried on the backends
    left, beyond the rooms the detector had given them: the flake of `test_a_backend_out_of_rotation_
    does_not_lend_the_pool_its_idle_metrics[2]`) until they met three failures of their own. The
    distributor now tells each acceptor what the others keep out (`LinkPeersDown`), with the
    utilization detector or without it (the acceptors report their pools' health either way)."""
    bad = fake_backend(refuse=True)  # drops every request's connection: out at its third failure in a row
    good = fake_backend()
    proxy = {"utilization": detector, "scrape_interval": 0.05, "retries": 1, "backoff": 30.0}
    svc = launch(proxy_config([bad.url, good.url], proxy=proxy, budget="unlimited"), acceptors=2)
    if detector:
        until(lambda: not any(b["stale"] for b in svc.stats()["proxy"]["backends"]))
    first, second = client(svc), client(svc)
    try:
        for _ in range(40):  # one connection, one acceptor: until its pool has the bad one out
            first.chat.completions.create(model="m", messages=MSG, max_tokens=1)
            if not svc.stats()["proxy"]["backends"][0]["up"]:
                break
        else:
            raise AssertionError("the failing backend was never taken out")
        tried = len(bad.stats()["post_paths"])  # (every request it dropped)
        assert tried >= 3
        for _ in range(12):  # another connection: handed to the other acceptor (the one with fewer open)
            r = second.chat.completions.create(model="m", messages=MSG, max_tokens=1)
            assert r.choices[0].message.content == " tok"
        assert len(bad.stats()["post_paths"]) == tried  # the other acceptor sent it nothing
    finally:
        first.close()
        second.close()
    assert outcomes(settled(svc)) == {"dispatched": good.stats()["requests"]}


def test_the_backend_an_acceptor_has_left_is_not_struck_out_for_one_the_others_keep_out(
    launch: Any, fake_backend: Any
) -> None:
    """Review 137: told that the others keep a failing backend out, an acceptor sent it nothing, yet
    its own pool still had it up and proven: three streams the working backend cut took that one out
    by the last-up rule, and every request went to the failing one (0 of 10 served; in one process,
    and before the change, 10 of 10). What the others keep out counts as out for that rule too."""
    bad = fake_backend(status=503)  # fails every request
    good = fake_backend(ttft=0.001, itl=0.001)
    proxy = {"utilization": True, "scrape_interval": 0.05, "retries": 1, "backoff": 30.0}
    svc = launch(proxy_config([bad.url, good.url], proxy=proxy, budget="unlimited"), acceptors=2)
    until(lambda: not any(b["stale"] for b in svc.stats()["proxy"]["backends"]))
    first, second = client(svc), client(svc)
    try:
        for _ in range(40):  # one acceptor takes the failing one out (each 503 retried on the other)
            first.chat.completions.create(model="m", messages=MSG, max_tokens=1)
            if not svc.stats()["proxy"]["backends"][0]["up"]:
                break
        else:
            raise AssertionError("the failing backend was never taken out")
        good.configure(die_after=1)  # the other acceptor (second connection) sees three streams cut
        for _ in range(3):
            with pytest.raises(openai.APIError, match="mid-stream"):
                list(second.chat.completions.create(model="m", messages=MSG, max_tokens=3, stream=True))
        good.configure(die_after=-1)
        for _ in range(10):
            assert second.chat.completions.create(model="m", messages=MSG, max_tokens=1).choices[0].message.content \
                == " tok"
    finally:
        first.close()
        second.close()
    assert svc.stats()["proxy"]["backends"][1]["up"]


def test_an_acceptor_whose_backends_are_all_out_in_the_others_still_retries_among_them(fake_backend: Any) -> None:
    """Review 138: with every backend it has up out in the other acceptors, an acceptor's picker falls
    back to them, but each such try was the request's last (the others counted as out), so a request
    that met the failing one got its 503 where it would have been retried on the working one (20 of
    20; b1f18df: 0 of 20). Among backends all out in the others, the usual retries hold."""
    import asyncio

    from distributor.proxy import Exchange, Proxy
    from flowshard.classify import Classified
    from flowshard.config import Config, ProxyConfig

    failing, working = fake_backend(status=503), fake_backend()

    class Conn:  # the HTTP connection's side of an exchange: the status of each answer
        def __init__(self) -> None:
            self.statuses: list[bytes] = []

        def slot_respond(self, slot: Any, data: bytes) -> None:
            self.statuses.append(data.split(b" ", 2)[1])

        def slot_turn(self, slot: Any) -> None:
            return None

        def slot_write(self, slot: Any, data: bytes) -> None:
            return None

        def slot_end(self, slot: Any, data: bytes = b"", close: bool = False) -> None:
            pass

        def write_buffered(self) -> int:
            return 0

    async def go() -> list[bytes]:
        config = Config(proxy=ProxyConfig(backends=[failing.url, working.url], utilization=False, retries=1,
                                          backoff=30.0))
        proxy = Proxy(config, None, lambda: None)  # type: ignore[arg-type]
        await proxy.start()
        conn = Conn()
        body = json.dumps({"model": "m", "messages": MSG, "max_tokens": 1}).encode()
        item = Classified(flow="f", priority=0, slo=0, size=len(body), tokens=1, prompt_tokens=1, model="m",
                          stream=False, strip_usage=False, body=body)
        try:
            for _ in range(10):
                proxy.peers_health([30.0, 30.0])  # (both out in the other acceptors, as this one learns again)
                await proxy.forward(Exchange(proxy, conn, None, ROUTE, item, [], b"", ROUTE))  # type: ignore[arg-type]
        finally:
            await proxy.close()
        return conn.statuses

    statuses = asyncio.run(go())
    assert statuses == [b"200"] * 10, statuses


def test_a_scrape_take_out_of_a_backend_out_here_already_leaves_its_own_back_off() -> None:
    """Review 147: the distributor's scraper taking out a backend out here already for its failures
    overrode its back-off, and the next good scrape brought back a backend failing every request, its
    back-off's doubling wiped. Its own back-off stands, as one process's scraper takes out only a
    backend up; the take-out counts as a failure of its own (not `clean`)."""
    import asyncio

    from test_proxy import _RecordingAdmission

    from distributor.proxy import Proxy
    from flowshard.config import Config, ProxyConfig

    async def go() -> None:
        urls = ["http://127.0.0.1:9", "http://127.0.0.1:10", "http://127.0.0.1:11"]
        px = Proxy(Config(proxy=ProxyConfig(backends=urls, utilization=False, backoff=8.0, max_backoff=60.0)),
                   _RecordingAdmission(), lambda: None)
        pool, now = px.pool, px.loop.time()
        y = pool.backends[0]
        for _ in range(3):
            pool.strike(y, now, "reset")  # out here for 8 s
        px.scrape_health(0, 30.0, "ClientConnectorError: refused")  # the scraper: nothing listens there
        assert not pool.up(y, now + 5.0) and y.last_kind == "reset" and y.failures == 1 and not y.clean
        px.scrape_health(0, 0.0, "")  # the scraper's good scrape: its own back-off still stands
        assert not pool.up(y, now + 5.0) and pool.up(y, now + 8.0) and y.failures == 1

    asyncio.run(go())


def test_the_distributor_tells_the_acceptors_a_backend_with_stale_metrics_apart() -> None:
    """Review 145: a retry ranks a backend whose metrics are stale (it may be hung) after one that
    failed lately; in an acceptor the rooms told say which (-1: stale, and full), as the distributor's
    detector knows it."""
    import asyncio

    from test_proxy import _RecordingAdmission

    from distributor.proxy import Proxy
    from flowshard.config import Config, ProxyConfig
    from flowshard.utilization import Scraped

    async def go() -> None:
        urls = ["http://127.0.0.1:9", "http://127.0.0.1:10"]
        px = Proxy(Config(proxy=ProxyConfig(backends=urls, utilization=True, staleness=10.0)),
                   _RecordingAdmission(), lambda: None)
        told: list[list[int]] = []
        px.on_full = told.append
        util = px.utilization
        assert util is not None
        now = px.loop.time()
        util.scraped(0, now, util.scrape_started(0), Scraped(0, 1, 0.1))  # fresh, room; b never scraped: stale
        util.expire(now)
        px.saturation(0)
        assert told and told[-1][1] == -1 and told[-1][0] > 0
        px.saturation(0)  # (nothing new: not told again)
        assert len(told) == 1
        acceptor = Proxy(Config(proxy=ProxyConfig(backends=urls, utilization=False)), _RecordingAdmission(),
                         lambda: None)
        acceptor.told_rooms(told[-1], [0, 0])
        stale = acceptor._stale()
        assert stale is not None and not stale(0) and stale(1)

    asyncio.run(go())


def test_the_distributor_tells_each_acceptor_what_the_others_keep_out() -> None:
    """`Proxy.peers_down_for` (the distributor): per backend the longest of the *other* acceptors'
    back-offs; `Proxy.peers_health` (an acceptor): those count as out for its picker's first choice
    and its last-up rule (`BackendPool.peers_out`), not for its own health; back when they end."""
    import asyncio

    from distributor.proxy import Proxy
    from flowshard.config import Config, ProxyConfig

    async def go() -> None:
        urls = ["http://127.0.0.1:9", "http://127.0.0.1:10", "http://127.0.0.1:11"]
        proxy = Proxy(Config(proxy=ProxyConfig(backends=urls, utilization=False)), None, lambda: None)  # type: ignore[arg-type]
        now = proxy.loop.time()
        proxy.remote_down = {0: [now + 10.0, 0.0, 0.0], 1: [now + 5.0, now + 20.0, 0.0], 2: [0.0, 0.0, now - 1]}
        told = proxy.peers_down_for(0)  # acceptor 0 hears the others': 1's (and 2's, past)
        assert 4.9 < told[0] <= 5.0 and 19.9 < told[1] <= 20.0 and told[2] == 0.0, told
        told = proxy.peers_down_for(2)  # the longest of 0's and 1's
        assert 9.9 < told[0] <= 10.0 and 19.9 < told[1] <= 20.0 and told[2] == 0.0, told
        assert proxy.acceptor_exited(1) and not proxy.acceptor_exited(1)  # (it kept some out; then gone)
        assert proxy.peers_down_for(0) == [0.0, 0.0, 0.0]

        acceptor = Proxy(Config(proxy=ProxyConfig(backends=urls[:2], utilization=False)), None, lambda: None)  # type: ignore[arg-type]
        pool = acceptor.pool
        now = acceptor.loop.time()
        acceptor.peers_health([30.0, 0.0])
        assert pool.peers_out(now) == {0}
        assert all(pool.up(b, now) for b in pool.backends)  # its own health unchanged
        assert not pool.backends[0].proven  # (taken out there: not proven here until it answers here)
        pool.answered(pool.backends[0])
        acceptor.peers_health([29.0, 0.0])  # still out there: not re-marked (review 140: a stale report
        assert pool.backends[0].proven  # re-marked one the scraper had just brought back)
        acceptor.peers_health([31.0, 0.0])  # out there again (its next back-off, 2 s past this one's end,
        assert not pool.backends[0].proven  # told before this one ended here): re-marked (review 141)
        assert pool.pick(now, shun=pool.peers_out(now)) is pool.backends[1]  # (the picker's first choice)
        bad, good = pool.backends
        for _ in range(5):  # review 137: the last backend up here, the other out in the others: kept in
            pool.strike(good, now, "midstream")
        assert pool.up(good, now)
        acceptor.peers_health([0.0, 0.0])
        assert pool.peers_until is None and pool.peers_out(now) == frozenset()
        # review 138: back in the others' rotation, it has not answered since: not up for the last-up
        # rule (as one taken out here), so the one that has answered is still not struck out for it
        pool.strike(good, now, "midstream")
        assert pool.up(good, now) and not bad.proven
        pool.answered(bad)  # (it answers here)
        pool.strike(good, now, "midstream")  # (now there is another up that answered: out)
        assert not pool.up(good, now)
        acceptor.peers_health([0.001, 0.0])
        assert pool.peers_out(now + 1.0) == frozenset() and pool.peers_until is None  # (ended)

        # every backend up here out in the others: the fallback takes turns (review 138: two passes
        # moved the round robin by two, and one of two backends took every request)
        pool.answered(good)
        acceptor.peers_health([30.0, 30.0])
        shun = pool.peers_out(now)
        assert shun == {0, 1}
        assert {pool.pick(now, shun=shun).index for _ in range(4)} == {0, 1}  # type: ignore[union-attr]

    asyncio.run(go())


@pytest.mark.parametrize("acceptors", [0, 2])
def test_a_backend_with_room_takes_the_requests_while_another_is_past_its_threshold(
    launch: Any, fake_backend: Any, acceptors: int
) -> None:
    """Review 108: one backend past its threshold (here a queue of other traffic's, 3.5 times
    `queue_threshold`) held every request until its TTL while another sat idle (the pool's saturation
    was the plain mean, 1.75), and the picker, by in-flight counts, sent half there. Each backend now
    counts at most 1 in the mean, and the picker (the distributor's, or each acceptor's from the
    distributor's `LinkBackendsFull`) sends to the one with room."""
    busy = fake_backend(ttft=60.0, itl=0.01, max_running=1)
    idle = fake_backend(ttft=0.0, itl=0.01)
    host, port = busy.url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": "m", "messages": MSG, "max_tokens": 1}).encode()
    others = []
    try:
        for _ in range(8):  # other traffic, straight to the busy backend: 1 running, 7 waiting
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            others.append(sock)
        until(lambda: busy.stats()["waiting"] == 7)
        proxy = {"utilization": True, "scrape_interval": 0.05, "queue_threshold": 2}
        svc = launch(proxy_config([busy.url, idle.url], proxy=proxy, budget="unlimited", extra="default_ttl = 5.0"),
                     acceptors=acceptors)
        until(lambda: (lambda b: not b[0]["stale"] and not b[1]["stale"] and b[0]["waiting"] == 7)(
            svc.stats()["proxy"]["backends"]))
        assert svc.stats()["proxy"]["pool_saturation"] == pytest.approx(0.5)
        for _ in range(6):
            t0 = time.monotonic()
            assert client(svc).chat.completions.create(model="m", messages=MSG, max_tokens=2).choices[0].message.content
            assert time.monotonic() - t0 < 3.0  # not held (the TTL is 5 s)
        assert idle.stats()["requests"] == 6 and busy.stats()["requests"] == 8  # none of flowshard's went there
        s = settled(svc)
        assert outcomes(s) == {"dispatched": 6}
    finally:
        for sock in others:
            sock.close()


@pytest.mark.parametrize("acceptors", [0, 2])
def test_a_burst_fills_each_backend_by_its_room_not_by_requests_in_flight(
    launch: Any, fake_backend: Any, acceptors: int
) -> None:
    """Review 121: one backend with room for one more request (its KV cache at 0.7 of the 0.8 threshold,
    held by one running request) and one with room for 20 (`queue_threshold` 20): a burst of 21 is
    admitted at once, and each acceptor's picker, told only which backends were full, split it by
    requests in flight, 10 to the first. Told each backend's room, an acceptor counts its own sends
    against it: the first gets at most one per acceptor, the rest go to the second."""
    kv_bound = fake_backend(ttft=60.0, itl=0.01, max_running=1, kv_tokens=1000)
    roomy = fake_backend(ttft=60.0, itl=0.01, max_running=1)
    host, port = kv_bound.url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 2800}], "max_tokens": 1}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as other:  # 700 tokens running there: KV 0.7
        other.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: %d\r\n\r\n%s" % (len(body), body))
        until(lambda: kv_bound.stats()["running"] == 1)
        proxy = {"utilization": True, "scrape_interval": 1.0, "staleness": 10.0, "queue_threshold": 20,
                 "kv_threshold": 0.8}
        svc = launch(proxy_config([kv_bound.url, roomy.url], proxy=proxy, budget="unlimited"), acceptors=acceptors)
        until(lambda: (lambda b: not b[0]["stale"] and not b[1]["stale"])(svc.stats()["proxy"]["backends"]))
        sockets = []
        try:
            request = json.dumps({"model": "m", "messages": MSG, "max_tokens": 1}).encode()
            for _ in range(21):
                sock = socket.create_connection((svc.host, svc.http_port), timeout=10)
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(request), request))
                sockets.append(sock)
            until(lambda: kv_bound.stats()["requests"] - 1 + roomy.stats()["requests"] == 21)
            assert kv_bound.stats()["requests"] - 1 <= max(1, acceptors), (kv_bound.stats(), roomy.stats())
        finally:
            for sock in sockets:
                sock.close()


class _FixedMetricsBackends:
    """Backends in a thread of this process whose /metrics show no queue, one running request and each
    its own KV use (`dynamic`: plus the requests in flight, each another running one holding as much),
    and which answer a chat completion after `delay`, counting them."""

    def __init__(self, kvs: list[float], delay: float = 0.0, dynamic: bool = False) -> None:
        import asyncio
        import threading

        from aiohttp import web

        self.requests = [0] * len(kvs)
        self.inflight = [0] * len(kvs)
        self.urls: list[str] = []
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def app(index: int, kv: float) -> web.Application:
            async def metrics(_: web.Request) -> web.Response:
                more = self.inflight[index] if dynamic else 0
                return web.Response(text=f"vllm:num_requests_waiting 0\nvllm:num_requests_running {1 + more}\n"
                                         f"vllm:kv_cache_usage_perc {min(1.0, kv * (1 + more))}\n")

            async def chat(request: web.Request) -> web.Response:
                await request.read()
                self.requests[index] += 1
                self.inflight[index] += 1
                try:
                    await asyncio.sleep(delay)
                finally:
                    self.inflight[index] -= 1
                return web.json_response({"id": "x", "object": "chat.completion", "model": "m", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            application = web.Application()
            application.router.add_get("/metrics", metrics)
            application.router.add_post("/v1/chat/completions", chat)
            return application

        async def start() -> None:
            for index, kv in enumerate(kvs):
                runner = web.AppRunner(app(index, kv))
                await runner.setup()
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                port = runner.addresses[0][1]
                self.urls.append(f"http://127.0.0.1:{port}")
            ready.set()

        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(start(), self._loop)
        assert ready.wait(10)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.mark.parametrize("acceptors", [0, 1])
def test_requests_one_after_the_other_go_to_the_backend_with_room(launch: Any, acceptors: int) -> None:
    """Review 122: an acceptor counted every send since the distributor last told it the rooms, and a
    request sent and finished between two such messages changes no room, so none came: a backend
    with room for one looked full, and of 20 requests one at a time 9 went to a backend past its
    threshold. It counts now only its sends the rooms do not count yet (the distributor says which)."""
    backends = _FixedMetricsBackends([0.7, 0.9])  # room for 1 (KV 0.7 of 0.8, one running); full (0.9)
    try:
        proxy = {"utilization": True, "scrape_interval": 0.05, "queue_threshold": 20, "kv_threshold": 0.8}
        svc = launch(proxy_config(backends.urls, proxy=proxy, budget="unlimited"), acceptors=acceptors)
        until(lambda: (lambda b: not b[0]["stale"] and not b[1]["stale"])(svc.stats()["proxy"]["backends"]))
        for _ in range(20):
            assert client(svc).chat.completions.create(model="m", messages=MSG, max_tokens=1).choices
            time.sleep(0.02)
        assert backends.requests == [20, 0], backends.requests
    finally:
        backends.close()


def test_every_acceptor_hears_of_a_room_another_ones_requests_filled(launch: Any) -> None:
    """Review 123: the rooms a report of one acceptor's changed were told to that acceptor only, and
    the others kept the old ones: of two requests a quarter second apart, on two backends with room
    for one each, the second went to the full backend beside the idle one in 12 of 12 rounds."""
    import concurrent.futures

    backends = _FixedMetricsBackends([0.7, 0.7], delay=0.6, dynamic=True)  # room for 1 each (KV 0.7 of 0.8)
    try:
        proxy = {"utilization": True, "scrape_interval": 0.05, "queue_threshold": 20, "kv_threshold": 0.8}
        svc = launch(proxy_config(backends.urls, proxy=proxy, budget="unlimited"), acceptors=2)
        until(lambda: (lambda b: not b[0]["stale"] and not b[1]["stale"])(svc.stats()["proxy"]["backends"]))

        def ask() -> Any:
            return client(svc).chat.completions.create(model="m", messages=MSG, max_tokens=1)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for _ in range(4):
                before = list(backends.requests)
                first = pool.submit(ask)
                time.sleep(0.25)  # the first is at its backend, and its scrape shows it
                second = pool.submit(ask)
                first.result(10), second.result(10)
                assert [n - b for n, b in zip(backends.requests, before, strict=True)] == [1, 1], backends.requests
                time.sleep(0.2)
    finally:
        backends.close()
