"""wasmshare steering inside vLLM against vLLM alone and vLLM's own structured output.

One run on SmolLM2-135M (wasmshare's converted folder), greedy, 64 new tokens, batch 1 and 8:

* ours: an ``LLM`` with :class:`WasmshareLogitsProcessor`, a JSON Schema
  (``examples/person.json``) as ``wasmshare_json_schema``, and a wasm controller
  (``bench_mask.wasm``, which rewrites its whole bitmask every step) as ``wasmshare_controller``;
* vLLM's own structured output with its ``guidance`` backend (llguidance inside vLLM), the
  same schema, on an ``LLM`` without the processor;
* vLLM unconstrained on that ``LLM``: 64 tokens (against the wasm controller, which runs all
  64), and, against each JSON row, exactly as many tokens as that row's answers
  (``ignore_eos``): a request's fixed costs (prefill, set-up) weigh more on a 20-token answer
  than on a 64-token one, which is not the steering's cost.

Each figure is generated tokens per second of wall time over the whole ``generate`` call
(median of the repeats, after a warm-up). For the wasmshare rows the processor also reports
its own time per step on vLLM's critical path (``$WASMSHARE_VLLM_STATS``): all of ``apply``
(collecting the controllers' answers and writing masks into the logits), the part of it
spent waiting for the service, and the send of the sampled tokens before the forward pass.
vLLM runs in its own environment (``make vllm-env``): run from wasmshare's, this script
re-runs itself under ``.venv-vllm/bin/python``.

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


def _processor_figures(path: Path) -> dict[str, float]:
    """The processor's cumulative critical-path counters (``$WASMSHARE_VLLM_STATS``)."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {"steps": 0, "apply_s": 0.0, "wait_s": 0.0, "send_s": 0.0}


def _run(llm: Any, params: Any, batch: int) -> tuple[float, float]:
    """One ``generate`` of ``batch`` prompts: generated tokens/s and tokens per answer."""
    started = time.perf_counter()
    outputs = llm.generate([PROMPT] * batch, [params] * batch, use_tqdm=False)
    elapsed = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return tokens / elapsed, tokens / batch


def _measure(quick: bool) -> list[dict[str, Any]]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from wasmshare.vllm.processor import WasmshareLogitsProcessor

    python = os.environ["WASMSHARE_PYTHON"]
    folder = _model_folder(python)
    repeats = 1 if quick else 5
    controllers = Path(tempfile.mkdtemp(prefix="wasmshare-bench-controllers-"))
    wasm = ROOT / "guests" / "controllers" / "bench_mask.wasm"
    controller = hashlib.sha256(wasm.read_bytes()).hexdigest()
    shutil.copy(wasm, controllers / f"{controller}.wasm")
    os.environ["WASMSHARE_CONTROLLERS_DIR"] = str(controllers)
    stats = controllers / "processor-stats.json"
    os.environ["WASMSHARE_VLLM_STATS"] = str(stats)
    common = {"enforce_eager": True, "max_model_len": 512, "seed": 0, "max_num_seqs": max(BATCHES)}

    # Both engines stay up and every repeat runs every case once, in turn, so a drift of the
    # shared machine's speed lands on all of them alike. Each engine waits idle while the other runs.
    ours = LLM(model=folder, logits_processors=[WasmshareLogitsProcessor], **common)
    alone = LLM(model=folder, structured_outputs_config={"backend": "guidance"}, **common)
    ids = ours.get_tokenizer().encode(" yes no", add_special_tokens=False)

    def greedy(**kw: Any) -> Any:
        return SamplingParams(temperature=0.0, **kw)

    cases: dict[str, tuple[Any, Any]] = {
        "ours_json": (
            ours,
            greedy(max_tokens=NEW_TOKENS, extra_args={"wasmshare_json_schema": json.dumps(SCHEMA)}),
        ),
        "ours_wasm": (
            ours,
            greedy(
                max_tokens=NEW_TOKENS,
                extra_args={"wasmshare_controller": controller, "wasmshare_arg": list(ids)},
            ),
        ),
        "vllm": (alone, greedy(max_tokens=NEW_TOKENS)),
        "guidance": (
            alone,
            greedy(max_tokens=NEW_TOKENS, structured_outputs=StructuredOutputsParams(json=SCHEMA)),
        ),
    }
    # A JSON answer ends after ~20 tokens, and a request's fixed costs (prefill, set-up) weigh
    # more on a short answer, so a JSON row's unconstrained baseline generates as many tokens.
    for key in ("ours_json", "guidance"):
        engine, params = cases[key]
        same = max(1, round(_run(engine, params, 1)[1]))  # greedy: every answer is this long
        cases[f"vllm_as_{key}"] = (alone, greedy(max_tokens=same, ignore_eos=True))
    figures: dict[tuple[str, int], list[tuple[float, float]]] = {}
    steps_of: dict[tuple[str, int], list[dict[str, float]]] = {}
    for b in BATCHES:
        for engine, params in cases.values():
            _run(engine, params, b)  # warm-up
    for _ in range(repeats):
        for b in BATCHES:
            for key, (engine, params) in cases.items():
                before = _processor_figures(stats)
                figures.setdefault((key, b), []).append(_run(engine, params, b))
                if engine is ours:
                    after = _processor_figures(stats)
                    steps_of.setdefault((key, b), []).append(
                        {k: after[k] - before[k] for k in ("steps", "apply_s", "wait_s", "send_s")}
                    )
    forward_rows = _fast_forward(alone, SamplingParams, repeats)
    del ours, alone
    gc.collect()
    shutil.rmtree(controllers, ignore_errors=True)

    speed: dict[tuple[str, int], tuple[float, float, dict[str, float] | None]] = {}
    for (key, b), runs in figures.items():
        per_step = None
        counted = steps_of.get((key, b))
        if counted:
            steps = sum(c["steps"] for c in counted)
            if steps > 0:
                per_step = {
                    name: round(1e6 * sum(c[f"{name}_s"] for c in counted) / steps, 1)
                    for name in ("apply", "wait", "send")
                }
                per_step = {f"{k}_us": v for k, v in per_step.items()}
        speed[(key, b)] = (
            statistics.median(t for t, _ in runs),
            statistics.mean(n for _, n in runs),
            per_step,
        )

    rows = []
    for b in BATCHES:
        for key, label, against in (
            ("ours_json", "wasmshare JSON Schema", "vllm_as_ours_json"),
            ("ours_json", "wasmshare JSON Schema", "guidance"),
            ("ours_wasm", "wasmshare wasm controller (bench_mask)", "vllm"),
            ("guidance", "vLLM guidance JSON Schema", "vllm_as_guidance"),
        ):
            tps, length, per_step = speed[(key, b)]
            ref_tps, ref_len, _ = speed[(against, b)]
            step_us = 1e6 * b / tps  # wall time of one decode step of the batch
            critical = {}
            if per_step is not None:
                critical = {
                    "processor_us_per_step": per_step["apply_us"],
                    "processor_wait_us_per_step": per_step["wait_us"],
                    "processor_send_us_per_step": per_step["send_us"],
                    "processor_share_of_step": round(per_step["apply_us"] / step_us, 3),
                }
            rows.append(
                {
                    "case": f"B={b} {label} vs {'vLLM guidance' if against == 'guidance' else 'vLLM unconstrained'}",
                    "ours_us": round(1e6 / tps, 1),
                    "baseline": _BASELINES[against],
                    "baseline_us": round(1e6 / ref_tps, 1),
                    "ratio": round(tps / ref_tps, 3),
                    "B": b,
                    "tokens_per_s": round(tps, 1),
                    "baseline_tokens_per_s": round(ref_tps, 1),
                    "tokens_per_answer": round(length, 1),
                    "baseline_tokens_per_answer": round(ref_len, 1),
                    **critical,
                }
            )
    return rows + forward_rows


FORCED = (4, 16, 64)
"""Fast-forward lengths compared: tokens a controller forces at once."""
PREFIX_TOKENS = 304  # a whole number of vLLM's 16-token blocks, so the prefix cache holds it all


def _fast_forward(llm: Any, sampling: Any, repeats: int) -> list[dict[str, Any]]:
    """Forcing k tokens one per step against ending the request and resubmitting prompt + k.

    vLLM samples one token a step, so the processor forces a fast-forward one token per
    step: k decode steps, measured as a k+1-token generation less a 1-token one. The
    alternative ends the request and resubmits its prompt with the k tokens appended: the
    prompt is in the prefix cache, so that costs a prefill of k tokens, measured with
    tokens no earlier run has cached (a fresh random run each repeat)."""
    import random

    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode(" ".join(["the quick brown fox jumps over the lazy dog"] * 60))
    prompt = {"prompt_token_ids": ids[:PREFIX_TOKENS]}
    rng = random.Random(0)
    vocab = len(tokenizer)

    def timed(request: dict[str, Any], tokens: int) -> float:
        params = sampling(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        started = time.perf_counter()
        llm.generate([request], params, use_tqdm=False)
        return time.perf_counter() - started

    cold_s = timed(prompt, 1)  # a cold prefill; the prompt is now in the prefix cache
    rows = []
    for k in FORCED:
        per_step, resubmit = [], []
        for _ in range(repeats + 1):  # the first of each is a warm-up
            per_step.append(timed(prompt, k + 1) - timed(prompt, 1))
            forced = [rng.randrange(1000, vocab) for _ in range(k)]
            resubmit.append(timed({"prompt_token_ids": prompt["prompt_token_ids"] + forced}, 1))
        steps_s, again_s = statistics.median(per_step[1:]), statistics.median(resubmit[1:])
        rows.append(
            {
                "case": f"fast-forward {k} tokens: end and resubmit vs one forced token per step",
                "ours_us": round(1e6 * again_s, 1),
                "baseline": f"{k} forced decode steps",
                "baseline_us": round(1e6 * steps_s, 1),
                "ratio": round(steps_s / again_s, 3),
                "B": 1,
                "prompt_tokens": PREFIX_TOKENS,
                "cold_prompt_us": round(1e6 * cold_s, 1),
            }
        )
    return rows


_BASELINES = {
    "vllm": "vLLM unconstrained",
    "vllm_as_ours_json": "vLLM unconstrained, as many tokens as the wasmshare JSON answers",
    "vllm_as_guidance": "vLLM unconstrained, as many tokens as the guidance answers",
    "guidance": "vLLM guidance (same schema)",
}


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
