"""One request cannot stop the others, with the embedded models through the engine.

The cases of issue 7, items 1 and 2, on Gemma 3 270M (base), SmolLM2-135M (guidance) and the
shipped value adapter: SIA with `value_temperature: 1e-320` or `beta: NaN` (NaN probabilities
inside the decode loop), a base request with `temperature: 1e-39` (once fatal to the base
worker's whole batched step), and a sequence its guidance worker fails on. Each is set past
request validation, as defence in depth: the engine itself must survive it.
"""

from __future__ import annotations

import asyncio

import pytest

from junction.gateway.engine import Engine
from junction.gateway.local import local_handles
from junction.gateway.sequence import GenerationRequest
from junction.services.protocol import Worker
from junction.shared.config import JunctionConfig, PolicyConfig, SamplingParams
from junction.shared.types import GenerationResult

PROMPT = "The three most important things to know about the ocean are"
TOKENS = 6


@pytest.fixture(scope="module")
def handles():
    return local_handles(JunctionConfig(), ("base", "guidance", "value"), progress=False)


def request(policy: str, **options) -> GenerationRequest:
    return GenerationRequest(
        prompt=PROMPT,
        sampling=SamplingParams(max_tokens=TOKENS, seed=0),
        policy=PolicyConfig(policy=policy, **options),
    )


def poisoned(policy: str, field: str, value: float) -> GenerationRequest:
    req = request(policy)
    setattr(req.sampling if hasattr(req.sampling, field) else req.policy, field, value)
    return req


async def last(engine: Engine, seq) -> GenerationResult:
    return [item async for item in engine.stream(seq)][-1]


def serve(handles, main):
    async def wrapped():
        engine = Engine(handles)
        await engine.start()
        try:
            return await main(engine)
        finally:
            await engine.close()

    return asyncio.run(wrapped())


@pytest.fixture(scope="module")
def alone(handles) -> dict[str, str]:
    async def main(engine):
        return {p: (await engine.generate(request(p))).text for p in ("base", "blendin")}

    return serve(handles, main)


@pytest.mark.parametrize(
    ("field", "value"), [("value_temperature", 1e-320), ("beta", float("nan"))]
)
def test_a_value_guided_request_with_nan_probabilities_fails_alone(handles, alone, field, value):
    """Dense (SIA's choice at every step), so the NaN is met at the first step."""
    async def main(engine):
        results = await asyncio.gather(
            engine.generate(request("base")),
            engine.generate(poisoned("dense", field, value)),
            engine.generate(request("blendin")),
        )
        later = await engine.generate(request("base"))
        return results, later, engine.down

    (base, bad, blend), later, down = serve(handles, main)
    assert bad.finish_reason == "error"
    assert (base.text, blend.text, later.text) == (alone["base"], alone["blendin"], alone["base"])
    assert base.finish_reason == blend.finish_reason == later.finish_reason == "length"
    assert down == {}


@pytest.mark.parametrize("temperature", [1e-39, 5e-324])
def test_a_tiny_temperature_leaves_its_batch_mates_alone(handles, alone, temperature):
    async def main(engine):
        return await asyncio.gather(
            engine.generate(request("base")),
            engine.generate(poisoned("base", "temperature", temperature)),
            engine.generate(request("base")),
            engine.generate(request("base")),
        )

    results = serve(handles, main)
    assert [r.finish_reason for r in results] == ["length"] * 4
    assert [r.text for r in results] == [alone["base"]] * 4  # T -> 0 samples as greedy


def test_a_sequence_its_guidance_worker_fails_on_fails_alone(handles, alone):
    async def main(engine):
        seqs = [await engine.submit(request("blendin", tau=1.0)) for _ in range(3)]
        await engine.stream(seqs[1]).__anext__()  # it has taken a step: open everywhere
        await engine.workers["guidance"].call(Worker.close, seqs[1].id)
        return await asyncio.gather(*(last(engine, s) for s in seqs)), seqs[1].error

    (first, victim, third), error = serve(handles, main)
    assert victim.finish_reason == "error" and error.startswith("guidance worker failed")
    assert first.finish_reason == third.finish_reason == "length"
    assert first.text == third.text
