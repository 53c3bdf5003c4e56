"""An engine over in-process runners: the CLI's way to run the decode loop without Ray."""

from __future__ import annotations

from gateway.engine import Engine
from services.factory import build_runner
from services.handles import LocalHandle
from shared.config import JunctionConfig


def local_engine(config: JunctionConfig, roles: tuple[str, ...], progress: bool = True) -> Engine:
    """An engine over in-process runners for the given roles (models load here)."""
    return Engine(
        {role: LocalHandle(build_runner(role, config, progress)) for role in roles},
        config.limits,
    )
