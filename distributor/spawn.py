"""Starting a child process of the distributor (a shard worker, an acceptor) linked by socket pairs.

One place for what both need: the descriptors come from the reserve (`distributor.fdreserve`), so a
child can be (re)started while clients hold every other descriptor; the child's ends are passed
and closed here; the first pair is connected to the given protocol; and if anything fails, nothing
is left open and the child is killed and reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence

from distributor.fdreserve import FdReserve

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RESTART_MIN = 0.05  # a child that keeps dying is restarted after this, doubling per death in a row...
RESTART_MAX = 5.0  # ...up to this
RESTART_QUIET = 10.0  # a death this long after the one before begins a new run (restarted at once)


class RestartBackoff:
    """When to restart a child that died: at once, unless it died within `RESTART_QUIET` of its previous
    death; then after a back-off that doubles per death in such a run. Counted per run, not over the
    child's life (a review: after eight early deaths, two deaths 0.5 s apart hours later cost 5 s)."""

    __slots__ = ("last", "run")

    def __init__(self) -> None:
        self.run = 0  # deaths in a row, each within RESTART_QUIET of the one before (the first: 0)
        self.last = -float("inf")  # when it last died (monotonic)

    def died(self, now: float) -> float:
        """Count a death at `now`; the delay before its restart."""
        self.run = self.run + 1 if now - self.last < RESTART_QUIET else 0
        self.last = now
        return min(RESTART_MAX, RESTART_MIN * 2 ** min(self.run - 1, 7)) if self.run else 0.0


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
            # Born with SIGINT and SIGTERM blocked (the mask passes through exec): the child ignores
            # both (`attach_to_distributor`) once its imports are done, and a Ctrl-C to the process
            # group before then printed a traceback per child and a "killed by SIGINT; restarting
            # it" (a review). Blocked here, not ignored: one meant for the distributor meanwhile waits.
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                proc = subprocess.Popen([sys.executable, "-P", "-m", *argv(fds)], pass_fds=[*fds, *extra_fds],
                                        stdin=subprocess.DEVNULL)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
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
