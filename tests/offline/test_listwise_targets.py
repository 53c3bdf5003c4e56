"""The logit adapter of scripts/listwise_targets.py: a distribution, a start at the base, and
a listwise target it can learn."""

import pytest
import torch

from junction.offline.listwise_targets import LogitAdapter, listwise


def record(generator: torch.Generator, positions: int = 6, k: int = 5) -> dict:
    logits = torch.randn(positions, k, generator=generator).sort(descending=True).values
    return {
        "pred": torch.randn(positions, 8, generator=generator),
        "ids": torch.stack([torch.randperm(40, generator=generator)[:k] for _ in range(positions)]),
        "logits": logits,
        "lse": torch.logsumexp(logits, -1) + 0.5,  # some mass outside the top k
        # The guidance prefers the base's third candidate at every position.
        "rows": [(j, torch.arange(k), torch.tensor([0.0, 0.0, 4.0, 0.0, 0.0]))
                 for j in range(positions)],
    }


def test_adapter_starts_as_the_base_and_stays_a_distribution():
    generator = torch.Generator().manual_seed(0)
    rec = record(generator)
    adapter = LogitAdapter(torch.randn(40, 8, generator=generator), rank=4)
    args = (rec["pred"], rec["ids"], rec["logits"], rec["lse"])
    assert torch.allclose(adapter.log_ratios(*args), torch.zeros(6, 5), atol=1e-6)
    torch.nn.init.normal_(adapter.up.weight)
    ratios = adapter.log_ratios(*args)
    assert ratios.abs().max() > 0.01
    base = (rec["logits"] - rec["lse"][:, None]).exp()
    outside = 1 - base.sum(-1)
    # p_θ = p_base · exp(ratio) on the top k; outside it p_base scaled by the same normalizer.
    shift = adapter.shifts(rec["pred"], rec["ids"])
    norm_ratio = (ratios - shift)[:, 0]  # −log Z, the same for every candidate of a row
    total = (base * ratios.exp()).sum(-1) + outside * norm_ratio.exp()
    assert torch.allclose(total, torch.ones(6), atol=1e-5)


def test_listwise_loss_teaches_the_guidance_favourite():
    generator = torch.Generator().manual_seed(1)
    rec = record(generator)
    torch.manual_seed(0)
    adapter = LogitAdapter(torch.randn(40, 8, generator=generator), rank=8)
    loss0, agree0, count = listwise(adapter, rec)
    assert count == 6 and agree0 < 1.0  # the base's own order puts candidate 0 first
    optimizer = torch.optim.Adam(adapter.parameters(), lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        listwise(adapter, rec)[0].backward()
        optimizer.step()
    loss, agree, _ = listwise(adapter, rec)
    assert float(loss) < float(loss0) and agree == 1.0


def test_sia_loss_reads_the_adapted_models_implicit_reward_and_learns_it(tiny_gemma):
    """`response_logprobs` equals the implicit reward's own `token_logprobs` (adapter off: the
    base; on: the adapted model), so mean_t V_t in `sia_loss` is exactly what `loss` and the
    value runner compute; a few steps on SIA's loss alone move mean_t V_t to R."""
    from peft import LoraConfig, get_peft_model

    from junction.offline.implicit_reward import encode_pair, token_logprobs
    from junction.offline.listwise_targets import (
        base_logprobs,
        lora_hidden,
        response_logprobs,
        sia_loss,
    )
    from junction.offline.training import Trajectory, encode
    from junction.shared.config import ModelSpec
    from junction.shared.models import load_model
    from junction.shared.value_model import attention_projections

    loaded = load_model("value", ModelSpec(source=str(tiny_gemma.path)), progress=False)
    rows = [("the cat sat on", " the mat and", 0.3), ("a dog", " ran far away now", -0.4)]
    batch = [(encode(loaded.tokenizer, Trajectory(prompt=p, response=r, reward=g)), None)
             for p, r, g in rows]
    torch.manual_seed(0)
    model = get_peft_model(loaded.model, LoraConfig(
        r=4, lora_alpha=8, target_modules=list(attention_projections(loaded.model))))
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    pairs = [encode_pair(loaded, p, r, chat=False) for p, r, _ in rows]
    base = base_logprobs(model, batch)
    with model.disable_adapter():
        expected = token_logprobs(model.get_base_model(), pairs, torch.device("cpu"))
    for got, want in zip(base, expected, strict=True):
        assert got.tolist() == pytest.approx(want, abs=1e-4)
    # at the start (LoRA's B = 0) the adapted model is the base: V = 0, the loss is mean R²
    start = sia_loss(model, batch, lora_hidden(model, batch), base)
    assert float(start) == pytest.approx(0.3**2 + 0.4**2, abs=1e-4)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(150):
        optimizer.zero_grad()
        sia_loss(model, batch, lora_hidden(model, batch), base).backward()
        optimizer.step()
    with torch.no_grad():
        mine = response_logprobs(model, batch, lora_hidden(model, batch))
    means = [float((a - b).mean()) for a, b in zip(mine, base, strict=True)]
    assert means == pytest.approx([0.3, -0.4], abs=0.1)
