"""The one place that turns a role and a config into a runner (in-process or inside an actor)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from junction.services.lm_runner import LMRunner
from junction.services.value_runner import ValueRunner
from junction.shared.config import JunctionConfig, ModelSpec
from junction.shared.models import load_model
from junction.shared.sources import DEFAULT_VALUE_DIR, check_adapter, check_source

ROLES = ("base", "value", "guidance")


def build_runner(role: str, config: JunctionConfig, progress: bool = True) -> Any:
    """base and guidance are LM runners (plain text vs chat template); value scores candidates."""
    if role == "base":
        return LMRunner(load_model("base", config.base, progress=progress), "base", chat=False)
    if role == "guidance":
        loaded = load_model("guidance", config.guidance, progress=progress)
        return LMRunner(loaded, "guidance", chat=True)
    if role == "value":
        if config.value is None:
            raise ValueError("value: no value model configured")
        spec = config.value
        adapter = _adapter_dir(spec)
        # The value model is an adapter on the base backbone, placed where the value role asks.
        backbone = replace(config.base, device=spec.device, dtype=spec.dtype)
        return ValueRunner.from_paths(backbone, adapter)
    raise ValueError(f"role must be one of {', '.join(ROLES)}")


def _adapter_dir(spec: ModelSpec) -> Path | None:
    """The value role's adapter directory; None = the shipped default."""
    return None if spec.source == "default" else Path(spec.source)


def check_sources(config: JunctionConfig, roles: Iterable[str]) -> None:
    """Raise on the first role whose model source names nothing loadable, before any model
    loads: a typo in the last role should not wait for the first role's model to load."""
    for role in roles:
        if role == "value":
            if config.value is None:
                raise ValueError("value: no value model configured")
            check_adapter(_adapter_dir(config.value) or DEFAULT_VALUE_DIR)
            check_source("value", config.base.source)  # the value model's backbone
        else:
            check_source(role, getattr(config, role).source)
