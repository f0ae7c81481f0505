"""``wasmshare serve``: check the server's options, then serve the model over HTTP."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated

import typer

from ..errors import WasmshareError
from ..llm.limits import DEFAULT_DEADLINE_MS
from ._options import ControllerDeadlineOption, StallPolicyOption, StepBudgetOption, check_stall_options
from ._output import console, fail

__all__ = ["serve"]


def serve(
    model: Annotated[
        str, typer.Option(help="smollm2-135m (default), gemma3-270m, or a model folder / .gguf path.")
    ] = "smollm2-135m",
    device: Annotated[
        str, typer.Option(help="auto (a CUDA device when torch sees one, else the CPU), cpu, cuda or cuda:N.")
    ] = "auto",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="WASMSHARE_API_KEY", help="Require this bearer key on /v1 routes."),
    ] = None,
    max_concurrent: Annotated[int, typer.Option(help="Sequences decoded at once; more wait in a queue.")] = 8,
    max_waiting: Annotated[int, typer.Option(help="Requests that may wait for a slot before 503.")] = 256,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 1024,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes (JSON endpoints).")] = 1 << 20,
    max_controller_bytes: Annotated[
        int, typer.Option(help="Largest uploaded controller module in bytes.")
    ] = 8 << 20,
    controller_deadline_ms: ControllerDeadlineOption = DEFAULT_DEADLINE_MS,
    max_prompt_tokens: Annotated[
        int, typer.Option(help="Longest prompt in tokens (also below the model's context).")
    ] = 8192,
    controller_compile_s: Annotated[
        float, typer.Option(help="Time budget for compiling an uploaded controller, in s.")
    ] = 10.0,
    controllers_dir: Annotated[Path | None, typer.Option(help="Where uploaded controllers are kept.")] = None,
    grammar_backend: Annotated[str, typer.Option(help="llguidance (default) or xgrammar.")] = "llguidance",
    stall_policy: StallPolicyOption = "sit_out",
    step_budget_ms: StepBudgetOption = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API, with controller upload."""
    try:
        from ..server.app import ServerConfig
        from ..server.main import serve as run_server
    except ImportError as e:
        raise fail(f"the server needs its extras: pip install 'wasmshare[server,llm]' ({e})") from None
    for name, value in (
        ("--max-concurrent", max_concurrent),
        ("--max-waiting", max_waiting),
        ("--max-tokens", max_tokens),
        ("--max-body", max_body),
        ("--max-controller-bytes", max_controller_bytes),
        ("--max-prompt-tokens", max_prompt_tokens),
    ):
        if value <= 0:
            raise fail(f"{name} must be positive, got {value}")
    if controller_deadline_ms <= 0:
        raise fail(f"--controller-deadline-ms must be positive, got {controller_deadline_ms}")
    if controller_compile_s <= 0:
        raise fail(f"--controller-compile-s must be positive, got {controller_compile_s}")
    policy = check_stall_options(stall_policy, step_budget_ms)
    from ..llm.constraints import parse_backend

    try:
        backend = parse_backend(grammar_backend)
    except WasmshareError as e:
        raise fail(f"--grammar-backend: {e}") from None
    if backend == "xgrammar" and importlib.util.find_spec("xgrammar") is None:
        raise fail("--grammar-backend xgrammar needs xgrammar: pip install --no-deps xgrammar")
    config = ServerConfig(
        api_key=api_key or None,
        max_concurrent=max_concurrent,
        max_waiting=max_waiting,
        max_tokens=max_tokens,
        default_max_tokens=min(256, max_tokens),
        max_body_bytes=max_body,
        max_controller_bytes=max_controller_bytes,
        controller_deadline_ms=controller_deadline_ms,
        controllers_dir=controllers_dir,
        grammar_backend=backend,
        max_prompt_tokens=max_prompt_tokens,
        controller_compile_s=controller_compile_s,
        stall_policy=policy,
        step_budget_ms=step_budget_ms,
    )
    try:
        run_server(model, config, host=host, port=port, log_level=log_level, console=console, device=device)
    except WasmshareError as e:
        raise fail(str(e)) from None
