"""The README's examples are part of the product: its config and scenario examples must load and run."""

from __future__ import annotations

import re
from pathlib import Path

from flowshard.config import load_config
from flowshard.scenario import load_scenario
from flowshard.simulate import simulate

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _toml_block_after(heading: str) -> str:
    section = README.split(heading, 1)[1]
    match = re.search(r"```toml\n(.*?)```", section, re.S)
    assert match, f"no TOML example after {heading!r}"
    return match.group(1)


def test_configuration_example_is_valid_and_means_what_it_says():
    config = load_config(_toml_block_after("## Configuration"))
    assert [b.name for b in config.bands] == ["interactive", "batch"]
    assert config.bands[1].ceiling == 0.8 and config.bands[0].displacement
    assert config.weights == {"tenant-a": 2.0, "tenant-b": 1.0}
    assert config.service.lease == 300.0


def test_scenario_example_loads_and_simulates():
    scenario = load_scenario(_toml_block_after("### Scenario format"))
    report = simulate(scenario)
    assert report.totals.counts.submitted > 0 and report.totals.counts.dispatched > 0
    assert report.totals.priority_inversions == 0


def test_setup_commands_are_the_ones_ci_runs():
    assert "scripts/test" in README and "scripts/flowshard serve" in README
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "scripts/test" in ci
