"""The text bridge keeps each runner's ids in step with the shared text, for every tokenizer kind.

The property checks are plain functions so the integration tests run them on the real
Gemma and SmolLM2 tokenizers too.
"""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from junction.shared.bridge import TokenText
from junction.shared.types import EOS_TEXT, Commit
from junction.shared.vocab import (
    ENCODED_TEXT,
    ENCODED_TEXTS,
    token_bytes,
    utf8_incomplete_tail,
    vocab_of,
    without_prefix_space,
)
from tests.tiny import TOKENIZER_KINDS, tiny_tokenizer

PROMPT = "Question: why is the sea salty?\n"
# EOS_TEXT is the end-of-sequence marker, never real text (it holds U+FFFF, a non-character).
texts = st.text(max_size=24).filter(lambda s: EOS_TEXT not in s)
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

TOKENIZERS = {kind: tiny_tokenizer(kind) for kind in TOKENIZER_KINDS}


def runner(tokenizer, family: str = "own", prompt: str = PROMPT) -> TokenText:
    return TokenText(tokenizer, family, tokenizer(prompt).input_ids, {tokenizer.eos_token_id})


def decode_in_context(tokenizer, prompt_ids: list[int], ids: list[int]) -> str:
    """What `ids` add to the decoded text when they follow the prompt."""
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    return tokenizer.decode(prompt_ids + ids, skip_special_tokens=True)[len(head) :]


def push_all(text: TokenText, ids: list[int], probes: list[int]) -> list[str]:
    """Push ids one by one, checking that candidate_texts predicts every push."""
    out = []
    for token_id in ids:
        predicted = text.candidate_texts([token_id, *probes])
        out.append(text.push(token_id))
        assert predicted[0] == out[-1]
    return out


def check_text_commits(tokenizer, pieces: list[str]) -> None:
    """(a) Foreign text commits, applied piece by piece, decode to their concatenation
    (as the vocabulary can spell it: see test_characters_a_vocabulary_cannot_spell)."""
    text = runner(tokenizer)
    for piece in pieces:
        text.apply(Commit(piece, (999,), "foreign"))
    assert text.completion_text() == text.vocab.spell("".join(pieces))
    assert not text.mid_char


def check_own_pushes(tokenizer, piece: str) -> None:
    """(b) Own ids pushed one by one give back exactly the decode of those ids."""
    text = runner(tokenizer)
    ids = tokenizer(piece, add_special_tokens=False).input_ids
    probes = [tokenizer.eos_token_id, *range(min(len(tokenizer), 64))]
    pushed = push_all(text, ids, probes)
    assert "".join(pushed) == decode_in_context(tokenizer, text.ids[: text.prompt_len], ids)
    assert "".join(pushed) == text.completion_text()
    assert text.ids == text.ids[: text.prompt_len] + ids
    assert not text.mid_char


def check_mixed_stream(own_tokenizer, other_tokenizer, steps: list[tuple[bool, str]]) -> None:
    """(c) Two runners take turns writing; each applies the other's commits as text, and a
    third runner of the first one's family applies its commits as ids."""
    a, b = runner(own_tokenizer, "A"), runner(other_tokenizer, "B")
    twin = runner(own_tokenizer, "A")
    shared = []
    for a_writes, piece in steps:
        writer, reader = (a, b) if a_writes else (b, a)
        tokenizer = own_tokenizer if a_writes else other_tokenizer
        for token_id in tokenizer(piece, add_special_tokens=False).input_ids:
            [predicted] = writer.candidate_texts([token_id])
            commit = Commit(writer.push(token_id), (token_id,), writer.family)
            assert commit.text == predicted
            reader.apply(commit)
            twin.apply(commit)
            shared.append(commit.text)
        assert not writer.mid_char
    shared_text = "".join(shared)
    assert a.completion_text() == twin.completion_text() == a.vocab.spell(shared_text)
    assert b.completion_text() == b.vocab.spell(shared_text)
    assert twin.ids == a.ids


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
@PROPERTY
@given(pieces=st.lists(texts, max_size=6))
def test_text_commits_decode_to_their_concatenation(kind: str, pieces: list[str]) -> None:
    check_text_commits(TOKENIZERS[kind], pieces)


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
@PROPERTY
@given(piece=texts)
def test_pushed_ids_give_back_their_decode(kind: str, piece: str) -> None:
    check_own_pushes(TOKENIZERS[kind], piece)


@pytest.mark.parametrize(
    ("own", "other"), [("bytelevel", "sentencepiece"), ("sentencepiece", "metaspace")]
)
@PROPERTY
@given(steps=st.lists(st.tuples(st.booleans(), texts), max_size=6))
def test_mixed_stream_keeps_every_runner_on_the_shared_text(
    own: str, other: str, steps: list[tuple[bool, str]]
) -> None:
    check_mixed_stream(TOKENIZERS[own], TOKENIZERS[other], steps)


@pytest.mark.parametrize(
    ("data", "tail"),
    [
        (b"", b""),
        (b"abc", b""),
        ("中".encode(), b""),
        ("中".encode()[:1], b"\xe4"),
        (b"ab" + "中".encode()[:2], b"\xe4\xb8"),
        ("🙂".encode()[:3], "🙂".encode()[:3]),
        (b"\x80", b""),  # a stray continuation byte never completes: not pending
        (b"\xe0\x80", b""),  # invalid second byte: not a character prefix
        ("\ufffd".encode(), b""),  # a real replacement character is finished text
    ],
)
def test_utf8_incomplete_tail(data: bytes, tail: bytes) -> None:
    assert utf8_incomplete_tail(data) == tail


@pytest.mark.parametrize(
    ("piece", "byte_level", "byte_fallback", "data"),
    [
        ("Ġthe", True, False, b" the"),
        ("ä¸Ń", True, False, "中".encode()),
        ("Ã", True, False, b"\xc3"),
        ("<|im_end|>", True, False, b"<|im_end|>"),
        ("<0xE4>", False, True, b"\xe4"),
        ("<0xE4>", False, False, b"<0xE4>"),
        ("▁the", False, True, "▁the".encode()),
    ],
)
def test_token_bytes(piece: str, byte_level: bool, byte_fallback: bool, data: bytes) -> None:
    assert token_bytes(piece, byte_level=byte_level, byte_fallback=byte_fallback) == data


@pytest.mark.parametrize("kind", ["sentencepiece", "bytelevel"])
def test_a_character_split_over_tokens_appears_when_finished(kind: str) -> None:
    tokenizer = TOKENIZERS[kind]
    text = runner(tokenizer)
    ids = tokenizer("字", add_special_tokens=False).input_ids  # not in the tiny vocabularies
    assert len(ids) == 3
    assert [text.push(i) for i in ids[:2]] == ["", ""]
    assert text.mid_char
    assert text.candidate_texts(ids[2:]) == ["字"]
    assert text.push(ids[2]) == "字"
    assert not text.mid_char


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_a_real_replacement_character_is_text_not_a_partial_one(kind: str) -> None:
    tokenizer = TOKENIZERS[kind]
    text = runner(tokenizer)
    pushed = push_all(text, text.vocab.encode("a\ufffd"), [])
    assert "".join(pushed) == "a\ufffd"
    assert not text.mid_char


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_eos_is_eos_text_both_ways(kind: str) -> None:
    tokenizer = TOKENIZERS[kind]
    text = runner(tokenizer)
    eos = tokenizer.eos_token_id
    assert text.candidate_texts([eos]) == [EOS_TEXT]
    assert text.push(eos) == EOS_TEXT
    other = runner(tokenizer, family="other")
    assert other.apply(Commit(EOS_TEXT, (12345,), "foreign")) == [eos]
    assert other.completion_text() == text.completion_text() == ""


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
@pytest.mark.parametrize("piece", ["<|im_end|>", "<bos>", "<eos> and <pad>", "<0x41>"])
def test_special_token_strings_in_text_stay_text(kind: str, piece: str) -> None:
    text = runner(TOKENIZERS[kind])
    ids = text.apply(Commit(piece, (), "foreign"))
    assert not set(ids) & set(TOKENIZERS[kind].all_special_ids)
    assert text.completion_text() == piece


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
@PROPERTY
@given(piece=texts)
def test_the_tiny_vocabularies_spell_everything(kind: str, piece: str) -> None:
    assert vocab_of(TOKENIZERS[kind]).spell(piece) == piece


def ascii_letters_bytelevel() -> PreTrainedTokenizerFast:
    """A byte-level BPE whose alphabet holds only the bytes of its corpus, as SmolLM2's
    vocabulary lacks 21 bytes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["the sea é \ufffd"], trainers.BpeTrainer(special_tokens=["<eos>"], show_progress=False)
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.mark.parametrize(
    ("text", "spelled"),
    [
        ("the sea", "the sea"),
        ("tea é", "tea é"),
        ("the sea!", "the sea\ufffd"),  # "!" is not in this alphabet
        ("è", "\ufffd"),  # its lead byte is, its last byte is not
        ("sea\U00040000", "sea\ufffd"),
    ],
)
def test_characters_a_vocabulary_cannot_spell_become_replacement_characters(
    text: str, spelled: str
) -> None:
    tokenizer = ascii_letters_bytelevel()
    assert vocab_of(tokenizer).spell(text) == spelled
    runner_text = TokenText(tokenizer, "own", tokenizer("the").input_ids, {0})
    runner_text.apply(Commit(text, (), "foreign"))
    assert runner_text.completion_text() == spelled


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_the_metaspace_character_itself_round_trips(kind: str) -> None:
    text = runner(TOKENIZERS[kind])
    text.apply(Commit("a▁b ▁", (), "foreign"))
    assert text.completion_text() == "a▁b ▁"


@pytest.mark.parametrize(
    ("kind", "prepends"), [("bytelevel", False), ("sentencepiece", False), ("metaspace", True)]
)
def test_text_pieces_get_no_prefix_space(kind: str, prepends: bool) -> None:
    tokenizer = TOKENIZERS[kind]
    plain = tokenizer.convert_ids_to_tokens(tokenizer("the", add_special_tokens=False).input_ids)
    assert plain[0].startswith("▁") is prepends
    text = runner(tokenizer, prompt="Say")
    ids = text.apply(Commit("the", (), "foreign"))
    assert not tokenizer.convert_ids_to_tokens(ids)[0].startswith("▁")
    assert text.completion_text() == "the"


def test_a_byte_level_tokenizer_that_adds_a_prefix_space_gets_none_in_pieces() -> None:
    tokenizer = tiny_tokenizer("bytelevel")
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert tokenizer.convert_ids_to_tokens(tokenizer("the").input_ids)[0].startswith("Ġ")
    text = runner(tokenizer, prompt="Say")
    text.apply(Commit("the", (), "foreign"))
    assert text.completion_text() == "the"


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True},
            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never", "split": True},
        ),
        (
            {"type": "Metaspace", "replacement": "▁", "add_prefix_space": True},
            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never"},
        ),
        (
            {
                "type": "Sequence",
                "pretokenizers": [{"type": "ByteLevel", "add_prefix_space": True}],
            },
            {
                "type": "Sequence",
                "pretokenizers": [{"type": "ByteLevel", "add_prefix_space": False}],
            },
        ),
        (
            {
                "type": "Sequence",
                "normalizers": [{"type": "Prepend", "prepend": "▁"}, {"type": "NFC"}],
            },
            {
                "type": "Sequence",
                "normalizers": [{"type": "Prepend", "prepend": ""}, {"type": "NFC"}],
            },
        ),
        ({"type": "Whitespace"}, {"type": "Whitespace"}),
    ],
)
def testwithout_prefix_space(config: dict, expected: dict) -> None:
    assert without_prefix_space(config) == expected


def test_a_leading_space_after_an_empty_prompt_is_dropped_by_llama_style_decoders() -> None:
    """Documented: such decoders strip one leading space from the whole sequence."""
    tokenizer = TOKENIZERS["metaspace"]
    text = runner(tokenizer, prompt="")  # just <bos>
    text.apply(Commit(" the sea", (), "foreign"))
    assert text.completion_text() == "the sea"
    assert tokenizer.decode(text.ids, skip_special_tokens=True) == "the sea"


def test_same_family_commits_append_their_ids_verbatim() -> None:
    tokenizer = TOKENIZERS["bytelevel"]
    text = runner(tokenizer, family="fam")
    odd = tokenizer("s ea", add_special_tokens=False).input_ids  # not what "sea" encodes to
    assert text.apply(Commit("s ea", tuple(odd), "fam")) == odd
    assert text.ids[text.prompt_len :] == odd
    assert text.apply(Commit("", (), "fam")) == []


def test_a_commit_without_a_family_is_text() -> None:
    tokenizer = TOKENIZERS["bytelevel"]
    text = runner(tokenizer, family="")
    assert text.apply(Commit(" sea")) == tokenizer(" sea", add_special_tokens=False).input_ids
    assert text.completion_text() == " sea"


def test_candidate_texts_change_nothing() -> None:
    tokenizer = TOKENIZERS["sentencepiece"]
    text = runner(tokenizer)
    text.apply(Commit("The sea", (), "foreign"))
    before = (list(text.ids), text.mid_char, text.completion_text())
    everything = list(range(len(tokenizer)))
    texts = text.candidate_texts(everything)
    assert len(texts) == len(everything)
    assert (list(text.ids), text.mid_char, text.completion_text()) == before


def test_the_decode_window_stays_short() -> None:
    """Each push decodes a few recent tokens, never the whole sequence."""
    tokenizer = TOKENIZERS["bytelevel"]
    text = runner(tokenizer)
    ids = tokenizer(" the sea" * 200, add_special_tokens=False).input_ids
    push_all(text, ids, [])
    assert len(text.ids) - text._prefix <= 2


def test_one_vocab_per_tokenizer() -> None:
    tokenizer = TOKENIZERS["bytelevel"]
    assert vocab_of(tokenizer) is vocab_of(tokenizer)
    assert runner(tokenizer).vocab is runner(tokenizer).vocab


def pushed_text(text: TokenText, token_id: int) -> str:
    """What pushing `token_id` returns, on a copy (push decodes in its window)."""
    twin = copy.copy(text)
    twin.ids = list(text.ids)
    return twin.push(token_id)


CANDIDATE_STATES = [
    (PROMPT, ""),  # right after the prompt
    (PROMPT, "東"),  # after a character written in several byte tokens (or one piece)
    (PROMPT, "Ελ"),
    ("", ""),  # a window that decodes to nothing: only <bos>, or nothing at all
    ("", " sea"),
    (PROMPT, "🙂 the"),
    # after a run of byte tokens (the tiny Gemma spells these in bytes): a valid multi-byte
    # character, then ASCII bytes
    (PROMPT, "🦀"),
    (PROMPT, "Q9"),
]


def check_candidate_texts(tokenizer, prompt: str, pushed: str, ids: list[int]) -> None:
    """The table of piece texts gives what a push decodes in its window, for each of `ids`,
    in every state: after a boundary, mid-character (the pending bytes), after an empty
    window, after a special token, and after an invalid byte."""
    text = runner(tokenizer, prompt=prompt)
    written = tokenizer(pushed, add_special_tokens=False).input_ids
    for token_id in written:
        text.push(token_id)
    assert not text.mid_char
    invalid = [i for i in range(len(tokenizer)) if text.vocab.bytes_of(i) == b"\xbf"][:1]
    for token_id in (*written[:1], *tokenizer.all_special_ids, *invalid):
        twin = copy.copy(text)
        twin.ids = list(text.ids)
        if token_id not in twin.eos_ids:
            twin.push(token_id)
            assert twin.candidate_texts(ids) == [pushed_text(twin, i) for i in ids]
    assert text.candidate_texts(ids) == [pushed_text(text, i) for i in ids]


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
@pytest.mark.parametrize(("prompt", "pushed"), CANDIDATE_STATES)
def test_candidate_texts_equal_each_push_for_the_whole_vocabulary(
    kind: str, prompt: str, pushed: str
) -> None:
    tokenizer = TOKENIZERS[kind]
    check_candidate_texts(tokenizer, prompt, pushed, list(range(len(tokenizer))))


@pytest.mark.parametrize("kind", ["sentencepiece", "metaspace"])
@pytest.mark.parametrize(("prompt", "data"), [("", b" \xc3\xa9"), (PROMPT, b" \xc3\xa9"),
                                              ("", b"\xbf "), (PROMPT, b"Q\xe6\x9d\xb1")])
def test_candidate_texts_after_byte_runs_spelled_byte_by_byte(
    kind: str, prompt: str, data: bytes
) -> None:
    """Runs of byte tokens a model wrote itself, which the tokenizer would not: a run that
    opens the text with a space (a decoder that strips the text's start loses it only while
    the run is valid), an invalid one, a valid one after ASCII; every id after each."""
    tokenizer = TOKENIZERS[kind]
    text = runner(tokenizer, prompt=prompt)
    for byte in data:
        text.push(tokenizer.convert_tokens_to_ids(f"<0x{byte:02X}>"))
    assert not text.mid_char
    everything = list(range(len(tokenizer)))
    assert text.candidate_texts(everything) == [pushed_text(text, i) for i in everything]


def test_encode_keeps_short_texts_and_hands_out_copies() -> None:
    vocab = vocab_of(TOKENIZERS["metaspace"])
    expected = vocab._encode_text(" the sea ▁")
    first = vocab.encode(" the sea ▁")
    first.append(-1)  # a caller's list: the kept encoding is not touched
    assert vocab.encode(" the sea ▁") == expected == first[:-1]
    long = "x" * (ENCODED_TEXT + 1)
    assert vocab.encode(long) == vocab._encode_text(long) and long not in vocab._encoded
    for n in range(ENCODED_TEXTS + 10):
        vocab.encode(str(n))
    assert len(vocab._encoded) <= ENCODED_TEXTS
    assert vocab.encode("17") == vocab._encode_text("17")
