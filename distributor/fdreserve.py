"""Descriptors held back for the supervisor, so a worker can be restarted when clients have taken
every other descriptor the process may open (RLIMIT_NOFILE).

Restarting a worker needs a socket pair, the pipes `subprocess` uses while it forks, and one more
descriptor when the event loop adopts the socket (uvloop duplicates it, after an await: two are
left free for that, then taken back). Clients take descriptors whenever they connect;
without a reserve, a worker that died while they held them all could not be replaced.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

SPAWN_FDS = 16  # what one spawn may open at once (4 to 6 here), with room to spare


class FdReserve:
    """`n` descriptors on /dev/null, closed for the span of `use()` and reopened after it."""

    def __init__(self, n: int = SPAWN_FDS) -> None:
        self.n = n
        self._fds: list[int] = []
        self.refill()

    def refill(self, spare: int = 0) -> int:
        """Reopen what is missing but `spare` (as many as the process may open now); returns how many
        are held."""
        while len(self._fds) < self.n - spare:
            try:
                self._fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                break
        return len(self._fds)

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    @contextlib.contextmanager
    def use(self, spare: int = 0) -> Iterator[None]:
        """Free the reserve for the body (synchronous: nothing else runs meanwhile), then take it back
        but `spare` descriptors (for a step that must await: `refill()` after it)."""
        self.release()
        try:
            yield
        finally:
            self.refill(spare)

    def __len__(self) -> int:
        return len(self._fds)

    def close(self) -> None:
        self.release()
        self.n = 0
