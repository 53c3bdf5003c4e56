"""`hybrid`: SIA's value model at entropy junctions and BlendIn's guidance at confidence
ones, composed from their parts; when both fire the guidance wins (`hybrid_kind`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from junction.gateway.policies.base import Ask, Choice, register
from junction.gateway.policies.blendin import BlendParts
from junction.gateway.policies.sia import ValueSteered
from junction.shared.config import Limits
from junction.shared.steering import confidence_junction, entropy_junction, hybrid_kind
from junction.shared.types import RunAhead, StepRequest, StepResult

if TYPE_CHECKING:
    from junction.gateway.sequence import Sequence


@register
class Hybrid(ValueSteered):
    name = "hybrid"
    consults = ("value", "guidance")
    blend = BlendParts()

    def run_ahead(self, seq: Sequence, limits: Limits) -> RunAhead | None:
        return self.sia.run_ahead(seq, limits, tau=seq.policy.tau)

    def early(self, seq: Sequence) -> StepRequest | None:
        return self.blend.early(seq)

    @staticmethod
    def test(entropy: float, top1_prob: float, threshold: float, tau: float) -> str | None:
        return hybrid_kind(entropy_junction(entropy, threshold),
                           confidence_junction(top1_prob, tau))

    def consult(self, seq: Sequence, step: StepResult, kind: str,
                early: StepResult | None) -> Ask | None:
        if kind == "value":
            return self.sia.ask(seq, step)
        return self.blend.ask(seq, step, early)

    def choose(self, seq: Sequence, step: StepResult, kind: str | None, answer: Any) -> Choice:
        if kind == "guidance" and answer is not None:
            return self.blend.choose(seq, step, answer)
        return self.sia.choose(seq, step, kind, answer)
