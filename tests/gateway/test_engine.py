"""The decode loop on tiny models: every policy end to end, its counters, and its work."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
import torch

from junction.gateway.admission import stop_context, stops
from junction.gateway.engine import Engine, EngineOverloaded, NullObserver
from junction.gateway.sequence import GenerationRequest, Sequence
from junction.gateway.serving import admit
from junction.gateway.stopping import Stopping
from junction.services.handles import LocalHandle, WorkerRestarted
from junction.services.lm_runner import LMRunner
from junction.services.protocol import Worker, name_of
from junction.services.value_runner import ValueRunner
from junction.shared.bridge import TokenText
from junction.shared.config import Limits, ModelSpec, PolicyConfig, SamplingParams
from junction.shared.models import load_model
from junction.shared.prompts import build_prompt_ids
from junction.shared.types import EOS_TEXT, Commit, GenerationResult, TokenEvent
from junction.shared.value_model import build_value_model


@pytest.fixture()
def workers(tiny_gemma, tiny_llama):
    """Base = tiny Gemma (byte-fallback tokenizer); guidance = tiny Llama (byte-level BPE)."""
    base = load_model("base", ModelSpec(source=str(tiny_gemma.path)), progress=False)
    guidance = load_model("guidance", ModelSpec(source=str(tiny_llama.path)), progress=False)
    value_backbone = load_model("value", ModelSpec(source=str(tiny_gemma.path)), progress=False)
    runners = {
        "base": LMRunner(base, "base", chat=False),
        "guidance": LMRunner(guidance, "guidance", chat=True),
        "value": ValueRunner(value_backbone, build_value_model(value_backbone.model, seed=0)),
    }
    return runners


@contextlib.asynccontextmanager
async def started(workers, limits: Limits | None = None, parallel: bool = False):
    """A running engine over these runners, closed afterwards; `parallel`: the engine treats
    them as separate processes (as Ray actors are), so BlendIn overlaps its two calls."""
    engine = Engine({r: LocalHandle(w, parallel=parallel) for r, w in workers.items()}, limits)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


def tokens_only(**limits: Any) -> Limits:
    """Run-ahead bursts bounded by tokens alone, so their calls can be counted: not by
    `run_ahead_ms` too, which a loaded machine reaches sooner and splits a burst."""
    return Limits(**limits, run_ahead_ms=60_000.0)


async def final_items(engine: Engine, seqs: list[Sequence]) -> list:
    """Each request's stream read to its end: its last item (the result)."""
    results = []
    for seq in seqs:
        results.append([item async for item in engine.stream(seq)][-1])
    return results


def run(
    workers, *reqs: GenerationRequest, limits: Limits | None = None, parallel: bool = False
) -> list[GenerationResult]:
    async def main():
        async with started(workers, limits, parallel) as engine:
            return await asyncio.gather(*(engine.generate(r) for r in reqs))

    return asyncio.run(main())


def pushed_text(runner: LMRunner, prompt_ids: list[int], ids: list[int]) -> str:
    """The text of these ids as the runner's bridge renders them, one token at a time.

    A random tiny model emits invalid UTF-8 byte runs, which a whole-sequence decode renders
    differently from token-by-token decoding; comparing through the bridge compares tokens.
    """
    text = TokenText(runner.tokenizer, runner.family, prompt_ids, runner.loaded.eos_ids)
    return "".join(text.push(i) for i in ids)


def request(policy: str, max_tokens: int = 12, **options) -> GenerationRequest:
    return GenerationRequest(
        prompt="the cat sat on",
        sampling=SamplingParams(max_tokens=max_tokens, seed=0),
        policy=PolicyConfig(policy=policy, **options),
    )


def test_base_greedy_equals_transformers_generate(workers, tiny_gemma):
    (result,) = run(workers, request("base", max_tokens=16))
    ids = build_prompt_ids(tiny_gemma.tokenizer, prompt="the cat sat on", chat=False)
    out = tiny_gemma.model.generate(
        torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0
    )
    assert result.text == pushed_text(workers["base"], ids, out[0, len(ids):].tolist())
    assert result.finish_reason == "length"
    assert (result.steps, result.interventions) == (16, 0)
    assert result.work == {"base_tokens": len(ids) + 15, "value_tokens": 0, "guidance_tokens": 0}


def test_guidance_policy_is_the_guidance_models_own_greedy_output(workers, tiny_llama):
    (result,) = run(workers, request("guidance", max_tokens=10))
    ids = build_prompt_ids(tiny_llama.tokenizer, prompt="the cat sat on", chat=True)
    out = tiny_llama.model.generate(
        torch.tensor([ids]), max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0
    )
    assert result.text == pushed_text(workers["guidance"], ids, out[0, len(ids):].tolist())
    assert result.intervention_rate == 1.0
    assert result.work["base_tokens"] == 0


@pytest.mark.parametrize(
    ("policy", "options", "rate"),
    [
        ("base", {}, (0.0, 0.0)),
        # (sampled at junctions: the tiny model's argmax path runs into unfinished characters,
        # where no policy steers)
        ("dense", {"value_temperature": 1.0}, (1.0, 1.0)),
        ("sia", {"entropy_threshold": 0.0, "value_temperature": 1.0}, (1.0, 1.0)),  # H = 0
        ("sia", {"entropy_threshold": 100.0}, (0.0, 0.0)),  # above ln k: never
        ("blendin", {"tau": 1.0}, (1.0, 1.0)),  # a top-1 prob is below 1
        ("blendin", {"tau": 0.0}, (0.0, 0.0)),
        ("nudging", {"tau": 1.0}, (1.0, 1.0)),
        ("guidance", {}, (1.0, 1.0)),
    ],
)
def test_intervention_rate_follows_the_junction_test(workers, policy, options, rate):
    (result,) = run(workers, request(policy, **options))
    assert rate[0] <= result.intervention_rate <= rate[1]
    kind = "value" if policy in ("sia", "dense") else "guidance"
    assert result.by_kind[kind] == result.interventions
    assert sum(result.by_kind.values()) == result.interventions


def test_value_work_is_new_prefix_tokens_plus_k_per_junction(workers):
    k = 6
    (result,) = run(workers, request("dense", max_tokens=10, k=k, value_temperature=0.0))
    prompt = workers["base"].count_prompt("the cat sat on")
    steps = result.steps
    # Each junction scores k candidates; between junctions the prefix grows by one base token.
    # Not k full sequences, which would cost about k * (prompt + t) per step.
    assert result.work["value_tokens"] == prompt + (steps - 1) + k * steps
    assert result.work["value_tokens"] < k * prompt * steps


class RecordingRunner(LMRunner):
    """An LM runner that remembers how many tokens each sequence had in its cache at close."""

    held: dict[str, int]

    def close(self, seq_id: str) -> None:
        self.held = getattr(self, "held", {})
        if seq_id in self.seqs:
            self.held[seq_id] = self.seqs[seq_id].cached
        super().close(seq_id)


@pytest.mark.parametrize("policy", ["blendin", "nudging"])
def test_guidance_processes_each_token_it_holds_exactly_once(workers, policy):
    guidance = workers["guidance"]
    workers["guidance"] = RecordingRunner(guidance.loaded, "guidance", chat=True)
    req = request(policy, max_tokens=10, tau=1.0, k=20)
    (result,) = run(workers, req)
    assert result.interventions == result.steps
    # Consulted at every step, the guidance still only ran the text added since its last
    # call: in total exactly the tokens it holds (its chat prompt plus the shared text).
    # Re-encoding the whole text at each junction would cost about steps times as much.
    held = workers["guidance"].held[req.request_id]
    assert result.work["guidance_tokens"] == held
    assert held > workers["guidance"].count_prompt("the cat sat on")


def test_nudging_words_come_from_the_guidance_model(workers):
    (result,) = run(workers, request("nudging", max_tokens=12, tau=1.0))
    assert result.by_kind["guidance"] == result.interventions > 0
    assert result.work["guidance_tokens"] > 0
    assert result.completion_tokens <= 12


def test_stop_string_ends_the_request_and_cuts_the_text(workers):
    (free,) = run(workers, request("base", max_tokens=16))
    stop = free.text[3:6]
    req = request("base", max_tokens=16)
    req.sampling.stop = [stop]
    (result,) = run(workers, req)
    assert result.finish_reason == "stop"
    assert result.text == free.text[: free.text.index(stop)]


def test_concurrent_requests_share_ticks_and_give_the_same_text_as_alone(workers):
    alone = [run(workers, request(p, max_tokens=8))[0].text for p in ("base", "blendin")]
    together = run(workers, request("base", max_tokens=8), request("blendin", max_tokens=8))
    assert [r.text for r in together] == alone
    assert all(w.live() == 0 for w in workers.values())


def test_sia_without_a_value_model_is_a_clear_error(workers):
    del workers["value"]
    with pytest.raises(ValueError, match="policy: sia needs a value model"):
        run(workers, request("sia"))


def test_limits(workers):
    with pytest.raises(ValueError, match="max_tokens"):
        run(workers, request("base", max_tokens=50), limits=Limits(max_tokens=10))
    long = GenerationRequest(prompt="word " * 100, sampling=SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="prompt"):
        run(workers, long, limits=Limits(max_prompt_tokens=20))
    assert all(w.live() == 0 for w in workers.values())


def test_over_the_concurrency_limit_is_refused_and_nothing_leaks(workers):
    async def main():
        async with started(workers, Limits(max_concurrency=1, max_queue=0)) as engine:
            first = await engine.submit(request("base", max_tokens=50))
            with pytest.raises(EngineOverloaded) as refused:
                await engine.submit(request("base"))
            engine.cancel(first)
            [item async for item in engine.stream(first)]
            second = await engine.generate(request("base", max_tokens=2))  # room again
        return refused.value, second

    refused, second = asyncio.run(main())
    assert refused.retry_after >= 1
    assert second.completion_tokens == 2
    assert all(w.live() == 0 for w in workers.values())


class SlowCloses(LocalHandle):
    """Answers closes late (a busy worker, a slow network) and logs when calls leave."""

    def __init__(self, runner, log: list) -> None:
        super().__init__(runner)
        self.log = log

    def call(self, method, *args):
        answer = super().call(method, *args)
        self.log.append(f"{name_of(method)} sent")
        return self._late(answer) if method is Worker.close_many else answer

    async def _late(self, answer):
        out = await answer
        await asyncio.sleep(0.3)
        self.log.append("close answered")
        return out


def test_the_loop_goes_on_while_closes_are_answered(workers):
    """A finished request's closes are sent at once, and the next steps do not wait for
    their answers; the request stays live (held by its worker) until they come."""
    log: list = []
    short, long = request("base", max_tokens=2), request("base", max_tokens=12)

    async def main():
        engine = Engine({"base": SlowCloses(workers["base"], log)}, Limits(run_ahead=0))
        await engine.start()
        try:
            first = await engine.generate(short)
            still_live = short.request_id in engine.live  # its close is not answered yet
            return first, await engine.generate(long), still_live
        finally:
            await engine.close()

    both = asyncio.run(main())
    assert both[2]
    sent, answered = log.index("close_many sent"), log.index("close answered")
    assert log[sent:answered].count("step sent") >= 5  # the long request went on meanwhile
    alone = [run({"base": workers["base"]}, r)[0].text for r in (request("base", max_tokens=2),
                                                                 request("base", max_tokens=12))]
    assert [both[0].text, both[1].text] == alone
    assert workers["base"].live() == 0


def test_requests_that_arrive_together_open_and_close_in_one_call_per_worker(workers):
    log: list = []

    async def main():
        engine = Engine({"base": SlowCloses(workers["base"], log)}, Limits())
        await engine.start()
        try:
            reqs = [request("base", max_tokens=200) for _ in range(4)]
            seqs = await asyncio.gather(*(engine.submit(r) for r in reqs))  # one turn
            for seq in seqs:  # in one go: the next reap finds all four
                engine.cancel(seq)
            return await final_items(engine, seqs)
        finally:
            await engine.close()

    results = asyncio.run(main())
    assert [r.finish_reason for r in results] == ["cancelled"] * 4
    assert log.count("open_many sent") == 1 and log.count("close_many sent") == 1
    assert workers["base"].live() == 0


class SlowOpens(LocalHandle):
    """Answers its n-th open `delays[n]` seconds late (a long prompt to tokenize, a busy
    worker) and logs each call as (method, requests in it)."""

    def __init__(self, runner, log: list, delays: list[float]) -> None:
        super().__init__(runner)
        self.log, self.delays = log, delays

    def call(self, method, *args):
        answer = super().call(method, *args)
        count = len(args[0]) if args and isinstance(args[0], list) else 1
        self.log.append((name_of(method), count))
        return self._late(answer) if method is Worker.open_many else answer

    async def _late(self, answer):
        out = await answer
        await asyncio.sleep(self.delays.pop(0))
        self.log.append(("open answered", len(out)))
        return out


@pytest.mark.parametrize("join_ms", [2000.0, 0.0])
def test_requests_sent_a_moment_apart_start_together_and_run_ahead_in_step(workers, join_ms):
    """Two requests whose opens leave in two calls (HTTP requests read a moment apart), the
    second answered later: the first tick waits for it (`limits.join_ms`), so both take
    their first step in one call and every later call carries both. Without the wait the
    second starts a call late, runs a burst behind, and the batch takes one more call at its
    end for it alone."""
    log: list = []
    reqs = [request("base", max_tokens=10) for _ in range(2)]

    async def main():
        handle = SlowOpens(workers["base"], log, delays=[0.0, 0.3])
        engine = Engine({"base": handle}, tokens_only(join_ms=join_ms))
        await engine.start()
        try:
            first = asyncio.ensure_future(engine.generate(reqs[0]))
            await asyncio.sleep(0)  # it asks for its open
            await asyncio.sleep(0)  # the open leaves, alone
            second = asyncio.ensure_future(engine.generate(reqs[1]))
            return [await first, await second]
        finally:
            await engine.close()

    results = asyncio.run(main())
    opens = [n for method, n in log if method == "open_many"]
    steps = [n for method, n in log if method == "step"]
    assert opens == [1, 1]
    if join_ms:
        assert steps == [2, 2]  # a first step each, then nine more each (run-ahead 8)
    else:
        assert steps[0] == 1 and len(steps) > 2
    alone = [run({"base": workers["base"]}, request("base", max_tokens=10))[0].text] * 2
    assert [r.text for r in results] == alone
    assert workers["base"].live() == 0


def test_the_n_choices_of_one_body_open_in_one_call_and_start_together(workers):
    """`admit` submits a body's copies together: one open for all, one first step for all
    (one after another, each opened alone and started a call later)."""
    log: list = []

    async def main():
        engine = Engine({"base": SlowOpens(workers["base"], log, delays=[0.0])}, tokens_only())
        await engine.start()
        try:
            seqs = await admit(engine, [request("base", max_tokens=10) for _ in range(3)])
            return await final_items(engine, seqs)
        finally:
            await engine.close()

    results = asyncio.run(main())
    assert [r.finish_reason for r in results] == ["length"] * 3
    assert [n for method, n in log if method == "open_many"] == [3]
    assert [n for method, n in log if method == "step"] == [3, 3]  # a first step, then 9


def test_a_running_batch_does_not_wait_for_a_request_being_opened(workers):
    """Only a tick that takes first steps waits for opens: a request already decoding goes
    on while a newcomer's open is slow, and the newcomer joins at the next call."""
    log: list = []

    async def main():
        handle = SlowOpens(workers["base"], log, delays=[0.0, 0.3])
        engine = Engine({"base": handle}, Limits(join_ms=2000, run_ahead=0))
        await engine.start()
        try:
            running = await engine.submit(request("base", max_tokens=60))
            events = engine.stream(running)
            await anext(events)  # it has taken its first step
            newcomer = asyncio.ensure_future(engine.generate(request("base", max_tokens=4)))
            rest = [item async for item in events]
            return rest[-1], await newcomer
        finally:
            await engine.close()

    results = asyncio.run(main())
    assert [r.finish_reason for r in results] == ["length", "length"]
    sent = [n for n, call in enumerate(log) if call == ("open_many", 1)][1]  # the newcomer's
    answered = log.index(("open answered", 1), sent)
    assert [m for m, _ in log[sent:answered]].count("step") >= 5


def test_a_request_cancelled_while_it_opens_leaves_nothing_on_its_worker(workers):
    """A client that disconnects during admission: its open, already sent with others, is
    answered for nobody, and the engine closes it again."""

    async def main():
        async with started(workers) as engine:
            admitting = asyncio.create_task(engine.submit(request("base", max_tokens=4)))
            await asyncio.sleep(0)  # it asks for its open
            await asyncio.sleep(0)  # the open leaves
            admitting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await admitting
            for _ in range(100):  # the open is answered, then closed
                if workers["base"].live() == 0 and not engine.calls.in_flight:
                    break
                await asyncio.sleep(0.01)
            return workers["base"].live(), engine.live

    assert asyncio.run(main()) == (0, {})


class PickyRunner(LMRunner):
    """Refuses to open one prompt, as a worker whose tokenizer rejects a text would."""

    def open(self, seq_id: str, prompt: str | None = None, *args) -> int:
        if prompt == "refuse me":
            raise ValueError("prompt: this worker refuses it")
        return super().open(seq_id, prompt, *args)


def test_a_request_its_worker_cannot_open_fails_alone_among_those_opened_with_it(workers):
    picky = PickyRunner(workers["base"].loaded, "base", chat=False)
    refused = GenerationRequest(prompt="refuse me", sampling=SamplingParams(max_tokens=4))

    async def main():
        async with started({"base": picky}) as engine:
            return await asyncio.gather(
                engine.generate(request("base", max_tokens=4)),
                engine.generate(refused),
                engine.generate(request("base", max_tokens=4)),
                return_exceptions=True,
            )

    first, error, third = asyncio.run(main())
    assert isinstance(error, ValueError) and str(error) == "prompt: this worker refuses it"
    (alone,) = run({"base": picky}, request("base", max_tokens=4))
    assert first.text == third.text == alone.text
    assert picky.live() == 0


def test_cancel_frees_the_sequence_on_every_worker(workers):
    async def main():
        async with started(workers) as engine:
            seq = await engine.submit(request("blendin", max_tokens=200, tau=1.0))
            events = []
            async for item in engine.stream(seq):
                events.append(item)
                if len(events) == 3:
                    engine.cancel(seq)
                if isinstance(item, GenerationResult):
                    break
            await asyncio.sleep(0.1)
        return events

    events = asyncio.run(main())
    assert isinstance(events[-1], GenerationResult)
    assert events[-1].finish_reason == "cancelled"
    assert all(isinstance(e, TokenEvent) for e in events[:-1])
    assert all(w.live() == 0 for w in workers.values())


def test_events_stream_the_same_text_as_the_result(workers):
    async def main():
        async with started(workers) as engine:
            seq = await engine.submit(request("blendin", max_tokens=10, tau=0.5))
            return [item async for item in engine.stream(seq)]

    items = asyncio.run(main())
    result = items[-1]
    events = items[:-1]
    assert "".join(e.text for e in events) == result.text
    assert [e.index for e in events] == list(range(result.steps))
    assert sum(e.junction for e in events) == result.interventions
    assert all((e.alpha is not None) == e.junction for e in events)
    assert all(e.source == ("guidance" if e.junction else "base") for e in events)


def test_commits_carry_family_so_shared_tokenizers_exchange_ids(workers):
    base = workers["base"]
    assert Commit("x", (1,), base.family).family == workers["value"].family
    assert workers["guidance"].family != base.family


class RestartingRunner:
    """A real runner whose process 'dies' once: at its Nth call of `method` it loses every
    sequence it held (as a restarted actor does) and the call fails as a restarted one would."""

    def __init__(self, runner, method: str, at_call: int) -> None:
        self.runner, self.method, self.at_call, self.calls = runner, method, at_call, 0

    def __getattr__(self, name: str):
        attr = getattr(self.runner, name)
        if name != self.method:
            return attr

        def call(*args):
            self.calls += 1
            if self.calls == self.at_call:
                self.runner.seqs.clear()
                self.runner.batch = None
                raise WorkerRestarted("worker restarted")
            return attr(*args)

        return call


@pytest.mark.parametrize(
    ("policy", "role", "method", "at_call", "parallel"),
    [
        ("base", "base", "step", 2, False),  # the base runs ahead: its 2nd call is mid-request
        ("blendin", "guidance", "step", 4, False),
        ("blendin", "guidance", "step", 4, True),  # an early guidance step (overlapped) fails
        ("dense", "value", "score", 4, False),
    ],
)
def test_a_restarted_worker_replays_the_request_and_nothing_is_lost(
    workers, policy, role, method, at_call, parallel
):
    options = {"tau": 1.0} if policy == "blendin" else {"value_temperature": 0.0}
    if policy == "base":
        options = {}
    (clean,) = run(workers, request(policy, max_tokens=10, **options))
    workers[role] = RestartingRunner(workers[role], method, at_call=at_call)
    (result,) = run(workers, request(policy, max_tokens=10, **options), parallel=parallel)
    assert workers[role].calls > at_call  # it failed once, then served the replayed request
    assert result.finish_reason == "length"
    assert result.text == clean.text
    assert (result.steps, result.interventions) == (clean.steps, clean.interventions)
    # the replay re-ran the text on the restarted worker: visible as extra work
    assert result.work[f"{role}_tokens"] > clean.work[f"{role}_tokens"]


@pytest.mark.parametrize(
    ("policy", "messages", "stop", "expected"),
    [
        ("base", [{"role": "user", "content": "hi"}], [], ["\n\nUser:", "\nUser:"]),
        ("blendin", [{"role": "user", "content": "hi"}], ["."], [".", "\n\nUser:", "\nUser:"]),
        ("guidance", [{"role": "user", "content": "hi"}], [], []),  # the chat model ends itself
        ("base", None, [], []),  # a plain prompt has no turns
    ],
)
def test_chat_on_the_base_stops_where_its_transcript_turn_ends(policy, messages, stop, expected):
    req = GenerationRequest(
        prompt=None if messages else "hi",
        messages=messages,
        sampling=SamplingParams(stop=stop),
        policy=PolicyConfig(policy=policy),
    )
    assert stops(req) == expected
    assert stop_context(req) == ("\n" if messages and policy != "guidance" else "")


@pytest.mark.parametrize(
    ("piece", "eos", "stop", "text", "released", "reason"),
    [
        (Commit("Yes."), True, [], "Yes.", "Yes.", "stop"),  # a last word, then the end
        (Commit("Yes"), True, ["Yes."], "Yes", "Yes", "stop"),  # held back for a stop, released
        (Commit(EOS_TEXT), True, [], "", "", "stop"),  # the end alone adds no text
        (Commit("Yes."), False, [], "Yes.", "Yes.", None),
    ],
)
def test_a_commit_may_end_the_text_after_its_piece(piece, eos, stop, text, released, reason):
    seq = Sequence(
        req=request("nudging"), prompt_tokens=1, stopping=Stopping(64, stop), families={}
    )
    event = TokenEvent(0, "", "guidance", True, "guidance", 0.0, 0.0)
    seq.commit(piece, 2, eos, event)
    assert (seq.stopping.text, event.text, seq.finish_reason) == (text, released, reason)
    assert seq.stopping.tokens == 2
    assert [c.text for c in seq.commits] == ([] if piece.text == EOS_TEXT else [piece.text])


def test_a_nudge_that_opens_the_answer_never_sticks_to_the_prompt(workers):
    # "the cat sat on" ends in a letter: the guidance model's first word gets a space.
    (result,) = run(workers, request("nudging", max_tokens=6, tau=1.0))
    assert result.interventions > 0
    assert result.text == "" or not result.text[0].isalnum(), result.text




# ------------------------------------------------------------------ one request cannot stop others
def poisoned(policy: str, field: str, value: float, **options) -> GenerationRequest:
    """A request carrying a value validation would refuse, set past it (defence in depth)."""
    req = request(policy, **options)
    target = req.sampling if hasattr(req.sampling, field) else req.policy
    setattr(target, field, value)
    return req


@pytest.mark.parametrize(
    ("field", "value"), [("value_temperature", 1e-320), ("beta", float("nan"))]
)
def test_a_request_that_raises_in_the_loop_fails_alone_and_the_loop_goes_on(workers, field, value):
    """SIA's choice over NaN probabilities raises inside the decode loop: that request ends
    with a one-line error, its batch-mates finish as they do alone, and later ones are served."""
    alone = [run(workers, request(p, max_tokens=8))[0] for p in ("base", "blendin")]

    async def main():
        async with started(workers) as engine:
            results = await asyncio.gather(
                engine.generate(request("base", max_tokens=8)),
                engine.generate(poisoned("dense", field, value, max_tokens=8)),
                engine.generate(request("blendin", max_tokens=8)),
            )
            later = await engine.generate(request("base", max_tokens=3))
            return results, later, engine.stopped, engine.down

    (base, bad, blend), later, stopped, down = asyncio.run(main())
    assert bad.finish_reason == "error"
    assert [base.text, blend.text] == [alone[0].text, alone[1].text]
    assert base.finish_reason == blend.finish_reason == "length"
    assert later.finish_reason == "length" and later.completion_tokens == 3
    assert stopped is None and down == {}
    assert all(w.live() == 0 for w in workers.values())


def test_the_error_of_a_failed_request_is_one_clear_line(workers):
    async def main():
        async with started(workers) as engine:
            seq = await engine.submit(poisoned("dense", "beta", float("nan")))
            return [item async for item in engine.stream(seq)][-1], seq.error

    result, error = asyncio.run(main())
    assert result.finish_reason == "error"
    assert error.startswith("dense step 0 failed: ValueError: SIA's scores are not numbers")
    assert "\n" not in error and "Traceback" not in error


def test_a_tick_that_raises_fails_its_requests_and_the_loop_serves_the_next(workers):
    """A bug outside any one request (here: a metrics observer that raises) fails the
    requests of that tick; the loop keeps running and serves the next request."""

    class Flaky(NullObserver):
        broken = True

        def on_token(self, seq, event):
            if self.broken:
                raise RuntimeError("observer bug")

    async def main():
        observer = Flaky()
        engine = Engine({r: LocalHandle(w) for r, w in workers.items()}, observer=observer)
        await engine.start()
        try:
            first = await asyncio.wait_for(engine.generate(request("base", max_tokens=4)), 30)
            observer.broken = False
            second = await asyncio.wait_for(engine.generate(request("base", max_tokens=4)), 30)
            return first, second, engine.stopped
        finally:
            await engine.close()

    first, second, stopped = asyncio.run(main())
    assert first.finish_reason == "error"
    assert second.finish_reason == "length" and stopped is None


def test_a_dead_loop_is_reported_and_fails_its_requests(workers):
    """If the loop task ends anyway, its requests end with the reason (nobody hangs), the
    engine says why, and new requests are refused."""

    async def main():
        async with started(workers) as engine:
            seq = await engine.submit(request("base", max_tokens=200))
            engine._task.cancel()  # the loop ends without close(): as an escaped bug would
            result = await asyncio.wait_for(engine.stream(seq).__anext__(), 10)
            while not isinstance(result, GenerationResult):
                result = await asyncio.wait_for(engine.stream(seq).__anext__(), 10)
            with pytest.raises(RuntimeError, match="decode loop stopped"):
                await engine.submit(request("base"))
            return result, seq.error, engine.stopped, engine.down

    result, error, stopped, down = asyncio.run(main())
    assert result.finish_reason == "error" and "decode loop stopped" in error
    assert stopped.startswith("the decode loop stopped") and down == {"decode_loop": stopped}


# --------------------------------------------------------------------- batch isolation
@pytest.mark.parametrize("temperature", [1e-39, 5e-324])
def test_a_tiny_temperature_does_not_fail_its_batch_mates(workers, temperature):
    """It once overflowed the base worker's batched sampling and ended every stream of the
    step with an error; now it samples (as greedy, its limit) and the others are untouched."""
    (alone,) = run(workers, request("base", max_tokens=8))
    results = run(
        workers,
        request("base", max_tokens=8),
        poisoned("base", "temperature", temperature, max_tokens=8),
        request("base", max_tokens=8),
    )
    assert [r.finish_reason for r in results] == ["length"] * 3
    assert [r.text for r in results] == [alone.text] * 3


@pytest.mark.parametrize(("policy", "role"), [("blendin", "guidance"), ("nudging", "guidance"),
                                              ("dense", "value"), ("base", "base")])
def test_a_sequence_its_worker_fails_on_fails_alone(workers, policy, role):
    """One of three requests loses its state on a worker (a batched step, write_words or
    score then fails for that sequence): only it ends with an error; the others finish with
    the text they have alone."""
    options = {"tau": 1.0} if policy in ("blendin", "nudging") else {}
    if policy == "dense":
        options = {"value_temperature": 0.0}
    (alone,) = run(workers, request(policy, max_tokens=10, **options))

    async def main():
        # One step a call: the worker loses the sequence between two of its steps. (With
        # run-ahead, `base` takes the rest of the request in the call already sent.)
        async with started(workers, Limits(run_ahead=0)) as engine:
            seqs = [await engine.submit(request(policy, max_tokens=10, **options))
                    for _ in range(3)]
            events = engine.stream(seqs[1])
            await events.__anext__()  # the victim has taken a step: it is open everywhere
            await engine.workers[role].call(Worker.close, seqs[1].id)
            return await asyncio.gather(*(collect(engine, s) for s in seqs)), seqs[1].error

    async def collect(engine, seq):
        return [item async for item in engine.stream(seq)][-1]

    (first, victim, third), error = asyncio.run(main())
    assert victim.finish_reason == "error"
    assert error.startswith(f"{role} worker failed: KeyError") and "not open" in error
    assert [first.text, third.text] == [alone.text] * 2
    assert first.finish_reason == third.finish_reason == "length"
    assert all(w.live() == 0 for w in workers.values())
