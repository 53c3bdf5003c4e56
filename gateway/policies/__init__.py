"""Junction policies: one module each, looked up by name from one registry (`REGISTRY`).

A policy says, for one request, which roles it needs, whether a step is a junction, what a
junction consults, and what the step commits; the engine calls these hooks for every
request and holds no per-policy branch. `hybrid` is composed from SIA's and BlendIn's parts.
A new policy is one module: a `Policy` subclass under `@register`, imported below.
"""

from junction.gateway.policies import (  # noqa: F401 - each module registers its policies
    blendin,
    guidance,
    hybrid,
    nudging,
    plain,
    sia,
)
from junction.gateway.policies.base import (
    REGISTRY,
    Ask,
    Choice,
    Policies,
    Policy,
    junction_kind,
    policy_class,
    register,
)

__all__ = [
    "REGISTRY", "Ask", "Choice", "Policies", "Policy", "junction_kind", "policy_class",
    "register",
]
