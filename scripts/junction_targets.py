"""Experiment: refit the value head on SIA's junction candidates, not only sampled tokens.

    python scripts/junction_targets.py collect --split train --limit 250 --per 2 --out train.pt
    python scripts/junction_targets.py collect --split val --limit 60 --per 3 --out val.pt
    python scripts/junction_targets.py fit --train train.pt --val val.pt [--write 5,0.1 DIR]

`collect` walks the shipped value model's stored trajectories (`trajectories.jsonl`, or
`val_trajectories.jsonl` for `--split val`; `--limit` of them, drawn under seed 0 for train,
the first for val). At up to `--per` junction positions of each (base top-k entropy over the
calibrated 0.2 threshold, drawn at random) it records, for each of the base's k candidates c:
the value backbone's last hidden state of x, y<t ⊕ c (the shipped LoRA merged), the base's
logit and log-probability, and the guidance's log-probability G(c) of c's text (as
`scripts/value_ranking.py` does). Its target is the implicit reward's per-token term
r(c) = s·G(c) − log p_base(c), s = the trajectory's base tokens ÷ guidance tokens
(`shared/implicit_reward.token_rewards`).

`fit` refits the linear head on the frozen features by ridge (`shared/training.ridge_head`):
on every training position's own target (as `--head-init ridge` does) plus the candidate
rows repeated `rep` times, and prints per head: SIA's validation loss (the 120 validation
trajectories) against the constant, and at the validation junctions the within-junction rank
correlation of V with r, how often SIA's choice (logit + V) leaves greedy, and the G and r
it gains over greedy (mean ± SE), with the oracle's G gain. `--write REP,LAM DIR` writes a
value-model directory with that head (the shipped adapter and calibration), for
`junction evaluate --value DIR`.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from junction.offline.implicit_reward import encode_pair  # noqa: E402
from junction.offline.training import (  # noqa: E402
    encode,
    load_trajectories,
    mean_features,
    position_features,
    ridge_head,
)
from junction.shared.calibration import CALIBRATION_FILE, load_calibration  # noqa: E402
from junction.shared.config import ModelSpec  # noqa: E402
from junction.shared.models import load_model  # noqa: E402
from junction.shared.steering import topk_entropy  # noqa: E402
from junction.shared.value_model import HEAD_FILE, load_value_model  # noqa: E402
from junction.shared.vocab import vocab_of  # noqa: E402
from scripts.value_ranking import guidance_gains, spearman  # noqa: E402

SHIPPED = Path("shared/defaults/value_head")  # the head model, its trajectories
CPU = torch.device("cpu")


def load_value(value_dir: Path):
    backbone = load_model("value", ModelSpec(), progress=False)
    return load_value_model(value_dir, backbone.model), backbone.tokenizer


def collect(args: argparse.Namespace) -> None:
    calibration = load_calibration(args.value)
    threshold, k = calibration.threshold(0.2), calibration.k
    base = load_model("base", ModelSpec(), progress=False)
    guidance = load_model("guidance", ModelSpec(), progress=False)
    value, tokenizer = load_value(args.value)
    vocab = vocab_of(tokenizer)
    name = "val_trajectories.jsonl" if args.split == "val" else "trajectories.jsonl"
    trajectories = load_trajectories(args.value / name)
    if args.split == "val":
        trajectories = trajectories[: args.limit]
    else:
        trajectories = [trajectories[i] for i in
                        random.Random(0).sample(range(len(trajectories)), args.limit)]
    rng, rows = random.Random(1 if args.split == "val" else 0), []
    for trajectory in tqdm(trajectories, desc=f"junctions ({args.split})", unit="trajectory"):
        enc = encode(tokenizer, trajectory)
        response = enc.ids[enc.start : -1]  # without the appended end of sequence
        if not response:
            continue
        with torch.no_grad():
            logits = base.model(input_ids=torch.tensor([enc.ids[:-1]])).logits[0].float()
        tops = torch.topk(logits[enc.start - 1 : enc.start - 1 + len(response)], k)
        entropy = topk_entropy(tops.values).tolist()
        junctions = [j for j, h in enumerate(entropy) if h >= threshold]
        rng.shuffle(junctions)
        guided = encode_pair(guidance, trajectory.prompt, trajectory.response.lstrip(), True)
        scale = len(response) / max(1, len(guided.response))
        for j in junctions[: args.per]:
            position = enc.start + j
            candidates = tops.indices[j].tolist()
            with torch.no_grad():
                hidden = value.decoder()(
                    input_ids=torch.tensor([enc.ids[:position] + [c] for c in candidates])
                ).last_hidden_state[:, -1].float()
            log_softmax = torch.log_softmax(logits[position - 1], -1)
            rows.append({
                "h": hidden,
                "logit": tops.values[j].tolist(),
                "lpb": log_softmax[tops.indices[j]].tolist(),
                "G": guidance_gains(guidance, trajectory.prompt, vocab, response[:j],
                                    candidates),
                "scale": scale,
            })
    torch.save(rows, args.out)
    print(f"{len(rows)} junctions from {len(trajectories)} trajectories -> {args.out}")


def targets(row: dict) -> list[float]:
    return [row["scale"] * g - b for g, b in zip(row["G"], row["lpb"], strict=True)]


def features(value_dir: Path) -> dict:
    value, tokenizer = load_value(value_dir)
    train = [encode(tokenizer, t) for t in load_trajectories(value_dir / "trajectories.jsonl")]
    val = load_trajectories(value_dir / "val_trajectories.jsonl")
    positions, position_targets = position_features(value, train, 16, CPU)
    return {
        "positions": positions, "targets": position_targets,
        "val_means": mean_features(value, [encode(tokenizer, t) for t in val], 16, CPU),
        "val_rewards": torch.tensor([t.reward for t in val]),
        "train_mean": statistics.fmean(e.reward for e in train),
        "head": (value.head.weight.detach().view(-1).clone(), float(value.head.bias)),
    }


def report(name: str, head: tuple[torch.Tensor, float], f: dict, val: list[dict]) -> None:
    weight, bias = head
    rewards = f["val_rewards"]
    loss = float(((f["val_means"] @ weight + bias - rewards) ** 2).mean())
    constant = float(((rewards - f["train_mean"]) ** 2).mean())
    table: dict[str, list[float]] = {}
    for row in val:
        values = (row["h"] @ weight + bias).tolist()
        logit, guide, reward = row["logit"], row["G"], targets(row)
        n = range(len(values))
        sia = max(n, key=lambda i: logit[i] + values[i])
        oracle = max(n, key=lambda i: guide[i])
        for key, x in {"rank V~r": spearman(values, reward), "leaves greedy": float(sia != 0),
                       "G gain": guide[sia] - guide[0], "r gain": reward[sia] - reward[0],
                       "oracle G gain": guide[oracle] - guide[0]}.items():
            table.setdefault(key, []).append(x)
    cells = "  ".join(f"{key} {statistics.fmean(x):+.3f} ± "
                      f"{statistics.pstdev(x) / len(x) ** 0.5:.3f}" for key, x in table.items())
    print(f"{name:<24} val loss {loss:.4f} ({100 * (loss / constant - 1):+.1f}% vs constant)"
          f"  {cells}")


def fit(args: argparse.Namespace) -> None:
    f = features(args.value)
    train, val = torch.load(args.train), torch.load(args.val)
    candidates = torch.cat([row["h"] for row in train])
    candidate_targets = torch.tensor([t for row in train for t in targets(row)])
    print(f"{len(f['targets'])} training positions, {len(train)} training junctions, "
          f"{len(val)} validation junctions")
    report("shipped head", f["head"], f, val)
    heads = {}
    for strength in (0.01, 0.1):
        for rep in (0, 1, 5, 20):
            x = torch.cat([f["positions"]] + [candidates] * rep)
            y = torch.cat([f["targets"]] + [candidate_targets] * rep)
            heads[rep, strength] = ridge_head(x, y, strength)
            report(f"positions + {rep}x cand., λ {strength}", heads[rep, strength], f, val)
    if args.write:
        (rep, strength), out = args.write
        weight, bias = heads[rep, strength]
        shutil.copytree(args.value, out, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.jsonl"))
        save_file({"weight": weight.view(1, -1).contiguous(), "bias": torch.tensor([bias])},
                  Path(out) / HEAD_FILE)
        assert (Path(out) / CALIBRATION_FILE).is_file()
        print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    one = sub.add_parser("collect")
    one.add_argument("--split", choices=["train", "val"], default="train")
    one.add_argument("--limit", type=int, default=250)
    one.add_argument("--per", type=int, default=2)
    one.add_argument("--out", type=Path, required=True)
    two = sub.add_parser("fit")
    two.add_argument("--train", type=Path, required=True)
    two.add_argument("--val", type=Path, required=True)
    two.add_argument("--write", nargs=2, metavar=("REP,LAMBDA", "DIR"))
    for p in (one, two):
        p.add_argument("--value", type=Path, default=SHIPPED)
    args = parser.parse_args()
    if args.stage == "fit" and args.write:
        rep, strength = args.write[0].split(",")
        args.write = ((int(rep), float(strength)), Path(args.write[1]))
    collect(args) if args.stage == "collect" else fit(args)


if __name__ == "__main__":
    main()
