"""The junction tests and steering rules, as tables of inputs and expected outputs."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from junction.shared.steering import (
    REPEATED_ROUNDS,
    EntropyWindow,
    NudgeRounds,
    answer_start,
    base_resumes,
    best_of,
    blend,
    blend_alpha,
    blendin_choose,
    calibrated_threshold,
    confidence_junction,
    entropy_junction,
    hybrid_kind,
    ratio_threshold,
    run_ahead_stops,
    sia_choose,
    sia_scores,
    start_key,
    string_distribution,
    topk_entropy,
    topk_sample,
    word_finished,
)
from junction.shared.types import EOS_TEXT

INF = float("inf")
finite = st.floats(min_value=-50, max_value=50, allow_nan=False)
prob = st.floats(min_value=0, max_value=1, allow_nan=False)

# --- entropy -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "logits, expected",
    [
        ([0.0, 0.0], math.log(2)),
        ([0.0] * 10, math.log(10)),
        ([3.0] * 4, math.log(4)),
        ([0.0, -INF], 0.0),
        ([0.0, 0.0, -INF], math.log(2)),
        ([math.log(1), math.log(3)], -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))),
        ([1000.0, 0.0], 0.0),  # huge logits stay finite
        ([5.0], 0.0),
    ],
)
def test_topk_entropy(logits: list[float], expected: float) -> None:
    assert topk_entropy(torch.tensor(logits)).item() == pytest.approx(expected, abs=1e-6)


def test_topk_entropy_is_batched_over_leading_dims() -> None:
    logits = torch.tensor([[[0.0, 0.0], [0.0, -INF]], [[1.0, 1.0], [7.0, -INF]]])
    expected = torch.tensor([[math.log(2), 0.0], [math.log(2), 0.0]], dtype=torch.float64)
    assert torch.allclose(topk_entropy(logits), expected, atol=1e-6)


def test_topk_entropy_is_float64_whatever_the_input() -> None:
    h = topk_entropy(torch.zeros(3, 10, dtype=torch.bfloat16))
    assert h.dtype == torch.float64
    assert torch.allclose(h, torch.full((3,), math.log(10), dtype=torch.float64))


@given(st.lists(finite, min_size=1, max_size=64))
def test_topk_entropy_lies_in_zero_to_ln_k(logits: list[float]) -> None:
    h = topk_entropy(torch.tensor(logits)).item()
    assert 0.0 <= h <= math.log(len(logits))


@given(st.lists(finite, min_size=1, max_size=32), finite)
def test_topk_entropy_ignores_a_common_shift(logits: list[float], shift: float) -> None:
    t = torch.tensor(logits, dtype=torch.float64)
    assert topk_entropy(t + shift).item() == pytest.approx(topk_entropy(t).item(), abs=1e-9)


# --- junction tests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entropy, threshold, expected",
    [(1.0, 1.0, True), (0.99, 1.0, False), (2.3, 1.0, True), (0.0, 0.0, True), (0.5, 2.3, False)],
)
def test_entropy_junction(entropy: float, threshold: float, expected: bool) -> None:
    assert entropy_junction(entropy, threshold) is expected


@pytest.mark.parametrize(
    "top1_prob, tau, expected",
    [(0.39, 0.4, True), (0.4, 0.4, False), (0.9, 0.4, False), (0.0, 0.0, False), (0.99, 1.0, True)],
)
def test_confidence_junction(top1_prob: float, tau: float, expected: bool) -> None:
    assert confidence_junction(top1_prob, tau) is expected


# --- SIA -------------------------------------------------------------------------------------


def test_sia_scores_add_beta_times_value() -> None:
    scores = sia_scores(torch.tensor([-0.1, -2.0, -3.0]), torch.tensor([0.0, 1.0, -1.0]), 2.0)
    assert torch.allclose(scores, torch.tensor([-0.1, 0.0, -5.0], dtype=torch.float64))


@pytest.mark.parametrize(
    "beta, expected",
    [
        (0.0, 0),  # the base's own argmax
        (0.4, 0),  # β·V = 0.4 < the logit gap 0.5
        (0.5, 0),  # β·V = gap: a tie goes to the lower index
        (0.6, 1),  # β·V outweighs the gap
        (-1.0, 0),
    ],
)
def test_sia_argmax_moves_when_beta_v_outweighs_the_logit_gap(beta: float, expected: int) -> None:
    assert sia_choose([-0.5, -1.0, -4.0], [0.0, 1.0, 0.0], beta, temperature=0.0) == expected


@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=20), finite)
def test_sia_log_probs_choose_like_raw_logits(
    pairs: list[tuple[float, float]], beta: float
) -> None:
    logits = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    values = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    logprobs = torch.log_softmax(logits, dim=-1)
    raw = sia_scores(logits, values, beta)
    # the same choice up to float rounding: a maximizer of the raw logit + β·V
    assert raw[sia_choose(logprobs, values, beta, 0.0)] >= raw.max() - 1e-9
    for t in (0.5, 1.0, 3.0):
        a = torch.softmax(sia_scores(logprobs, values, beta) / t, dim=-1)
        b = torch.softmax(sia_scores(logits, values, beta) / t, dim=-1)
        assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.parametrize(
    "logprobs, values, beta, temperature, expected",
    [
        ([math.log(0.5), math.log(0.3), math.log(0.2)], [0.0, 0.0, 0.0], 1.0, 1.0, [0.5, 0.3, 0.2]),
        # scores / T = [0, -ln 3]  ->  softmax = [3/4, 1/4]
        ([0.0, 0.0], [0.0, -2 * math.log(3)], 1.0, 2.0, [0.75, 0.25]),
        # β·V turns [ln .8, ln .2] into [ln .8, ln .8]  ->  a fair coin
        ([math.log(0.8), math.log(0.2)], [0.0, math.log(4)], 1.0, 1.0, [0.5, 0.5]),
    ],
)
def test_sia_sampling_follows_the_softmax(
    logprobs: list[float],
    values: list[float],
    beta: float,
    temperature: float,
    expected: list[float],
) -> None:
    gen = torch.Generator().manual_seed(0)
    draws = 20_000
    counts = [0] * len(expected)
    for _ in range(draws):
        counts[sia_choose(logprobs, values, beta, temperature, gen)] += 1
    for count, p in zip(counts, expected, strict=True):
        assert count / draws == pytest.approx(p, abs=0.015)


def test_sia_sampling_is_reproducible_with_a_seeded_generator() -> None:
    def draw(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return [sia_choose([0.0] * 10, [0.0] * 10, 1.0, 1.0, gen) for _ in range(50)]

    assert draw(7) == draw(7)
    assert len(set(draw(7))) > 1


@pytest.mark.parametrize(
    "logprobs, values, temperature",
    [([0.0, 0.0], [1.0], 0.0), ([], [], 0.0), ([0.0], [0.0], -1.0)],
)
def test_sia_choose_rejects_bad_input(
    logprobs: list[float], values: list[float], temperature: float
) -> None:
    with pytest.raises(ValueError):
        sia_choose(logprobs, values, 1.0, temperature)


# --- SIA value-only (β = ∞) and the paper's top-k sampling ----------------------------------


@pytest.mark.parametrize(
    "logprobs, values, expected",
    [
        ([-0.1, -5.0, -9.0], [0.0, 0.5, 0.2], 1),  # the highest value, whatever the logit gap
        ([-3.0, -0.2, -1.0], [1.0, 1.0, 0.0], 1),  # equal values: the higher logit
        ([-1.0, -1.0, -2.0], [2.0, 2.0, 0.0], 0),  # equal values and logits: the first
    ],
)
def test_sia_value_only_chooses_by_value_ties_by_logit(
    logprobs: list[float], values: list[float], expected: int
) -> None:
    assert sia_choose(logprobs, values, 1.0, 0.0, value_only=True) == expected


def test_sia_value_only_samples_from_the_values_alone() -> None:
    gen = torch.Generator().manual_seed(0)
    # softmax(V / T) = [0.75, 0.25] whatever the logits say
    logprobs, values = [math.log(0.01), math.log(0.99)], [math.log(3), 0.0]
    draws = [sia_choose(logprobs, values, 1.0, 1.0, gen, value_only=True) for _ in range(8000)]
    assert draws.count(0) / len(draws) == pytest.approx(0.75, abs=0.02)


def test_topk_sample_follows_the_base_top_k_at_temperature() -> None:
    gen = torch.Generator().manual_seed(0)
    logprobs = [math.log(0.6), math.log(0.3), math.log(0.1)]
    assert topk_sample(logprobs, 0.0) == 0
    draws = [topk_sample(logprobs, 1.0, gen) for _ in range(8000)]
    for i, p in enumerate([0.6, 0.3, 0.1]):
        assert draws.count(i) / len(draws) == pytest.approx(p, abs=0.02)
    # T = 2 flattens: softmax(log p / 2) ∝ sqrt(p)
    sq = [math.sqrt(p) for p in (0.6, 0.3, 0.1)]
    draws = [topk_sample(logprobs, 2.0, gen) for _ in range(8000)]
    assert draws.count(2) / len(draws) == pytest.approx(sq[2] / sum(sq), abs=0.02)


# --- SIA target_ratio: calibrated thresholds and the server-wide running quantile ------------


@pytest.mark.parametrize(
    "entropies, ratio, expected",
    [
        ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], 0.2, 0.85),  # fires 0.9 and 1.0
        ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], 0.5, 0.55),
        ([0.1, 0.2, 0.3, 0.4], 0.1, INF),  # 0.4 junctions: rounds to none
        ([0.1, 0.2, 0.3, 0.4], 1.0, 0.0),
        ([0.1, 0.2, 0.3, 0.4], 0.0, INF),
        ([], 0.2, INF),  # nothing seen: never
        ([0.0, 5e-324], 0.5, 5e-324),  # no float between them: the one that fires
    ],
)
def test_ratio_threshold(entropies: list[float], ratio: float, expected: float) -> None:
    assert ratio_threshold(entropies, ratio) == pytest.approx(expected)


@given(
    st.lists(st.floats(min_value=0, max_value=math.log(10)), min_size=1, max_size=300, unique=True),
    st.floats(min_value=0, max_value=1),
)
def test_ratio_threshold_fires_the_share_on_its_own_data(entropies: list[float], r: float) -> None:
    h = ratio_threshold(sorted(entropies), r)
    fired = sum(entropy_junction(e, h) for e in entropies)
    assert fired == math.floor(r * len(entropies) + 0.5)


@pytest.mark.parametrize(
    "thresholds, ratio, expected",
    [
        ({0.1: 2.0, 0.3: 1.0}, 0.1, 2.0),
        ({0.1: 2.0, 0.3: 1.0}, 0.2, 1.5),  # interpolated
        ({0.1: 2.0, 0.3: 1.0}, 0.3, 1.0),
        ({0.2: 1.2}, 0.2, 1.2),
        ({0.1: 2.0, 0.3: 1.0}, 0.05, None),  # outside the calibrated ratios: no answer
        ({0.1: 2.0, 0.3: 1.0}, 0.5, None),
        ({0.1: 2.0}, 0.0, INF),  # never
        ({0.1: 2.0}, 1.0, 0.0),  # always
        ({}, 0.2, None),
    ],
)
def test_calibrated_threshold(thresholds: dict, ratio: float, expected: float | None) -> None:
    assert calibrated_threshold(thresholds, ratio) == (
        None if expected is None else pytest.approx(expected)
    )


def test_entropy_window_forgets_beyond_its_size() -> None:
    window = EntropyWindow(size=4)
    for h in [9.0, 9.0, 0.1, 0.2, 0.3, 0.4]:
        window.observe(h)
    assert len(window) == 4
    assert window.threshold(0.5) == pytest.approx(0.25)  # the two 9.0s are gone


def easy_hard_mix(seed: int = 0, requests: int = 200, steps: int = 40):
    """Synthetic requests: a third hard (entropy mostly high), two thirds easy (mostly ~0)."""
    rng = random.Random(seed)
    streams = []
    for i in range(requests):
        hard = i % 3 == 0
        stream = [
            rng.uniform(1.0, 2.3) if rng.random() < (0.6 if hard else 0.02) else rng.uniform(0, 0.3)
            for _ in range(steps)
        ]
        streams.append((hard, stream))
    return streams


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3])
def test_target_ratio_fires_on_hard_requests_and_spares_easy_ones(ratio: float) -> None:
    calibration = easy_hard_mix(seed=1)
    pooled = sorted(h for _, stream in calibration for h in stream)
    calibrated = ratio_threshold(pooled, ratio)
    window = EntropyWindow(size=2000)
    fired = {"calibrated": {True: [], False: []}, "running": {True: [], False: []}}
    # Served requests interleave step by step, as the engine's ticks do.
    served = easy_hard_mix(seed=2)
    for t in range(len(served[0][1])):
        for hard, stream in served:
            h = stream[t]
            fired["calibrated"][hard].append(entropy_junction(h, calibrated))
            fired["running"][hard].append(entropy_junction(h, window.threshold(ratio)))
            window.observe(h)
    for how in ("calibrated", "running"):
        hard, easy = fired[how][True], fired[how][False]
        overall = (sum(hard) + sum(easy)) / (len(hard) + len(easy))
        assert abs(overall - ratio) <= 0.05, how
        assert sum(easy) / len(easy) < 0.25 * sum(hard) / len(hard), how


# --- the hybrid rule and every policy's junction test ---------------------------------------


@pytest.mark.parametrize(
    "entropy_fires, confidence_fires, expected",
    [
        (False, False, None),
        (True, False, "value"),
        (False, True, "guidance"),
        (True, True, "guidance"),  # both fire: the guidance model, the stronger signal, wins
    ],
)
def test_hybrid_rule(entropy_fires: bool, confidence_fires: bool, expected: str | None) -> None:
    assert hybrid_kind(entropy_fires, confidence_fires) == expected


@pytest.mark.parametrize(
    "threshold, tau, expected",
    [
        (None, None, [False, False, False, False]),  # base: no junction to stop at
        (1.0, None, [False, True, False, True]),  # SIA's entropy test
        (None, 0.4, [False, False, True, True]),  # the confidence test
        (1.0, 0.4, [False, True, True, True]),  # hybrid: either
    ],
)
def test_a_run_ahead_stops_where_its_tests_fire(threshold, tau, expected) -> None:
    steps = [(0.5, 0.9), (1.5, 0.5), (0.8, 0.3), (2.0, 0.2)]  # (entropy, top-1 probability)
    assert [run_ahead_stops(h, p, threshold, tau) for h, p in steps] == expected


# --- BlendIn ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p_hat_g, p_hat_b, p_b_of_tg, lam, expected",
    [
        (0.6, 0.3, 0.1, 0.1, 0.6 / 0.9 + 0.01),
        (0.2, 0.2, 0.0, 0.1, 0.5),
        (0.3, 0.1, 0.2, 0.0, 0.75),
        (0.9, 0.1, 0.5, 0.1, 0.95),
        (0.95, 0.05, 1.0, 0.1, 1.0),  # 1.05 clipped
        (0.1, 0.9, 0.5, -1.0, 0.0),  # -0.4 clipped
        (0.0, 0.0, 0.0, 0.1, 0.5),  # degenerate: neither model preferred
    ],
)
def test_blend_alpha(
    p_hat_g: float, p_hat_b: float, p_b_of_tg: float, lam: float, expected: float
) -> None:
    assert blend_alpha(p_hat_g, p_hat_b, p_b_of_tg, lam) == pytest.approx(expected)


@given(prob, prob, prob, st.floats(min_value=-10, max_value=10))
def test_blend_alpha_lies_in_zero_to_one(g: float, b: float, pbtg: float, lam: float) -> None:
    assert 0.0 <= blend_alpha(g, b, pbtg, lam) <= 1.0


@pytest.mark.parametrize(
    "texts, probs, expected",
    [
        (["a", "b", "a"], [0.5, 0.2, 0.1], {"a": 0.6, "b": 0.2}),
        (["", " x", ""], [0.5, 0.3, 0.2], {" x": 0.3}),  # "" = mid-character, dropped
        ([EOS_TEXT, "."], [0.7, 0.3], {EOS_TEXT: 0.7, ".": 0.3}),
        ([], [], {}),
    ],
)
def test_string_distribution(texts: list[str], probs: list[float], expected: dict) -> None:
    dist = string_distribution(texts, probs)
    assert dist == pytest.approx(expected)
    assert list(dist) == list(expected)  # first-occurrence order


def test_string_distribution_rejects_unequal_lengths() -> None:
    with pytest.raises(ValueError):
        string_distribution(["a", "b"], [1.0])


@pytest.mark.parametrize(
    "alpha, expected",
    [
        (0.5, {"a": 0.3, "b": 0.45, "c": 0.25}),
        (0.0, {"a": 0.6, "b": 0.4, "c": 0.0}),
        (1.0, {"a": 0.0, "b": 0.5, "c": 0.5}),
        (0.2, {"a": 0.48, "b": 0.42, "c": 0.1}),
    ],
)
def test_blend_over_the_union(alpha: float, expected: dict[str, float]) -> None:
    mixed = blend({"a": 0.6, "b": 0.4}, {"b": 0.5, "c": 0.5}, alpha)
    assert mixed == pytest.approx(expected)
    assert list(mixed) == ["a", "b", "c"]  # base order, then guidance-only keys


def distribution(keys: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, float]]:
    weights = st.dictionaries(keys, st.floats(min_value=0.01, max_value=1), min_size=1)
    return weights.map(lambda w: {k: v / sum(w.values()) for k, v in w.items()})


@given(distribution(st.sampled_from("abcdef")), distribution(st.sampled_from("defgh")), prob)
def test_blend_of_distributions_sums_to_one(
    base: dict[str, float], guidance: dict[str, float], alpha: float
) -> None:
    mixed = blend(base, guidance, alpha)
    assert set(mixed) == set(base) | set(guidance)
    assert sum(mixed.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "base_texts, base_probs, guidance_texts, guidance_probs, text, alpha",
    [
        # α = .6/.9 + .1·.25; " a" = α·.6 + (1−α)·.25 beats " the" = α·.2 + (1−α)·.3
        ([" the", " a"], [0.3, 0.25], [" a", " the"], [0.6, 0.2], " a", 0.6 / 0.9 + 0.025),
        # an unsure guidance model (α ≈ .25) leaves the base's choice in place
        ([" yes", " no"], [0.35, 0.3], [" no", " maybe"], [0.1, 0.09], " yes", 0.1 / 0.45 + 0.03),
        # duplicates merge: "Hi" is .6 for the guidance although its top token is "Yo"
        (["Yo", "Hi"], [0.35, 0.3], ["Hi", "Hi", "Yo"], [0.3, 0.3, 0.4], "Hi", 0.4 / 0.75 + 0.035),
        # a tie goes to the base's order
        (["x", "y"], [0.3, 0.3], ["y", "x"], [0.3, 0.3], "x", 0.5 + 0.03),
        (["y", "x"], [0.3, 0.3], ["x", "y"], [0.3, 0.3], "y", 0.5 + 0.03),
        # end of sequence is a key like any other
        ([" so", EOS_TEXT], [0.3, 0.2], [EOS_TEXT, " so"], [0.8, 0.1], EOS_TEXT, 0.8 / 1.1 + 0.02),
        # mid-character candidates never win; t_g = "" has base probability 0
        (["", " a"], [0.5, 0.2], ["", " b"], [0.9, 0.05], " a", 0.9 / 1.4),
        # nothing complete on either side: the base's own (mid-character) choice
        (["", ""], [0.5, 0.2], [""], [0.9], "", 0.9 / 1.4),
    ],
)
def test_blendin_choose(
    base_texts: list[str],
    base_probs: list[float],
    guidance_texts: list[str],
    guidance_probs: list[float],
    text: str,
    alpha: float,
) -> None:
    chosen, a = blendin_choose(base_texts, base_probs, guidance_texts, guidance_probs, lam=0.1)
    assert chosen == text
    assert a == pytest.approx(alpha)


def reference_blendin_choose(
    base_texts: list[str],
    base_probs: list[float],
    guidance_texts: list[str],
    guidance_probs: list[float],
    lam: float,
    alpha: float | None,
    at_start: bool,
) -> tuple[str, float]:
    """BlendIn's choice as written before the fast paths: the whole blend as a dictionary,
    built by `blend`, and its first maximum."""
    base_keys = [start_key(t) for t in base_texts] if at_start else base_texts
    guide_keys = [start_key(t) for t in guidance_texts] if at_start else guidance_texts

    def dist(keys: list[str], probs: list[float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, p in zip(keys, probs, strict=True):
            if key:
                out[key] = out.get(key, 0.0) + p
        return out

    base_top = max(range(len(base_probs)), key=base_probs.__getitem__)
    guide_top = max(range(len(guidance_probs)), key=guidance_probs.__getitem__)
    p_base, p_guide = dist(base_keys, base_probs), dist(guide_keys, guidance_probs)
    if alpha is None:
        alpha = blend_alpha(guidance_probs[guide_top], base_probs[base_top],
                            p_base.get(guide_keys[guide_top], 0.0), lam)
    mixed = blend(p_base, p_guide, alpha)
    if not mixed:
        return base_texts[base_top], alpha
    best = max(mixed, key=mixed.__getitem__)
    for keys, texts in ((base_keys, base_texts), (guide_keys, guidance_texts)):
        if best in keys:
            return texts[keys.index(best)], alpha
    raise AssertionError


# Few strings and few distinct probabilities: repeats, "" (mid-character), leading spaces
# and exact ties are common, as are lists sorted like a runner's top-k and lists that are not.
blend_text = st.sampled_from(["", "a", " a", "b", " b", "  c", "\n", EOS_TEXT, "d", " "])
blend_prob = st.sampled_from([0.0, 1e-9, 0.001, 0.01, 0.05, 0.1, 0.1, 0.2, 0.25, 0.3, 0.5, 0.9])


@st.composite
def top_list(draw: st.DrawFn) -> tuple[list[str], list[float]]:
    n = draw(st.integers(1, 12))
    texts = draw(st.lists(blend_text, min_size=n, max_size=n))
    probs = draw(st.lists(blend_prob, min_size=n, max_size=n))
    if draw(st.booleans()):
        probs.sort(reverse=True)
    return texts, probs


@given(top_list(), top_list(), st.one_of(st.none(), blend_prob, st.just(1.0)), st.booleans(),
       st.sampled_from([0.0, 0.1, 1.0]))
def test_blendin_choose_equals_the_plain_blend(
    base: tuple[list[str], list[float]],
    guidance: tuple[list[str], list[float]],
    alpha: float | None,
    at_start: bool,
    lam: float,
) -> None:
    """The fast paths (a C-built string distribution, the scan that stops early) give the
    same string and the same α, float for float, as the whole blend."""
    args = (*base, *guidance, lam)
    assert blendin_choose(*args, alpha=alpha, at_start=at_start) == reference_blendin_choose(
        *args, alpha, at_start
    )


def test_blendin_choose_on_runner_sized_lists() -> None:
    """100 candidates a side, as BlendIn runs: peaked and flat distributions, some shared."""
    rng = random.Random(0)
    words = [f" w{i}" for i in range(300)]
    for case in range(300):
        lists = []
        for _ in range(2):
            texts = rng.sample(words, 100)
            texts[rng.randrange(100)] = ""
            logits = sorted((rng.gauss(0, 4 if case % 2 else 0.3) for _ in range(100)),
                            reverse=True)
            total = sum(math.exp(x) for x in logits) * rng.uniform(1, 3)
            lists += [texts, [math.exp(x) / total for x in logits]]
        alpha = None if case % 3 else rng.random()
        assert blendin_choose(*lists, 0.1, alpha=alpha) == reference_blendin_choose(
            *lists, 0.1, alpha, False
        )


def test_blendin_choose_rejects_empty_lists() -> None:
    with pytest.raises(ValueError):
        blendin_choose([], [], ["a"], [1.0], lam=0.1)


@pytest.mark.parametrize(
    "base_probs, guidance_probs, alpha, text",
    [
        # the same lists under a fixed α: 0 is the base alone, 1 the guidance alone
        ([0.3, 0.25], [0.6, 0.2], 0.0, " the"),
        ([0.3, 0.25], [0.6, 0.2], 1.0, " a"),
        # α = .5: " the" = .5·.3 + .5·.2 = .25 against " a" = .5·.25 + .5·.6 = .425
        ([0.3, 0.25], [0.6, 0.2], 0.5, " a"),
        # α = .1: " the" = .9·.3 + .1·.2 = .29 against " a" = .9·.25 + .1·.6 = .285
        ([0.3, 0.25], [0.6, 0.2], 0.1, " the"),
        # a fixed α ignores how confident either model is: computed, α = .75 picks " a";
        # α = .05: " the" = .95·.35 + .05·.05 = .335 against " a" = .95·.3 + .05·.9 = .33
        ([0.35, 0.3], [0.9, 0.05], 0.05, " the"),
    ],
)
def test_blendin_with_a_fixed_alpha(
    base_probs: list[float], guidance_probs: list[float], alpha: float, text: str
) -> None:
    chosen, a = blendin_choose(
        [" the", " a"], base_probs, [" a", " the"], guidance_probs, lam=0.1, alpha=alpha
    )
    assert (chosen, a) == (text, alpha)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_blendin_rejects_a_fixed_alpha_outside_0_1(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        blendin_choose(["a"], [1.0], ["a"], [1.0], lam=0.1, alpha=alpha)


# --- where the answer starts ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, key",
    [
        (" The", "The"),
        ("The", "The"),
        ("  The", "The"),
        (" ", " "),  # only spaces: its own candidate
        ("\n", "\n"),  # a line break is another choice than a word
        (" \nThe", "\nThe"),
        (EOS_TEXT, EOS_TEXT),
        ("", ""),
    ],
)
def test_start_key(text: str, key: str) -> None:
    assert start_key(text) == key


@pytest.mark.parametrize(
    "text, prompt_ends_in_space, expected",
    [
        ("The", False, " The"),  # "Answer:" + " The", never "Answer:The"
        (" The", False, " The"),
        ("  The", False, " The"),
        ("The", True, "The"),  # after "Assistant:\n" the word starts the line
        (" The", True, "The"),
        ("\n", False, "\n"),
        (EOS_TEXT, False, EOS_TEXT),
        ("", False, ""),
    ],
)
def test_answer_start(text: str, prompt_ends_in_space: bool, expected: str) -> None:
    assert answer_start(text, prompt_ends_in_space) == expected


# A hand-made pair of first steps: the base continues "...Assistant:" (its words come with a
# space), the guidance model opens its turn after a newline (its words come without).
BASE_AT_START = [" I", " The", "\n", " Paris"]
BASE_AT_START_P = [0.3, 0.25, 0.2, 0.05]
GUIDE_AT_START = ["The", "Paris", "I"]
GUIDE_AT_START_P = [0.7, 0.2, 0.05]


def test_a_leading_space_hides_agreement_unless_matched_at_the_start() -> None:
    _, alpha = blendin_choose(BASE_AT_START, BASE_AT_START_P, GUIDE_AT_START, GUIDE_AT_START_P, 0.1)
    assert alpha == pytest.approx(0.7 / 1.0)  # p_b(t_g) = 0: " The" is not "The"


def test_at_start_the_pair_agrees_and_the_base_spelling_is_kept() -> None:
    text, alpha = blendin_choose(
        BASE_AT_START, BASE_AT_START_P, GUIDE_AT_START, GUIDE_AT_START_P, 0.1, at_start=True
    )
    assert alpha == pytest.approx(0.7 / 1.0 + 0.1 * 0.25)  # the agreement bonus is back
    # " The" = α·.7 + (1−α)·.25 wins; it comes as the base wrote it (with its space)
    assert text == " The"


def test_at_start_a_guidance_only_string_comes_as_the_guidance_wrote_it() -> None:
    text, _ = blendin_choose([" I", " We"], [0.3, 0.2], ["Sure"], [0.9], 0.1, at_start=True)
    assert text == "Sure"  # the engine spaces it for the base prompt (`answer_start`)


def test_at_start_keys_merge_both_spellings() -> None:
    text, _ = blendin_choose(
        [" Yes", "Yes", " No"], [0.2, 0.15, 0.3], ["No"], [0.5], 0.1, alpha=0.0, at_start=True
    )
    assert text == " Yes"  # " Yes" + "Yes" = .35 beats " No" = .3: the first spelling is kept


# --- Nudging ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "written, next_text, expected",
    [
        ("", " Hello", False),  # nothing written yet
        (" ", "Hello", False),  # leading whitespace is not a word
        ("\n\n", "Sure", False),
        ("Hel", "lo", False),  # inside a word
        ("Hello", ",", False),  # punctuation stays with its word
        ("Sure", "!", False),
        ("Hello", "", False),  # mid-UTF-8 character: finish the character
        (" Hello", " world", True),  # a new word begins
        ("Hello,", " world", True),
        ("Hello", "\n", True),
        ("Hello ", "world", True),  # the boundary is already written
        ("", EOS_TEXT, True),
        ("Hello", EOS_TEXT, True),
    ],
)
def test_word_finished(written: str, next_text: str, expected: bool) -> None:
    assert word_finished(written, next_text) is expected


@given(st.text(min_size=1), st.text(min_size=1))
def test_word_finished_splits_like_str_split(word: str, rest: str) -> None:
    """Writing token by token until `word_finished` yields the first word of str.split()."""
    text = f" {word} {rest}"
    written = ""
    for ch in text:  # one character per token
        if word_finished(written, ch):
            break
        written += ch
    assert written.split()[:1] == text.split()[:1]


@pytest.mark.parametrize(
    "base_text, guidance_next, expected",
    [
        (" Par", " Paris", True),  # the base's token starts the guidance's next word
        (" Paris", " Paris", True),
        (" ", " Paris", True),  # as in the reference: a space is a prefix too
        (" Lyon", " Paris", False),
        (" Parisian", " Paris", False),  # longer than what the writer has seen: no match
        ("Paris", " Paris", False),  # the space is part of the word
        ("", " Paris", False),
        (EOS_TEXT, " Paris", False),
        (" Paris", "", False),  # the writer stopped at its token limit: nothing known
    ],
)
def test_base_resumes(base_text: str, guidance_next: str, expected: bool) -> None:
    assert base_resumes(base_text, guidance_next) is expected


def test_the_base_resumes_only_right_after_a_nudge() -> None:
    rounds = NudgeRounds()
    assert not rounds.resumes(" Paris")  # no round running
    rounds.nudged(" capital", " is")
    assert rounds.resumes(" is") and not rounds.resumes(" was")
    rounds.base_wrote()
    assert not rounds.resumes(" is")  # the round ended with the base's token


@pytest.mark.parametrize(
    "rounds, stops_after",
    [
        # the reference: the same words for the third time in a row after the first stop it
        ([" Sure"] * (REPEATED_ROUNDS + 1), REPEATED_ROUNDS + 1),
        ([" Sure"] * REPEATED_ROUNDS, None),
        ([" Sure", " Sure", " No", " Sure", " Sure", " Sure"], None),  # not in a row
        ([" A", " B", " B", " B", " B"], 5),
        ([" the cat", " the cat", " the cat", " the cat"], 4),
    ],
)
def test_nudging_stops_when_rounds_repeat(rounds: list[str], stops_after: int | None) -> None:
    memory = NudgeRounds()
    stopped = None
    for n, words in enumerate(rounds, start=1):
        for word in words.split(" ")[1:]:
            memory.nudged(" " + word, "")
        if memory.base_wrote():
            stopped = n
            break
    assert stopped == stops_after


def test_a_round_is_every_word_nudged_in_a_row() -> None:
    memory = NudgeRounds()
    memory.nudged(" The", " capital")
    memory.nudged(" capital", " of")
    assert memory.words == " The capital"
    assert not memory.base_wrote()
    assert (memory.words, memory.last) == ("", " The capital")
    assert not memory.base_wrote()  # the base writing on adds no round


# --- Best-of-N -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scores, expected",
    [([0.1, 0.5, 0.3], 1), ([2.0, 2.0, 1.0], 0), ([-1.0], 0), ([-3.0, -1.0, -1.0], 1)],
)
def test_best_of(scores: list[float], expected: int) -> None:
    assert best_of(scores) == expected


def test_best_of_rejects_no_scores() -> None:
    with pytest.raises(ValueError):
        best_of([])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("value_only", [False, True])
def test_sia_choice_over_nan_scores_is_an_error_not_a_silent_pick(temperature, value_only):
    """A NaN β (or value) reaches the choice only past validation; argmax would pick one."""
    with pytest.raises(ValueError, match="not numbers"):
        sia_choose([-0.1, -2.0], [0.5, float("nan")], float("nan"), temperature,
                   torch.Generator().manual_seed(0), value_only)
