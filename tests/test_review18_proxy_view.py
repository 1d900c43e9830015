"""Review 18: the distributor's proxy view in proxy mode with acceptors (Proxy.view / acceptor_exited)."""

from __future__ import annotations

import asyncio

from distributor.proxy import BackendFigures, Proxy, ProxyReport
from flowshard.config import Config, ProxyConfig


def test_an_exited_acceptors_backend_counters_stay_counted() -> None:
    """An acceptor reported 7 requests and 3 connect errors on backend 0, then exited: /metrics'
    `flowshard_backend_errors` (a counter) and /v1/stats' per-backend `requests` must keep them
    (`acceptor_exited`: "Its counters as last reported stay counted"). `retired` starts with no
    backends, so `ProxyReport.add`'s zip over its (empty) backends drops them: the counter goes
    backwards when an acceptor is restarted."""

    async def go() -> None:
        proxy = Proxy(Config(proxy=ProxyConfig(backends=["http://127.0.0.1:9"], utilization=False)), None,  # type: ignore[arg-type]
                      lambda: None)
        report = ProxyReport(responses=[("/v1/chat/completions", 200, 7)],
                             backends=[BackendFigures(inflight=0, requests=7, errors={"connect": 3})])
        proxy.remote[0] = report
        before = proxy.view().backends[0]
        assert (before.requests, before.errors) == (7, {"connect": 3})
        proxy.acceptor_exited(0)
        view = proxy.view()
        assert view.responses == [("/v1/chat/completions", 200, 7)]  # the route counters are kept ...
        after = view.backends[0]
        assert (after.requests, after.errors) == (7, {"connect": 3}), after  # ... the backend ones too

    asyncio.run(go())
