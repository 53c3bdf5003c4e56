"""One Ray actor round trip, as the gateway makes it, against a Ray Compiled Graph.

    python scripts/ray_calls.py --streams 1 --calls 300 [--ahead 9]

The actor echoes a reply the size of a base step for `--streams` requests (top-10 summaries);
each side makes `--calls` calls from asyncio, one after another, and prints the median and
the 10th and 90th percentiles (the first 20 calls are warm-up). The measure behind choosing
run-ahead over Compiled Graphs (`gateway/run_ahead.py`, BENCHMARKS.md). Then a reply alone, the
way a step call answers: as objects, and as the plain tuples `junction.services.wire` sends
(`--ahead 9`: each request ran ahead eight steps, as `base` does by default).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import ray
from ray.dag import InputNode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from junction.services.wire import pack_results, unpack_results  # noqa: E402
from junction.shared.types import Candidates, StepResult  # noqa: E402


def reply(streams: int, ahead: int = 1, k: int = 10) -> list[StepResult]:
    """A step's answer for `streams` requests, each with `ahead` steps (run-ahead)."""

    def step(n: int) -> StepResult:
        top = Candidates(list(range(k)), [f"w{n}"] * k, [-1.0 - n] * k, 1.0, 0.1)
        return StepResult(f"{n:032x}", top, 1, "word", False, 1)

    out = [step(n) for n in range(streams)]
    for result in out:
        result.earlier = [step(n) for n in range(ahead - 1)]
    return out


@ray.remote(num_cpus=1)
class Echo:
    def __init__(self, answer: list | None = None) -> None:
        self.answer = answer

    def step(self, reqs: list) -> list:
        return reqs

    def objects(self) -> list:
        return self.answer

    def tuples(self) -> list:
        return pack_results(self.answer)


async def timed(call, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        await call()
        times.append(time.perf_counter() - start)
    return times[20:]


def show(name: str, times: list[float]) -> None:
    ms = sorted(1000 * t for t in times)
    print(f"{name:18s} median {statistics.median(ms):.3f} ms  p10 {ms[len(ms) // 10]:.3f}  "
          f"p90 {ms[9 * len(ms) // 10]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--ahead", type=int, default=1,
                        help="steps per request in the reply (a run-ahead call's answer)")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False)
    x = reply(args.streams, args.ahead)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # the compiled graph binds to the loop current at compile
    plain = Echo.remote()
    ray.get(plain.step.remote(x))
    times = loop.run_until_complete(timed(lambda: plain.step.remote(x), args.calls))
    show("actor .remote()", times)
    compiled_actor = Echo.remote()
    ray.get(compiled_actor.step.remote(x))
    with InputNode() as inp:
        dag = compiled_actor.step.bind(inp)
    compiled = dag.experimental_compile(enable_asyncio=True)

    async def compiled_call() -> None:
        await (await compiled.execute_async(x))

    show("compiled graph", loop.run_until_complete(timed(compiled_call, args.calls)))
    compiled.teardown()
    for actor in (plain, compiled_actor):
        ray.kill(actor)  # their CPUs, for the next one
    # The reply alone, as a step call carries it: its objects, or the tuples of
    # `junction.services.wire` (packed in the actor, unpacked here, as RayHandle and the actors do).
    answers = Echo.remote(x)
    ray.get(answers.objects.remote())

    async def as_tuples() -> None:
        unpack_results(await answers.tuples.remote())

    show("reply as objects", loop.run_until_complete(timed(answers.objects.remote, args.calls)))
    show("reply as tuples", loop.run_until_complete(timed(as_tuples, args.calls)))
    ray.shutdown()


if __name__ == "__main__":
    main()
