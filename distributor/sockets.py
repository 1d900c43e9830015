"""What the fronts need from a connection's socket beyond the transport: how much of what was
written the client has not taken yet, a close that does not wait for it, and whether the client is
still there while its input is not being read.

A graceful close leaves unsent bytes to the kernel, which keeps an orphaned socket (FIN-WAIT-1) with
megabytes queued for as long as the peer does not read; a reset (SO_LINGER 0) discards them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import socket
import struct
import termios
from collections.abc import Callable, Iterable

_LINGER_RESET = struct.pack("ii", 1, 0)
# A client whose unread answers stop the writing is dropped after a timeout unless it reads at least
# this many bytes a second meanwhile: slowly is fine, not at all is not. What it read is what it
# acknowledged, `unsent` shrinking: the transport's own buffer drains only in steps of a third of the
# kernel's (megabytes), so clients reading 4-128 KiB/s looked stuck for 10 s and were cut off (a review)
MIN_READ_RATE = 1024
# ... judged over this many timeouts: a reader's kernel acknowledges in steps of its segment size or a
# sixteenth of its receive buffer (up to 512 KiB), so one reading 8-16 KiB/s showed nothing for a whole
# timeout at a time and was dropped (a review); one that reads nothing is dropped this much later
READ_WINDOW = 4
TCP_ESTABLISHED = 1  # tcp_info.tcpi_state (linux/tcp_states.h)


def unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes written and not yet acknowledged by the peer: the transport's buffer plus the kernel's
    send queue (SIOCOUTQ). 0 once the client has taken everything."""
    size = transport.get_write_buffer_size()  # type: ignore[attr-defined]
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            size += struct.unpack("i", buf)[0]
    return int(size)


# At the exit, the answers already written get at least `at_least` seconds (an acceptor's `FLUSH_GRACE`),
# then as long as the clients keep taking them (what is unsent changes within `EXIT_STALL`: it also grows
# as a connection writes answers it held while its writing was paused), up to `EXIT_LIMIT`
EXIT_STALL = 0.5
EXIT_LIMIT = 2.5


async def let_answers_leave(transports: Callable[[], Iterable[asyncio.BaseTransport]], at_least: float = 0.0,
                            cut: Callable[[], bool] = lambda: False) -> None:
    """Before the process exits: wait while clients are still taking what was written to them (each
    transport's `unsent`; `transports` is asked each time, the connections that are still open).
    Exiting with answers unsent leaves them to the kernel, which loses them if the client sends
    anything meanwhile (a reset: review 155, a client reading its 20,000 answers slowly sent one more
    request as the drain ended and lost 6,560-12,534 of them; reading nothing, it lost none). `cut`:
    stop waiting now (a second signal)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    last, moved_at = -1, start
    while True:
        now = loop.time()
        if cut():
            return
        left = sum(unsent(t) for t in transports())  # (closing ones too: review 158, a half-closed client's)
        if left != last:
            last, moved_at = left, now
        if now - start >= at_least and (left == 0 or now - start >= EXIT_LIMIT or now - moved_at >= EXIT_STALL):
            return
        await asyncio.sleep(0.01)


def reset(transport: asyncio.BaseTransport) -> None:
    """Close at once, discarding whatever the client has not read (it gets a reset)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()  # type: ignore[attr-defined]


def dead_peer(exc: BaseException | None) -> bool:
    """A connection the kernel gave up on (`flowshard.keepalive`: its peer's host stopped answering, or
    left its receive window shut, reading nothing, for `dead_peer_timeout`), as opposed to one closed
    or reset by its peer."""
    return isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT


def peer_state(transport: asyncio.BaseTransport) -> int | None:
    """The connection's TCP state as the kernel knows it (TCP_INFO's `tcpi_state`: ESTABLISHED 1, CLOSE
    after the client's reset, CLOSE_WAIT after its FIN), whether or not its input has been read (a
    transport whose reading is paused sees neither until it reads again). None for a socket that is
    not TCP, or one that cannot be asked."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
    except (OSError, ValueError):
        return None
    return info[0] if info else None
