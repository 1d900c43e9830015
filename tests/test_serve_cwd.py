"""`flowshard serve` started from a directory of the user's own project: the shard workers are
flowshard's, not a `workers` package that happens to sit in that directory (a common name)."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

READY = re.compile(r"flowshard ready: http=\S+ binary=\S+ shards=(\d+) pid=(\d+)")


def test_serve_ignores_a_workers_package_in_the_current_directory(tmp_path: Path) -> None:
    decoy = tmp_path / "workers"
    decoy.mkdir()
    marker = tmp_path / "decoy-ran"
    (decoy / "__init__.py").write_text("")
    (decoy / "__main__.py").write_text(f"open({str(marker)!r}, 'a').write('x')\nraise SystemExit(3)\n")
    (tmp_path / "empty.toml").write_text("")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowshard.cli", "serve", "--config", "empty.toml", "--port", "0", "--binary-port", "0"],
        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert proc.stderr is not None
    err = b""
    try:
        deadline = time.monotonic() + 30.0
        while not READY.search(err.decode(errors="replace")) and time.monotonic() < deadline:
            if select.select([proc.stderr], [], [], 0.2)[0]:
                chunk = os.read(proc.stderr.fileno(), 65536)
                if not chunk:
                    break
                err += chunk
            if marker.exists():
                break
        assert not marker.exists(), "serve ran the `workers` package of its working directory"
        assert READY.search(err.decode(errors="replace")), err.decode(errors="replace")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:  # only our own session: the service we started and its workers
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
