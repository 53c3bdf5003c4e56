"""A real Prometheus scrapes Metrics.render() over HTTP; the documented PromQL reads it back."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from junction.gateway.metrics import INTERVENTION_RATE, INTERVENTION_RATE_BY_KIND, Metrics
from junction.shared.config import PolicyConfig
from junction.shared.types import GenerationResult, TokenEvent
from tests.prometheus import PROMETHEUS_BIN, Prometheus

pytestmark = pytest.mark.skipif(
    PROMETHEUS_BIN is None,
    reason="the prometheus binary is not on PATH (`make prometheus` installs Debian's package)",
)


@dataclass
class Req:
    """The three attributes of a Sequence that Metrics reads."""

    id: str
    policy: PolicyConfig
    created: float


def serve(metrics: Metrics) -> ThreadingHTTPServer:
    """GET /metrics -> metrics.render(), on a free local port, in a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/metrics":
                self.send_error(404)
                return
            body, content_type = metrics.render()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep the test output clean

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def served() -> Iterator[tuple[Metrics, str]]:
    """A Metrics instance and the host:port where it is served."""
    metrics = Metrics()
    server = serve(metrics)
    yield metrics, f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def prom(served: tuple[Metrics, str], tmp_path: Path) -> Iterator[Prometheus]:
    with Prometheus(served[1], tmp_path) as prom:
        yield prom


def test_prometheus_scrapes_steps_and_the_intervention_rate(
    served: tuple[Metrics, str], prom: Prometheus
) -> None:
    metrics = served[0]
    steps = 'junction_decode_steps_total{policy="sia"}'
    assert prom.wait_for('up{job="junction"}', 1) == 1
    assert prom.wait_for(steps, 0) == 0  # a sample before any step: rate() starts from 0

    seq = Req("r1", PolicyConfig(policy="sia"), created=0.0)
    for i in range(40):
        kind = "value" if i % 5 == 4 else None  # 8 junctions in 40 steps
        metrics.on_token(seq, TokenEvent(i, "x", kind or "base", kind is not None, kind, 1.2, 0.4))
    work = {"base_tokens": 45, "value_tokens": 80, "guidance_tokens": 0}
    result = GenerationResult("x" * 40, "length", 5, 40, "sia", 40, 8, {"value": 8}, work)
    metrics.on_finish(seq, result)

    # on_finish came after every step: once Prometheus has its count, it has all the steps.
    prom.wait_for("junction_request_intervention_rate_count", 1)
    assert prom.query(steps) == 40
    assert prom.query('junction_interventions_total{policy="sia", kind="value"}') == 8
    lifetime = (
        'sum(junction_interventions_total{policy="sia"})'
        ' / sum(junction_decode_steps_total{policy="sia"})'
    )
    assert prom.query(lifetime) == 0.2

    rates = {labels["policy"]: v for labels, v in prom.query_vector(INTERVENTION_RATE)}
    assert rates["sia"] == pytest.approx(0.2, rel=1e-12)
    by_kind = {
        (labels["policy"], labels["kind"]): v
        for labels, v in prom.query_vector(INTERVENTION_RATE_BY_KIND)
    }
    assert by_kind[("sia", "value")] == pytest.approx(0.2, rel=1e-12)
    assert by_kind[("sia", "guidance")] == 0

    bucket = 'junction_request_intervention_rate_bucket{{le="{}"}}'
    assert prom.query(bucket.format("0.15")) == 0
    assert prom.query(bucket.format("0.2")) == 1
    assert prom.query('junction_model_tokens_total{role="value"}') == 80
