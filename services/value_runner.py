"""The value worker's runner: scores k candidate continuations of a sequence with SIA's V.

Each sequence caches its prefix; a `score` call runs only the newly committed tokens, then
all k candidates in one batch over expanded views of that cache (the prefix is never
recomputed). A log-ratio value model (`junction.shared.value_model`) needs no candidate
batch: V(c) = log p_θ(c | prefix) − log p_base(c | prefix), from the prefix forward, less
the base's log-probabilities sent with the request.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from junction.services.kv import expand_row
from junction.services.protocol import Worker
from junction.shared.bridge import TokenText
from junction.shared.calibration import Calibration, load_calibration
from junction.shared.config import ModelSpec
from junction.shared.models import LoadedModel, load_model
from junction.shared.prompts import build_prompt_ids
from junction.shared.sources import DEFAULT_VALUE_DIR, check_adapter
from junction.shared.types import Failure, ModelInfo, ScoreRequest, ScoreResult, failure
from junction.shared.value_model import (
    ValueModel,
    load_log_ratio_model,
    load_value_model,
    read_value_meta,
    value_kind,
)


@dataclass(slots=True)
class _Sequence:
    text: TokenText
    cache: DynamicCache
    cached: int = 0  # tokens of text.ids already in the cache
    last_value: float = 0.0  # V at the last cached token (the value of an empty candidate)
    last_logprobs: torch.Tensor | None = None  # log-ratio kind: log p_θ of the next token


class ValueRunner(Worker):
    def __init__(
        self,
        loaded: LoadedModel,
        value: ValueModel | torch.nn.Module,
        calibration: Calibration | None = None,
    ) -> None:
        self.loaded = loaded
        self.value = value.eval()
        # a ValueModel (scalar head), or a causal LM: the base with a log-ratio model's LoRA
        self.log_ratio = not isinstance(value, ValueModel)
        self.calibration = calibration  # SIA's thresholds saved beside this value model
        self.tokenizer = loaded.tokenizer
        self.family = loaded.family
        self.device = torch.device(loaded.device)
        self.seqs: dict[str, _Sequence] = {}

    @classmethod
    def from_paths(cls, backbone_spec: ModelSpec, adapter_dir: Path | None) -> ValueRunner:
        """Load the backbone and the adapter; None = the shipped default adapter."""
        adapter_dir = check_adapter(DEFAULT_VALUE_DIR if adapter_dir is None else Path(adapter_dir))
        loaded = load_model("value", backbone_spec)
        if value_kind(read_value_meta(adapter_dir)) == "log_ratio":
            value = load_log_ratio_model(adapter_dir, loaded.model)
        else:
            value = load_value_model(adapter_dir, loaded.model, merge=True)
        return cls(loaded, value, load_calibration(adapter_dir))

    # ----------------------------------------------------------------- lifecycle
    def info(self) -> ModelInfo:
        return ModelInfo(
            role="value",
            name=self.loaded.name,
            family=self.family,
            vocab_size=int(self.value.config.get_text_config().vocab_size),
            max_context=self.loaded.max_context,
            device=str(self.device),
            calibration=self.calibration.to_dict() if self.calibration else None,
            value_kind="log_ratio" if self.log_ratio else "head",
        )

    def open(
        self,
        seq_id: str,
        prompt: str | None = None,
        messages: list[dict] | None = None,
        seed: int | None = None,  # the value model is deterministic; accepted like every runner
    ) -> int:
        """Start a sequence; returns its prompt length in tokens. Runs no model yet."""
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id!r} is already open")
        ids = build_prompt_ids(self.tokenizer, prompt=prompt, messages=messages, chat=False)
        if not ids:
            raise ValueError("the prompt encodes to no tokens; the value model needs a prefix")
        text = TokenText(self.tokenizer, self.family, ids, self.loaded.eos_ids)
        self.seqs[seq_id] = _Sequence(text, DynamicCache(config=self.value.config))
        return len(ids)

    def close(self, seq_id: str) -> None:
        self.seqs.pop(seq_id, None)

    def live(self) -> int:
        return len(self.seqs)

    # ----------------------------------------------------------------- scoring
    @torch.inference_mode()
    def score(self, reqs: list[ScoreRequest]) -> list[ScoreResult | Failure]:
        """Each request's candidate values; one that fails gets a Failure, the others are scored."""
        results: list[ScoreResult | Failure] = []
        for req in reqs:
            try:
                results.append(self._score_one(req))
            except Exception as exc:  # noqa: BLE001 - one sequence's error is its own result
                results.append(failure(req.seq_id, exc))
        return results

    def _score_one(self, req: ScoreRequest) -> ScoreResult:
        seq = self._seq(req.seq_id)
        for commit in req.append:
            seq.text.apply(commit)
        new = self._extend_prefix(seq)
        cand_ids = [seq.text.ids_for(c) for c in req.candidates]  # the bridge's one rule
        if self.log_ratio:
            return ScoreResult(req.seq_id, self._log_ratios(seq, cand_ids, req.logprobs), new)
        values = self._score_candidates(seq, cand_ids)
        return ScoreResult(req.seq_id, values, new + sum(len(ids) for ids in cand_ids))

    def _seq(self, seq_id: str) -> _Sequence:
        seq = self.seqs.get(seq_id)
        if seq is None:
            raise KeyError(f"sequence {seq_id!r} is not open on the value runner")
        return seq

    def _extend_prefix(self, seq: _Sequence) -> int:
        """Run the prefix tokens not yet cached (all of them the first time) in one forward."""
        new = seq.text.ids[seq.cached :]
        if not new:
            return 0
        ids = torch.tensor([new], device=self.device)
        positions = torch.arange(seq.cached, seq.cached + len(new), device=self.device)[None]
        if self.log_ratio:
            logits = self.value(
                input_ids=ids, position_ids=positions, past_key_values=seq.cache,
                use_cache=True, logits_to_keep=1,
            ).logits
            seq.last_logprobs = torch.log_softmax(logits[0, -1].float(), dim=-1)
        else:
            values, _ = self.value(
                ids, position_ids=positions, past_key_values=seq.cache, use_cache=True
            )
            seq.last_value = float(values[0, -1])
        seq.cached += len(new)
        return len(new)

    @staticmethod
    def _log_ratios(
        seq: _Sequence, cand_ids: list[list[int]], base_logprobs: list[float] | None
    ) -> list[float]:
        """V(c) = log p_θ(c) − log p_base(c) for candidates that are single base tokens."""
        if base_logprobs is None or len(base_logprobs) != len(cand_ids):
            raise ValueError(
                "a log-ratio value model scores the base's candidate tokens at a junction, "
                "given their base log-probabilities; it cannot score whole completions "
                "(best-of-N by value needs a value model with a head, or a reward source)"
            )
        if any(len(ids) != 1 for ids in cand_ids) or seq.last_logprobs is None:
            raise ValueError(
                "a log-ratio value model scores single tokens of its own vocabulary: "
                "it must be LoRA on the base model being served"
            )
        ids = torch.tensor([c[0] for c in cand_ids], device=seq.last_logprobs.device)
        adapted = seq.last_logprobs[ids]
        return (adapted.double() - torch.tensor(base_logprobs, dtype=torch.float64)).tolist()

    def _score_candidates(self, seq: _Sequence, cand_ids: list[list[int]]) -> list[float]:
        """V(prefix ⊕ c) for each candidate, in one right-padded batch over the shared prefix."""
        values = [seq.last_value] * len(cand_ids)  # an empty candidate adds nothing to V's input
        rows = [i for i, ids in enumerate(cand_ids) if ids]
        if not rows:
            return values
        ids, real = _right_padded([cand_ids[i] for i in rows], self.device)
        k, width = ids.shape
        # Each row sees the whole prefix, then its own tokens; padding comes after them all.
        mask = torch.cat([real.new_ones(k, seq.cached), real], dim=1).long()
        positions = torch.arange(seq.cached, seq.cached + width, device=self.device)
        out, _ = self.value(
            ids,
            attention_mask=mask,
            position_ids=positions[None].expand(k, -1),
            past_key_values=expand_row(seq.cache, k),  # views: the stored cache stays as it is
            use_cache=True,
        )
        last = out[torch.arange(k, device=self.device), real.sum(dim=1) - 1]
        for i, value in zip(rows, last.tolist(), strict=True):
            values[i] = value
        return values


def _right_padded(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded on the right to one width, and the mask of their real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
    lengths = torch.tensor([len(r) for r in rows], device=device)
    return ids, torch.arange(width, device=device)[None] < lengths[:, None]


