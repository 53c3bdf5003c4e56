"""Configuration as plain dataclasses, checked on construction."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Annotated, Literal, get_args, get_type_hints

from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError

# The built-in policies' names, for the API's schema and checks without the gateway; the
# policy registry adds others (`register_policy_name`).
Policy = Literal["base", "sia", "dense", "blendin", "nudging", "hybrid", "guidance"]
POLICIES: list[str] = list(get_args(Policy))


def register_policy_name(name: str) -> None:
    if name not in POLICIES:
        POLICIES.append(name)
SiaDecode = Literal["request", "topk_sample"]
SIA_DECODES: tuple[str, ...] = ("request", "topk_sample")
DType = Literal["float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = get_args(DType)


def _check_device(device: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps (got {device!r})")
    return device


# Field types of the config file's sections: pydantic reads these when a config is loaded.
Device = Annotated[str, AfterValidator(_check_device)]
NonNegative = Annotated[float, Field(ge=0)]
AtLeastOne = Annotated[int, Field(ge=1)]


# The documented range of every numeric request option (inclusive). Outside them a request
# would overflow a seed, divide by a denormal temperature or turn a softmax into NaN.
RANGES: dict[str, tuple[float, float]] = {
    "k": (1, 1000),
    "entropy_threshold": (0.0, 100.0),  # nats; above ln k no step is a junction
    "beta": (-100.0, 100.0),
    "target_ratio": (0.0, 1.0),
    "tau": (0.0, 1.0),
    "lam": (-10.0, 10.0),
    "alpha": (0.0, 1.0),  # BlendIn: a fixed weight on the guidance model
    "nudge_max_tokens": (1, 64),
    "temperature": (1e-3, 10.0),  # or exactly 0 (greedy)
    "value_temperature": (1e-3, 100.0),  # or exactly 0 (argmax)
    "top_p": (0.0, 1.0),  # 0 excluded
    "seed": (0, 2**63 - 1),
    "logprobs": (0, 20),  # top log-probabilities per step
}


def check_range(name: str, value: float, low: float, high: float) -> None:
    """A finite number within [low, high], or a ValueError naming the field."""
    if not ((isinstance(value, int) or math.isfinite(value)) and low <= value <= high):
        raise ValueError(f"{name} must be between {_num(low)} and {_num(high)}")


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def check_temperature(name: str, value: float) -> None:
    """0 (greedy / argmax) or a finite temperature in its documented range."""
    low, high = RANGES[name]
    if value != 0 and not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be 0 or between {_num(low)} and {_num(high)}")


@dataclass(slots=True)
class PolicyConfig:
    """A junction policy and its options; defaults are the reference defaults."""

    policy: Policy = "base"
    # top-k width; None: the reference default (SIA 10, BlendIn 100); hybrid: SIA's (blend: 100)
    k: int | None = None
    entropy_threshold: float = 1.0  # SIA's H (nats); max is ln k
    beta: float = 1.0  # SIA's value weight
    # SIA's T (0 = argmax); None: the request's own (sia_decode "request") or 1 ("topk_sample")
    value_temperature: float | None = None
    # SIA: H for this share of junctions, calibrated or else a server-wide running quantile
    target_ratio: float | None = None
    value_only: bool = False  # SIA: β = ∞, choose by value alone (ties by logit)
    # SIA outside junctions: the request's own decoding, or the paper's top-k sample at T
    sia_decode: SiaDecode = "request"
    tau: float = 0.4  # BlendIn / Nudging confidence threshold on the base top-1 probability
    lam: float = 0.1  # BlendIn's λ
    alpha: float | None = None  # BlendIn: a fixed α in [0, 1] instead of the computed one
    nudge_max_tokens: int = 8  # Nudging: most guidance tokens written per take-over

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}")
        if self.k is not None:
            check_range("k", self.k, *RANGES["k"])
        for name in ("entropy_threshold", "beta", "tau", "lam", "nudge_max_tokens"):
            check_range(name, getattr(self, name), *RANGES[name])
        if self.value_temperature is not None:
            check_temperature("value_temperature", self.value_temperature)
        if self.sia_decode not in SIA_DECODES:
            raise ValueError(f"sia_decode must be one of {', '.join(SIA_DECODES)}")
        if self.alpha is not None:
            check_range("alpha", self.alpha, *RANGES["alpha"])
        if self.target_ratio is not None:
            check_range("target_ratio", self.target_ratio, *RANGES["target_ratio"])

    @property
    def top_k(self) -> int:
        """Width of the base's top-k list (and of a blend's guidance list)."""
        if self.policy == "hybrid":
            return max(self.entropy_k, 100)
        if self.k is not None:
            return self.k
        return 100 if self.policy == "blendin" else 10

    @property
    def entropy_k(self) -> int:
        """Width of the entropy test and of SIA's candidates: top_k, but SIA's for hybrid."""
        if self.policy == "hybrid":
            return self.k if self.k is not None else 10
        return self.top_k

    @property
    def max_entropy(self) -> float:
        return math.log(self.entropy_k)

    def junction_temperature(self, temperature: float) -> float:
        """SIA's T for a request decoding at `temperature`: the one given, else the request's
        own (so greedy SIA differs from base only in V), or the paper's T = 1 ("topk_sample")."""
        if self.value_temperature is not None:
            return self.value_temperature
        return 1.0 if self.sia_decode == "topk_sample" else temperature


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # per step: the chosen piece's and this many top logprobs

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        check_temperature("temperature", self.temperature)
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError("top_p must be in (0, 1]")
        if self.seed is not None:
            check_range("seed", self.seed, *RANGES["seed"])
        if self.logprobs is not None:
            check_range("logprobs", self.logprobs, *RANGES["logprobs"])


@dataclass(slots=True)
class ModelSpec:
    """Where a role's model comes from: 'default' (embedded), a Hugging Face id, or a path."""

    source: Annotated[str, Field(min_length=1)] = "default"
    device: Device = "auto"  # auto = cuda when available, else cpu
    dtype: DType = "float32"
    num_gpus: NonNegative = 0.0  # Ray resources for this role's actor
    num_cpus: NonNegative = 1.0
    threads: Annotated[int, Field(ge=0)] = 0  # torch CPU threads in this role's worker; 0 = all
    max_restarts: Annotated[int, Field(ge=0)] = 3  # Ray restarts; then a new worker replaces it


@dataclass(slots=True)
class Limits:
    max_prompt_tokens: AtLeastOne = 2048
    max_tokens: AtLeastOne = 1024
    max_concurrency: AtLeastOne = 16
    # Requests over max_concurrency wait, first come first served, and are admitted as slots
    # free: a burst waits rather than bounces. 429 with Retry-After only when `max_queue`
    # requests already wait (0 = refuse at once) or one has waited `queue_timeout_s`.
    max_queue: Annotated[int, Field(ge=0)] = 256
    queue_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    max_n: AtLeastOne = 8
    # How long a request waits for a restarting worker, and a worker may stay silent, before
    # the request fails and the role is declared down (a new worker is then started).
    recovery_seconds: Annotated[float, Field(gt=0)] = 60.0
    # Tokens the base may decode past the step it returns, in one call, between junctions:
    # fewer round trips per token (0 = one step per call). A call also stops once it has taken
    # `run_ahead_ms`, which bounds the streaming delay and the wait to join the batch.
    run_ahead: Annotated[int, Field(ge=0)] = 8
    run_ahead_ms: Annotated[float, Field(gt=0)] = 100.0
    # How long a tick of first steps waits for requests still being opened, so requests sent
    # together start in one call (`Engine._join_admissions`); 0 = never.
    join_ms: Annotated[float, Field(ge=0)] = 20.0
    # BlendIn/hybrid: right after a confidence junction (they come in runs) the guidance steps
    # in the same round as the base, so a junction costs the slower call, not the sum. Served
    # workers only; in-process runners take their calls in turn.
    overlap_guidance: bool = True


@dataclass(slots=True)
class ServerConfig:
    """The HTTP gateway's own settings (the `server:` section)."""

    # Bearer keys; empty = no authentication. `junction serve --api-key`, JUNCTION_API_KEYS
    # (comma-separated) and the file named by JUNCTION_API_KEYS_FILE add to these.
    api_keys: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=lambda: ["*"])  # Host header allow-list
    cors_origins: list[str] = field(default_factory=list)  # empty = no CORS headers at all
    auth_metrics: bool = False  # /metrics needs a key too (Prometheus can send a bearer token)
    docs: bool = True  # serve /docs and /openapi.json (behind the keys when keys are set)
    max_body_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError("server.max_body_bytes must be >= 1")
        if any(not isinstance(k, str) or not k for k in self.api_keys):
            raise ValueError("server.api_keys must be non-empty strings")


@dataclass(slots=True)
class JunctionConfig:
    # Validation is generic over these dataclasses (their field types, read by pydantic): a
    # section added here is checked on load with no other change. Nested sections inherit this.
    __pydantic_config__ = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    base: ModelSpec = field(default_factory=ModelSpec)
    guidance: ModelSpec = field(default_factory=ModelSpec)
    value: ModelSpec | None = field(default_factory=ModelSpec)  # None = no value model
    limits: Limits = field(default_factory=Limits)
    server: ServerConfig = field(default_factory=ServerConfig)


class ConfigError(ValueError):
    """A config that does not validate; the message names each bad field by its path."""


@cache
def _adapter() -> TypeAdapter:
    return TypeAdapter(JunctionConfig)


_TYPE_WORDS = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "string_type": "a string", "string_too_short": "a non-empty string",
    "bool_type": "true or false", "bool_parsing": "true or false", "list_type": "a list",
    "dataclass_type": "a mapping", "dataclass_exact_type": "a mapping", "dict_type": "a mapping",
}


def _message(error: dict) -> str:
    """One pydantic error as `path: what is wrong`, in this project's words."""
    kind, ctx = error["type"], error.get("ctx") or {}
    path = ".".join(str(part) for part in error["loc"]) or "config"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
              "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"{path}: must be {bounds[kind]} {limit}"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        known = _fields_at(error["loc"][:-1])
        return f"{path}: unknown field" + (f" (known: {', '.join(known)})" if known else "")
    if kind == "literal_error":
        return f"{path}: must be one of {ctx['expected'].replace(chr(39), '')}"
    if kind == "value_error":
        return f"{path}: {ctx['error']}"
    if kind in _TYPE_WORDS:
        return f"{path}: must be {_TYPE_WORDS[kind]}"
    return f"{path}: {error['msg'][0].lower()}{error['msg'][1:]}"


def _fields_at(loc: tuple) -> list[str]:
    """The field names of the section at `loc` (for an unknown-field hint); [] if not one."""
    cls: object = JunctionConfig
    for part in loc:
        hint = get_type_hints(cls).get(part) if hasattr(cls, "__dataclass_fields__") else None
        cls = next((a for a in (*get_args(hint), hint) if hasattr(a, "__dataclass_fields__")),
                   None)
    return list(getattr(cls, "__dataclass_fields__", {}))


def _drop_empty_sections(data: dict) -> dict:
    """`limits:` with nothing under it means the defaults, as it reads; only a section whose
    type allows None (value) keeps None (no value model)."""
    hints = get_type_hints(JunctionConfig)
    return {
        key: value
        for key, value in data.items()
        if value is not None or key not in hints or type(None) in get_args(hints[key])
    }


def config_from_dict(data: dict) -> JunctionConfig:
    """A JunctionConfig from plain data (a parsed YAML file), validated by the dataclasses'
    field types and ranges; unknown fields are errors. Raises ConfigError naming each path."""
    if not isinstance(data, dict):
        raise ConfigError("config: must be a mapping of sections (base, guidance, value, ...)")
    # Strict JSON validation: a YAML string is never coerced into a number or a boolean, and
    # mappings are accepted for the dataclass sections.
    text = json.dumps(_drop_empty_sections(data), default=str)
    try:
        return _adapter().validate_json(text)
    except ValidationError as exc:
        raise ConfigError("; ".join(_message(e) for e in exc.errors())) from None


def check_config(config: JunctionConfig) -> JunctionConfig:
    """The same checks for a config built or changed in code (command-line overrides)."""
    return config_from_dict(asdict(config))


def load_config(path: str | None) -> JunctionConfig:
    """Read a YAML config file; no path gives the embedded defaults. Raises ConfigError with
    the file's name for a missing, unreadable or invalid file."""
    if path is None:
        return JunctionConfig()
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    try:
        return config_from_dict(data if data is not None else {})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
