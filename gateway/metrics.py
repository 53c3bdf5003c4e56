"""The gateway's Prometheus metrics: one `Metrics` per gateway, each with its own registry.

`Metrics` is the engine's Observer (every committed step, every finished request, every
worker call) plus two gateway hooks: `observe_request(route, status)` for each HTTP response
and `set_active(n, queued)` for the live and waiting requests. `render()` is the body of GET
/metrics.

Every metric is declared once in `METRICS`; `metrics_table()` turns that list into the
markdown table of docs/metrics.md (a test keeps the two equal).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from junction.shared.config import POLICIES
from junction.shared.types import GenerationResult, TokenEvent

if TYPE_CHECKING:
    from junction.gateway.sequence import Sequence

KINDS: tuple[str, ...] = ("value", "guidance")
ROLES: tuple[str, ...] = ("base", "value", "guidance")
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "cancelled", "error")

# The headline signal: junction steps / decode steps per policy, over the last 5 minutes.
INTERVENTION_RATE = (
    "sum by (policy) (rate(junction_interventions_total[5m]))"
    " / sum by (policy) (rate(junction_decode_steps_total[5m]))"
)
# The same, split by what was consulted (value model or guidance model).
INTERVENTION_RATE_BY_KIND = (
    "sum by (policy, kind) (rate(junction_interventions_total[5m]))"
    " / ignoring(kind) group_left"
    " sum by (policy) (rate(junction_decode_steps_total[5m]))"
)
# Per request rather than per step: the 95th percentile of requests' intervention rates.
REQUEST_INTERVENTION_RATE_P95 = (
    "histogram_quantile(0.95, sum by (le) (rate(junction_request_intervention_rate_bucket[5m])))"
)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str  # as exposed; counters end in _total
    type: str  # "counter" | "gauge" | "histogram"
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] = ()


DECODE_STEPS = MetricSpec(
    "junction_decode_steps_total", "counter", ("policy",), "Decode steps committed."
)
INTERVENTIONS = MetricSpec(
    "junction_interventions_total",
    "counter",
    ("policy", "kind"),
    "Junction steps: decode steps that consulted the value (kind=value) or guidance model.",
)
MODEL_TOKENS = MetricSpec(
    "junction_model_tokens_total",
    "counter",
    ("role",),
    "Tokens each model ran through its forward pass (the work of finished requests).",
)
REQUESTS_FINISHED = MetricSpec(
    "junction_requests_finished_total",
    "counter",
    ("policy", "finish_reason"),
    "Finished generations, by finish reason (stop, length, cancelled, error).",
)
REQUESTS = MetricSpec(
    "junction_requests_total",
    "counter",
    ("route", "status"),
    "HTTP responses, by route and status.",
)
ACTIVE_REQUESTS = MetricSpec(
    "junction_active_requests", "gauge", (), "Requests decoding right now."
)
QUEUED_REQUESTS = MetricSpec(
    "junction_queued_requests", "gauge", (), "Requests waiting for a slot (limits.max_queue)."
)
QUEUE_WAIT = MetricSpec(
    "junction_queue_wait_seconds",
    "histogram",
    (),
    "Seconds an admitted request waited for a slot (0 when one was free).",
    (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0),
)
REQUEST_INTERVENTION_RATE = MetricSpec(
    "junction_request_intervention_rate",
    "histogram",
    (),
    "Intervention rate of each finished request (junction steps / decode steps).",
    (0.0, 0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0),
)
TIME_TO_FIRST_TOKEN = MetricSpec(
    "junction_time_to_first_token_seconds",
    "histogram",
    (),
    "Seconds from admission to the first committed step.",
    (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
INTER_TOKEN_LATENCY = MetricSpec(
    "junction_inter_token_latency_seconds",
    "histogram",
    (),
    "Seconds between consecutive committed steps of one request.",
    (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0),
)
REQUEST_LATENCY = MetricSpec(
    "junction_request_latency_seconds",
    "histogram",
    (),
    "Seconds from admission to the end of a generation.",
    (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0),
)
ACTOR_CALL = MetricSpec(
    "junction_actor_call_seconds",
    "histogram",
    ("role",),
    "Seconds per call to a worker (one batched call serves many requests).",
    (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)
BASE_ENTROPY = MetricSpec(
    "junction_base_entropy",
    "histogram",
    (),
    "Top-k entropy (nats) of the base model at each step (not observed for policy=guidance,"
    " whose driver is the guidance model). ln 10 = 2.30, ln 100 = 4.61.",
    (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.31, 3.0, 4.0, 4.61),
)
BLEND_ALPHA = MetricSpec(
    "junction_blend_alpha",
    "histogram",
    (),
    "BlendIn's weight on the guidance model at each blended junction.",
    (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
)

METRICS: tuple[MetricSpec, ...] = (
    DECODE_STEPS,
    INTERVENTIONS,
    MODEL_TOKENS,
    REQUESTS_FINISHED,
    REQUESTS,
    ACTIVE_REQUESTS,
    QUEUED_REQUESTS,
    QUEUE_WAIT,
    REQUEST_INTERVENTION_RATE,
    TIME_TO_FIRST_TOKEN,
    INTER_TOKEN_LATENCY,
    REQUEST_LATENCY,
    ACTOR_CALL,
    BASE_ENTROPY,
    BLEND_ALPHA,
)


def metrics_table() -> str:
    """Markdown table of every metric (docs/metrics.md holds this text)."""
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for spec in METRICS:
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "—"
        rows.append(f"| `{spec.name}` | {spec.type} | {labels} | {spec.help} |")
    return "\n".join(rows) + "\n"


class Metrics:
    """Engine Observer and gateway hooks over one private CollectorRegistry."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry()
        # The process's own health (RSS, CPU, open files, GC, Python version) as every
        # Prometheus client exposes it: process_*, python_gc_*, python_info.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._clock = clock  # the clock of Sequence.created
        self._last_token: dict[str, float] = {}  # seq id -> time of its latest step

        self.decode_steps = self._counter(DECODE_STEPS)
        self.interventions = self._counter(INTERVENTIONS)
        self.model_tokens = self._counter(MODEL_TOKENS)
        self.requests_finished = self._counter(REQUESTS_FINISHED)
        self.requests = self._counter(REQUESTS)
        self.active_requests = self._gauge(ACTIVE_REQUESTS)
        self.queued_requests = self._gauge(QUEUED_REQUESTS)
        self.queue_wait = self._histogram(QUEUE_WAIT)
        self.request_intervention_rate = self._histogram(REQUEST_INTERVENTION_RATE)
        self.time_to_first_token = self._histogram(TIME_TO_FIRST_TOKEN)
        self.inter_token_latency = self._histogram(INTER_TOKEN_LATENCY)
        self.request_latency = self._histogram(REQUEST_LATENCY)
        self.actor_call = self._histogram(ACTOR_CALL)
        self.base_entropy = self._histogram(BASE_ENTROPY)
        self.blend_alpha = self._histogram(BLEND_ALPHA)

        # Series of the known label values exist from the start at 0, so rates and ratios
        # are defined (0, not absent) before the first request of a policy arrives.
        for policy in POLICIES:
            self.decode_steps.labels(policy)
            for kind in KINDS:
                self.interventions.labels(policy, kind)
            for reason in FINISH_REASONS:
                self.requests_finished.labels(policy, reason)
        for role in ROLES:
            self.model_tokens.labels(role)
            self.actor_call.labels(role)

    def _counter(self, spec: MetricSpec) -> Counter:
        return Counter(spec.name, spec.help, spec.labels, registry=self.registry)

    def _gauge(self, spec: MetricSpec) -> Gauge:
        return Gauge(spec.name, spec.help, spec.labels, registry=self.registry)

    def _histogram(self, spec: MetricSpec) -> Histogram:
        return Histogram(
            spec.name, spec.help, spec.labels, registry=self.registry, buckets=spec.buckets
        )

    # ----------------------------------------------------------------- engine Observer
    def on_token(self, seq: Sequence, event: TokenEvent) -> None:
        policy = seq.policy.policy
        self.decode_steps.labels(policy).inc()
        if event.junction:
            self.interventions.labels(policy, str(event.kind)).inc()
        if policy != "guidance" and math.isfinite(event.entropy):
            self.base_entropy.observe(event.entropy)
        if event.alpha is not None:
            self.blend_alpha.observe(event.alpha)
        now = self._clock()
        last = self._last_token.get(seq.id)
        if last is None:
            self.time_to_first_token.observe(now - seq.created)
        else:
            self.inter_token_latency.observe(now - last)
        self._last_token[seq.id] = now

    def on_finish(self, seq: Sequence, result: GenerationResult) -> None:
        policy = seq.policy.policy
        self._last_token.pop(seq.id, None)
        self.request_latency.observe(self._clock() - seq.created)
        self.requests_finished.labels(policy, result.finish_reason).inc()
        if result.steps:  # a request cancelled before its first step has no rate
            self.request_intervention_rate.observe(result.intervention_rate)
        for role in ROLES:
            tokens = result.work.get(f"{role}_tokens", 0)
            if tokens:
                self.model_tokens.labels(role).inc(tokens)

    def on_actor_call(self, role: str, seconds: float) -> None:
        self.actor_call.labels(role).observe(seconds)

    def on_wait(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    # ----------------------------------------------------------------- gateway hooks
    def observe_request(self, route: str, status: int | str) -> None:
        self.requests.labels(route, str(status)).inc()

    def set_active(self, n: int, queued: int = 0) -> None:
        self.active_requests.set(n)
        self.queued_requests.set(queued)

    def render(self) -> tuple[bytes, str]:
        """The GET /metrics body and its content type (Prometheus text format)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
