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
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from junction.gateway.best_of import seeded_copies
from junction.gateway.engine import Engine
from junction.gateway.errors import (
    ApiError,
    api_error,
    http_error,
    server_error,
    validation_error,
)
from junction.gateway.guard import Guard, api_keys
from junction.gateway.local import local_handles
from junction.gateway.metrics import Metrics
from junction.gateway.openai_api import Reply, merged, stream_events
from junction.gateway.schemas import ChatCompletionBody, CompletionBody, GenerateBody
from junction.gateway.sequence import GenerationRequest
from junction.gateway.serving import (
    admit,
    best_of_requested,
    best_result,
    build,
    cancel_when_closed,
    check_openai,
    native_events,
    results_of,
)
from junction.services.actors import (
    configured_roles,
    shutdown_workers,
    start_workers,
)
from junction.services.handles import Handle
from junction.services.protocol import Worker
from junction.shared.config import POLICIES, JunctionConfig, PolicyConfig

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
            *(gateway.workers[r].call(Worker.live) for r in roles), return_exceptions=True
        )
        live = {r: None for r in gateway.workers}  # None: the worker does not answer
        live |= {r: n for r, n in zip(roles, counts, strict=True) if isinstance(n, int)}
        return {
            "models": {role: asdict(model) for role, model in engine.infos.items()},
            "policies": gateway.policies(),
            "down": engine.down,
            "limits": asdict(gateway.config.limits),
            **engine.info(),  # e.g. "sia": how target_ratio finds its threshold
            "live": {"requests": len(engine.live), "workers": live},
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        engine = gateway.engine
        gateway.metrics.set_active(len(engine.live) if engine else 0,
                                   engine.queued if engine else 0)
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
