"""`flowshard serve` as a user starts it, a real process: from a directory of the user's own project
(the shard workers are flowshard's, not a `workers` package that happens to sit in that directory, a
common name), and on an IPv6 address (its ready line's URL is one)."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

READY = re.compile(r"flowshard ready: http=(\S+) binary=(\S+) shards=(\d+) pid=(\d+)")


@contextlib.contextmanager
def serve(
    cwd: Path, config: str, give_up: Callable[[], bool] = lambda: False
) -> Iterator[tuple[str, re.Match[str] | None]]:
    """`flowshard serve --config CONFIG` started in `cwd`: yields its stderr up to the ready line (or to
    30 s, its exit, or `give_up()`) and the ready line's match; then SIGTERM, which must exit 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowshard.cli", "serve", "--config", config, "--port", "0", "--binary-port", "0"],
        cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert proc.stderr is not None
    err = b""
    try:
        deadline = time.monotonic() + 30.0
        while not READY.search(err.decode(errors="replace")) and time.monotonic() < deadline and not give_up():
            if select.select([proc.stderr], [], [], 0.2)[0]:
                chunk = os.read(proc.stderr.fileno(), 65536)
                if not chunk:
                    break
                err += chunk
        text = err.decode(errors="replace")
        yield text, READY.search(text)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:  # only our own session: the service we started and its workers
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_serve_ignores_a_workers_package_in_the_current_directory(tmp_path: Path) -> None:
    decoy = tmp_path / "workers"
    decoy.mkdir()
    marker = tmp_path / "decoy-ran"
    (decoy / "__init__.py").write_text("")
    (decoy / "__main__.py").write_text(f"open({str(marker)!r}, 'a').write('x')\nraise SystemExit(3)\n")
    (tmp_path / "empty.toml").write_text("")
    with serve(tmp_path, "empty.toml", give_up=marker.exists) as (text, ready):
        assert not marker.exists(), "serve ran the `workers` package of its working directory"
        assert ready, text


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_the_ready_line_of_an_ipv6_host_gives_urls_that_work(tmp_path: Path) -> None:
    """A review: `http=http://::1:35877` is not a URL; `[::1]:35877` is, and a client can use it."""
    (tmp_path / "v6.toml").write_text('[service]\nhost = "::1"\n')
    with serve(tmp_path, "v6.toml") as (text, ready):
        assert ready, text
        url = urlsplit(ready.group(1))
        assert url.hostname == "::1" and url.port, ready.group(1)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
        binary = urlsplit("//" + ready.group(2))  # host:port, the host bracketed as in a URL
        assert binary.hostname == "::1" and binary.port, ready.group(2)
        socket.create_connection((binary.hostname, binary.port), timeout=5).close()
