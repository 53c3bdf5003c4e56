"""Many completions through one engine: batches of requests, and Best-of-N for any policy.

Best-of-N runs N sampled completions of a request (seeds seed, seed+1, ...) concurrently —
the engine batches them into its ticks like any other requests — scores each finished
completion, and returns the best. Scorers:

- `ValueScorer`: the value model's V at the final token of prompt ⊕ completion, through the
  value worker's own `open`/`score`/`close` (all N completions scored in one call over the
  shared prompt cache; the tokens it processes count as value work);
- `RewardScorer` (offline: `junction.offline.reward_scorer`): any reward source (a reward
  model, the reference reward when the prompt has references, the marker reward).

The returned result is the best completion's text with the counters (`steps`,
`interventions`, `by_kind`, `work`) of all N runs added up, plus the scoring's value work.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from tqdm import tqdm

from junction.gateway.engine import Engine, EngineOverloaded
from junction.gateway.sequence import GenerationRequest
from junction.services.protocol import Worker
from junction.shared.steering import best_of
from junction.shared.types import Commit, GenerationResult, ScoreRequest


async def generate_many(
    engine: Engine, reqs: Sequence[GenerationRequest], progress: str | None = None
) -> list[GenerationResult]:
    """Every request's result, in order; at most the engine's concurrency limit at once.

    `progress` is a progress-bar label (None = no bar).
    """
    gate = asyncio.Semaphore(engine.limits.max_concurrency)
    with tqdm(total=len(reqs), desc=progress, disable=progress is None) as bar:

        async def one(req: GenerationRequest) -> GenerationResult:
            async with gate:
                while True:
                    try:
                        result = await engine.generate(req)
                        break
                    except EngineOverloaded:
                        # A finished request leaves the engine at its next tick; wait for it.
                        await asyncio.sleep(0.01)
            bar.update()
            return result

        return list(await asyncio.gather(*(one(r) for r in reqs)))


class Scorer(Protocol):
    def check(self, engine: Engine) -> None:
        """ValueError if this scorer cannot score on this engine (asked before generating)."""
        ...

    async def score(
        self, engine: Engine, req: GenerationRequest, results: Sequence[GenerationResult]
    ) -> tuple[list[float], int]:
        """One score per completion, and the value-model tokens the scoring processed."""
        ...


class ValueScorer:
    """V(x, y) at the last token of each full completion, from the engine's value worker."""

    def check(self, engine: Engine) -> None:
        if "value" not in engine.workers:
            raise ValueError("best-of-N by value needs a value model (or pass a reward source)")
        info = engine.infos.get("value")
        if info is not None and info.value_kind == "log_ratio":
            raise ValueError(
                "best-of-N by value needs a value model with a head: the one served is a "
                "log-ratio model, which scores a junction's candidate tokens, not whole "
                "completions (serve --value shared/defaults/value_head, or pass a reward source)"
            )

    async def score(
        self, engine: Engine, req: GenerationRequest, results: Sequence[GenerationResult]
    ) -> tuple[list[float], int]:
        self.check(engine)
        value = engine.workers["value"]
        seq_id = f"best-of-{uuid.uuid4().hex}"
        await value.call(Worker.open, seq_id, req.prompt, req.messages)
        try:
            # Text commits: the value worker encodes each completion with its own tokenizer.
            candidates = [Commit(r.text) for r in results]
            [scored] = await value.call(Worker.score, [ScoreRequest(seq_id, candidates)])
        finally:
            await value.call(Worker.close, seq_id)
        return list(scored.values), scored.processed


def samples_of(req: GenerationRequest, n: int) -> list[GenerationRequest]:
    """N copies of a request with seeds seed, seed+1, ... (a random start when unseeded)."""
    if n > 1 and not req.draws:
        raise ValueError("n: best-of-N needs sampling (temperature > 0), or N equal completions")
    return seeded_copies(req, n)


def seeded_copies(req: GenerationRequest, n: int) -> list[GenerationRequest]:
    """N copies of a request with seeds seed, seed+1, ... (a random start when unseeded)."""
    sampling = req.sampling
    first = sampling.seed if sampling.seed is not None else random.randrange(2**31)
    return [
        replace(
            req,
            sampling=replace(sampling, seed=(first + i) % 2**63, stop=list(sampling.stop)),
            request_id=uuid.uuid4().hex,
        )
        for i in range(n)
    ]


def combined(best: GenerationResult, results: Sequence[GenerationResult], work: int):
    """The best completion with the counters of all runs (and the scoring work) added up."""
    total = {key: sum(r.work.get(key, 0) for r in results) for key in best.work}
    total["value_tokens"] = total.get("value_tokens", 0) + work
    kinds = {key: sum(r.by_kind.get(key, 0) for r in results) for key in best.by_kind}
    return replace(
        best,
        steps=sum(r.steps for r in results),
        interventions=sum(r.interventions for r in results),
        by_kind=kinds,
        work=total,
    )


async def best_of_n(
    engine: Engine, req: GenerationRequest, n: int, scorer: Scorer
) -> tuple[GenerationResult, list[GenerationResult]]:
    """Run N sampled completions of `req` concurrently; (the best, with summed counters; all N).

    Completions that ended in an error are never chosen while another one finished.
    """
    if not 1 <= n <= engine.limits.max_n:
        raise ValueError(f"n: between 1 and {engine.limits.max_n}")
    scorer.check(engine)
    results = list(await asyncio.gather(*(engine.generate(r) for r in samples_of(req, n))))
    scores, work = await scorer.score(engine, req, results)
    usable = [s if r.finish_reason != "error" else float("-inf") for s, r in zip(
        scores, results, strict=True
    )]
    return combined(results[best_of(usable)], results, work), results
