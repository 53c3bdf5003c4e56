"""What the engine reports as it goes: every committed step, every finished request, every
worker call and every admission's wait (the gateway's metrics implement it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from junction.gateway.sequence import Sequence
    from junction.shared.types import GenerationResult, TokenEvent


class Observer(Protocol):
    def on_token(self, seq: Sequence, event: TokenEvent) -> None: ...
    def on_finish(self, seq: Sequence, result: GenerationResult) -> None: ...
    def on_actor_call(self, role: str, seconds: float) -> None: ...
    def on_wait(self, seconds: float) -> None: ...


class NullObserver:
    def on_token(self, seq: Sequence, event: TokenEvent) -> None:
        pass

    def on_finish(self, seq: Sequence, result: GenerationResult) -> None:
        pass

    def on_actor_call(self, role: str, seconds: float) -> None:
        pass

    def on_wait(self, seconds: float) -> None:
        pass
