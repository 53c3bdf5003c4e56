"""Bursts wait, not bounce: requests over the live limit wait in a bounded queue, first come
first served, and are admitted as slots free (`limits.max_queue`, `limits.queue_timeout_s`)."""

from __future__ import annotations

import asyncio

import pytest

from junction.gateway.engine import EngineOverloaded, NullObserver
from junction.shared.config import Limits
from tests.gateway.test_engine import request, started, workers  # noqa: F401 - fixture


class Waits(NullObserver):
    """Each admitted request's wait, and how many requests were live at each step."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.running: list[int] = []
        self.engine = None

    def on_wait(self, seconds: float) -> None:
        self.waits.append(seconds)

    def on_token(self, seq, event) -> None:
        self.running.append(self.engine.running())


def test_a_burst_over_the_limit_waits_and_every_request_completes(workers):  # noqa: F811
    observer = Waits()

    async def main():
        async with started(workers, Limits(max_concurrency=2, max_queue=8)) as engine:
            engine.observer = engine.calls.timer = observer
            observer.engine = engine
            reqs = [request("base", max_tokens=6) for _ in range(7)]
            results = await asyncio.gather(*(engine.generate(r) for r in reqs))
            assert engine.queued == 0 and engine._waiting.reserved == 0
            return results

    results = asyncio.run(main())
    assert [r.finish_reason for r in results] == ["length"] * 7
    assert max(observer.running) == 2  # never more live than the limit
    assert len(observer.waits) == 7
    assert sum(w > 0 for w in observer.waits) >= 5  # at most two started at once
    assert all(w.live() == 0 for w in workers.values())


def test_waiting_requests_are_admitted_first_come_first_served(workers):  # noqa: F811
    async def main():
        async with started(workers, Limits(max_concurrency=1, max_queue=4)) as engine:
            first = await engine.submit(request("base", max_tokens=200))
            order: list[int] = []

            async def wait(n: int):
                seq = await engine.submit(request("base", max_tokens=2))
                order.append(n)
                return [item async for item in engine.stream(seq)][-1]

            waiting = []
            for n in range(3):
                waiting.append(asyncio.create_task(wait(n)))
                await asyncio.sleep(0.05)  # each is queued behind the one before it
            assert engine.queued == 3
            await asyncio.sleep(0.2)
            assert order == [] and engine.queued == 3  # the long one still holds the slot
            engine.cancel(first)
            results = await asyncio.gather(*waiting)
            return order, results

    order, results = asyncio.run(main())
    assert order == [0, 1, 2]
    assert [r.completion_tokens for r in results] == [2, 2, 2]


def test_a_full_queue_refuses_at_once_and_a_long_wait_gives_up(workers):  # noqa: F811
    async def main():
        limits = Limits(max_concurrency=1, max_queue=1, queue_timeout_s=0.3)
        async with started(workers, limits) as engine:
            first = await engine.submit(request("base", max_tokens=400))
            waiter = asyncio.create_task(engine.submit(request("base")))
            await asyncio.sleep(0.05)
            with pytest.raises(EngineOverloaded, match="1 waiting") as full:
                await engine.submit(request("base"))
            with pytest.raises(EngineOverloaded, match="waited 0.3 s") as late:
                await waiter
            assert engine.queued == 0 and engine.running() == 1
            engine.cancel(first)
            return full.value, late.value

    full, late = asyncio.run(main())
    assert full.retry_after >= 1 and late.retry_after >= 1
    assert all(w.live() == 0 for w in workers.values())


def test_a_client_that_leaves_while_waiting_costs_nothing(workers):  # noqa: F811
    async def main():
        async with started(workers, Limits(max_concurrency=1, max_queue=4)) as engine:
            first = await engine.submit(request("base", max_tokens=400))
            leaving = asyncio.create_task(engine.submit(request("blendin")))
            staying = asyncio.create_task(engine.generate(request("base", max_tokens=2)))
            await asyncio.sleep(0.05)
            assert engine.queued == 2
            leaving.cancel()
            await asyncio.gather(leaving, return_exceptions=True)
            assert engine.queued == 1
            # Nothing of the request that left was opened: the guidance worker holds nothing.
            assert workers["guidance"].live() == 0 and workers["base"].live() == 1
            engine.cancel(first)  # the slot goes to the one still waiting
            return await staying

    result = asyncio.run(main())
    assert result.completion_tokens == 2
    assert all(w.live() == 0 for w in workers.values())


def test_a_waiting_request_fails_cleanly_when_the_engine_shuts_down(workers):  # noqa: F811
    async def main():
        async with started(workers, Limits(max_concurrency=1, max_queue=4)) as engine:
            await engine.submit(request("base", max_tokens=400))
            waiter = asyncio.create_task(engine.submit(request("base")))
            await asyncio.sleep(0.05)
        return await asyncio.gather(waiter, return_exceptions=True)

    [outcome] = asyncio.run(main())
    assert isinstance(outcome, RuntimeError) and "shut down" in str(outcome)
    assert all(w.live() == 0 for w in workers.values())
