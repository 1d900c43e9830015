"""The one configuration format (TOML), validated into msgspec Structs.

`serve`, `simulate` and `bench` all read it; a scenario file carries it under `[server]`.
Every error names the field, the value that was given and what is allowed.
Omitted limits mean "unlimited"; a limit that is present must be at least 1.
"""

from __future__ import annotations

import math
import re
import tomllib
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from flowshard.fairness import FAIRNESS
from flowshard.queues import ORDERINGS

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
UNLIMITED = "unlimited"
MAX_SHARDS = 256  # shard workers one service may run: each is a process with its own socket pair
# A limit: a positive number, or "unlimited" (TOML has no null; an omitted key takes the default).
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

    priority: int
    name: str = ""
    fairness: str = "round-robin"
    ordering: str = "fcfs"
    max_bytes: Limit = None
    max_requests: Limit = None
    flow_max_bytes: Limit = None
    flow_max_requests: Limit = None
    ceiling: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    displacement: bool = False
    quantum: Annotated[int, msgspec.Meta(ge=1, le=1 << 30)] = 16384

    def __post_init__(self) -> None:
        _normalize_limits(self)
        if self.fairness not in FAIRNESS:
            raise ValueError(f"fairness {self.fairness!r} is not one of {', '.join(FAIRNESS)}")
        if self.ordering not in ORDERINGS:
            raise ValueError(f"ordering {self.ordering!r} is not one of {', '.join(ORDERINGS)}")
        if not self.name:
            self.name = f"p{self.priority}"


class BudgetConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The dispatch budget of the concurrency saturation detector. Both omitted: never saturated."""

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


def _default_bands() -> list[BandConfig]:
    return [BandConfig(priority=0)]


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Everything the engine needs. The defaults run with no file at all (one band at priority 0)."""

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
            if not (math.isfinite(weight) and 0 < weight <= 1e6):
                raise ValueError(f"weights: flow {flow!r} has weight {weight!r}; allowed: > 0 and <= 1e6")
        if self.default_priority is not None and self.default_priority not in seen:
            raise ValueError(
                f"default_priority {self.default_priority} names no band; "
                f"allowed: {', '.join(str(p) for p in sorted(seen))}"
            )

    @property
    def default_band(self) -> BandConfig:
        """Where requests with an unconfigured priority go: `default_priority`, else the lowest band."""
        if self.default_priority is None:
            return self.bands[-1]
        return next(b for b in self.bands if b.priority == self.default_priority)


T = TypeVar("T")
_LIMIT_FIELDS = {
    name
    for struct in (Config, BandConfig, BudgetConfig)
    for name, hint in struct.__annotations__.items()
    if hint == "Limit"
}
_PATH_PART = re.compile(r"\.([A-Za-z_][\w-]*)|\[(\d+)\]|\[\'([^\']*)\'\]")


def _value_at(data: Any, path: str) -> tuple[bool, Any]:
    """Follow a msgspec error path (`$.bands[0].ceiling`) into the raw document."""
    node = data
    for attr, index, key in _PATH_PART.findall(path.removeprefix("$")):
        try:
            node = node[int(index)] if index else node[attr or key]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, node


def convert(data: dict[str, Any], type_: type[T], *, where: str = "config") -> T:
    """Validate a parsed document into `type_`, turning msgspec's error into a ConfigError."""
    try:
        return msgspec.convert(data, type_)
    except msgspec.ValidationError as exc:
        message = str(exc)
        path = ""
        if " - at `" in message:
            message, _, path = message.partition(" - at `")
            path = path.rstrip("`")
        field = path.removeprefix("$.")
        if message.startswith("Invalid enum value") and field.rsplit(".", 1)[-1] in _LIMIT_FIELDS:
            message = 'Expected a positive `int` or "unlimited"'  # msgspec cannot name a Literal's values
        found, value = _value_at(data, path) if path else (False, None)
        got = f" (got {value!r})" if found and not isinstance(value, dict | list) else ""
        raise ConfigError(f"{where}: {field + ': ' if field else ''}{message}{got}") from None


def parse_toml(text: str, *, where: str = "config") -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None


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
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):  # a JSON string is a TOML basic string, once DEL is escaped too
        return msgspec.json.encode(value).decode().replace("\x7f", "\\u007f")
    return repr(value)
