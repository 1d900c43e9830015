"""What the fronts need from a connection's socket beyond the transport: how much of what was
written the client has not taken yet, and a close that does not wait for it.

A graceful close leaves unsent bytes to the kernel, which keeps an orphaned socket (FIN-WAIT-1) with
megabytes queued for as long as the peer does not read; a reset (SO_LINGER 0) discards them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios

_LINGER_RESET = struct.pack("ii", 1, 0)


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


def reset(transport: asyncio.BaseTransport) -> None:
    """Close at once, discarding whatever the client has not read (it gets a reset)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()  # type: ignore[attr-defined]
