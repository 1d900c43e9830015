"""The admission answer's audit (HTTP and binary) and the actual cost at release, through the real service."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from servicekit import admit_http, ahttp, launch, run

from flowshard.client import Client
from flowshard.types import Outcome

__all__ = ["launch"]

D = Outcome.DISPATCHED


def test_binary_audit_carries_sequence_shard_and_service_times(launch: Any) -> None:
    svc = launch(shards=2, budget=1)

    async def main() -> None:
        async with Client.connect(svc.host, svc.binary_port) as c:
            hold = await c.admit("hold", audit=True)
            assert hold.outcome is D and hold.service is not None
            assert hold.service.shard == -1 and hold.service.enqueued == 0.0  # the idle fast path
            assert hold.service.decided >= hold.service.dispatched >= hold.service.received > 0
            futures = {"plain": c.admit("plain")}  # no audit asked: a plain answer
            futures.update({f"r{i}": c.admit(f"f{i % 3}", size=100, audit=True) for i in range(12)})
            await svc.until_stats(lambda s: s["totals"]["queued_items"] == 13)
            ticket = hold.ticket
            seen: list[str] = []
            while len(seen) < 13:
                assert await c.release(ticket)
                name = await _first({n: f for n, f in futures.items() if n not in seen})
                seen.append(name)
                ticket = futures[name].result().ticket
            assert futures["plain"].result().service is None
            views = [futures[f"r{i}"].result().service for i in range(12)]
            seqs = [v.seq for v in views if v is not None]
            assert len(seqs) == 12 and seqs == sorted(seqs) and len(set(seqs)) == 12  # arrival order
            for v in views:
                assert v is not None and v.shard in (0, 1)
                # decided: when the shard committed the dispatch (after its pass began), top band too
                assert v.received <= v.enqueued <= v.dispatched <= v.decided < v.dispatched + 1.0
            assert len({v.shard for v in views if v is not None}) == 2  # both shards held some

    run(main())


def test_http_audit_only_when_asked(launch: Any) -> None:
    svc = launch(shards=1, budget=4)

    async def main() -> None:
        r = await admit_http(svc.http_port, "a", audit=True)
        assert r.status == 200 and r.json()["outcome"] == "dispatched"
        audit = r.json()["audit"]
        assert set(audit) == {"seq", "shard", "received", "enqueued", "dispatched", "decided"}
        assert audit["shard"] == -1 and audit["decided"] >= audit["dispatched"] > 0
        plain = await admit_http(svc.http_port, "a")
        assert plain.status == 200 and "audit" not in plain.json()
        bad = await ahttp(svc.http_port, "POST", "/v1/release", {"ticket": r.json()["ticket"], "tokens": -3})
        assert bad.status == 422 and "tokens" in bad.json()["error"]["message"]
        ok = await ahttp(svc.http_port, "POST", "/v1/release", {"ticket": r.json()["ticket"], "tokens": 12})
        assert ok.status == 200

    run(main())


@pytest.mark.parametrize("actual", [None, 10])
def test_release_with_actual_tokens_corrects_the_vtc_counter(launch: Any, actual: int | None) -> None:
    """a1 declares 5000 tokens but used 10: with the correction a2 goes before b2; without, after."""
    svc = launch(shards=1, budget=1, bands=[{"priority": 0, "fairness": "vtc"}])

    async def main() -> list[str]:
        async with Client.connect(svc.host, svc.binary_port) as c:
            hold = await c.admit("hold")
            names = ["a1", "b1", "b2", "a2"]
            futures = {n: c.admit(n[0], tokens=5000 if n == "a1" else 100) for n in names}
            await svc.until_stats(lambda s: s["totals"]["queued_items"] == 4)
            order, _ = await _release_in_order(c, hold.ticket, futures, actual)
            return order

    order = run(main())
    assert order[:2] == ["a1", "b1"]
    assert order[2:] == (["a2", "b2"] if actual is not None else ["b2", "a2"])


@pytest.mark.parametrize("actual", [None, 10])
def test_release_correction_moves_the_shares_across_shards(launch: Any, actual: int | None) -> None:
    """The same with the two flows on two shards: the distributor shares grants between the shards by
    their virtual times, which must take the correction too (before the fix b2 went first either way)."""
    svc = launch(shards=2, budget=1, bands=[{"priority": 0, "fairness": "vtc"}], service={"fast_path": False})

    async def main() -> tuple[list[str], dict[str, int]]:
        async with Client.connect(svc.host, svc.binary_port) as c:
            hold = await c.admit("hold")
            futures: dict[str, Any] = {}
            for n in ["a1", "b1", "b2", "a2"]:
                futures[n] = c.admit(n[0], size=1000, tokens=5000 if n == "a1" else 100, audit=True)
                queued = len(futures)  # one at a time: each flow is placed seeing the last one's bytes
                await svc.until_stats(lambda s, k=queued: s["totals"]["queued_items"] == k)
            order, ticket = await _release_in_order(c, hold.ticket, futures, actual)
            assert await c.release(ticket)
            return order, {n: f.result().service.shard for n, f in futures.items()}

    order, shards = run(main())
    assert shards["a1"] == shards["a2"] != shards["b1"] == shards["b2"]
    assert sorted(order[:2]) == ["a1", "b1"]
    assert order[2:] == (["a2", "b2"] if actual is not None else ["b2", "a2"])


async def _release_in_order(c: Any, ticket: int, futures: dict[str, Any], actual: int | None) -> tuple[list[str], int]:
    """With a budget of 1: release `ticket`, wait for the one admission that dispatch lets through,
    release its ticket in turn (a1's with `actual` tokens), until every future is done. Returns the
    dispatch order and the last ticket, still held."""
    order: list[str] = []
    cost = None
    while len(order) < len(futures):
        assert await c.release(ticket, cost)
        done = await _first({n: f for n, f in futures.items() if n not in order})
        order.append(done)
        ticket = futures[done].result().ticket
        cost = actual if done == "a1" else None
    return order, ticket


async def _first(futures: dict[str, Any]) -> str:
    for _ in range(1000):
        for name, f in futures.items():
            if f.done():
                return name
        await asyncio.sleep(0.005)
    raise AssertionError("no dispatch")


@pytest.mark.parametrize("shards", [1, 2])
def test_a_refund_after_its_flow_came_back_banks_no_idle_time(launch: Any, shards: int) -> None:
    """f's request declares 2**32 tokens and runs while f is idle and a is served 40 times; f comes
    back with requests while it still runs (its counter ahead: not lifted), then releases it having
    used 10 tokens. f and a then share the slot from where a stands. The whole refund (before the
    fix) gave f every dispatch that followed: the first 30 all f's. (At 2 shards the request was
    dispatched while the band sat on one shard: the refund of a charge the ledger never made.)"""
    svc = launch(shards=shards, budget=2, bands=[{"priority": 0, "fairness": "vtc"}], service={"fast_path": False})

    async def main() -> tuple[str, set[tuple[str, int]]]:
        async with Client.connect(svc.host, svc.binary_port) as c:
            big = await c.admit("f", size=100, tokens=2**32)
            assert big.outcome is D
            for _ in range(40):  # a alone on the other slot, f idle
                r = await c.admit("a", size=100, tokens=100)
                assert r.outcome is D and await c.release(r.ticket, 100)
            hold = await c.admit("a", size=100, tokens=100)
            futures: dict[str, Any] = {}
            for i in range(40):  # one at a time: each flow stays on its shard
                futures[f"a{i}"] = c.admit("a", size=100, tokens=100, audit=True)
                futures[f"f{i}"] = c.admit("f", size=100, tokens=100, audit=True)
            await svc.until_stats(lambda s: s["totals"]["queued_items"] == 80)
            assert await c.release(big.ticket, 10)
            order: list[str] = []
            ticket = hold.ticket
            while len(order) < 30:
                done = await _first({n: f for n, f in futures.items() if n not in order})
                order.append(done)
                assert await c.release(ticket, 100)
                ticket = futures[done].result().ticket
            return "".join(n[0] for n in order), {(n[0], futures[n].result().service.shard) for n in order}

    order, placed = run(main())
    if shards == 2:  # each flow on a shard of its own: the distributor's ledger shares the grants
        assert len(placed) == 2 and len({s for _, s in placed}) == 2, placed
    assert "fff" not in order and order.count("f") <= 16, order
