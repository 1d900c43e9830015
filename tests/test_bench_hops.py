"""`python -m bench.hops`: per-process system calls and frames per dispatched request."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.hops import measure

ROOT = Path(__file__).resolve().parents[1]


def test_hops_counts_frames_and_calls_per_request_for_each_process() -> None:
    r = asyncio.run(measure(str(ROOT / "bench/scenarios/through-shards-peak.toml"), 2, 1, 1.2))
    assert r["dispatched"] > 100
    # through a shard: an Enqueue each and grants in blocks go to it, a Done each comes back (give or
    # take the requests still in transit when the counters were read)
    assert 1.0 <= r["frames_to_shards"] < 1.9 and abs(r["frames_from_shards"] - 1.0) < 0.02, r
    per = r["per_process"]
    assert {"distributor", "worker0", "worker1", "workers (sum)"} <= per.keys()
    for role in ("distributor", "workers (sum)"):
        assert per[role]["cpu_us"] > 0 and 0 < per[role]["writes"] < 10 and 0 < per[role]["reads"] < 10, per


def test_hops_bad_arguments_are_one_line_errors(capsys) -> None:
    from bench.hops import main

    assert main([str(ROOT / "no-such.toml"), "--shards", "1"]) == 2
    assert "no-such.toml: cannot read" in capsys.readouterr().err
    try:
        main(["x.toml", "--shards", "0"])
    except SystemExit as exc:
        assert exc.code == 2
    assert "each shard count must be in 1..256" in capsys.readouterr().err
