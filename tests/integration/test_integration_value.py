"""The value runner on the real embedded Gemma 3 backbone (fresh LoRA, random head)."""

from __future__ import annotations

import math

import pytest
import torch

from junction.services.value_runner import ValueRunner
from junction.shared.config import ModelSpec
from junction.shared.models import load_model
from junction.shared.prompts import build_prompt_ids
from junction.shared.types import Commit, ScoreRequest
from junction.shared.value_model import build_value_model

PROMPT = "The three most important things to know about the ocean are"
WORDS = [" water", " salt", " life", " waves", " depth", " fish", " tides", " its", " the", " a"]


@pytest.fixture(scope="module")
def runner() -> ValueRunner:
    # Its own copy of the backbone: peft wraps the model it is given in place.
    loaded = load_model("value", ModelSpec())
    return ValueRunner(loaded, build_value_model(loaded.model).eval())


def own(runner: ValueRunner, text: str) -> Commit:
    ids = runner.tokenizer.encode(text, add_special_tokens=False)
    return Commit(text, tuple(ids), runner.family)


def test_scores_ten_candidates_on_the_real_backbone(runner: ValueRunner) -> None:
    n_prompt = runner.open("real", prompt=PROMPT)
    cands = [own(runner, w) for w in WORDS]
    cand_tokens = sum(len(c.ids) for c in cands)
    [first] = runner.score([ScoreRequest("real", cands)])
    assert first.processed == n_prompt + cand_tokens
    assert len(first.values) == 10 and all(math.isfinite(v) for v in first.values)

    step = own(runner, " water, salt and")
    [second] = runner.score([ScoreRequest("real", cands, [step])])
    assert second.processed == len(step.ids) + cand_tokens
    assert all(math.isfinite(v) for v in second.values)

    prefix = build_prompt_ids(runner.tokenizer, prompt=PROMPT, chat=False) + list(step.ids)
    with torch.no_grad():
        full, _ = runner.value(torch.tensor([prefix + list(cands[0].ids)], device=runner.device))
    assert second.values[0] == pytest.approx(float(full[0, -1]), abs=1e-3)
    runner.close("real")
    assert runner.live() == 0
