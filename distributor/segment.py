"""The service's one shared-memory segment: created and unlinked by the distributor.

Names carry the creating pid (`flowshard-<pid>-<token>`), so a new instance can remove the
segments of instances that died without cleaning up (SIGKILL) and leave live ones alone.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from multiprocessing import shared_memory

PREFIX = "flowshard-"
SHM_DIR = "/dev/shm"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Unlink segments whose creating process no longer exists. Returns their names."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(SHM_DIR):
            if not name.startswith(PREFIX):
                continue
            pid_text = name[len(PREFIX) :].split("-", 1)[0]
            if pid_text.isdigit() and not _alive(int(pid_text)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(SHM_DIR, name))
                    removed.append(name)
    return removed


def create(size: int) -> shared_memory.SharedMemory:
    """A fresh zero-filled segment. Python's resource tracker also unlinks it if we are killed."""
    name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    return shared_memory.SharedMemory(name=name, create=True, size=size)


def destroy(segment: shared_memory.SharedMemory) -> None:
    with contextlib.suppress(BufferError):
        segment.close()
    with contextlib.suppress(FileNotFoundError):
        segment.unlink()
