"""The aligned (guidance) model's implicit reward, offline on a CPU.

mean log p_guidance(y | chat(x)) - mean log p_base(y | x), each in its own tokenizer: how much
more likely the aligned model finds the response, in its chat turn, than the base model does
after the plain prompt, per token (weak-to-strong search / emulated fine-tuning). It measures
"reads like the aligned model's answer", not truth. Kept apart from `offline.rewards` because
it needs torch and both models; `reward_from_spec("implicit")` imports it when asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from junction.offline.rewards import References
from junction.shared.config import ModelSpec
from junction.shared.models import LoadedModel, load_model
from junction.shared.prompts import build_prompt_ids
from junction.shared.vocab import METASPACE, vocab_of

METASPACE_BYTES = METASPACE.encode()


@dataclass(slots=True)
class Scored:
    """One (prompt, response) pair in one model's vocabulary."""

    prompt: list[int]
    response: list[int]


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The language-model head on some hidden states, with the final soft-cap (Gemma 2/3
    configs may set one) exactly as the model's own forward applies it."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.inference_mode()
def token_logprobs(model, batch: Sequence[Scored], device: torch.device) -> list[list[float]]:
    """Per pair: log p(token | everything before it) for each of the response's tokens.

    One right-padded forward of the decoder; the vocabulary-wide head runs only at the
    positions that predict a response token (a 262k vocabulary at every position would not
    fit a batch in memory). A pair without response tokens gets [].
    """
    width = max(len(s.prompt) + len(s.response) for s in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    rows, cols, targets = [], [], []
    for b, s in enumerate(batch):
        seq = s.prompt + s.response
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
        for t in range(len(s.prompt), len(seq)):
            rows.append(b)
            cols.append(t - 1)  # the position whose output predicts token t
            targets.append(seq[t])
    out: list[list[float]] = [[] for _ in batch]
    if not targets:
        return out
    hidden = model.get_decoder()(
        input_ids=ids.to(device), attention_mask=mask.to(device)
    ).last_hidden_state
    picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    logprobs = torch.log_softmax(output_logits(model, picked), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(targets, device=device)[:, None])[:, 0].cpu()
    for row, value in zip(rows, chosen.tolist(), strict=True):
        out[row].append(value)
    return out


def mean_of(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def byte_ends(vocab, ids: Sequence[int], start: int = 0) -> list[int]:
    """Where each token's text ends, in UTF-8 bytes from `start` (a metaspace vocabulary's
    "▁" is one space of text: 1 byte, not 3)."""
    metaspace = not vocab.byte_level
    ends, at = [], start
    for token_id in ids:
        data = vocab.bytes_of(token_id)
        at += len(data.replace(METASPACE_BYTES, b" ") if metaspace else data)
        ends.append(at)
    return ends


def spread(values: Sequence[float], ends: Sequence[int], onto_ends: Sequence[int]) -> list[float]:
    """Each value (of a token of one tokenization, ending at byte `ends[i]`) added to the token
    of another tokenization of the same text whose bytes hold that end (past the last: the
    last). Sums are kept: sum(spread(v, ...)) == sum(v) when `onto_ends` is not empty."""
    out = [0.0] * len(onto_ends)
    if not onto_ends:
        return out
    j = 0
    for value, end in zip(values, ends, strict=True):
        while j < len(onto_ends) - 1 and onto_ends[j] < end:
            j += 1
        out[j] += value
    return out


def token_rewards(
    base_lp: Sequence[float], guide_lp: Sequence[float],
    base_ends: Sequence[int], guide_ends: Sequence[int],
) -> list[float]:
    """The implicit reward split over the base's response tokens, exactly: r_t = (n_b / n_g)
    · G_t − log p_base(y_t), G_t the guidance's log-probabilities of its tokens ending inside
    base token t. mean_t r_t = mean log p_guidance − mean log p_base, the trajectory reward.
    r_t is what choosing token t adds: SIA's loss (mean_t V_t − R)² is zero at V_t = r_t, so
    these are targets a value model can be taught per position (`shared/training.py`)."""
    if not base_lp or not guide_lp:
        return [0.0] * len(base_lp)
    scale = len(base_lp) / len(guide_lp)
    guided = spread(guide_lp, guide_ends, base_ends)
    return [scale * g - b for g, b in zip(guided, base_lp, strict=True)]


def encode_pair(loaded: LoadedModel, prompt: str, response: str, chat: bool) -> Scored:
    """The prompt as the role's prompt builder makes it, then the response as the text bridge
    appends text; the response is cut to fit the model's context."""
    ids = build_prompt_ids(loaded.tokenizer, prompt=prompt, chat=chat)
    reply = vocab_of(loaded.tokenizer).encode(response) if response else []
    return Scored(ids, reply[: max(0, loaded.max_context - len(ids))])


def batched_token_logprobs(
    loaded: LoadedModel, pairs: Sequence[Scored], batch_size: int, desc: str, progress: bool
) -> list[list[float]]:
    """`token_logprobs` over many pairs, longest first (little padding per batch)."""
    order = sorted(
        range(len(pairs)), key=lambda i: -(len(pairs[i].prompt) + len(pairs[i].response))
    )
    out: list[list[float]] = [[] for _ in pairs]
    starts = range(0, len(order), batch_size)
    for i in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2):
        chunk = order[i : i + batch_size]
        scores = token_logprobs(loaded.model, [pairs[j] for j in chunk], loaded.device)
        for j, score in zip(chunk, scores, strict=True):
            out[j] = score
    return out


class ImplicitReward:
    """mean log p_guidance(y | chat(x)) − mean log p_base(y | x), each in its own tokenizer.

    The aligned model's implicit reward (the log-ratio of an aligned model to its base, as in
    emulated fine-tuning and weak-to-strong search), with per-token means so that long and
    short responses are on one scale. The guidance model reads y as its own assistant turn
    (its chat template's generation prompt, then y without leading whitespace: a chat turn
    starts on a new line, while a plain base writes " answer" after "A:"); the base reads y
    after the plain prompt, as it wrote it. An empty response scores 0. Both models load
    lazily through the one loader, on the first score.

    Limits: it rewards what the small guidance model finds likely — assistant-like, fluent,
    on-topic text — not truth; a response the base finds unlikely (a rare word) scores high
    even when the guidance model is indifferent to it.
    """

    def __init__(
        self,
        base: ModelSpec | LoadedModel | None = None,
        guidance: ModelSpec | LoadedModel | None = None,
        batch_size: int = 8,
        progress: bool = True,
    ) -> None:
        self.name = "implicit"
        self._specs = {"base": base or ModelSpec(), "guidance": guidance or ModelSpec()}
        self._loaded: dict[str, LoadedModel] = {}
        self.batch_size = batch_size
        self.progress = progress

    def model(self, role: str) -> LoadedModel:
        if role not in self._loaded:
            spec = self._specs[role]
            self._loaded[role] = (
                spec
                if isinstance(spec, LoadedModel)
                else load_model(role, spec, progress=self.progress)
            )
        return self._loaded[role]

    def score_tokens(
        self, prompts: Sequence[str], responses: Sequence[str]
    ) -> tuple[list[float], list[list[float]]]:
        """Each pair's reward and its split over the base's response tokens (the encoding
        `vocab_of(base tokenizer).encode(response)`, which the value model shares)."""
        base, guidance = self.model("base"), self.model("guidance")
        on_base = [
            encode_pair(base, p, r, chat=False) for p, r in zip(prompts, responses, strict=True)
        ]
        on_guidance = [
            encode_pair(guidance, p, r.lstrip(), chat=True)
            for p, r in zip(prompts, responses, strict=True)
        ]
        size, shown = self.batch_size, self.progress
        lp_base = batched_token_logprobs(base, on_base, size, "implicit reward: base", shown)
        lp_guide = batched_token_logprobs(
            guidance, on_guidance, size, "implicit reward: guidance", shown
        )
        vb, vg = vocab_of(base.tokenizer), vocab_of(guidance.tokenizer)
        rewards, per_token = [], []
        for r, pb, pg, b, g in zip(responses, on_base, on_guidance, lp_base, lp_guide,
                                   strict=True):
            stripped = len(r.encode()) - len(r.lstrip().encode())  # the guidance reads r.lstrip()
            rewards.append(mean_of(g) - mean_of(b) if b and g else 0.0)
            per_token.append(token_rewards(
                b, g, byte_ends(vb, pb.response), byte_ends(vg, pg.response, stripped)
            ))
        return rewards, per_token

    def score_batch(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        refs: Sequence[References | None] | None = None,
    ) -> list[float]:
        return self.score_tokens(prompts, responses)[0]

    def score(self, prompt: str, response: str, refs: References | None = None) -> float:
        return self.score_batch([prompt], [response])[0]


