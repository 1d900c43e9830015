"""A one-line progress bar on stderr (no dependency). On a terminal it redraws in place; otherwise
it prints one line per finished run, so logs and CI output stay readable."""

from __future__ import annotations

import sys
from typing import TextIO

__all__ = ["Progress"]

WIDTH = 24


class Progress:
    def __init__(self, total_runs: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = total_runs
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.done = 0
        self.label = ""
        self.duration = 1.0

    def start(self, label: str, duration: float) -> None:
        self.label = label
        self.duration = max(duration, 1e-9)

    def update(self, elapsed: float, submitted: int, answered: int) -> None:
        if not self.tty:
            return
        frac = min(1.0, max(0.0, elapsed / self.duration))
        filled = int(frac * WIDTH)
        bar = "#" * filled + "." * (WIDTH - filled)
        self.stream.write(f"\r[{bar}] run {self.done + 1}/{self.total} {self.label}: {min(elapsed, self.duration):.1f}/"
                          f"{self.duration:g} s, {submitted:,} sent, {answered:,} answered\x1b[K")
        self.stream.flush()

    def finish(self, summary: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        prefix = "\r\x1b[K" if self.tty else ""
        self.stream.write(f"{prefix}run {self.done}/{self.total} {self.label}: {summary}\n")
        self.stream.flush()
