"""Experiment: the guidance's preferences over the base's candidates, at every position, from
one guidance forward per trajectory — and a logit adapter trained on them.

    python -m junction.offline.listwise_targets collect --split train --out train.pt
    python -m junction.offline.listwise_targets collect --split val --out val.pt
    python -m junction.offline.listwise_targets fit --train train.pt --val val.pt --out adapter.pt
    python -m junction.offline.listwise_targets follow --adapter adapter.pt \
        --data ../shared/data/truthfulqa_dev.csv --limit 32 --beta 1,2
    python -m junction.offline.listwise_targets fit --lora 16 --lr 1e-4 \
        --train train.pt --val val.pt \
        --out ratio     # a log-ratio value model directory: `junction ... --value ratio`
    python -m junction.offline.listwise_targets loss --adapter ratio

`collect` walks the shipped value model's stored trajectories (`trajectories.jsonl`, or
`val_trajectories.jsonl` for `--split val`). Per trajectory it runs the base once (its final
hidden state and top-`K` candidates at each response position) and the guidance once, in its
chat turn. Where both tokenizations have a boundary at the same point of the response text,
the guidance's next-token distribution there gives G(c) — the guidance's log-probability of c
continuing its turn, the quantity `scripts/value_ranking.py` computes with one guidance call
per candidate — for each base candidate c whose text is one guidance token. So every such
position carries a listwise target over the base's own candidates, at no cost beyond the
forward the implicit reward already needs.

`fit` trains a low-rank adapter on the frozen base's final hidden state h: the adapted model's
next-token distribution is p_θ(c) ∝ p_base(c)·exp(w_c·U·Vᵀ·h/|h|) on the base's top `K`
(w_c: c's output embedding; p_base elsewhere), so the log-ratio log p_θ(c) − log p_base(c) is
a token-level value of the form SIA adds to the logits, and logit + V ranks as p_θ does. The
loss is the cross-entropy of p_θ's matched candidates against softmax(G). Per epoch it prints,
on the validation trajectories: the listwise cross-entropy and top-1 agreement with the
guidance, and at SIA's junctions (top-10 entropy over the calibrated 0.2 threshold, the
greedy candidate and at least one other matched) the G gained over greedy by the choice of
logit + β·V among the matched top 10, against the oracle (the best G among them).

`fit --lora R` trains LoRA of rank R on the base itself instead, through the base's own
output embeddings — on the listwise loss plus `--sia-weight` × SIA's own loss (mean_t V_t −
R)², where mean_t V_t over a response is the adapted model's own implicit reward — and writes
a log-ratio value model (`shared/value_model.py`): V(c) = log p_θ(c) − log p_base(c), which
the value runner serves to SIA like any value model. `loss` gives its SIA validation loss on
the shipped value model's evaluation-row trajectories, beside the constant predictor's.

`follow` decodes the evaluation rows greedily with the base and, at the same junctions,
takes the candidate of largest logit + β·V; each answer is scored with the implicit reward
against the greedy answer (paired), as `scripts/value_ranking.py --follow` does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from dataclasses import replace
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm import tqdm

from junction.offline.datasets import load_split
from junction.offline.implicit_reward import (
    ImplicitReward,
    batched_token_logprobs,
    byte_ends,
    encode_pair,
    output_logits,
)
from junction.offline.training import encode, load_trajectories
from junction.shared.calibration import CALIBRATION_FILE, load_calibration
from junction.shared.config import ModelSpec
from junction.shared.models import load_model
from junction.shared.prompts import build_prompt_ids
from junction.shared.sources import DEFAULTS_DIR
from junction.shared.steering import topk_entropy
from junction.shared.value_model import (
    META_FILE,
    attention_projections,
    load_log_ratio_model,
    save_log_ratio_model,
)
from junction.shared.vocab import valid_utf8, vocab_of

SHIPPED = DEFAULTS_DIR / "value_head"  # the head model, its trajectories
K = 256  # the base candidates the adapter reweights (SIA reads the top 10)


def single_token_texts(vocab, size: int) -> dict[str, int]:
    """Each text one guidance token writes after a boundary → that token (first id wins);
    tokens whose bytes are no UTF-8 text (U+FFFDs) are left out."""
    table: dict[str, int] = {}
    for token_id, text in enumerate(vocab.texts_after_boundary(list(range(size)))):
        if text and text not in table and valid_utf8(vocab.bytes_of(token_id)):
            table[text] = token_id
    return table


@torch.no_grad()
def collect(args: argparse.Namespace) -> None:
    base = load_model("base", ModelSpec(), progress=False)
    guidance = load_model("guidance", ModelSpec(), progress=False)
    base_vocab, guide_vocab = vocab_of(base.tokenizer), vocab_of(guidance.tokenizer)
    guide_ids = single_token_texts(guide_vocab, len(guidance.tokenizer))
    name = "val_trajectories.jsonl" if args.split == "val" else "trajectories.jsonl"
    records, positions, matched = [], 0, 0
    for trajectory in tqdm(load_trajectories(args.value / name), desc=f"targets ({args.split})"):
        enc = encode(base.tokenizer, trajectory)
        response = enc.ids[enc.start : -1]  # without the appended end of sequence
        pair = encode_pair(guidance, trajectory.prompt, trajectory.response.lstrip(), True)
        if not response or not pair.response:
            continue
        hidden = base.model.model(input_ids=torch.tensor([enc.ids[:-1]])).last_hidden_state[0]
        pred = hidden[enc.start - 1 :].float()  # row j predicts response[j]
        logits = output_logits(base.model, pred)
        top = torch.topk(logits, K)
        guide = guide_logprobs(guidance, pair)
        # Base position j (context = the first j response tokens) meets the guidance where its
        # tokens end at the same byte of the response (the guidance's has no leading space).
        lead = len(trajectory.response.encode()) - len(trajectory.response.lstrip().encode())
        guide_at = {end: i + 1 for i, end in enumerate(byte_ends(guide_vocab, pair.response))}
        ends = byte_ends(base_vocab, response)
        rows = []
        for j in range(1, len(response)):
            g = guide_at.get(ends[j - 1] - lead)
            if g is None:
                continue
            texts = base_vocab.texts_after_boundary(top.indices[j].tolist())
            hits = [(n, guide_ids[t]) for n, t in enumerate(texts) if t and t in guide_ids]
            if len(hits) >= 2:
                index = torch.tensor([n for n, _ in hits])
                rows.append((j, index, guide[g, [i for _, i in hits]].clone()))
                matched += len(hits)
        positions += len(rows)
        records.append({
            "pred": pred.half(), "ids": top.indices.int(), "logits": top.values.half(),
            "lse": torch.logsumexp(logits, -1), "rows": rows,
        })
    torch.save(records, args.out)
    print(f"{len(records)} trajectories, {positions} positions with targets, "
          f"{matched / max(1, positions):.0f} candidates matched each -> {args.out}")


def guide_logprobs(guidance, pair) -> torch.Tensor:
    """Row i: the guidance's next-token log-probabilities after i of its response tokens."""
    ids = torch.tensor([pair.prompt + pair.response])
    logits = guidance.model(input_ids=ids).logits[0, len(pair.prompt) - 1 :].float()
    return torch.log_softmax(logits, -1)


class LogitAdapter(torch.nn.Module):
    """log p_θ(c) − log p_base(c) on the base's top K from the base's final hidden state."""

    def __init__(self, embeddings: torch.Tensor, rank: int) -> None:
        super().__init__()
        self.embeddings = embeddings  # the base's output embeddings [vocab, d], frozen
        self.down = torch.nn.Linear(embeddings.shape[1], rank, bias=False)
        self.up = torch.nn.Linear(rank, embeddings.shape[1], bias=False)
        torch.nn.init.zeros_(self.up.weight)  # starts as the base itself

    def shifts(self, pred: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """w_c · U Vᵀ h/|h| for each candidate id [P, K]."""
        moved = self.up(self.down(pred / pred.norm(dim=-1, keepdim=True)))
        return torch.einsum("pkd,pd->pk", self.embeddings[ids.long()], moved)

    def log_ratios(self, pred, ids, logits, lse) -> torch.Tensor:
        """log p_θ − log p_base of each of the K candidates [P, K]."""
        shift = self.shifts(pred, ids)
        lp = logits.float() - lse[:, None]
        rest = (1 - lp.exp().sum(-1)).clamp_min(1e-30).log()  # mass outside the top K
        norm = torch.logsumexp(torch.cat([lp + shift, rest[:, None]], -1), -1)
        return shift - norm[:, None]


def listwise(adapter: LogitAdapter, record: dict) -> tuple[torch.Tensor, float, int] | None:
    """Mean cross-entropy against softmax(G) over a trajectory's target rows, top-1 agreement."""
    rows = record["rows"]
    if not rows:
        return None
    at = torch.tensor([j for j, _, _ in rows])
    scores = record["logits"][at].float() + adapter.shifts(record["pred"][at].float(),
                                                           record["ids"][at])
    loss, agree = scores.new_zeros(()), 0.0
    for n, (_, index, g) in enumerate(rows):
        mine = torch.log_softmax(scores[n, index], -1)
        loss = loss - (torch.softmax(g, -1) * mine).sum()
        agree += float(int(mine.argmax()) == int(g.argmax()))
    return loss / len(rows), agree / len(rows), len(rows)


@torch.no_grad()
def report(adapter: LogitAdapter, val: list[dict], threshold: float, betas: list[float]) -> str:
    ce, agree, count = 0.0, 0.0, 0
    gains: dict[str, list[float]] = {f"β={b:g}": [] for b in betas} | {"oracle": []}
    for record in val:
        if (out := listwise(adapter, record)) is not None:
            ce, agree, count = ce + float(out[0]) * out[2], agree + out[1] * out[2], count + out[2]
        for j, index, g in record["rows"]:
            logits = record["logits"][j].float()
            if float(topk_entropy(logits[:10])) < threshold or int(index[0]) != 0:
                continue  # not a junction, or the greedy candidate has no G
            top10 = index < 10
            if int(top10.sum()) < 2:
                continue
            index, g = index[top10], g[top10]
            ratio = adapter.log_ratios(record["pred"][j : j + 1].float(), record["ids"][j : j + 1],
                                       record["logits"][j : j + 1], record["lse"][j : j + 1])[0]
            for b in betas:
                pick = int((logits[index] + b * ratio[index]).argmax())
                gains[f"β={b:g}"].append(float(g[pick] - g[0]))
            gains["oracle"].append(float(g.max() - g[0]))
    cells = "  ".join(f"G gain {key} {statistics.fmean(x):+.3f} ± "
                      f"{statistics.pstdev(x) / len(x) ** 0.5:.3f}" for key, x in gains.items())
    return (f"list CE {ce / count:.3f}, top-1 agreement {agree / count:.3f}; "
            f"{len(gains['oracle'])} junctions: {cells}")


def fit(args: argparse.Namespace) -> None:
    if args.lora:
        return fit_lora(args)
    torch.manual_seed(args.seed)
    embeddings = base_embeddings()
    train, val = torch.load(args.train), torch.load(args.val)
    threshold = load_calibration(args.value).threshold(0.2)
    adapter = LogitAdapter(embeddings, args.rank)
    optimizer = torch.optim.AdamW([*adapter.down.parameters(), *adapter.up.parameters()],
                                  lr=args.lr, weight_decay=0.0)
    print(f"start: {report(adapter, val, threshold, args.betas)}", flush=True)
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        order = torch.randperm(len(train), generator=generator).tolist()
        for start in tqdm(range(0, len(order), args.batch), desc=f"epoch {epoch + 1}"):
            losses = [out[0] for i in order[start : start + args.batch]
                      if (out := listwise(adapter, train[i])) is not None]
            if not losses:
                continue
            optimizer.zero_grad()
            torch.stack(losses).mean().backward()
            optimizer.step()
        print(f"epoch {epoch + 1}: {report(adapter, val, threshold, args.betas)}", flush=True)
    torch.save({"rank": args.rank, "down": adapter.down.state_dict(),
                "up": adapter.up.state_dict()}, args.out)
    print(f"wrote {args.out}")


def with_ids(tokenizer, value_dir: Path, name: str, records: list[dict]) -> list[tuple]:
    """Each record with its trajectory's encoding (collect skipped empty responses)."""
    out, records_left = [], iter(records)
    for trajectory in load_trajectories(value_dir / name):
        enc = encode(tokenizer, trajectory)
        if len(enc.ids) - enc.start < 2:
            continue
        record = next(records_left, None)
        if record is None or record["pred"].shape[0] != len(enc.ids) - enc.start:
            raise SystemExit(f"{name}: the records do not follow the trajectories")
        out.append((enc, record))
    return out


def lora_hidden(model, batch: list[tuple]) -> torch.Tensor:
    """The adapted backbone's final hidden states of a right-padded batch [B, T, d]."""
    width = max(len(enc.ids) - 1 for enc, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for b, (enc, _) in enumerate(batch):
        ids[b, : len(enc.ids) - 1] = torch.tensor(enc.ids[:-1])
        mask[b, : len(enc.ids) - 1] = 1
    return model.get_base_model().model(input_ids=ids, attention_mask=mask).last_hidden_state


def response_logprobs(model, batch: list[tuple], hidden: torch.Tensor) -> list[torch.Tensor]:
    """Per trajectory: log p(y_t) of each response token (its end of sequence left out, as the
    implicit reward scores y) from a batch's final hidden states, through one vocabulary-wide
    head call over the response positions only."""
    picked, targets, sizes = [], [], []
    for b, (enc, _) in enumerate(batch):
        n = len(enc.ids) - 1 - enc.start  # position enc.start - 1 + t predicts token t
        picked.append(hidden[b, enc.start - 1 : enc.start - 1 + n])
        targets.extend(enc.ids[enc.start : enc.start + n])
        sizes.append(n)
    logits = output_logits(model.get_base_model(), torch.cat(picked))
    chosen = logits.gather(-1, torch.tensor(targets)[:, None])[:, 0]
    return list((chosen - torch.logsumexp(logits, -1)).split(sizes))


@torch.no_grad()
def base_logprobs(model, data: list[tuple]) -> list[torch.Tensor]:
    """`response_logprobs` of the base itself (the adapter off), once before training."""
    out: list[torch.Tensor] = []
    with model.disable_adapter():
        for start in tqdm(range(0, len(data), 8), desc="base log-probabilities"):
            batch = data[start : start + 8]
            out.extend(response_logprobs(model, batch, lora_hidden(model, batch)))
    return out


def cached_base_logprobs(model, data: list[tuple], records: Path) -> list[torch.Tensor]:
    """`base_logprobs` of the training trajectories, kept beside their records for reruns."""
    path = records.with_name(records.name + ".base_logprobs")
    if path.is_file():
        return torch.load(path)
    out = base_logprobs(model, data)
    torch.save(out, path)
    return out


def sia_loss(model, batch: list[tuple], hidden: torch.Tensor, base: list[torch.Tensor]):
    """SIA's loss, summed over the batch: (mean_t V_t − R)², V_t = log p_θ(y_t) − log p_base(y_t),
    so mean_t V_t is the adapted model's own implicit reward of the response."""
    mine = response_logprobs(model, batch, hidden)
    return sum((torch.mean(lp - b) - enc.reward) ** 2
               for lp, b, (enc, _) in zip(mine, base, batch, strict=True))


def lora_listwise(embeddings, batch, hidden) -> tuple[torch.Tensor, float, int]:
    """Summed cross-entropy of p_θ = softmax(W h_θ) on the matched candidates against
    softmax(G), top-1 agreements, rows."""
    loss, agree, rows = hidden.new_zeros(()), 0.0, 0
    for b, (enc, record) in enumerate(batch):
        for j, index, g in record["rows"]:
            scores = embeddings[record["ids"][j][index].long()] @ hidden[b, enc.start - 1 + j]
            mine = torch.log_softmax(scores.float(), -1)
            loss = loss - (torch.softmax(g, -1) * mine).sum()
            agree, rows = agree + float(int(mine.argmax()) == int(g.argmax())), rows + 1
    return loss, agree, rows


@torch.no_grad()
def lora_report(model, base, val: list[tuple], threshold: float, betas: list[float],
                val_base: list[torch.Tensor], constant: float) -> str:
    model.eval()
    embeddings = base.model.get_output_embeddings().weight
    ce, agree, count, sia = 0.0, 0.0, 0, 0.0
    gains: dict[str, list[float]] = {f"β={b:g}": [] for b in betas} | {"oracle": []}
    for start in range(0, len(val), 8):
        batch = val[start : start + 8]
        hidden = lora_hidden(model, batch)
        loss, hits, rows = lora_listwise(embeddings, batch, hidden)
        ce, agree, count = ce + float(loss), agree + hits, count + rows
        sia += float(sia_loss(model, batch, hidden, val_base[start : start + 8]))
        for b, (enc, record) in enumerate(batch):
            for j, index, g in record["rows"]:
                logits = record["logits"][j].float()
                if float(topk_entropy(logits[:10])) < threshold or int(index[0]) != 0:
                    continue
                top10 = index < 10
                if int(top10.sum()) < 2:
                    continue
                index, g = index[top10], g[top10]
                full = output_logits(base.model, hidden[b, enc.start - 1 + j][None])[0]
                mine = full[record["ids"][j][index].long()] - torch.logsumexp(full, -1)
                ratio = mine - (logits[index] - record["lse"][j])
                for beta in betas:
                    pick = int((logits[index] + beta * ratio).argmax())
                    gains[f"β={beta:g}"].append(float(g[pick] - g[0]))
                gains["oracle"].append(float(g.max() - g[0]))
    model.train()
    cells = "  ".join(
        f"G gain {key} {statistics.fmean(x):+.3f} ± {statistics.pstdev(x) / len(x) ** 0.5:.3f}"
        for key, x in gains.items()
    )
    floor = statistics.fmean((constant - enc.reward) ** 2 for enc, _ in val)
    return (
        f"SIA loss {sia / len(val):.4f} (constant {floor:.4f}), "
        f"list CE {ce / count:.3f}, top-1 agreement {agree / count:.3f}; "
        f"{len(gains['oracle'])} junctions: {cells}"
    )


def fit_lora(args: argparse.Namespace) -> None:
    """LoRA (rank `--lora`, α = 2·rank, the attention projections) on the base itself,
    trained listwise through p_θ = softmax(W h_θ): V(c) = log p_θ(c) − log p_base(c)."""
    torch.manual_seed(args.seed)
    base = load_model("base", ModelSpec(), progress=False)
    train = with_ids(base.tokenizer, args.value, "trajectories.jsonl", torch.load(args.train))
    val = with_ids(base.tokenizer, args.value, "val_trajectories.jsonl", torch.load(args.val))
    threshold = load_calibration(args.value).threshold(0.2)
    if args.init is not None:  # go on from a log-ratio model (its LoRA, trainable)
        model = PeftModel.from_pretrained(base.model, str(args.init), is_trainable=True)
    else:
        model = get_peft_model(base.model, LoraConfig(
            r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0,
            target_modules=list(attention_projections(base.model))))
    params = [p for name, p in model.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    embeddings = base.model.get_output_embeddings().weight.detach()
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    train_base = cached_base_logprobs(model, train, args.train) if args.sia_weight else None
    val_base = base_logprobs(model, val)
    constant = statistics.fmean(enc.reward for enc, _ in train)

    def report() -> str:
        return lora_report(model, base, val, threshold, args.betas, val_base, constant)

    history = [{"epoch": 0, "val": report()}]
    print(f"start: {history[0]['val']}", flush=True)
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        order = torch.randperm(len(train), generator=generator).tolist()
        for start in tqdm(range(0, len(order), 8), desc=f"epoch {epoch + 1}"):
            chunk = order[start : start + 8]
            batch = [train[i] for i in chunk]
            hidden = lora_hidden(model, batch)
            loss, _, rows = lora_listwise(embeddings, batch, hidden)
            if not rows and not args.sia_weight:
                continue
            total = loss / max(rows, 1)
            if args.sia_weight:  # SIA's own objective beside the listwise one, on the
                # batch's first `--sia-rows` (a random draw): its vocabulary-wide head at every
                # response position costs more than the whole listwise step on a CPU
                n = min(args.sia_rows, len(batch))
                mine = sia_loss(model, batch[:n], hidden[:n], [train_base[i] for i in chunk[:n]])
                total = total + args.sia_weight * mine / n
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
        history.append({"epoch": epoch + 1, "val": report()})
        print(f"epoch {epoch + 1}: {history[-1]['val']}", flush=True)
    command = (f"python -m junction.offline.listwise_targets fit --lora {args.lora} --lr {args.lr} "
               f"--epochs {args.epochs} --sia-weight {args.sia_weight:g} "
               f"--sia-rows {args.sia_rows} --seed {args.seed} "
               + (f"--init {shown(args.init)} " if args.init is not None else "") +
               f"--train {args.train.name} "
               f"--val {args.val.name} --out {args.out.name}")  # file names, no paths
    meta = {"backbone": "default", "command": command,
            "objective": "listwise cross-entropy against softmax(G) over the base's top "
                         f"{K} candidates" + (f" + {args.sia_weight:g} × SIA's loss (mean_t V_t"
                                              " − R)²" if args.sia_weight else ""),
            "history": history,
            **({"init": init_record(args.init)} if args.init is not None else {}),
            "data": {"train": len(train), "val": len(val)},
            "training": {"epochs": args.epochs, "lr": args.lr, "batch_size": 8,
                         "seed": args.seed, "sia_weight": args.sia_weight,
                         "sia_rows": args.sia_rows}}
    save_log_ratio_model(model, args.out, meta)
    shutil.copy(args.value / CALIBRATION_FILE, args.out / CALIBRATION_FILE)  # SIA's thresholds
    print(f"wrote {args.out}: a log-ratio value model (`--value {args.out}`)")


def shown(path: Path) -> str:
    """A path as a record shows it: as given when relative, else its name only."""
    return path.name if path.is_absolute() else str(path)


def init_record(init: Path) -> dict:
    """Where a continued fit started: that model, how it was trained (and where it began)."""
    meta = json.loads((init / META_FILE).read_text())
    return {"from": shown(init), "command": meta["command"], "history": meta["history"],
            **({"init": meta["init"]} if "init" in meta else {})}


def base_embeddings() -> torch.Tensor:
    base = load_model("base", ModelSpec(), progress=False)
    return base.model.get_output_embeddings().weight.detach().float()


@torch.no_grad()
def follow(args: argparse.Namespace) -> None:
    base = load_model("base", ModelSpec(), progress=False)
    if args.adapter.is_dir():  # fit --lora's output: the LoRA'd base's own log-ratio
        lora = load_model("value", ModelSpec(), progress=False).model
        lora = PeftModel.from_pretrained(lora, str(args.adapter)).eval()
    else:
        saved = torch.load(args.adapter)
        adapter = LogitAdapter(base.model.get_output_embeddings().weight.detach().float(),
                               saved["rank"])
        adapter.down.load_state_dict(saved["down"])
        adapter.up.load_state_dict(saved["up"])
    calibration = load_calibration(args.value)
    threshold, k = calibration.threshold(0.2), calibration.k
    reward = ImplicitReward(base, load_model("guidance", ModelSpec(), progress=False),
                            progress=False)
    vocab = vocab_of(base.tokenizer)
    rewards: dict[float, list[float]] = {b: [] for b in [0.0, *args.betas]}
    junctions = dict.fromkeys(rewards, 0)
    steps = dict.fromkeys(rewards, 0)
    for ex in tqdm(load_split(args.data, "eval", args.limit), desc="answers", unit="prompt"):
        prompt = build_prompt_ids(base.tokenizer, prompt=ex.prompt, chat=False)
        texts = []
        for beta in rewards:
            answer: list[int] = []
            for _ in range(args.max_tokens):
                ids = torch.tensor([prompt + answer])
                pred = base.model.model(input_ids=ids).last_hidden_state[0, -1:].float()
                logits = output_logits(base.model, pred)
                wide = torch.topk(logits, K)  # SIA's top k is its head
                pick, steps[beta] = 0, steps[beta] + 1
                if beta > 0 and float(topk_entropy(wide.values[0, :k])) >= threshold:
                    junctions[beta] += 1
                    if args.adapter.is_dir():
                        adapted = lora(input_ids=ids).logits[0, -1].float()
                        shift = torch.log_softmax(adapted, -1) - torch.log_softmax(logits[0], -1)
                        ratio = shift[wide.indices[0, :k]]
                    else:
                        ratio = adapter.log_ratios(pred, wide.indices, wide.values,
                                                   torch.logsumexp(logits, -1))[0, :k]
                    pick = int((wide.values[0, :k] + beta * ratio).argmax())
                chosen = int(wide.indices[0, pick])
                if chosen in base.eos_ids:
                    break
                answer.append(chosen)
                if "\n" in vocab.decode(answer):  # the evaluation's stop for TruthfulQA
                    break
            texts.append(vocab.decode(answer).split("\n")[0])
        for beta, score in zip(rewards, reward.score_batch([ex.prompt] * len(texts), texts),
                               strict=True):
            rewards[beta].append(score)
    greedy = rewards[0.0]
    print(f"greedy answers ({len(greedy)} prompts): {statistics.fmean(greedy):+.3f}")
    for beta in args.betas:
        gains = [a - b for a, b in zip(rewards[beta], greedy, strict=True)]
        print(f"β={beta:g}: {statistics.fmean(rewards[beta]):+.3f}, paired gain "
              f"{statistics.fmean(gains):+.3f} ± {statistics.pstdev(gains) / len(gains) ** 0.5:.3f}"
              f", junctions {junctions[beta] / steps[beta]:.1%} of steps")


@torch.no_grad()
def loss(args: argparse.Namespace) -> None:
    """SIA's validation loss for a log-ratio value model, comparable with a head model's.

    With V_t = log p_θ(y_t) − log p_base(y_t), mean_t V_t is the adapted model's own implicit
    reward, so SIA's loss (mean_t V_t − R)² is the head models' validation loss on the same
    trajectories; also per token, (V_t − r_t)², against the constants of the training set."""
    base = load_model("base", ModelSpec(), progress=False)
    value = load_model("value", ModelSpec(), progress=False)
    value = replace(value, model=load_log_ratio_model(args.adapter, value.model))
    sets = {}
    for name in ("trajectories.jsonl", "val_trajectories.jsonl"):
        rows = load_trajectories(args.value / name)[: args.rows]
        pairs = [encode_pair(base, t.prompt, t.response, chat=False) for t in rows]
        lp = [batched_token_logprobs(m, pairs, 8, f"{name}: {m.name}", True) for m in (base, value)]
        ratios = [[a - b for a, b in zip(t, s, strict=True)] for s, t in zip(*lp, strict=True)]
        sets[name] = (rows, ratios)
    train, val = sets["trajectories.jsonl"], sets["val_trajectories.jsonl"]
    constant = statistics.fmean(t.reward for t in train[0])
    token_constant = statistics.fmean(r for t in train[0] for r in t.token_rewards)

    def sia_loss(rows, ratios, a=1.0, b=0.0) -> float:
        return statistics.fmean((a * statistics.fmean(v or [0.0]) + b - t.reward) ** 2
                                for t, v in zip(rows, ratios, strict=True))

    # the least-squares affine map of mean_t V_t onto R, fitted on the training trajectories
    x = torch.tensor([statistics.fmean(v or [0.0]) for v in train[1]], dtype=torch.float64)
    y = torch.tensor([t.reward for t in train[0]], dtype=torch.float64)
    a, b = torch.linalg.lstsq(torch.stack([x, torch.ones_like(x)], 1), y[:, None]).solution[:, 0]
    flat = [(v, r) for t, vs in zip(*val, strict=True) for v, r in zip(vs, t.token_rewards,
                                                                       strict=True)]
    losses = {
        "constant_val_loss": sia_loss(val[0], [[]] * len(val[0]), 0.0, constant),
        "val_loss": sia_loss(*val),
        "affine": [float(a), float(b)],
        "affine_val_loss": sia_loss(*val, float(a), float(b)),
        "token_constant_mse": statistics.fmean((token_constant - r) ** 2 for _, r in flat),
        "token_mse": statistics.fmean((v - r) ** 2 for v, r in flat),
        "val": len(val[0]), "train": len(train[0]), "val_tokens": len(flat),
        "command": "python -m junction.offline.listwise_targets loss --adapter "
                   + str(args.adapter.name if args.adapter.is_absolute() else args.adapter),
    }
    print(f"validation: {len(val[0])} trajectories, {len(flat)} tokens; training: "
          f"{len(train[0])} (constants: R {constant:+.4f}, r_t {token_constant:+.4f})")
    print(f"SIA's loss: constant {losses['constant_val_loss']:.4f}, log-ratio "
          f"{losses['val_loss']:.4f}, affine ({float(a):.3f}·V {float(b):+.3f}) "
          f"{losses['affine_val_loss']:.4f}")
    print(f"per token: constant {losses['token_constant_mse']:.3f}, "
          f"log-ratio {losses['token_mse']:.3f}")
    meta_path = args.adapter / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["losses"] = losses  # recorded beside how the model was trained
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    one = sub.add_parser("collect")
    one.add_argument("--split", choices=["train", "val"], default="train")
    one.add_argument("--out", type=Path, required=True)
    two = sub.add_parser("fit")
    two.add_argument("--train", type=Path, required=True)
    two.add_argument("--val", type=Path, required=True)
    two.add_argument("--out", type=Path, required=True)
    two.add_argument("--rank", type=int, default=64)
    two.add_argument("--epochs", type=int, default=2)
    two.add_argument("--lr", type=float, default=1e-3)
    two.add_argument("--batch", type=int, default=16)
    two.add_argument("--seed", type=int, default=0)
    two.add_argument("--lora", type=int, default=0,
                     help="train LoRA of this rank on the base instead of the logit adapter")
    two.add_argument("--sia-weight", type=float, default=0.0,
                     help="with --lora: weight of SIA's loss (mean_t V_t - R)^2 beside the "
                          "listwise loss (the shipped model: 0.5); 0 trains listwise only")
    two.add_argument("--init", type=Path, default=None,
                     help="with --lora: start from this log-ratio model's LoRA")
    two.add_argument("--sia-rows", type=int, default=4,
                     help="with --sia-weight: trajectories of each batch of 8 in SIA's loss")
    three = sub.add_parser("follow")
    three.add_argument("--adapter", type=Path, required=True)
    three.add_argument("--data", type=Path, required=True)
    three.add_argument("--limit", type=int, default=32)
    three.add_argument("--max-tokens", type=int, default=32)
    for p in (one, two, three):
        p.add_argument("--value", type=Path, default=SHIPPED)
    for p in (two, three):
        p.add_argument("--beta", dest="betas", default="1,2",
                       type=lambda s: [float(b) for b in s.split(",")])
    four = sub.add_parser("loss")
    four.add_argument("--adapter", type=Path, required=True)
    four.add_argument("--rows", type=int, default=None, help="the first N of each file")
    four.add_argument("--value", type=Path, default=SHIPPED)
    args = parser.parse_args()
    {"collect": collect, "fit": fit, "follow": follow, "loss": loss}[args.stage](args)


if __name__ == "__main__":
    main()
