"""The ``wasmshare`` command.

Every user mistake (bad path, bad module, compiler error) ends as one red line on
stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ._cli_output import console, errors
from ._cli_output import fail as _fail
from .errors import WasmshareError
from .llm.limits import DEFAULT_DEADLINE_MS

app = typer.Typer(
    name="wasmshare",
    help="Zero-copy shared memory between a Python host and its WebAssembly guests.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: no <bool> / <str> column beside every option
)

BENCHMARKS = ("calls", "exchange", "controllers", "grammars", "generate", "serve", "plugins", "whitespace")


@app.command()
def build(
    sources: Annotated[list[Path], typer.Argument(help="C source files of one guest module.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .wasm file to write.")],
    wasi: Annotated[
        bool, typer.Option("--wasi", help="Target wasm32-wasi with libc (a reactor module).")
    ] = False,
    optimize: Annotated[
        str, typer.Option("--optimize", "-O", help="fast (-O2), small (-Oz) or debug.")
    ] = "fast",
    initial_memory: Annotated[
        int | None, typer.Option(help="Initial linear memory in bytes (64 KiB multiple).")
    ] = None,
    max_memory: Annotated[
        int | None, typer.Option(help="Maximum linear memory in bytes (64 KiB multiple).")
    ] = None,
) -> None:
    """Compile C guest sources with Zig (from PyPI) against wasmshare.h."""
    from .abi import build_guest

    if optimize not in ("fast", "small", "debug"):
        raise _fail(f"--optimize must be fast, small or debug, not {optimize!r}")
    try:
        out = build_guest(
            sources,
            output,
            wasi=wasi,
            optimize=optimize,  # type: ignore[arg-type]
            initial_memory=initial_memory,
            max_memory=max_memory,
        )
    except (WasmshareError, ValueError, TypeError) as e:
        raise _fail(str(e)) from None
    console.print(f"built [bold]{out}[/] ({out.stat().st_size:,} bytes)")


@app.command()
def inspect(module: Annotated[Path, typer.Argument(help="A .wasm or .wat module.")]) -> None:
    """Show a guest's exports, imports and wasmshare ABI version."""
    from .guest import Guest

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
        raise _fail(str(e)) from None


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


@app.command()
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
    from .llm import constraints
    from .llm.tokens import TokenTable

    try:
        if tokenizer == "deepseek":
            table = TokenTable.deepseek()
        elif tokenizer.endswith(".json") and Path(tokenizer).is_file():
            table = TokenTable.from_file(tokenizer)
        else:
            from .llm.models import load_model

            with errors.status(f"loading the tokenizer of {tokenizer} ..."):
                table = load_model(tokenizer, device="cpu").token_table
    except WasmshareError as e:
        raise _fail(f"--tokenizer: {e}") from None
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


@app.command()
def run(
    prompt: Annotated[
        str | None, typer.Argument(help="The prompt (chat template applied when the model has one).")
    ] = None,
    json_schema: Annotated[
        Path | None, typer.Option("--json-schema", help="Constrain the answer to a JSON Schema file.")
    ] = None,
    regex: Annotated[str | None, typer.Option(help="Constrain the answer to a regular expression.")] = None,
    choice: Annotated[
        list[str] | None, typer.Option(help="Constrain the answer to one of these (repeat).")
    ] = None,
    grammar: Annotated[Path | None, typer.Option(help="Constrain the answer to a Lark grammar file.")] = None,
    controller: Annotated[Path | None, typer.Option(help="Steer with a wasm controller module.")] = None,
    arg: Annotated[
        list[str] | None, typer.Option(help="Controller argument: text, ids:1,2,3 or file:PATH (repeat).")
    ] = None,
    model: Annotated[
        str, typer.Option(help="smollm2-135m (default), gemma3-270m, or a model folder / .gguf path.")
    ] = "smollm2-135m",
    device: Annotated[
        str, typer.Option(help="auto (a CUDA device when torch sees one, else the CPU), cpu, cuda or cuda:N.")
    ] = "auto",
    max_tokens: Annotated[
        int | None,
        typer.Option(help="Most tokens to generate per answer (default 128; 512 under a constraint)."),
    ] = None,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    batch: Annotated[Path | None, typer.Option(help="A JSONL file of prompts, decoded as one batch.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
    raw: Annotated[bool, typer.Option(help="Do not apply the chat template.")] = False,
    stop: Annotated[list[str] | None, typer.Option(help="End the answer at this string (repeat).")] = None,
    grammar_backend: Annotated[str, typer.Option(help="llguidance (default) or xgrammar.")] = "llguidance",
    flexible_whitespace: Annotated[
        bool,
        typer.Option(
            "--flexible-whitespace",
            help="Allow any JSON whitespace under --json-schema (default: compact separators).",
        ),
    ] = False,
) -> None:
    """Generate with the embedded model, steered by a constraint or a wasm controller.

    Answers go to stdout (--json: one JSON object per line); status, warnings and stats to
    stderr. Exit 1 when an answer failed, 2 when a constrained answer was cut by --max-tokens."""
    from ._run import RunOptions, run_command

    options = RunOptions(
        prompt=prompt,
        json_schema=json_schema,
        regex=regex,
        choice=choice,
        grammar=grammar,
        controller=controller,
        arg=arg,
        model=model,
        device=device,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        batch=batch,
        json_output=json_output,
        raw=raw,
        stop=stop,
        grammar_backend=grammar_backend,
        flexible_whitespace=flexible_whitespace,
    )
    try:
        code = run_command(options, errors)
    except WasmshareError as e:
        raise _fail(str(e)) from None
    raise typer.Exit(code)


@app.command()
def serve(
    model: Annotated[
        str, typer.Option(help="smollm2-135m (default), gemma3-270m, or a model folder / .gguf path.")
    ] = "smollm2-135m",
    device: Annotated[
        str, typer.Option(help="auto (a CUDA device when torch sees one, else the CPU), cpu, cuda or cuda:N.")
    ] = "auto",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="WASMSHARE_API_KEY", help="Require this bearer key on /v1 routes."),
    ] = None,
    max_concurrent: Annotated[int, typer.Option(help="Sequences decoded at once; more wait in a queue.")] = 8,
    max_waiting: Annotated[int, typer.Option(help="Requests that may wait for a slot before 503.")] = 256,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 1024,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes (JSON endpoints).")] = 1 << 20,
    max_controller_bytes: Annotated[
        int, typer.Option(help="Largest uploaded controller module in bytes.")
    ] = 8 << 20,
    controller_deadline_ms: Annotated[
        float, typer.Option(help="Per-step deadline of a controller, in ms.")
    ] = DEFAULT_DEADLINE_MS,
    max_prompt_tokens: Annotated[
        int, typer.Option(help="Longest prompt in tokens (also below the model's context).")
    ] = 8192,
    controller_compile_s: Annotated[
        float, typer.Option(help="Time budget for compiling an uploaded controller, in s.")
    ] = 10.0,
    controllers_dir: Annotated[Path | None, typer.Option(help="Where uploaded controllers are kept.")] = None,
    grammar_backend: Annotated[str, typer.Option(help="llguidance (default) or xgrammar.")] = "llguidance",
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API, with controller upload."""
    try:
        from .server.app import ServerConfig
        from .server.main import serve as run_server
    except ImportError as e:
        raise _fail(f"the server needs its extras: pip install 'wasmshare[server,llm]' ({e})") from None
    for name, value in (
        ("--max-concurrent", max_concurrent),
        ("--max-waiting", max_waiting),
        ("--max-tokens", max_tokens),
        ("--max-body", max_body),
        ("--max-controller-bytes", max_controller_bytes),
        ("--max-prompt-tokens", max_prompt_tokens),
    ):
        if value <= 0:
            raise _fail(f"{name} must be positive, got {value}")
    if controller_deadline_ms <= 0:
        raise _fail(f"--controller-deadline-ms must be positive, got {controller_deadline_ms}")
    if controller_compile_s <= 0:
        raise _fail(f"--controller-compile-s must be positive, got {controller_compile_s}")
    from .llm.constraints import parse_backend

    try:
        backend = parse_backend(grammar_backend)
    except WasmshareError as e:
        raise _fail(f"--grammar-backend: {e}") from None
    if backend == "xgrammar" and importlib.util.find_spec("xgrammar") is None:
        raise _fail("--grammar-backend xgrammar needs xgrammar: pip install --no-deps xgrammar")
    config = ServerConfig(
        api_key=api_key or None,
        max_concurrent=max_concurrent,
        max_waiting=max_waiting,
        max_tokens=max_tokens,
        default_max_tokens=min(256, max_tokens),
        max_body_bytes=max_body,
        max_controller_bytes=max_controller_bytes,
        controller_deadline_ms=controller_deadline_ms,
        controllers_dir=controllers_dir,
        grammar_backend=backend,
        max_prompt_tokens=max_prompt_tokens,
        controller_compile_s=controller_compile_s,
    )
    try:
        run_server(model, config, host=host, port=port, log_level=log_level, console=console, device=device)
    except WasmshareError as e:
        raise _fail(str(e)) from None


@app.command()
def info() -> None:
    """Show the platform, versions and whether loans are zero-copy here."""
    from ._engine import default_cache_dir
    from .loan import zero_copy_supported

    table = Table(show_header=False)
    table.add_row("wasmshare", importlib.metadata.version("wasmshare"))
    table.add_row("wasmtime", importlib.metadata.version("wasmtime"))
    table.add_row("numpy", importlib.metadata.version("numpy"))
    table.add_row("python", sys.version.split()[0])
    table.add_row("platform", sys.platform)
    table.add_row("loans", "zero-copy (mmap)" if zero_copy_supported() else "copy fallback")
    table.add_row("module cache", str(default_cache_dir() / "modules"))
    console.print(table)


@app.command()
def demo() -> None:
    """Walk through the core: a guest, numpy and a second process share one region."""
    from .demo import run_demo

    try:
        code = run_demo(console)
    except WasmshareError as e:
        raise _fail(str(e)) from None
    raise typer.Exit(code)


def _bench_dir() -> Path:
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
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


@app.command()
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
        raise _fail(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)} or all")
    status = 0
    for bench_name in names:
        try:
            module = _load_bench(bench_name)
        except WasmshareError as e:
            raise _fail(str(e)) from None
        argv = (["--quick"] if quick else []) + (["--out", str(out)] if out else [])
        console.rule(f"bench {bench_name}")
        status |= int(module.main(argv) or 0)
    raise typer.Exit(status)


from .plugins.cli import plugins_app  # noqa: E402 - registered after the core commands

app.add_typer(plugins_app, name="plugins")


def main() -> None:
    """Entry point of the ``wasmshare`` console script."""
    try:
        app()
    except WasmshareError as e:  # pragma: no cover - commands catch their own
        errors.print(f"[red bold]error:[/] {e}", highlight=False)
        sys.exit(1)
