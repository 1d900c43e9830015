"""`python -m bench.inproc`: the distributor's own Python cost per request, in one process."""

from __future__ import annotations

import pytest

from bench.inproc import main, measure


@pytest.mark.parametrize("shards, bands", [(1, 1), (3, 2)])
def test_every_request_is_dispatched_and_the_cost_is_split(shards: int, bands: int) -> None:
    r = measure(shards, requests=3000, clients=16, flows=5, bands=bands)
    assert r["requests"] == 3000  # each admission dispatched once, each ticket released (closed loop)
    assert r["distributor_us"] > 0 and r["outside_us"] > 0, r


def test_bad_arguments_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in ((["--shards", "0"], "--shards: 0 is outside 1..256"),
                          (["--shards", "a,b"], "is not a comma-separated list"),
                          (["--requests", "0"], "--requests: 0 is outside")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_main_prints_one_line_per_shard_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--shards", "1,2", "--requests", "500", "--runs", "1", "--clients", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["shards=1", "shards=2"]


def test_behind_an_acceptor_link_every_request_is_dispatched() -> None:
    r = measure(2, requests=2000, clients=16, flows=5, link=True)
    assert r["requests"] == 2000 and r["distributor_us"] > 0, r


def test_http_clients_on_the_http_front_every_request_is_dispatched() -> None:
    r = measure(2, requests=1000, clients=8, flows=3, http=True)
    assert r["requests"] == 1000 and r["distributor_us"] > 0, r


@pytest.mark.parametrize("link", [False, True])
def test_each_mode_drives_its_own_front(link: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default mode's clients speak the public binary protocol to a `BinaryConnection`; `--link`'s
    speak to an acceptor's `AcceptorLink`. (A loop variable once shadowed the mode: every run went
    through the link.)"""
    from distributor.acceptors import AcceptorLink
    from distributor.binary import BinaryConnection

    seen = {"binary": 0, "link": 0}
    for name, cls in (("binary", BinaryConnection), ("link", AcceptorLink)):
        original = cls.data_received

        def counting(self: object, data: bytes, _name: str = name, _original: object = original) -> None:
            seen[_name] += 1
            _original(self, data)  # type: ignore[operator]

        monkeypatch.setattr(cls, "data_received", counting)
    r = measure(1, requests=500, clients=4, flows=2, link=link)
    assert r["requests"] == 500
    assert (seen["link"] > 0, seen["binary"] > 0) == (link, not link), seen


def test_http_clients_behind_an_acceptor_link_hold_leased_tickets_and_release_them() -> None:
    """`--http-link`: leased admissions, delivered reports and answered releases (each client's next
    admission waits for its release's answer, so the loop stops if a release goes unanswered)."""
    r = measure(2, requests=1000, clients=8, flows=3, leased=True)
    assert r["requests"] == 1000 and r["distributor_us"] > 0, r


def test_matrix_shape_deep_queue_over_spread_bands_every_request_is_dispatched() -> None:
    """`--spread --budget --fairness`: a closed-loop client per flow, flows spread over the bands, a
    budget far below the clients (a deep queue, grants planned across bands), as the upstream matrix
    scenarios; a request left unanswered would stop its client and the run."""
    r = measure(2, requests=3000, clients=300, flows=300, bands=4, link=True, budget=10, fairness="drr",
                spread=True)
    assert r["requests"] == 3000 and r["distributor_us"] > 0, r
