"""Log-likelihood of given answers under a model: how MC1 is scored.

The answer is appended to the prompt exactly as the model would see its own answer: after
a plain prompt ("Q: ...\\nA:") it starts with a space, after a chat template's assistant
turn it starts the turn. Each model encodes it with its own tokenizer, through the text
bridge's encoder (so the ids decode back to exactly the answer's text).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from junction.shared.models import LoadedModel
from junction.shared.prompts import build_prompt_ids
from junction.shared.vocab import vocab_of


@torch.inference_mode()
def continuation_logprobs(
    loaded: LoadedModel, prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]]
) -> list[float]:
    """Σ log p(continuation tokens | prompt) for each continuation, in one right-padded
    forward (causal attention: padding after a row never changes its tokens' logits)."""
    rows = [list(prompt_ids) + list(c) for c in continuations]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    device = loaded.device
    logits = loaded.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    start = len(prompt_ids)
    out = []
    for i, cont in enumerate(continuations):
        # The logits at position t predict token t + 1.
        positions = torch.arange(start - 1, start - 1 + len(cont), device=device)
        targets = torch.tensor(list(cont), device=device)
        out.append(float(logprobs[i, positions, targets].sum()))
    return out


def answer_logprobs(
    loaded: LoadedModel, chat: bool, prompt: str, answers: Sequence[str]
) -> list[float]:
    """Log-likelihood of each answer to `prompt` under a base (chat=False) or chat model."""
    tokenizer = loaded.tokenizer
    prompt_ids = build_prompt_ids(tokenizer, prompt=prompt, chat=chat)
    in_turn = chat and bool(tokenizer.chat_template)
    vocab = vocab_of(tokenizer)
    continuations = [vocab.encode(a.strip() if in_turn else " " + a.strip()) for a in answers]
    if any(not c for c in continuations):
        raise ValueError("answers: an empty answer has no likelihood to compare")
    return continuation_logprobs(loaded, prompt_ids, continuations)
