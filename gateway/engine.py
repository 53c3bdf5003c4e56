"""The decode loop: every live request advances by one step per tick, in one batched call.

One tick (`_tick`), for all live requests at once:
  1. each driver model (the base; the guidance model for the `guidance` policy) takes one
     batched step and returns compact top-k summaries; between junctions the base runs
     ahead several steps in one call (`gateway.run_ahead`), committed first, one by one;
  2. each request's policy decides whether this step is a junction;
  3. junctions consult their alignment signal, one batched call per worker and method;
  4. each request commits its choice, streams an event and counts it; finished or cancelled
     requests free their caches on every worker.
What differs between policies is their module's (`gateway.policies`); workers are reached
through handles (`services.handles`) by the calls of `gateway.calls`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from junction.gateway.admission import (
    Admitting,
    EngineOverloaded,
    Waiting,
    WorkerDown,
    check,
    open_request,
)
from junction.gateway.calls import Batch, Calls
from junction.gateway.observer import NullObserver, Observer
from junction.gateway.pieces import step_logprobs
from junction.gateway.policies import Policies
from junction.gateway.sequence import GenerationRequest, Sequence, Status
from junction.gateway.supervision import RETRY_SECONDS, Supervisor
from junction.services.handles import Handle
from junction.services.protocol import Method, Worker
from junction.shared.config import Limits
from junction.shared.types import (
    GenerationResult,
    ModelInfo,
    StepRequest,
    StepResult,
    TokenEvent,
    one_line,
)

__all__ = ["Engine", "EngineOverloaded", "NullObserver", "Observer", "WorkerDown"]

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        workers: dict[str, Handle],
        limits: Limits | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.workers = workers
        self.limits = limits or Limits()
        self.observer = observer or NullObserver()
        self.infos: dict[str, ModelInfo] = {}
        self.live: dict[str, Sequence] = {}
        # Requests whose closes are on their way (`_reap`): still live (their workers hold
        # them) until the workers answer, but no longer stepped or recovered.
        self._closing: set[str] = set()
        self._admitting = Admitting()
        self._waiting = Waiting(self.limits, self._free)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self.stopped: str | None = None  # why the decode loop ended, if it did (a bug)
        self.supervisor = Supervisor(workers, self.infos, self.limits.recovery_seconds)
        self.calls = Calls(workers, self.supervisor, self.observer)
        self.policies = Policies(self.infos)
        # Consults sent with the driver's step (`Policy.early`) only where the two workers
        # run in parallel: in-process runner threads share one interpreter lock.
        self._overlap = self.limits.overlap_guidance and all(
            getattr(workers.get(role), "parallel", False) for role in ("base", "guidance")
        )

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        for role, handle in self.workers.items():
            self.infos[role] = await handle.call(Worker.info)
        self.policies.start()
        self._task = asyncio.create_task(self._run())
        self._task.add_done_callback(self._loop_ended)

    @property
    def down(self) -> dict[str, str]:
        """What keeps the engine from serving every policy: roles that are down, a dead loop."""
        loop = {"decode_loop": self.stopped} if self.stopped else {}
        return {**loop, **self.supervisor.down}

    def info(self) -> dict[str, dict]:
        """What the policies share across requests (e.g. SIA's thresholds), for /info."""
        return self.policies.info()

    async def close(self) -> None:
        """Stop the loop, then cancel and free whatever is still live."""
        self._closed = True
        self._waiting.close(RuntimeError("the engine is shut down"))
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.supervisor.close()
        await self.calls.drain()
        for seq in self.live.values():
            seq.finish("cancelled")
        self._reap()
        await self.calls.drain()

    # ----------------------------------------------------------------- requests
    async def submit(self, req: GenerationRequest) -> Sequence:
        """Admit a request: check it, wait for a slot if none is free, open it on its
        workers, queue it for the next tick."""
        check(req, self.workers, self.limits)
        if self._closed or self.stopped:
            raise RuntimeError(self.stopped or "the engine is shut down")
        waited = await self._waiting.take()
        down = next((r for r in req.roles if r in self.supervisor.down), None)
        if self._closed or self.stopped or down is not None:
            self._waiting.grant()  # the slot it was given goes to the next one
            if down is None:
                raise RuntimeError(self.stopped or "the engine is shut down")
            raise WorkerDown(down, self.supervisor.down[down])
        self.observer.on_wait(waited)
        admitted = self._admitting.begin()
        try:
            seq = await open_request(req, self.calls, self.infos, self.limits, self.policies)
            if not self._closed:
                self.live[seq.id] = seq
                self._wake.set()
        finally:
            self._admitting.end(admitted)
            self._waiting.grant()  # (a request that failed to open leaves its slot)
        if self._closed:  # shut down while this request was being opened
            await self.calls.close(seq.id, req.roles)
            raise RuntimeError("the engine is shut down")
        return seq

    async def stream(self, seq: Sequence) -> AsyncIterator[TokenEvent | GenerationResult]:
        """Events of a request as they happen, ending with its result."""
        async for items in self.bursts(seq):
            for item in items:
                yield item

    async def bursts(self, seq: Sequence) -> AsyncIterator[list[TokenEvent | GenerationResult]]:
        """The same events, in the groups they were queued in (a run-ahead's steps come at
        once), so a stream can send each group in one write; the last ends with the result."""
        while True:
            items = [await seq.events.get()]
            while not seq.events.empty():
                items.append(seq.events.get_nowait())
            yield items
            if isinstance(items[-1], GenerationResult):
                return

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        seq = await self.submit(req)
        try:
            async for item in self.stream(seq):
                if isinstance(item, GenerationResult):
                    return item
        finally:
            self.cancel(seq)
        raise RuntimeError("unreachable")

    def running(self) -> int:
        """Requests holding a concurrency slot: finished ones are not waiting for their reap."""
        return sum(s.status is Status.RUNNING and not s.cancelled for s in self.live.values())

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    def _free(self) -> int:
        taken = self.running() + len(self._admitting) + self._waiting.reserved
        return self.limits.max_concurrency - taken

    def cancel(self, seq: Sequence) -> None:
        """Stop a request (e.g. its client went away); its caches are freed within a tick."""
        if seq.status is Status.RUNNING:
            seq.cancelled = True
            self._wake.set()
            self._waiting.grant()

    # ----------------------------------------------------------------- the loop
    async def _run(self) -> None:
        while True:
            if not self._active():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._tick()
            except Exception as exc:  # noqa: BLE001 - a bug outside any one request
                # The tick's requests may be half-advanced: fail them, keep serving new ones.
                log.exception("a decode tick failed; failing its %d requests", len(self.live))
                for seq in self.live.values():
                    seq.finish("error", error=f"internal error in the decode loop: {one_line(exc)}")
                await asyncio.sleep(RETRY_SECONDS)
            self._waiting.grant()  # the slots of the requests that ended

    def _loop_ended(self, task: asyncio.Task) -> None:
        """The loop ends only at close(); if it ends otherwise, say why and fail its requests."""
        if self._closed:
            return
        exc = None if task.cancelled() else task.exception()
        self.stopped = f"the decode loop stopped: {one_line(exc) if exc else 'cancelled'}"
        log.error("%s", self.stopped, exc_info=exc)
        for seq in self.live.values():
            seq.finish("error", error=self.stopped)
        self._waiting.close(RuntimeError(self.stopped))

    def _active(self) -> list[Sequence]:
        """Live requests that are not being closed."""
        return [s for s in self.live.values() if s.id not in self._closing]

    async def _tick(self) -> None:
        await self._admitting.join(self._active(), self.limits.join_ms)
        self._reap()
        active = self._active()  # recovery finishes requests at most: none starts closing
        await self.supervisor.recover(active, self.calls.call)
        seqs = [s for s in active if s.status is Status.RUNNING and not s.lost]
        if not seqs:
            if active:  # every live request waits for a worker to come back
                await asyncio.sleep(RETRY_SECONDS)
            return
        steps, early = await self._driver_steps(seqs)
        seqs = [s for s in seqs if s.id in steps]
        # A request whose own step raises fails alone (see _isolated); the others go on.
        for s in seqs:
            self._isolated(s, self._ran_ahead, s, steps[s.id])
        seqs = [s for s in seqs if s.status is Status.RUNNING and not s.cancelled]
        kinds = {s.id: self._isolated(s, self._junction, s, steps[s.id]) for s in seqs}
        answers = await self._consult(seqs, steps, kinds, early)
        for s in seqs:
            if s.status is Status.RUNNING and not s.lost:
                self._isolated(s, self._advance, s, steps[s.id], kinds[s.id], answers.get(s.id))
        self._reap()

    def _isolated(self, seq: Sequence, run: Any, *args: Any) -> Any:
        """`run(*args)` for one request; if it raises, that request fails with a clear error."""
        index = seq.steps  # the decode step being taken, as its token event would number it
        try:
            return run(*args)
        except Exception as exc:  # noqa: BLE001 - e.g. NaN probabilities from extreme options
            log.exception("request %s failed at step %d", seq.id, index)
            policy = seq.policy.policy
            seq.finish("error", error=f"{policy} step {index} failed: {one_line(exc)}")
            return None

    async def _driver_steps(
        self, seqs: list[Sequence]
    ) -> tuple[dict[str, StepResult], dict[str, StepResult]]:
        """Step 1: one batched step per driver model; with it, the consults that policies
        send before the step's junction is known (`Policy.early`). Both by request id."""
        drivers = {role: Batch(role, Worker.step) for role in ("base", "guidance")}
        early = Batch("guidance", Worker.step)
        for s in seqs:
            policy, driver = s.rule, s.req.driver
            drivers[driver].add(s, StepRequest(
                s.id,
                k=s.policy.top_k,
                temperature=s.req.sampling.temperature,
                top_p=s.req.sampling.top_p,
                append=s.unseen(driver),
                logprobs=s.req.sampling.logprobs,
                entropy_k=s.policy.entropy_k,
                ahead=policy.run_ahead(s, self.limits),
            ))
            if self._overlap and driver == "base" and (ask := policy.early(s)) is not None:
                early.add(s, ask)
        batches = [b for b in (*drivers.values(), early) if b.seqs]
        results = await self.calls.batched(batches)
        steps, early_steps = {}, {}
        for batch, out in zip(batches, results, strict=True):
            for res in out or ():
                (early_steps if batch is early else steps)[res.seq_id] = res
        return steps, early_steps

    def _ran_ahead(self, seq: Sequence, step: StepResult) -> None:
        """Step 1, continued: commit the steps the driver ran ahead on its own, in order, as
        `_advance` commits a step without a junction (the driver already holds their tokens).

        Past a stop, max_tokens or a cancel the rest is dropped: the request is over, and
        closing it frees the driver's copy.
        """
        driver = seq.req.driver
        seq.work[f"{driver}_tokens"] += step.processed + sum(e.processed for e in step.earlier)
        for earlier in step.earlier:
            if seq.status is not Status.RUNNING or seq.cancelled:
                return
            if self._junction(seq, earlier) is not None:  # the runner applies the same test
                raise RuntimeError("the driver ran ahead past a junction")
            self._advance(seq, earlier, None, None)
        if step.earlier:
            seq.synced[driver] = len(seq.commits)

    def _junction(self, seq: Sequence, step: StepResult) -> str | None:
        """Step 2: the policy's junction test; never inside an unfinished UTF-8 character of
        the base's. Every step is then shown to the policies' observers (SIA's thresholds)."""
        skip = seq.req.driver == "base" and step.mid_char
        kind = None if skip else seq.rule.junction(seq, step)
        self.policies.observe(seq, step)
        return kind

    async def _consult(
        self,
        seqs: list[Sequence],
        steps: dict[str, StepResult],
        kinds: dict[str, str | None],
        early: dict[str, StepResult],
    ) -> dict[str, Any]:
        """Step 3: each junction's ask, one batched call per worker and method (an answer
        already in hand, an early guidance step, is used as it is). Answers by request id."""
        batches: dict[tuple[str, Method], Batch] = {}
        answers: dict[str, Any] = {}
        for s in seqs:
            kind = kinds[s.id]
            if kind is None or s.lost:
                continue  # (a lost request takes this step again once its worker is back)
            ask = s.rule.consult(s, steps[s.id], kind, early.get(s.id))
            if ask is None:
                continue
            if ask.request is None:
                answers[s.id] = ask.answer
                early.pop(s.id, None)
            else:
                batches.setdefault((ask.role, ask.method), Batch(ask.role, ask.method)).add(
                    s, ask.request
                )
        for out in await self.calls.batched(list(batches.values())):
            answers.update((res.seq_id, res) for res in out or ())
        for seq_id, unused in early.items():  # the guidance caught up early: its work counts
            if (s := self.live.get(seq_id)) is not None:
                s.work["guidance_tokens"] += unused.processed
        return answers

    def _advance(self, seq: Sequence, step: StepResult, kind: str | None, answer: Any) -> None:
        """Step 4: commit the policy's choice, stream it, count it."""
        seq.steps += 1
        choice = seq.rule.choose(seq, step, kind, answer)
        seq.last_kind = kind
        if kind is not None:
            seq.interventions += 1
            seq.by_kind[kind] += 1
        event = TokenEvent(
            index=seq.steps - 1,
            text=choice.piece.text,
            source=choice.source,
            junction=kind is not None,
            kind=kind,
            entropy=step.top.entropy,
            top1_prob=step.top.top1_prob,
            alpha=choice.alpha,
        )
        if seq.req.sampling.logprobs is not None:
            event.logprobs = step_logprobs(step, choice.piece, choice.eos)
        seq.commit(choice.piece, choice.tokens, choice.eos, event)
        if choice.holder is not None:
            seq.synced[choice.holder] = len(seq.commits)  # it wrote the piece: it holds it
        self.observer.on_token(seq, event)

    # ----------------------------------------------------------------- freeing requests
    def _reap(self) -> None:
        """Free finished and cancelled requests on every worker that holds them.

        One call per worker for all of them, sent now; the loop goes on without waiting for
        the answers (a tick that waited took a round trip per request per worker before its
        next step). Workers are told first and a request is forgotten once they have
        answered (`_forget`), so a reap cut short by shutdown leaves it for `close` to free.
        """
        done = [s for s in self._active() if s.cancelled or s.status is Status.FINISHED]
        if not done:
            return
        held: defaultdict[str, list[str]] = defaultdict(list)
        for seq in done:
            seq.finish("cancelled")  # no-op when it already finished
            self._closing.add(seq.id)
            for role in seq.req.roles:
                held[role].append(seq.id)
        self.calls.background(self._forget(done, self.calls.close_many(held)))

    async def _forget(self, done: list[Sequence], closes: list[Awaitable[Any]]) -> None:
        """Once their workers have answered the closes, forget the requests."""
        try:
            await asyncio.gather(*closes, return_exceptions=True)
        finally:
            self._closing.difference_update(s.id for s in done)
        for seq in done:
            if self.live.pop(seq.id, None) is not None:
                self.observer.on_finish(seq, seq.result())
