"""`python -m bench.resources`: the probes behind the README's resource table run and report."""

from __future__ import annotations

import pytest

from bench import resources


def test_connection_probe_reports_one_descriptor_per_connection() -> None:
    rows: list[tuple[str, str]] = []
    resources.connections(lambda what, figure: rows.append((what, figure)), n=50)
    assert [what for what, _ in rows] == ["idle HTTP connection", "idle binary connection"]
    assert all(figure.endswith("1.00 descriptor") for _, figure in rows), rows


def test_unknown_probe_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        resources.main(["nope"])
    assert exc.value.code == 2
    assert "unknown probe 'nope'" in capsys.readouterr().err
