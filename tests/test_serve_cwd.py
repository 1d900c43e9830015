"""`flowshard serve` as a user starts it, a real process: from a directory of the user's own project
(the shard workers are flowshard's, not a `workers` package that happens to sit in that directory, a
common name), on an IPv6 address (its ready line's URL is one), and under a low descriptor limit."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import resource
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
    cwd: Path, config: str, give_up: Callable[[], bool] = lambda: False, nofile: tuple[int, int] | None = None
) -> Iterator[tuple[str, re.Match[str] | None]]:
    """`flowshard serve --config CONFIG` started in `cwd` (with RLIMIT_NOFILE `nofile`, soft and hard, if
    given): yields its stderr up to the ready line (or to 30 s, its exit, or `give_up()`) and the ready
    line's match; then SIGTERM, which must exit 0."""
    limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile)) if nofile else None
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowshard.cli", "serve", "--config", config, "--port", "0", "--binary-port", "0"],
        cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), preexec_fn=limit,
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


def _open_files_limit(pid: int) -> int:
    (line,) = [ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines() if ln.startswith("Max open files")]
    return int(line.split()[3])


def test_a_low_descriptor_limit_is_raised_or_said(tmp_path: Path) -> None:
    """A soft limit of 1,024 (a common default) closed connections at accept long before
    `max_connections`; serve raises it as far as the hard limit lets it, and says when that is short."""
    (tmp_path / "c.toml").write_text("[service]\nmax_connections = 1000\n")
    needed = 3 * 1000 + 80 + 1  # two fronts and HTTP's closing ones, the distributor's own, one worker
    # (fdreserve.descriptors_needed)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the hard limit here ({hard}) is below {needed}")
    with serve(tmp_path, "c.toml", nofile=(256, hard)) as (text, ready):
        assert ready, text
        assert _open_files_limit(int(ready.group(4))) >= needed
        assert "open-descriptor limit" not in text, text
    with serve(tmp_path, "c.toml", nofile=(256, 512)) as (text, ready):
        assert ready, text
        assert _open_files_limit(int(ready.group(4))) == 512
        assert (f"the open-descriptor limit is 512 (ulimit -n, hard limit 512), below the {needed} that "
                "max_connections = 1000 on both ports needs") in text, text
