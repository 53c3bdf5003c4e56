"""The one place that turns a request's prompt or messages into a role's prompt ids.

Plain models get messages as "Role: content" paragraphs ending in "Assistant:" and a line
break, as the guidance's chat turn ends, so both models' first words are the same strings (as
in the Nudging reference); blank lines keep Gemma from reading "Assistant:" as an empty turn
(docs/benchmarks-history.md, "Where the answer starts").
"""

from __future__ import annotations

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}


def transcript(messages: list[Message]) -> str:
    """Messages as a plain transcript that ends where the assistant's answer starts."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join([*lines, "Assistant:\n"])


def transcript_stops(messages: list[Message]) -> list[str]:
    """Stop strings for a plain model's turn in a transcript: a next speaker's line."""
    roles = {m["role"].capitalize() for m in messages} | {"User"}
    return [stop for role in sorted(roles) for stop in (f"\n\n{role}:", f"\n{role}:")]


def _one_source(prompt: str | None, messages: list[Message] | None) -> None:
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt and messages")


def base_prompt_text(prompt: str | None = None, messages: list[Message] | None = None) -> str:
    """The text a plain (base or value) model continues, without special tokens."""
    _one_source(prompt, messages)
    return prompt if prompt is not None else transcript(messages)


def build_prompt_ids(
    tokenizer, *, prompt: str | None = None, messages: list[Message] | None = None, chat: bool
) -> list[int]:
    """Prompt ids for a role: the chat template if `chat` and the tokenizer has one, else
    plain text with the tokenizer's own special tokens."""
    _one_source(prompt, messages)
    if chat and tokenizer.chat_template:
        turns = messages if messages is not None else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        # The template writes its own special tokens (a BOS, if the format has one).
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(base_prompt_text(prompt, messages)).input_ids
