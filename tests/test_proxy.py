"""Proxy mode end to end: the official `openai` client -> a real `flowshard serve --backend` process
-> a real fake OpenAI backend process (`bench.fakeoai`).

Each test starts its own service and fake backend(s) on free ports; `launch` checks after the test
that nothing of the service is left behind, `fake_backend` stops the fakes by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from proxykit import fake_backend, proxy_config
from servicekit import HttpConn, ahttp, band_outcomes, launch, metric, run, wait_until

from flowshard.types import Outcome

__all__ = ["fake_backend", "launch"]  # the fixtures, re-exported so pytest finds them here

MSG = [{"role": "user", "content": "hello there, how are you"}]


def client(service: Any, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.url("/v1"), api_key="sk-test", max_retries=0, timeout=10, **kw)


def aclient(service: Any, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=service.url("/v1"), api_key="sk-test", max_retries=0, timeout=10, **kw)


def settled(service: Any) -> dict[str, Any]:
    """Stats once nothing is in flight, pending or streaming any more."""
    deadline = time.monotonic() + 5
    while True:
        s = service.stats()
        t = s["totals"]
        if (t["inflight"], t["pending"], t["tickets"], s["proxy"]["active"]) == (0, 0, 0, 0):
            return s
        assert time.monotonic() < deadline, s
        time.sleep(0.01)


@pytest.mark.parametrize("acceptors", [0, 2])  # the proxy in the distributor, and in 2 acceptors
def test_openai_client_streaming_and_not_every_route(launch: Any, fake_backend: Any, acceptors: int) -> None:
    fake = fake_backend(ttft=0.005, itl=0.001)
    svc = launch(proxy_config([fake.url], budget=4), acceptors=acceptors)
    c = client(svc)
    r = c.chat.completions.create(model="m", messages=MSG, max_tokens=5)
    assert r.choices[0].message.content == " tok" * 5
    assert r.usage is not None and r.usage.completion_tokens == 5
    chunks = list(c.chat.completions.create(model="m", messages=MSG, max_tokens=4, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == " tok" * 4
    assert all(ch.choices for ch in chunks), "the usage chunk flowshard asked for reached the client"
    asked = list(c.chat.completions.create(model="m", messages=MSG, max_tokens=3, stream=True,
                                           stream_options={"include_usage": True}))
    assert asked[-1].usage is not None and asked[-1].usage.completion_tokens == 3 and not asked[-1].choices
    text = list(c.completions.create(model="m", prompt="abcdefgh", max_tokens=2, stream=True))
    assert "".join(ch.choices[0].text for ch in text) == " tok tok"
    assert c.completions.create(model="m", prompt="abc", max_tokens=2).choices[0].text == " tok tok"
    assert len(c.embeddings.create(model="m", input=["a", "b", "c"]).data) == 3
    assert [m.id for m in c.models.list()] == ["fake-model"]
    s = settled(svc)
    assert band_outcomes(s)["dispatched"] == 6  # every inference request admitted once; /v1/models is not
    tokens = s["proxy"]["tokens"]
    assert tokens["completion"] == 5 + 4 + 3 + 2 + 2  # actual usage, also of streams that did not ask for it
    assert tokens["prompt"] > 0 and tokens["estimated"] > 0
    assert s["proxy"]["client_disconnects"] == 0
    assert fake.stats()["aborted"] == 0
    m = svc.metrics()
    assert metric(m, "flowshard_proxy_responses_total", route="/v1/chat/completions", code="200") == 3


def test_bad_requests_get_openai_errors_naming_the_field(launch: Any, fake_backend: Any) -> None:
    fake = fake_backend()
    svc = launch(proxy_config([fake.url], budget=4))
    c = client(svc)
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model="m", messages=MSG, max_tokens=-2)
    assert "max_tokens" in str(exc.value) and exc.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="x-flowshard-priority"):
        c.chat.completions.create(model="m", messages=MSG, extra_headers={"x-flowshard-priority": "urgent"})

    async def twice() -> None:  # two different priorities: which one was meant cannot be told
        conn = await HttpConn.open(svc.http_port)
        payload = json.dumps({"model": "m", "messages": MSG}).encode()
        conn.send_raw(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-flowshard-priority: 0\r\n"
                      b"x-flowshard-priority: 10\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                      % len(payload) + payload)
        r = await conn.response()
        assert r.status == 400 and r.json()["error"]["param"] == "x-flowshard-priority", r
        conn.close()

    run(twice())
    assert settled(svc)["totals"]["dispatched"] == 0
    assert fake.stats()["requests"] == 0


def test_bad_bodies_on_every_openai_route_are_400s_in_our_words(launch: Any, fake_backend: Any) -> None:
    """Every case of test_classify's table on every route of a real proxy, whole message (and a body
    nested too deeply is a 400, not the 500 of a RecursionError)."""
    from test_classify import BODY_400

    fake = fake_backend()
    svc = launch(proxy_config([fake.url], budget=4))

    async def main() -> None:
        keep = await HttpConn.open(svc.http_port)
        for route in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            for case, body, message in BODY_400:
                if "max_" in case and route.endswith("embeddings"):
                    continue
                r = await keep.request("POST", route, body)
                assert r.status == 400, (route, case, r)
                assert r.json()["error"]["message"] == message, (route, case)
                assert r.json()["error"]["type"] == "invalid_request_error"
        keep.close()

    run(main())
    assert settled(svc)["totals"]["dispatched"] == 0
    assert fake.stats()["requests"] == 0


def test_queue_full_is_a_rate_limit_error_with_retry_after_and_a_dropped_reason(
    launch: Any, fake_backend: Any
) -> None:
    fake = fake_backend(ttft=0.01, itl=0.05)
    svc = launch(proxy_config([fake.url], budget=1, max_queued_requests=1))

    async def go() -> None:
        c = aclient(svc)
        first = asyncio.create_task(c.chat.completions.create(model="m", messages=MSG, max_tokens=20))
        await svc.until_stats(lambda s: s["totals"]["inflight"] == 1)
        second = asyncio.create_task(c.chat.completions.create(model="m", messages=MSG, max_tokens=1))
        await svc.until_stats(lambda s: s["totals"]["queued_items"] == 1)
        with pytest.raises(openai.RateLimitError) as exc:
            await c.chat.completions.create(model="m", messages=MSG, max_tokens=1)
        response = exc.value.response
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        assert response.headers["x-llm-d-request-dropped-reason"] == "rejected-capacity"
        assert exc.value.body["code"] == "rejected_capacity"  # type: ignore[index]
        assert "queue is full" in exc.value.message
        assert (await first).choices[0].message.content == " tok" * 20
        assert (await second).choices[0].message.content == " tok"
        await c.close()

    run(go())
    s = settled(svc)
    assert band_outcomes(s) | {} == {**band_outcomes(s), "dispatched": 2, "rejected:capacity": 1}
    assert s["proxy"]["dropped"] == {"rejected:capacity": 1}


@pytest.mark.parametrize("acceptors", [0, 2])  # the proxy in the distributor, and in 2 acceptors
def test_client_disconnect_mid_stream_releases_the_ticket_and_closes_upstream(
    launch: Any, fake_backend: Any, acceptors: int
) -> None:
    fake = fake_backend(ttft=0.01, itl=0.02)
    svc = launch(proxy_config([fake.url], budget=1), acceptors=acceptors)
    c = client(svc)
    stream = c.chat.completions.create(model="m", messages=MSG, max_tokens=200, stream=True)
    pieces = iter(stream)
    next(pieces)
    next(pieces)
    assert svc.stats()["totals"]["inflight"] == 1
    stream.close()  # the client goes away mid-stream
    s = settled(svc)  # the ticket was released...
    assert s["proxy"]["client_disconnects"] == 1
    until_fake = time.monotonic() + 5
    while fake.stats()["aborted"] != 1:  # ...and the backend saw its request's connection close
        assert time.monotonic() < until_fake, fake.stats()
        time.sleep(0.01)
    assert fake.stats()["running"] == 0 and fake.stats()["completed"] == 0
    # the budget of 1 is free again: the next request goes through at once
    assert c.chat.completions.create(model="m", messages=MSG, max_tokens=1).choices[0].message.content == " tok"
    assert band_outcomes(settled(svc))["dispatched"] == 2
    # and nothing leaks: more disconnects leave the distributor's open files where they were
    fds = len(os.listdir(f"/proc/{svc.pid}/fd"))
    for _ in range(5):
        again = c.chat.completions.create(model="m", messages=MSG, max_tokens=200, stream=True)
        next(iter(again))
        again.close()
    s = settled(svc)
    assert s["proxy"]["client_disconnects"] == 6 and s["proxy"]["active"] == 0
    assert len(os.listdir(f"/proc/{svc.pid}/fd")) <= fds + 1


def test_client_leaving_while_queued_cancels_its_admission(launch: Any, fake_backend: Any) -> None:
    fake = fake_backend(ttft=0.01, itl=0.05)
    svc = launch(proxy_config([fake.url], budget=1))

    async def go() -> None:
        c = aclient(svc)
        first = asyncio.create_task(c.chat.completions.create(model="m", messages=MSG, max_tokens=10))
        await svc.until_stats(lambda s: s["totals"]["inflight"] == 1)
        waiting = asyncio.create_task(c.chat.completions.create(model="m", messages=MSG, max_tokens=1))
        await svc.until_stats(lambda s: s["totals"]["queued_items"] == 1)
        waiting.cancel()
        await svc.until_stats(lambda s: band_outcomes(s).get("evicted:cancelled") == 1)
        await first
        await c.close()

    run(go())
    s = settled(svc)
    assert band_outcomes(s)["dispatched"] == 1 and s["totals"]["queued_items"] == 0
    assert fake.stats()["requests"] == 1  # the cancelled one never reached the backend


def test_backend_dying_mid_stream_is_a_clean_error_and_one_outcome(launch: Any, fake_backend: Any) -> None:
    fake = fake_backend(ttft=0.005, itl=0.005, die_after=3)
    svc = launch(proxy_config([fake.url], proxy={"retries": 0, "backoff": 0.01}, budget=2))
    c = client(svc)
    got: list[str] = []
    with pytest.raises(openai.APIError, match="mid-stream"):
        for chunk in c.chat.completions.create(model="m", messages=MSG, max_tokens=50, stream=True):
            got.append(chunk.choices[0].delta.content or "")
    assert got == [" tok"] * 3  # what the backend sent before it died arrived first
    s = settled(svc)
    outcomes = {k: v for k, v in band_outcomes(s).items() if v}
    assert outcomes == {"dispatched": 1}, outcomes  # exactly one outcome, and the ticket is released
    assert s["proxy"]["midstream_failures"] == 1
    assert s["proxy"]["backends"][0]["errors"] == {"midstream": 1}
    # non-streamed: the client sees a 502 with an OpenAI error body
    fake.configure(die_after=-1, refuse=True)
    time.sleep(0.05)  # past the back-off that the failure above started
    with pytest.raises(openai.APIStatusError) as exc:
        c.chat.completions.create(model="m", messages=MSG, max_tokens=2)
    assert exc.value.status_code == 502 and exc.value.body["code"] == "backend_failed"  # type: ignore[index]
    assert settled(svc)["proxy"]["backends"][0]["errors"] == {"midstream": 1, "reset": 1}  # it had the request
    assert settled(svc)["totals"]["inflight"] == 0


def _streams_served_whole(svc: Any, n: int) -> None:
    """`n` streams of three tokens, one after the other, each arriving whole."""
    c = client(svc)
    for _ in range(n):
        got = [chunk.choices[0].delta.content or "" for chunk in
               c.chat.completions.create(model="m", messages=MSG, max_tokens=3, stream=True)]
        assert got == [" tok"] * 3


def test_a_stream_whose_backend_dies_before_its_first_bytes_is_tried_on_another(
    launch: Any, fake_backend: Any
) -> None:
    """vLLM sends a stream's head at once, then prefills: a backend dying then (a crash during a long
    prefill) had sent the head, so the stream was not retried and the client got an error event. The
    head is held until the first bytes now: until then nothing has reached the client, and the stream
    is tried on another backend; with no try left the client gets a 502, not a broken stream."""
    dying = fake_backend(ttft=0.01, die_after=0)  # the head, then the connection dropped before a token
    good = fake_backend(ttft=0.001, itl=0.001)
    svc = launch(proxy_config([dying.url, good.url], proxy={"retries": 1, "backoff": 30.0}, budget=4))
    _streams_served_whole(svc, 6)
    s = settled(svc)
    assert dying.stats()["aborted"] >= 3 and good.stats()["completed"] == 6
    assert s["proxy"]["midstream_failures"] == 0 and s["proxy"]["retries"] >= 3
    assert s["proxy"]["backends"][0]["errors"] == {"reset": 3} and not s["proxy"]["backends"][0]["up"]
    assert band_outcomes(s)["dispatched"] == 6

    lone = launch(proxy_config([dying.url], proxy={"retries": 0, "backoff": 0.01}, budget=4))
    with pytest.raises(openai.APIStatusError) as exc:
        list(client(lone).chat.completions.create(model="m", messages=MSG, max_tokens=3, stream=True))
    assert exc.value.status_code == 502 and exc.value.body["code"] == "backend_failed"  # type: ignore[index]
    assert band_outcomes(settled(lone))["dispatched"] == 1

    # a stream that ends before any byte (its head, then the end): as a failure before the answer
    # (review 137: an empty 200 was relayed, no event, no [DONE], and the backend counted sound)
    dying.configure(die_after=-1, end_after=0)
    empty = launch(proxy_config([dying.url, good.url], proxy={"retries": 1, "backoff": 30.0}, budget=4))
    _streams_served_whole(empty, 8)
    backend = settled(empty)["proxy"]["backends"][0]
    assert backend["errors"] == {"reset": 3} and not backend["up"]  # (out at its third, as any other)


@pytest.mark.parametrize("fault", [{"refuse": True}, {"end_after": 0}])
def test_the_failures_before_a_streams_answer_are_struck_at_its_head_not_its_first_bytes(
    launch: Any, fake_backend: Any, fault: dict[str, Any]
) -> None:
    """Review 137: with the head held until the stream's first bytes, the backends that had failed the
    request were struck only then: a backend that resets everything at once got 19 of 20 requests
    while the other prefilled for 2 s (3 of 20 when struck at the head, as they are again); review 140:
    so did one whose failures came after its heads (each stream ended before any byte), 11 of 12."""
    bad = fake_backend(**fault)  # fails every request at once (struck once another answers it)
    good = fake_backend(ttft=1.5, itl=0.001)  # a long prefill before the first bytes
    svc = launch(proxy_config([bad.url, good.url], proxy={"retries": 1, "backoff": 30.0}, budget="unlimited"))

    async def go() -> None:
        c = aclient(svc)

        async def one() -> None:
            chunks = [x async for x in await c.chat.completions.create(model="m", messages=MSG, max_tokens=2,
                                                                        stream=True)]
            assert len(chunks) == 2

        calls = []
        for _ in range(12):  # 10 a second, all within the first one's prefill
            calls.append(asyncio.create_task(one()))
            await asyncio.sleep(0.1)
        await asyncio.gather(*calls)
        await c.close()

    run(go(), timeout=60.0)
    assert len(bad.stats()["post_paths"]) <= 4, len(bad.stats()["post_paths"])  # out at its third, as before
    assert band_outcomes(settled(svc))["dispatched"] == 12


@pytest.mark.parametrize("fault", [{"die_after": 0}, {"end_after": 0}])
def test_a_request_whose_stream_every_backend_ends_after_its_head_takes_none_out(
    launch: Any, fake_backend: Any, fault: dict[str, Any]
) -> None:
    """Review 152: a request whose stream every backend ends after its head, before any byte (one that
    crashes the prefill, say), retried by its client with no other traffic between, took 3 of 4
    healthy backends out: each answering head struck the backends the request had failed on before,
    and the answering one then failed too. Those strikes wait for the answering stream's first bytes
    now: a request failing everywhere strikes none. The control: a backend that fails while another
    answers whole is struck, and out at its third (in `test_the_failures_before_a_streams_answer_...`)."""
    fakes = [fake_backend(ttft=0.001, itl=0.001) for _ in range(3)]
    svc = launch(proxy_config([f.url for f in fakes], proxy={"retries": 2, "backoff": 30.0}, budget=4))
    _streams_served_whole(svc, 3)
    c = client(svc)
    for _ in range(4):  # the client's tries of the poison request, nothing else between them
        for f in fakes:
            f.configure(**fault)
        with pytest.raises(openai.APIStatusError) as exc:
            list(c.chat.completions.create(model="m", messages=MSG, max_tokens=3, stream=True))
        assert exc.value.status_code == 502
        for f in fakes:
            f.configure(die_after=-1, end_after=-1)
    backends = settled(svc)["proxy"]["backends"]
    assert [b["up"] for b in backends] == [True] * 3, backends
    assert sum(sum(b["errors"].values()) for b in backends) == 12  # (each failure counted)
    _streams_served_whole(svc, 3)


def test_failover_to_a_healthy_backend_and_an_error_when_none_is_up(launch: Any, fake_backend: Any) -> None:
    bad = fake_backend(status=503)
    good = fake_backend(ttft=0.001, itl=0.001)
    svc = launch(proxy_config([bad.url, good.url], proxy={"retries": 1, "backoff": 30.0}, budget=8))
    c = client(svc)
    for _ in range(12):
        assert c.chat.completions.create(model="m", messages=MSG, max_tokens=1).choices[0].message.content == " tok"
    s = settled(svc)
    bad_state, good_state = s["proxy"]["backends"]
    # out at its third 5xx in a row (one request's own error, retried on each backend, must not take
    # the pool out), then backing off: never tried again here
    assert bad_state["errors"] == {"http_503": 3} and not bad_state["up"]
    assert good_state["requests"] == 12
    good.configure(status=500)
    for _ in range(5):  # the last backend's 5xx, passed through; not out for them: no other backend
        with pytest.raises(openai.InternalServerError) as exc:  # answered those requests (review 109)
            c.chat.completions.create(model="m", messages=MSG, max_tokens=1)
        assert exc.value.status_code == 500
    s = settled(svc)
    assert s["proxy"]["backends"][1]["up"] and s["proxy"]["backends"][1]["errors"] == {"http_500": 5}
    good.stop()  # nothing listens there: out at once, and with both out a request is refused 503 at once
    with pytest.raises(openai.APIStatusError) as failed:
        c.chat.completions.create(model="m", messages=MSG, max_tokens=1)
    assert failed.value.status_code == 502 and failed.value.body["code"] == "backend_unreachable"  # type: ignore[index]
    with pytest.raises(openai.APIStatusError) as none_up:
        c.chat.completions.create(model="m", messages=MSG, max_tokens=1)
    assert none_up.value.status_code == 503 and none_up.value.body["code"] == "no_backend"  # type: ignore[index]
    assert settled(svc)["proxy"]["no_backend"] == 1


async def _flood_and_light(svc: Any) -> int:
    """A flooding tenant queues 20 requests, then a light one sends 3 in a row. Returns how many flood
    requests completed before the light tenant's last one did. (Flood requests of 40 tokens, light ones
    of 1: with both 8 tokens long, each light request saw ~3 floods complete while it ran, 9 in all
    against the bound of 10, and 11 on a loaded machine; now 2 each, 6 in all. global-fcfs: 20.)"""
    c = aclient(svc)
    completed_flood = 0

    async def flood_one() -> None:
        nonlocal completed_flood
        await c.chat.completions.create(model="m", messages=MSG, max_tokens=40,
                                        extra_headers={"x-gateway-inference-fairness-id": "flood"})
        completed_flood += 1

    flood = [asyncio.create_task(flood_one()) for _ in range(20)]
    await svc.until_stats(lambda s: s["totals"]["queued_items"] >= 15)
    for _ in range(3):
        await c.chat.completions.create(model="m", messages=MSG, max_tokens=1,
                                        extra_headers={"x-gateway-inference-fairness-id": "light"})
    before = completed_flood
    await asyncio.gather(*flood)
    await c.close()
    return before


@pytest.mark.parametrize("fairness", ["round-robin", "global-fcfs"])
def test_a_flooding_tenant_next_to_a_light_one(launch: Any, fake_backend: Any, fairness: str) -> None:
    """Round robin: the light tenant keeps its share (each of its requests waits about one flood
    request). global-fcfs is the negative control: the light one waits behind the whole flood."""
    fake = fake_backend(ttft=0.005, itl=0.004)
    svc = launch(proxy_config([fake.url], budget=2, bands=[{"priority": 0, "fairness": fairness}]))
    flood_done_first = run(_flood_and_light(svc))
    if fairness == "round-robin":
        assert flood_done_first <= 10, flood_done_first
    else:
        assert flood_done_first >= 16, flood_done_first
    assert band_outcomes(settled(svc))["dispatched"] == 23


@pytest.mark.parametrize("utilization", [True, False])
@pytest.mark.parametrize("acceptors", [0, 2])  # the detector fed by the distributor's proxy, or the acceptors'
def test_scraped_saturation_holds_requests_back_and_releases_them_as_the_backend_drains(
    launch: Any, fake_backend: Any, acceptors: int, utilization: bool
) -> None:
    """A backend with a batch of 1: with the utilization detector flowshard keeps the backend's
    waiting queue near the threshold and holds the rest itself; without it (negative control) every
    request goes straight into the backend's queue."""
    fake = fake_backend(ttft=0.01, itl=0.01, max_running=1)
    proxy = {"utilization": utilization, "queue_threshold": 2.0, "scrape_interval": 0.02, "staleness": 1.0}
    svc = launch(proxy_config([fake.url], proxy=proxy, budget="unlimited"), acceptors=acceptors)

    async def go() -> int:
        c = aclient(svc)
        await svc.until_stats(lambda s: not utilization or not s["proxy"]["backends"][0]["stale"])
        calls = [asyncio.create_task(c.chat.completions.create(model="m", messages=MSG, max_tokens=4))
                 for _ in range(8)]
        peak_held = 0
        while not all(t.done() for t in calls):
            s = await svc.astats()
            peak_held = max(peak_held, s["totals"]["queued_items"])
            await asyncio.sleep(0.01)
        for t in calls:
            assert (await t).choices[0].message.content == " tok" * 4
        await c.close()
        return peak_held

    peak_held = run(go())
    peak_waiting = fake.stats()["peak_waiting"]
    if utilization:
        assert peak_held >= 3, peak_held  # flowshard held requests back...
        assert peak_waiting <= 3, peak_waiting  # ...so the backend's queue stayed near the threshold
        s = settled(svc)
        assert s["proxy"]["backends"][0]["scrape_errors"] == 0
        assert metric(svc.metrics(), "flowshard_backend_metrics_stale", backend=fake.url) == 0
    else:
        assert peak_held == 0 and peak_waiting >= 6, (peak_held, peak_waiting)
    assert band_outcomes(settled(svc))["dispatched"] == 8


@pytest.mark.parametrize("acceptors", [0, 2])  # (with acceptors, theirs take it out: they tell the distributor)
def test_a_backend_out_of_rotation_does_not_lend_the_pool_its_idle_metrics(
    launch: Any, fake_backend: Any, acceptors: int
) -> None:
    """Review 81: a backend taken out after failed requests, its /metrics still idle, halved the pool's
    figure, and the backend left was driven to twice its threshold. It takes no request now, so its
    figures do not count: the one left is kept near its threshold as if it were alone."""
    bad = fake_backend(refuse=True)  # drops every request; its metrics say idle
    good = fake_backend(ttft=0.05, itl=0.01, max_running=1)
    proxy = {"utilization": True, "queue_threshold": 5.0, "scrape_interval": 0.02, "staleness": 1.0,
             "retries": 1, "backoff": 30.0}
    svc = launch(proxy_config([bad.url, good.url], proxy=proxy, budget="unlimited"), acceptors=acceptors)

    async def go() -> None:
        c = aclient(svc)
        await svc.until_stats(lambda s: not any(b["stale"] for b in s["proxy"]["backends"]))
        for _ in range(6):  # (requests take turns: the bad one is tried first by every other one, fails
            # and is retried on the other, and is taken out at its third)
            await c.chat.completions.create(model="m", messages=MSG, max_tokens=1)
        await svc.until_stats(lambda s: not s["proxy"]["backends"][0]["up"])
        calls = [asyncio.create_task(c.chat.completions.create(model="m", messages=MSG, max_tokens=4))
                 for _ in range(20)]
        for t in calls:
            assert (await t).choices[0].message.content == " tok" * 4
        await c.close()

    run(go(), timeout=60.0)
    peak_waiting = good.stats()["peak_waiting"]
    assert peak_waiting <= 7, peak_waiting  # near the threshold of 5 (counted idle, the bad one let it reach 10)
    assert band_outcomes(settled(svc))["dispatched"] == 26


@pytest.mark.parametrize("acceptors", [0, 2])
def test_streams_held_up_by_clients_that_do_not_read_do_not_hold_the_pool(
    launch: Any, fake_backend: Any, acceptors: int
) -> None:
    """Review 91: a stream relayed to a client that does not read stays in flight here after the backend
    is done with it. Counted as a request the backend's scrape does not show (not arrived yet), three
    of them held every other request while the backend sat idle (12 s in the review, until the
    clients read). A stream that waits on its client is not counted so."""
    fake = fake_backend(ttft=0.01, itl=0.0, max_running=4)
    proxy = {"utilization": True, "queue_threshold": 2.0, "scrape_interval": 0.02, "staleness": 1.0}
    svc = launch(proxy_config([fake.url], proxy=proxy, budget="unlimited"), acceptors=acceptors)
    big = json.dumps({"model": "m" * 8000, "messages": MSG, "max_tokens": 800, "stream": True}).encode()

    async def go() -> None:
        await svc.until_stats(lambda s: not s["proxy"]["backends"][0]["stale"])
        loop = asyncio.get_running_loop()
        stalled = []
        for _ in range(3):  # ~6.5 MB each, far more than the kernel's buffers hold: the relay waits
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", svc.http_port))
            await loop.sock_sendall(s, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                                       b"application/json\r\ncontent-length: %d\r\n\r\n%b" % (len(big), big))
            stalled.append(s)
        try:
            deadline = loop.time() + 10
            while fake.stats()["running"] or fake.stats()["requests"] < 3:  # the backend is done with them
                assert loop.time() < deadline, fake.stats()
                await asyncio.sleep(0.05)
            assert (await svc.astats())["proxy"]["backends"][0]["inflight"] == 3  # (still relayed here)
            c = aclient(svc)
            t0 = loop.time()
            done = await asyncio.wait_for(asyncio.gather(*(
                c.chat.completions.create(model="m", messages=MSG, max_tokens=1) for _ in range(6))), 20)
            took = loop.time() - t0
            assert all(r.choices[0].message.content == " tok" for r in done)
            assert took < 5.0, took  # (counted unseen: held until the stalled clients read, or were dropped)
            await c.close()
        finally:
            for s in stalled:
                s.close()

    run(go(), timeout=60.0)


@pytest.mark.parametrize("acceptors", [0, 2])
def test_a_backend_back_from_its_back_off_lets_held_requests_go_at_once(
    launch: Any, fake_backend: Any, acceptors: int
) -> None:
    """Review 85: a backend comes back when its back-off ends, which no event reports; the pool's figure
    (over the backends in rotation) then falls, but nothing re-planned: a request held while it was
    out waited for an unrelated event (20 s). Now a plan pass comes at that moment."""
    back = fake_backend(refuse=True, ttft=0.01)
    busy = fake_backend(ttft=0.01, max_running=1)
    proxy = {"utilization": True, "queue_threshold": 2.0, "scrape_interval": 0.05, "staleness": 1.0,
             "retries": 1, "backoff": 2.0, "max_backoff": 2.0}
    svc = launch(proxy_config([back.url, busy.url], proxy=proxy, budget="unlimited"), acceptors=acceptors)

    async def go() -> float:
        c = aclient(svc)
        await svc.until_stats(lambda s: not any(b["stale"] for b in s["proxy"]["backends"]))
        while (await svc.astats())["proxy"]["backends"][0]["up"]:  # (taken out by its refusals)
            await c.chat.completions.create(model="m", messages=MSG, max_tokens=1)
        out_at = time.monotonic()
        back.configure(refuse=False)
        busy.configure(ttft=60.0)  # 4 direct requests: 3 waiting, 1.5 at its threshold of 2
        direct = openai.AsyncOpenAI(base_url=busy.url + "/v1", api_key="x", max_retries=0, timeout=60)
        loading = [asyncio.create_task(direct.chat.completions.create(model="m", messages=MSG, max_tokens=1))
                   for _ in range(4)]
        await svc.until_stats(lambda s: s["proxy"]["backends"][1]["saturation"] >= 1.5)
        before = (await svc.astats())["totals"]["dispatched"]
        held = asyncio.create_task(c.chat.completions.create(model="m", messages=MSG, max_tokens=1))
        # held while the pool is the busy backend alone (1.5), dispatched once the other is back (0.75)
        await svc.until_stats(lambda s: s["totals"]["dispatched"] > before, timeout=15.0)
        dispatched = time.monotonic() - out_at
        for t in (*loading, held):
            t.cancel()
        await asyncio.gather(*loading, held, return_exceptions=True)
        await direct.close()
        await c.close()
        return dispatched

    dispatched = run(go(), timeout=60.0)
    assert dispatched < 8.0, dispatched  # (the back-off: 2 s; before, the next scrape showing a fall: 60 s)


def test_pipelined_requests_wait_for_a_streamed_response_and_keep_their_order(
    launch: Any, fake_backend: Any
) -> None:
    """A streamed response holds its place in the connection's response order: what is pipelined
    behind it is answered after its last chunk, and a stream behind a pending answer waits its turn."""
    fake = fake_backend(ttft=0.01, itl=0.01)
    svc = launch(proxy_config([fake.url], budget=4))
    stream = json.dumps({"model": "m", "messages": MSG, "max_tokens": 5, "stream": True})

    async def go() -> bytes:
        conn = await HttpConn.open(svc.http_port)
        conn.send("POST", "/v1/chat/completions", stream)
        conn.send("GET", "/healthz")
        conn.send("POST", "/v1/chat/completions", stream)
        conn.send_raw(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        data = await asyncio.wait_for(conn.reader.read(-1), 10)
        conn.close()
        return data

    data = run(go())
    first_done = data.index(b"data: [DONE]")
    first_health = data.index(b'{"status":"ok"}')
    second_stream = data.index(b"HTTP/1.1 200 OK", first_health)
    assert first_done < first_health < second_stream < data.rindex(b'{"status":"ok"}')
    assert data.count(b"data: [DONE]") == 2 and data.count(b" tok") == 10
    assert data.count(b"0\r\n\r\n") >= 2  # each chunked stream properly ended
    assert b'"usage"' not in data  # the usage chunk flowshard asked for was taken out
    assert band_outcomes(settled(svc))["dispatched"] == 2


def test_proxy_body_limit_is_its_own(launch: Any, fake_backend: Any) -> None:
    """Prompts are large: proxied routes take bodies up to [proxy] max_body_bytes, beyond the admission
    API's limit; over it the answer is 413 and nothing is admitted."""
    fake = fake_backend(ttft=0.001, itl=0.001)
    svc = launch(proxy_config([fake.url], proxy={"max_body_bytes": 200_000}, budget=4,
                              service={"max_body_bytes": 1024}))
    c = client(svc)
    big = [{"role": "user", "content": "x" * 100_000}]
    assert c.chat.completions.create(model="m", messages=big, max_tokens=1).choices[0].message.content == " tok"
    with pytest.raises(openai.APIStatusError) as exc:
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 300_000}], max_tokens=1)
    assert exc.value.status_code == 413
    assert settled(svc)["proxy"]["tokens"]["estimated"] == 25_000 + 1  # 4 characters a token + max_tokens


@pytest.mark.parametrize("acceptors", [0, 2])  # the proxy in the distributor, and in 2 acceptors
def test_sigterm_lets_a_running_stream_finish(launch: Any, fake_backend: Any, acceptors: int) -> None:
    fake = fake_backend(ttft=0.01, itl=0.02)
    svc = launch(proxy_config([fake.url], budget=4, service={"drain_timeout": 5.0}), acceptors=acceptors)
    c = client(svc)
    stream = iter(c.chat.completions.create(model="m", messages=MSG, max_tokens=30, stream=True))
    next(stream)
    svc.signal(signal.SIGTERM)
    rest = list(stream)
    assert len(rest) == 29
    assert svc.wait() == 0
    assert fake.stats()["completed"] == 1 and fake.stats()["aborted"] == 0


def test_backend_dying_in_the_middle_of_an_event_is_still_a_clean_error(launch: Any) -> None:
    """The backend's connection drops inside an event (half a chunk sent): the half event is not
    glued to flowshard's error event (the openai client then failed to decode JSON); the client
    gets the whole events before it, then APIError."""
    event = (b'data: {"id":"c1","object":"chat.completion.chunk","created":0,"model":"m",'
             b'"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n')
    payload = event + b'data: {"id":"c1","object":"chat.compl'
    server = socket.create_server(("127.0.0.1", 0))

    def serve_one() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                         + b"%x\r\n%b\r\n" % (len(payload), payload))

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        svc = launch(proxy_config([url], proxy={"retries": 0, "utilization": False}, budget=2))
        got: list[str] = []
        with pytest.raises(openai.APIError, match="mid-stream"):
            for chunk in client(svc).chat.completions.create(model="m", messages=MSG, stream=True):
                got.append(chunk.choices[0].delta.content or "")
        assert got == ["hi"]
        assert settled(svc)["proxy"]["midstream_failures"] == 1
    finally:
        thread.join(5)
        server.close()


def test_drain_deadline_ends_a_queued_request_with_shutdown_not_a_late_dispatch(
    launch: Any, fake_backend: Any
) -> None:
    """At the drain deadline the running stream is cut and its ticket released; that release must not
    dispatch the request still queued behind it (to a proxy already closing: it answered 500
    internal_error), which ends `evicted: shutdown`, 503 with the dropped-reason header."""
    fake = fake_backend(ttft=0.01, itl=0.05)
    svc = launch(proxy_config([fake.url], proxy={"utilization": False}, budget=1,
                              service={"drain_timeout": 0.5}))
    c = client(svc)
    stream = iter(c.chat.completions.create(model="m", messages=MSG, max_tokens=200, stream=True))
    next(stream)
    body = json.dumps({"model": "m", "messages": MSG, "max_tokens": 1}).encode()
    host, port = svc.url("").split("//")[1].split("/")[0].rsplit(":", 1)
    queued = socket.create_connection((host, int(port)), timeout=10)
    queued.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n"
                   % len(body) + body)
    deadline = time.monotonic() + 5
    while svc.stats()["totals"]["queued_items"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    svc.signal(signal.SIGTERM)
    answer = b""
    while chunk := queued.recv(65536):
        answer += chunk
    queued.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer
    assert b"x-llm-d-request-dropped-reason: evicted-shutdown" in head.lower(), answer
    assert json.loads(payload)["error"]["code"] == "evicted_shutdown"
    with pytest.raises(openai.APIError):
        list(stream)
    assert svc.wait() == 0
    assert fake.stats()["requests"] == 1  # the queued request never reached the backend


def _until(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.parametrize("acceptors", [0, 2])  # the proxy in the distributor, and in 2 acceptors
def test_drain_end_ends_a_running_stream_with_an_error_event_and_closes_upstream(
    launch: Any, fake_backend: Any, acceptors: int
) -> None:
    """A stream still running when the drain ends is ended like one whose backend failed mid-stream:
    an SSE error event, which the openai client raises as APIError with the reason (not a cut
    connection, APIConnectionError); the backend sees its request closed; the service exits 0 in time."""
    drain = 0.5
    fake = fake_backend(ttft=0.01, itl=0.05)
    svc = launch(proxy_config([fake.url], budget=4, service={"drain_timeout": drain}), acceptors=acceptors)
    pieces = iter(client(svc).chat.completions.create(model="m", messages=MSG, max_tokens=400, stream=True))
    got = [next(pieces).choices[0].delta.content]
    signalled = time.monotonic()
    svc.signal(signal.SIGTERM)
    with pytest.raises(openai.APIError) as exc:
        got.extend(chunk.choices[0].delta.content for chunk in pieces)
    assert type(exc.value) is openai.APIError, repr(exc.value)  # an error event, not a connection error
    assert exc.value.code == "shutting_down" and exc.value.type == "service_unavailable"
    assert "the service is shutting down: stream ended at the end of the drain" in exc.value.message
    assert 1 < len(got) < 400 and set(got) == {" tok"}  # what was generated in the drain arrived first
    assert svc.wait() == 0
    assert time.monotonic() - signalled < drain + 2.0  # (0.6 s here)
    _until(lambda: fake.stats()["aborted"] == 1)  # the upstream request was closed: the backend stopped
    assert fake.stats()["completed"] == 0 and fake.stats()["running"] == 0
    assert "Traceback" not in svc.stderr() and "failed" not in svc.stderr()


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _dechunk(body: bytes) -> bytes:
    """A chunked body, whole: raises unless it ends with the zero-size chunk."""
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert body == b"\r\n", body
            return out
        out += body[:size]
        assert body[size:size + 2] == b"\r\n"
        body = body[size + 2:]


def test_drain_end_finishes_the_http_messages_it_ends_and_closes_their_connections(
    launch: Any, fake_backend: Any
) -> None:
    """On the wire: the ended stream's last event is the OpenAI-shaped error, then the chunked end,
    then the connection closes; a non-streamed response still in progress is answered 503
    `shutting_down` (connection: close), not left without an answer. Both upstream requests close."""
    fake = fake_backend(ttft=0.01, itl=0.05)
    svc = launch(proxy_config([fake.url], budget=4, service={"drain_timeout": 0.5}))
    host, port = svc.url("").split("//")[1].split("/")[0].rsplit(":", 1)

    def post(stream: bool) -> socket.socket:
        body = json.dumps({"model": "m", "messages": MSG, "max_tokens": 400, "stream": stream}).encode()
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%b" % (len(body), body))
        return sock

    streamed, whole = post(True), post(False)
    first = b""
    while b"data: " not in first:  # the stream is being relayed
        first += streamed.recv(65536)
    _until(lambda: fake.stats()["running"] == 2)
    svc.signal(signal.SIGTERM)
    answer = first + _read_until_closed(streamed)  # EOF: the connection was closed after the end
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower(), head
    events = _dechunk(body).split(b"\n\n")
    assert events[-1] == b"" and events[-2].startswith(b"data: "), events[-3:]
    error = json.loads(events[-2][len(b"data: "):])["error"]
    assert error["code"] == "shutting_down" and error["type"] == "service_unavailable", error
    assert error["message"].startswith("flowshard: the service is shutting down: stream ended at the end of "
                                       "the drain"), error
    assert all(json.loads(e[len(b"data: "):])["choices"] for e in events[:-2])  # whole events before it
    head, _, payload = _read_until_closed(whole).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"connection: close" in head.lower(), head
    assert json.loads(payload)["error"]["code"] == "shutting_down"
    streamed.close()
    whole.close()
    assert svc.wait() == 0
    _until(lambda: fake.stats()["aborted"] == 2)
    assert fake.stats()["completed"] == 0


def test_serve_backend_flag_is_validated() -> None:
    proc = subprocess.run([sys.executable, "-m", "flowshard.cli", "serve", "--backend", "10.0.0.5:8000"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "--backend: '10.0.0.5:8000' must be an http:// or https:// URL" in proc.stderr


def test_a_backend_given_as_an_openai_base_url_is_refused_with_the_url_to_give() -> None:
    """Review 179: `http://host:8000/v1` (the OpenAI client's base_url habit) was accepted: every route
    went to /v1/v1/..., and with the detector on every request waited out its TTL (its metrics looked
    for at /v1/metrics). A path prefix of another kind still goes (a backend behind a router)."""
    from flowshard.config import ConfigError, ProxyConfig, check_backend_url

    with pytest.raises(ValueError, match=r"ends in /v1, as an OpenAI base_url does.*give 'http://h:8000'"):
        check_backend_url("http://h:8000/v1/")
    with pytest.raises((ValueError, ConfigError), match="backends"):
        ProxyConfig(backends=["http://h:8000/v1"])
    assert check_backend_url("http://h:8000/vllm-a/") == "http://h:8000/vllm-a"
    with pytest.raises(ValueError, match="ends in /v1"):
        check_backend_url("http://h:8000/V1")


def test_a_backend_without_readable_metrics_is_named_with_the_way_out(launch: Any, fake_backend: Any) -> None:
    """A review (a newcomer's first hour): an OpenAI server without vLLM metrics held every request until
    its TTL, and the one log line said only that its scrapes failed. It now says what to do, also when
    its scrapes failed otherwise first (review 93: a backend started after flowshard is first not
    there at all, and the 404s that followed were not logged); an error that may pass (a 500) does not."""
    missing = fake_backend(metrics_status=500)  # (first failing otherwise)
    failing = fake_backend(metrics_status=500)
    svc = launch(proxy_config([missing.url, failing.url], proxy={"utilization": True, "scrape_interval": 0.02}))

    def logged(n: int) -> None:
        deadline = time.monotonic() + 10
        while svc.stderr().count("metrics scrape failed") < n:
            assert time.monotonic() < deadline, svc.stderr()
            time.sleep(0.05)

    logged(2)
    missing.configure(metrics_status=404)
    logged(3)
    lines = {url: [line for line in svc.stderr().splitlines() if url in line] for url in (missing.url, failing.url)}
    assert any("HTTP 404" in line and "utilization = false" in line for line in lines[missing.url]), lines
    assert not any("utilization = false" in line for line in lines[failing.url]), lines
    time.sleep(0.3)  # (logged once for the run of 404s, not per scrape)
    assert svc.stderr().count("metrics scrape failed") == 3, svc.stderr()


def test_stale_metrics_count_as_saturated_until_a_scrape_succeeds(launch: Any, fake_backend: Any) -> None:
    fake = fake_backend(ttft=0.001, itl=0.001)
    proxy = {"utilization": True, "scrape_interval": 0.02, "staleness": 0.2}
    svc = launch(proxy_config([fake.url], proxy=proxy, budget="unlimited"))

    async def go() -> None:
        c = aclient(svc)
        await svc.until_stats(lambda s: not s["proxy"]["backends"][0]["stale"])
        assert (await c.chat.completions.create(model="m", messages=MSG, max_tokens=1)).choices
        fake.configure(metrics_status=500)  # the backend's metrics go away: after `staleness`, saturated
        # (stale, and for the 500s: under load a slow scrape alone can make it stale for a moment)
        s = await svc.until_stats(lambda s: s["proxy"]["backends"][0]["stale"]
                                  and "HTTP 500" in s["proxy"]["backends"][0]["last_scrape_error"])
        assert s["totals"]["saturation"] == 1.0
        held = asyncio.create_task(c.chat.completions.create(model="m", messages=MSG, max_tokens=1))
        await svc.until_stats(lambda s: s["totals"]["queued_items"] == 1)
        await asyncio.sleep(0.1)
        assert not held.done()  # held in flowshard, not sent
        fake.configure(metrics_status=0)  # a good scrape: room again, the held request goes at once
        assert (await held).choices[0].message.content == " tok"
        await c.close()

    run(go())
    s = settled(svc)
    assert s["proxy"]["backends"][0]["scrape_errors"] > 0
    assert metric(svc.metrics(), "flowshard_backend_scrape_errors_total", backend=fake.url) > 0
    assert fake.stats()["requests"] == 2


def test_bench_proxy_runs_and_cleans_up() -> None:
    """The proxy benchmark's quickest mode works end to end (the published figures come from its full mode)."""
    proc = subprocess.run([sys.executable, "-m", "bench.proxy", "--sequential", "20"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "direct p50" in proc.stdout and "proxy  p50" in proc.stdout


def test_flowshard_bench_plays_a_scenario_through_proxy_mode(tmp_path: Any) -> None:
    out = tmp_path / "proxy.json"
    proc = subprocess.run(
        [sys.executable, "-m", "flowshard.cli", "bench", "bench/scenarios/priority-isolation.toml", "--proxy",
         "--duration", "2", "--warmup", "0.5", "--json", str(out)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "through proxy mode" in proc.stdout and "checkout" in proc.stdout
    flows = {f["flow"]: f for f in json.loads(out.read_text())["flows"]}
    assert flows["checkout"]["band"] == "critical" and flows["checkout"]["completed"] > 0
    assert all(f["errors"] == 0 for f in flows.values())
    # a flow that completed nothing (the lowest band's, starved here) has no latency: "–" and null, not nan
    assert "nan" not in proc.stdout and "NaN" not in out.read_text()
    assert all(f["ttft_ms_p50"] is None and f["total_ms_p50"] is None for f in flows.values() if not f["completed"])


class _FailingAdmission:
    """An admission whose admit raises: a bug of ours, which must still answer the client."""

    accepting = True
    ready = True
    reading = True

    def admit(self, *args: Any, **kw: Any) -> int:
        raise RuntimeError("boom")

    def cancel(self, request_id: int) -> None:
        pass

    def release(self, ticket: int) -> bool:
        return False

    def delivered(self, ticket: int) -> None:
        pass

    def release_all(self, waiter: Any) -> int:
        return 0

    def stats(self) -> dict[str, Any]:
        return {}

    def metrics(self) -> tuple[bytes, str]:
        return b"", "text/plain"


class _HoldingAdmission(_FailingAdmission):
    """An admission that holds every request (no outcome) and records the cancels."""

    def __init__(self) -> None:
        self.next = 0
        self.cancels: list[int] = []

    def admit(self, *args: Any, **kw: Any) -> int:
        self.next += 1
        return self.next

    def cancel(self, request_id: int) -> None:
        self.cancels.append(request_id)


@pytest.mark.parametrize("back_at_once", [True, False, "out again"])
def test_requests_waiting_when_the_last_backend_goes_out_are_answered_503_unless_it_is_back_soon(
    back_at_once: bool | str,
) -> None:
    """Review 165: answered as soon as the last backend went out, a connect refused for 0.15 s (the next
    good scrape brought the backend back 50 ms later) answered 4 of 6 waiting requests 503. The waiting
    requests are answered 503 `no_backend` (their admissions cancelled) only once none has been up for
    `NONE_UP_GRACE` since the last one went out; the control stays out and they are. Review 166: back
    and out again within the grace, they were answered at the first outage's grace (out again here at
    0.35 s: not answered at 0.5 s)."""
    from distributor.http import HttpLimits, start_http_server
    from distributor.proxy import NONE_UP_GRACE, Proxy
    from flowshard.config import Config, ProxyConfig

    body = json.dumps({"model": "m", "messages": MSG, "max_tokens": 2}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n" % len(body)) + body

    async def go() -> tuple[list[int], list[int]]:
        admission = _HoldingAdmission()
        pc = ProxyConfig(backends=["http://127.0.0.1:9"], utilization=False, backoff=4.0)
        proxy = Proxy(Config(proxy=pc), admission, lambda: None)
        server = await start_http_server(admission, "127.0.0.1", 0, HttpLimits(), lease=300.0, proxy=proxy)
        try:
            conn = await HttpConn.open(server.sockets[0].getsockname()[1])
            conn.send_raw(request + request)  # two waiting, pipelined
            for _ in range(200):
                if len(proxy.waiting) == 2:
                    break
                await asyncio.sleep(0.005)
            loop = asyncio.get_running_loop()
            backend = proxy.pool.backends[0]
            proxy.pool.failed(backend, loop.time(), "connect", "refused")  # the last one out
            if back_at_once:
                await asyncio.sleep(0.05)
                proxy.pool.succeeded(backend)  # (as a good scrape brings one a scrape took out)
            if back_at_once == "out again":
                await asyncio.sleep(0.3)
                proxy.pool.failed(backend, loop.time(), "connect", "refused")
                await asyncio.sleep(NONE_UP_GRACE - 0.2)  # the first outage's grace has passed ...
                assert admission.cancels == []  # ... the second's has not
            await asyncio.sleep(NONE_UP_GRACE + 0.2)
            statuses = []
            if back_at_once is not True:
                statuses = [(await conn.response(2)).status for _ in range(2)]
            conn.close()
            return statuses, sorted(admission.cancels)
        finally:
            server.close()
            await proxy.close()

    statuses, cancels = run(go(), timeout=20)
    if back_at_once is True:
        assert (statuses, cancels) == ([], [])
    else:
        assert (statuses, cancels) == ([503, 503], [1, 2])


def test_a_failure_inside_the_proxy_handler_answers_500_and_the_connection_goes_on() -> None:
    from distributor.http import HttpLimits, start_http_server
    from distributor.proxy import Proxy
    from flowshard.config import Config, ProxyConfig

    async def go() -> None:
        admission = _FailingAdmission()
        proxy = Proxy(Config(proxy=ProxyConfig(backends=["http://127.0.0.1:9"], utilization=False)), admission,
                      lambda: None)
        server = await start_http_server(admission, "127.0.0.1", 0, HttpLimits(), lease=300.0, proxy=proxy)
        try:
            conn = await HttpConn.open(server.sockets[0].getsockname()[1])
            conn.send("POST", "/v1/chat/completions", {"model": "m", "messages": MSG})
            r = await conn.response(5)
            assert r.status == 500 and r.json()["error"]["code"] == "internal_error", r
            assert proxy.stats.internal_errors == 1  # counted, as an acceptor counts a failed admission
            assert (await conn.request("GET", "/healthz", timeout=5)).status == 200  # the pipeline did not stall
            conn.close()
        finally:
            server.close()
            await proxy.close()

    run(go())


def test_a_slow_reader_slows_its_stream_instead_of_being_dropped(launch: Any, fake_backend: Any) -> None:
    """A client that does not read for a while: the relay waits for it (the backend's stream is not
    read meanwhile), so it gets its whole answer even though it is far larger than the 1 MiB the HTTP
    front lets pile up unread before it drops a client."""
    fake = fake_backend(ttft=0.0, itl=0.0)
    svc = launch(proxy_config([fake.url], budget=4))
    request = json.dumps({"model": "m", "messages": MSG, "max_tokens": 45000, "stream": True})

    async def go() -> bytes:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)  # the kernel must not absorb the answer
        sock.connect(("127.0.0.1", svc.http_port))
        sock.setblocking(False)
        conn = HttpConn(*await asyncio.open_connection(sock=sock))
        conn.writer.transport.pause_reading()  # a client that does not read...
        conn.send("POST", "/v1/chat/completions", request)
        await asyncio.sleep(1.5)
        conn.writer.transport.resume_reading()  # ...then does
        data = b""
        while b"data: [DONE]" not in data:
            chunk = await asyncio.wait_for(conn.reader.read(1 << 20), 10)
            assert chunk, "connection closed before the end of the stream"
            data += chunk
        conn.close()
        return data

    data = run(go())
    assert len(data) > 6 << 20 and data.count(b" tok") == 45000  # beyond 4 MiB of kernel buffer + 1 MiB
    s = settled(svc)
    assert s["proxy"]["client_disconnects"] == 0
    assert fake.stats()["completed"] == 1 and fake.stats()["aborted"] == 0


class _RecordingAdmission(_FailingAdmission):
    """Dispatches every admission at once and records how each ticket is released."""

    def __init__(self) -> None:
        self.released: list[tuple[int, int]] = []
        self.unclaimed: list[int] = []  # released as never forwarded: the client left first
        self._next = 0

    def admit(self, waiter: Any, cid: Any, *args: Any, **kw: Any) -> int:
        self._next += 1
        rid, ticket = self._next, 1000 + self._next
        asyncio.get_running_loop().call_soon(waiter.deliver, cid, rid, Outcome.DISPATCHED, ticket, 0.0, 0)
        return rid

    def release(self, ticket: int, tokens: int = -1) -> bool:
        self.released.append((ticket, tokens))
        return True

    def unclaim(self, ticket: int) -> None:
        self.unclaimed.append(ticket)


@pytest.mark.parametrize("stream", [False, True])
def test_the_release_carries_the_backends_actual_usage(fake_backend: Any, stream: bool) -> None:
    """vtc is charged the estimate at dispatch; the release reports what the backend served
    (prompt + completion tokens from its `usage`), so the shard corrects the flow's counter."""
    from distributor.http import HttpLimits, start_http_server
    from distributor.proxy import Proxy
    from flowshard.config import Config, ProxyConfig

    fake = fake_backend()

    async def go() -> None:
        admission = _RecordingAdmission()
        proxy = Proxy(Config(proxy=ProxyConfig(backends=[fake.url], utilization=False)), admission, lambda: None)
        await proxy.start()
        server = await start_http_server(admission, "127.0.0.1", 0, HttpLimits(), lease=300.0, proxy=proxy)
        try:
            oai = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1",
                                     api_key="sk-test", max_retries=0, timeout=10)
            if stream:
                s = await oai.chat.completions.create(model="m", messages=MSG, max_tokens=5, stream=True,
                                                      stream_options={"include_usage": True})
                usage = [chunk.usage async for chunk in s if chunk.usage is not None][-1]
            else:
                r = await oai.chat.completions.create(model="m", messages=MSG, max_tokens=5)
                usage = r.usage
            assert usage is not None
            deadline = time.monotonic() + 5
            while not admission.released:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert admission.released == [(1001, usage.prompt_tokens + usage.completion_tokens)]
            await oai.close()
        finally:
            server.close()
            await proxy.close()

    run(go())


@pytest.mark.parametrize("stream", [False, True])
def test_a_backends_usage_out_of_range_is_taken_as_none_reported(caplog: pytest.LogCaptureFixture,
                                                                  stream: bool) -> None:
    """`Proxy._settle_usage` took the backend's `usage` as the request's actual cost unchecked
    (review 18): msgspec decodes any 64-bit integer, so a backend reporting 2^64-1 tokens skewed the
    flow's vtc charge without bound and, with acceptors, made the release unencodable on the link (its
    ticket never released: test_proxy_acceptors). Out of range (negative, or past 2^32 in all, the
    bound of `tokens` everywhere) is now no usage reported: released without a correction, nothing
    added to the token counters, the backend's `usage` error counted (it stays up) and logged once."""
    import aiohttp
    from aiohttp import web

    from distributor.http import HttpLimits, start_http_server
    from distributor.proxy import Proxy
    from flowshard.config import Config, ProxyConfig

    bad = [(2**64 - 1, 2**64 - 1), (-1, 5), (5, -1), (2**32, 1), (2**31, 2**31 + 1)]
    usages = iter([*bad, (2**32, 0)])  # the last: the bound itself is a cost

    async def completions(request: web.Request) -> web.StreamResponse:
        usage = b'{"prompt_tokens":%d,"completion_tokens":%d}' % next(usages)
        if not stream:
            return web.Response(body=b'{"object":"chat.completion","choices":[],"usage":%b}' % usage,
                                content_type="application/json")
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n')
        await resp.write(b'data: {"choices":[],"usage":%b}\n\ndata: [DONE]\n\n' % usage)
        await resp.write_eof()
        return resp

    async def go() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        sock = socket.create_server(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        admission = _RecordingAdmission()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        proxy = Proxy(Config(proxy=ProxyConfig(backends=[url], utilization=False)), admission, lambda: None)
        await proxy.start()
        server = await start_http_server(admission, "127.0.0.1", 0, HttpLimits(), lease=300.0, proxy=proxy)
        try:
            async with aiohttp.ClientSession() as client:
                for n in range(len(bad) + 1):
                    async with client.post(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
                                           "/v1/chat/completions",
                                           json={"model": "m", "messages": MSG, "stream": stream}) as r:
                        assert r.status == 200
                        body = await r.read()
                        assert b"usage" not in body or not stream  # (the client did not ask: stripped)
                    deadline = time.monotonic() + 5
                    while len(admission.released) <= n:
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.01)
            assert admission.released == [(1001 + n, -1) for n in range(len(bad))] + [(1006, 2**32)]
            st = proxy.snapshot()
            assert (st["tokens"]["prompt"], st["tokens"]["completion"]) == (2**32, 0)
            assert st["backends"][0]["errors"] == {"usage": len(bad)} and st["backends"][0]["up"]
            assert len([r for r in caplog.records if "out of range" in r.getMessage()]) == 1
        finally:
            server.close()
            await proxy.close()
            await runner.cleanup()

    run(go())


@pytest.mark.parametrize("acceptors", [0, 2])  # the detector fed by the distributor's proxy, or the acceptors'
def test_a_pool_with_no_backend_listening_answers_503_at_once_not_after_a_ttl(
    launch: Any, acceptors: int, refused_url: str
) -> None:
    """Nothing listens at the only backend: its scrapes fail to connect, which takes it out like a
    failed request would, and a request gets 503 `no_backend` at once. (It used to count only as
    stale metrics, i.e. saturated: every request waited its whole TTL for a 429.)

    Robust on a loaded machine: a scrape takes the backend out for `backoff` (1 s by default, then
    2 s, ...) and the next failed scrape after that takes it out again, so with the default a request
    that came a little late could land in that gap (sent to the backend: 502) — the back-off here
    outlasts the test; the client is built before the clock starts; and the counter is read until
    every acceptor has reported (its report may take over the 1 s a render waits for it)."""
    url = refused_url
    proxy = {"utilization": True, "scrape_interval": 0.02, "staleness": 0.2, "backoff": 30.0}
    svc = launch(proxy_config([url], proxy=proxy, budget="unlimited", extra="default_ttl = 30.0"), acceptors=acceptors)
    deadline = time.monotonic() + 5
    while svc.stats()["proxy"]["backends"][0]["up"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    api = client(svc)
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as err:
        api.chat.completions.create(model="m", messages=MSG, max_tokens=1)
    assert time.monotonic() - t0 < 5.0  # (at once, not after the TTL, 30 s)
    assert err.value.status_code == 503 and err.value.code == "no_backend"
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert wait_until(lambda: metric(svc.metrics(), "flowshard_proxy_no_backend_total") >= 1, 10.0, 0.1)


@pytest.mark.parametrize("acceptors", [0, 2])
def test_requests_the_detector_holds_when_the_last_backend_goes_out_are_answered_503_not_after_their_ttl(
    launch: Any, fake_backend: Any, acceptors: int
) -> None:
    """Review 160: requests held by the utilization detector (the backend full by its metrics) when the
    only backend dies waited out their whole TTL (a pool with none up counts saturated), while each
    later one was answered 503 `no_backend` at once. When the last backend goes out the requests
    waiting for their admission's outcome are answered so too, their admissions cancelled: at once,
    not at their TTL (20 s here); each request one outcome."""
    fake = fake_backend(ttft=0.01, itl=0.05, max_running=1)
    proxy = {"utilization": True, "queue_threshold": 1.0, "scrape_interval": 0.05, "backoff": 30.0}
    svc = launch(proxy_config([fake.url], proxy=proxy, budget="unlimited", extra="default_ttl = 20.0"),
                 acceptors=acceptors)
    async def main() -> tuple[list[Any], float]:
        api = openai.AsyncOpenAI(base_url=svc.url("/v1"), api_key="sk-test", max_retries=0, timeout=30)
        asks = []
        for _ in range(8):
            asks.append(asyncio.ensure_future(api.chat.completions.create(model="m", messages=MSG, max_tokens=100)))
            await asyncio.sleep(0.03)
        deadline = time.monotonic() + 10
        while (await asyncio.to_thread(svc.stats))["totals"]["queued_items"] < 2:  # held here by the detector
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        fake.popen.kill()
        killed = time.monotonic()
        answers = await asyncio.gather(*asks, return_exceptions=True)
        return answers, time.monotonic() - killed

    answers, took = run(main(), timeout=40)
    assert took < 8.0, took  # (was: the TTL, 20 s)
    assert all(isinstance(a, openai.APIStatusError) and a.status_code in (502, 503) for a in answers), answers
    assert any(a.status_code == 503 and a.code == "no_backend" for a in answers)  # type: ignore[union-attr]
    s = settled(svc)
    assert s["totals"]["queued_items"] == 0
    outcomes = band_outcomes(s)  # the waiting ones cancelled, the others dispatched (and failed at the backend)
    assert outcomes.get("dispatched", 0) + outcomes.get("evicted:cancelled", 0) == 8, outcomes
    assert outcomes.get("dispatched", 0) >= 1


@contextlib.asynccontextmanager
async def _front(backends: list[str] | None = None, limits: Any = None, **proxy_options: Any) -> AsyncIterator[int]:
    """The HTTP front in proxy mode, in this process (admission: `_FailingAdmission`); yields its port."""
    from distributor.http import HttpLimits, start_http_server
    from distributor.proxy import Proxy
    from flowshard.config import Config, ProxyConfig

    admission = _FailingAdmission()
    pc = ProxyConfig(backends=backends or ["http://127.0.0.1:9"], utilization=False, **proxy_options)
    proxy = Proxy(Config(proxy=pc), admission, lambda: None)
    await proxy.start()
    server = await start_http_server(admission, "127.0.0.1", 0, limits or HttpLimits(), lease=300.0, proxy=proxy)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await proxy.close()


def _openai_error(r: Any, status: int, code: str, message: str) -> None:
    assert r.status == status, r
    assert r.json() == {"error": {"message": message, "type": "invalid_request_error", "param": None,
                                  "code": code}}, r


def test_http_layer_errors_on_openai_paths_are_openai_shaped_and_ours_keep_our_shape() -> None:
    """404 (any unknown path under /v1/), 413 (content-length or chunked), 400 (malformed HTTP) and
    431 on the OpenAI paths: `{"error": {"message", "type", "param", "code"}}`, same status, headers
    and connection behaviour; flowshard's own routes and paths outside /v1/ keep flowshard's shape."""
    from distributor.http import HttpLimits

    async def go() -> None:
        async with _front(limits=HttpLimits(max_header_bytes=2048), max_body_bytes=1000) as port:
            conn = await HttpConn.open(port)
            _openai_error(await conn.request("POST", "/v1/nope?x=1", {"a": 1}), 404, "unknown_url",
                          "no such path: /v1/nope?x=1")
            _openai_error(await conn.request("GET", "/v1/files/x"), 404, "unknown_url", "no such path: /v1/files/x")
            r = await conn.request("GET", "/nope")  # not under /v1/: ours
            assert r.status == 404 and r.json() == {"error": {"status": 404, "message": "no such path: /nope"}}
            r = await conn.request("GET", "/v1/admit")  # our own route: ours
            assert r.status == 405 and r.headers["allow"] == "POST" and r.json()["error"]["status"] == 405
            r = await conn.request("POST", "/v1/release", b"{")
            assert r.status == 400 and r.json()["error"]["status"] == 400
            assert (await conn.request("GET", "/healthz")).status == 200  # the connection goes on
            conn.close()

            big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 2000}]})
            conn = await HttpConn.open(port)
            r = await conn.request("POST", "/v1/chat/completions", big)
            _openai_error(r, 413, "request_too_large", f"body of {len(big)} bytes is over the limit of 1000")
            assert r.headers["connection"] == "close" and await conn.closed_by_peer()
            conn.close()

            conn = await HttpConn.open(port)  # chunked: no content-length to check up front
            conn.send_raw(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                          b"%x\r\n%b\r\n" % (1200, b"y" * 1200))
            r = await conn.response()
            _openai_error(r, 413, "request_too_large", "body over the limit of 1000 bytes")
            assert r.headers["connection"] == "close" and await conn.closed_by_peer()
            conn.close()

            conn = await HttpConn.open(port)
            conn.send_raw(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: zz\r\n\r\n")
            r = await conn.response()
            assert r.status == 400 and r.headers["connection"] == "close", r
            error = r.json()["error"]
            assert error["message"].startswith("malformed HTTP request: ") and error["type"] == "invalid_request_error"
            assert (error["code"], error["param"]) == ("malformed_request", None)
            assert await conn.closed_by_peer()
            conn.close()

            conn = await HttpConn.open(port)
            conn.send_raw(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-big: %b\r\n\r\n" % (b"z" * 3000))
            r = await conn.response()
            _openai_error(r, 431, "headers_too_large", "request line and headers exceed 2048 bytes")
            assert r.headers["connection"] == "close" and await conn.closed_by_peer()
            conn.close()

            conn = await HttpConn.open(port)  # the admission API keeps its shape in proxy mode
            r = await conn.request("POST", "/v1/admit", {"flow": "f", "x": "y" * 70000})
            assert r.status == 413 and r.json()["error"]["status"] == 413, r
            conn.close()

    run(go())


def test_head_of_an_unknown_or_post_only_openai_path_has_no_body() -> None:
    """A HEAD answer's content-length describes the body it does not carry: the next response on the
    connection follows the head at once (as flowshard's own 404 and 405 do for HEAD)."""

    async def go() -> bytes:
        async with _front() as port:
            conn = await HttpConn.open(port)
            conn.send_raw(b"HEAD /v1/nope HTTP/1.1\r\nhost: x\r\n\r\nHEAD /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                          b"\r\nGET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            data = await asyncio.wait_for(conn.reader.read(-1), 5)
            conn.close()
            return data

    data = run(go())
    heads = data.split(b"\r\n\r\n")
    assert heads[0].startswith(b"HTTP/1.1 404 ") and b"content-length: " in heads[0], data
    assert heads[1].startswith(b"HTTP/1.1 405 ") and b"allow: POST" in heads[1], data
    assert heads[2].startswith(b"HTTP/1.1 200 ") and heads[3] == b'{"status":"ok"}', data


def test_the_openai_client_raises_its_own_exceptions_for_http_layer_errors(fake_backend: Any) -> None:
    """What an OpenAI SDK user sees: the exception class the SDK maps the status to, with our message,
    `type` and `code` (404: NotFoundError; 413: a plain APIStatusError, the SDK has no class for it)."""
    fake = fake_backend()

    async def go() -> None:
        async with _front([fake.url], max_body_bytes=1000) as port:
            oai = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1/bogus", api_key="sk-test",
                                     max_retries=0, timeout=10)
            with pytest.raises(openai.NotFoundError) as nf:
                await oai.models.list()
            assert nf.value.status_code == 404 and nf.value.code == "unknown_url"
            assert nf.value.type == "invalid_request_error"
            assert nf.value.message == "Error code: 404 - no such path: /v1/bogus/models"
            oai = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", max_retries=0,
                                     timeout=10)
            with pytest.raises(openai.APIStatusError) as big:
                await oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 2000}])
            assert big.value.status_code == 413 and big.value.code == "request_too_large"
            assert "is over the limit of 1000" in big.value.message
            with pytest.raises(openai.BadRequestError) as bad:  # (classify's 400s were OpenAI-shaped already)
                await oai.chat.completions.create(model="", messages=MSG)
            assert bad.value.param == "model" and "model" in bad.value.message
            await oai.close()

    run(go())


def test_timeout_and_admin_reserve_refusals_on_openai_paths_are_openai_shaped() -> None:
    """408 (request not complete within header_timeout) and the admin reserve's 503 (a connection
    beyond max_connections asking for real work), each with its headers, the connection closed."""
    from distributor.http import HttpLimits

    async def go() -> None:
        limits = HttpLimits(header_timeout=0.2, max_connections=1, admin_reserve=1)
        async with _front(limits=limits) as port:
            first = await HttpConn.open(port)
            first.send_raw(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n{")
            r = await first.response()
            _openai_error(r, 408, "request_timeout", "request not received within 0.2 s")
            assert r.headers["connection"] == "close" and await first.closed_by_peer()
            first.close()
            await asyncio.sleep(0.1)  # its place is free again
            held = await HttpConn.open(port)  # takes the one normal place
            held.send_raw(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            assert (await held.response()).status == 200
            reserve = await HttpConn.open(port)  # one of the admin reserve
            r = await reserve.request("POST", "/v1/embeddings", {"model": "m", "input": "a"})
            assert r.status == 503 and r.headers["retry-after"] == "1" and r.headers["connection"] == "close", r
            assert r.json()["error"] == {"message": "too many connections, retry later",
                                         "type": "service_unavailable", "param": None,
                                         "code": "too_many_connections"}
            assert await reserve.closed_by_peer()
            held.close()
            reserve.close()

    run(go())


def test_models_retrieve_is_passed_through_without_admission(launch: Any, fake_backend: Any) -> None:
    """`client.models.retrieve(id)` is `GET /v1/models/{id}`: passed to a backend like `GET /v1/models`
    (nothing admitted), the backend's answer as it is: its 404 reaches the client as NotFoundError."""
    fake = fake_backend(model="org/fake-model")
    svc = launch(proxy_config([fake.url], budget=4))
    c = client(svc)
    model = c.models.retrieve("org/fake-model")  # the SDK sends /v1/models/org%2Ffake-model
    assert (model.id, model.owned_by) == ("org/fake-model", "fakeoai")
    with pytest.raises(openai.NotFoundError) as exc:
        c.models.retrieve("nope")
    assert exc.value.code == "model_not_found" and "nope" in exc.value.message

    async def raw() -> None:
        conn = await HttpConn.open(svc.http_port)
        r = await conn.request("HEAD", "/v1/models/org%2Ffake-model")
        assert r.status == 200, r
        r = await conn.request("POST", "/v1/models/org%2Ffake-model", {})
        assert r.status == 405 and r.headers["allow"] == "GET, HEAD", r
        assert r.json()["error"]["code"] == "method_not_allowed"
        _openai_error(await conn.request("GET", "/v1/models/"), 404, "unknown_url", "no such path: /v1/models/")
        # dot segments, encoded or not, never reach a backend that might resolve them (review 81)
        for target in ("/v1/models/../../metrics", "/v1/models/%2e%2E/%2e%2e/metrics", "/v1/models/..%2Fmetrics",
                       "/v1/models/x/.", "/v1/models/x/..#frag", "/v1/models/%252e%252e", "/v1/models/..;x",
                       "/v1/models/..%00", "/v1/models/%c0%ae%c0%ae"):  # (review 85: the last five)
            _openai_error(await conn.request("GET", target), 404, "unknown_url", f"no such path: {target}")
        conn.close()

    run(raw())
    s = settled(svc)
    assert s["totals"]["dispatched"] == 0 and band_outcomes(s)["dispatched"] == 0
    assert s["proxy"]["responses"] == {"/v1/models/{id} 200": 2, "/v1/models/{id} 404": 1}  # one label for all ids


def test_a_passed_through_get_forwards_its_query_string_as_received(launch: Any, fake_backend: Any) -> None:
    """`GET /v1/models?…` and `GET /v1/models/{id}?…` reach the backend with their query string, byte for
    byte as the client sent it (not re-quoted: `%7e` stays `%7e`, `%2F` is not decoded); so does HEAD."""
    fake = fake_backend(model="org/fake-model")
    svc = launch(proxy_config([fake.url], budget=4))
    raw = client(svc).models.with_raw_response.list(extra_query={"limit": "2", "after": "a b/c"})
    assert [m.id for m in raw.parse().data] == ["org/fake-model"]
    sent = raw.http_request.url.raw_path.decode()  # what the openai client put on the wire
    assert "?" in sent and "limit=2" in sent, sent
    assert fake.stats()["model_paths"] == [sent]

    targets = ["/v1/models?a=%7e&b=x+y&c=%2F&flag&d=a%20b", "/v1/models/org%2ffake-model?x=%7E&y=",
               "/v1/models/org%2Ffake-model"]

    async def go() -> None:
        conn = await HttpConn.open(svc.http_port)
        for target in targets:
            r = await conn.request("GET", target)
            assert r.status == 200, r
        r = await conn.request("HEAD", "/v1/models?h=1")
        assert r.status == 200, r
        conn.close()

    run(go())
    assert fake.stats()["model_paths"] == [sent, *targets, "/v1/models?h=1"]
    assert settled(svc)["totals"]["dispatched"] == 0  # still passed through without admission


def test_a_failure_inside_flowshards_own_stream_relay_ends_with_an_error_event_not_a_cut(
    fake_backend: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected exception in flowshard's own streaming code (here: the relay's `feed`, made to
    raise at its third call) ends the stream as a backend failing mid-stream does: an OpenAI-shaped
    SSE error event (the openai client raises APIError, not a connection error), the chunked end, then
    the connection closes. The upstream request is closed, the ticket released once, the error logged
    and counted. (It used to cut the connection: the client saw a bare connection error.)"""
    import distributor.proxy as proxy_module
    from distributor.http import HttpLimits, start_http_server
    from distributor.proxy import Proxy
    from flowshard.classify import SseUsage
    from flowshard.config import Config, ProxyConfig

    class BrokenRelay(SseUsage):
        calls = 0

        def feed(self, data: bytes) -> bytes:
            BrokenRelay.calls += 1
            if BrokenRelay.calls % 3 == 0:
                raise ZeroDivisionError("an injected bug")
            return super().feed(data)

    monkeypatch.setattr(proxy_module, "SseUsage", BrokenRelay)
    fake = fake_backend(ttft=0.01, itl=0.02)
    request = {"model": "m", "messages": MSG, "max_tokens": 50, "stream": True}

    async def go() -> None:
        admission = _RecordingAdmission()
        proxy = Proxy(Config(proxy=ProxyConfig(backends=[fake.url], utilization=False)), admission, lambda: None)
        await proxy.start()
        server = await start_http_server(admission, "127.0.0.1", 0, HttpLimits(), lease=300.0, proxy=proxy)
        port = server.sockets[0].getsockname()[1]
        try:
            oai = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", max_retries=0,
                                     timeout=10)
            got: list[str] = []
            with pytest.raises(openai.APIError) as exc:
                async for chunk in await oai.chat.completions.create(**request):
                    got.append(chunk.choices[0].delta.content or "")
            assert type(exc.value) is openai.APIError, repr(exc.value)  # an error event, not a cut connection
            assert exc.value.code == "internal_error" and exc.value.type == "server_error"
            assert "internal error while relaying the stream (ZeroDivisionError)" in exc.value.message
            assert got and set(got) == {" tok"}  # what was relayed before the failure arrived first
            await oai.close()

            # on the wire: whole events, the error event, the chunked end, then the connection closes
            conn = await HttpConn.open(port)
            conn.send("POST", "/v1/chat/completions", request)
            answer = b""
            while chunk := await asyncio.wait_for(conn.reader.read(65536), 10):
                answer += chunk
            conn.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower(), head
            events = _dechunk(body).split(b"\n\n")
            assert events[-1] == b"" and all(e.startswith(b"data: ") for e in events[:-1]), events
            assert json.loads(events[-2][len(b"data: "):])["error"]["code"] == "internal_error"
            assert all(json.loads(e[len(b"data: "):])["choices"] for e in events[:-2])

            deadline = time.monotonic() + 5
            while len(admission.released) < 2 or fake.stats()["aborted"] < 2:
                assert time.monotonic() < deadline, (admission.released, fake.stats())
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # (time for a second release, which must not come)
            assert admission.released == [(1001, -1), (1002, -1)]  # each ticket released once
            stats = fake.stats()
            assert (stats["aborted"], stats["completed"], stats["running"]) == (2, 0, 0)  # upstream closed
            snap = proxy.snapshot()
            assert (snap["active"], snap["internal_errors"], snap["midstream_failures"]) == (0, 2, 0), snap
            assert snap["backends"][0]["inflight"] == 0 and snap["backends"][0]["errors"] == {}
            metrics = {m.name: [sample.value for sample in m.samples] for m in proxy.metrics()}
            assert metrics["flowshard_proxy_internal_errors"] == [2], metrics
        finally:
            server.close()
            await proxy.close()

    with caplog.at_level(logging.ERROR, logger="distributor.proxy"):
        run(go())
    failed = [r for r in caplog.records if r.getMessage() == "proxying /v1/chat/completions failed"]
    assert len(failed) == 2 and all(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in failed)


@pytest.mark.parametrize("acceptors", [0, 2])  # the proxy in the distributor, and in 2 acceptors
def test_a_second_signal_ends_running_requests_saying_so_not_at_the_end_of_the_drain(
    launch: Any, fake_backend: Any, acceptors: int
) -> None:
    """SIGTERM starts a long drain; a second SIGTERM stops at once. The stream still running then ends
    with the SSE error event `shutting_down` saying a second signal forced the stop (it used to say
    "at the end of the drain", which had not come), and so does the 503 of a non-streamed answer
    still awaited; both upstream requests are closed and the service exits 0 long before the drain."""
    fake = fake_backend(ttft=0.01, itl=0.05)
    svc = launch(proxy_config([fake.url], budget=4, service={"drain_timeout": 60.0}), acceptors=acceptors)
    host, port = svc.url("").split("//")[1].split("/")[0].rsplit(":", 1)
    body = json.dumps({"model": "m", "messages": MSG, "max_tokens": 400}).encode()
    whole = socket.create_connection((host, int(port)), timeout=10)
    whole.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n%b" % (len(body), body))
    pieces = iter(client(svc).chat.completions.create(model="m", messages=MSG, max_tokens=400, stream=True))
    got = [next(pieces).choices[0].delta.content]
    _until(lambda: fake.stats()["running"] == 2)
    svc.signal(signal.SIGTERM)
    got.extend(next(pieces).choices[0].delta.content for _ in range(3))  # the drain lets it run on
    signalled = time.monotonic()
    svc.signal(signal.SIGTERM)
    with pytest.raises(openai.APIError) as exc:
        got.extend(chunk.choices[0].delta.content for chunk in pieces)
    assert type(exc.value) is openai.APIError, repr(exc.value)  # an error event, not a connection error
    assert exc.value.code == "shutting_down" and exc.value.type == "service_unavailable"
    assert exc.value.message == ("flowshard: the service is shutting down: stream ended when a second signal "
                                 "forced the stop during the drain; the response is incomplete"), exc.value.message
    assert 4 <= len(got) < 400 and set(got) == {" tok"}
    head, _, payload = _read_until_closed(whole).partition(b"\r\n\r\n")
    whole.close()
    assert head.startswith(b"HTTP/1.1 503") and b"connection: close" in head.lower(), head
    error = json.loads(payload)["error"]
    assert error["code"] == "shutting_down" and error["message"] == (
        "flowshard: the service is shutting down: the request was still in progress when a second signal "
        "forced the stop during the drain"), error
    assert svc.wait() == 0
    assert time.monotonic() - signalled < 5.0  # not the 60 s drain
    _until(lambda: fake.stats()["aborted"] == 2)  # both upstream requests were closed
    assert fake.stats()["completed"] == 0
    # (with acceptor processes each one says how many of them it ended)
    ended = re.findall(r"(\d+) proxied request\(s\) still running when a second signal forced the stop during the "
                       r"drain", svc.stderr())
    assert sum(int(n) for n in ended) == 2, svc.stderr()


def test_a_proxied_post_forwards_its_query_string_as_received(launch: Any, fake_backend: Any) -> None:
    """`POST /v1/chat/completions?api-version=…` (Azure-style backends ask for one) reaches the backend
    with its query string, byte for byte as the client sent it; the admission is the same."""
    fake = fake_backend()
    svc = launch(proxy_config([fake.url], budget=4))
    r = client(svc).chat.completions.with_raw_response.create(
        model="m", messages=MSG, max_tokens=2, extra_query={"api-version": "2024-02-01", "x": "a b/c"})
    assert r.parse().choices
    sent = r.http_request.url.raw_path.decode()
    assert "api-version=2024-02-01" in sent, sent

    async def go() -> None:
        conn = await HttpConn.open(svc.http_port)
        body = {"model": "m", "messages": MSG, "max_tokens": 2}
        resp = await conn.request("POST", "/v1/chat/completions?a=%7e&b=x+y&c=%2F", body)
        assert resp.status == 200, resp
        conn.close()

    run(go())
    assert fake.stats()["post_paths"] == [sent, "/v1/chat/completions?a=%7e&b=x+y&c=%2F"]
    assert settled(svc)["totals"]["dispatched"] == 2  # admitted as any POST


def test_the_running_requests_are_told_why_the_service_stopped() -> None:
    """What an ended stream or answer says (`Proxy.ended_when`, after `close(why=...)`): the drain's end
    with its timeout, a second signal, or neither (a failed start or an error in `serve`, which used
    to be reported as the end of the drain)."""
    from types import SimpleNamespace

    from distributor.proxy import Proxy

    config = SimpleNamespace(service=SimpleNamespace(drain_timeout=7.5))
    said = {why: Proxy.ended_when(SimpleNamespace(why=why, config=config)) for why in ("drain", "signal", "stopped")}  # type: ignore[arg-type]
    assert said["drain"] == "at the end of the drain (drain_timeout 7.5 s)"
    assert said["signal"] == "when a second signal forced the stop during the drain"
    assert "drain_timeout" not in said["stopped"] and said["stopped"].startswith("when the service stopped")


@contextlib.asynccontextmanager
async def _budget_held(svc: Any) -> AsyncIterator[HttpConn]:
    """The budget (1) held by another connection for the block: yields a fresh connection whose
    requests queue; then the hold is released (200: nothing released it meanwhile)."""
    held = await HttpConn.open(svc.http_port)
    ticket = (await held.request("POST", "/v1/admit", {"flow": "hold"}, timeout=5)).json()["ticket"]
    conn = await HttpConn.open(svc.http_port)
    yield conn
    conn.close()
    assert (await held.request("POST", "/v1/release", {"ticket": ticket}, timeout=5)).status == 200
    held.close()


@pytest.mark.parametrize("acceptors", [0, 1])
def test_half_close_answers_a_queued_proxied_request_503_and_what_follows_it(
    launch: Any, fake_backend: Any, acceptors: int
) -> None:
    """Review 18, D3: a client's EOF cancels its admissions and proxied requests without an answer;
    each is answered (an admission 503 evicted: cancelled, a proxied request a 503 error), so the
    requests after them are answered in order before the FIN (the stream was cut at the first one,
    a release after it applied without an answer)."""
    fake = fake_backend(ttft=0.005, itl=0.001)
    svc = launch(proxy_config([fake.url], budget=1), acceptors=acceptors)

    async def main() -> None:
        async with _budget_held(svc) as conn:
            conn.send("POST", "/v1/admit", {"flow": "a"})  # queued: the budget (1) is held
            conn.send("POST", "/v1/chat/completions", {"model": "m", "messages": MSG, "max_tokens": 2})
            conn.send("GET", "/healthz")
            await svc.until_stats(lambda s: s["totals"]["queued_items"] == 2)  # both queued in the distributor
            conn.writer.write_eof()
            answers = [await conn.response(timeout=5) for _ in range(3)]
            assert [a.status for a in answers] == [503, 503, 200], answers
            assert answers[0].json()["reason"] == "cancelled"
            error = answers[1].json()["error"]
            # (review 116: the code was `too_many_connections`, every 503 of the HTTP layer's)
            assert (error["code"], error["message"]) == ("client_closed", "the client closed its side: not forwarded")
            assert await conn.closed_by_peer()

    run(main())
    s = settled(svc)
    assert band_outcomes(s)["evicted:cancelled"] == 2


@pytest.mark.parametrize("acceptors", [0, 1])
def test_half_close_answers_a_request_the_backend_has_503_cancelled_there(
    launch: Any, fake_backend: Any, acceptors: int
) -> None:
    """Review 116: a request sent to its backend, its answer not begun, was answered "not forwarded"
    with the code `too_many_connections` when its client closed its side."""
    fake = fake_backend(ttft=5.0, itl=0.001)
    svc = launch(proxy_config([fake.url], budget=None), acceptors=acceptors)

    async def main() -> None:
        conn = await HttpConn.open(svc.http_port)
        # not streamed: the fake backend sends no head before its answer (a stream's head goes first)
        conn.send("POST", "/v1/chat/completions", {"model": "m", "messages": MSG, "max_tokens": 2})
        await svc.until_stats(lambda s: s["proxy"]["active"] == 1 and s["proxy"]["unsent"] == 0)  # at the backend
        conn.writer.write_eof()
        answer = await conn.response(timeout=5)
        assert answer.status == 503, answer
        error = answer.json()["error"]
        assert error["code"] == "client_closed", error
        assert error["message"] == "the client closed its side: cancelled at the backend before its answer began"

    run(main())
    s = settled(svc)
    assert s["totals"]["inflight"] == 0


@pytest.mark.parametrize("acceptors", [0, 1])
def test_half_close_during_a_stream_cuts_it_and_a_release_behind_it_is_applied_unanswered(
    launch: Any, fake_backend: Any, acceptors: int
) -> None:
    """What the README says of a client's EOF while its answer is being streamed (its head written):
    nothing after an unfinished answer can be answered, so the stream is cut (no last chunk) and the
    connection closed; a release pipelined behind it and parsed before the EOF has been applied, with
    no answer. Pinned, so that a change to it changes the README too."""
    fake = fake_backend(ttft=0.005, itl=0.05)
    svc = launch(proxy_config([fake.url], budget=2), acceptors=acceptors)
    stream = {"model": "m", "messages": MSG, "max_tokens": 200, "stream": True}

    async def main() -> None:
        ticket = (await ahttp(svc.http_port, "POST", "/v1/admit", {"flow": "held"})).json()["ticket"]
        conn = await HttpConn.open(svc.http_port)
        conn.send("POST", "/v1/chat/completions", stream)
        conn.send("POST", "/v1/release", {"ticket": ticket})
        head = await asyncio.wait_for(conn.reader.readuntil(b" tok"), 5)  # the stream is being relayed
        conn.writer.write_eof()
        rest = head + await asyncio.wait_for(conn.reader.read(), 5)
        assert rest.count(b"HTTP/1.1 ") == 1 and b"[DONE]" not in rest, rest[-300:]  # cut: no release answer
        assert not rest.endswith(b"0\r\n\r\n")  # the chunked body is left unfinished
        conn.close()
        await svc.until_stats(lambda s: s["totals"]["inflight"] == 0)  # the release was applied

    run(main())
    settled(svc)


@pytest.mark.parametrize("acceptors", [0, 1])
def test_half_close_answers_a_release_behind_a_queued_proxied_request_at_the_head(
    launch: Any, fake_backend: Any, acceptors: int
) -> None:
    """`_answers_on_their_way` cut the queue at a proxied request at its head whose answer was not in
    (`k == 0`), "its answer may be partly written", though nothing of it was written while it waited
    for its admission (`Exchange.started` False). The docstring's rule: only one being streamed cuts.
    So a release pipelined behind a queued proxied request was applied, unanswered (review of the
    sixth round)."""
    fake = fake_backend(ttft=0.005, itl=0.001)
    svc = launch(proxy_config([fake.url], budget=1), acceptors=acceptors)

    async def main() -> None:
        async with _budget_held(svc) as conn:
            conn.send("POST", "/v1/chat/completions", {"model": "m", "messages": MSG, "max_tokens": 2})  # queued
            conn.send("POST", "/v1/release", {"ticket": 5})  # names no ticket: 404, after the proxied one
            conn.send("GET", "/healthz")
            # the proxied request queued in the distributor (the budget, 1, is held)
            await svc.until_stats(lambda s: s["totals"]["queued_items"] == 1)
            conn.writer.write_eof()
            rest = await asyncio.wait_for(conn.reader.read(), 5)
            # expected: 503 (the proxied request, its client gone), 404 (the release), 200 (healthz)
            assert rest.count(b"HTTP/1.1 ") == 3, rest

    run(main())
    settled(svc)


def _asker(svc: Any) -> Any:
    """A one-token chat completion: "ok", or the error's code. `marker`: a query string the backend
    records with the request's path, to tell it apart."""
    api = client(svc)

    def ask(marker: str = "") -> str:
        try:
            api.chat.completions.create(model="m", messages=MSG, max_tokens=1,
                                        extra_query={"marker": marker} if marker else None)
            return "ok"
        except openai.APIStatusError as exc:
            return str(exc.body["code"])  # type: ignore[index]

    return ask


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("acceptors", [0, 2])  # the proxy in the distributor, and in 2 acceptors
def test_a_pool_back_from_an_outage_is_tried_before_its_back_offs_end(
    launch: Any, fake_backend: Any, acceptors: int
) -> None:
    """Review 152: with the detector off nothing probes a backend while it is out, and during an outage
    each request that came as a back-off ended took that backend out again, for twice as long: both
    backends back after an 18 s outage, clients got 503 `no_backend` for 13 s more. While every backend
    is out a request now tries the one back first, no more than once per `backoff` per backend (and
    a failure to connect while it is out doubles nothing). Here the back-offs had grown to 1.6-3.2 s:
    without it the first answer after the restart came 1.7 s or more later."""
    ports = [_free_port(), _free_port()]
    fakes = [fake_backend(port=p, ttft=0.001, itl=0.001) for p in ports]
    proxy = {"retries": 1, "backoff": 0.2, "max_backoff": 10.0}
    svc = launch(proxy_config([f.url for f in fakes], proxy=proxy, budget=4), acceptors=acceptors)
    ask = _asker(svc)
    assert ask() == "ok"
    for fake in fakes:
        fake.stop()
    t0 = time.monotonic()
    failures: set[str] = set()
    while time.monotonic() - t0 < 4.0:  # the outage: a request every 20 ms, each refused
        failures.add(ask())
        time.sleep(0.02)
    assert "ok" not in failures and "no_backend" in failures, failures
    for p in ports:
        fake_backend(port=p, ttft=0.001, itl=0.001)
    back = time.monotonic()
    while ask() != "ok":
        assert time.monotonic() - back < 1.2, "the pool is back, its back-offs are not"
        time.sleep(0.02)
    settled(svc)


def test_a_probe_is_a_try_within_retries(launch: Any, fake_backend: Any) -> None:
    """Review 156: after a failed probe the request went on to probe the next backend out, whatever
    `retries` said: with `retries = 0` one request reached both backends (each answering 500), and
    with backends that hang on the connection a client waited `connect_timeout` per backend. A probe
    is one of the request's tries: with `retries = 0`, its only one, its failure answered 503
    `no_backend`."""
    ports = [_free_port(), _free_port()]
    fakes = [fake_backend(port=p, ttft=0.001, itl=0.001) for p in ports]
    proxy = {"retries": 0, "backoff": 0.5, "max_backoff": 10.0}
    svc = launch(proxy_config([f.url for f in fakes], proxy=proxy, budget=4))
    ask = _asker(svc)
    assert ask() == "ok"
    for fake in fakes:
        fake.stop()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 4.0:  # both out, their back-offs doubled to 4 s (out till ~7.5 s)
        ask()
        time.sleep(0.02)
    # (a back-off of 0.2 s doubled to 1.6 s within 2 s: on a loaded machine the two backends took 0.9 s
    # to start again, and by then both were back in rotation, so no probe was tried)
    back = [fake_backend(port=p, ttft=0.001, itl=0.001, status=500) for p in ports]  # up, answering 500
    time.sleep(0.6)  # past `backoff` since the last probe or take-out of each: both may be probed
    assert ask("the-one") == "no_backend"
    tried = [sum("the-one" in path for path in f.stats()["post_paths"]) for f in back]
    assert sum(tried) == 1, tried
