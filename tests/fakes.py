"""Shared pieces of the fake `Admission`s the front-end unit tests use (tests/test_http.py,
tests/test_binary.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec


class Passes:
    """Counts the event loop's passes (a callback that schedules itself again runs once a pass)."""

    def __init__(self) -> None:
        self.n = 0
        self._loop = asyncio.get_running_loop()
        self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.n += 1
        self._loop.call_soon(self._tick)


class AnswersAtOnce:
    """The asynchronous half of `distributor.api.Admission` (release_then, query) on top of a fake's
    synchronous release, stats and metrics: answered at once, as the distributor's own process does."""

    reading = True  # (`Admission.reading`: the service has not stopped)

    def release_then(self, ticket: int, tokens: int, done: Any, failed: Any = None) -> None:
        release: Any = getattr(self, "release")  # noqa: B009 - the fake's own, some without `tokens`
        done(ticket, release(ticket) if tokens < 0 else release(ticket, tokens))

    def after(self, done: Any) -> None:
        done()

    def query(self, what: str, done: Any) -> None:
        if what == "metrics":
            done(*getattr(self, "metrics")())  # noqa: B009
        else:
            done(msgspec.json.encode(getattr(self, "stats")()), "application/json")  # noqa: B009

    def delivered(self, ticket: int) -> None:
        """Answers are written in this process: nothing to confirm (distributor.api)."""
