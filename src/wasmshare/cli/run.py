"""``wasmshare run``: constrained generation on a real model, streamed.

Everything a user can get wrong (a bad schema, a missing model, bad wasm, bad arguments)
ends as one clear line, checked before the model loads. Answers go to stdout (with
``--json``: one compact JSON object per line), everything for a human (status, warnings,
stats) to stderr, so ``wasmshare run ... --json > out.jsonl`` is a file a program can read.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import time
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer
from rich.console import Console

from ..errors import WasmshareError
from ..llm.limits import DEFAULT_DEADLINE_MS, Limits
from ..llm.requests import StallPolicy
from ._options import ControllerDeadlineOption, StallPolicyOption, StepBudgetOption, check_stall_options
from ._output import errors, fail

__all__ = [
    "CONSTRAINED_MAX_TOKENS",
    "PLAIN_MAX_TOKENS",
    "RunOptions",
    "build_requests",
    "parse_controller_arg",
    "run",
    "run_command",
]


class RunOptions:
    """What ``wasmshare run`` was asked to do (validated by :func:`build_requests`)."""

    def __init__(self, **values: Any) -> None:
        self.prompt: str | None = values.get("prompt")
        self.json_schema: Path | None = values.get("json_schema")
        self.regex: str | None = values.get("regex")
        self.choice: list[str] | None = values.get("choice")
        self.grammar: Path | None = values.get("grammar")
        self.controller: Path | None = values.get("controller")
        self.arg: list[str] = values.get("arg") or []
        self.model: str = values.get("model") or "smollm2-135m"
        self.device: str = values.get("device") or "auto"
        self.max_tokens: int | None = values.get("max_tokens")
        self.temperature: float = values.get("temperature", 0.0)
        self.seed: int | None = values.get("seed")
        self.batch: Path | None = values.get("batch")
        self.json_output: bool = values.get("json_output", False)
        self.raw: bool = values.get("raw", False)
        self.stop: list[str] = values.get("stop") or []
        self.grammar_backend: str = values.get("grammar_backend") or "llguidance"
        self.flexible_whitespace: bool = values.get("flexible_whitespace", False)
        self.stall_policy: StallPolicy = values.get("stall_policy") or "sit_out"
        self.step_budget_ms: float | None = values.get("step_budget_ms")
        self.controller_deadline_ms: float = values.get("controller_deadline_ms") or DEFAULT_DEADLINE_MS


PLAIN_MAX_TOKENS = 128
"""``--max-tokens`` when nothing constrains the answer."""
CONSTRAINED_MAX_TOKENS = 512
"""``--max-tokens`` under a constraint.

A constrained answer must reach its end to be valid, and an ordinary schema needs more
than a chat reply: 512 fits a schema of a dozen fields twice over, while a model that
wanders stops within seconds.
"""


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
    stall_policy: StallPolicyOption = "sit_out",
    step_budget_ms: StepBudgetOption = None,
    controller_deadline_ms: ControllerDeadlineOption = DEFAULT_DEADLINE_MS,
) -> None:
    """Generate with the embedded model, steered by a constraint or a wasm controller.

    Answers go to stdout (--json: one JSON object per line); status, warnings and stats to
    stderr. Exit 1 when an answer failed, 2 when a constrained answer was cut by --max-tokens."""
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
        stall_policy=check_stall_options(stall_policy, step_budget_ms),
        step_budget_ms=step_budget_ms,
        controller_deadline_ms=controller_deadline_ms,
    )
    if not (controller_deadline_ms > 0 and math.isfinite(controller_deadline_ms)):
        raise fail(f"--controller-deadline-ms must be a positive number, got {controller_deadline_ms}")
    try:
        code = run_command(options, errors)
    except WasmshareError as e:
        raise fail(str(e)) from None
    raise typer.Exit(code)


def parse_controller_arg(values: list[str]) -> bytes:
    """Controller argument bytes from ``--arg`` values.

    ``ids:1,2,3`` packs little-endian uint32 token ids; ``file:PATH`` reads a file;
    anything else is UTF-8 text; several ``--arg`` are joined with newlines.
    """
    parts: list[bytes] = []
    for value in values:
        if value.startswith("ids:"):
            try:
                ids = [int(x) for x in value[4:].split(",") if x.strip()]
            except ValueError as e:
                raise WasmshareError(f"--arg {value!r}: ids must be integers separated by commas") from e
            parts.append(struct.pack(f"<{len(ids)}I", *ids))
        elif value.startswith("file:"):
            try:
                parts.append(Path(value[5:]).read_bytes())
            except OSError as e:
                raise WasmshareError(f"--arg {value!r}: {e.strerror}") from e
        else:
            parts.append(value.encode())
    return b"\n".join(parts)


def _steer(opts: RunOptions) -> Any:
    from ..llm import constraints as C
    from ..llm.controller import Controller

    chosen = [x for x in (opts.json_schema, opts.regex, opts.choice, opts.grammar, opts.controller) if x]
    if len(chosen) > 1:
        raise WasmshareError(
            "choose at most one of --json-schema, --regex, --choice, --grammar, --controller"
        )
    if opts.flexible_whitespace and opts.json_schema is None:
        raise WasmshareError("--flexible-whitespace applies to --json-schema only")
    spec, flag = None, ""
    try:
        if opts.json_schema is not None:
            flag = "--json-schema"
            if not opts.json_schema.is_file():
                raise WasmshareError(f"--json-schema: no file at {opts.json_schema}")
            spec = C.json_schema(
                opts.json_schema, whitespace="flexible" if opts.flexible_whitespace else "compact"
            )
        elif opts.regex is not None:
            flag = "--regex"
            spec = C.regex(opts.regex)
        elif opts.choice:
            flag = "--choice"
            spec = C.choice(opts.choice)
        elif opts.grammar is not None:
            flag = "--grammar"
            try:
                text = opts.grammar.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise WasmshareError(
                    f"--grammar: cannot read {opts.grammar}: {getattr(e, 'strerror', None) or e}"
                ) from e
            spec = C.grammar(text)
        if spec is not None:
            C.check_spec(spec)  # before the model loads: a bad spec is reported in a second
    except C.ConstraintError as e:
        message = str(e)
        if spec is not None and message.startswith(spec.describe() + ": "):
            message = message[len(spec.describe()) + 2 :]
        raise WasmshareError(f"{flag}: {message}") from None
    if spec is not None:
        return spec
    if opts.controller is not None:
        if not opts.controller.is_file():
            raise WasmshareError(f"no controller module at {opts.controller}")
        return Controller(opts.controller, parse_controller_arg(opts.arg))
    return None


def build_requests(opts: RunOptions) -> list[Any]:
    """Turn the options (and ``--batch`` lines) into generation requests."""
    from ..llm.constraints import parse_backend
    from ..llm.requests import GenerationRequest

    if opts.max_tokens is not None and opts.max_tokens <= 0:
        raise WasmshareError("--max-tokens must be positive")
    parse_backend(opts.grammar_backend)
    if opts.temperature < 0:
        raise WasmshareError("--temperature must be >= 0")
    steer = _steer(opts)
    if opts.max_tokens is None:
        opts.max_tokens = PLAIN_MAX_TOKENS if steer is None else CONSTRAINED_MAX_TOKENS
    prompts: list[str] = []
    if opts.batch is not None:
        try:
            lines = opts.batch.read_text().splitlines()
        except OSError as e:
            raise WasmshareError(f"cannot read {opts.batch}: {e.strerror}") from e
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as e:
                raise WasmshareError(f"{opts.batch}:{n}: not JSON ({e})") from e
            prompt = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(prompt, str) or not prompt:
                raise WasmshareError(f'{opts.batch}:{n}: expected a non-empty string or {{"prompt": "..."}}')
            prompts.append(prompt)
    if opts.prompt:
        prompts.insert(0, opts.prompt)
    if not prompts:
        raise WasmshareError("give a PROMPT or --batch PROMPTS.jsonl")
    return [
        GenerationRequest(
            p,
            max_tokens=opts.max_tokens,
            temperature=opts.temperature,
            seed=opts.seed,
            steer=steer,
            chat=False if opts.raw else None,
            stop=tuple(opts.stop),
        )
        for p in prompts
    ]


def run_command(opts: RunOptions, console: Console, out: TextIO | None = None) -> int:
    """Load the model, generate, print the answers on ``out`` (stdout) and the rest on ``console``.

    Returns the exit code: 0 when every answer completed, 1 when one failed with an error,
    2 when a constrained answer was cut by ``--max-tokens`` (or, for a JSON Schema, does not
    validate), so a script never takes a cut answer for a valid one."""
    import torch
    from transformers.utils import logging as hf_logging

    from ..llm.constraints import parse_backend
    from ..llm.engine import Engine
    from ..llm.models import load_model

    out = out or sys.stdout
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # our status line says what happens
    requests = build_requests(opts)  # every input checked before the model loads
    with console.status(f"loading {opts.model} ...") as status:
        loaded = load_model(opts.model, device=opts.device, progress=lambda message: status.update(message))
    single = len(requests) == 1 and not opts.json_output
    printed = [0]

    def stream(index: int, token: int, text: str) -> None:
        out.write(text[printed[0] :])
        out.flush()
        printed[0] = len(text)

    started = time.perf_counter()
    with Engine(
        loaded,
        max_batch=min(8, len(requests)),
        grammar_backend=parse_backend(opts.grammar_backend),
        limits=Limits(deadline_ms=opts.controller_deadline_ms),
        stall_policy=opts.stall_policy,
        step_budget_ms=opts.step_budget_ms,
    ) as engine:
        with torch.inference_mode():
            if single:
                results = engine.generate(requests, on_token=stream)
            else:
                results = _generate_with_progress(engine, requests, console)
        stats = engine.stats
    elapsed = time.perf_counter() - started
    if single:
        out.write(results[0].text[printed[0] :] + "\n")
    code = 0
    for i, r in enumerate(results):
        problem = _incomplete(r, opts)
        if opts.json_output:
            out.write(
                json.dumps(
                    {
                        "index": i,
                        "prompt": r.request.prompt,
                        "text": r.text,
                        "tokens": len(r.tokens),
                        "finish_reason": r.finish_reason,
                        "complete": problem is None and r.error is None,
                        "error": r.error,
                        "enforced_by": r.enforced_by,
                        "backtracks": r.backtracks,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
        elif not single:
            console.print(f"[bold][{i}][/] {r.request.prompt[:60]}", highlight=False)
            out.write(r.text + "\n")
        label = "" if len(results) == 1 else f"answer {i}: "
        if r.enforced_by is not None and r.enforced_by != "grammar":
            repairs = f"; {_count(r.backtracks, 'backtrack')}" if r.backtracks else ""
            console.print(f"[dim]{label}enforced by {r.enforced_by}{repairs}[/]", highlight=False)
        if r.error:
            code = max(code, 1)
            console.print(f"[red]error:[/] {label}{r.error}", highlight=False)
        elif problem is not None:
            constrained = r.request.steer is not None
            if constrained:
                code = max(code, 2)
            console.print(f"[yellow]warning:[/] {label}{problem}", highlight=False)
    out.flush()
    if stats.generated_tokens:
        console.print(
            f"[dim]{_count(stats.generated_tokens, 'token')} in {elapsed:.1f} s; decode {stats.tokens_per_s:.1f} tok/s; "
            f"controllers {stats.work_us_per_step:.0f} µs/step "
            f"({stats.critical_us_per_step:.0f} µs on the critical path); "
            f"bytes copied between host and guests: {stats.bytes_copied}"
            + (
                f"; {_count(stats.sat_out_steps, 'step')} sat out by late controllers"
                if stats.sat_out_steps
                else ""
            )
            + "[/]",
            highlight=False,
        )
    return code


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _incomplete(result: Any, opts: RunOptions) -> str | None:
    """Why an answer without an error is not what was asked for, or None."""
    if result.error:
        return None
    steer = result.request.steer
    if result.finish_reason == "length":
        what = "the answer" if steer is None else "the constrained answer"
        tail = " before it was complete" if steer is not None else ""
        return f"{what} was cut at --max-tokens {result.request.max_tokens}{tail}; raise --max-tokens"
    if opts.json_schema is not None:
        import jsonschema

        try:
            jsonschema.validate(json.loads(result.text), json.loads(opts.json_schema.read_text()))
        except (ValueError, jsonschema.ValidationError, jsonschema.SchemaError) as e:
            return f"the answer does not validate under {opts.json_schema}: {str(e).splitlines()[0]}"
    return None


def _generate_with_progress(engine: Any, requests: list[Any], console: Console) -> list[Any]:
    """``engine.generate`` with a progress bar on the console (stderr) as answers finish."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..llm.requests import RequestQueue

    queue = RequestQueue()
    keys = [queue.submit(r) for r in requests]
    queue.close()
    results: dict[int, Any] = {}
    if not console.is_terminal:  # a log, not a live bar: one line per answer as it finishes

        def log(key: int, result: Any) -> None:
            results[key] = result
            console.print(
                f"[dim]answer {keys.index(key)} done ({len(results)}/{len(keys)}): "
                f"{result.finish_reason}, {_count(len(result.tokens), 'token')}[/]",
                highlight=False,
            )

        engine.run(queue, on_finish=log)
        return [results[k] for k in keys]
    with Progress(
        TextColumn("generating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("generating", total=len(requests))

        def finish(key: int, result: Any) -> None:
            results[key] = result
            progress.advance(task)

        engine.run(queue, on_finish=finish)
    return [results[k] for k in keys]
