"""The gateway as deployed: real Ray actors, real uvicorn, the embedded default models.

A handful of short requests (CPU decoding is slow): every route once, greedy parity with
`junction generate --json`, BlendIn's intervention rate, and a disconnect that frees the
actors' caches.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import ray

from junction.gateway.app import create_app
from junction.gateway.sequence import GenerationRequest
from junction.shared.config import JunctionConfig, Limits, SamplingParams
from tests.gateway.test_api import Server, in_process, live, metric, sse, wait_for

PROMPT = "The three most important things to know about the ocean are"


@pytest.fixture(scope="module")
def config() -> JunctionConfig:
    # A killed actor restarts by reloading its embedded model: on a loaded two-core machine
    # that took over the default 60 s, and the request was failed rather than replayed.
    limits = Limits(max_tokens=64, max_concurrency=4, recovery_seconds=600)
    return JunctionConfig(limits=limits)


@pytest.fixture(scope="module")
def server(config: JunctionConfig) -> Iterator[Server]:
    started = not ray.is_initialized()
    if started:  # three one-CPU actors on a two-core machine: CPUs are logical in Ray
        ray.init(num_cpus=4, include_dashboard=False)
    try:
        with Server(create_app(config)) as srv:  # the default workers: Ray actors
            srv.wait_ready(timeout=900)
            yield srv
    finally:
        if started:
            ray.shutdown()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


def test_operations_routes(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    info = client.get("/info").json()
    assert {"base", "guidance"} <= set(info["models"])
    assert {"base", "blendin", "nudging", "guidance"} <= set(info["policies"])
    assert info["live"]["requests"] == 0
    assert set(info["live"]["workers"].values()) == {0}
    response = client.get("/metrics", follow_redirects=False)
    assert response.status_code == 200 and "junction_actor_call_seconds" in response.text


def test_greedy_generate_equals_cli(client: httpx.Client, config: JunctionConfig) -> None:
    body = {"prompt": PROMPT, "max_tokens": 12, "policy": "base"}
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 200
    req = GenerationRequest(prompt=PROMPT, sampling=SamplingParams(max_tokens=12))
    assert response.json() == in_process(config, req)


def test_blendin_reports_a_rate(client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 16, "policy": "blendin"}
    summary = client.post("/v1/generate", json=body).json()["junction"]
    assert summary["policy"] == "blendin"
    assert 0.0 < summary["intervention_rate"] <= 1.0
    assert summary["work"]["guidance_tokens"] > 0


def test_generate_stream(client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 8, "policy": "nudging"}
    with client.stream("POST", "/v1/generate_stream", json=body) as response:
        events = list(sse(response))
    assert [name for name, _ in events][-1] == "summary"
    summary = json.loads(events[-1][1])
    tokens = [json.loads(data) for name, data in events if name == "token"]
    assert "".join(t["text"] for t in tokens) == summary["text"]
    assert summary["junction"]["steps"] == len(tokens)


def test_openai_routes(server: Server) -> None:
    oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    completion = oai.completions.create(
        model="junction", prompt=PROMPT, max_tokens=8, extra_body={"junction": {"policy": "base"}}
    )
    assert completion.choices[0].text and completion.model_extra["junction"]["policy"] == "base"
    chunks = list(
        oai.chat.completions.create(
            model="junction",
            messages=[{"role": "user", "content": "Name one ocean."}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"junction": {"policy": "blendin"}},
        )
    )
    assert chunks[-1].usage.completion_tokens >= 1
    assert chunks[-2].model_extra["junction"]["policy"] == "blendin"


def test_sia_when_a_value_model_is_shipped(client: httpx.Client) -> None:
    if "value" not in client.get("/info").json()["models"]:
        response = client.post("/v1/generate", json={"prompt": PROMPT, "policy": "sia"})
        assert response.status_code == 400 and response.json()["error"]["field"] == "policy"
        return
    body = {"prompt": PROMPT, "max_tokens": 8, "policy": "sia", "value_temperature": 0}
    summary = client.post("/v1/generate", json=body).json()["junction"]
    assert summary["policy"] == "sia" and summary["steps"] >= 1


def test_disconnect_frees_actor_caches(client: httpx.Client, server: Server) -> None:
    labels = {"policy": "blendin", "finish_reason": "cancelled"}
    cancelled = metric(server.url, "junction_requests_finished_total", **labels)
    body = {"prompt": PROMPT, "max_tokens": 64, "policy": "blendin"}
    with client.stream("POST", "/v1/generate_stream", json=body) as response:
        assert next(sse(response))[0] == "token"
    wait_for(lambda: live(server.url)["requests"] == 0, 10, "request still live")
    wait_for(lambda: set(live(server.url)["workers"].values()) == {0}, 10, "caches not freed")
    assert metric(server.url, "junction_requests_finished_total", **labels) == cancelled + 1



def test_a_killed_actor_is_restarted(client: httpx.Client, server: Server) -> None:
    actor = server.app.state.gateway.workers["guidance"].actor
    ray.kill(actor, no_restart=False)  # the process dies; Ray starts a new one, which reloads
    body = {"prompt": PROMPT, "max_tokens": 4, "policy": "nudging"}
    statuses = []
    deadline = time.monotonic() + 300
    while not statuses or statuses[-1] != 200:
        assert time.monotonic() < deadline, f"no recovery: {statuses}"
        statuses.append(client.post("/v1/generate", json=body).status_code)
        time.sleep(0.5)
    # While it restarts: 503 (at admission) or 500 (a step that met the dying process).
    assert set(statuses) <= {200, 500, 503}
    assert live(server.url)["workers"]["guidance"] == 0


def test_a_request_survives_its_base_actor_dying_mid_stream(
    client: httpx.Client, server: Server
) -> None:
    """Nothing is lost: the engine replays the request onto the restarted actor."""
    body = {"prompt": PROMPT, "max_tokens": 12, "policy": "base"}
    expected = client.post("/v1/generate", json=body).json()["text"]
    actor = server.app.state.gateway.workers["base"].actor
    texts, summary = [], None
    with client.stream("POST", "/v1/generate_stream", json=body) as response:
        for name, data in sse(response):
            if name == "token":
                texts.append(json.loads(data)["text"])
                if len(texts) == 3:
                    ray.kill(actor, no_restart=False)  # the process dies; Ray restarts it
            elif name == "summary":
                summary = json.loads(data)
            else:
                raise AssertionError(f"unexpected {name} event: {data}")
    assert summary is not None and summary["finish_reason"] == "length"
    assert "".join(texts) == summary["text"] == expected


def test_evaluate_against_the_deployed_gateway(server: Server, tmp_path) -> None:
    """`junction evaluate --url` against the gateway as deployed (Ray actors behind uvicorn,
    what `junction serve` runs): the same completions as in process, OpenAI API included."""
    from pathlib import Path

    from typer.testing import CliRunner

    from junction.cli import app

    data = Path("../shared/data/xstest_dev.csv")
    common = ["evaluate", "--data", str(data), "--limit", "2", "--max-tokens", "6",
              "--policy", "base", "--policy", "blendin"]
    runs = {
        "local": [],
        "native": ["--url", server.url],
        "openai": ["--url", server.url, "--api", "openai"],
    }
    completions = {}
    for name, extra in runs.items():
        result = CliRunner().invoke(app, [*common, *extra, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert "refusal rate" in result.output
        rows = [json.loads(line) for line in (tmp_path / name / "items.jsonl").open()]
        completions[name] = [(r["policy"], r["row"], r["completion"]) for r in rows]
    assert completions["native"] == completions["local"] == completions["openai"]
    assert len(completions["local"]) == 4
