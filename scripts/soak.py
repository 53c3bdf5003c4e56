"""Load and soak a Junction gateway: concurrent clients, a mix of policies and routes, and the
memory of the gateway and of each Ray worker before and after; and how long admitted requests
waited for a slot (`junction_queue_wait_seconds`: a burst over `limits.max_concurrency` waits).

    python scripts/soak.py                          # starts `junction serve`, 16 x 200, stops it
    python scripts/soak.py --url http://host:8000   # an already running gateway
    python scripts/soak.py --config my.yaml --clients 8 --requests 64 --max-tokens 8

`--requests` is the total, shared by `--clients` concurrent clients. Requests cycle through
the policies the gateway serves (GET /info) and four routes: native JSON, native SSE,
OpenAI completions (streamed every other time) and OpenAI chat completions. Every request
must answer 200 with a complete body (an SSE stream must end with its summary or [DONE]).

Memory is the resident set size (RSS, from /proc: Linux) of the gateway process and of each
Ray actor process (`ray::BaseWorker`, ...), taken after a warm-up and again after the load.
With --url, the gateway's own RSS comes from its /metrics (process_resident_memory_bytes) and
the workers are the ray:: actor processes found on this machine, if any.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "The ocean is",
    "How do I make a cup of tea?",
    "Write one sentence about the moon.",
    "The best way to learn a language is",
    "List three colours:",
    "Why is the sky blue?",
]
ROUTES = ("generate", "generate_stream", "completions", "chat")
WORKER_TITLE = re.compile(r"ray::(\w+Worker)\b")


@dataclass
class Outcome:
    route: str
    policy: str
    stream: bool
    status: int | str  # HTTP status, or the exception's name
    seconds: float
    first_event: float | None = None  # streams: seconds to the first token event
    error: str = ""


@dataclass
class Plan:
    url: str
    policies: list[str]
    model: str | None
    max_tokens: int
    headers: dict[str, str] = field(default_factory=dict)

    def body(self, i: int) -> tuple[str, str, bool, str, dict]:
        """The i-th request: (route, policy, stream, path, JSON body)."""
        route = ROUTES[i % len(ROUTES)]
        policy = self.policies[(i // len(ROUTES)) % len(self.policies)]
        prompt = PROMPTS[i % len(PROMPTS)]
        sampling = {"max_tokens": self.max_tokens, "temperature": 0.8, "seed": i}
        if route in ("generate", "generate_stream"):
            return route, policy, route.endswith("stream"), f"/v1/{route}", {
                "prompt": prompt, "policy": policy, **sampling}
        stream = route == "chat" or i % 2 == 0
        body = {**sampling, "stream": stream, "junction": {"policy": policy}}
        if self.model:
            body["model"] = self.model
        if route == "chat":
            return route, policy, stream, "/v1/chat/completions", {
                **body, "messages": [{"role": "user", "content": prompt}]}
        return route, policy, stream, "/v1/completions", {**body, "prompt": prompt}


async def one_request(client: httpx.AsyncClient, plan: Plan, i: int) -> Outcome:
    route, policy, stream, path, body = plan.body(i)
    start = time.perf_counter()
    out = Outcome(route, policy, stream, 0, 0.0)
    try:
        if not stream:
            response = await client.post(path, json=body)
            out.status = response.status_code
            if response.status_code == 200 and not response.json():
                out.status, out.error = "empty", "empty body"
            elif response.status_code != 200:
                out.error = response.text[:200]
        else:
            async with client.stream("POST", path, json=body) as response:
                out.status = response.status_code
                ended = False
                async for line in response.aiter_lines():
                    if out.first_event is None and line.startswith("data:"):
                        out.first_event = time.perf_counter() - start
                    if line.startswith("event: error"):
                        out.status, out.error = "stream error", line
                    ended |= line.startswith("event: summary") or line == "data: [DONE]"
                if response.status_code == 200 and not ended and out.status == 200:
                    out.status, out.error = "truncated", "the stream ended without its summary"
    except httpx.HTTPError as exc:
        out.status, out.error = type(exc).__name__, str(exc)[:200]
    out.seconds = time.perf_counter() - start
    return out


async def run_load(plan: Plan, clients: int, total: int, first: int = 0) -> list[Outcome]:
    """`total` requests numbered from `first`, `clients` at a time (each client sequential)."""
    numbers = iter(range(first, first + total))
    outcomes: list[Outcome] = []
    timeout = httpx.Timeout(600.0, connect=10.0)
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(
        base_url=plan.url, timeout=timeout, limits=limits, headers=plan.headers
    ) as client:

        async def worker() -> None:
            for i in numbers:  # one shared iterator: each number is taken once
                outcomes.append(await one_request(client, plan, i))
                if len(outcomes) % max(1, total // 10) == 0:  # progress, for long soaks
                    print(f"{len(outcomes)}/{total} requests done", file=sys.stderr, flush=True)

        await asyncio.gather(*(worker() for _ in range(clients)))
    return outcomes


# --------------------------------------------------------------------- processes and memory
def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def ray_workers(root: int | None) -> dict[str, int]:
    """Actor processes by class name (ray::BaseWorker, ...): under `root`, or all of them."""
    everyone = {int(p.name) for p in Path("/proc").glob("[0-9]*")}
    candidates = descendants(root) if root else everyone
    found = {}
    for pid in candidates:
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        match = WORKER_TITLE.match(title)
        if match:
            found[match.group(1)] = pid
    return dict(sorted(found.items()))


def gateway_rss_from_metrics(plan: Plan) -> int | None:
    try:
        text = httpx.get(f"{plan.url}/metrics", headers=plan.headers, timeout=10).text
    except httpx.HTTPError:
        return None
    match = re.search(r"^process_resident_memory_bytes ([0-9.e+]+)$", text, re.M)
    return int(float(match.group(1))) if match else None


def memory(plan: Plan, gateway_pid: int | None) -> dict[str, int | None]:
    gateway = rss_bytes(gateway_pid) if gateway_pid else gateway_rss_from_metrics(plan)
    workers = {name: rss_bytes(pid) for name, pid in ray_workers(gateway_pid).items()}
    return {"gateway": gateway, **workers}


# --------------------------------------------------------------------- the server
def start_server(port: int, config: str | None, log: Path) -> subprocess.Popen:
    argv = [sys.executable, "-c", "from junction.cli import main; main()", "serve",
            "--host", "127.0.0.1", "--port", str(port)]
    if config:
        argv += ["--config", config]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, server: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            ready = httpx.get(f"{url}/ready", timeout=5)
            if ready.status_code == 200:
                return
            if ready.json().get("status") == "failed":
                raise SystemExit(f"the server failed to start: {ready.json().get('error')}")
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit(f"{url} was not ready within {timeout:.0f} s")


def stop_server(server: subprocess.Popen) -> list[int]:
    """Stop the server as Ctrl-C does; then end any process it started that outlived it (the
    local Ray's agents have been seen to) and return their pids."""
    started = descendants(server.pid)
    server.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    time.sleep(2)
    left = [pid for pid in started if Path(f"/proc/{pid}").exists() and rss_bytes(pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)
    return left


# --------------------------------------------------------------------- the queue
def queue_buckets(url: str, headers: dict) -> dict[float, float]:
    """The gateway's cumulative `junction_queue_wait_seconds` buckets (upper bound -> count)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    return {
        float(sample.labels["le"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "junction_queue_wait_seconds_bucket"
    }


def bucket_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """A quantile from cumulative buckets, interpolated as Prometheus' histogram_quantile."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0
    if not total:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return lower
            share = (rank - below) / (buckets[bound] - below) if buckets[bound] > below else 1
            return lower + (bound - lower) * share
        lower, below = bound, buckets[bound]
    return lower


def queue_waits(before: dict[float, float], after: dict[float, float]) -> dict:
    """The load's own waits for a slot: their count and p50 / p95 (seconds)."""
    during = {le: after[le] - before.get(le, 0.0) for le in after}
    count = during.get(float("inf"), 0.0)
    return {"count": int(count), "p50": bucket_quantile(0.5, during),
            "p95": bucket_quantile(0.95, during)}


# --------------------------------------------------------------------- the report
def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    if len(values) == 1:
        values = values * 2
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98], "max": max(values)}


def summary(outcomes: list[Outcome], wall: float, before: dict, after: dict) -> dict:
    ok = [o for o in outcomes if o.status == 200]
    statuses: dict[str, int] = {}
    for o in outcomes:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    by_kind = {
        kind: percentiles([o.seconds for o in ok if o.stream == stream])
        for kind, stream in (("non-streaming", False), ("streaming", True))
    }
    return {
        "requests": len(outcomes),
        "succeeded": len(ok),
        "statuses": statuses,
        "by_route": {r: sum(o.route == r for o in ok) for r in ROUTES},
        "by_policy": {p: sum(o.policy == p for o in ok) for p in sorted({o.policy for o in ok})},
        "wall_seconds": wall,
        "requests_per_second": len(outcomes) / wall if wall else 0.0,
        "latency_seconds": {"all": percentiles([o.seconds for o in ok]), **by_kind},
        "first_event_seconds": percentiles([o.first_event for o in ok if o.first_event]),
        "rss_before": before,
        "rss_after": after,
        "errors": [f"{o.route} {o.policy}: {o.status} {o.error}" for o in outcomes if o.error][:10],
    }


def markdown(result: dict) -> str:
    lines = [
        f"{result['succeeded']}/{result['requests']} succeeded {result['statuses']} in "
        f"{result['wall_seconds']:.0f} s ({result['requests_per_second']:.2f} requests/s)",
        "",
        "| latency (s) | p50 | p90 | p99 | max |",
        "|---|---|---|---|---|",
    ]
    rows = {**result["latency_seconds"], "first event (streams)": result["first_event_seconds"]}
    for name, p in rows.items():
        if p:
            lines.append(f"| {name} | {p['p50']:.2f} | {p['p90']:.2f} | {p['p99']:.2f} | "
                         f"{p['max']:.2f} |")
    lines += ["", "| process | RSS before (MiB) | RSS after (MiB) | change |", "|---|---|---|---|"]
    for name, before in result["rss_before"].items():
        after = result["rss_after"].get(name)
        if before and after:
            lines.append(f"| {name} | {before / 2**20:.0f} | {after / 2**20:.0f} | "
                         f"{(after - before) / before:+.2%} |")
    waits = result.get("queue_wait_seconds") or {}
    if waits.get("count"):
        lines += ["", f"{waits['count']} requests admitted; wait for a slot p50 "
                  f"{waits['p50']:.2f} s, p95 {waits['p95']:.2f} s (from the gateway's buckets)"]
    if result.get("processes_left_after_stop"):
        lines += ["", f"{result['processes_left_after_stop']} process(es) of the server outlived "
                  "it and were killed"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="A running gateway; default: start one.")
    parser.add_argument("--config", help="Config file for the gateway this command starts.")
    parser.add_argument("--port", type=int, default=8077)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=200, help="Total requests.")
    parser.add_argument("--warmup", type=int, default=16, help="Requests before 'before' RSS.")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--policies", help="Comma-separated; default: all the gateway serves.")
    parser.add_argument("--api-key", default=os.environ.get("JUNCTION_API_KEY"))
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--json", type=Path, help="Also write the full result here.")
    args = parser.parse_args()

    server = None
    url = args.url or f"http://127.0.0.1:{args.port}"
    if args.url is None:
        server = start_server(args.port, args.config, Path(f"soak-server-{args.port}.log"))
    try:
        wait_ready(url, server, args.ready_timeout)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        info = httpx.get(f"{url}/info", headers=headers, timeout=30).json()
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
        model = models.json()["data"][0]["id"] if models.status_code == 200 else None
        policies = args.policies.split(",") if args.policies else list(info["policies"])
        plan = Plan(url, policies, model, args.max_tokens, headers)
        asyncio.run(run_load(plan, args.clients, args.warmup, first=10**6))
        before = memory(plan, server.pid if server else None)
        waited = queue_buckets(url, headers)
        start = time.perf_counter()
        outcomes = asyncio.run(run_load(plan, args.clients, args.requests))
        wall = time.perf_counter() - start
        waits = queue_waits(waited, queue_buckets(url, headers))
        time.sleep(2)  # let finished requests free their caches
        after = memory(plan, server.pid if server else None)
    finally:
        left = stop_server(server) if server is not None else []
    result = summary(outcomes, wall, before, after)
    result["processes_left_after_stop"] = len(left)
    result["queue_wait_seconds"] = waits
    result["settings"] = {k: v for k, v in vars(args).items() if k != "api_key"} | {
        "policies": policies, "json": str(args.json) if args.json else None}
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0 if result["succeeded"] == result["requests"] else 1)


if __name__ == "__main__":
    main()
