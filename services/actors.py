"""Ray actors, one per role: thin shells over the runners, which tests use without Ray.

Ray restarts a dead actor (the engine replays its requests from their text); once its
`max_restarts` are used up, the supervisor spawns a new one. Calls are never retried: a step
is not idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import psutil
import ray
import torch

from junction.services.factory import build_runner
from junction.services.handles import RayHandle
from junction.services.protocol import METHODS, WIRE, Method, Worker, name_of
from junction.shared.config import JunctionConfig, ModelSpec

log = logging.getLogger(__name__)

# Raised by a call to an actor that died or is restarting: the caller may retry shortly.
WorkerUnavailable = ray.exceptions.RayActorError


class _Worker:
    """A Ray actor's shell over the runner built for `role`: one forwarding method per
    method of the worker protocol (added below, from `services.protocol`)."""

    role = ""

    def __init__(self, config: JunctionConfig) -> None:
        # Ray pins an actor to OMP_NUM_THREADS = num_cpus (1 by default); the roles take turns
        # within a tick, so each may use every core.
        threads = configured_roles(config)[self.role].threads or os.cpu_count() or 1
        torch.set_num_threads(threads)
        self.runner = build_runner(self.role, config, progress=False)


def _forwarder(method: Method) -> Callable[..., Any]:
    """The actor's method for one protocol method, in the wire's form where it has one."""
    name, wire = name_of(method), WIRE.get(method)

    def forward(self: _Worker, *args: Any) -> Any:
        if wire is None:
            return getattr(self.runner, name)(*args)
        [arg] = args
        return wire.reply(getattr(self.runner, name)(wire.receive(arg)))

    forward.__name__ = forward.__qualname__ = name
    return forward


for _method in METHODS:
    setattr(_Worker, name_of(_method), _forwarder(_method))


class BaseWorker(_Worker):
    role = "base"


class ValueWorker(_Worker):
    role = "value"


class GuidanceWorker(_Worker):
    role = "guidance"


WORKERS: dict[str, type[_Worker]] = {
    "base": BaseWorker,
    "value": ValueWorker,
    "guidance": GuidanceWorker,
}


def configured_roles(config: JunctionConfig) -> dict[str, ModelSpec]:
    specs = {"base": config.base, "guidance": config.guidance, "value": config.value}
    return {role: spec for role, spec in specs.items() if spec is not None}


# Whether this process started a local Ray (then it shuts it down); a joined one is left be.
_ray_lock = threading.Lock()
_started_local_ray = False


def connect_ray(config: JunctionConfig) -> None:
    """Join the cluster at RAY_ADDRESS, or start a local Ray sized for this config's actors."""
    global _started_local_ray
    with _ray_lock:
        if ray.is_initialized():
            return
        if os.environ.get("RAY_ADDRESS"):  # e.g. ray://head:10001 (Ray Client) or head:6379
            ray.init(address=os.environ["RAY_ADDRESS"])
            return
        # Ray nices its workers by default; here they are the service, not background work.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # Logical CPUs: every actor must fit even on a machine with fewer cores than roles.
        wanted = math.ceil(sum(spec.num_cpus for spec in configured_roles(config).values()))
        ray.init(num_cpus=max(os.cpu_count() or 1, wanted), include_dashboard=False)
        _started_local_ray = True


def shutdown_ray(grace: float = 5.0) -> None:
    """Shut down the local Ray this process started, leaving none of its processes behind:
    the raylet's agents and workers may outlive `ray.shutdown()`, so those still running after
    `grace` seconds are killed. Safe to call twice, and while `connect_ray` is starting Ray."""
    global _started_local_ray
    with _ray_lock:
        if not _started_local_ray:
            return
        _started_local_ray = False
        leftovers = _ray_descendants()  # before the raylet dies and its children are orphaned
        ray.shutdown()
        _, alive = psutil.wait_procs(leftovers, timeout=grace)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=grace)
        if alive:
            log.warning("killed %d Ray processes that outlived ray.shutdown()", len(alive))


def _ray_descendants() -> list[psutil.Process]:
    """Processes below this one that run Ray: the head's services, agents and workers."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            name, command = proc.name(), " ".join(proc.cmdline())
            # Ray names its agents and workers "ray::..."; its Python services run from the
            # ray package (dashboard, monitors); the head's binaries have their own names.
            ray_code = command.startswith("ray::") or "packages/ray/" in command
            if name in ("gcs_server", "raylet") or ray_code:
                found.append(proc)
    return found


def spawn(role: str, config: JunctionConfig) -> Any:
    """Create one role's actor; it loads its model in the background."""
    spec = configured_roles(config)[role]
    actor_class = ray.remote(WORKERS[role])
    return actor_class.options(
        num_cpus=spec.num_cpus,
        num_gpus=spec.num_gpus,
        max_restarts=spec.max_restarts,
        max_task_retries=0,
    ).remote(config)


async def start_workers(config: JunctionConfig) -> dict[str, RayHandle]:
    """Start an actor per configured role and wait until each has loaded its model. A value
    actor that fails to load is left out with a warning (the value policies say so)."""
    await asyncio.to_thread(connect_ray, config)
    handles = {
        role: RayHandle(spawn(role, config), partial(spawn, role, config))
        for role in configured_roles(config)
    }
    loaded = await asyncio.gather(
        *(handle.call(Worker.info) for handle in handles.values()), return_exceptions=True
    )
    failed = {
        role: out
        for role, out in zip(handles, loaded, strict=True)
        if isinstance(out, BaseException)
    }
    if "value" in failed and len(failed) == 1:
        log.warning("value worker left out (sia and dense are off): %s", cause(failed["value"]))
        stop_workers({"value": handles.pop("value")})
    elif failed:
        stop_workers(handles)
        role, error = next(iter(failed.items()))
        raise RuntimeError(f"{role} worker failed to start: {cause(error)}") from None
    return handles


def cause(error: BaseException) -> str:
    """The root cause of an actor's failure in one line: Ray's error text carries the remote
    traceback (paths, pids, actor ids); its last line is the exception that started it."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def stop_workers(handles: dict[str, Any]) -> None:
    """Kill the actors behind these handles (their models and caches go with them)."""
    for handle in handles.values():
        actor = getattr(handle, "actor", None)
        if actor is not None:
            with contextlib.suppress(Exception):  # already dead, or Ray already shut down
                ray.kill(actor, no_restart=True)


def shutdown_workers(handles: dict[str, Any]) -> None:
    """The gateway's exit: kill its actors, then the local Ray it started (if it started one)."""
    if ray.is_initialized():
        stop_workers(handles)
    shutdown_ray()
