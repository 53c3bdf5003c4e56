"""SIA (arXiv 2602.21215): where the base is unsure (top-k entropy >= H) the value model
re-ranks its top-k by logit + β·V. `dense` consults it at every step.

The threshold H is the request's own, or for a `target_ratio` the value model's calibration
measured on this base, or else the server-wide running quantile of recent base entropies
(`Thresholds`, one per engine: never a per-request quota).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch

from junction.gateway.policies.base import Ask, Choice, Policies, Policy, own, register
from junction.gateway.run_ahead import run_ahead
from junction.services.protocol import Worker
from junction.shared.calibration import Calibration
from junction.shared.config import Limits, PolicyConfig
from junction.shared.steering import EntropyWindow, entropy_junction, sia_choose, topk_sample
from junction.shared.types import (
    EOS_TEXT,
    Commit,
    RunAhead,
    ScoreRequest,
    ScoreResult,
    StepResult,
)

if TYPE_CHECKING:
    from junction.gateway.sequence import GenerationRequest, Sequence

log = logging.getLogger(__name__)


class Thresholds:
    """SIA's entropy threshold H for each request, and the state behind `target_ratio`."""

    def __init__(self, policies: Policies) -> None:
        self.policies = policies
        self.calibration: Calibration | None = None
        # Per top-k width: the recent base entropies of every request, whatever its policy.
        self.entropies: defaultdict[int, EntropyWindow] = defaultdict(EntropyWindow)
        policies.on_step(self.observe)
        policies.on_start(self.start)
        policies.report("sia", self.info)

    def start(self) -> None:
        """Take the value model's calibration, if it was measured on the base being served."""
        infos = self.policies.infos
        value = infos.get("value")
        self.calibration = None
        if value is None or value.calibration is None or "base" not in infos:
            return
        calibration = Calibration.from_dict(value.calibration)
        if calibration.base != infos["base"].name:
            log.warning("ignoring the SIA calibration: it was measured on %s, not on %s",
                        calibration.base, infos["base"].name)
            return
        self.calibration = calibration

    def observe(self, seq: Sequence, step: StepResult) -> None:
        if seq.req.driver == "base":
            self.entropies[seq.policy.entropy_k].observe(step.top.entropy)

    def fixed(self, config: PolicyConfig) -> float | None:
        """H when it stays put from step to step (the request's own, or calibrated); None
        when it is the running quantile."""
        ratio = config.target_ratio
        if ratio is None:
            return config.entropy_threshold
        if self.calibration is not None and self.calibration.k == config.entropy_k:
            return self.calibration.threshold(ratio)
        return None

    def threshold(self, config: PolicyConfig) -> float:
        fixed = self.fixed(config)
        if fixed is not None:
            return fixed
        return self.entropies[config.entropy_k].threshold(config.target_ratio)

    def info(self) -> dict:
        """How `target_ratio` finds its threshold (for /info)."""
        cal = self.calibration
        return {
            "calibration": cal.to_dict() if cal else None,
            "running_quantile": {
                str(k): {"entropies": len(w), "window": w.size} for k, w in self.entropies.items()
            },
        }


class SiaParts:
    """SIA's parts, shared by `sia`, `dense` and `hybrid`: the threshold, the value model's
    consult and choice, and the paper's top-k sampling between junctions."""

    consults = ("value",)

    def __init__(self, policies: Policies) -> None:
        self.thresholds = policies.shared(Thresholds)

    @staticmethod
    def draws(req: GenerationRequest) -> bool:
        return req.sampling.temperature > 0 or req.value_temperature > 0

    @staticmethod
    def open(seq: Sequence) -> None:
        """SIA's own random stream, when its choice samples (T > 0)."""
        if seq.req.value_temperature > 0 and seq.seed is not None:
            seq.memory = torch.Generator().manual_seed(seq.seed)

    def run_ahead(self, seq: Sequence, limits: Limits, tau: float | None = None
                  ) -> RunAhead | None:
        """Only when every step between junctions is the request's own decoding, and H stays
        put during the call (the running quantile moves with every step of every request)."""
        if seq.policy.sia_decode != "request":
            return None  # the gateway draws from the top-k between junctions, not the runner
        threshold = self.thresholds.fixed(seq.policy)
        if threshold is None:
            return None
        return run_ahead(seq, limits, threshold=threshold, tau=tau)

    @staticmethod
    def ask(seq: Sequence, step: StepResult) -> Ask:
        top, n = step.top, seq.policy.entropy_k
        family = seq.families["base"]
        candidates = [Commit(t, (i,), family)
                      for i, t in zip(top.ids[:n], top.texts[:n], strict=True)]
        request = ScoreRequest(seq.id, candidates, append=seq.unseen("value"),
                               logprobs=top.logprobs[:n])
        return Ask("value", Worker.score, request)

    @staticmethod
    def choice(seq: Sequence, step: StepResult, values: list[float] | None) -> Commit:
        """By logit + β·V at a junction (`values`); with no values a sample of the top-k at
        T (the paper's decoding between junctions)."""
        config, top = seq.policy, step.top
        temperature = seq.req.value_temperature
        n = len(values) if values is not None else config.entropy_k
        logprobs = torch.tensor(top.logprobs[:n])
        if values is None:
            pick = topk_sample(logprobs, temperature, seq.memory)
        else:
            pick = sia_choose(logprobs, torch.tensor(values), config.beta, temperature,
                              seq.memory, config.value_only)
        return Commit(top.texts[pick], (top.ids[pick],), seq.families["base"])

    def choose(self, seq: Sequence, step: StepResult, kind: str | None,
               answer: ScoreResult | None) -> Choice:
        if kind == "value" and answer is not None:
            seq.work["value_tokens"] += answer.processed
            piece = self.choice(seq, step, list(answer.values))
            return Choice(piece, "value", piece.text == EOS_TEXT)
        if kind is None and seq.policy.sia_decode != "request":
            piece = self.choice(seq, step, None)
            return Choice(piece, "base", piece.text == EOS_TEXT)
        return own(seq, step)


class ValueSteered(Policy):
    """A policy with SIA's parts (`sia`, `dense`, `hybrid`): its threshold, its random
    stream, its decoding between junctions."""

    def __init__(self, policies: Policies) -> None:
        super().__init__(policies)
        self.sia = SiaParts(policies)

    @classmethod
    def draws(cls, req: GenerationRequest) -> bool:
        return SiaParts.draws(req)

    def open(self, seq: Sequence) -> None:
        self.sia.open(seq)

    def threshold(self, config: PolicyConfig) -> float:
        return self.sia.thresholds.threshold(config)


@register
class Sia(ValueSteered):
    name = "sia"
    consults = SiaParts.consults

    def run_ahead(self, seq: Sequence, limits: Limits) -> RunAhead | None:
        return self.sia.run_ahead(seq, limits)

    @staticmethod
    def test(entropy: float, top1_prob: float, threshold: float, tau: float) -> str | None:
        return "value" if entropy_junction(entropy, threshold) else None

    def consult(self, seq: Sequence, step: StepResult, kind: str,
                early: StepResult | None) -> Ask | None:
        return self.sia.ask(seq, step)

    def choose(self, seq: Sequence, step: StepResult, kind: str | None, answer: Any) -> Choice:
        return self.sia.choose(seq, step, kind, answer)


@register
class Dense(Sia):
    """SIA's value model at every step: the dense reference SIA is measured against."""

    name = "dense"

    def run_ahead(self, seq: Sequence, limits: Limits) -> RunAhead | None:
        return None  # every step is a junction

    @staticmethod
    def test(entropy: float, top1_prob: float, threshold: float, tau: float) -> str | None:
        return "value"
