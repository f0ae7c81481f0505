"""ASGI middleware of the server: the API key, the request counter and the body-size limit.

Plain ASGI classes rather than ``@app.middleware("http")``, for the reason given on
:class:`AuthAndCount`. Each answers its refusals in OpenAI's error shape.
"""

from __future__ import annotations

import json
import secrets

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import ServerMetrics
from .protocol import error_body

__all__ = ["AuthAndCount", "BodyLimit"]


class AuthAndCount:
    """ASGI middleware: the API key on every ``/v1`` route, and a request counter by status.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware
    hands the endpoint a receive channel on which a client's disconnect does not show, so
    a non-streaming request whose client hung up would decode to its end.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app = app
        self.api_key = api_key
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = _endpoint(path)
        if self.api_key and path.startswith("/v1/"):
            header = dict(scope.get("headers") or ()).get(b"authorization", b"")
            given = header[7:] if header[:7].lower() == b"bearer " else b""
            if not secrets.compare_digest(given, self.api_key.encode()):
                self.metrics.requests.labels(endpoint, "401").inc()
                body = json.dumps(
                    error_body(
                        "Incorrect or missing API key: send Authorization: Bearer KEY",
                        type="authentication_error",
                        code="invalid_api_key",
                    )
                ).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        status = {"code": 500}

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()


def _endpoint(path: str) -> str:
    """A bounded label for metrics (ids cut off)."""
    if path.startswith("/v1/controllers"):
        return "/v1/controllers"
    if path.startswith("/v1/models"):
        return "/v1/models"
    return path if path in ("/v1/completions", "/v1/chat/completions", "/health", "/metrics") else "other"


class _BodyTooLarge(StarletteHTTPException):
    """A body that grew past the limit while streaming in; the app's HTTPException handler answers it."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the {limit:,}-byte limit")


class BodyLimit:
    """ASGI middleware: refuse a body over the limit (413) by its Content-Length, or while it streams in."""

    def __init__(self, app: ASGIApp, limit: int, per_path: dict[str, int]) -> None:
        self.app = app
        self.limit = limit
        self.per_path = per_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope["path"].rstrip("/"), self.limit)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(send, limit)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)  # answered by the HTTPException handler
            return message

        await self.app(scope, limited_receive, send)


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps(
        error_body(f"request body exceeds the {limit:,}-byte limit", code="request_too_large")
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
