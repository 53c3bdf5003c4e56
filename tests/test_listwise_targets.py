"""The logit adapter of scripts/listwise_targets.py: a distribution, a start at the base, and
a listwise target it can learn."""

import torch

from scripts.listwise_targets import LogitAdapter, listwise


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
