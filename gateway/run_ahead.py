"""Run-ahead: the base decodes several steps in one call until its next junction.

Between junctions the gateway only commits the base's own sampled token, and the junction
test is a pure function of the step's summary (`shared.steering.run_ahead_stops`). So the
base runner can apply the test itself and keep stepping, and one round trip carries every
step up to the next junction, the end of text, max_tokens or the `limits.run_ahead` cap;
`base` has no junctions and runs ahead the most. A request's first step comes alone, so
the time to its first token does not wait for a burst. The gateway then commits the steps one by
one as if each had come in its own tick (`Engine._ran_ahead`): each gets its own event,
stop strings and max_tokens are checked per step, and steps past a stop (or of a cancelled
request) are dropped; the request then ends, and closing it frees the runner's copy of them
(its KV cache and text), so nothing needs rolling back. Sampling uses the runner's
per-request generator in the same order either way, and a call's rounds batch the same
sequences as the same steps taken one call at a time would, so seeded outputs are equal.

Why not Ray's Compiled Graphs: they cut the cost of each actor call, not the number of
calls, and pin an actor to its graph, while run-ahead works the same in process and over
Ray (BENCHMARKS.md; `scripts/ray_calls.py` measures both).
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
