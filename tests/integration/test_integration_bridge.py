"""The text bridge properties on the real tokenizers: Gemma 3 (byte fallback) and SmolLM2
(byte-level BPE whose alphabet lacks 21 bytes)."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from junction.shared.bridge import TokenText
from junction.shared.types import Commit
from junction.shared.vocab import vocab_of
from tests.shared.test_bridge import (
    CANDIDATE_STATES,
    PROPERTY,
    check_candidate_texts,
    check_mixed_stream,
    check_own_pushes,
    check_text_commits,
    texts,
)

REAL = ["embedded_base", "embedded_guidance"]


@pytest.fixture(params=REAL)
def tokenizer(request: pytest.FixtureRequest):
    return request.getfixturevalue(request.param).tokenizer


@PROPERTY
@given(pieces=st.lists(texts, max_size=6))
def test_text_commits_decode_to_their_concatenation(tokenizer, pieces: list[str]) -> None:
    check_text_commits(tokenizer, pieces)


@PROPERTY
@given(piece=texts)
def test_pushed_ids_give_back_their_decode(tokenizer, piece: str) -> None:
    check_own_pushes(tokenizer, piece)


@PROPERTY
@given(steps=st.lists(st.tuples(st.booleans(), texts), max_size=6))
def test_mixed_stream_between_gemma_and_smollm2(
    embedded_base, embedded_guidance, steps: list[tuple[bool, str]]
) -> None:
    check_mixed_stream(embedded_base.tokenizer, embedded_guidance.tokenizer, steps)


@settings(max_examples=100, deadline=None)
@given(piece=st.text(st.characters(codec="utf-8"), max_size=8))
def test_gemma_spells_everything_smollm2_all_but_its_missing_bytes(
    embedded_base, embedded_guidance, piece: str
) -> None:
    assert vocab_of(embedded_base.tokenizer).spell(piece) == piece
    spelled = vocab_of(embedded_guidance.tokenizer).spell(piece)
    assert len(spelled) == len(piece)
    assert all(s == c or s == "\ufffd" for s, c in zip(spelled, piece, strict=True))


@pytest.mark.parametrize(
    ("text", "spelled"),
    [
        ("the sea", "the sea"),
        ("\x04", "\ufffd"),  # a control character SmolLM2's alphabet has no byte for
        ("a\U00040000b", "a\ufffdb"),  # lead byte 0xF1 is missing too
        ("東京 🙂", "東京 🙂"),
    ],
)
def test_smollm2_missing_bytes(embedded_guidance, text: str, spelled: str) -> None:
    tokenizer = embedded_guidance.tokenizer
    runner = TokenText(tokenizer, "smol", tokenizer("Hi").input_ids, embedded_guidance.eos_ids)
    runner.apply(Commit(text, (), "gemma"))
    assert runner.completion_text() == spelled


@pytest.mark.parametrize("fixture", REAL)
def test_candidate_texts_for_a_hundred_ids_stay_cheap(
    request: pytest.FixtureRequest, fixture: str
) -> None:
    loaded = request.getfixturevalue(fixture)
    tokenizer = loaded.tokenizer
    runner = TokenText(tokenizer, "own", tokenizer("The ocean").input_ids, loaded.eos_ids)
    ids = list(range(1000, 1000 + 100 * 97, 97))
    start = time.perf_counter()
    for _ in range(20):
        runner.candidate_texts(ids)
    assert (time.perf_counter() - start) / 20 < 0.02  # measured about 0.4 ms


@pytest.mark.parametrize(("prompt", "pushed"), CANDIDATE_STATES)
def test_candidate_texts_equal_each_push_on_the_real_vocabularies(
    tokenizer, prompt: str, pushed: str
) -> None:
    """The piece-text table against decoding in the window: every 61st id, the byte tokens
    and the first thousand ids (specials, bytes, short pieces) of each real vocabulary."""
    byte_tokens = {tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}
    ids = sorted({*range(0, len(tokenizer), 61), *range(1000), *byte_tokens} - {None, -1})
    check_candidate_texts(tokenizer, prompt, pushed, ids)
