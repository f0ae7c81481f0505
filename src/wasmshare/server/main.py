"""``wasmshare serve``: load the model, start the engine loop, serve HTTP with uvicorn."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from rich.console import Console

from .._engine import default_cache_dir
from ..errors import WasmshareError
from ..llm.controller_store import ControllerStore
from ..llm.limits import Limits
from .app import ServerConfig, create_app
from .service import EngineService

__all__ = ["serve", "build_server"]


def build_server(
    model: str, config: ServerConfig, console: Console | None = None, *, device: str = "auto"
) -> tuple[FastAPI, EngineService, ControllerStore]:
    """Load ``model`` onto ``device`` and build (app, service, store); the caller closes service and store."""
    from transformers.utils import logging as hf_logging

    from ..llm.models import load_model

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # the status line says what happens
    if console is not None:
        with console.status(f"loading {model}") as status:
            loaded = load_model(model, device=device, progress=lambda message: status.update(message))
    else:
        loaded = load_model(model, device=device)
    service = EngineService(
        loaded,
        max_batch=config.max_concurrent,
        max_waiting=config.max_waiting,
        controller_limits=Limits(deadline_ms=config.controller_deadline_ms),
        grammar_backend=config.grammar_backend,
        stall_policy=config.stall_policy,
        step_budget_ms=config.step_budget_ms,
    )
    folder = config.controllers_dir or default_cache_dir() / "controllers"
    try:
        store = ControllerStore(
            Path(folder),
            loaded.token_table,
            max_bytes=config.max_controller_bytes,
            compile_budget_s=config.controller_compile_s,
        )
    except OSError as e:
        service.close()
        raise WasmshareError(f"cannot use {folder} for uploaded controllers: {e.strerror or e}") from None
    return create_app(service, store, config), service, store


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            reason = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound: {e.strerror}"
            raise WasmshareError(f"{host}:{port} {reason}") from None


def serve(
    model: str,
    config: ServerConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    console: Console | None = None,
    device: str = "auto",
) -> None:
    """Serve until interrupted (Ctrl-C finishes the requests in flight, then stops)."""
    import uvicorn

    console = console or Console()
    if not 0 <= port <= 65535:
        raise WasmshareError(f"--port must be in 0-65535, got {port}")
    _check_port(host, port)
    app, service, store = build_server(model, config, console, device=device)
    auth = "API key required" if config.api_key else "no API key"
    console.print(
        f"serving [bold]{service.loaded.name}[/] on http://{host}:{port}/v1 "
        f"({config.max_concurrent} concurrent sequences, {auth})"
    )

    class _Server(uvicorn.Server):
        """A uvicorn server whose Ctrl-C / SIGTERM cancels every request first.

        Open streams then end at once, so uvicorn's wait for open connections is short.
        """

        def handle_exit(self, sig: int, frame: Any) -> None:
            service.cancel_all()
            super().handle_exit(sig, frame)

    server = _Server(
        uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
    )
    try:
        server.run()
    finally:
        service.close()
        store.close()
