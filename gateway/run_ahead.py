"""Run-ahead: between junctions the base decodes several steps in one call.

A step without a junction commits the base's own token, and the junction test is a pure
function of the step's summary, so the runner applies it itself (`run_ahead_stops`) and one
round trip carries every step up to the next junction. The engine then commits them one by
one as separate ticks would (`Engine._ran_ahead`); steps past a stop are dropped, and closing
the request frees the runner's copy, so nothing needs rolling back. Seeded outputs are equal
either way: the same generator draws in the same order over the same batches. The first step
comes alone, for the time to first token. (Ray's Compiled Graphs cut a call's cost, not the
number of calls; BENCHMARKS.md.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from junction.shared.config import Limits
from junction.shared.types import RunAhead

if TYPE_CHECKING:
    from junction.gateway.sequence import Sequence


def run_ahead(
    seq: Sequence, limits: Limits, threshold: float | None = None, tau: float | None = None
) -> RunAhead | None:
    """How far this request's base may run ahead in its next call; None = one step.

    Each policy asks for it with the settings of its junction test that stay fixed during
    the call (`threshold`: SIA's H; `tau`: the confidence threshold; neither: no junction).
    The call takes at most 1 + `limits.run_ahead` steps, and starts none after
    `run_ahead_ms`.
    """
    if limits.run_ahead == 0 or seq.req.driver != "base":
        return None
    if seq.steps == 0:
        return None  # the first token streams as soon as it exists: time to first token
    steps = min(1 + limits.run_ahead, seq.req.sampling.max_tokens - seq.stopping.tokens)
    if steps <= 1:
        return None
    return RunAhead(steps, threshold, tau, limits.run_ahead_ms / 1000)
