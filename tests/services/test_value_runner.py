"""The value runner: cached incremental scoring equals a full recompute, for less work."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import junction.services.value_runner as value_runner
from junction.services.value_runner import ValueRunner
from junction.shared.config import ModelSpec
from junction.shared.models import LoadedModel, tokenizer_family
from junction.shared.prompts import build_prompt_ids
from junction.shared.types import EOS_TEXT, Commit, Failure, ScoreRequest, ScoreResult
from junction.shared.value_model import ValueModel, build_value_model, save_value_model
from junction.shared.vocab import vocab_of
from tests.shared.test_value_model import perturb_lora
from tests.tiny import SLIDING_WINDOW, save_tiny, tiny_model, tiny_tokenizer

KINDS = [("llama", "bytelevel"), ("gemma3", "sentencepiece")]
PROMPT = (
    "The ocean covers most of the surface of the earth, and it holds most of its water. "
    "Whales, dolphins and sharks swim in the deep sea."
)


@dataclass
class Setup:
    runner: ValueRunner
    value: ValueModel
    tokenizer: object
    rng: random.Random

    def full_value(self, ids: list[int]) -> float:
        """V at the last token, recomputed over the whole sequence without any cache."""
        with torch.no_grad():
            return float(self.value(torch.tensor([ids]))[0][0, -1])

    def own(self, ids: list[int]) -> Commit:
        """A commit in the runner's own tokenizer family (ids are taken as they are)."""
        return Commit(self.tokenizer.decode(ids), tuple(ids), self.runner.family)

    def random_ids(self, n: int) -> list[int]:
        return [self.rng.randrange(300, len(self.tokenizer)) for _ in range(n)]


def make_setup(kind: str, tokenizer_kind: str, seed: int = 0) -> Setup:
    tokenizer = tiny_tokenizer(tokenizer_kind)
    model = tiny_model(kind, tokenizer)
    value = perturb_lora(build_value_model(model, seed=seed), seed)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=f"tiny-{kind}",
        family=tokenizer_family(tokenizer),
        device=torch.device("cpu"),
        eos_ids=frozenset({tokenizer.eos_token_id}),
        max_context=512,
    )
    return Setup(ValueRunner(loaded, value), value, tokenizer, random.Random(seed))


def prompt_ids(setup: Setup) -> list[int]:
    return build_prompt_ids(setup.tokenizer, prompt=PROMPT, chat=False)


@pytest.mark.parametrize(("kind", "tokenizer_kind"), KINDS)
def test_cached_scores_equal_full_recompute(kind: str, tokenizer_kind: str) -> None:
    s = make_setup(kind, tokenizer_kind)
    prefix = prompt_ids(s)
    assert s.runner.open("a", prompt=PROMPT) == len(prefix) > 2 * SLIDING_WINDOW
    for step in range(5):
        appended = s.random_ids(step % 3 + 1) if step else []
        cands = [s.random_ids(n) for n in (1, 3, 1, 2, 4)]  # mixed lengths: padding in play
        [result] = s.runner.score(
            [ScoreRequest("a", [s.own(c) for c in cands], [s.own(appended)] if appended else [])]
        )
        prefix += appended
        expected = [s.full_value(prefix + c) for c in cands]
        assert result.values == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(("kind", "tokenizer_kind"), KINDS)
def test_processed_is_new_prefix_plus_candidate_tokens(kind: str, tokenizer_kind: str) -> None:
    s = make_setup(kind, tokenizer_kind)
    n_prompt = s.runner.open("a", prompt=PROMPT)
    table = [  # (appended tokens, candidate lengths, processed)
        (0, [1] * 10, n_prompt + 10),
        (1, [1] * 10, 1 + 10),
        (3, [1] * 4, 3 + 4),
        (0, [1] * 4, 0 + 4),
        (12, [1] * 10, 12 + 10),  # more than the sliding window at once
        (2, [1, 2, 3], 2 + 6),
        (1, [1], 1 + 1),  # k = 1
        (0, [3], 0 + 3),
    ]
    total = n_prompt
    for appended, lengths, processed in table:
        append = [s.own(s.random_ids(appended))] if appended else []
        cands = [s.own(s.random_ids(n)) for n in lengths]
        [result] = s.runner.score([ScoreRequest("a", cands, append)])
        total += appended
        assert result.processed == processed
        assert len(result.values) == len(lengths)
        # the stored prefix cache holds the prefix only, never a candidate
        assert s.runner.seqs["a"].cache.get_seq_length() == total


@pytest.mark.parametrize(("kind", "tokenizer_kind"), KINDS)
def test_candidates_run_as_one_batch_over_the_stored_prefix(kind: str, tokenizer_kind: str) -> None:
    s = make_setup(kind, tokenizer_kind)
    s.runner.open("a", prompt=PROMPT)
    batches: list[tuple[int, int]] = []
    decoder = s.value.decoder()
    hook = decoder.register_forward_hook(
        lambda module, args, kwargs, out: batches.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    cands = [s.own(s.random_ids(n)) for n in (2, 1, 3)]
    first = s.runner.score([ScoreRequest("a", cands)])[0]
    again = s.runner.score([ScoreRequest("a", cands)])[0]
    hook.remove()
    assert batches == [(1, len(prompt_ids(s))), (3, 3), (3, 3)]
    assert again.values == pytest.approx(first.values, abs=1e-6)
    assert again.processed == 6


@pytest.mark.parametrize(("kind", "tokenizer_kind"), KINDS)
def test_candidates_from_another_tokenizer_family_go_through_text(
    kind: str, tokenizer_kind: str
) -> None:
    s = make_setup(kind, tokenizer_kind)
    prefix = prompt_ids(s)
    s.runner.open("a", prompt=PROMPT)
    vocab = vocab_of(s.tokenizer)
    append = Commit(" Fish live", (1, 2, 3), "another-family")
    texts = [" near", " the coral reefs", "", EOS_TEXT]
    cands = [Commit(t, (7,), "another-family") for t in texts]
    [result] = s.runner.score([ScoreRequest("a", cands, [append])])
    prefix += vocab.encode(" Fish live")
    eos = s.runner.tokenizer.eos_token_id
    cand_ids = [vocab.encode(" near"), vocab.encode(" the coral reefs"), [], [eos]]
    expected = [s.full_value(prefix + ids) for ids in cand_ids]
    assert result.values == pytest.approx(expected, abs=1e-4)
    assert result.processed == len(prefix) + sum(map(len, cand_ids))  # first call: whole prefix


def test_mixed_families_in_one_request() -> None:
    s = make_setup("gemma3", "sentencepiece")
    prefix = prompt_ids(s)
    s.runner.open("a", prompt=PROMPT)
    own = s.random_ids(2)
    cands = [s.own(own), Commit(" sharks", (99,), "another-family")]
    [result] = s.runner.score([ScoreRequest("a", cands)])
    expected = [
        s.full_value(prefix + own),
        s.full_value(prefix + vocab_of(s.tokenizer).encode(" sharks")),
    ]
    assert result.values == pytest.approx(expected, abs=1e-4)


def test_many_sequences_in_one_call_keep_their_own_caches() -> None:
    s = make_setup("gemma3", "sentencepiece")
    s.runner.open("a", prompt=PROMPT)
    s.runner.open("b", prompt="Please explain why the sky is blue.")
    prefix_b = build_prompt_ids(
        s.tokenizer, prompt="Please explain why the sky is blue.", chat=False
    )
    prefix_a = prompt_ids(s)
    for _ in range(3):
        add_a, add_b = s.random_ids(2), s.random_ids(1)
        cands = [s.random_ids(1) for _ in range(4)]
        ra, rb = s.runner.score(
            [
                ScoreRequest("a", [s.own(c) for c in cands], [s.own(add_a)]),
                ScoreRequest("b", [s.own(c) for c in cands], [s.own(add_b)]),
            ]
        )
        prefix_a, prefix_b = prefix_a + add_a, prefix_b + add_b
        assert (ra.seq_id, rb.seq_id) == ("a", "b")
        assert ra.values == pytest.approx([s.full_value(prefix_a + c) for c in cands], abs=1e-4)
        assert rb.values == pytest.approx([s.full_value(prefix_b + c) for c in cands], abs=1e-4)


def test_lifecycle_and_info() -> None:
    s = make_setup("llama", "bytelevel")
    info = s.runner.info()
    assert (info.role, info.name, info.family) == ("value", "tiny-llama", s.runner.family)
    assert info.vocab_size == len(s.tokenizer) and info.max_context == 512
    assert s.runner.open("a", prompt=PROMPT) > 0
    s.runner.open("b", messages=[{"role": "user", "content": "Hi"}])
    assert s.runner.live() == 2
    with pytest.raises(ValueError, match="already open"):
        s.runner.open("a", prompt=PROMPT)
    s.runner.close("a")
    s.runner.close("a")  # closing twice is harmless
    assert s.runner.live() == 1
    # A closed sequence fails alone; its batch-mate is still scored.
    gone, kept = s.runner.score([ScoreRequest("a", [s.own([400])]),
                                 ScoreRequest("b", [s.own([400])])])
    assert isinstance(gone, Failure) and gone.error.startswith("KeyError")
    assert "not open" in gone.error
    assert isinstance(kept, ScoreResult) and len(kept.values) == 1


def test_missing_default_adapter_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(value_runner, "DEFAULT_VALUE_DIR", tmp_path / "value")
    with pytest.raises(FileNotFoundError, match="SIA needs a value model") as err:
        ValueRunner.from_paths(ModelSpec(), None)
    assert "train" in str(err.value).lower()


def test_from_paths_loads_backbone_and_adapter(tmp_path: Path) -> None:
    s = make_setup("gemma3", "sentencepiece")
    backbone_dir = save_tiny(tiny_model("gemma3", s.tokenizer), s.tokenizer, tmp_path / "backbone")
    save_value_model(s.value, tmp_path / "adapter", {"backbone": str(backbone_dir)})
    runner = ValueRunner.from_paths(ModelSpec(source=str(backbone_dir)), tmp_path / "adapter")
    runner.open("a", prompt=PROMPT)
    cands = [s.own(s.random_ids(n)) for n in (1, 2, 1)]
    [result] = runner.score([ScoreRequest("a", cands)])
    prefix = prompt_ids(s)
    expected = [s.full_value(prefix + list(c.ids)) for c in cands]
    assert result.values == pytest.approx(expected, abs=1e-4)
    assert runner.info().role == "value"
