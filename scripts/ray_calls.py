"""One Ray actor round trip, as the gateway makes it, against a Ray Compiled Graph.

    python scripts/ray_calls.py --streams 1 --calls 300

The actor echoes a reply the size of a base step for `--streams` requests (top-10 summaries);
each side makes `--calls` calls from asyncio, one after another, and prints the median and
the 10th and 90th percentiles (the first 20 calls are warm-up). The measure behind choosing
run-ahead over Compiled Graphs (`gateway/run_ahead.py`, BENCHMARKS.md).
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

from shared.types import Candidates, StepResult  # noqa: E402


def reply(streams: int, k: int = 10) -> list[StepResult]:
    top = Candidates(list(range(k)), ["word"] * k, [-1.0] * k, 1.0, 0.1)
    return [StepResult(f"{n:032x}", top, 1, "word", False, 1) for n in range(streams)]


@ray.remote(num_cpus=1)
class Echo:
    def step(self, reqs: list) -> list:
        return reqs


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
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False)
    x = reply(args.streams)
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
    ray.shutdown()


if __name__ == "__main__":
    main()
