"""Does the value model rank SIA's junction candidates as the implicit reward does?

    python scripts/value_ranking.py --data ../shared/data/truthfulqa_dev.csv --limit 32 \
        --value shared/defaults/value_head --ratio 0.2 --out ranking.json

The base answers each prompt greedily (the embedded pair, as `junction evaluate` prompts it).
At each step whose top-k entropy reaches the calibrated threshold for `--ratio` (a junction
of SIA at that target ratio) it records, for each of the base's top-k candidates c:
the base's logit and log-probability, the value model's V(x, y<t ⊕ c), and the guidance's
log-probability of c's text as its own assistant turn continues (its log-probability of the
answer so far with c, less that without). The implicit reward's per-token term of c is then
r(c) = G(c) − log p_base(c) (`shared/implicit_reward.token_rewards`, with n_b/n_g ≈ 1 at
one step), and SIA's rule at β = 1 scores logit + V: were V exactly r, it would pick the
candidate the guidance likes best (logit − log p_base is one constant per step).

Printed, over junction steps (mean ± standard error): the within-step rank correlation of
V with r and with G, how often SIA's and the value-only choice differ from greedy, and how
much G and r of the chosen candidate gain over the greedy one — for SIA, value-only and an
oracle that knows G. The answers are the base's greedy ones throughout, so each junction is
judged on its own (the effect of a choice on later steps is `junction evaluate`'s part).

`--follow sia|oracle`: the answer takes SIA's choice (logit + V, β = 1) or the oracle's (the
candidate with the highest G) at its junctions instead, and the script also prints the
implicit reward of those answers against the greedy ones (paired, ± SE): what a value model
that ranked the candidates as the guidance does would gain end to end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from junction.offline.datasets import load_split  # noqa: E402
from junction.offline.implicit_reward import (  # noqa: E402
    ImplicitReward,
    batched_token_logprobs,
    encode_pair,
)
from junction.shared.calibration import load_calibration  # noqa: E402
from junction.shared.config import ModelSpec  # noqa: E402
from junction.shared.models import load_model  # noqa: E402
from junction.shared.prompts import build_prompt_ids  # noqa: E402
from junction.shared.steering import topk_entropy  # noqa: E402
from junction.shared.value_model import load_value_model  # noqa: E402
from junction.shared.vocab import vocab_of  # noqa: E402


def ranks(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).argsort().argsort().double()


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (no ties expected among float scores); NaN when one side is flat."""
    return torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1].item()


def junction_record(step: dict) -> dict[str, float]:
    """One junction's figures: correlations, and each rule's choice against greedy (index 0)."""
    logit, values, base_lp, guide = step["logit"], step["V"], step["base_lp"], step["G"]
    reward = [g - b for g, b in zip(guide, base_lp, strict=True)]
    k = range(len(values))
    sia = max(k, key=lambda i: logit[i] + values[i])
    value_only = max(k, key=lambda i: values[i])
    oracle = max(k, key=lambda i: guide[i])
    return {
        "rank corr V ~ r": spearman(values, reward),
        "rank corr V ~ G": spearman(values, guide),
        "rank corr logit+V ~ G": spearman([a + b for a, b in zip(logit, values, strict=True)],
                                          guide),
        "rank corr logit ~ G": spearman(logit, guide),
        "SIA differs from greedy": float(sia != 0),
        "value-only differs from greedy": float(value_only != 0),
        "G gain, SIA": guide[sia] - guide[0],
        "G gain, value-only": guide[value_only] - guide[0],
        "G gain, oracle": guide[oracle] - guide[0],
        "r gain, SIA": reward[sia] - reward[0],
        "r gain, value-only": reward[value_only] - reward[0],
    }


def summary(steps: list[dict]) -> dict[str, tuple[float, float]]:
    table: dict[str, list[float]] = {}
    for step in steps:
        for key, value in junction_record(step).items():
            if value == value:  # a flat side gives NaN correlation: left out
                table.setdefault(key, []).append(value)
    return {
        key: (statistics.fmean(v), statistics.pstdev(v) / len(v) ** 0.5)
        for key, v in table.items()
    }


def collect(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Junction records along each answer, and each prompt's answers with their rewards."""
    calibration = load_calibration(args.value)
    if calibration is None:
        raise SystemExit(f"error: no calibration.json beside {args.value}")
    threshold, k = calibration.threshold(args.ratio), calibration.k
    base = load_model("base", ModelSpec(), progress=False)
    guidance = load_model("guidance", ModelSpec(), progress=False)
    backbone = load_model("value", ModelSpec(), progress=False)
    value = load_value_model(args.value, backbone.model)
    vocab = vocab_of(base.tokenizer)
    reward = ImplicitReward(base, guidance, progress=False)
    steps, answers = [], []
    examples = load_split(args.data, args.split, args.limit)
    for ex in tqdm(examples, desc="junctions", unit="prompt"):
        prompt = build_prompt_ids(base.tokenizer, prompt=ex.prompt, chat=False)
        texts = {}
        for follow in dict.fromkeys(("greedy", args.follow)):
            answer: list[int] = []
            for t in range(args.max_tokens):
                with torch.no_grad():
                    logits = base.model(input_ids=torch.tensor([prompt + answer])).logits[0, -1]
                logits = logits.float()
                top = torch.topk(logits, k)
                pick = 0
                if follow == args.follow and float(topk_entropy(top.values)) >= threshold:
                    step = junction(ex, t, prompt, answer, logits, top, value, guidance, vocab)
                    steps.append(step)
                    pick = CHOICES[follow](step)
                chosen = int(top.indices[pick])
                if chosen in base.eos_ids:
                    break
                answer.append(chosen)
                if "\n" in vocab.decode(answer):  # the evaluation's stop for TruthfulQA
                    break
            texts[follow] = vocab.decode(answer).split("\n")[0]
        scores = reward.score_batch([ex.prompt] * len(texts), list(texts.values()))
        answers.append({"row": ex.row, **{f"{name} answer": text for name, text in texts.items()},
                        **{f"{name} reward": r for name, r in zip(texts, scores, strict=True)}})
    return steps, answers


CHOICES = {  # which candidate the answer takes at a junction (0 = greedy)
    "greedy": lambda step: 0,
    "sia": lambda step: max(range(len(step["V"])),
                            key=lambda i: step["logit"][i] + step["V"][i]),
    "oracle": lambda step: max(range(len(step["G"])), key=lambda i: step["G"][i]),
}


def guidance_gains(guidance, prompt: str, vocab, answer: list[int], candidates: list[int]):
    """G(c) for each candidate: the guidance's log-probability of the answer's text with c
    (as its own assistant turn continues) less that of the answer without it."""
    texts = [vocab.decode(answer)] + [vocab.decode(answer + [c]) for c in candidates]
    pairs = [encode_pair(guidance, prompt, text.lstrip(), chat=True) for text in texts]
    scored = batched_token_logprobs(guidance, pairs, len(pairs), "", progress=False)
    return [sum(s) - sum(scored[0]) for s in scored[1:]]


def junction(ex, t, prompt, answer, logits, top, value, guidance, vocab) -> dict:
    candidates = top.indices.tolist()
    with torch.no_grad():
        values, _ = value(torch.tensor([prompt + answer + [c] for c in candidates]))
    return {
        "row": ex.row,
        "step": t,
        "logit": top.values.tolist(),
        "base_lp": torch.log_softmax(logits, -1)[top.indices].tolist(),
        "V": values[:, -1].tolist(),
        "G": guidance_gains(guidance, ex.prompt, vocab, answer, candidates),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--value", type=Path, default=Path("shared/defaults/value_head"))
    parser.add_argument("--split", default="eval")
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--follow", choices=list(CHOICES), default="greedy",
                        help="the choice the answer takes at its junctions (its reward is "
                             "compared with the greedy answer's)")
    parser.add_argument("--out", type=Path, help="also write every junction's figures here")
    parser.add_argument("--steps", type=Path, help="summarize a file --out wrote instead")
    args = parser.parse_args()
    if args.steps:
        steps = json.loads(args.steps.read_text())
    else:
        steps, answers = collect(args)
        if args.out:
            args.out.with_suffix(".answers.json").write_text(json.dumps(answers, indent=1))
        greedy = [a["greedy reward"] for a in answers]
        followed = [a[f"{args.follow} reward"] for a in answers]
        gains = [f - g for f, g in zip(followed, greedy, strict=True)]
        print(f"implicit reward of the answers ({len(answers)} prompts): greedy "
              f"{statistics.fmean(greedy):+.3f}, {args.follow} {statistics.fmean(followed):+.3f},"
              f" paired gain {statistics.fmean(gains):+.3f} ± "
              f"{statistics.pstdev(gains) / len(gains) ** 0.5:.3f}")
    if args.out:
        args.out.write_text(json.dumps(steps))
    print(f"{len(steps)} junction steps")
    for key, (mean, se) in summary(steps).items():
        print(f"{key:<32} {mean:+.3f} ± {se:.3f}")


if __name__ == "__main__":
    main()
