"""The ``wasmshare run`` command: constrained generation on a real model, streamed.

Kept apart from ``cli.py`` so the command-line parsing stays small; everything a user can
get wrong (a bad schema, a missing model, bad wasm, bad arguments) ends as one clear line.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from .errors import WasmshareError

__all__ = ["RunOptions", "run_command", "parse_controller_arg"]


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
        self.max_tokens: int = values.get("max_tokens", 128)
        self.temperature: float = values.get("temperature", 0.0)
        self.seed: int | None = values.get("seed")
        self.batch: Path | None = values.get("batch")
        self.json_output: bool = values.get("json_output", False)
        self.raw: bool = values.get("raw", False)
        self.stop: list[str] = values.get("stop") or []
        self.grammar_backend: str = values.get("grammar_backend") or "llguidance"


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
    from .llm import constraints as C
    from .llm.controller import Controller

    chosen = [x for x in (opts.json_schema, opts.regex, opts.choice, opts.grammar, opts.controller) if x]
    if len(chosen) > 1:
        raise WasmshareError("choose at most one of --json-schema, --regex, --choice, --grammar, --controller")
    if opts.json_schema is not None:
        if not opts.json_schema.is_file():
            raise WasmshareError(f"no JSON schema file at {opts.json_schema}")
        return C.json_schema(opts.json_schema)
    if opts.regex is not None:
        return C.regex(opts.regex)
    if opts.choice:
        return C.choice(opts.choice)
    if opts.grammar is not None:
        try:
            return C.grammar(opts.grammar.read_text())
        except OSError as e:
            raise WasmshareError(f"cannot read grammar {opts.grammar}: {e.strerror}") from e
    if opts.controller is not None:
        if not opts.controller.is_file():
            raise WasmshareError(f"no controller module at {opts.controller}")
        return Controller(opts.controller, parse_controller_arg(opts.arg))
    return None


def build_requests(opts: RunOptions) -> list[Any]:
    """Turn the options (and ``--batch`` lines) into generation requests."""
    from .llm.engine import GenerationRequest

    if opts.max_tokens <= 0:
        raise WasmshareError("--max-tokens must be positive")
    if opts.grammar_backend not in ("llguidance", "xgrammar"):
        raise WasmshareError(f"--grammar-backend must be llguidance or xgrammar, not {opts.grammar_backend!r}")
    if opts.temperature < 0:
        raise WasmshareError("--temperature must be >= 0")
    steer = _steer(opts)
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
            if not isinstance(prompt, str):
                raise WasmshareError(f'{opts.batch}:{n}: expected a string or {{"prompt": "..."}}')
            prompts.append(prompt)
    if opts.prompt:
        prompts.insert(0, opts.prompt)
    if not prompts:
        raise WasmshareError("give a PROMPT or --batch PROMPTS.jsonl")
    return [
        GenerationRequest(
            p, max_tokens=opts.max_tokens, temperature=opts.temperature,
            seed=opts.seed, steer=steer, chat=False if opts.raw else None, stop=tuple(opts.stop),
        )
        for p in prompts
    ]


def run_command(opts: RunOptions, console: Console) -> int:
    """Load the model, generate (streaming a single request), print results and stats."""
    import torch

    from .llm.engine import Engine
    from .llm.models import load_model

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # our status line says what happens
    requests = build_requests(opts)
    with console.status(f"loading {opts.model} ...") as status:
        loaded = load_model(opts.model, device=opts.device, progress=lambda message: status.update(message))
    single = len(requests) == 1 and not opts.json_output
    printed = [0]

    def stream(index: int, token: int, text: str) -> None:
        if single:
            console.print(text[printed[0]:], end="", highlight=False, markup=False, soft_wrap=True)
            printed[0] = len(text)

    started = time.perf_counter()
    with Engine(loaded, max_batch=min(8, len(requests)), grammar_backend=opts.grammar_backend) as engine:  # type: ignore[arg-type]
        with torch.inference_mode():
            if single:
                results = engine.generate(requests, on_token=stream)
            else:
                with console.status(f"generating {len(requests)} completions ..."):
                    results = engine.generate(requests)
        stats = engine.stats
    elapsed = time.perf_counter() - started
    failed = 0
    if opts.json_output:
        for r in results:
            console.print_json(json.dumps({
                "prompt": r.request.prompt, "text": r.text, "tokens": len(r.tokens),
                "finish_reason": r.finish_reason, "error": r.error,
            }))
    else:
        if single:
            console.print()
        for i, r in enumerate(results):
            if not single:
                console.rule(f"[{i}] {r.request.prompt[:60]}")
                console.print(r.text, highlight=False, markup=False)
            if r.error:
                failed += 1
                console.print(f"[red]error:[/] {r.error}", highlight=False)
    console.print(
        f"[dim]{stats.generated_tokens} tokens in {elapsed:.1f} s; decode {stats.tokens_per_s:.1f} tok/s; "
        f"controllers {stats.work_us_per_step:.0f} µs/step "
        f"({stats.critical_us_per_step:.0f} µs on the critical path); "
        f"bytes copied between host and guests: {stats.bytes_copied}[/]",
        highlight=False,
    )
    return 1 if failed else 0
