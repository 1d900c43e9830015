"""`python -m bench.flap`: the ledger's cost while a band flaps between one shard and two."""

from __future__ import annotations

import pytest

from bench.flap import main, measure


def test_the_hysteresis_keeps_a_flapping_band_from_rebasing_each_time() -> None:
    """A thin flow on a second shard every 70 requests, 1,000 queued on the first: one re-base (the
    band stays fair), where re-basing at each return would cost 1,000 per 70 requests."""
    us, rebases = measure(True, period=70, depth=1000, requests=3000)
    assert us > 0 and rebases == 1
    assert measure(False, period=70, depth=1000, requests=3000)[1] == 0


def test_main_prints_both_ledgers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--requests", "500", "--runs", "1", "--depth", "40"]) == 0
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()] == ["lone", "always fair"]
    with pytest.raises(SystemExit):
        main(["--period", "0"])


def test_a_rebase_does_not_cost_each_queued_request(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The re-base's work is O(flows), not O(queued): it computes no queued request's cost (it did
    each of them: 21 ms at 100,000 queued). Counted, not timed."""
    from bench.flap import rebase_pause
    from flowshard.ledger import LedgerBand

    calls = []
    cost = LedgerBand.cost
    monkeypatch.setattr(LedgerBand, "cost", lambda band, p: calls.append(p.id) or cost(band, p))
    assert rebase_pause(2_000, 10) >= 0
    assert calls == [2_000]  # the thin newcomer's own, as it is queued on the band now fair
    assert main(["--pause", "--depth", "300", "--flows", "3", "--runs", "1"]) == 0
    assert capsys.readouterr().out.startswith("re-base with 300 queued in 3 flows: ")
