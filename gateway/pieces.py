"""What a step commits: the piece for a choice, spaced where the answer starts, and the
driver's log-probabilities for it. Small pure helpers of the decode loop (`gateway.engine`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from junction.shared.prompts import base_prompt_text
from junction.shared.steering import answer_start
from junction.shared.types import EOS_TEXT, LOGPROB_FLOOR, Commit, StepLogprobs, StepResult

if TYPE_CHECKING:
    from junction.gateway.sequence import Sequence


def step_logprobs(step: StepResult, piece: Commit, eos: bool) -> StepLogprobs:
    """The driver's log-probabilities at a step, for the piece that was committed."""
    top = step.top
    text = EOS_TEXT if eos else piece.text
    sampled = piece.ids == (step.sampled_id,) and text == step.sampled_text
    if sampled and step.sampled_logprob is not None:
        logprob = step.sampled_logprob
    elif text in top.texts:
        logprob = top.logprobs[top.texts.index(text)]
    else:  # a guidance model's piece the driver did not offer
        logprob = LOGPROB_FLOOR
    return StepLogprobs(text, logprob, list(step.top_logprobs or []))


def at_answer_start(seq: Sequence) -> bool:
    """No text has been committed yet: the next piece is the first of the answer."""
    return not any(c.text for c in seq.commits)


def spaced_for_base(seq: Sequence, piece: Commit) -> Commit:
    """A guidance piece that opens the answer, spaced for the base prompt it follows.

    The guidance model keeps its own ids (its chat turn needs no space); the text, which the
    base and every other runner encode, gets the space the base prompt needs (`answer_start`).
    """
    prompt = base_prompt_text(seq.req.prompt, seq.req.messages)
    text = answer_start(piece.text, prompt_ends_in_space=not prompt or prompt[-1].isspace())
    if text == piece.text:
        return piece
    if piece.family == seq.families["base"]:
        return Commit(text)  # the base would take the ids as they are: let it encode the text
    return Commit(text, piece.ids, piece.family)


def piece_for(
    text: str, base: Any, base_family: str, guide: StepResult, guide_family: str
) -> Commit:
    """The commit for a blended choice: a base token when the base offered that string."""
    if text in base.texts:
        return Commit(text, (base.ids[base.texts.index(text)],), base_family)
    gtop = guide.top
    return Commit(text, (gtop.ids[gtop.texts.index(text)],), guide_family)
