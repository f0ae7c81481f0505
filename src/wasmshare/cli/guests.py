"""``wasmshare build`` and ``wasmshare inspect``: compile C, Rust and Zig guests; show what a module holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..errors import WasmshareError
from ._output import console, fail

__all__ = ["build", "inspect"]


def build(
    sources: Annotated[
        list[Path], typer.Argument(help="C sources of one guest module, or one .rs or .zig file.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .wasm file to write.")],
    wasi: Annotated[
        bool, typer.Option("--wasi", help="C only: target wasm32-wasi with libc (a reactor module).")
    ] = False,
    optimize: Annotated[
        str, typer.Option("--optimize", "-O", help="fast (-O2), small (-Oz) or debug.")
    ] = "fast",
    initial_memory: Annotated[
        int | None, typer.Option(help="C only: initial linear memory in bytes (64 KiB multiple).")
    ] = None,
    max_memory: Annotated[
        int | None, typer.Option(help="C only: maximum linear memory in bytes (64 KiB multiple).")
    ] = None,
) -> None:
    """Compile a guest: C against wasmshare.h (Zig's clang), Rust against sdk/rust, Zig against sdk/zig."""
    if optimize not in ("fast", "small", "debug"):
        raise fail(f"--optimize must be fast, small or debug, not {optimize!r}")
    languages = {_language(src) for src in sources}
    if len(languages) > 1 or (languages & {"rust", "zig"} and len(sources) > 1):
        raise fail("give C sources, or one .rs file, or one .zig file: one guest module per build")
    language = languages.pop() if languages else "c"
    if language != "c" and (wasi or initial_memory is not None or max_memory is not None):
        raise fail("--wasi, --initial-memory and --max-memory apply to C guests only")
    try:
        if language == "rust":
            from ..abi.rust import build_rust_guest

            out = build_rust_guest(sources[0], output, optimize=optimize)  # type: ignore[arg-type]
        elif language == "zig":
            from ..abi.zig import build_zig_guest

            out = build_zig_guest(sources[0], output, optimize=optimize)  # type: ignore[arg-type]
        else:
            from ..abi import build_guest

            out = build_guest(
                sources,
                output,
                wasi=wasi,
                optimize=optimize,  # type: ignore[arg-type]
                initial_memory=initial_memory,
                max_memory=max_memory,
            )
    except (WasmshareError, ValueError, TypeError) as e:
        raise fail(str(e)) from None
    console.print(f"built [bold]{out}[/] ({out.stat().st_size:,} bytes)")


def _language(source: Path) -> str:
    return {".rs": "rust", ".zig": "zig"}.get(source.suffix, "c")


def inspect(module: Annotated[Path, typer.Argument(help="A .wasm or .wat module.")]) -> None:
    """Show a guest's exports, imports and wasmshare ABI version."""
    from ..guest import Guest

    try:
        with Guest(module) as guest:
            table = Table(title=f"{module} (sha256 {guest.module_sha256[:12]})")
            table.add_column("kind")
            table.add_column("name")
            table.add_column("type")
            for exp in guest.module.exports:
                table.add_row("export", exp.name, _describe_type(exp.type))
            for imp in guest.module.imports:
                table.add_row("import", f"{imp.module}.{imp.name}", _describe_type(imp.type))
            console.print(table)
            exported = {e.name for e in guest.module.exports}
            abi = guest.call("ws_abi_version") if "ws_abi_version" in exported else None
            console.print(
                f"wasmshare ABI: {abi if abi is not None else 'none (plain module)'}; "
                f"memory: {guest.memory_nbytes:,} bytes"
            )
    except WasmshareError as e:
        raise fail(str(e)) from None


def _describe_type(ty: Any) -> str:
    import wasmtime

    if isinstance(ty, wasmtime.FuncType):
        params = ", ".join(str(p) for p in ty.params)
        results = ", ".join(str(r) for r in ty.results) or "()"
        return f"func ({params}) -> {results}"
    if isinstance(ty, wasmtime.MemoryType):
        maximum = ty.limits.max
        return f"memory {ty.limits.min} pages" + (f", max {maximum}" if maximum is not None else "")
    if isinstance(ty, wasmtime.GlobalType):
        return f"global {'mut ' if ty.mutable else ''}{ty.content}"
    if isinstance(ty, wasmtime.TableType):
        return f"table {ty.element} {ty.limits.min}"
    return type(ty).__name__
