"""Run-ahead: the base decodes several steps in one call until its next junction.

Between junctions the gateway only commits the base's own sampled token, and the junction
test is a pure function of the step's summary (`shared.steering.JUNCTION_TESTS`). So the
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
calls (measured with `scripts/ray_calls.py`: 0.5-0.9 ms saved of a 1.5-1.7 ms call, where
run-ahead with the default cap removes 8 calls in 9); they pin an actor to its graph (the
open/close/score calls and the supervisor's restart-and-replay would each need their own);
and run-ahead works the same in process and over Ray (BENCHMARKS.md, "Per-token overhead").
"""

from __future__ import annotations

from gateway.sequence import Sequence
from shared.config import VALUE_POLICIES, Limits
from shared.types import RunAhead


def run_ahead(seq: Sequence, threshold: float | None, limits: Limits) -> RunAhead | None:
    """How far this request's base may run ahead in its next call; None = one step.

    `threshold` is SIA's H when it stays fixed during the call (the request's own or a
    calibrated one); None when it is the server-wide running quantile, which moves with
    every step of every request, so the runner could not apply the gateway's test. The call
    takes at most 1 + `limits.run_ahead` steps, and starts none after `run_ahead_ms`.
    """
    policy = seq.policy
    if limits.run_ahead == 0 or seq.req.driver != "base" or threshold is None:
        return None
    if seq.steps == 0:
        return None  # the first token streams as soon as it exists: time to first token
    if policy.policy in VALUE_POLICIES and policy.sia_decode != "request":
        return None  # the gateway draws from the top-k between junctions, not the runner
    steps = min(1 + limits.run_ahead, seq.req.sampling.max_tokens - seq.stopping.tokens)
    if steps <= 1:
        return None
    return RunAhead(steps, policy.policy, threshold, policy.tau, limits.run_ahead_ms / 1000)
