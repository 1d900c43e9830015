"""An acceptor's log of the HTTP tickets whose answers it wrote, in memory shared with the distributor.

An acceptor reports the answers it wrote (`LinkDelivered`) once per event-loop pass. If it dies, the
distributor releases the tickets of answers not reported, since nobody got them, and keeps the others
for their lease. An answer written in the pass in which the acceptor died has no report, although
its client may hold the ticket: released then, in flight would exceed the budget while that client
works. So the acceptor also writes each ticket here, a memory store made right before the answer's
`write()`, and the distributor reads this log only when the acceptor is gone: a ticket in it may
have reached its client and is kept for its lease. No system call, no message, no wake-up per answer
(a link write per answer instead cost the distributor 16–31 % more CPU per HTTP request, measured).

The memory is a memfd (no name in /dev/shm, so nothing can leak: it is freed with the last mapping),
created by the distributor for each acceptor it starts and handed to it as a descriptor. A ring of
`CAPACITY` tickets after a count of all written so far; one writer, and one reader that reads only
after the writer is dead. A ticket leaves the ring after `CAPACITY` later answers; the distributor
needs it only until the acceptor's next report, a pass later, so the ring would have to take that
many answers in one pass to lose one.
"""

from __future__ import annotations

import mmap
import os

CAPACITY = 1 << 16  # tickets kept: 512 KiB per acceptor
_SLOTS = CAPACITY + 1  # [0]: how many were written in all; then the ring
NBYTES = 8 * _SLOTS


def create_fd() -> int:
    """A new log's descriptor (close-on-exec; pass it to the acceptor explicitly), zeroed."""
    fd = os.memfd_create("flowshard-delivered", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, NBYTES)
    except BaseException:
        os.close(fd)
        raise
    return fd


class DeliveryLog:
    """A mapping of one log; `fd` may be closed once this is built."""

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, NBYTES)
        self._q = memoryview(self._map).cast("q")

    def add(self, ticket: int) -> None:
        """The acceptor, right before writing the answer that carries `ticket`."""
        q = self._q
        n = q[0]
        q[1 + n % CAPACITY] = ticket
        q[0] = n + 1

    def tickets(self) -> set[int]:
        """The distributor, once the acceptor is gone: the tickets of the last `CAPACITY` answers."""
        q = self._q
        n = q[0]
        return set(q[1 : 1 + min(n, CAPACITY)].tolist())

    def close(self) -> None:
        self._q.release()
        self._map.close()
