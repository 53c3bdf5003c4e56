"""The shipped default value model on the embedded Gemma 3 base: SIA's sparsity and its cost."""

from __future__ import annotations

import asyncio

import pytest

from junction.gateway.engine import Engine
from junction.gateway.sequence import GenerationRequest
from junction.services.factory import build_runner
from junction.services.handles import LocalHandle
from junction.services.value_runner import DEFAULT_VALUE_DIR
from junction.shared.calibration import load_calibration
from junction.shared.config import JunctionConfig, PolicyConfig, SamplingParams
from junction.shared.types import TokenEvent
from junction.shared.value_model import read_value_meta

PROMPT = "Q: Why is the sea salty, and where does the salt in the ocean come from?\nA:"
TOKENS = 50


@pytest.fixture(scope="module")
def results():
    """base, SIA at target ratio 0.2 and dense, side by side in one engine (greedy)."""
    config = JunctionConfig()
    workers = {role: LocalHandle(build_runner(role, config, False)) for role in ("base", "value")}
    policies = [
        PolicyConfig("base"),
        PolicyConfig("sia", target_ratio=0.2, value_temperature=0.0),
        PolicyConfig("dense", value_temperature=0.0),
    ]

    async def main():
        engine = Engine(workers)
        await engine.start()
        try:
            reqs = [
                GenerationRequest(prompt=PROMPT, sampling=SamplingParams(TOKENS), policy=p)
                for p in policies
            ]
            seqs = [await engine.submit(r) for r in reqs]

            async def events(seq):
                return [item async for item in engine.stream(seq)]

            return await asyncio.gather(*(events(s) for s in seqs))
        finally:
            await engine.close()

    base, sia, dense = asyncio.run(main())
    return {"base": base[-1], "sia": sia[-1], "dense": dense[-1], "sia_events": sia[:-1]}


def test_the_default_adapter_ships_small_and_says_how_it_was_trained() -> None:
    meta = read_value_meta(DEFAULT_VALUE_DIR)
    assert meta["backbone"] == "default" and meta["kind"] == "log_ratio"
    assert meta["command"].startswith("python scripts/listwise_targets.py fit --lora")
    # SIA's loss on the evaluation-row trajectories against the constant predictor's
    # (BENCHMARKS.md): mean_t V_t as it is (trained on it too), and read through an affine map
    # fitted on the training trajectories (the goal: 20% below the constant)
    losses = meta["losses"]
    assert losses["val_loss"] < 0.9 * losses["constant_val_loss"]
    assert losses["affine_val_loss"] < 0.8 * losses["constant_val_loss"]
    assert losses["token_mse"] < losses["token_constant_mse"] and losses["val"] == 120
    size = sum(p.stat().st_size for p in DEFAULT_VALUE_DIR.iterdir())
    assert size < 8 * 2**20


def test_sia_target_ratio_fires_at_the_shipped_calibrated_threshold(results) -> None:
    # target_ratio is a share over a data set (calibrated offline), not a quota per request:
    # this request fires exactly where its entropy reaches the calibrated H.
    calibration = load_calibration(DEFAULT_VALUE_DIR)
    assert calibration is not None and calibration.k == 10
    h = calibration.threshold(0.2)
    sia, events = results["sia"], results["sia_events"]
    assert sia.finish_reason == "length" and sia.steps == TOKENS
    assert all(isinstance(e, TokenEvent) for e in events)
    assert [e.junction for e in events] == [e.entropy >= h for e in events]
    assert sia.by_kind["value"] == sia.interventions


def test_dense_intervenes_on_every_step(results) -> None:
    dense = results["dense"]
    assert dense.steps == TOKENS and dense.intervention_rate == 1.0


def test_value_work_of_sparse_junctions_is_a_fraction_of_dense(results) -> None:
    base, sia, dense = results["base"], results["sia"], results["dense"]
    assert base.work["value_tokens"] == 0 and base.interventions == 0
    # The log-ratio model runs no candidate tokens: each junction is one forward over the
    # tokens committed since the last one, so a request's value tokens are its prompt and
    # its answer up to its last junction, and SIA makes one value call per junction.
    last = max(e.index for e in results["sia_events"] if e.junction)
    assert sia.work["value_tokens"] == sia.prompt_tokens + last
    assert dense.work["value_tokens"] == dense.prompt_tokens + TOKENS - 1
    assert 0 < sia.interventions < 0.5 * dense.interventions
