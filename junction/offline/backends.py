"""Where `junction evaluate` and `junction diagnose` get completions: in process or over HTTP.

- `LocalBackend`: an engine over in-process runners (`junction.gateway.local`), the same decode loop
  the server runs. It can also score given answers by likelihood (MC1) under the base and
  the guidance models.
- `HttpBackend`: a running gateway (or any OpenAI-compatible server) through its API, so a
  deployment is evaluated unchanged: the native `/v1/generate` (and `/v1/generate_stream`
  for junction positions) or the OpenAI routes, with the policy in the extra field
  `junction`. An API key in `JUNCTION_API_KEY` is sent as `Authorization: Bearer`. A server
  that returns no `junction` summary (not Junction) gives completions without counters.
  Likelihoods of given text are not available over HTTP (the OpenAI routes' log-probs cover
  generated tokens only), so MC1 is in-process only.

Both take a `GenerationRequest` and return an `Outcome`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

from junction.shared.config import JunctionConfig
from junction.shared.policy_spec import policy_options
from junction.shared.types import GenerationResult, TokenEvent

if TYPE_CHECKING:  # the engine (torch) is imported by LocalBackend only, so the CLI starts fast
    from junction.gateway.sequence import GenerationRequest

API_KEY_ENV = "JUNCTION_API_KEY"
LIKELIHOOD_ROLES = {"base": "base", "guidance": "guidance"}  # policy -> model it decodes from


class EvalError(Exception):
    """A completion could not be had (the server refused it, or the run is misconfigured)."""


@dataclass(slots=True)
class Outcome:
    """One completion and what the server reported about it (None = not reported)."""

    text: str
    finish_reason: str
    completion_tokens: int
    steps: int | None = None
    interventions: int | None = None
    by_kind: dict[str, int] = field(default_factory=dict)
    work: dict[str, int] = field(default_factory=dict)
    junction_steps: list[int] | None = None  # decode steps that were junctions (traced runs)
    latency_s: float = 0.0

    @classmethod
    def from_result(cls, result: GenerationResult, latency: float) -> Outcome:
        return cls(result.text, result.finish_reason, result.completion_tokens, result.steps,
                   result.interventions, dict(result.by_kind), dict(result.work),
                   latency_s=latency)

    @classmethod
    def from_json(cls, text: str, finish: str | None, usage: dict | None, summary: dict | None,
                  latency: float) -> Outcome:
        """From an API response: the text, its usage and Junction's `junction` summary."""
        summary = summary or {}
        return cls(text, finish or "unknown", int((usage or {}).get("completion_tokens", 0)),
                   summary.get("steps"), summary.get("interventions"),
                   dict(summary.get("by_kind") or {}), dict(summary.get("work") or {}),
                   latency_s=latency)


# --------------------------------------------------------------------- in process
class LocalBackend:
    """An engine over in-process runners for `roles`; use as `async with`."""

    where = "in process"

    def __init__(self, config: JunctionConfig, roles: tuple[str, ...], progress: bool = True):
        from junction.gateway.engine import Engine
        from junction.gateway.local import local_handles

        self.handles = local_handles(config, roles, progress)
        self.engine = Engine(self.handles, config.limits)
        self.concurrency = config.limits.max_concurrency

    async def __aenter__(self) -> LocalBackend:
        await self.engine.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.engine.close()

    async def _submit(self, req: GenerationRequest):
        from junction.gateway.engine import EngineOverloaded

        while True:
            try:
                return await self.engine.submit(req)
            except EngineOverloaded:
                await asyncio.sleep(0.01)  # a finished request leaves at the next tick
            except ValueError as exc:
                raise EvalError(str(exc)) from exc

    async def generate(self, req: GenerationRequest, trace: bool = False) -> Outcome:
        start = time.perf_counter()
        seq = await self._submit(req)
        junctions: list[int] = []
        try:
            async for item in self.engine.stream(seq):
                if isinstance(item, TokenEvent):
                    if item.junction:
                        junctions.append(item.index)
                    continue
                outcome = Outcome.from_result(item, time.perf_counter() - start)
                outcome.junction_steps = junctions if trace else None
                if item.finish_reason == "error":
                    raise EvalError(seq.error or "generation failed")
                return outcome
        finally:
            self.engine.cancel(seq)
        raise EvalError("stream ended without a result")

    def likelihood_support(self, policy: str) -> str | None:
        """Why MC1 cannot be scored for this policy here (None: it can)."""
        role = LIKELIHOOD_ROLES.get(policy)
        if role is None:
            return ("scored for base and guidance only (this policy's next-token "
                    "distribution depends on another model's steps)")
        return None if role in self.handles else f"{policy}: no {role} model loaded"

    async def answer_logprobs(self, policy: str, prompt: str, answers: list[str]) -> list[float]:
        from junction.offline.likelihood import answer_logprobs

        runner = self.handles[LIKELIHOOD_ROLES[policy]].runner  # a LocalHandle's plain runner
        return await asyncio.to_thread(answer_logprobs, runner.loaded, runner.chat, prompt,
                                       answers)


# --------------------------------------------------------------------- over HTTP
class HttpBackend:
    """A running server: `api` is "native" (/v1/generate) or "openai" (/v1/*completions)."""

    def __init__(self, url: str, api: str = "native", concurrency: int = 4,
                 model: str | None = None, timeout: float = 600.0, retries: int = 60) -> None:
        if api not in ("native", "openai"):
            raise ValueError("api must be native or openai")
        self.url, self.api, self.model = url.rstrip("/"), api, model
        self.concurrency, self.retries = concurrency, retries
        self.where = f"{self.url} ({api} API)"
        key = os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)

    async def __aenter__(self) -> HttpBackend:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.aclose()

    def likelihood_support(self, policy: str) -> str | None:
        return ("over --url: the API returns no likelihood of given text (log-probs cover "
                "generated tokens only); run MC1 in process")

    async def answer_logprobs(self, policy: str, prompt: str, answers: list[str]) -> list[float]:
        raise EvalError(self.likelihood_support(policy) or "")

    def _body(self, req: GenerationRequest, api: str | None = None) -> tuple[str, dict]:
        """The route and JSON body of a request on the native or the OpenAI API."""
        s = req.sampling
        sampling = {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
                    "seed": s.seed, "stop": list(s.stop)}
        source = {"prompt": req.prompt} if req.messages is None else {"messages": req.messages}
        options = policy_options(req.policy)
        if (api or self.api) == "native":
            return "/v1/generate", {**source, **sampling, **options}
        body = {**source, **sampling}
        if self.model:
            body["model"] = self.model
        if options != {"policy": "base"}:  # a plain OpenAI server never sees the extra field
            body["junction"] = options
        return ("/v1/completions" if req.messages is None else "/v1/chat/completions"), body

    async def _post(self, path: str, body: dict) -> httpx.Response:
        """POST, waiting out 429/503 (Retry-After) a bounded number of times."""
        for _ in range(self.retries):
            response = await self.client.post(path, json=body)
            if response.status_code not in (429, 503):
                return response
            await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
        return response

    async def generate(self, req: GenerationRequest, trace: bool = False) -> Outcome:
        if trace:
            return await self._stream(req)
        path, body = self._body(req)
        start = time.perf_counter()
        response = await self._post(path, body)
        data = _json_or_error(response, path)
        latency = time.perf_counter() - start
        if self.api == "native":
            return Outcome.from_json(data["text"], data.get("finish_reason"), data.get("usage"),
                                     data.get("junction"), latency)
        choice = data["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        return Outcome.from_json(text or "", choice.get("finish_reason"), data.get("usage"),
                                 data.get("junction"), latency)

    async def _stream(self, req: GenerationRequest) -> Outcome:
        """Native SSE stream: each token event says whether its step was a junction."""
        _, body = self._body(req, "native")
        start, junctions, summary = time.perf_counter(), [], None
        async with self.client.stream("POST", "/v1/generate_stream", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                _json_or_error(response, "/v1/generate_stream")
            event = "message"
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    event = line.partition(":")[2].strip()
                elif line.startswith("data:"):
                    data = json.loads(line.partition(":")[2])
                    if event == "token" and data.get("junction"):
                        junctions.append(int(data["index"]))
                    elif event == "error":
                        raise EvalError(data["error"]["message"])
                    elif event == "summary":
                        summary = data
        if summary is None:
            raise EvalError("/v1/generate_stream ended without a summary")
        out = Outcome.from_json(summary["text"], summary.get("finish_reason"),
                                summary.get("usage"), summary.get("junction"),
                                time.perf_counter() - start)
        out.junction_steps = junctions
        return out


def _json_or_error(response: httpx.Response, path: str) -> dict:
    """The response's JSON, or an EvalError with the server's own message."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code == 200 and isinstance(data, dict):
        return data
    message = data.get("error", {}).get("message") if isinstance(data, dict) else None
    raise EvalError(f"{path}: HTTP {response.status_code}: {message or response.text[:200]}")
