"""The engine's calls to its workers: sent at once, timed, watched by the supervisor, and
batched — a tick's asks of one role and method leave as one call, the opens of one turn of
the loop as one `open_many`, a tick's closes as one `close_many` that no tick waits for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from junction.services.handles import Handle
from junction.services.protocol import Method, Worker
from junction.shared.types import Failure

if TYPE_CHECKING:
    from junction.gateway.sequence import Sequence
    from junction.gateway.supervision import Supervisor


class Timer(Protocol):
    def on_actor_call(self, role: str, seconds: float) -> None: ...


@dataclass
class Batch:
    """Requests for one worker method, sent as one call."""

    role: str
    method: Method
    seqs: list[Sequence] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)

    def add(self, seq: Sequence, request: Any) -> None:
        self.seqs.append(seq)
        self.requests.append(request)


class Calls:
    def __init__(self, workers: dict[str, Handle], supervisor: Supervisor, timer: Timer) -> None:
        self.workers = workers
        self.supervisor = supervisor
        self.timer = timer
        # Calls no request awaits (closes being answered, opens being handed out): kept here
        # until done, and awaited by `drain`.
        self.in_flight: set[asyncio.Future] = set()
        # Opens asked for in this turn of the loop, by role: they leave as one call.
        self._opening: dict[str, list[tuple[tuple, asyncio.Future]]] = {}

    def send(self, role: str, method: Method, *args: Any) -> Awaitable[Any]:
        """Send a call to a worker now; returns what to await for its answer."""
        start = time.perf_counter()
        try:
            pending = self.workers[role].call(method, *args)
        except Exception as exc:  # noqa: BLE001 - answered like a call that failed remotely
            pending = asyncio.get_running_loop().create_future()
            pending.set_exception(exc)
        return self._answer(role, start, pending)

    async def call(self, role: str, method: Method, *args: Any) -> Any:
        return await self.send(role, method, *args)

    async def _answer(self, role: str, start: float, pending: Awaitable[Any]) -> Any:
        try:
            out = await pending
        except Exception as exc:
            self.supervisor.failed(role, exc)
            raise
        finally:
            self.timer.on_actor_call(role, time.perf_counter() - start)
        self.supervisor.answered(role)
        return out

    async def batched(self, batches: list[Batch]) -> list[list | None]:
        """One call per batch, all sent at once; each batch's answers, in order (None where
        its call failed). A failed call fails only its requests, a runner's Failure only its
        own.

        Every call is sent before this coroutine first waits: the commits of the last tick
        woke their streams, which run before any task created now, so a call sent from a
        task would wait for all of them to write their events, the worker idle.
        """
        answers = [self.send(b.role, b.method, b.requests) for b in batches]
        outs = await asyncio.gather(*answers, return_exceptions=True)
        results: list[list | None] = []
        for batch, out in zip(batches, outs, strict=True):
            if isinstance(out, BaseException):
                self.supervisor.lost(batch.role, batch.seqs, out)
                results.append(None)
                continue
            by_id = {s.id: s for s in batch.seqs}
            for res in out:
                if isinstance(res, Failure):
                    by_id[res.seq_id].finish(
                        "error", error=f"{batch.role} worker failed: {res.error}"
                    )
            results.append([res for res in out if not isinstance(res, Failure)])
        return results

    def open(self, role: str, *args: Any) -> asyncio.Future:
        """One request's open on `role`'s worker (its prompt length, when answered). The
        opens asked for in one turn of the loop leave together at its end, as one call."""
        loop = asyncio.get_running_loop()
        queued = self._opening.setdefault(role, [])
        if not queued:
            loop.call_soon(self._send_opens, role)
        answer = loop.create_future()
        queued.append((args, answer))
        return answer

    def _send_opens(self, role: str) -> None:
        queued = self._opening.pop(role, [])
        call = self.background(self.send(role, Worker.open_many, [a for a, _ in queued]))

        def deliver(call: asyncio.Future) -> None:
            failed = None if call.cancelled() else call.exception()
            counts = None if call.cancelled() or failed is not None else call.result()
            # Opened for a request that went away meanwhile (its client left while it was
            # admitted): closed again at once, so its worker does not keep it.
            abandoned = []
            for (args, answer), count in zip(queued, counts or [None] * len(queued), strict=True):
                if answer.done():
                    if isinstance(count, int):
                        abandoned.append(args[0])
                elif counts is None:
                    if failed is None:
                        answer.cancel()
                    else:
                        answer.set_exception(failed)
                elif isinstance(count, BaseException):
                    answer.set_exception(count)
                else:
                    answer.set_result(count)
            if abandoned:
                self.background(self.send(role, Worker.close_many, abandoned))

        call.add_done_callback(deliver)

    async def close(self, seq_id: str, roles: Iterable[str]) -> None:
        await asyncio.gather(
            *(self.call(role, Worker.close, seq_id) for role in roles), return_exceptions=True
        )

    def close_many(self, held: dict[str, list[str]]) -> list[Awaitable[Any]]:
        """Each worker's closes in one call, sent now; what to await for their answers."""
        return [self.send(role, Worker.close_many, ids) for role, ids in held.items()]

    def background(self, call: Awaitable[Any]) -> asyncio.Future:
        """Run a call no request awaits to its end (`drain` waits for it)."""
        task = asyncio.ensure_future(call)
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)
        return task

    async def drain(self) -> None:
        await asyncio.gather(*self.in_flight, return_exceptions=True)
