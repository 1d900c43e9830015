"""Help a user can act on: what each command does, its output, its signals and examples; --version."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flowshard import cli
from flowshard.simulate import read_scenario, shipped_scenarios

SCENARIOS = Path(__file__).resolve().parent.parent / "bench" / "scenarios"


def _help(*argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare words


def test_main_help_says_what_flowshard_is_without_jargon(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys=capsys)
    assert "shells" not in text and "Flow control for a shared pool of inference backends" in text
    for command in ("serve", "config", "simulate", "bench"):
        assert f"flowshard {command}" in text  # an example of each
    assert "COMMAND --help" in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    from importlib.metadata import version

    assert capsys.readouterr().out.strip() == f"flowshard {version('flowshard')}"


def test_serve_help_tells_ready_line_signals_drain_and_free_ports(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help("serve", capsys=capsys)
    assert "flowshard ready: http=http://127.0.0.1:8080 binary=127.0.0.1:8081 shards=1" in text
    assert "SIGTERM or SIGINT (Ctrl-C) drains" in text and "drain_timeout seconds (default 10)" in text
    assert "A second signal stops at once" in text and "exits 0" in text
    assert "0 picks a free port" in text and "(default 1)" in text and "How many shards" in text


def test_config_check_help_names_its_argument(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help("config", "check", capsys=capsys)
    assert "FILE the configuration TOML to check" in text and "defaults filled in" in text


def test_simulate_help_explains_the_output_and_lists_the_shipped_scenarios(capsys: pytest.CaptureFixture[str]
                                                                           ) -> None:
    text = _help("simulate", capsys=capsys)
    assert "max-min allocation of *intrinsic* demand" in text and "Jain" in text
    assert "wait p50/p90/p99/max in ms" in text
    shipped = shipped_scenarios()
    assert sorted(name for name, _, _ in shipped) == sorted(p.stem for p in SCENARIOS.glob("*.toml"))
    bench_only = text.split("bench-only", 1)[1].split("examples:")[0]
    for name, description, simulates in shipped:
        if simulates:
            assert f"{name} {description}" in text
        else:
            assert name in bench_only
    assert "free-flow-peak" in bench_only and "weighted-drr" not in bench_only


def test_bench_help_has_a_description_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help("bench", capsys=capsys)
    assert "real processes, real sockets and real time" in text and "how many shards to run" in text
    assert "examples: flowshard bench bench/scenarios/equal-flows.toml" in text


def test_a_shipped_scenario_can_be_named() -> None:
    assert read_scenario("weighted-drr").name == "weighted-drr"
    with pytest.raises(ValueError) as exc:
        read_scenario("no-such")
    assert str(exc.value) == (
        "no-such: no such file, and no shipped scenario has that name "
        "(`flowshard simulate --help` lists every shipped scenario)")


LIST_ALL = "(`flowshard simulate --help` lists every shipped scenario)"


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("weighted-drrr", "weighted-drrr: no such file, and no shipped scenario has that name; "
                          f"did you mean `weighted-drr` or `weighted-vtc`? {LIST_ALL}"),
        ("demoo", f"demoo: no such file, and no shipped scenario has that name; did you mean `demo`? {LIST_ALL}"),
        ("ttl", f"ttl: no such file, and no shipped scenario has that name; did you mean `ttl-storm`? {LIST_ALL}"),
        ("fair-aloc", "fair-aloc: no such file, and no shipped scenario has that name; "
                      f"did you mean `fair-alloc`? {LIST_ALL}"),
        ("bench/scenarios/equal-flow.toml", "bench/scenarios/equal-flow.toml: cannot read: No such file or directory; "
                                            f"did you mean `equal-flows`? {LIST_ALL}"),
    ],
)
def test_a_mistyped_scenario_name_gets_the_close_shipped_names(
    given: str, message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(SCENARIOS.parent.parent)
    assert cli.main(["simulate", given]) == 2
    assert capsys.readouterr().err == f"flowshard: {message}\n"


def test_bench_with_a_mistyped_scenario_name_gets_the_close_shipped_names() -> None:
    proc = subprocess.run([sys.executable, "-m", "flowshard.cli", "bench", "equal-flow", "--quiet"],
                          cwd=SCENARIOS.parent.parent, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("flowshard: equal-flow: no such file, and no shipped scenario has that name; "
                           f"did you mean `equal-flows`? {LIST_ALL}\n")


def test_help_does_not_load_the_service_or_the_scenarios() -> None:
    code = ("import sys; from flowshard import cli; cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith(('distributor', 'flowshard.simulate', 'uvloop'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("config", [None, "", "[budget]\nmax_inflight_requests = 8\n"])
def test_serve_without_a_budget_says_the_default_is_a_placeholder(config: str | None, tmp_path: Path) -> None:
    """No --config, or one that sets no budget (review 75: the file's case ran the placeholder silently)."""
    import os
    import signal

    argv = [sys.executable, "-m", "flowshard.cli", "serve", "--port", "0", "--binary-port", "0"]
    if config is not None:
        (tmp_path / "c.toml").write_text(config)
        argv += ["--config", str(tmp_path / "c.toml")]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stderr is not None
        lines = [proc.stderr.readline()]
        if config is None or "max_inflight_requests" not in config:
            lines.append(proc.stderr.readline())
            assert "placeholder" in lines[0], lines
            assert lines[0].startswith("flowshard: no --config" if config is None else "flowshard: ")
        ready = lines[-1]
        assert ready.startswith("flowshard ready: http=http://127.0.0.1:"), lines
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize(("argv", "usage", "extra"), [
    (["serve", "--shardz", "2"], "usage: flowshard serve ", "--shardz 2"),
    (["simulate", "demo", "--bogus"], "usage: flowshard simulate ", "--bogus"),
    (["config", "check", "a.toml", "b.toml"], "usage: flowshard config check ", "b.toml"),
])
def test_an_unknown_flag_is_told_with_its_commands_usage(
    capsys: pytest.CaptureFixture[str], argv: list[str], usage: str, extra: str
) -> None:
    """A newcomer's review: `serve --shardz 2` printed the top level's usage, which lists no flag of serve."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and err.endswith(f"error: unrecognized arguments: {extra}\n"), err


def test_a_bad_serve_flag_is_the_only_line_without_a_config(capsys: pytest.CaptureFixture[str]) -> None:
    """Every flag is checked before the no --config notice, so a bad one is the one line printed."""
    assert cli.main(["serve", "--acceptors", "x"]) == 2
    assert capsys.readouterr().err == "flowshard: --acceptors: 'x' is not a number or \"auto\"\n"


def test_a_bad_choice_in_a_scenario_shows_its_value_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[workload]\nduration = 1\n[[workload.flows]]\nid = "a"\narrival = { kind = "poison", rate = 1 }\n')
    assert cli.main(["simulate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("poison") == 1 and "allowed: poisson, constant, bursts, closed" in err, err


@pytest.mark.parametrize("argv", [["serve", "--port", "-1"], ["serve", "--binary-port", "70000"]])
def test_a_port_flag_out_of_range_is_one_line_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Review 75: the workers refused the configuration, crash-looped with tracebacks for 30 s, and
    the service exited 1."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a port: 0 to 65535" in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["config", "check"], ["serve", "--config"], ["simulate"]])
def test_a_file_that_is_not_utf8_is_one_line_and_exit_2(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Review 75: a traceback (UnicodeDecodeError) and exit 1."""
    path = tmp_path / "b.toml"
    path.write_bytes(b"\xff\xfe[budget]\n")
    assert cli.main([*command, str(path)]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8 text (byte 0)" in err and "Traceback" not in err
