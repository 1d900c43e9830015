"""Helpers for proxy-mode tests: the fake OpenAI backend (`bench.fakeoai`) as a real process.

`fake_backend` (pytest fixture) starts fakes with `fake_backend(ttft=..., itl=...)`, each on a free
port (read from its ready line), and after the test stops each one by pid (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any
from urllib.request import Request, urlopen

import pytest
from servicekit import ROOT, config_text

_READY = re.compile(r"fakeoai ready: (http://\S+) pid=(\d+)")


class FakeOai:
    """One `python -m bench.fakeoai` process."""

    def __init__(self, prefix: tuple[str, ...] = (), **options: Any) -> None:
        """`prefix`: a command that runs it (e.g. `ip netns exec NAME`, in another network namespace)."""
        cmd = [*prefix, sys.executable, "-m", "bench.fakeoai", "--port", "0"]
        for name, value in options.items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                cmd.append(flag)
            else:
                cmd += [flag, str(value)]
        self.popen = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE)
        self.url = ""
        ready = threading.Event()

        def read() -> None:
            assert self.popen.stderr is not None
            for raw in self.popen.stderr:
                m = _READY.search(raw.decode(errors="replace"))
                if m and not self.url:
                    self.url = m[1]
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(20) or not self.url:
            self.stop()
            raise AssertionError("fakeoai did not start")

    def stats(self) -> dict[str, Any]:
        with urlopen(self.url + "/fake/stats", timeout=5) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def configure(self, **changes: Any) -> dict[str, Any]:
        req = Request(self.url + "/fake/config", data=json.dumps(changes).encode(), method="POST")
        with urlopen(req, timeout=5) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


@pytest.fixture
def fake_backend() -> Iterator[Any]:
    fakes: list[FakeOai] = []

    def start(**options: Any) -> FakeOai:
        fake = FakeOai(**options)
        fakes.append(fake)
        return fake

    try:
        yield start
    finally:
        for fake in fakes:
            with contextlib.suppress(Exception):
                fake.stop()


def proxy_config(backends: list[str], *, proxy: dict[str, Any] | None = None, **kw: Any) -> str:
    """servicekit's small config plus a `[proxy]` table."""
    table: dict[str, Any] = {"backends": backends, "utilization": False}
    table.update(proxy or {})
    lines = ["[proxy]"]
    for key, value in table.items():
        lines.append(f"{key} = {json.dumps(value)}")  # JSON scalars and string lists are TOML too
    return config_text(**kw) + "\n".join(lines) + "\n"
