"""Junction tests and steering rules: small pure functions over top-k summaries.

One section per policy of the architecture's table. Nothing here knows about models,
workers or HTTP: inputs are top-k logits/log-probabilities, values, probabilities and the
decoded candidate strings; outputs are decisions, indices, strings and weights.
The policies that use them are `junction.gateway.policies`, one module each.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from junction.shared.types import EOS_TEXT

Floats = torch.Tensor | Sequence[float]

# --- junction tests ------------------------------------------------------------------------


def topk_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax over top-k logits along the last dim; in [0, ln k].

    Works on any batch shape; computed and returned in float64 (k is small), so the
    clamp to [0, ln k] holds exactly against `math.log(k)`. log_softmax keeps huge or -inf
    logits finite; a candidate with probability 0 contributes 0 (not 0·-inf = nan).
    """
    logits = logits.to(torch.float64)
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    return (-plogp.sum(dim=-1)).clamp(min=0.0, max=math.log(logits.shape[-1]))


def entropy_junction(entropy: float, threshold: float) -> bool:
    """SIA: the base is unsure enough to consult the value model."""
    return entropy >= threshold


def confidence_junction(top1_prob: float, tau: float) -> bool:
    """BlendIn / Nudging: the base's most likely token is not likely enough."""
    return top1_prob < tau


def ratio_threshold(sorted_entropies: Sequence[float], ratio: float) -> float:
    """The entropy threshold H at which a share `ratio` of these entropies is a junction.

    With m = round(r·n) of the n (ascending) entropies to fire, H lies midway between the
    highest one that does not fire and the lowest one that does, so `entropy >= H` fires
    exactly m of them when they are distinct (ties at H all fire). As the paper calibrates
    SIA: a quantile of the entropies of base runs. r·n below one half never fires (H = ∞);
    r = 1 always fires (H = 0, entropies are >= 0).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError("ratio must be between 0 and 1")
    n = len(sorted_entropies)
    fire = math.floor(ratio * n + 0.5)
    if fire == 0:
        return math.inf
    if fire >= n:
        return 0.0
    below, lowest_fired = sorted_entropies[n - fire - 1], sorted_entropies[n - fire]
    middle = (below + lowest_fired) / 2
    return middle if middle > below else lowest_fired  # neighbours one float apart


def calibrated_threshold(thresholds: dict[float, float], ratio: float) -> float | None:
    """H for `ratio` from thresholds calibrated at some ratios; None outside their range.

    Between two calibrated ratios H is interpolated linearly (entropy quantiles are
    monotone in the ratio); a ratio outside the calibrated range has no calibrated answer
    (extrapolating a quantile is guesswork), except r = 0 (never) and r = 1 (always).
    """
    if ratio == 0.0:
        return math.inf
    if ratio == 1.0:
        return 0.0
    points = sorted(thresholds.items())
    for (r0, h0), (r1, h1) in zip(points, points[1:], strict=False):
        if r0 <= ratio <= r1:
            return h0 + (h1 - h0) * (ratio - r0) / (r1 - r0)
    if points and any(r == ratio for r, _ in points):
        return dict(points)[ratio]
    return None


class EntropyWindow:
    """SIA's `target_ratio` without a calibration: a server-wide running entropy quantile.

    It holds the last `size` base entropies of all requests (not one request's: a request
    whose steps are all easy must not be forced to fire on a share of them), and answers the
    threshold for a ratio r from them as `ratio_threshold` does. Kept sorted as it goes, so
    a threshold is O(1) and an observation O(size) at worst (a list insert and delete).
    """

    def __init__(self, size: int = 10_000) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self.size = size
        self._recent: deque[float] = deque()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._recent)

    def observe(self, entropy: float) -> None:
        if math.isnan(entropy):
            return
        insort(self._sorted, entropy)
        self._recent.append(entropy)
        if len(self._recent) > self.size:
            del self._sorted[bisect_left(self._sorted, self._recent.popleft())]

    def threshold(self, ratio: float) -> float:
        return ratio_threshold(self._sorted, ratio)


# --- SIA: value-guided choice among the base's top-k ---------------------------------------


def sia_scores(logprobs: Floats, values: Floats, beta: float) -> torch.Tensor:
    """Score each candidate as logit + β·V.

    Log-probabilities stand in for raw logits: logprob_c = logit_c - logsumexp(logits) is
    the same shift for every candidate, and softmax (at any temperature) and argmax do
    not change under a common shift.
    """
    lp = torch.as_tensor(logprobs, dtype=torch.float64)
    v = torch.as_tensor(values, dtype=torch.float64)
    if lp.shape != v.shape:
        raise ValueError(f"logprobs {tuple(lp.shape)} and values {tuple(v.shape)} differ")
    return lp + beta * v


def sia_choose(
    logprobs: Floats,
    values: Floats,
    beta: float,
    temperature: float,
    generator: torch.Generator | None = None,
    value_only: bool = False,
) -> int:
    """Index of the chosen candidate: argmax at T = 0 (ties → lowest index), else a sample
    from softmax(scores / T) drawn with `generator`.

    `value_only` is β = ∞ (JSON has no infinity, so it is a flag): the scores are V alone
    (as the reference does for large weights) and at T = 0 equal values go to the higher
    logit, then the lower index.
    """
    scores = sia_scores(logprobs, values, 0.0 if value_only else beta)
    if scores.numel() == 0:
        raise ValueError("no candidates")
    if torch.isnan(scores).any():  # an argmax would pick one silently
        raise ValueError("SIA's scores are not numbers (NaN in logprob + β·V)")
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if value_only:
        v = torch.as_tensor(values, dtype=torch.float64)
        if temperature == 0:
            pairs = list(zip(v.tolist(), scores.tolist(), strict=True))
            return max(range(len(pairs)), key=pairs.__getitem__)  # first of equal pairs
        scores = v
    if temperature == 0:
        return int(torch.argmax(scores))  # torch returns the first maximal index
    probs = torch.softmax(scores / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def topk_sample(
    logprobs: Floats, temperature: float, generator: torch.Generator | None = None
) -> int:
    """SIA's decoding outside junctions in the paper: a sample from the base's top-k at T.

    softmax(logprob / T) over the k candidates (argmax at T = 0): SIA's choice with V = 0.
    """
    lp = torch.as_tensor(logprobs, dtype=torch.float64)
    return sia_choose(lp, torch.zeros_like(lp), 0.0, temperature, generator)


# --- BlendIn: blend base and guidance distributions by decoded string ----------------------


def blend_alpha(p_hat_g: float, p_hat_b: float, p_b_of_tg: float, lam: float) -> float:
    """BlendIn's weight on the guidance model: clip(p̂_g/(p̂_b+p̂_g) + λ·p_b(t_g), 0, 1).

    p̂_g, p̂_b are the two models' top-1 probabilities; p_b(t_g) is the base's probability
    of the guidance's top-1 string (0 when the base's top-k lacks it). Two zero top-1
    probabilities cannot come from real distributions; they give the neutral share 0.5.
    """
    total = p_hat_g + p_hat_b
    share = p_hat_g / total if total > 0 else 0.5
    return min(1.0, max(0.0, share + lam * p_b_of_tg))


def string_distribution(texts: Sequence[str], probs: Sequence[float]) -> dict[str, float]:
    """Probability per decoded string: duplicates summed, "" (mid-UTF-8 character) dropped.

    Keys keep the order of their first occurrence.
    """
    # This runs twice per BlendIn junction over 100 candidates, so it is built in C by
    # `dict(zip())` (0.0 + p is p: the same floats); only when a string repeats (U+FFFD from
    # byte tokens, say) is it summed in one Python pass, in order: the same floats as a sum.
    dist = dict(zip(texts, probs, strict=True))
    dist.pop("", None)
    if len(dist) < len(texts) - texts.count(""):
        dist = {}
        get = dist.get
        for text, p in zip(texts, probs, strict=True):
            if text:
                dist[text] = get(text, 0.0) + p
    return dist


def blend(base: dict[str, float], guidance: dict[str, float], alpha: float) -> dict[str, float]:
    """α·p_g + (1−α)·p_b over the union of keys (a missing key has probability 0).

    Keys come in the base's order, then the guidance-only keys in the guidance's order.
    """
    keys = list(base) + [key for key in guidance if key not in base]
    return {key: alpha * guidance.get(key, 0.0) + (1 - alpha) * base.get(key, 0.0) for key in keys}


def start_key(text: str) -> str:
    """The key a candidate string is matched by at the answer's first step.

    Where the answer starts, the base continues a prompt (a plain text, or a transcript) and
    the guidance model opens its own chat turn, so the same first word can come as " The"
    from one model and "The" from the other. Dropping leading spaces makes them one key; a
    string of only spaces keeps them (it is its own candidate), and newlines are kept (a line
    break is a different choice than a word).
    """
    word = text.lstrip(" ")
    return word if word else text


def answer_start(text: str, prompt_ends_in_space: bool) -> str:
    """A guidance string as the first piece of the base's answer: a word gets the one space
    that separates it from the base prompt, or none when the prompt already ends in
    whitespace, so a guidance word is never glued to the prompt ("Answer:The")."""
    word = start_key(text)
    if text == EOS_TEXT or not word or word[0].isspace():
        return text
    return word if prompt_ends_in_space else " " + word


def blendin_choose(
    base_texts: Sequence[str],
    base_probs: Sequence[float],
    guidance_texts: Sequence[str],
    guidance_probs: Sequence[float],
    lam: float,
    *,
    alpha: float | None = None,
    at_start: bool = False,
) -> tuple[str, float]:
    """One BlendIn junction: (argmax string of the blend, α).

    Top-1 probabilities and the guidance's top-1 string t_g are taken per token (first
    maximum). Ties in the blend go to the string listed first by `blend`, i.e. the base's
    order wins. If no candidate of either list is a complete character, the base's top-1
    text ("") is returned and the caller keeps the base's own token.

    `alpha` fixes α instead of computing it (the BlendIn code's `blend_alpha` setting, its
    fallback when the computed weight is not tuned for a pair). `at_start` matches strings by
    `start_key` (the answer's first step); the chosen string is then returned as the base
    wrote it when the base offered it, else as the guidance model did.
    """
    if not base_probs or not guidance_probs:
        raise ValueError("both top-k lists must be non-empty")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must be between 0 and 1")
    base_keys = [start_key(t) for t in base_texts] if at_start else base_texts
    guide_keys = [start_key(t) for t in guidance_texts] if at_start else guidance_texts
    base_top = base_probs.index(max(base_probs))  # the first maximum
    guide_top = guidance_probs.index(max(guidance_probs))
    p_base = string_distribution(base_keys, base_probs)
    p_guide = string_distribution(guide_keys, guidance_probs)
    if alpha is None:
        alpha = blend_alpha(
            p_hat_g=guidance_probs[guide_top],
            p_hat_b=base_probs[base_top],
            p_b_of_tg=p_base.get(guide_keys[guide_top], 0.0),
            lam=lam,
        )
    best = _blend_argmax(p_base, p_guide, alpha)
    if best is None:
        return base_texts[base_top], alpha
    # The string as written: the base's own form when it offered the key, else the guidance's
    # (first occurrence; without `at_start` the key is the string itself).
    for keys, texts in ((base_keys, base_texts), (guide_keys, guidance_texts)):
        if best in keys:
            return texts[keys.index(best)], alpha
    raise AssertionError("the blend's argmax is a key of one of the two lists")


def _blend_argmax(base: dict[str, float], guidance: dict[str, float], alpha: float) -> str | None:
    """The first key of `blend(base, guidance, alpha)` with the largest weight, without
    building the blend (this runs at every junction of every BlendIn request): the same
    keys in the same order, each weight the same expression, so the same float, and the
    same rule as `max` (the first item, replaced only by a larger one).

    When each side's probabilities do not increase along its keys (top-k lists, whose
    strings rarely repeat), a scan stops once no later key can beat the best: a base key
    at or after one of probability p weighs at most α·max p_g + (1−α)·p, a guidance-only
    key at or after one of probability q at most α·q — with rounding, as floats, since
    rounding keeps x ≤ y ordered. Peaked distributions stop after a few keys."""
    beta = 1 - alpha
    base_p, guide_p = list(base.values()), list(guidance.values())
    base_sorted = base_p == sorted(base_p, reverse=True)
    guide_sorted = guide_p == sorted(guide_p, reverse=True)
    top_g = alpha * max(guide_p, default=0.0)
    get = guidance.get
    best, best_p = None, 0.0
    for key, p_b in base.items():
        if base_sorted and best is not None and top_g + beta * p_b <= best_p:
            break
        p = alpha * get(key, 0.0) + beta * p_b
        if best is None or p > best_p:
            best, best_p = key, p
    for key, p_g in guidance.items():
        if guide_sorted and best is not None and alpha * p_g <= best_p:
            break
        if key not in base:
            p = alpha * p_g + beta * 0.0
            if best is None or p > best_p:
                best, best_p = key, p
    return best


# --- Nudging: the guidance model writes the next word -------------------------------------


def word_finished(written: str, next_text: str) -> bool:
    """True when the guidance writer should stop before appending `next_text`.

    Words are whitespace-delimited, as in `str.split()`: the writer stops once it has
    written some non-whitespace and a word boundary follows — `next_text` starts with
    whitespace, or `written` already ends with it (tokenizers that put the space after a
    word). Leading whitespace alone is not a word, so the writer carries on. Punctuation
    stays with its word ("word," is one word). "" (mid-UTF-8 character) never stops it,
    so a character is not split. EOS always stops it. Scripts without spaces rely on the
    writer's token limit (`nudge_max_tokens`).
    """
    if next_text == EOS_TEXT:
        return True
    if not next_text or not written.strip():
        return False
    return next_text[0].isspace() or written[-1].isspace()


REPEATED_ROUNDS = 3  # Nudging stops when a round's words repeat the last round's this often


def base_resumes(base_text: str, guidance_next: str) -> bool:
    """Nudging, right after a nudge: the base takes its own token back when that token is a
    prefix of the guidance model's next word (the reference's acceptance rule: the base
    already agrees with where the guidance is going, however unsure it is).

    The writer stops at the first token of its next word, so `guidance_next` is that token,
    not the whole word: a base token longer than it cannot be checked and counts as no
    match (the guidance model then writes the word itself). "" (nothing known, or a
    mid-character token) never matches; neither does an end of text.
    """
    return bool(base_text) and base_text != EOS_TEXT and guidance_next.startswith(base_text)


@dataclass(slots=True)
class NudgeRounds:
    """Nudging's memory across junctions, as in the reference (Fei et al., `fywalter/nudging`).

    A *round* is the words the guidance model writes in a row, until the base resumes. The
    reference stops the answer when a round's words equal the previous round's for the
    third time in a row (a loop the two models cannot leave).
    """

    words: str = ""  # the running round's words
    next_text: str = ""  # the guidance model's first token after its last word
    last: str = ""  # the last finished round's words
    repeats: int = 0  # how often in a row `last` came again

    def nudged(self, word: str, next_text: str) -> None:
        self.words += word
        self.next_text = next_text

    def resumes(self, base_text: str) -> bool:
        """Whether the base takes this step back from the running round (`base_resumes`)."""
        return bool(self.words) and base_resumes(base_text, self.next_text)

    def base_wrote(self) -> bool:
        """The base wrote a token: the running round, if any, ends. True = stop the answer."""
        if not self.words:
            return False
        if self.words == self.last:
            self.repeats += 1
        else:
            self.last, self.repeats = self.words, 0
        self.words, self.next_text = "", ""
        return self.repeats >= REPEATED_ROUNDS


# --- Hybrid: the value model at entropy junctions, the guidance model at confidence ones ---


def hybrid_kind(entropy_fires: bool, confidence_fires: bool) -> str | None:
    """Which signal a hybrid step consults. When both tests fire, the guidance model wins:
    it is the stronger signal (an aligned model's own next-token distribution, where the
    value model is a small distilled estimate), and a step consults one model, not two."""
    if confidence_fires:
        return "guidance"
    if entropy_fires:
        return "value"
    return None


# --- run-ahead: the junction test a runner applies on its own --------------------------------


def run_ahead_stops(entropy: float, top1_prob: float, threshold: float | None,
                    tau: float | None) -> bool:
    """Does this step end a run-ahead burst? It does where the request's policy would find a
    junction: an entropy junction at `threshold`, a confidence junction at `tau` (each test
    only when its setting is given)."""
    return (threshold is not None and entropy_junction(entropy, threshold)) or (
        tau is not None and confidence_junction(top1_prob, tau)
    )


# --- Best-of-N -----------------------------------------------------------------------------


def best_of(scores: Sequence[float]) -> int:
    """Index of the best-scored completion (ties → the first)."""
    if not scores:
        raise ValueError("no scores")
    return max(range(len(scores)), key=scores.__getitem__)
