"""Structured output on MaskBench: our constraint layer vs llguidance, xgrammar and outlines-core.

Data: the MaskBench development split (``shared/maskbench/maskbench-dev.jsonl.gz``, 7,928 JSON
Schemas with valid and invalid instances), the DeepSeek tokenizer (``TokenTable.deepseek()``,
129,280 tokens) for every engine, all in the same run. Each instance is the text
``json.dumps(data, ensure_ascii=False)`` tokenized with that tokenizer.

Cases, per schema and engine: compile the schema (compile time, ms); then walk every instance
token by token. One *step* takes the token sampled last (none at step 0), advances the engine
and computes the mask of the next token; a step is timed as one unit (µs). The walk checks
that each next token is allowed by the mask; at the end, the instance is accepted when EOS is
allowed (or the engine has stopped). A valid instance passes when every token is allowed and
it is accepted; an invalid one is rejected when some token is not allowed or it is not
accepted. Per-token statistics (p50 / p99 / max / mean) are over every step of every valid
instance that passed.

* ours: ``ControllerBatch(table, capacity=1, parallel=False)``; each instance is a sequence
  ``batch.add(json_schema(schema))`` stepped by ``batch.step({sid: [token]})``. The timed unit
  is the :class:`ConstraintInstance` step inside that call (reads the token from the slot's
  step record, ``consume_tokens``, ``compute_ff_tokens`` and consumes them, writes the mask in
  place into the slot's row of the batch bitmask); the whole ``batch.step`` (bookkeeping
  included) is reported beside it as ``batch_step_*``. Compile time is
  ``compile_constraint(...).compile_ms``.
* llguidance direct (the like-for-like baseline): the same llguidance on its own
  ``LLTokenizer``: ``grammar_from_json_schema`` + ``LLMatcher`` to compile; per step the same
  work as ours (``consume_tokens``, ``compute_ff_tokens`` + consume, ``unsafe_compute_mask_ptr``
  into a numpy int32 buffer). Ours and direct run in lockstep on every instance (their order
  alternates), and every mask, forced-token list and stop is compared between them.
  Forced (fast-forward) tokens are not sampled: when they equal the instance's next tokens the
  walk skips them; when they spell the instance's next bytes differently the rest of the
  instance is re-tokenized after them; otherwise the instance is rejected there.
* xgrammar (``GrammarCompiler(max_threads=1, cache_enabled=False).compile_json_schema``; step =
  ``accept_token`` + ``fill_next_token_bitmask``) and outlines-core (``build_regex_from_schema``
  + ``Index``; step = ``Guide.advance`` + ``write_mask_into``) run in a worker process each,
  so a compile that runs past its timeout is killed and counted as a timeout. They are
  optional: when one is not importable it is recorded as not installed and skipped.
  Both run on fixed subsets of the split, not the whole of it: on this 2-core machine the
  whole split would take hours (xgrammar compiles most schemas in ~15 ms, but ~6% run for
  seconds; outlines-core takes seconds to minutes per schema). xgrammar: every 20th schema,
  2 s compile timeout; outlines-core: every 200th schema, 5 s timeout; each within a time
  budget (schemas past it are recorded as not run). A standby worker takes over after a
  timeout. Their rows compare on what both sides pass; ``coverage`` gives ours on the same
  subset beside each.
* batch of 64 masked in parallel: 64 constrained sequences (valid instances that passed, from
  different schemas where possible) in one ``ControllerBatch(capacity=64)``, advanced in
  lockstep along their instances; ``parallel=True`` (2 threads) and ``mode="workers"`` (2
  worker processes, each with its own GIL, writing the same shared mask rows) vs
  ``parallel=False`` (one thread); ratio = throughput gain.

Rows: ``ratio = baseline_us / ours_us`` (above 1: ours is faster). Coverage (schemas
compiled, timeouts, valid instances passed, invalid instances rejected) per engine is in the
``coverage`` field. llguidance direct is its strict mode (a keyword it does not implement is
an error). Ours is ``json_schema``: a schema direct refuses is planned (relaxed grammar +
checks, :mod:`wasmshare.llm.schema_plan`) and walked by ours alone; a step that backtracks
is a value the checks rejected, and at the end of an instance ours takes EOS, where the whole
schema is checked. ``schemas_enforced`` counts the schemas by the grammar, with checks and
refused (each with its reason), the dropped keywords, and the instances of accepted schemas:
a valid instance passes as written or, failing that, with its keys in the order the schema
lists them (llguidance writes properties in that order; MaskBench upstream reorders its
instances the same way); every exception is listed with its reason.

Targets (issue): ours per-token p50 within 1.1× of llguidance direct; the batch of 64 masked in
parallel on 2 cores at ≥ 1.8× the throughput of one thread; schemas accepted, valid instances
passed and invalid ones rejected ≥ 99 % each. Also checked: every mask equal to
llguidance direct's. Beside the parallel row: the fraction of a one-thread step that holds
the GIL (llguidance releases it only while computing a mask; ``consume_tokens``,
``compute_ff_tokens`` and the Python around them hold it), the Amdahl bound that follows, and
two controls: how much 2 threads speed up GIL-free C work (sha256) on this machine, and
how much 2 independent processes speed up the very same llguidance steps with no wasmshare
in between (each compiles its half of the schemas and replays the same tokens on bare
matchers into a private buffer; a step lasts as long as the slower process): what this
machine gives this work at best.

Run from the repo root: ``PYTHONPATH=src .venv/bin/python bench/bench_grammars.py [--quick] [--out DIR]``.
``--quick`` runs every 200th schema, xgrammar on the same and outlines-core on three (a smoke
run, bounded to well under a minute).
"""

from __future__ import annotations

import argparse
import gc
import gzip
import importlib.metadata
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

NAME = "grammars"
ROOT = Path(__file__).resolve().parent.parent
SPLIT = ROOT.parent / "shared" / "maskbench" / "maskbench-dev.jsonl.gz"
SPLIT_CANDIDATES = (
    ROOT / "shared" / "maskbench" / "maskbench-dev.jsonl.gz",
    SPLIT,
    Path("/work/shared/maskbench/maskbench-dev.jsonl.gz"),
)
QUICK_EVERY = 200
DIRECT = "llguidance direct (numpy buffer)"
PARALLEL_B = 64

# Per external engine: the fixed subset of the split it runs on (every Nth schema), the
# compile timeout per schema, the time budget for the engine, and a cap on schemas (quick).
# xgrammar compiles most schemas in ~15 ms but ~6% run for seconds (timeouts); outlines-core
# takes seconds to minutes per schema. On a 2-core machine the whole split for them would
# take hours, so they run on fixed subsets, said in the JSON and the printed table.
SETTINGS = {
    "full": {
        "xgrammar": {"every": 20, "timeout_s": 2.0, "budget_s": 200.0, "max": None},
        "outlines-core": {"every": 200, "timeout_s": 5.0, "budget_s": 70.0, "max": None},
        "parallel_steps": 48,
        "parallel_repeat": 5,
    },
    "quick": {
        "xgrammar": {"every": 200, "timeout_s": 2.0, "budget_s": 15.0, "max": None},
        "outlines-core": {"every": 200, "timeout_s": 2.0, "budget_s": 8.0, "max": 3},
        "parallel_steps": 16,
        "parallel_repeat": 2,
    },
}
WALK_TIMEOUT_S = 120.0


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _split_path() -> Path:
    for p in SPLIT_CANDIDATES:
        if p.is_file():
            return p
    raise FileNotFoundError(f"MaskBench split not found (looked in {', '.join(map(str, SPLIT_CANDIDATES))})")


def _load(quick: bool) -> list[dict[str, Any]]:
    """Schemas of the split (every QUICK_EVERY-th in quick mode), each with its index."""
    out = []
    with gzip.open(_split_path(), "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if quick and i % QUICK_EVERY:
                continue
            d = json.loads(line)
            out.append(
                {
                    "index": i,
                    "name": d.get("name", str(i)),
                    "schema": d["schema"],
                    "tests": [(bool(t["valid"]), t["data"]) for t in d.get("tests", [])],
                    "descriptions": [str(t.get("description", "")) for t in d.get("tests", [])],
                }
            )
    return out


def _tokenize(schemas: list[dict[str, Any]], tokenizer_json: str) -> None:
    import tokenizers

    hf = tokenizers.Tokenizer.from_str(tokenizer_json)
    texts = [json.dumps(data, ensure_ascii=False) for s in schemas for _, data in s["tests"]]
    encoded = hf.encode_batch(texts, add_special_tokens=False) if texts else []
    k = 0
    for s in schemas:
        s["token_ids"] = []
        for _ in s["tests"]:
            s["token_ids"].append(list(encoded[k].ids))
            k += 1


def _stats(ns: np.ndarray[Any, Any]) -> dict[str, float]:
    us = ns.astype(np.float64) / 1e3
    if not us.size:
        return {"p50": None, "p99": None, "max": None, "mean": None, "n": 0}
    return {
        "p50": float(np.percentile(us, 50)),
        "p99": float(np.percentile(us, 99)),
        "max": float(us.max()),
        "mean": float(us.mean()),
        "n": int(us.size),
    }


def _bit(mask: np.ndarray[Any, Any], token: int) -> bool:
    return bool((int(mask[token >> 5]) >> (token & 31)) & 1)


# -- ours and llguidance direct, in lockstep -------------------------------------------------------


def _bare_step(m: Any, feed: list[int], address: int, nbytes: int) -> tuple[int, list[int]]:
    """What ConstraintInstance.step does, on a bare llguidance matcher, writing the mask at
    ``address``: (0 continue / 1 stop / 2 error, the forced tokens consumed)."""
    from wasmshare.llm import _layout as L

    if feed and not m.consume_tokens(feed):
        return 2, []
    if m.is_stopped():
        return 1, []
    forced = m.compute_ff_tokens()
    if forced:
        forced = forced[: L.MAX_FF_TOKENS]
        if not m.consume_tokens(forced):
            return 2, []
        if m.is_stopped():
            return 1, forced
    m.unsafe_compute_mask_ptr(address, nbytes)
    if m.is_error():
        return 2, forced
    return 0, forced


class _Llg:
    """Runs ours (through a ControllerBatch) and llguidance direct on the same instances."""

    def __init__(self, table: Any) -> None:
        import llguidance
        import tokenizers

        from wasmshare.llm import ControllerBatch
        from wasmshare.llm import _layout as L

        self.llguidance = llguidance
        self.table = table
        self.hf = tokenizers.Tokenizer.from_str(table.tokenizer_json)
        self.tok = llguidance.LLTokenizer(
            table.tokenizer_json, n_vocab=table.vocab_size, eos_token=table.eos_token
        )
        self.eos = table.eos_token
        self.batch = ControllerBatch(table, capacity=1, parallel=False)
        self.buf = np.zeros(L.mask_words(table.vocab_size), np.int32)
        self.disagreements: list[str] = []
        self.ff_retokenized = 0
        self.ff_diverged = {"valid": 0, "invalid": 0}
        self.plans: dict[Any, Any] = {}  # spec -> CompiledConstraint (its plan and checker)

    def close(self) -> None:
        self.batch.close()

    def compile(self, s: dict[str, Any], order: int) -> tuple[Any, Any, float, float, str | None, str | None]:
        """Compile for both; returns (ours spec, direct grammar, ours ms, direct ms, errors).

        Ours plans the schema first (:func:`wasmshare.llm.constraints.schema_plan`): a schema
        llguidance refuses is relaxed and the rest left to checks, so ours compiles schemas
        direct refuses. ``self.plans`` keeps each compiled spec's plan."""
        from wasmshare.llm.constraints import ConstraintError, compile_constraint, json_schema

        llg = self.llguidance
        ours = direct = None
        ours_ms = direct_ms = float("nan")
        ours_err = direct_err = None

        def run_ours() -> None:
            nonlocal ours, ours_ms, ours_err
            try:
                spec = json_schema(s["schema"], whitespace="flexible")  # like for like with llguidance direct
                compiled = compile_constraint(spec, self.table)
                ours, ours_ms = spec, compiled.compile_ms
                self.plans[spec] = compiled
            except ConstraintError as e:
                ours_err = str(e)[:200]

        def run_direct() -> None:
            nonlocal direct, direct_ms, direct_err
            source = json.dumps(s["schema"], separators=(",", ":"))
            t0 = time.perf_counter()
            try:
                grammar = llg.LLMatcher.grammar_from_json_schema(source)
                m = llg.LLMatcher(self.tok, grammar, log_level=0)
                elapsed = (time.perf_counter() - t0) * 1e3
                if m.is_error():
                    direct_err = str(m.get_error())[:200]
                else:
                    direct, direct_ms = grammar, elapsed
            except Exception as e:  # noqa: BLE001 - llguidance raises ValueError and others
                direct_err = str(e)[:200]

        for fn in (run_ours, run_direct) if order % 2 == 0 else (run_direct, run_ours):
            fn()
        return ours, direct, ours_ms, direct_ms, ours_err, direct_err

    def walk(
        self, spec: Any, grammar: Any, ids: list[int], valid: bool, order: int, record: bool, label: str = ""
    ) -> dict[str, Any]:
        """Walk one instance on both (ours alone when ``grammar`` is None: direct refused it).

        Returns per-step ns (ours instance, ours batch.step, direct) and the verdicts: the
        grammar's (the masks alone, which is direct's verdict too) and ours (the masks and the
        checks: a step that backtracks is a value the checks rejected; at the end ours also
        takes EOS, where the whole schema is checked)."""
        llg = self.llguidance
        batch = self.batch
        pc = time.perf_counter_ns
        sid = batch.add(spec)
        slot = batch.slot(sid)
        inst = batch._sequences[sid].instance
        original_step = inst.step
        inst_ns: list[int] = []

        def timed_step() -> None:
            t0 = pc()
            original_step()
            inst_ns.append(pc() - t0)

        inst.step = timed_step  # the batch calls instance.step(): this times exactly that call
        m = llg.LLMatcher(self.tok, grammar, log_level=0) if grammar is not None else None
        mask = batch.mask[slot]
        buf = self.buf
        batch_ns: list[int] = []
        direct_ns: list[int] = []
        toks = list(ids)
        feed: list[int] = []
        pos = 0
        accepted = ours_alive = True
        feeds: list[list[int]] = []
        ours_error: list[str] = []
        backtracked = [False]
        cut_by: str | None = None
        grammar_accepted = False
        while True:

            def run_ours(feed: list[int] = feed) -> tuple[int, list[int]]:
                t0 = pc()
                res = batch.step({sid: feed} if feed else None)
                batch_ns.append(pc() - t0)
                code = int(res.action_codes[0])
                special = res.special.get(sid)
                if special is not None and special.error is not None:
                    ours_error.append(str(special.error)[:160])
                if special is not None and special.backtrack:
                    backtracked[0] = True
                return code, list(special.fast_forward) if special is not None else []

            def run_direct(feed: list[int] = feed) -> tuple[int, list[int]]:
                t0 = pc()
                r = _bare_step(m, feed, self.buf.ctypes.data, self.buf.nbytes)
                direct_ns.append(pc() - t0)
                return r

            if m is None:
                o = d = run_ours()
            elif order % 2 == 0:
                o, d = run_ours(), run_direct()
            else:
                d = run_direct()
                o = run_ours()
            feeds.append(feed)
            if backtracked[0]:
                cut_by, grammar_accepted = "checks", True  # the masks allowed every token so far
                accepted = False
                break
            if m is not None and (
                o[0] != d[0] or o[1] != d[1] or (o[0] == 0 and not np.array_equal(mask, buf))
            ):
                if len(self.disagreements) < 20:
                    self.disagreements.append(
                        f"{label} step {len(feeds)}: ours {o[0]} ff {o[1][:8]}, direct {d[0]} ff {d[1][:8]}"
                        + (f" ({ours_error[-1]})" if ours_error else "")
                    )
                else:
                    self.disagreements.append("...")
            code, ff = o
            if code == 2:
                ours_alive = False  # the batch removed the sequence
                accepted = False
                if ours_error and "violates the schema" in ours_error[-1]:
                    cut_by, grammar_accepted = "checks", True
                break
            if ff:
                if toks[pos : pos + len(ff)] == ff:
                    pos += len(ff)
                else:
                    ffb = self.table.decode(ff)
                    rest = self.table.decode(toks[pos:])
                    if not rest.startswith(ffb):
                        self.ff_diverged["valid" if valid else "invalid"] += 1
                        accepted = False
                        break
                    tail = rest[len(ffb) :]
                    try:
                        retok = self.hf.encode(tail.decode("utf-8"), add_special_tokens=False).ids
                    except UnicodeDecodeError:
                        retok = self.tok.tokenize_bytes(tail)
                    toks = toks[:pos] + ff + list(retok)
                    pos += len(ff)
                    self.ff_retokenized += 1
            if code == 1:
                accepted = grammar_accepted = pos == len(toks)
                break
            if pos == len(toks):
                accepted = grammar_accepted = _bit(mask, self.eos)
                if accepted:  # ours takes EOS: the last values and the whole schema are checked
                    res = batch.step({sid: [self.eos]})
                    special = res.special.get(sid)
                    if int(res.action_codes[0]) != 1 or (special is not None and special.backtrack):
                        accepted, cut_by = False, "checks"
                        ours_alive = sid in batch.sequences
                break
            tk = toks[pos]
            if not _bit(mask, tk):
                accepted = False
                break
            feed = [tk]
            pos += 1
        if not grammar_accepted and cut_by is None:
            cut_by = "grammar"
        violation = None
        if cut_by == "checks" and inst.checks is not None and inst.checks.last is not None:
            violation = inst.checks.last.describe()
        elif cut_by == "checks" and ours_error:
            violation = ours_error[-1]
        if ours_alive:
            batch.remove(sid)
        out: dict[str, Any] = {
            "accepted": accepted,
            "grammar_accepted": grammar_accepted,
            "cut_by": None if accepted else cut_by,
            "violation": violation,
            "cut_at": pos,
        }
        if record:
            out.update(inst_ns=inst_ns, batch_ns=batch_ns, direct_ns=direct_ns, feeds=feeds)
        return out


def _unknown_formats(schema: Any) -> list[str]:
    """``format`` values in ``schema`` that jsonschema does not check (annotations only)."""
    import jsonschema

    from wasmshare.llm.schema_plan import schema_nodes

    known = set(jsonschema.Draft202012Validator.FORMAT_CHECKER.checkers) | set(
        jsonschema.Draft7Validator.FORMAT_CHECKER.checkers
    )
    return sorted(
        {str(n["format"]) for _, n in schema_nodes(schema) if "format" in n and n["format"] not in known}
    )


def _new_coverage(n: int) -> dict[str, Any]:
    return {
        "schemas": n,
        "compiled": 0,
        "errors": 0,
        "timeouts": 0,
        "valid_total": 0,
        "valid_passed": 0,
        "invalid_total": 0,
        "invalid_rejected": 0,
    }


def _run_llg(table: Any, schemas: list[dict[str, Any]]) -> dict[str, Any]:
    eng = _Llg(table)
    cov = {e: _new_coverage(len(schemas)) for e in ("ours", "llguidance")}
    cov["ours"].update(
        by_grammar=0,
        with_checks=0,
        invalid_rejected_by_grammar=0,
        invalid_rejected_by_checks=0,
        valid_passed_in_schema_order=0,
    )
    dropped: dict[str, int] = {}
    exceptions: list[dict[str, Any]] = []
    refused: list[dict[str, str]] = []
    compile_ms: dict[str, dict[int, float]] = {"ours": {}, "llguidance": {}}
    per_instance: dict[tuple[int, int], dict[str, np.ndarray[Any, Any]]] = {}
    feeds: dict[tuple[int, int], list[list[int]]] = {}
    errors: dict[str, list[str]] = {"ours": [], "llguidance": []}
    invalid_rejected_keys: list[tuple[int, int]] = []
    valid_passed_keys: list[tuple[int, int]] = []
    started = time.perf_counter()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for n, s in enumerate(schemas):
            if n and n % 500 == 0:
                gc.collect()
                print(
                    f"  llguidance/ours: {n}/{len(schemas)} schemas, {time.perf_counter() - started:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
            spec, grammar, ours_ms, direct_ms, ours_err, direct_err = eng.compile(s, n)
            for e, ok, ms, err in (
                ("ours", spec, ours_ms, ours_err),
                ("llguidance", grammar, direct_ms, direct_err),
            ):
                if ok is not None:
                    cov[e]["compiled"] += 1
                    compile_ms[e][s["index"]] = ms
                else:
                    cov[e]["errors"] += 1
                    if len(errors[e]) < 10:
                        errors[e].append(f"{s['name']}: {err}")
            compiled = eng.plans.pop(spec, None) if spec is not None else None
            if spec is None:
                refused.append({"schema": s["name"], "reason": str(ours_err)})
            elif compiled.plan is not None and compiled.plan.needs_checks:
                cov["ours"]["with_checks"] += 1
                for keyword in compiled.plan.keywords:
                    dropped[keyword] = dropped.get(keyword, 0) + 1
            else:
                cov["ours"]["by_grammar"] += 1
            for j, ((valid, _), ids) in enumerate(zip(s["tests"], s["token_ids"])):
                kind = "valid" if valid else "invalid"
                for e in cov:
                    cov[e][f"{kind}_total"] += 1
                if spec is None:
                    if grammar is not None:
                        eng.disagreements.append(f"{s['name']}: compiled by direct only")
                    continue
                r = eng.walk(spec, grammar, ids, valid, n + j, record=valid, label=f"{s['name']}#{j}")
                if grammar is not None and r["grammar_accepted"] == valid:
                    cov["llguidance"]["valid_passed" if valid else "invalid_rejected"] += 1
                if r["accepted"] == valid:
                    cov["ours"]["valid_passed" if valid else "invalid_rejected"] += 1
                    if valid:
                        cov["ours"]["valid_passed_in_schema_order"] += 1
                        valid_passed_keys.append((s["index"], j))
                    else:
                        cov["ours"][f"invalid_rejected_by_{r['cut_by']}"] += 1
                        invalid_rejected_keys.append((s["index"], j))
                elif valid:
                    exceptions.append(_valid_exception(eng, s, j, spec, compiled, r))
                    if exceptions[-1]["passes_in_schema_order"]:
                        cov["ours"]["valid_passed_in_schema_order"] += 1
                else:
                    formats = _unknown_formats(s["schema"])
                    exceptions.append(
                        {
                            "schema": s["name"],
                            "instance": j,
                            "valid": False,
                            "description": s["descriptions"][j][:120],
                            "reason": (
                                f"format {', '.join(map(repr, formats))} is not checked by jsonschema "
                                "(an annotation, as the JSON Schema spec allows)"
                                if formats
                                else "the grammar and jsonschema (full schema, format checker on) both accept it"
                            ),
                        }
                    )
                if valid and r["accepted"] and grammar is not None:
                    key = (s["index"], j)
                    per_instance[key] = {
                        k: np.asarray(r[k], np.int64) for k in ("inst_ns", "batch_ns", "direct_ns")
                    }
                    feeds[key] = r["feeds"]
    finally:
        if gc_was:
            gc.enable()
        eng.close()
    return {
        "coverage": cov,
        "dropped_keywords": dict(sorted(dropped.items(), key=lambda kv: -kv[1])),
        "exceptions": exceptions,
        "refused": refused,
        "compile_ms": compile_ms,
        "per_instance": per_instance,
        "feeds": feeds,
        "errors": errors,
        "invalid_rejected_keys": invalid_rejected_keys,
        "valid_passed_keys": valid_passed_keys,
        "disagreements": eng.disagreements,
        "ff_retokenized": eng.ff_retokenized,
        "ff_diverged": eng.ff_diverged,
        "seconds": time.perf_counter() - started,
    }


def _valid_exception(
    eng: Any, s: dict[str, Any], j: int, spec: Any, compiled: Any, r: dict[str, Any]
) -> dict[str, Any]:
    """A valid instance ours did not pass, with why, and whether it passes with its keys in
    the schema's order (llguidance generates properties in that order)."""
    data = s["tests"][j][1]
    reordered = compiled.checker.in_schema_order(data) if compiled.checker is not None else data
    in_order = False
    if reordered != data or json.dumps(reordered) != json.dumps(data):
        ids = eng.hf.encode(json.dumps(reordered, ensure_ascii=False), add_special_tokens=False).ids
        in_order = bool(eng.walk(spec, None, ids, True, 0, record=False)["accepted"])
    text = json.dumps(data, ensure_ascii=False)
    if r["cut_by"] == "checks":
        reason = f"checks: {r['violation']}"
    elif in_order:
        reason = "property order: llguidance generates properties in the order the schema lists them"
    else:
        cut = eng.table.decode(s["token_ids"][j][: max(0, r["cut_at"] - 1)]).decode("utf-8", "replace")
        reason = f"grammar: cut after {cut[-50:]!r}"
    return {
        "schema": s["name"],
        "instance": j,
        "valid": True,
        "description": s["descriptions"][j][:120],
        "reason": reason,
        "passes_in_schema_order": in_order,
        "text": text[:160],
    }


# -- xgrammar and outlines-core, in a worker process ----------------------------------------------------


def _worker(engine: str) -> int:
    """Worker loop: one JSON line in (schema + instances), two lines out (compile, walks)."""
    import tokenizers

    from wasmshare.llm import TokenTable

    table = TokenTable.deepseek()
    words = (table.vocab_size + 31) // 32
    eos = table.eos_token
    out = sys.stdout
    pc = time.perf_counter_ns
    if engine == "xgrammar":
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(table.tokenizer_json))
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=table.vocab_size, stop_token_ids=[eos])
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        bitmask = xgr.allocate_token_bitmask(1, table.vocab_size)
        buf = bitmask.numpy()[0]
    else:
        import outlines_core as oc
        from outlines_core.json_schema import build_regex_from_schema

        vocab_map: dict[bytes, list[int]] = {}
        for i in range(table.vocab_size):
            if i == eos or table.is_special(i):
                continue
            b = table.token_bytes(i)
            if b:
                vocab_map.setdefault(b, []).append(i)
        vocabulary = oc.Vocabulary(eos, vocab_map)
        buf = np.zeros(words, np.int32)
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        job = json.loads(line)
        t0 = time.perf_counter()
        try:
            if engine == "xgrammar":
                compiled = compiler.compile_json_schema(job["schema"])
            else:
                compiled = oc.Index(build_regex_from_schema(job["schema"]), vocabulary)
            out.write(json.dumps({"compiled": True, "ms": (time.perf_counter() - t0) * 1e3}) + "\n")
        except Exception as e:  # noqa: BLE001 - any compile failure counts as not compiled
            out.write(json.dumps({"compiled": False, "error": f"{type(e).__name__}: {e}"[:200]}) + "\n")
            out.flush()
            continue
        out.flush()
        results = []
        for valid, ids in job["tests"]:
            times: list[int] = []
            accepted = True
            try:
                if engine == "xgrammar":
                    m = xgr.GrammarMatcher(compiled)
                    t = pc()
                    m.fill_next_token_bitmask(bitmask)
                    times.append(pc() - t)
                    for tk in ids:
                        if not _bit(buf, tk):
                            accepted = False
                            break
                        t = pc()
                        ok = m.accept_token(tk)
                        if ok:
                            m.fill_next_token_bitmask(bitmask)
                        times.append(pc() - t)
                        if not ok:
                            accepted = False
                            break
                    if accepted:
                        accepted = _bit(buf, eos) or m.is_terminated()
                else:
                    g = oc.Guide(compiled)
                    t = pc()
                    g.write_mask_into(buf.ctypes.data, words, 4)
                    times.append(pc() - t)
                    for tk in ids:
                        if not _bit(buf, tk):
                            accepted = False
                            break
                        t = pc()
                        g.advance(tk, False)
                        g.write_mask_into(buf.ctypes.data, words, 4)
                        times.append(pc() - t)
                    if accepted:
                        accepted = _bit(buf, eos) or g.is_finished()
            except Exception:  # noqa: BLE001 - an engine error on a token rejects the instance
                accepted = False
            results.append([accepted == valid, times if valid and accepted else []])
        out.write(json.dumps({"tests": results}) + "\n")
        out.flush()
    return 0


def _importable(engine: str) -> bool:
    mods = {"xgrammar": ("xgrammar", "transformers"), "outlines-core": ("outlines_core",)}[engine]
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in mods)


class _WorkerProcess:
    """A child process running this file with ``args`` (default ``--worker ENGINE``), spoken
    to in JSON lines."""

    def __init__(self, engine: str, args: tuple[str, ...] | None = None) -> None:
        self.engine = engine
        self.args = args if args is not None else ("--worker", engine)
        self.proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""

    def start(self) -> None:
        self.spawn()
        self.wait_ready()

    def spawn(self) -> None:
        """Start the process; it loads the tokenizer and the engine while we do other work."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *self.args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self._buffer = b""

    def wait_ready(self) -> None:
        msg = self.read(120.0)
        if msg is None or not msg.get("ready"):
            raise RuntimeError(f"{self.engine} worker did not start")

    def read(self, timeout_s: float) -> dict[str, Any] | None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    return None
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        result: dict[str, Any] = json.loads(line)
        return result

    def send(self, job: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job).encode() + b"\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def close(self) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None


def _run_external(
    engine: str, schemas: list[dict[str, Any]], timeout_s: float, budget_s: float
) -> dict[str, Any]:
    cov = {"run": 0, "not_run_budget": 0, **_new_coverage(len(schemas))}
    compile_ms: dict[int, float] = {}
    per_instance: dict[tuple[int, int], np.ndarray[Any, Any]] = {}
    errors: list[str] = []
    # A compile that runs past the timeout is killed with its worker; a standby worker,
    # started ahead, takes over at once so a timeout costs the timeout, not a restart.
    worker, standby = _WorkerProcess(engine), _WorkerProcess(engine)
    started = time.perf_counter()
    worker.start()
    standby.spawn()
    restarts = 0
    run_indices: set[int] = set()
    try:
        for n, s in enumerate(schemas):
            if time.perf_counter() - started > budget_s:
                cov["not_run_budget"] = len(schemas) - n
                break
            if n and n % 500 == 0:
                print(
                    f"  {engine}: {n}/{len(schemas)} schemas, {time.perf_counter() - started:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
            cov["run"] += 1
            run_indices.add(s["index"])
            for valid, _ in s["tests"]:
                cov["valid_total" if valid else "invalid_total"] += 1
            if worker.proc is None:
                worker, standby = standby, _WorkerProcess(engine)
                worker.wait_ready()
                standby.spawn()
                restarts += 1
            worker.send(
                {
                    "schema": json.dumps(s["schema"], separators=(",", ":")),
                    "tests": [[v, ids] for (v, _), ids in zip(s["tests"], s["token_ids"])],
                }
            )
            head = worker.read(timeout_s)
            if head is None:
                cov["timeouts"] += 1
                worker.kill()
                continue
            if not head["compiled"]:
                cov["errors"] += 1
                if len(errors) < 10:
                    errors.append(f"{s['name']}: {head['error']}")
                continue
            cov["compiled"] += 1
            compile_ms[s["index"]] = head["ms"]
            body = worker.read(WALK_TIMEOUT_S)
            if body is None:
                cov["timeouts"] += 1  # walking the instances took too long or the worker died
                worker.kill()
                continue
            for j, ((valid, _), (ok, times)) in enumerate(zip(s["tests"], body["tests"])):
                if ok:
                    cov["valid_passed" if valid else "invalid_rejected"] += 1
                if valid and ok:
                    per_instance[(s["index"], j)] = np.asarray(times, np.int64)
    finally:
        worker.close()
        standby.kill()
    return {
        "coverage": cov,
        "compile_ms": compile_ms,
        "per_instance": per_instance,
        "errors": errors,
        "restarts": restarts,
        "run_indices": run_indices,
        "seconds": time.perf_counter() - started,
        "timeout_s": timeout_s,
        "budget_s": budget_s,
    }


# -- the parallel batch ------------------------------------------------------------------------------


def _parallel(
    table: Any,
    schemas: list[dict[str, Any]],
    feeds: dict[tuple[int, int], list[list[int]]],
    steps: int,
    repeat: int,
) -> dict[str, Any] | None:
    from wasmshare.llm import ControllerBatch
    from wasmshare.llm.constraints import json_schema

    by_index = {s["index"]: s for s in schemas}
    candidates = [(k, f) for k, f in sorted(feeds.items()) if len(f) > steps]
    if not candidates:
        return None
    chosen: list[tuple[tuple[int, int], list[list[int]]]] = []
    seen: set[int] = set()
    for k, f in candidates:  # one instance per schema first, then reuse
        if k[0] not in seen and len(chosen) < PARALLEL_B:
            chosen.append((k, f))
            seen.add(k[0])
    i = 0
    while len(chosen) < PARALLEL_B:
        chosen.append(candidates[i % len(candidates)])
        i += 1
    specs = [json_schema(by_index[k[0]]["schema"], whitespace="flexible") for k, _ in chosen]
    # step t feeds each sequence the token(s) its walk fed at step t (none at step 0)
    plan = [[f[t] for _, f in chosen] for t in range(steps)]
    result: dict[str, Any] = {"sequences": PARALLEL_B, "distinct_schemas": len(seen), "steps": steps}
    configs: list[tuple[str, dict[str, Any]]] = [
        ("one_thread", {"parallel": False}),
        ("parallel", {"parallel": True}),
        ("processes", {"mode": "workers"}),
    ]
    for name, options in configs:
        per_step: list[float] = []
        with ControllerBatch(table, capacity=PARALLEL_B, **options) as batch:
            result["workers"] = batch.n_workers
            for _ in range(repeat + 1):  # the first round warms up
                sids = [batch.add(spec) for spec in specs]
                # the engine-loop form of step(): one token per sequence, aligned with batch.sequences
                position = {sid: i for i, sid in enumerate(sids)}
                order = [position[sid] for sid in batch.sequences]
                tokens = [
                    np.array([plan[t][i][0] if plan[t][i] else -1 for i in order], np.int64)
                    for t in range(steps)
                ]
                t0 = time.perf_counter()
                for t in range(steps):
                    res = batch.step(tokens[t] if t else None)
                    if res.failed:
                        raise RuntimeError(f"parallel batch: sequences failed: {res.failed[0].error}")
                per_step.append((time.perf_counter() - t0) / steps * 1e6)
                for sid in sids:
                    batch.remove(sid)
        result[name] = {"median_us": float(np.median(per_step[1:])), "min_us": float(np.min(per_step[1:]))}
    # Where the one-thread step goes: llguidance drops the GIL only in the mask computation
    # (unsafe_compute_mask_ptr); consume_tokens, compute_ff_tokens and the Python around them
    # hold it. Replay the same steps on bare matchers and time the mask calls alone.
    from wasmshare.llm.constraints import compile_constraint

    mask_ns = 0
    buf = np.zeros((table.vocab_size + 31) // 32, np.int32)
    for _ in range(repeat):
        matchers = [compile_constraint(spec, table).matcher() for spec in specs]
        for t in range(steps):
            for m, feed in zip(matchers, plan[t]):
                if feed:
                    m.consume_tokens(feed)
                if m.is_stopped():
                    continue
                forced = m.compute_ff_tokens()
                if forced:
                    m.consume_tokens(forced)
                t0 = time.perf_counter_ns()
                m.unsafe_compute_mask_ptr(buf.ctypes.data, buf.nbytes)
                mask_ns += time.perf_counter_ns() - t0
    mask_us = mask_ns / 1e3 / repeat / steps
    held = max(0.0, 1.0 - mask_us / result["one_thread"]["median_us"])
    workers = result["workers"]
    result["gil"] = {
        "mask_us_per_step": round(mask_us, 1),
        "gil_held_fraction_of_one_thread_step": round(held, 3),
        "amdahl_bound": round(1.0 / (held + (1.0 - held) / workers), 3),
        "note": "only unsafe_compute_mask_ptr releases the GIL in llguidance's Python binding; "
        "the rest of a step cannot run in parallel on threads",
    }
    result["machine_thread_scaling"] = _machine_scaling(workers)
    sources = [json.dumps(by_index[k[0]]["schema"], separators=(",", ":")) for k, _ in chosen]
    feed = [[f[0] if f else -1 for f in plan[t]] for t in range(steps)]
    result["same_work_control"] = _same_work_control(sources, feed, workers, repeat)
    return result


def _same_work_control(sources: list[str], feed: list[list[int]], lanes: int, repeat: int) -> dict[str, Any]:
    """Control: the same llguidance calls without wasmshare, in one process vs ``lanes``.

    Each process compiles its share of the schemas with llguidance directly and replays
    the same steps on copies of one matcher per schema (consume the step's token,
    fast-forward, mask into a private numpy buffer); the lanes start together and a step of the batch lasts as long
    as the slowest lane. No shared memory, no synchronisation between steps: the best that
    independent processes get from this machine for this work.
    """

    def job(members: list[int]) -> dict[str, Any]:
        return {"schemas": [sources[i] for i in members], "feed": [[row[i] for i in members] for row in feed]}

    everyone = list(range(len(sources)))
    groups = [
        [_WorkerProcess("same-work control", ("--same-work",))],
        [_WorkerProcess("same-work control", ("--same-work",)) for _ in range(lanes)],
    ]
    jobs = [[job(everyone)], [job(everyone[k::lanes]) for k in range(lanes)]]
    try:
        for group, group_jobs in zip(groups, jobs):
            for proc, one_job in zip(group, group_jobs):
                proc.spawn()
                proc.send(one_job)
        for group in groups:
            for proc in group:
                proc.wait_ready()
        one_us: list[float] = []
        many_us: list[float] = []
        for round_ in range(repeat + 1):  # the first round warms up
            t, m = (max(_same_work_round(group)) for group in groups)
            if round_:
                one_us.append(t)
                many_us.append(m)
    finally:
        for group in groups:
            for proc in group:
                proc.close()
    ratios = [a / b for a, b in zip(one_us, many_us)]
    return {
        "lanes": lanes,
        "one_process_us": float(np.median(one_us)),
        "processes_us": float(np.median(many_us)),
        "scaling": round(float(np.median(ratios)), 3),
        "scaling_per_round": [round(r, 3) for r in ratios],
    }


def _same_work_round(group: list[_WorkerProcess]) -> list[float]:
    """Start one replay in every process of ``group`` at once; their µs per step."""
    for proc in group:
        proc.send({"go": True})
    results = [proc.read(WALK_TIMEOUT_S) for proc in group]
    if any(r is None for r in results):
        raise RuntimeError("a same-work control process ended or hung")
    return [float(r["us_per_step"]) for r in results if r is not None]


def _same_work_main() -> int:
    """The ``--same-work`` child (see :func:`_same_work_control`)."""
    import llguidance

    from wasmshare.llm import TokenTable
    from wasmshare.llm import _layout as L

    job = json.loads(sys.stdin.readline())
    table = TokenTable.deepseek()
    tok = llguidance.LLTokenizer(table.tokenizer_json, n_vocab=table.vocab_size, eos_token=table.eos_token)
    # One template per schema, copied for each round, as the batch does: copies share the
    # template's lexer, so the lexer states built in one round serve the next.
    templates = [
        llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_json_schema(src), log_level=0)
        for src in job["schemas"]
    ]
    feed: list[list[int]] = job["feed"]
    buf = np.zeros((len(templates), L.mask_words(table.vocab_size)), np.int32)
    rows = [(int(buf[i].ctypes.data), int(buf[i].nbytes)) for i in range(len(templates))]
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not json.loads(line).get("go"):
            break
        matchers = [t.deep_copy() for t in templates]
        t0 = time.perf_counter()
        for row in feed:
            for m, token, (address, nbytes) in zip(matchers, row, rows):
                _bare_step(m, [token] if token >= 0 else [], address, nbytes)
        us = (time.perf_counter() - t0) / len(feed) * 1e6
        print(json.dumps({"us_per_step": us}), flush=True)
    return 0


def _machine_scaling(workers: int) -> float:
    """Control: throughput gain of ``workers`` threads on GIL-free C work (sha256 of 1 MiB)."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    data = np.random.default_rng(0).bytes(1 << 20)
    n = 60

    def work(k: int) -> None:
        for _ in range(k):
            hashlib.sha256(data).digest()

    work(4)
    t0 = time.perf_counter()
    work(n * workers)
    one = time.perf_counter() - t0
    with ThreadPoolExecutor(workers) as pool:
        t0 = time.perf_counter()
        for f in [pool.submit(work, n) for _ in range(workers)]:
            f.result()
        many = time.perf_counter() - t0
    return round(one / many, 3)


# -- rows ------------------------------------------------------------------------------------


def _concat(per_instance: dict[Any, Any], keys: list[Any], field: str | None = None) -> np.ndarray[Any, Any]:
    arrays = [per_instance[k][field] if field else per_instance[k] for k in keys]
    return np.concatenate(arrays) if arrays else np.zeros(0, np.int64)


def _row(case: str, ours: float, baseline: str, base: float, **extra: Any) -> dict[str, Any]:
    return {
        "case": case,
        "ours_us": round(ours, 3),
        "baseline": baseline,
        "baseline_us": round(base, 3),
        "ratio": round(base / ours, 3) if ours > 0 else float("inf"),
        **extra,
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns {"rows", "extra"}."""
    from wasmshare.llm import TokenTable

    mode = "quick" if quick else "full"
    cfg = SETTINGS[mode]
    t_start = time.perf_counter()
    table = TokenTable.deepseek()
    schemas = _load(quick)
    _tokenize(schemas, table.tokenizer_json)
    print(
        f"{len(schemas)} schemas, {sum(len(s['tests']) for s in schemas)} instances loaded and tokenized "
        f"({time.perf_counter() - t_start:.1f} s)",
        file=sys.stderr,
        flush=True,
    )

    llg = _run_llg(table, schemas)
    print(f"ours + llguidance direct: {llg['seconds']:.0f} s", file=sys.stderr, flush=True)
    engines: dict[str, dict[str, Any]] = {}
    notes: dict[str, str] = {}
    for engine in ("xgrammar", "outlines-core"):
        if not _importable(engine):
            notes[engine] = "not installed"
            print(f"{engine}: not installed, skipped", file=sys.stderr, flush=True)
            continue
        ec = cfg[engine]
        subset = [s for s in schemas if s["index"] % ec["every"] == 0]
        if ec["max"] is not None:
            subset = subset[: ec["max"]]
        notes[engine] = (
            f"subset: every {ec['every']}th schema of the split ({len(subset)} schemas), compile "
            f"timeout {ec['timeout_s']:g} s, time budget {ec['budget_s']:g} s"
            + ("; max_threads=1, cache off" if engine == "xgrammar" else "")
        )
        r = _run_external(engine, subset, ec["timeout_s"], ec["budget_s"])
        r["subset_indices"] = r["run_indices"]  # the schemas it reached within its budget
        engines[engine] = r
        print(f"{engine}: {r['seconds']:.0f} s, {r['coverage']}", file=sys.stderr, flush=True)

    par = _parallel(table, schemas, llg["feeds"], cfg["parallel_steps"], cfg["parallel_repeat"])

    # ---- rows
    rows: list[dict[str, Any]] = []
    keys = sorted(llg["per_instance"])
    ours_ns = _concat(llg["per_instance"], keys, "inst_ns")
    batch_ns = _concat(llg["per_instance"], keys, "batch_ns")
    direct_ns = _concat(llg["per_instance"], keys, "direct_ns")
    so, sb, sd = _stats(ours_ns), _stats(batch_ns), _stats(direct_ns)
    for stat in ("p50", "p99", "max", "mean") if so["n"] else ():
        rows.append(
            _row(
                f"per-token step {stat} (every valid instance passed)",
                so[stat],
                DIRECT,
                sd[stat],
                batch_step_us=round(sb[stat], 3),
                tokens=so["n"],
                schemas=len({k[0] for k in keys}),
            )
        )
    co, cd = llg["compile_ms"]["ours"], llg["compile_ms"]["llguidance"]
    common = sorted(set(co) & set(cd))
    if common:
        for stat, fn in (("p50", np.median), ("p99", lambda a: np.percentile(a, 99))):
            o = float(fn(np.array([co[i] for i in common]))) * 1e3
            d = float(fn(np.array([cd[i] for i in common]))) * 1e3
            rows.append(_row(f"compile {stat} (µs)", o, DIRECT, d, schemas=len(common)))
    for engine, r in engines.items():
        both = sorted(set(keys) & set(r["per_instance"]))
        if both:
            o, b = (
                _stats(_concat(llg["per_instance"], both, "inst_ns")),
                _stats(_concat(r["per_instance"], both)),
            )
            for stat in ("p50", "p99", "max", "mean"):
                rows.append(
                    _row(
                        f"per-token step {stat} vs {engine} (instances both pass)",
                        o[stat],
                        engine,
                        b[stat],
                        tokens=o["n"],
                        baseline_tokens=b["n"],
                        schemas=len({k[0] for k in both}),
                    )
                )
        shared = sorted(set(co) & set(r["compile_ms"]))
        if shared:
            o = float(np.median([co[i] for i in shared])) * 1e3
            b = float(np.median([r["compile_ms"][i] for i in shared])) * 1e3
            rows.append(
                _row(
                    f"compile p50 (µs) vs {engine} (schemas both compile)", o, engine, b, schemas=len(shared)
                )
            )
    if par is not None:
        one, two = par["one_thread"]["median_us"], par["parallel"]["median_us"]
        rows.append(
            _row(
                f"batch of {PARALLEL_B} masked in parallel (µs per step)",
                two,
                "one thread (parallel=False)",
                one,
                workers=par["workers"],
                steps=par["steps"],
                distinct_schemas=par["distinct_schemas"],
                gil_held_fraction=par["gil"]["gil_held_fraction_of_one_thread_step"],
                amdahl_bound=par["gil"]["amdahl_bound"],
                machine_thread_scaling=par["machine_thread_scaling"],
            )
        )
        rows.append(
            _row(
                f"batch of {PARALLEL_B} masked in parallel in worker processes (µs per step)",
                par["processes"]["median_us"],
                "one thread (parallel=False)",
                one,
                workers=par["workers"],
                steps=par["steps"],
                distinct_schemas=par["distinct_schemas"],
            )
        )
        control = par["same_work_control"]
        rows.append(
            _row(
                f"control: the same llguidance steps in {control['lanes']} independent processes, "
                "no wasmshare (µs per step)",
                control["processes_us"],
                "the same in one process",
                control["one_process_us"],
                scaling_per_round=control["scaling_per_round"],
            )
        )

    # ---- coverage and the rest
    coverage: dict[str, Any] = {}
    for e in ("ours", "llguidance"):
        c = llg["coverage"][e]
        coverage[e] = {
            **c,
            "valid_passed/valid_total": f"{c['valid_passed']}/{c['valid_total']}",
            "invalid_rejected/invalid_total": f"{c['invalid_rejected']}/{c['invalid_total']}",
        }
    for engine in ("xgrammar", "outlines-core"):
        if engine not in engines:
            coverage[engine] = {"status": notes[engine]}
            continue
        c = engines[engine]["coverage"]
        coverage[engine] = {
            **c,
            "valid_passed/valid_total": f"{c['valid_passed']}/{c['valid_total']}",
            "invalid_rejected/invalid_total": f"{c['invalid_rejected']}/{c['invalid_total']}",
            "note": notes[engine],
            "worker_restarts": engines[engine]["restarts"],
            "seconds": round(engines[engine]["seconds"], 1),
        }
        sub = engines[engine]["subset_indices"]
        coverage[engine]["ours_on_the_same_subset"] = {
            "schemas": len(sub),
            "compiled": len([i for i in co if i in sub]),
            "valid_passed": sum(1 for k in llg["valid_passed_keys"] if k[0] in sub),
            "valid_total": sum(v for s in schemas if s["index"] in sub for v, _ in s["tests"]),
            "invalid_rejected": sum(1 for k in llg["invalid_rejected_keys"] if k[0] in sub),
            "invalid_total": sum(1 - v for s in schemas if s["index"] in sub for v, _ in s["tests"]),
        }
    p50_ratio = so["p50"] / sd["p50"] if sd["n"] else None
    target_list = [
        {
            "target": "ours per-token p50 within 1.1× of llguidance direct (ours/direct)",
            "met": p50_ratio is not None and p50_ratio <= 1.1,
            "value": round(p50_ratio, 3) if p50_ratio is not None else "no valid instance passed",
        },
    ]
    enforced = _enforced_summary(llg)
    target_list += [
        {
            "target": "schemas accepted (grammar, or grammar + checks) ≥ 99 % of the split",
            "met": enforced["schemas_accepted_fraction"] >= 0.99,
            "value": enforced["schemas_accepted_fraction"],
        },
        {
            "target": "valid instances of accepted schemas passing grammar + checks (as written, "
            "else in the schema's property order) ≥ 99 %",
            "met": enforced["valid_passed_in_schema_order_fraction"] >= 0.99,
            "value": enforced["valid_passed_in_schema_order_fraction"],
            "as_written": enforced["valid_passed_fraction"],
        },
        {
            "target": "invalid instances of accepted schemas rejected by grammar or checks ≥ 99 %",
            "met": enforced["invalid_rejected_fraction"] >= 0.99,
            "value": enforced["invalid_rejected_fraction"],
        },
    ]
    if par is not None:
        gain = par["one_thread"]["median_us"] / min(
            par["parallel"]["median_us"], par["processes"]["median_us"]
        )
        target_list.append(
            {
                "target": f"batch of {PARALLEL_B} masked in parallel on {par['workers']} cores "
                "(threads or worker processes, the faster): ≥ 1.8× the throughput of one thread",
                "met": bool(gain >= 1.8),
                "value": round(gain, 3),
                "same_work_control": par["same_work_control"]["scaling"],
            }
        )
    else:
        target_list.append(
            {
                "target": f"batch of {PARALLEL_B} masked in parallel: ≥ 1.8× one thread",
                "met": False,
                "value": "no instance long enough to run it",
            }
        )
    target_list.append(
        {
            "target": "every mask, forced-token list and stop equal to llguidance direct's",
            "met": not llg["disagreements"],
            "value": len(llg["disagreements"]),
        }
    )
    extra = {
        "quick": quick,
        "split": f"MaskBench dev ({_split_path().name}), {f'every {QUICK_EVERY}th schema' if quick else 'all schemas'}",
        "schemas": len(schemas),
        "tokenizer": f"{table.name}, {table.vocab_size} tokens",
        "versions": {
            d: _version(d)
            for d in (
                "llguidance",
                "xgrammar",
                "outlines-core",
                "transformers",
                "apache-tvm-ffi",
                "tokenizers",
                "torch",
            )
        },
        "engine_notes": {
            "ours": "ControllerBatch(capacity=1, parallel=False); the ConstraintInstance step timed "
            "inside batch.step; batch_step_us = the whole batch.step",
            "llguidance": "direct LLMatcher, same step work (consume, forced tokens, mask into numpy)",
            **notes,
        },
        "coverage": coverage,
        "per_token_us": {
            "ours": so,
            "ours_batch_step": sb,
            "llguidance": sd,
            **{e: _stats(_concat(r["per_instance"], sorted(r["per_instance"]))) for e, r in engines.items()},
        },
        "compile_ms": {e: _stats(np.array(list(v.values())) * 1e3) for e, v in llg["compile_ms"].items()}
        | {e: _stats(np.array(list(r["compile_ms"].values())) * 1e3) for e, r in engines.items()},
        "compile_errors_sample": {**llg["errors"], **{e: r["errors"] for e, r in engines.items()}},
        "fast_forward": {
            "retokenized_after_forced_tokens": llg["ff_retokenized"],
            "forced_text_differs_from_instance": llg["ff_diverged"],
        },
        "disagreements_with_direct": llg["disagreements"][:20],
        "schemas_enforced": _enforced_summary(llg),
        "parallel": par,
        "seconds": round(time.perf_counter() - t_start, 1),
        "targets": target_list,
    }
    return {"rows": rows, "extra": extra}


def _enforced_summary(llg: dict[str, Any]) -> dict[str, Any]:
    """Ours with checks against the grammar alone: accepted schemas, instances, every exception."""
    c = llg["coverage"]["ours"]
    valid_on_accepted = c["valid_passed"] + sum(1 for e in llg["exceptions"] if e["valid"])
    invalid_on_accepted = c["invalid_rejected"] + sum(1 for e in llg["exceptions"] if not e["valid"])
    return {
        "schemas_accepted": c["compiled"],
        "schemas_accepted_fraction": round(c["compiled"] / max(1, c["schemas"]), 4),
        "by_grammar": c["by_grammar"],
        "with_checks": c["with_checks"],
        "refused": llg["refused"],
        "dropped_keywords": llg["dropped_keywords"],
        "valid_passed_fraction": round(c["valid_passed"] / max(1, valid_on_accepted), 4),
        "valid_passed_in_schema_order_fraction": round(
            c["valid_passed_in_schema_order"] / max(1, valid_on_accepted), 4
        ),
        "invalid_rejected_fraction": round(c["invalid_rejected"] / max(1, invalid_on_accepted), 4),
        "instances_of_accepted_schemas": {"valid": valid_on_accepted, "invalid": invalid_on_accepted},
        "invalid_rejected_by": {
            "grammar": c["invalid_rejected_by_grammar"],
            "checks": c["invalid_rejected_by_checks"],
        },
        "exceptions": llg["exceptions"],
    }


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets from the rows (run() also adds the mask-equality check)."""
    out: list[dict[str, Any]] = []
    for r in rows:
        if r["case"].startswith("per-token step p50 (every"):
            value = r["ours_us"] / r["baseline_us"]
            out.append(
                {
                    "target": "ours per-token p50 within 1.1× of llguidance direct (ours/direct)",
                    "met": value <= 1.1,
                    "value": round(value, 3),
                }
            )
    parallel = [r["ratio"] for r in rows if r["case"].startswith(f"batch of {PARALLEL_B}")]
    if parallel:
        out.append(
            {
                "target": f"batch of {PARALLEL_B} masked in parallel (threads or worker processes, the faster): "
                "≥ 1.8× the throughput of one thread",
                "met": max(parallel) >= 1.8,
                "value": max(parallel),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench_grammars", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (every 200th schema)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    parser.add_argument("--worker", choices=("xgrammar", "outlines-core"), help=argparse.SUPPRESS)
    parser.add_argument("--same-work", action="store_true", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.worker:
        return _worker(ns.worker)
    if ns.same_work:
        return _same_work_main()
    result = run(quick=ns.quick)
    extra = result["extra"]
    _common.report(NAME, result["rows"], out_dir=ns.out, extra=extra)
    _print_coverage(extra["coverage"])
    return 0


def _print_coverage(coverage: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="coverage (same split, same tokenizer)")
    for col in (
        "engine",
        "schemas",
        "compiled",
        "errors",
        "timeouts",
        "valid passed",
        "invalid rejected",
        "note",
    ):
        table.add_column(col)
    for engine, c in coverage.items():
        if "status" in c:
            table.add_row(engine, "", "", "", "", "", "", c["status"])
            continue
        table.add_row(
            engine,
            str(c.get("run", c["schemas"])),
            str(c["compiled"]),
            str(c["errors"]),
            str(c["timeouts"]),
            c["valid_passed/valid_total"],
            c["invalid_rejected/invalid_total"],
            c.get("note", ""),
        )
    Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200).print(table)


if __name__ == "__main__":
    raise SystemExit(main())
