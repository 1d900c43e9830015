"""`flowshard bench` end to end against a real `flowshard serve` (and the echo baseline): a tiny
scenario for about a second per run. Checks the JSON's structure and bookkeeping, never timings."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from servicekit import config_text, launch

from flowshard import cli
from flowshard.config import ConfigError

__all__ = ["launch"]  # the fixture, re-exported so pytest finds it here

ROOT = Path(__file__).resolve().parents[1]

TINY = """
name = "tiny"

[server]
default_ttl = 5.0

[server.budget]
max_inflight_requests = 4

[[server.bands]]
priority = 10
name = "high"
fairness = "round-robin"

[[server.bands]]
priority = 0
name = "low"
fairness = "drr"
flow_max_requests = 20

[workload]
duration = 1.2
warmup = 0.2
seed = 1

[[workload.flows]]
id = "vip"
priority = 10
arrival = { kind = "poisson", rate = 40 }
size = 500
service = 0.01

[[workload.flows]]
id = "bulk"
count = 3
arrival = { kind = "poisson", rate = 150 }
size = { dist = "uniform", low = 500, high = 2000 }
service = 0.02

[[workload.flows]]
id = "agent"
arrival = { kind = "closed", concurrency = 2, think = 0.01 }
size = 1000
service = 0.01
"""

FREE = """
name = "free"
[server.budget]
max_inflight_requests = "unlimited"
[workload]
duration = 0.8
warmup = 0.2
[[workload.flows]]
id = "c"
arrival = { kind = "closed", concurrency = 4, think = 0.000001 }
service = 0.0
"""


def _run_bench(tmp_path: Path, text: str, *flags: str) -> subprocess.CompletedProcess[str]:
    scenario = tmp_path / "s.toml"
    scenario.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "flowshard.cli", "bench", str(scenario), "--quiet", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


def bench_json(tmp_path: Path, text: str, *flags: str) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    out = tmp_path / "out.json"
    proc = _run_bench(tmp_path, text, "--json", str(out), *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    label = "target" if "--target" in flags else "shards=1"
    assert f"== {label}" in proc.stdout
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc, proc


def _outcomes(counts: dict[str, Any]) -> int:
    return (counts["dispatched"] + sum(counts["rejected"].values()) + sum(counts["evicted"].values())
            + counts["errors"] + counts["unfinished"])


def _check_run(run: dict[str, Any]) -> None:
    counts = run["counts"]
    assert counts["submitted"] > 0 and run["consistent"] is True
    assert counts["submitted"] == _outcomes(counts)
    assert sum(b["counts"]["submitted"] for b in run["bands"]) == counts["submitted"]
    assert sum(g["counts"]["submitted"] for g in run["groups"]) == counts["submitted"]
    assert sum(f["counts"]["submitted"] for f in run["flows"]) == counts["submitted"]
    assert all(f["counts"]["submitted"] == _outcomes(f["counts"]) for f in run["flows"])
    assert run["throughput"]["dispatches_per_s"] > 0
    lat = run["latency_us"]
    assert lat["count"] > 0 and lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"]
    roles = {p["role"] for p in run["cpu"]["processes"]}
    assert "loadgen0" in roles
    assert not [w for w in run["warnings"] if "left behind" in w or "outlived" in w or "exited with" in w]


def test_bench_binary_two_bands_against_flowshard(tmp_path: Path) -> None:
    doc, proc = bench_json(tmp_path, TINY, "--shards", "1", "--plot", str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: written to {tmp_path / 'bench.png'}" in proc.stdout + proc.stderr
    assert doc["bench"]["machine"]["cpus"] >= 1 and doc["scenario"]["name"] == "tiny"
    [config] = doc["configs"]
    assert config["label"] == "shards=1" and config["transport"] == "binary"
    [run] = config["runs"]
    _check_run(run)
    assert {"distributor", "worker0"} <= {p["role"] for p in run["cpu"]["processes"]}
    assert [b["name"] for b in run["bands"]] == ["high", "low"]
    assert {g["id"] for g in run["groups"]} == {"vip", "bulk", "agent"} and len(run["flows"]) == 5
    low = run["bands"][1]
    assert low["jain"] is not None and low["apparent_inversions"] is not None
    # the summary's pairwise figure is the bands' worst (a review: only the older figure was summed up)
    pairwise = [b["service_diff"] for b in run["bands"] if b["service_diff"] is not None]
    one_unit = len({b["unit"] for b in run["bands"]}) == 1
    assert pairwise and run["fairness"]["service_diff"] == (max(pairwise) if one_unit else None)
    assert run["server"]["dispatched"] > 0
    proj = run["projection"]["with_generator"]
    assert set(proj) == {"2", "4", "8", "16"} and all(v["per_s"] > 0 for v in proj.values())
    assert "dispatches/s" in config["summary"] and config["summary"]["dispatches/s"]["n"] == 1
    sim = doc["simulation"]["scenario"]
    assert sim["report"]["scenario"] == "tiny" and "shards=1" in sim["comparison"]


def test_bench_predicts_each_shard_count_with_the_n_shard_simulation(tmp_path: Path) -> None:
    """`--shards 1,2`: shards=1 is compared with the one-engine simulation, shards=2 with the 2-shard
    one (the service's ledger and 2 engines), not both with one shard."""
    proc = _run_bench(tmp_path, TINY, "--json", str(tmp_path / "out.json"), "--shards", "1,2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sim = json.loads((tmp_path / "out.json").read_text())["simulation"]["scenario"]
    assert "shards" not in sim["report"] and sim["by_shards"]["2"]["shards"] == 2
    assert set(sim["comparison"]) == {"shards=1", "shards=2"}
    two = sim["comparison"]["shards=2"]["groups"]
    assert [g["predicted"]["dispatched"] for g in two] == [
        g["counts"]["dispatched"] for g in sim["by_shards"]["2"]["groups"]]
    assert "== simulator vs measured (shards=2;" in proc.stdout


def test_bench_http_with_echo_baseline(tmp_path: Path) -> None:
    doc, _ = bench_json(tmp_path, FREE, "--shards", "1", "--http", "--baseline", "--no-simulate")
    labels = [c["label"] for c in doc["configs"]]
    assert labels == ["shards=1", "echo-http"]
    for config in doc["configs"]:
        [run] = config["runs"]
        assert run["transport"] == "http"
        _check_run(run)
        assert run["counts"]["dispatched"] > 0 and run["generator"]["release_failed"] == 0
    echo = doc["configs"][1]["runs"][0]
    assert {p["role"] for p in echo["cpu"]["processes"]} >= {"echo", "loadgen0"}
    assert doc["simulation"] == {}


def test_bench_drives_a_running_service_with_target(tmp_path: Path, launch: Any) -> None:
    svc = launch(config_text(budget=None, bands=[{"priority": 0, "fairness": "round-robin"}]), shards=2)
    for transport in ([], ["--http"]):
        doc, _ = bench_json(tmp_path, FREE, "--target", f"127.0.0.1:{svc.binary_port}",
                        "--http-target", f"127.0.0.1:{svc.http_port}", "--no-simulate", *transport)
        [config] = doc["configs"]
        assert config["label"] == "target" and config["kind"] == "target"
        [run] = config["runs"]
        _check_run(run)
        assert run["counts"]["dispatched"] > 0 and run["counts"]["errors"] == 0
        assert run["projection"] is None  # the target's processes are not measured: no projection claimed
        assert run["server"]["since_service_start"] is True
    assert svc.stats()["totals"]["dispatched"] >= doc["configs"][0]["runs"][0]["counts"]["dispatched"]


def test_bench_aimed_at_the_other_protocols_port_says_so_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], launch: Any
) -> None:
    """A review: `--target` at the HTTP port (or `--http-target` at the binary one) ran, printed a table
    of nothing dispatched (and a traceback) and exited 0. Now a one-line error, before any run."""
    svc = launch(config_text(budget=None), shards=1)
    scenario = tmp_path / "s.toml"
    scenario.write_text(FREE)
    for flags, message in (
        (["--target", f"127.0.0.1:{svc.http_port}"], "does not speak flowshard's binary protocol"),
        (["--target", f"127.0.0.1:{svc.binary_port}", "--http-target", f"127.0.0.1:{svc.binary_port}", "--http"],
         "is flowshard's binary port (it says so)"),  # (it answers an HTTP request in HTTP: a 400 saying so)
    ):
        assert cli.main(["bench", str(scenario), "--quiet", "--no-simulate", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("flowshard: ") and message in err and "Traceback" not in err, err
        assert err.count("\n") == 1, err
    assert svc.stats()["totals"]["dispatched"] == 0  # the check itself admitted nothing


@contextmanager
def _fake_target(behave: Callable[[socket.socket], None]) -> Iterator[int]:
    """A listener on a free port whose every connection is handed to `behave` (in a thread)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                behave(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        server.close()


def _drip(conn: socket.socket) -> None:  # a frame's header, then a byte a while
    conn.sendall(b"\x00\x00\x03\xe8")
    for _ in range(8):
        time.sleep(0.2)
        try:
            conn.sendall(b"\x00")
        except OSError:
            return


def _reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


def test_bench_target_check_has_one_deadline_and_says_what_it_saw(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review 100: a target dripping a byte within each recv's timeout held the check for a minute, one
    that reset at once was "cannot connect" although it had connected."""
    from bench import runner

    monkeypatch.setattr(runner, "CHECK_TIMEOUT", 0.5)
    for behave, said in ((_drip, "did not answer within 0.5 s"), (_reset, "ended the connection")):
        with _fake_target(behave) as port:
            t0 = time.monotonic()
            with pytest.raises(ConfigError, match=said):
                runner.Server.attach(f"127.0.0.1:{port}", None, "binary")
            assert time.monotonic() - t0 < 3.0  # (one 0.5 s deadline; it was a minute)


def test_bench_target_reset_before_connect_returns_is_what_the_target_did(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI, stop 31: on a loaded machine the listener's reset reached the socket before `connect` returned,
    which raised ConnectionResetError there and was said as "cannot connect": it had connected."""
    from bench import runner

    def reset_at_connect(*_args: Any, **_kwargs: Any) -> socket.socket:
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(runner.socket, "create_connection", reset_at_connect)
    with pytest.raises(ConfigError, match=re.escape("127.0.0.1:9 ended the connection (Connection reset by peer)")):
        runner.Server.attach("127.0.0.1:9", None, "binary")


def test_bench_target_at_its_connection_limit_is_said_so(launch: Any) -> None:
    """Review 100: flowshard refusing the check's connection (max_connections) was "is it flowshard?"."""
    from bench import runner

    svc = launch(config_text(budget=None, service={"max_connections": 1}), shards=1)
    with socket.create_connection(("127.0.0.1", svc.binary_port)) as held:
        held.sendall(b"")
        time.sleep(0.2)  # it holds the one place
        with pytest.raises(ConfigError, match="refused the connection: 503 too many connections"):
            runner.Server.attach(f"127.0.0.1:{svc.binary_port}", None, "binary")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--target", "nohost"], "--target: expected HOST:PORT with a port in 1..65535, got 'nohost'"),
        (["--target", "127.0.0.1:70000"], "--target: expected HOST:PORT with a port in 1..65535"),
        (["--target", "127.0.0.1:1"], "--target: cannot connect to 127.0.0.1:1"),
        (["--target", "127.0.0.1:2", "--http"], "--target (HTTP at PORT-1): cannot connect to 127.0.0.1:1"),
        (["--shards", "1,x"], "--shards: expected comma-separated numbers, got '1,x'"),
        (["--runs", "0"], "--runs and --procs must be at least 1"),
        (["--shards", "1,257"], "--shards: 257 is not allowed; 1 to 256"),
        (["--warmup", "-1"], "--warmup: -1 is not allowed; 0 seconds or more"),
        # review 2026-12-05 (D6): these printed a traceback, or were accepted silently
        (["--duration", "0"], "--duration: 0 is not allowed; seconds above 0"),
        (["--duration", "-1"], "--duration: -1 is not allowed; seconds above 0"),
        (["--warmup", "100"], "--warmup: 100 s is not shorter than the run"),
        (["--duration", "2", "--warmup", "2"], "--warmup: 2 s is not shorter than the run (2 s)"),
        (["--acceptors", "65"], "--acceptors: 65 is not allowed; 0 to 64, or auto"),
        (["--conns", "-1"], "--conns: -1 is not allowed; a number, 0 or more"),
        (["--timer-lead-us", "-5"], "--timer-lead-us: -5 is not allowed; a number, 0 or more"),
        (["--drain-timeout", "-1"], "--drain-timeout: -1 is not allowed; a number, 0 or more"),
        # review 2026-12-05 (round 2, F5)
        (["--drain-timeout", "inf"], "--drain-timeout: inf is not allowed"),
        (["--wait-quiet", "nan"], "--wait-quiet: nan is not allowed"),
        (["--wait-quiet", "-1"], "--wait-quiet: -1 is not allowed"),
        (["--proxy", "--proxy-itl", "-1"], "--proxy-itl: -1 is not allowed"),
        (["--proxy", "--proxy-ttft", "nan"], "--proxy-ttft: nan is not allowed"),
        (["--shards", "1,,2"], "--shards: expected comma-separated numbers, got '1,,2'"),
        (["--rate", "inf"], "--rate: expected positive numbers, got 'inf'"),
        (["--plot", "/nonexistent/dir/x.png"], "--plot: cannot write /nonexistent/dir/x.png"),
        (["--concurrency", "-3"], "--concurrency: -3 is not a number of clients; at least 1"),  # review 82
        # review 167: --proxy ran once and exited 0 without writing what these asked for
        (["--proxy", "--records", "r.jsonl", "--plot", "p.png", "--shards", "1,2", "--runs", "3"],
         "--proxy runs once, through one shard, with its own generator: --shards, --runs, --records, --plot "
         "cannot go with it"),
        (["--proxy", "--rate", "50,100"], "--rate (more than one) cannot go with it"),
    ],
)
def test_bench_bad_flags_get_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    """In this process: `python -m flowshard.cli` is `raise SystemExit(main())`, so main's status is the
    exit status (an exception escaping main, which would print a traceback, fails the test); the
    command line itself is checked once below."""
    scenario = tmp_path / "s.toml"
    scenario.write_text(FREE)
    assert cli.main(["bench", str(scenario), "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flowshard: ") and message in err and "Traceback" not in err
    assert err.count("\n") == 1, err  # one line


def test_bench_plot_without_matplotlib_fails_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Said after the whole run (a newcomer's review: the first README example ran, then drew
    nothing), --plot without matplotlib cost the run; now it is a one-line error before anything
    starts, saying how to install it (editable: a plain `pip install '.[plot]'` replaced the
    checkout's editable install)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    scenario = tmp_path / "s.toml"
    scenario.write_text(FREE)
    started = time.monotonic()
    assert cli.main(["bench", str(scenario), "--quiet", "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flowshard: --plot: needs matplotlib, which is not installed") and "-e '.[plot]'" in err
    assert err.count("\n") == 1 and time.monotonic() - started < 1.0 and not (tmp_path / "p.png").exists()


def test_bench_bad_flag_from_the_command_line_is_a_one_line_error_and_status_2(tmp_path: Path) -> None:
    proc = _run_bench(tmp_path, FREE, "--shards", "1,x")
    assert proc.returncode == 2
    assert proc.stderr == "flowshard: --shards: expected comma-separated numbers, got '1,x'\n", proc.stderr


def test_bench_over_several_binary_connections_keeps_the_budget_turning(tmp_path: Path) -> None:
    """With --conns 2 a generator may release a ticket on another connection than the admission's:
    the service must take it (tickets are capabilities), or the budget stays full after one round."""
    doc, _ = bench_json(tmp_path, TINY, "--shards", "1", "--conns", "2", "--no-simulate")
    [run] = doc["configs"][0]["runs"]
    _check_run(run)
    assert run["counts"]["dispatched"] > 50  # a budget of 4 turned over many times in 1.2 s
    assert run["generator"]["release_failed"] == 0


def test_bench_prints_the_effective_window_and_one_unanswered_figure(tmp_path: Path) -> None:
    """--duration shorter than the scenario's warmup changes the warmup: the output says to what, and
    why; the unanswered row and the warning about unanswered requests are one figure."""
    doc, proc = bench_json(tmp_path, FREE, "--duration", "0.2", "--no-simulate")
    first = proc.stdout.splitlines()[0]
    assert first == ("window: each run sends for 0.2 s; figures count [0.04 s, 0.2 s] (0.16 s), after a warmup of "
                     "0.04 s (the scenario's 0.2 s does not fit in --duration 0.2, so duration / 5; --warmup sets it)")
    [run] = doc["configs"][0]["runs"]
    assert run["warmup_s"] == pytest.approx(0.04) and run["window_s"] == pytest.approx(0.16)
    assert "unanswered in window" not in proc.stdout
    tail = run["unanswered_in_window"]
    assert run["latency_us"]["unanswered"] == tail
    assert run["latency_us"]["count"] == run["latency_answered_us"]["count"] + tail
    warned = [w for w in run["warnings"] if "unanswered" in w]
    assert warned == ([] if tail == 0 else [w for w in warned if w.startswith(f"{tail} request")])
    doc, proc = bench_json(tmp_path, FREE, "--duration", "0.5", "--warmup", "0.1", "--no-simulate")
    assert proc.stdout.startswith("window: each run sends for 0.5 s; figures count [0.1 s, 0.5 s] (0.4 s), "
                                  "after a warmup of 0.1 s (--warmup)")


def test_a_concurrency_that_cannot_be_met_says_how_many_clients_ran(tmp_path: Path) -> None:
    """Review 181: `--concurrency N` reads as the total, but each closed flow keeps at least one client
    (1 gave 4 on fair-alloc), and nothing said so."""
    two = FREE.replace('id = "c"', 'id = "c"\ncount = 2').replace("concurrency = 4", "concurrency = 1")
    _, proc = bench_json(tmp_path, two, "--concurrency", "1", "--no-simulate", "--duration", "0.3",
                         "--warmup", "0.1")
    assert "--concurrency 1: 2 closed-loop clients" in proc.stderr, proc.stderr
    _, proc = bench_json(tmp_path, two, "--concurrency", "2", "--no-simulate", "--duration", "0.3", "--warmup", "0.1")
    assert "closed-loop clients" not in proc.stderr


def test_the_window_line_is_written_once_where_progress_and_report_share_a_file(tmp_path: Path) -> None:
    """Review 167: written to stderr before the runs and again at the head of the report, it showed twice
    on a terminal (or in `> out 2>&1`); each stream alone still has it once."""
    scenario = tmp_path / "s.toml"
    scenario.write_text(FREE)
    command = [sys.executable, "-m", "flowshard.cli", "bench", str(scenario), "--duration", "0.3", "--no-simulate"]
    with (tmp_path / "both.txt").open("w") as both:
        proc = subprocess.run(command, cwd=ROOT, stdout=both, stderr=both, timeout=120)
    assert proc.returncode == 0
    text = (tmp_path / "both.txt").read_text()
    assert text.count("window: each run sends") == 1, text
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("window: each run sends") == 1 and proc.stderr.count("window: each run sends") == 1


def test_the_bench_children_leave_ctrl_c_to_the_bench() -> None:
    """Review 107: Ctrl-C during a run printed a traceback from each load generator (the terminal signals
    the whole process group); they start with SIGINT ignored, the bench stops them."""
    from bench.runner import die_with_parent

    out = subprocess.run([sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT))"],
                         preexec_fn=die_with_parent, capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() in ("1", "Handlers.SIG_IGN"), out  # (SIG_IGN, printed as its number)
