"""Best-of-N scored by a reward source instead of the value model (`junction generate
--reward`, evaluation): offline, since reward sources are training and evaluation code."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from junction.gateway.engine import Engine
from junction.gateway.sequence import GenerationRequest
from junction.offline.rewards import References, RewardSource
from junction.shared.types import GenerationResult


class RewardScorer:
    """A reward source's score of (prompt, completion, references)."""

    def __init__(self, source: RewardSource, refs: References | None = None) -> None:
        self.source = source
        self.refs = refs

    def check(self, engine: Engine) -> None:
        return None  # a reward source needs no worker

    async def score(
        self, engine: Engine, req: GenerationRequest, results: Sequence[GenerationResult]
    ) -> tuple[list[float], int]:
        prompt = req.prompt if req.prompt is not None else _last_user_text(req.messages or [])

        def run() -> list[float]:
            return [self.source.score(prompt, r.text, self.refs) for r in results]

        return await asyncio.to_thread(run), 0


def _last_user_text(messages: list[dict]) -> str:
    users = [m.get("content", "") for m in messages if m.get("role") == "user"]
    return users[-1] if users else ""
