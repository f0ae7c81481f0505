"""``wasmshare check``: compile JSON Schemas for a tokenizer and say which it supports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import WasmshareError
from ._output import console, errors, fail

__all__ = ["check"]


def check(
    schemas: Annotated[list[Path], typer.Argument(help="JSON Schema files to compile.")],
    tokenizer: Annotated[
        str,
        typer.Option(
            help="A model name or path as `run` takes (default: run's default model), "
            "'deepseek' (the packaged 129k tokenizer) or a tokenizer.json path."
        ),
    ] = "smollm2-135m",
    coerce_one_of: Annotated[
        bool, typer.Option(help="Approximate oneOf by anyOf instead of refusing it.")
    ] = False,
) -> None:
    """Compile JSON Schemas for a tokenizer: supported or the exact unsupported feature, and compile time."""
    from ..llm import constraints
    from ..llm.tokens import TokenTable

    try:
        if tokenizer == "deepseek":
            table = TokenTable.deepseek()
        elif tokenizer.endswith(".json") and Path(tokenizer).is_file():
            table = TokenTable.from_file(tokenizer)
        else:
            from ..llm.models import load_model

            with errors.status(f"loading the tokenizer of {tokenizer} ..."):
                table = load_model(tokenizer, device="cpu").token_table
    except WasmshareError as e:
        raise fail(f"--tokenizer: {e}") from None
    results = Table(title=f"{len(schemas)} schema(s), tokenizer {tokenizer} ({table.vocab_size:,} tokens)")
    results.add_column("schema")
    results.add_column("result")
    results.add_column("compile ms", justify="right")
    unsupported = invalid = 0
    with errors.status("compiling...") as status:
        for path in schemas:
            status.update(f"compiling {path}")
            try:
                spec = constraints.json_schema(path, coerce_one_of=coerce_one_of)
            except constraints.ConstraintError as e:  # unreadable file, not JSON, not a schema
                invalid += 1
                results.add_row(str(path), f"[red]invalid:[/] {e}", "")
                continue
            try:
                compiled = constraints.compile_constraint(spec, table)
            except constraints.ConstraintError as e:  # the engine refused a feature
                unsupported += 1
                text = str(e)
                results.add_row(str(path), f"[red]unsupported:[/] {text.split(': ', 1)[-1]}", "")
                continue
            note = "[green]supported[/]" + (
                f" ({len(compiled.warnings)} warning(s))" if compiled.warnings else ""
            )
            results.add_row(str(path), note, f"{compiled.compile_ms:.1f}")
    console.print(results)
    summary = f"{len(schemas) - unsupported - invalid} supported, {unsupported} unsupported"
    console.print(summary + (f", {invalid} invalid" if invalid else ""))
    raise typer.Exit(1 if unsupported or invalid else 0)
