"""The core contract on the embedded defaults (Gemma 3 270M base, SmolLM2-135M guidance)."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from typer.testing import CliRunner

from junction.cli import app
from junction.gateway.engine import Engine
from junction.gateway.sequence import GenerationRequest
from junction.services.handles import LocalHandle
from junction.services.lm_runner import LMRunner
from junction.shared.bridge import TokenText
from junction.shared.config import PolicyConfig, SamplingParams
from junction.shared.prompts import build_prompt_ids

PROMPTS = ["The capital of France is", "Here is a recipe for pancakes:"]


@pytest.fixture(scope="module")
def runners(embedded_base, embedded_guidance):
    return {
        "base": LMRunner(embedded_base, "base", chat=False),
        "guidance": LMRunner(embedded_guidance, "guidance", chat=True),
    }


def generate(runners, prompt: str, policy: str, max_tokens: int):
    async def main():
        engine = Engine({role: LocalHandle(r) for role, r in runners.items()})
        await engine.start()
        try:
            req = GenerationRequest(
                prompt=prompt,
                sampling=SamplingParams(max_tokens=max_tokens),
                policy=PolicyConfig(policy=policy),
            )
            return await engine.generate(req)
        finally:
            await engine.close()

    return asyncio.run(main())


def greedy_text(loaded, prompt: str, chat: bool, n: int) -> str:
    """transformers' own greedy generate, rendered through the same bridge."""
    ids = build_prompt_ids(loaded.tokenizer, prompt=prompt, chat=chat)
    with torch.inference_mode():
        out = loaded.model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n, do_sample=False,
        )[0, len(ids):].tolist()
    text = TokenText(loaded.tokenizer, loaded.family, ids, loaded.eos_ids)
    return "".join(t for t in map(text.push, out) if t != "\uffff<eos>")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_base_greedy_is_token_for_token_transformers_generate(runners, embedded_base, prompt):
    result = generate(runners, prompt, "base", 24)
    assert result.text == greedy_text(embedded_base, prompt, chat=False, n=24)
    assert result.intervention_rate == 0.0


def test_cli_json_matches_the_documented_shape(embedded_base):
    out = CliRunner().invoke(
        app, ["generate", "--prompt", PROMPTS[0], "--max-tokens", "12", "--json"]
    )
    assert out.exit_code == 0, out.output
    obj = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(obj) == {"text", "finish_reason", "usage", "junction"}
    assert set(obj["junction"]) == {
        "policy", "steps", "interventions", "intervention_rate", "by_kind", "work", "seed"
    }
    assert set(obj["junction"]["work"]) == {"base_tokens", "value_tokens", "guidance_tokens"}
    assert obj["text"] == greedy_text(embedded_base, PROMPTS[0], chat=False, n=12)


def test_guidance_policy_is_the_guidance_models_own_greedy_output(runners, embedded_guidance):
    result = generate(runners, PROMPTS[1], "guidance", 20)
    assert result.text == greedy_text(embedded_guidance, PROMPTS[1], chat=True, n=20)


@pytest.mark.parametrize("policy", ["blendin", "nudging"])
def test_guidance_pair_runs_end_to_end_with_a_rate_in_0_1(runners, policy):
    result = generate(runners, "How do I make a cup of tea?", policy, 24)
    assert 0.0 < result.intervention_rate <= 1.0
    assert result.by_kind["guidance"] == result.interventions
    assert result.text.strip()
    # Sparse: the guidance model ran far fewer tokens than re-encoding the text per junction.
    prompt_g = runners["guidance"].count_prompt("How do I make a cup of tea?")
    assert result.work["guidance_tokens"] < prompt_g * result.interventions
