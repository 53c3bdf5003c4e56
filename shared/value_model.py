"""SIA's token-level value model: a causal-LM backbone + LoRA + a scalar head.

V(x, y≤t) is the head on the final hidden state at t, so one forward gives every prefix's
value, with no full-vocabulary LM head. On disk: the peft adapter, `value_head.safetensors`
and `junction_value.json` (backbone source, LoRA settings, training).

A second kind (`"kind": "log_ratio"`, no head) is LoRA on the base itself: V(c) =
log p_θ(c | x) − log p_base(c | x), the emulated-fine-tuning form, so logit + V ranks the
base's candidates as the adapted model does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

HEAD_FILE = "value_head.safetensors"
META_FILE = "junction_value.json"
FORMAT_VERSION = 1
KINDS = ("head", "log_ratio")  # a scalar head on the backbone; LoRA on the base, V = log-ratio


@dataclass(slots=True)
class LoraSettings:
    """SIA's LoRA: r=16, α=32, dropout 0.1 on the attention projections."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    target_modules: tuple[str, ...] | None = None  # None = the backbone's attention projections

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError("LoRA r must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("LoRA dropout must be in [0, 1)")
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)


def _inner_model(backbone: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (LoRA layers are injected in place)."""
    return backbone.get_base_model() if isinstance(backbone, PeftModel) else backbone


def hidden_size(backbone: torch.nn.Module) -> int:
    return int(_inner_model(backbone).config.get_text_config().hidden_size)


class ValueModel(torch.nn.Module):
    """values[b, t] = head(hidden_state[b, t]): the value of the prefix ending at token t."""

    def __init__(
        self, backbone: torch.nn.Module, head: torch.nn.Linear, lora: LoraSettings
    ) -> None:
        super().__init__()
        self.backbone = backbone  # a PeftModel while training; a plain model once merged
        self.head = head
        self.lora = lora

    @property
    def config(self) -> Any:
        """The backbone's transformers config."""
        return _inner_model(self.backbone).config

    def decoder(self) -> torch.nn.Module:
        """The backbone's transformer stack without the language-model head."""
        return _inner_model(self.backbone).get_decoder()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """Values [B, T] (float32) and the key/value cache (None unless use_cache)."""
        out = self.decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state.to(self.head.weight.dtype)
        values = self.head(hidden).squeeze(-1).float()
        return values, out.past_key_values if use_cache else None


def attention_projections(backbone: torch.nn.Module) -> tuple[str, ...]:
    """Names of the linear layers inside attention blocks (q_proj, k_proj, v_proj, o_proj...)."""
    names = set()
    for path, module in _inner_model(backbone).named_modules():
        parts = path.split(".")
        in_attention = any("attn" in p or "attention" in p for p in parts[:-1])
        if in_attention and isinstance(module, torch.nn.Linear | Conv1D):
            names.add(parts[-1])
    if not names:
        raise ValueError("no attention projections found; pass LoraSettings.target_modules")
    return tuple(sorted(names))


def _lora_config(lora: LoraSettings, backbone: torch.nn.Module) -> LoraConfig:
    targets = lora.target_modules or attention_projections(backbone)
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(targets)
    )


def _new_head(backbone: torch.nn.Module) -> torch.nn.Linear:
    device = next(backbone.parameters()).device
    return torch.nn.Linear(hidden_size(backbone), 1, device=device, dtype=torch.float32)


def build_value_model(
    backbone: torch.nn.Module, lora: LoraSettings | None = None, seed: int = 0
) -> ValueModel:
    """A fresh value model for training: only the LoRA weights and the head are trainable.

    The backbone is wrapped in place (peft injects LoRA layers into its modules), so pass a
    backbone no other role uses.
    """
    lora = lora or LoraSettings()
    with torch.random.fork_rng(devices=[]):  # reproducible init without touching global RNG
        torch.manual_seed(seed)
        peft_model = get_peft_model(backbone, _lora_config(lora, backbone))
        head = _new_head(backbone)
    targets = tuple(sorted(peft_model.peft_config["default"].target_modules))
    return ValueModel(peft_model, head, replace(lora, target_modules=targets))


def _save_adapter(peft_model: PeftModel, out_dir: Path, meta: dict) -> Path:
    """Write the peft adapter into out_dir (created); returns it as a Path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The adapter records the backbone by its source, never by where this machine cached it.
    peft_model.peft_config["default"].base_model_name_or_path = str(meta.get("backbone", ""))
    peft_model.save_pretrained(out_dir, save_embedding_layers=False)  # no hub look-up
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
    return out_dir


def save_value_model(vm: ValueModel, out_dir: Path, meta: dict) -> None:
    """Write the adapter, the head and `junction_value.json` (meta + LoRA settings).

    `meta` says where the backbone came from (key "backbone": a ModelSpec source) and how the
    model was trained; it is stored as given, with the LoRA settings and hidden size added.
    """
    if not isinstance(vm.backbone, PeftModel):
        raise ValueError("this value model's LoRA is merged into its backbone; save it before")
    out_dir = _save_adapter(vm.backbone, out_dir, meta)
    head = {name: t.detach().cpu().contiguous() for name, t in vm.head.state_dict().items()}
    save_file(head, out_dir / HEAD_FILE)
    lora = asdict(vm.lora)
    lora["target_modules"] = list(vm.lora.target_modules or ())
    record = {**meta, "format": FORMAT_VERSION, "hidden_size": hidden_size(vm.backbone)}
    record["lora"] = lora
    (out_dir / META_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def save_log_ratio_model(peft_model: PeftModel, out_dir: Path, meta: dict) -> None:
    """Write a log-ratio value model: the base's LoRA and `junction_value.json` (kind added)."""
    out_dir = _save_adapter(peft_model, out_dir, meta)
    config = peft_model.peft_config["default"]
    lora = {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "target_modules": sorted(config.target_modules)}
    record = {**meta, "format": FORMAT_VERSION, "kind": "log_ratio", "lora": lora}
    (out_dir / META_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_value_meta(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a value-model directory")
    return json.loads(path.read_text())


def value_kind(meta: dict) -> str:
    """"head" (a scalar head; the default for directories that do not say) or "log_ratio"."""
    kind = meta.get("kind", "head")
    if kind not in KINDS:
        raise ValueError(f"unknown value-model kind {kind!r}; expected one of {KINDS}")
    return kind


def load_log_ratio_model(adapter_dir: Path, backbone: torch.nn.Module) -> torch.nn.Module:
    """The base with a log-ratio value model's LoRA merged in (in place), in eval mode."""
    model = PeftModel.from_pretrained(backbone, str(adapter_dir)).merge_and_unload()
    model.eval()
    model.requires_grad_(False)
    return model


def _load_head(adapter_dir: Path, backbone: torch.nn.Module) -> torch.nn.Linear:
    state = load_file(str(Path(adapter_dir) / HEAD_FILE))
    width = state["weight"].shape[1]
    if width != hidden_size(backbone):
        raise ValueError(
            f"value head expects hidden size {width}, backbone has {hidden_size(backbone)}: "
            "the adapter was trained on a different backbone"
        )
    head = _new_head(backbone)
    head.load_state_dict(state)
    return head


def load_value_model(
    adapter_dir: Path, backbone: torch.nn.Module, merge: bool = True
) -> ValueModel:
    """A value model in eval mode; merge=True folds LoRA into the backbone weights (in place)."""
    meta = read_value_meta(adapter_dir)
    if value_kind(meta) != "head":
        raise ValueError(f"{adapter_dir} holds a {value_kind(meta)} value model, not a head")
    lora_meta = dict(meta.get("lora", {}))
    lora_meta["target_modules"] = tuple(lora_meta.get("target_modules") or ()) or None
    lora = LoraSettings(**lora_meta)
    head = _load_head(adapter_dir, backbone)
    model: torch.nn.Module = PeftModel.from_pretrained(backbone, str(adapter_dir))
    if merge:
        model = model.merge_and_unload()
    vm = ValueModel(model, head, lora)
    vm.eval()
    vm.requires_grad_(False)
    return vm
