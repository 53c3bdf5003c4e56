"""The worker protocol: every method the engine calls on a model worker, declared once.

The engine names a method by its function here (`handle.call(Worker.step, reqs)`), never by
a string; `WIRE` says which methods cross a process boundary in a compact form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from junction.services.wire import pack_requests, pack_results, unpack_requests, unpack_results
from junction.shared.types import (
    Failure,
    ModelInfo,
    ScoreRequest,
    ScoreResult,
    StepRequest,
    StepResult,
    WordRequest,
    WordResult,
)


class Worker:
    """A model worker as the engine sees it: a plain object, in process or inside an actor."""

    def info(self) -> ModelInfo:
        """What the worker serves (name, tokenizer family, context); answers once loaded."""
        raise NotImplementedError

    def open(self, seq_id: str, prompt: str | None = None, messages: list[dict] | None = None,
             seed: int | None = None) -> int:
        """Register a sequence; returns its prompt length in the worker's tokens."""
        raise NotImplementedError

    def open_many(self, opens: list[tuple]) -> list[int | Exception]:
        """Each open's prompt length, or what it raised, in order (one bad request does not
        fail the others): a ValueError (the client's to fix) or a RuntimeError naming the
        type, so it crosses a process boundary whatever the exception was."""
        out: list[int | Exception] = []
        for args in opens:
            try:
                out.append(self.open(*args))
            except ValueError as exc:
                out.append(ValueError(str(exc)))
            except Exception as exc:  # noqa: BLE001 - returned in the request's place
                out.append(RuntimeError(f"{type(exc).__name__}: {exc}"))
        return out

    def count_prompt(self, prompt: str | None = None, messages: list[dict] | None = None) -> int:
        raise NotImplementedError

    def close(self, seq_id: str) -> None:
        """Free a sequence's state; closing an unknown sequence is a no-op."""
        raise NotImplementedError

    def close_many(self, seq_ids: list[str]) -> None:
        """Close several sequences in one call."""
        for seq_id in seq_ids:
            self.close(seq_id)

    def live(self) -> int:
        """How many sequences the worker holds."""
        raise NotImplementedError

    def step(self, reqs: list[StepRequest]) -> list[StepResult | Failure]:
        """One decode step (or a run-ahead burst) per request: compact top-k summaries."""
        raise NotImplementedError

    def write_words(self, reqs: list[WordRequest]) -> list[WordResult | Failure]:
        """Nudging: each request's next word, written by the guidance model."""
        raise NotImplementedError

    def score(self, reqs: list[ScoreRequest]) -> list[ScoreResult | Failure]:
        """SIA: the value of each candidate continuation."""
        raise NotImplementedError


Method = Callable[..., Any]
METHODS: dict[Method, str] = {
    member: name for name, member in vars(Worker).items()
    if callable(member) and not name.startswith("_")
}


def name_of(method: Method) -> str:
    """The name a handle or actor dispatches on; only the protocol's own methods have one."""
    try:
        return METHODS[method]
    except KeyError:
        raise TypeError(f"{method!r} is not a method of the worker protocol") from None


@dataclass(frozen=True)
class Wire:
    """How a one-argument method crosses a process boundary (`services.wire`)."""

    send: Callable[[Any], Any]  # the engine's side: the argument as sent
    receive: Callable[[Any], Any]  # the actor's side: the argument as the runner takes it
    reply: Callable[[Any], Any]  # the actor's side: the answer as sent back
    answer: Callable[[Any], Any]  # the engine's side: the answer as the engine takes it


# The hot call carries plain tuples both ways.
WIRE: dict[Method, Wire] = {
    Worker.step: Wire(pack_requests, unpack_requests, pack_results, unpack_results),
}
