"""`base`: the base model alone, never a junction; it runs ahead the most."""

from __future__ import annotations

from typing import TYPE_CHECKING

from junction.gateway.policies.base import Policy, register
from junction.gateway.run_ahead import run_ahead
from junction.shared.config import Limits
from junction.shared.types import RunAhead

if TYPE_CHECKING:
    from junction.gateway.sequence import Sequence


@register
class Base(Policy):
    name = "base"

    def run_ahead(self, seq: Sequence, limits: Limits) -> RunAhead | None:
        return run_ahead(seq, limits)
