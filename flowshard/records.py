"""Per-request records: the raw data an auditor recomputes fairness and ordering from.

`flowshard simulate --records FILE` and `flowshard bench --records FILE` write JSON Lines: a header
object first, then one array per request, positional, in the order of `COLUMNS`:

    {"format": "flowshard-records/1", "source": "simulate", "scenario": "...", "columns": [...],
     "units": {"p0": "bytes"}, "weights": {"tenant-a": 3.0}, "window": [1.0, 10.0], ...}
    ["tenant-a", "p0", 17, 1.250000123, 1.5, 1.6, 0, "dispatched", 2048, 0, 0.1]

The header also says what the scenario meant for an audit (`flowshard.simulate.audit_header`):
`units`, each band's fairness unit (`requests`, `bytes` or `cost`: a request's tokens, else its
bytes); `weights`, the flows whose weight is not 1 (their share of the band is in proportion);
`window`, the seconds from the start of the run that the figures count (warmup, duration).

- flow, band: the flow id and its band's name.
- seq: the arrival sequence number at the service (the simulator's request id; the distributor's
  request id in `bench`, known when the answer carried it, else null). Order requests by it.
- arrival, dispatch, done: seconds from the start of the run. `arrival`: when the service received
  it (bench: when the generator sent it, unless the answer carried the service's own times);
  `dispatch`: when it was dispatched (bench: the service's commit time, the audit's `decided`, when
  the service sends it; null otherwise); `done`: when it ended — the end of its service
  for a dispatch, the outcome's time otherwise, the end of the run for `unfinished`.
- shard: the shard that held it (-1: dispatched at the distributor's idle fast path; null: never queued,
  a rejection, or unknown).
- outcome: `dispatched`, `rejected:<reason>`, `evicted:<reason>`, `unfinished`, `unsent` (bench over
  HTTP: still waiting in the generator for a free connection when the run ended; the service never
  saw it) or `error`.
- size (bytes), tokens (declared, 0: none), service (seconds it held its slot; null if not dispatched).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

FORMAT = "flowshard-records/1"
COLUMNS = ("flow", "band", "seq", "arrival", "dispatch", "done", "shard", "outcome", "size", "tokens", "service")


def encode(source: str, scenario: str, rows: Iterable[Sequence[object]], **header: object) -> bytes:
    """The whole JSON Lines document: the header, then one line per record."""
    encoder = msgspec.json.Encoder()
    head = {"format": FORMAT, "source": source, "scenario": scenario, "columns": list(COLUMNS), **header}
    out = bytearray(encoder.encode(head))
    out += b"\n"
    for row in rows:
        encoder.encode_into(row, out, -1)
        out += b"\n"
    return bytes(out)


def decode(data: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, records as dicts) of a one-run records document; for tests and audits."""
    (run,) = decode_runs(data)
    return run


def decode_runs(data: bytes) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Every run of a records file (`bench` writes one header line, then its records, per run)."""
    runs: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    columns: list[str] = []
    for line in data.splitlines():
        if not line:
            continue
        value = msgspec.json.decode(line)
        if isinstance(value, dict):
            columns = value["columns"]
            runs.append((value, []))
        else:
            runs[-1][1].append(dict(zip(columns, value, strict=True)))
    return runs
