"""`junction calibrate`: SIA's entropy thresholds per intervention ratio, measured offline.

The base model answers a prompt set (as `junction evaluate` runs it: greedy, a newline ends
an answer); every step's top-k entropy is pooled, and for each ratio r the threshold that a
share r of the steps reaches is saved (`junction.shared.calibration`). By default the file goes into
the value model's directory, where the value worker finds it and `target_ratio` uses it.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from tqdm import tqdm

from junction.shared.config import PolicyConfig, SamplingParams, load_config
from junction.shared.sources import DEFAULT_VALUE_DIR
from junction.shared.types import TokenEvent

if TYPE_CHECKING:  # the engine (torch) is imported when the command runs: --help stays fast
    from junction.gateway.engine import Engine
    from junction.gateway.sequence import GenerationRequest


async def base_entropies(engine: Engine, reqs: list[GenerationRequest]) -> list[list[float]]:
    """Per request, the top-k entropy of each of its steps; run concurrently on `engine`."""
    from junction.gateway.engine import EngineOverloaded

    gate = asyncio.Semaphore(engine.limits.max_concurrency)
    entropies: list[list[float]] = [[] for _ in reqs]
    await engine.start()
    try:
        with tqdm(total=len(reqs), desc="calibrate", unit="prompt", file=sys.stderr) as bar:

            async def one(req: GenerationRequest, mine: list[float]) -> None:
                async with gate:
                    while True:
                        try:
                            seq = await engine.submit(req)
                            break
                        except EngineOverloaded:
                            await asyncio.sleep(0.01)  # a finished request leaves at its tick
                    async for item in engine.stream(seq):
                        if isinstance(item, TokenEvent):
                            mine.append(item.entropy)
                bar.update()

            await asyncio.gather(*(one(r, e) for r, e in zip(reqs, entropies, strict=True)))
    finally:
        await engine.close()
    return entropies


def calibrate_command(
    data: Path = typer.Option(..., "--data", help="Prompts file (TruthfulQA CSV, jsonl, ...)."),
    ratio: list[float] = typer.Option([0.2], "--ratio", help="Intervention ratio (repeatable)."),
    split: str = typer.Option("train", help="Rows: train (even), eval (odd) or all."),
    limit: int | None = typer.Option(None, min=1, help="The first N prompts of the split."),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1),
    k: int = typer.Option(10, min=2, max=1000, help="Top-k width of the entropy (SIA's k)."),
    temperature: float = typer.Option(0.0, min=0.0, help="Base sampling; 0 = greedy."),
    stop: list[str] = typer.Option(["\n"], "--stop", help="Stop string (repeatable; "
                                   "default a newline, '' for none)."),
    seed: int = typer.Option(0, help="Seed of the first prompt (seed + i for prompt i)."),
    base: str | None = typer.Option(None, "--base", help="Base model: HF id or path."),
    value: str | None = typer.Option(None, "--value", help="Value model directory the "
                                     "calibration goes into (default: the config's)."),
    config: str | None = typer.Option(None, "--config", help="YAML config file."),
    out: Path | None = typer.Option(None, "--out", help="File or directory (default: "
                                    "calibration.json in the value model's directory)."),
) -> None:
    """Calibrate SIA's entropy threshold for each ratio from base runs over a prompt set."""
    from junction.gateway.local import local_engine
    from junction.gateway.sequence import GenerationRequest
    from junction.offline.datasets import load_split
    from junction.shared.calibration import calibrate, save_calibration

    try:
        for r in ratio:
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"ratio: {r} is not between 0 and 1")
        cfg = load_config(config)
        if base is not None:
            cfg.base = replace(cfg.base, source=base)
        examples = load_split(data, split, limit)  # type: ignore[arg-type]
        if not examples:
            raise ValueError(f"data: no prompts in the {split} split of {data}")
        stops = [s for s in stop if s]
        reqs = [
            GenerationRequest(
                prompt=ex.prompt,
                sampling=SamplingParams(max_tokens, temperature, 1.0, seed + i, list(stops)),
                policy=PolicyConfig("base", k=k),
            )
            for i, ex in enumerate(examples)
        ]
        engine = local_engine(cfg, ("base",))
        entropies = [h for run in asyncio.run(base_entropies(engine, reqs)) for h in run]
        source = {
            "data": data.name, "split": split, "prompts": len(examples),
            "max_tokens": max_tokens, "temperature": temperature, "stop": stops,
            "command": "junction " + shlex.join(sys.argv[1:]),
        }
        calibration = calibrate(entropies, ratio, engine.infos["base"].name, k, source)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if out is None:
        source_dir = value or (cfg.value.source if cfg.value else "default")
        out = DEFAULT_VALUE_DIR if source_dir == "default" else Path(source_dir)
    path = save_calibration(calibration, out)
    typer.echo("| ratio | entropy threshold H (nats) |\n|---|---|")
    for r, h in sorted(calibration.thresholds.items()):
        typer.echo(f"| {r:g} | {h:.4f} |")
    typer.echo(f"{calibration.steps} base steps over {len(examples)} prompts; saved {path}",
               err=True)
