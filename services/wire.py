"""The step call's form over Ray: its requests and results as plain tuples and lists.

cloudpickle pays a per-object cost in Python for every dataclass, and a step call that ran
ahead carries hundreds of them (BENCHMARKS.md, "ray_calls"). Each function lists every field
of its class; `tests/test_wire.py` fails when a field is added to a class and not here.
"""

from __future__ import annotations

from typing import Any

from junction.shared.types import Candidates, Commit, Failure, RunAhead, StepRequest, StepResult


def pack_requests(reqs: list[StepRequest]) -> list[tuple]:
    return [
        (
            r.seq_id, r.k, r.temperature, r.top_p,
            [(c.text, c.ids, c.family) for c in r.append],
            r.logprobs, r.entropy_k,
            None if r.ahead is None else (
                r.ahead.steps, r.ahead.threshold, r.ahead.tau, r.ahead.seconds
            ),
        )
        for r in reqs
    ]


def unpack_requests(rows: list[tuple]) -> list[StepRequest]:
    return [
        StepRequest(
            seq_id, k, temperature, top_p, [Commit(*c) for c in append], logprobs, entropy_k,
            None if ahead is None else RunAhead(*ahead),
        )
        for seq_id, k, temperature, top_p, append, logprobs, entropy_k, ahead in rows
    ]


def pack_results(results: list[StepResult | Failure]) -> list[Any]:
    """A failure stays an object (rare, and its own class tells it apart)."""
    return [r if isinstance(r, Failure) else _pack_result(r) for r in results]


def unpack_results(rows: list[Any]) -> list[StepResult | Failure]:
    return [r if isinstance(r, Failure) else _unpack_result(r) for r in rows]


def _pack_result(r: StepResult) -> tuple:
    top = r.top
    return (
        r.seq_id, (top.ids, top.texts, top.logprobs, top.entropy, top.top1_prob),
        r.sampled_id, r.sampled_text, r.mid_char, r.processed, r.sampled_logprob,
        r.top_logprobs, [_pack_result(e) for e in r.earlier],
    )


def _unpack_result(row: tuple) -> StepResult:
    seq_id, top, sampled_id, sampled_text, mid_char, processed, logprob, top_lps, earlier = row
    return StepResult(
        seq_id, Candidates(*top), sampled_id, sampled_text, mid_char, processed, logprob,
        top_lps, [_unpack_result(e) for e in earlier],
    )
