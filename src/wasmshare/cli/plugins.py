"""``wasmshare plugins ...``: the schema-plugin commands, a group of their own.

User mistakes end as one red line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import WasmshareError
from ._output import console, fail

__all__ = ["plugins_app"]

plugins_app = typer.Typer(
    help="Plugin processes that share one large read-only schema.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _size(text: str) -> int:
    from ..plugins.schema import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise fail(f"--size: {e}") from None


@plugins_app.command()
def demo(
    size: Annotated[str, typer.Option(help="Schema size: 100MiB, 5MB, ...")] = "100MiB",
    plugins: Annotated[int, typer.Option(help="Plugin processes to start.")] = 8,
    mode: Annotated[
        str, typer.Option(help="loan, embedded, copy or all (the copying design is always shown).")
    ] = "loan",
    seed: Annotated[int, typer.Option(help="Seed of the generated schema.")] = 0,
) -> None:
    """Generate a schema, run N type-check plugins on it, and print their memory (PSS and RSS)."""
    from ..plugins.demo import run_demo

    size_bytes = _size(size)
    if mode not in ("loan", "embedded", "copy", "all"):
        raise fail(f"--mode must be loan, embedded, copy or all, not {mode!r}")
    if not 1 <= plugins <= 64:
        raise fail(f"--plugins must be between 1 and 64, not {plugins}")
    try:
        code = run_demo(console, size_bytes=size_bytes, plugins=plugins, mode=mode, seed=seed)  # type: ignore[arg-type]
    except WasmshareError as e:
        raise fail(str(e)) from None
    raise typer.Exit(code)


@plugins_app.command()
def generate(
    output: Annotated[Path, typer.Argument(help="The blob file to write.")],
    size: Annotated[str, typer.Option(help="Schema size: 100MiB, 5MB, ...")] = "100MiB",
    seed: Annotated[int, typer.Option(help="Seed of the generated schema.")] = 0,
    json_output: Annotated[
        Path | None, typer.Option("--json", help="Also write the schema JSON alone here.")
    ] = None,
) -> None:
    """Write a generated provider-like schema as a blob (header, index, JSON)."""
    from ..plugins.blob import SchemaBlob
    from ..plugins.schema import generate_blob

    size_bytes = _size(size)
    with console.status("generating..."):
        blob = generate_blob(size_bytes, seed=seed)
    try:
        output.write_bytes(blob)
        if json_output is not None:
            json_output.write_bytes(bytes(SchemaBlob(blob, check_json=False).document))
    except OSError as e:
        raise fail(f"cannot write {e.filename}: {e.strerror}") from None
    schema = SchemaBlob(blob, check_json=False)
    console.print(
        f"wrote [bold]{output}[/] ({len(blob):,} bytes: {schema.n_resources:,} resource types, "
        f"{schema.n_types - schema.n_resources:,} nested types, {schema.n_props:,} properties)"
    )


@plugins_app.command()
def check(
    programs: Annotated[list[Path], typer.Argument(help="YAML programs with a 'resources' section.")],
    blob: Annotated[Path, typer.Option(help="A schema blob file (wasmshare plugins generate).")],
    module: Annotated[
        Path | None, typer.Option(help="A plugin module (default: the type-check plugin).")
    ] = None,
) -> None:
    """Type-check YAML programs against a schema blob in a sandboxed plugin process."""
    from ..errors import ProgramError
    from ..plugins._safe_input import read_user_file
    from ..plugins.host import PluginHost
    from ..plugins.program import PROGRAM_TEXT_MAX_BYTES
    from ..plugins.publish import Publication

    failures = 0
    try:
        with Publication.publish(blob) as pub, PluginHost(pub, module=module) as host:
            host.spawn(1)
            for path in programs:
                text = read_user_file(  # its errors name the file; the handler below prints them
                    path,
                    label=f"program {path}",
                    max_bytes=PROGRAM_TEXT_MAX_BYTES,
                    limit_name="PROGRAM_TEXT_MAX_BYTES",
                    error=ProgramError,
                )
                try:
                    result = host.check(text)
                except ProgramError as e:
                    raise fail(f"{path}: {e}") from None
                if result.ok:
                    console.print(f"[green]✓[/] {path}: no problems", soft_wrap=True)
                    continue
                failures += 1
                console.print(f"[red]✗[/] {path}: {result.total} problem(s)", soft_wrap=True)
                for d in result.diagnostics:
                    console.print(
                        f"  {d.path}: [yellow]{d.kind}[/] {d.message}", highlight=False, soft_wrap=True
                    )
    except WasmshareError as e:
        raise fail(str(e)) from None
    raise typer.Exit(1 if failures else 0)
