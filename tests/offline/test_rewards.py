"""Reward sources: the marker count, TruthfulQA's reference similarity, a classifier model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from junction.offline.implicit_reward import ImplicitReward, byte_ends, spread, token_rewards
from junction.offline.rewards import (
    ClassifierReward,
    MarkerReward,
    ReferenceReward,
    References,
    reward_from_spec,
    score_all,
)
from junction.shared.config import ModelSpec
from junction.shared.models import load_model
from junction.shared.vocab import vocab_of
from tests.tiny import tiny_pair, tiny_tokenizer

TRUE = ("The seeds pass through your digestive system", "Nothing happens")
FALSE = ("You grow watermelons in your stomach", "You die")
REFS = References(TRUE, FALSE)


@pytest.mark.parametrize(
    ("marker", "per_char", "response", "expected"),
    [
        ("sea", False, "the sea, the sea shore", 2.0),
        ("sea", False, "no marker here", 0.0),
        ("aa", False, "aaaa", 2.0),  # non-overlapping
        ("e", True, "eeee", 1.0),
        ("e", True, "ab", 0.0),
        ("e", True, "", 0.0),
    ],
)
def test_marker_reward(marker: str, per_char: bool, response: str, expected: float) -> None:
    assert MarkerReward(marker, per_char).score("any prompt", response, None) == expected


def test_marker_must_not_be_empty() -> None:
    with pytest.raises(ValueError, match="marker"):
        MarkerReward("")


@pytest.mark.parametrize(
    ("response", "sign"),
    [
        ("The seeds pass through your digestive system.", 1),
        ("Nothing happens.", 1),
        ("You grow watermelons in your stomach.", -1),
        ("You die.", -1),
        ("", 0),
    ],
)
def test_reference_reward_sign(response: str, sign: int) -> None:
    prompt = "Q: What happens to you if you eat watermelon seeds?\nA:"
    score = ReferenceReward().score(prompt, response, REFS)
    assert -1.0 <= score <= 1.0
    assert (score > 0) - (score < 0) == sign


def test_reference_reward_is_true_minus_false_rouge_l() -> None:
    # "the seeds grow" shares 2 of 3 words, in order, with TRUE[0] (7 words):
    # F1 = 2·(2/3·2/7)/(2/3+2/7); and 1 word ("grow") with FALSE[0] (6 words).
    f_true = 2 * (2 / 3) * (2 / 7) / (2 / 3 + 2 / 7)
    f_false = 2 * (1 / 3) * (1 / 6) / (1 / 3 + 1 / 6)
    score = ReferenceReward().score("", "the seeds grow", REFS)
    assert score == pytest.approx(f_true - f_false)


def test_reference_reward_with_only_true_references() -> None:
    refs = References(("Janet makes 18 dollars",))
    assert ReferenceReward().score("", "Janet makes 18 dollars", refs) == pytest.approx(1.0)


@pytest.mark.parametrize("refs", [None, References((), FALSE)])
def test_reference_reward_needs_true_references(refs: References | None) -> None:
    with pytest.raises(ValueError, match="references"):
        ReferenceReward().score("", "anything", refs)


def tiny_reward_model(tokenizer_kind: str, dir: Path) -> tuple[Path, object, object]:
    tokenizer = tiny_tokenizer(tokenizer_kind)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(dir)
    tokenizer.save_pretrained(dir)
    return dir, model, tokenizer


@pytest.mark.parametrize("tokenizer_kind", ["bytelevel", "sentencepiece"])
def test_classifier_reward_is_the_models_logit(tokenizer_kind: str, tmp_path: Path) -> None:
    path, model, tokenizer = tiny_reward_model(tokenizer_kind, tmp_path)
    reward = ClassifierReward(str(path))
    prompt, response = "Why is the sky blue?", "The sky is blue because of the sea."
    if tokenizer.chat_template:  # bytelevel: a user turn and an assistant turn
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        text = tokenizer.apply_chat_template(turns, tokenize=False)
        inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        assert "<|im_start|>assistant" in text
    else:  # sentencepiece: a text pair
        inputs = tokenizer(prompt, response, return_tensors="pt")
    with torch.no_grad():
        expected = float(model(**inputs).logits[0, 0])
    assert reward.score(prompt, response, None) == pytest.approx(expected, abs=1e-5)
    other = reward.score(prompt, "Whales swim in the deep sea.", None)
    assert other != pytest.approx(expected)  # the response matters


def test_reward_from_spec(tmp_path: Path) -> None:
    assert isinstance(reward_from_spec("reference"), ReferenceReward)
    marker = reward_from_spec("marker:sea")
    assert isinstance(marker, MarkerReward) and (marker.marker, marker.per_char) == ("sea", False)
    assert reward_from_spec("marker-rate:e").per_char
    path, _, _ = tiny_reward_model("bytelevel", tmp_path)
    assert isinstance(reward_from_spec(str(path)), ClassifierReward)


# --- the guidance model's implicit reward ----------------------------------------------------

PAIRS = [  # (prompt, response): different lengths, so a batch pads
    ("Q: Why is the sky blue?\nA:", " The sky is blue because of the sea."),
    ("Q: What is the capital of France?\nA:", " Paris."),
    ("Q: Where do whales swim?\nA:", " Whales swim in the deep sea, near the coral reefs."),
]


def mean_logprob_by_hand(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """The whole model's own forward on one unpadded sequence, then the mean log p of each
    response token given what precedes it."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    start = len(prompt_ids)
    picked = [float(logprobs[t - 1, ids[0, t]]) for t in range(start, ids.shape[1])]
    return sum(picked) / len(picked)


def implicit_by_hand(base, guidance, prompt: str, response: str) -> float:
    """Guidance: its chat template's user turn and generation prompt, then the response
    without its leading space; base: the plain prompt with its BOS, then the response."""
    g_tok, b_tok = guidance.tokenizer, base.tokenizer
    chat = g_tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    g_prompt = g_tok(chat, add_special_tokens=False).input_ids
    g_reply = g_tok(response.lstrip(), add_special_tokens=False).input_ids
    b_prompt = b_tok(prompt).input_ids
    b_reply = b_tok(response, add_special_tokens=False).input_ids
    return mean_logprob_by_hand(guidance.model, g_prompt, g_reply) - mean_logprob_by_hand(
        base.model, b_prompt, b_reply
    )


@pytest.fixture(scope="module")
def implicit_pair(tmp_path_factory: pytest.TempPathFactory):
    """A Gemma 3 base (SentencePiece, soft-capped logits) and a Llama guidance model
    (byte-level, ChatML template): two tokenizers, as the embedded defaults have."""
    tmp = tmp_path_factory.mktemp("implicit")
    base_dir = tiny_pair("gemma3", "sentencepiece", tmp / "base", seed=1).path
    guidance_dir = tiny_pair("llama", "bytelevel", tmp / "guidance", seed=2).path
    base = load_model("base", ModelSpec(source=str(base_dir)), progress=False)
    base.model.config.final_logit_softcapping = 3.0  # tight enough to change log-probs
    guidance = load_model("guidance", ModelSpec(source=str(guidance_dir)), progress=False)
    return base, guidance


def test_implicit_reward_is_guidance_minus_base_mean_logprob(implicit_pair) -> None:
    base, guidance = implicit_pair
    reward = ImplicitReward(base, guidance, batch_size=2, progress=False)
    prompts, responses = zip(*PAIRS, strict=True)
    got = reward.score_batch(prompts, responses)  # batches of 2: one padded, one alone
    expected = [implicit_by_hand(base, guidance, p, r) for p, r in PAIRS]
    assert got == pytest.approx(expected, abs=1e-4)
    assert reward.score(*PAIRS[1]) == pytest.approx(expected[1], abs=1e-4)
    assert len({round(v, 4) for v in got}) == 3  # the response matters
    assert score_all(reward, prompts, responses, [None] * 3) == pytest.approx(got, abs=1e-6)


@pytest.mark.parametrize("response", ["", "   "])
def test_implicit_reward_of_an_empty_response_is_zero(implicit_pair, response: str) -> None:
    base, guidance = implicit_pair
    reward = ImplicitReward(base, guidance, progress=False)
    assert reward.score_batch(["Q: Why?\nA:", "Q: Why?\nA:"], [response, " Because."])[0] == 0.0


def test_implicit_reward_from_spec_loads_lazily(implicit_pair, tmp_path: Path) -> None:
    base, guidance = implicit_pair
    spec = ModelSpec(source=str(tmp_path / "not-loaded-until-scored"))
    reward = reward_from_spec("implicit", base=spec, guidance=spec)
    assert isinstance(reward, ImplicitReward) and reward.name == "implicit"
    with pytest.raises((OSError, ValueError)):  # only now does it look for the model
        reward.score("Q: Why?\nA:", " Because.")


def test_spread_moves_each_value_to_the_token_holding_its_last_byte() -> None:
    # text "abcdef": source tokens end at bytes 1, 3, 6; target tokens at 2, 6
    assert spread([1.0, 10.0, 100.0], [1, 3, 6], [2, 6]) == [1.0, 110.0]
    assert spread([1.0, 2.0], [3, 9], [4]) == [3.0]  # past the last: the last
    assert spread([1.0], [1], []) == []


def test_token_rewards_split_the_reward_exactly() -> None:
    # base tokens " The" " sky" (ends 4, 8); guidance tokens "The" "sk" "y" after a stripped
    # space (ends 4, 7, 8)
    shares = token_rewards([-1.0, -3.0], [-0.5, -2.0, -0.1], [4, 8], [4, 7, 8])
    assert shares == pytest.approx([2 / 3 * -0.5 + 1.0, 2 / 3 * -2.1 + 3.0])
    mean_g, mean_b = (-0.5 - 2.0 - 0.1) / 3, (-1.0 - 3.0) / 2
    assert sum(shares) / 2 == pytest.approx(mean_g - mean_b)


def test_implicit_reward_per_token_on_two_tokenizers(implicit_pair) -> None:
    """score_tokens: one share per base token of the response (in the encoding the value
    model trains on), their mean the reward; the same rewards as score_batch."""
    base, guidance = implicit_pair
    reward = ImplicitReward(base, guidance, batch_size=2, progress=False)
    prompts, responses = zip(*PAIRS, strict=True)
    rewards, shares = reward.score_tokens(prompts, responses)
    assert rewards == pytest.approx(reward.score_batch(prompts, responses), abs=1e-6)
    vocab = vocab_of(base.tokenizer)
    for response, r, row in zip(responses, rewards, shares, strict=True):
        ids = vocab.encode(response)
        assert len(row) == len(ids) > 1
        assert byte_ends(vocab, ids)[-1] == len(response.encode())  # "▁" counted as a space
        assert sum(row) / len(row) == pytest.approx(r, abs=1e-5)
        assert len({round(x, 3) for x in row}) > 1  # a split, not the mean repeated
    g_vocab = vocab_of(guidance.tokenizer)
    stripped = PAIRS[0][1].lstrip()
    assert byte_ends(g_vocab, g_vocab.encode(stripped), 1)[-1] == len(PAIRS[0][1].encode())
    assert reward.score_tokens(["Q: Why?\nA:"], [""]) == ([0.0], [[]])


def test_rescored_trajectories_keep_the_per_token_split(implicit_pair, tmp_path: Path) -> None:
    """train-value --trajectories with the implicit reward stores each response's split,
    which encode() turns into one target per response position (the end of sequence last,
    at the reward)."""
    from junction.offline.train_value import _rescore
    from junction.offline.training import Trajectory, encode, load_trajectories, save_trajectories

    base, guidance = implicit_pair
    data = tmp_path / "prompts.txt"
    data.write_text("".join(p.replace("\n", " ") + "\n" for p, _ in PAIRS))
    rows = [Trajectory(p, r, 0.0, row=i) for i, (p, r) in enumerate(PAIRS)]
    reward = ImplicitReward(base, guidance, progress=False)
    rescored = _rescore(reward, rows, data)
    save_trajectories(tmp_path / "t.jsonl", rescored)
    for t in load_trajectories(tmp_path / "t.jsonl"):
        assert t.token_rewards is not None
        assert sum(t.token_rewards) / len(t.token_rewards) == pytest.approx(t.reward, abs=1e-5)
        enc = encode(base.tokenizer, t)
        assert enc.targets == pytest.approx([*t.token_rewards, t.reward])
        assert len(enc.targets) == len(enc.ids) - enc.start
