"""A causal LM serving many sequences: per-sequence KV caches, one batched step for all.

The base and guidance workers are this runner with different models and prompt styles. A
step returns, per sequence, only a compact top-k summary; full-vocabulary logits stay here.

Batching: sequences that each add the same number of tokens (one, for a model's own
tokens) are stepped as one right-aligned batch (see `services.kv`). While the same sequences
keep stepping together, the batched cache is reused as is (no copies beyond the model's own);
when membership changes, rows are sliced out as views and the new set is stacked once.
Sequences that add another count of tokens (text another model wrote) run on their own, and
new prompts in one left-padded prefill, so a forward never pays for padding inside a row.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from transformers import DynamicCache

from services.kv import checkpoint, rollback, slice_row, stack_rows
from services.many import OpensAndCloses
from shared.bridge import TokenText
from shared.models import LoadedModel
from shared.prompts import build_prompt_ids
from shared.steering import junction_kind, topk_entropy, word_finished
from shared.types import (
    EOS_TEXT,
    Candidates,
    Commit,
    Failure,
    ModelInfo,
    StepRequest,
    StepResult,
    WordRequest,
    WordResult,
    failure,
)

T = TypeVar("T")


@dataclass(slots=True)
class _Sequence:
    text: TokenText
    generator: torch.Generator | None
    pending: list[int] = field(default_factory=list)  # ids not yet run through the model
    cache: DynamicCache | None = None  # batch-1 cache while the sequence is outside the batch
    cached: int = 0  # tokens in the cache
    logits: torch.Tensor | None = None  # next-token logits after the last forward [vocab]


@dataclass(slots=True)
class _Batch:
    seq_ids: tuple[str, ...]
    cache: DynamicCache
    mask: torch.Tensor  # [rows, columns] 2D attention mask
    logits: torch.Tensor | None = None  # [rows, vocab] from the last batched forward


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


class LMRunner(OpensAndCloses):
    def __init__(self, loaded: LoadedModel, role: str, chat: bool) -> None:
        self.loaded = loaded
        self.role = role
        self.chat = chat  # the guidance role gets its chat template, the base plain text
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.family = loaded.family
        self.device = loaded.device
        self.seqs: dict[str, _Sequence] = {}
        self.batch: _Batch | None = None

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
        self.seqs[seq_id] = _Sequence(text=text, generator=generator, pending=list(ids))
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

        A request with `ahead` may take several steps in this one call (see `_keeps_going`):
        the steps before the one returned come back in its `earlier`, in order.
        A sequence that cannot be served (its commits, its forward or its sampling fail) gets a
        Failure in its place; the others are served as if it had not been there.
        """
        started = time.perf_counter()
        by_id = {r.seq_id: r for r in reqs}
        processed: dict[str, int] = {}

        def apply(seq_id: str) -> None:
            processed[seq_id] = self._apply(seq_id, by_id[seq_id].append)

        failed = _each(list(by_id), apply)
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
        """Run ahead past this step? Then its sampled token is committed here, as the gateway
        would commit it: the step is no junction, not the end of text, and within the caps
        (`steps` taken before this one, `seconds` since the call began)."""
        ahead = req.ahead
        if ahead is None or steps + 1 >= ahead.steps or seconds >= ahead.seconds:
            return False
        if step.sampled_text == EOS_TEXT:
            return False
        top = step.top
        if not step.mid_char and junction_kind(
            ahead.policy, top.entropy, top.top1_prob, ahead.threshold, ahead.tau
        ):
            return False
        seq = self.seqs[req.seq_id]
        seq.text.push(step.sampled_id)
        seq.pending.append(step.sampled_id)
        return True

    @torch.inference_mode()
    def write_words(self, reqs: list[WordRequest]) -> list[WordResult | Failure]:
        """Nudging: each sequence's next word, written greedily and kept in its own text.

        The writer stops where its next word would start (that token is not written, only
        reported as `next_text`) or at its end of text, which is reported as `eos` also
        after a word: the word is then the last of the answer. As in `step`, a sequence that
        fails gets a Failure and the others write on.
        """
        appends = {r.seq_id: r.append for r in reqs}
        words = {r.seq_id: _Word(r.max_tokens) for r in reqs}
        failed = _each(list(words), lambda s: self._apply(s, appends[s]))
        writing = [s for s in words if s not in failed]
        while writing:
            for seq_id in writing:
                words[seq_id].processed += len(self.seqs[seq_id].pending)
            failed |= self._forward(writing)
            writing = [s for s in writing if s not in failed]
            more = {s: _guarded(s, self._write_next, s, words[s]) for s in writing}
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
    def _logits_of(self, seq_ids: list[str]) -> torch.Tensor:
        """[rows, vocab] next-token logits; the batched forward's own tensor when it matches."""
        batch = self.batch
        if batch is not None and batch.logits is not None and tuple(seq_ids) == batch.seq_ids:
            return batch.logits  # the steady state: no copy of a vocabulary-wide tensor
        return torch.stack([self.seqs[s].logits for s in seq_ids])

    def _apply(self, seq_id: str, commits: list[Commit]) -> int:
        """Append commits to a sequence; returns how many tokens are now pending."""
        seq = self._seq(seq_id)
        for commit in commits:
            seq.pending.extend(seq.text.apply(commit))
        return len(seq.pending)

    def _seq(self, seq_id: str) -> _Sequence:
        try:
            return self.seqs[seq_id]
        except KeyError:
            raise KeyError(f"sequence {seq_id!r} is not open on the {self.role} runner") from None

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
        # One batched forward for the sequences that add the same number of tokens (one, for
        # a model's own tokens; often more for text another model wrote, which every request
        # of a guidance model receives at each junction): the most common count, so rows are
        # never padded inside the batch (sliding-window layers count columns). The rest run
        # alone.
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
        return _each(alone, self._forward_alone)

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
        self.batch = _Batch(tuple(seq_ids), cache, mask)

    def _unbatch(self) -> None:
        """Hand every row of the batch back to its sequence as a batch-1 cache (views)."""
        if self.batch is None:
            return
        for row, seq_id in enumerate(self.batch.seq_ids):
            seq = self.seqs.get(seq_id)
            if seq is not None:
                seq.cache = slice_row(self.batch.cache, row, seq.cached)
        self.batch = None

    def _summarize(
        self, logits: torch.Tensor, reqs: list[StepRequest]
    ) -> list[StepResult | Failure]:
        """Top-k, entropy, top-1 probability and the runner's own choice, for each row."""
        widest = max(max(r.k, r.logprobs or 0) for r in reqs)
        k = min(max(widest, 2), logits.shape[-1])
        # Top-k of the raw logits, normalized by one logsumexp: the full-vocabulary
        # log-softmax is never materialized.
        top_logits, top_ids = torch.topk(logits, k, dim=-1)
        norm = torch.logsumexp(logits, dim=-1, keepdim=True)
        top_logprobs = top_logits - norm
        # The rows' small per-step figures in a few batched ops and one conversion to Python
        # each, not a dozen tiny tensor ops per row (half a runner's step on tiny models).
        rows = Rows(
            ids=top_ids.tolist(),
            logprobs=top_logprobs.tolist(),
            top1=top_logprobs[:, 0].exp().tolist(),
            entropy=_entropies(top_logprobs, [min(r.entropy_k or r.k, r.k) for r in reqs]),
            unique_max=(top_logits[:, 0] > top_logits[:, 1]).tolist(),
        )
        return [
            _guarded(req.seq_id, self._summary, row, req, logits, rows, norm)
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
        # In float64 and shifted so the largest is 0 before dividing: any T > 0, however small
        # (down to 5e-324), gives finite scores that tend to greedy, never inf - inf = NaN.
        shifted = logits.double() - logits.max()
        probs = torch.softmax(shifted / req.temperature, dim=-1)
        if req.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < req.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=generator))



def _guarded(seq_id: str, run: Callable[..., T], *args: Any) -> T | Failure:
    """`run(*args)` for one sequence; its Failure if it raised (its batch-mates carry on)."""
    try:
        return run(*args)
    except Exception as exc:  # noqa: BLE001 - one sequence's error is its own result
        return failure(seq_id, exc)


def _each(seq_ids: list[str], run: Callable[[str], Any]) -> dict[str, Failure]:
    """Run `run` for each sequence; the Failures of those that raised."""
    outs = {seq_id: _guarded(seq_id, run, seq_id) for seq_id in seq_ids}
    return {seq_id: out for seq_id, out in outs.items() if isinstance(out, Failure)}
