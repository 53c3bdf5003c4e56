"""In-process runners behind handles: the decode loop without Ray (CLI, tests, local app)."""

from __future__ import annotations

from collections.abc import Iterable

from junction.gateway.engine import Engine
from junction.services.factory import build_runner, check_sources
from junction.services.handles import Handle, LocalHandle
from junction.shared.config import JunctionConfig


def local_handles(
    config: JunctionConfig, roles: Iterable[str], progress: bool = True
) -> dict[str, Handle]:
    """In-process runners for these roles (their models load here), behind handles."""
    roles = tuple(roles)
    check_sources(config, roles)  # every role's source, before the first slow load
    return {role: LocalHandle(build_runner(role, config, progress)) for role in roles}


def local_engine(config: JunctionConfig, roles: tuple[str, ...], progress: bool = True) -> Engine:
    """An engine over in-process runners for the given roles."""
    return Engine(local_handles(config, roles, progress), config.limits)
