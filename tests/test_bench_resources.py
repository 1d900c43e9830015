"""`python -m bench.resources`: the probes behind the README's resource table run and report."""

from __future__ import annotations

import pytest

from bench import resources


def test_connection_probe_reports_one_descriptor_per_connection() -> None:
    rows: list[tuple[str, str]] = []
    resources.connections(lambda what, figure: rows.append((what, figure)), n=50)
    assert [what for what, _ in rows] == ["idle HTTP connection", "idle binary connection"]
    assert all(figure.endswith("1.00 descriptor") for _, figure in rows), rows


def test_reserve_probe_answers_healthz_beyond_max_connections_and_refuses_past_the_reserve() -> None:
    rows: list[tuple[str, str]] = []
    resources.reserve(lambda what, figure: rows.append((what, figure)), max_connections=20)
    [(what, figure)] = rows
    assert what == "HTTP connection of the admin reserve (16, /healthz answered; the next: 503)"
    assert figure.endswith("1.00 descriptor"), figure


def test_unknown_probe_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        resources.main(["nope"])
    assert exc.value.code == 2
    assert "unknown probe 'nope'" in capsys.readouterr().err
