"""`guidance`: the aligned guidance model alone; every step is its own (the other end of
the sweep from `base`)."""

from __future__ import annotations

from junction.gateway.policies.base import Policy, register


@register
class Guidance(Policy):
    name = "guidance"
    driver = "guidance"

    @staticmethod
    def test(entropy: float, top1_prob: float, threshold: float, tau: float) -> str | None:
        return "guidance"
