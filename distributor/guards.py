"""Counts of the protective actions the fronts and the supervisor take against hostile or careless
clients and against resource exhaustion, so an operator can see an attack or a bad client
(`flowshard_protective_actions_total{front, action}` in /metrics, docs/service.md, "Resource limits")."""

from __future__ import annotations

from collections import Counter
from typing import Final

# Every (front, action) pair, exported even at zero so a dashboard can rate() it from the start.
ACTIONS: Final[dict[str, tuple[str, ...]]] = {
    "http": (
        # 503 and close past max_connections and the admin reserve, or a non-admin request on a reserve connection
        "too_many_connections",
        "admin_reserve",  # a connection beyond max_connections taken into the reserve kept for the admin paths
        "header_timeout",  # 408: a request's head and body did not arrive within header_timeout
        "silent_connection",  # closed: it sent nothing within header_timeout
        "headers_too_large",  # 431: request line and headers over max_header_bytes
        "trailers_too_large",  # 431: chunked trailers over the same limit
        "body_too_large",  # 413
        "malformed",  # 400 and close
        "slow_reader",  # dropped: unsent responses over the limit, or stalled past write_timeout
        "close_timeout",  # a closing connection whose last bytes were not read: aborted
        "linger_overflow",  # a closing connection that kept sending past max_linger_bytes: reset
        "undeliverable",  # a dispatched answer that could not be delivered: its ticket released at once
        # failed by the kernel after dead_peer_timeout: its host stopped answering, or it left its
        # receive window shut, reading nothing of what waited for it, that long
        "dead_peer",
    ),
    "binary": (
        "too_many_connections",
        "frame_timeout",  # an incomplete frame not completed within header_timeout
        "silent_connection",  # closed (Error(-2, 408)): it sent no frame within header_timeout
        "malformed",  # a malformed or oversized frame: Error(-1, 400) and close
        "too_many_pending",  # Error(id, 429): max_inflight_per_connection admissions already without an answer
        "slow_reader",
        "close_timeout",
        "linger_overflow",
        "dead_peer",
    ),
}


class Guards(Counter[tuple[str, str]]):
    """(front, action) -> how many times it happened. Owned by the distributor, shared by the fronts."""

    def hit(self, front: str, action: str) -> None:
        self[(front, action)] += 1
