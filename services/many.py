"""Several opens or closes in one call: what a runner does for the requests of one turn.

The engine admits the requests that arrive in one turn of its loop with one `open_many` per
worker, and frees the requests a tick ended with one `close_many`, because a call to a Ray
actor costs about the same whatever it carries (~0.3 ms of the actor's CPU and ~0.5 ms of
the gateway's, timed): 16 requests arriving together took 16 opens and 16 closes.
"""

from __future__ import annotations

from typing import Any


class OpensAndCloses:
    """`open_many` and `close_many` over the `open` and `close` of the runner that mixes
    this in (`LMRunner`, `ValueRunner`)."""

    open: Any
    close: Any

    def open_many(self, opens: list[tuple]) -> list[int | Exception]:
        """Each open's prompt length in tokens, or what it raised, in order: one request
        that cannot open does not fail the others. What it raised comes back as a plain
        ValueError (a bad prompt: the client's to fix) or RuntimeError naming the type, so
        it crosses a process boundary whatever the exception was."""
        out: list[int | Exception] = []
        for args in opens:
            try:
                out.append(self.open(*args))
            except ValueError as exc:
                out.append(ValueError(str(exc)))
            except Exception as exc:  # noqa: BLE001 - returned in the request's place
                out.append(RuntimeError(f"{type(exc).__name__}: {exc}"))
        return out

    def close_many(self, seq_ids: list[str]) -> None:
        """Close several sequences: the engine frees all that a tick ended in one call."""
        for seq_id in seq_ids:
            self.close(seq_id)
