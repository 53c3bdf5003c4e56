"""Overlapped guidance (`Engine._overlapped`): right after a confidence junction BlendIn's
guidance steps in the same round as the base, and every request comes out as before."""

from __future__ import annotations

import asyncio

import pytest

from junction.gateway.engine import Engine
from junction.services.handles import LocalHandle
from junction.services.protocol import name_of
from junction.shared.config import Limits
from tests.gateway import test_engine
from tests.gateway.test_engine import request, run
from tests.gateway.test_run_ahead import assert_same, midpoints, mixed_requests, streamed

workers = test_engine.workers  # the same fixture: a tiny Gemma base, a tiny Llama guidance


def without_guidance_work(result: dict) -> tuple[dict, int]:
    """A result and its guidance work apart: an early step nobody used still counts."""
    junction = dict(result["junction"])
    work = dict(junction.pop("work"))
    guided = work.pop("guidance_tokens")
    return {**result, "junction": {**junction, "work": work}}, guided


@pytest.mark.parametrize("run_ahead", [0, 8])
def test_overlapping_changes_no_token_event_or_counter(workers, run_ahead):
    tau, threshold = midpoints(workers)
    limits = Limits(run_ahead=run_ahead)
    apart = streamed(workers, mixed_requests(tau, threshold), limits, parallel=False)
    together = streamed(workers, mixed_requests(tau, threshold), limits, parallel=True)
    early = 0
    for (events, result), (events_together, result_together) in zip(apart, together,
                                                                    strict=True):
        assert_same(events_together, events)  # every event: text, source, kind, α, logprobs
        kept, guided = without_guidance_work(result)
        kept_together, guided_together = without_guidance_work(result_together)
        assert kept_together == kept
        assert guided_together >= guided  # early steps a junction did not follow: counted
        early += guided_together - guided
    blendin = apart[2][1]["junction"]
    assert 0 < blendin["interventions"] < blendin["steps"]  # junctions, and steps without
    assert early > 0  # some early steps went unused, and their work shows


class TracingHandle(LocalHandle):
    """An in-process handle that logs when each call starts and ends."""

    def __init__(self, role: str, runner, log: list, parallel: bool) -> None:
        super().__init__(runner, parallel=parallel)
        self.role, self.log = role, log

    def call(self, method, *args):
        name = name_of(method)
        self.log.append(("start", self.role, name))  # a handle sends its call at once
        return self._ended(name, super().call(method, *args))

    async def _ended(self, method: str, answer):
        try:
            return await answer
        finally:
            self.log.append(("end", self.role, method))


def traced(workers, limits: Limits, parallel: bool, **options) -> tuple[list, object]:
    log: list = []

    async def main():
        handles = {r: TracingHandle(r, w, log, parallel) for r, w in workers.items()}
        engine = Engine(handles, limits)
        await engine.start()
        try:
            return await engine.generate(request("blendin", max_tokens=10, **options))
        finally:
            await engine.close()

    return log, asyncio.run(main())


def guidance_steps_during_base_steps(log: list) -> tuple[int, int]:
    """(guidance steps started while a base step was in flight, all guidance steps)."""
    base_busy, during, total = False, 0, 0
    for edge, role, method in log:
        if method != "step":
            continue
        if role == "base":
            base_busy = edge == "start"
        elif edge == "start":
            total += 1
            during += base_busy
    return during, total


def test_the_guidance_steps_with_the_base_right_after_a_confidence_junction(workers):
    # τ = 1: every step is a confidence junction, so every step after the first overlaps.
    log, result = traced(workers, Limits(), parallel=True, tau=1.0)
    assert result.interventions == result.steps == 10
    assert guidance_steps_during_base_steps(log) == (9, 10)
    for parallel, limits in [(False, Limits()), (True, Limits(overlap_guidance=False))]:
        log, alone = traced(workers, limits, parallel=parallel, tau=1.0)
        assert guidance_steps_during_base_steps(log) == (0, 10)  # one after the other
        assert alone.text == result.text
        assert alone.work == result.work  # every early step was used


def test_without_junctions_nothing_is_overlapped(workers):
    (result,) = run(workers, request("blendin", max_tokens=10, tau=0.0), parallel=True)
    assert result.interventions == 0
    assert result.work["guidance_tokens"] == 0
