"""What the routes share: a body's engine request, its admission as HTTP errors, its results
collected or streamed, and the cancels when a client goes away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import fields
from typing import TYPE_CHECKING

from fastapi import Request

from junction.gateway.best_of import ValueScorer, best_of_n
from junction.gateway.engine import Engine, EngineOverloaded, WorkerDown
from junction.gateway.errors import ApiError, bad_request, error_body
from junction.gateway.openai_api import sse
from junction.gateway.schemas import ChatCompletionBody, CompletionBody, GenerateBody, OpenAIBody
from junction.gateway.sequence import GenerationRequest, Sequence
from junction.services.actors import WorkerUnavailable
from junction.shared.types import GenerationResult, StepLogprobs, TokenEvent

if TYPE_CHECKING:
    from junction.gateway.app import Gateway


def build(body: GenerateBody | CompletionBody | ChatCompletionBody, cap: int) -> GenerationRequest:
    """A body's engine request; every refusal is a 400 naming the field, before any work."""
    try:
        return body.generation_request(cap)
    except ValueError as exc:
        raise bad_request(exc) from exc


async def admit(engine: Engine, reqs: list[GenerationRequest]) -> list[Sequence]:
    """Submit requests (the n choices of one body) together, turning refusals into HTTP
    errors.

    Together: their opens leave in one call, and they take their first step in one tick
    (`gateway.admission.Admitting`). Submitted one after another, each started a call later.
    All or none: when one is refused, the others are cancelled, admitted or not.
    """
    submits = [asyncio.ensure_future(engine.submit(req)) for req in reqs]
    try:
        await asyncio.gather(*submits)
        return [submit.result() for submit in submits]
    except BaseException as exc:
        for submit in submits:
            if not submit.done():
                submit.cancel()  # an open answered for nobody is closed again (`Engine`)
            elif not submit.cancelled() and submit.exception() is None:
                engine.cancel(submit.result())
        if isinstance(exc, EngineOverloaded | WorkerDown):
            raise retry_later(exc) from exc
        if isinstance(exc, WorkerUnavailable):  # an actor is restarting after its process died
            raise ApiError(503, "a worker is unavailable; retry later",
                           headers={"Retry-After": "5"}) from exc
        if isinstance(exc, ValueError):
            raise bad_request(exc) from exc
        raise


def retry_later(exc: EngineOverloaded | WorkerDown) -> ApiError:
    """429 when the queue is full or a wait timed out; 503 while a new worker starts in place
    of a dead one. Both say when to retry."""
    retry = {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, WorkerDown):
        return ApiError(503, str(exc), kind="unavailable", headers=retry)
    return ApiError(429, str(exc), headers=retry)


async def _cancel_on_disconnect(request: Request, engine: Engine, seqs: list[Sequence]) -> None:
    # The body has been read, so the next message is the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for seq in seqs:
        engine.cancel(seq)


async def _collect(engine: Engine, seq: Sequence) -> tuple[GenerationResult, list[StepLogprobs]]:
    steps = []
    async for item in engine.stream(seq):
        if isinstance(item, TokenEvent):
            if item.logprobs is not None:
                steps.append(item.logprobs)
            continue
        if item.finish_reason == "error":
            raise ApiError(500, seq.error or "generation failed", kind="server_error")
        return item, steps
    raise RuntimeError("stream ended without a result")


async def results_of(
    request: Request, engine: Engine, seqs: list[Sequence]
) -> list[tuple[GenerationResult, list[StepLogprobs]]]:
    """Wait for requests' results (and logprobs); a client that goes away cancels them."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, engine, seqs))
    try:
        return list(await asyncio.gather(*(_collect(engine, s) for s in seqs)))
    finally:
        watcher.cancel()
        for seq in seqs:
            engine.cancel(seq)


async def cancel_when_closed(engine: Engine, seqs: list[Sequence], events: AsyncIterator[dict]):
    """Pass a stream's events on; when the client disconnects, the requests are cancelled."""
    try:
        async for event in events:
            yield event
    finally:
        for seq in seqs:
            engine.cancel(seq)


# The native route's token event: every field but logprobs (the native route does not ask).
TOKEN_EVENT_FIELDS = tuple(f.name for f in fields(TokenEvent) if f.name != "logprobs")


async def native_events(engine: Engine, seq: Sequence) -> AsyncIterator[bytes]:
    """/v1/generate_stream: a `token` event per step, then `summary` (after `error` if any).

    The events of a burst (the steps a run-ahead brought at once) go out as one chunk: each
    is still its own SSE event, but one write and one read serve them all, where a write per
    event cost the gateway and the client more than the whole step on a fast model.
    """
    async for items in engine.bursts(seq):
        yield b"".join(_encoded(seq, item) for item in items)


def _encoded(seq: Sequence, item: TokenEvent | GenerationResult) -> bytes:
    if isinstance(item, TokenEvent):
        # Shallow (every field but logprobs is a plain value): `asdict` recurses into
        # each value, a cost paid at every step of every stream (docs/benchmarks-history.md).
        event = {name: getattr(item, name) for name in TOKEN_EVENT_FIELDS}
        return sse(json.dumps(event, ensure_ascii=False), "token")
    error = b""
    if item.finish_reason == "error":
        body = error_body(seq.error or "generation failed", kind="server_error")
        error = sse(json.dumps(body), "error")
    return error + sse(json.dumps(item.to_json(), ensure_ascii=False), "summary")


def check_openai(gateway: Gateway, body: OpenAIBody) -> str:
    """What an OpenAI body asks that no engine request can say; returns the model to name."""
    model = gateway.check_model(body.model)
    unsupported = body.unsupported()
    if unsupported is not None:
        raise ApiError(400, f"{unsupported}: not supported by Junction", unsupported)
    max_n = gateway.config.limits.max_n
    if body.n > max_n:
        raise ApiError(400, f"n: at most {max_n}", "n")
    if body.n > 1 and (body.best_of or 1) > 1:
        raise ApiError(400, "n: with best_of, n must be 1 (the best one is returned)", "n")
    if (body.best_of or 1) > 1 and body.logprobs_wanted is not None:
        raise ApiError(400, "logprobs: not with best_of", "logprobs")
    return model


def best_of_requested(body: GenerateBody | OpenAIBody, max_n: int, stream: bool) -> int:
    """N for Best-of-N (1 = a plain request), checked against the limit."""
    n = body.best_of or 1
    if n > max_n:
        raise ApiError(400, f"best_of: at most {max_n}", "best_of")
    if n > 1 and stream:
        raise ApiError(400, "best_of: the best is known only at the end; not with stream",
                       "best_of")
    return n


async def best_result(engine: Engine, req: GenerationRequest, n: int) -> GenerationResult:
    """N sampled completions through the engine, the best by the value model."""
    try:
        best, _ = await best_of_n(engine, req, n, ValueScorer())
    except (EngineOverloaded, WorkerDown) as exc:
        raise retry_later(exc) from exc
    except ValueError as exc:
        message = str(exc)
        if message.startswith("best-of-N by value") or message.startswith("n:"):
            raise ApiError(400, f"best_of: {message.removeprefix('n: ')}", "best_of") from exc
        raise bad_request(exc) from exc
    if best.finish_reason == "error":
        raise ApiError(500, "every best-of-N completion failed", kind="server_error")
    return best
