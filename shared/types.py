"""The small data objects that cross the gateway/actor boundary.

Everything here is compact and picklable: top-k lists, strings and floats. Full-vocabulary
tensors never appear in these types, so they never leave a worker process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# The text key an end-of-sequence candidate carries in string-keyed distributions. Real text
# never contains U+FFFF (a Unicode non-character), so it cannot collide with a decoded token.
EOS_TEXT = "\uffff<eos>"


@dataclass(slots=True, frozen=True)
class Commit:
    """A piece of the shared completion text, with the token ids that produced it.

    `family` names the tokenizer the ids belong to. A runner whose tokenizer is of the same
    family appends the ids as they are (exact, no re-tokenization); any other runner encodes
    `text` with its own tokenizer (the text bridge). `text` may be "" when a token ends in the
    middle of a UTF-8 character: the rest of the character arrives with a later commit.
    """

    text: str
    ids: tuple[int, ...] = ()
    family: str = ""


@dataclass(slots=True)
class Candidates:
    """Compact summary of one next-token distribution: its top-k and two scalars."""

    ids: list[int]
    texts: list[str]  # text each candidate appends in context; "" mid-character; EOS_TEXT for EOS
    logprobs: list[float]  # full-vocabulary log-probabilities, descending
    entropy: float  # entropy (nats) of softmax over the top-k (entropy_k) logits; at most ln k
    top1_prob: float  # full-vocabulary probability of the most likely token


@dataclass(slots=True, frozen=True)
class RunAhead:
    """How far a driver runner may decode on its own within one call (fewer round trips).

    The runner keeps its own sampled token and steps again while the step is no junction
    (`shared.steering.run_ahead_stops` with these settings; never inside an unfinished UTF-8
    character), its token is not the end of text, fewer than `steps` steps were taken, and
    the call has taken less than `seconds` (checked once per round, so a call's sequences stop
    together, as they would step together one call at a time).
    Only for requests whose every non-junction step commits the runner's own token.
    """

    steps: int  # the most steps this call may take, counting the one it returns (>= 1)
    threshold: float | None  # SIA's entropy threshold H (fixed for the call); None: no test
    tau: float | None  # the confidence threshold; None: no test
    seconds: float = math.inf  # no step starts once the call has taken this long


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
    ahead: RunAhead | None = None  # may decode several steps in this call (see RunAhead)


@dataclass(slots=True)
class StepResult:
    seq_id: str
    top: Candidates
    sampled_id: int  # the runner's own choice (argmax at temperature 0), from the full vocabulary
    sampled_text: str
    mid_char: bool  # the sequence's text ends inside an unfinished UTF-8 character
    processed: int  # tokens the model ran through its forward pass for this request (work)
    sampled_logprob: float | None = None  # only when the request asked for logprobs
    top_logprobs: list[tuple[str, float]] | None = None  # (text, logprob), as asked for
    # Steps the runner took on its own before this one (`StepRequest.ahead`), in order: each
    # committed its sampled token, which the runner's sequence already holds.
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
    commit: Commit  # the word, with the writer's own ids and family
    eos: bool  # the writer chose to end the sequence (right after the word, if there is one)
    processed: int
    next_text: str = ""  # the writer's choice after the word: where its next word starts


@dataclass(slots=True)
class ScoreRequest:
    """SIA: value of each candidate continuation of one prefix."""

    seq_id: str
    candidates: list[Commit]
    append: list[Commit] = field(default_factory=list)
    # the driver's log-probabilities of the candidates (a log-ratio value model needs them)
    logprobs: list[float] | None = None


@dataclass(slots=True)
class ScoreResult:
    seq_id: str
    values: list[float]
    processed: int


@dataclass(slots=True)
class Failure:
    """A runner could not serve one sequence of a batched call; the other sequences were served.

    Returned in that sequence's place (step, score, write_words), so one bad sequence never
    fails its batch-mates. `error` is one line, without a traceback.
    """

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
    value_kind: str | None = None  # value role: "head" or "log_ratio" (junction.shared.value_model)


@dataclass(slots=True)
class StepLogprobs:
    """The driver model's log-probabilities at one step, for clients that asked for them."""

    token: str  # the committed piece's text
    logprob: float  # its log-probability under the driver (LOGPROB_FLOOR when not offered)
    top: list[tuple[str, float]]  # the driver's most likely next pieces, descending


# vLLM's stand-in for -inf (JSON has no infinity): a piece the driver model did not offer.
LOGPROB_FLOOR = -9999.0


@dataclass(slots=True)
class TokenEvent:
    """One committed step of a request, as streamed to clients."""

    index: int  # decode step number within the request, from 0
    text: str  # text this step appended ("" while a UTF-8 character is unfinished)
    source: str  # "base" | "value" | "guidance": who chose it
    junction: bool
    kind: str | None  # "value" | "guidance" at a junction, else None
    entropy: float  # base (driver) top-k entropy at this step
    top1_prob: float  # base (driver) top-1 probability at this step
    alpha: float | None = None  # BlendIn's weight on the guidance model at a junction
    logprobs: StepLogprobs | None = None  # only when the request asked for logprobs


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
    seed: int | None = None  # the request's random stream (drawn when it sampled unseeded)

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
