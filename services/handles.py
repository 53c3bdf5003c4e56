"""One awaitable interface over a worker, whether it lives in this process or in a Ray actor."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


class Handle(Protocol):
    async def call(self, method: str, *args: Any) -> Any: ...


class LocalHandle:
    """Runs a plain runner's methods in a worker thread, one call at a time."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self._lock = asyncio.Lock()

    async def call(self, method: str, *args: Any) -> Any:
        async with self._lock:
            return await asyncio.to_thread(getattr(self.runner, method), *args)


class RayHandle:
    """Calls the same methods on a Ray actor that wraps a runner."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self.actor, method).remote(*args)
