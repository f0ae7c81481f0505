"""The ``wasmshare`` command: one module per command group, registered here in help order.

Every user mistake (bad path, bad module, compiler error) ends as one red line on
stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import sys

import typer

from ..errors import WasmshareError
from . import bench, check, demo, guests, info, run, serve
from ._output import errors
from .plugins import plugins_app
from .vllm import vllm_app

__all__ = ["app", "main"]

app = typer.Typer(
    name="wasmshare",
    help="Zero-copy shared memory between a Python host and its WebAssembly guests.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: no <bool> / <str> column beside every option
)
app.command()(guests.build)
app.command()(guests.inspect)
app.command()(check.check)
app.command()(run.run)
app.command()(serve.serve)
app.command()(info.info)
app.command()(demo.demo)
app.command()(bench.bench)
app.add_typer(plugins_app, name="plugins")
app.add_typer(vllm_app, name="vllm")


def main() -> None:
    """Entry point of the ``wasmshare`` console script."""
    try:
        app()
    except WasmshareError as e:  # pragma: no cover - commands catch their own
        errors.print(f"[red bold]error:[/] {e}", highlight=False)
        sys.exit(1)
