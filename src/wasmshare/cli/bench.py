"""``wasmshare bench``: run the source tree's benchmarks, each against its baseline."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import WasmshareError
from ._output import console, fail

__all__ = ["BENCHMARKS", "bench"]

BENCHMARKS = (
    "calls",
    "exchange",
    "controllers",
    "grammars",
    "generate",
    "serve",
    "plugins",
    "whitespace",
    "stall",
    "schema_checks",
    "vllm",
)


def _bench_dir() -> Path:
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        if (root / "bench" / "_common.py").is_file():
            return root / "bench"
    raise WasmshareError("benchmarks live in the source tree's bench/ folder; run from a wasmshare checkout")


def _load_bench(name: str) -> Any:
    path = _bench_dir() / f"bench_{name}.py"
    spec = importlib.util.spec_from_file_location(f"wasmshare_bench_{name}", path)
    if spec is None or spec.loader is None:
        raise WasmshareError(f"cannot load benchmark {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(BENCHMARKS)}, or all.")],
    quick: Annotated[
        bool, typer.Option("--quick", help="Fewer repeats: a smoke run, not a measurement.")
    ] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Results folder (default bench/results).")] = None,
) -> None:
    """Run a benchmark against its baseline in the same run; write bench/results/NAME.json."""
    names = BENCHMARKS if name == "all" else (name,)
    if name != "all" and name not in BENCHMARKS:
        raise fail(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)} or all")
    status = 0
    for bench_name in names:
        try:
            module = _load_bench(bench_name)
        except WasmshareError as e:
            raise fail(str(e)) from None
        argv = (["--quick"] if quick else []) + (["--out", str(out)] if out else [])
        console.rule(f"bench {bench_name}")
        status |= int(module.main(argv) or 0)
    raise typer.Exit(status)
