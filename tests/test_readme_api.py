"""The documented API is what the service does: the README's client quick start runs verbatim against a
real service, and the answer bodies docs/service.md shows have the keys the service sends."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from servicekit import admit_http, launch, release_http, run

__all__ = ["launch"]

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SERVICE = (ROOT / "docs" / "service.md").read_text()  # the API's reference


def _block_after(heading: str, lang: str) -> str:
    section = README.split(heading, 1)[1]
    match = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert match, f"no {lang} block after {heading!r}"
    return match.group(1)


def test_client_quick_start_runs_verbatim(launch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code = _block_after("### Binary protocol and the Python client", "python")
    assert "asyncio.run(main())" in code and "finally:" in code and "await client.release(" in code
    svc = launch(budget=2)  # fewer slots than requests: some wait for a release, none is refused
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    env = {**os.environ, "FLOWSHARD_HOST": svc.host, "FLOWSHARD_BINARY_PORT": str(svc.binary_port)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "9 of 9 answered"


def _documented_bodies() -> dict[int, list[dict[str, object]]]:
    """status -> the JSON bodies the API reference (docs/service.md) shows for it."""
    section = SERVICE.split("## HTTP/JSON API", 1)[1].split("## Binary protocol", 1)[0]
    bodies: dict[int, list[dict[str, object]]] = {}
    for status, body in re.findall(r"^(\d{3}) (\{.*?\})(?=\s|$)", section, re.M):
        bodies.setdefault(int(status), []).append(json.loads(body))
    dispatched = re.search(r"then `200 (\{.*?\})`", section)
    assert dispatched
    bodies[200] = [json.loads(dispatched.group(1))]
    return bodies


def test_documented_answer_bodies_have_the_keys_the_service_sends(launch) -> None:  # type: ignore[no-untyped-def]
    documented = _documented_bodies()
    assert {200, 400, 422, 429, 503} <= documented.keys()
    svc = launch(budget=1, extra="default_ttl = 0.2")

    async def main() -> dict[int, list[dict[str, object]]]:
        port = svc.http_port
        held = await admit_http(port, "a")
        evicted = await admit_http(port, "b")  # waits 0.2 s for the held slot, then its TTL ends it
        invalid = await admit_http(port, "a", bytes=-1)
        unknown = await admit_http(port, "a", size=1)
        mistyped = await admit_http(port, "a", bytes="ten")
        assert (await release_http(port, held.json()["ticket"])).status == 200
        real: dict[int, list[dict[str, object]]] = {}
        for r in (held, evicted, invalid, unknown, mistyped):
            real.setdefault(r.status, []).append(r.json())
        return real

    real = run(main())
    assert real.keys() == {200, 429, 422, 400}
    for status, bodies in real.items():
        for doc in documented[status]:
            assert _shape(doc) == _shape(bodies[0]), (status, doc, bodies)
    assert real[422] == documented[422] == [{"error": {"status": 422, "message": "bytes: -1 is outside [0, 2^40]"}}]
    # a client-API name over HTTP gets the JSON name suggested; a wrong type is named in our words
    assert real[400] == documented[400] == [
        {"error": {"status": 400, "message": "invalid admit body: unknown field `size`; did you mean `bytes`?"}},
        {"error": {"status": 400, "message": "invalid admit body: bytes: expected an integer, got a string"}},
    ]
    for doc in documented[429] + documented[503]:  # every refusal names a real outcome
        assert f"{doc['outcome']}: {doc['reason']}" in README


def _shape(body: object) -> object:
    """Keys and value types, not values."""
    if isinstance(body, dict):
        return {k: _shape(v) for k, v in body.items()}
    return "number" if isinstance(body, int | float) else type(body).__name__
