"""Starting a child process of the distributor (a shard worker, an acceptor) linked by socket pairs.

One place for what both need: the descriptors come from the reserve (`distributor.fdreserve`), so a
child can be (re)started while clients hold every other descriptor; the child's ends are passed
and closed here; the first pair is connected to the given protocol; and if anything fails, nothing
is left open and the child is killed and reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence

from distributor.fdreserve import FdReserve


async def spawn_linked(
    argv: Callable[[list[int]], list[str]],
    link: asyncio.Protocol,
    reserve: FdReserve | None,
    kinds: Sequence[int] = (socket.SOCK_STREAM,),
    extra_fds: Sequence[int] = (),
) -> tuple[subprocess.Popen[bytes], list[socket.socket]]:
    """Start `python -P -m *argv(child_fds)` with one Unix socket pair per entry of `kinds` (socket
    types), the child's end of each passed as the descriptor at the same position of `child_fds`.
    Our end of the first pair is connected to `link`; our ends of the others are returned,
    non-blocking. `extra_fds` are passed too, under their own numbers (the caller keeps and closes
    them). Raises OSError (having left nothing open) if it cannot.

    -P: the child's modules are the installed ones, never a `workers` or `distributor` package that
    happens to be in the directory `flowshard serve` was started from."""
    loop = asyncio.get_running_loop()
    ours: list[socket.socket] = []
    theirs: list[socket.socket] = []
    with reserve.use(spare=2 * len(kinds)) if reserve is not None else contextlib.nullcontext():
        try:
            for kind in kinds:
                mine, child = socket.socketpair(socket.AF_UNIX, kind)
                ours.append(mine)
                theirs.append(child)
            fds = [s.fileno() for s in theirs]
            proc = subprocess.Popen([sys.executable, "-P", "-m", *argv(fds)], pass_fds=[*fds, *extra_fds],
                                    stdin=subprocess.DEVNULL)
        except BaseException:
            for s in ours:
                s.close()
            raise
        finally:
            for s in theirs:
                s.close()
    try:
        await loop.create_unix_connection(lambda: link, sock=ours[0])
    except BaseException:
        for s in ours[1:]:
            s.close()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        raise
    finally:
        ours[0].close()  # the loop holds its own duplicate
        if reserve is not None:
            reserve.refill()
    for s in ours[1:]:
        s.setblocking(False)
    return proc, ours[1:]
