"""How an LM runner's pending tokens go through its model: one batched forward for all.

Sequences that add the same number of tokens step as one right-aligned batch (`services.kv`)
whose cache is reused while its membership holds; the others run alone, and new prompts in
one left-padded prefill, so a forward never pays for padding inside a row. `guarded` and
`each` live here because a failed forward falls back on them to find the sequence at fault.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from transformers import DynamicCache, PreTrainedModel

from junction.services.kv import checkpoint, rollback, slice_row, stack_rows
from junction.shared.bridge import TokenText
from junction.shared.types import Failure, failure

T = TypeVar("T")


@dataclass(slots=True)
class LMSequence:
    """One sequence of the runner: its text, its sampler, and where its KV cache is."""

    text: TokenText
    generator: torch.Generator | None
    pending: list[int] = field(default_factory=list)  # ids not yet run through the model
    cache: DynamicCache | None = None  # batch-1 cache while the sequence is outside the batch
    cached: int = 0  # tokens in the cache
    logits: torch.Tensor | None = None  # next-token logits after the last forward [vocab]


@dataclass(slots=True)
class Batch:
    """The sequences stepping together: one right-aligned cache, reused while they do."""

    seq_ids: tuple[str, ...]
    cache: DynamicCache
    mask: torch.Tensor  # [rows, columns] 2D attention mask
    logits: torch.Tensor | None = None  # [rows, vocab] from the last batched forward


class BatchedForwards:
    """The forward passes of `LMRunner`: a base class with no state of its own, so the
    runner's file stays about requests; the runner's `__init__` sets these attributes."""

    model: PreTrainedModel
    device: torch.device
    seqs: dict[str, LMSequence]
    batch: Batch | None

    def _logits_of(self, seq_ids: list[str]) -> torch.Tensor:
        """[rows, vocab] next-token logits; the batched forward's own tensor when it matches."""
        batch = self.batch
        if batch is not None and batch.logits is not None and tuple(seq_ids) == batch.seq_ids:
            return batch.logits  # the steady state: no copy of a vocabulary-wide tensor
        return torch.stack([self.seqs[s].logits for s in seq_ids])

    def _forward(self, seq_ids: list[str]) -> dict[str, Failure]:
        """Run every pending token of these sequences; leaves next-token logits on each.

        A batched forward that fails is undone (its cache is put back as it was) and its
        sequences run one at a time, so only a sequence that fails on its own gets a Failure.
        """
        extending, prompts, alone = [], [], []
        for seq_id in seq_ids:
            seq = self.seqs[seq_id]
            if seq.pending and seq.cached > 0:
                extending.append(seq_id)
            elif seq.pending and seq.cached == 0:
                prompts.append(seq_id)
            elif seq.logits is None:
                alone.append(seq_id)
        # One batched forward for the most common count of new tokens, so rows are never
        # padded inside the batch (sliding-window layers count columns); the rest run alone.
        counts = Counter(len(self.seqs[s].pending) for s in extending)
        width = max(counts, key=lambda n: (counts[n], n == 1), default=1)
        batched = [s for s in extending if len(self.seqs[s].pending) == width]
        alone += [s for s in extending if len(self.seqs[s].pending) != width]
        if len(prompts) == 1:
            alone += prompts
        elif prompts:
            try:
                self._prefill(prompts)
            except Exception:  # noqa: BLE001 - it changed nothing; one at a time finds the culprit
                alone += prompts
        if batched:
            try:
                self._forward_batch(batched)
            except Exception:  # noqa: BLE001 - undone; one at a time finds the culprit
                self._unbatch()
                alone += batched
        return each(alone, self._forward_alone)

    def _forward_alone(self, seq_id: str) -> None:
        if self.batch and seq_id in self.batch.seq_ids:
            self._unbatch()
        seq = self.seqs[seq_id]
        if not seq.pending:
            raise RuntimeError(f"sequence {seq_id!r} has nothing to run")
        cache = seq.cache if seq.cache is not None else DynamicCache(config=self.model.config)
        saved = checkpoint(cache)
        n = len(seq.pending)
        ids = torch.tensor([seq.pending], device=self.device)
        positions = torch.arange(seq.cached, seq.cached + n, device=self.device)[None]
        mask = torch.ones(1, seq.cached + n, dtype=torch.long, device=self.device)
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        except Exception:
            rollback(cache, saved)  # the sequence stays as it was before this forward
            raise
        seq.cache = out.past_key_values
        seq.cached += n
        seq.pending = []
        seq.logits = out.logits[0, -1].float()

    def _prefill(self, seq_ids: list[str]) -> None:
        """New prompts in one left-padded forward; each row's cache is then its real tokens."""
        seqs = [self.seqs[s] for s in seq_ids]
        lengths = [len(s.pending) for s in seqs]
        width = max(lengths)
        ids = torch.zeros(len(seqs), width, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        positions = torch.zeros_like(ids)
        for row, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
            ids[row, width - n :] = torch.tensor(seq.pending, device=self.device)
            mask[row, width - n :] = 1
            positions[row, width - n :] = torch.arange(n, device=self.device)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=DynamicCache(config=self.model.config),
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1].float()
        for row, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
            seq.cache = slice_row(out.past_key_values, row, n)  # drops the left padding
            seq.cached, seq.pending, seq.logits = n, [], logits[row]

    def _forward_batch(self, seq_ids: list[str]) -> None:
        if self.batch is None or set(self.batch.seq_ids) != set(seq_ids):
            self._rebatch(seq_ids)
        batch = self.batch
        seqs = [self.seqs[s] for s in batch.seq_ids]
        width = len(seqs[0].pending)  # the same for every row (see `_forward`)
        ids = torch.tensor([s.pending for s in seqs], device=self.device)
        positions = torch.tensor([[s.cached] for s in seqs], device=self.device)
        positions = positions + torch.arange(width, device=self.device)
        ones = torch.ones(len(seqs), width, dtype=torch.long, device=self.device)
        mask = torch.cat([batch.mask, ones], dim=1)
        saved = checkpoint(batch.cache)
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=batch.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        except Exception:
            rollback(batch.cache, saved)
            raise
        batch.mask = mask
        batch.cache = out.past_key_values
        logits = batch.logits = out.logits[:, -1].float()
        for row, seq in enumerate(seqs):
            seq.cached += width
            seq.pending = []
            seq.logits = logits[row]

    def _rebatch(self, seq_ids: list[str]) -> None:
        self._unbatch()
        seqs = [self.seqs[s] for s in seq_ids]
        cache, mask = stack_rows([s.cache for s in seqs], [s.cached for s in seqs])
        for seq in seqs:
            seq.cache = None
        self.batch = Batch(tuple(seq_ids), cache, mask)

    def _unbatch(self) -> None:
        """Hand every row of the batch back to its sequence as a batch-1 cache (views)."""
        if self.batch is None:
            return
        for row, seq_id in enumerate(self.batch.seq_ids):
            seq = self.seqs.get(seq_id)
            if seq is not None:
                seq.cache = slice_row(self.batch.cache, row, seq.cached)
        self.batch = None


def guarded(seq_id: str, run: Callable[..., T], *args: Any) -> T | Failure:
    """`run(*args)` for one sequence; its Failure if it raised (its batch-mates carry on)."""
    try:
        return run(*args)
    except Exception as exc:  # noqa: BLE001 - one sequence's error is its own result
        return failure(seq_id, exc)


def each(seq_ids: list[str], run: Callable[[str], Any]) -> dict[str, Failure]:
    """Run `run` for each sequence; the Failures of those that raised."""
    outs = {seq_id: guarded(seq_id, run, seq_id) for seq_id in seq_ids}
    return {seq_id: out for seq_id, out in outs.items() if isinstance(out, Failure)}
