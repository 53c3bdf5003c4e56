"""The log-ratio value model: LoRA on the base, V(c) = log p_θ(c) − log p_base(c), saved,
loaded by the value runner and used by SIA through the engine, on a tiny Gemma."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from junction.gateway.best_of import ValueScorer, best_of_n
from junction.gateway.engine import Engine
from junction.gateway.sequence import GenerationRequest
from junction.services.lm_runner import LMRunner
from junction.services.value_runner import ValueRunner
from junction.shared.config import ModelSpec, PolicyConfig, SamplingParams
from junction.shared.models import load_model
from junction.shared.prompts import build_prompt_ids
from junction.shared.types import Commit, Failure, ScoreRequest, ScoreResult
from junction.shared.value_model import (
    attention_projections,
    load_value_model,
    read_value_meta,
    save_log_ratio_model,
)
from tests.gateway.test_engine import started

PROMPT = "the cat sat on the mat and the dog sat on the"


def adapted(path: Path) -> PeftModel:
    """The tiny base with a LoRA that is not a no-op (lora_B starts at zero)."""
    model = load_model("value", ModelSpec(source=str(path)), progress=False).model
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(attention_projections(model)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft = get_peft_model(model, config)
        with torch.no_grad():
            for name, param in peft.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape) * 0.5)
    return peft.eval()


@pytest.fixture(scope="module")
def saved(tiny_gemma, tmp_path_factory) -> tuple[Path, PeftModel]:
    out = tmp_path_factory.mktemp("log_ratio")
    peft = adapted(tiny_gemma.path)
    save_log_ratio_model(peft, out, {"backbone": str(tiny_gemma.path)})
    return out, peft


def on_engine(backbone: Path, value_dir: Path, work):
    """await work(engine) on a started engine over the tiny base and this value model."""
    spec = ModelSpec(source=str(backbone))
    runners = {"base": LMRunner(load_model("base", spec, progress=False), "base", chat=False),
               "value": ValueRunner.from_paths(spec, value_dir)}

    async def main():
        async with started(runners) as engine:
            return await work(engine)

    return asyncio.run(main())


@torch.no_grad()
def next_logprobs(peft: PeftModel, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_θ and log p_base of the next token after ids (adapter on, then off)."""
    x = torch.tensor([ids])
    theta = torch.log_softmax(peft(input_ids=x).logits[0, -1].double(), -1)
    with peft.disable_adapter():
        base = torch.log_softmax(peft(input_ids=x).logits[0, -1].double(), -1)
    return theta, base


def test_saved_directory_says_its_kind_and_is_not_a_head_model(saved, tiny_gemma) -> None:
    out, _ = saved
    meta = read_value_meta(out)
    assert meta["kind"] == "log_ratio" and meta["lora"]["r"] == 4
    assert not (out / "value_head.safetensors").exists()
    assert "base_model_name_or_path" in (out / "adapter_config.json").read_text()
    backbone = load_model("value", ModelSpec(source=str(tiny_gemma.path)), progress=False)
    with pytest.raises(ValueError, match="log_ratio value model, not a head"):
        load_value_model(out, backbone.model)


def test_runner_scores_candidates_by_the_log_ratio_for_prefix_work_only(saved, tiny_gemma):
    out, peft = saved
    runner = ValueRunner.from_paths(ModelSpec(source=str(tiny_gemma.path)), out)
    ids = build_prompt_ids(tiny_gemma.tokenizer, prompt=PROMPT, chat=False)
    assert runner.open("a", prompt=PROMPT) == len(ids)
    assert runner.info().value_kind == "log_ratio"
    family = runner.family
    appended: list[Commit] = []
    for step in range(3):
        theta, base = next_logprobs(peft, ids)
        top = torch.topk(base, 10).indices.tolist()
        cands = [Commit(tiny_gemma.tokenizer.decode([i]), (i,), family) for i in top]
        req = ScoreRequest("a", cands, append=appended, logprobs=base[top].tolist())
        [result] = runner.score([req])
        assert isinstance(result, ScoreResult)
        assert result.values == pytest.approx((theta[top] - base[top]).tolist(), abs=2e-4)
        assert result.processed == (len(ids) if step == 0 else 1)  # no candidate tokens run
        assert any(abs(v) > 1e-2 for v in result.values)  # the LoRA moves the distribution
        nxt = top[step + 1]  # commit a non-greedy candidate, as SIA may
        appended = [cands[step + 1]]
        ids = [*ids, nxt]


def test_runner_refuses_what_a_log_ratio_cannot_score(saved, tiny_gemma) -> None:
    out, _ = saved
    runner = ValueRunner.from_paths(ModelSpec(source=str(tiny_gemma.path)), out)
    runner.open("a", prompt=PROMPT)
    runner.open("b", prompt=PROMPT)
    whole = ScoreRequest("a", [Commit(" a whole completion")])  # best-of: no base logprobs
    two = ScoreRequest("b", [Commit("xy", (300, 301), runner.family)], logprobs=[-1.0])
    missing, multi = runner.score([whole, two])
    assert isinstance(missing, Failure) and "best-of" in missing.error
    assert isinstance(multi, Failure) and "single tokens" in multi.error


def test_sia_through_the_engine_takes_the_adapted_models_choice(saved, tiny_gemma) -> None:
    """Dense SIA with β = 1 and argmax ranks the base's top 10 by log p_base + V = log p_θ."""
    out, peft = saved
    policy = PolicyConfig("dense", beta=1.0, value_temperature=0.0)
    req = GenerationRequest(prompt=PROMPT, sampling=SamplingParams(12), policy=policy)
    result = on_engine(tiny_gemma.path, out, lambda engine: engine.generate(req))
    ids = build_prompt_ids(tiny_gemma.tokenizer, prompt=PROMPT, chat=False)
    expected: list[int] = []
    for _ in range(12):
        theta, base_lp = next_logprobs(peft, ids + expected)
        top = torch.topk(base_lp, 10).indices
        expected.append(int(top[theta[top].argmax()]))
    assert result.interventions == result.steps == 12
    assert result.text == tiny_gemma.tokenizer.decode(expected)
    greedy = []
    for _ in range(12):
        greedy.append(int(next_logprobs(peft, ids + greedy)[1].argmax()))
    assert expected != greedy  # the value model changed the answer


def test_best_of_by_a_log_ratio_value_is_a_clear_best_of_error(saved, tiny_gemma) -> None:
    out, _ = saved
    req = GenerationRequest(prompt=PROMPT, sampling=SamplingParams(4, temperature=1.0, seed=0))

    async def best(engine: Engine):
        with pytest.raises(ValueError, match="log-ratio model") as err:
            await best_of_n(engine, req, 2, ValueScorer())
        assert str(err.value).startswith("best-of-N by value")  # the API's 400 on best_of

    on_engine(tiny_gemma.path, out, best)
