"""Best-of-N: N seeded samples of any policy, the best by the value model or a reward source."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from typer.testing import CliRunner

from junction.cli import app
from junction.gateway.best_of import ValueScorer, best_of_n, combined, samples_of
from junction.gateway.engine import Engine
from junction.gateway.sequence import GenerationRequest
from junction.offline.reward_scorer import RewardScorer
from junction.offline.rewards import MarkerReward
from junction.services.handles import LocalHandle
from junction.services.lm_runner import LMRunner
from junction.services.value_runner import ValueRunner
from junction.shared.config import Limits, ModelSpec, PolicyConfig, SamplingParams
from junction.shared.models import load_model
from junction.shared.prompts import build_prompt_ids
from junction.shared.types import GenerationResult
from junction.shared.value_model import build_value_model
from tests.shared.test_value_model import perturb_lora

PROMPT = "The ocean covers most of the surface of the earth"


def request(policy: str = "base", temperature: float = 1.0, seed: int | None = 7, **options):
    return GenerationRequest(
        prompt=PROMPT,
        sampling=SamplingParams(max_tokens=10, temperature=temperature, seed=seed),
        policy=PolicyConfig(policy=policy, **options),
    )


def result(text: str, steps: int, interventions: int, value_tokens: int) -> GenerationResult:
    return GenerationResult(
        text=text, finish_reason="length", prompt_tokens=5, completion_tokens=steps,
        policy="sia", steps=steps, interventions=interventions,
        by_kind={"value": interventions, "guidance": 0},
        work={"base_tokens": steps + 4, "value_tokens": value_tokens, "guidance_tokens": 0},
    )


# --- pure parts --------------------------------------------------------------------------------


def test_samples_have_consecutive_seeds_and_their_own_ids() -> None:
    copies = samples_of(request(seed=7), 4)
    assert [c.sampling.seed for c in copies] == [7, 8, 9, 10]
    assert len({c.request_id for c in copies}) == 4
    assert all(c.prompt == PROMPT and c.policy.policy == "base" for c in copies)
    unseeded = [c.sampling.seed for c in samples_of(request(seed=None), 3)]
    assert unseeded == [unseeded[0], unseeded[0] + 1, unseeded[0] + 2]


@pytest.mark.parametrize(
    ("policy", "temperature", "options", "ok"),
    [
        ("base", 0.0, {}, False),  # greedy: N equal completions
        ("base", 0.7, {}, True),
        ("sia", 0.0, {"value_temperature": 1.0}, True),  # SIA samples at its junctions
        ("sia", 0.0, {"value_temperature": 0.0}, False),
        ("sia", 0.0, {}, False),  # by default a greedy request's junctions take the argmax
        ("sia", 0.0, {"sia_decode": "topk_sample"}, True),  # the paper's T = 1
        ("blendin", 0.0, {}, False),
    ],
)
def test_best_of_n_needs_sampling(policy: str, temperature: float, options: dict, ok: bool):
    req = request(policy, temperature, **options)
    if ok:
        assert len(samples_of(req, 3)) == 3
    else:
        with pytest.raises(ValueError, match="sampling"):
            samples_of(req, 3)
    assert len(samples_of(req, 1)) == 1  # one completion never needs sampling


def test_combined_counts_every_run_and_the_scoring() -> None:
    runs = [result("a", 10, 2, 30), result("b", 8, 1, 12), result("c", 10, 3, 40)]
    best = combined(runs[1], runs, work=25)
    assert best.text == "b" and best.completion_tokens == 8
    assert (best.steps, best.interventions) == (28, 6)
    assert best.by_kind == {"value": 6, "guidance": 0}
    assert best.work == {"base_tokens": 40, "value_tokens": 30 + 12 + 40 + 25, "guidance_tokens": 0}


# --- through the engine ------------------------------------------------------------------------


@pytest.fixture()
def workers(tiny_gemma):
    spec = ModelSpec(source=str(tiny_gemma.path))
    backbone = load_model("value", spec, progress=False)
    return {
        "base": LMRunner(load_model("base", spec, progress=False), "base", chat=False),
        "value": ValueRunner(backbone, perturb_lora(build_value_model(backbone.model, seed=0))),
    }


def run_best_of(workers, req, n, scorer, limits: Limits | None = None):
    async def main():
        engine = Engine({r: LocalHandle(w) for r, w in workers.items()}, limits)
        await engine.start()
        try:
            return await best_of_n(engine, req, n, scorer)
        finally:
            await engine.close()

    return asyncio.run(main())


def test_best_by_reward_is_the_highest_scoring_sample(workers) -> None:
    reward = MarkerReward("e")
    best, runs = run_best_of(workers, request(), 4, RewardScorer(reward))
    assert len(runs) == 4 and len({r.text for r in runs}) > 1  # seeds give different samples
    scores = [reward.score(PROMPT, r.text) for r in runs]
    assert best.text == runs[scores.index(max(scores))].text
    assert best.steps == sum(r.steps for r in runs) == 40
    assert best.work["base_tokens"] == sum(r.work["base_tokens"] for r in runs)
    assert best.work["value_tokens"] == 0


def test_best_by_value_is_v_at_the_last_token_of_each_completion(workers) -> None:
    runner = workers["value"]
    best, runs = run_best_of(workers, request("sia", entropy_threshold=0.5), 3, ValueScorer())
    prompt_ids = build_prompt_ids(runner.tokenizer, prompt=PROMPT, chat=False)
    values, completion_tokens = [], 0
    for r in runs:
        ids = runner.tokenizer.encode(r.text, add_special_tokens=False)
        completion_tokens += len(ids)
        with torch.no_grad():
            values.append(float(runner.value(torch.tensor([prompt_ids + ids]))[0][0, -1]))
    assert best.text == runs[values.index(max(values))].text
    scoring = len(prompt_ids) + completion_tokens  # the prompt once, then every completion
    assert best.work["value_tokens"] == sum(r.work["value_tokens"] for r in runs) + scoring
    assert best.interventions == sum(r.interventions for r in runs) > 0
    assert runner.live() == 0  # the scoring sequence was closed


def test_n_is_bounded_by_the_limit(workers) -> None:
    with pytest.raises(ValueError, match="n: between 1 and 2"):
        run_best_of(workers, request(), 3, ValueScorer(), Limits(max_n=2))


def test_value_scorer_without_a_value_worker(workers) -> None:
    with pytest.raises(ValueError, match="value model"):
        run_best_of({"base": workers["base"]}, request(), 2, ValueScorer())


def test_cli_best_of_n_prints_the_summed_counters(tiny_gemma) -> None:
    args = [
        "generate", "--prompt", PROMPT, "--base", str(tiny_gemma.path), "--max-tokens", "6",
        "--temperature", "1", "--seed", "3", "--n", "3", "--reward", "marker:e", "--json",
    ]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    body = json.loads(out.stdout.strip().splitlines()[-1])
    assert body["junction"]["steps"] == 18 and body["usage"]["completion_tokens"] == 6
