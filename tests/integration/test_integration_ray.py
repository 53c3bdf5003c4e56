"""The gateway over real Ray with tiny models: a worker that is dead for good, and shutdown.

- A worker whose Ray restarts are used up: its in-flight request fails within the bound with
  a clear error, /ready and /info report the role as down, new requests get 503, and a new
  worker brings the role back (/ready green again).
- `junction serve`, stopped by SIGTERM or SIGINT, leaves no process of the Ray it started.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import psutil
import pytest
import ray
import yaml

from junction.gateway.app import create_app
from junction.gateway.engine import Engine
from junction.gateway.local import local_handles
from junction.gateway.sequence import GenerationRequest
from junction.shared.config import JunctionConfig, Limits, ModelSpec, PolicyConfig, SamplingParams
from tests.gateway.test_api import PROMPT, Server, free_port, sse, wait_for

RECOVERY_SECONDS = 1.0  # how long a request waits for its worker before it fails
RESTARTS = 1  # Ray's restarts of the base worker (3 by default): one is used up, then it dies


@pytest.fixture(scope="module")
def ray_config(tiny_gemma, tiny_llama) -> JunctionConfig:
    return JunctionConfig(
        base=ModelSpec(source=str(tiny_gemma.path), device="cpu", threads=1,
                       max_restarts=RESTARTS),
        guidance=ModelSpec(source=str(tiny_llama.path), device="cpu", threads=1),
        value=None,
        limits=Limits(max_prompt_tokens=64, max_tokens=400, max_concurrency=4,
                      recovery_seconds=RECOVERY_SECONDS),
    )


@pytest.fixture(scope="module")
def ray_server(ray_config: JunctionConfig) -> Iterator[Server]:
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False)
    try:
        with Server(create_app(ray_config)) as srv:  # the default workers: Ray actors
            srv.wait_ready(timeout=300)
            yield srv
    finally:
        if started:
            ray.shutdown()


def answers(actor) -> bool:
    try:
        ray.get(actor.live.remote(), timeout=10)
        return True
    except Exception:  # noqa: BLE001 - restarting, or dead
        time.sleep(0.1)
        return False


def test_served_over_ray_with_run_ahead_equals_the_in_process_loop_step_by_step(
    ray_server, ray_config
):
    """The actors run ahead (the default `limits.run_ahead`); the same seeded requests on
    in-process runners taking one step per call give the same text, steps and junctions,
    and every token still streams as its own event. Over Ray BlendIn's guidance also steps
    with the base after a confidence junction (`Engine._overlapped`); in process it does not."""
    local = replace(ray_config, limits=replace(ray_config.limits, run_ahead=0))
    handles = local_handles(local, ("base", "guidance"), progress=False)

    async def in_process(bodies: list[dict]) -> list[list]:
        engine = Engine(handles, local.limits)
        await engine.start()
        try:
            out = []
            for body in bodies:
                seq = await engine.submit(generation_request(body))
                out.append([item async for item in engine.stream(seq)])
            return out
        finally:
            await engine.close()

    # τ = the base's median top-1 probability here: about half the BlendIn steps are junctions
    (probe,) = asyncio.run(in_process([{"prompt": PROMPT, "max_tokens": 12, "policy": "base"}]))
    tau = statistics.median(e.top1_prob for e in probe[:-1])
    bodies = [
        {"prompt": PROMPT, "max_tokens": 24, "policy": "base", "temperature": 1.0, "seed": 3},
        {"prompt": PROMPT, "max_tokens": 24, "policy": "base"},
        {"prompt": PROMPT, "max_tokens": 12, "policy": "blendin", "tau": tau, "seed": 5,
         "temperature": 0.7},
    ]
    served = []
    for body in bodies:
        with httpx.stream("POST", f"{ray_server.url}/v1/generate_stream", json=body,
                          timeout=60) as response:
            events = list(sse(response))
        tokens = [json.loads(data) for name, data in events if name == "token"]
        summary = json.loads(events[-1][1])
        assert len(tokens) == summary["junction"]["steps"]
        assert "".join(t["text"] for t in tokens) == summary["text"]
        served.append(summary)
    for summary, items in zip(served, asyncio.run(in_process(bodies)), strict=True):
        result = items[-1]
        assert summary["text"] == result.text
        assert summary["junction"]["steps"] == result.steps
        assert summary["junction"]["interventions"] == result.interventions
    assert 0 < served[2]["junction"]["interventions"] < served[2]["junction"]["steps"]


def generation_request(body: dict) -> GenerationRequest:
    options = {k: body[k] for k in ("tau",) if k in body}
    sampling = {k: body[k] for k in ("max_tokens", "temperature", "seed") if k in body}
    return GenerationRequest(prompt=body["prompt"], sampling=SamplingParams(**sampling),
                             policy=PolicyConfig(policy=body["policy"], **options))


def test_a_worker_dead_for_good_fails_its_request_is_reported_and_comes_back(ray_server):
    url = ray_server.url
    handle = ray_server.app.state.gateway.workers["base"]
    actor = handle.actor
    for _ in range(RESTARTS):  # use up Ray's restarts, one process death at a time
        ray.kill(actor, no_restart=False)
        wait_for(lambda: not answers(actor), 30, "the killed actor still answers")
        wait_for(lambda: answers(actor), 300, "Ray did not restart the actor")
    assert httpx.get(f"{url}/ready").status_code == 200

    body = {"prompt": PROMPT, "max_tokens": 400, "policy": "base"}

    def stream_and_kill() -> tuple[list, float]:
        with httpx.stream("POST", f"{url}/v1/generate_stream", json=body, timeout=60) as response:
            events = sse(response)
            assert next(events)[0] == "token"
            ray.kill(actor, no_restart=False)  # one death more than Ray restarts
            killed = time.monotonic()
            rest = [(name, data) for name, data in events if name != "token"]
            return rest, time.monotonic() - killed

    # A request that "recovers" forever would hold its stream open (SSE pings): bound it here.
    pool = ThreadPoolExecutor(1)
    try:
        rest, waited = pool.submit(stream_and_kill).result(timeout=RECOVERY_SECONDS + 60)
    finally:
        pool.shutdown(wait=False)
    assert [name for name, _ in rest] == ["error", "summary"]
    message = json.loads(rest[0][1])["error"]["message"]
    assert message.startswith("base worker failed: gave up after") and "\n" not in message
    assert json.loads(rest[1][1])["finish_reason"] == "error"
    assert waited < RECOVERY_SECONDS + 10  # bounded: not "recovering" forever

    # The role is down while a new worker loads: /ready red, /info says so, 503 for requests.
    ready = httpx.get(f"{url}/ready")
    assert ready.status_code == 503 and set(ready.json()["down"]) == {"base"}
    info = httpx.get(f"{url}/info")
    assert info.status_code == 200 and set(info.json()["down"]) == {"base"}
    assert info.json()["live"]["workers"]["base"] is None
    assert "base" not in info.json()["policies"]
    refused = httpx.post(f"{url}/v1/generate", json={"prompt": PROMPT, "max_tokens": 2})
    assert refused.status_code == 503
    assert "base worker is down" in refused.json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 200  # liveness: no need to restart

    # A new worker brings the role back.
    wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, 300, "base did not come back")
    assert handle.actor is not actor
    done = httpx.post(f"{url}/v1/generate", json={"prompt": PROMPT, "max_tokens": 3}, timeout=60)
    assert done.status_code == 200 and done.json()["finish_reason"] == "length"
    info = httpx.get(f"{url}/info").json()
    assert info["down"] == {} and info["live"]["workers"] == {"base": 0, "guidance": 0}


# --------------------------------------------------------------------- shutdown
def ray_processes(root: psutil.Process) -> list[psutil.Process]:
    return [p for p in root.children(recursive=True) if _is_ray(p)]


def _is_ray(proc: psutil.Process) -> bool:
    try:
        command = " ".join(proc.cmdline())
        return proc.name() in ("gcs_server", "raylet") or command.startswith("ray::") or (
            "packages/ray/" in command
        )
    except psutil.Error:
        return False


def running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def in_group(pgid: int) -> list[psutil.Process]:
    """Live processes of a process group (the server's session: whatever it started)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and running(proc):
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_leaves_no_ray_process_behind(tiny_gemma, tiny_llama, tmp_path: Path, stop):
    config = {
        "base": {"source": str(tiny_gemma.path), "device": "cpu", "threads": 1},
        "guidance": {"source": str(tiny_llama.path), "device": "cpu", "threads": 1},
        "value": None,
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                         env.get("PYTHONPATH", "")])
    server = subprocess.Popen(
        [sys.executable, "-m", "junction.cli", "serve", "--port", str(port),
         "--config", str(tmp_path / "tiny.yaml")],
        env=env, start_new_session=True,  # its own process group: all it starts, and no more
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        def ready() -> bool:
            assert server.poll() is None, "the server exited"
            try:
                return httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, 300, "the server did not become ready")
        started = ray_processes(psutil.Process(server.pid))
        names = {p.name() for p in started}
        assert {"gcs_server", "raylet"} <= names and any("Agent" in n for n in names)
        server.send_signal(stop)
        server.wait(60)
        deadline = time.monotonic() + 10
        while any(running(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [p.name() for p in started if running(p)] == []
        assert in_group(server.pid) == []
    finally:
        if server.poll() is None:
            server.kill()
        for proc in in_group(server.pid):  # only what this test started: its own group
            proc.kill()
