"""Where the ``wasmshare`` commands print, and how a user mistake ends: one red line, no traceback."""

from __future__ import annotations

import typer
from rich.console import Console

__all__ = ["console", "errors", "fail"]

console = Console()
errors = Console(stderr=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` in red on stderr (never wrapped) and return the Exit to raise."""
    errors.print(f"[red bold]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)
