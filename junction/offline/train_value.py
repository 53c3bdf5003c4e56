"""`junction train-value`: training value models.

It drives the same engine as `junction generate`, over in-process runners: it samples
trajectories with any policy, scores them with a reward source and fits the value model.
Evaluation is `junction evaluate` (`junction/offline/evaluate.py`).
"""

# Heavy modules (torch, transformers, the engine) are imported inside the functions that use
# them: `junction --help` imports this module to list its commands and must stay fast.

from __future__ import annotations

import asyncio
import shlex
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from junction.shared.config import (
    ConfigError,
    ModelSpec,
    PolicyConfig,
    SamplingParams,
    check_config,
    load_config,
)
from junction.shared.sources import check_source

if TYPE_CHECKING:
    from junction.gateway.engine import Engine
    from junction.gateway.sequence import GenerationRequest
    from junction.offline.datasets import Example
    from junction.offline.rewards import RewardSource
    from junction.offline.training import Trajectory
    from junction.shared.types import GenerationResult

CONFIG_HINT = "the config's sections and fields are those of deploy/junction.yaml"


def _requests(
    examples: list[Example], policy: PolicyConfig, sampling: SamplingParams, samples: int = 1
) -> list[GenerationRequest]:
    """One request per (example, sample), each with its own seed: seed, seed + 1, ..."""
    from junction.gateway.sequence import GenerationRequest

    first = sampling.seed or 0
    return [
        GenerationRequest(
            prompt=ex.prompt,
            sampling=replace(
                sampling, seed=first + i * samples + j, stop=list(sampling.stop)
            ),
            policy=policy,
        )
        for i, ex in enumerate(examples)
        for j in range(samples)
    ]


def _scored(
    source: RewardSource, prompts: list[str], texts: list[str], refs: list, desc: str
) -> tuple[list[float], list[list[float]] | list[None]]:
    """Each response's reward and, where the source splits it per token (the implicit
    reward's `score_tokens`), its split over the base's tokens for position targets."""
    from junction.offline.rewards import score_all

    if hasattr(source, "score_tokens"):
        return source.score_tokens(prompts, texts)
    return score_all(source, prompts, texts, refs, desc=desc), [None] * len(texts)


def _rescore(source: RewardSource, trajectories: list[Trajectory], data: Path) -> list[Trajectory]:
    """Sampled responses scored again with another reward (references from the data file)."""
    from junction.offline.datasets import load_split

    by_row = {ex.row: ex.refs for ex in load_split(data, "all")}
    refs = [by_row.get(t.row) for t in trajectories]
    prompts, texts = [t.prompt for t in trajectories], [t.response for t in trajectories]
    rewards, shares = _scored(source, prompts, texts, refs, desc=f"reward ({source.name})")
    return [
        replace(t, reward=r, token_rewards=x)
        for t, r, x in zip(trajectories, rewards, shares, strict=True)
    ]


async def _generate_all(
    engine: Engine, groups: dict[str, list[GenerationRequest]]
) -> dict[str, tuple[list[GenerationResult], float]]:
    """Each group's results and wall seconds, one group after the other."""
    from junction.gateway.best_of import generate_many

    await engine.start()
    try:
        out = {}
        for name, reqs in groups.items():
            start = time.perf_counter()
            results = await generate_many(engine, reqs, progress=name)
            out[name] = (results, time.perf_counter() - start)
        return out
    finally:
        await engine.close()


def _sample_trajectories(
    cfg, examples: list[Example], policy: PolicyConfig, sampling: SamplingParams,
    samples: int, source: RewardSource,
) -> list[Trajectory]:
    from junction.gateway.local import local_engine
    from junction.offline.training import Trajectory

    reqs = _requests(examples, policy, sampling, samples)
    engine = local_engine(cfg, reqs[0].roles)
    results, _ = asyncio.run(_generate_all(engine, {"sampling": reqs}))["sampling"]
    refs = [ex.refs for ex in examples for _ in range(samples)]
    rewards, shares = _scored(
        source, [req.prompt for req in reqs], [res.text for res in results], refs,
        desc=f"reward ({source.name})",
    )
    rows = [ex.row for ex in examples for _ in range(samples)]
    return [
        Trajectory(req.prompt, res.text, r, row, req.sampling.seed or 0, res.finish_reason, x)
        for req, res, r, row, x in zip(reqs, results, rewards, rows, shares, strict=True)
    ]


def _trajectories(
    cached: Path, resume: bool, data: Path, split: str, limit: int | None, sampler: tuple
) -> list[Trajectory]:
    """A split's sampled and scored trajectories, read back from `cached` on --resume."""
    from junction.offline.training import load_trajectories, save_trajectories

    if resume and cached.is_file():
        return load_trajectories(cached)
    cfg, policy, sampling, samples, source = sampler
    examples = _examples(data, split, limit, source)
    sampled = _sample_trajectories(cfg, examples, policy, sampling, samples, source)
    save_trajectories(cached, sampled)
    return sampled


def _examples(data: Path, split: str, limit: int | None, source: RewardSource) -> list[Example]:
    """The split's prompts, checked before any sampling: present, and with references
    when the reward needs them."""
    from junction.offline.datasets import load_split
    from junction.offline.rewards import ReferenceReward

    examples = load_split(data, split, limit)
    if not examples:
        raise ValueError(f"{data}: no prompts in the {split} split")
    if isinstance(source, ReferenceReward) and any(e.refs is None for e in examples):
        raise ValueError(f"{data.name}: the reference reward needs prompts with references "
                         "(TruthfulQA, GSM8K); pass another --reward")
    return examples


def _command_line(ctx: typer.Context) -> str:
    """An equivalent command line: the command and each option not at its default."""
    parts = ["junction", ctx.info_name or ""]
    for param in ctx.command.params:
        value, flag = ctx.params.get(param.name), max(param.opts, key=len)
        default = param.default
        if isinstance(value, tuple | list):
            value, default = list(value), list(default or [])
        if value is None or value == default:
            continue
        if isinstance(value, bool):
            parts.append(flag if value else param.secondary_opts[0])
        elif isinstance(value, list):
            parts += [item for v in value for item in (flag, str(v))]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _override(spec: ModelSpec, source: str | None, device: str | None) -> ModelSpec:
    """A role's spec with the command line's source and device, where given."""
    changes = {"source": source, "device": device}
    return replace(spec, **{k: v for k, v in changes.items() if v is not None})


def user_error(exc: Exception) -> typer.Exit:
    """A user's mistake (bad config, bad model source, bad option) as one line and a hint on
    stderr, and exit status 2; no traceback."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    typer.echo(f"error: {message}", err=True)
    hint = CONFIG_HINT if isinstance(exc, ConfigError) else getattr(exc, "hint", None)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    return typer.Exit(2)


def train_value(
    ctx: typer.Context,
    data: Path = typer.Option(..., "--data", help="Prompts: TruthfulQA CSV, GSM8K jsonl, "
                              "XSTest/AdvBench CSV, jsonl with 'prompt', or one per line."),
    out: Path = typer.Option(..., "--out", help="Directory for the value model."),
    split: str = typer.Option("train", help="Rows: train (even), eval (odd) or all."),
    limit: int | None = typer.Option(None, min=1, help="Use the first N prompts of the split "
                                     "(and of --val-split)."),
    reward: str = typer.Option("reference", help="Reward source: reference (TruthfulQA "
                               "ROUGE-L), implicit (the guidance model's implicit reward), "
                               "marker:TEXT, marker-rate:TEXT, or a reward model."),
    val_split: str | None = typer.Option(None, "--val-split", help="Validate on responses "
                                         "sampled from this split of --data (e.g. eval) "
                                         "instead of holding out --val-fraction of prompts."),
    trajectories: Path | None = typer.Option(None, "--trajectories", help="Score these "
                                             "sampled responses (a trajectories.jsonl) with "
                                             "--reward instead of sampling new ones."),
    samples: int = typer.Option(1, min=1, help="Responses sampled per prompt."),
    policy: str = typer.Option("base", help="Policy that samples the responses."),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1),
    temperature: float = typer.Option(1.0, min=0.0),
    top_p: float = typer.Option(0.95, "--top-p"),
    stop: list[str] = typer.Option(["\n"], "--stop", help="Stop string (repeatable; "
                                   "default a newline, '' for none)."),
    epochs: int = typer.Option(3, min=1),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    lr: float = typer.Option(1e-4, help="Learning rate of the LoRA weights."),
    head_lr: float = typer.Option(3e-5, "--head-lr", help="Learning rate of the value head "
                                  "(small: Gemma 3's final hidden states have norms near 100)."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay", min=0.0),
    head_init: str = typer.Option("zero", "--head-init", help="Start the value head as the "
                                  "constant predictor (zero) or as the ridge fit of the "
                                  "frozen backbone's features (ridge)."),
    ridge: float = typer.Option(3.0, "--ridge", help="Ridge penalty of --head-init ridge, "
                                "relative to the features' mean variance."),
    position_weight: float = typer.Option(1.0, "--position-weight", min=0.0, help="Weight of "
                                          "the per-position loss on rewards split per token "
                                          "(implicit); 0: SIA's trajectory loss alone."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Share of prompts held out."),
    seed: int = typer.Option(0),
    lora_r: int = typer.Option(16, "--lora-r", min=1),
    lora_alpha: int = typer.Option(32, "--lora-alpha", min=1),
    lora_dropout: float = typer.Option(0.1, "--lora-dropout"),
    adapter_dtype: str = typer.Option("float32", "--adapter-dtype",
                                      help="Store the adapter as float32 or float16."),
    device: str | None = typer.Option(None, help="auto, cpu, cuda, cuda:1, ... (default: "
                                      "the config's base device, else auto)."),
    base: str | None = typer.Option(None, "--base", help="Backbone (and sampler): HF id or path."),
    value: str | None = typer.Option(None, "--value", help="Value adapter for a sia/dense "
                                     "sampling policy."),
    config: str | None = typer.Option(None, "--config", help="YAML config file."),
    resume: bool = typer.Option(False, "--resume", help="Reuse the sampled trajectories and "
                                "the last epoch checkpoint in --out."),
) -> None:
    """Train a value model: sample responses, score them, distil the rewards (SIA's loss)."""
    try:
        if adapter_dtype not in ("float32", "float16"):
            raise ValueError("adapter-dtype must be float32 or float16")
        cfg = load_config(config)
        cfg.base = _override(cfg.base, base, device)
        cfg.value = _override(cfg.value or ModelSpec(), value, device)  # a sia/dense sampler's
        cfg = check_config(cfg)  # the command line's device and sources, checked as the file's
        if base is not None:
            check_source("base", base)
        import torch

        from junction.offline.rewards import reward_from_spec
        from junction.offline.training import (
            CHECKPOINT_FILE,
            TRAJECTORY_FILE,
            VAL_TRAJECTORY_FILE,
            TrainSettings,
            constant_loss,
            encode,
            fit,
            load_trajectories,
            save_trajectories,
            split_by_prompt,
            store_adapter_as,
        )
        from junction.shared.models import load_model, resolve_device
        from junction.shared.value_model import LoraSettings, build_value_model, save_value_model

        settings = TrainSettings(
            epochs, batch_size, lr, head_lr, weight_decay, 1.0, val_fraction, seed,
            head_init, ridge, position_weight,
        )
        lora = LoraSettings(lora_r, lora_alpha, lora_dropout)
        source = reward_from_spec(reward, str(resolve_device(cfg.base.device)),
                                  base=cfg.base, guidance=cfg.guidance)
        out.mkdir(parents=True, exist_ok=True)
        sampling = SamplingParams(max_tokens, temperature, top_p, seed, [s for s in stop if s])
        sampler = (cfg, PolicyConfig(policy=policy), sampling, samples, source)
        if trajectories is not None:
            sampled = _rescore(source, load_trajectories(trajectories), data)
            save_trajectories(out / TRAJECTORY_FILE, sampled)
        else:
            sampled = _trajectories(out / TRAJECTORY_FILE, resume, data, split, limit, sampler)
        held = None
        if val_split is not None:
            held = _trajectories(out / VAL_TRAJECTORY_FILE, resume, data, val_split, limit,
                                 sampler)
        loaded = load_model("value", cfg.base)
        vm = build_value_model(loaded.model, lora, seed=seed)
        encoded = [encode(loaded.tokenizer, t, loaded.max_context) for t in sampled]
        if held is None:
            train, val = split_by_prompt(
                encoded, [t.prompt for t in sampled], val_fraction, seed
            )
        else:
            train = encoded
            val = [encode(loaded.tokenizer, t, loaded.max_context) for t in held]
        history = fit(vm, train, val, settings, checkpoint_dir=out, resume=resume)
    except (ValueError, FileNotFoundError) as exc:
        raise user_error(exc) from None
    train_rewards = [e.reward for e in train]
    losses = {
        "history": history,
        "val_loss": history[-1]["val_loss"],
        "constant_val_loss": constant_loss(train_rewards, [e.reward for e in val]),
        "train_mean_reward": sum(train_rewards) / len(train_rewards),
    }
    meta = {
        "backbone": cfg.base.source,
        "command": _command_line(ctx),
        "data": {"file": data.name, "split": split, "limit": limit, "samples": samples,
                 "val_split": val_split, "prompts": len({t.prompt for t in sampled}),
                 "trajectories": len(sampled), "train": len(train), "val": len(val)},
        "reward": source.name,
        "sampling": {"policy": policy, "max_tokens": max_tokens, "temperature": temperature,
                     "top_p": top_p, "stop": list(stop)},
        "training": {**asdict(settings), "adapter_dtype": adapter_dtype},
        "seed": seed,
        "losses": losses,
    }
    save_value_model(vm, out, meta)
    if adapter_dtype == "float16":
        store_adapter_as(out, torch.float16)
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)  # finished: nothing left to resume
    typer.echo(
        f"validation loss {losses['val_loss']:.4f} vs constant predictor "
        f"{losses['constant_val_loss']:.4f} ({len(val)} held-out trajectories); saved to {out}",
        err=True,
    )

