"""Request bodies of the HTTP API, validated by pydantic, and their engine requests.

Unset policy and sampling options fall back to the defaults of `PolicyConfig` and
`SamplingParams`, so those dataclasses stay the one place defaults live; the numeric ranges
come from `shared.config.RANGES`, so the API documents (in /docs) the bounds the dataclasses
enforce. Numbers are strict: `"4"` is not a number and `true` is not an integer, and floats
must be finite (Python's JSON parser accepts NaN and Infinity). Limits that depend on the
configuration (max_tokens, prompt tokens, n, concurrency) are checked by the gateway and the
engine; the bounds here are the ones that hold for every configuration.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    field_validator,
)

from junction.gateway.sequence import GenerationRequest
from junction.shared.config import (
    RANGES,
    PolicyConfig,
    SamplingParams,
    SiaDecode,
    check_temperature,
)

MAX_STOPS = 8
MAX_STOP_CHARS = 1000
MAX_PROMPT_CHARS = 1_000_000  # a cheap bound before tokenizing, over all of a request's text

PolicyName = Literal["base", "sia", "dense", "blendin", "nudging", "hybrid", "guidance"]


def _no_lone_surrogates(text: str) -> str:
    # A lone surrogate (JSON "\ud800") cannot be encoded as UTF-8: a tokenizer or the
    # response's encoder would fail on it after the work was done.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (not valid Unicode text)") from None
    return text


def _temperature(name: str):
    def check(value: float | None) -> float | None:
        if value is not None:
            check_temperature(name, value)
        return value

    return AfterValidator(check)


Text = Annotated[str, Strict(), AfterValidator(_no_lone_surrogates)]
Int = Annotated[int, Strict()]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Flag = Annotated[bool, Strict()]
StopText = Annotated[Text, Field(max_length=MAX_STOP_CHARS)]


def ranged(name: str, description: str, **extra: Any) -> Any:
    """An optional field bounded by its documented range."""
    low, high = RANGES[name]
    return Field(None, ge=low, le=high, description=f"{description} [{low}, {high}]", **extra)


class PolicyOptions(BaseModel):
    """A junction policy and its options (see ARCHITECTURE.md for what each one does)."""

    model_config = ConfigDict(extra="forbid")

    policy: PolicyName = "base"
    k: Int | None = ranged("k", "Top-k width.")
    entropy_threshold: Number | None = ranged("entropy_threshold", "SIA's H (nats).")
    beta: Number | None = ranged("beta", "SIA's value weight (β = ∞: value_only).")
    value_only: Flag | None = Field(None, description="SIA: choose by value alone (β = ∞).")
    sia_decode: SiaDecode | None = Field(
        None, description="SIA between junctions: 'request' (the request's decoding) or "
        "'topk_sample' (the paper's: sample the base's top-k at value_temperature)."
    )
    value_temperature: Annotated[Number | None, _temperature("value_temperature")] = Field(
        None, ge=0, le=RANGES["value_temperature"][1],
        description="SIA's T: 0 = argmax, else [0.001, 100].",
    )
    target_ratio: Number | None = ranged("target_ratio", "SIA: share of junctions (calibrated H).")
    tau: Number | None = ranged("tau", "BlendIn / Nudging threshold τ.")
    lam: Number | None = ranged("lam", "BlendIn's λ.")
    alpha: Number | None = ranged("alpha", "BlendIn: a fixed α instead of the computed one.")
    nudge_max_tokens: Int | None = ranged("nudge_max_tokens", "Nudging: tokens per take-over.")

    def policy_config(self) -> PolicyConfig:
        given = self.model_dump(include=set(PolicyOptions.model_fields), exclude_none=True)
        return PolicyConfig(**given)


class SamplingOptions(BaseModel):
    max_tokens: Int | None = Field(None, ge=1)
    temperature: Annotated[Number | None, _temperature("temperature")] = Field(
        None, ge=0, le=RANGES["temperature"][1], description="0 = greedy, else [0.001, 10]."
    )
    top_p: Number | None = Field(None, gt=0, le=1)
    seed: Int | None = ranged("seed", "Sampling seed.")
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOPS)] | None = None
    best_of: Int | None = Field(
        None, ge=1, description="Best-of-N: sample N completions, return the best by value."
    )

    def sampling_params(
        self, cap: int, max_tokens: int | None = None, logprobs: int | None = None
    ) -> SamplingParams:
        """Unset max_tokens: the default, but never more than the gateway's limit `cap`."""
        given = self.model_dump(include={"temperature", "top_p", "seed"}, exclude_none=True)
        max_tokens = max_tokens or self.max_tokens or min(SamplingParams().max_tokens, cap)
        return SamplingParams(
            **given, max_tokens=max_tokens, stop=stop_list(self.stop), logprobs=logprobs
        )


def stop_list(stop: str | list[str] | None) -> list[str]:
    """Stop strings as a list; empty strings would stop at once, so they are dropped."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return [s for s in stops if s]


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: Text = Field(..., max_length=MAX_PROMPT_CHARS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: Text | list[TextPart] = Field(..., max_length=MAX_PROMPT_CHARS)

    @property
    def text(self) -> str:
        content = self.content
        return content if isinstance(content, str) else "".join(p.text for p in content)

    def plain(self) -> dict:
        """The message as the prompt builder takes it: role and one content string."""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text}


def _within_prompt_cap(messages: list[ChatMessage] | None) -> list[ChatMessage] | None:
    """The character cap holds for all messages and content parts together."""
    if messages is not None and sum(len(m.text) for m in messages) > MAX_PROMPT_CHARS:
        raise ValueError(f"at most {MAX_PROMPT_CHARS} characters in all messages together")
    return messages


Messages = Annotated[list[ChatMessage], Field(min_length=1), AfterValidator(_within_prompt_cap)]


class GenerateBody(PolicyOptions, SamplingOptions):
    """POST /v1/generate and /v1/generate_stream: a prompt or messages, sampling, a policy."""

    model_config = ConfigDict(extra="forbid")

    prompt: Text | None = Field(None, max_length=MAX_PROMPT_CHARS)
    messages: Messages | None = None

    def generation_request(self, cap: int) -> GenerationRequest:
        messages = [m.plain() for m in self.messages] if self.messages is not None else None
        return GenerationRequest(
            prompt=self.prompt,
            messages=messages,
            sampling=self.sampling_params(cap),
            policy=self.policy_config(),
        )


class StreamOptions(BaseModel):
    include_usage: Flag = False


# OpenAI fields Junction does not implement, with the values that mean "not used". Any other
# value is refused (400 naming the field) rather than silently ignored.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "echo": (None, False),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
}


class OpenAIBody(SamplingOptions):
    """Fields both OpenAI routes share; the policy rides in the extra field `junction`.

    Fields the API defines that change nothing here (user, metadata, ...) are accepted and
    ignored; fields that would change the answer and are not implemented (`UNSUPPORTED`) are
    refused.
    """

    model_config = ConfigDict(extra="allow")

    model: Text | None = None
    n: Int = Field(1, ge=1)
    stream: Flag = False
    stream_options: StreamOptions | None = None
    junction: PolicyOptions = Field(default_factory=PolicyOptions)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> str | None:
        """The first field this request uses that Junction does not implement."""
        extra = self.model_extra or {}
        return next(
            (name for name, unused in UNSUPPORTED.items()
             if name in extra and extra[name] not in unused),
            None,
        )

    @property
    def logprobs_wanted(self) -> int | None:
        """Top log-probabilities per step (None: none asked for)."""
        return None


class CompletionBody(OpenAIBody):
    """POST /v1/completions."""

    prompt: Text | list[Text] = Field(..., max_length=MAX_PROMPT_CHARS)
    logprobs: Int | None = Field(None, ge=0, le=5, description="Top log-probabilities per token.")

    @property
    def logprobs_wanted(self) -> int | None:
        return self.logprobs

    def generation_request(self, cap: int) -> GenerationRequest:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("prompt: give one prompt per request")
            prompt = prompt[0]
        return GenerationRequest(
            prompt=prompt,
            sampling=self.sampling_params(cap, logprobs=self.logprobs),
            policy=self.junction.policy_config(),
        )


class ChatCompletionBody(OpenAIBody):
    """POST /v1/chat/completions."""

    messages: Messages
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: Flag = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return value

    @property
    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def generation_request(self, cap: int) -> GenerationRequest:
        return GenerationRequest(
            messages=[m.plain() for m in self.messages],
            sampling=self.sampling_params(
                cap, self.max_completion_tokens, logprobs=self.logprobs_wanted
            ),
            policy=self.junction.policy_config(),
        )
