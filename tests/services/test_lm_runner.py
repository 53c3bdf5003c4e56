"""The LM runner: batched steps over per-sequence KV caches agree with plain transformers."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from junction.services.lm_runner import LMRunner
from junction.shared.config import ModelSpec
from junction.shared.models import load_model
from junction.shared.types import Commit, Failure, StepRequest, WordRequest


def runner_for(pair, role: str = "base", chat: bool = False) -> LMRunner:
    return LMRunner(load_model(role, ModelSpec(source=str(pair.path)), progress=False), role, chat)


def greedy_reference(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
        attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=0,
    )
    return out[0, len(ids):].tolist()


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)


def run_greedy(runner: LMRunner, seq_id: str, n: int, k: int = 5) -> list[int]:
    tokens, append = [], []
    for _ in range(n):
        (res,) = runner.step([StepRequest(seq_id, k=k, append=append)])
        tokens.append(res.sampled_id)
        append = [Commit(res.sampled_text, (res.sampled_id,), runner.family)]
    return tokens


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_greedy_single_sequence_matches_transformers_generate(fixture, request):
    pair = request.getfixturevalue(fixture)
    runner = runner_for(pair)
    runner.open("a", prompt="the quick brown fox")
    prompt_ids = runner.seqs["a"].text.ids[:]
    # 24 tokens: well past the tiny Gemma's sliding window of 8
    assert run_greedy(runner, "a", 24) == greedy_reference(pair.model, prompt_ids, 24)


JOINS_AND_LEAVES = [["a"], ["a", "b"], ["a", "b"], ["b"], ["b", "c"]] + [["a", "b", "c"]] * 11
ALL_AT_ONCE = [["a", "b", "c"]] * 12  # three prompts prefilled together, left-padded


@pytest.mark.parametrize("schedule", [JOINS_AND_LEAVES, ALL_AT_ONCE], ids=["joins", "together"])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_batched_steps_with_joins_and_leaves_match_each_sequence_alone(fixture, schedule, request):
    pair = request.getfixturevalue(fixture)
    runner = runner_for(pair)
    # the long prompt is past the tiny Gemma's sliding window of 8
    prompts = {"a": "hello there", "b": "the cat sat on the mat and then the dog", "c": "x"}
    history: dict[str, list[int]] = {}
    pending: dict[str, list[Commit]] = {}
    for live in schedule:
        for seq_id in live:
            if seq_id not in history:
                runner.open(seq_id, prompt=prompts[seq_id])
                history[seq_id] = runner.seqs[seq_id].text.ids[:]
                pending[seq_id] = []
        results = runner.step([StepRequest(s, k=8, append=pending[s]) for s in live])
        for res in results:
            ref = full_logprobs(pair.model, history[res.seq_id])
            top = torch.topk(ref, 8)
            assert res.top.ids == top.indices.tolist()
            assert res.top.logprobs == pytest.approx(top.values.tolist(), abs=1e-4)
            history[res.seq_id].append(res.sampled_id)
            pending[res.seq_id] = [Commit(res.sampled_text, (res.sampled_id,), runner.family)]
    runner.close("a")
    assert runner.live() == 2
    # the survivors keep stepping correctly after a row left the batch
    results = runner.step([StepRequest(s, k=3, append=pending[s]) for s in ("b", "c")])
    for res in results:
        top = torch.topk(full_logprobs(pair.model, history[res.seq_id]), 3)
        assert res.top.ids == top.indices.tolist()


def test_step_summary_is_compact_and_consistent(tiny_gemma):
    runner = runner_for(tiny_gemma)
    runner.open("s", prompt="a b c")
    (res,) = runner.step([StepRequest("s", k=7)])
    assert len(res.top.ids) == len(res.top.texts) == len(res.top.logprobs) == 7
    assert res.top.logprobs == sorted(res.top.logprobs, reverse=True)
    assert 0.0 <= res.top.entropy <= math.log(7) + 1e-9
    assert res.top.top1_prob == pytest.approx(math.exp(res.top.logprobs[0]))
    assert res.sampled_id == res.top.ids[0]  # greedy


def test_each_row_of_a_mixed_batch_gets_its_own_k_and_entropy_width(tiny_gemma):
    """The summary's figures are computed for the whole batch at once (`Rows`); each row
    still gets its own k, its own entropy width (never wider than its k) and its top-1."""
    runner = runner_for(tiny_gemma)
    widths = [(3, None), (10, None), (10, 4), (5, 8), (100, 10)]  # (k, entropy_k)
    for n, _ in enumerate(widths):
        runner.open(f"s{n}", prompt=["a b c", "the cat", "x y z w"][n % 3])
    results = runner.step([StepRequest(f"s{n}", k=k, entropy_k=e)
                           for n, (k, e) in enumerate(widths)])
    for n, ((k, e), res) in enumerate(zip(widths, results, strict=True)):
        reference = full_logprobs(tiny_gemma.model, runner.seqs[f"s{n}"].text.ids)
        top = torch.topk(reference, k)
        assert res.top.ids == top.indices.tolist()
        assert res.top.logprobs == pytest.approx(top.values.tolist(), abs=1e-4)
        width = min(e or k, k)
        p = torch.softmax(top.values[:width].double(), -1)
        assert res.top.entropy == pytest.approx(float(-(p * p.log()).sum()), abs=1e-4)
        assert res.top.top1_prob == pytest.approx(math.exp(top.values[0]), abs=1e-5)


@pytest.mark.parametrize("appended", [[], [" cat"], [" the", " mat", " and"]])
def test_processed_counts_only_new_tokens(tiny_llama, appended):
    runner = runner_for(tiny_llama)
    prompt_tokens = runner.open("s", prompt="hello")
    (first,) = runner.step([StepRequest("s")])
    assert first.processed == prompt_tokens
    commits = [Commit(text) for text in appended]  # foreign text: the bridge encodes it
    (res,) = runner.step([StepRequest("s", append=commits)])
    new = len(runner.seqs["s"].text.ids) - prompt_tokens
    assert res.processed == new
    # and the logits are those of the whole text
    ref = full_logprobs(tiny_llama.model, runner.seqs["s"].text.ids)
    assert res.top.ids[0] == int(torch.argmax(ref))


def test_sampling_is_reproducible_with_a_seed(tiny_llama):
    def sample(seed: int) -> list[int]:
        runner = runner_for(tiny_llama)
        runner.open("s", prompt="hello", seed=seed)
        out, append = [], []
        for _ in range(12):
            (res,) = runner.step([StepRequest("s", temperature=1.5, append=append)])
            out.append(res.sampled_id)
            append = [Commit(res.sampled_text, (res.sampled_id,), runner.family)]
        return out

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_write_words_appends_a_greedy_word_to_its_own_text(tiny_llama):
    runner = runner_for(tiny_llama, role="guidance", chat=True)
    runner.open("g", prompt="hello")
    before = len(runner.seqs["g"].text.ids)
    (word,) = runner.write_words([WordRequest("g", max_tokens=4)])
    assert 1 <= len(word.commit.ids) <= 4 or word.eos
    assert runner.seqs["g"].text.ids[before:] == list(word.commit.ids)
    assert word.commit.family == runner.family
    # the greedy continuation of the same text, token by token, starts with the word's ids
    prefix = runner.seqs["g"].text.ids[:before]
    ref = greedy_reference(tiny_llama.model, prefix, len(word.commit.ids))
    assert list(word.commit.ids) == ref


def test_unknown_sequence_is_a_clear_error(tiny_llama):
    runner = runner_for(tiny_llama)
    (result,) = runner.step([StepRequest("nope")])
    assert isinstance(result, Failure) and "not open" in result.error



def test_logprobs_only_when_asked_and_wider_than_k_without_changing_the_step(tiny_llama):
    runner = runner_for(tiny_llama)
    for seq_id in ("plain", "asked"):
        runner.open(seq_id, prompt="the quick brown fox", seed=1)
    plain, asked = runner.step([
        StepRequest("plain", k=4, temperature=1.0),
        StepRequest("asked", k=4, temperature=1.0, logprobs=12),
    ])
    assert plain.sampled_logprob is None and plain.top_logprobs is None  # no cost unasked
    assert asked.top.ids == plain.top.ids and asked.top.entropy == plain.top.entropy
    assert asked.sampled_id == plain.sampled_id  # same seed, same draw
    reference = full_logprobs(tiny_llama.model, runner.seqs["asked"].text.ids)
    top = torch.topk(reference, 12)
    assert [lp for _, lp in asked.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert asked.sampled_logprob == pytest.approx(float(reference[asked.sampled_id]), abs=1e-4)


# --------------------------------------------------------------------- batch isolation
def decode(runner: LMRunner, n: int, last: dict[str, list[Commit]] | None = None,
           temperatures: dict[str, float] | None = None) -> dict[str, list]:
    """n batched steps of every open sequence, each committing its own choice.

    `last` carries each sequence's latest choice from one call to the next. A sequence's list
    holds its chosen ids, ending with a Failure if it failed (then it takes no more steps)."""
    last = {} if last is None else last
    temperatures = temperatures or {}
    chosen: dict[str, list] = {s: [] for s in runner.seqs}
    for _ in range(n):
        going = [s for s in chosen if not chosen[s] or not isinstance(chosen[s][-1], Failure)]
        results = runner.step([
            StepRequest(s, k=4, temperature=temperatures.get(s, 0.0), append=last.get(s, []))
            for s in going
        ])
        for r in results:
            if isinstance(r, Failure):
                chosen[r.seq_id].append(r)
                continue
            chosen[r.seq_id].append(r.sampled_id)
            last[r.seq_id] = [Commit(r.sampled_text, (r.sampled_id,), runner.family)]
    return chosen


def opened(pair, names: str) -> LMRunner:
    runner = runner_for(pair)
    for name in names:
        runner.open(name, "the cat sat on")
    return runner


@pytest.mark.parametrize("temperature", [1e-39, 1e-300, 5e-324])
def test_a_tiny_temperature_samples_as_greedy_instead_of_failing_the_batch(tiny_gemma, temperature):
    out = decode(opened(tiny_gemma, "abc"), 5, temperatures={"b": temperature})
    assert out["a"] == out["b"] == out["c"]  # no Failure anywhere; T -> 0 tends to greedy
    assert all(isinstance(i, int) for i in out["b"])


def test_a_sequence_that_fails_mid_batch_fails_alone(tiny_gemma):
    """A forward that fails for one row (a token id outside the vocabulary) is undone and run
    one sequence at a time: only the culprit gets a Failure, and its batch-mates decode
    exactly as they do without it."""
    reference = decode(opened(tiny_gemma, "ac"), 6)
    runner, last = opened(tiny_gemma, "abc"), {}
    decode(runner, 2, last)  # all three are in the KV batch now
    last["b"] = []
    runner.seqs["b"].pending = [runner.info().vocab_size + 5]  # a row the model cannot embed
    out = decode(runner, 4, last)
    (error,) = out["b"]
    assert isinstance(error, Failure) and error.error.startswith("IndexError")
    assert "\n" not in error.error and "Traceback" not in error.error
    assert out["a"] == reference["a"][2:] and out["c"] == reference["c"][2:]
    assert runner.batch is not None and set(runner.batch.seq_ids) == {"a", "c"}  # batched again


def test_a_failed_forward_is_undone_exactly(tiny_gemma):
    """checkpoint/rollback: a forward that got halfway through the layers (here: one that
    raises in the last layer, after the others have appended to the cache) leaves the cache
    as it was, so the sequence decodes on as if it had never been tried."""
    runner, last = opened(tiny_gemma, "ab"), {}
    decode(runner, 2, last)
    batch = runner.batch
    assert batch is not None
    for name in "ab":  # each sequence's last choice is pending: the next forward runs it
        runner._apply(name, last.pop(name))
    before = [(layer.keys, layer.values) for layer in batch.cache.layers]
    layers = runner.model.model.layers
    original = layers[-1].forward

    def broken(*args, **kwargs):
        raise RuntimeError("the last layer failed")

    layers[-1].forward = broken
    try:
        with pytest.raises(RuntimeError):
            runner._forward_batch(["a", "b"])
    finally:
        layers[-1].forward = original
    after = [(layer.keys, layer.values) for layer in batch.cache.layers]
    assert all(k1 is k0 and v1 is v0 for (k0, v0), (k1, v1) in zip(before, after, strict=True))
    out = decode(runner, 3, last)  # the pending choices run now
    reference = decode(opened(tiny_gemma, "ab"), 5)
    assert out["a"] == reference["a"][2:] and out["b"] == reference["b"][2:]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_text_commits_of_the_same_length_run_as_one_batch_and_match_alone(fixture, request):
    """A guidance model receives the base's text at every junction, often several tokens
    per sequence: sequences adding the same count run as one batch (past the tiny Gemma's
    sliding window of 8), the others alone, and every row's logits match a plain forward."""
    pair = request.getfixturevalue(fixture)
    runner = runner_for(pair)
    prompts = {"a": "hello there", "b": "the cat sat on the mat and then the dog", "c": "x"}
    history = {}
    for seq_id, prompt in prompts.items():
        runner.open(seq_id, prompt=prompt)
        history[seq_id] = runner.seqs[seq_id].text.ids[:]
    runner.step([StepRequest(s, k=4) for s in prompts])
    rounds = [
        {"a": " sea shells", "b": " sea shore", "c": " the"},
        {"a": " quick brown fox jumps", "b": " over the lazy dog.", "c": " small fish"},
        {"a": " whales", "b": " whales", "c": " whales"},
    ]
    batched_forwards = []
    forward_batch = runner._forward_batch
    runner._forward_batch = lambda ids: (batched_forwards.append(list(ids)), forward_batch(ids))
    for texts in rounds:
        commits = {s: [Commit(t, (), "foreign")] for s, t in texts.items()}
        results = runner.step([StepRequest(s, k=8, append=commits[s]) for s in texts])
        for res in results:
            history[res.seq_id] = runner.seqs[res.seq_id].text.ids[:]
            top = torch.topk(full_logprobs(pair.model, history[res.seq_id]), 8)
            assert res.top.ids == top.indices.tolist()
            assert res.top.logprobs == pytest.approx(top.values.tolist(), abs=1e-4)
    counts = [Counter(len(runner.tokenizer(t, add_special_tokens=False).input_ids)
                      for t in texts.values()) for texts in rounds]
    assert any(max(c.values()) > 1 for c in counts)  # some round batches several rows
    assert all(len(ids) == max(c.values()) for ids, c in zip(batched_forwards, counts, strict=True))
