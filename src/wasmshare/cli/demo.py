"""The `wasmshare demo` walkthrough: one region shared by a guest, numpy and a second process.

Each step prints what it shows. The demo exits non-zero if any check fails, so it is
also an end-to-end smoke test of the core on a fresh machine.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console

from .._engine import child_env
from ..errors import GuestLimitExceeded, GuestTrap, WasmshareError
from ..guest import Guest
from ..llm.limits import Limits
from ..loan import zero_copy_supported
from ..region import Region
from ._output import console, fail

__all__ = ["demo", "find_guest", "run_demo"]

VOCAB = 128 * 1024


def demo() -> None:
    """Walk through the core: a guest, numpy and a second process share one region."""
    try:
        code = run_demo(console)
    except WasmshareError as e:
        raise fail(str(e)) from None
    raise typer.Exit(code)


def find_guest(name: str) -> Path:
    """Locate an example guest shipped in the source tree's ``guests/`` folder."""
    candidates = [Path.cwd() / "guests" / name, Path(__file__).resolve().parents[3] / "guests" / name]
    for path in candidates:
        if path.is_file():
            return path
    raise WasmshareError(
        f"example guest {name} not found in {', '.join(str(c.parent) for c in candidates)}; "
        "run the demo from a wasmshare source checkout"
    )


_CHILD = """
import socket, sys
import numpy as np
from wasmshare import Region
sock = socket.socket(fileno=int(sys.argv[1]))
region = Region.receive(sock)
bias = region.array(np.float32)
nonzero = np.flatnonzero(bias)
print(f"{len(nonzero)} {float(bias.sum())}", flush=True)
bias[nonzero] *= -1.0                     # the second process writes into the same pages
sock.sendall(b"ok")
"""


def _controller_demo(out: Console, check: Any) -> int:
    """Section 5: a batch of LLM controllers writing masks and biases in place."""
    import struct

    from ..llm import Action, Controller, ControllerBatch, Output, TokenTable

    out.print("\n[bold]5. A decode batch of wasm controllers (AICI model)")
    try:
        table = TokenTable.deepseek()
    except WasmshareError as e:
        out.print(f"  [yellow]skipped: {e}[/]")
        return 0
    controllers = {
        "allow_list": Controller(find_guest("controllers/allow_list.wasm"), struct.pack("<3I", 11, 12, 13)),
        "boost_words": Controller(find_guest("controllers/boost_words.wasm"), "hello\t3.0"),
        "force_answer": Controller(
            find_guest("controllers/force_answer.wasm"),
            struct.pack("<2I", table.find(" yes") or 0, table.eos_token or 0),
        ),
        "hostile (traps mid-mask)": Controller(
            find_guest("controllers/hostile_controller.wasm"), "trap_mid_mask"
        ),
    }
    with ControllerBatch(table, capacity=8, limits=Limits(deadline_ms=50)) as batch:
        ids = {name: batch.add(c) for name, c in controllers.items()}
        step = batch.step()
        out.print(
            f"  vocabulary {table.vocab_size:,} tokens (deepseek); the first step of {len(ids)} "
            f"controllers took {step.elapsed_us:.0f} µs"
        )
        for name, sid in ids.items():
            r = step.results[sid]
            forced = table.decode(r.fast_forward).decode("utf-8", "replace")
            detail = f"fast-forward {forced!r}" if r.fast_forward else r.output.value
            if r.error is not None:
                detail = f"{r.error.cause}: sequence ended, its mask reset, nothing applied"
            out.print(f"  {name:26} {r.action.value:9} {detail}")
        import torch

        logits = torch.zeros(len(step.sequence_ids), table.vocab_size)
        batch.apply(logits, step)
        row = list(step.sequence_ids).index(ids["allow_list"])
        allowed = torch.isfinite(logits[row]).nonzero().flatten().tolist()
        check(allowed == [11, 12, 13], "apply(): the allow-list row keeps exactly its 3 tokens")
        check(
            step.results[ids["hostile (traps mid-mask)"]].action is Action.ERROR
            and step.results[ids["boost_words"]].output is Output.BIAS,
            "the trapping controller failed alone; the rest of the batch carried on",
        )
        return 0


def _generation_demo(out: Console, check: Any) -> int:
    """Section 6, the main job: constrained generation with the embedded model."""
    import json

    import jsonschema
    import torch

    from ..llm import Controller, load_model
    from ..llm import constraints as C
    from ..llm.engine import Engine
    from ..llm.requests import GenerationRequest

    out.print("\n[bold]6. Generation with the embedded model (SmolLM2-135M-Instruct)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # our status line says what happens
    with out.status("loading smollm2-135m (the first run converts the packaged GGUF, ~20 s) ...") as status:
        loaded = load_model("smollm2-135m", progress=lambda message: status.update(message))
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "country": {"type": "string", "maxLength": 30},
            "population_millions": {"type": "integer", "minimum": 0, "maximum": 100},
        },
        "required": ["city", "country", "population_millions"],
        "additionalProperties": False,
    }
    tool_schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    }
    # The assistant's reply is begun with free text and the marker; the controller sees the
    # marker at the end of its prompt and has the host engine constrain the call from there.
    tool_prompt = loaded.encode_prompt("What is the weather in Paris? Use the weather tool.") + (
        loaded.tokenizer.encode("Let me check that for you. <tool>", add_special_tokens=False)
    )
    requests = [
        GenerationRequest(
            "Describe the capital of France as JSON with city, country and population_millions.",
            max_tokens=80,
            steer=C.json_schema(schema),
        ),
        GenerationRequest(
            tool_prompt,
            max_tokens=60,
            steer=Controller(find_guest("controllers/tool_call.wasm"), "<tool>\n" + json.dumps(tool_schema)),
        ),
    ]
    with Engine(loaded, max_batch=2) as engine:
        answer, tool = engine.generate(requests)
        stats = engine.stats
    out.print(f"  JSON Schema constrained answer: [cyan]{answer.text}[/]", highlight=False)
    try:
        jsonschema.validate(json.loads(answer.text), schema)
        check(True, "the answer is valid JSON under the schema (jsonschema)")
    except (ValueError, jsonschema.ValidationError) as e:
        check(False, f"the answer validates: {e}")
    out.print(
        f"  wasm controller (tool_call.wasm), reply begun with 'Let me check that for you. <tool>': "
        f"[cyan]{tool.text}[/]",
        highlight=False,
    )
    call = "<tool>" + tool.text if tool.finish_reason == "controller" else None
    call = call.split("<tool>", 1)[1] if call else None
    if call is None or tool.finish_reason != "controller":
        why = "did not write the marker" if call is None else "ran out of tokens before the call was complete"
        out.print(f"  [dim](the model {why}: the controller left the text free)[/]")
        check(tool.error is None, "the controller ran without error")
    else:
        try:
            jsonschema.validate(json.loads(call), tool_schema)
            check(True, "after the marker the controller had the host engine constrain the call; it is valid")
        except (ValueError, jsonschema.ValidationError) as e:
            check(False, f"the tool call validates: {e}")
    out.print(
        f"  [dim]{stats.generated_tokens} tokens, {stats.tokens_per_s:.1f} tok/s decoding; controllers "
        f"{stats.work_us_per_step:.0f} µs/step, {stats.critical_us_per_step:.0f} µs on the critical path; "
        f"bytes copied between host and guests: {stats.bytes_copied}[/]"
    )
    return 0


def run_demo(console: Console | None = None) -> int:
    """Run the walkthrough; return 0 when every check passed."""
    out = console or Console()
    failures = 0

    def check(ok: bool, what: str) -> None:
        nonlocal failures
        out.print(f"  [{'green' if ok else 'red'}]{'✓' if ok else '✗'}[/] {what}")
        failures += 0 if ok else 1

    mode = "zero-copy (mmap into linear memory)" if zero_copy_supported() else "copy fallback"
    out.rule("[bold]wasmshare demo")
    out.print(f"platform: {sys.platform}, loans: {mode}\n")

    out.print("[bold]1. A guest writes a logit-bias vector straight into a shared region")
    guest = Guest(find_guest("bias.wasm"), name="bias", deadline_ms=50)
    region = Region.create(VOCAB * 4)
    loan = guest.lend(region, "rw", dtype=np.float32)
    view = region.array(np.float32)  # numpy over the same physical pages
    update = guest.func("bias_update")
    ptr, count = loan.as_param()
    steps = 2000
    started = time.perf_counter()
    for step in range(steps):
        update(ptr, count, step)
    per_step_us = (time.perf_counter() - started) / steps * 1e6
    view[:] = 0.0
    written = update(ptr, count, 7)
    out.print(
        f"  region: {region.nbytes // 1024} KiB memfd, lent at guest address {loan.ptr:#x}; "
        f"a step (guest writes {written} entries, host sees them) takes {per_step_us:.1f} µs"
    )
    check(int(np.count_nonzero(view)) == 64, "numpy sees the 64 biased entries with no copy")
    check(
        np.shares_memory(view, loan.array(np.float32)), "the loan's view and the region's view are one buffer"
    )
    check(guest.bytes_copied == 0, "bytes copied by the host: 0")

    out.print("\n[bold]2. A second process receives the region's fd over a Unix socket")
    parent, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = child_env()
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_CHILD), str(child_sock.fileno())],
        pass_fds=(child_sock.fileno(),),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    child_sock.close()
    region.send(parent)
    acknowledged = parent.recv(2) == b"ok"
    stdout, stderr = child.communicate(timeout=60)
    parent.close()
    if child.returncode != 0:
        out.print(f"  [red]child failed:[/] {stderr.strip()}")
        failures += 1
    else:
        child_count, total = stdout.split()
        out.print(
            f"  child (pid {child.pid}) read {child_count} entries summing to {float(total):.1f}, then negated them"
        )
        check(acknowledged and int(child_count) == 64, "the child saw the guest's writes")
        guest_sum = guest.call("sum_f32", loan)
        check(guest_sum == -float(total), f"the guest sees the child's writes (sum now {guest_sum:.1f})")

    out.print("\n[bold]3. Read-only and revoked loans trap the guest, nobody else")
    hostile = Guest(find_guest("hostile.wasm"), name="hostile", deadline_ms=50)
    ro = hostile.lend(region, "ro")
    before = view.copy()
    try:
        hostile.call("write_at", ro.ptr, 1)
        check(False, "write to a read-only loan was refused")
    except GuestTrap as e:
        out.print(f"  [dim]{e}[/]")
        check(True, "write to a read-only loan trapped")
    ro.revoke()
    try:
        hostile.call("read_at", ro.ptr)
        check(False, "read of a revoked loan was refused")
    except GuestTrap:
        check(True, "read of a revoked loan trapped")
    check(np.array_equal(before, view), "region contents intact")
    check(guest.call("sum_f32", loan) == float(before.sum()), "the other guest carries on")

    out.print("\n[bold]4. A runaway guest hits its deadline")
    try:
        hostile.call("spin")
        check(False, "infinite loop stopped")
    except GuestLimitExceeded as e:
        out.print(f"  [dim]{e}[/]")
        check(e.limit == "deadline", "infinite loop stopped by the 50 ms deadline")

    region.close()
    check(loan.closed and ro.closed, "closing the region revoked its loans")
    guest.close()
    hostile.close()

    # (check() counts failures itself; these sections return nothing else to add)
    _controller_demo(out, check)
    _generation_demo(out, check)
    out.print()
    if failures:
        out.print(f"[red bold]{failures} check(s) failed")
        return 1
    out.print("[green bold]all checks passed")
    return 0
