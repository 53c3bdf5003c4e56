"""The policy registry: every policy one module, looked up by name; a new one is one class."""

from __future__ import annotations

from typing import Any

import pytest

from junction.gateway.policies import REGISTRY, Ask, Choice, Policy, junction_kind, register
from junction.gateway.sequence import GenerationRequest
from junction.services.protocol import Worker
from junction.shared.config import POLICIES, PolicyConfig, SamplingParams
from junction.shared.types import EOS_TEXT, Commit, ScoreRequest, StepResult
from tests.gateway.test_engine import run, workers  # noqa: F401 - fixture

# (entropy, top-1 probability) against H = 1.0 and τ = 0.4
CALM, SPREAD, UNSURE, BOTH = (0.5, 0.9), (1.5, 0.5), (0.8, 0.3), (2.0, 0.2)


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("base", [None, None, None, None]),
        ("sia", [None, "value", None, "value"]),
        ("dense", ["value"] * 4),
        ("blendin", [None, None, "guidance", "guidance"]),
        ("nudging", [None, None, "guidance", "guidance"]),
        ("hybrid", [None, "value", "guidance", "guidance"]),
        ("guidance", ["guidance"] * 4),
    ],
)
def test_junction_kind_per_policy(policy: str, expected: list[str | None]) -> None:
    steps = [CALM, SPREAD, UNSURE, BOTH]
    assert [junction_kind(policy, h, p, 1.0, 0.4) for h, p in steps] == expected


@pytest.mark.parametrize(
    "policy, roles",
    [
        ("base", ("base",)),
        ("sia", ("base", "value")),
        ("dense", ("base", "value")),
        ("blendin", ("base", "guidance")),
        ("nudging", ("base", "guidance")),
        ("hybrid", ("base", "value", "guidance")),
        ("guidance", ("guidance",)),
    ],
)
def test_each_policy_opens_on_its_roles_driver_first(policy: str, roles: tuple) -> None:
    assert GenerationRequest(prompt="x", policy=PolicyConfig(policy)).roles == roles


def test_the_registry_serves_every_built_in_name_and_no_other() -> None:
    assert set(REGISTRY) == set(POLICIES)


def test_an_unknown_policy_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="policy must be one of"):
        PolicyConfig(policy="contrarian")


class Contrarian(Policy):
    """A toy: at every other step the value model scores the base's top two and the step
    takes the *lower* valued one. It touches nothing outside this class."""

    name = "contrarian"
    consults = ("value",)

    opened: list = []

    def open(self, seq: Any) -> None:
        seq.memory = []  # (candidates, values, chosen) per junction
        self.opened.append(seq)

    def junction(self, seq: Any, step: StepResult) -> str | None:
        return "value" if seq.steps % 2 == 1 else None

    def consult(self, seq: Any, step: StepResult, kind: str, early: Any) -> Ask | None:
        top, family = step.top, seq.families["base"]
        pairs = zip(top.ids[:2], top.texts[:2], strict=True)
        candidates = [Commit(t, (i,), family) for i, t in pairs]
        return Ask("value", Worker.score,
                   ScoreRequest(seq.id, candidates, append=seq.unseen("value")))

    def choose(self, seq: Any, step: StepResult, kind: str | None, answer: Any) -> Choice:
        if answer is None:
            return super().choose(seq, step, kind, answer)
        seq.work["value_tokens"] += answer.processed
        pick = min(range(len(answer.values)), key=answer.values.__getitem__)
        piece = Commit(step.top.texts[pick], (step.top.ids[pick],), seq.families["base"])
        seq.memory.append((step.top.texts[:2], list(answer.values), piece.text))
        return Choice(piece, "value", piece.text == EOS_TEXT)


@pytest.fixture()
def contrarian():
    register(Contrarian)
    Contrarian.opened.clear()
    try:
        yield Contrarian
    finally:
        del REGISTRY[Contrarian.name]
        POLICIES.remove(Contrarian.name)


def test_a_policy_registered_in_its_own_module_is_served(workers, contrarian) -> None:  # noqa: F811
    req = GenerationRequest(
        prompt="the cat sat on",
        sampling=SamplingParams(max_tokens=8, seed=0),
        policy=PolicyConfig(policy="contrarian"),
    )
    assert req.roles == ("base", "value")
    (result,) = run(workers, req)
    (seq,) = Contrarian.opened
    assert result.policy == "contrarian"
    assert result.steps == 8
    assert result.interventions == result.by_kind["value"] == 4  # steps 1, 3, 5, 7
    assert result.work["value_tokens"] > 0
    assert len(seq.memory) == 4
    for candidates, values, chosen in seq.memory:
        assert chosen == candidates[values.index(min(values))]
