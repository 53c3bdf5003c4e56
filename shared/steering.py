"""Junction tests and steering rules: pure functions over top-k summaries.

No models, workers or HTTP here; the policies in `junction.gateway.policies` call them.
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
    """Entropy (nats) of softmax over top-k logits along the last dim, in [0, ln k].
    float64, so the clamp to `math.log(k)` is exact; a zero probability adds 0, not nan."""
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
    """The threshold H at which a share `ratio` (in [0, 1]) of these ascending entropies
    fires: SIA's quantile calibration, midway between the highest entropy that does not fire
    and the lowest that does; ∞ when none fires, 0 when all do."""
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
    """H for `ratio`, linear between calibrated ratios; None outside their range (a quantile
    is not extrapolated), except r = 0 (∞) and r = 1 (0)."""
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
    """SIA's `target_ratio` without a calibration: a running quantile of the last `size`
    base entropies of all requests (server-wide: a request whose steps are all easy must not
    be forced to fire on a share of them)."""

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
    """Each candidate's logit + β·V (log-probabilities are logits up to a common shift)."""
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
    from softmax(scores / T). `value_only` is β = ∞ (JSON has no infinity): scores are V
    alone, and at T = 0 equal values go to the higher logit."""
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
    """SIA's decoding outside junctions in the paper: a sample from the base's top-k at T."""
    lp = torch.as_tensor(logprobs, dtype=torch.float64)
    return sia_choose(lp, torch.zeros_like(lp), 0.0, temperature, generator)


# --- BlendIn: blend base and guidance distributions by decoded string ----------------------


def blend_alpha(p_hat_g: float, p_hat_b: float, p_b_of_tg: float, lam: float) -> float:
    """BlendIn's weight on the guidance model: clip(p̂_g/(p̂_b+p̂_g) + λ·p_b(t_g), 0, 1).
    p̂ are top-1 probabilities, p_b(t_g) the base's probability of the guidance's top-1
    string (0 if absent). Two zero top-1s (no real distribution) give the neutral 0.5."""
    total = p_hat_g + p_hat_b
    share = p_hat_g / total if total > 0 else 0.5
    return min(1.0, max(0.0, share + lam * p_b_of_tg))


def string_distribution(texts: Sequence[str], probs: Sequence[float]) -> dict[str, float]:
    """Probability per decoded string, in first-occurrence order: duplicates summed, ""
    (mid-UTF-8 character) dropped."""
    # Built in C (hot at BlendIn junctions); summed in Python only when a string repeats.
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
    """α·p_g + (1−α)·p_b over the union of keys: the base's order, then guidance-only keys."""
    keys = list(base) + [key for key in guidance if key not in base]
    return {key: alpha * guidance.get(key, 0.0) + (1 - alpha) * base.get(key, 0.0) for key in keys}


def start_key(text: str) -> str:
    """The key a candidate string is matched by at the answer's first step: the base
    continues a prompt while the guidance opens its own chat turn, so " The" and "The" must
    match. Leading spaces go unless nothing else is left; newlines stay."""
    word = text.lstrip(" ")
    return word if word else text


def answer_start(text: str, prompt_ends_in_space: bool) -> str:
    """A guidance string as the first piece of the base's answer: a word gets one space
    unless the prompt already ends in whitespace (never "Answer:The")."""
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
    """One BlendIn junction: (argmax string of the blend, α); ties go to the base's order.
    If no candidate is a complete character, the base's top-1 text ("") comes back and the
    caller keeps the base's token. `alpha` fixes α (the BlendIn code's `blend_alpha`
    setting); `at_start` matches by `start_key` and returns the base's spelling if it has it."""
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
    # The string as written: the base's form when it offered the key, else the guidance's.
    for keys, texts in ((base_keys, base_texts), (guide_keys, guidance_texts)):
        if best in keys:
            return texts[keys.index(best)], alpha
    raise AssertionError("the blend's argmax is a key of one of the two lists")


def _blend_argmax(base: dict[str, float], guidance: dict[str, float], alpha: float) -> str | None:
    """The first key of `blend(base, guidance, alpha)` with the largest weight (the same
    floats as `blend` + `max`), without building the blend. Where a side's probabilities do
    not increase along its keys, its scan stops once no later key can beat the best (the
    bound holds under float rounding)."""
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
    """True when the guidance writer should stop before appending `next_text`: once some
    non-whitespace is written and whitespace starts `next_text` or ends `written` (words as
    in `str.split()`). "" never stops (a character is not split), EOS always does; scripts
    without spaces rely on `nudge_max_tokens`."""
    if next_text == EOS_TEXT:
        return True
    if not next_text or not written.strip():
        return False
    return next_text[0].isspace() or written[-1].isspace()


REPEATED_ROUNDS = 3  # Nudging stops when a round's words repeat the last round's this often


def base_resumes(base_text: str, guidance_next: str) -> bool:
    """Nudging, right after a nudge: the base takes its token back when it is a prefix of
    the guidance's next token (the reference's acceptance rule). "" and EOS never match."""
    return bool(base_text) and base_text != EOS_TEXT and guidance_next.startswith(base_text)


@dataclass(slots=True)
class NudgeRounds:
    """Nudging's memory across junctions, as in the reference (Fei et al., `fywalter/nudging`):
    a round is the words the guidance writes until the base resumes; a round that repeats
    the previous one for the third time in a row stops the answer (a loop)."""

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
    """Which signal a hybrid step consults; when both fire, the guidance model (the stronger
    signal: an aligned model's own distribution, not a small distilled estimate)."""
    if confidence_fires:
        return "guidance"
    if entropy_fires:
        return "value"
    return None


# --- run-ahead: the junction test a runner applies on its own --------------------------------


def run_ahead_stops(entropy: float, top1_prob: float, threshold: float | None,
                    tau: float | None) -> bool:
    """Does this step end a run-ahead burst: a junction at `threshold` or `tau` (None: no test)?"""
    return (threshold is not None and entropy_junction(entropy, threshold)) or (
        tau is not None and confidence_junction(top1_prob, tau)
    )


# --- Best-of-N -----------------------------------------------------------------------------


def best_of(scores: Sequence[float]) -> int:
    """Index of the best-scored completion (ties → the first)."""
    if not scores:
        raise ValueError("no scores")
    return max(range(len(scores)), key=scores.__getitem__)
