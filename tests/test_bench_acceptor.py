"""`python -m bench.acceptor`: an acceptor's own Python cost per HTTP request, in one process."""

from __future__ import annotations

import pytest

from bench.acceptor import main, measure


@pytest.mark.parametrize("clients, releasers", [(8, 1), (16, 2)])
def test_every_request_is_answered_and_its_ticket_released(clients: int, releasers: int) -> None:
    r = measure(requests=2000, clients=clients, releasers=releasers)
    assert r["requests"] == 2000 and r["releases"] == 2000, r  # each admission answered, each ticket released
    assert r["acceptor_us"] > 0 and r["outside_us"] > 0, r


def test_main_prints_one_line_and_refuses_bad_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--requests", "500", "--runs", "1", "--clients", "4"]) == 0
    assert capsys.readouterr().out.startswith("acceptor ")
    with pytest.raises(SystemExit) as exc:
        main(["--clients", "0"])
    assert exc.value.code == 2 and "--clients: 0 is below 1" in capsys.readouterr().err
