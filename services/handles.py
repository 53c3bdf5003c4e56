"""One awaitable interface over a worker, whether it lives in this process or in a Ray actor."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from junction.services.protocol import WIRE, Method, Worker, name_of


class WorkerRestarted(Exception):
    """A worker lost its sequences (its process died and came back, or is coming back)."""


class Handle(Protocol):
    # Whether calls to two such workers may overlap: in-process runners share the GIL
    # (docs/benchmarks-history.md, "Overlapped guidance").
    parallel: bool

    def call(self, method: Method, *args: Any) -> Awaitable[Any]:
        """Send `method` (a `Worker` method) now, not when first awaited, and return what to
        await for its answer (so a step leaves before the streams write their events)."""
        ...

    def unavailable(self, exc: BaseException) -> bool:
        """Did this call fail because the worker lost its state? Then the request can replay."""
        ...

    def dead(self, exc: BaseException) -> bool:
        """Did this call fail because the worker is gone for good (it will not restart)?"""
        ...

    async def renew(self) -> None:
        """Replace the worker with a new one and wait until it has loaded its model."""
        ...


class LocalHandle:
    """Runs a plain runner's methods on its own worker thread, one call at a time (always the
    same thread: OpenMP's idle teams of other threads would spin against the working one)."""

    def __init__(self, runner: Any, parallel: bool = False) -> None:
        self.runner = runner
        self.parallel = parallel
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runner")

    def call(self, method: Method, *args: Any) -> Awaitable[Any]:
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._thread, getattr(self.runner, name_of(method)), *args)

    def unavailable(self, exc: BaseException) -> bool:
        return isinstance(exc, WorkerRestarted)

    def dead(self, exc: BaseException) -> bool:
        return False  # it lives in this process

    async def renew(self) -> None:
        raise NotImplementedError("an in-process worker cannot be replaced")


class RayHandle:
    """Calls the same methods on a Ray actor that wraps a runner; `spawn` makes a new actor."""

    parallel = True  # each actor is its own process

    def __init__(self, actor: Any, spawn: Callable[[], Any] | None = None) -> None:
        self.actor = actor
        self._spawn = spawn

    def call(self, method: Method, *args: Any) -> Awaitable[Any]:
        remote = getattr(self.actor, name_of(method)).remote
        wire = WIRE.get(method)
        if wire is None:
            return remote(*args)  # an ObjectRef: awaitable
        [arg] = args
        return _answered(remote(wire.send(arg)), wire.answer)

    def unavailable(self, exc: BaseException) -> bool:
        from ray.exceptions import ActorUnavailableError, RayActorError

        return isinstance(exc, RayActorError | ActorUnavailableError | WorkerRestarted)

    def dead(self, exc: BaseException) -> bool:
        from ray.exceptions import ActorDiedError

        # ActorUnavailableError while an actor restarts; ActorDiedError once it will not.
        return isinstance(exc, ActorDiedError)

    async def renew(self) -> None:
        if self._spawn is None:
            raise NotImplementedError("this worker was not started by the gateway")
        import ray

        with contextlib.suppress(Exception):  # whatever is left of it: never two at once
            ray.kill(self.actor, no_restart=True)
        self.actor = self._spawn()
        await self.call(Worker.info)  # returns once the new actor has loaded its model


async def _answered(answer: Awaitable[Any], unpack: Callable[[Any], Any]) -> Any:
    return unpack(await answer)
