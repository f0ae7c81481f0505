"""``wasmshare check``: compile JSON Schemas for a tokenizer and say how each is enforced."""

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
) -> None:
    """Compile JSON Schemas for a tokenizer: enforced by the grammar, with checks (which keywords), or refused (why)."""
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
    results.add_column("enforced by")
    results.add_column("compile ms", justify="right")
    grammar = checked = refused = invalid = 0
    with errors.status("compiling...") as status:
        for path in schemas:
            status.update(f"compiling {path}")
            try:
                spec = constraints.json_schema(path)
            except constraints.ConstraintError as e:  # unreadable file, not JSON, not a schema
                invalid += 1
                results.add_row(str(path), f"[red]invalid:[/] {e}", "")
                continue
            try:
                compiled = constraints.compile_constraint(spec, table)
            except constraints.ConstraintError as e:  # nothing llguidance accepts, even relaxed
                refused += 1
                results.add_row(str(path), f"[red]refused:[/] {str(e).split(': ', 1)[-1]}", "")
                continue
            plan = compiled.plan
            if plan is not None and plan.needs_checks:
                checked += 1
                note = f"[yellow]grammar + checks:[/] {', '.join(plan.keywords)}"
            else:
                grammar += 1
                note = "[green]grammar[/]"
            if compiled.warnings:
                note += f" ({len(compiled.warnings)} warning(s))"
            results.add_row(str(path), note, f"{compiled.compile_ms:.1f}")
    console.print(results)
    summary = f"{grammar} by the grammar, {checked} with checks, {refused} refused"
    console.print(summary + (f", {invalid} invalid" if invalid else ""))
    raise typer.Exit(1 if refused or invalid else 0)
