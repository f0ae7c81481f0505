"""Generation under JSON Schemas llguidance refuses: grammar + checks against the grammar alone.

Schemas: real ones from the MaskBench development split (``shared/maskbench``) whose plan
leaves keywords to checks (:func:`wasmshare.llm.constraints.schema_plan`), small enough
for the embedded model to answer (compact JSON of at most 700 characters, or 1,600 for a keyword
no smaller schema uses), up to
``PER_KEYWORD`` per dropped keyword, in the split's order. Each is asked for once, with a
prompt that shows one of its *invalid* instances as the shape to follow (its first valid one
when it has none): a model that copies what it sees then writes answers the checks must
repair.

Cases, on the embedded SmolLM2-135M-Instruct, greedy, ``max_tokens`` ``TOKENS``, one
:class:`~wasmshare.llm.engine.Engine` (``max_batch`` 8, continuous batching) per case, the two
cases alternating over ``REPEATS`` rounds:

* checks: ``json_schema(schema)``: the relaxed grammar, the checks, repairs by backtracking;
* grammar alone: the relaxed grammar as a schema of its own (``oneOf`` spelled ``anyOf``, the
  dropped keywords gone), no checks: what an engine that ignores what it cannot enforce does.

Every answer is validated with ``jsonschema`` (format checker on) under the *full* schema.
Reported per case: answers valid, ended with the named error, cut by ``max_tokens``, and
returned as a success while invalid (must be 0 with checks); backtracks; tokens generated;
wall time (median over rounds). Ratio: grammar alone's time / checks' time.
"""

from __future__ import annotations

import copy
import gzip
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

NAME = "schema_checks"
ROOT = Path(__file__).resolve().parent.parent
SPLIT = ROOT.parent / "shared" / "maskbench" / "maskbench-dev.jsonl.gz"
MAX_SCHEMA_CHARS = (700, 1600)
PER_KEYWORD = 3
KEYWORDS = (
    "not",
    "oneOf",
    "format",
    "dependencies",
    "uniqueItems",
    "if",
    "contains",
    "minProperties",
    "propertyNames",
    "pattern",
)
TOKENS = 96
_SUMMARY = ("valid", "named_error", "length", "invalid_returned_as_success", "other", "backtracks", "tokens")
REPEATS = 2


def _pick(limit_per_keyword: int) -> list[dict[str, Any]]:
    """Small real schemas that need checks, up to ``limit_per_keyword`` for each keyword: the
    smallest size class first, a larger one for keywords only larger schemas use."""
    from wasmshare.errors import ConstraintError
    from wasmshare.llm import constraints as C

    counts = dict.fromkeys(KEYWORDS, 0)
    picked: list[dict[str, Any]] = []
    with gzip.open(SPLIT, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    for limit in MAX_SCHEMA_CHARS:
        for row in rows:
            schema = row["schema"]
            if not isinstance(schema, dict) or len(json.dumps(schema, separators=(",", ":"))) > limit:
                continue
            if any(p["name"] == row["name"] for p in picked):
                continue
            try:
                plan = C.schema_plan(C.json_schema(schema))
            except ConstraintError:
                continue
            if not any(k in counts and counts[k] < limit_per_keyword for k in plan.keywords):
                continue
            for k in plan.keywords:
                if k in counts:
                    counts[k] += 1
            tests = row.get("tests", [])
            shown = next((t for t in tests if not t["valid"]), None) or next(
                (t for t in tests if t["valid"]), None
            )
            picked.append(
                {"name": row["name"], "schema": schema, "keywords": plan.keywords, "example": shown}
            )
            if all(v >= limit_per_keyword for v in counts.values()):
                return picked
    return picked


def _grammar_alone(schema: dict[str, Any]) -> dict[str, Any]:
    """The relaxed grammar as a schema of its own: nothing left to checks."""
    from wasmshare.llm import constraints as C
    from wasmshare.llm.schema_plan import schema_nodes

    relaxed = copy.deepcopy(C.schema_plan(C.json_schema(schema)).grammar_schema)
    assert isinstance(relaxed, dict)
    for _, node in list(schema_nodes(relaxed)):
        if "oneOf" in node:
            node["anyOf"] = node.pop("oneOf")
    guidance = relaxed.get("x-guidance")
    if isinstance(guidance, dict):
        guidance.pop("coerce_one_of", None)
    return relaxed


def _prompt(item: dict[str, Any]) -> str:
    example = item["example"]
    shape = json.dumps(example["data"], ensure_ascii=False) if example else "{}"
    return f"Reply with one JSON value of the same shape as this example: {shape[:400]}"


def _case(loaded: Any, items: list[dict[str, Any]], specs: list[Any]) -> dict[str, Any]:
    import jsonschema

    from wasmshare.llm.engine import Engine, GenerationRequest

    requests = [
        GenerationRequest(_prompt(it), max_tokens=TOKENS, steer=spec) for it, spec in zip(items, specs)
    ]
    with Engine(loaded, max_batch=8) as engine:
        started = time.perf_counter()
        results = engine.generate(requests)
        seconds = time.perf_counter() - started
    valid = named = length = invalid_success = other = 0
    per: list[dict[str, Any]] = []
    for it, r in zip(items, results):
        verdict = "other"
        if r.finish_reason == "error" and "answer violates the schema" in (r.error or ""):
            named += 1
            verdict = "named error"
        elif r.finish_reason == "length":
            length += 1
            verdict = "length"
        elif r.finish_reason == "stop":
            checker = jsonschema.validators.validator_for(it["schema"], default=jsonschema.Draft7Validator)
            try:
                value = json.loads(r.text)
                error = jsonschema.exceptions.best_match(
                    checker(it["schema"], format_checker=checker.FORMAT_CHECKER).iter_errors(value)
                )
            except ValueError:
                error = "not JSON"
            if error is None:
                valid += 1
                verdict = "valid"
            else:
                invalid_success += 1
                verdict = f"invalid: {str(getattr(error, 'message', error))[:100]}"
        else:
            other += 1
            verdict = f"{r.finish_reason}: {(r.error or '')[:100]}"
        per.append(
            {
                "schema": it["name"],
                "verdict": verdict,
                "backtracks": r.backtracks,
                "tokens": len(r.tokens),
                "text": r.text[:120],
            }
        )
    return {
        "seconds": seconds,
        "valid": valid,
        "named_error": named,
        "length": length,
        "invalid_returned_as_success": invalid_success,
        "other": other,
        "backtracks": sum(r.backtracks for r in results),
        "tokens": sum(len(r.tokens) for r in results),
        "per_schema": per,
    }


def run(quick: bool = False) -> list[dict[str, Any]]:
    import torch

    from wasmshare.llm import constraints as C
    from wasmshare.llm.models import load_model

    torch.set_num_threads(2)
    items = _pick(1 if quick else PER_KEYWORD)
    loaded = load_model("smollm2-135m")
    checked = [C.json_schema(it["schema"]) for it in items]
    alone = [C.json_schema(_grammar_alone(it["schema"])) for it in items]
    keyword_counts = {k: sum(k in it["keywords"] for it in items) for k in KEYWORDS}
    print(f"{len(items)} schemas; keywords {keyword_counts}", file=sys.stderr, flush=True)
    rounds: dict[str, list[dict[str, Any]]] = {"checks": [], "grammar alone": []}
    for i in range(1 if quick else REPEATS):
        order = ("checks", "grammar alone") if i % 2 == 0 else ("grammar alone", "checks")
        for case in order:
            rounds[case].append(_case(loaded, items, checked if case == "checks" else alone))
            last = rounds[case][-1]
            print(
                f"  round {i} {case}: {last['seconds']:.1f} s, {last['valid']} valid",
                file=sys.stderr,
                flush=True,
            )
    ours, base = rounds["checks"], rounds["grammar alone"]
    t_ours = statistics.median(r["seconds"] for r in ours)
    t_base = statistics.median(r["seconds"] for r in base)
    first_o, first_b = ours[0], base[0]
    summary = {k: first_o[k] for k in _SUMMARY}
    summary_b = {k: first_b[k] for k in _SUMMARY}
    return [
        {
            "case": f"{len(items)} schemas needing checks: grammar + checks vs grammar alone (wall s)",
            "ours_us": t_ours * 1e6,
            "baseline": "grammar alone (no checks)",
            "baseline_us": t_base * 1e6,
            "ratio": round(t_base / t_ours, 3),
            "schemas": len(items),
            "keyword_counts": keyword_counts,
            "seconds_per_round": [round(r["seconds"], 2) for r in ours],
            "baseline_seconds_per_round": [round(r["seconds"], 2) for r in base],
            "checks": summary,
            "grammar_alone": summary_b,
            "same_outputs_every_round": all(
                [p["text"] for p in r["per_schema"]] == [p["text"] for p in ours[0]["per_schema"]]
                for r in ours
            ),
            "detail_checks": first_o["per_schema"],
            "detail_grammar_alone": first_b["per_schema"],
        }
    ]


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    row = rows[0]
    checks, alone = row["checks"], row["grammar_alone"]
    return [
        {
            "target": "at least 20 schemas needing checks, each dropped keyword at least twice",
            "met": row["schemas"] >= 20 and min(row["keyword_counts"].values()) >= 2,
            "value": row["keyword_counts"],
        },
        {
            "target": "with checks no invalid answer is returned as a success",
            "met": checks["invalid_returned_as_success"] == 0,
            "value": checks,
        },
        {
            "target": "grammar alone: answers returned as a success that fail the full schema (reported)",
            "met": True,
            "value": alone["invalid_returned_as_success"],
        },
    ]


def main(argv: list[str] | None = None) -> int:
    return _common.bench_main(NAME, __doc__, argv, lambda quick: run(quick=quick), targets)


if __name__ == "__main__":
    raise SystemExit(main())
