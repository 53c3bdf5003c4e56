"""A causal LM serving many sequences: per-sequence KV caches, one batched step for all.

The base and guidance workers; a step returns only top-k summaries (logits stay here).
Batching the forwards is `services.batch`, the runner's base class.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from junction.services.batch import Batch, BatchedForwards, LMSequence, each, guarded
from junction.services.protocol import Worker
from junction.shared.bridge import TokenText
from junction.shared.models import LoadedModel
from junction.shared.prompts import build_prompt_ids
from junction.shared.steering import run_ahead_stops, topk_entropy, word_finished
from junction.shared.types import (
    EOS_TEXT,
    Candidates,
    Commit,
    Failure,
    ModelInfo,
    StepRequest,
    StepResult,
    WordRequest,
    WordResult,
)


@dataclass(slots=True)
class Rows:
    """A batched step's per-row figures, as Python values (`LMRunner._summarize`)."""

    ids: list[list[int]]  # top-k ids, widest k of the batch
    logprobs: list[list[float]]  # their log-probabilities
    top1: list[float]  # top-1 probability
    entropy: list[float]  # entropy of the row's own top-k (entropy_k or k)
    unique_max: list[bool]  # the top logit is strictly above the second


def _entropies(top_logprobs: torch.Tensor, widths: list[int]) -> list[float]:
    """Each row's top-k entropy over its own width: one batched `topk_entropy` per width."""
    out = [0.0] * len(widths)
    for width in set(widths):
        rows = [i for i, w in enumerate(widths) if w == width]
        values = topk_entropy(top_logprobs[rows, :width]).tolist()
        for i, value in zip(rows, values, strict=True):
            out[i] = value
    return out


@dataclass(slots=True)
class _Word:
    """A word being written for Nudging."""

    max_tokens: int
    ids: list[int] = field(default_factory=list)
    text: str = ""
    eos: bool = False  # the writer chose to end the sequence
    processed: int = 0  # tokens run through the model for this request
    next_text: str = ""  # the first token of the next word, when seen (Nudging's resume rule)


class LMRunner(BatchedForwards, Worker):
    def __init__(self, loaded: LoadedModel, role: str, chat: bool) -> None:
        self.loaded = loaded
        self.role = role
        self.chat = chat  # the guidance role gets its chat template, the base plain text
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.family = loaded.family
        self.device = loaded.device
        self.seqs: dict[str, LMSequence] = {}
        self.batch: Batch | None = None

    # ----------------------------------------------------------------- lifecycle
    def info(self) -> ModelInfo:
        return ModelInfo(
            role=self.role,
            name=self.loaded.name,
            family=self.family,
            vocab_size=int(self.model.config.get_text_config().vocab_size),
            max_context=self.loaded.max_context,
            device=str(self.device),
        )

    def count_prompt(self, prompt: str | None = None, messages: list[dict] | None = None) -> int:
        ids = build_prompt_ids(self.tokenizer, prompt=prompt, messages=messages, chat=self.chat)
        return len(ids)

    def open(
        self,
        seq_id: str,
        prompt: str | None = None,
        messages: list[dict] | None = None,
        seed: int | None = None,
    ) -> int:
        """Register a sequence; its prompt is processed lazily by its first step."""
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id!r} is already open on the {self.role} runner")
        ids = build_prompt_ids(self.tokenizer, prompt=prompt, messages=messages, chat=self.chat)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        text = TokenText(self.tokenizer, self.family, ids, self.loaded.eos_ids)
        self.seqs[seq_id] = LMSequence(text=text, generator=generator, pending=list(ids))
        return len(ids)

    def close(self, seq_id: str) -> None:
        if self.seqs.pop(seq_id, None) is not None and self.batch and seq_id in self.batch.seq_ids:
            self._unbatch()

    def live(self) -> int:
        return len(self.seqs)

    # ----------------------------------------------------------------- stepping
    @torch.inference_mode()
    def step(self, reqs: list[StepRequest]) -> list[StepResult | Failure]:
        """Apply each request's commits, run what is pending, return each top-k summary.

        A request with `ahead` may take several steps (its earlier ones in `earlier`). A
        sequence that cannot be served gets a Failure in its place; the others are served.
        """
        started = time.perf_counter()
        by_id = {r.seq_id: r for r in reqs}
        processed: dict[str, int] = {}

        def apply(seq_id: str) -> None:
            processed[seq_id] = self._apply(seq_id, by_id[seq_id].append)

        failed = each(list(by_id), apply)
        served: dict[str, StepResult] = {}
        earlier: dict[str, list[StepResult]] = {s: [] for s in by_id}
        stepping = [r for r in reqs if r.seq_id not in failed]
        # Each round is one batched forward of the sequences still running ahead, so a call
        # that runs ahead batches exactly as the same steps taken one call at a time would.
        while stepping:
            failed |= self._forward([r.seq_id for r in stepping])
            ok = [r for r in stepping if r.seq_id not in failed]
            summaries = self._summarize(self._logits_of([r.seq_id for r in ok]), ok) if ok else []
            stepping, taken = [], time.perf_counter() - started
            for req, summary in zip(ok, summaries, strict=True):
                if isinstance(summary, Failure):
                    failed[req.seq_id] = summary
                    continue
                summary.processed = processed.pop(req.seq_id, 1)  # later rounds run one token
                if self._keeps_going(req, summary, len(earlier[req.seq_id]), taken):
                    earlier[req.seq_id].append(summary)
                    stepping.append(req)
                else:
                    summary.earlier = earlier[req.seq_id]
                    served[req.seq_id] = summary
        return [served.get(r.seq_id) or failed[r.seq_id] for r in reqs]

    def _keeps_going(self, req: StepRequest, step: StepResult, steps: int, seconds: float) -> bool:
        """Run ahead past this step (no junction, not EOS, `steps` before it and `seconds` so
        far within the caps)? Then its sampled token is committed here, as the gateway would."""
        ahead = req.ahead
        if ahead is None or steps + 1 >= ahead.steps or seconds >= ahead.seconds:
            return False
        if step.sampled_text == EOS_TEXT:
            return False
        top = step.top
        if not step.mid_char and run_ahead_stops(
            top.entropy, top.top1_prob, ahead.threshold, ahead.tau
        ):
            return False
        seq = self.seqs[req.seq_id]
        seq.text.push(step.sampled_id)
        seq.pending.append(step.sampled_id)
        return True

    @torch.inference_mode()
    def write_words(self, reqs: list[WordRequest]) -> list[WordResult | Failure]:
        """Nudging: each sequence's next word, written greedily and kept in its own text.

        Stops before the next word's first token (reported as `next_text`, not written) or
        at EOS (`eos`, also after a word). A sequence that fails gets a Failure.
        """
        appends = {r.seq_id: r.append for r in reqs}
        words = {r.seq_id: _Word(r.max_tokens) for r in reqs}
        failed = each(list(words), lambda s: self._apply(s, appends[s]))
        writing = [s for s in words if s not in failed]
        while writing:
            for seq_id in writing:
                words[seq_id].processed += len(self.seqs[seq_id].pending)
            failed |= self._forward(writing)
            writing = [s for s in writing if s not in failed]
            more = {s: guarded(s, self._write_next, s, words[s]) for s in writing}
            failed |= {s: out for s, out in more.items() if isinstance(out, Failure)}
            writing = [s for s, out in more.items() if out is True]
        return [
            failed.get(r.seq_id)
            or WordResult(
                seq_id=r.seq_id,
                commit=Commit(words[r.seq_id].text, tuple(words[r.seq_id].ids), self.family),
                eos=words[r.seq_id].eos,
                processed=words[r.seq_id].processed,
                next_text=words[r.seq_id].next_text,
            )
            for r in reqs
        ]

    def _write_next(self, seq_id: str, word: _Word) -> bool:
        """Add the next greedy token to a word; False once the word is complete."""
        seq = self.seqs[seq_id]
        token = int(torch.argmax(seq.logits))
        piece = seq.text.candidate_texts([token])[0]
        if piece == EOS_TEXT:
            word.eos = True
            return False
        if word_finished(word.text, piece) and not seq.text.mid_char:
            word.next_text = piece  # Nudging's resume rule compares the base's token with it
            return False
        seq.text.push(token)
        seq.pending.append(token)
        word.ids.append(token)
        word.text += piece
        return len(word.ids) < word.max_tokens or bool(seq.text.mid_char)

    # ----------------------------------------------------------------- internals
    def _apply(self, seq_id: str, commits: list[Commit]) -> int:
        """Append commits to a sequence; returns how many tokens are now pending."""
        seq = self._seq(seq_id)
        for commit in commits:
            seq.pending.extend(seq.text.apply(commit))
        return len(seq.pending)

    def _seq(self, seq_id: str) -> LMSequence:
        try:
            return self.seqs[seq_id]
        except KeyError:
            raise KeyError(f"sequence {seq_id!r} is not open on the {self.role} runner") from None

    def _summarize(
        self, logits: torch.Tensor, reqs: list[StepRequest]
    ) -> list[StepResult | Failure]:
        """Top-k, entropy, top-1 probability and the runner's own choice, for each row."""
        widest = max(max(r.k, r.logprobs or 0) for r in reqs)
        k = min(max(widest, 2), logits.shape[-1])
        # Normalized by one logsumexp: the full-vocabulary log-softmax is never materialized.
        top_logits, top_ids = torch.topk(logits, k, dim=-1)
        norm = torch.logsumexp(logits, dim=-1, keepdim=True)
        top_logprobs = top_logits - norm
        # Batched ops, not tiny ops per row (docs/benchmarks-history.md, "A step's per-row
        # figures in batched ops").
        rows = Rows(
            ids=top_ids.tolist(),
            logprobs=top_logprobs.tolist(),
            top1=top_logprobs[:, 0].exp().tolist(),
            entropy=_entropies(top_logprobs, [min(r.entropy_k or r.k, r.k) for r in reqs]),
            unique_max=(top_logits[:, 0] > top_logits[:, 1]).tolist(),
        )
        return [
            guarded(req.seq_id, self._summary, row, req, logits, rows, norm)
            for row, req in enumerate(reqs)
        ]

    def _summary(
        self,
        row: int,
        req: StepRequest,
        logits: torch.Tensor,
        rows: Rows,
        norm: torch.Tensor,
    ) -> StepResult:
        seq = self.seqs[req.seq_id]
        ids = rows.ids[row][: req.k]
        if req.temperature == 0 and rows.unique_max[row]:
            sampled = ids[0]  # a unique maximum: no second pass for argmax
        else:
            sampled = self._sample(logits[row], req, seq.generator)
        texts = seq.text.candidate_texts(ids)
        if sampled in ids:
            sampled_text = texts[ids.index(sampled)]
        else:
            sampled_text = seq.text.candidate_texts([sampled])[0]
        result = StepResult(
            seq_id=req.seq_id,
            top=Candidates(
                ids=ids,
                texts=texts,
                logprobs=rows.logprobs[row][: req.k],
                entropy=rows.entropy[row],
                top1_prob=rows.top1[row],
            ),
            sampled_id=sampled,
            sampled_text=sampled_text,
            mid_char=seq.text.mid_char,
            processed=0,
        )
        if req.logprobs is not None:  # asked for: the only per-step cost of logprobs
            result.sampled_logprob = float(logits[row, sampled] - norm[row, 0])
            wide = rows.ids[row][: req.logprobs]
            wide_lps = rows.logprobs[row][: req.logprobs]
            result.top_logprobs = list(zip(seq.text.candidate_texts(wide), wide_lps, strict=True))
        return result

    @staticmethod
    def _sample(logits: torch.Tensor, req: StepRequest, generator: torch.Generator | None) -> int:
        if req.temperature == 0:
            return int(torch.argmax(logits))  # as transformers' greedy search: first maximum
        # float64, max shifted to 0: any T > 0, however small, gives finite scores, never NaN.
        shifted = logits.double() - logits.max()
        probs = torch.softmax(shifted / req.temperature, dim=-1)
        if req.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < req.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=generator))
