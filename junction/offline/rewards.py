"""Reward sources: what a finished response is worth, for training value models and Best-of-N.

A reward source is anything with `score(prompt, response, refs) -> float` (higher = better);
a source that is faster in batches also has `score_batch` (`score_all` picks it). Four ship
here:

- `ClassifierReward`: a Hugging Face sequence-classification reward model (by id or path),
  e.g. the Skywork-Reward-V2 family. Measures whatever that model was trained to prefer
  (for the Skywork models: human preference pairs). Needs the model's weights, and a GPU
  for the larger ones; its scores are on the model's own scale (a logit), not in [0, 1].
- `ReferenceReward`: TruthfulQA's automatic metric, offline and with nothing to download:
  ROUGE-L F1 to the closest true reference minus ROUGE-L F1 to the closest false one
  (positive = closer to a true answer). It measures word overlap, not meaning: a response
  that negates a false reference word for word scores as false, a correct answer phrased
  in new words scores near 0, and it needs prompts that come with references.
- `ImplicitReward` (in `shared/implicit_reward.py`): the aligned (guidance) model's implicit
  reward, offline on a CPU: how much more likely the guidance model finds the response, in
  its chat turn, than the base model does after the plain prompt, per token (weak-to-strong
  search / emulated fine-tuning). It measures "reads like the aligned model's answer", not truth.
- `MarkerReward`: how often a marker string occurs in the response. A synthetic, fully
  learnable reward for tests; it measures nothing about quality.

`reward_from_spec` turns a command-line string into one of these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Protocol

from tqdm import tqdm

if TYPE_CHECKING:  # torch is imported where a model is used: the CLI and scorers start fast
    import torch

    from junction.shared.config import ModelSpec


@dataclass(slots=True, frozen=True)
class References:
    """Reference answers for a prompt: ones known to be true and ones known to be false."""

    correct: tuple[str, ...] = ()
    incorrect: tuple[str, ...] = ()


class RewardSource(Protocol):
    name: str

    def score(self, prompt: str, response: str, refs: References | None) -> float: ...


# --- synthetic -------------------------------------------------------------------------------


@dataclass(slots=True)
class MarkerReward:
    """Occurrences of `marker` in the response (non-overlapping), optionally per character.

    `per_char=True` divides by the response's length, so long and short responses are on one
    scale. Limits: a test signal only; it says nothing about helpfulness or truth.
    """

    marker: str
    per_char: bool = False
    name: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.marker:
            raise ValueError("marker: must be a non-empty string")
        self.name = f"marker:{self.marker}" + (":per-char" if self.per_char else "")

    def score(self, prompt: str, response: str, refs: References | None = None) -> float:
        count = response.count(self.marker)
        if self.per_char:
            return count / len(response) if response else 0.0
        return float(count)


# --- TruthfulQA's reference similarity -------------------------------------------------------


@cache
def rouge_l_scorer():
    """ROUGE-L with Porter stemming, as TruthfulQA's own scoring uses."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def closest_similarity(response: str, references: Sequence[str], scorer) -> float:
    """Highest ROUGE-L F1 between the response and any of the references (0 when none)."""
    scores = [scorer.score(ref, response)["rougeL"].fmeasure for ref in references]
    return max(scores, default=0.0)


@dataclass(slots=True)
class ReferenceReward:
    """max ROUGE-L F1 to the true references − max ROUGE-L F1 to the false ones, in [-1, 1].

    As TruthfulQA's authors scored generations without a judge (Lin et al., 2022, with
    Porter stemming). A prompt with only true references (say GSM8K's worked answer) gets
    the similarity to them alone. Limits: surface overlap, not meaning (see module doc).
    """

    name: str = "reference-rougeL"

    def score(self, prompt: str, response: str, refs: References | None) -> float:
        if refs is None or not refs.correct:
            raise ValueError("the reference reward needs prompts that come with true references")
        if not response.strip():
            return 0.0  # rouge_score returns 0 for empty text anyway; skip the work
        scorer = rouge_l_scorer()
        true = closest_similarity(response, refs.correct, scorer)
        false = closest_similarity(response, refs.incorrect, scorer)
        return true - false


def score_all(
    source: RewardSource,
    prompts: Sequence[str],
    responses: Sequence[str],
    refs: Sequence[References | None],
    desc: str = "reward",
) -> list[float]:
    """Every pair's reward: in batches where the source has `score_batch`, else one by one."""
    if hasattr(source, "score_batch"):
        return source.score_batch(prompts, responses, refs)
    triples = list(zip(prompts, responses, refs, strict=True))
    return [source.score(p, r, ref) for p, r, ref in tqdm(triples, desc=desc)]


# --- a learned reward model ------------------------------------------------------------------


class ClassifierReward:
    """A sequence-classification reward model's logit for (prompt, response).

    With a chat template (Skywork-Reward-V2 and most reward models) the pair is rendered
    as a user turn and an assistant turn; without one, it is encoded as a text pair.
    `label` picks the logit for models with several outputs (0 for single-logit reward
    models). Limits: the score is the model's own preference scale, it inherits the model's
    biases (length, style), and large models need a GPU.
    """

    def __init__(self, source: str, device: str = "cpu", label: int = 0) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = f"classifier:{source}"
        self.device = torch.device(device)
        self.label = label
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = AutoModelForSequenceClassification.from_pretrained(source).to(self.device)
        self.model.eval().requires_grad_(False)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def encode(self, prompt: str, response: str) -> dict[str, torch.Tensor]:
        if self.tokenizer.chat_template:
            turns = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
            ]
            text = self.tokenizer.apply_chat_template(turns, tokenize=False)
            # The template already holds any BOS; adding special tokens again would double it.
            return dict(self.tokenizer(text, add_special_tokens=False, return_tensors="pt"))
        return dict(self.tokenizer(prompt, response, return_tensors="pt"))

    def score(self, prompt: str, response: str, refs: References | None = None) -> float:
        import torch

        inputs = {k: v.to(self.device) for k, v in self.encode(prompt, response).items()}
        with torch.inference_mode():
            return float(self.model(**inputs).logits[0, self.label])


# --- from a command line ---------------------------------------------------------------------


def reward_from_spec(
    spec: str,
    device: str = "cpu",
    base: ModelSpec | None = None,
    guidance: ModelSpec | None = None,
) -> RewardSource:
    """'reference' (TruthfulQA ROUGE-L), 'implicit' (the guidance model's implicit reward over
    `base` and `guidance`, the embedded defaults when not given), 'marker:TEXT' (per-char with
    'marker-rate:TEXT'), or else a Hugging Face sequence-classification model id or path."""
    if spec == "reference":
        return ReferenceReward()
    if spec == "implicit":
        from junction.offline.implicit_reward import (
            ImplicitReward,  # torch and the models, when asked
        )

        return ImplicitReward(base, guidance)
    for prefix, per_char in (("marker:", False), ("marker-rate:", True)):
        if spec.startswith(prefix):
            return MarkerReward(spec[len(prefix) :], per_char=per_char)
    return ClassifierReward(spec, device=device)
