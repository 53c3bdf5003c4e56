"""The pipelined base call (`Engine._pipelined`): for `base` requests on a served worker the
next call leaves before the last one's steps are committed, and every request comes out as
when it waits for them."""

from __future__ import annotations

import asyncio

import pytest

from gateway.engine import Engine
from gateway.sequence import GenerationRequest
from services.handles import LocalHandle
from shared.config import Limits, PolicyConfig, SamplingParams
from tests import test_engine
from tests.test_engine import request, run
from tests.test_run_ahead import assert_same, streamed, tokens_only

workers = test_engine.workers  # the same fixture: a tiny Gemma base, a tiny Llama guidance


def base_requests() -> list[GenerationRequest]:
    """Greedy and seeded sampled `base` requests that end at different steps: max_tokens, a
    stop string, logprobs, so parts of pipelined calls are dropped along the way."""
    table = [(0.0, 24, []), (1.0, 9, []), (0.7, 17, []), (0.0, 24, [" "]), (1.0, 3, [])]
    return [
        GenerationRequest(
            prompt=prompt,
            sampling=SamplingParams(max_tokens=n, temperature=t, top_p=0.9, seed=11 + i,
                                    logprobs=2 if i % 2 else None, stop=stop),
            policy=PolicyConfig(policy="base"),
        )
        for i, ((t, n, stop), prompt) in enumerate(
            zip(table, ["the cat sat on", "a b c", "once", "the sea", "x"], strict=True))
    ]


@pytest.mark.parametrize("run_ahead", [0, 3, 8])
def test_pipelining_changes_no_token_event_or_counter(workers, run_ahead):
    limits = tokens_only(run_ahead)
    waiting = streamed(workers, base_requests(), Limits(run_ahead=run_ahead, run_ahead_ms=6e4,
                                                        pipeline=False), parallel=True)
    pipelined = streamed(workers, base_requests(), limits, parallel=True)
    for (events, result), (events_p, result_p) in zip(waiting, pipelined, strict=True):
        assert result_p == result  # text, finish reason, steps, work (a dropped part is not)
        assert_same(events_p, events)  # every event: text, entropy, logprobs
    assert {r["finish_reason"] for _, r in waiting} == {"length", "stop"}
    assert all(w.live() == 0 for w in workers.values())


class Timeline(LocalHandle):
    """An in-process handle that logs when its step calls start and end, beside the tokens
    (`parallel`: taken for a separate process, as a Ray actor is)."""

    def __init__(self, runner, log: list, parallel: bool) -> None:
        super().__init__(runner, parallel=parallel)
        self.log = log

    async def call(self, method: str, *args):
        if method != "step":
            return await super().call(method, *args)
        self.log.append("call")
        try:
            return await super().call(method, *args)
        finally:
            self.log.append("end")


class Tokens:
    def __init__(self, log: list) -> None:
        self.log = log

    def on_token(self, seq, event) -> None:
        self.log.append("token")

    def on_finish(self, seq, result) -> None:
        pass

    def on_actor_call(self, role: str, seconds: float) -> None:
        pass


def timeline(
    workers, limits: Limits, *reqs: GenerationRequest, parallel: bool = True
) -> list[str]:
    log: list = []

    async def main():
        handles = {r: LocalHandle(w, parallel=parallel) for r, w in workers.items()}
        handles["base"] = Timeline(workers["base"], log, parallel)  # the base's calls
        engine = Engine(handles, limits, observer=Tokens(log))
        await engine.start()
        try:
            return await asyncio.gather(*(engine.generate(r) for r in reqs))
        finally:
            await engine.close()

    asyncio.run(main())
    return log


def tokens_before_next_call(log: list[str]) -> list[int]:
    """For each step call that returned and was followed by another, the tokens committed
    in between: 0 when the next call left before the returned steps were committed."""
    counts, since = [], None
    for entry in log:
        if entry == "end":
            since = 0
        elif entry == "token" and since is not None:
            since += 1
        elif entry == "call" and since is not None:
            counts.append(since)
            since = None
    return counts


def test_the_next_call_leaves_before_the_burst_is_committed(workers):
    reqs = [request("base", max_tokens=16)]
    limits = tokens_only(4)  # 1 + 5 + 5 + 5 steps
    assert tokens_before_next_call(timeline(workers, limits, *reqs)) == [0, 0, 0]
    waiting = Limits(run_ahead=4, run_ahead_ms=6e4, pipeline=False)
    assert tokens_before_next_call(timeline(workers, waiting, *reqs)) == [1, 5, 5]
    # in process (one interpreter lock: no `Handle.parallel`) the calls wait for the commits
    assert tokens_before_next_call(timeline(workers, limits, *reqs, parallel=False)) == [1, 5, 5]
    # so do other policies: their next call depends on the choice made
    blendin = [request("blendin", max_tokens=8, tau=1.0)]
    assert 0 not in tokens_before_next_call(timeline(workers, limits, *blendin))


def test_a_request_admitted_during_a_pipelined_call_is_served_beside_it(workers):
    async def main():
        engine = Engine({r: LocalHandle(w, parallel=True) for r, w in workers.items()},
                        tokens_only(2))
        await engine.start()
        try:
            first = asyncio.create_task(engine.generate(request("base", max_tokens=20)))
            await asyncio.sleep(0.05)  # mid-request: its next call is under way
            second = await engine.generate(request("base", max_tokens=6))
            return await first, second
        finally:
            await engine.close()

    first, second = asyncio.run(main())
    (alone_first, alone_second) = run(workers, request("base", max_tokens=20),
                                      request("base", max_tokens=6), limits=tokens_only(2))
    assert (first.text, first.steps) == (alone_first.text, alone_first.steps)
    assert (second.text, second.steps) == (alone_second.text, alone_second.steps)
    assert all(w.live() == 0 for w in workers.values())
