"""Boundary validation of an admission, shared by the HTTP/JSON and the binary protocol.

Types are checked by msgspec while decoding; this checks ranges and names the field, the value
and what is allowed. A request that fails here never becomes a request: it gets a 4xx error.
"""

from __future__ import annotations

import difflib
import math

import msgspec

MAX_FLOW_ID = 256
MAX_SIZE = 1 << 40  # 1 TiB: a size beyond this is a client bug, not a request
MAX_SECONDS = 7 * 86400.0
MAX_TOKENS = 1 << 32
MAX_WEIGHT = 1e6
MAX_PRIORITY = 1 << 31


class AdmitBody(msgspec.Struct, forbid_unknown_fields=True):
    """The JSON body of `POST /v1/admit`. `bytes` is the request's size for capacity and fairness."""

    flow: str
    priority: int = 0
    bytes: int = 0
    ttl: float = 0.0
    slo: float = 0.0
    tokens: int = 0
    weight: float = 0.0
    audit: bool = False  # answer with what the service knows of the request (see README)


# names a caller may bring from the other API (the Python client) or from habit -> the JSON field
_ADMIT_ALIASES = {"size": "bytes", "wait": "ttl", "timeout": "ttl", "tenant": "flow", "flow_id": "flow"}


def admit_field_hint(message: str) -> str:
    """An unknown-field message about an admit body, with the field it probably meant."""
    _, sep, rest = message.partition("unknown field `")
    if not sep:
        return message
    name = rest.split("`", 1)[0]
    close = difflib.get_close_matches(name, AdmitBody.__struct_fields__, n=1, cutoff=0.7)
    meant = _ADMIT_ALIASES.get(name) or (close[0] if close else None)
    return f"{message}; did you mean `{meant}`?" if meant else message


class ReleaseBody(msgspec.Struct, forbid_unknown_fields=True):
    """`tokens`: the request's actual cost, correcting its flow's VTC charge (omit: no correction)."""

    ticket: int
    tokens: int | None = None


def check_release_tokens(tokens: int | None, *, allow_unset: bool = False) -> str | None:
    """None if a release's actual `tokens` is acceptable (None, or -1 on the binary wire: not given)."""
    if tokens is None or (allow_unset and tokens == -1):
        return None
    if not 0 <= tokens <= MAX_TOKENS:
        return f"tokens: {tokens} is outside [0, 2^32]"
    return None


def check_admit(
    flow: str,
    priority: int,
    size: int,
    ttl: float,
    slo: float,
    tokens: int,
    weight: float,
    *,
    size_field: str = "bytes",
) -> str | None:
    """None if the admission is valid, else a message naming the field, the value and the rule.

    `size_field` is what the caller's protocol calls the size (`bytes` in JSON, `size` in binary).
    """
    if not flow:
        return "flow: must be a non-empty string"
    if len(flow) > MAX_FLOW_ID:
        return f"flow: {len(flow)} characters, at most {MAX_FLOW_ID} allowed"
    if not -MAX_PRIORITY <= priority < MAX_PRIORITY:
        return f"priority: {priority} is outside [-2^31, 2^31)"
    if not 0 <= size <= MAX_SIZE:
        return f"{size_field}: {size} is outside [0, 2^40]"
    for name, value in (("ttl", ttl), ("slo", slo)):
        if not (math.isfinite(value) and 0 <= value <= MAX_SECONDS):
            return f"{name}: {value} is outside [0, {MAX_SECONDS:.0f}] seconds"
    if not 0 <= tokens <= MAX_TOKENS:
        return f"tokens: {tokens} is outside [0, 2^32]"
    if not (math.isfinite(weight) and 0 <= weight <= MAX_WEIGHT):
        return f"weight: {weight} is outside [0, {MAX_WEIGHT:.0f}] (0: the flow's configured weight)"
    return None
