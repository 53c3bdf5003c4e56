"""The OpenAI wire format: completion and chat responses, and their streamed chunks.

Junction's own summary (policy, intervention rate, work) rides along as the extra field
`junction` on each response and on the chunk that carries the finish reason. Streams follow
OpenAI: a chunk per piece of text, then the finish chunk, then (with
`stream_options.include_usage`) a chunk with empty `choices` and the usage, then `[DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gateway.sequence import Sequence
from shared.types import GenerationResult, TokenEvent

DONE = "[DONE]"


def usage(result: GenerationResult) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


@dataclass(slots=True)
class Reply:
    """What every response and chunk of one request shares."""

    chat: bool  # /v1/chat/completions, else /v1/completions
    model: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def _envelope(self, chunk: bool) -> dict:
        if self.chat:
            prefix, kind = "chatcmpl-", "chat.completion.chunk" if chunk else "chat.completion"
        else:
            prefix, kind = "cmpl-", "text_completion"
        envelope = {"id": prefix + self.id, "object": kind, "created": self.created}
        return {**envelope, "model": self.model}

    def response(self, result: GenerationResult) -> dict:
        """The whole, non-streamed response."""
        choice: dict = {"index": 0, "finish_reason": result.finish_reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        return {
            **self._envelope(chunk=False),
            "choices": [choice],
            "usage": usage(result),
            "junction": result.to_json()["junction"],
        }

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False) -> dict:
        """One streamed piece of text (or the finish chunk, with finish_reason)."""
        choice: dict = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice["delta"] = delta if text or first else {}
        else:
            choice["text"] = text
        return {**self._envelope(chunk=True), "choices": [choice]}

    def usage_chunk(self, result: GenerationResult) -> dict:
        return {**self._envelope(chunk=True), "choices": [], "usage": usage(result)}


def _data(obj: dict | str) -> dict:
    return {"data": obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}


async def stream_events(
    reply: Reply,
    items: AsyncIterator[TokenEvent | GenerationResult],
    seq: Sequence,
    include_usage: bool,
) -> AsyncIterator[dict]:
    """The SSE events (sse-starlette dicts) of one streamed completion."""
    in_usage = {"usage": None} if include_usage else {}
    if reply.chat:
        yield _data({**reply.chunk("", first=True), **in_usage})
    async for item in items:
        if isinstance(item, TokenEvent):
            if item.text:
                yield _data({**reply.chunk(item.text), **in_usage})
            continue
        if item.finish_reason == "error":
            yield _data({"error": {"message": seq.error or "generation failed",
                                   "type": "server_error", "param": None, "code": None}})
            break
        last = {**reply.chunk("", item.finish_reason), **in_usage}
        yield _data({**last, "junction": item.to_json()["junction"]})
        if include_usage:
            yield _data(reply.usage_chunk(item))
    yield _data(DONE)
