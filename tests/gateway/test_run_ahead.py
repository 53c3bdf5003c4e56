"""Run-ahead (`gateway/run_ahead.py`): the base decodes until its next junction in one call,
and every request comes out exactly as when it takes one step per call."""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import asdict

import pytest

from junction.gateway.engine import Engine
from junction.gateway.policies import junction_kind
from junction.gateway.sequence import GenerationRequest
from junction.services.lm_runner import LMRunner
from junction.shared.config import Limits, PolicyConfig, SamplingParams
from junction.shared.steering import run_ahead_stops
from junction.shared.types import (
    EOS_TEXT,
    Commit,
    GenerationResult,
    RunAhead,
    StepRequest,
    TokenEvent,
)
from tests.gateway import test_engine
from tests.gateway.test_engine import request, run, started, tokens_only

workers = test_engine.workers  # the same fixture: a tiny Gemma base, a tiny Llama guidance

STEP_BY_STEP = Limits(run_ahead=0)


class CountingRunner(LMRunner):
    """A real LM runner that counts its `step` calls (the gateway's round trips)."""

    calls = 0

    def step(self, reqs):
        self.calls += 1
        return super().step(reqs)


def counting(workers) -> dict:
    base = workers["base"]
    return {**workers, "base": CountingRunner(base.loaded, "base", chat=False)}


def floats_apart(obj: object, floats: list[float]) -> object:
    """`obj` with its floats taken out into `floats` (compared apart, to a float's rounding:
    a batch of other rows may round a row's logits differently in the last bits)."""
    if isinstance(obj, float):
        floats.append(obj)
        return float
    if isinstance(obj, dict):
        return {key: floats_apart(value, floats) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [floats_apart(value, floats) for value in obj]
    return obj


def assert_same(got: object, expected: object) -> None:
    got_floats, expected_floats = [], []
    assert floats_apart(got, got_floats) == floats_apart(expected, expected_floats)
    assert got_floats == pytest.approx(expected_floats, rel=1e-5, abs=1e-6)


def streamed(
    workers, reqs: list[GenerationRequest], limits: Limits, parallel: bool = False
) -> list[tuple[list, dict]]:
    """Each request's token events and result, all requests admitted at once (`parallel`:
    the runners taken for separate processes, see `test_engine.started`)."""

    async def one(engine: Engine, req: GenerationRequest) -> tuple[list, dict]:
        seq = await engine.submit(req)
        items = [item async for item in engine.stream(seq)]
        return [asdict(e) for e in items[:-1]], items[-1].to_json()

    async def main():
        async with started(workers, limits, parallel) as engine:
            return await asyncio.gather(*(one(engine, r) for r in reqs))

    return asyncio.run(main())


def midpoints(workers) -> tuple[float, float]:
    """The base's median top-1 probability and entropy on the test prompt: as τ and H they
    make about half the steps junctions, so bursts both run on and stop at junctions."""
    events, _ = streamed(workers, [request("base", max_tokens=16)], STEP_BY_STEP)[0]
    return (statistics.median(e["top1_prob"] for e in events),
            statistics.median(e["entropy"] for e in events))


def mixed_requests(tau: float, threshold: float) -> list[GenerationRequest]:
    """Sampled and greedy requests of every policy the base drives, seeded, with logprobs."""
    table = [
        ("base", 0.0, {}),
        ("base", 1.0, {}),
        ("blendin", 0.8, {"tau": tau}),
        ("nudging", 0.8, {"tau": tau}),
        ("sia", 0.8, {"entropy_threshold": threshold, "value_temperature": 0.5}),
        ("hybrid", 0.0, {"entropy_threshold": threshold, "tau": tau, "value_temperature": 1.0}),
        ("sia", 0.0, {"entropy_threshold": threshold, "sia_decode": "topk_sample"}),
        ("sia", 0.0, {"entropy_threshold": threshold}),  # greedy: argmax at junctions
    ]
    return [
        GenerationRequest(
            prompt="the cat sat on",
            sampling=SamplingParams(max_tokens=20, temperature=t, top_p=0.9, seed=7 + n,
                                    logprobs=2),
            policy=PolicyConfig(policy=policy, **options),
        )
        for n, (policy, t, options) in enumerate(table)
    ]


@pytest.mark.parametrize("run_ahead", [1, 3, 8])
def test_seeded_requests_are_the_same_run_ahead_or_step_by_step(workers, run_ahead):
    tau, threshold = midpoints(workers)
    alone = streamed(workers, mixed_requests(tau, threshold), STEP_BY_STEP)
    ahead = streamed(workers, mixed_requests(tau, threshold), Limits(run_ahead=run_ahead))
    for (events, result), (events_ahead, result_ahead) in zip(alone, ahead, strict=True):
        assert result_ahead == result  # text, finish reason, steps, interventions, work...
        assert_same(events_ahead, events)  # every event: text, junction, α, logprobs...
    blendin = alone[2][1]["junction"]
    assert 0 < blendin["interventions"] < blendin["steps"]  # bursts stopped at junctions
    assert all(w.live() == 0 for w in workers.values())


def test_run_ahead_takes_one_call_per_burst(workers):
    workers = counting(workers)
    (result,) = run(workers, request("base", max_tokens=16), limits=tokens_only(run_ahead=7))
    assert workers["base"].calls == 3  # the first token alone (time to first token), 8, 7
    (alone,) = run(workers, request("base", max_tokens=16), limits=STEP_BY_STEP)
    assert workers["base"].calls == 3 + 16
    assert (result.text, result.steps, result.work) == (alone.text, alone.steps, alone.work)


def test_max_tokens_is_never_passed_and_nothing_past_it_is_decoded(workers):
    workers = counting(workers)
    (result,) = run(workers, request("base", max_tokens=10), limits=tokens_only(run_ahead=4))
    prompt = workers["base"].count_prompt("the cat sat on")
    assert (result.finish_reason, result.completion_tokens, result.steps) == ("length", 10, 10)
    assert workers["base"].calls == 3  # 1 + 5 + 4
    # the prompt and nine tokens ran through the model; the tenth was never fed back
    assert result.work["base_tokens"] == prompt + 9


def test_a_stop_string_inside_a_burst_drops_the_rest_and_frees_the_runner(workers):
    (free,) = run(workers, request("base", max_tokens=16), limits=STEP_BY_STEP)
    stop = free.text[3:6]
    results = []
    for limits in (STEP_BY_STEP, Limits(run_ahead=12)):
        req = request("base", max_tokens=16)
        req.sampling.stop = [stop]
        results.append(streamed(workers, [req], limits)[0])
    (events, result), (events_ahead, result_ahead) = results
    assert result_ahead["finish_reason"] == "stop"
    assert result_ahead["text"] == free.text[: free.text.index(stop)]
    assert 1 < result_ahead["junction"]["steps"] < 14  # inside the burst after the 1st token
    assert "".join(e["text"] for e in events_ahead) == result_ahead["text"]
    assert_same(events_ahead, events)
    assert result_ahead["usage"] == result["usage"]
    # the runner decoded past the stop (more work), then dropped it when the request closed
    assert result_ahead["junction"]["work"]["base_tokens"] > result["junction"]["work"][
        "base_tokens"]
    assert all(w.live() == 0 for w in workers.values())


def test_cancel_mid_burst_drops_the_burst_in_flight_and_frees_the_caches(workers):
    async def main():
        async with started(workers, tokens_only(run_ahead=4)) as engine:
            seq = await engine.submit(request("base", max_tokens=200))
            items = []
            async for item in engine.stream(seq):
                items.append(item)
                if len(items) == 2:  # the first of a burst of 5 (the first token came alone)
                    engine.cancel(seq)  # while the next burst is being decoded
            await asyncio.sleep(0.1)
            return items

    items = asyncio.run(main())
    result, events = items[-1], items[:-1]
    assert isinstance(result, GenerationResult) and result.finish_reason == "cancelled"
    assert all(isinstance(e, TokenEvent) for e in events)
    assert len(events) == result.completion_tokens == 1 + 5  # the burst in flight: dropped
    assert all(w.live() == 0 for w in workers.values())


@pytest.mark.parametrize(
    ("ahead", "earlier"),
    [
        (None, 0),
        (RunAhead(steps=1, threshold=None, tau=None), 0),
        (RunAhead(steps=5, threshold=None, tau=None), 4),  # base: no junction
        (RunAhead(steps=5, threshold=None, tau=1.0), 0),  # confidence: every step fires
        (RunAhead(steps=5, threshold=None, tau=0.0), 4),  # none does
        (RunAhead(steps=5, threshold=0.0, tau=None), 0),  # entropy: every step fires
        (RunAhead(steps=5, threshold=100.0, tau=None), 4),  # none does
        (RunAhead(steps=5, threshold=100.0, tau=1.0), 0),  # hybrid: either fires
        (RunAhead(steps=5, threshold=None, tau=None, seconds=0.0), 0),  # time's up
    ],
)
def test_the_runner_runs_ahead_until_a_junction_or_the_cap(workers, ahead, earlier):
    runner = workers["base"]
    prompt = runner.open("s", prompt="the cat sat on")
    (res,) = runner.step([StepRequest("s", k=5, ahead=ahead)])
    assert len(res.earlier) == earlier
    assert [e.processed for e in res.earlier] + [res.processed] == [prompt] + [1] * earlier
    # the runner holds the tokens it ran ahead with, not the one it returns
    held = runner.seqs["s"].text.ids[prompt:]
    assert held == [e.sampled_id for e in res.earlier]
    for step in res.earlier:
        top = step.top
        assert step.sampled_text != EOS_TEXT
        assert step.mid_char or not run_ahead_stops(
            top.entropy, top.top1_prob, ahead.threshold, ahead.tau)


def test_a_burst_ends_exactly_at_the_next_junction(workers):
    tau, _ = midpoints(workers)
    runner = workers["base"]
    runner.open("s", prompt="the cat sat on")
    ahead = RunAhead(steps=50, threshold=None, tau=tau)
    append, ran_ahead = [], 0
    for _ in range(6):
        (res,) = runner.step([StepRequest("s", k=5, ahead=ahead, append=append)])
        top = res.top
        fired = not res.mid_char and junction_kind("blendin", top.entropy, top.top1_prob, 0.0, tau)
        assert fired or res.sampled_text == EOS_TEXT or len(res.earlier) + 1 == ahead.steps
        ran_ahead += len(res.earlier)
        append = [Commit(res.sampled_text, (res.sampled_id,), runner.family)]  # the base's own
    assert ran_ahead > 0
