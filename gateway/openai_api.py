"""The OpenAI wire format: completion and chat responses, and their streamed chunks.

Junction's own summary (policy, intervention rate, work) rides along as the extra field
`junction` on each response and on the chunk that carries a choice's finish reason. Streams
follow OpenAI: a chunk per piece of text, then each choice's finish chunk, then (with
`stream_options.include_usage`) a chunk with empty `choices` and the usage, then `[DONE]`.

`n` > 1: the choices are independent sequences (seeds seed, seed+1, ...); a stream
interleaves their chunks, each tagged with its choice `index`.

`logprobs`: one entry per decode step (a token, or a word at a Nudging junction), from the
driver model's distribution at that step; a piece the driver did not offer (a guidance
model's choice) has logprob -9999.0, and the end of text is the empty string.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from sse_starlette import ServerSentEvent

from junction.gateway.best_of import combined
from junction.gateway.errors import error_body
from junction.gateway.sequence import Sequence as Live
from junction.shared.types import EOS_TEXT, GenerationResult, StepLogprobs, TokenEvent

DONE = "[DONE]"
Item = TokenEvent | GenerationResult


def usage(results: Sequence[GenerationResult]) -> dict:
    """Token counts of a response; the n choices share one prompt."""
    prompt = results[0].prompt_tokens
    completion = sum(r.completion_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _token(text: str) -> str:
    return "" if text == EOS_TEXT else text


def completion_logprobs(steps: Sequence[StepLogprobs], offset: int = 0) -> dict:
    """The legacy completions format: parallel lists, one entry per step."""
    tokens = [_token(s.token) for s in steps]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [s.logprob for s in steps],
        "top_logprobs": [{_token(t): lp for t, lp in s.top} for s in steps],
        "text_offset": offsets,
    }


def chat_logprobs(steps: Sequence[StepLogprobs]) -> dict:
    def entry(text: str, logprob: float) -> dict:
        token = _token(text)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]}
            for s in steps
        ]
    }


@dataclass(slots=True)
class Reply:
    """What every response and chunk of one request shares."""

    chat: bool  # /v1/chat/completions, else /v1/completions
    model: str
    logprobs: bool = False  # the client asked for log-probabilities
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def _envelope(self, chunk: bool) -> dict:
        if self.chat:
            prefix, kind = "chatcmpl-", "chat.completion.chunk" if chunk else "chat.completion"
        else:
            prefix, kind = "cmpl-", "text_completion"
        envelope = {"id": prefix + self.id, "object": kind, "created": self.created}
        return {**envelope, "model": self.model}

    def _logprobs(self, steps: Sequence[StepLogprobs], offset: int = 0) -> dict | None:
        if not self.logprobs:
            return None
        return chat_logprobs(steps) if self.chat else completion_logprobs(steps, offset)

    def response(
        self,
        results: Sequence[GenerationResult],
        steps: Sequence[Sequence[StepLogprobs]] | None = None,
    ) -> dict:
        """The whole, non-streamed response: one choice per result."""
        choices = []
        for index, result in enumerate(results):
            logprobs = self._logprobs(steps[index] if steps else [])
            choice: dict = {"index": index, "finish_reason": result.finish_reason,
                            "logprobs": logprobs}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": result.text}
            else:
                choice["text"] = result.text
            choices.append(choice)
        summary = combined(results[0], results, 0) if len(results) > 1 else results[0]
        return {
            **self._envelope(chunk=False),
            "choices": choices,
            "usage": usage(results),
            "junction": summary.to_json()["junction"],
        }

    def chunk(
        self,
        text: str,
        finish_reason: str | None = None,
        first: bool = False,
        index: int = 0,
        logprobs: dict | None = None,
    ) -> dict:
        """One streamed piece of text (or the finish chunk, with finish_reason)."""
        choice: dict = {"index": index, "finish_reason": finish_reason, "logprobs": logprobs}
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice["delta"] = delta if text or first else {}
        else:
            choice["text"] = text
        return {**self._envelope(chunk=True), "choices": [choice]}

    def usage_chunk(self, results: Sequence[GenerationResult]) -> dict:
        return {**self._envelope(chunk=True), "choices": [], "usage": usage(results)}


def _data(obj: dict | str) -> dict:
    return {"data": obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}


async def merged(
    streams: Sequence[AsyncIterator[list[Item]]],
) -> AsyncIterator[tuple[int, list[Item]]]:
    """The bursts of several streams (`Engine.bursts`) as they come, each with its stream's
    index; done when every stream has ended with its result."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[list[Item]]) -> None:
        async for burst in stream:
            await queue.put((index, burst))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        finished = 0
        while finished < len(streams):
            index, burst = await queue.get()
            finished += isinstance(burst[-1], GenerationResult)
            yield index, burst
    finally:
        for task in tasks:
            task.cancel()


def sse(data: str, event: str | None = None) -> bytes:
    """One SSE event, encoded as sse-starlette writes it."""
    return ServerSentEvent(data=data, event=event).encode()


def _sse_bytes(events: list[dict]) -> bytes:
    """SSE events (`_data` dicts) as one chunk: one write serves them all."""
    return b"".join(sse(**event) for event in events)


async def stream_events(
    reply: Reply,
    bursts: AsyncIterator[tuple[int, list[Item]]],
    seqs: Sequence[Live],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """The SSE events of one streamed request, a choice per sequence: a chunk per event,
    written together for the steps of one burst (a run-ahead's steps come at once), as the
    native route does.

    A failed choice ends the stream with an error event (its message sanitized).
    """
    n = len(seqs)
    in_usage = {"usage": None} if include_usage else {}
    if reply.chat:
        yield _sse_bytes([_data({**reply.chunk("", first=True, index=index), **in_usage})
                          for index in range(n)])
    offsets = [0] * n
    results: list[GenerationResult] = []
    async for index, burst in bursts:
        events, failed = [], False
        for item in burst:
            if isinstance(item, TokenEvent):
                if item.text or item.logprobs:
                    steps = [item.logprobs] if item.logprobs else []
                    logprobs = reply._logprobs(steps, offsets[index])
                    offsets[index] += sum(len(_token(s.token)) for s in steps)
                    events.append(_data({**reply.chunk(item.text, index=index,
                                                       logprobs=logprobs), **in_usage}))
                continue
            if item.finish_reason == "error":
                message = seqs[index].error or "generation failed"
                events.append(_data(error_body(message, kind="server_error")))
                failed = True
                break
            results.append(item)
            last = {**reply.chunk("", item.finish_reason, index=index), **in_usage}
            events.append(_data({**last, "junction": item.to_json()["junction"]}))
            if include_usage and len(results) == n:
                events.append(_data(reply.usage_chunk(results)))
        if events:
            yield _sse_bytes(events)
        if failed:
            break
    yield _sse_bytes([_data(DONE)])
