"""Boundary validation of an admission, shared by the HTTP/JSON and the binary protocol.

Types are checked by msgspec while decoding; this checks ranges and names the field, the value
and what is allowed. A request that fails here never becomes a request: it gets a 4xx error.
msgspec's own decode errors are reworded here too (`json_problem`, `shape_problem`), so every
answer names the field the same way: `field: what is wrong`, and an unknown or missing field as
the configuration's errors name a key (`unknown field `size`; did you mean `bytes`?`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence

import msgspec

MAX_FLOW_ID = 256
MAX_SIZE = 1 << 40  # 1 TiB: a size beyond this is a client bug, not a request
MAX_SECONDS = 7 * 86400.0
MAX_TOKENS = 1 << 32
MAX_WEIGHT = 1e6
# The smallest weight other than 0 (a request's 0: its flow's configured weight). Weights meet costs of up
# to 2^40 bytes or 2^32 tokens in the fair shares' arithmetic: a weight of 1e-300 made a virtual time
# infinite (review 22); 1e-6 keeps every figure finite and exact enough, a million-to-one range.
MIN_WEIGHT = 1e-6
MAX_PRIORITY = 1 << 31
# Tickets are random integers below 2^53, exact in any JSON parser's double. A release of a number
# outside 1..MAX_TICKET is answered "unknown" at the boundary: it cannot name a ticket, and beyond
# 64 bits it could not even be forwarded to the distributor over an acceptor's link.
TICKET_BITS = 53
MAX_TICKET = (1 << TICKET_BITS) - 1


class AdmitBody(msgspec.Struct, forbid_unknown_fields=True):
    """The JSON body of `POST /v1/admit`. `bytes` is the request's size for capacity and fairness."""

    flow: str
    priority: int = 0
    bytes: int = 0
    ttl: float = 0.0
    slo: float = 0.0
    tokens: int = 0
    weight: float = 0.0
    audit: bool = False  # answer with what the service knows of the request (see docs/service.md)


# names a caller may bring from the other API (the Python client) or from habit -> the JSON field
_ADMIT_ALIASES = {"size": "bytes", "wait": "ttl", "timeout": "ttl", "tenant": "flow", "flow_id": "flow"}


ADMIT_FIELDS: tuple[str, ...] = AdmitBody.__struct_fields__


class ReleaseBody(msgspec.Struct, forbid_unknown_fields=True):
    """`tokens`: the request's actual cost, correcting its flow's VTC charge (omit: no correction)."""

    ticket: int
    tokens: int | None = None


RELEASE_FIELDS: tuple[str, ...] = ReleaseBody.__struct_fields__
ADMIT_ALIASES: Mapping[str, str] = _ADMIT_ALIASES

# ---------------------------------------------------------------------------------------------- decode errors
# msgspec words its errors for programmers ("Expected `int`, got `str` - at `$.priority`"); a client
# gets them in the project's words instead. Only the error path pays for this.

# msgspec reports a string with an unpaired high surrogate escape ("\ud800x") as truncated input.
# The escape: preceded by an even run of backslashes, not followed by a low surrogate escape.
_LONE_SURROGATE = re.compile(rb"(?<!\\)(?:\\\\)*(\\u[dD][89abAB][0-9a-fA-F]{2})(?!\\u[dD][c-fC-F])")
_MALFORMED = re.compile(r"JSON is malformed: (.*)")
_EXPECTED = re.compile(r"Expected `([^`]+)`(.*?)(?:, got `([^`]+)`)?(?: - at `([^`]*)`)?")
_OBJECT_FIELD = re.compile(r"Object (missing required|contains unknown) field `([^`]*)`(?: - at `([^`]*)`)?")
_OUT_OF_RANGE = re.compile(r"Number out of range(?: - at `([^`]*)`)?")
_INVALID_VALUE = re.compile(r"Invalid value (.*?)(?: - at `([^`]*)`)?")
_PATH_STEP = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")

# msgspec's type names -> ours, as expected (`want`) and as found (`got`)
_WANT = {
    "int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "object": "an object",
    "array": "an array", "null": "null", "bytes": "binary data",
}
_GOT = dict(_WANT, float="a number with a fraction or exponent", bool="a boolean")

NESTING_PROBLEM = "nested too deeply"


def _words(spec: str, table: Mapping[str, str]) -> str:
    return " or ".join(table.get(t.strip(), t.strip()) for t in spec.split("|"))


def json_problem(exc: Exception, body: bytes) -> str | None:
    """What is wrong with `body` as JSON text, when msgspec's `exc` is about the text (syntax, UTF-8,
    truncation, nesting) rather than about its shape; None otherwise (see `shape_problem`)."""
    if isinstance(exc, RecursionError):
        return NESTING_PROBLEM
    message = str(exc)
    if message == "Input data was truncated":
        m = _LONE_SURROGATE.search(body)
        if m is not None:
            return f"unpaired UTF-16 surrogate in a string (byte {m.start(1)})"
        if not body.strip():
            return "the body is empty"
        return f"the JSON value is incomplete (it ends at byte {len(body)})"
    if message == "Invalid UTF-8 encoded string":
        try:
            body.decode()
        except UnicodeDecodeError as bad:
            return f"a string is not valid UTF-8 (byte {bad.start})"
        return "a string is not valid UTF-8"
    malformed = _MALFORMED.fullmatch(message)
    return None if malformed is None else malformed.group(1)


def _field(path: str | None, positions: Sequence[str] | None) -> str | None:
    """`$.a[0].b` -> `a[0].b`; with `positions` (an array-like message) `$[2]` -> its field name."""
    if not path or path == "$":
        return None
    steps: list[str] = []
    for name, index in _PATH_STEP.findall(path[1:]):
        if name:
            steps.append(f".{name}" if steps else name)
        elif not steps and positions is not None and index.isdigit() and int(index) < len(positions):
            steps.append(positions[int(index)])
        else:
            steps.append(f"[{index}]")
    return "".join(steps) or None


def shape_problem(
    exc: Exception, fields: Sequence[str] = (), *, aliases: Mapping[str, str] | None = None,
    positions: Sequence[str] | None = None, what: str = "the body", want_root: str = "a JSON object",
) -> str:
    """msgspec's message for a value of the wrong shape, in our words: `field: what is wrong`.

    `fields`: the names an unknown field is compared with (the likely one is suggested, `aliases`
    first, else all are listed, as flowshard.config does for an unknown key); `positions`: the
    field names of an array-like message by index; `what`, `want_root`: how the value as a whole
    is called and what it must be."""
    message = str(exc)
    m = _OBJECT_FIELD.fullmatch(message)
    if m is not None:  # worded as flowshard.config words an unknown or missing key
        kind, name, at = m.groups()
        where = _field(at, positions)
        prefix = f"{where}: " if where else ""
        if kind == "missing required":
            return f"{prefix}the required field `{name}` is missing"
        if where is None and fields:
            close = difflib.get_close_matches(name, fields, n=1, cutoff=0.7)
            meant = (aliases or {}).get(name) or (close[0] if close else None)
            if meant:
                return f"unknown field `{name}`; did you mean `{meant}`?"
            return f"unknown field `{name}`; allowed here: {', '.join(fields)}"
        return f"{prefix}unknown field `{name}`"
    m = _EXPECTED.fullmatch(message)
    if m is not None:
        want, detail, got, at = m.groups()
        where = _field(at, positions)
        expected = (want_root if where is None and want in ("object", "array") else _words(want, _WANT)) + detail
        found = f", got {_words(got, _GOT)}" if got else ""
        if where is None:
            return f"{what} must be {expected}{found}"
        return f"{where}: expected {expected}{found}"
    m = _OUT_OF_RANGE.fullmatch(message)
    if m is not None:
        where = _field(m.group(1), positions)
        return f"{where}: number out of range" if where else "a number out of range"
    m = _INVALID_VALUE.fullmatch(message)
    if m is not None:
        where = _field(m.group(2), positions)
        return f"{where}: invalid value {m.group(1)}" if where else f"invalid value {m.group(1)}"
    return message  # a message msgspec did not have when this was written: passed on as it is


def body_problem(
    exc: Exception, body: bytes, fields: Sequence[str], *, aliases: Mapping[str, str] | None = None
) -> str:
    """Why a JSON request body did not decode into its struct (with `fields`), in our words."""
    syntax = json_problem(exc, body)
    if syntax is not None:
        return f"invalid JSON: {syntax}"
    return shape_problem(exc, fields, aliases=aliases)


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
    if not 0 <= ttl <= MAX_SECONDS:  # also false for NaN; an infinity is past the bound
        return f"ttl: {ttl} is outside [0, {MAX_SECONDS:.0f}] seconds"
    if not 0 <= slo <= MAX_SECONDS:
        return f"slo: {slo} is outside [0, {MAX_SECONDS:.0f}] seconds"
    if not 0 <= tokens <= MAX_TOKENS:
        return f"tokens: {tokens} is outside [0, 2^32]"
    if not (weight == 0 or MIN_WEIGHT <= weight <= MAX_WEIGHT):  # (false for NaN)
        return f"weight: {weight} is outside [{MIN_WEIGHT:g}, {MAX_WEIGHT:.0f}] and not 0 (the configured weight)"
    return None
