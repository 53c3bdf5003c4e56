"""The value model: LoRA + head on a tiny backbone; what trains, what is saved, what loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from junction.shared.value_model import (
    LoraSettings,
    ValueModel,
    attention_projections,
    build_value_model,
    load_value_model,
    read_value_meta,
    save_value_model,
)
from tests.tiny import MODEL_KINDS, tiny_model, tiny_tokenizer

TOKENIZER_OF = {"llama": "bytelevel", "gemma3": "sentencepiece"}


def fresh_backbone(kind: str) -> torch.nn.Module:
    """A new tiny backbone each time: peft wraps it in place."""
    return tiny_model(kind, tiny_tokenizer(TOKENIZER_OF[kind]))


def trained_like(kind: str, seed: int = 0) -> ValueModel:
    return perturb_lora(build_value_model(fresh_backbone(kind), seed=seed), seed)


def perturb_lora(vm: ValueModel, seed: int = 0) -> ValueModel:
    """Make LoRA not a no-op (lora_B starts at zero), as after training; eval mode."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in vm.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return vm.eval()


def sample_ids(vocab: int, rows: int = 2, length: int = 20) -> torch.Tensor:
    return torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_targets_are_the_attention_projections(kind: str) -> None:
    assert attention_projections(fresh_backbone(kind)) == ("k_proj", "o_proj", "q_proj", "v_proj")


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_only_lora_and_head_are_trainable(kind: str) -> None:
    vm = build_value_model(fresh_backbone(kind))
    trainable = {n for n, p in vm.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".lora_A." in n or ".lora_B." in n}
    assert trainable - lora == {"head.weight", "head.bias"}
    layers = vm.backbone.get_base_model().config.num_hidden_layers
    assert len(lora) == layers * 4 * 2  # q, k, v, o; A and B each
    frozen = [n for n, p in vm.named_parameters() if not p.requires_grad]
    assert any("embed_tokens" in n for n in frozen)
    assert all("lora_" not in n for n in frozen)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_lora_settings_reach_peft(kind: str) -> None:
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    vm = build_value_model(fresh_backbone(kind), settings)
    config = vm.backbone.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.0)
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    shapes = {tuple(p.shape) for n, p in vm.named_parameters() if "lora_A" in n}
    assert all(shape[0] == 4 for shape in shapes)
    assert vm.lora.target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_forward_gives_float_values_per_position_without_lm_head(kind: str) -> None:
    vm = trained_like(kind)
    calls = []
    lm_head = vm.backbone.get_base_model().lm_head
    hook = lm_head.register_forward_hook(lambda *args: calls.append(1))
    ids = sample_ids(vm.backbone.get_base_model().config.vocab_size)
    values, cache = vm(ids)
    hook.remove()
    assert values.shape == ids.shape and values.dtype == torch.float32
    assert cache is None and not calls
    assert torch.isfinite(values).all()


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_forward_trains_lora_and_head(kind: str) -> None:
    vm = build_value_model(fresh_backbone(kind)).train()
    ids = sample_ids(vm.backbone.get_base_model().config.vocab_size)
    values, _ = vm(ids)
    loss = ((values.mean(dim=1) - torch.tensor([1.0, -1.0])) ** 2).mean()
    loss.backward()
    grads = {n: p.grad for n, p in vm.named_parameters() if p.requires_grad}
    assert grads["head.weight"].abs().sum() > 0
    # lora_B starts at zero, so lora_B (not lora_A) gets the first gradient
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_seed_makes_init_reproducible() -> None:
    a = build_value_model(fresh_backbone("llama"), seed=3)
    b = build_value_model(fresh_backbone("llama"), seed=3)
    c = build_value_model(fresh_backbone("llama"), seed=4)
    assert torch.equal(a.head.weight, b.head.weight)
    assert not torch.equal(a.head.weight, c.head.weight)


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("merge", [True, False])
def test_save_then_load_gives_the_same_values(kind: str, merge: bool, tmp_path: Path) -> None:
    vm = trained_like(kind)
    ids = sample_ids(vm.backbone.get_base_model().config.vocab_size)
    expected, _ = vm(ids)
    save_value_model(vm, tmp_path, {"backbone": "tiny", "steps": 3})
    loaded = load_value_model(tmp_path, fresh_backbone(kind), merge=merge)
    got, _ = loaded(ids)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    has_lora = any("lora_" in n for n, _ in loaded.named_parameters())
    assert has_lora is not merge


def test_saved_directory_layout_and_meta(tmp_path: Path) -> None:
    save_value_model(trained_like("gemma3"), tmp_path, {"backbone": "default", "epochs": 2})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "junction_value.json",
        "value_head.safetensors",
    ]
    meta = read_value_meta(tmp_path)
    assert meta["backbone"] == "default" and meta["epochs"] == 2
    assert meta["lora"] == {
        "r": 16,
        "alpha": 32,
        "dropout": 0.1,
        "target_modules": ["k_proj", "o_proj", "q_proj", "v_proj"],
    }
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "default"


def test_loaded_model_keeps_its_lora_settings(tmp_path: Path) -> None:
    settings = LoraSettings(r=4, alpha=16, dropout=0.0)
    save_value_model(build_value_model(fresh_backbone("llama"), settings), tmp_path, {})
    loaded = load_value_model(tmp_path, fresh_backbone("llama"))
    assert (loaded.lora.r, loaded.lora.alpha, loaded.lora.dropout) == (4, 16, 0.0)


def test_merged_model_cannot_be_saved(tmp_path: Path) -> None:
    save_value_model(trained_like("llama"), tmp_path / "a", {})
    merged = load_value_model(tmp_path / "a", fresh_backbone("llama"), merge=True)
    with pytest.raises(ValueError, match="merged"):
        save_value_model(merged, tmp_path / "b", {})


def test_head_of_another_backbone_is_refused(tmp_path: Path) -> None:
    save_value_model(trained_like("llama"), tmp_path, {})
    config = LlamaConfig(
        vocab_size=600,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    other = LlamaForCausalLM(config)
    with pytest.raises(ValueError, match="hidden size"):
        load_value_model(tmp_path, other)


def test_reading_meta_of_a_plain_directory_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a value-model directory"):
        read_value_meta(tmp_path)
