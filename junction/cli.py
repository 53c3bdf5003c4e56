"""The `junction` command: generate (any policy, Best-of-N), serve, train-value, evaluate,
diagnose, calibrate."""

# Serving is `junction.gateway`; the offline commands live in `junction.offline`.

# torch, transformers and ray are imported inside the commands, never at module level, so
# `junction --help` and a user error (a bad config, a bad model path) answer in about a second.

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from junction.offline.calibrate import calibrate_command
from junction.offline.diagnose import diagnose
from junction.offline.evaluate import evaluate
from junction.offline.train_value import train_value, user_error
from junction.shared.config import POLICIES, check_config, load_config
from junction.shared.sources import check_adapter, check_source

if TYPE_CHECKING:
    from junction.gateway.best_of import Scorer
    from junction.gateway.engine import Engine
    from junction.gateway.sequence import GenerationRequest
    from junction.shared.types import GenerationResult

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


async def _run(engine: Engine, req: GenerationRequest, echo: bool) -> GenerationResult:
    from junction.shared.types import GenerationResult, TokenEvent

    await engine.start()
    try:
        seq = await engine.submit(req)
        async for item in engine.stream(seq):
            if isinstance(item, TokenEvent) and echo:
                sys.stdout.write(item.text)
                sys.stdout.flush()
            elif isinstance(item, GenerationResult):
                return item
        raise RuntimeError("stream ended without a result")
    finally:
        await engine.close()


async def _run_best_of(
    engine: Engine, req: GenerationRequest, n: int, scorer: Scorer
) -> GenerationResult:
    from junction.gateway.best_of import best_of_n

    await engine.start()
    try:
        best, _ = await best_of_n(engine, req, n, scorer)
        return best
    finally:
        await engine.close()


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", help="Prompt text (plain; the guidance model "
                               "gets it inside its chat template)."),
    policy: str = typer.Option("base", help=f"One of: {', '.join(POLICIES)}."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="Base sampling temperature; 0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int | None = typer.Option(None),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    k: int | None = typer.Option(None, help="Top-k width (SIA 10, BlendIn 100 by default)."),
    entropy_threshold: float = typer.Option(1.0, "--entropy-threshold", help="SIA's H (nats)."),
    beta: float = typer.Option(1.0, help="SIA's value weight β."),
    value_temperature: float | None = typer.Option(
        None, "--value-temperature",
        help="SIA's T (0 = argmax); default: the request's decoding (paper's mode: 1)."),
    target_ratio: float | None = typer.Option(None, "--target-ratio",
                                              help="SIA: intervene on this share of steps."),
    value_only: bool = typer.Option(False, "--value-only", help="SIA: β = ∞, choose by value."),
    sia_decode: str = typer.Option("request", "--sia-decode",
                                   help="SIA between junctions: request (the request's "
                                   "decoding) or topk_sample (the paper's)."),
    tau: float = typer.Option(0.4, help="BlendIn / Nudging confidence threshold τ."),
    lam: float = typer.Option(0.1, help="BlendIn's λ."),
    alpha: float | None = typer.Option(None, min=0.0, max=1.0,
                                       help="BlendIn: a fixed α instead of the computed one."),
    config: str | None = typer.Option(None, "--config", help="YAML config file."),
    base: str | None = typer.Option(None, "--base", help="Base model: HF id or path."),
    guidance: str | None = typer.Option(None, "--guidance", help="Guidance model: HF id or path."),
    value: str | None = typer.Option(None, "--value", help="Value adapter directory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    n: int = typer.Option(1, "--n", "--best-of", min=1,
                          help="Best-of-N: sample N completions (seeds seed..seed+N-1), "
                          "return the best by the value model."),
    reward: str | None = typer.Option(None, "--reward",
                                      help="Best-of-N: score with this reward source instead "
                                      "(marker:TEXT, or a reward model id or path)."),
) -> None:
    """Generate one completion with a junction policy (or the best of N)."""
    try:
        cfg = load_config(config)
        for role, source in (("base", base), ("guidance", guidance), ("value", value)):
            if source is not None:
                getattr(cfg, role).source = source
        cfg = check_config(cfg)
        # What the command line names is checked before torch is imported (a second, not ten);
        # local_engine checks every source the request needs before it loads a model.
        for role, source in (("base", base), ("guidance", guidance)):
            if source is not None:
                check_source(role, source)
        if value is not None:
            check_adapter(Path(value))
        from junction.gateway.best_of import ValueScorer
        from junction.gateway.local import local_engine
        from junction.gateway.sequence import GenerationRequest
        from junction.offline.reward_scorer import RewardScorer
        from junction.offline.rewards import reward_from_spec
        from junction.shared.config import PolicyConfig, SamplingParams

        req = GenerationRequest(
            prompt=prompt,
            sampling=SamplingParams(max_tokens, temperature, top_p, seed, list(stop)),
            policy=PolicyConfig(
                policy=policy, k=k, entropy_threshold=entropy_threshold, beta=beta,
                value_temperature=value_temperature, target_ratio=target_ratio, tau=tau, lam=lam,
                alpha=alpha, value_only=value_only, sia_decode=sia_decode,
            ),
        )
        if n > 1:
            scorer = ValueScorer() if reward is None else RewardScorer(reward_from_spec(reward))
            roles = req.roles if reward is not None else tuple(dict.fromkeys((*req.roles, "value")))
            engine = local_engine(cfg, roles, progress=not as_json)
            result = asyncio.run(_run_best_of(engine, req, n, scorer))
            if not as_json:
                typer.echo(result.text, nl=False)
        else:
            engine = local_engine(cfg, req.roles, progress=not as_json)
            result = asyncio.run(_run(engine, req, echo=not as_json))
    except (ValueError, FileNotFoundError) as exc:
        raise user_error(exc) from None
    if as_json:
        typer.echo(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        typer.echo()
        typer.echo(
            f"[{result.policy}] {result.finish_reason}; {result.steps} steps, "
            f"{result.interventions} interventions ({result.intervention_rate:.1%}); "
            f"work {result.work}",
            err=True,
        )


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8000, min=1, max=65535),
    config: str | None = typer.Option(None, "--config", help="YAML config file."),
    api_key: list[str] = typer.Option(
        [], "--api-key", help="Require `Authorization: Bearer KEY` (repeatable; also "
        "JUNCTION_API_KEYS, comma-separated, and server.api_keys in the config)."
    ),
) -> None:
    """Serve the HTTP gateway; each model runs in a Ray actor (RAY_ADDRESS joins a cluster)."""
    try:
        cfg = load_config(config)
        if not os.environ.get("RAY_ADDRESS"):
            # Local Ray: the actors load from this machine, so a bad source is known now. (On a
            # cluster, paths are the workers'; a failed load shows in /ready and the log.) The
            # value model is optional: the server leaves a missing one out with a warning.
            for role in ("base", "guidance"):
                check_source(role, getattr(cfg, role).source)
    except (ValueError, FileNotFoundError) as exc:
        raise user_error(exc) from None
    import uvicorn

    from junction.gateway.app import create_app

    url = f"http://{host}:{port}"
    body = '{"prompt": "The ocean is", "max_tokens": 16, "policy": "blendin"}'
    typer.echo(
        f"Junction gateway at {url}; models load in the background ({url}/ready turns 200).\n"
        f"  curl {url}/v1/generate -H 'content-type: application/json' -d '{body}'\n"
        f"  OpenAI clients: base_url={url}/v1; metrics: {url}/metrics",
        err=True,
    )
    from junction.services.actors import shutdown_ray

    try:
        uvicorn.run(create_app(cfg, keys=api_key), host=host, port=port, log_level="info")
    finally:  # the app's shutdown does this too; not every exit path reaches it (a busy port)
        shutdown_ray()


app.command("train-value")(train_value)
app.command("calibrate")(calibrate_command)
app.command()(evaluate)
app.command()(diagnose)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
