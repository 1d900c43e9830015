"""Set-up: `scripts/flowshard` installs the runtime only, `scripts/test` the test extras too; the package
declares its license the way current setuptools wants (no deprecation warning)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TEST_TOOLS = ("pytest", "hypothesis", "ruff", "mypy", "matplotlib", "openai")


def test_runtime_dependencies_hold_no_test_tools() -> None:
    runtime = " ".join(PYPROJECT["project"]["dependencies"])
    assert not [tool for tool in TEST_TOOLS if tool in runtime]
    test_extra = " ".join(PYPROJECT["project"]["optional-dependencies"]["test"])
    assert all(tool in test_extra for tool in TEST_TOOLS)


def test_license_is_an_spdx_expression() -> None:
    # a `{ text = ... }` table makes setuptools >= 77 print a deprecation warning on every install
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert any(r.startswith("setuptools>=77") for r in PYPROJECT["build-system"]["requires"])


def test_entry_scripts_install_what_they_need() -> None:
    assert '"$root/scripts/bootstrap.sh"\n' in (ROOT / "scripts" / "flowshard").read_text()  # runtime only
    assert '"$root/scripts/bootstrap.sh" test\n' in (ROOT / "scripts" / "test").read_text()


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    """A copy of the bootstrap script beside a pyproject, with a `.venv/bin/python` that logs its calls."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "bootstrap.sh", tmp_path / "scripts" / "bootstrap.sh")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/calls\necho "Collecting thing"\n')
    python.chmod(0o755)
    return tmp_path


def _bootstrap(root: Path, *args: str) -> tuple[list[str], str]:
    (root / "calls").unlink(missing_ok=True)
    done = subprocess.run([str(root / "scripts" / "bootstrap.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": "false"}, check=True, timeout=30)
    calls = (root / "calls").read_text().splitlines() if (root / "calls").exists() else []
    return calls, done.stderr


def test_bootstrap_installs_each_level_once_with_visible_progress(fake_root: Path) -> None:
    digest = hashlib.sha256((fake_root / "pyproject.toml").read_bytes()).hexdigest()
    calls, err = _bootstrap(fake_root)
    installs = [c for c in calls if "install" in c and "-e" in c]
    assert installs == [f"-m pip install --progress-bar off --disable-pip-version-check -e {fake_root}"]
    assert "installing flowshard and its runtime dependencies" in err and "Collecting thing" in err
    assert (fake_root / ".venv" / ".installed-from").read_text() == f"{digest} runtime\n"
    assert _bootstrap(fake_root)[0] == []  # installed: nothing to do, nothing printed
    calls, err = _bootstrap(fake_root, "test")  # the runtime does not serve the tests: install the extras
    assert next(c for c in calls if "-e" in c).endswith(f"-e {fake_root}[test]")
    assert "test tools" in err
    assert _bootstrap(fake_root)[0] == [] and _bootstrap(fake_root, "test")[0] == []  # test serves both
    (fake_root / "pyproject.toml").write_text("[project]\nname = 'y'\n")
    assert _bootstrap(fake_root)[0]  # pyproject changed: reinstall
