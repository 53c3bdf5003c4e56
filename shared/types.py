"""The small, picklable data objects that cross the gateway/actor boundary: top-k lists,
strings and floats only, so full-vocabulary tensors never leave a worker."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# EOS's key in string-keyed distributions: U+FFFF (a non-character) never occurs in real text.
EOS_TEXT = "\uffff<eos>"


@dataclass(slots=True, frozen=True)
class Commit:
    """A piece of the shared completion text, with the token ids that produced it. A runner
    of the same tokenizer `family` appends the ids as they are; any other encodes `text` (the
    text bridge). `text` is "" when a token ends mid UTF-8 character."""

    text: str
    ids: tuple[int, ...] = ()
    family: str = ""


@dataclass(slots=True)
class Candidates:
    """Compact summary of one next-token distribution: its top-k and two scalars."""

    ids: list[int]
    texts: list[str]  # text each candidate appends in context; "" mid-character; EOS_TEXT for EOS
    logprobs: list[float]  # full-vocabulary log-probabilities, descending
    entropy: float  # nats, over the top-k (entropy_k) logits only
    top1_prob: float


@dataclass(slots=True, frozen=True)
class RunAhead:
    """How far a driver runner may decode on its own within one call (fewer round trips).

    It commits its own token while the step is no junction (`run_ahead_stops` at `threshold`
    and `tau`; None: no test), not EOS, and within `steps` (counting the one returned) and
    `seconds`. Only for requests whose every non-junction step commits the runner's token.
    """

    steps: int
    threshold: float | None
    tau: float | None
    seconds: float = math.inf


@dataclass(slots=True)
class StepRequest:
    """Advance one sequence of a language-model runner by one batched step."""

    seq_id: str
    k: int = 10
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    append: list[Commit] = field(default_factory=list)  # committed since this runner's last call
    logprobs: int | None = None  # also return the sampled token's and this many top logprobs
    entropy_k: int | None = None  # the entropy's top-k width when not k (hybrid: SIA's 10)
    ahead: RunAhead | None = None


@dataclass(slots=True)
class StepResult:
    seq_id: str
    top: Candidates
    sampled_id: int  # the runner's own choice, from the full vocabulary
    sampled_text: str
    mid_char: bool  # the text ends inside an unfinished UTF-8 character
    processed: int  # tokens run through the model for this request (work)
    sampled_logprob: float | None = None
    top_logprobs: list[tuple[str, float]] | None = None
    # Run-ahead steps before this one, in order; already committed on the runner.
    earlier: list[StepResult] = field(default_factory=list)


@dataclass(slots=True)
class WordRequest:
    """Nudging: let a runner write the next word(s) of a sequence greedily."""

    seq_id: str
    max_tokens: int = 8
    append: list[Commit] = field(default_factory=list)


@dataclass(slots=True)
class WordResult:
    seq_id: str
    commit: Commit
    eos: bool  # the writer ended the sequence (right after the word, if any)
    processed: int
    next_text: str = ""  # where the writer's next word starts


@dataclass(slots=True)
class ScoreRequest:
    """SIA: value of each candidate continuation of one prefix."""

    seq_id: str
    candidates: list[Commit]
    append: list[Commit] = field(default_factory=list)
    # the driver's log-probabilities of the candidates (for a log-ratio value model)
    logprobs: list[float] | None = None


@dataclass(slots=True)
class ScoreResult:
    seq_id: str
    values: list[float]
    processed: int


@dataclass(slots=True)
class Failure:
    """One sequence of a batched call that failed, in its place: its batch-mates are served."""

    seq_id: str
    error: str


def one_line(exc: BaseException) -> str:
    """An exception as one line for a client: its type and first line, never a traceback."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def failure(seq_id: str, exc: BaseException) -> Failure:
    """The Failure for an exception raised while serving one sequence."""
    return Failure(seq_id, one_line(exc))


@dataclass(slots=True)
class ModelInfo:
    role: str
    name: str
    family: str  # tokenizer family: runners with equal families exchange ids, others text
    vocab_size: int
    max_context: int
    device: str
    calibration: dict | None = None  # value role: SIA's calibrated entropy thresholds, if any
    value_kind: str | None = None  # value role: "head" or "log_ratio"


@dataclass(slots=True)
class StepLogprobs:
    """The driver model's log-probabilities at one step, for clients that asked for them."""

    token: str
    logprob: float  # LOGPROB_FLOOR when the driver did not offer the piece
    top: list[tuple[str, float]]  # descending


# vLLM's stand-in for -inf (JSON has no infinity): a piece the driver model did not offer.
LOGPROB_FLOOR = -9999.0


@dataclass(slots=True)
class TokenEvent:
    """One committed step of a request, as streamed to clients (figures are the driver's)."""

    index: int
    text: str  # "" while a UTF-8 character is unfinished
    source: str  # "base" | "value" | "guidance": who chose it
    junction: bool
    kind: str | None  # "value" | "guidance" at a junction, else None
    entropy: float
    top1_prob: float
    alpha: float | None = None  # BlendIn's weight on the guidance model at a junction
    logprobs: StepLogprobs | None = None


@dataclass(slots=True)
class GenerationResult:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    policy: str
    steps: int
    interventions: int
    by_kind: dict[str, int]
    work: dict[str, int]  # base_tokens, value_tokens, guidance_tokens actually processed
    seed: int | None = None  # drawn when an unseeded request sampled

    @property
    def intervention_rate(self) -> float:
        return self.interventions / self.steps if self.steps else 0.0

    def to_json(self) -> dict:
        """The object `junction generate --json` prints and `POST /v1/generate` returns."""
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
            },
            "junction": {
                "policy": self.policy,
                "steps": self.steps,
                "interventions": self.interventions,
                "intervention_rate": self.intervention_rate,
                "by_kind": dict(self.by_kind),
                "work": dict(self.work),
                "seed": self.seed,
            },
        }
