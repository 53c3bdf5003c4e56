"""Training SIA's value model: distil trajectory rewards into token-level values.

Data are trajectories (a prompt, a sampled response, the reward of the full response). The
loss is SIA's: L = E[(mean_t V(x, y≤t) − R(x, y))²], the mean over the positions of the
response's tokens. As the reference code does, every response gets an end-of-sequence token
appended for training (its value is the finished response's), so the value model also learns
where an answer ends and an empty response still has one position. The head starts as the
constant predictor — weight 0, bias = mean training reward — so a validation loss below
`constant_loss` is something the model learned — or, on request (`head_init="ridge"`), as the
closed-form ridge fit of the frozen backbone's features (`ridge_head`), so LoRA gets gradients
from the first step. Defaults are the reference's (lr 1e-4, 3 epochs, weight decay 1e-4),
except the head's own smaller learning rate (see TrainSettings).

Per-position targets (this project's addition; the reference has trajectory rewards only):
when a reward is a mean of per-token terms — the implicit reward is, exactly
(`implicit_reward.token_rewards`) — each response position also gets its own term as
a target, and the loss adds `position_weight` × mean_t (V(x, y≤t) − r_t)². SIA's loss is zero
at V_t = r_t, so this does not move its minimum; it tells the model which of the ~30 values
averaged into R carries which part, where SIA's loss alone gives one number per response
(BENCHMARKS.md measures both). And r_t is what SIA's choice needs at a junction: how much
choosing candidate c adds to the reward. The validation loss is still SIA's alone.

Resumable: after each epoch a checkpoint (trainable weights, optimizer, history) is written;
epoch e shuffles with seed + e and reseeds dropout, so a resumed run repeats the same steps.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from junction.shared.prompts import build_prompt_ids
from junction.shared.value_model import ValueModel
from junction.shared.vocab import vocab_of

CHECKPOINT_FILE = "checkpoint.pt"
TRAJECTORY_FILE = "trajectories.jsonl"
VAL_TRAJECTORY_FILE = "val_trajectories.jsonl"  # responses of another split, for validation
ADAPTER_FILE = "adapter_model.safetensors"


@dataclass(slots=True)
class Trajectory:
    prompt: str
    response: str
    reward: float
    row: int = -1  # the prompt's data row
    seed: int = 0  # the sampling seed of the response
    finish_reason: str = ""
    # The reward split over the response's tokens in the value model's vocabulary (their
    # mean is `reward`), where the reward source decomposes (the implicit reward); else None.
    token_rewards: list[float] | None = None


@dataclass(slots=True)
class Encoded:
    ids: list[int]  # prompt, response, end of sequence, in the value model's vocabulary
    start: int  # position of the first response token (or of the end of sequence)
    reward: float
    # Per-position targets of the response positions (end of sequence included), or None.
    targets: list[float] | None = None


@dataclass(slots=True)
class TrainSettings:
    """SIA's reference settings (batch 8, lr 1e-4, 3 epochs, weight decay 1e-4), with one
    difference: the head has its own smaller learning rate, as Gemma 3's final hidden states
    have norms near 100, so a head step moves V about 100× further than a LoRA step does."""

    epochs: int = 3
    batch_size: int = 8
    lr: float = 1e-4  # LoRA weights
    head_lr: float = 3e-5
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    val_fraction: float = 0.2
    seed: int = 0
    head_init: str = "zero"  # "zero": the constant predictor; "ridge": the frozen features' fit
    # The ridge penalty relative to the features' mean variance; 3 was the best of 0.1..100 on
    # an inner 80/20 prompt split of the implicit-reward training set (see BENCHMARKS.md).
    ridge: float = 3.0
    # Weight of the per-position loss on trajectories whose reward comes split per token
    # (`Trajectory.token_rewards`); 0 trains on SIA's loss alone (see the module docstring).
    position_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.head_init not in ("ridge", "zero"):
            raise ValueError("head_init must be ridge or zero")
        if self.ridge <= 0.0:
            raise ValueError("ridge must be > 0")
        if not self.position_weight >= 0.0:
            raise ValueError("position_weight must be >= 0")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in (0, 1)")


# --- data --------------------------------------------------------------------------------------


def save_trajectories(path: Path, trajectories: Sequence[Trajectory]) -> None:
    lines = [json.dumps(asdict(t), ensure_ascii=False) for t in trajectories]
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def load_trajectories(path: Path) -> list[Trajectory]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [Trajectory(**json.loads(line)) for line in lines if line.strip()]


def encode(tokenizer, trajectory: Trajectory, max_tokens: int = 512) -> Encoded:
    """Prompt ids as the value runner builds them, then the response's text encoded as the
    text bridge encodes a candidate, then the tokenizer's end-of-sequence token (as SIA's
    reference appends one to every response that does not end in one); the response is cut
    to fit `max_tokens` in all, the end of sequence kept."""
    prompt = build_prompt_ids(tokenizer, prompt=trajectory.prompt, chat=False)
    if not prompt:
        raise ValueError("a prompt encodes to no tokens; the value model needs a prefix")
    if tokenizer.eos_token_id is None:
        raise ValueError("the value model's tokenizer has no end-of-sequence token")
    full = vocab_of(tokenizer).encode(trajectory.response) if trajectory.response else []
    response = full[: max(0, max_tokens - len(prompt) - 1)] + [tokenizer.eos_token_id]
    return Encoded(
        prompt + response, len(prompt), trajectory.reward,
        position_targets(trajectory, len(full), len(response) - 1),
    )


def position_targets(trajectory: Trajectory, tokens: int, kept: int) -> list[float] | None:
    """Per-position targets: each kept token's share of the reward, then the end of sequence
    at the whole response's reward (the finished response's value, as in SIA's training),
    so that over an uncut response their mean is the reward. None when the trajectory has no
    per-token rewards or they were made in another tokenizer (their count is not `tokens`)."""
    shares = trajectory.token_rewards
    if shares is None or len(shares) != tokens:
        return None
    return [*shares[:kept], trajectory.reward]


def split_by_prompt(
    items: Sequence, prompts: Sequence[str], val_fraction: float, seed: int
) -> tuple[list, list]:
    """Hold out a seeded share of the distinct prompts (all samples of a prompt go together)."""
    distinct = sorted(set(prompts))
    random.Random(seed).shuffle(distinct)
    n_val = max(1, round(len(distinct) * val_fraction)) if len(distinct) > 1 else 0
    held = set(distinct[:n_val])
    train = [x for x, p in zip(items, prompts, strict=True) if p not in held]
    val = [x for x, p in zip(items, prompts, strict=True) if p in held]
    return train, val


def collate(batch: Sequence[Encoded], device: torch.device | str = "cpu") -> dict:
    """Right-padded ids, attention mask, response-position mask, rewards, and the
    per-position targets with the mask of the positions that have one."""
    width = max(len(e.ids) for e in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    response = torch.zeros(len(batch), width)
    targets = torch.zeros(len(batch), width)
    targeted = torch.zeros(len(batch), width)
    for row, e in enumerate(batch):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        mask[row, : len(e.ids)] = 1
        response[row, e.start : len(e.ids)] = 1.0
        if e.targets is not None:
            targets[row, e.start : len(e.ids)] = torch.tensor(e.targets)
            targeted[row, e.start : len(e.ids)] = 1.0
    rewards = torch.tensor([e.reward for e in batch], dtype=torch.float32)
    tensors = {"ids": ids, "mask": mask, "response": response, "rewards": rewards,
               "targets": targets, "targeted": targeted}
    return {k: v.to(device) for k, v in tensors.items()}


# --- loss --------------------------------------------------------------------------------------


def trajectory_values(values: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """mean_t V(x, y≤t) per row, over the response positions."""
    return (values * response).sum(dim=1) / response.sum(dim=1)


def trajectory_loss(values: torch.Tensor, response: torch.Tensor, rewards: torch.Tensor):
    """SIA's loss: mean over rows of (mean_t V − R)²."""
    return ((trajectory_values(values, response) - rewards) ** 2).mean()


def position_loss(values: torch.Tensor, targets: torch.Tensor, targeted: torch.Tensor):
    """Mean of (V_t − target_t)² over the positions that have a target (0 if none)."""
    count = targeted.sum()
    if count == 0:
        return values.sum() * 0.0
    return (((values - targets) ** 2) * targeted).sum() / count


def constant_loss(train_rewards: Sequence[float], rewards: Sequence[float]) -> float:
    """The loss of always predicting the mean training reward: the bar to beat."""
    mean = sum(train_rewards) / len(train_rewards)
    return sum((r - mean) ** 2 for r in rewards) / len(rewards)


def batch_loss(vm: ValueModel, batch: dict, position_weight: float = 0.0) -> torch.Tensor:
    """SIA's loss, plus `position_weight` × the per-position loss where targets exist."""
    values, _ = vm(batch["ids"], attention_mask=batch["mask"])
    loss = trajectory_loss(values, batch["response"], batch["rewards"])
    if position_weight:
        loss = loss + position_weight * position_loss(
            values, batch["targets"], batch["targeted"]
        )
    return loss


@torch.no_grad()
def mean_loss(vm: ValueModel, data: Sequence[Encoded], batch_size: int, device) -> float:
    """SIA's loss over a data set (eval mode, no dropout)."""
    vm.eval()
    total = 0.0
    for i in range(0, len(data), batch_size):
        chunk = data[i : i + batch_size]
        total += float(batch_loss(vm, collate(chunk, device))) * len(chunk)
    return total / len(data)


# --- training ----------------------------------------------------------------------------------


def start_as_constant(vm: ValueModel, mean_reward: float) -> None:
    """Head weight 0 and bias = mean reward: V starts as the constant predictor."""
    with torch.no_grad():
        vm.head.weight.zero_()
        vm.head.bias.fill_(mean_reward)


def ridge_head(
    features: torch.Tensor, rewards: torch.Tensor, strength: float
) -> tuple[torch.Tensor, float]:
    """The head (w, b) minimising Σ_i (w·f_i + b − R_i)² + λ‖w‖², λ = strength × n × the mean
    per-dimension variance of the features (so `strength` does not depend on their scale).

    With a linear head, mean_t V(x, y≤t) = w·(mean_t h_t) + b, so on frozen features SIA's loss
    is exactly this regression on f_i = mean_t h_t: its solution is the best linear head."""
    x, y = features.double(), rewards.double()
    mean_x, mean_y = x.mean(dim=0), y.mean()
    centred = x - mean_x
    gram = centred.T @ centred
    penalty = strength * torch.trace(gram) / gram.shape[0]
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    weight = torch.linalg.solve(gram + penalty * eye, centred.T @ (y - mean_y))
    return weight.float(), float(mean_y - mean_x @ weight)


@torch.no_grad()
def mean_features(vm: ValueModel, data: Sequence[Encoded], batch_size: int, device):
    """mean_t h_t over each trajectory's response positions (eval mode): [N, hidden]."""
    vm.eval()
    rows = []
    for i in range(0, len(data), batch_size):
        batch = collate(data[i : i + batch_size], device)
        hidden = vm.decoder()(input_ids=batch["ids"], attention_mask=batch["mask"])
        hidden = hidden.last_hidden_state.to(vm.head.weight.dtype)
        weights = batch["response"] / batch["response"].sum(dim=1, keepdim=True)
        rows.append(torch.einsum("bt,bth->bh", weights, hidden).float().cpu())
    return torch.cat(rows)


@torch.no_grad()
def position_features(vm: ValueModel, data: Sequence[Encoded], batch_size: int, device):
    """The final hidden state of every response position that has a target, and the targets
    (eval mode): [N, hidden], [N]."""
    vm.eval()
    rows, targets = [], []
    for i in range(0, len(data), batch_size):
        batch = collate(data[i : i + batch_size], device)
        hidden = vm.decoder()(input_ids=batch["ids"], attention_mask=batch["mask"])
        picked = batch["targeted"].bool()
        rows.append(hidden.last_hidden_state[picked].float().cpu())
        targets.append(batch["targets"][picked].cpu())
    return torch.cat(rows), torch.cat(targets)


def start_by_ridge(vm: ValueModel, train: Sequence[Encoded], settings: TrainSettings) -> None:
    """The head as the ridge fit of the (still frozen: LoRA's B is 0) backbone's features:
    of each position's hidden state to its target where the trajectories have per-position
    targets, else of each trajectory's mean hidden state to its reward."""
    device = vm.head.weight.device
    if any(e.targets is not None for e in train):
        features, rewards = position_features(vm, train, settings.batch_size, device)
    else:
        features = mean_features(vm, train, settings.batch_size, device)
        rewards = torch.tensor([e.reward for e in train])
    weight, bias = ridge_head(features, rewards, settings.ridge)
    with torch.no_grad():
        vm.head.weight.copy_(weight.view_as(vm.head.weight))
        vm.head.bias.fill_(bias)


def trainable(vm: ValueModel) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in vm.named_parameters() if p.requires_grad}


def make_optimizer(vm: ValueModel, settings: TrainSettings) -> torch.optim.Optimizer:
    params = trainable(vm)
    lora = [p for name, p in params.items() if not name.startswith("head.")]
    groups = [{"params": lora, "lr": settings.lr}]
    groups.append({"params": list(vm.head.parameters()), "lr": settings.head_lr})
    return torch.optim.AdamW(groups, weight_decay=settings.weight_decay)


def save_checkpoint(path: Path, vm: ValueModel, optimizer, epoch: int, history: list) -> None:
    state = {
        "weights": {name: p.detach().cpu() for name, p in trainable(vm).items()},
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "history": history,
    }
    scratch = Path(path).with_suffix(".tmp")
    torch.save(state, scratch)
    scratch.replace(path)  # a crash mid-write leaves the previous checkpoint intact


def load_checkpoint(path: Path, vm: ValueModel, optimizer) -> tuple[int, list]:
    """Restore weights and optimizer; returns (epochs done, history)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    params = trainable(vm)
    if set(state["weights"]) != set(params):
        raise ValueError(f"{path}: checkpoint does not match this value model's trainable weights")
    with torch.no_grad():
        for name, tensor in state["weights"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]), list(state["history"])


def train_epoch(
    vm: ValueModel,
    optimizer,
    data: Sequence[Encoded],
    settings: TrainSettings,
    epoch: int,
    device,
    progress: bool = True,
) -> float:
    """One pass in a seeded order; returns the mean training loss of the epoch."""
    vm.train()
    torch.manual_seed(settings.seed * 1000 + epoch)  # dropout masks: same on a resumed run
    order = list(range(len(data)))
    random.Random(settings.seed * 1000 + epoch).shuffle(order)
    starts = range(0, len(order), settings.batch_size)
    total, seen = 0.0, 0
    bar = tqdm(starts, desc=f"epoch {epoch + 1}/{settings.epochs}", disable=not progress)
    for i in bar:
        chunk = [data[j] for j in order[i : i + settings.batch_size]]
        loss = batch_loss(vm, collate(chunk, device), settings.position_weight)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(trainable(vm).values()), settings.max_grad_norm)
        optimizer.step()
        total, seen = total + loss.item() * len(chunk), seen + len(chunk)
        bar.set_postfix(loss=f"{total / seen:.4f}")
    return total / seen


def fit(
    vm: ValueModel,
    train: Sequence[Encoded],
    val: Sequence[Encoded],
    settings: TrainSettings,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Train for `settings.epochs` epochs; history = one row per epoch with both losses."""
    if not train or not val:
        raise ValueError("need at least one training and one validation trajectory")
    device = vm.head.weight.device
    optimizer = make_optimizer(vm, settings)
    done, history = 0, []
    path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if resume and path is not None and path.is_file():
        done, history = load_checkpoint(path, vm, optimizer)
    elif settings.head_init == "ridge":
        start_by_ridge(vm, train, settings)
    else:
        start_as_constant(vm, sum(e.reward for e in train) / len(train))
    for epoch in range(done, settings.epochs):
        train_loss = train_epoch(vm, optimizer, train, settings, epoch, device, progress)
        val_loss = mean_loss(vm, val, settings.batch_size, device)
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss})
        if path is not None:
            save_checkpoint(path, vm, optimizer, epoch + 1, history)
    vm.eval()
    return history


def store_adapter_as(out_dir: Path, dtype: torch.dtype) -> None:
    """Rewrite a saved adapter's weights in `dtype` (float16 halves the shipped size;
    peft casts them back to the backbone's dtype on load)."""
    path = Path(out_dir) / ADAPTER_FILE
    weights = {name: t.to(dtype).contiguous() for name, t in load_file(str(path)).items()}
    save_file(weights, str(path), metadata={"format": "pt"})
