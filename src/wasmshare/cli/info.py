"""``wasmshare info``: the platform, the versions and whether loans are zero-copy."""

from __future__ import annotations

import importlib.metadata
import sys

from rich.table import Table

from ._output import console

__all__ = ["info"]


def info() -> None:
    """Show the platform, versions and whether loans are zero-copy here."""
    from .._engine import default_cache_dir
    from ..loan import zero_copy_supported

    table = Table(show_header=False)
    table.add_row("wasmshare", importlib.metadata.version("wasmshare"))
    table.add_row("wasmtime", importlib.metadata.version("wasmtime"))
    table.add_row("numpy", importlib.metadata.version("numpy"))
    table.add_row("python", sys.version.split()[0])
    table.add_row("platform", sys.platform)
    table.add_row("loans", "zero-copy (mmap)" if zero_copy_supported() else "copy fallback")
    table.add_row("module cache", str(default_cache_dir() / "modules"))
    console.print(table)
