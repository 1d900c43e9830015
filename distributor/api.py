"""What the protocol front-ends (HTTP, binary) need from the distributor, and what it needs of them.

The front-ends parse and validate; the distributor decides. Outcomes are delivered by callback
(no Future per request): the distributor calls `waiter.deliver(...)` exactly once per admission.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, NamedTuple, Protocol

from flowshard.types import Outcome

# How a new client connection counts against its front's connection limits: decided by
# `connection_verdict` where the front's connections are counted. In the distributor's process the
# front counts its own (CONN_CHECK: it decides itself); with acceptor processes the distributor
# counts every front's connections service-wide, decides when it accepts one and hands the verdict
# over with it (distributor.acceptors), and the acceptor's front applies it.
CONN_CHECK: Final = 0  # not decided yet: the front decides from its own counts
CONN_NORMAL: Final = 1  # within max_connections
CONN_RESERVE: Final = 2  # beyond max_connections, in the HTTP admin reserve: admin paths only
CONN_REFUSED: Final = 3  # beyond both: refused (HTTP 503 / binary Error(-1, 503)) and closed


# A connection handed to an acceptor process goes with one SOCK_SEQPACKET message: its front's byte,
# then its verdict. The ends of the connections the distributor counts, by (front, verdict), are
# reported in LinkConns' order.
HANDED_HTTP: Final = b"h"
HANDED_BINARY: Final = b"b"
COUNTED: Final = ((HANDED_HTTP, CONN_NORMAL), (HANDED_HTTP, CONN_RESERVE), (HANDED_BINARY, CONN_NORMAL))


# HTTP connections whose client closed its side and has every answer, waiting a moment for a reset
# that says an answer was not delivered (`HttpHub.probe`), with their place under max_connections
# freed (`HttpConnection._free_place`): at most `probing_most(max_connections)` per process, beyond
# the limit; a flood of them past it keeps its places until its waits end. (A client closing and
# connecting again at once needs one per connection of its last 0.25 s.)
PROBING_MAX: Final = 1024
PROBING_LEAST: Final = 64


def probing_most(max_connections: int) -> int:
    """How many such connections one process may hold beyond `max_connections` (and asks descriptors
    for: `fdreserve.descriptors_needed`): as many as the limit, at least PROBING_LEAST, at most
    PROBING_MAX (review 128: a fixed 1,024 asked a small limit for descriptors it may not have)."""
    return min(PROBING_MAX, max(PROBING_LEAST, max_connections))


def connection_verdict(counted: int, reserved: int, max_connections: int, admin_reserve: int) -> int:
    """The verdict for a new connection when `counted` are open within max_connections and
    `reserved` in the admin reserve (the binary front has none: admin_reserve 0)."""
    if counted < max_connections:
        return CONN_NORMAL
    return CONN_RESERVE if reserved < admin_reserve else CONN_REFUSED


class Audit(NamedTuple):
    """What the service knows of one request, for a client that asked (`audit`): its arrival sequence
    number at the distributor, the shard that held it (-1: none), and the service's time.monotonic()
    seconds when the distributor received it, its shard queued it and it was dispatched (0: never),
    and when that dispatch was committed (`decided`: what the inversion count judges by)."""

    seq: int
    shard: int
    received: float
    enqueued: float
    dispatched: float
    decided: float = 0.0


class Waiter(Protocol):
    """A client connection waiting for outcomes (one per connection, many admissions each)."""

    def deliver(
        self, cid: Any, request_id: int, outcome: Outcome, ticket: int, wait: float, retry_after: int,
        audit: Audit | None = None,
    ) -> None:
        """The final outcome of admission `cid`. `ticket` is non-zero only for `dispatched`; `audit` is
        given when the admission asked for it."""

    def fail(self, cid: Any, message: str) -> None:
        """Admission `cid` failed on an internal error (a bug: the distributor raised on it, or the
        acceptor's link could not carry it): no outcome will come; its client is answered 500. Called by
        an acceptor's `Upstream` on its fronts' waiters (the HTTP and binary connections, a proxied
        `Exchange`); the distributor's `AcceptorLink` passes it on to its acceptor."""


class Admission(Protocol):
    """Implemented by `distributor.service.Distributor` (fronts in its own process) and by
    `distributor.front.Upstream` (fronts in an acceptor process, speaking to the distributor)."""

    @property
    def accepting(self) -> bool:
        """False once draining: new admissions get `rejected: shutting_down`."""

    @property
    def reading(self) -> bool:
        """False once the service has stopped (its last outcomes counted, the exit line's counts
        final): the fronts handle nothing more from their clients (what they send is read and
        dropped), so no request is answered that those counts miss (a review: rejections made after
        them, 32-77 % of a drain's)."""

    def admit(
        self, waiter: Waiter, cid: Any, flow: str, priority: int, size: int, ttl: float, slo: float,
        tokens: int, weight: float, leased: bool, audit: bool = False, *, proxied: bool = False,
    ) -> int:
        """Admit an already validated request; returns its request id. The outcome comes by
        `waiter.deliver` — possibly before this returns (rejections, the idle fast path).
        `leased`: the ticket expires after the configured lease unless released (HTTP).
        `audit`: deliver the request's `Audit` with its outcome. `proxied`: a proxied request (proxy
        mode, not leased: its proxy releases it); from an acceptor process the distributor counts
        these for the drain and the utilization detector (distributor.acceptors)."""

    def cancel(self, request_id: int) -> None:
        """The client of a pending admission went away: evict it (`cancelled`) or, if it is
        dispatched meanwhile, release its budget at once. No outcome is delivered after this."""

    def release(self, ticket: int, tokens: int = -1) -> bool:
        """Free a dispatched request's ticket. False for unknown or already released tickets.
        `tokens` >= 0: the request's actual cost, to correct its flow's fairness charge."""

    def unclaim(self, ticket: int) -> None:
        """Free the ticket of a dispatch whose client had gone before its answer could be written (it
        is answered `evicted: cancelled`, or not at all): counted unclaimed, as a dispatch its client
        left during, not as a release."""

    def release_then(
        self, ticket: int, tokens: int, done: Callable[[int, bool], None],
        failed: Callable[[str], None] | None = None,
    ) -> None:
        """`release`, answered by `done(ticket, ok)`: at once in the distributor's process, after a
        round trip from an acceptor process (`distributor.front`). `tokens` -1: none reported.
        The distributor failing on it (a bug): in its process the call raises; from an acceptor,
        `failed(message)` is called instead of `done` (without `failed`: `done(ticket, False)`), so
        the front answers as it does when the call raises."""

    def after(self, done: Callable[[], None]) -> None:
        """Call `done()` once every call made before this one has been handled and the answers it
        decided at once (a release's, a rejection's, a dispatch on the idle fast path) delivered: at
        once in the distributor's process, after a round trip from an acceptor process (its link is
        answered in order). A binary connection answers in order what comes after the replies still
        on their way: a protocol error's Error(-1, ...), a refused Release; and learns which of its
        admissions without an answer are queued, not answered on their way (its replies waiting)."""

    def query(self, what: str, done: Callable[[bytes, str], None]) -> None:
        """The body and content type of GET /v1/stats (`what` "stats", JSON) or GET /metrics
        ("metrics"), given to `done` (at once, or after a round trip from an acceptor process)."""

    def delivered(self, ticket: int) -> None:
        """The answer carrying this leased (HTTP) ticket is about to be written to its client (the
        front calls this right before the write): its lease runs from then (in the distributor's
        process at once, `Distributor.restart_lease`); an acceptor logs it at once and reports it
        at the end of the pass, so that the tickets of answers it never wrote (it died or hung) are
        released at once instead of holding the budget for the lease, and a ticket whose answer may
        have reached its client is not released under it (distributor.deliverylog)."""

    def release_all(self, waiter: Waiter) -> int:
        """The connection closed: release every ticket it holds (binary protocol)."""

    def holds(self, waiter: Waiter) -> bool:
        """Whether the connection holds a ticket (binary protocol; an idle one is closed only if not)."""

    @property
    def ready(self) -> bool:
        """All shards are up and the service accepts work (`GET /readyz`)."""
