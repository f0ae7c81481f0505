"""``wasmshare vllm serve``: vLLM's OpenAI server, with the API of ``wasmshare serve`` in front.

Processes of one node::

    client ─HTTP─ gateway (this module; wasmshare's environment)
                    │  /v1/controllers: upload, list, get, delete (checked and compiled here)
                    │  /v1/completions, /v1/chat/completions: steering fields → vllm_xargs
                    ├──HTTP── vLLM OpenAI server (vLLM's environment) ── EngineCore ── worker
                    │                                                      └ WasmshareLogitsProcessor
                    └──Unix socket── controller service (wasmshare's environment) ◄─ same pages ─┘

The gateway owns the controller service (``--persist``) and starts vLLM with
``$WASMSHARE_SERVICE_SOCKET`` pointing every worker at it, so one service serves the node.
A request's steering fields are the ones ``wasmshare serve`` takes (``response_format``,
``regex``, ``choice``, ``grammar``, ``controller``, ``controller_arg``): they are checked and
compiled by the service before the request is queued with vLLM (a bad schema is a 400, and
the compile is not paid inside vLLM's step), then travel as ``vllm_xargs`` with a tag. A
request whose steering fails is answered as ``wasmshare serve`` answers it (422
``controller_failed`` with the message; in a stream, an error event), from the file the
processor leaves under ``$WASMSHARE_STATUS_DIR``. Every other route is passed to vLLM as is.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import _framing
from ..errors import APIError, ControllerRejected, WasmshareError
from ..llm.controller_store import ControllerStore
from ..server.controller_routes import add_controller_routes, read_body
from .steering import PREFIX, TAG, steering_of

__all__ = ["GatewayConfig", "ServiceHandle", "create_gateway", "translate"]

STEERING_FIELDS = ("regex", "choice", "grammar", "controller")
"""Request fields that steer, beside ``response_format`` (as ``wasmshare serve`` takes them)."""
_XARG = {
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
    "controller": "controller",
    "controller_arg": "arg",
}
_GENERATION = ("/v1/completions", "/v1/chat/completions")
_HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive", "accept-encoding"}


@dataclass(frozen=True)
class GatewayConfig:
    """What the gateway needs to know; ``vllm_url`` is vLLM's server (loopback)."""

    vllm_url: str
    status_dir: Path
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_controller_bytes: int = 8 << 20


def translate(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Split a request body into what vLLM gets and the wasmshare ``vllm_xargs`` it steers with.

    Raises :class:`APIError` (400) for the mistakes ``wasmshare serve`` refuses: two
    steerings, ``controller_arg`` without ``controller``, a malformed ``response_format``,
    values of the wrong type, ``vllm_xargs`` that spell ``wasmshare_`` keys themselves, and
    ``stall_policy: "sit_out"``, which vLLM cannot honour.
    """
    forwarded = dict(body)
    policy = forwarded.pop("stall_policy", None)
    if policy not in (None, "wait"):
        raise APIError(
            400,
            "stall_policy: vLLM samples every row at every step, so a row cannot sit out here; "
            "leave it unset or 'wait' (wasmshare serve sits rows out)",
            param="stall_policy",
        )
    fmt = forwarded.pop("response_format", None)
    fields = {name: forwarded.pop(name) for name in (*STEERING_FIELDS, "controller_arg") if name in body}
    fields = {k: v for k, v in fields.items() if v is not None}
    user_xargs = forwarded.get("vllm_xargs")
    if user_xargs is not None:
        if not isinstance(user_xargs, dict):
            raise APIError(400, "vllm_xargs must be an object", param="vllm_xargs")
        ours = sorted(k for k in user_xargs if isinstance(k, str) and k.startswith(PREFIX))
        if ours:
            raise APIError(
                400,
                f"vllm_xargs: {ours[0]} is set by this server; use the request's own fields",
                param="vllm_xargs",
            )
    asked: list[str] = []
    xargs: dict[str, Any] = {}
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise APIError(
                400, "response_format.type must be text, json_object or json_schema", param="response_format"
            )
        if fmt["type"] == "json_object":
            asked.append("response_format")
            xargs[PREFIX + "json_schema"] = json.dumps({"type": "object"})
        elif fmt["type"] == "json_schema":
            asked.append("response_format")
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, (dict, bool)):
                raise APIError(
                    400,
                    "response_format.json_schema.schema must be a JSON Schema object",
                    param="response_format",
                )
            xargs[PREFIX + "json_schema"] = json.dumps(schema)
    asked += [name for name in STEERING_FIELDS if name in fields]
    if len(asked) > 1:
        raise APIError(
            400, f"use one of response_format, regex, choice, grammar, controller; got {', '.join(asked)}"
        )
    if "controller_arg" in fields and "controller" not in fields:
        raise APIError(400, "controller_arg needs controller", param="controller_arg")
    if not asked:
        return forwarded, None
    if "structured_outputs" in forwarded or any(k.startswith("guided_") for k in forwarded):
        raise APIError(400, f"{asked[0]} cannot be combined with vLLM's own structured_outputs / guided_*")
    for name, value in fields.items():
        xargs[PREFIX + _XARG[name]] = value
    try:
        steering_of(xargs)
    except ValueError as e:
        message = str(e)
        for key, name in (
            (PREFIX + "arg", "controller_arg"),
            (PREFIX + "json_schema", "response_format's schema"),
        ):
            message = message.replace(key, name)
        raise APIError(400, message.replace(PREFIX, ""), param=asked[0]) from None
    return forwarded, xargs


class ServiceHandle:
    """The controller service this gateway owns: started, restarted when it died, asked to prepare.

    Each ``prepare`` opens its own connection (a Unix connect is cheap), so requests compile
    their constraints in parallel on the service's threads and no connection outlives a
    service that died."""

    def __init__(self, command: list[str], socket_path: str, start_s: float = 120.0) -> None:
        self.command = command
        self.socket_path = socket_path
        self.start_s = start_s
        self.process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def ensure(self) -> None:
        """Start the service if it is not running (again, if it died) and wait until it listens.

        A service killed a moment ago can still look alive until the kernel has torn it down:
        the wait then sees it exit, and it is started once more."""
        for attempt in range(2):
            with self._lock:
                if self.process is None or self.process.poll() is not None:
                    self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL)
                process = self.process
            try:
                _framing.connect_unix(self.socket_path, self.start_s, process).close()
                return
            except ChildProcessError as e:
                if attempt:  # it exited at start twice
                    raise WasmshareError(str(e)) from None
            except OSError as e:  # it never listened
                raise WasmshareError(str(e)) from None

    def prepare(self, steer: dict[str, Any]) -> str | None:
        """Compile (or check) a steering in the service; its one-line error, or None.

        A connection that breaks (its service died after :meth:`ensure` saw it) is made
        once more, to a service started again."""
        for attempt in range(2):
            try:
                self.ensure()
                with _framing.connect_unix(self.socket_path, self.start_s, self.process) as sock:
                    _framing.send_message(sock, {"op": "prepare", "steer": steer})
                    reply, _ = _framing.recv_message(sock)
                break
            except (WasmshareError, OSError, EOFError, ValueError) as e:
                if attempt:
                    raise WasmshareError(f"the controller service is unavailable: {e}") from None
        return None if reply.get("ok") else str(reply.get("error", "refused"))

    def close(self) -> None:
        """Stop the service."""
        with self._lock:
            if self.process is not None and self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()


@dataclass
class _Gate:
    config: GatewayConfig
    store: ControllerStore
    service: ServiceHandle
    client: httpx2.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx2.AsyncClient(base_url=self.config.vllm_url, timeout=None)

    def status(self, tag: str) -> str | None:
        """The error the processor left for ``tag`` (and forget it), or None."""
        path = self.config.status_dir / f"{tag}.error"
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        path.unlink(missing_ok=True)
        return text.strip() or "controller failed"


def create_gateway(config: GatewayConfig, store: ControllerStore, service: ServiceHandle) -> FastAPI:
    """The gateway's FastAPI app: the controller API here, generation steered and passed to vLLM."""
    gate = _Gate(config, store, service)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await gate.client.aclose()

    app = FastAPI(
        title="wasmshare vllm gateway", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(httpx2.HTTPError)
    async def _vllm_unreachable(request: Request, exc: httpx2.HTTPError) -> JSONResponse:
        error = APIError(
            503, f"vLLM's server is unavailable: {exc}", type="server_error", code="vllm_unavailable"
        )
        return JSONResponse(error.body(), status_code=503)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        message = " ".join(str(exc).split())[:300] or type(exc).__name__
        return JSONResponse(
            APIError(500, f"internal error: {message}", type="server_error").body(), status_code=500
        )

    add_controller_routes(app, store, max_bytes=config.max_controller_bytes)

    # -- generation -----------------------------------------------------------------------------------

    async def generate(request: Request) -> Response:
        raw = await read_body(request, config.max_body_bytes)
        try:
            body = json.loads(raw)
        except ValueError:
            raise APIError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        forwarded, xargs = translate(body)
        tag = None
        if xargs is not None:
            await _prepare(gate, xargs)
            tag = secrets.token_hex(16)
            forwarded["vllm_xargs"] = {**(forwarded.get("vllm_xargs") or {}), **xargs, TAG: tag}
        headers = _forward_headers(request)
        if forwarded.get("stream"):
            upstream = await gate.client.send(
                gate.client.build_request("POST", request.url.path, json=forwarded, headers=headers),
                stream=True,
            )
            if upstream.status_code != 200 or tag is None:
                return await _relay(upstream)
            return StreamingResponse(
                _steered_stream(gate, upstream, tag),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        answer = await gate.client.post(request.url.path, json=forwarded, headers=headers)
        if tag is not None and answer.status_code == 200:
            error = gate.status(tag)
            if error is not None:
                raise _failure(error)
        return Response(
            answer.content, status_code=answer.status_code, media_type=answer.headers.get("content-type")
        )

    for path in _GENERATION:
        app.add_api_route(path, generate, methods=["POST"], response_model=None)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], response_model=None)
    async def passthrough(path: str, request: Request) -> Response:
        body = await read_body(request, config.max_body_bytes)
        upstream = await gate.client.send(
            gate.client.build_request(
                request.method,
                "/" + path,
                params=request.query_params,
                content=body,
                headers=_forward_headers(request),
            ),
            stream=True,
        )
        return await _relay(upstream)

    app.state.gate = gate
    if config.api_key:
        app.add_middleware(_ApiKey, api_key=config.api_key)
    return app


class _ApiKey:
    """ASGI middleware: the bearer key on every ``/v1`` route (plain ASGI, so a client's
    disconnect still reaches the endpoint and the request is cancelled in vLLM too)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = dict(scope.get("headers") or ()).get(b"authorization", b"")
            given = header[7:] if header[:7].lower() == b"bearer " else b""
            if not secrets.compare_digest(given, self.api_key):
                error = APIError(
                    401,
                    "Incorrect or missing API key: send Authorization: Bearer KEY",
                    type="authentication_error",
                    code="invalid_api_key",
                )
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _prepare(gate: _Gate, xargs: dict[str, Any]) -> None:
    """Check the steering before vLLM queues the request: 404 / 400 as ``wasmshare serve`` answers."""
    steer = steering_of(xargs)
    assert steer is not None
    if steer["kind"] == "controller":
        try:
            await run_in_threadpool(gate.store.controller, steer["sha256"])
        except KeyError:
            raise APIError(
                404,
                f"no controller {steer['sha256']!r}; upload it to /v1/controllers first",
                code="controller_not_found",
                param="controller",
            ) from None
        except ControllerRejected as e:
            raise APIError(
                400, f"controller {steer['sha256']}: {e}", code="invalid_controller", param="controller"
            ) from None
    try:
        error = await run_in_threadpool(gate.service.prepare, steer)
    except WasmshareError as e:
        raise APIError(503, str(e), type="server_error", code="service_unavailable") from None
    if error is not None:
        code = "invalid_controller" if steer["kind"] == "controller" else "invalid_constraint"
        raise APIError(400, error, code=code)


def _failure(error: str) -> APIError:
    return APIError(422, f"generation failed: {error}", type="controller_error", code="controller_failed")


async def _steered_stream(gate: _Gate, upstream: httpx2.Response, tag: str) -> AsyncIterator[bytes]:
    """vLLM's events, until a choice finishes while the steering has failed: then the error event."""
    try:
        async for line in upstream.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                error = gate.status(tag)
                if error is not None:
                    yield b"data: " + json.dumps(_failure(error).body()).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
                return
            try:
                event = json.loads(data)
            except ValueError:
                event = {}
            finished = any(c.get("finish_reason") for c in event.get("choices") or [] if isinstance(c, dict))
            if finished:
                error = gate.status(tag)
                if error is not None:
                    yield b"data: " + json.dumps(_failure(error).body()).encode() + b"\n\n"
                    yield b"data: [DONE]\n\n"
                    return
            yield f"data: {data}\n\n".encode()
    finally:
        await upstream.aclose()
        gate.status(tag)  # forget a status nobody read (the client went away)


async def _relay(upstream: httpx2.Response) -> Response:
    """vLLM's response as it is (streamed through)."""
    headers = {
        k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS | {"content-encoding"}
    }

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        finally:
            await upstream.aclose()

    return StreamingResponse(chunks(), status_code=upstream.status_code, headers=headers)


def _forward_headers(request: Request) -> dict[str, str]:
    return {
        k: v
        for k, v in request.headers.items()
        if k.lower() not in _HOP_HEADERS and k.lower() != "authorization"
    }


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:500] if lines else text


# -- running it --------------------------------------------------------------------------------------


@dataclass
class Launch:
    """Everything ``wasmshare vllm serve`` starts, and how."""

    model: str
    folder: Path
    vllm_python: str
    host: str = "127.0.0.1"
    port: int = 8000
    vllm_port: int = 0  # 0: a free loopback port
    max_num_seqs: int = 64
    controllers_dir: Path | None = None
    api_key: str | None = None
    vllm_args: list[str] = field(default_factory=list)
    log_level: str = "info"


def serve(launch: Launch, print_line: Callable[[str], None] = print) -> None:
    """Start the controller service and vLLM's server, then serve the gateway until interrupted."""
    import uvicorn

    from .._engine import default_cache_dir
    from ..llm.tokens import TokenTable

    work = Path(tempfile.mkdtemp(prefix="wasmshare-vllm-serve-"))
    status_dir = work / "status"
    status_dir.mkdir()
    socket_path = str(work / "service.sock")
    vocab = _vocab_size(launch.folder)
    table = TokenTable.from_file(launch.folder / "tokenizer.json", vocab_size=vocab)
    controllers = launch.controllers_dir or default_cache_dir() / "controllers"
    store = ControllerStore(Path(controllers), table, max_bytes=8 << 20)
    python = sys.executable
    service = ServiceHandle(
        [python, "-m", "wasmshare.vllm.service", socket_path, str(launch.folder), "--persist"]
        + [
            "--capacity",
            str(launch.max_num_seqs),
            "--vocab-size",
            str(vocab),
            "--controllers-dir",
            str(controllers),
        ],
        socket_path,
    )
    vllm_port = launch.vllm_port or _free_port()
    env = dict(
        os.environ,
        WASMSHARE_SERVICE_SOCKET=socket_path,
        WASMSHARE_STATUS_DIR=str(status_dir),
        WASMSHARE_CONTROLLERS_DIR=str(controllers),
        WASMSHARE_PYTHON=python,
    )
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    command = [
        launch.vllm_python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(launch.folder), "--served-model-name", launch.model,
        "--host", "127.0.0.1", "--port", str(vllm_port),
        "--max-num-seqs", str(launch.max_num_seqs),
        "--logits-processors", "wasmshare.vllm.processor:WasmshareLogitsProcessor",
        *launch.vllm_args,
    ]  # fmt: skip
    vllm: subprocess.Popen[bytes] | None = None
    try:
        service.ensure()
        print_line(f"controller service at {socket_path}; starting vLLM on 127.0.0.1:{vllm_port}")
        vllm = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
        _wait_healthy(f"http://127.0.0.1:{vllm_port}", vllm)
        config = GatewayConfig(f"http://127.0.0.1:{vllm_port}", status_dir, api_key=launch.api_key)
        app = create_gateway(config, store, service)
        print_line(f"serving {launch.model} through vLLM on http://{launch.host}:{launch.port}/v1")
        uvicorn.run(app, host=launch.host, port=launch.port, log_level=launch.log_level)
    finally:
        if vllm is not None and vllm.poll() is None:
            vllm.terminate()
            try:
                vllm.wait(30)
            except subprocess.TimeoutExpired:
                vllm.kill()
        service.close()
        store.close()
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def _vocab_size(folder: Path) -> int:
    """The logits width vLLM uses: ``vocab_size`` of the model's ``config.json``."""
    try:
        config = json.loads((folder / "config.json").read_text())
        text = config.get("text_config", config)
        return int(text["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WasmshareError(f"{folder}: cannot read vocab_size from config.json ({e})") from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float = 600.0) -> None:
    """Wait for vLLM's ``/health``; WasmshareError if it exits first or never answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise WasmshareError(f"vLLM's server exited with code {process.returncode} while starting")
        try:
            if httpx2.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(1.0)
    raise WasmshareError(f"vLLM's server did not become healthy within {timeout_s:.0f} s")
