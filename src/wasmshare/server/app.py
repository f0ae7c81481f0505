"""The FastAPI application: OpenAI's completions and chat endpoints plus controller upload.

Routes: ``GET /health``, ``GET /metrics``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions``, and ``POST/GET/DELETE /v1/controllers[/{id}]``. Every error
is an OpenAI-style body (``{"error": {"message", "type", "param", "code"}}``), so OpenAI
clients raise their usual exceptions. With an API key configured, every ``/v1`` route needs
``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import APIError, ControllerRejected, Overloaded, WasmshareError
from ..llm import constraints as C
from ..llm.constraints import Backend, ConstraintSpec
from ..llm.controller import Controller
from ..llm.controller_store import ControllerStore
from ..llm.limits import DEFAULT_DEADLINE_MS
from ..llm.requests import GenerationRequest, GenerationResult, StallPolicy, default_max_work
from ._middleware import AuthAndCount, BodyLimit
from .controller_routes import add_controller_routes
from .protocol import ChatCompletionRequest, CompletionRequest, error_body, new_id, now
from .service import EngineService, Ticket, TokenEvent

__all__ = ["ServerConfig", "create_app"]

log = logging.getLogger("wasmshare.server")

_FINISH = {"stop": "stop", "length": "length", "controller": "stop", "cancelled": "stop", "error": "error"}


@dataclass
class ServerConfig:
    """What ``wasmshare serve`` can be told; every limit has a sensible default."""

    api_key: str | None = None
    max_concurrent: int = 8
    max_waiting: int = 256
    max_tokens: int = 1024
    default_max_tokens: int = 256
    max_body_bytes: int = 1 << 20
    max_controller_bytes: int = 8 << 20
    controller_deadline_ms: float = DEFAULT_DEADLINE_MS
    max_prompt_tokens: int = 8192
    controller_compile_s: float = 10.0
    controllers_dir: Path | None = None
    grammar_backend: Backend = "llguidance"
    served_model_name: str | None = None
    stall_policy: StallPolicy = "sit_out"
    step_budget_ms: float | None = None


def create_app(service: EngineService, store: ControllerStore, config: ServerConfig) -> FastAPI:
    """The ASGI app serving ``service``'s model; ``store`` holds uploaded controllers."""
    model_name = config.served_model_name or service.loaded.name
    created = now()
    app = FastAPI(title="wasmshare", version="1", docs_url=None, redoc_url=None)
    metrics = service.metrics

    # -- errors, auth, limits ------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), type=kind, code=code), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = (
            f"{where}: {first.get('msg', 'invalid value')}"
            if where
            else str(first.get("msg", "invalid body"))
        )
        return JSONResponse(error_body(message, param=where or None), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The last line of defence: a bug must still answer in OpenAI's shape, and say no more.
        log.error("unexpected error on %s: %s: %s", request.url.path, type(exc).__name__, exc)
        return JSONResponse(
            error_body("internal error; the server logged it", type="server_error"), status_code=500
        )

    # -- plain routes ----------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {
            "status": "ok" if service.alive else "engine stopped",
            "model": model_name,
            "running": service.running,
            "waiting": service.waiting,
        }
        return JSONResponse(body, status_code=200 if service.alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(model_name, created)]}

    def check_model(name: str | None) -> None:
        if name not in (None, "", model_name):
            raise APIError(
                404,
                f"model {name!r} is not served here; this server serves {model_name!r}",
                code="model_not_found",
                param="model",
            )

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        check_model(name)
        return _model_card(model_name, created)

    add_controller_routes(app, store, max_bytes=config.max_controller_bytes)

    # -- generation --------------------------------------------------------------------------------------

    async def make_requests(
        body: CompletionRequest | ChatCompletionRequest,
        prompts: list[list[int]],
        max_tokens: int | None,
    ) -> list[GenerationRequest]:
        body.refuse_unsupported()
        check_model(body.model)
        stops = body.stop_strings()
        limit = max_tokens if max_tokens is not None else config.default_max_tokens
        if limit > config.max_tokens:
            raise APIError(
                400,
                f"max_tokens is {limit}; this server allows at most {config.max_tokens}",
                param="max_tokens",
            )
        context = service.loaded.context_length
        longest = max(len(p) for p in prompts)
        if longest > config.max_prompt_tokens or (context is not None and longest >= context):
            bound = (
                min(config.max_prompt_tokens, context - 1)
                if context is not None
                else config.max_prompt_tokens
            )
            raise APIError(
                400,
                f"the prompt is {longest:,} tokens; this server takes at most {bound:,}",
                code="context_length_exceeded",
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            )
        if context is not None and longest + limit > context:
            if max_tokens is not None:
                raise APIError(
                    400,
                    f"the prompt ({longest:,} tokens) plus max_tokens ({limit:,}) exceeds the model's context "
                    f"of {context:,} tokens",
                    code="context_length_exceeded",
                    param="max_tokens",
                )
            limit = context - longest  # the default shrinks to what fits
        steer = await _steering(body, service, store, config)
        requests = []
        for prompt in prompts:
            for j in range(body.n):
                seed = None if body.seed is None else body.seed + j
                requests.append(
                    GenerationRequest(
                        prompt,
                        max_tokens=limit,
                        temperature=body.temperature,
                        top_p=body.top_p,
                        seed=seed,
                        steer=steer,
                        stop=stops,
                        max_work=default_max_work(limit),
                        stall_policy=body.stall_policy,
                    )
                )
        return requests

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response | dict[str, Any]:
        texts = body.prompts()
        prompts = await run_in_threadpool(lambda: [_encode_text(service, p) for p in texts])
        requests = await make_requests(body, prompts, body.max_tokens)
        return await _answer(request, body, requests, service, model_name, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response | dict[str, Any]:
        try:
            prompt = await run_in_threadpool(service.loaded.encode_messages, body.chat())
        except WasmshareError as e:
            raise APIError(400, str(e), param="messages") from None
        requests = await make_requests(body, [prompt], body.max_completion_tokens or body.max_tokens)
        return await _answer(request, body, requests, service, model_name, chat=True)

    app.add_middleware(
        BodyLimit, limit=config.max_body_bytes, per_path={"/v1/controllers": config.max_controller_bytes}
    )
    app.add_middleware(AuthAndCount, api_key=config.api_key, metrics=metrics)
    app.state.service = service
    app.state.store = store
    return app


# --- helpers -------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    """The first line of an error message, for a client (wasmtime's carry backtraces)."""
    first = text.strip().splitlines()[0] if text.strip() else text
    return first[:500]


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "wasmshare"}


def _encode_text(service: EngineService, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        vocab = service.loaded.vocab_size
        if not prompt or any(t < 0 or t >= vocab for t in prompt):
            raise APIError(400, f"prompt token ids must be non-empty and in [0, {vocab})", param="prompt")
        return prompt
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    return service.loaded.encode_prompt(prompt, chat=False)


async def _steering(
    body: CompletionRequest | ChatCompletionRequest,
    service: EngineService,
    store: ControllerStore,
    config: ServerConfig,
) -> ConstraintSpec | Controller | None:
    """The one constraint or controller a request asks for (compiled here, off the engine thread)."""
    asked = []
    fmt = body.response_format
    if fmt is not None and fmt.type != "text":
        asked.append("response_format")
    asked += [
        name for name in ("regex", "choice", "grammar", "controller") if getattr(body, name) is not None
    ]
    if len(asked) > 1:
        raise APIError(
            400, f"use one of response_format, regex, choice, grammar, controller; got {', '.join(asked)}"
        )
    if body.controller_arg is not None and body.controller is None:
        raise APIError(400, "controller_arg needs controller", param="controller_arg")
    if not asked:
        return None
    if body.controller is not None:
        arg = body.controller_arg
        arg_bytes = b"" if arg is None else arg.encode("utf-8") if isinstance(arg, str) else _pack_ids(arg)
        try:
            return await run_in_threadpool(store.controller, body.controller, arg_bytes)
        except ControllerRejected as e:
            raise APIError(
                400, f"controller {body.controller}: {e}", code="invalid_controller", param="controller"
            ) from None
        except KeyError:
            raise APIError(
                404,
                f"no controller {body.controller!r}; upload it to /v1/controllers first",
                code="controller_not_found",
                param="controller",
            ) from None
    spec: ConstraintSpec
    try:
        if fmt is not None and fmt.type == "json_object":
            spec = C.any_json()
        elif fmt is not None:
            schema = (fmt.json_schema or {}).get("schema")
            if not isinstance(schema, (dict, bool)):
                raise APIError(
                    400,
                    "response_format.json_schema.schema must be a JSON Schema object",
                    param="response_format",
                )
            spec = C.json_schema(schema)
        elif body.regex is not None:
            spec = C.regex(body.regex)
        elif body.choice is not None:
            spec = C.choice(body.choice)
        else:
            assert body.grammar is not None
            spec = C.grammar(body.grammar)
        table = service.loaded.token_table
        await run_in_threadpool(C.compile_constraint, spec, table, backend=config.grammar_backend)
    except APIError:
        raise
    except WasmshareError as e:
        raise APIError(400, str(e), code="invalid_constraint", param=asked[0]) from None
    return spec


def _pack_ids(ids: list[int]) -> bytes:
    if any(not 0 <= t < 1 << 32 for t in ids):
        raise APIError(400, "controller_arg token ids must fit in uint32", param="controller_arg")
    return struct.pack(f"<{len(ids)}I", *ids)


def _submit_all(service: EngineService, requests: list[GenerationRequest]) -> list[Ticket]:
    if not service.alive:
        raise APIError(
            503, "the engine loop has stopped; restart the server", type="server_error", code="engine_stopped"
        )
    tickets: list[Ticket] = []
    try:
        for r in requests:
            tickets.append(service.submit(r))
    except Overloaded as e:
        for t in tickets:
            service.cancel(t)
        raise APIError(
            503, f"server overloaded: {e}; retry later", type="server_error", code="overloaded"
        ) from None
    return tickets


def _failure(result: GenerationResult) -> APIError:
    if "answer violates the schema" in (result.error or ""):
        return APIError(
            422, f"generation failed: {result.error}", type="constraint_error", code="schema_violation"
        )
    return APIError(
        422, f"generation failed: {result.error}", type="controller_error", code="controller_failed"
    )


def _enforcement(result: GenerationResult) -> dict[str, Any]:
    """A choice's ``wasmshare`` field: how a JSON Schema answer was held to its schema."""
    if result.enforced_by is None:
        return {}
    return {"wasmshare": {"enforced_by": result.enforced_by, "backtracks": result.backtracks}}


async def _answer(
    request: Request,
    body: CompletionRequest | ChatCompletionRequest,
    requests: list[GenerationRequest],
    service: EngineService,
    model_name: str,
    *,
    chat: bool,
) -> Response | dict[str, Any]:
    tickets = _submit_all(service, requests)
    ident = new_id("chatcmpl" if chat else "cmpl")
    if body.stream:
        return StreamingResponse(
            _stream(service, tickets, ident, model_name, chat=chat, usage=body.include_usage()),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    results = await _wait_or_cancel(request, service, tickets)
    if results is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    failed = [r for r in results if r.finish_reason == "error"]
    if failed:
        raise _failure(failed[0])
    choices = []
    for i, r in enumerate(results):
        if chat:
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": r.text},
                    "finish_reason": _FINISH[r.finish_reason],
                    "logprobs": None,
                    **_enforcement(r),
                }
            )
        else:
            choices.append(
                {
                    "index": i,
                    "text": r.text,
                    "finish_reason": _FINISH[r.finish_reason],
                    "logprobs": None,
                    **_enforcement(r),
                }
            )
    return {
        "id": ident,
        "object": "chat.completion" if chat else "text_completion",
        "created": now(),
        "model": model_name,
        "choices": choices,
        "usage": _usage(results),
    }


async def _wait_or_cancel(
    request: Request, service: EngineService, tickets: list[Ticket]
) -> list[GenerationResult] | None:
    """Every ticket's result, or None after cancelling them all when the client disconnects."""
    gathered = asyncio.ensure_future(asyncio.gather(*(t.wait() for t in tickets)))
    try:
        while True:
            done, _ = await asyncio.wait({gathered}, timeout=0.1)
            if done:
                return list(gathered.result())
            if await request.is_disconnected():
                for t in tickets:
                    service.cancel(t)
                gathered.cancel()
                return None
    except asyncio.CancelledError:
        for t in tickets:
            service.cancel(t)
        gathered.cancel()
        raise


def _usage(results: list[GenerationResult]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(len(r.tokens) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _visible(text: str, stops: list[str]) -> str:
    """The part of ``text`` that is safe to send to the client.

    It is cut at a stop string, and holds back what could start one and an incomplete
    UTF-8 character at the end, so a client never sees text the stop strings later remove.
    """
    for s in stops:
        cut = text.find(s)
        if cut >= 0:
            text = text[:cut]
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text[: len(text) - hold] if hold else text


async def _stream(
    service: EngineService,
    tickets: list[Ticket],
    ident: str,
    model_name: str,
    *,
    chat: bool,
    usage: bool,
) -> AsyncIterator[bytes]:
    """Server-sent events in OpenAI's chunk format, ending in ``data: [DONE]``."""
    created = now()
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(
        index: int,
        text: str | None,
        finish: str | None,
        *,
        role: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> bytes:
        if chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {
                "index": index,
                "delta": delta,
                "finish_reason": finish,
                "logprobs": None,
            }
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        choice.update(extra or {})
        payload = {"id": ident, "object": obj, "created": created, "model": model_name, "choices": [choice]}
        if usage:
            payload["usage"] = None
        return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"

    merged: asyncio.Queue[tuple[int, TokenEvent | GenerationResult]] = asyncio.Queue()

    async def pump(i: int, ticket: Ticket) -> None:
        async for event in ticket.stream():
            await merged.put((i, event))

    pumps = [asyncio.ensure_future(pump(i, t)) for i, t in enumerate(tickets)]
    sent = [0] * len(tickets)
    results: list[GenerationResult | None] = [None] * len(tickets)
    finished = False
    try:
        if chat:
            for i in range(len(tickets)):
                yield chunk(i, "", None, role=True)
        while any(r is None for r in results):
            i, event = await merged.get()
            stops = tickets[i].request.stop_strings()
            if isinstance(event, TokenEvent):
                visible = _visible(event.text, stops)
                if len(visible) > sent[i]:
                    yield chunk(i, visible[sent[i] :], None)
                    sent[i] = len(visible)
                continue
            results[i] = event
            if event.finish_reason == "error":
                error = _failure(event)
                yield b"data: " + json.dumps(error.body()).encode() + b"\n\n"
                for t in tickets:
                    service.cancel(t)  # the other choices of a failed request stop too
                break
            if len(event.text) > sent[i]:
                yield chunk(i, event.text[sent[i] :], None)
            yield chunk(i, None if chat else "", _FINISH[event.finish_reason], extra=_enforcement(event))
        else:
            if usage:
                done = [r for r in results if r is not None]
                payload = {
                    "id": ident,
                    "object": obj,
                    "created": created,
                    "model": model_name,
                    "choices": [],
                    "usage": _usage(done),
                }
                yield b"data: " + json.dumps(payload).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"
        finished = True
    finally:
        for p in pumps:
            p.cancel()
        if not finished:  # the client went away mid-stream: free the slots now
            for t in tickets:
                service.cancel(t)
