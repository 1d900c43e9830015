"""Finding a peer whose host is gone: TCP keepalive and TCP_USER_TIMEOUT on a socket.

A connection whose peer's host crashed, lost power or was cut off by the network never closes by
itself: nothing comes back to say so. The service's connections (clients', backends') and the
Python client's connection to the service ask the kernel to probe such a peer and fail the
connection, so that what it holds (a lease, a stream, a budget slot, pending admissions) ends.
"""

from __future__ import annotations

import socket
from typing import Any


def detect_dead_peers(sock: Any, timeout: float) -> None:
    """Have the kernel fail a connection whose peer's host stopped answering within about `timeout`
    seconds: keepalive probes after `timeout`/2 of silence, three of them `timeout`/6 apart, and
    TCP_USER_TIMEOUT bounding data sent and never acknowledged likewise. `sock`: a socket, or
    uvloop's PseudoSocket; a listening socket passes them on to the connections it accepts (Linux).
    0: the kernel's defaults (no keepalive; unacknowledged data retried for ~15 minutes)."""
    if timeout <= 0:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", max(1, round(timeout / 2))), ("TCP_KEEPINTVL", max(1, round(timeout / 6))),
                        ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", round(timeout * 1000))):
        option = getattr(socket, name, None)  # (the client may run where one is missing: macOS has no
        if option is not None:  # TCP_USER_TIMEOUT; the service runs on Linux, which has them all)
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
