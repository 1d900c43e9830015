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
import resource
from collections.abc import Iterator

from distributor.api import probing_most

SPAWN_FDS = 16  # what one spawn may open at once (4 to 6 here), with room to spare
# the distributor's own descriptors besides its clients' (37 at start with one shard, the reserve above
# included; docs/service.md, "Resource limits"), with room for the HTTP front's admin reserve
BASE_FDS = 80


def descriptors_needed(max_connections: int, shards: int, acceptors: int, proxied: int = 0) -> int:
    """What one of `serve`'s processes may hold open at once: `max_connections` on each of the two
    fronts (and HTTP connections waiting after their client's close with their place freed: at
    most `probing_most`), one per worker, three per acceptor, and in proxy mode a backend
    connection per request relayed at once (`proxied`). Each acceptor inherits the limit, and may
    hold any share of the clients' and backends' connections (all of them, the others down)."""
    return 2 * max_connections + probing_most(max_connections) + BASE_FDS + shards + 3 * acceptors + proxied


def raise_descriptor_limit(needed: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to `needed`, or as far as the hard limit lets it (workers
    and acceptors inherit it); the limits after, (soft, hard). A soft limit of 1,024, common, closed
    connections at accept long before `max_connections`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft, hard


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
