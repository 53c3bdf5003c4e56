"""SIA's calibrated target_ratio, its decoding options and seeds, and the hybrid policy,
end to end through the engine on tiny models."""

from __future__ import annotations

import asyncio
import statistics

import pytest
import torch
from typer.testing import CliRunner

from junction.cli import app
from junction.gateway.engine import Engine
from junction.gateway.policies import junction_kind
from junction.gateway.policies.sia import Thresholds
from junction.gateway.sequence import GenerationRequest
from junction.offline.calibrate import base_entropies
from junction.services.handles import LocalHandle
from junction.services.lm_runner import LMRunner
from junction.services.value_runner import ValueRunner
from junction.shared.calibration import calibrate, load_calibration, save_calibration
from junction.shared.config import Limits, ModelSpec, PolicyConfig, SamplingParams
from junction.shared.models import load_model
from junction.shared.types import GenerationResult, TokenEvent
from junction.shared.value_model import build_value_model
from tests.gateway.test_engine import request, run, started, workers  # noqa: F401 - fixture

WORDS = "the a sea fox cat dog sky blue whale coral".split()
VERBS = "is was sat swims jumps".split()
PROMPTS = [f"{w} {v}" for w in WORDS for v in VERBS]  # 50 prompts
WIDE = Limits(max_concurrency=len(PROMPTS))  # every request in one batch per tick


@pytest.fixture(scope="module")
def sharp(tiny_gemma, tmp_path_factory):
    """The tiny Gemma with its logits scaled up, so that its entropy varies from step to step
    and prompt to prompt (a random tiny model is near-uniform everywhere), saved as a path."""
    model = tiny_gemma.model
    original = model.model.norm.weight.clone()
    with torch.no_grad():
        model.model.norm.weight.fill_(60.0)  # Gemma's norm scales by (1 + w)
    path = tmp_path_factory.mktemp("sharp_gemma")
    model.save_pretrained(path)
    tiny_gemma.tokenizer.save_pretrained(path)
    with torch.no_grad():
        model.model.norm.weight.copy_(original)
    return str(path)


def base_runner(path: str) -> LMRunner:
    return LMRunner(load_model("base", ModelSpec(source=path), progress=False), "base", chat=False)


def value_runner(path: str, calibration=None) -> ValueRunner:
    backbone = load_model("value", ModelSpec(source=path), progress=False)
    return ValueRunner(backbone, build_value_model(backbone.model, seed=0), calibration)


def plain(prompt: str, policy: PolicyConfig, max_tokens: int = 24) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, sampling=SamplingParams(max_tokens), policy=policy)


def generate_all(engine: Engine, reqs: list[GenerationRequest]) -> list[GenerationResult]:
    async def main():
        await engine.start()
        try:
            return await asyncio.gather(*(engine.generate(r) for r in reqs))
        finally:
            await engine.close()

    return asyncio.run(main())


@pytest.mark.parametrize("how", ["calibrated", "running quantile"])
def test_target_ratio_spares_easy_requests_and_lands_on_the_ratio(sharp, tmp_path, how):
    ratio = 0.2
    # Base runs over the prompt set: the calibration data, and which prompts are easy or hard.
    engine = Engine({"base": LocalHandle(base_runner(sharp))}, WIDE)
    runs = asyncio.run(base_entropies(engine, [plain(p, PolicyConfig("base")) for p in PROMPTS]))
    name = engine.infos["base"].name
    calibration = None
    if how == "calibrated":
        pooled = [h for r in runs for h in r]
        save_calibration(calibrate(pooled, [0.1, 0.3], name, 10, {}), tmp_path)
        calibration = load_calibration(tmp_path)  # 0.2 is interpolated between 0.1 and 0.3
    by_mean = sorted(range(len(PROMPTS)), key=lambda i: statistics.mean(runs[i]))
    third = len(PROMPTS) // 3
    easy, hard = by_mean[:third], by_mean[-third:]

    # SIA with β = 0 and T = 0 takes the base's own argmax, so the text is the base's and
    # only the junction decisions are under test. All requests run at once, as served.
    sia = PolicyConfig("sia", target_ratio=ratio, beta=0.0, value_temperature=0.0)
    runners = {"base": base_runner(sharp), "value": value_runner(sharp, calibration)}
    engine = Engine({r: LocalHandle(w) for r, w in runners.items()}, WIDE)
    results = generate_all(engine, [plain(p, sia) for p in PROMPTS])
    assert (engine.policies.shared(Thresholds).calibration is not None) == (how == "calibrated")

    def rate(ids: list[int]) -> float:
        return sum(results[i].interventions for i in ids) / sum(results[i].steps for i in ids)

    assert abs(rate(list(range(len(PROMPTS)))) - ratio) <= 0.05
    assert rate(easy) < 0.5 * rate(hard)
    assert all(results[i].steps == len(runs[i]) for i in range(len(PROMPTS)))  # base's text


def test_calibrate_command_writes_thresholds_for_each_ratio(sharp, tmp_path):
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(PROMPTS[:6]) + "\n")
    args = ["calibrate", "--data", str(data), "--split", "all", "--base", sharp,
            "--ratio", "0.1", "--ratio", "0.3", "--max-tokens", "8", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    calibration = load_calibration(tmp_path)
    assert set(calibration.thresholds) == {0.1, 0.3} and calibration.k == 10
    assert calibration.thresholds[0.1] >= calibration.thresholds[0.3]  # fewer junctions: higher H
    assert calibration.source["prompts"] == 6 and calibration.steps <= 6 * 8
    bad = CliRunner().invoke(app, [*args[:-2], "--ratio", "1.5"])
    assert bad.exit_code == 2 and "ratio" in bad.output


def test_a_calibration_for_another_base_is_not_used(sharp, tmp_path):
    save_calibration(calibrate([0.5, 1.0], [0.2], "some-other-model", 10, {}), tmp_path)
    cal = load_calibration(tmp_path)
    runners = {"base": base_runner(sharp), "value": value_runner(sharp, cal)}
    engine = Engine({r: LocalHandle(w) for r, w in runners.items()})
    generate_all(engine, [plain("the sea", PolicyConfig("sia", target_ratio=0.2), 2)])
    assert engine.policies.shared(Thresholds).calibration is None
    assert engine.info()["sia"]["running_quantile"]["10"]["entropies"] == 2


# --- SIA decoding: the paper's top-k sampling, seeds ---------------------------------------


def test_unseeded_sampling_requests_get_their_own_recorded_seed(workers):  # noqa: F811
    def unseeded(**options) -> GenerationRequest:
        req = request("sia", max_tokens=8, entropy_threshold=0.0, **options)
        req.sampling.seed = None
        return req

    results = run(workers, unseeded(value_temperature=1.0), unseeded(value_temperature=1.0))
    seeds = [r.seed for r in results]
    assert None not in seeds and seeds[0] != seeds[1]
    assert results[0].to_json()["junction"]["seed"] == seeds[0]
    # the recorded seed replays the same text
    replay = unseeded(value_temperature=1.0)
    replay.sampling.seed = seeds[0]
    (again,) = run(workers, replay)
    assert again.text == results[0].text and again.seed == seeds[0]
    # a greedy request draws nothing and records no seed: by default SIA's junctions decode
    # as the request does (argmax here), equal to an explicit T = 0
    (default,) = run(workers, unseeded())
    (argmax,) = run(workers, unseeded(value_temperature=0.0))
    assert default.seed is None and argmax.seed is None
    assert default.text == argmax.text and default.interventions == argmax.interventions > 0


def test_sia_junction_temperature_follows_the_request_unless_given():
    sia = PolicyConfig("sia")
    assert sia.junction_temperature(0.0) == 0.0  # greedy request: argmax at junctions
    assert sia.junction_temperature(0.7) == 0.7  # a sampled request samples there too
    assert PolicyConfig("sia", sia_decode="topk_sample").junction_temperature(0.0) == 1.0
    assert PolicyConfig("sia", value_temperature=0.5).junction_temperature(0.0) == 0.5
    assert PolicyConfig("dense", value_temperature=0.0).junction_temperature(0.9) == 0.0


def test_paper_decoding_samples_the_base_top_k_between_junctions(workers):  # noqa: F811
    """With no junctions, `sia_decode: topk_sample` is a top-k sample of the base at T;
    the default ("request") is the request's own greedy decoding."""
    never = {"entropy_threshold": 100.0, "value_temperature": 1.0}
    (greedy,) = run(workers, request("base", max_tokens=12))
    (default,) = run(workers, request("sia", max_tokens=12, **never))
    assert default.text == greedy.text and default.interventions == 0
    texts = {
        run(workers, request("sia", max_tokens=12, sia_decode="topk_sample", **never))[0].text
        for _ in range(2)
    }
    (seeded_again,) = run(workers, request("sia", max_tokens=12, sia_decode="topk_sample", **never))
    assert len(texts) == 1 and seeded_again.text in texts  # seed 0: one stream, reproducible
    sampled = []
    for seed in range(4):
        req = request("sia", max_tokens=12, sia_decode="topk_sample", **never)
        req.sampling.seed = seed
        sampled.append(run(workers, req)[0])
    assert len({r.text for r in sampled}) > 1  # a random tiny model: near-uniform top-k
    assert all(r.interventions == 0 and r.work["value_tokens"] == 0 for r in sampled)


def test_value_only_follows_the_values(workers):  # noqa: F811
    (result,) = run(workers, request("dense", max_tokens=6, value_only=True, value_temperature=0))
    assert result.interventions == result.steps == 6


# --- the hybrid policy ----------------------------------------------------------------------


def events_of(workers, req: GenerationRequest) -> tuple[list[TokenEvent], GenerationResult]:  # noqa: F811
    async def main():
        async with started(workers) as engine:
            seq = await engine.submit(req)
            return [item async for item in engine.stream(seq)]

    items = asyncio.run(main())
    return items[:-1], items[-1]


def test_hybrid_consults_each_model_at_its_own_junctions(workers):  # noqa: F811
    # Thresholds at the medians of a base run, so that every combination of the two tests
    # occurs: the value model, the guidance model, both (guidance wins), neither.
    base_events, _ = events_of(workers, request("base", max_tokens=24))
    h = statistics.median(e.entropy for e in base_events)
    tau = statistics.median(e.top1_prob for e in base_events)
    req = request("hybrid", max_tokens=24, entropy_threshold=h, tau=tau, value_temperature=0)
    events, result = events_of(workers, req)

    for i, e in enumerate(events):
        mid_char = i > 0 and events[i - 1].text == ""  # the step after an unfinished character
        expected = None if mid_char else junction_kind("hybrid", e.entropy, e.top1_prob, h, tau)
        assert e.kind == expected, i
        assert e.junction == (expected is not None)
        assert e.source == (expected or "base")
        assert (e.alpha is not None) == (expected == "guidance")
    kinds = [e.kind for e in events]
    assert result.by_kind == {"value": kinds.count("value"), "guidance": kinds.count("guidance")}
    assert result.interventions == result.by_kind["value"] + result.by_kind["guidance"]
    assert result.by_kind["value"] > 0 and result.by_kind["guidance"] > 0
    assert result.work["value_tokens"] > 0 and result.work["guidance_tokens"] > 0
    assert all(w.live() == 0 for w in workers.values())


def test_hybrid_when_both_tests_always_fire_is_all_guidance(workers):  # noqa: F811
    (result,) = run(workers, request("hybrid", max_tokens=10, entropy_threshold=0.0, tau=1.0))
    assert result.by_kind["value"] == 0 and result.work["value_tokens"] == 0
    assert result.by_kind["guidance"] == result.interventions > 0


def test_hybrid_with_no_confidence_junctions_is_sia(workers):  # noqa: F811
    options = {"entropy_threshold": 0.0, "value_temperature": 0.0}
    (hybrid,) = run(workers, request("hybrid", max_tokens=10, tau=0.0, **options))
    (sia,) = run(workers, request("sia", max_tokens=10, **options))
    assert hybrid.text == sia.text
    assert hybrid.by_kind == sia.by_kind and hybrid.work["guidance_tokens"] == 0
