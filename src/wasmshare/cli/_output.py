"""Where the ``wasmshare`` commands print, and how a user mistake ends: one red line, no traceback."""

from __future__ import annotations

import typer
from rich.console import Console

__all__ = ["console", "errors", "fail"]

# soft_wrap: a long line stays one line (piped output is not cut at 80 columns); tables
# still lay out to the terminal's width.
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` in red on stderr (never wrapped) and return the Exit to raise."""
    errors.print(f"[red bold]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)
