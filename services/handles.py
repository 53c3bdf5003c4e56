"""One awaitable interface over a worker, whether it lives in this process or in a Ray actor."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol


class WorkerRestarted(Exception):
    """A worker lost its sequences (its process died and came back, or is coming back)."""


class Handle(Protocol):
    async def call(self, method: str, *args: Any) -> Any: ...

    def unavailable(self, exc: BaseException) -> bool:
        """Did this call fail because the worker lost its state? Then the request can replay."""
        ...


class LocalHandle:
    """Runs a plain runner's methods on its own worker thread, one call at a time.

    Always the same thread: OpenMP keeps a thread team per calling thread, so hopping between
    pool threads would leave idle teams spinning against the working one.
    """

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runner")

    async def call(self, method: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, getattr(self.runner, method), *args)

    def unavailable(self, exc: BaseException) -> bool:
        return isinstance(exc, WorkerRestarted)


class RayHandle:
    """Calls the same methods on a Ray actor that wraps a runner."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self.actor, method).remote(*args)

    def unavailable(self, exc: BaseException) -> bool:
        from ray.exceptions import ActorUnavailableError, RayActorError

        return isinstance(exc, RayActorError | ActorUnavailableError | WorkerRestarted)
