"""What every HTTP request passes before a route sees it: Host allow-list, API keys, body size.

One plain ASGI middleware (so streamed responses pass untouched), answering in the one error
shape of `junction.gateway.errors`:

- **Host**: with `server.allowed_hosts` other than `["*"]`, a request whose Host header is not
  listed gets 400 (a DNS-rebinding page cannot reach a server bound to localhost). Patterns
  as starlette's TrustedHostMiddleware: `example.com`, `*.example.com`.
- **API keys**: with keys configured, every route but the open ones needs
  `Authorization: Bearer <key>`; otherwise 401 with `WWW-Authenticate: Bearer`. Keys are
  compared in constant time, against every key (the time does not say which key is close).
- **Body size**: a `Content-Length` over the limit is refused before one byte of the body is
  read; a chunked body is counted as it streams in and refused once it passes the limit.
"""

from __future__ import annotations

import hmac
import os

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from junction.gateway.errors import ApiError, error_response
from junction.shared.config import ServerConfig

KEYS_ENV = "JUNCTION_API_KEYS"
ALWAYS_OPEN = frozenset({"/health", "/ready"})  # probes carry no credentials


def api_keys(server: ServerConfig, cli_keys: list[str] | None = None) -> list[str]:
    """The keys from the config, the command line, JUNCTION_API_KEYS and the file named by
    JUNCTION_API_KEYS_FILE (a mounted secret: keys by line or comma, # comments), together."""
    text = os.environ.get(KEYS_ENV, "")
    path = os.environ.get(f"{KEYS_ENV}_FILE")
    if path:
        with open(path) as f:
            lines = [line for line in f.read().splitlines() if not line.lstrip().startswith("#")]
        text += "," + ",".join(lines)
    from_env = [k.strip() for k in text.split(",") if k.strip()]
    return list(dict.fromkeys([*server.api_keys, *(cli_keys or []), *from_env]))


def key_matches(given: str, keys: list[bytes]) -> bool:
    """Constant-time comparison against every key (no early exit on a match)."""
    candidate = given.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate, key)
    return found


def host_allowed(host: str, patterns: list[str]) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host  # drop the port
    for pattern in patterns:
        if pattern == "*" or name == pattern:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
    return False


class BodyTooLarge(HTTPException):
    """Raised from `receive` while a route reads its body; FastAPI passes HTTPExceptions on."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")


class Guard:
    def __init__(self, app: ASGIApp, server: ServerConfig, keys: list[str]) -> None:
        self.app = app
        self.hosts = list(server.allowed_hosts)
        self.keys = [k.encode() for k in keys]
        self.limit = server.max_body_bytes
        self.open = set(ALWAYS_OPEN)
        if not server.auth_metrics:
            self.open.add("/metrics")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await error_response(refusal)(scope, receive, send)
            return
        await self.app(scope, self._limited(receive), send)

    def _refusal(self, scope: Scope) -> ApiError | None:
        headers = Headers(scope=scope)
        if "*" not in self.hosts and not host_allowed(headers.get("host", ""), self.hosts):
            return ApiError(400, "invalid Host header")
        if self.keys and scope["path"] not in self.open:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not key_matches(token.strip(), self.keys):
                return ApiError(
                    401, "a valid API key is required (Authorization: Bearer <key>)",
                    headers={"WWW-Authenticate": "Bearer"}, code="invalid_api_key",
                )
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return ApiError(413, f"the request body is larger than {self.limit} bytes")
        return None

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        return counted
