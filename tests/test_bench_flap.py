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
