"""A hostile client and an operator against a live server (tiny models, real uvicorn).

The bad-input catalog is one table: each request, the 4xx it must get and the field the
error names. Every answer has the one error shape, carries no traceback, path, process id or
terminal colour, and the server answers a good request right after. Then: API keys, the
Host allow-list, CORS, the body-size limit, /v1/models, an unknown model, logprobs through
the `openai` client, n > 1, and the guidance model's context checked at admission.
"""

from __future__ import annotations

import json
import re
import select
import socket
from collections.abc import Iterator
from dataclasses import replace

import httpx
import openai
import pytest

from junction.gateway.app import create_app, local_workers
from junction.gateway.errors import public
from junction.gateway.guard import api_keys
from junction.shared.config import JunctionConfig, Limits, ServerConfig, config_from_dict
from tests.gateway.test_api import PROMPT, Server, metric, serve, sse, tiny_config, tiny_value  # noqa: F401  (module fixtures)
from tests.test_deploy import ROOT, compose, gateway_container, resolve_default

NAN, INF = float("nan"), float("inf")
GOOD = {"prompt": PROMPT, "max_tokens": 2}
CHAT = [{"role": "user", "content": "hi"}]
LEAKS = re.compile(r"Traceback|File \"|/tmp/|/home/|/work/|\x1b\[|pid=|ActorID|ray::")


@pytest.fixture(scope="module")
def server(tiny_config: JunctionConfig) -> Iterator[Server]:  # noqa: F811
    with serve(tiny_config) as srv:
        srv.wait_ready()
        yield srv


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def assert_one_shape(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert error["param"] == param, error
    assert error["message"] and not LEAKS.search(response.text), response.text
    return error


# --------------------------------------------------------------------- the hostile catalog
G, C, CH = "/v1/generate", "/v1/completions", "/v1/chat/completions"
MANY = "x" * 600_000

# (["METHOD "]route, body, status, param): a dict body is JSON over a good request's fields
# (None removes one); bytes are sent as they are, a (content type, bytes) pair with its type.
CATALOG = [
    # numbers that would stop the decode loop or fail a batch: finite, in range, strict types
    (G, {"policy": "sia", "beta": NAN}, 422, "beta"),
    (G, {"policy": "sia", "value_temperature": 1e-320}, 422, "value_temperature"),
    (G, {"policy": "sia", "entropy_threshold": INF}, 422, "entropy_threshold"),
    (G, {"policy": "blendin", "lam": -INF}, 422, "lam"),
    (G, {"temperature": 1e-39}, 422, "temperature"),
    (G, {"temperature": NAN}, 422, "temperature"),
    (G, {"top_p": 0}, 422, "top_p"),
    (G, {"target_ratio": 2}, 422, "target_ratio"),
    (G, {"seed": 2**70}, 422, "seed"),
    (G, {"seed": -1}, 422, "seed"),
    (G, {"max_tokens": "4"}, 422, "max_tokens"),
    (G, {"max_tokens": True}, 422, "max_tokens"),
    (G, {"k": 2.5}, 422, "k"),
    (G, {"best_of": "2"}, 422, "best_of"),
    (G, {"kk": 3}, 422, "kk"),
    # text: lone surrogates, the character cap over parts and messages, stop strings
    (G, {"prompt": "\ud800"}, 422, "prompt"),
    (G, {"prompt": "a" * 1_000_001}, 422, "prompt"),
    (G, {"prompt": None, "messages": [{"role": "user", "content": MANY}] * 2}, 422, "messages"),
    (G, {"prompt": None, "messages": [
        {"role": "user", "content": [{"type": "text", "text": MANY}] * 2}]}, 422, "messages"),
    (G, {"prompt": None, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a" * 1_000_001}]}]}, 422, "messages.0.content.0.text"),
    (G, {"stop": ["a"] * 9}, 422, "stop"),
    (G, {"stop": "a" * 1001}, 422, "stop"),
    # best-of requests are validated before any work, like every other request
    (G, {"best_of": 2, "temperature": 1.0, "stop": ["a"] * 9}, 422, "stop"),
    (G, {"best_of": 2, "temperature": 1.0, "messages": CHAT}, 400, "prompt"),
    (C, {"best_of": 2, "temperature": 1.0, "prompt": ["a", "b"]}, 400, "prompt"),
    (C, {"best_of": 2, "temperature": 1.0, "n": 2}, 400, "n"),
    # OpenAI routes: the model, n, logprobs, fields Junction does not implement
    (C, {"model": "\ud800"}, 422, "model"),
    (C, {"model": "gpt-4"}, 404, "model"),
    (C, {"n": 3}, 400, "n"),
    (C, {"n": "2"}, 422, "n"),
    (C, {"stream": "yes"}, 422, "stream"),
    (C, {"logprobs": 6}, 422, "logprobs"),
    (C, {"seed": 2**64}, 422, "seed"),
    (C, {"junction": {"beta": NAN}}, 422, "junction.beta"),
    (C, {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    (C, {"response_format": {"type": "json_object"}}, 400, "response_format"),
    (C, {"echo": True}, 400, "echo"),
    (C, {"logit_bias": {"1": 5}}, 400, "logit_bias"),
    (C, {"suffix": "x"}, 400, "suffix"),
    (C, {"presence_penalty": 0.5}, 400, "presence_penalty"),
    (C, {"frequency_penalty": 1}, 400, "frequency_penalty"),
    (CH, {"messages": CHAT, "tool_choice": "auto"}, 400, "tool_choice"),
    (CH, {"messages": CHAT, "top_logprobs": 3}, 422, "top_logprobs"),
    (CH, {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 422, "top_logprobs"),
    (CH, {"messages": CHAT, "logprobs": "true"}, 422, "logprobs"),
    (CH, {"messages": [{"role": "user", "content": MANY}] * 2}, 422, "messages"),
    # not JSON, not an object, no such route, a wrong method (raw bodies are sent as they are)
    (G, b"{not json", 400, None),
    (G, b"[1, 2]", 400, None),
    (G, b'"a string"', 400, None),
    (G, b"", 400, None),
    (G, ("text/plain", b"hello"), 400, None),
    ("/v1/no-such-route", b"", 404, None),
    ("GET " + G, None, 405, None),
    ("DELETE /v1/models", None, 405, None),
]
JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(("route", "body", "status", "param"), CATALOG)
def test_hostile_catalog(client: httpx.Client, route: str, body, status: int, param: str | None):
    method, _, path = route.rpartition(" ")
    if isinstance(body, dict):
        base = {"prompt": PROMPT, "max_tokens": 2} if route != CH else {"max_tokens": 2}
        payload = {k: v for k, v in {**base, **body}.items() if v is not None}
        content, headers = json.dumps(payload).encode(), JSON
    elif isinstance(body, tuple):
        content, headers = body[1], {"content-type": body[0]}
    else:
        content, headers = body or b"", JSON
    response = client.request(method or "POST", path, content=content, headers=headers)
    assert_one_shape(response, status, param)
    assert client.post(G, json=GOOD).status_code == 200  # the server still serves


def raw_http(port: int, head: str, body: bytes = b"", chunks: int = 0) -> bytes:
    """A request written by hand; MiB chunks are sent, one at a time, until an answer comes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        for _ in range(chunks):
            if select.select([sock], [], [], 0.5)[0]:
                break  # answered: the server stopped reading
            sock.sendall(b"100000\r\n" + b"a" * 0x100000 + b"\r\n")
        answer = b""
        while not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        return answer


def test_body_over_the_limit_is_413_without_reading_it(server: Server) -> None:
    head = (f"POST {G} HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            "content-length: 100000000\r\n\r\n")
    answer = raw_http(server.port, head, b'{"prompt": "')  # and never the other 100 MB
    status, _, rest = answer.partition(b"\r\n")
    assert b" 413 " in status, answer[:200]
    error = json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]
    assert "larger than" in error["message"] and error["type"] == "invalid_request_error"


def test_chunked_body_is_counted_as_it_streams(server: Server) -> None:
    head = (f"POST {G} HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            "transfer-encoding: chunked\r\n\r\n")
    answer = raw_http(server.port, head, chunks=12)  # 12 MiB, past the 8 MiB default
    assert b" 413 " in answer.split(b"\r\n", 1)[0], answer[:200]
    assert httpx.post(f"{server.url}{G}", json=GOOD).status_code == 200


@pytest.mark.parametrize(
    "message",
    [
        "base worker failed: \x1b[36mray::BaseWorker.step()\x1b[39m (pid=4242, ip=10.0.0.3, "
        "actor_id=9f2c1e0d3b4a5c6d7e8f90a1b2c3d4e5) File \"/opt/junction/services/lm.py\"",
        "Traceback (most recent call last):\n  File \"/usr/lib/python3.11/x.py\", line 1",
        "OverflowError: value 123 at /home/someone/.cache/junction/model.safetensors",
    ],
)
def test_public_messages_carry_no_internals(message: str) -> None:
    shown = public(message)
    assert shown and not LEAKS.search(shown) and "\n" not in shown
    assert not re.search(r"[0-9a-f]{16,}|10\.0\.0\.3|4242", shown)


# --------------------------------------------------------------------- OpenAI parity
def test_models_lists_the_served_names(client: httpx.Client) -> None:
    listing = client.get("/v1/models").json()
    names = [m["id"] for m in listing["data"]]
    assert listing["object"] == "list" and names[0] == "junction" and len(names) == 2
    assert all(m["object"] == "model" for m in listing["data"])
    for name in names:  # every listed name is accepted
        reply = client.post(C, json={"model": name, "prompt": PROMPT, "max_tokens": 1})
        assert reply.status_code == 200 and reply.json()["model"] == name


def test_unknown_model_is_404_before_any_work(server: Server) -> None:
    steps = metric(server.url, "junction_decode_steps_total", policy="base")
    with pytest.raises(openai.NotFoundError) as raised:
        oai_client(server).completions.create(model="no-such-model", prompt=PROMPT, max_tokens=40)
    assert raised.value.body["param"] == "model"
    assert raised.value.body["code"] == "model_not_found"
    assert metric(server.url, "junction_decode_steps_total", policy="base") == steps


def oai_client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_completion_logprobs(server: Server) -> None:
    reply = oai_client(server).completions.create(
        model="junction", prompt=PROMPT, max_tokens=6, logprobs=3
    )
    choice = reply.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == choice.text  # greedy, no stop strings: the text, step by step
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and 1 <= len(top) <= 3
        assert logprob == pytest.approx(max(top.values()), abs=1e-5)  # greedy takes the top
        assert top.get(token, logprob) == pytest.approx(logprob, abs=1e-5)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    plain = oai_client(server).completions.create(model="junction", prompt=PROMPT, max_tokens=6)
    assert plain.choices[0].logprobs is None and plain.choices[0].text == choice.text


def test_chat_logprobs_whole_and_streamed(server: Server) -> None:
    kwargs = {"model": "junction", "messages": CHAT, "max_tokens": 5, "logprobs": True,
              "top_logprobs": 2, "extra_body": {"junction": {"policy": "blendin", "tau": 1.0}}}
    whole = oai_client(server).chat.completions.create(**kwargs)
    content = whole.choices[0].logprobs.content
    assert 1 <= len(content) <= 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    chunks = list(oai_client(server).chat.completions.create(**kwargs, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_n_choices_are_seeded_samples(server: Server, client: httpx.Client) -> None:
    body = {"model": "junction", "prompt": PROMPT, "max_tokens": 5, "temperature": 1.0,
            "seed": 11}
    reply = client.post(C, json={**body, "n": 2}).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    singles = [client.post(C, json={**body, "seed": 11 + i}).json() for i in range(2)]
    assert [c["text"] for c in reply["choices"]] == [s["choices"][0]["text"] for s in singles]
    assert reply["usage"]["completion_tokens"] == sum(
        s["usage"]["completion_tokens"] for s in singles
    )
    assert reply["junction"]["steps"] == sum(s["junction"]["steps"] for s in singles)
    chunks = list(oai_client(server).completions.create(**body, n=2, stream=True))
    texts = ["", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c["text"] for c in reply["choices"]]
    finishes = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finishes) == [0, 1]


def test_n_chat_greedy_gives_equal_choices(server: Server) -> None:
    reply = oai_client(server).chat.completions.create(
        model="junction", messages=CHAT, max_tokens=4, n=2
    )
    assert len(reply.choices) == 2
    assert reply.choices[0].message.content == reply.choices[1].message.content


# --------------------------------------------------------------------- operators
KEYS = ["key-one", "key-two"]


@pytest.fixture(scope="module")
def guarded(tiny_config: JunctionConfig, monkeypatch_module) -> Iterator[Server]:  # noqa: F811
    monkeypatch_module.setenv("JUNCTION_API_KEYS", "key-env, ")
    server = ServerConfig(
        api_keys=KEYS, allowed_hosts=["127.0.0.1", "localhost"],
        cors_origins=["https://app.example"], auth_metrics=True, docs=False,
        max_body_bytes=1_000_000,
    )
    limits = Limits(max_prompt_tokens=512, max_tokens=48, max_concurrency=4, max_n=2)
    config = replace(tiny_config, server=server, limits=limits)
    app = create_app(config, workers_factory=local_workers, workers_stop=None, keys=["key-cli"])
    with Server(app) as srv:
        srv.wait_ready()
        yield srv


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_api_keys(guarded: Server) -> None:
    url = guarded.url
    assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
    assert httpx.get(f"{url}/ready").status_code == 200
    for headers in ({}, bearer("wrong"), {"authorization": "Basic a2V5LW9uZQ=="},
                    {"authorization": "key-one"}):
        refused = httpx.post(f"{url}{G}", json=GOOD, headers=headers)
        assert_one_shape(refused, 401, None)
        assert refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["error"]["type"] == "authentication_error"
    for key in [*KEYS, "key-env", "key-cli"]:  # config, environment and command line
        assert httpx.post(f"{url}{G}", json=GOOD, headers=bearer(key)).status_code == 200
    assert_one_shape(httpx.get(f"{url}/metrics"), 401, None)  # auth_metrics: true
    assert httpx.get(f"{url}/metrics", headers=bearer("key-two")).status_code == 200
    assert_one_shape(httpx.get(f"{url}/docs", headers=bearer("key-one")), 404, None)  # docs off
    assert_one_shape(httpx.get(f"{url}/nope"), 401, None)  # no route map for strangers
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="key-one", max_retries=0)
    assert oai.models.list().data[0].id == "junction"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


def test_metrics_and_docs_open_by_default(client: httpx.Client) -> None:
    assert client.get("/metrics").status_code == 200
    assert client.get("/docs").status_code == 200
    assert client.get("/openapi.json").json()["info"]["title"] == "Junction"


def test_host_allow_list_and_cors(guarded: Server) -> None:
    url, key = guarded.url, bearer("key-one")
    rebinding = httpx.get(f"{url}/v1/models", headers={**key, "host": "evil.example"})
    assert_one_shape(rebinding, 400, None)
    assert "Host" in rebinding.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/models", headers={**key, "host": "localhost:8000"}).is_success
    preflight = httpx.options(f"{url}{C}", headers={
        "origin": "https://app.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.get(f"{url}/v1/models", headers={**key, "origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_no_cors_headers_by_default(client: httpx.Client) -> None:
    answer = client.get("/v1/models", headers={"origin": "https://app.example"})
    assert "access-control-allow-origin" not in answer.headers


def test_configured_body_limit(guarded: Server) -> None:
    head = (f"POST {G} HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            "authorization: Bearer key-one\r\ncontent-length: 1000001\r\n\r\n")
    answer = raw_http(guarded.port, head)
    assert b" 413 " in answer.split(b"\r\n", 1)[0], answer[:200]
    assert b"1000000 bytes" in answer


def test_guidance_context_is_checked_at_admission(guarded: Server) -> None:
    # The base reads "é" as one token, the guidance model as two plus its chat template:
    # within the base's context, past the guidance model's 512 with max_tokens 48.
    body = {"prompt": "é" * 240, "max_tokens": 48}
    key = bearer("key-one")
    assert httpx.post(f"{guarded.url}{G}", json=body, headers=key).status_code == 200
    refused = httpx.post(f"{guarded.url}{G}", json={**body, "policy": "blendin"}, headers=key)
    error = assert_one_shape(refused, 400, "max_tokens")
    assert "guidance model" in error["message"]
    assert guarded.app.state.gateway.engine.live == {}


def test_streams_still_parse(client: httpx.Client) -> None:
    with client.stream("POST", "/v1/generate_stream", json=GOOD) as response:
        names = [name for name, _ in sse(response)]
    assert names[-1] == "summary"


def test_keys_from_config_cli_env_and_secret_file(tmp_path, monkeypatch) -> None:
    secret = tmp_path / "keys"
    secret.write_text("# a comment\nfile-one\nfile-two, file-three\n")
    monkeypatch.setenv("JUNCTION_API_KEYS", "env-one,env-two")
    monkeypatch.setenv("JUNCTION_API_KEYS_FILE", str(secret))
    server = config_from_dict({"server": {"api_keys": ["config-one"]}}).server
    assert api_keys(server, ["cli-one"]) == [
        "config-one", "cli-one", "env-one", "env-two", "file-one", "file-two", "file-three"
    ]
    monkeypatch.delenv("JUNCTION_API_KEYS")
    monkeypatch.setenv("JUNCTION_API_KEYS_FILE", str(ROOT / "deploy" / "api-keys.empty"))
    assert api_keys(ServerConfig()) == []  # compose's default secret asks for no key
    with pytest.raises(ValueError, match="unknown"):
        config_from_dict({"server": {"api_key": "x"}})


def test_compose_and_k8s_give_the_gateway_its_keys_from_a_secret() -> None:
    spec = compose()
    gateway = spec["services"]["gateway"]
    [name] = gateway["secrets"]
    assert gateway["environment"]["JUNCTION_API_KEYS_FILE"] == f"/run/secrets/{name}"
    default = resolve_default(spec["secrets"][name]["file"])
    assert (ROOT / default).is_file()
    [source] = gateway_container()["envFrom"]
    assert source["secretRef"]["name"] == "junction-api-keys"
