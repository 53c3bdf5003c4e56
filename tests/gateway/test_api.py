"""The HTTP API over tiny models: a real uvicorn server, real runners, real clients.

Base: tiny Gemma 3 (sentencepiece, adds <bos>); guidance: tiny Llama (byte-level, chat
template); value: a LoRA adapter + head on the tiny Gemma. All are saved to a temporary
directory and loaded by path through the one loader, in-process (LocalHandle workers).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from junction.cli import _run
from junction.gateway.app import create_app, local_workers
from junction.gateway.local import local_engine
from junction.gateway.sequence import GenerationRequest
from junction.services.protocol import Worker
from junction.shared.config import JunctionConfig, Limits, ModelSpec, SamplingParams
from junction.shared.value_model import build_value_model, save_value_model

PROMPT = "The ocean covers most of the"
TOKEN_FIELDS = {"index", "text", "source", "junction", "kind", "entropy", "top1_prob", "alpha"}


# --------------------------------------------------------------------- a real server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """uvicorn serving an app in a background thread, on a free port."""

    def __init__(self, app) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "uvicorn did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def wait_ready(self, timeout: float = 120) -> None:
        wait_for(lambda: httpx.get(f"{self.url}/ready").status_code == 200, timeout, "not ready")


def wait_for(condition: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(message)
        time.sleep(0.02)


def sse(response: httpx.Response) -> Iterator[tuple[str, str]]:
    """(event name, data) of each server-sent event, as the SSE spec parses them."""
    name, data = "message", []
    for line in response.iter_lines():
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
        elif not line.startswith(":"):
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)


# --------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_value(tiny_gemma, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A value adapter (LoRA + head, untrained) on the tiny Gemma backbone."""
    backbone = AutoModelForCausalLM.from_pretrained(tiny_gemma.path)
    out = tmp_path_factory.mktemp("tiny_value")
    save_value_model(build_value_model(backbone), out, {"backbone": str(tiny_gemma.path)})
    return out


@pytest.fixture(scope="module")
def tiny_config(tiny_gemma, tiny_llama, tiny_value) -> JunctionConfig:
    return JunctionConfig(
        base=ModelSpec(source=str(tiny_gemma.path), device="cpu"),
        guidance=ModelSpec(source=str(tiny_llama.path), device="cpu"),
        value=ModelSpec(source=str(tiny_value), device="cpu"),
        limits=Limits(max_prompt_tokens=64, max_tokens=48, max_concurrency=8, max_n=2),
    )


def serve(config: JunctionConfig, factory=local_workers):
    return Server(create_app(config, workers_factory=factory, workers_stop=None))


@pytest.fixture(scope="module")
def server(tiny_config) -> Iterator[Server]:
    with serve(tiny_config) as srv:
        srv.wait_ready()
        yield srv


@pytest.fixture(scope="module")
def limited(tiny_config) -> Iterator[Server]:
    """One request at a time, none waiting (the next is refused at once), long ones allowed."""
    limits = Limits(max_prompt_tokens=64, max_tokens=400, max_concurrency=1, max_n=2,
                    max_queue=0)
    with serve(replace(tiny_config, limits=limits)) as srv:
        srv.wait_ready()
        yield srv


@pytest.fixture()
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture()
def oai(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def in_process(config: JunctionConfig, req: GenerationRequest) -> dict:
    """What `junction generate --json` prints for this request."""
    engine = local_engine(config, req.roles, progress=False)
    return asyncio.run(_run(engine, req, echo=False)).to_json()


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def live(url: str) -> dict:
    return httpx.get(f"{url}/info").json()["live"]


def wait_idle(srv: Server) -> None:
    """The limited server admits one request at a time: let the last one be freed first."""
    wait_for(lambda: live(srv.url)["requests"] == 0, 10, "a request is still live")


# --------------------------------------------------------------------- operations
def test_health_ready_info(client: httpx.Client, tiny_config: JunctionConfig) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
    info = client.get("/info").json()
    assert set(info["models"]) == {"base", "guidance", "value"}
    assert info["models"]["base"]["role"] == "base"
    assert info["policies"] == ["base", "sia", "dense", "blendin", "nudging", "hybrid", "guidance"]
    assert info["sia"]["calibration"] is None  # the tiny value model has none: running quantile
    assert isinstance(info["sia"]["running_quantile"], dict)
    assert info["limits"]["max_tokens"] == tiny_config.limits.max_tokens
    assert info["live"] == {"requests": 0, "workers": {"base": 0, "guidance": 0, "value": 0}}


def test_metrics_exact_path_counts_routes(client: httpx.Client, server: Server) -> None:
    client.get("/health")
    response = client.get("/metrics", follow_redirects=False)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "junction_requests_total" in response.text
    assert metric(server.url, "junction_requests_total", route="/health", status="200") >= 1


def test_metrics_move_by_exactly_what_the_responses_report(client: httpx.Client, server: Server):
    policies = [
        {"policy": "blendin", "tau": 0.6, "k": 20},
        {"policy": "sia", "entropy_threshold": 1.0, "k": 4},
        {"policy": "nudging", "tau": 0.6},
        {"policy": "base"},
    ]

    def counters(policy: str) -> tuple[float, float]:
        steps = metric(server.url, "junction_decode_steps_total", policy=policy)
        kinds = ("value", "guidance")
        junctions = sum(
            metric(server.url, "junction_interventions_total", policy=policy, kind=k)
            for k in kinds
        )
        return steps, junctions

    before = {p["policy"]: counters(p["policy"]) for p in policies}
    reported = {p["policy"]: [0, 0] for p in policies}
    for options in policies * 2:
        body = {"prompt": PROMPT, "max_tokens": 7, "seed": 1, **options}
        summary = client.post("/v1/generate", json=body).json()["junction"]
        reported[options["policy"]][0] += summary["steps"]
        reported[options["policy"]][1] += summary["interventions"]
    for name, (steps, junctions) in reported.items():
        after = counters(name)
        assert (after[0] - before[name][0], after[1] - before[name][1]) == (steps, junctions)


def test_loading_then_ready(tiny_config: JunctionConfig) -> None:
    gate = threading.Event()

    async def gated(config: JunctionConfig):
        await asyncio.to_thread(gate.wait, 60)
        return await local_workers(config)

    with serve(tiny_config, gated) as srv:
        assert httpx.get(f"{srv.url}/health").status_code == 200
        assert httpx.get(f"{srv.url}/ready").json() == {"status": "loading"}
        blocked = httpx.post(f"{srv.url}/v1/generate", json={"prompt": PROMPT})
        assert blocked.status_code == 503 and "loading" in blocked.json()["error"]["message"]
        assert httpx.get(f"{srv.url}/info").status_code == 503
        gate.set()
        srv.wait_ready()
        assert httpx.post(f"{srv.url}/v1/generate", json={"prompt": PROMPT, "max_tokens": 2})


def test_failed_start_is_reported(tiny_config: JunctionConfig, tmp_path: Path) -> None:
    missing = replace(tiny_config, base=ModelSpec(source=str(tmp_path / "no-model")))
    with serve(missing) as srv:
        wait_for(lambda: httpx.get(f"{srv.url}/ready").json()["status"] == "failed", 30, "")
        ready = httpx.get(f"{srv.url}/ready")
        assert ready.status_code == 503 and ready.json()["error"]


# --------------------------------------------------------------------- native routes
def test_generate_equals_cli_json(client: httpx.Client, tiny_config: JunctionConfig) -> None:
    body = {"prompt": PROMPT, "max_tokens": 12, "policy": "base"}
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 200
    expected = in_process(
        tiny_config, GenerationRequest(prompt=PROMPT, sampling=SamplingParams(max_tokens=12))
    )
    assert response.json() == expected


def test_unset_max_tokens_stays_within_the_limit(client: httpx.Client) -> None:
    # The default (64) is above this gateway's limit (48): an unset max_tokens is capped.
    response = client.post("/v1/generate", json={"prompt": PROMPT, "temperature": 1.0, "seed": 1})
    assert response.status_code == 200
    assert 1 <= response.json()["usage"]["completion_tokens"] <= 48


@pytest.mark.parametrize(
    "options",
    [
        {"policy": "blendin", "tau": 1.0, "k": 20},
        {"policy": "sia", "entropy_threshold": 0.0, "k": 4, "value_temperature": 0.0},
        {"policy": "nudging", "tau": 1.0},
        {"policy": "guidance"},
        {"policy": "hybrid", "entropy_threshold": 0.0, "tau": 1.0, "value_temperature": 0.0},
    ],
)
def test_generate_policies(client: httpx.Client, options: dict) -> None:
    response = client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 6, **options})
    assert response.status_code == 200
    summary = response.json()["junction"]
    assert summary["policy"] == options["policy"]
    assert summary["intervention_rate"] == 1.0  # every step is a junction at these settings
    work = "value_tokens" if options["policy"] == "sia" else "guidance_tokens"  # hybrid: both
    # fire at every step here, and the guidance model wins
    assert summary["work"][work] > 0


def test_generate_stream_events(client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 8, "policy": "blendin", "tau": 1.0, "k": 20}
    with client.stream("POST", "/v1/generate_stream", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(sse(response))
    names = [name for name, _ in events]
    assert names == ["token"] * (len(events) - 1) + ["summary"]
    tokens = [json.loads(data) for _, data in events[:-1]]
    summary = json.loads(events[-1][1])
    assert all(set(t) == TOKEN_FIELDS for t in tokens)
    assert [t["index"] for t in tokens] == list(range(summary["junction"]["steps"]))
    assert "".join(t["text"] for t in tokens) == summary["text"]
    assert all(t["junction"] and t["kind"] == "guidance" for t in tokens)
    assert all(0.0 <= t["alpha"] <= 1.0 for t in tokens)
    assert client.post("/v1/generate", json=body).json() == summary  # same greedy request


def test_a_run_ahead_burst_streams_in_one_chunk_with_an_event_per_token(
    client: httpx.Client,
) -> None:
    body = {"prompt": PROMPT, "max_tokens": 12, "policy": "base"}  # the base runs ahead
    with client.stream("POST", "/v1/generate_stream", json=body) as response:
        chunks = [c for c in response.iter_raw() if c.strip() and not c.startswith(b":")]
    per_chunk = [c.count(b"event: token") for c in chunks]
    assert max(per_chunk) > 1  # a burst, written at once
    assert sum(per_chunk) == 12  # still one SSE event per token
    assert b"event: summary" in chunks[-1]


# --------------------------------------------------------------------- OpenAI-compatible
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_an_openai_stream_writes_a_burst_in_one_chunk_with_a_chunk_object_per_token(
    client: httpx.Client, route: str
) -> None:
    ask = {"messages": [{"role": "user", "content": PROMPT}]} if "chat" in route else {
        "prompt": PROMPT}
    body = {"model": "junction", "max_tokens": 12, "stream": True, "n": 2,
            "stream_options": {"include_usage": True}, **ask}
    with client.stream("POST", route, json=body) as response:
        chunks = [c for c in response.iter_raw() if c.strip() and not c.startswith(b":")]
    per_chunk = [c.count(b"data: ") for c in chunks]
    assert max(per_chunk) > 1  # a burst (or the opening role chunks), written at once
    events = [json.loads(line[6:]) for c in chunks for line in c.decode().splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert chunks[-1].strip().endswith(b"data: [DONE]")
    finished = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert sorted(e["choices"][0]["index"] for e in finished) == [0, 1]
    assert events[-1]["usage"]["completion_tokens"] == sum(
        e["junction"]["steps"] for e in finished)


def test_openai_completions(oai: openai.OpenAI, client: httpx.Client) -> None:
    native = client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 10}).json()
    reply = oai.completions.create(model="junction", prompt=PROMPT, max_tokens=10)
    assert reply.object == "text_completion" and reply.model == "junction"
    assert reply.choices[0].text == native["text"]
    assert reply.choices[0].finish_reason == native["finish_reason"]
    assert reply.usage.completion_tokens == native["usage"]["completion_tokens"]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model_extra["junction"] == native["junction"]


def test_openai_completions_stream(oai: openai.OpenAI, client: httpx.Client) -> None:
    junction = {"policy": "blendin", "tau": 1.0, "k": 20}
    native = client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 10, **junction})
    chunks = list(
        oai.completions.create(
            model="junction", prompt=PROMPT, max_tokens=10, stream=True,
            extra_body={"junction": junction},
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == native.json()["text"]
    assert chunks[-1].choices[0].finish_reason == native.json()["finish_reason"]
    assert chunks[-1].model_extra["junction"] == native.json()["junction"]
    assert all(c.usage is None for c in chunks)  # usage only when asked for


def test_openai_chat(oai: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    reply = oai.chat.completions.create(
        model="junction", messages=messages, max_tokens=8,
        extra_body={"junction": {"policy": "nudging", "tau": 1.0}},
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    summary = reply.model_extra["junction"]
    assert summary["policy"] == "nudging" and summary["intervention_rate"] == 1.0
    assert reply.usage.prompt_tokens > 0


def test_openai_chat_stream_with_usage(oai: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    kwargs = {"model": "junction", "messages": messages, "max_tokens": 8, "seed": 3}
    whole = oai.chat.completions.create(**kwargs)
    chunks = list(
        oai.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    usage_chunk, finish_chunk = chunks[-1], chunks[-2]
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    assert finish_chunk.choices[0].finish_reason == whole.choices[0].finish_reason
    assert finish_chunk.model_extra["junction"] == whole.model_extra["junction"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == whole.choices[0].message.content
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_error_is_an_api_error(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        oai.completions.create(model="junction", prompt=PROMPT, max_tokens=1000)
    assert raised.value.body["param"] == "max_tokens"


# --------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("route", "body", "status", "field"),
    [
        ("/v1/generate", {"prompt": PROMPT, "max_tokens": 49}, 400, "max_tokens"),
        ("/v1/generate", {"prompt": "sea " * 200}, 400, "prompt"),
        ("/v1/generate", {"prompt": PROMPT, "messages": [{"role": "user", "content": "x"}]},
         400, "prompt"),
        ("/v1/generate", {}, 400, "prompt"),
        ("/v1/generate", {"prompt": PROMPT, "temperature": -1}, 422, "temperature"),
        ("/v1/generate", {"prompt": PROMPT, "max_tokens": 0}, 422, "max_tokens"),
        ("/v1/generate", {"prompt": PROMPT, "policy": "magic"}, 422, "policy"),
        ("/v1/generate", {"prompt": PROMPT, "tau": 1.5}, 422, "tau"),
        ("/v1/generate", {"prompt": PROMPT, "policy": "blendin", "alpha": 1.5}, 422, "alpha"),
        ("/v1/generate", {"prompt": PROMPT, "beta": "inf"}, 422, "beta"),  # value_only is β = ∞
        ("/v1/generate", {"prompt": PROMPT, "sia_decode": "magic"}, 422, "sia_decode"),
        ("/v1/generate", {"prompt": PROMPT, "kk": 3}, 422, "kk"),
        ("/v1/generate", {"prompt": PROMPT, "stop": ["a"] * 9}, 422, "stop"),
        ("/v1/generate_stream", {"prompt": PROMPT, "max_tokens": 49}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": PROMPT, "n": 3}, 400, "n"),
        ("/v1/completions", {"prompt": PROMPT, "junction": {"tau": 2}}, 422, "junction.tau"),
        ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
        ("/v1/chat/completions", {"messages": []}, 422, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]},
         422, "messages.0.role"),
        ("/v1/chat/completions",
         {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 49},
         400, "max_tokens"),
    ],
)
def test_bad_input_names_the_field(
    client: httpx.Client, route: str, body: dict, status: int, field: str
) -> None:
    response = client.post(route, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field and error["param"] == field
    assert field.split(".")[-1] in error["message"]


def test_malformed_json_is_400(client: httpx.Client) -> None:
    response = client.post(
        "/v1/generate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


# --------------------------------------------------------------------- limits and disconnects
def test_over_concurrency_is_429_and_disconnect_frees_caches(limited: Server) -> None:
    wait_idle(limited)
    url = limited.url
    cancelled = metric(url, "junction_requests_finished_total", policy="blendin",
                       finish_reason="cancelled")
    body = {"prompt": PROMPT, "max_tokens": 400, "policy": "blendin", "tau": 1.0}
    with httpx.Client(base_url=url, timeout=60) as first:
        with first.stream("POST", "/v1/generate_stream", json=body) as stream:
            events = sse(stream)
            assert next(events)[0] == "token"  # the long request is decoding
            assert live(url)["workers"] == {"base": 1, "guidance": 1, "value": 0}
            refused = httpx.post(f"{url}/v1/generate", json={"prompt": PROMPT, "max_tokens": 2})
            assert refused.status_code == 429
            assert int(refused.headers["retry-after"]) >= 1
            assert "concurrent" in refused.json()["error"]["message"]
        # Leaving the block closes the connection mid-stream: the client went away.
    idle = {"requests": 0, "workers": {"base": 0, "guidance": 0, "value": 0}}
    wait_for(lambda: live(url) == idle, 5, "caches were not freed after the disconnect")
    after = metric(url, "junction_requests_finished_total", policy="blendin",
                   finish_reason="cancelled")
    assert after == cancelled + 1
    assert httpx.post(f"{url}/v1/generate", json={"prompt": PROMPT, "max_tokens": 2}).is_success
    assert metric(url, "junction_requests_total", route="/v1/generate", status="429") == 1



def test_a_burst_over_the_limit_waits_in_the_queue_and_every_request_succeeds(
    server: Server,
) -> None:
    """Twice `max_concurrency` (8) requests at once: none bounces, every one completes."""
    url, n = server.url, 16
    waits = metric(url, "junction_queue_wait_seconds_count")
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    with ThreadPoolExecutor(n) as pool:
        replies = list(pool.map(
            lambda _: httpx.post(f"{url}/v1/generate", json=body, timeout=120), range(n)))
    assert [r.status_code for r in replies] == [200] * n
    assert {r.json()["text"] for r in replies} == {replies[0].json()["text"]}  # greedy, alike
    assert metric(url, "junction_queue_wait_seconds_count") == waits + n
    assert metric(url, "junction_queued_requests") == 0


def test_disconnect_without_stream_cancels(limited: Server) -> None:
    wait_idle(limited)
    labels = {"policy": "blendin", "finish_reason": "cancelled"}
    cancelled = metric(limited.url, "junction_requests_finished_total", **labels)
    body = {"prompt": PROMPT, "max_tokens": 400, "policy": "blendin", "tau": 1.0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{limited.url}/v1/generate", json=body, timeout=0.5)
    wait_idle(limited)
    assert metric(limited.url, "junction_requests_finished_total", **labels) == cancelled + 1
    assert live(limited.url)["workers"] == {"base": 0, "guidance": 0, "value": 0}

# --------------------------------------------------------------------- a worker fails mid-request
def lose_guidance_sequence(srv: Server) -> None:
    """Fault: the guidance worker drops the live request's cache, so its next call fails."""
    gateway = srv.app.state.gateway
    wait_for(lambda: len(gateway.engine.live) == 1, 10, "no live request")
    seq_id = next(iter(gateway.engine.live))
    loop = gateway.engine._task.get_loop()  # the server's loop, where the handle lives

    async def close() -> None:  # a handle sends its call at once: on the server's loop
        await gateway.workers["guidance"].call(Worker.close, seq_id)

    asyncio.run_coroutine_threadsafe(close(), loop).result(10)


BLEND_LONG = {"policy": "blendin", "tau": 1.0}


def test_failure_mid_stream_sends_error_event(limited: Server) -> None:
    wait_idle(limited)
    body = {"prompt": PROMPT, "max_tokens": 400, **BLEND_LONG}
    with httpx.stream("POST", f"{limited.url}/v1/generate_stream", json=body) as response:
        events = sse(response)
        assert next(events)[0] == "token"
        lose_guidance_sequence(limited)
        rest = list(events)
    names = [name for name, _ in rest]
    assert names[-2:] == ["error", "summary"] and set(names[:-2]) <= {"token"}
    assert "guidance worker failed" in json.loads(rest[-2][1])["error"]["message"]
    assert json.loads(rest[-1][1])["finish_reason"] == "error"


def test_failure_mid_stream_raises_in_openai_client(limited: Server) -> None:
    wait_idle(limited)
    oai = openai.OpenAI(base_url=f"{limited.url}/v1", api_key="unused", max_retries=0)
    stream = oai.chat.completions.create(
        model="junction", messages=[{"role": "user", "content": "hi"}], max_tokens=400, stream=True,
        extra_body={"junction": BLEND_LONG},
    )
    with pytest.raises(openai.APIError, match="guidance worker failed"):
        for n, _ in enumerate(stream):
            if n == 1:
                lose_guidance_sequence(limited)


def test_failure_without_stream_is_500(limited: Server) -> None:
    wait_idle(limited)
    body = {"prompt": PROMPT, "max_tokens": 400, **BLEND_LONG}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{limited.url}/v1/generate", json=body, timeout=60)
        lose_guidance_sequence(limited)
        response = pending.result()
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert "guidance worker failed" in response.json()["error"]["message"]


# --------------------------------------------------------------------- best-of-N
def test_best_of_runs_n_samples_and_returns_the_best_with_summed_counters(
    client: httpx.Client,
) -> None:
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 3}
    single = client.post("/v1/generate", json=body).json()
    response = client.post("/v1/generate", json={**body, "best_of": 2})
    assert response.status_code == 200, response.text
    best = response.json()
    assert best["finish_reason"] == "length"
    assert best["junction"]["steps"] == 2 * 6  # the counters add up both runs
    assert best["junction"]["work"]["base_tokens"] == 2 * single["junction"]["work"]["base_tokens"]
    assert best["junction"]["work"]["value_tokens"] > 0  # the value model scored them
    samples = [
        client.post("/v1/generate", json={**body, "seed": 3 + i}).json()["text"] for i in range(2)
    ]
    assert best["text"] in samples


def test_best_of_through_the_openai_client(oai: openai.OpenAI) -> None:
    reply = oai.completions.create(
        model="junction", prompt=PROMPT, max_tokens=5, temperature=1.0, best_of=2, seed=1
    )
    assert reply.choices[0].text
    chat = oai.chat.completions.create(
        model="junction", messages=[{"role": "user", "content": PROMPT}], max_tokens=5,
        temperature=1.0, extra_body={"best_of": 2},
    )
    assert chat.choices[0].message.content is not None


@pytest.mark.parametrize(
    ("route", "body", "status", "field"),
    [
        ("/v1/generate", {"best_of": 99, "temperature": 1.0}, 400, "best_of"),
        ("/v1/generate", {"best_of": 2}, 400, "best_of"),  # greedy: N equal completions
        ("/v1/generate_stream", {"best_of": 2, "temperature": 1.0}, 400, "best_of"),
        ("/v1/generate", {"best_of": 0}, 422, "best_of"),
    ],
)
def test_best_of_bad_input_names_the_field(client, route, body, status, field) -> None:
    response = client.post(route, json={"prompt": PROMPT, "max_tokens": 4, **body})
    assert response.status_code == status, response.text
    assert field in json.dumps(response.json())
