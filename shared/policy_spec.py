"""Policies written on a command line: `NAME[:FIELD=VALUE,FIELD=VALUE...]`.

`sia:target_ratio=0.2`, `blendin:tau=0.3,lam=0.2`, `dense:beta=5,value_temperature=0`.
NAME is any of `junction.shared.config.POLICIES` and FIELD any field of `PolicyConfig`, so policies
and options added there are accepted here without change; values are converted by the
field's declared type and then checked by `PolicyConfig` itself.
"""

from __future__ import annotations

from dataclasses import MISSING, fields

from junction.shared.config import POLICIES, PolicyConfig


def _convert(name: str, kind: str, text: str) -> object:
    """A value for a field declared as `kind` (a type annotation string)."""
    if text.lower() in ("none", "null") and "None" in kind:
        return None
    if "bool" in kind:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{name}: expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    try:
        if "int" in kind and "float" not in kind:
            return int(text)
        if "float" in kind:
            return float(text)
    except ValueError:
        raise ValueError(f"{name}: expected a number, got {text!r}") from None
    return text


def policy_from_spec(spec: str) -> PolicyConfig:
    """The PolicyConfig a spec names; errors name the policy or field at fault."""
    name, _, options = spec.strip().partition(":")
    if name not in POLICIES:
        raise ValueError(f"policy: {name!r} is not one of {', '.join(POLICIES)}")
    types = {f.name: str(f.type) for f in fields(PolicyConfig) if f.name != "policy"}
    given: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in options.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"policy {spec!r}: options are FIELD=VALUE, got {part!r}")
        if key not in types:
            raise ValueError(f"{key}: not an option of a policy (one of {', '.join(types)})")
        given[key] = _convert(key, types[key], value.strip())
    return PolicyConfig(policy=name, **given)


def policy_options(policy: PolicyConfig) -> dict[str, object]:
    """The fields that differ from their defaults, plus the policy's name (for an API body)."""
    out: dict[str, object] = {"policy": policy.policy}
    for f in fields(PolicyConfig):
        default = f.default if f.default is not MISSING else None
        value = getattr(policy, f.name)
        if f.name != "policy" and value != default:
            out[f.name] = value
    return out
