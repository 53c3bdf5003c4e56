"""Prompt ids per role: chat template for the guidance role, plain text for base and value."""

from __future__ import annotations

import pytest

from junction.shared.prompts import base_prompt_text, build_prompt_ids, transcript, transcript_stops
from tests.tiny import tiny_tokenizer

CHATML = tiny_tokenizer("bytelevel")  # has a ChatML-like chat template, adds no BOS
GEMMA_LIKE = tiny_tokenizer("sentencepiece")  # no chat template, adds <bos>

USER = [{"role": "user", "content": "Why is the sea salty?"}]
DIALOGUE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Why is the sea salty?"},
]


def as_text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([], "Assistant:\n"),
        # the answer starts on its own line, as the guidance model's chat turn does
        (USER, "User: Why is the sea salty?\n\nAssistant:\n"),
        (
            DIALOGUE,
            "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello.\n\n"
            "User: Why is the sea salty?\n\nAssistant:\n",
        ),
    ],
)
def test_transcript(messages: list[dict], expected: str) -> None:
    assert transcript(messages) == expected


@pytest.mark.parametrize(
    ("tokenizer", "kwargs", "chat", "expected"),
    [
        # Plain roles: the text with the tokenizer's own special tokens.
        (GEMMA_LIKE, {"prompt": "The sea is"}, False, "<bos>The sea is"),
        (CHATML, {"prompt": "The sea is"}, False, "The sea is"),
        (GEMMA_LIKE, {"messages": USER}, False, "<bos>User: Why is the sea salty?\n\nAssistant:\n"),
        (CHATML, {"messages": USER}, False, "User: Why is the sea salty?\n\nAssistant:\n"),
        # The chat role: the chat template with the generation prompt.
        (
            CHATML,
            {"prompt": "Why is the sea salty?"},
            True,
            "<|im_start|>user\nWhy is the sea salty?<|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            CHATML,
            {"messages": DIALOGUE[:2]},
            True,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n",
        ),
        # A chat role whose tokenizer has no chat template falls back to plain text.
        (GEMMA_LIKE, {"prompt": "The sea is"}, True, "<bos>The sea is"),
        (GEMMA_LIKE, {"messages": USER}, True, "<bos>User: Why is the sea salty?\n\nAssistant:\n"),
        # An empty prompt is just the special tokens.
        (GEMMA_LIKE, {"prompt": ""}, False, "<bos>"),
    ],
)
def test_build_prompt_ids(tokenizer, kwargs: dict, chat: bool, expected: str) -> None:
    ids = build_prompt_ids(tokenizer, chat=chat, **kwargs)
    assert as_text(tokenizer, ids) == expected


def test_chat_template_special_tokens_are_single_ids_and_not_doubled() -> None:
    ids = build_prompt_ids(CHATML, prompt="Hi", chat=True)
    start = CHATML.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == start
    assert ids.count(start) == 2


def test_plain_prompt_ids_are_the_tokenizer_encoding() -> None:
    assert (
        build_prompt_ids(GEMMA_LIKE, prompt="Café 東京", chat=False)
        == GEMMA_LIKE("Café 東京").input_ids
    )


@pytest.mark.parametrize("kwargs", [{}, {"prompt": "a", "messages": USER}])
def test_exactly_one_of_prompt_and_messages(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        build_prompt_ids(CHATML, chat=True, **kwargs)


@pytest.mark.parametrize(
    ("messages", "stops"),
    [
        ([{"role": "user", "content": "hi"}], ["\n\nUser:", "\nUser:"]),
        (
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            ["\n\nSystem:", "\nSystem:", "\n\nUser:", "\nUser:"],
        ),
        (
            [{"role": "assistant", "content": "hello"}],
            ["\n\nAssistant:", "\nAssistant:", "\n\nUser:", "\nUser:"],
        ),
    ],
)
def test_a_base_reply_to_a_transcript_stops_at_the_next_turn(messages, stops):
    assert transcript_stops(messages) == stops


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"prompt": "The sea is"}, "The sea is"),
        ({"messages": USER}, "User: Why is the sea salty?\n\nAssistant:\n"),
    ],
)
def test_base_prompt_text_is_what_a_plain_model_continues(kwargs: dict, expected: str) -> None:
    assert base_prompt_text(**kwargs) == expected


def test_base_and_guidance_prompts_end_at_the_same_boundary() -> None:
    """Both prompts end with a line break, so the answer's first word is spelled alike."""
    base = as_text(GEMMA_LIKE, build_prompt_ids(GEMMA_LIKE, messages=USER, chat=False))
    guidance = as_text(CHATML, build_prompt_ids(CHATML, messages=USER, chat=True))
    assert base.endswith("\n") and guidance.endswith("\n")
