"""Nudging (Fei et al., ACL 2025): where the base is not confident, the guidance model
writes the next word; the base takes over again once its own token starts the guidance's
next word. The same nudges again and again end the answer (a loop)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from junction.gateway.pieces import at_answer_start, spaced_for_base
from junction.gateway.policies.base import Ask, Choice, Policy, own, register
from junction.gateway.policies.blendin import confidence
from junction.gateway.run_ahead import run_ahead
from junction.services.protocol import Worker
from junction.shared.config import Limits
from junction.shared.steering import NudgeRounds
from junction.shared.types import EOS_TEXT, Commit, RunAhead, StepResult, WordRequest, WordResult

if TYPE_CHECKING:
    from junction.gateway.sequence import Sequence


@register
class Nudging(Policy):
    name = "nudging"
    consults = ("guidance",)
    test = staticmethod(confidence)

    def open(self, seq: Sequence) -> None:
        seq.memory = NudgeRounds()

    def run_ahead(self, seq: Sequence, limits: Limits) -> RunAhead | None:
        return run_ahead(seq, limits, tau=seq.policy.tau)

    def junction(self, seq: Sequence, step: StepResult) -> str | None:
        kind = super().junction(seq, step)
        if kind is not None and seq.memory.resumes(step.sampled_text):
            return None  # the base resumes: its token starts the guidance's next word
        return kind

    def consult(self, seq: Sequence, step: StepResult, kind: str,
                early: StepResult | None) -> Ask | None:
        budget = seq.req.sampling.max_tokens - seq.stopping.tokens
        n = max(1, min(seq.policy.nudge_max_tokens, budget))
        return Ask("guidance", Worker.write_words,
                   WordRequest(seq.id, n, append=seq.unseen("guidance")))

    def choose(self, seq: Sequence, step: StepResult, kind: str | None, answer: Any) -> Choice:
        if kind == "guidance" and answer is not None:
            return self.word(seq, step, answer)
        choice = own(seq, step)
        if seq.memory.base_wrote():
            return Choice(Commit(EOS_TEXT), choice.source, True)  # the same nudges: a loop
        return choice

    @staticmethod
    def word(seq: Sequence, step: StepResult, word: WordResult) -> Choice:
        seq.work["guidance_tokens"] += word.processed
        piece, tokens = own(seq, step).piece, 1  # a word that came back empty
        if word.commit.ids:
            piece, tokens = word.commit, len(word.commit.ids)
            if at_answer_start(seq):
                piece = spaced_for_base(seq, piece)
            seq.memory.nudged(piece.text, word.next_text)
        elif word.eos:
            piece = Commit(EOS_TEXT)
        # The guidance's end of text ends the answer, also right after a word (as both
        # references stop when the guidance model's completion stops).
        return Choice(piece, "guidance", word.eos, tokens=tokens, holder="guidance")
