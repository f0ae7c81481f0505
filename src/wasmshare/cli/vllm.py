"""``wasmshare vllm serve``: vLLM's OpenAI server with wasmshare steering and controller upload."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Annotated

import typer

from ..errors import WasmshareError
from ._output import console, fail

__all__ = ["vllm_app"]

vllm_app = typer.Typer(
    help="Serve through vLLM with wasmshare controllers and constraints.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _default_vllm_python() -> str:
    return os.environ.get("WASMSHARE_VLLM_PYTHON") or str(Path(".venv-vllm") / "bin" / "python")


@vllm_app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    model: Annotated[
        str, typer.Option(help="smollm2-135m (default), gemma3-270m, or a Hugging Face model folder.")
    ] = "smollm2-135m",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="WASMSHARE_API_KEY", help="Require this bearer key on /v1 routes."),
    ] = None,
    max_num_seqs: Annotated[int, typer.Option(help="vLLM's --max-num-seqs: sequences decoded at once.")] = 64,
    controllers_dir: Annotated[Path | None, typer.Option(help="Where uploaded controllers are kept.")] = None,
    vllm_python: Annotated[
        str | None,
        typer.Option(help="Python of vLLM's environment (default $WASMSHARE_VLLM_PYTHON or .venv-vllm)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level of the gateway.")] = "info",
) -> None:
    """Serve a model through vLLM, with the API of `wasmshare serve` (arguments after -- go to vLLM)."""
    if importlib.util.find_spec("httpx2") is None or importlib.util.find_spec("fastapi") is None:
        raise fail("wasmshare vllm serve needs the server extras: pip install 'wasmshare[server,llm]'")
    python = vllm_python or _default_vllm_python()
    if not Path(python).is_file():
        raise fail(f"no vLLM environment at {python}: run make vllm-env, or pass --vllm-python")
    if not 0 <= port <= 65535:
        raise fail(f"--port must be in 0-65535, got {port}")
    if max_num_seqs <= 0:
        raise fail(f"--max-num-seqs must be positive, got {max_num_seqs}")
    from ..llm.models import load_model
    from ..vllm.gateway import Launch
    from ..vllm.gateway import serve as run_gateway

    extra = [a for a in ctx.args if a != "--"]
    try:
        with console.status(f"preparing {model}"):
            folder = Path(load_model(model).path)
        launch = Launch(
            model=model if not Path(model).exists() else folder.name,
            folder=folder,
            vllm_python=str(Path(python).absolute()),
            host=host,
            port=port,
            max_num_seqs=max_num_seqs,
            controllers_dir=controllers_dir,
            api_key=api_key or None,
            vllm_args=extra,
            log_level=log_level,
        )
        run_gateway(launch, print_line=lambda line: console.print(line, highlight=False))
    except WasmshareError as e:
        raise fail(str(e)) from None
    except KeyboardInterrupt:
        pass
