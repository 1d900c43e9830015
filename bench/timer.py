"""A one-shot timer with microsecond precision for open-loop send times.

Why: uvloop (libuv) timers have millisecond resolution, so an open-loop generator at 1,000 req/s
would send each request up to 1 ms late, and latency measured from the intended send time would be
mostly the generator's own lateness. On Linux a `timerfd` armed at an absolute CLOCK_MONOTONIC time
(the clock behind `time.monotonic()`) wakes epoll at the right moment; the process's timer slack is
set to 1 ns so the kernel does not round wake-ups up by its default 50 µs. On this VM a wake-up from
idle still costs ~50 µs; `lead` arms the timer that much early and then polls the event loop (never
blocking it, so replies are still read on time) until the send time is reached. Only the polls in
which nothing else ran count as spin (`spun`): replies read while polling are load, not waiting.
Elsewhere it falls back to `loop.call_at` (millisecond precision; the generator reports its lag).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import sys
import time
from collections.abc import Callable

__all__ = ["PreciseTimer"]

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = 0o4000
_TFD_CLOEXEC = 0o2000000
_TFD_TIMER_ABSTIME = 1
_PR_SET_TIMERSLACK = 29


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.timerfd_create  # noqa: B018 - probe: older libcs lack it
        return libc
    except (OSError, AttributeError):
        return None


class PreciseTimer:
    """Calls `callback()` once at (or just after) the monotonic time given to `arm`; re-arm to move it.

    `spun` accumulates the seconds spent only polling the loop within `lead` of a deadline (busy time
    that is not load: the generator subtracts it before judging whether it was saturated). Whatever
    else runs on the loop bumps `work`; a loop pass between two polls counts as spin only if `work`
    did not change in it, so replies handled while polling stay load.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None], lead: float = 0.0) -> None:
        self._loop = loop
        self._callback = callback
        self._lead = max(0.0, lead)
        self._due = 0.0
        self._armed = False
        self._handle: asyncio.Handle | None = None
        self._last_poll = 0.0  # 0.0: not polling
        self._work_seen = 0
        self.work = 0
        self.spun = 0.0
        self._libc = _libc()
        self._fd = -1
        self.precise = False
        if self._libc is not None:
            self._libc.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
            fd = self._libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
            if fd >= 0:
                self._fd = fd
                self.precise = True
                self._spec = _Itimerspec()
                loop.add_reader(fd, self._on_fd)

    def arm(self, when: float) -> None:
        """Fire at monotonic time `when` (now or in the past: on the next loop pass)."""
        self._due = when
        self._armed = True
        self._last_poll = 0.0
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        wake = when - self._lead
        if wake <= time.monotonic():
            self._poll_soon()
        elif self._fd >= 0:
            self._settime(wake)
        else:
            self._handle = self._loop.call_at(self._loop.time() + (wake - time.monotonic()), self._poll)

    def cancel(self) -> None:
        self._armed = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._fd >= 0:
            self._settime(0.0)

    def close(self) -> None:
        self.cancel()
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def _settime(self, when: float) -> None:
        ns = int(when * 1e9)
        spec = self._spec
        spec.it_value.tv_sec = ns // 1_000_000_000
        spec.it_value.tv_nsec = ns % 1_000_000_000  # 0, 0: disarm
        assert self._libc is not None
        self._libc.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None)

    def _on_fd(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return
        self._poll()

    def _poll_soon(self) -> None:
        if self._handle is None:
            self._handle = self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        self._handle = None
        if not self._armed:
            return
        now = time.monotonic()
        if self._last_poll and self.work == self._work_seen:
            self.spun += now - self._last_poll  # a loop pass that only polled
        if now < self._due:  # inside the lead: let the loop run a pass (reads replies), then look again
            self._last_poll = now
            self._work_seen = self.work
            self._handle = self._loop.call_soon(self._poll)
            return
        self._last_poll = 0.0
        self._armed = False
        self._callback()
