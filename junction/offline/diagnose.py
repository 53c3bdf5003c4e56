"""`junction diagnose`: BlendIn's pair check, as a gate for a deployment.

    junction diagnose [--data FILE] [--n 100] [--policy blendin] [--url http://host:port]

Runs a base/guidance pair under a guidance policy (BlendIn by default) on N prompts and
measures its intervention rate: junction steps ÷ decode steps over all prompts. BlendIn's
authors found a rate above about 0.2 predicts a failing pair (the base is unsure too often
for light-touch guidance to help), so the verdict is pass at ≤ `--threshold` (0.2) and the
exit status says it: 0 pass, 1 fail, 2 no verdict (bad input, or no answers). It also
shows where in the answer the junctions fall, by relative position (SIA's Figure 5) and by
decode step, as text and as a PNG. Without `--data` it uses 100 shipped chat prompts (50
TruthfulQA questions from the training rows, 50 GSM8K training questions; see
shared/defaults/README.md).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import typer
from tqdm import tqdm

from junction.offline.backends import EvalError, HttpBackend, Outcome
from junction.offline.datasets import Example, load_split
from junction.offline.evaluate import KIND_DEFAULTS, _backend, _config, default_chat, request_for
from junction.offline.report import position_histogram, position_plot, text_histogram
from junction.offline.scoring import detect_kind, mean_stderr
from junction.offline.train_value import _command_line, user_error
from junction.shared.config import SamplingParams
from junction.shared.policy_spec import policy_from_spec
from junction.shared.sources import DEFAULTS_DIR

DEFAULT_PROMPTS = DEFAULTS_DIR / "diagnose_prompts.jsonl"


async def _trace_all(backend, examples: list[Example], make_request) -> list[Outcome]:
    """Every prompt's traced completion (junction steps included), a batch at a time."""
    outs: list[Outcome] = []
    async with backend:
        with tqdm(total=len(examples), unit="prompt", desc="diagnose") as bar:
            for start in range(0, len(examples), backend.concurrency):
                chunk = examples[start : start + backend.concurrency]
                outs += await asyncio.gather(
                    *(backend.generate(make_request(ex), trace=True) for ex in chunk)
                )
                bar.update(len(chunk))
    return outs


def pair_verdict(outs: list[Outcome], threshold: float) -> dict:
    """The pooled rate, the per-prompt mean ± s.e., the verdict and junction positions."""
    steps = sum(o.steps or 0 for o in outs)
    junctions = sum(o.interventions or 0 for o in outs)
    rate = junctions / steps if steps else 0.0
    relative = [j / o.steps for o in outs if o.steps for j in (o.junction_steps or [])]
    absolute = [j for o in outs for j in (o.junction_steps or [])]
    return {
        "prompts": len(outs),
        "steps": steps,
        "junctions": junctions,
        "intervention_rate": rate,
        "per_prompt_rate": mean_stderr((o.interventions or 0) / o.steps for o in outs if o.steps),
        "threshold": threshold,
        "passes": rate <= threshold,
        "histogram_relative": position_histogram(relative),
        "relative_positions": relative,
        "absolute_steps": absolute,
    }


def diagnose(
    ctx: typer.Context,
    data: Path | None = typer.Option(None, "--data", help="Prompt file (default: 100 shipped "
                                     "chat prompts)."),
    n: int = typer.Option(100, "--n", min=1, help="Prompts to run (the first N)."),
    policy: str = typer.Option("blendin", "--policy", help="The guidance policy whose pair "
                               "is checked, with options (e.g. blendin:tau=0.3)."),
    threshold: float = typer.Option(0.2, help="Pass when the intervention rate is at most "
                                    "this (BlendIn's line)."),
    split: str = typer.Option("all", help="Rows of --data: all, train (even) or eval (odd)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1,
                                          help="Default by data kind (64 for chat prompts)."),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("diagnosis"), "--out", help="Directory for "
                             "diagnosis.json and junction_positions.png."),
    url: str | None = typer.Option(None, "--url", help="Check a running server's pair "
                                   "(its native streaming API)."),
    device: str | None = typer.Option(None, help="Device of the in-process models."),
    base: str | None = typer.Option(None, "--base", help="Base model: HF id or path."),
    guidance: str | None = typer.Option(None, "--guidance", help="Guidance model."),
    config: str | None = typer.Option(None, "--config", help="YAML config file."),
) -> None:
    """Check a base/guidance pair: intervention rate against the 0.2 line (exit 1 if over)."""
    try:
        pol = policy_from_spec(policy)
        path = data or DEFAULT_PROMPTS
        examples = load_split(path, split, n)
        kind = detect_kind(examples)
        tokens, stops = KIND_DEFAULTS[kind]
        sampling = SamplingParams(max_tokens or tokens, 0.0, 1.0, None, list(stops))
        chat = default_chat(kind, path)
        cfg = _config(config, base, guidance, None, device)
        backend = (HttpBackend(url, "native") if url
                   else _backend(cfg, {policy: pol}, None, "native", None, 1))
        started = time.perf_counter()
        outs = asyncio.run(_trace_all(
            backend, examples, lambda ex: request_for(ex, chat, pol, sampling, seed)))
    except (ValueError, FileNotFoundError) as exc:
        raise user_error(exc) from exc
    except (EvalError, OSError, httpx.HTTPError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    verdict = pair_verdict(outs, threshold)
    seconds = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": _command_line(ctx), "data": path.name, "policy": policy,
              "where": backend.where, "seconds": seconds, **verdict}
    (out / "diagnosis.json").write_text(json.dumps(record, indent=2) + "\n")
    title = f"{policy} on {path.name}: junction positions ({verdict['junctions']} junctions)"
    drawn = position_plot(verdict["relative_positions"], verdict["absolute_steps"],
                          out / "junction_positions.png", title)
    per = verdict["per_prompt_rate"]
    word = "PASS" if verdict["passes"] else "FAIL"
    typer.echo(
        f"{policy} on {len(outs)} prompts of {path.name} ({backend.where}, {seconds:.0f} s):\n"
        f"intervention rate {verdict['intervention_rate']:.1%} "
        f"({verdict['junctions']} junctions / {verdict['steps']} steps; per prompt "
        f"{per['mean'] or 0:.1%} ± {per['stderr'] or 0:.1%})\n"
        f"verdict: {word} (the pair {'passes' if verdict['passes'] else 'fails'}: rate "
        f"{'≤' if verdict['passes'] else '>'} {threshold:g})\n\n"
        f"where junctions fall (share of the answer):\n"
        f"{text_histogram(verdict['histogram_relative'])}\n"
        f"saved {out / 'diagnosis.json'}"
        + (f" and {out / 'junction_positions.png'}" if drawn else " (no matplotlib: no PNG)")
    )
    raise typer.Exit(0 if verdict["passes"] else 1)
