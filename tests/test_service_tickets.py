"""A binary (not leased) ticket's bookkeeping in the distributor: each ticket is in its owner's set in
`Distributor._owned` (its connection, or an acceptor's link), which its `Ticket` keeps (eighth round: the
release discards it there without a lookup). A ticket releases once; an owner's set leaves `_owned`
when it empties and a new one takes its place; `release_all` releases exactly the owner's tickets
still held; nothing is left behind. A real Distributor in one process, its idle fast path dispatching."""

from __future__ import annotations

from test_write_order import Waiter  # (it keeps the tickets it is given)

from distributor.service import Distributor
from flowshard.config import BandConfig, BudgetConfig, Config, ServiceConfig
from flowshard.shm import ShmStats


def _distributor() -> Distributor:
    config = Config(bands=[BandConfig(priority=0)], budget=BudgetConfig(max_inflight_requests=100),
                    service=ServiceConfig(fast_path=True), flow_slots=64)
    d = Distributor(config, shards=1)
    d.shm = ShmStats(bytearray(d.layout.nbytes), d.layout, init=True)
    d._accepting = True
    d.shards[0].ready = True
    return d


def _admit(d: Distributor, waiter: Waiter, n: int) -> list[int]:
    for i in range(n):
        d.admit(waiter, i, "f", 0, 10, 0.0, 0.0, 0, 0.0, False)
    return waiter.tickets[-n:]


def test_binary_tickets_release_once_and_their_owners_sets_follow_them() -> None:
    d = _distributor()
    a, b = Waiter(), Waiter()
    a1, a2, a3 = _admit(d, a, 3)
    b1, b2 = _admit(d, b, 2)
    assert d._owned == {a: {a1, a2, a3}, b: {b1, b2}}
    assert d.tickets[a1].owned is d._owned[a] and d.tickets[b1].owned is d._owned[b]
    assert d.release(a1) and not d.release(a1)  # once
    assert d._owned[a] == {a2, a3}
    assert d.release(b2) and d.release(b1)
    assert b not in d._owned  # its set emptied: gone
    (b3,) = _admit(d, b, 1)  # a new set for the same owner
    assert d._owned[b] == {b3} and d.tickets[b3].owned is d._owned[b]
    assert d.release_all(b) == 1 and not d.release(b3)
    assert d.release_all(a) == 2 and not d.release(a2) and not d.release(a3)
    assert d._owned == {} and d.tickets == {}
    assert d.ledger.budget.inflight == 0 and d.ledger.budget.inflight_bytes == 0
    assert d.counters["tickets_released"] == 6
    d.shm.close()


def test_a_leased_ticket_is_in_no_owners_set() -> None:
    d = _distributor()
    w = Waiter()
    d.admit(w, 1, "f", 0, 10, 0.0, 0.0, 0, 0.0, True)
    (ticket,) = w.tickets
    assert ticket in d.leases and d.tickets[ticket].owned is None and d._owned == {}
    assert d.release(ticket) and ticket not in d.leases and not d.release(ticket)
    d.shm.close()
