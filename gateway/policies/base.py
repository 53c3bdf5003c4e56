"""What every policy is: its hooks, the registry, and the engine-wide state policies share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from junction.shared.config import Limits, PolicyConfig, register_policy_name
from junction.shared.types import EOS_TEXT, Commit, ModelInfo, RunAhead, StepRequest, StepResult

if TYPE_CHECKING:
    from junction.gateway.sequence import GenerationRequest, Sequence
    from junction.services.protocol import Method


@dataclass(frozen=True, slots=True)
class Ask:
    """What a junction consults: one request to one worker method, sent in one batched call
    with every other request's ask of that role and method; or an `answer` already in hand
    (then nothing is sent)."""

    role: str
    method: Method
    request: Any = None
    answer: Any = None


@dataclass(slots=True)
class Choice:
    """What a step commits: a piece of text, who wrote it, and whether the text ends."""

    piece: Commit
    source: str
    eos: bool
    tokens: int = 1  # the tokens the piece counts for max_tokens
    alpha: float | None = None  # BlendIn's weight, reported in the token event
    holder: str | None = None  # a worker that wrote the piece itself, so it holds it already


class Policy:
    """One junction policy. Instances live on an engine (`Policies`); per-request memory
    lives on the request (`Sequence.memory`), engine-wide memory in `Policies.shared`."""

    name: ClassVar[str] = ""
    driver: ClassVar[str] = "base"  # whose tokens form the text
    consults: ClassVar[tuple[str, ...]] = ()  # the other roles its junctions ask

    def __init__(self, policies: Policies) -> None:
        self.policies = policies

    # --- admission
    @classmethod
    def roles(cls) -> tuple[str, ...]:
        """Every worker a request of this policy is opened on; the driver first."""
        return tuple(dict.fromkeys((cls.driver, *cls.consults)))

    @classmethod
    def draws(cls, req: GenerationRequest) -> bool:
        """Does decoding draw random numbers (so an unseeded request needs its own seed)?"""
        return req.sampling.temperature > 0

    def open(self, seq: Sequence) -> None:
        """Set up the request's own memory, once it is admitted."""

    # --- step 1: the driver's step
    def run_ahead(self, seq: Sequence, limits: Limits) -> RunAhead | None:
        """How far the driver may decode on its own in its next call; None = one step."""
        return None

    def early(self, seq: Sequence) -> StepRequest | None:
        """A consult sent with the driver's step, before this step's junction is known."""
        return None

    # --- step 2: the junction test
    @staticmethod
    def test(entropy: float, top1_prob: float, threshold: float, tau: float) -> str | None:
        """The pure junction test: "value", "guidance" or None (no junction)."""
        return None

    def threshold(self, config: PolicyConfig) -> float:
        """The entropy threshold H this request's test uses now."""
        return config.entropy_threshold

    def junction(self, seq: Sequence, step: StepResult) -> str | None:
        top = step.top
        return self.test(top.entropy, top.top1_prob, self.threshold(seq.policy), seq.policy.tau)

    # --- step 3: what a junction consults
    def consult(self, seq: Sequence, step: StepResult, kind: str,
                early: StepResult | None) -> Ask | None:
        return None

    # --- step 4: what the step commits
    def choose(self, seq: Sequence, step: StepResult, kind: str | None, answer: Any) -> Choice:
        """`answer`: what the junction's ask answered (None when it asked nothing)."""
        return own(seq, step)


def own(seq: Sequence, step: StepResult) -> Choice:
    """The driver's own sampled token: what a step without a junction commits."""
    driver = seq.req.driver
    piece = Commit(step.sampled_text, (step.sampled_id,), seq.families[driver])
    return Choice(piece, driver, step.sampled_text == EOS_TEXT)


PolicyType = TypeVar("PolicyType", bound=type[Policy])
REGISTRY: dict[str, type[Policy]] = {}


def register(cls: PolicyType) -> PolicyType:
    """Class decorator: serve `cls` under `cls.name` (its options are `PolicyConfig`'s)."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"policy name {cls.name!r} is empty or taken")
    REGISTRY[cls.name] = cls
    register_policy_name(cls.name)
    return cls


def policy_class(name: str) -> type[Policy]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"policy: {name!r} is not one of {', '.join(REGISTRY)}") from None


def junction_kind(name: str, entropy: float, top1_prob: float, threshold: float,
                  tau: float) -> str | None:
    """The named policy's pure junction test for one step."""
    return policy_class(name).test(entropy, top1_prob, threshold, tau)


State = TypeVar("State")


class Policies:
    """The registered policies as one engine serves them, and what they share across its
    requests (e.g. SIA's entropy thresholds): one instance of each kind of state."""

    def __init__(self, infos: dict[str, ModelInfo]) -> None:
        self.infos = infos  # filled once the workers have answered (`Engine.start`)
        self._state: dict[type, Any] = {}
        self._observers: list[Callable[[Sequence, StepResult], None]] = []
        self._reports: dict[str, Callable[[], dict]] = {}
        self._starts: list[Callable[[], None]] = []
        self.by_name = {name: cls(self) for name, cls in REGISTRY.items()}

    def __getitem__(self, name: str) -> Policy:
        return self.by_name[name]

    def shared(self, kind: Callable[[Policies], State]) -> State:
        """The engine's one instance of a kind of state, made on first use."""
        if kind not in self._state:
            self._state[kind] = kind(self)
        return self._state[kind]

    def on_step(self, observe: Callable[[Sequence, StepResult], None]) -> None:
        """Have `observe` see every driver step of every request, junction or not."""
        self._observers.append(observe)

    def on_start(self, start: Callable[[], None]) -> None:
        """Run `start` once the workers are known."""
        self._starts.append(start)

    def report(self, key: str, report: Callable[[], dict]) -> None:
        """Add `key`, what `report` answers, to /info."""
        self._reports[key] = report

    def start(self) -> None:
        for start in self._starts:
            start()

    def observe(self, seq: Sequence, step: StepResult) -> None:
        for observe in self._observers:
            observe(seq, step)

    def info(self) -> dict[str, dict]:
        return {key: report() for key, report in self._reports.items()}
