"""The controller phase of one decode step: ControllerBatch (zero-copy) vs the copy design.

One *step* is the whole controller phase: the sampled tokens go in, every controller of
the batch runs once, and the batch's masks (or biases) are ready for the engine.

* ours: :class:`wasmshare.llm.ControllerBatch` in ``threads`` and ``workers`` mode. The
  tokens are written into the shared step records (one vectorised store), each
  controller writes its row of the batch bitmask / bias region in place, and the result
  records are read back vectorised.
* baseline, the copy design: the same controller module, one guest per sequence, each with
  its step record, tokens, token table and output row in *its own* linear memory. Per
  sequence and step the host copies the step record and token in (``Memory.write``), makes
  the same fast call, copies the result record and the output row out (``Memory.read``)
  and assembles the batch array. It runs on the engine's thread, like ours in thread mode.
* memset: simply writing B×V float32 on the host (``ndarray.fill``), the floor for a
  controller phase that writes a full bias per sequence.

Controllers (``guests/controllers``): ``bench_mask`` rewrites its whole bitmask every step
(clear ``ceil(V/32)`` words, allow two ids); ``bench_bias`` writes all V floats of its bias.
The token tables are synthetic vocabularies of V tokens.

Guest languages: the ``allow_list`` controller written in C (``guests/controllers``), Rust
(``sdk/rust/examples``) and Zig (``sdk/zig/examples``), the same argument, in the same batch
configurations, measured in rotation (C Rust Zig, Rust Zig C, Zig C Rust: each language in
each position once; the mean of its medians), every mask row compared with C's.

Targets (issue): bitmask B=64, V=128k under 1 ms a step and at least 5× faster than the copy
design; bias mode within 2× of the memset of B×V floats; the Rust allow-list within 1.2× of C's.

Run from the repo root: ``PYTHONPATH=src .venv/bin/python bench/bench_controllers.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from wasmshare.llm.limits import Limits  # noqa: E402

NAME = "controllers"
ROOT = Path(__file__).resolve().parent.parent
CONTROLLERS = ROOT / "guests" / "controllers"
BATCH_SIZES = (1, 8, 64)
VOCAB_SIZES = (32768, 131072, 262144)
OUTPUTS = ("bitmask", "bias")
MODES = ("threads", "workers")
BASELINE = "copy design (Memory.write in, Memory.read out, assemble)"
TARGET_B, TARGET_V = 64, 131072


def _controller(output: str) -> tuple[Path, bytes]:
    if output == "bitmask":
        return CONTROLLERS / "bench_mask.wasm", struct.pack("<2I", 1, 1000)
    return CONTROLLERS / "bench_bias.wasm", b""


class _CopyDesign:
    """B guests that keep everything in their own memory; the host copies in and out."""

    def __init__(self, table: Any, output: str, batch: int) -> None:
        from wasmshare import Guest
        from wasmshare.llm import _layout as L

        module, arg = _controller(output)
        self.output = output
        self.v = table.vocab_size
        self.words = L.mask_words(self.v)
        row_bytes = self.words * 4 if output == "bitmask" else self.v * 4
        self.row_bytes = row_bytes
        self.batch_rows = np.zeros((batch, row_bytes // 4), np.int32 if output == "bitmask" else np.float32)
        table_bytes = table.region.array(np.uint8).tobytes()
        self.guests = []
        for i in range(batch):
            g = Guest(module, name=f"copy-{i}", deadline_ms=50)
            # Layout in the guest's own memory: step record page, tokens, argument, table, row.
            need = L.TOKENS_OFFSET + 4096 + len(table_bytes) + row_bytes + 3 * 65536
            base = g.grow_memory(-(-need // 65536)) * 65536
            step_at, tokens_at = base, base + L.TOKENS_OFFSET
            arg_at = tokens_at + 1024
            table_at = -(-(arg_at + len(arg) + 64) // 4096) * 4096
            row_at = -(-(table_at + len(table_bytes)) // 4096) * 4096
            g.write_memory(table_at, table_bytes)
            g.write_memory(arg_at, arg)
            record = np.zeros(1, L.STEP_INPUT)
            record["struct_size"] = L.STEP_INPUT.itemsize
            record["abi_version"] = L.CONTROLLER_ABI_VERSION
            record["vocab_size"] = self.v
            record["mask_words"] = self.words
            record["token_table"] = table_at
            record["mask"] = row_at
            record["bias"] = row_at
            record["tokens"] = tokens_at
            record["arg"] = arg_at
            record["arg_len"] = len(arg)
            g.write_memory(step_at, record.tobytes())
            result_at = step_at + L.STEP_RESULT_OFFSET
            if g.call("ws_ctrl_create", step_at, result_at) != 0:
                raise RuntimeError("baseline controller create failed")
            record["arg"] = 0
            record["arg_len"] = 0
            record["n_tokens"] = 1
            self.guests.append(
                (g, g.func("ws_ctrl_step"), g._memory, g._store, step_at, result_at, row_at, record)
            )
        self.step_no = 0

    def step(self) -> None:
        rows = self.batch_rows
        dtype = rows.dtype
        n = self.step_no
        token = np.array([n % self.v], np.uint32).tobytes()
        for i, (_, call, memory, store, step_at, result_at, row_at, record) in enumerate(self.guests):
            record["step"] = n
            memory.write(store, record.tobytes(), step_at)  # the step record in
            memory.write(store, token, step_at + 8192)  # the sampled token in
            if call(step_at, result_at) != 0:
                raise RuntimeError("baseline controller step failed")
            memory.read(store, result_at, result_at + 32)  # the result record out
            rows[i] = np.frombuffer(memory.read(store, row_at, row_at + self.row_bytes), dtype)
        self.step_no += 1

    def close(self) -> None:
        for g, *_ in self.guests:
            g.close()


def _ours(
    table: Any,
    output: str,
    batch: int,
    mode: str,
    timing: dict[str, Any],
    controller: tuple[Path, bytes] | None = None,
) -> tuple[dict[str, Any], np.ndarray[Any, Any]]:
    from wasmshare.llm import Controller, ControllerBatch

    module, arg = controller or _controller(output)
    with ControllerBatch(
        table, capacity=batch, mode=mode, workers=min(2, batch), limits=Limits(deadline_ms=50)
    ) as cb:
        for _ in range(batch):
            cb.add(Controller(module, arg))
        tokens = np.zeros(batch, np.int64)
        counter = [0]

        def step() -> None:
            tokens[:] = counter[0] % table.vocab_size
            result = cb.step(tokens)
            if result.special:
                raise RuntimeError(f"unexpected results: {result.special}")
            counter[0] += 1

        for _ in range(20):  # warm up: page faults in the rows, the adaptive runner settles
            step()
        t = _common.timeit_us(step, **timing)
        rows = (cb.mask if output == "bitmask" else cb.bias).copy()
    return t, rows


def _bench(v: int, timing: dict[str, Any], batch_sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    from wasmshare.llm import TokenTable

    rows: list[dict[str, Any]] = []
    with TokenTable.from_tokens([b"t%d" % i for i in range(v)], name=f"synthetic-{v}") as table:
        for output in OUTPUTS:
            for b in batch_sizes:
                base = _CopyDesign(table, output, b)
                try:
                    t_base = _common.timeit_us(base.step, **timing)
                    base_rows = base.batch_rows.copy()
                finally:
                    base.close()
                floats = np.zeros((b, v), np.float32)
                t_memset = _common.timeit_us(lambda f=floats: f.fill(0.5), **timing)
                for mode in MODES:
                    t_ours, our_rows = _ours(table, output, b, mode, timing)
                    if not np.array_equal(
                        our_rows.view(np.uint8).reshape(b, -1)[:, : base_rows[0].nbytes],
                        base_rows.view(np.uint8).reshape(b, -1),
                    ):
                        raise AssertionError(f"{output} B={b} V={v} {mode}: rows differ from the copy design")
                    rows.append(
                        _common.make_row(
                            f"{output} B={b} V={v // 1024}k {mode}",
                            t_ours,
                            BASELINE,
                            t_base,
                            output=output,
                            B=b,
                            V=v,
                            mode=mode,
                            memset_us=round(float(t_memset["median_us"]), 3),
                            memset_ratio=round(float(t_ours["median_us"]) / float(t_memset["median_us"]), 3),
                        )
                    )
    return rows


GUEST_LANGUAGES = {
    "C": CONTROLLERS / "allow_list.wasm",
    "Rust": ROOT / "sdk" / "rust" / "examples" / "allow_list.wasm",
    "Zig": ROOT / "sdk" / "zig" / "examples" / "allow_list.wasm",
}


def _languages(v: int, timing: dict[str, Any], batch_sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    """The allow-list controller in each guest language against the C one, same configurations."""
    from wasmshare.llm import TokenTable

    arg = struct.pack("<3I", 1, 1000, v - 1)
    modules = {name: path for name, path in GUEST_LANGUAGES.items() if path.exists()}
    rows: list[dict[str, Any]] = []
    with TokenTable.from_tokens([b"t%d" % i for i in range(v)], name=f"synthetic-{v}") as table:
        for b in batch_sizes:
            for mode in MODES:
                medians: dict[str, list[float]] = {name: [] for name in modules}
                mins: dict[str, list[float]] = {name: [] for name in modules}
                masks: dict[str, np.ndarray[Any, Any]] = {}
                names = list(modules)
                for shift in range(len(names)):  # each language in each position once
                    order = names[shift:] + names[:shift]
                    for name in order:
                        t, mask = _ours(table, "bitmask", b, mode, timing, (modules[name], arg))
                        medians[name].append(float(t["median_us"]))
                        mins[name].append(float(t["min_us"]))
                        masks[name] = mask
                c = {"median_us": float(np.mean(medians["C"])), "min_us": min(mins["C"])}
                for name in modules:
                    if name == "C":
                        continue
                    if not np.array_equal(masks[name], masks["C"]):
                        raise AssertionError(f"allow_list {name} B={b} V={v}: mask rows differ from C's")
                    ours = {"median_us": float(np.mean(medians[name])), "min_us": min(mins[name])}
                    rows.append(
                        _common.make_row(
                            f"allow-list in {name} B={b} V={v // 1024}k {mode}",
                            ours,
                            "the same controller in C (same run)",
                            c,
                            output="allow_list",
                            language=name,
                            B=b,
                            V=v,
                            mode=mode,
                        )
                    )
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    timing: dict[str, Any] = {"repeat": 3, "min_time_s": 0.05} if quick else {"repeat": 5, "min_time_s": 0.4}
    sizes = (1, 8) if quick else BATCH_SIZES
    vocabs = (32768,) if quick else VOCAB_SIZES
    rows: list[dict[str, Any]] = []
    for v in vocabs:
        print(f"V={v} ...", file=sys.stderr, flush=True)
        rows.extend(_bench(v, timing, sizes))
    for v in vocabs[:2]:
        print(f"guest languages, V={v} ...", file=sys.stderr, flush=True)
        rows.extend(_languages(v, timing, sizes))
    return rows


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for r in rows:
        if r["output"] == "allow_list" and r["language"] == "Rust" and r["B"] == max(BATCH_SIZES):
            out.append(
                {
                    "target": f"{r['case']}: within 1.2× of C (Rust time / C time)",
                    "met": r["ratio"] >= 1 / 1.2,
                    "value": round(1 / r["ratio"], 3),
                }
            )
        if r["output"] == "bitmask" and r["B"] == TARGET_B and r["V"] == TARGET_V:
            out.append(
                {
                    "target": f"{r['case']}: under 1 ms a step",
                    "met": r["ours_us"] < 1000,
                    "value": r["ours_us"],
                }
            )
            out.append(
                {
                    "target": f"{r['case']}: ≥ 5× faster than the copy design",
                    "met": r["ratio"] >= 5,
                    "value": r["ratio"],
                }
            )
        if r["output"] == "bias" and r["B"] == TARGET_B and r["V"] == TARGET_V:
            out.append(
                {
                    "target": f"{r['case']}: within 2× of writing B×V floats",
                    "met": r["memset_ratio"] <= 2,
                    "value": r["memset_ratio"],
                }
            )
    return out


def main(argv: list[str] | None = None) -> int:
    return _common.bench_main(
        NAME,
        __doc__,
        argv,
        lambda quick: run(quick=quick),
        targets,
        quick_help="a fast smoke run (fewer sizes, shorter repeats)",
    )


if __name__ == "__main__":
    raise SystemExit(main())
