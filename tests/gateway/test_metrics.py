"""Metrics: feed real TokenEvents and GenerationResults, read the rendered text back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from junction.gateway import metrics as metrics_module
from junction.gateway.metrics import KINDS, METRICS, ROLES, Metrics, metrics_table
from junction.shared.config import POLICIES, PolicyConfig
from junction.shared.types import GenerationResult, TokenEvent

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


@dataclass
class Req:
    """The three attributes of a Sequence that Metrics reads."""

    id: str
    policy: PolicyConfig
    created: float = 0.0


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def req(policy: str, seq_id: str = "r1", created: float = 0.0) -> Req:
    return Req(seq_id, PolicyConfig(policy=policy), created)


def event(
    index: int, kind: str | None = None, entropy: float = 1.0, alpha: float | None = None
) -> TokenEvent:
    source = kind or "base"
    return TokenEvent(index, "x", source, kind is not None, kind, entropy, 0.5, alpha)


def result(
    policy: str, steps: int, interventions: int, reason: str = "stop", **work: int
) -> GenerationResult:
    kind = "value" if policy in ("sia", "dense") else "guidance"
    return GenerationResult(
        text="",
        finish_reason=reason,
        prompt_tokens=3,
        completion_tokens=steps,
        policy=policy,
        steps=steps,
        interventions=interventions,
        by_kind={kind: interventions},
        work={"base_tokens": 0, "value_tokens": 0, "guidance_tokens": 0, **work},
    )


def scrape(m: Metrics) -> dict[tuple[str, frozenset], float]:
    body, _ = m.render()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(m: Metrics, name: str, **labels: str) -> float:
    return scrape(m)[(name, frozenset(labels.items()))]


# policy, steps, junction kind at every n-th step (None = never), expected interventions
STEP_TABLE = [
    ("base", 10, None, 0, 0),
    ("sia", 40, "value", 5, 8),
    ("dense", 7, "value", 1, 7),
    ("blendin", 20, "guidance", 4, 5),
    ("nudging", 12, "guidance", 4, 3),
    ("guidance", 6, "guidance", 1, 6),
]


@pytest.mark.parametrize("policy, steps, kind, every, expected", STEP_TABLE)
def test_counters_move_by_exactly_the_steps_and_junctions_fed(
    policy: str, steps: int, kind: str | None, every: int, expected: int
) -> None:
    m = Metrics(clock=Clock())
    seq = req(policy)
    for i in range(steps):
        m.on_token(seq, event(i, kind if kind and i % every == every - 1 else None))
    assert value(m, "junction_decode_steps_total", policy=policy) == steps
    for k in KINDS:
        want = expected if k == kind else 0
        assert value(m, "junction_interventions_total", policy=policy, kind=k) == want
    others = [p for p in POLICIES if p != policy]
    assert all(value(m, "junction_decode_steps_total", policy=p) == 0 for p in others)


def test_known_series_exist_at_zero_before_any_request() -> None:
    samples = scrape(Metrics())
    for policy in POLICIES:
        assert samples[("junction_decode_steps_total", frozenset({("policy", policy)}))] == 0
        for kind in KINDS:
            labels = frozenset({("policy", policy), ("kind", kind)})
            assert samples[("junction_interventions_total", labels)] == 0
    for role in ROLES:
        assert samples[("junction_model_tokens_total", frozenset({("role", role)}))] == 0
        assert samples[("junction_actor_call_seconds_count", frozenset({("role", role)}))] == 0


def test_latencies_from_admission_and_between_steps() -> None:
    clock = Clock()
    m = Metrics(clock=clock)
    seq = req("sia", created=10.0)
    for i, now in enumerate([10.5, 10.625, 10.875]):
        clock.now = now
        m.on_token(seq, event(i))
    clock.now = 11.0
    m.on_finish(seq, result("sia", 3, 0))
    assert value(m, "junction_time_to_first_token_seconds_count") == 1
    assert value(m, "junction_time_to_first_token_seconds_sum") == 0.5
    assert value(m, "junction_inter_token_latency_seconds_count") == 2
    assert value(m, "junction_inter_token_latency_seconds_sum") == 0.375
    assert value(m, "junction_request_latency_seconds_count") == 1
    assert value(m, "junction_request_latency_seconds_sum") == 1.0


def test_finish_drops_the_sequence_state() -> None:
    clock = Clock(1.0)
    m = Metrics(clock=clock)
    seq = req("base")
    m.on_token(seq, event(0))
    m.on_finish(seq, result("base", 1, 0))
    m.on_token(seq, event(0))  # same id again: a first token, not an inter-token gap
    assert value(m, "junction_time_to_first_token_seconds_count") == 2
    assert value(m, "junction_inter_token_latency_seconds_count") == 0


def test_interleaved_requests_keep_their_own_timing() -> None:
    clock = Clock()
    m = Metrics(clock=clock)
    a, b = req("sia", "a", created=0.0), req("sia", "b", created=1.0)
    for now, seq in [(2.0, a), (3.0, b), (5.0, a), (9.0, b)]:
        clock.now = now
        m.on_token(seq, event(0))
    assert value(m, "junction_time_to_first_token_seconds_sum") == 2.0 + 2.0
    assert value(m, "junction_inter_token_latency_seconds_sum") == 3.0 + 6.0


# alphas fed (None = not a blended junction), expected count, sum, count at or below 0.3
ALPHA_TABLE = [
    ([None, None, None], 0, 0.0, 0),
    ([None, 0.25, None, 0.75, None], 2, 1.0, 1),
    ([0.0, 1.0], 2, 1.0, 1),
]


@pytest.mark.parametrize("alphas, count, total, low", ALPHA_TABLE)
def test_blend_alpha_only_when_present(
    alphas: list[float | None], count: int, total: float, low: int
) -> None:
    m = Metrics(clock=Clock())
    seq = req("blendin")
    for i, alpha in enumerate(alphas):
        m.on_token(seq, event(i, "guidance" if alpha is not None else None, alpha=alpha))
    assert value(m, "junction_blend_alpha_count") == count
    assert value(m, "junction_blend_alpha_sum") == total
    assert value(m, "junction_blend_alpha_bucket", le="0.3") == low
    assert value(m, "junction_decode_steps_total", policy="blendin") == len(alphas)


@pytest.mark.parametrize("policy, observed", [("sia", 4), ("blendin", 4), ("guidance", 0)])
def test_base_entropy_per_step_of_a_base_driven_policy(policy: str, observed: int) -> None:
    m = Metrics(clock=Clock())
    for i, h in enumerate([0.2, 0.9, 1.1, 2.3]):
        m.on_token(req(policy), event(i, entropy=h))
    assert value(m, "junction_base_entropy_count") == observed
    assert value(m, "junction_base_entropy_bucket", le="1.0") == (2 if observed else 0)


def test_finished_requests_rates_tokens_and_reasons() -> None:
    m = Metrics(clock=Clock())
    finished = [
        ("r1", result("sia", 40, 8, base_tokens=45, value_tokens=80)),  # rate 0.2
        ("r2", result("sia", 10, 0, base_tokens=12)),  # rate 0.0
        ("r3", result("sia", 10, 5, "length", base_tokens=10, value_tokens=50)),  # 0.5
        ("r4", result("sia", 0, 0, "cancelled")),  # no steps: no rate
    ]
    for seq_id, res in finished:
        m.on_finish(req("sia", seq_id), res)
    bucket = "junction_request_intervention_rate_bucket"
    assert value(m, "junction_request_intervention_rate_count") == 3
    assert value(m, bucket, le="0.0") == 1
    assert value(m, bucket, le="0.15") == 1
    assert value(m, bucket, le="0.2") == 2
    assert value(m, bucket, le="0.5") == 3
    assert value(m, "junction_model_tokens_total", role="base") == 67
    assert value(m, "junction_model_tokens_total", role="value") == 130
    assert value(m, "junction_model_tokens_total", role="guidance") == 0
    for reason, n in [("stop", 2), ("length", 1), ("cancelled", 1), ("error", 0)]:
        name = "junction_requests_finished_total"
        assert value(m, name, policy="sia", finish_reason=reason) == n
    assert value(m, "junction_request_latency_seconds_count") == 4


def test_actor_calls_requests_and_active_gauge() -> None:
    m = Metrics()
    m.on_actor_call("value", 0.004)
    m.on_actor_call("value", 0.002)
    m.on_actor_call("base", 0.5)
    m.observe_request("/v1/generate", 200)
    m.observe_request("/v1/generate", 200)
    m.observe_request("/v1/chat/completions", 503)
    m.set_active(3)
    assert value(m, "junction_actor_call_seconds_count", role="value") == 2
    assert value(m, "junction_actor_call_seconds_bucket", role="value", le="0.0025") == 1
    assert value(m, "junction_actor_call_seconds_count", role="base") == 1
    assert value(m, "junction_actor_call_seconds_count", role="guidance") == 0
    assert value(m, "junction_requests_total", route="/v1/generate", status="200") == 2
    assert value(m, "junction_requests_total", route="/v1/chat/completions", status="503") == 1
    assert value(m, "junction_active_requests") == 3
    m.set_active(0)
    assert value(m, "junction_active_requests") == 0


def test_each_instance_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.on_token(req("sia"), event(0, "value"))
    assert value(a, "junction_decode_steps_total", policy="sia") == 1
    assert value(b, "junction_decode_steps_total", policy="sia") == 0


def test_render_exposes_the_declared_metrics_and_process_collectors() -> None:
    body, content_type = Metrics().render()
    assert content_type.startswith("text/plain")
    families = {
        f.name: f.type
        for f in text_string_to_metric_families(body.decode())
        if not f.name.endswith("_created")
    }
    declared = {spec.name.removesuffix("_total"): spec.type for spec in METRICS}
    assert {n: t for n, t in families.items() if n.startswith("junction_")} == declared
    # Plus the standard process and Python collectors (RSS, CPU, open files, GC).
    others = set(families) - set(declared)
    assert {"process_resident_memory_bytes", "process_cpu_seconds", "python_info"} <= others
    assert any(name.startswith("python_gc_") for name in others)
    assert all(name.startswith(("process_", "python_")) for name in others), others


def test_docs_list_every_metric_and_the_documented_queries() -> None:
    text = DOCS.read_text()
    assert metrics_table() in text
    for name in ("INTERVENTION_RATE", "INTERVENTION_RATE_BY_KIND", "REQUEST_INTERVENTION_RATE_P95"):
        assert getattr(metrics_module, name) in text
