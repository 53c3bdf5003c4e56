"""A request's state while it decodes: its text, its commit log, its counters, its queue."""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from junction.gateway.policies import Policy, policy_class
from junction.gateway.stopping import Stopping
from junction.shared.config import PolicyConfig, SamplingParams
from junction.shared.types import EOS_TEXT, Commit, GenerationResult, TokenEvent


@dataclass(slots=True)
class GenerationRequest:
    prompt: str | None = None
    messages: list[dict] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # The policy's class and its driver, looked up once: the loop reads them at every step.
    policy_class: type[Policy] = field(init=False, repr=False, compare=False)
    driver: str = field(init=False, repr=False, compare=False)  # whose tokens form the text

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give exactly one of prompt or messages")
        self.policy_class = policy_class(self.policy.policy)
        self.driver = self.policy_class.driver

    @property
    def value_temperature(self) -> float:
        """SIA's T as this request decodes (`PolicyConfig.junction_temperature`)."""
        return self.policy.junction_temperature(self.sampling.temperature)

    @property
    def draws(self) -> bool:
        """Does decoding draw random numbers (so an unseeded request needs its own seed)?"""
        return self.policy_class.draws(self)

    @property
    def roles(self) -> tuple[str, ...]:
        """Every worker the request is opened on; the driver first."""
        return self.policy_class.roles()


class Status(enum.Enum):
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    req: GenerationRequest
    prompt_tokens: int
    stopping: Stopping
    families: dict[str, str]  # role -> tokenizer family
    status: Status = Status.RUNNING
    commits: list[Commit] = field(default_factory=list)  # the shared completion, piece by piece
    synced: dict[str, int] = field(default_factory=dict)  # role -> commits that role has seen
    steps: int = 0
    last_kind: str | None = None  # the junction kind of the last committed step, if any
    interventions: int = 0
    by_kind: dict[str, int] = field(default_factory=lambda: {"value": 0, "guidance": 0})
    work: dict[str, int] = field(
        default_factory=lambda: {"base_tokens": 0, "value_tokens": 0, "guidance_tokens": 0}
    )
    finish_reason: str | None = None
    error: str | None = None
    seed: int | None = None  # the request's seed, or the one drawn for it when it samples
    rule: Policy | None = None  # the engine's instance of the request's policy
    memory: Any = None  # the policy's own (SIA's random stream, Nudging's rounds)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    created: float = field(default_factory=time.monotonic)  # for time to first token
    lost: set[str] = field(default_factory=set)  # roles whose worker lost this request's state
    lost_since: float | None = None  # monotonic time it started waiting for a worker
    recoveries: int = 0

    @property
    def id(self) -> str:
        return self.req.request_id

    @property
    def policy(self) -> PolicyConfig:
        return self.req.policy

    def unseen(self, role: str) -> list[Commit]:
        """Commits a role has not seen yet; marks them seen (the caller sends them)."""
        start = self.synced.get(role, 0)
        self.synced[role] = len(self.commits)
        return self.commits[start:]

    def commit(self, piece: Commit, tokens: int, eos: bool, event: TokenEvent) -> None:
        """Append a chosen piece, emit its (stop-string safe) text, and check for the end.

        `eos`: the text ends after this piece. A piece of `EOS_TEXT` is only the end; any
        other piece (a word the guidance model ended the answer with) is text first.
        """
        released, reason = "", None
        if piece.text != EOS_TEXT:
            self.commits.append(piece)
            released, reason = self.stopping(piece.text, tokens=tokens)
            tokens = 0
        if eos and reason is None:
            rest, reason = self.stopping("", tokens=tokens, eos=True)
            released += rest
        event.text = released
        self.events.put_nowait(event)
        if reason is not None:
            self.finish(reason)

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.status is Status.FINISHED:
            return
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.error = error
        self.events.put_nowait(self.result())

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.stopping.text,
            finish_reason=self.finish_reason or "cancelled",
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.stopping.tokens,
            policy=self.policy.policy,
            steps=self.steps,
            interventions=self.interventions,
            by_kind=dict(self.by_kind),
            work=dict(self.work),
            seed=self.seed,
        )
