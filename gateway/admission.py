"""Admitting a request: its checks, its opens on every worker it needs, its Sequence; and
the wait that lets requests sent together start together."""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable

from junction.gateway.calls import Calls
from junction.gateway.policies import Policies
from junction.gateway.sequence import GenerationRequest, Sequence, Status
from junction.gateway.stopping import Stopping
from junction.shared.config import Limits
from junction.shared.prompts import base_prompt_text, transcript_stops
from junction.shared.types import ModelInfo


class EngineOverloaded(Exception):
    """Too many live requests and the queue full, or the wait too long; the caller should
    retry after `retry_after` seconds."""

    def __init__(self, limit: int, retry_after: int = 1, why: str = "") -> None:
        super().__init__(f"at most {limit} concurrent requests{why}; retry later")
        self.retry_after = retry_after


class WorkerDown(Exception):
    """A role the request needs is down (a new worker is starting); retry later."""

    def __init__(self, role: str, reason: str, retry_after: int = 5) -> None:
        super().__init__(f"the {role} worker is down ({reason}); retry later")
        self.retry_after = retry_after


def check(req: GenerationRequest, workers: Iterable[str], limits: Limits) -> None:
    """What the request asks for can be served here, or a clear error why not."""
    missing = [role for role in req.roles if role not in workers]
    if missing:
        hint = " (train one with `junction train-value`)" if "value" in missing else ""
        raise ValueError(f"policy: {req.policy.policy} needs a {missing[0]} model{hint}")
    if req.sampling.max_tokens > limits.max_tokens:
        raise ValueError(f"max_tokens: at most {limits.max_tokens}")


async def open_request(req: GenerationRequest, calls: Calls, infos: dict[str, ModelInfo],
                       limits: Limits, policies: Policies) -> Sequence:
    """Open the request on each worker it needs (one turn's opens leave as one call)."""
    seed = req.sampling.seed
    if seed is None and req.draws:
        seed = secrets.randbits(63)  # its own random stream, recorded in the result
    counts = await asyncio.gather(
        *(calls.open(role, req.request_id, req.prompt, req.messages, seed) for role in req.roles),
        return_exceptions=True,
    )
    problem = next((c for c in counts if isinstance(c, BaseException)), None)
    if problem is None:
        problem = prompt_problem(dict(zip(req.roles, counts, strict=True)), req, infos, limits)
    if problem is not None:
        await calls.close(req.request_id, req.roles)
        raise problem
    seq = Sequence(
        req=req,
        prompt_tokens=counts[0],  # the driver's: req.roles starts with it
        stopping=Stopping(req.sampling.max_tokens, stops(req), stop_context(req)),
        families={role: infos[role].family for role in req.roles},
        seed=seed,
    )
    seq.rule = policies[req.policy.policy]
    seq.rule.open(seq)
    return seq


def prompt_problem(counts: dict[str, int], req: GenerationRequest, infos: dict[str, ModelInfo],
                   limits: Limits) -> ValueError | None:
    """Why a prompt of this length cannot be served, if it cannot.

    The driver's prompt is held to the gateway's limit; every model that reads the text
    (each in its own tokens) must fit the prompt plus max_tokens in its context, or it would
    run past what it was trained on.
    """
    prompt_tokens = counts[req.driver]
    limit = min(limits.max_prompt_tokens, infos[req.driver].max_context)
    if prompt_tokens > limit:
        return ValueError(f"prompt: {prompt_tokens} tokens, at most {limit}")
    for role, count in counts.items():
        context = infos[role].max_context
        if count + req.sampling.max_tokens > context:
            model = "model's" if role == req.driver else f"{role} model's"
            return ValueError(
                f"max_tokens: prompt ({count} tokens) plus max_tokens exceed the {model} "
                f"context ({context})"
            )
    return None


def stops(req: GenerationRequest) -> list[str]:
    """The request's stop strings; a plain base answering messages stops at the next turn."""
    found = list(req.sampling.stop)
    if req.messages is not None and req.driver == "base":
        found += [s for s in transcript_stops(req.messages) if s not in found]
    return found


def stop_context(req: GenerationRequest) -> str:
    """A transcript's closing line break: a base answer that opens with "User:" is a next
    turn too, and "\\nUser:" must find it."""
    if req.messages is not None and req.driver == "base":
        return base_prompt_text(messages=req.messages)[-1:]
    return ""


class Admitting:
    """Requests being opened. A tick that takes first steps waits for them, at most
    `limits.join_ms`: HTTP requests sent at once reach the engine a few ms apart and their
    opens leave in two or three calls; without the wait the late ones stayed a run-ahead
    burst behind, and the batch took one more call at its end for them alone. A running
    batch does not wait."""

    def __init__(self) -> None:
        self.pending: set[asyncio.Future] = set()

    def __len__(self) -> int:
        return len(self.pending)

    def begin(self) -> asyncio.Future:
        admitted = asyncio.get_running_loop().create_future()
        self.pending.add(admitted)
        return admitted

    def end(self, admitted: asyncio.Future) -> None:
        self.pending.discard(admitted)
        admitted.set_result(None)

    async def join(self, active: list[Sequence], join_ms: float) -> None:
        if not self.pending or join_ms == 0:
            return
        if any(s.steps == 0 and s.status is Status.RUNNING for s in active):
            await asyncio.wait(list(self.pending), timeout=join_ms / 1000)


class Waiting:
    """Requests over the live limit, first come first served (`limits.max_queue`,
    `limits.queue_timeout_s`).

    A freed slot goes to the head of the queue (`grant`) and is held for it (`reserved`)
    until its request starts opening, so a request that arrives meanwhile cannot take it; a
    waiter that leaves gives its place, or its slot, back. Nothing is opened on a worker
    while a request waits, so a client that leaves costs nothing.
    """

    def __init__(self, limits: Limits, free: Callable[[], int]) -> None:
        self.limits = limits
        self.free = free  # slots free now, reservations counted as taken
        self.queue: deque[asyncio.Future] = deque()
        self.reserved = 0

    def __len__(self) -> int:
        return len(self.queue)

    async def take(self) -> float:
        """A slot for one request: at once when one is free and nobody waits, else in turn.
        Returns the seconds waited; raises EngineOverloaded when the queue is full or the
        wait reaches `queue_timeout_s`."""
        limits = self.limits
        if not self.queue and self.free() > 0:
            return 0.0
        if len(self.queue) >= limits.max_queue:
            why = f" and {limits.max_queue} waiting" if limits.max_queue else ""
            raise EngineOverloaded(limits.max_concurrency, why=why)
        turn = asyncio.get_running_loop().create_future()
        self.queue.append(turn)
        start = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(turn), limits.queue_timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self.reserved -= 1  # granted as it gave up: the slot goes to the next one
                self.grant()
            else:
                self._drop(turn)
            if isinstance(exc, asyncio.TimeoutError):
                retry = max(1, math.ceil(limits.queue_timeout_s / 10))
                raise EngineOverloaded(
                    limits.max_concurrency, retry,
                    f"; waited {limits.queue_timeout_s:g} s in the queue",
                ) from None
            raise
        self.reserved -= 1  # the caller starts opening now, in the same turn of the loop
        return time.monotonic() - start

    def grant(self) -> None:
        """Hand the slots that are free to the requests at the head of the queue."""
        while self.queue and self.free() > 0:
            turn = self.queue.popleft()
            if not turn.done():
                turn.set_result(None)
                self.reserved += 1

    def close(self, error: BaseException) -> None:
        """The engine stops: every waiting request fails with `error`."""
        while self.queue:
            turn = self.queue.popleft()
            if not turn.done():
                turn.set_exception(error)

    def _drop(self, turn: asyncio.Future) -> None:
        if not turn.done():
            turn.cancel()
        if turn in self.queue:
            self.queue.remove(turn)
