"""Workers that fail: replaying their requests, declaring roles down, starting new workers.

Ray restarts a worker whose process died (the role's `max_restarts` times). The requests it
held are *lost* on that role: they are re-opened on it and replay their text (the engine
keeps each request's commits), waiting at most `recovery_seconds`, then failing with a
clear error. A role is *down* when its worker is dead for good (its restarts are used up)
or has not answered any call for `recovery_seconds`: then no call goes to it, new requests
that need it are refused (503), /ready reports it, and a new worker is started in the
background, retried with backoff until one loads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from junction.gateway.sequence import Sequence
from junction.services.handles import Handle
from junction.services.protocol import Worker
from junction.shared.types import ModelInfo, one_line

log = logging.getLogger(__name__)

MAX_RECOVERIES = 3  # times one request may be replayed onto a restarted worker
RETRY_SECONDS = 0.2  # between attempts to re-open a request on a restarting worker
FIRST_RETRY_SECONDS = 1.0  # between attempts to start a new worker, doubling up to the last
LAST_RETRY_SECONDS = 60.0

Call = Callable[..., Awaitable[Any]]  # (role, method, *args): the engine's worker call


class Supervisor:
    def __init__(
        self, workers: dict[str, Handle], infos: dict[str, ModelInfo], recovery_seconds: float
    ) -> None:
        self.workers = workers
        self.infos = infos  # refreshed when a new worker has loaded
        self.recovery_seconds = recovery_seconds
        self.down: dict[str, str] = {}  # role -> why it is down
        self._silent_since: dict[str, float] = {}  # role -> first unanswered call since
        self._renewals: dict[str, asyncio.Task] = {}
        self._retry_at: dict[str, float] = {}  # role -> next re-open attempt

    # ----------------------------------------------------------------- requests
    def lost(self, role: str, seqs: list[Sequence], exc: BaseException) -> None:
        """A worker call failed: replay its requests if the worker restarted, else fail them."""
        for seq in seqs:
            if self.workers[role].unavailable(exc) and seq.recoveries < MAX_RECOVERIES:
                seq.recoveries += 1
                seq.lost.add(role)
                seq.lost_since = seq.lost_since or time.monotonic()
            else:
                seq.finish("error", error=f"{role} worker failed: {one_line(exc)}")

    async def recover(self, live: Iterable[Sequence], call: Call) -> None:
        """Re-open requests on workers that lost them; their next call replays every commit.

        The engine holds each request's whole text as a commit log, so a restarted worker
        can be brought back in step: nothing the client already received is lost or changed.
        """
        now = time.monotonic()
        for seq, role in [(s, role) for s in live for role in sorted(s.lost)]:
            waited = now - (seq.lost_since or now)
            if waited > self.recovery_seconds:
                why = self.down.get(role, "it did not come back")
                seq.finish("error", error=f"{role} worker failed: gave up after {waited:.0f} s "
                           f"({why})")
                continue
            if role in self.down or now < self._retry_at.get(role, 0.0):
                continue  # a new worker is starting, or the restarting one was just tried
            req = seq.req
            try:
                await call(role, Worker.close, seq.id)
                await call(role, Worker.open, seq.id, req.prompt, req.messages, seq.seed)
            except Exception as exc:  # noqa: BLE001 - still restarting, or gone for good
                if not self.workers[role].unavailable(exc):
                    seq.finish("error", error=f"{role} worker failed: {one_line(exc)}")
                self._retry_at[role] = time.monotonic() + RETRY_SECONDS
                continue
            seq.synced[role] = 0
            seq.lost.discard(role)
            if not seq.lost:
                seq.lost_since = None

    # ----------------------------------------------------------------- roles

    def answered(self, role: str) -> None:
        self._silent_since.pop(role, None)

    def failed(self, role: str, exc: BaseException) -> None:
        """A call to `role` raised: a dead worker, or one silent for too long, takes it down."""
        handle = self.workers[role]
        if role in self.down or not handle.unavailable(exc):
            return
        since = self._silent_since.setdefault(role, time.monotonic())
        if handle.dead(exc):
            reason = "its worker died and cannot restart"
        elif time.monotonic() - since > self.recovery_seconds:
            reason = f"its worker has not answered for {self.recovery_seconds:g} s"
        else:
            return  # restarting: the engine replays its requests when it answers again
        self.down[role] = f"{reason}; starting a new one"
        log.error("%s worker is down (%s): %s", role, reason, one_line(exc))
        self._renewals[role] = asyncio.create_task(self._renew(role))

    async def _renew(self, role: str) -> None:
        """Start a new worker for `role` until one loads; then the role is up again."""
        delay = FIRST_RETRY_SECONDS
        while True:
            try:
                await self.workers[role].renew()
                self.infos[role] = await self.workers[role].call(Worker.info)
            except NotImplementedError as exc:  # an in-process worker cannot be replaced
                self.down[role] = f"{self.down[role]}: {exc}"
                return
            except Exception as exc:  # noqa: BLE001 - keep trying: the role stays down meanwhile
                log.exception("a new %s worker failed to start; retrying in %g s", role, delay)
                self.down[role] = f"a new worker failed to start ({one_line(exc)}); retrying"
                await asyncio.sleep(delay)
                delay = min(2 * delay, LAST_RETRY_SECONDS)
                continue
            self._silent_since.pop(role, None)
            del self.down[role]
            self._renewals.pop(role, None)
            log.info("%s worker is back: a new worker has loaded its model", role)
            return

    async def close(self) -> None:
        for task in self._renewals.values():
            task.cancel()
        await asyncio.gather(*self._renewals.values(), return_exceptions=True)
