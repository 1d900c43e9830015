"""Proxy mode's request classification and usage accounting: pure functions over headers and bodies.

Why here: what a proxied request *is* to flowshard (its flow, priority, SLO, size and cost) is
decided from its headers and JSON body alone, so it is tested without sockets and runs the same
in any front process. The defaults follow the upstream conventions (Gateway API Inference
Extension / llm-d): the flow from `x-gateway-inference-fairness-id` or its llm-d successor (a
flowshard header first), the priority from an objective name or the model, the SLO from
`x-slo-ttft-ms`.

The cost for `vtc` is an estimate made before the request runs: prompt characters / `chars_per_token`
plus `max_tokens` (or `default_max_tokens`). The actual `usage` the backend reports is read from the
response (`usage_from_body`, `SseUsage`), so the charge can be corrected when the request ends. To
have it for streams too, a stream without `stream_options.include_usage` is sent upstream with it
set, and the usage-only chunk is taken out of what the client receives.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

import msgspec

from flowshard.config import ProxyConfig
from flowshard.validate import MAX_FLOW_ID, MAX_PRIORITY, MAX_SECONDS, MAX_TOKENS, json_problem

__all__ = ["Classified", "ClassifyError", "SseUsage", "Usage", "classify", "read_headers", "usage_from_body",
           "usage_problem"]


class ClassifyError(ValueError):
    """A request the proxy refuses before admission; `param` names the header or body field."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


class Classified(msgspec.Struct, kw_only=True):
    """What flowshard admits for one proxied request, and what it sends upstream."""

    flow: str
    priority: int
    slo: float  # seconds; 0: none
    size: int  # the request body's bytes
    tokens: int  # the cost estimate (prompt + output tokens)
    prompt_tokens: int  # the prompt part of the estimate
    model: str
    stream: bool
    strip_usage: bool  # include_usage was added by flowshard: drop the usage chunk on the way back
    body: bytes  # the body to send upstream (rewritten only to ask for usage)


class Usage(msgspec.Struct):
    """The `usage` object of an OpenAI response (embeddings report no completion tokens)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _UsageOnly(msgspec.Struct):
    usage: Usage | None = None


class _Chunk(msgspec.Struct):
    usage: Usage | None = None
    choices: list[Any] = msgspec.field(default_factory=list)


_decode_any = msgspec.json.Decoder().decode
_decode_top = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode  # the top level only: values as their text
# A body larger than this is read at its top level only (`_large_document`): its prompt is not built as
# Python objects, on the loop that serves every client (a review: a legal 16 MiB body of many small
# messages took 1.7 s and 242 MiB to classify, and others' latency went from 4 ms to 714 ms)
LARGE_BODY: Final = 1 << 18
_READ: Final = ("model", "max_tokens", "max_completion_tokens", "stream", "stream_options")  # all classify reads
_MAX_READ_FIELD: Final = 1 << 16
_SHAPE: Final = re.compile(r"Expected `object`, got `(\w+)`")
_SHAPES: Final = {"array": "an array", "str": "a string", "int": "a number", "float": "a number",
                  "bool": "a boolean", "null": "null"}
_decode_usage = msgspec.json.Decoder(_UsageOnly).decode
_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_encode = msgspec.json.Encoder().encode
_BEARER = re.compile(r"^\s*bearer\s+(\S+)\s*$", re.IGNORECASE)
_INTEGER = re.compile(r"-?[0-9]+")
_BOM: Final = b"\xef\xbb\xbf"  # a UTF-8 byte order mark


def flow_of(config: ProxyConfig, headers: Mapping[str, str]) -> str:
    """The first configured flow header present; else a hash of the API key; else the default flow.

    Header values arrive decoded as UTF-8 (bytes that are not: surrogate escapes), so that
    `x-flowshard-flow: café` is the flow `café`, as `{"flow": "café"}` is at /v1/admit (a review: read
    as latin-1, it was `cafÃ©`, another flow, and its length counted in bytes)."""
    for name in config.flow_headers:
        value = _header(headers, name)
        if value:
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise ClassifyError(400, f"header {name}: not UTF-8", name) from None
            if len(value) > MAX_FLOW_ID:
                raise ClassifyError(400, f"header {name}: {len(value)} characters, at most {MAX_FLOW_ID}", name)
            return value
    if config.flow_from_api_key:
        m = _BEARER.match(headers.get("authorization", ""))
        if m:
            # a hash, never the key: flow ids appear in metrics, stats and logs; of the key's own bytes
            # (header values arrive as UTF-8 with surrogate escapes: a key with a byte that is not UTF-8
            # raised here, a 500 and a traceback per request, review 119)
            return "key:" + hashlib.sha256(m[1].encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return config.default_flow


def _header(headers: Mapping[str, str], name: str) -> str:
    """A configured header's value, without the spaces and tabs around it (HTTP's; `str.strip` also takes
    characters such as U+00A0 from a value: a review); "" if absent or if the name is "" (not read)."""
    return headers.get(name, "").strip(" \t") if name else ""


def read_headers(config: ProxyConfig, headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The request's headers by (lower-case) name, the last of a repeated one; a header flowshard reads
    (the flow, priority, objective and SLO headers, and `authorization` when the flow may be the API
    key's hash) given twice with different values is refused: which one a gateway in front meant, or
    a client added, cannot be told (a review: the last won), and a backend may check another one than
    flowshard hashed (review 116: Starlette, vLLM's, reads the first: a client sending its key and
    then a random one was served as a new flow each time, 20 dispatches of 20 against another tenant)."""
    out: dict[str, str] = {}
    read = {config.priority_header, config.objective_header, config.slo_header, *config.flow_headers}
    if config.flow_from_api_key:
        read.add("authorization")
    for name, value in headers:
        if name in read and name and name in out and out[name].strip(" \t") != value.strip(" \t"):
            raise ClassifyError(400, f"header {name}: given twice, with different values", name)
        out[name] = value
    return out


def priority_of(config: ProxyConfig, headers: Mapping[str, str], model: str, default: int) -> int:
    """The priority header, else the objective's, else the model's (from the config), else `default`."""
    raw = _header(headers, config.priority_header)
    if raw:
        try:
            if not _INTEGER.fullmatch(raw):  # (int() also takes "1_0", "+5", "٥": not what docs/proxy.md says)
                raise ValueError
            priority = int(raw)
        except ValueError:
            raise ClassifyError(400, f"header {config.priority_header}: {raw[:40]!r} is not an integer",
                                config.priority_header) from None
        if not -MAX_PRIORITY <= priority < MAX_PRIORITY:
            raise ClassifyError(400, f"header {config.priority_header}: {priority} is outside [-2^31, 2^31)",
                                config.priority_header)
        return priority
    objective = _header(headers, config.objective_header)
    if objective and objective in config.objectives:
        return config.objectives[objective]
    if model in config.models:
        return config.models[model]
    return default


def slo_of(config: ProxyConfig, headers: Mapping[str, str]) -> float:
    """The time-to-first-token objective in seconds (the header is in milliseconds); 0 when absent."""
    raw = _header(headers, config.slo_header)
    if not raw:
        return 0.0
    try:
        ms = float(raw) if raw.isascii() else math.nan  # (float() takes "٥٠٠" and "500\xa0": a review)
    except ValueError:
        ms = math.nan
    if not (math.isfinite(ms) and 0 <= ms <= MAX_SECONDS * 1000):
        raise ClassifyError(400, f"header {config.slo_header}: {raw[:40]!r} is not a number of milliseconds "
                                 f"in [0, {MAX_SECONDS * 1000:.0f}]", config.slo_header)
    return ms / 1000.0


def _text_chars(value: Any) -> int:
    """Characters of prompt text in a `messages`, `prompt` or `input` value (token ids count as 4 each)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, int):
        return 4
    if isinstance(value, list):
        return sum(_text_chars(v) for v in value)
    if isinstance(value, dict):
        total = 0
        for key in ("content", "text"):
            total += _text_chars(value.get(key))
        return total
    return 0


def _count(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    shown = msgspec.json.encode(value).decode()  # as JSON (`true`, not Python's `True`), as it came
    shown = shown if len(shown) <= 40 else shown[:40] + "..."  # (review 184: 1e300 as its 301 digits)
    if isinstance(value, float) and value.is_integer():  # `2.0`: an integer, as vLLM's validation takes it
        value = int(value)  # (review 179: a 400 here, a 200 from the backend)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ClassifyError(400, f"{name}: {shown} must be a non-negative integer", name)
    if value > MAX_TOKENS:  # the bound of `tokens` everywhere: a larger one is not a cost (it was capped)
        raise ClassifyError(400, f"{name}: {shown} is above the maximum {MAX_TOKENS} (2^32)", name)
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _large_document(body: bytes) -> tuple[dict[str, Any], dict[str, msgspec.Raw]]:
    """A large body read at its top level (each value's JSON text, validated, not decoded), and the
    few fields classify reads, decoded. A read field too large to be what it should is a 400."""
    top = _decode_top(body)
    doc: dict[str, Any] = {}
    for name in _READ:
        raw = top.get(name)
        if raw is not None:
            if len(raw) > _MAX_READ_FIELD:
                raise ClassifyError(400, f"{name}: {len(raw)} bytes of JSON, at most {_MAX_READ_FIELD}", name)
            doc[name] = _decode_any(raw)
    return doc, top


def classify(
    config: ProxyConfig, path: str, headers: Mapping[str, str], body: bytes, default_priority: int
) -> Classified:
    """Classify one `POST` to an OpenAI route. `headers`: lower-case names. Raises ClassifyError."""
    top: dict[str, msgspec.Raw] | None = None
    if body.startswith(_BOM):  # (JSON parsers may ignore it, and vLLM's does: review 179, a 400 here)
        body = body[len(_BOM):]
    try:
        if len(body) > LARGE_BODY:
            doc, top = _large_document(body)
        else:
            doc = _decode_any(body)
    except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
        shape = _SHAPE.match(str(exc))
        if shape is not None:  # (a large body's top-level read: not an object)
            raise ClassifyError(400, f"request body must be a JSON object, got {_SHAPES[shape.group(1)]}") from None
        problem = json_problem(exc, body)
        if problem is None:  # the only shape error an untyped decode has: a number beyond a double
            problem = "a number out of range"
        raise ClassifyError(400, f"request body is not valid JSON: {problem}") from None
    if not isinstance(doc, dict):
        raise ClassifyError(400, f"request body must be a JSON object, got {_json_type(doc)}")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise ClassifyError(400, "model: a non-empty string is required", "model")
    prompt_fields = ("input",) if path.endswith("/embeddings") else ("messages", "prompt")
    if top is not None:  # a large body: its prompt's length as JSON text stands for its characters
        prompt_chars = sum(len(top[name]) for name in prompt_fields if name in top)
    else:
        prompt_chars = sum(_text_chars(doc.get(name)) for name in prompt_fields)
    if path.endswith("/embeddings"):
        output = 0
    else:
        declared = _count(doc, "max_completion_tokens")
        if declared is None:
            declared = _count(doc, "max_tokens")
        output = config.default_max_tokens if declared is None else declared
    prompt_tokens = math.ceil(prompt_chars / config.chars_per_token)
    tokens = min(prompt_tokens + output, MAX_TOKENS)
    stream = doc.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:  # the backend would read "yes" its own way
        raise ClassifyError(400, "stream: must be true or false", "stream")
    stream = stream is True
    strip_usage = False
    if stream:
        options = doc.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise ClassifyError(400, "stream_options: must be an object", "stream_options")
        if not (options or {}).get("include_usage"):
            if top is not None:  # the other fields as they came, their text copied
                top["stream_options"] = msgspec.Raw(_encode(dict(options or {}, include_usage=True)))
                body = _encode(top)
            else:
                doc["stream_options"] = dict(options or {}, include_usage=True)
                body = _encode(doc)
            strip_usage = True
    return Classified(
        flow=flow_of(config, headers), priority=priority_of(config, headers, model, default_priority),
        slo=slo_of(config, headers), size=len(body), tokens=tokens, prompt_tokens=prompt_tokens, model=model,
        stream=stream, strip_usage=strip_usage, body=body,
    )


def usage_from_body(body: bytes) -> Usage | None:
    """The `usage` of a complete (non-streamed) response body, if it has one."""
    try:
        return _decode_usage(body).usage
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):  # (a backend's body nested too
        return None  # deeply: review 158, as the request side's)


def usage_problem(usage: Usage) -> str | None:
    """None if a backend's reported usage can be taken as the request's actual cost: its prompt and
    completion tokens non-negative and their sum within `MAX_TOKENS` (2^32), the bound of a request's
    `tokens` everywhere (`flowshard.validate`: an admission's estimate, a release's correction). Else
    why not: the backend's word is not a cost (msgspec decodes any 64-bit integer, and a sum of two
    past 2^64 cannot even be carried on a link)."""
    prompt, completion = usage.prompt_tokens, usage.completion_tokens
    if prompt < 0 or completion < 0 or prompt + completion > MAX_TOKENS:
        return f"prompt_tokens {prompt} + completion_tokens {completion} is outside [0, 2^32]"
    return None


MAX_EVENT = 1 << 20  # a partial event held longer than this is forwarded as it is (memory stays bounded)
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
# An event's end: a line end followed by another (a blank line). Line ends are CRLF, LF or a CR alone
# (the WHATWG server-sent-events grammar: a review saw CR-only streams, and LF lines ended by a CRLF
# blank line, held whole until the backend ended them); a CR followed by LF is one line end, never two.
# A CR at the end of what was read ends the event whatever comes next (LF or not, the blank line has
# begun), so cutting after it is safe.
_BLANK_LINE = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")
# A `"usage": null` member, with any JSON whitespace (RFC 8259: space, tab, CR, LF) around its comma and
# colon: after another member (`, "usage" : null`, before `,` or `}`), or the first of its object
# (`{"usage": null,`). Never inside a string: there a `"` is escaped, so it follows a backslash, never
# `,`/`{` and whitespace. Found by its literal core (the engine's fast literal search) and then
# widened to its comma by hand: one regex that began with the whitespace before the comma was tried
# at every position of every chunk, ~10 µs a streamed chunk (timeit), 6 % of a relaying process's CPU
# (cProfile; benchmarks.md).
_USAGE_NULL_CORE = re.compile(rb'"usage"[ \t\r\n]*:[ \t\r\n]*null')
_WS_RUN = re.compile(rb"[ \t\r\n]*")
_WS = b" \t\r\n"
_COMMA, _OPEN, _CLOSE = ord(","), ord("{"), ord("}")
# How far back from a member the whitespace before it is looked at: a backend's JSON has a few bytes
# there; one that sends megabytes of whitespace keeps its `"usage": null` (harmless), and is not
# walked byte by byte in Python (review 119: 20-50x the old regex's time on such a chunk).
_WS_LOOKBACK = 4096


def _ws_start(data: bytes, pos: int, floor: int) -> int:
    """Where the run of JSON whitespace that ends at `pos` begins (not before `floor`, nor more than
    `_WS_LOOKBACK` bytes back)."""
    if pos <= floor or data[pos - 1] not in _WS:  # (the usual case: none there)
        return pos
    low = max(floor, pos - _WS_LOOKBACK)
    window = data[low:pos]
    return pos - (len(window) - len(window.rstrip(_WS)))


def _strip_usage_null(data: bytes) -> bytes:
    """`data` without its `"usage": null` members: one substring search when there are none.

    Left to right, as one regex substitution would: a member after another goes with its comma and
    the whitespace around that comma (`, "usage": null`, followed by `,` or `}`); the first member of
    an object goes with the comma after it (`"usage": null ,`, right after `{` and whitespace)."""
    if b'"usage"' not in data:
        return data
    out: list[bytes] = []
    kept = 0  # data[kept:] is not copied yet; what was cut before it is not looked at again
    for match in _USAGE_NULL_CORE.finditer(data):
        start, end = match.span()
        after = _WS_RUN.match(data, end).end()  # type: ignore[union-attr]
        before = _ws_start(data, start, kept)
        if before > kept and data[before - 1] == _COMMA and after < len(data) and data[after] in (_COMMA, _CLOSE):
            # after another member: from the whitespace before its comma (what was cut before ends in
            # `null` or a comma, never in it)
            cut = _ws_start(data, before - 1, kept)
            out.append(data[kept:cut])
            kept = end
        elif before and data[before - 1] == _OPEN and after < len(data) and data[after] == _COMMA:
            out.append(data[kept:before])  # the object's first member: through the comma after it
            kept = after + 1
    if not out:
        return data
    out.append(data[kept:])
    return b"".join(out)


def done_end(data: bytes) -> int:
    """Where the event that ends an OpenAI stream ends in `data` (whole events, as `SseUsage.feed`
    passes them), or -1: an event whose only data line is `[DONE]` (`data:` with or without the
    space; comment lines and other fields in it, any line ends). Linear in `data` (a regex over the
    line ends before the event backtracked quadratically on a run of them: 12,000 CRs before a
    `[DONE]` in a content string stalled the event loop 3 s, a review)."""
    if b"[DONE]" not in data:
        return -1
    end = 0
    for event in _split_events(data)[:-1]:  # (the complete ones: what follows the last blank line is not)
        end += len(event)
        if b"[DONE]" in event:
            values = [line[5:] if line[4:5] == b":" else b"" for line in event.splitlines()
                      if line[:4] == b"data" and (len(line) == 4 or line[4:5] == b":")]
            if len(values) == 1 and values[0].removeprefix(b" ") == b"[DONE]":
                return end
    return -1


def _without_usage(event: bytes) -> bytes:
    """An event of one `data:` line whose JSON object has a `usage`: the same without it (the other
    fields as their text came); any other event as it is."""
    lines = event.splitlines(keepends=True)
    data = [k for k, line in enumerate(lines) if line.startswith(b"data:")]
    if len(data) != 1:
        return event
    line = lines[data[0]]
    body = line[5:].strip()
    try:
        top = _decode_top(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return event
    if "usage" not in top:
        return event
    del top["usage"]
    lines[data[0]] = b"data: " + _encode(top) + line[len(line.rstrip(b"\r\n")):]
    return b"".join(lines)


def _split_events(data: bytes) -> list[bytes]:
    """`data` cut after each blank line: its events, then what follows the last one (maybe empty)."""
    events, start = [], 0
    for match in _BLANK_LINE.finditer(data):
        events.append(data[start:match.end()])
        start = match.end()
    events.append(data[start:])
    return events


class SseUsage:
    """Relays a server-sent-event stream event by event, noting its `usage` on the way.

    `feed` returns the complete events received so far (a partial event waits for its end, so
    every write to the client is whole events); `end` returns what is left. With `strip_usage`,
    the usage-only chunk (no choices) that flowshard asked for on the client's behalf is dropped, and
    so is the `"usage":null` that OpenAI-style servers then add to every other chunk (however spaced).
    Only events that carry a usage object are decoded; the rest pass as bytes.
    """

    __slots__ = ("_rest", "strip", "usage")

    def __init__(self, strip_usage: bool) -> None:
        self.strip = strip_usage
        self.usage: Usage | None = None
        self._rest = b""

    def feed(self, data: bytes) -> bytes:
        buf = self._rest + data if self._rest else data
        if b"\r" in buf:
            cut = 0
            for match in _BLANK_LINE.finditer(buf):
                cut = match.end()
        else:  # LF line ends only (the usual): the last blank line is the last LF LF
            cut = buf.rfind(b"\n\n") + 2
            if cut < 2:
                cut = 0
        if not cut:  # no event is complete yet
            if len(buf) > MAX_EVENT:  # not server-sent events after all: pass it on rather than hold it
                self._rest = b""
                return buf
            self._rest = buf
            return b""
        complete, self._rest = buf[:cut], buf[cut:]
        if self.strip:  # the `"usage":null` the backend adds to every chunk once asked for usage
            complete = _strip_usage_null(complete)
        if _USAGE_OBJECT.search(complete) is None:
            return complete
        return self._events(complete)

    def end(self) -> bytes:
        rest, self._rest = self._rest, b""
        if self.strip:
            rest = _strip_usage_null(rest)
        if rest and _USAGE_OBJECT.search(rest) is not None:
            return self._events(rest)
        return rest

    def _events(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for event in _split_events(data):
            if not event or _USAGE_OBJECT.search(event) is None:
                out.append(event)
                continue
            chunk = self._chunk(event)
            if chunk is not None and chunk.usage is not None:
                self.usage = chunk.usage
                if self.strip:
                    if not chunk.choices:
                        continue
                    # on a chunk with choices (TGI's last content chunk): the usage the client did not ask
                    # for comes off, the rest as it came (review 179: passed on whole)
                    event = _without_usage(event)
            out.append(event)
        return b"".join(out)

    @staticmethod
    def _chunk(event: bytes) -> _Chunk | None:
        payload = b"".join(line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:"))
        try:
            return _decode_chunk(payload)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            return None
