"""The decode loop: every live request advances by one step per tick, in one batched call.

One tick, for all live requests at once:
  1. each driver model (the base; the guidance model for the `guidance` policy) takes one
     batched step and returns compact top-k summaries;
  2. each request's policy decides whether this step is a junction;
  3. junctions consult their alignment signal, batched per worker: one `value.score`, one
     `guidance.step` (BlendIn) and one `guidance.write_words` (Nudging) call per tick;
  4. each request commits its choice, streams an event and counts it; finished or cancelled
     requests free their caches on every worker.
Workers are reached through handles (`services.handles`): in-process runners or Ray actors.
Between junctions the base may run ahead several steps in one call (`gateway.run_ahead`);
those steps are committed first, one by one, as ticks of their own would commit them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol

import torch

from gateway.pieces import at_answer_start, piece_for, spaced_for_base, step_logprobs
from gateway.run_ahead import run_ahead
from gateway.sequence import GenerationRequest, Sequence, Status
from gateway.stopping import Stopping
from gateway.supervision import RETRY_SECONDS, Supervisor
from services.handles import Handle
from shared.calibration import Calibration
from shared.config import BLEND_POLICIES, VALUE_POLICIES, Limits, PolicyConfig
from shared.prompts import base_prompt_text, transcript_stops
from shared.steering import (
    EntropyWindow,
    blendin_choose,
    junction_kind,
    sia_choose,
    topk_sample,
)
from shared.types import (
    EOS_TEXT,
    Commit,
    Failure,
    GenerationResult,
    ModelInfo,
    ScoreRequest,
    ScoreResult,
    StepRequest,
    StepResult,
    TokenEvent,
    WordRequest,
    WordResult,
    one_line,
)

log = logging.getLogger(__name__)


class EngineOverloaded(Exception):
    """Too many live requests; the caller should retry after `retry_after` seconds."""

    def __init__(self, limit: int, retry_after: int = 1) -> None:
        super().__init__(f"at most {limit} concurrent requests; retry later")
        self.retry_after = retry_after


class WorkerDown(Exception):
    """A role the request needs is down (a new worker is starting); retry later."""

    def __init__(self, role: str, reason: str, retry_after: int = 5) -> None:
        super().__init__(f"the {role} worker is down ({reason}); retry later")
        self.retry_after = retry_after


class Observer(Protocol):
    def on_token(self, seq: Sequence, event: TokenEvent) -> None: ...
    def on_finish(self, seq: Sequence, result: GenerationResult) -> None: ...
    def on_actor_call(self, role: str, seconds: float) -> None: ...


class NullObserver:
    def on_token(self, seq: Sequence, event: TokenEvent) -> None:
        pass

    def on_finish(self, seq: Sequence, result: GenerationResult) -> None:
        pass

    def on_actor_call(self, role: str, seconds: float) -> None:
        pass


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
        # Calls no request awaits (closes being answered, opens being handed out): kept here
        # until done, and awaited by `close`.
        self._in_flight: set[asyncio.Future] = set()
        # Opens asked for in this turn of the loop, by role: they leave as one call (`_open_on`).
        self._opening: dict[str, list[tuple[tuple, asyncio.Future]]] = {}
        # Requests being opened (`submit`): each future is done once its request is live (or
        # refused). A tick that takes first steps waits for them (`_join_admissions`).
        self._admitting: set[asyncio.Future] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self.stopped: str | None = None  # why the decode loop ended, if it did (a bug)
        self.supervisor = Supervisor(workers, self.infos, self.limits.recovery_seconds)
        # Overlapped guidance (`_overlapped`) only where base and guidance run in parallel.
        self._overlap = self.limits.overlap_guidance and all(
            getattr(workers.get(role), "parallel", False) for role in ("base", "guidance")
        )
        # SIA's target_ratio: thresholds calibrated for this base (from the value worker), and
        # per top-k width the server-wide window of recent base entropies of all requests.
        self.calibration: Calibration | None = None
        self.entropies: defaultdict[int, EntropyWindow] = defaultdict(EntropyWindow)

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        for role, handle in self.workers.items():
            self.infos[role] = await handle.call("info")
        self.calibration = self._calibration_for_base()
        self._task = asyncio.create_task(self._run())
        self._task.add_done_callback(self._loop_ended)

    @property
    def down(self) -> dict[str, str]:
        """What keeps the engine from serving every policy: roles that are down, a dead loop."""
        loop = {"decode_loop": self.stopped} if self.stopped else {}
        return {**loop, **self.supervisor.down}

    def _calibration_for_base(self) -> Calibration | None:
        """The value model's calibration, if it was measured on the base being served."""
        value = self.infos.get("value")
        if value is None or value.calibration is None or "base" not in self.infos:
            return None
        calibration = Calibration.from_dict(value.calibration)
        if calibration.base != self.infos["base"].name:
            log.warning("ignoring the SIA calibration: it was measured on %s, not on %s",
                        calibration.base, self.infos["base"].name)
            return None
        return calibration

    def sia_info(self) -> dict:
        """How `target_ratio` finds its entropy threshold (for /info)."""
        cal = self.calibration
        return {
            "calibration": cal.to_dict() if cal else None,
            "running_quantile": {
                str(k): {"entropies": len(w), "window": w.size} for k, w in self.entropies.items()
            },
        }

    async def close(self) -> None:
        """Stop the loop, then cancel and free whatever is still live."""
        self._closed = True
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.supervisor.close()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        for seq in self.live.values():
            seq.finish("cancelled")
        self._reap()
        await asyncio.gather(*self._in_flight, return_exceptions=True)

    # ----------------------------------------------------------------- requests
    async def submit(self, req: GenerationRequest) -> Sequence:
        """Admit a request: validate it, open it on its workers, queue it for the next tick."""
        missing = [role for role in req.roles if role not in self.workers]
        if missing:
            hint = " (train one with `junction train-value`)" if "value" in missing else ""
            raise ValueError(f"policy: {req.policy.policy} needs a {missing[0]} model{hint}")
        if req.sampling.max_tokens > self.limits.max_tokens:
            raise ValueError(f"max_tokens: at most {self.limits.max_tokens}")
        if self.running() + len(self._admitting) >= self.limits.max_concurrency:
            raise EngineOverloaded(self.limits.max_concurrency)
        if self._closed or self.stopped:
            raise RuntimeError(self.stopped or "the engine is shut down")
        down = next((r for r in req.roles if r in self.supervisor.down), None)
        if down is not None:
            raise WorkerDown(down, self.supervisor.down[down])
        admitted = asyncio.get_running_loop().create_future()
        self._admitting.add(admitted)
        try:
            seq = await self._open(req)
            if not self._closed:
                self.live[seq.id] = seq
                self._wake.set()
        finally:
            self._admitting.discard(admitted)
            admitted.set_result(None)
        if self._closed:  # shut down while this request was being opened
            await self._close_on(seq.id, req.roles)
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

    def cancel(self, seq: Sequence) -> None:
        """Stop a request (e.g. its client went away); its caches are freed within a tick."""
        if seq.status is Status.RUNNING:
            seq.cancelled = True
            self._wake.set()

    async def _open(self, req: GenerationRequest) -> Sequence:
        seed = req.sampling.seed
        if seed is None and req.draws:
            seed = secrets.randbits(63)  # its own random stream, recorded in the result
        counts = await asyncio.gather(
            *(
                self._open_on(role, req.request_id, req.prompt, req.messages, seed)
                for role in req.roles
            ),
            return_exceptions=True,
        )
        problem = next((c for c in counts if isinstance(c, BaseException)), None)
        if problem is None:
            problem = self._prompt_problem(dict(zip(req.roles, counts, strict=True)), req)
        if problem is not None:
            await self._close_on(req.request_id, req.roles)
            raise problem
        prompt_tokens = counts[0]  # the driver's: req.roles starts with it
        policy = req.policy
        seq = Sequence(
            req=req,
            prompt_tokens=prompt_tokens,
            stopping=Stopping(req.sampling.max_tokens, self._stops(req), self._stop_context(req)),
            families={role: self.infos[role].family for role in req.roles},
            seed=seed,
        )
        if policy.policy in VALUE_POLICIES and req.value_temperature > 0 and seed is not None:
            seq.generator = torch.Generator().manual_seed(seed)
        return seq

    def _prompt_problem(self, counts: dict[str, int], req: GenerationRequest) -> ValueError | None:
        """Why a prompt of this length cannot be served, if it cannot.

        The driver's prompt is held to the gateway's limit; every model that reads the text
        (the guidance and value models too, each in its own tokens) must fit the prompt plus
        max_tokens in its context, or it would run past what it was trained on.
        """
        prompt_tokens = counts[req.driver]
        limit = min(self.limits.max_prompt_tokens, self.infos[req.driver].max_context)
        if prompt_tokens > limit:
            return ValueError(f"prompt: {prompt_tokens} tokens, at most {limit}")
        for role, count in counts.items():
            context = self.infos[role].max_context
            if count + req.sampling.max_tokens > context:
                model = "model's" if role == req.driver else f"{role} model's"
                return ValueError(
                    f"max_tokens: prompt ({count} tokens) plus max_tokens exceed the {model} "
                    f"context ({context})"
                )
        return None

    @staticmethod
    def _stops(req: GenerationRequest) -> list[str]:
        """The request's stop strings; a plain base answering messages stops at the next turn."""
        stops = list(req.sampling.stop)
        if req.messages is not None and req.driver == "base":
            stops += [s for s in transcript_stops(req.messages) if s not in stops]
        return stops

    @staticmethod
    def _stop_context(req: GenerationRequest) -> str:
        """A transcript's closing line break: a base answer that opens with "User:" is a
        next turn too, and "\nUser:" must find it."""
        if req.messages is not None and req.driver == "base":
            return base_prompt_text(messages=req.messages)[-1:]
        return ""

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

    def _loop_ended(self, task: asyncio.Task) -> None:
        """The loop ends only at close(); if it ends otherwise, say why and fail its requests."""
        if self._closed:
            return
        exc = None if task.cancelled() else task.exception()
        self.stopped = f"the decode loop stopped: {one_line(exc) if exc else 'cancelled'}"
        log.error("%s", self.stopped, exc_info=exc)
        for seq in self.live.values():
            seq.finish("error", error=self.stopped)

    def _active(self) -> list[Sequence]:
        """Live requests that are not being closed."""
        return [s for s in self.live.values() if s.id not in self._closing]

    async def _tick(self) -> None:
        await self._join_admissions()
        self._reap()
        active = self._active()  # recovery finishes requests at most: none starts closing
        await self.supervisor.recover(active, self._call)
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
        values, blends, words = await self._consult(seqs, steps, kinds, early)
        for s in seqs:
            if s.status is Status.RUNNING and not s.lost:
                self._isolated(s, self._advance, s, steps[s.id], kinds[s.id], values, blends, words)
        self._reap()

    async def _join_admissions(self) -> None:
        """A tick that takes first steps waits for the requests being opened, at most
        `limits.join_ms`, so that requests that arrive together start together.

        HTTP requests sent at once reach the engine a few ms apart, and their opens leave in
        two or three calls. Without the wait, the first tick started with the first ones; the
        others took their first step in the next call, while the first ones ran ahead, and
        stayed a burst behind: at the end the batch took one more call for them alone
        (BENCHMARKS.md, "Requests that start together"). A running batch does not wait: a
        request that arrives then takes its first step at its next call.
        """
        if not self._admitting or self.limits.join_ms == 0:
            return
        if any(s.steps == 0 and s.status is Status.RUNNING for s in self._active()):
            await asyncio.wait(list(self._admitting), timeout=self.limits.join_ms / 1000)

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
        """Step 1: one batched step per driver model; with it, the guidance's step for the
        requests likely to meet a confidence junction now (`_overlapped`).

        Returns the driver steps and those early guidance steps, both by request id.
        """
        calls = {}
        for role in ("base", "guidance"):
            group = [s for s in seqs if s.req.driver == role]
            if group:
                reqs = [
                    StepRequest(
                        s.id,
                        k=s.policy.top_k,
                        temperature=s.req.sampling.temperature,
                        top_p=s.req.sampling.top_p,
                        append=s.unseen(role),
                        logprobs=s.req.sampling.logprobs,
                        entropy_k=s.policy.entropy_k,
                        ahead=run_ahead(s, self._fixed_threshold(s.policy), self.limits),
                    )
                    for s in group
                ]
                calls[role] = (group, reqs)
        ahead = self._overlapped(seqs)
        if ahead:
            calls["guidance/early"] = (ahead, [self._guidance_step(s) for s in ahead])
        results = await self._batched_calls({r: ("step", c) for r, c in calls.items()})
        early = {res.seq_id: res for res in results.pop("guidance/early", [])}
        return {res.seq_id: res for group in results.values() for res in group}, early

    def _overlapped(self, seqs: list[Sequence]) -> list[Sequence]:
        """The BlendIn/hybrid requests whose guidance steps together with the base this tick.

        A confidence junction needs the guidance's next-token summary at the same text as the
        base's step, which does not depend on that step: only whether it is used does. So
        right after a confidence junction (they come in runs: the base stays unsure for a
        while) the guidance steps in the same round as the base, and the junction costs the
        slower call instead of the sum of both. Its answer is used only if this step is a
        confidence junction and the base did not run ahead past it (`_consult`); otherwise
        the guidance has only caught up with the text early, which it does at its next
        junction anyway, and the work is counted. Deterministic: the guidance's step is the
        same call at the same text either way (greedy summary, no random draw). Only where
        the two workers run in parallel (`Handle.parallel`: Ray actors, not in-process
        threads, which share one interpreter lock and took longer together than in turn).
        """
        if not self._overlap:
            return []
        return [
            s for s in seqs
            if s.last_kind == "guidance" and s.req.driver == "base"
            and s.policy.policy in BLEND_POLICIES and "guidance" not in s.lost
        ]

    @staticmethod
    def _guidance_step(seq: Sequence) -> StepRequest:
        """BlendIn's guidance call: its top-k at the shared text, the unseen text appended."""
        return StepRequest(seq.id, k=seq.policy.top_k, append=seq.unseen("guidance"))

    def _ran_ahead(self, seq: Sequence, step: StepResult) -> None:
        """Step 1, continued: commit the steps the driver ran ahead on its own, in order, as
        `_advance` commits a step without a junction (the driver already holds their tokens).

        Past a stop, max_tokens or a cancel the rest is dropped: the request is over, and
        closing it frees the driver's copy.
        """
        seq.work[f"{seq.req.driver}_tokens"] += step.processed + sum(
            e.processed for e in step.earlier
        )
        for earlier in step.earlier:
            if seq.status is not Status.RUNNING or seq.cancelled:
                return
            if self._junction(seq, earlier) is not None:  # the runner applies the same test
                raise RuntimeError("the driver ran ahead past a junction")
            self._advance(seq, earlier, None, {}, {}, {})
        if step.earlier:
            seq.synced[seq.req.driver] = len(seq.commits)

    def _junction(self, seq: Sequence, step: StepResult) -> str | None:
        """Step 2: the policy's junction test (`shared.steering.JUNCTION_TESTS`) for this step."""
        policy, top = seq.policy, step.top
        threshold = self._entropy_threshold(policy)
        if seq.req.driver == "base":
            self.entropies[policy.entropy_k].observe(top.entropy)
            if step.mid_char:
                return None  # never steer inside an unfinished UTF-8 character
        return junction_kind(policy.policy, top.entropy, top.top1_prob, threshold, policy.tau)

    def _entropy_threshold(self, policy: PolicyConfig) -> float:
        """SIA's H: the request's own; for a target_ratio the calibrated one, else the
        server-wide running quantile (never a per-request quota)."""
        fixed = self._fixed_threshold(policy)
        if fixed is not None:
            return fixed
        return self.entropies[policy.entropy_k].threshold(policy.target_ratio)

    def _fixed_threshold(self, policy: PolicyConfig) -> float | None:
        """H when it stays put from step to step (the request's own, or calibrated); None
        when it is the running quantile."""
        ratio = policy.target_ratio
        if ratio is None:
            return policy.entropy_threshold
        if self.calibration is not None and self.calibration.k == policy.entropy_k:
            return self.calibration.threshold(ratio)
        return None

    async def _consult(
        self,
        seqs: list[Sequence],
        steps: dict[str, StepResult],
        kinds: dict[str, str | None],
        early: dict[str, StepResult],
    ) -> tuple[dict[str, ScoreResult], dict[str, StepResult], dict[str, WordResult]]:
        """Step 3: junctions consult their signal, one batched call per worker and method
        (a guidance step taken early, in step 1, for this very step is used as it is)."""
        score, blend, write = [], [], []
        ready = {}
        for s in seqs:
            kind, top = kinds[s.id], steps[s.id].top
            if kind is None or s.policy.policy == "guidance" or s.lost:
                continue  # (a lost request takes this step again once its worker is back)
            if kind == "value":
                fam, n = s.families["base"], s.policy.entropy_k
                pairs = zip(top.ids[:n], top.texts[:n], strict=True)
                candidates = [Commit(t, (i,), fam) for i, t in pairs]
                score.append((s, ScoreRequest(s.id, candidates, append=s.unseen("value"),
                                              logprobs=top.logprobs[:n])))
            elif s.policy.policy in BLEND_POLICIES:
                if s.id in early and not steps[s.id].earlier:
                    ready[s.id] = early.pop(s.id)  # taken at this step's text
                else:
                    blend.append((s, self._guidance_step(s)))
            elif s.nudges.resumes(steps[s.id].sampled_text):
                kinds[s.id] = None  # the base resumes: its token starts the guidance's next word
            else:
                budget = s.req.sampling.max_tokens - s.stopping.tokens
                n = max(1, min(s.policy.nudge_max_tokens, budget))
                write.append((s, WordRequest(s.id, n, append=s.unseen("guidance"))))
        wanted = {"value": ("score", score), "guidance": ("step", blend)}
        wanted["guidance/words"] = ("write_words", write)
        results = await self._batched_calls(
            {
                key: (method, ([s for s, _ in pairs], [r for _, r in pairs]))
                for key, (method, pairs) in wanted.items()
                if pairs
            }
        )

        def by_id(key: str) -> dict:
            return {r.seq_id: r for r in results.get(key, [])}

        for seq_id, unused in early.items():  # the guidance caught up early: its work counts
            if (s := self.live.get(seq_id)) is not None:
                s.work["guidance_tokens"] += unused.processed
        return by_id("value"), by_id("guidance") | ready, by_id("guidance/words")

    def _advance(
        self,
        seq: Sequence,
        step: StepResult,
        kind: str | None,
        values: dict[str, ScoreResult],
        blends: dict[str, StepResult],
        words: dict[str, WordResult],
    ) -> None:
        """Step 4: commit the chosen piece, stream it, count it."""
        policy, top, driver = seq.policy, step.top, seq.req.driver
        seq.steps += 1
        piece = Commit(step.sampled_text, (step.sampled_id,), seq.families[driver])
        tokens, alpha, source, eos = 1, None, driver, step.sampled_text == EOS_TEXT
        if kind == "value" and seq.id in values:
            scored = values[seq.id]
            seq.work["value_tokens"] += scored.processed
            piece = self._sia_piece(seq, top, scored.values)
            source, eos = "value", piece.text == EOS_TEXT
        elif kind == "guidance" and seq.id in blends:
            guide = blends[seq.id]
            seq.work["guidance_tokens"] += guide.processed
            at_start = at_answer_start(seq)
            text, alpha = blendin_choose(
                top.texts,
                list(map(math.exp, top.logprobs)),
                guide.top.texts,
                list(map(math.exp, guide.top.logprobs)),
                policy.lam,
                alpha=policy.alpha,
                at_start=at_start,
            )
            piece = piece_for(text, top, seq.families["base"], guide, seq.families["guidance"])
            if at_start and text not in top.texts:
                piece = spaced_for_base(seq, piece)
            source, eos = "guidance", text == EOS_TEXT
        elif kind == "guidance" and seq.id in words:
            word = words[seq.id]
            seq.work["guidance_tokens"] += word.processed
            if word.commit.ids:
                piece, tokens = word.commit, len(word.commit.ids)
                if at_answer_start(seq):
                    piece = spaced_for_base(seq, piece)
                seq.nudges.nudged(piece.text, word.next_text)
            elif word.eos:
                piece = Commit(EOS_TEXT)
            # The guidance's end of text ends the answer, also right after a word (as both
            # references stop when the guidance model's completion stops).
            source, eos = "guidance", word.eos
        elif kind is None and policy.policy in VALUE_POLICIES and policy.sia_decode != "request":
            piece = self._sia_piece(seq, top, None)  # the paper's top-k sample between junctions
            eos = piece.text == EOS_TEXT
        if policy.policy == "nudging" and source == driver and seq.nudges.base_wrote():
            piece, eos = Commit(EOS_TEXT), True  # the same nudges again and again: a loop
        seq.last_kind = kind
        if kind is not None:
            seq.interventions += 1
            seq.by_kind[kind] += 1
        event = TokenEvent(
            index=seq.steps - 1,
            text=piece.text,
            source=source,
            junction=kind is not None,
            kind=kind,
            entropy=top.entropy,
            top1_prob=top.top1_prob,
            alpha=alpha,
        )
        if seq.req.sampling.logprobs is not None:
            event.logprobs = step_logprobs(step, piece, eos)
        seq.commit(piece, tokens, eos, event)
        if seq.id in words:
            seq.synced["guidance"] = len(seq.commits)  # the writer already holds its own word
        self.observer.on_token(seq, event)

    @staticmethod
    def _sia_piece(seq: Sequence, top: Any, values: list[float] | None) -> Commit:
        """SIA's choice among the base's top-k: by logit + β·V at a junction (`values`), or
        with no values a sample of the top-k at T (the paper's decoding elsewhere)."""
        policy, temperature = seq.policy, seq.req.value_temperature
        n = len(values) if values is not None else policy.entropy_k
        logprobs = torch.tensor(top.logprobs[:n])
        if values is None:
            pick = topk_sample(logprobs, temperature, seq.generator)
        else:
            pick = sia_choose(logprobs, torch.tensor(values), policy.beta,
                              temperature, seq.generator, policy.value_only)
        return Commit(top.texts[pick], (top.ids[pick],), seq.families["base"])

    # ----------------------------------------------------------------- plumbing
    async def _batched_calls(self, calls: dict[str, tuple[str, Any]]) -> dict[str, list]:
        """Run one call per worker concurrently; a failed call fails only its requests.

        Every call is sent before this coroutine first waits (`_send`). The commits of the
        last tick woke the streams of its requests, and those run before any task created
        now: a call sent from a task would wait for all of them to encode and write their
        events (up to 17 ms a call, timed, served `base` at 16 streams), the worker idle.
        """
        keys = list(calls)
        answers = [
            self._send(key.split("/")[0], method, reqs)
            for key, (method, (_, reqs)) in calls.items()
        ]
        outs = await asyncio.gather(*answers, return_exceptions=True)
        results = {}
        for key, out in zip(keys, outs, strict=True):
            role, group = key.split("/")[0], calls[key][1][0]
            if isinstance(out, BaseException):
                self.supervisor.lost(role, group, out)
                continue
            # A runner serves each sequence on its own: one that failed does not fail the rest.
            by_id = {s.id: s for s in group}
            for res in out:
                if isinstance(res, Failure):
                    by_id[res.seq_id].finish("error", error=f"{role} worker failed: {res.error}")
            results[key] = [res for res in out if not isinstance(res, Failure)]
        return results

    async def _call(self, role: str, method: str, *args: Any) -> Any:
        return await self._send(role, method, *args)

    def _send(self, role: str, method: str, *args: Any) -> Awaitable[Any]:
        """Send a call to a worker now; returns what to await for its answer."""
        start = time.perf_counter()
        try:
            pending = self.workers[role].call(method, *args)
        except Exception as exc:  # noqa: BLE001 - answered like a call that failed remotely
            pending = asyncio.get_running_loop().create_future()
            pending.set_exception(exc)
        return self._answer(role, start, pending)

    async def _answer(self, role: str, start: float, pending: Awaitable[Any]) -> Any:
        try:
            out = await pending
        except Exception as exc:
            self.supervisor.failed(role, exc)
            raise
        finally:
            self.observer.on_actor_call(role, time.perf_counter() - start)
        self.supervisor.answered(role)
        return out

    def _open_on(self, role: str, *args: Any) -> asyncio.Future:
        """One request's open on `role`'s worker (its prompt length, when answered).

        The opens asked for in one turn of the loop leave together as one `open_many` call at
        the end of the turn: requests that arrive together (HTTP requests read in one turn)
        cost the worker and the gateway one call, not one each (`services.many`).
        """
        loop = asyncio.get_running_loop()
        queued = self._opening.setdefault(role, [])
        if not queued:
            loop.call_soon(self._send_opens, role)
        answer = loop.create_future()
        queued.append((args, answer))
        return answer

    def _send_opens(self, role: str) -> None:
        queued = self._opening.pop(role, [])
        call = self._background(self._send(role, "open_many", [a for a, _ in queued]))

        def deliver(call: asyncio.Future) -> None:
            failed = None if call.cancelled() else call.exception()
            counts = None if call.cancelled() or failed is not None else call.result()
            # Opened for a request that went away meanwhile (its client disconnected while it
            # was admitted): closed again at once, so its worker does not keep it.
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
                self._background(self._send(role, "close_many", abandoned))

        call.add_done_callback(deliver)

    def _background(self, call: Awaitable[Any]) -> asyncio.Future:
        """Run a call no request awaits to its end (`close` waits for it)."""
        task = asyncio.ensure_future(call)
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return task

    async def _close_on(self, seq_id: str, roles: tuple[str, ...]) -> None:
        await asyncio.gather(
            *(self._call(role, "close", seq_id) for role in roles), return_exceptions=True
        )

    def _reap(self) -> None:
        """Free finished and cancelled requests on every worker that holds them.

        One call per worker for all of them (`close_many`), sent now; the loop goes on
        without waiting for the answers: a tick that waited took a round trip per request
        per worker before its next step (11-23 ms of a served 16-stream run whose requests
        end together, timed), and a Ray call costs ~0.3 ms of the worker's CPU and ~0.5 of
        the gateway's whatever it carries. Workers are told first and a request is forgotten
        once they have answered (`_forget`), so a reap cut short by shutdown leaves it in
        `live` for `close` to free.
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
        closes = [self._send(role, "close_many", ids) for role, ids in held.items()]
        self._background(self._forget(done, closes))

    async def _forget(self, done: list[Sequence], closes: list[Awaitable[Any]]) -> None:
        """Once their workers have answered the closes, forget the requests."""
        try:
            await asyncio.gather(*closes, return_exceptions=True)
        finally:
            self._closing.difference_update(s.id for s in done)
        for seq in done:
            if self.live.pop(seq.id, None) is not None:
                self.observer.on_finish(seq, seq.result())
