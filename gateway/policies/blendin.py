"""BlendIn (arXiv 2606.11201): where the base is not confident (top-1 probability < τ) the
guidance model's top-k is blended in with weight α and the blend's best string is taken.

At a confidence junction the guidance's step is at the same text as the base's, which does
not depend on the base's step: only whether it is used does. Junctions come in runs, so
right after one the guidance steps in the same round as the base (`early`), and the
junction costs the slower call instead of the sum of both. The early answer is used only if
this step is a junction and the base did not run ahead past it; otherwise the guidance has
only caught up with the text early, and its work is counted. Deterministic: the same greedy
summary at the same text either way.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from junction.gateway.pieces import at_answer_start, piece_for, spaced_for_base
from junction.gateway.policies.base import Ask, Choice, Policy, own, register
from junction.gateway.run_ahead import run_ahead
from junction.services.protocol import Worker
from junction.shared.config import Limits
from junction.shared.steering import blendin_choose, confidence_junction
from junction.shared.types import EOS_TEXT, RunAhead, StepRequest, StepResult

if TYPE_CHECKING:
    from junction.gateway.sequence import Sequence


class BlendParts:
    """BlendIn's parts, shared by `blendin` and `hybrid`."""

    @staticmethod
    def request(seq: Sequence) -> StepRequest:
        """The guidance's top-k at the shared text, the text it has not seen appended."""
        return StepRequest(seq.id, k=seq.policy.top_k, append=seq.unseen("guidance"))

    def early(self, seq: Sequence) -> StepRequest | None:
        if seq.last_kind == "guidance" and "guidance" not in seq.lost:
            return self.request(seq)
        return None

    def ask(self, seq: Sequence, step: StepResult, early: StepResult | None) -> Ask:
        if early is not None and not step.earlier:
            return Ask("guidance", Worker.step, answer=early)  # taken at this step's text
        return Ask("guidance", Worker.step, self.request(seq))

    @staticmethod
    def choose(seq: Sequence, step: StepResult, guide: StepResult) -> Choice:
        seq.work["guidance_tokens"] += guide.processed
        top, at_start = step.top, at_answer_start(seq)
        text, alpha = blendin_choose(
            top.texts,
            list(map(math.exp, top.logprobs)),
            guide.top.texts,
            list(map(math.exp, guide.top.logprobs)),
            seq.policy.lam,
            alpha=seq.policy.alpha,
            at_start=at_start,
        )
        piece = piece_for(text, top, seq.families["base"], guide, seq.families["guidance"])
        if at_start and text not in top.texts:
            piece = spaced_for_base(seq, piece)
        return Choice(piece, "guidance", text == EOS_TEXT, alpha=alpha)


def confidence(entropy: float, top1_prob: float, threshold: float, tau: float) -> str | None:
    """BlendIn's and Nudging's junction test."""
    return "guidance" if confidence_junction(top1_prob, tau) else None


@register
class BlendIn(Policy):
    name = "blendin"
    consults = ("guidance",)
    test = staticmethod(confidence)
    blend = BlendParts()

    def run_ahead(self, seq: Sequence, limits: Limits) -> RunAhead | None:
        return run_ahead(seq, limits, tau=seq.policy.tau)

    def early(self, seq: Sequence) -> StepRequest | None:
        return self.blend.early(seq)

    def consult(self, seq: Sequence, step: StepResult, kind: str,
                early: StepResult | None) -> Ask | None:
        return self.blend.ask(seq, step, early)

    def choose(self, seq: Sequence, step: StepResult, kind: str | None, answer: Any) -> Choice:
        if kind == "guidance" and answer is not None:
            return self.blend.choose(seq, step, answer)
        return own(seq, step)
