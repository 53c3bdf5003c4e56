"""Side-by-side speed ratios, measured in one run on the same model and prompts.

    python scripts/benchmark.py --suite core --runs 3 --tokens 32

Suites (each prints ratios, mean, min–max and median over the runs, measured interleaved):
  core   Junction's in-process base-only loop ÷ transformers `generate` (single stream, greedy),
         and batch-of-8 aggregate throughput ÷ single stream.
  serve  gateway + Ray actors, single stream ÷ the in-process loop; 8 concurrent streaming
         clients ÷ one client (aggregate tokens/s).
  sia    SIA at target_ratio 0.2 ÷ dense: wall time and value-model work.
  overhead  the loop's own cost per tick on the tiny random models of tests/tiny.py (their
         forward takes well under a millisecond): in process `base` and `blendin` at 1 and
         16 streams, and `junction serve` + Ray + SSE clients for `base`; prints the ratios
         of issue 10's goals (`--tokens` is the request length; 64 in BENCHMARKS.md) and
         the CPU each part of the served path takes per tick (gateway, base actor, the rest
         of Ray, the SSE clients) against the in-process loop's; in process, what the
         workers' calls alone take per tick, and so the floor under `blendin` ÷ `base`.
  overlap  served `blendin` on the same tiny models with the guidance's step overlapped
         with the base's (the default) ÷ one after the other (`limits.overlap_guidance`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from junction.gateway.engine import Engine  # noqa: E402
from junction.gateway.sequence import GenerationRequest  # noqa: E402
from junction.services.handles import LocalHandle  # noqa: E402
from junction.services.lm_runner import LMRunner  # noqa: E402
from junction.shared.config import Limits, ModelSpec, PolicyConfig, SamplingParams  # noqa: E402
from junction.shared.models import load_model  # noqa: E402
from junction.shared.prompts import build_prompt_ids  # noqa: E402

PROMPTS = [
    "The history of the printing press begins",
    "Photosynthesis is the process by which",
    "A good way to learn a new language is",
    "The main causes of the French Revolution were",
    "To make a simple tomato sauce, you",
    "The tallest mountains in the world are",
    "In computer science, a hash table is",
    "The rules of chess say that a pawn",
]


def summarize(name: str, values: list[float], goal: float | None = None) -> dict:
    row = {
        "metric": name,
        "mean": statistics.fmean(values),
        # On a shared 2-core machine one repetition in a few can run 1.5-2x slower than the
        # rest: the median says what a typical repetition measured.
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
    }
    if goal is not None:
        row["goal"] = goal
    return row


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (Linux), else the platform's."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the ratios depend on besides the code: the batch-of-8 ratio moves with the CPU's
    vector width (torch's kernels: AVX2 or AVX-512) and with any other load on the cores."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "simd": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        goal = f"  (goal ≥ {r['goal']})" if "goal" in r else ""
        print(
            f"{r['metric']:<58} {r['mean']:8.3f}  [{r['min']:.3f} – {r['max']:.3f}]"
            f"  median {r['median']:.3f}  n={r['runs']}{goal}"
        )


# ----------------------------------------------------------------------------- core
def hf_generate_tps(loaded, prompts: list[str], tokens: int) -> float:
    """transformers' own greedy generate, one prompt at a time."""
    model, total, elapsed = loaded.model, 0, 0.0
    for prompt in prompts:
        ids = torch.tensor([build_prompt_ids(loaded.tokenizer, prompt=prompt, chat=False)])
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
            )
        elapsed += time.perf_counter() - start
        total += out.shape[1] - ids.shape[1]
    return total / elapsed


def base_request(prompt: str, tokens: int, policy: str = "base", **options) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt,
        sampling=SamplingParams(max_tokens=tokens, seed=0),
        policy=PolicyConfig(policy=policy, **options),
    )


async def engine_tps(engine: Engine, prompts: list[str], tokens: int, concurrent: bool) -> float:
    """Junction's loop: prompts one after another, or all at once (continuous batching)."""
    reqs = [base_request(p, tokens) for p in prompts]
    start = time.perf_counter()
    if concurrent:
        results = await asyncio.gather(*(engine.generate(r) for r in reqs))
    else:
        results = [await engine.generate(r) for r in reqs]
    elapsed = time.perf_counter() - start
    return sum(r.completion_tokens for r in results) / elapsed


def core_suite(runs: int, tokens: int) -> list[dict]:
    loaded = load_model("base", ModelSpec())
    runner = LMRunner(loaded, "base", chat=False)
    vs_hf, batch8 = [], []

    async def one_run() -> tuple[float, float, float]:
        engine = Engine({"base": LocalHandle(runner)}, Limits(max_concurrency=64))
        await engine.start()
        try:
            single = await engine_tps(engine, PROMPTS[:4], tokens, concurrent=False)
            batched = await engine_tps(engine, PROMPTS[:8], tokens, concurrent=True)
        finally:
            await engine.close()
        return single, batched, hf_generate_tps(loaded, PROMPTS[:4], tokens)

    hf_generate_tps(loaded, PROMPTS[:1], 4)  # warm-up
    for i in range(runs):
        single, batched, hf = asyncio.run(one_run())
        print(f"  run {i + 1}: junction {single:.1f} tok/s, transformers {hf:.1f} tok/s, "
              f"batch-8 {batched:.1f} tok/s", file=sys.stderr)
        vs_hf.append(single / hf)
        batch8.append(batched / single)
    return [
        summarize("core: junction base loop ÷ transformers generate", vs_hf, 1.0),
        summarize("core: batch-of-8 throughput ÷ single stream", batch8, 3.0),
    ]


# ----------------------------------------------------------------------------- serve
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Gateway:
    """`junction serve` in a subprocess (real uvicorn, real Ray actors), base model only."""

    def __init__(self, workdir: Path, config_text: str | None = None) -> None:
        import subprocess

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "bench.yaml"
        config.write_text(config_text or "value: null\nlimits: {max_concurrency: 64}\n")
        self.log = open(workdir / "gateway.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "junction.cli", "serve", "--port", str(self.port),
             "--config", str(config)],
            stdout=self.log, stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
        )

    def wait_ready(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the gateway exited; see gateway.log")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError("the gateway did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except Exception:
            self.proc.kill()
        self.log.close()


async def stream_summary(
    client, url: str, prompt: str, tokens: int, policy: str = "base"
) -> dict:
    """One streaming client: POST /v1/generate_stream, read events until the summary."""
    body = {"prompt": prompt, "max_tokens": tokens, "policy": policy, "temperature": 0}
    summary: dict = {}
    async with client.stream("POST", f"{url}/v1/generate_stream", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data:") and '"usage"' in line:
                summary = json.loads(line[5:])
    return summary


async def stream_one(client, url: str, prompt: str, tokens: int) -> int:
    summary = await stream_summary(client, url, prompt, tokens)
    return summary["usage"]["completion_tokens"]


async def clients_tps(url: str, prompts: list[str], tokens: int, concurrent: bool) -> float:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        if concurrent:
            counts = await asyncio.gather(*(stream_one(client, url, p, tokens) for p in prompts))
        else:
            counts = [await stream_one(client, url, p, tokens) for p in prompts]
        return sum(counts) / (time.perf_counter() - start)


def serve_suite(runs: int, tokens: int) -> list[dict]:
    import tempfile

    loaded = load_model("base", ModelSpec())
    runner = LMRunner(loaded, "base", chat=False)
    gateway = Gateway(Path(tempfile.mkdtemp(prefix="junction-bench-")))
    vs_local, concurrency = [], []
    try:
        gateway.wait_ready()
        asyncio.run(clients_tps(gateway.url, PROMPTS[:1], 4, concurrent=False))  # warm-up

        async def local() -> float:
            engine = Engine({"base": LocalHandle(runner)}, Limits(max_concurrency=64))
            await engine.start()
            try:
                return await engine_tps(engine, PROMPTS[:4], tokens, concurrent=False)
            finally:
                await engine.close()

        for i in range(runs):
            in_process = asyncio.run(local())
            single = asyncio.run(clients_tps(gateway.url, PROMPTS[:4], tokens, concurrent=False))
            eight = asyncio.run(clients_tps(gateway.url, PROMPTS[:8], tokens, concurrent=True))
            print(f"  run {i + 1}: in-process {in_process:.1f} tok/s, gateway {single:.1f} "
                  f"tok/s, 8 clients {eight:.1f} tok/s", file=sys.stderr)
            vs_local.append(single / in_process)
            concurrency.append(eight / single)
    finally:
        gateway.stop()
    return [
        summarize("serve: gateway+Ray single stream ÷ in-process loop", vs_local, 0.9),
        summarize("serve: 8 concurrent streaming clients ÷ one client", concurrency, 3.0),
    ]


# ----------------------------------------------------------------------------- sia
def sia_suite(runs: int, tokens: int) -> list[dict]:
    """SIA at target_ratio 0.2 against dense (a value call at every step), same prompts."""
    from junction.services.value_runner import ValueRunner

    runner = LMRunner(load_model("base", ModelSpec()), "base", chat=False)
    value = ValueRunner.from_paths(ModelSpec(), None)  # the shipped default value model
    wall, work, rates = [], [], []

    async def timed(policy: str, **options) -> tuple[float, int, float]:
        engine = Engine({"base": LocalHandle(runner), "value": LocalHandle(value)})
        await engine.start()
        try:
            start = time.perf_counter()
            results = [
                await engine.generate(base_request(p, tokens, policy, **options))
                for p in PROMPTS[:4]
            ]
            elapsed = time.perf_counter() - start
        finally:
            await engine.close()
        steps = sum(r.steps for r in results)
        return elapsed, sum(r.work["value_tokens"] for r in results), sum(
            r.interventions for r in results
        ) / steps

    for i in range(runs):
        sparse = asyncio.run(timed("sia", target_ratio=0.2))
        dense = asyncio.run(timed("dense"))
        print(f"  run {i + 1}: sia@0.2 {sparse[0]:.1f}s ({sparse[2]:.0%} junctions, "
              f"{sparse[1]} value tokens), dense {dense[0]:.1f}s ({dense[1]} value tokens)",
              file=sys.stderr)
        wall.append(sparse[0] / dense[0])
        work.append(sparse[1] / dense[1])
        rates.append(sparse[2])
    return [
        summarize("sia: wall time, sia@target_ratio 0.2 ÷ dense", wall),
        summarize("sia: value-model tokens, sia@0.2 ÷ dense", work),
        summarize("sia: intervention rate at target_ratio 0.2", rates),
    ]


# ----------------------------------------------------------------------------- overhead
OVERHEAD_STREAMS = (1, 16)


def tiny_models(workdir: Path) -> tuple[Path, Path]:
    """The tests' tiny pair, saved: a Gemma 3 base (Metaspace, byte fallback) and a Llama
    guidance (byte-level BPE), so BlendIn crosses tokenizers as the embedded pair does."""
    from tests.tiny import tiny_pair

    base = tiny_pair("gemma3", "sentencepiece", workdir / "tiny_base")
    guidance = tiny_pair("llama", "bytelevel", workdir / "tiny_guidance")
    return base.path, guidance.path


def tiny_config(base_path: Path, guidance_path: Path, limits: str = "") -> str:
    """`junction serve`'s config for the tiny pair: one torch thread per worker, no value."""
    extra = f", {limits}" if limits else ""
    return (
        f"base: {{source: '{base_path}', device: cpu, threads: 1}}\n"
        f"guidance: {{source: '{guidance_path}', device: cpu, threads: 1}}\n"
        f"value: null\nlimits: {{max_concurrency: 64{extra}}}\n"
    )


def tiny_spec(path: Path) -> ModelSpec:
    return ModelSpec(source=str(path), device="cpu", threads=1)


async def engine_ms_per_tick(engine: Engine, streams: int, tokens: int, policy: str) -> float:
    """Wall time ÷ decode steps of the longest request, `streams` requests admitted at once."""
    ms, ticks, _ = await engine_run(engine, streams, tokens, policy)
    return ms / ticks


async def engine_run(
    engine: Engine, streams: int, tokens: int, policy: str
) -> tuple[float, int, float]:
    """`streams` requests admitted at once: (wall ms, decode steps of the longest request,
    CPU seconds of this whole process meanwhile: the loop and the runners' threads)."""
    reqs = [base_request(PROMPTS[n % len(PROMPTS)], tokens, policy) for n in range(streams)]
    start, cpu = time.perf_counter(), time.process_time()
    results = await asyncio.gather(*(engine.generate(r) for r in reqs))
    cpu, elapsed = time.process_time() - cpu, time.perf_counter() - start
    return 1000 * elapsed, max(r.steps for r in results), cpu


async def serve_ms_per_tick(url: str, streams: int, tokens: int, policy: str = "base") -> float:
    ms, ticks = await serve_run(url, streams, tokens, policy)
    return ms / ticks


async def serve_run(url: str, streams: int, tokens: int, policy: str = "base") -> tuple[float, int]:
    """`streams` SSE clients at once: (wall ms, decode steps of the longest request)."""
    import httpx

    prompts = [PROMPTS[n % len(PROMPTS)] for n in range(streams)]
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        summaries = await asyncio.gather(
            *(stream_summary(client, url, p, tokens, policy) for p in prompts))
        elapsed = time.perf_counter() - start
    return 1000 * elapsed, max(s["junction"]["steps"] for s in summaries)


CPU_PARTS = ("gateway", "base actor", "ray", "clients")


def served_cpu_seconds(gateway_pid: int) -> dict[str, float]:
    """CPU seconds used so far by each part of the served path (`CPU_PARTS`): the gateway
    process, the base model's actor, the rest of the gateway's local Ray (its GCS, raylet,
    other workers) and this process, which runs the SSE clients. Each read is a snapshot;
    a difference of two snapshots is what a run took. A process that ended is left out."""
    import psutil

    parts = dict.fromkeys(CPU_PARTS, 0.0)
    root = psutil.Process(gateway_pid)
    for proc in (root, *root.children(recursive=True)):
        try:
            times, title = proc.cpu_times(), " ".join(proc.cmdline())
        except psutil.Error:
            continue
        part = ("gateway" if proc.pid == gateway_pid
                else "base actor" if title.startswith("ray::BaseWorker") else "ray")
        parts[part] += times.user + times.system
    own = psutil.Process().cpu_times()
    parts["clients"] = own.user + own.system
    return parts


class TimedRunner:
    """A runner whose calls count the seconds they take (on the runner's own thread): what
    the workers cost a tick in process, apart from the loop's own work."""

    def __init__(self, runner: LMRunner) -> None:
        self.runner, self.seconds = runner, 0.0

    def __getattr__(self, name: str) -> Callable:
        method = getattr(self.runner, name)

        def timed(*args):
            start = time.perf_counter()
            try:
                return method(*args)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def overhead_suite(runs: int, tokens: int) -> list[dict]:
    """Issue 10: ms per tick of the loop itself; each repetition interleaves every side."""
    import tempfile

    # One torch thread, as the served workers get (`threads: 1` below): a model this small
    # gains nothing from a second one, and on a shared machine an idle OpenMP team spinning
    # against busy cores would be measured instead of the loop.
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="junction-overhead-"))
    base_path, guidance_path = tiny_models(workdir)
    timed = {
        "base": TimedRunner(LMRunner(load_model("base", tiny_spec(base_path), progress=False),
                                     "base", chat=False)),
        "guidance": TimedRunner(LMRunner(
            load_model("guidance", tiny_spec(guidance_path), progress=False),
            "guidance", chat=True)),
    }
    runners = {role: LocalHandle(runner) for role, runner in timed.items()}
    gateway = Gateway(workdir, tiny_config(base_path, guidance_path))
    sides = [(p, n) for p in ("base", "blendin") for n in OVERHEAD_STREAMS]
    times: dict[tuple[str, int], list[float]] = {key: [] for key in sides}
    times |= {("serve", n): [] for n in OVERHEAD_STREAMS}
    # CPU ms per tick, to say where a served tick's time goes on a machine this small: the
    # in-process loop (one process) against each part of the served path (`CPU_PARTS`).
    cpu: dict[tuple[str, int], list[float]] = {
        (part, n): [] for part in ("in process", *CPU_PARTS) for n in OVERHEAD_STREAMS
    }

    # In process, the ms per tick the workers' calls took (both roles), the rest being the
    # loop's own work: for `blendin` the floor under its tick while the two models' calls
    # run one after the other (in-process runners share one interpreter lock).
    workers_ms: dict[tuple[str, int], list[float]] = {key: [] for key in sides}

    async def in_process(policy: str, streams: int) -> float:
        engine = Engine(runners, Limits(max_concurrency=64))
        await engine.start()
        for runner in timed.values():
            runner.seconds = 0.0
        try:
            ms, ticks, seconds = await engine_run(engine, streams, tokens, policy)
        finally:
            await engine.close()
        if policy == "base":
            cpu["in process", streams].append(1000 * seconds / ticks)
        workers_ms[policy, streams].append(1000 * sum(r.seconds for r in timed.values()) / ticks)
        return ms / ticks

    def served(streams: int) -> float:
        before = served_cpu_seconds(gateway.proc.pid)
        ms, ticks = asyncio.run(serve_run(gateway.url, streams, tokens))
        after = served_cpu_seconds(gateway.proc.pid)
        for part in CPU_PARTS:
            cpu[part, streams].append(1000 * (after[part] - before[part]) / ticks)
        return ms / ticks

    try:
        gateway.wait_ready()
        for policy, streams in sides:  # warm-up: first calls, caches, Ray actors
            asyncio.run(in_process(policy, streams))
        for streams in OVERHEAD_STREAMS:
            asyncio.run(serve_ms_per_tick(gateway.url, streams, tokens))
        for values in (*cpu.values(), *workers_ms.values()):
            values.clear()
        for i in range(runs):
            for policy, streams in sides:
                times[policy, streams].append(asyncio.run(in_process(policy, streams)))
            for streams in OVERHEAD_STREAMS:
                times["serve", streams].append(served(streams))
            print(f"  run {i + 1}: " + ", ".join(
                f"{p}@{n} {t[-1]:.2f} ms/tick" for (p, n), t in times.items()), file=sys.stderr)
    finally:
        gateway.stop()
    names = {"base": "in process, base", "blendin": "in process, blendin",
             "serve": "serve+Ray, base"}
    rows = [summarize(f"overhead: {names[p]}, {n} streams, ms/tick", t)
            for (p, n), t in times.items()]
    rows += [summarize(f"overhead: {names[p]}, {n} streams, the workers' calls, ms/tick", t)
             for (p, n), t in workers_ms.items()]
    for n in OVERHEAD_STREAMS:
        served_total = [sum(parts) for parts in zip(*(cpu[p, n] for p in CPU_PARTS), strict=True)]
        label = f"overhead: CPU ms/tick, base, {n} streams"
        rows += [
            summarize(f"{label}, in process", cpu["in process", n]),
            *(summarize(f"{label}, served: {part}", cpu[part, n]) for part in CPU_PARTS),
            summarize(f"{label}, served: all", served_total),
            # How many cores the served path keeps busy: all its CPU ÷ its wall time.
            summarize(f"overhead: served base, {n} streams, busy cores",
                      [c / t for c, t in zip(served_total, times["serve", n], strict=True)]),
        ]

    def ratio(a: tuple[str, int], b: tuple[str, int]) -> list[float]:
        return [x / y for x, y in zip(times[a], times[b], strict=True)]

    return rows + [
        summarize("overhead: blendin ÷ base, 16 streams, in process (goal ≤ 2)",
                  ratio(("blendin", 16), ("base", 16))),
        # The floor under that ratio in process: blendin's two workers' calls alone (no
        # junction test, blend or commit) ÷ the whole base tick.
        summarize("overhead: blendin's workers' calls alone ÷ base tick, 16 streams",
                  [w / t for w, t in zip(workers_ms["blendin", 16], times["base", 16],
                                         strict=True)]),
        summarize("overhead: serve+Ray ÷ in process, base, 1 stream (goal ≤ 1.5)",
                  ratio(("serve", 1), ("base", 1))),
        summarize("overhead: serve+Ray ÷ in process, base, 16 streams (goal ≤ 1.3)",
                  ratio(("serve", 16), ("base", 16))),
    ]


def overlap_suite(runs: int, tokens: int) -> list[dict]:
    """Served `blendin` with its guidance overlapped (`limits.overlap_guidance`, the default)
    ÷ the guidance stepping after the base, tiny models (every step a junction: a random
    base is never confident), Ray actors, SSE clients. Each repetition starts each gateway
    in turn (one Ray cluster at a time)."""
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="junction-overlap-"))
    base_path, guidance_path = tiny_models(workdir)
    times: dict[tuple[bool, int], list[float]] = {
        (on, n): [] for on in (True, False) for n in OVERHEAD_STREAMS
    }
    for i in range(runs):
        for on in (True, False):
            config = tiny_config(base_path, guidance_path, f"overlap_guidance: {str(on).lower()}")
            gateway = Gateway(Path(tempfile.mkdtemp(dir=workdir)), config)
            try:
                gateway.wait_ready()
                for streams in OVERHEAD_STREAMS:  # warm-up: first calls, caches
                    asyncio.run(serve_ms_per_tick(gateway.url, streams, tokens, "blendin"))
                for streams in OVERHEAD_STREAMS:
                    times[on, streams].append(
                        asyncio.run(serve_ms_per_tick(gateway.url, streams, tokens, "blendin")))
            finally:
                gateway.stop()
        print(f"  run {i + 1}: " + ", ".join(
            f"{'overlapped' if on else 'in turn'}@{n} {t[-1]:.2f} ms/tick"
            for (on, n), t in times.items()), file=sys.stderr)
    rows = [summarize(f"overlap: serve+Ray, blendin, {'overlapped' if on else 'in turn'}, "
                      f"{n} streams, ms/tick", t) for (on, n), t in times.items()]
    return rows + [
        summarize(f"overlap: blendin overlapped ÷ in turn, {n} streams",
                  [a / b for a, b in zip(times[True, n], times[False, n], strict=True)])
        for n in OVERHEAD_STREAMS
    ]


SUITES: dict[str, Callable[[int, int], list[dict]]] = {
    "core": core_suite,
    "serve": serve_suite,
    "sia": sia_suite,
    "overhead": overhead_suite,
    "overlap": overlap_suite,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    names = list(SUITES) if args.suite == "all" else [args.suite]
    host = machine()
    print(f"machine: {json.dumps(host)}", file=sys.stderr)
    rows = []
    for name in names:
        print(f"== {name} (runs={args.runs}, tokens={args.tokens})", file=sys.stderr)
        rows += SUITES[name](args.runs, args.tokens)
    print_rows(rows)
    after = machine()["load_average"]
    print(f"machine: {host['cpu']}, {host['cores']} cores, {host['simd']}, torch {host['torch']};"
          f" load average {host['load_average'][0]} before, {after[0]} after")
    if args.json:
        args.json.write_text(json.dumps({"machine": host, "load_after": after, "rows": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
