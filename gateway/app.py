"""The HTTP gateway: native and OpenAI-compatible routes over the engine, plus operations.

`create_app(config)` returns a FastAPI app whose lifespan starts the workers (Ray actors by
default) and the engine in the background, so /health answers at once and /ready turns 200
when every model has loaded. The gateway owns HTTP, validation, limits and metrics; the
workers own all compute.

Errors, every one of them, are `{"error": {"message", "type", "param", "code"}}` (see
`gateway.errors`; `field` repeats `param`). Bad fields: 400 (or 422 from pydantic, with the
field's path); no or a wrong API key: 401; unknown model or route: 404; body too large: 413;
too many live requests: 429 with Retry-After; not ready yet: 503. Before any route, the
`gateway.guard` middleware checks the Host header, the API key and the body size.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.best_of import ValueScorer, best_of_n, seeded_copies
from gateway.engine import Engine, EngineOverloaded, WorkerDown
from gateway.errors import (
    ApiError,
    api_error,
    bad_request,
    error_body,
    http_error,
    server_error,
    validation_error,
)
from gateway.guard import Guard, api_keys
from gateway.local import local_handles
from gateway.metrics import Metrics
from gateway.openai_api import Reply, merged, sse, stream_events
from gateway.schemas import ChatCompletionBody, CompletionBody, GenerateBody, OpenAIBody
from gateway.sequence import GenerationRequest, Sequence
from services.actors import WorkerUnavailable, configured_roles, shutdown_workers, start_workers
from services.handles import Handle
from shared.config import POLICIES, JunctionConfig, PolicyConfig
from shared.types import GenerationResult, StepLogprobs, TokenEvent

SERVICE_MODEL = "junction"  # the model name every OpenAI route accepts, besides the base's

log = logging.getLogger(__name__)

WorkersFactory = Callable[[JunctionConfig], Awaitable[dict[str, Handle]]]
WorkersStop = Callable[[dict[str, Handle]], None]


async def local_workers(config: JunctionConfig) -> dict[str, Handle]:
    """Workers inside the gateway process (no Ray): each runner loads in a thread."""

    return await asyncio.to_thread(local_handles, config, configured_roles(config), False)


# --------------------------------------------------------------------- metrics middleware
class RequestMetrics:
    """Counts every response by route template and status (plain ASGI, so streams pass)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            self.metrics.observe_request(getattr(route, "path", "unmatched"), status)


# --------------------------------------------------------------------- gateway state
@dataclass
class Gateway:
    config: JunctionConfig
    factory: WorkersFactory
    stop: WorkersStop | None
    metrics: Metrics
    engine: Engine | None = None
    workers: dict[str, Handle] = field(default_factory=dict)
    error: str | None = None
    started: float = field(default_factory=time.time)

    async def boot(self) -> None:
        """Start the workers and the engine; a failure is kept for /ready to report."""
        try:
            self.workers = await self.factory(self.config)
            engine = Engine(self.workers, self.config.limits, self.metrics)
            await engine.start()
            self.engine = engine
            log.info("ready: %s", ", ".join(sorted(self.workers)))
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            # One line an operator can act on; the traceback only when debugging.
            log.error("the gateway failed to start its workers: %s", self.error)
            log.debug("worker start failure", exc_info=True)

    async def shutdown(self) -> None:
        """Stop the engine, then the workers (and a Ray this gateway started), even mid-boot."""
        if self.engine is not None:
            await self.engine.close()
        if self.stop is not None:
            self.stop(self.workers)

    def ready_engine(self) -> Engine:
        if self.engine is None or self.engine.stopped:
            if self.engine is not None:
                detail = f"failed: {self.engine.stopped}"
            else:
                detail = f"failed: {self.error}" if self.error else "models are loading"
            raise ApiError(503, f"not ready ({detail})", kind="unavailable",
                           headers={"Retry-After": "5"})
        return self.engine

    def policies(self) -> list[str]:
        """Policies whose models are all loaded and up."""
        roles = {p: GenerationRequest(prompt="", policy=PolicyConfig(p)).roles for p in POLICIES}
        up = set(self.workers) - set(self.engine.down if self.engine else {})
        return [p for p in POLICIES if all(r in up for r in roles[p])]

    def model_names(self) -> list[str]:
        """The names OpenAI clients may send as `model`: "junction" and the base model's."""
        return list(dict.fromkeys([SERVICE_MODEL, self.ready_engine().infos["base"].name]))

    def check_model(self, model: str | None) -> str:
        """The model name to answer with; an unknown one is 404, as vLLM answers."""
        names = self.model_names()
        if model is None:
            return names[-1]
        if model not in names:
            raise ApiError(404, f"the model `{model}` does not exist; served: "
                           f"{', '.join(names)} (GET /v1/models)", "model",
                           code="model_not_found")
        return model


# --------------------------------------------------------------------- request helpers
def build(body: GenerateBody | CompletionBody | ChatCompletionBody, cap: int) -> GenerationRequest:
    """A body's engine request; every refusal is a 400 naming the field, before any work."""
    try:
        return body.generation_request(cap)
    except ValueError as exc:
        raise bad_request(exc) from exc


async def admit(engine: Engine, reqs: list[GenerationRequest]) -> list[Sequence]:
    """Submit requests (the n choices of one body) together, turning refusals into HTTP
    errors.

    Together: their opens leave in one call, and they take their first step in one tick
    (`Engine._join_admissions`). Submitted one after another, each started a call later.
    All or none: when one is refused, the others are cancelled, admitted or not.
    """
    submits = [asyncio.ensure_future(engine.submit(req)) for req in reqs]
    try:
        await asyncio.gather(*submits)
        return [submit.result() for submit in submits]
    except BaseException as exc:
        for submit in submits:
            if not submit.done():
                submit.cancel()  # an open answered for nobody is closed again (`Engine`)
            elif not submit.cancelled() and submit.exception() is None:
                engine.cancel(submit.result())
        if isinstance(exc, EngineOverloaded):
            retry = {"Retry-After": str(exc.retry_after)}
            raise ApiError(429, str(exc), headers=retry) from exc
        if isinstance(exc, WorkerDown):  # a new worker is starting in place of a dead one
            raise ApiError(503, str(exc), kind="unavailable",
                           headers={"Retry-After": str(exc.retry_after)}) from exc
        if isinstance(exc, WorkerUnavailable):  # an actor is restarting after its process died
            raise ApiError(503, "a worker is unavailable; retry later",
                           headers={"Retry-After": "5"}) from exc
        if isinstance(exc, ValueError):
            raise bad_request(exc) from exc
        raise


async def _cancel_on_disconnect(request: Request, engine: Engine, seqs: list[Sequence]) -> None:
    # The body has been read, so the next message is the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for seq in seqs:
        engine.cancel(seq)


async def _collect(engine: Engine, seq: Sequence) -> tuple[GenerationResult, list[StepLogprobs]]:
    steps = []
    async for item in engine.stream(seq):
        if isinstance(item, TokenEvent):
            if item.logprobs is not None:
                steps.append(item.logprobs)
            continue
        if item.finish_reason == "error":
            raise ApiError(500, seq.error or "generation failed", kind="server_error")
        return item, steps
    raise RuntimeError("stream ended without a result")


async def results_of(
    request: Request, engine: Engine, seqs: list[Sequence]
) -> list[tuple[GenerationResult, list[StepLogprobs]]]:
    """Wait for requests' results (and logprobs); a client that goes away cancels them."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, engine, seqs))
    try:
        return list(await asyncio.gather(*(_collect(engine, s) for s in seqs)))
    finally:
        watcher.cancel()
        for seq in seqs:
            engine.cancel(seq)


async def cancel_when_closed(engine: Engine, seqs: list[Sequence], events: AsyncIterator[dict]):
    """Pass a stream's events on; when the client disconnects, the requests are cancelled."""
    try:
        async for event in events:
            yield event
    finally:
        for seq in seqs:
            engine.cancel(seq)


# The native route's token event: every field but logprobs (the native route does not ask).
TOKEN_EVENT_FIELDS = tuple(f.name for f in fields(TokenEvent) if f.name != "logprobs")


async def native_events(engine: Engine, seq: Sequence) -> AsyncIterator[bytes]:
    """/v1/generate_stream: a `token` event per step, then `summary` (after `error` if any).

    The events of a burst (the steps a run-ahead brought at once) go out as one chunk: each
    is still its own SSE event, but one write and one read serve them all, where a write per
    event cost the gateway and the client more than the whole step on a fast model.
    """
    async for items in engine.bursts(seq):
        yield b"".join(_encoded(seq, item) for item in items)


def _encoded(seq: Sequence, item: TokenEvent | GenerationResult) -> bytes:
    if isinstance(item, TokenEvent):
        # Shallow (every field but logprobs is a plain value): `asdict` recurses into
        # each value and cost ~80 µs per token event, at every step of every stream.
        event = {name: getattr(item, name) for name in TOKEN_EVENT_FIELDS}
        return sse(json.dumps(event, ensure_ascii=False), "token")
    error = b""
    if item.finish_reason == "error":
        body = error_body(seq.error or "generation failed", kind="server_error")
        error = sse(json.dumps(body), "error")
    return error + sse(json.dumps(item.to_json(), ensure_ascii=False), "summary")


def check_openai(gateway: Gateway, body: OpenAIBody) -> str:
    """What an OpenAI body asks that no engine request can say; returns the model to name."""
    model = gateway.check_model(body.model)
    unsupported = body.unsupported()
    if unsupported is not None:
        raise ApiError(400, f"{unsupported}: not supported by Junction", unsupported)
    max_n = gateway.config.limits.max_n
    if body.n > max_n:
        raise ApiError(400, f"n: at most {max_n}", "n")
    if body.n > 1 and (body.best_of or 1) > 1:
        raise ApiError(400, "n: with best_of, n must be 1 (the best one is returned)", "n")
    if (body.best_of or 1) > 1 and body.logprobs_wanted is not None:
        raise ApiError(400, "logprobs: not with best_of", "logprobs")
    return model


def best_of_requested(body: GenerateBody | OpenAIBody, max_n: int, stream: bool) -> int:
    """N for Best-of-N (1 = a plain request), checked against the limit."""
    n = body.best_of or 1
    if n > max_n:
        raise ApiError(400, f"best_of: at most {max_n}", "best_of")
    if n > 1 and stream:
        raise ApiError(400, "best_of: the best is known only at the end; not with stream",
                       "best_of")
    return n


async def best_result(engine: Engine, req: GenerationRequest, n: int) -> GenerationResult:
    """N sampled completions through the engine, the best by the value model."""
    try:
        best, _ = await best_of_n(engine, req, n, ValueScorer())
    except EngineOverloaded as exc:
        retry = {"Retry-After": str(exc.retry_after)}
        raise ApiError(429, str(exc), headers=retry) from exc
    except WorkerDown as exc:
        retry = {"Retry-After": str(exc.retry_after)}
        raise ApiError(503, str(exc), kind="unavailable", headers=retry) from exc
    except ValueError as exc:
        message = str(exc)
        if message.startswith("best-of-N by value") or message.startswith("n:"):
            raise ApiError(400, f"best_of: {message.removeprefix('n: ')}", "best_of") from exc
        raise bad_request(exc) from exc
    if best.finish_reason == "error":
        raise ApiError(500, "every best-of-N completion failed", kind="server_error")
    return best


# --------------------------------------------------------------------- the app
def create_app(
    config: JunctionConfig,
    workers_factory: WorkersFactory = start_workers,
    workers_stop: WorkersStop | None = shutdown_workers,
    metrics: Metrics | None = None,
    keys: list[str] | None = None,
) -> FastAPI:
    """The gateway app; `keys` are API keys besides the config's and JUNCTION_API_KEYS."""
    gateway = Gateway(config, workers_factory, workers_stop, metrics or Metrics())
    server = config.server

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        boot = asyncio.create_task(gateway.boot())
        try:
            yield
        finally:
            boot.cancel()
            await asyncio.gather(boot, return_exceptions=True)
            await gateway.shutdown()

    docs = {} if server.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="Junction", version="0.1.0", lifespan=lifespan, **docs)
    app.state.gateway = gateway
    # Added innermost first: metrics see every answer, CORS answers preflights before the
    # guard asks them for a key.
    app.add_middleware(Guard, server=server, keys=api_keys(server, keys))
    if server.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(server.cors_origins), allow_methods=["*"],
            allow_headers=["*"],
        )
    app.add_middleware(RequestMetrics, metrics=gateway.metrics)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)
    _operations_routes(app, gateway)
    _native_routes(app, gateway)
    _openai_routes(app, gateway)
    return app


def _operations_routes(app: FastAPI, gateway: Gateway) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness: red only when a restart of the process is the cure (a dead decode loop);
        loading models or a worker being replaced are for /ready."""
        engine = gateway.engine
        if engine is not None and engine.stopped:
            return JSONResponse({"status": "failed", "error": engine.stopped}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: every model loaded, every role up and the decode loop running."""
        engine = gateway.engine
        if engine is not None and engine.stopped:
            return JSONResponse({"status": "failed", "error": engine.stopped}, status_code=503)
        if engine is not None and engine.down:
            return JSONResponse({"status": "degraded", "down": engine.down}, status_code=503)
        if engine is not None:
            return JSONResponse({"status": "ready"})
        status = {"status": "failed", "error": gateway.error} if gateway.error else {
            "status": "loading"
        }
        return JSONResponse(status, status_code=503)

    @app.get("/info")
    async def info() -> dict:
        engine = gateway.ready_engine()
        roles = [r for r in gateway.workers if r not in engine.down]
        counts = await asyncio.gather(
            *(gateway.workers[r].call("live") for r in roles), return_exceptions=True
        )
        live = {r: None for r in gateway.workers}  # None: the worker does not answer
        live |= {r: n for r, n in zip(roles, counts, strict=True) if isinstance(n, int)}
        return {
            "models": {role: asdict(model) for role, model in engine.infos.items()},
            "policies": gateway.policies(),
            "down": engine.down,
            "limits": asdict(gateway.config.limits),
            "sia": engine.sia_info(),  # target_ratio: calibrated thresholds or running quantile
            "live": {"requests": len(engine.live), "workers": live},
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        engine = gateway.engine
        gateway.metrics.set_active(len(engine.live) if engine else 0)
        body, content_type = gateway.metrics.render()
        return Response(body, media_type=content_type)


def _native_routes(app: FastAPI, gateway: Gateway) -> None:
    @app.post("/v1/generate")
    async def generate(body: GenerateBody, request: Request) -> dict:
        engine = gateway.ready_engine()
        n = best_of_requested(body, gateway.config.limits.max_n, stream=False)
        req = build(body, engine.limits.max_tokens)
        if n > 1:
            return (await best_result(engine, req, n)).to_json()
        [(result, _)] = await results_of(request, engine, await admit(engine, [req]))
        return result.to_json()

    @app.post("/v1/generate_stream")
    async def generate_stream(body: GenerateBody) -> EventSourceResponse:
        engine = gateway.ready_engine()
        best_of_requested(body, gateway.config.limits.max_n, stream=True)
        [seq] = await admit(engine, [build(body, engine.limits.max_tokens)])
        return EventSourceResponse(cancel_when_closed(engine, [seq], native_events(engine, seq)))


def _openai_routes(app: FastAPI, gateway: Gateway) -> None:
    async def complete(body: CompletionBody | ChatCompletionBody, request: Request) -> Any:
        engine = gateway.ready_engine()
        model = check_openai(gateway, body)
        best = best_of_requested(body, gateway.config.limits.max_n, stream=body.stream)
        req = build(body, engine.limits.max_tokens)
        chat = isinstance(body, ChatCompletionBody)
        reply = Reply(chat=chat, model=model, logprobs=body.logprobs_wanted is not None)
        if best > 1:
            return reply.response([await best_result(engine, req, best)])
        seqs = await admit(engine, seeded_copies(req, body.n) if body.n > 1 else [req])
        if body.stream:
            items = merged([engine.bursts(s) for s in seqs])
            events = stream_events(reply, items, seqs, body.include_usage)
            return EventSourceResponse(cancel_when_closed(engine, seqs, events))
        done = await results_of(request, engine, seqs)
        return reply.response([r for r, _ in done], [steps for _, steps in done])

    @app.get("/v1/models")
    async def models() -> dict:
        created = int(gateway.started)
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "junction"}
                for name in gateway.model_names()
            ],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Any:
        return await complete(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody, request: Request) -> Any:
        return await complete(body, request)
