"""The one configuration format (TOML), validated into msgspec Structs.

`serve`, `simulate` and `bench` all read it; a scenario file carries it under `[server]`.
Every error names the field as written in the file, the value that was given and what is allowed
(`explain`), and suggests the intended key for a misspelt one. A limit is a positive integer or the
string "unlimited"; an omitted key takes its default (see each field: the global queue limits and
the in-flight request budget are bounded by default, every other limit is unlimited).
"""

from __future__ import annotations

import datetime
import difflib
import math
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from flowshard.fairness import FAIRNESS, MAX_LAG
from flowshard.queues import ORDERINGS
from flowshard.validate import MAX_FLOW_ID, MAX_PRIORITY, MAX_WEIGHT, MIN_WEIGHT

# Limits are counted in 64-bit integers on the wire between the processes: a limit of 2^64 was accepted,
# and the grant carrying it could not be sent, which stopped every dispatch for good (a review)
MAX_LIMIT = 1 << 62
PositiveInt = Annotated[int, msgspec.Meta(ge=1, le=MAX_LIMIT)]
# What a client can ask for (flowshard.validate): a band no client can name would never be used
Priority = Annotated[int, msgspec.Meta(ge=-MAX_PRIORITY, lt=MAX_PRIORITY)]
UNLIMITED = "unlimited"
MAX_SHARDS = 256  # shard workers one service may run: each is a process with its own socket pair
MAX_ACCEPTORS = 64  # acceptor processes (serve --acceptors)
# A limit: a positive integer, or "unlimited" (TOML has no null: an omitted key takes its default, which
# is bounded for the global queue limits and the in-flight request budget, "unlimited" for the others).
Limit = PositiveInt | Literal["unlimited"] | None


def limit(value: int | str | None) -> float:
    """A configured limit as a number: unlimited (None once validated) is infinity."""
    return math.inf if value is None or value == UNLIMITED else float(value)


def _normalize_limits(struct: msgspec.Struct) -> None:
    """Spell "unlimited" as None in memory, so the two spellings compare equal."""
    for name in struct.__struct_fields__:
        if getattr(struct, name) == UNLIMITED:
            setattr(struct, name, None)
Seconds = Annotated[float, msgspec.Meta(ge=0, le=7 * 86400)]


class ConfigError(ValueError):
    """An invalid configuration or scenario; the message is meant for the user as is."""


class BandConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One priority band: its policies, its own limits and its saturation ceiling."""

    priority: Priority
    name: str = ""
    fairness: str = "round-robin"
    ordering: str = "fcfs"
    max_bytes: Limit = None
    max_requests: Limit = None
    flow_max_bytes: Limit = None
    flow_max_requests: Limit = None
    ceiling: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    displacement: bool = False
    quantum: Annotated[int, msgspec.Meta(ge=0, le=1 << 30)] = 0
    # vtc: the most of its lag a flow that comes back keeps, in counter units (tokens at weight 1); 0: the
    # paper's lift alone (docs/fairness.md §7)
    max_lag: Annotated[float, msgspec.Meta(ge=0, le=float(1 << 40))] = MAX_LAG

    def __post_init__(self) -> None:
        _normalize_limits(self)
        if self.fairness not in FAIRNESS:
            raise ValueError(f"fairness {self.fairness!r} is not one of {', '.join(FAIRNESS)}")
        if self.ordering not in ORDERINGS:
            raise ValueError(f"ordering {self.ordering!r} is not one of {', '.join(ORDERINGS)}")
        # A key the band's policy would ignore is a mistake to name, not a setting to accept silently
        # (its default may still be written out, as `flowshard config check` does)
        if self.quantum != 0 and self.fairness != "drr":
            raise ValueError(f"quantum applies only to fairness = \"drr\" (this band's is {self.fairness!r})")
        if self.max_lag != MAX_LAG and self.fairness != "vtc":
            raise ValueError(f"max_lag applies only to fairness = \"vtc\" (this band's is {self.fairness!r})")
        if not self.name:
            self.name = f"p{self.priority}"


class BudgetConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The dispatch budget of the concurrency saturation detector: what the backends run at once.

    The default of 100 requests is a placeholder to replace with the pool's real concurrency; both set
    to "unlimited", the service never saturates and only counts."""

    max_inflight_requests: Limit = 100
    max_inflight_bytes: Limit = None

    def __post_init__(self) -> None:
        _normalize_limits(self)


class ServiceConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How `flowshard serve` listens and behaves; command-line flags override these."""

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    binary_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8081
    lease: Annotated[float, msgspec.Meta(gt=0, le=7 * 86400)] = 300.0
    drain_timeout: Seconds = 10.0
    fast_path: bool = True
    max_body_bytes: Annotated[int, msgspec.Meta(ge=64, le=1 << 24)] = 65536
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)] = 4096
    header_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    idle_timeout: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 75.0
    # A connection whose client's host stopped answering (crashed, cut off) is failed within about
    # this long, and its lease ends with it (TCP keepalive and TCP_USER_TIMEOUT); 0: the kernel's
    # defaults, under which such a binary client kept its tickets, and so budget, until a restart
    dead_peer_timeout: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 60.0  # (the kernel's probes: < 9 hours)
    # JSQ-Bytes's slack for a flow starting afresh: a shard whose input backlog (bytes routed to it
    # that it has not read yet) is within this many bytes of the least backlogged counts as
    # shortest, and the lowest-numbered of those wins. Work packs onto few shards while they keep up
    # (fewer per-pass writes and wake-ups), however deep their queues; a shard that falls this far
    # behind its input gets no new flows. 0: exact JSQ-Bytes over queued bytes, ties round robin.
    jsq_slack_bytes: Annotated[int, msgspec.Meta(ge=0, le=1 << 40)] = 256 * 1024

    def __post_init__(self) -> None:
        if not self.host:  # (an empty host listens on every interface: say so, do not do it by accident)
            raise ValueError('host is empty; to listen on every interface, say so: "0.0.0.0" (or "::")')
        if self.port == self.binary_port != 0:
            raise ValueError(f"port and binary_port are both {self.port}: the HTTP and binary fronts need one each")
        if 0 < self.dead_peer_timeout < 1:  # (keepalive probes are whole seconds apart)
            raise ValueError(f"dead_peer_timeout {self.dead_peer_timeout:g} is neither 0 (off) nor at least 1 second")


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]+$")  # an HTTP token, lower case
MiB = 1 << 20


def _default_flow_headers() -> list[str]:
    return ["x-flowshard-flow", "x-llm-d-inference-fairness-id", "x-gateway-inference-fairness-id"]


class ProxyConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Proxy mode: an OpenAI-compatible reverse proxy in front of `backends` (none: proxy mode off).

    Classification (flow, priority, SLO, cost) reads the headers and body named here; the
    utilization detector scrapes each backend's Prometheus metrics every `scrape_interval`.
    """

    backends: list[str] = msgspec.field(default_factory=list)
    flow_headers: list[str] = msgspec.field(default_factory=_default_flow_headers)  # the first one present wins
    flow_from_api_key: bool = True  # else: a hash of the bearer token (never the token itself)
    default_flow: str = "default-flow"
    priority_header: str = "x-flowshard-priority"  # an integer priority, above objective and model
    objective_header: str = "x-gateway-inference-objective"
    objectives: dict[str, int] = msgspec.field(default_factory=dict)  # objective name -> priority
    models: dict[str, int] = msgspec.field(default_factory=dict)  # the body's `model` -> priority
    slo_header: str = "x-slo-ttft-ms"
    max_body_bytes: Annotated[int, msgspec.Meta(ge=64, le=1 << 30)] = 16 * MiB
    chars_per_token: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 4.0  # the prompt-token estimate
    default_max_tokens: Annotated[int, msgspec.Meta(ge=0, le=1 << 24)] = 256  # output estimate without max_tokens
    utilization: bool = True  # scrape the backends and gate on their saturation (with the concurrency budget)
    metrics_path: str = "/metrics"
    queue_threshold: Annotated[float, msgspec.Meta(gt=0, le=1e6)] = 5.0  # waiting requests that mean saturated
    kv_threshold: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.8  # KV-cache use that means saturated
    scrape_interval: Annotated[float, msgspec.Meta(ge=0.005, le=3600)] = 0.05
    staleness: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 0.2  # older metrics count as saturated
    retries: Annotated[int, msgspec.Meta(ge=0, le=16)] = 2  # other backends tried after a failure or a 5xx
    backoff: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 1.0  # a failing backend is out this long, doubling
    max_backoff: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 30.0
    connect_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0
    read_timeout: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 600.0  # longest silence from a backend
    # an idle connection to a backend is not reused after this: below the backends' own (vLLM, SGLang: 5 s)
    keepalive_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 4.0

    def __post_init__(self) -> None:
        self.backends = [check_backend_url(url, "backends") for url in self.backends]
        if len(set(self.backends)) != len(self.backends):
            raise ValueError(f"backends: {self.backends!r} names a backend twice")
        for name in ("priority_header", "objective_header", "slo_header"):  # "": not read (clients cannot set it)
            value = getattr(self, name)
            setattr(self, name, _header_name(value, name) if value.strip() else "")
        self.flow_headers = [_header_name(h, "flow_headers") for h in self.flow_headers]
        if not self.default_flow or len(self.default_flow) > 256:
            raise ValueError(f"default_flow: {self.default_flow!r} must be 1 to 256 characters")
        if not self.metrics_path.startswith("/"):
            raise ValueError(f"metrics_path: {self.metrics_path!r} must start with /")
        if self.staleness <= self.scrape_interval:
            raise ValueError(
                f"staleness: {self.staleness} must be longer than scrape_interval ({self.scrape_interval}), "
                "or every backend would count as saturated between scrapes"
            )
        if self.backoff > self.max_backoff:
            raise ValueError(f"backoff: {self.backoff} is above max_backoff ({self.max_backoff}), where it doubles to")


def _header_name(name: str, field: str) -> str:
    lowered = name.strip().lower()
    if not _HEADER_NAME.match(lowered):
        raise ValueError(f"{field}: {name!r} is not an HTTP header name")
    return lowered


def check_backend_url(url: str, field: str = "--backend") -> str:
    """A backend's base URL (`http://host:port`, optionally with a path prefix), without a trailing slash."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{field}: {url!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{field}: {url!r} must be an http:// or https:// URL with a host, e.g. http://10.0.0.5:8000")
    if parts.query or parts.fragment or port == 0:
        raise ValueError(f"{field}: {url!r} must not have a query, a fragment or port 0")
    if parts.path.rstrip("/").lower().endswith("/v1"):  # (in any case) review 179: accepted, every route
        # went to /v1/v1/... and the metrics were looked for at /v1/metrics: every request waited out its TTL
        base = url.rstrip("/")[: -len("/v1")]
        raise ValueError(f"{field}: {url!r} ends in /v1, as an OpenAI base_url does; flowshard adds each route's "
                         f"/v1/... itself: give {base!r}")
    return url.rstrip("/")


def _default_bands() -> list[BandConfig]:
    return [BandConfig(priority=0)]


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Everything the engine needs. The defaults run with no file at all (one band at priority 0) and
    bound what waits (1 GiB, 100,000 requests, 60 s each), as a service in front of a GPU pool should."""

    max_queued_bytes: Limit = 1 << 30
    max_queued_requests: Limit = 100_000
    default_ttl: Seconds = 60.0
    flow_slots: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)] = 16384
    flow_gc_timeout: Seconds = 300.0
    default_priority: int | None = None
    budget: BudgetConfig = msgspec.field(default_factory=BudgetConfig)
    service: ServiceConfig = msgspec.field(default_factory=ServiceConfig)
    bands: list[BandConfig] = msgspec.field(default_factory=_default_bands)
    weights: dict[str, float] = msgspec.field(default_factory=dict)
    proxy: ProxyConfig = msgspec.field(default_factory=ProxyConfig)

    def __post_init__(self) -> None:
        _normalize_limits(self)
        if not self.bands:
            raise ValueError("bands must hold at least one band")
        seen: set[int] = set()
        names: set[str] = set()
        for band in self.bands:
            if band.priority in seen:
                raise ValueError(f"bands: priority {band.priority} appears twice; each band needs its own")
            if band.name in names:
                raise ValueError(f"bands: name {band.name!r} appears twice; names label metrics and must differ")
            seen.add(band.priority)
            names.add(band.name)
        self.bands.sort(key=lambda b: -b.priority)
        for flow, weight in self.weights.items():
            if not 1 <= len(flow) <= MAX_FLOW_ID:
                raise ValueError(f"weights: flow {_toml_value(flow[:40])}{'…' if len(flow) > 40 else ''} can never "
                                 f"match: flow ids are 1 to {MAX_FLOW_ID} characters")
            if not (math.isfinite(weight) and MIN_WEIGHT <= weight <= MAX_WEIGHT):
                raise ValueError(f"weights: flow {_toml_value(flow)} has weight {weight!r}; allowed: 1e-6 to 1e6")
        if self.default_priority is not None and self.default_priority not in seen:
            raise ValueError(
                f"default_priority {self.default_priority} names no band; "
                f"allowed: {', '.join(str(p) for p in sorted(seen))}"
            )
        for table in ("objectives", "models"):
            for key, priority in getattr(self.proxy, table).items():
                if priority not in seen:
                    raise ValueError(
                        f"proxy.{table}: {key!r} maps to priority {priority}, which names no band; "
                        f"allowed: {', '.join(str(p) for p in sorted(seen))}"
                    )

    @property
    def default_band(self) -> BandConfig:
        """Where requests with an unconfigured priority go: `default_priority`, else the lowest band."""
        if self.default_priority is None:
            return self.bands[-1]
        return next(b for b in self.bands if b.priority == self.default_priority)


def read_toml_file(path: str) -> str:
    """The text of a TOML file; ConfigError if it is not UTF-8 (an OSError is the caller's to word)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); a TOML file is UTF-8") from None


def host_port(host: str, port: int) -> str:
    """`host:port` as a URL has it: an IPv6 host in brackets (`[::1]:8080`), so a ready line's address is
    one a client can use (a review: `http://::1:35877`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def band_index(config: Config) -> Callable[[int], int]:
    """priority -> band index, as the engine resolves it (unknown priorities: the default band)."""
    by_priority = {b.priority: i for i, b in enumerate(config.bands)}
    default = by_priority[config.default_band.priority]
    return lambda priority: by_priority.get(priority, default)


T = TypeVar("T")
_LIMIT_FIELDS = {
    name
    for struct in (Config, BandConfig, BudgetConfig)
    for name, hint in struct.__annotations__.items()
    if hint == "Limit"
}
_PATH_PART = re.compile(r"\.([A-Za-z_][\w-]*)|\[(\d+)\]|\[\'([^\']*)\'\]|\[(\.\.\.)\]")
_EXPECTED = re.compile(r"Expected `([^`]*)`(?:, got `([^`]*)`)?(.*)$")
_UNKNOWN = re.compile(r"Object contains unknown field `([^`]*)`$")
_MISSING = re.compile(r"Object missing required field `([^`]*)`$")
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "object": "a table", "array": "an array", "null": ""}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
LIMIT_HELP = 'a positive integer (at most 2^62), or "unlimited" for no limit'
_Info = msgspec.inspect.Type | None


def _walk(data: Any, info: _Info, path: str) -> tuple[str, bool, Any, _Info]:
    """Follow a msgspec error path (`$.bands[0].ceiling`, `$.weights[...]`) into the raw document and
    its type. Returns (the path as a TOML reader writes it, found, value, type there). A `[...]` (a
    dict value msgspec does not name) resolves to the first entry that does not fit the type."""
    node, shown, found = data, "", True
    for attr, index, key, anon in _PATH_PART.findall(path.removeprefix("$")):
        info = _unwrap(info, node if found else None)
        if anon:
            value_type = info.value_type if isinstance(info, msgspec.inspect.DictType) else None
            entries = node.items() if isinstance(node, dict) else ()
            bad = next((k for k, v in entries if not _fits(v, value_type)), None)
            if bad is None:
                return shown + "[...]", False, None, None
            key = bad
        name = attr or key
        if index:
            shown += f"[{index}]"
            info = info.item_type if isinstance(info, msgspec.inspect.ListType) else None
        else:
            shown += ("." if shown else "") + (name if _BARE_KEY.fullmatch(name) else _toml_value(name))
            if isinstance(info, msgspec.inspect.StructType):
                info = next((f.type for f in info.fields if f.encode_name == name), None)
            elif isinstance(info, msgspec.inspect.DictType):
                info = info.value_type
            else:
                info = None
        if found:
            try:
                node = node[int(index)] if index else node[name]
            except (KeyError, IndexError, TypeError):
                found, node = False, None
    return shown, found, node, _unwrap(info, node if found else None)


def _unwrap(info: msgspec.inspect.Type | None, node: Any) -> msgspec.inspect.Type | None:
    """The struct, list or dict type behind metadata, optional values and tagged unions."""
    if isinstance(info, msgspec.inspect.Metadata):
        info = info.type
    if isinstance(info, msgspec.inspect.UnionType):
        structs = [t for t in info.types if isinstance(t, msgspec.inspect.StructType)]
        if len(structs) > 1 and isinstance(node, dict):  # a tagged union: the member the tag names
            structs = [t for t in structs if t.tag_field is not None and node.get(t.tag_field) == t.tag] or structs
        others = [t for t in info.types if isinstance(t, msgspec.inspect.ListType | msgspec.inspect.DictType)]
        return structs[0] if structs else (others[0] if others else info)
    return info


def _fits(value: Any, info: msgspec.inspect.Type | None) -> bool:
    if isinstance(info, msgspec.inspect.Metadata):
        info = info.type
    if isinstance(info, msgspec.inspect.FloatType):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(info, msgspec.inspect.IntType):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(info, msgspec.inspect.StrType):
        return isinstance(value, str)
    if isinstance(info, msgspec.inspect.BoolType):
        return isinstance(value, bool)
    return True


def _describe(types: str) -> str:
    words = [_TYPE_WORDS.get(t.strip(), f"`{t.strip()}`") for t in types.split("|")]
    return " or ".join(w for w in words if w)


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, datetime.date | datetime.time):  # (TOML's dates and times, as written)
        return value.isoformat()
    return _toml_value(value)


def _suggest(name: str, info: msgspec.inspect.Type | None) -> str:
    """`; did you mean ...` for a misspelt key, else the keys allowed there."""
    if not isinstance(info, msgspec.inspect.StructType):
        return ""
    allowed = [f.encode_name for f in info.fields]
    close = [a for a in allowed if a.startswith(name)] or difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {' or '.join(f'`{c}`' for c in close)}?"
    return f"; allowed here: {', '.join(allowed)}"


def explain(message: str, data: Any, type_: Any, where: str) -> str:
    """msgspec's validation message, rewritten for a person editing a TOML file: the key as written,
    what it expects in words (never Python type names), the value that was given, once."""
    message, _, path = message.partition(" - at `")
    path = path.rstrip("`")
    shown, found, value, info = _walk(data, msgspec.inspect.type_info(type_), path)
    prefix = f"{where}: {shown + ': ' if shown else ''}"
    leaf = shown.rsplit(".", 1)[-1]
    if match := _UNKNOWN.match(message):
        return f"{prefix}unknown key `{match[1]}`{_suggest(match[1], info)}"
    if match := _MISSING.match(message):
        return f"{prefix}the required key `{match[1]}` is missing"
    got = f", got {_shown(value)}" if found else ""
    if leaf in _LIMIT_FIELDS and (message.startswith(("Expected", "Invalid enum value"))):
        return f"{prefix}expected {LIMIT_HELP}{got}"
    if match := _EXPECTED.match(message):
        expected, got_type, rest = match.groups()
        if not found and got_type:
            got = f", got {_TYPE_WORDS.get(got_type, got_type)}"
        return f"{prefix}expected {_describe(expected)}{rest}{got}"
    if message.startswith("Invalid enum value"):
        return f"{prefix}{message}"
    shown_value = found and not isinstance(value, dict | list) and f"'{value}'" not in message  # (said once)
    return f"{prefix}{message}{' (got ' + _shown(value) + ')' if shown_value else ''}"


def convert(data: dict[str, Any], type_: type[T], *, where: str = "config") -> T:
    """Validate a parsed document into `type_`, turning msgspec's error into a ConfigError."""
    try:
        return msgspec.convert(data, type_)
    except msgspec.ValidationError as exc:
        raise ConfigError(explain(str(exc), data, type_, where)) from None
    except RecursionError:
        raise ConfigError(f"{where}: a value nests arrays or tables too deeply; flowshard's files nest a few "
                          "levels at most") from None


def parse_toml(text: str, *, where: str = "config") -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses per level: ~500 nested arrays ended in a traceback (a review)
        raise ConfigError(f"{where}: a value nests arrays or inline tables too deeply (from line "
                          f"{_deep_line(text)}); flowshard's files nest a few levels at most") from None


def _deep_line(text: str) -> int:
    """The line where brackets first open 64 levels deep (strings not told apart: a hint for the error)."""
    depth = 0
    for number, line in enumerate(text.splitlines(), 1):
        for ch in line:
            depth += (ch in "[{") - (ch in "]}")
            if depth >= 64:
                return number
    return 1


def load_config(text: str, *, where: str = "config") -> Config:
    """Parse and validate a configuration document (the contents of a TOML file)."""
    return convert(parse_toml(text, where=where), Config, where=where)


def dump_config(config: Config) -> str:
    """The effective configuration as TOML (what `flowshard config check` prints)."""
    lines: list[str] = []

    def emit(table: dict[str, Any]) -> None:
        for key, value in table.items():
            if value is None and key in _LIMIT_FIELDS:
                lines.append(f'{key} = "{UNLIMITED}"')
            elif value is None:
                lines.append(f"# {key}: not set")
            elif not isinstance(value, dict | list):
                lines.append(f"{key} = {_toml_value(value)}")

    raw = msgspec.to_builtins(config)
    emit(raw)
    for table in ("budget", "service"):
        lines.append(f"\n[{table}]")
        emit(raw[table])
    for band in raw["bands"]:
        lines.append("\n[[bands]]")
        emit(band)
    lines.append("\n[weights]")
    for flow, weight in raw["weights"].items():
        lines.append(f"{_toml_value(flow)} = {_toml_value(weight)}")
    proxy = raw["proxy"]
    lines.append("\n[proxy]")
    for key, value in proxy.items():
        if isinstance(value, list):
            lines.append(f"{key} = [{', '.join(_toml_value(v) for v in value)}]")
        elif not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for table in ("objectives", "models"):
        lines.append(f"\n[proxy.{table}]")
        for key, priority in proxy[table].items():
            lines.append(f"{_toml_value(key)} = {priority}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):  # a JSON string is a TOML basic string, once DEL is escaped too
        return msgspec.json.encode(value).decode().replace("\x7f", "\\u007f")
    return repr(value)
